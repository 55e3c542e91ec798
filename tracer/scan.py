"""Exact top-k proponents and opponents of a query batch over N encodings.

The corpus is streamed in chunks of rows. Each chunk is split over every
device of the mesh (``partitioning.rows_sharding``); each device scores its
rows against all queries in fp32, keeps its local top-k, and the per-device
candidates (``k`` per device and query) are gathered and merged into a running
top-k held replicated on every device. Memory is bounded by the chunk size,
never by N x Q.

Ordering is exact and deterministic: proponents by score descending,
opponents by score ascending, ties broken by the lower row id. Scores are
fp32 dot products; bf16 chunks are never rounded further (see ``_scores``).
NaN scores (from non-finite encodings) rank last and are reported as -inf
(proponents) or +inf (opponents).

If fewer than ``k`` rows are scanned (N < k), results have ``N`` columns.
"""

from __future__ import annotations

import collections
import functools
import queue
import threading
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax
from jax.sharding import Mesh

from tracer import partitioning
from tracer.errors import InputError

INVALID_ROW = np.iinfo(np.int32).max  # row id of padding; loses every tie
# Encodings read per device per step when chunk_rows is not given.
DEFAULT_DEVICE_CHUNK_BYTES = 32 << 20
_BF16 = np.dtype(ml_dtypes.bfloat16)


class TopKState(NamedTuple):
  """Running top-k, replicated on every device.

  Proponent scores are sorted descending, opponent scores ascending; slots not
  yet filled hold -inf / +inf and row ``INVALID_ROW``.
  """
  proponent_scores: jax.Array  # f32[Q, k]
  proponent_rows: jax.Array  # i32[Q, k]
  opponent_scores: jax.Array  # f32[Q, k]
  opponent_rows: jax.Array  # i32[Q, k]


class TopK(NamedTuple):
  """Final result on the host; ``n = min(k, rows scanned)`` columns."""
  proponent_rows: np.ndarray  # int64[Q, n]
  proponent_scores: np.ndarray  # f32[Q, n], descending
  opponent_rows: np.ndarray  # int64[Q, n]
  opponent_scores: np.ndarray  # f32[Q, n], ascending


def _mesh(mesh: Mesh | None) -> Mesh:
  return partitioning.make_mesh() if mesh is None else mesh


# --------------------------------------------------------------------------
# Jitted core.


def _scores(x: jax.Array, queries: jax.Array) -> jax.Array:
  """fp32 scores ``[Q, r]`` of rows ``x [r, d]`` against ``queries f32[Q, d]``."""
  contract = (((1,), (1,)), ((), ()))
  if x.dtype == jnp.bfloat16:
    # Split each fp32 query into three bf16 terms that sum to it exactly
    # (8 + 8 + 8 significand bits). bf16 x bf16 products are exact in fp32, so
    # three bf16 matmuls with fp32 accumulation give fp32 scores against the
    # stored bf16 values, at bf16 matmul speed, without an upcast pass.
    q1 = queries.astype(jnp.bfloat16)
    rest = queries - q1.astype(jnp.float32)
    q2 = rest.astype(jnp.bfloat16)
    q3 = (rest - q2.astype(jnp.float32)).astype(jnp.bfloat16)
    num_queries = queries.shape[0]
    s = lax.dot_general(x, jnp.concatenate([q1, q2, q3]), contract,
                        preferred_element_type=jnp.float32)
    s = (s[:, :num_queries] + s[:, num_queries:2 * num_queries]
         + s[:, 2 * num_queries:])
  else:
    # HIGHEST: GPUs would otherwise use TF32 and TPUs one bf16 pass.
    s = lax.dot_general(x.astype(jnp.float32), queries, contract,
                        precision=lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32)
  # [r, Q] is the faster matmul output on CPU; top_k wants rows last.
  return s.T


