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

Cost: per step, one matmul (the roofline) plus a selection that is cheap once
the running k-th best is high: a device only ranks the row blocks whose
maximum reaches it (``_select_rows``). Host side, rows are used in place when
they are 64-byte aligned (``aligned_empty``) and otherwise copied once into
reused aligned buffers by a background thread, overlapped with the device.

Entry points: ``scan_arrays`` (in-memory matrix), ``scan_store`` (an
``EncodingStore``), ``StreamingScanner`` (batches as they are encoded), all on
the functional core ``init_topk`` / ``update_topk`` / ``finish``.
"""

from __future__ import annotations

import collections
import functools
import queue
import threading
from typing import Any, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax
from jax.sharding import Mesh

from tracer import data as data_lib
from tracer import partitioning
from tracer.errors import InputError

INVALID_ROW = np.iinfo(np.int32).max  # row id of padding; loses every tie
# Encodings read per device per step when chunk_rows is not given.
DEFAULT_DEVICE_CHUNK_BYTES = 64 << 20
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


def _bf16_head(x: jax.Array) -> jax.Array:
  """``x`` (f32) truncated to its top 8 significand bits: exact in bf16."""
  bits = lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFF0000)
  return lax.bitcast_convert_type(bits, jnp.float32)


def _scores(x: jax.Array, queries: jax.Array) -> jax.Array:
  """fp32 scores ``[r, Q]`` of rows ``x [r, d]`` against ``queries f32[Q, d]``.

  Rows stay the leading axis: it is the faster matmul output on CPU, and the
  selection below reduces over row blocks without a transpose.
  """
  contract = (((1,), (1,)), ((), ()))
  if x.dtype == jnp.bfloat16:
    # Split each fp32 query into three bf16 terms that sum to it exactly
    # (8 + 8 + 8 significand bits). bf16 x bf16 products are exact in fp32, so
    # three bf16 matmuls with fp32 accumulation give fp32 scores against the
    # stored bf16 values, at bf16 matmul speed, without an upcast pass.
    # The terms come from bit masks, not f32 -> bf16 -> f32 round trips, which
    # XLA may drop as "excess precision" (it does on GPU).
    q1 = _bf16_head(queries)
    rest = queries - q1
    q2 = _bf16_head(rest)
    q3 = rest - q2  # <= 8 significant bits left: exact in bf16
    num_queries = queries.shape[0]
    terms = jnp.concatenate([q1, q2, q3]).astype(jnp.bfloat16)
    s = lax.dot_general(x, terms, contract, preferred_element_type=jnp.float32)
    return (s[:, :num_queries] + s[:, num_queries:2 * num_queries]
            + s[:, 2 * num_queries:])
  # HIGHEST: GPUs would otherwise use TF32 and TPUs one bf16 pass.
  return lax.dot_general(x.astype(jnp.float32), queries, contract,
                         precision=lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32)


def _block_size(rows: int, k: int) -> int | None:
  """Block for the two-stage top-k, or None where one top_k is cheaper."""
  # ~sqrt(rows / k) balances the two top_k sizes; XLA's CPU TopK costs about
  # as much per element as a gather below 16.
  block = 1 << max(4, int(round(np.log2(max(1.0, np.sqrt(rows / k))))))
  nb = -(-rows // block)
  return block if nb + k * block <= rows // 4 else None


# The fast path of _select_rows gathers FAST_BLOCKS blocks and tries a top-c
# for each c in FAST_LEVELS before a top-k.
FAST_BLOCKS = 32
FAST_LEVELS = (8, 32)


def _select_rows(vals: jax.Array, rid: jax.Array, threshold: jax.Array,
                 k: int) -> tuple[jax.Array, jax.Array]:
  """Top-k candidates among the rows of ``vals [r, Q]``, for each query.

  Returns ``(values, row ids)``, both ``[Q, k]``. With ``threshold = -inf``
  they are exactly ``lax.top_k(vals.T, k)`` (ties to the lower position).
  ``threshold [Q]`` is the running k-th best: only elements ``>= threshold``
  can still enter the top-k, and only those are guaranteed; other slots may
  hold any element or padding (``-inf``, ``INVALID_ROW``).

  XLA's CPU TopK costs about 4 ns per element plus k log k per row, so:
  1. Two stages: keep the k blocks with the largest maxima, then top-k
     inside them. Every top-k element lies in a kept block (each block ranked
     above an element's block holds a distinct element ranked above it), and
     kept blocks stay in position order, so ties still go to the lower
     position.
  2. Fast path, once the threshold is high (most chunks of a large corpus):
     if every query has at most FAST_BLOCKS blocks whose maximum reaches the
     threshold, those blocks are all among the FAST_BLOCKS largest, and a
     top-c of their elements, c >= how many reach the threshold, finds every
     element that matters.
  """
  rows, num_queries = vals.shape
  block = _block_size(rows, k)
  if block is None:
    v, pos = lax.top_k(vals.T, k)
    return v, rid[pos]
  nb = -(-rows // block)
  if nb * block != rows:
    vals = jnp.pad(vals, ((0, nb * block - rows), (0, 0)),
                   constant_values=-jnp.inf)
    rid = jnp.pad(rid, (0, nb * block - rows), constant_values=INVALID_ROW)
  blocks = vals.reshape(nb, block, num_queries)
  block_max = blocks.max(axis=1).T  # [Q, nb]

  def gather(num_blocks):
    _, kept = lax.top_k(block_max, num_blocks)
    kept = jnp.sort(kept, axis=-1)  # [Q, L], position order
    g = jnp.take_along_axis(blocks, kept.T[:, None, :], axis=0)  # [L, B, Q]
    g = g.transpose(2, 0, 1).reshape(num_queries, num_blocks * block)
    pos = (kept[:, :, None] * block + jnp.arange(block)).reshape(
        num_queries, num_blocks * block)
    return g, pos

  def top(g, pos, c):
    v, j = lax.top_k(g, c)
    r = rid[jnp.take_along_axis(pos, j, axis=1)]
    pad = ((0, 0), (0, k - c))
    return (jnp.pad(v, pad, constant_values=-jnp.inf),
            jnp.pad(r, pad, constant_values=INVALID_ROW))

  def slow():
    return top(*gather(k), k)

  fast_blocks = min(FAST_BLOCKS, k // 2)
  if fast_blocks < 8:
    return slow()
  # The last level takes any count: with more than k elements at or above
  # the threshold, the chunk's own top-k are all among them.
  levels = sorted({c for c in FAST_LEVELS if 2 * c <= k}
                  | {min(k, fast_blocks * block)})

  def fast():
    g, pos = gather(fast_blocks)
    above = jnp.sum(g >= threshold[:, None], axis=1).max()
    level = jnp.sum(jnp.asarray(levels[:-1]) < above)
    return lax.switch(level, [functools.partial(top, g, pos, c)
                              for c in levels])

  live = jnp.sum(block_max >= threshold[:, None], axis=1).max()
  return lax.cond(live <= fast_blocks, fast, slow)


def _local_candidates(x, row_ids, valid, queries, pro_kth, opp_kth, *, k: int,
                      rows_sorted: bool):
  """One device's top-k candidates of its rows: 4 arrays ``[Q, min(k, r)]``.

  ``pro_kth`` / ``opp_kth`` ``[Q]``: the running k-th best scores.
  """
  s = _scores(x, queries)  # [r, Q]
  rid = jnp.where(valid, row_ids.astype(jnp.int32), INVALID_ROW)
  if not rows_sorted:
    # top_k breaks ties by position; put positions in row-id order first.
    order = jnp.argsort(rid, stable=True)
    rid, s, valid = rid[order], s[order], valid[order]
  ok = valid[:, None] & ~jnp.isnan(s)
  s = jnp.where(s == 0, 0.0, s)  # -0.0 and 0.0 must tie, as in numpy
  kl = min(k, x.shape[0])
  pv, pr = _select_rows(jnp.where(ok, s, -jnp.inf), rid, pro_kth, kl)
  ov, orow = _select_rows(jnp.where(ok, -s, -jnp.inf), rid, -opp_kth, kl)
  return pv, pr, -ov, orow


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
      in_specs=(rows, ids, ids) + (partitioning.replicated(mesh).spec,) * 3,
      out_specs=(candidates,) * 4)

  def update(state: TopKState, x, row_ids, valid, queries) -> TopKState:
    # Candidates are [Q, devices * k]: the merge all-gathers them, k per
    # device and query, never the scores.
    ps, pr, os_, or_ = local(x, row_ids, valid, queries,
                             state.proponent_scores[:, -1],
                             state.opponent_scores[:, -1])
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
  if not np.all(np.isfinite(q)):
    raise InputError("queries: must be finite (found NaN or inf)")
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


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
  """An uninitialized array whose data starts on an ``align``-byte boundary.

  The CPU backend wraps such host buffers without a copy (``jax.device_put``
  of a 16-byte aligned numpy array copies at ~2-3 GB/s here).
  """
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape)) * dtype.itemsize
  raw = np.empty(nbytes + align, np.uint8)
  offset = -raw.ctypes.data % align
  return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def _zero_copy_ok(x: np.ndarray, dtype: np.dtype) -> bool:
  return (x.dtype == dtype and x.flags.c_contiguous
          and x.ctypes.data % 64 == 0)


class _Closed(Exception):
  """The buffer pool was closed while a producer waited on it."""


class _BufferPool:
  """Reusable aligned host buffers, one set (a buffer per local device) per step.

  A set goes back to the pool only once the step that read it has finished on
  the device, so a buffer is never overwritten while a transfer or a
  zero-copy computation may still read it.
  """

  def __init__(self, shapes: list[tuple[int, int]], dtype: np.dtype, size: int):
    self._shapes = shapes
    self._dtype = dtype
    self._size = size
    self._made = 0
    self._free: queue.Queue = queue.Queue()
    self._closed = threading.Event()
    self._lock = threading.Lock()

  def acquire(self) -> list[np.ndarray]:
    with self._lock:
      if self._free.empty() and self._made < self._size:
        self._made += 1
        return [aligned_empty(s, self._dtype) for s in self._shapes]
    while not self._closed.is_set():
      try:
        return self._free.get(timeout=0.1)
      except queue.Empty:
        pass
    raise _Closed()

  def release(self, buffers: list[np.ndarray] | None) -> None:
    if buffers is not None:
      self._free.put(buffers)

  def close(self) -> None:
    self._closed.set()


class _Layout:
  """Which rows of a ``[step, d]`` chunk each local device holds."""

  def __init__(self, mesh: Mesh, step: int, dim: int, dtype: np.dtype):
    self.step = step
    self.dim = dim
    self.dtype = dtype
    self.rows = partitioning.rows_sharding(mesh)
    self.ids = partitioning.rows_sharding(mesh, ndim=1)
    index_map = self.rows.addressable_devices_indices_map((step, dim))
    self.local = []
    for device, index in index_map.items():
      r = range(step)[index[0]]
      self.local.append((device, r.start, r.stop))

  def shapes(self) -> list[tuple[int, int]]:
    return [(b - a, self.dim) for _, a, b in self.local]

  def load(self, source: _Source, base: int, pool: _BufferPool):
    """Global arrays (chunk, row ids, valid) for rows ``base + [0, step)``.

    A local device's rows are used in place when the source can (an aligned
    in-memory matrix); otherwise they are read into a pooled aligned buffer,
    zero-padded past N. Returns the arrays and the buffer set to release once
    the step is done (None if none was borrowed).
    """
    num_rows = source.num_rows
    bounds = [(min(base + a, num_rows), min(base + b, num_rows), b - a)
              for _, a, b in self.local]
    hosts = [None] * len(self.local)
    for i, (lo, hi, size) in enumerate(bounds):
      if hi - lo == size:
        view = source.view(lo, hi)
        if view is not None and _zero_copy_ok(view, self.dtype):
          hosts[i] = view
    buffers = None
    pending = []
    if any(h is None for h in hosts):
      buffers = pool.acquire()
      for i, (lo, hi, size) in enumerate(bounds):
        if hosts[i] is None:
          hosts[i] = buffers[i]
          if hi > lo:
            pending += source.read_into(lo, hi, buffers[i][:hi - lo])
          buffers[i][max(hi - lo, 0):] = 0  # padding rows past N
    for future in pending:
      future.result()

    def assemble(shape, sharding, arrays):
      return jax.make_array_from_single_device_arrays(
          shape, sharding,
          [jax.device_put(x, d) for x, (d, _, _) in zip(arrays, self.local)])

    ids = [np.arange(base + a, base + b, dtype=np.int32)
           for _, a, b in self.local]
    arrays = (assemble((self.step, self.dim), self.rows, hosts),
              assemble((self.step,), self.ids, ids),
              assemble((self.step,), self.ids, [i < num_rows for i in ids]))
    return arrays, buffers


class _Source:
  """Rows to scan: ``num_rows``, ``dim``, ``dtype`` and two ways to get them."""
  num_rows: int
  dim: int
  dtype: np.dtype

  def view(self, start: int, stop: int) -> np.ndarray | None:
    """Rows ``[start, stop)`` without a copy, if the source holds them."""
    return None

  def read_into(self, start: int, stop: int, out: np.ndarray) -> list[Any]:
    """Copies rows ``[start, stop)`` into ``out``; returns futures to wait on."""
    raise NotImplementedError


class _ArraySource(_Source):

  def __init__(self, x: np.ndarray):
    self.x = x
    self.num_rows, self.dim = x.shape
    self.dtype = x.dtype

  def view(self, start, stop):
    return self.x[start:stop]

  def read_into(self, start, stop, out):
    np.copyto(out, self.x[start:stop], casting="unsafe")
    return []


class _StoreSource(_Source):

  def __init__(self, store):
    self.store = store
    self.num_rows, self.dim = store.num_rows, store.dim
    self.dtype = store.dtype

  def read_into(self, start, stop, out):
    return self.store.read_into(start, stop, out)


def _scan(source: _Source, queries, k: int, mesh: Mesh | None,
          chunk_rows: int | None, prefetch: int, row_multiple: int = 1) -> TopK:
  """The host loop shared by ``scan_arrays`` and ``scan_store``.

  A producer (a background thread if ``prefetch > 0``) reads each step's
  rows into pooled host buffers and places them; the caller's thread
  dispatches the jitted update and keeps at most ``max(1, prefetch)`` steps
  in flight, returning their buffers to the pool once they are done.
  """
  num_rows, dim = source.num_rows, source.dim
  mesh = _mesh(mesh)
  q = _check_inputs(queries, k, dim, num_rows)
  dtype = _device_dtype(source.dtype)
  if chunk_rows is None:
    step = default_chunk_rows(dim, dtype.itemsize, mesh.size, row_multiple)
  elif chunk_rows < 1:
    raise InputError(f"chunk_rows: must be >= 1, got {chunk_rows}")
  else:
    step = partitioning.padded_size(int(chunk_rows), mesh.size)
  # No point in a step longer than the corpus (rounded to the mesh).
  step = min(step, partitioning.padded_size(max(num_rows, 1), mesh.size))
  layout = _Layout(mesh, step, dim, dtype)
  depth = max(1, prefetch)
  pool = _BufferPool(layout.shapes(), dtype, size=prefetch + depth + 2)
  queries_on_mesh = partitioning.put_global(q, partitioning.replicated(mesh))
  state = init_topk(q.shape[0], k, mesh)
  update = _update_fn(mesh, int(k), True)
  steps = (layout.load(source, base, pool)
           for base in range(0, num_rows, step))
  pieces = data_lib.prefetch(steps, prefetch)
  in_flight = collections.deque()
  try:
    for arrays, buffers in pieces:
      state = update(state, *arrays, queries_on_mesh)
      del arrays
      # Dispatch is async: bound the steps queued on the device, and recycle
      # the buffers of those that are done.
      in_flight.append((state, buffers))
      while len(in_flight) > depth:
        done, buffers = in_flight.popleft()
        done.proponent_scores.block_until_ready()
        pool.release(buffers)
  finally:
    pool.close()
    pieces.close()
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
  return _scan(_ArraySource(x), queries, k, mesh, chunk_rows, prefetch)


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
  return _scan(_StoreSource(store), queries, k, mesh, chunk_rows, prefetch,
               row_multiple=multiple)


@jax.jit
def _flatten_stepped(x, row_ids, valid):
  # [steps, step] -> [step * steps] keeps each device's positions together
  # (step is the axis split over devices), so no row changes device.
  flat = lambda a: jnp.swapaxes(a, 0, 1).reshape(-1, *a.shape[2:])
  return flat(x), flat(row_ids), flat(valid), jnp.sum(valid)


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

  def add_stepped(self, encodings: jax.Array, row_ids: jax.Array,
                  valid: jax.Array) -> None:
    """Folds in global ``[steps, step_size, d]`` encodings laid out as
    ``GradientEncoder`` lays out a batch (positions split over ``data``), with
    int32 ``row_ids`` and bool ``valid`` of shape ``[steps, step_size]``.
    Rows never move between hosts; only top-k candidates do."""
    x, ids, ok, count = _flatten_stepped(encodings, row_ids, valid)
    self._state = update_topk(self._state, x, ids, self._queries, ok,
                              mesh=self.mesh, rows_sorted=False)
    self._rows_seen += int(np.asarray(count.addressable_data(0)))

  def state(self) -> TopKState:
    return self._state

  def result(self) -> TopK:
    return finish(self._state, self._rows_seen)
