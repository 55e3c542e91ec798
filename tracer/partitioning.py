"""Every sharding decision in tracer lives here.

The mesh has two axes, as in training: ``data`` (examples are split over it) and
``model`` (parameters are split over it). Other modules ask this one for
``NamedSharding``s and never build ``PartitionSpec``s themselves.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
MODEL = "model"


def make_mesh(data: int | None = None, model: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, model) mesh over ``devices`` (default: all global devices).

  ``data=None`` takes every device not used by ``model``.
  """
  devices = list(jax.devices() if devices is None else devices)
  if data is None:
    if len(devices) % model:
      raise ValueError(f"model axis {model} does not divide {len(devices)} devices")
    data = len(devices) // model
  if data * model != len(devices):
    raise ValueError(f"mesh ({data}, {model}) needs {data * model} devices, "
                     f"got {len(devices)}")
  grid = np.asarray(devices, dtype=object).reshape(data, model)
  return Mesh(grid, (DATA, MODEL))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def rows_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """A ``[rows, d]`` array (or ``[rows]`` with ndim=1) with rows split over every
  device of the mesh."""
  return NamedSharding(mesh, P((DATA, MODEL), *([None] * (ndim - 1))))


def param_spec(shape: Sequence[int], model_size: int) -> P:
  """Splits the largest axis divisible by the ``model`` axis size; else replicated.

  Vectors and small tensors stay replicated, like training's usual rules.
  """
  if model_size == 1 or len(shape) < 2:
    return P()
  order = sorted(range(len(shape)), key=lambda i: (-shape[i], -i))
  for axis in order:
    if shape[axis] % model_size == 0:
      spec = [None] * len(shape)
      spec[axis] = MODEL
      return P(*spec)
  return P()


def param_shardings(mesh: Mesh, params: Any) -> Any:
  """NamedShardings for a params pytree (or its ShapeDtypeStructs)."""
  model_size = mesh.shape[MODEL]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, param_spec(np.shape(x), model_size)), params)


def padded_size(n: int, multiple: int) -> int:
  return int(math.ceil(n / multiple) * multiple) if n else multiple


def all_devices_batch(mesh: Mesh) -> NamedSharding:
  """Leading (example) axis split over every device: pure data parallelism."""
  return NamedSharding(mesh, P((DATA, MODEL)))


def to_global(host_batch: Any, sharding: NamedSharding) -> Any:
  """Assembles a global batch from each host's slice of it.

  With one process this is ``device_put``. With several, every host passes the
  rows it owns (the global batch split into ``process_count`` equal consecutive
  parts, in process order).
  """
  if jax.process_count() == 1:
    return jax.tree.map(lambda x: jax.device_put(x, sharding), host_batch)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), host_batch)


def host_slice(global_size: int) -> slice:
  """The part of a global batch of ``global_size`` rows this host supplies."""
  per_host = global_size // jax.process_count()
  start = jax.process_index() * per_host
  return slice(start, start + per_host)


def every_device_spec(ndim: int, axis: int = 0) -> P:
  """``axis`` split over every device (``data`` then ``model``), the rest replicated.

  ``every_device_spec(2)`` is the spec of ``rows_sharding``; the scan's
  per-device candidates use ``every_device_spec(2, axis=1)``.
  """
  spec = [None] * ndim
  spec[axis] = (DATA, MODEL)
  return P(*spec)


def put_global(x: Any, sharding: NamedSharding) -> jax.Array:
  """Places a host array that every process holds in full onto a global sharding.

  Each process copies only the shards of its addressable devices, so this
  works under ``jax.distributed`` where ``jax.device_put`` may not.
  """
  x = np.asarray(x)
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def stepped_batch(mesh: Mesh) -> NamedSharding:
  """``[steps, examples_per_step, ...]``: each step's examples split over ``data``."""
  return NamedSharding(mesh, P(None, DATA))


def fetch(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly multi-host) global array, on this host."""
  if jax.process_count() == 1 or x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
