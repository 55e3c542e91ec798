"""Exact top-k proponents and opponents of a query batch over N encodings:
the host side.

The corpus is streamed in chunks of rows through the jitted core in
``tracer.topk`` (scores, per-device selection, exact merge; see its doc for
the ordering rules). This module feeds it: rows are used in place when they
are 64-byte aligned (``aligned_empty``) or are a local store's chunk files
(mapped from the page cache, handed to the device as one piece per chunk),
and otherwise copied once into reused aligned buffers (``_BufferPool``, at
most ``HOST_BUFFER_BYTES`` and a quarter of its memory a host: default
steps shrink to fit) by a background thread, overlapped with the device,
each host reading only the rows of its own devices (object storage: several
steps' reads in flight).

Queries whose step would take more than half a device's memory are split
over the devices (``shard_queries``, ``topk.ring_step_fn``) where that
takes fewer passes over the rows, and otherwise scanned in runs of fewer
(``query_batch``), each a pass over the rows.

If fewer than ``k`` rows are scanned (N < k), results have ``N`` columns.

Entry points: ``scan_arrays`` (in-memory matrix), ``scan_store`` (an
``EncodingStore``), ``StreamingScanner`` (batches as they are encoded). Each
takes an optional ``metric`` (``topk.RowMetric``) for scan-time
preconditioning.
"""

from __future__ import annotations

import collections
import queue
import threading
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from tracer import data as data_lib
from tracer import memory
from tracer import partitioning
from tracer.errors import InputError
from tracer.topk import (INVALID_ROW, ROW_BITS, RowMetric, TopK,  # noqa: F401
                         TopKState, finish, flatten_stepped, grouped_metric,
                         init_topk, ring_queries, ring_step_fn, step_fn,
                         summed_step_fn, tiles_bf16, update_topk)

# Encodings read per device per step when chunk_rows is not given: on CPUs,
# and (``ACCELERATOR_CHUNK_BYTES``) on GPUs and TPUs, where each step's
# selection has a fixed cost of its own: fewer, larger steps. The resident
# scan on an H200 (16.8M bf16 rows x 1,024, 64 queries) took 36 ms in steps
# of 512 MiB, 22.6 ms in steps of 2 GiB, 20.1 ms in steps of 8 GiB.
DEFAULT_DEVICE_CHUNK_BYTES = 64 << 20
ACCELERATOR_CHUNK_BYTES = 2 << 30
# Steps of an object-store scan whose reads are in flight before the oldest
# is waited for (``scan_store``'s ``read_ahead``).
REMOTE_READ_AHEAD = 4
# Host memory that one scan's pooled read buffers may take on a host (rows
# copied from object storage or from an unaligned matrix). Steps are shrunk
# to fit: the pool holds (prefetch + depth + read_ahead + 2) sets of a step's
# rows for every local device, which at 2 GiB accelerator steps would be
# 160 GiB on an 8-GPU host reading object storage. 8 GiB still keeps
# read_ahead (4) sets, ~3 GiB, in flight; where one store chunk per device
# is too much for that (d = 2^16 on 8 GPUs), read_ahead shrinks instead.
HOST_BUFFER_BYTES = 8 << 30
# ... and at most 1 / HOST_BUFFER_FRACTION of the host's memory (its cgroup's limit
# where lower: memory.host_memory_bytes)
# (of the smallest host's, under jax.distributed: every process must take
# the same step), so that hosts of 8 or 16 GiB do not plan 8 GiB of
# buffers. ``tracer benchmark-data --scan_memory`` (WORKSPACE.md, "A store
# scan's host memory", 2026-12-06) measured a store scan's peak over its
# baseline (~350 MB) at 1.004-1.015 x the bytes of the pool's sets it made
# (each a step's local rows; bf16 and f32, 1 and 8 CPU devices, steps of 8
# to 128 MiB): on CPU the devices use the aligned buffers in place, no
# second copy. All 6 planned sets were made where the device was the
# slower (256 queries), 4-6 where it was not (8). The pool as planned is
# thus the scan's host memory beyond its baseline, 1 x; a quarter leaves
# the rest for the baseline, the step's scores (on a CPU's devices host
# memory too: 12-13 bytes per row and query of a step at 256 queries,
# about twice XLA's count of one step's), the page cache and the host's
# other processes.
HOST_BUFFER_FRACTION = 4
# A step's scores (``[rows, Q]`` per device, with the selection's
# temporaries) may take SCORE_STEPS x its rows' ``device_chunk_bytes``; past
# that, steps get fewer rows (``query_capped_step``). XLA's count of one
# step's memory (``memory.compiled_bytes``, 8 CPU devices, k = 10, f32 and
# bf16 rows, d = 256 and 1,024, 4,096 and 16,384 rows per device) was
# 5.6-6.1 bytes per (row, query) pair at Q >= 1,024 beyond the rows and
# queries themselves (2026-12-06): PAIR_BYTES rounds it up. Before, the
# step ignored Q: 300,000 rows of d = 256 against 60,000 queries on the
# 8-device CPU mesh asked for ~13 GiB per device and aborted the process.
SCORE_STEPS = 4
PAIR_BYTES = 8
# Where a device has memory of its own (GPU, TPU), a step of copied rows is
# staged: read piece by piece into pooled buffers, each piece copied to its
# device and its buffers reused at once (``_Layout``), so that the pool
# bounds a piece, not the step. Pooled steps on a v5e host reading object
# storage at d = 2^16 took 1,536 rows a chip (``tracer plan``), and split
# queries went around the ring once a step: about 10x the traffic of a
# local store's 16,384-row steps. A staged read keeps ``read_ahead + 2``
# pieces in flight (``staged_sets``).
# The most pieces (store chunks used in place) a step hands a device; more
# small chunks are copied into one buffer instead (each piece is a matmul of
# its own in the compiled step).
MAX_PIECES = 32
# Row dtypes a step takes as they are (``topk.exact_scores``); others are
# widened to f32 on the host.
DEVICE_DTYPES = (np.dtype(ml_dtypes.bfloat16), np.dtype(np.int8), np.dtype(np.float32))


def _mesh(mesh: Mesh | None) -> Mesh:
  return partitioning.make_mesh() if mesh is None else mesh


def _check_real(name: str, x: np.ndarray) -> None:
  """InputError unless ``x`` holds real numbers (a complex one's imaginary
  part was dropped with a warning, an object array's None read as NaN)."""
  bfloat16 = DEVICE_DTYPES[0]  # (ml_dtypes': no np.floating to numpy)
  if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
          or x.dtype == bfloat16):
    raise InputError(f"{name}: expected real numbers, got dtype {x.dtype}")


def _check_inputs(queries, k: int, dim: int, num_rows: int) -> np.ndarray:
  q = np.asarray(queries)
  _check_real("queries", q)
  if q.ndim != 2 or q.shape[0] < 1:
    raise InputError(f"queries: expected a [Q, d] array with Q >= 1, got shape "
                     f"{q.shape}")
  if q.shape[1] != dim:
    raise InputError(f"queries: dimension {q.shape[1]} does not match the "
                     f"encodings' dimension {dim}")
  if not np.all(np.isfinite(q)):
    raise InputError("queries: must be finite (found NaN or inf)")
  if not _is_count(k):  # (True was k = 1 before 2026-12-07)
    raise InputError(f"k: must be a positive integer, got {k!r}")
  if num_rows >= INVALID_ROW:
    raise InputError(f"num_rows: {num_rows} rows exceed the int32 row ids")
  return q.astype(np.float32)


def _is_count(n) -> bool:
  """An integer >= 1 (numpy's too; not a bool, nor a float such as 2.5)."""
  return (isinstance(n, (int, np.integer)) and not isinstance(n, (bool, np.bool_))
          and n >= 1)


def device_dtype(dtype) -> np.dtype:
  """The dtype rows of ``dtype`` go to the devices in: bf16, int8 and f32
  as they are (the exact scores of ``topk.exact_scores``), others f32."""
  dtype = np.dtype(dtype)
  return dtype if dtype in DEVICE_DTYPES else np.dtype(np.float32)


def device_chunk_bytes(platform: str) -> int:
  """Bytes of rows per device and step on ``platform`` ("cpu", "gpu", ...)."""
  return DEFAULT_DEVICE_CHUNK_BYTES if platform == "cpu" else ACCELERATOR_CHUNK_BYTES