def _block_size(rows: int, k: int) -> int | None:
  """Block for the two-stage top-k, or None where one top_k is cheaper."""
  block = 1 << max(3, int(round(np.log2(max(1.0, np.sqrt(rows / k))))))
  nb = -(-rows // block)
  return block if nb + k * block <= rows // 4 else None


def _select(vals: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Top ``k`` of ``vals [Q, r]`` per row; ties go to the lower position.

  Same result as ``lax.top_k``. For r >> k it first keeps the k blocks with the
  largest maxima: every top-k element lies in one of them (each block ranked
  above an element's block holds a distinct element ranked above it), and the
  kept blocks stay in position order, so ties still go to the lower position.
  """
  num_queries, rows = vals.shape
  block = _block_size(rows, k)
  if block is None:
    return lax.top_k(vals, k)
  nb = -(-rows // block)
  if nb * block != rows:
    vals = jnp.pad(vals, ((0, 0), (0, nb * block - rows)),
                   constant_values=-jnp.inf)
  blocks = vals.reshape(num_queries, nb, block)
  _, kept = lax.top_k(blocks.max(axis=-1), k)
  kept = jnp.sort(kept, axis=-1)
  gathered = jnp.take_along_axis(blocks, kept[:, :, None], axis=1)
  v, j = lax.top_k(gathered.reshape(num_queries, k * block), k)
  pos = jnp.take_along_axis(kept, j // block, axis=1) * block + j % block
  return v, pos


def _local_candidates(x, row_ids, valid, queries, *, k: int, rows_sorted: bool):
  """One device's top-k candidates of its rows: 4 arrays ``[Q, min(k, r)]``."""
  s = _scores(x, queries)
  rid = jnp.where(valid, row_ids.astype(jnp.int32), INVALID_ROW)
  ok = valid[None, :] & ~jnp.isnan(s)
  s = jnp.where(s == 0, 0.0, s)  # -0.0 and 0.0 must tie, as in numpy
  if not rows_sorted:
    # top_k breaks ties by position; put positions in row-id order first.
    order = jnp.argsort(rid, stable=True)
    rid, s, ok = rid[order], s[:, order], ok[:, order]
  kl = min(k, x.shape[0])
  pv, pp = _select(jnp.where(ok, s, -jnp.inf), kl)
  ov, op = _select(jnp.where(ok, -s, -jnp.inf), kl)
  return pv, rid[pp], -ov, rid[op]


def _merge(scores, rows, cand_scores, cand_rows, k: int, largest: bool):
  s = jnp.concatenate([scores, cand_scores], axis=1)
  r = jnp.concatenate([rows, cand_rows], axis=1)
  key, r = lax.sort((-s if largest else s, r), dimension=1, num_keys=2)
  key, r = key[:, :k], r[:, :k]
  return (-key if largest else key), r


@functools.lru_cache(maxsize=None)
def _init_fn(mesh: Mesh, num_queries: int, k: int):
  def init():
    shape = (num_queries, k)
    no_row = jnp.full(shape, INVALID_ROW, jnp.int32)
    return TopKState(jnp.full(shape, -jnp.inf, jnp.float32), no_row,
                     jnp.full(shape, jnp.inf, jnp.float32), no_row)
  return jax.jit(init, out_shardings=partitioning.replicated(mesh))


@functools.lru_cache(maxsize=None)
def _update_fn(mesh: Mesh, k: int, rows_sorted: bool):
  rows = partitioning.rows_sharding(mesh).spec
  ids = partitioning.rows_sharding(mesh, ndim=1).spec
  candidates = partitioning.every_device_spec(2, axis=1)
  local = jax.shard_map(
      functools.partial(_local_candidates, k=k, rows_sorted=rows_sorted),
      mesh=mesh,
      in_specs=(rows, ids, ids, partitioning.replicated(mesh).spec),
      out_specs=(candidates,) * 4)

  def update(state: TopKState, x, row_ids, valid, queries) -> TopKState:
    # Candidates are [Q, devices * k]: the merge all-gathers them, k per
    # device and query, never the scores.
    ps, pr, os_, or_ = local(x, row_ids, valid, queries)
    ps, pr = _merge(state.proponent_scores, state.proponent_rows, ps, pr, k, True)
    os_, or_ = _merge(state.opponent_scores, state.opponent_rows, os_, or_, k,
                      False)
    return TopKState(ps, pr, os_, or_)

  return jax.jit(update, out_shardings=partitioning.replicated(mesh))


def init_topk(num_queries: int, k: int, mesh: Mesh | None = None) -> TopKState:
  """An empty running top-k for ``num_queries`` queries, replicated on ``mesh``."""
  if k < 1 or num_queries < 1:
    raise InputError(f"k and num_queries must be >= 1, got k={k}, "
                     f"num_queries={num_queries}")
  return _init_fn(_mesh(mesh), int(num_queries), int(k))()


def update_topk(state: TopKState, chunk_encodings, chunk_row_ids, queries,
                valid_mask=None, *, mesh: Mesh | None = None,
                rows_sorted: bool = False) -> TopKState:
  """Folds one chunk into the running top-k.

  Args:
    state: from ``init_topk`` or a previous ``update_topk``.
    chunk_encodings: ``[rows, d]`` bf16 or f32; rows are split over every
      device of ``mesh`` (padded here if not divisible).
    chunk_row_ids: int ``[rows]`` global row ids (< 2**31 - 1, unique).
    queries: f32 ``[Q, d]``, replicated.
    valid_mask: bool ``[rows]``; False rows never enter the top-k.
    mesh: default ``partitioning.make_mesh()``.
    rows_sorted: promise that row ids increase along the chunk with invalid
      rows last, which skips a per-device sort.

  Under ``jax.distributed`` pass global ``jax.Array``s (e.g. from
  ``jax.make_array_from_process_local_data``).

  Returns:
    The new state (inputs are not donated).
  """
  mesh = _mesh(mesh)
  rows = chunk_encodings.shape[0]
  if valid_mask is None:
    valid_mask = jnp.ones((rows,), bool)
  pad = partitioning.padded_size(rows, mesh.size) - rows
  if pad:
    chunk_encodings = jnp.pad(chunk_encodings, ((0, pad), (0, 0)))
    chunk_row_ids = jnp.pad(chunk_row_ids, (0, pad))
    valid_mask = jnp.pad(valid_mask, (0, pad))
  if chunk_encodings.dtype not in (jnp.bfloat16, jnp.float32):
    chunk_encodings = jnp.asarray(chunk_encodings, jnp.float32)
  k = state.proponent_scores.shape[1]
  return _update_fn(mesh, k, rows_sorted)(
      state, chunk_encodings, chunk_row_ids, valid_mask, queries)


def finish(state: TopKState, rows_seen: int) -> TopK:
  """Host copy of the running top-k, ``min(k, rows_seen)`` columns."""
  n = min(state.proponent_scores.shape[1], rows_seen)

  def host(a):
    # Replicated: one addressable shard is the whole array, on every process.
    return np.asarray(a.addressable_data(0))[:, :n]

  return TopK(host(state.proponent_rows).astype(np.int64),
              host(state.proponent_scores),
              host(state.opponent_rows).astype(np.int64),
              host(state.opponent_scores))


# --------------------------------------------------------------------------
# Host loops.


def _check_inputs(queries, k: int, dim: int, num_rows: int) -> np.ndarray:
  q = np.asarray(queries)
  if q.ndim != 2 or q.shape[0] < 1:
    raise InputError(f"queries: expected a [Q, d] array with Q >= 1, got shape "
                     f"{q.shape}")
  if q.shape[1] != dim:
    raise InputError(f"queries: dimension {q.shape[1]} does not match the "
                     f"encodings' dimension {dim}")
  if int(k) != k or k < 1:
    raise InputError(f"k: must be a positive integer, got {k!r}")
  if num_rows >= INVALID_ROW:
    raise InputError(f"num_rows: {num_rows} rows exceed the int32 row ids")
  return q.astype(np.float32)


def _device_dtype(dtype) -> np.dtype:
  return _BF16 if np.dtype(dtype) == _BF16 else np.dtype(np.float32)


def default_chunk_rows(dim: int, itemsize: int, num_devices: int,
                       multiple: int = 1) -> int:
  """Rows per step: ~``DEFAULT_DEVICE_CHUNK_BYTES`` per device, rounded to
  ``multiple`` rows per device."""
  per_device = max(1, DEFAULT_DEVICE_CHUNK_BYTES // (dim * itemsize))
  per_device = partitioning.padded_size(per_device, multiple)
  return per_device * num_devices


class _Layout:
  """Which rows of a ``[step, d]`` chunk each local device holds."""

  def __init__(self, mesh: Mesh, step: int, dim: int):
    self.mesh = mesh
    self.step = step
    self.dim = dim
    self.rows = partitioning.rows_sharding(mesh)
    self.ids = partitioning.rows_sharding(mesh, ndim=1)
    index_map = self.rows.addressable_devices_indices_map((step, dim))
    self.local = []
    for device, index in index_map.items():
      r = range(step)[index[0]]
      self.local.append((device, r.start, r.stop))

  def pieces(self, read: Callable[[int, int], Any], base: int, num_rows: int,
             dtype: np.dtype):
    """Host buffers for the local devices' rows ``base + [a, b)``."""
    pending = []
    for device, a, b in self.local:
      lo, hi = min(base + a, num_rows), min(base + b, num_rows)
      pending.append((device, a, b, read(lo, hi) if hi > lo else None))
    out = []
    for device, a, b, got in pending:
      x = None if got is None else np.asarray(
          got.result() if hasattr(got, "result") else got)
      if x is None or x.shape[0] < b - a:
        padded = np.zeros((b - a, self.dim), dtype)
        if x is not None:
          padded[:x.shape[0]] = x
        x = padded
      elif x.dtype != dtype:
        x = x.astype(dtype)
      ids = np.arange(base + a, base + b, dtype=np.int32)
      out.append((device, x, ids, ids < num_rows))
    return out

  def put(self, pieces):
    def assemble(shape, sharding, arrays):
      return jax.make_array_from_single_device_arrays(shape, sharding, arrays)
    devices = [p[0] for p in pieces]
    x = assemble((self.step, self.dim), self.rows,
                 [jax.device_put(p[1], d) for d, p in zip(devices, pieces)])
    ids = assemble((self.step,), self.ids,
                   [jax.device_put(p[2], d) for d, p in zip(devices, pieces)])
    valid = assemble((self.step,), self.ids,
                     [jax.device_put(p[3], d) for d, p in zip(devices, pieces)])
    return x, ids, valid


def _prefetched(items: Iterator[Any], depth: int) -> Iterator[Any]:
  """Runs ``items`` in a background thread, up to ``depth`` items ahead."""
  if depth <= 0:
    yield from items
    return
  buf: queue.Queue = queue.Queue(depth)
  stop = threading.Event()
  done = object()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        buf.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def run():
    try:
      for item in items:
        if not put((item, None)):
          return
      put((done, None))
    except BaseException as e:  # pylint: disable=broad-except
      put((None, e))

  thread = threading.Thread(target=run, name="tracer-scan-prefetch", daemon=True)
  thread.start()
  try:
    while True:
      item, error = buf.get()
      if error is not None:
        raise error
      if item is done:
        return
      yield item
  finally:
    stop.set()
    thread.join()


def _scan(read: Callable[[int, int], Any], num_rows: int, dim: int, dtype,
          queries, k: int, mesh: Mesh | None, chunk_rows: int | None,
          prefetch: int, row_multiple: int = 1) -> TopK:
  mesh = _mesh(mesh)
  q = _check_inputs(queries, k, dim, num_rows)
  dtype = _device_dtype(dtype)
  if chunk_rows is None:
    step = default_chunk_rows(dim, dtype.itemsize, mesh.size, row_multiple)
  elif chunk_rows < 1:
    raise InputError(f"chunk_rows: must be >= 1, got {chunk_rows}")
  else:
    step = partitioning.padded_size(int(chunk_rows), mesh.size)
  # No point in a step longer than the corpus (rounded to the mesh).
  step = min(step, partitioning.padded_size(max(num_rows, 1), mesh.size))
  layout = _Layout(mesh, step, dim)
  queries_on_mesh = partitioning.put_global(q, partitioning.replicated(mesh))
  state = init_topk(q.shape[0], k, mesh)
  update = _update_fn(mesh, int(k), True)
  bases = range(0, num_rows, step)
  pieces = _prefetched(
      (layout.pieces(read, base, num_rows, dtype) for base in bases), prefetch)
  in_flight = collections.deque()
  for piece in pieces:
    state = update(state, *layout.put(piece), queries_on_mesh)
    # Dispatch is async: bound how many chunks wait on the device.
    in_flight.append(state)
    if len(in_flight) > max(1, prefetch):
      in_flight.popleft().proponent_scores.block_until_ready()
  return finish(state, num_rows)


def scan_arrays(encodings, queries, k: int, *, mesh: Mesh | None = None,
                chunk_rows: int | None = None, prefetch: int = 2) -> TopK:
  """Exact top-k of an in-memory ``[N, d]`` matrix (f32, bf16 or castable).

  Under ``jax.distributed`` every process passes the same full matrix and
  copies only its devices' rows to them.

  Args:
    encodings: ``[N, d]`` host array.
    queries: ``[Q, d]``, cast to f32.
    k: results per query and side.
    mesh: default ``partitioning.make_mesh()`` over all devices.
    chunk_rows: rows per step (rounded up to the device count); default
      ~``DEFAULT_DEVICE_CHUNK_BYTES`` per device.
    prefetch: chunks prepared ahead in a background thread.
  """
  x = encodings if isinstance(encodings, np.ndarray) else np.asarray(encodings)
  if x.ndim != 2:
    raise InputError(f"encodings: expected [N, d], got shape {x.shape}")
  return _scan(lambda lo, hi: x[lo:hi], x.shape[0], x.shape[1], x.dtype,
               queries, k, mesh, chunk_rows, prefetch)


def scan_store(store, queries, k: int, *, mesh: Mesh | None = None,
               chunk_rows: int | None = None, prefetch: int = 2) -> TopK:
  """Exact top-k over a complete ``store.EncodingStore``, streamed from disk.

  Reads run in a background thread (tensorstore futures for every local
  device's rows at once), ``prefetch`` chunks ahead of the device. Each host
  reads only the rows of its addressable devices. Rows stay in the stored
  dtype until the device (bf16 halves the bytes read).

  Raises:
    InputError: the store is incomplete or the queries' d does not match.
  """
  store.check_complete()
  multiple = store.chunk_rows if chunk_rows is None else 1
  return _scan(store.read_async, store.num_rows, store.dim, store.dtype,
               queries, k, mesh, chunk_rows, prefetch, row_multiple=multiple)


class StreamingScanner:
  """Scores corpus batches as they are encoded, without a store.

  Results equal ``scan_arrays`` over the concatenated batches. Host (numpy)
  batches are treated as global: under ``jax.distributed`` every process
  passes the same batch, or pass a global ``jax.Array`` instead.
  """

  def __init__(self, queries, k: int, mesh: Mesh | None = None):
    self.mesh = _mesh(mesh)
    q = np.asarray(queries)
    if q.ndim != 2:
      raise InputError(f"queries: expected a [Q, d] array, got shape {q.shape}")
    self._queries = partitioning.put_global(
        _check_inputs(q, k, q.shape[1], 0), partitioning.replicated(self.mesh))
    self.dim = q.shape[1]
    self.k = int(k)
    self._state = init_topk(q.shape[0], self.k, self.mesh)
    self._rows_seen = 0

  def add(self, encodings, row_ids) -> None:
    """Folds ``encodings [rows, d]`` with global ``row_ids [rows]`` in."""
    if encodings.ndim != 2 or encodings.shape[1] != self.dim:
      raise InputError(f"encodings: expected [rows, {self.dim}], got shape "
                       f"{encodings.shape}")
    if np.shape(row_ids) != (encodings.shape[0],):
      raise InputError(f"row_ids: expected shape ({encodings.shape[0]},), got "
                       f"{np.shape(row_ids)}")
    rows = encodings.shape[0]
    if rows == 0:
      return
    if isinstance(encodings, jax.Array):
      self._state = update_topk(self._state, encodings, row_ids, self._queries,
                                mesh=self.mesh, rows_sorted=False)
    else:
      x = np.asarray(encodings)
      x = x.astype(_device_dtype(x.dtype), copy=False)
      ids = np.asarray(row_ids, dtype=np.int64)
      if ids.min() < 0 or ids.max() >= INVALID_ROW:
        raise InputError(f"row_ids: must lie in [0, {INVALID_ROW}), got "
                         f"[{ids.min()}, {ids.max()}]")
      if np.any(ids[1:] < ids[:-1]):
        order = np.argsort(ids, kind="stable")
        x, ids = x[order], ids[order]
      padded = partitioning.padded_size(rows, self.mesh.size)
      if padded != rows:
        x = np.concatenate([x, np.zeros((padded - rows, self.dim), x.dtype)])
        ids = np.concatenate([ids, np.zeros(padded - rows, ids.dtype)])
      valid = np.arange(padded) < rows
      put = partitioning.put_global
      self._state = update_topk(
          self._state,
          put(x, partitioning.rows_sharding(self.mesh)),
          put(ids.astype(np.int32), partitioning.rows_sharding(self.mesh, 1)),
          self._queries,
          put(valid, partitioning.rows_sharding(self.mesh, 1)),
          mesh=self.mesh, rows_sorted=True)
    self._rows_seen += rows

  def state(self) -> TopKState:
    return self._state

  def result(self) -> TopK:
    return finish(self._state, self._rows_seen)
