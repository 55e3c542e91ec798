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

from tracer.errors import InputError

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


def spans_processes(mesh: Mesh) -> bool:
  """Whether ``mesh`` holds devices of several processes: their plans must
  then be agreed (a mesh of one process's devices is its scan alone)."""
  return len({d.process_index for d in mesh.devices.flat}) > 1


def check_mesh_processes(mesh: Mesh) -> None:
  """InputError unless ``mesh`` holds devices of one process or of every
  process: tracer's agreements between processes (``multihost_utils``)
  run over all of them, so a mesh over some would wait on the others
  (jax's gloo ends that wait after 30 s with "Gloo context initialization
  failed")."""
  held = sorted({d.process_index for d in mesh.devices.flat})
  if 1 < len(held) < jax.process_count():
    raise InputError(
        f"mesh: holds devices of processes {held} of the "
        f"{jax.process_count()}; expected a mesh over every process's devices "
        "(partitioning.make_mesh) or over one process's alone")


def check_even_processes(devices: Sequence[jax.Device] | None = None) -> None:
  """InputError unless every process has as many of ``devices`` (default:
  all global devices): jax's ``multihost_utils`` (and so tracer's
  gathers between hosts) lay the devices out as a [processes, devices]
  grid, and a process with fewer ends in a reshape error deep in a scan."""
  devices = jax.devices() if devices is None else devices
  counts: dict[int, int] = {}
  for d in devices:
    counts[d.process_index] = counts.get(d.process_index, 0) + 1
  if len(set(counts.values())) > 1:
    each = ", ".join(f"process {p}: {n}" for p, n in sorted(counts.items()))
    raise InputError(
        f"jax.distributed: the processes have different numbers of devices "
        f"({each}); expected as many on every process (check each host's "
        "XLA_FLAGS, CUDA_VISIBLE_DEVICES or TPU slice)")


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


# A weight of at least this many elements that the model axis cannot split is
# an error, not a silent copy on every device: params never sit whole on one
# device (Gemma's 2^18-row embedding and 2^k * 5 widths split over 2, 4, 8,
# never over 3 or 6, where the rule above copied all of Gemma 3 4B to each).
SPLIT_AT_ELEMENTS = 1 << 20


def param_shardings(mesh: Mesh, params: Any) -> Any:
  """NamedShardings for a params pytree (or its ShapeDtypeStructs), by
  ``param_spec``; an InputError if a weight of ``SPLIT_AT_ELEMENTS`` or more
  would be copied whole to every device of a model axis."""
  model_size = mesh.shape[MODEL]
  specs = [(path, np.shape(x), param_spec(np.shape(x), model_size))
           for path, x in jax.tree_util.tree_flatten_with_path(params)[0]]
  large = [shape for _, shape, _ in specs
           if len(shape) >= 2 and math.prod(shape) >= SPLIT_AT_ELEMENTS]
  for path, shape, spec in specs:
    if model_size > 1 and shape in large and spec == P():
      sizes = [m for m in range(2, 65)
               if all(any(d % m == 0 for d in s) for s in large)]
      raise InputError(
          f"params{jax.tree_util.keystr(path)}: shape {tuple(shape)} has no axis "
          f"divisible by the mesh's model axis ({model_size}), so it would sit "
          "whole on every device; expected a model axis that splits every large "
          f"weight ({', '.join(map(str, sizes[:8])) or 'none up to 64'})")
  return jax.tree.unflatten(jax.tree.structure(params),
                            [NamedSharding(mesh, spec) for _, _, spec in specs])


def given_shardings(mesh: Mesh, params: Any, shardings: Any | None) -> Any:
  """``shardings`` (a params-shaped pytree of ``NamedSharding`` or
  ``PartitionSpec``, the latter on ``mesh``) checked against ``params``; None:
  ``param_shardings(mesh, params)``."""
  if shardings is None:
    return param_shardings(mesh, params)
  is_leaf = lambda s: isinstance(s, (NamedSharding, P))
  leaves, tree = jax.tree.flatten(shardings, is_leaf=is_leaf)
  if tree != jax.tree.structure(params):
    raise ValueError(f"param_shardings: its tree {tree} is not the params' "
                     f"{jax.tree.structure(params)}")
  out = []
  for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(params)[0], leaves):
    where = f"param_shardings{jax.tree_util.keystr(path)}"
    if not isinstance(s, (NamedSharding, P)):
      raise ValueError(f"{where}: expected a NamedSharding or PartitionSpec, got "
                       f"{type(s).__name__}")
    if isinstance(s, NamedSharding) and s.mesh != mesh:
      raise ValueError(f"{where}: a NamedSharding on another mesh "
                       f"({dict(s.mesh.shape)}) than the encoder's "
                       f"({dict(mesh.shape)}); expected one on its mesh, or a "
                       "PartitionSpec")
    unknown = [a for a in jax.tree.leaves(tuple(s.spec if isinstance(s, NamedSharding)
                                                else s)) if a not in mesh.axis_names]
    if unknown:
      raise ValueError(f"{where}: axis {unknown[0]!r} is not one of the mesh's "
                       f"{mesh.axis_names}")
    s = NamedSharding(mesh, s) if isinstance(s, P) else s
    try:
      s.shard_shape(np.shape(x))
    except ValueError:
      raise ValueError(f"{where}: {s.spec} does not divide shape {np.shape(x)} on mesh "
                       f"{dict(mesh.shape)}") from None
    out.append(s)
  return jax.tree.unflatten(tree, out)