def default_chunk_rows(dim: int, itemsize: int, num_devices: int,
                       multiple: int = 1, platform: str = "cpu") -> int:
  """Rows per step: ~``device_chunk_bytes(platform)`` per device, rounded
  to ``multiple`` rows per device (``itemsize``: a row's bytes per value,
  in all the parts a step reads)."""
  per_device = max(1, device_chunk_bytes(platform) // (dim * itemsize))
  per_device = partitioning.padded_size(per_device, multiple)
  return per_device * num_devices


def query_capped_step(step: int, num_queries: int, mesh: Mesh,
                      multiple: int = 1) -> int:
  """``step`` (rows over ``mesh``) shrunk so that a device's scores, at
  ``PAIR_BYTES`` per (row, query), take at most ``SCORE_STEPS`` x
  ``device_chunk_bytes``; whole ``multiple``s of rows per device, at least
  one."""
  budget = SCORE_STEPS * device_chunk_bytes(mesh.devices.flat[0].platform)
  fits = budget // (PAIR_BYTES * max(1, num_queries))
  fits = max(multiple, fits // multiple * multiple)
  return min(step // mesh.size, fits) * mesh.size


def host_buffer_bytes(have: int | None = None) -> int:
  """Bytes a scan's pooled buffers may take on a host of ``have`` bytes
  (default ``memory.host_memory_bytes()``): ``HOST_BUFFER_BYTES``, at most
  1 / ``HOST_BUFFER_FRACTION`` of it."""
  have = memory.host_memory_bytes() if have is None else have
  return min(HOST_BUFFER_BYTES, have // HOST_BUFFER_FRACTION)


class ScanMemory(NamedTuple):
  """A scan's memory, as every process of its mesh plans it
  (``agreed_memory``)."""
  copies: bool   # whether any process copies rows into pooled buffers
  device: int    # a device's bytes: its own (GPU, TPU), else its share of
                 # the host's (CPU); the least of any process's
  pool: int      # a device's share of its host's pooled buffers
                 # (``host_buffer_bytes``); the least of any process's
  shared: bool   # the devices share their host's memory (CPU)


def agreed_memory(copies: bool, mesh: Mesh) -> ScanMemory:
  """``ScanMemory`` from this process's ``copies`` (whether ``_ArraySource``
  copies its rows: up to each process's allocator), its memory and its
  devices in ``mesh``, agreed in one allgather where ``mesh`` spans several
  processes: each must plan the same steps and query runs. A device's
  shares are agreed, not a host's bytes: a host whose devices in the mesh
  are more (a mesh over some of a process's devices) gives each less. (A
  mesh of one process's devices agrees with no other: its scan is that
  process's alone.)"""
  local = max(1, len(mesh.local_devices))
  host, device = memory.host_memory_bytes(), memory.device_memory_bytes()
  shares = [host // local if device is None else device,
            host_buffer_bytes(host) // local]
  if partitioning.spans_processes(mesh):
    partitioning.check_mesh_processes(mesh)
    # (in KiB: int32 without jax_enable_x64, up to 2 TiB a device; -1: the
    # devices share the host's memory)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    kib = lambda b: min(b >> 10, 2**31 - 1)
    got = np.asarray(multihost_utils.process_allgather(np.array(
        [*map(kib, shares), -1 if device is None else 0, copies], np.int32)))
    shares = [int(got[:, 0].min()) << 10, int(got[:, 1].min()) << 10]
    device, copies = (None if got[:, 2].min() < 0 else 0), bool(got[:, 3].max())
  return ScanMemory(bool(copies), shares[0], shares[1], device is None)


def buffered_step(step: int, mesh: Mesh, row_bytes: int, sets: int,
                  multiple: int = 1, budget: int | None = None) -> int:
  """``step`` (rows over ``mesh``) shrunk so that ``sets`` pooled sets of
  a device's rows fit in ``budget`` bytes, its share of the pool (default
  ``host_buffer_bytes()`` over the mesh's local devices); whole
  ``multiple``s of rows per device, at least one."""
  if budget is None:
    budget = host_buffer_bytes() // max(1, len(mesh.local_devices))
  per_device = step // mesh.size
  fits = budget // (sets * row_bytes)
  fits = max(multiple, fits // multiple * multiple)
  return min(per_device, fits) * mesh.size


def whole_pieces(rows_per_device: int, piece_rows: int | None) -> bool:
  """Whether a device's rows of a step are whole pieces of ``piece_rows``
  rows (store chunks, each used where it lies), at most ``MAX_PIECES``."""
  return bool(piece_rows) and not rows_per_device % piece_rows and (
      rows_per_device // piece_rows <= MAX_PIECES)


def pieces_per_device(rows_per_device: int, piece_rows: int | None) -> int:
  """Pieces of ``piece_rows`` rows (store chunks) a step hands each device:
  1 (one buffer) unless the rows split into whole pieces (``whole_pieces``)."""
  if not whole_pieces(rows_per_device, piece_rows):
    return 1
  return rows_per_device // piece_rows


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
  zero-copy computation may still read it; a staged step's sets, once their
  piece is copied to the devices (``_Layout._stage``).
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

  @property
  def size(self) -> int:
    return self._size

  def release(self, buffers: list[np.ndarray] | None) -> None:
    if buffers is not None:
      self._free.put(buffers)

  def close(self) -> None:
    self._closed.set()


class _Layout:
  """Which rows of a ``[step, d]`` chunk each local device holds, and in how
  many pieces: a step's rows go to the device as ``step // piece_rows``
  arrays per device (the matmul takes them one by one), so rows held in
  separate buffers (a store's chunk files, mapped) need no copy."""

  def __init__(self, mesh: Mesh, step: int, dim: int, dtype: np.dtype,
               piece_rows: int | None = None, staged_rows: int | None = None):
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
    per_device = step // mesh.size
    # Staged (``staged_rows``: rows of a device's piece, a divisor of its
    # step's): copied rows go to the device a piece at a time (``_stage``).
    self.staged = staged_rows is not None
    self.num_pieces = (per_device // staged_rows if self.staged
                       else pieces_per_device(per_device, piece_rows))
    self.piece_rows = per_device // self.num_pieces
    self.whole = not self.staged and whole_pieces(per_device, piece_rows)
    # Where steps widen bf16 rows tile by tile (CPU), they take them as
    # their bits: a view here, no copy in the step (``topk.ROW_BITS``).
    self.bits = (ROW_BITS[dtype] if tiles_bf16(mesh)
                 and dtype == np.dtype(ml_dtypes.bfloat16) else None)

  def shapes(self) -> list[tuple[int, int]]:
    """A pooled set: a buffer per local device, of its rows of a step (a
    piece, staged)."""
    if self.staged:
      return [(self.piece_rows, self.dim)] * len(self.local)
    return [(b - a, self.dim) for _, a, b in self.local]

  def specs(self) -> tuple:
    """Shapes, dtypes and shardings of ``finish``'s arrays (chunk, row ids,
    valid), to count a step's memory before any row is read."""
    piece = jax.ShapeDtypeStruct((self.step // self.num_pieces, self.dim),
                                 self.bits or self.dtype, sharding=self.rows)
    flat = lambda t: jax.ShapeDtypeStruct((self.step,), t, sharding=self.ids)
    return ((piece,) * self.num_pieces if self.num_pieces > 1 else piece,
            flat(np.int32), flat(np.bool_))

  def start(self, source: _Source, base: int, pool: _BufferPool) -> _Pending:
    """Starts getting rows ``base + [0, step)`` (``finish`` waits for them).

    A local device's rows are used in place when the source can (an aligned
    in-memory matrix, or a store's mapped chunk files); otherwise they are
    read into a pooled aligned buffer, zero-padded past N.
    """
    num_rows = source.num_rows
    bounds = [(min(base + a, num_rows), min(base + b, num_rows), b - a)
              for _, a, b in self.local]
    hosts = [None] * len(self.local)
    checks = []
    for i, (lo, hi, size) in enumerate(bounds):
      if hi - lo == size:
        view = source.view(lo, hi)
        if view is not None and _zero_copy_ok(view, self.dtype):
          hosts[i] = [view]
      if hosts[i] is None and self.whole:
        # (A device wholly past N gets the store's zero chunk: a pooled
        # set for it alone would be all local devices' buffers.)
        pieces = source.pieces(base + self.local[i][1], self.piece_rows,
                               self.num_pieces)
        if pieces is not None:
          hosts[i] = pieces
          if hi > lo:
            checks.append((pieces, source.checker(lo, hi)))
    buffers = None
    futures = []
    if self.staged and any(h is None for h in hosts):
      excluded = self._stage(source, base, pool, hosts)
      checks.append(([], lambda arrays: excluded))
    elif any(h is None for h in hosts):
      buffers = pool.acquire()
      for i, (lo, hi, size) in enumerate(bounds):
        if hosts[i] is None:
          hosts[i] = [buffers[i]]
          if hi > lo:
            futures += source.read_into(lo, hi, buffers[i][:hi - lo])
            checks.append(([buffers[i][:hi - lo]], source.checker(lo, hi)))
          buffers[i][max(hi - lo, 0):] = 0  # padding rows past N
    return _Pending(base, num_rows, hosts, buffers, futures, checks)

  def _stage(self, source: _Source, base: int, pool: _BufferPool,
             hosts: list) -> np.ndarray:
    """Reads the step's rows of the local devices whose ``hosts`` entry is
    None, a piece (``piece_rows`` a device) at a time into a pooled set,
    up to the pool's size of pieces in flight; each piece, once read and
    checked, is copied to its devices and its set reused. Fills ``hosts``
    with each device's placed pieces; returns the rows to skip."""
    num_rows, rows = source.num_rows, self.piece_rows
    todo = [i for i, h in enumerate(hosts) if h is None]
    for i in todo:
      hosts[i] = []
    excluded = [np.zeros(0, np.int64)]

    def issue(j):
      buffers, futures, reads = pool.acquire(), [], []
      for i in todo:
        first = base + self.local[i][1] + j * rows
        lo, hi = min(first, num_rows), min(first + rows, num_rows)
        buf = buffers[i]
        if hi > lo:
          futures += source.read_into(lo, hi, buf[:hi - lo])
        buf[max(hi - lo, 0):] = 0  # padding rows past N
        reads.append((i, buf, source.checker(lo, hi) if hi > lo else None,
                      hi - lo))
      return buffers, futures, reads

    def land(buffers, futures, reads):
      for future in futures:
        future.result()
      excluded.extend(check([buf[:n]]) for _, buf, check, n in reads if check)
      held = [buf.view(self.bits) if self.bits else buf for _, buf, _, _ in reads]
      devices = [self.local[i][0] for i, _, _, _ in reads]
      placed = jax.device_put(held, devices)
      # A copy, whole before the set is reused: a CPU device that took the
      # buffer in place (whatever ``may_alias`` says, jax 0.10.2) gets its
      # own; an accelerator's ``device_put`` copies to its memory.
      placed = [a.copy() if d.platform == "cpu"
                and a.unsafe_buffer_pointer() == h.ctypes.data else a
                for a, h, d in zip(placed, held, devices)]
      jax.block_until_ready(placed)
      for (i, _, _, _), array in zip(reads, placed):
        hosts[i].append(array)
      pool.release(buffers)

    in_flight = collections.deque()
    for j in range(self.num_pieces):
      if len(in_flight) >= pool.size:
        land(*in_flight.popleft())
      in_flight.append(issue(j))
    while in_flight:
      land(*in_flight.popleft())
    return np.concatenate(excluded)

  def finish(self, pending: _Pending):
    """Global arrays (pieces of the chunk, row ids, valid) of a started step,
    and the buffer set to release once the step is done (None if none was
    borrowed)."""
    for future in pending.futures:
      future.result()
    excluded = np.concatenate([np.zeros(0, np.int64)] + [
        check(arrays) for arrays, check in pending.checks])

    def split(host):  # one array per piece
      pieces = (host if len(host) == self.num_pieces
                else np.split(host[0], self.num_pieces))
      # (staged pieces are placed already, as their bits)
      return [p.view(self.bits) if self.bits and isinstance(p, np.ndarray)
              else p for p in pieces]

    base = pending.base
    # (int64: the last step is padded past N, and N may be up to
    # INVALID_ROW - 1, so padding ids pass 2**31 - 1 and an int32 arange
    # overflowed or wrapped to negative ids marked valid. Ids past N are
    # invalid; capped at INVALID_ROW, which keeps them sorted, before the
    # cast.)
    ids = [np.arange(base + a, base + b, dtype=np.int64)
           for _, a, b in self.local]
    valid = [(i < pending.num_rows) & ~np.isin(i, excluded) for i in ids]
    ids = [np.minimum(i, INVALID_ROW).astype(np.int32) for i in ids]
    # Per local device: its pieces, row ids, valid; placed in one call (each
    # device_put costs ~0.1-1 ms of Python, a step has several per device).
    hosts = [split(h) + [i, v] for h, i, v in zip(pending.hosts, ids, valid)]
    placed = jax.device_put(hosts, [[d] * len(h) for h, (d, _, _)
                                    in zip(hosts, self.local)])

    def assemble(shape, sharding, j):
      return jax.make_array_from_single_device_arrays(
          shape, sharding, [arrays[j] for arrays in placed])

    chunk = tuple(assemble((self.step // self.num_pieces, self.dim), self.rows, p)
                  for p in range(self.num_pieces))
    arrays = (chunk if self.num_pieces > 1 else chunk[0],
              assemble((self.step,), self.ids, self.num_pieces),
              assemble((self.step,), self.ids, self.num_pieces + 1))
    return arrays, pending.buffers


class _Pending(NamedTuple):
  """A step whose reads have started (``_Layout.start``)."""
  base: int
  num_rows: int
  hosts: list  # per local device, its rows: one array or the pieces
  buffers: list[np.ndarray] | None
  futures: list
  checks: list  # (arrays holding rows lo.. in order, the checker of lo..hi)


class _Source:
  """Rows to scan: ``num_rows``, ``dim``, ``dtype`` and two ways to get them."""
  num_rows: int
  dim: int
  dtype: np.dtype
  maps = False  # whether whole chunks of it are used in place (``pieces``)

  def view(self, start: int, stop: int) -> np.ndarray | None:
    """Rows ``[start, stop)`` without a copy, if the source holds them."""
    return None

  def read_into(self, start: int, stop: int, out: np.ndarray) -> list[Any]:
    """Copies rows ``[start, stop)`` into ``out``; returns futures to wait on."""
    raise NotImplementedError

  def pieces(self, start: int, piece_rows: int, count: int
             ) -> list[np.ndarray] | None:
    """``count`` arrays of ``piece_rows`` rows from ``start`` on (rows past N:
    any finite values), without a copy, if the source holds them so."""
    return None

  def copies(self, rows_per_device: int) -> bool:
    """Whether steps of ``rows_per_device`` rows per device are copied into
    pooled buffers rather than used where they lie."""
    return True

  def checker(self, start: int, stop: int):
    """A function that checks rows ``[start, stop)`` once read (given the
    arrays holding them in order from ``start`` on) and returns the ids of
    those the scan must skip (quarantined rows)."""
    return lambda arrays: np.zeros(0, np.int64)

  def stored_queries(self, queries: np.ndarray) -> np.ndarray:
    """Queries as the rows are held (``EncodingStore.stored_queries``)."""
    return queries

  def stored_metric(self, metric: RowMetric | None) -> RowMetric | None:
    """A metric as the rows are held (``EncodingStore.stored_metric``)."""
    return metric


class _ArraySource(_Source):

  def __init__(self, x: np.ndarray):
    self.x = x
    self.num_rows, self.dim = x.shape
    self.dtype = x.dtype
    self._aligned = (_zero_copy_ok(x, device_dtype(x.dtype))
                     and self.dim * x.dtype.itemsize % 64 == 0)

  def view(self, start, stop):
    return self.x[start:stop]

  def copies(self, rows_per_device):
    return not self._aligned

  def read_into(self, start, stop, out):
    np.copyto(out, self.x[start:stop], casting="unsafe")
    return []


class _StoreSource(_Source):

  def __init__(self, store, verify: bool):
    self.store = store
    self.verify = verify
    self.num_rows, self.dim = store.num_rows, store.dim
    self.dtype = store.dtype

  def read_into(self, start, stop, out):
    return self.store.read_into(start, stop, out)

  def stored_queries(self, queries):
    return self.store.stored_queries(queries)

  def stored_metric(self, metric):
    return self.store.stored_metric(metric)

  @property
  def maps(self):
    return self.store.local

  def copies(self, rows_per_device):  # whole chunks are mapped (``pieces``)
    return not (self.store.local and whole_pieces(
        rows_per_device, self.store.chunk_rows))

  def pieces(self, start, piece_rows, count):
    """Local stores: the chunk files themselves, mapped (``chunk_view``)."""
    cr = self.store.chunk_rows
    if not self.store.local or piece_rows != cr or start % cr:
      return None
    first = start // cr
    if not hasattr(self, "_zeros"):  # chunks past the corpus: padding
      self._zeros = aligned_empty((cr, self.dim), self.dtype)
      self._zeros[...] = 0
    return [self.store.chunk_view(c) if c < self.store.num_chunks else self._zeros
            for c in range(first, first + count)]

  def checker(self, start, stop):
    records = self.store.chunk_records_later(start, stop)

    def check(arrays):
      got = records()
      if self.verify:
        self.store.check_read(start, stop, arrays, got)
      return np.array([int(r) for rec in got.values()
                       for r in rec.get("quarantined", {})], np.int64)
    return check


def _the_devices(n: int) -> str:
  """'the 8 devices', 'the 1 device'."""
  return f"the {n} device{'s' if n != 1 else ''}"


def _queries_text(n: int) -> str:
  """'20,000 queries', '1 query'."""
  return f"{n:,} quer{'y' if n == 1 else 'ies'}"


def pool_sets(prefetch: int, read_ahead: int, parts: int = 1) -> int:
  """Pooled sets of buffers (one a local device) a scan keeps: those
  prefetched, those of steps in flight until done, those read ahead, and
  two more; each part of a sum its own."""
  return (prefetch + max(1, prefetch) + read_ahead + 2) * parts


def device_steps(prefetch: int) -> int:
  """Steps whose rows a device may hold at once in ``_scan_run`` (at most):
  ``prefetch`` ready, one being read, the one dispatched and
  ``max(1, prefetch)`` in flight before it (as ``pool_sets`` counts a
  pool's sets of them). Without a prefetch thread the step being read is
  the one dispatched next: 2."""
  return prefetch + max(1, prefetch) + (2 if prefetch else 1)


def held_prefetch(prefetch: int, least: int, room: int) -> int:
  """``prefetch`` cut, to 0 at least, until the other steps a device holds
  (``device_steps`` less one), each of at least ``least`` bytes (a store
  chunk a device), fit in ``room`` bytes: the step's floor is a chunk, so
  where chunks are large only fewer steps keep the bound (five 2 GiB
  chunks would pass the half of a 16 GB v5e a run leaves them)."""
  while prefetch > 0 and (device_steps(prefetch) - 1) * least > room:
    prefetch -= 1
  return prefetch


def staged_sets(read_ahead: int) -> int:
  """Pooled sets of a staged scan (``_Layout._stage``): its pieces in
  flight, those read ahead and two more (one landing, one being read)."""
  return read_ahead + 2


def staged_read_ahead(read_ahead: int, least: int, pool: int) -> int:
  """``read_ahead`` of a staged scan, cut until its ``staged_sets`` of a
  piece's ``least`` bytes (a store chunk a device) fit a device's ``pool``
  (its share). At least 0: where even ``staged_sets(0)`` pass it, the scan
  keeps those two sets of a chunk a device anyway, its floor."""
  while staged_sets(read_ahead) * least > pool and read_ahead > 0:
    read_ahead -= 1
  return read_ahead


def staged_pieces(rows_per_device: int, most: int, multiple: int = 1
                  ) -> tuple[int, int]:
  """(rows of a piece, pieces) of a staged step of at most
  ``rows_per_device`` rows a device, each piece at most ``most`` rows and
  whole ``multiple``s of them, at most ``MAX_PIECES``: the most rows, then
  the fewest pieces. At least one piece of ``multiple`` rows."""
  units, best = rows_per_device // multiple, (1, 1)
  for size in range(min(most // multiple, units), 0, -1):
    count = min(MAX_PIECES, units // size)
    if count * size > best[0] * best[1]:
      best = (size, count)
  return best[0] * multiple, best[1]


class StepPlan(NamedTuple):
  """A scan's step as ``_scan`` planned it: ``rows`` a device a step, in
  ``pieces`` of ``piece_rows`` (store chunks used in place, or ``staged``:
  copied to the device a piece at a time, ``_Layout._stage``); ``sets``:
  the pooled sets of buffers it may make (one buffer a local device, of its
  rows of a step or, staged, of a piece); ``prefetch``: the steps prepared
  ahead (fewer than ``asked`` where the pool or a device would not hold
  them: ``held_prefetch``)."""
  rows: int
  pieces: int
  staged: bool
  sets: int
  prefetch: int
  asked: int | None = None

  @property
  def piece_rows(self) -> int:
    return self.rows // self.pieces

  @property
  def cut(self) -> bool:
    """Whether fewer steps are prefetched than ``asked``."""
    return self.asked is not None and self.prefetch < self.asked

  @property
  def notable(self) -> bool:
    """Whether a person should hear of it (``describe``): staged or cut."""
    return self.staged or self.cut

  def describe(self) -> str:
    """One line for a person: 'scan step: 16,384 rows a device, staged
    through the host's pooled buffers in 8 pieces of 2,048 rows (6 in
    flight), 1 step prefetched of the 2 asked (...)'."""
    text = f"scan step: {self.rows:,} rows a device"
    if self.staged:
      text += (f", staged through the host's pooled buffers in "
               f"{self.pieces:,} piece{'s' if self.pieces != 1 else ''} of "
               f"{self.piece_rows:,} rows "
               f"({self.sets:,} in flight)")
    elif self.pieces > 1:
      text += f" in {self.pieces:,} store chunks of {self.piece_rows:,} rows"
    text += f", {self.prefetch} step{'s' if self.prefetch != 1 else ''} prefetched"
    if self.cut:
      text += (f" of the {self.asked} asked (the other steps' rows a device "
               "would hold, or the host's pool, would not fit more)")
    return text


class QueryPlan(NamedTuple):
  """How a scan takes its ``queries``: ``passes`` over the rows, each
  scoring ``per_pass`` of them (padding included), ``split`` over the
  mesh's ``devices`` (a block of ``per_pass / devices`` on each) or whole
  on every device; ``step``: its step (``StepPlan``; None: a streamed
  scan's, the batches as they come); ``sets``: the query sets scored
  together (``scan_sets``; ``queries`` then counts them all, unpadded)."""
  queries: int
  passes: int
  per_pass: int
  split: bool
  devices: int
  step: StepPlan | None = None
  sets: int = 1

  def describe(self) -> str:
    """One line for a person: 'scan: 20,000 queries split over the 8
    devices (20,480 with the padding, 2,560 a device), one pass over the
    rows'."""
    text = f"scan: {_queries_text(self.queries)}"
    if self.sets > 1:
      text += f" in {self.sets} sets, each under its own metric"
    if self.split:
      text += f"{',' if self.sets > 1 else ''} split over {_the_devices(self.devices)}"
    passes = ("one pass over the rows" if self.passes == 1
              else f"{self.passes:,} passes over the rows")
    if self.split:
      padding = " with the padding" if (
          self.per_pass * self.passes > self.queries) else ""
      blocks = (f"{self.per_pass:,}{' a pass' if self.passes > 1 else ''}"
                f"{padding}, {self.per_pass // self.devices:,} a device")
      return (f"{text} in {passes} ({blocks})" if self.passes > 1
              else f"{text} ({blocks}), {passes}")
    if self.passes > 1:
      return (f"{text} in {passes}, {self.per_pass:,} a pass (all at once, "
              "their step would not fit half of a device's memory)")
    where = ("on the one device" if self.devices == 1
             else f"on each of {_the_devices(self.devices)}")
    return f"{text}, whole {where}, {passes}"


def _scan(source, queries, k: int, mesh: Mesh | None,
          chunk_rows: int | None, prefetch: int, row_multiple: int = 1,
          metric: RowMetric | None = None, progress=None,
          read_ahead: int = 0, shard_queries: bool | None = None,
          on_plan=None, set_sizes: tuple[int, ...] | None = None) -> TopK:
  """The host loop shared by ``scan_arrays``, ``scan_store``, ``scan_stores``
  and ``scan_sets``.

  A producer (a background thread if ``prefetch > 0``) starts each step's
  reads ``read_ahead`` steps before it waits for them (so that many steps'
  requests are in flight at once), into pooled host buffers or mapped
  pieces (``_Layout``), and places them; the caller's thread dispatches the
  jitted update and keeps at most ``max(1, prefetch)`` steps in flight,
  returning their buffers to the pool once they are done.

  Where rows are copied into pooled buffers, the pool bounds a step on
  devices that share the host's memory (CPU); on devices of their own
  memory (GPU, TPU) it bounds a piece, and a step of the device's size is
  staged a piece at a time (``_Layout._stage``, ``staged_pieces``). There
  a default step is also held so that the other steps' rows a device holds
  (``device_steps``) fit the half of it a run leaves, with fewer steps
  prefetched where even a store chunk in each would not (``held_prefetch``).

  Queries whose step would take more than 1 / ``QUERY_MEMORY_FRACTION`` of
  a device's memory (``query_batch``) are split over the devices instead
  (``topk.ring_step_fn``) where that takes fewer passes over the rows, and
  scanned in runs of fewer where even that does not fit, each run a pass
  over the rows; ``progress`` then counts every run's rows.
  ``shard_queries``: True always splits them, False never, None (default)
  as above. ``on_plan``: called with the ``QueryPlan`` (its ``step`` as
  planned) before the first pass.

  ``source``, ``queries`` and ``metric`` may be lists, one entry per part
  (same rows, d and dtype): each row's score is then the sum of the parts'
  (``topk.summed_step_fn``).

  ``set_sizes``: the queries are sets of these sizes, one after the other, set
  g scored under metric g of a grouped metric (``topk.grouped_metric``; or
  all under one, or plain scores), each set's results after the last's in
  the ``TopK``: unpadded, a run takes up to the same count of every set
  (split over the devices, the sets' queries together are padded).
  """
  memory.release_programs_near_map_limit()
  summed = isinstance(source, list)
  asked_prefetch = prefetch
  sources = source if summed else [source]
  queries = queries if summed else [queries]
  metrics = metric if summed else [metric]
  num_rows, dim = sources[0].num_rows, sources[0].dim
  mesh = _mesh(mesh)
  qs = [_check_inputs(q, k, dim, num_rows) for q in queries]
  # At most N rows are returned (``finish``): the running top-k, its merge
  # and the memory plan are sized by k, so a k past N is cut to N (at least
  # 1 for the state's shape). Before, 100 rows with k = 10**6 held [Q, 10**6]
  # top-k and a k of 10**9 was refused as too large.
  k = min(int(k), max(num_rows, 1))
  if len({q.shape[0] for q in qs}) > 1:
    raise InputError(f"queries: every part needs the same queries, got "
                     f"{[q.shape[0] for q in qs]} of them")
  sizes = ((qs[0].shape[0],) if set_sizes is None
           else tuple(int(n) for n in set_sizes))
  for m in metrics:
    _check_metric_dim(m, dim, len(sizes))
  if sum(sizes) != qs[0].shape[0] or min(sizes) < 1:
    raise InputError(f"queries: {qs[0].shape[0]} of them do not make "
                     f"query sets of {list(sizes)}")
  qs = [s.stored_queries(q) for s, q in zip(sources, qs)]
  metrics = [s.stored_metric(m) for s, m in zip(sources, metrics)]
  dtype = device_dtype(sources[0].dtype)
  read_ahead = max(0, int(read_ahead))
  sets = lambda: pool_sets(prefetch, read_ahead, len(sources))
  # A summed step reads every part's rows: together they take a step's
  # bytes (S stores of 2 GiB steps would not fit a 16 GB chip past S = 7).
  step = default_chunk_rows(dim, dtype.itemsize * len(sources), mesh.size,
                            row_multiple, mesh.devices.flat[0].platform)
  agreed = agreed_memory(any(s.copies(step // mesh.size) for s in sources), mesh)
  if chunk_rows is None and not agreed.shared:
    # A device holds the rows of other steps beside the one it scores
    # (``device_steps``): together within the part of its memory a run
    # leaves them (``query_batch`` holds a step to 1 / QUERY_MEMORY_FRACTION).
    # Four more 2 GiB steps would pass half a 16 GB v5e.
    room = agreed.device - agreed.device // QUERY_MEMORY_FRACTION
    row_bytes = dim * dtype.itemsize * len(sources)
    prefetch = held_prefetch(prefetch, row_multiple * row_bytes, room)
    step = buffered_step(step, mesh, row_bytes, device_steps(prefetch) - 1,
                         row_multiple, room)
    if all(s.maps for s in sources):
      # Local stores: at most MAX_PIECES chunks a device, mapped in place,
      # not a longer step staged through the pool (a copy on the host).
      step = min(step // mesh.size, MAX_PIECES * row_multiple) * mesh.size
    if agreed.copies:
      # (judged again on the step held: a local store's may now be whole
      # chunks, mapped rather than staged; agreed anew, as every process is
      # here)
      agreed = agreed_memory(any(s.copies(step // mesh.size) for s in sources),
                             mesh)
  staged = None  # a staged step's most rows a device a piece (``_Layout``)
  if chunk_rows is None and agreed.copies and not agreed.shared:
    # Devices of their own memory: the pool bounds a piece, not the step.
    read_ahead = staged_read_ahead(read_ahead, row_multiple * dim * dtype.itemsize,
                                   agreed.pool)
    staged = buffered_step(step, mesh, dim * dtype.itemsize,
                           staged_sets(read_ahead), row_multiple,
                           agreed.pool) // mesh.size
  elif chunk_rows is None:
    if agreed.copies:
      # A step reads at least a whole store chunk per device (128 MiB at
      # d = 2^16): where the pool of those would pass a device's share (10
      # GiB on 8 GPUs), fewer steps are read ahead, then prefetched (at
      # least one).
      least = row_multiple * dim * dtype.itemsize
      while sets() * least > agreed.pool and (read_ahead > 1 or prefetch > 1):
        read_ahead, prefetch = ((read_ahead - 1, prefetch) if read_ahead > 1
                                else (read_ahead, prefetch - 1))
      step = buffered_step(step, mesh, dim * dtype.itemsize, sets(), row_multiple,
                           agreed.pool)
  elif not _is_count(chunk_rows):  # (2.5 was 2 before 2026-12-07)
    raise InputError(f"chunk_rows: must be an integer >= 1, got {chunk_rows!r}")
  else:
    step = partitioning.padded_size(int(chunk_rows), mesh.size)

  def layout_for(num_queries: int) -> _Layout:
    s = step if chunk_rows is not None else query_capped_step(
        step, num_queries, mesh, row_multiple)
    # No point in a step longer than the corpus (rounded to the mesh, and to
    # whole store chunks per device so that each read can be checked).
    s = min(s, partitioning.padded_size(max(num_rows, 1), mesh.size * row_multiple))
    if staged is not None:
      rows, count = staged_pieces(s // mesh.size, staged, row_multiple)
      return _Layout(mesh, rows * count * mesh.size, dim, dtype, staged_rows=rows)
    # Whole store chunks per device: one piece per chunk (mapped in place).
    return _Layout(mesh, s, dim, dtype,
                   piece_rows=row_multiple if row_multiple > 1 else None)

  segments = tuple(None if m is None else m.segments for m in metrics)
  metric_args = [_metric_on_mesh(m, dim, mesh) for m in metrics]
  grouped = any(m is not None and np.ndim(m.diag) == 2 for m in metrics)

  def update_for(batch: int, split: bool):
    """The step of runs of ``batch`` queries of each set (split over the
    devices or not): a grouped metric's takes each set's count (static);
    any other, the total."""
    shares = tuple(min(batch, n) for n in sizes) if grouped else None
    if split:
      return ring_step_fn(mesh, int(k), True, segments if summed else segments[0],
                          summed, shares)
    if summed:
      return summed_step_fn(mesh, int(k), True, segments, shares)
    if shares is None:
      return step_fn(mesh, int(k), True, segments[0])
    return step_fn(mesh, int(k), True, segments[0], sets=shares)

  if summed:
    diags = tuple(a[0] if a else None for a in metric_args)
    lowranks = tuple(a[1] if a else () for a in metric_args)

    def arguments(state, parts, queries_on_mesh):
      return (state, tuple(a[0] for a in parts), parts[0][1],
              tuple(a[2] for a in parts), tuple(queries_on_mesh), diags, lowranks)
  else:
    def arguments(state, parts, queries_on_mesh):
      return (state, *parts[0], queries_on_mesh[0], *metric_args[0])

  def padded(num_queries: int, split: bool) -> int:
    """Queries a run of ``num_queries`` scans."""
    return ring_queries(num_queries, mesh) if split else num_queries

  def layout_of(num_queries: int, split: bool) -> _Layout:
    # A device scores its rows against a block at a time when split.
    return layout_for(num_queries // mesh.size if split else num_queries)

  def step_bytes(batch: int, split: bool = False) -> int | None:
    """XLA's count of one device's first step with ``batch`` queries of
    each set."""
    n = padded(sum(min(batch, c) for c in sizes), split)
    on = (partitioning.rows_sharding(mesh) if split
          else partitioning.replicated(mesh))
    state = TopKState(*(jax.ShapeDtypeStruct((n, int(k)), t, sharding=on)
                        for t in (jnp.float32, jnp.int32) * 2))
    q = jax.ShapeDtypeStruct((n, dim), jnp.float32, sharding=on)
    parts = [layout_of(n, split).specs()] * len(sources)
    return memory.program_bytes(update_for(batch, split),
                                *arguments(state, parts, [q] * len(qs)))

  num_queries = qs[0].shape[0]
  per = max(sizes)  # the largest set's queries
  have = agreed.device

  def run_queries(split: bool) -> int:
    """Each set's queries per run (``query_batch``); a split run of one set
    is padded anyway, so it takes as many as its padding holds (the same
    step)."""
    batch = query_batch(per, lambda n: step_bytes(n, split), have)
    return min(per, padded(batch, split) if len(sizes) == 1 else batch)

  split = bool(shard_queries)
  batch = run_queries(split)
  if shard_queries is None and batch < per and mesh.size > 1:
    # Whole queries need several passes: split over the devices, they may
    # need fewer (a device then holds 1 / P of them).
    ring_batch = run_queries(True)
    ring_need = step_bytes(ring_batch, True)
    if (-(-per // ring_batch) < -(-per // batch)
        and (ring_need is None or ring_need <= have)):
      split, batch = True, ring_batch
  runs = range(0, per, batch)
  shares = tuple(min(batch, n) for n in sizes)  # each set's queries in a run
  per_pass = padded(sum(shares), split)  # with a split run's padding
  # What a step too large for the memory (refused as the first step runs) is
  # named by: the planner has already cut the queries to their least, one a
  # run or a block of RING_BLOCK_QUERIES a device, so fewer would not help.
  asked = f"queries: {_queries_text(num_queries)} of d={dim:,} with k={k}"
  if len(sizes) > 1:
    asked += f" ({len(sizes)} sets, the largest {per:,})"
  if split:
    asked += (f", split over {_the_devices(mesh.size)} ({per_pass:,} with "
              f"the padding, {per_pass // mesh.size:,} a device)")
  if len(runs) > 1:
    asked += f", in {len(runs):,} runs of {batch:,}" + (
        " a set" if len(sizes) > 1 else "")
  fix = "fewer rows per step (chunk_rows) or a smaller k" + (
      " or shard_queries=False (--shard_queries=never)"
      if split and shard_queries else "")
  layout = layout_of(per_pass, split)  # (every run's: padded alike)
  held = staged_sets(read_ahead) if staged else sets()
  if on_plan is not None:
    on_plan(QueryPlan(num_queries, len(runs), per_pass, split, mesh.size,
                      StepPlan(layout.step // mesh.size, layout.num_pieces,
                               layout.staged, held, prefetch, asked_prefetch)))
  firsts = np.cumsum((0,) + sizes[:-1])  # each set's first query
  results = []
  for i, start in enumerate(runs):
    # (Every run's queries are padded with zeros to the same count: one
    # program for every run. Each set's share, set after set.)
    part = lambda q: np.pad(np.concatenate([
        np.pad(b, ((0, share - len(b)), (0, 0)))
        for b, share in zip((q[lo + start:lo + min(start + batch, n)]
                             for lo, n in zip(firsts, sizes)), shares)]),
                            ((0, per_pass - sum(shares)), (0, 0)))
    done = i * num_rows
    got = _scan_run(
        sources, [part(q) for q in qs], int(k), mesh, layout,
        # (a staged step reads ahead by pieces, within its pool: ``_stage``)
        prefetch, 0 if staged else read_ahead, held,
        update_for(batch, split),
        arguments, None if progress is None else (
            lambda n, total, done=done: progress(done + n, len(runs) * total)),
        (asked, fix, agreed), split)
    results.append([TopK(*(a[lo:lo + max(0, min(batch, n - start))]
                           for a in got))
                    for lo, n in zip(np.cumsum((0,) + shares[:-1]), sizes)])
  if len(results) == 1 and len(sizes) == 1:
    return results[0][0]
  # Set by set, each set's runs in order.
  return TopK(*(np.concatenate(parts) for parts in zip(
      *[r[g] for g in range(len(sizes)) for r in results])))


# A scan's queries and their step may take at most 1 / QUERY_MEMORY_FRACTION
# of a device's memory (of the host's share per device, on CPU): more
# queries are scanned in several runs (``query_batch``). Half leaves the
# host's other half to the pooled reads (a quarter, ``HOST_BUFFER_FRACTION``),
# the process's baseline and the page cache.
QUERY_MEMORY_FRACTION = 2
# A streamed scan's whole queries and top-k may take 1 / this of a device
# (the encoder's params and step share it); more are split over the devices.
STREAMED_QUERY_FRACTION = 4


def query_batch(num_queries: int, step_bytes, have: int) -> int:
  """Queries per run: all ``num_queries`` where ``step_bytes(n)`` (XLA's
  count of a step with ``n`` queries, None: not known) is at most
  ``have / QUERY_MEMORY_FRACTION``, else the fewest equal runs' share that
  is; where even one query's step passes that, the fewest runs within all
  of ``have`` (not a run per query); at least 1 (a step that does not fit
  with one query is refused when it runs). Each try lowers one program;
  the next guess scales by the count's excess, so 2-3 tries usually
  settle it."""
  limit = have // QUERY_MEMORY_FRACTION
  batch, need = num_queries, step_bytes(num_queries)
  if need is None or need <= limit:
    return batch
  if step_bytes(1) > limit:
    limit = have
  while need > limit and batch > 1:
    fits = max(1, min(batch - 1, batch * limit // need))
    runs = -(-num_queries // fits)
    batch = -(-num_queries // runs)
    need = step_bytes(batch)
  return batch


def _scan_run(sources, qs, k: int, mesh: Mesh, layout: _Layout, prefetch: int,
              read_ahead: int, sets: int, step_update, arguments,
              progress, refusal: tuple[str, str, ScanMemory], split: bool) -> TopK:
  """One pass of ``_scan`` over the rows, for the queries ``qs`` (one
  ``[Q, d]`` array per part); ``split``: the queries and their top-k split
  over the devices (``step_update`` is then a ``ring_step_fn``);
  ``refusal``: (what the queries are, what to change, the memory agreed),
  for the message of a first step past the memory."""
  num_rows, dim, step = sources[0].num_rows, sources[0].dim, layout.step
  pool = _BufferPool(layout.shapes(), layout.dtype, size=sets)
  depth = max(1, prefetch)
  on = partitioning.rows_sharding(mesh) if split else partitioning.replicated(mesh)
  queries_on_mesh = [partitioning.put_global(q, on) for q in qs]
  state = init_topk(qs[0].shape[0], k, mesh, split)

  # The queries and their running top-k sit whole on every device (or a
  # block of them, split), beside a step's rows and scores: XLA's count of
  # the first step is held to the memory before it runs. (Each step shape is lowered once a process. A
  # rough count chose which scans to check before 2026-12-06; it missed
  # widened int8 rows and a row metric's tiles, up to 37x the count.)
  def update(state, parts):
    args = arguments(state, parts, queries_on_mesh)
    if state is first_state:
      # (held to the agreed share: every process refuses, or none, alike;
      # a host's own memory is named only where no other process shares
      # the scan, since the share may be a smaller host's)
      what, fix, agreed = refusal
      local = len(mesh.local_devices)
      alone = not partitioning.spans_processes(mesh)
      memory.check_bytes(
          memory.program_bytes(step_update, *args),
          f"{what}: a scan step of {step // mesh.size:,} rows per device", fix,
          have=agreed.device * local, devices=local,
          device_have=None if agreed.shared and alone else agreed.device)
    return step_update(*args)

  first_state = state

  def steps():
    started = collections.deque()
    for base in range(0, num_rows, step):
      started.append([layout.start(s, base, pool) for s in sources])
      if len(started) > read_ahead:
        yield [layout.finish(p) for p in started.popleft()]
    while started:
      yield [layout.finish(p) for p in started.popleft()]

  ready = data_lib.prefetch(steps(), prefetch)
  in_flight = collections.deque()
  finished = 0
  try:
    for parts in ready:
      state = update(state, [arrays for arrays, _ in parts])
      buffers = [b for _, b in parts]
      del parts
      # Dispatch is async: bound the steps queued on the device, and recycle
      # the buffers of those that are done.
      in_flight.append((state, buffers))
      while len(in_flight) > depth:
        done, buffers = in_flight.popleft()
        done.proponent_scores.block_until_ready()
        for b in buffers:
          pool.release(b)
        finished += 1
        if progress is not None:
          progress(min(finished * step, num_rows), num_rows)
  finally:
    pool.close()
    ready.close()
    # After an error, steps already dispatched may still read host buffers
    # and mapped chunk files: none may outlive the call (a caller may then
    # rewrite or truncate a chunk file, and a mapping read past a file's end
    # faults).
    for done, _ in in_flight:
      try:
        done.proponent_scores.block_until_ready()
      except Exception:  # pylint: disable=broad-except
        pass  # the error being raised is the one to report
  result = finish(state, num_rows)
  if progress is not None:
    progress(num_rows, num_rows)
  return result


def _check_metric_dim(metric: RowMetric | None, dim: int, groups: int = 1) -> None:
  """``groups`` > 1: a grouped metric (``topk.grouped_metric``) of that many."""
  if metric is None:
    return
  # (one metric may serve every group)
  grouped = np.ndim(metric.diag) != 1
  want = (groups, dim) if grouped else (dim,)
  if np.shape(metric.diag) != want:
    raise InputError(f"metric: built for d={np.shape(metric.diag)}, the "
                     f"encodings have d={dim}"
                     + (f" in {groups} query sets" if groups > 1 else ""))
  if len(metric.lowrank) != len(metric.segments):
    raise InputError(f"metric: {len(metric.segments)} segments and "
                     f"{len(metric.lowrank)} low-rank blocks; expected one each")
  end = 0
  for b, ((lo, hi), c) in enumerate(zip(metric.segments, metric.lowrank)):
    if not end <= lo < hi <= dim:
      raise InputError(f"metric: segment {b} is columns [{lo}, {hi}); expected "
                       f"segments in order, within the encodings' d={dim}")
    end = hi
    rows = (groups, hi - lo) if grouped else (hi - lo,)
    if np.ndim(c) != len(rows) + 1 or np.shape(c)[:-1] != rows:
      raise InputError(f"metric: low-rank block {b} has shape {np.shape(c)}; "
                       f"expected [{', '.join(map(str, rows))}, rank] for "
                       f"segment [{lo}, {hi})")


def _metric_on_mesh(metric: RowMetric | None, dim: int, mesh: Mesh) -> tuple:
  """A ``RowMetric``'s arrays replicated on the mesh (``_check_metric_dim``
  first)."""
  if metric is None:
    return ()
  put = lambda x: partitioning.put_global(np.asarray(x, np.float32),
                                          partitioning.replicated(mesh))
  return put(metric.diag), tuple(put(c) for c in metric.lowrank)


def scan_arrays(encodings, queries, k: int, *, mesh: Mesh | None = None,
                chunk_rows: int | None = None, prefetch: int = 2,
                metric: RowMetric | None = None,
                shard_queries: bool | None = None, on_plan=None) -> TopK:
  """Exact top-k of an in-memory ``[N, d]`` matrix (f32, bf16 or castable).

  Under ``jax.distributed`` every process passes the same full matrix and
  copies only its devices' rows to them.

  Args:
    encodings: ``[N, d]`` host array of finite rows, not checked (a full
      pass; a store's are checked as encoded): a NaN row is never ranked
      (``topk.finish``), an inf one scores +-inf or NaN, as the backend's
      product sums it (results files list only finite scores:
      ``pipeline.result_rows``).
    queries: ``[Q, d]``, cast to f32.
    k: results per query and side.
    mesh: default ``partitioning.make_mesh()`` over all devices.
    chunk_rows: rows per step (rounded up to the device count); default
      ~``device_chunk_bytes`` per device.
    prefetch: chunks prepared ahead in a background thread.
    metric: scan-time preconditioning (``topk.RowMetric``); ``queries`` are
      then the query set's ``R^(-1) q / ||q||_R``.
    shard_queries: split the queries and their top-k over the devices
      (``topk.ring_step_fn``) instead of holding them whole on each; default
      (None): where whole ones would need several passes over the rows and
      split ones fewer.
    on_plan: called with the ``QueryPlan`` (passes, split, step) before the
      first pass.
  """
  x = encodings if isinstance(encodings, np.ndarray) else np.asarray(encodings)
  _check_real("encodings", x)
  if x.ndim != 2:
    raise InputError(f"encodings: expected [N, d], got shape {x.shape}")
  return _scan(_ArraySource(x), queries, k, mesh, chunk_rows, prefetch,
               metric=metric, shard_queries=shard_queries, on_plan=on_plan)


def scan_store(store, queries, k: int, *, mesh: Mesh | None = None,
               chunk_rows: int | None = None, prefetch: int = 2,
               metric: RowMetric | None = None, verify: bool = True,
               progress=None, read_ahead: int | None = None,
               shard_queries: bool | None = None, on_plan=None) -> TopK:
  """Exact top-k over a complete ``store.EncodingStore``, streamed from disk.

  Reads run in a background thread (tensorstore futures for every local
  device's rows at once), ``prefetch`` chunks ahead of the device. Each host
  reads only the rows of its addressable devices. Rows stay in the stored
  dtype until the device (bf16 halves the bytes read). Rows quarantined when
  they were encoded (non-finite loss or gradient) are never returned.

  ``metric``: as in ``scan_arrays``. ``verify``: check each chunk read
  against the checksum in its marker (in the reading thread; chunks read
  whole, i.e. with the default ``chunk_rows``). ``progress``: called as
  ``progress(rows_scanned, num_rows)`` as steps finish. ``read_ahead``:
  steps whose reads are started before the oldest is waited for; default 0
  for a local store (its chunk files are mapped in place, see below) and
  ``REMOTE_READ_AHEAD`` for object storage, whose requests take
  milliseconds to start. ``shard_queries``, ``on_plan``: as in
  ``scan_arrays``.

  With the default ``chunk_rows`` on a local store, each device's rows are
  its stored chunks' files mapped from the page cache (``chunk_view``): no
  copy at all on a warm cache.

  An int8 store's rows are scored as stored, without their scales: only a
  scan with a ``metric`` (which divides each row's scores by its norm, in
  which the scale cancels) is allowed on one.

  Raises:
    InputError: the store is incomplete, the queries' d does not match, or
      an int8 store is scanned without a metric.
    CorruptStoreError: a chunk cannot be read or disagrees with its marker.
  """
  store.check_complete()
  check_metric(store, metric)
  multiple = store.chunk_rows if chunk_rows is None else 1
  if read_ahead is None:
    read_ahead = 0 if store.local else REMOTE_READ_AHEAD
  return _scan(_StoreSource(store, verify), queries, k, mesh, chunk_rows, prefetch,
               row_multiple=multiple, metric=metric, progress=progress,
               read_ahead=read_ahead, shard_queries=shard_queries,
               on_plan=on_plan)


def check_metric(store, metric: RowMetric | None) -> None:
  """InputError for an int8 store scanned without a metric (``scan_store``)."""
  if metric is None and store.scales is not None:
    raise InputError(
        f"{store.path}: an int8 store's rows are scaled row by row, which only "
        "a scan that normalizes rows cancels; pass a metric (e.g. "
        "hessian.identity_metric(d).row_metric() for cosine scores)")


def check_summable(stores, what: str) -> None:
  """InputError unless ``stores`` hold the same rows in the same layout
  (rows, d, dtype, chunk_rows) and of the same corpus (its source, or its
  rows' fingerprint where both stores have one), as a score summed over them
  needs."""
  shape = lambda st: (st.num_rows, st.dim, st.manifest.dtype, st.chunk_rows)
  for st in stores[1:]:
    if shape(st) != shape(stores[0]):
      raise InputError(
          f"{what}: {st.path} holds (rows, d, dtype, chunk_rows) = "
          f"{shape(st)}, {stores[0].path} {shape(stores[0])}; a sum needs the "
          "same rows in the same layout")
    # Equal shapes of two corpora would sum row i of one with row i of the
    # other: scores of no example.
    st.manifest.check_compatible(
        stores[0].manifest, ("corpus", "corpus_fingerprint"),
        where=f"{what}: {st.path}", other=str(stores[0].path))


def scan_stores(stores, queries, k: int, *, mesh: Mesh | None = None,
                chunk_rows: int | None = None, prefetch: int = 2,
                metrics=None, verify: bool = True, progress=None,
                read_ahead: int | None = None,
                shard_queries: bool | None = None, on_plan=None) -> TopK:
  """``scan_store`` of a sum: row ``i``'s score is the sum over ``stores`` of
  its score in each, against that store's own ``queries[p]`` (and metric
  ``metrics[p]``, or None), e.g. TrackStar summed over checkpoints, one
  store per checkpoint. Each step reads the same rows from every store; a
  row quarantined in any store is never returned.

  Raises:
    InputError: no stores, stores of different rows, d, dtype or chunks, or
      a ``queries`` / ``metrics`` list of another length.
  """
  stores = list(stores)
  metrics = [None] * len(stores) if metrics is None else list(metrics)
  if not stores or len(queries) != len(stores) or len(metrics) != len(stores):
    raise InputError(f"scan_stores: {len(stores)} stores, {len(queries)} query "
                     f"sets and {len(metrics)} metrics; expected one of each "
                     "per store, at least one")
  check_summable(stores, "scan_stores")
  if len(stores) == 1:
    return scan_store(stores[0], queries[0], k, mesh=mesh, chunk_rows=chunk_rows,
                      prefetch=prefetch, metric=metrics[0], verify=verify,
                      progress=progress, read_ahead=read_ahead,
                      shard_queries=shard_queries, on_plan=on_plan)
  for st, metric in zip(stores, metrics):
    st.check_complete()
    check_metric(st, metric)
  multiple = stores[0].chunk_rows if chunk_rows is None else 1
  if read_ahead is None:
    read_ahead = 0 if all(st.local for st in stores) else REMOTE_READ_AHEAD
  return _scan([_StoreSource(st, verify) for st in stores], list(queries), k,
               mesh, chunk_rows, prefetch, row_multiple=multiple,
               metric=metrics, progress=progress, read_ahead=read_ahead,
               shard_queries=shard_queries, on_plan=on_plan)


def _one_or_grouped(metrics) -> RowMetric:
  """The metric every set has where they are all equal (e.g. one task's R
  for them all: one norm a row), else ``grouped_metric``."""
  first = metrics[0]
  same = lambda m: m is first or (
      tuple(map(tuple, m.segments)) == tuple(map(tuple, first.segments))
      and np.array_equal(m.diag, first.diag)
      and all(np.array_equal(a, b) for a, b in zip(m.lowrank, first.lowrank)))
  return first if all(same(m) for m in metrics[1:]) else grouped_metric(metrics)


def scan_sets(stores, query_sets, k: int, *, metrics=None,
              mesh: Mesh | None = None, chunk_rows: int | None = None,
              prefetch: int = 2, verify: bool = True, progress=None,
              read_ahead: int | None = None, on_plan=None,
              shard_queries: bool | None = None) -> list[TopK]:
  """Several query sets, each under its own metric, in one pass over the
  rows: what ``scan_stores`` gives each set alone, for one read of the
  stores instead of one per set (a task per set, each with its own R).

  ``stores``: one store, or one per part of a sum (``scan_stores``).
  ``query_sets[g]``: set g's queries, one ``[Q_g, d]`` array per store;
  ``metrics[g]``: its metrics, one per store (None: plain scores for every
  set). The sets are laid out one after the other, unpadded, and every
  step divides each set's scores by the rows' norms under its own metric
  (``topk.grouped_metric``; the sets' sizes are static in the step): G
  norms a row, or one where every set's metric is the same. A set's
  results can differ from its own scan in the last bits (its queries
  batched with others', its low-rank columns beside theirs). Where a step
  of them all would not fit whole on each device, they are split over the
  devices (``shard_queries`` as ``scan_store``'s; each block's queries
  divided by their own sets' norms) if that takes fewer passes, and run
  in several passes otherwise, every run taking up to the same count of
  each set (a set already done adds zero queries, scored then dropped, so
  that every run is one program).

  Returns one ``TopK`` per set.
  """
  stores = list(stores)
  sets = [list(q) for q in query_sets]
  if not stores or not sets or any(len(q) != len(stores) for q in sets):
    raise InputError(f"scan_sets: {len(stores)} stores and query sets of "
                     f"{[len(q) for q in sets]} arrays; expected one array "
                     "per store in every set, at least one of each")
  if metrics is not None:
    metrics = [list(m) for m in metrics]
    if len(metrics) != len(sets) or any(len(m) != len(stores) for m in metrics):
      raise InputError(f"scan_sets: {len(sets)} query sets and "
                       f"{len(metrics)} metric lists; expected one metric "
                       "per store for every set")
    if any(m is None for ms in metrics for m in ms):
      raise InputError("scan_sets: a metric of None among metrics; pass "
                       "metrics=None for plain scores")
  check_summable(stores, "scan_sets")
  for st in stores:
    st.check_complete()
    check_metric(st, None if metrics is None else metrics[0][0])
  dim = stores[0].dim
  sets = [[_check_inputs(a, k, dim, stores[0].num_rows) for a in q] for q in sets]
  counts = [len(q[0]) for q in sets]
  # A set's queries are the same queries in every store of a sum (query i of
  # a set is summed over the stores' arrays' row i): a count that differs
  # would pair queries of other sets once the sets are laid end to end.
  for g, q in enumerate(sets):
    for st, a in zip(stores[1:], q[1:]):
      if len(a) != counts[g]:
        raise InputError(
            f"scan_sets: query set {g} holds {len(a)} queries for {st.path} "
            f"and {counts[g]} for {stores[0].path}; expected the same count "
            "in every store of a sum")
  part_queries = [np.concatenate([q[p] for q in sets])
                  for p in range(len(stores))]
  part_metrics = [None if metrics is None else _one_or_grouped(
      [m[p] for m in metrics]) for p in range(len(stores))]
  multiple = stores[0].chunk_rows if chunk_rows is None else 1
  if read_ahead is None:
    read_ahead = 0 if all(st.local for st in stores) else REMOTE_READ_AHEAD
  sources = [_StoreSource(st, verify) for st in stores]
  summed = len(stores) > 1
  got = _scan(sources if summed else sources[0],
              part_queries if summed else part_queries[0], k, mesh, chunk_rows,
              prefetch, row_multiple=multiple,
              metric=part_metrics if summed else part_metrics[0],
              progress=progress, read_ahead=read_ahead,
              shard_queries=shard_queries,
              on_plan=None if on_plan is None else lambda plan: on_plan(
                  plan._replace(queries=sum(counts), sets=len(sets))),
              set_sizes=tuple(counts))
  firsts = np.cumsum([0] + counts)
  return [TopK(*(a[lo:hi] for a in got)) for lo, hi in zip(firsts, firsts[1:])]


@jax.jit
def _id_range(row_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  return jnp.min(row_ids), jnp.max(row_ids)


class StreamingScanner:
  """Scores corpus batches as they are encoded, without a store.

  Results equal ``scan_arrays`` over the concatenated batches (with the same
  ``metric``). Host (numpy) batches are treated as global: under
  ``jax.distributed`` every process passes the same batch, or pass a global
  ``jax.Array`` instead.

  ``shard_queries``: split the queries and their top-k over the devices
  (``topk.ring_step_fn``); default (None): where whole ones, with their
  top-k, would take more than 1 / ``STREAMED_QUERY_FRACTION`` of a device's
  memory (of the smallest host's and device's, agreed between processes).
  ``plan``: the ``QueryPlan`` (one pass, split or not).

  Raises:
    InputError: the queries and their top-k, whole or split, take more than
      a device's memory (a store's scan takes them in runs; this cannot).
  """

  def __init__(self, queries, k: int, mesh: Mesh | None = None,
               metric: RowMetric | None = None,
               shard_queries: bool | None = None):
    self.mesh = _mesh(mesh)
    q = np.asarray(queries)
    if q.ndim != 2:
      raise InputError(f"queries: expected a [Q, d] array, got shape {q.shape}")
    q = _check_inputs(q, k, q.shape[1], 0)
    self.num_queries, self.dim = q.shape
    self.k = int(k)
    # (agreed between processes: each must split, or refuse, alike)
    have = agreed_memory(False, self.mesh).device
    per_query = self.dim * 4 + 16 * self.k  # f32 query, top-k of both sides
    if shard_queries is None:
      # Encoded batches cannot be scanned again in runs: where whole queries
      # would crowd the devices (beside the encoder), they are split.
      shard_queries = self.mesh.size > 1 and (
          self.num_queries * per_query > have // STREAMED_QUERY_FRACTION)
    self.split = bool(shard_queries)
    if self.split:
      q = np.pad(q, ((0, ring_queries(len(q), self.mesh) - len(q)), (0, 0)))
    self.plan = QueryPlan(self.num_queries, 1, len(q), self.split, self.mesh.size)
    # A block is held twice while the next one arrives around the ring.
    held = (2 * len(q) // self.mesh.size if self.split else len(q)) * per_query
    if held > have:
      where = (f" (split over {_the_devices(self.mesh.size)}, "
               f"{len(q) // self.mesh.size:,} a device, and as many arriving)"
               if self.split else " (whole on each device)")
      raise InputError(
          f"queries: {_queries_text(self.num_queries)} of d={self.dim:,} "
          f"with k={self.k} take {memory.size_text(held)} on each device{where}, "
          f"more than a device's {memory.size_text(have)}; expected fewer "
          "queries per streamed scan, or a scan of a store (tracer trace "
          "without --streaming), which takes them in several passes")
    self._queries = partitioning.put_global(
        q, partitioning.rows_sharding(self.mesh) if self.split
        else partitioning.replicated(self.mesh))
    _check_metric_dim(metric, self.dim)
    self._metric = None if metric is None else RowMetric(
        *_metric_on_mesh(metric, self.dim, self.mesh), metric.segments)
    self._state = init_topk(len(q), self.k, self.mesh, self.split)
    self._rows_seen = 0
    self._seen = np.zeros(0, np.uint8)  # host row ids added: a bit each

  def add(self, encodings, row_ids) -> None:
    """Folds ``encodings [rows, d]`` with global ``row_ids [rows]`` in. A
    row id added twice is refused for host (numpy) ids; ids in a
    ``jax.Array`` stay on the devices, and only their range is checked."""
    if not isinstance(encodings, jax.Array):
      encodings = np.asarray(encodings)
    if encodings.ndim != 2 or encodings.shape[1] != self.dim:
      raise InputError(f"encodings: expected [rows, {self.dim}], got shape "
                       f"{encodings.shape}")
    if not isinstance(row_ids, jax.Array):
      row_ids = np.asarray(row_ids)
    if np.shape(row_ids) != (encodings.shape[0],):
      raise InputError(f"row_ids: expected shape ({encodings.shape[0]},), got "
                       f"{np.shape(row_ids)}")
    if not np.issubdtype(row_ids.dtype, np.integer):  # (2.9 was taken as row 2)
      raise InputError(f"row_ids: expected integers, got {row_ids.dtype}")
    rows = encodings.shape[0]
    if rows == 0:
      return
    low, high = ((int(np.asarray(v.addressable_data(0))) for v in _id_range(row_ids))
                 if isinstance(row_ids, jax.Array) else (row_ids.min(), row_ids.max()))
    if low < 0 or high >= INVALID_ROW:
      raise InputError(f"row_ids: must lie in [0, {INVALID_ROW}), got "
                       f"[{low}, {high}]")
    if isinstance(encodings, jax.Array):
      self._advance(update_topk(self._state, encodings, row_ids, self._queries,
                                mesh=self.mesh, rows_sorted=False,
                                metric=self._metric, split=self.split))
    else:
      x = np.asarray(encodings)
      x = x.astype(device_dtype(x.dtype), copy=False)
      ids = np.asarray(row_ids, dtype=np.int64)
      self._check_new(ids)
      if np.any(ids[1:] < ids[:-1]):
        order = np.argsort(ids, kind="stable")
        x, ids = x[order], ids[order]
      padded = partitioning.padded_size(rows, self.mesh.size)
      if padded != rows:
        x = np.concatenate([x, np.zeros((padded - rows, self.dim), x.dtype)])
        ids = np.concatenate([ids, np.zeros(padded - rows, ids.dtype)])
      valid = np.arange(padded) < rows
      put = partitioning.put_global
      self._advance(update_topk(
          self._state,
          put(x, partitioning.rows_sharding(self.mesh)),
          put(ids.astype(np.int32), partitioning.rows_sharding(self.mesh, 1)),
          self._queries,
          put(valid, partitioning.rows_sharding(self.mesh, 1)),
          mesh=self.mesh, rows_sorted=True, metric=self._metric,
          split=self.split))
    self._rows_seen += rows

  def _check_new(self, ids: np.ndarray) -> None:
    """InputError where host ``ids`` repeat a row id, among themselves or of
    an earlier ``add`` (the row would be listed twice). One bit a row id:
    10 MB at 78M rows."""
    values, counts = np.unique(ids, return_counts=True)
    byte, bit = values >> 3, np.left_shift(1, values & 7).astype(np.uint8)
    if len(self._seen) <= byte[-1]:
      grown = np.zeros(max(2 * len(self._seen), int(byte[-1]) + 1), np.uint8)
      grown[:len(self._seen)] = self._seen
      self._seen = grown
    again = (self._seen[byte] & bit) != 0
    if again.any() or (counts > 1).any():
      row = values[again | (counts > 1)][0]
      raise InputError(f"row_ids: row {row} is added twice; expected each "
                       "row once (its scores would be listed twice)")
    np.bitwise_or.at(self._seen, byte, bit)  # (ids 8 and 9 share a byte)

  def _advance(self, state: TopKState) -> None:
    """Takes the state of a step just dispatched. At most two steps are in
    flight (as in ``pipeline.encode_corpus``): a long queue of dispatched
    steps with collectives deadlocks XLA:CPU's simulated devices (one of 8
    never reaches an all-reduce; XLA aborts at its rendezvous timeout)."""
    previous, self._state = self._state, state
    jax.block_until_ready(previous)

  def add_stepped(self, encodings: jax.Array, row_ids: jax.Array,
                  valid: jax.Array) -> None:
    """Folds in global ``[steps, step_size, d]`` encodings laid out as
    ``GradientEncoder`` lays out a batch (positions split over ``data``), with
    int32 ``row_ids`` and bool ``valid`` of shape ``[steps, step_size]``.
    Rows never move between hosts; only top-k candidates do."""
    x, ids, ok, count = flatten_stepped(encodings, row_ids, valid)
    self._advance(update_topk(self._state, x, ids, self._queries, ok,
                              mesh=self.mesh, rows_sorted=False,
                              metric=self._metric, split=self.split))
    self._rows_seen += int(np.asarray(count.addressable_data(0)))

  def state(self) -> TopKState:
    return self._state

  def result(self) -> TopK:
    got = finish(self._state, self._rows_seen)
    return TopK(*(a[:self.num_queries] for a in got))