def padded_size(n: int, multiple: int) -> int:
  return int(math.ceil(n / multiple) * multiple) if n else multiple


def all_devices_batch(mesh: Mesh) -> NamedSharding:
  """Leading (example) axis split over every device: pure data parallelism."""
  return NamedSharding(mesh, P((DATA, MODEL)))


def data_batch(mesh: Mesh) -> NamedSharding:
  """Leading axis split over ``data`` only: each item's computation is split
  over ``model`` (e.g. a model-parallel step per item)."""
  return NamedSharding(mesh, P(DATA))


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


def place(tree: Any, shardings: Any) -> Any:
  """Puts a pytree on ``shardings``, leaf by leaf, on one or many processes.

  A leaf already on its sharding is kept; host arrays and arrays that live on
  this process's devices only (e.g. restored onto one device) go through the
  host, each process copying the shards of its own devices.
  """
  def one(x, sharding):
    if isinstance(x, jax.Array):
      if x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
      if jax.process_count() == 1 or not x.is_fully_addressable:
        return jax.device_put(x, sharding)
      x = np.asarray(x)
    return put_global(x, sharding)
  return jax.tree.map(one, tree, shardings)


def data_block(mesh: Mesh) -> tuple[int, int]:
  """The ``data``-axis indices ``[start, stop)`` of this process's devices.

  They must be contiguous (true of meshes made by ``make_mesh`` over
  ``jax.devices()``, which lists each process's devices together).
  """
  blocks = _data_blocks(mesh)
  if jax.process_index() not in blocks:  # (a KeyError before 2026-12-07)
    raise InputError(f"a mesh of {mesh.size} devices holds none of process "
                     f"{jax.process_index()}'s; expected a mesh over every "
                     "process's devices (make_mesh)")
  return blocks[jax.process_index()]


def _data_blocks(mesh: Mesh) -> dict[int, tuple[int, int]]:
  rows: dict[int, set[int]] = {}
  for (i, _), device in np.ndenumerate(mesh.devices):
    rows.setdefault(device.process_index, set()).add(i)
  blocks = {}
  for process, indices in rows.items():
    lo, hi = min(indices), max(indices) + 1
    if len(indices) != hi - lo:
      raise ValueError(f"process {process} holds data-axis indices "
                       f"{sorted(indices)}: not a contiguous block")
    blocks[process] = (lo, hi)
  return blocks


def data_groups(mesh: Mesh) -> tuple[int, int, bool]:
  """How processes share the ``data`` axis: ``(groups, my group, writer)``.

  Processes whose devices hold the same data-axis block form a group (more
  than one process per group only when the ``model`` axis spans hosts); they
  see the same examples. Groups are numbered by their block's position; the
  group's lowest process is its writer.
  """
  blocks = _data_blocks(mesh)
  order = sorted(set(blocks.values()))
  for a, b in zip(order, order[1:]):
    if a[1] > b[0]:
      raise ValueError(f"processes hold overlapping data-axis blocks {a} and {b}")
  if len({b - a for a, b in order}) > 1:
    # Every process must run the same steps with batches of the same size.
    raise ValueError(f"processes hold data-axis blocks of different sizes "
                     f"{order}: choose a data axis that splits evenly over them")
  mine = blocks[jax.process_index()]
  writer = min(p for p, block in blocks.items() if block == mine)
  return len(order), order.index(mine), writer == jax.process_index()


def from_local(local: np.ndarray, sharding: NamedSharding,
               global_shape: Sequence[int], axis: int, start: int) -> jax.Array:
  """A global array from this process's contiguous block of it along ``axis``.

  ``local`` holds global indices ``[start, start + local.shape[axis])`` of
  ``axis`` (all of every other axis); each process passes its own block, and
  nothing crosses hosts.
  """
  local = np.asarray(local)

  def shard(index):
    index = list(index)
    s = index[axis]
    index[axis] = slice((s.start or 0) - start,
                        (global_shape[axis] if s.stop is None else s.stop) - start)
    return local[tuple(index)]

  return jax.make_array_from_callback(tuple(global_shape), sharding, shard)


def local_part(x: jax.Array, axis: int) -> np.ndarray:
  """This process's distinct shards of ``x`` along ``axis``, in order, on the host
  (the inverse of ``from_local``; replicas over other axes are taken once).
  ``x`` must be split along ``axis`` only: a ValueError otherwise (keeping one
  shard per ``axis`` offset would drop the rest of every other axis)."""
  parts = {}
  for shard in x.addressable_shards:
    split = [d for d in range(x.ndim)
             if d != axis % x.ndim and shard.data.shape[d] != x.shape[d]]
    if split:
      raise ValueError(f"local_part along axis {axis} of an array of shape "
                       f"{x.shape} split along axis {split[0]} too "
                       f"({x.sharding}); expected it whole on every other axis")
    s = shard.index[axis]
    parts.setdefault((s.start or 0), shard)
  return np.concatenate([np.asarray(parts[k].data) for k in sorted(parts)],
                        axis=axis)


def fetch(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly multi-host) global array, on this host."""
  if jax.process_count() == 1 or x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
