"""Serving traces: a store's rows held on the mesh, queries answered as they come.

``tracer serve`` (``launch/serve.py``) builds the pieces here once (checkpoint,
encoder, basis, corpus row table, the index) and answers HTTP requests:

* ``ResidentIndex``: the store's ``[N, d]`` rows read once onto every device
  of the mesh (each process reads only its devices' rows, checked against
  the chunks' checksums), rows split over all devices
  (``partitioning.rows_sharding``). A batch of requests is ONE pass over
  them: each device scores its rows block by block against every query of
  the batch, keeps a running top-k (``tracer.topk``'s selection and merge),
  and only ``k`` candidates per device and query are gathered at the end.
* ``StreamedIndex``: the fallback when the rows do not fit the device budget:
  ``scan.scan_stores`` for a batch of one request; for a batch of several,
  the store read in windows that fit, each scored by the resident pass
  (one read per batch, not one per request).
* Both take one store or several holding the same rows (TrackStar summed
  over checkpoints, one store per checkpoint): a row's score is then the sum
  of its scores in each, against that checkpoint's queries and R.
* ``Tracer.answer``: a batch of requests -> one query encoding for all their
  queries, each request's own task-specific R (its queries are its eval set,
  exactly as ``tracer trace`` fits R for a queries file, so an answer never
  depends on what else was batched with it; or the server's task R, the
  same for every request that does not ask for its own with ``"task_r":
  false``), one scan, one greedy decode,
  ``pipeline.result_rows``: the records ``tracer trace`` writes.
* ``Batcher``: requests queued by the HTTP threads, answered in batches by one
  worker thread (the only thread that runs JAX).
* ``Channel``: multi-host. Process 0 runs the HTTP server and broadcasts each
  batch (a length, then JSON bytes) to the other processes, which follow:
  every process encodes, scans its devices' rows and decodes in lockstep.
* ``make_server``: the HTTP endpoints (``POST /trace``, ``GET /health``).

Shapes that vary per batch (queries, requests, low-rank columns, k, encoder
steps) are padded to powers of two, so a warm server compiles nothing new
for most batches; the greedy decode compiles once per longest target
length it meets.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import http.client
import http.server
import io
import json
import queue
import socket
import sys
import threading
import time
import traceback
import urllib.parse
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from tracer import data as data_lib
from tracer import evaluate
from tracer import hessian
from tracer import memory
from tracer import partitioning
from tracer import pipeline
from tracer import scan as scan_lib
from tracer import topk as topk_lib
from tracer.config import PreconditionerConfig
from tracer.encoder import nonfinite_rows
from tracer.errors import InputError, QuarantineLimitError


def _bucket(n: int) -> int:
  """The power of two >= n (0 stays 0): the padded size of a varying shape."""
  return 0 if n <= 0 else 1 << (int(n) - 1).bit_length()


def _batch_bucket(n: int) -> int:
  """``_bucket`` of a batch's query or metric count, at least 2: XLA:CPU
  sums one query's (or one metric's) products in another order than two's,
  so a query answered alone and the same query batched with another (up to
  64 queries) would differ in the last bit, and a near tie could swap."""
  return 0 if n <= 0 else max(2, _bucket(n))


# --- requests -------------------------------------------------------------------

class RequestError(InputError):
  """A request the server refuses: HTTP ``status`` and a message naming the
  field."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one request may ask for."""
  num_rows: int                    # the store's rows: top_k <= num_rows
  max_top_k: int = 100
  max_queries: int = 256           # per request, and per batch
  default_top_k: int = 10
  max_body_bytes: int = 16 << 20
  # Every body being read, parsed or waiting for its batch, together (a
  # parsed body takes up to ~30x its bytes: 16 MiB of tiny JSON values took
  # 444 MiB); one request alone is always taken.
  max_bodies_bytes: int = 64 << 20


class Request(NamedTuple):
  queries: list[dict]              # records as in a queries file
  top_k: int
  # True: the server's task R; False: one fitted from these queries; None:
  # the server's choice (its task R if it holds one).
  task_r: bool | None = None


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number",
               float: "number", bool: "boolean", type(None): "null"}
# What tracer writes into a results line: a query holding one is refused.
_RESERVED = data_lib.WRITTEN_FIELDS | set(evaluate.RESULT_FIELDS)


def _json_type(value: Any) -> str:
  return _JSON_TYPES.get(type(value), type(value).__name__)


def _is_text(value: Any) -> bool:
  """A string without lone surrogates (JSON allows ``"\\ud800"``; no
  tokenizer can encode it)."""
  if not isinstance(value, str):
    return False
  try:
    value.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def _check_query(query: Any, where: str) -> None:
  """The checks ``data.read_queries`` makes of a queries-file line."""
  if not isinstance(query, dict):
    raise RequestError(f"{where}: expected an object with 'id', 'prompt', "
                       f"'target', got {_json_type(query)}")
  for field in ("id", "prompt", "target"):
    if field not in query:
      raise RequestError(f"{where}: missing field {field!r}; expected an object "
                         "with 'id', 'prompt', 'target'")
  for field in data_lib.STRING_FIELDS:
    if field in query and not isinstance(query[field], str):
      raise RequestError(f"{where}: field {field!r} must be a string, got "
                         f"{_json_type(query[field])}")
    if field in query and not _is_text(query[field]):
      raise RequestError(f"{where}: field {field!r} holds a lone surrogate "
                         "(a \\ud800-\\udfff escape); expected Unicode text")
  for field in ("id", "target"):
    if not query[field].strip():
      raise RequestError(f"{where}: field {field!r} is empty or only "
                         "whitespace; expected a non-blank string")
  docs = query.get("fact_doc_ids", [])
  if not isinstance(docs, list) or not all(isinstance(d, str) for d in docs):
    raise RequestError(f"{where}: field 'fact_doc_ids' must be a list of strings")
  clash = sorted(set(query) & set(_RESERVED))
  if clash:
    raise RequestError(f"{where}: field {clash[0]!r} is a results field; a "
                       "query cannot hold it")
  try:  # 1e400 parses as infinity, which the answer could not hold as JSON
    data_lib.check_json_values(where, query)
  except InputError as e:
    raise RequestError(str(e)) from None


def _top_k(body: dict, limits: Limits) -> int:
  most = min(limits.num_rows, limits.max_top_k)
  top_k = body.get("top_k", min(limits.default_top_k, most))
  if type(top_k) is not int:  # bool is an int subclass
    raise RequestError(f"field 'top_k' must be an integer, got {_json_type(top_k)}")
  if not 1 <= top_k <= most:
    raise RequestError(f"field 'top_k': {top_k} is out of range; expected "
                       f"1..{most} (the store has {limits.num_rows} rows, this "
                       f"server answers at most {limits.max_top_k})")
  return top_k


def _no_constant(name: str):
  """json's NaN / Infinity, which are not JSON (and a strict client would
  refuse them echoed back in a query's fields)."""
  raise ValueError(f"{name} is not a JSON value")


def parse_request(body: bytes, limits: Limits) -> Request:
  """``{"queries": [{"id", "prompt", "target", ...}], "top_k": K}`` checked;
  RequestError (400, 413 for too many queries) naming the field."""
  try:
    obj = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
  except UnicodeDecodeError as e:
    raise RequestError(f"body: not valid UTF-8 ({e.reason} at byte {e.start})") from None
  except json.JSONDecodeError as e:
    raise RequestError(f"body: not valid JSON ({e.msg} at line {e.lineno} column "
                       f"{e.colno}); expected {{\"queries\": [...], \"top_k\": K}}"
                       ) from None
  except (ValueError, RecursionError) as e:  # an integer of 4,300+ digits; deep nesting
    raise RequestError(f"body: not JSON this server reads ({type(e).__name__}: "
                       f"{str(e)[:100]})") from None
  if not isinstance(obj, dict):
    raise RequestError(f"body: expected a JSON object, got {_json_type(obj)}")
  unknown = sorted(set(obj) - {"queries", "top_k", "task_r"})
  if unknown:
    raise RequestError(f"body: unknown field {unknown[0]!r}; expected 'queries' "
                       "and optionally 'top_k', 'task_r'")
  if "queries" not in obj:
    raise RequestError("body: missing field 'queries'; expected a list of "
                       "{\"id\", \"prompt\", \"target\"} objects")
  queries = obj["queries"]
  if not isinstance(queries, list):
    raise RequestError(f"field 'queries' must be an array, got {_json_type(queries)}")
  if not queries:
    raise RequestError("field 'queries' is empty; expected at least one query")
  if len(queries) > limits.max_queries:
    raise RequestError(f"field 'queries': {len(queries)} queries, more than the "
                       f"{limits.max_queries} this server takes per request; "
                       "split them", status=413)
  seen: dict[str, int] = {}
  for i, query in enumerate(queries):
    _check_query(query, f"queries[{i}]")
    if query["id"] in seen:
      raise RequestError(f"queries[{i}]: duplicate id {query['id']!r} (first at "
                         f"queries[{seen[query['id']]}]); ids must be unique")
    seen[query["id"]] = i
  task_r = obj.get("task_r")
  if task_r is not None and not isinstance(task_r, bool):
    raise RequestError(f"field 'task_r' must be true or false, got "
                       f"{_json_type(task_r)}")
  return Request(queries, _top_k(obj, limits), task_r)


# --- the query side -----------------------------------------------------------

def project_queries(encoder, basis: hessian.Basis | None, examples: dict
                    ) -> tuple[np.ndarray, dict[int, str]]:
  """Every query's projection in the basis' coordinates, f32 ``[n, d]``, and
  ``{index: reason}`` of those with a non-finite loss or gradient (their
  rows are zero) or a zero one (``pipeline.unusable_queries``). One encoder call; the batch is padded to a power of two
  of the encoder's steps, so few programs are compiled."""
  n = len(examples["inputs"])
  steps = -(-n // encoder.step_size)
  projected = encoder.project_global(
      pipeline.repeat_last(examples, _bucket(steps) * encoder.step_size))
  psi = partitioning.fetch(pipeline.rotate(basis, projected.phi)).reshape(
      -1, encoder.dim)[:n]
  return psi, pipeline.unusable_queries(psi, nonfinite_rows(projected, n))


def fit_request(basis: hessian.Basis | None, psi: np.ndarray,
                skipped: dict[int, str], cfg: PreconditionerConfig,
                ids: Sequence[str], task: hessian.QueryMetric | None = None
                ) -> tuple[hessian.QueryMetric, np.ndarray]:
  """One request's scan-time R^(-1) (its queries are R_eval, as
  ``pipeline.query_metric`` fits a queries file's; or the server's ``task``
  R) and its query vectors ``[n, d]`` (zero for the queries in ``skipped``)."""
  return pipeline.fit_query_metric(basis, psi, skipped, cfg, ids, task)


def predictions(ckpt, examples: dict, queries: Sequence[dict], vocab,
                mesh: Mesh) -> list:
  """``pipeline.predictions`` (what ``tracer trace`` writes of the model's
  completion) with the batch padded to a power of two, so few shapes are
  compiled."""
  size = _bucket(len(queries))
  padded = [queries[min(i, len(queries) - 1)] for i in range(size)]
  return pipeline.predictions(ckpt, pipeline.repeat_last(examples, size), padded,
                              vocab, batch_size=size, mesh=mesh)[:len(queries)]


# --- the index ------------------------------------------------------------------

class Layout(NamedTuple):
  """How a resident store lies on the devices: each device holds
  ``rows_per_device`` consecutive rows (whole store chunks, so each read is
  checked against its chunks' markers), scanned ``block`` rows at a time."""
  rows_per_device: int
  block: int


def plan_layout(num_rows: int, dim: int, itemsize: int, num_devices: int,
                chunk_rows: int,
                block_bytes: int = scan_lib.DEFAULT_DEVICE_CHUNK_BYTES) -> Layout:
  """Rows per device (N / devices rounded up to whole store chunks and
  blocks) and the block: at most ~``block_bytes`` of rows, at least a chunk."""
  chunks = max(1, -(-num_rows // (num_devices * chunk_rows)))
  chunks_per_block = max(1, block_bytes // (dim * itemsize * chunk_rows))
  blocks = -(-chunks // chunks_per_block)
  chunks_per_block = -(-chunks // blocks)
  block = chunks_per_block * chunk_rows
  return Layout(blocks * block, block)


def _rows(index: tuple, total: int) -> tuple[int, int]:
  s = index[0]
  return (s.start or 0), (total if s.stop is None else s.stop)


# The resident rows are held as their bits (``topk.ROW_BITS``): XLA:CPU
# widens a bf16 dynamic_slice or dynamic_update_slice to f32, so the pass's
# block slices converted the whole array in every pass and the load's writes
# rewrote it for every block. The pass views a block's bits as values again
# (``topk.row_values``, free in the program).


@functools.partial(jax.jit, donate_argnums=0)
def _write_block(rows, block, at):
  """``rows`` with ``block`` written from row ``at`` on, in place (donated)."""
  return lax.dynamic_update_slice_in_dim(rows, block, at, 0)


def _read_ahead(read: Callable, items: Sequence, depth: int):
  """``read(item)`` for each of ``items``, yielded in order, with up to
  ``depth`` reads in flight on threads ahead of the one yielded."""
  with concurrent.futures.ThreadPoolExecutor(depth) as pool:
    pending = collections.deque(pool.submit(read, i) for i in items[:depth])
    for item in items[depth:]:
      done = pending.popleft().result()
      pending.append(pool.submit(read, item))
      yield done
    while pending:
      yield pending.popleft().result()


def _load(store, mesh: Mesh, layout: Layout, verify: bool, first: int = 0
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The store's rows ``[first, first + rows_per_device * devices)`` (a
  window of it; all of it from row 0 where ``plan_layout`` sized the layout)
  ``[rows_per_device * devices, d]`` split over every device as their bits
  (``topk.ROW_BITS``; zero rows past N), their int32 ids and a valid mask
  (False past N and at quarantined rows). Each process reads only its
  devices' rows. ``first``: a multiple of the store's chunk.

  A device's array is made on it and filled one ``layout.block`` of rows at a
  time, in place, while the next blocks are read (one ahead from a local
  store, ``scan.REMOTE_READ_AHEAD`` from object storage): a host holds that
  many blocks plus one (``scan.device_chunk_bytes`` each), not its share of
  the store."""
  total = layout.rows_per_device * mesh.size
  dtype = scan_lib.device_dtype(store.dtype)
  bits = topk_lib.ROW_BITS[dtype]
  rows_left = store.num_rows - first  # in this window and after it

  def read(item):  # one block of a device's rows (whole chunks), checked
    _, start = item
    start += first
    out = scan_lib.aligned_empty((layout.block, store.dim), store.dtype)
    hi = min(start + layout.block, store.num_rows)
    for future in store.read_into(start, hi, out[:hi - start]):
      future.result()
    records = store.chunk_records_later(start, hi)()
    if verify:
      store.check_read(start, hi, out[:hi - start], records)
    out[hi - start:] = 0
    return out.astype(dtype, copy=False).view(bits), [
        int(r) for record in records.values() for r in record.get("quarantined", {})]

  sharding = partitioning.rows_sharding(mesh)
  devices, shards, items = [], [], []
  for device, index in sharding.addressable_devices_indices_map(
      (total, store.dim)).items():
    start, stop = _rows(index, total)
    devices.append((device, start))
    shards.append(jnp.zeros((stop - start, store.dim), bits, device=device))
    # Blocks wholly past N stay zero.
    items += [(len(shards) - 1, at)
              for at in range(start, min(stop, rows_left), layout.block)]
  quarantined: list[int] = []
  depth = 1 if store.local else scan_lib.REMOTE_READ_AHEAD
  for (i, at), (block, skipped) in zip(items, _read_ahead(read, items, depth)):
    device, start = devices[i]
    shards[i] = _write_block(shards[i], jax.device_put(block, device), at - start)
    shards[i].block_until_ready()  # this block's host buffer is free again
    quarantined += skipped
  x = jax.make_array_from_single_device_arrays((total, store.dim), sharding, shards)
  ids = lambda index: first + np.arange(*_rows(index, total), dtype=np.int32)
  valid = lambda index: ((ids(index) < store.num_rows)
                         & ~np.isin(ids(index), quarantined))
  sharding = partitioning.rows_sharding(mesh, ndim=1)
  return (x, jax.make_array_from_callback((total,), sharding, ids),
          jax.make_array_from_callback((total,), sharding, valid))


def _norms(x, diag, lowrank, lowrank_owner, segments, widen: bool):
  """``sqrt(x^T R_j^(-1) x)`` of each row of ``x [r, d]`` for each request j:
  ``[r, J]`` (``topk._row_norms`` for J metrics at once). ``diag [J, d]``;
  per segment, every request's low-rank columns side by side ``[size, R]``
  and which request owns each column, one-hot ``[R, J]``. ``widen``: see
  ``topk.lowrank_products`` and ``topk.norms_of``."""
  hi = lax.Precision.HIGHEST

  def squared(x):
    xf = x.astype(jnp.float32)
    n2 = jnp.dot(xf * xf, diag.T, precision=hi)
    for (lo, up), c, owner in zip(segments, lowrank, lowrank_owner):
      if c.shape[1]:
        t = topk_lib.lowrank_products(x[:, lo:up], c, widen)
        n2 = n2 - jnp.dot(t * t, owner, precision=hi)
    return n2

  return topk_lib.norms_of(squared, x, widen)


def _device_norms(xs, diags, lowranks, lowrank_owners, *, block: int, segments,
                  axes, widen: bool):
  """Every one of a device's rows' ``sqrt(x^T R^(-1) x)`` under one metric
  per part (``_norms``' arrays for it), ``[n]`` f32 per part, computed
  ``block`` rows at a time as the pass computes them."""
  out = []
  for x, diag, lowrank, lowrank_owner, segs in zip(xs, diags, lowranks,
                                                   lowrank_owners, segments):
    def body(i, norms, x=x, diag=diag, lowrank=lowrank, owner=lowrank_owner,
             segs=segs):
      rows = lax.dynamic_slice_in_dim(x, i * block, block)
      return lax.dynamic_update_slice_in_dim(
          norms, _norms(rows, diag, lowrank, owner, segs, widen)[:, 0], i * block, 0)
    init = lax.pcast(jnp.zeros(x.shape[0], jnp.float32), tuple(axes), to="varying")
    out.append(lax.fori_loop(0, x.shape[0] // block, body, init))
  return tuple(out)


@functools.lru_cache(maxsize=None)
def _norms_fn(mesh: Mesh, block: int, segments: tuple):
  """The jitted ``_device_norms`` over the resident rows: ``[N']`` per part,
  split over the devices as the rows are."""
  ids = partitioning.rows_sharding(mesh, ndim=1).spec
  rep = partitioning.replicated(mesh).spec
  return jax.jit(jax.shard_map(
      functools.partial(_device_norms, block=block, segments=segments,
                        axes=mesh.axis_names, widen=topk_lib.widens_bf16(mesh)),
      mesh=mesh, in_specs=(partitioning.rows_sharding(mesh).spec,) + (rep,) * 3,
      out_specs=ids))


def _device_topk(xs, row_ids, valid, queries, owner, diags, lowranks,
                 lowrank_owners, held, *, k: int, block: int, segments, axes,
                 widen: bool):
  """One device's top-k of its rows for every query, scanned ``block`` rows
  at a time with a running top-k (``tracer.topk``'s per-block selection and
  exact merge, as a scan step does); ``owner [Q]``: each query's metric,
  which divides its scores. ``held``: the rows' norms under the one metric
  every query has (``ResidentIndex.hold``), ``[n]`` per part, read instead
  of computed (the metric arrays are then empty); or ``()``.

  Per part (one store, e.g. one checkpoint of a sum over checkpoints): its
  rows ``xs[p] [n, d]`` (as bits, ``topk.ROW_BITS``), queries ``[Q, d]``, metrics
  (``_norms``'s arrays) and ``segments[p]``. A row's score is the sum over parts of its scores,
  in fp32, in part order (``topk.summed_step_fn``'s). ``widen`` (the CPU):
  rows scored tile by tile (``topk.exact_scores``' ``tile_rows``; bf16 and
  int8 ones widened to f32, also for their norms' low-rank products); else
  bf16 and int8 rows take the bf16 units."""
  # The running top-k differs per device (shard_map's varying values).
  init = jax.tree.map(lambda a: lax.pcast(a, tuple(axes), to="varying"),
                      topk_lib.empty_state(queries[0].shape[0], k))

  def step(i, state):
    rows = lambda a: lax.dynamic_slice_in_dim(a, i * block, block)
    s = None
    for p, (x, q, segs) in enumerate(zip(xs, queries, segments)):
      x = rows(x)  # as bits: each tile is viewed as values
      # Widened tiles, not three bf16 products, and plain jit, not
      # ``topk.jit_step``'s library fusions: on a 2-core AMD Zen 3 (AVX2) the
      # products took 1.3-2.5x as long (400,000 rows x 1,024: 0.57 vs 0.43 s
      # for one query, 2.48 vs 0.99 s for 64) and the fusions 1.06-1.24x. On
      # an Intel Xeon with AVX512-BF16 and AMX the tiles still won or tied
      # over three rounds (one query 0.53-0.58 s, products 0.55-0.75, whole
      # block with the fusions 0.68-0.75; 64 queries 1.08-1.31 against
      # 1.08-1.50 and 1.17-1.32); on an AMD Zen 4 with AVX512-BF16, two
      # rounds: one query 0.30-0.37 s against 0.52-0.53 for the products, 64
      # queries 0.88-0.92 against 1.43-1.59. Only the tiles give the f32
      # pass's bits.
      tiles = topk_lib.score_tile_rows(x.shape[1]) if widen else None
      if held:
        norms = rows(held[p])[:, None]
      else:
        norms = _norms(x, diags[p], lowranks[p], lowrank_owners[p], segs,
                       widen)[:, owner]
      part = topk_lib.exact_scores(x, q, widen, tiles) / norms
      s = part if s is None else s + part
    return topk_lib.fold_block(state, s, rows(row_ids), rows(valid), k)

  return tuple(lax.fori_loop(0, xs[0].shape[0] // block, step, init))


@functools.lru_cache(maxsize=None)
def _search_fn(mesh: Mesh, k: int, block: int, segments: tuple):
  """The jitted pass: every device's top-k, then ``k`` candidates per device
  and query gathered and merged into the running top-k ``state`` (empty, or
  a streamed index's previous windows'): the only cross-device traffic.
  ``segments``: each part's metric segments."""
  rows = partitioning.rows_sharding(mesh).spec
  ids = partitioning.rows_sharding(mesh, ndim=1).spec
  rep = partitioning.replicated(mesh).spec
  candidates = partitioning.every_device_spec(2, axis=1)
  local = jax.shard_map(
      functools.partial(_device_topk, k=k, block=block, segments=segments,
                        axes=mesh.axis_names,
                        widen=topk_lib.widens_bf16(mesh)),
      mesh=mesh, in_specs=(rows, ids, ids) + (rep,) * 5 + (ids,),
      out_specs=(candidates,) * 4)

  def search(state, xs, row_ids, valid, queries, owner, diags, lowranks,
             lowrank_owners, held):
    ps, pr, os_, or_ = local(xs, row_ids, valid, queries, owner, diags, lowranks,
                             lowrank_owners, held)
    return topk_lib.merge_candidates(state, ps, pr, os_, or_, k)

  return jax.jit(search, out_shardings=partitioning.replicated(mesh))


def _stacked_metrics(metrics: Sequence, num_padded: int):
  """J requests' metrics (``hessian.QueryMetric`` or ``topk.RowMetric``) as
  one pass takes them: ``diag [J', d]`` (padding:
  ones), per segment the low-rank columns of every request side by side
  (padded with zero columns to a power of two shared by all segments) and
  their one-hot owners ``[R, J']``."""
  segments = tuple(metrics[0].segments)
  if any(tuple(m.segments) != segments for m in metrics):
    raise ValueError("metrics of different bases cannot share a pass")
  diag = np.ones((num_padded, metrics[0].diag.shape[0]), np.float32)
  for j, m in enumerate(metrics):
    diag[j] = m.diag
  width = _bucket(max(sum(m.lowrank[b].shape[1] for m in metrics)
                      for b in range(len(segments))))
  lowrank, owners = [], []
  for b, (lo, hi) in enumerate(segments):
    c = np.zeros((hi - lo, width), np.float32)
    owner = np.zeros((width, num_padded), np.float32)
    col = 0
    for j, m in enumerate(metrics):
      r = m.lowrank[b].shape[1]
      c[:, col:col + r] = m.lowrank[b]
      owner[col:col + r, j] = 1
      col += r
    lowrank.append(c)
    owners.append(owner)
  return segments, diag, tuple(lowrank), tuple(owners)


def _slots(k: int, num_rows: int) -> int:
  """A pass's top-k slots for requests of at most ``k``: a power of two (few
  shapes to compile), never more than the rows (a bucket past them held up
  to twice the slots the rows can fill)."""
  return max(1, min(_bucket(k), num_rows))


def _split(result: topk_lib.TopK, sizes: Sequence[int], ks: Sequence[int]
           ) -> list[topk_lib.TopK]:
  """One pass's ``TopK`` back into each request's queries and ``top_k``."""
  out, start = [], 0
  for size, k in zip(sizes, ks):
    out.append(topk_lib.TopK(*(a[start:start + size, :k] for a in result)))
    start += size
  return out


class ResidentIndex:
  """Stores' rows held on the mesh (module doc); ``search`` is one pass.

  ``stores``: one, or one per part of a sum (e.g. TrackStar summed over
  checkpoints), each holding the same rows; a row's score is the sum of
  its parts' and a row quarantined in any part never comes back."""
  resident = True

  def __init__(self, stores, mesh: Mesh, layout: Layout, verify: bool = True,
               first: int = 0):
    self.stores, self.mesh, self.layout = list(stores), mesh, layout
    scan_lib.check_summable(self.stores, "ResidentIndex")
    self.store = self.stores[0]
    loaded = [_load(st, mesh, layout, verify, first) for st in self.stores]
    self.xs = tuple(x for x, _, _ in loaded)
    self.row_ids = loaded[0][1]
    self.valid = loaded[0][2]
    for _, _, valid in loaded[1:]:
      self.valid = jnp.logical_and(self.valid, valid)
    self.held_metrics, self.held_segments, self.held_norms = None, None, ()

  def _metric_arrays(self, metrics: Sequence[Sequence[hessian.QueryMetric]]):
    """``metrics[j][p]`` (J metrics, one per part each) as the pass takes
    them: per part, segments and the arrays of ``_stacked_metrics``, on the
    devices."""
    stacked = [_stacked_metrics([st.stored_metric(m[p]) for m in metrics],
                                _batch_bucket(len(metrics)))
               for p, st in enumerate(self.stores)]
    segments, *arrays = (tuple(a) for a in zip(*stacked))
    return segments, self._replicated(tuple(arrays))

  def _replicated(self, tree):
    """``tree``'s arrays on every device of the mesh."""
    return jax.tree.map(lambda a: partitioning.put_global(
        a, partitioning.replicated(self.mesh)), tree)

  def hold(self, metrics: Sequence[hessian.QueryMetric]) -> None:
    """Computes every row's norm under ``metrics`` (one per part: a server's
    task R) once, in one pass, and keeps them (4 bytes a row per part). A
    batch whose every request has these metrics then reads the norms; its
    pass costs the query dots alone, not also the metric's low-rank
    columns (as many per segment as the task has queries)."""
    segments, arrays = self._metric_arrays([metrics])
    self.held_norms = _norms_fn(self.mesh, self.layout.block, segments)(
        self.xs, *arrays)
    self.held_metrics, self.held_segments = tuple(metrics), segments

  def search(self, vectors: Sequence[Sequence[np.ndarray]],
             metrics: Sequence[Sequence[hessian.QueryMetric]],
             ks: Sequence[int]) -> list[topk_lib.TopK]:
    """Each request's top-k: ``vectors[j][p] [n_j, d]`` (``fit_request``'s
    in part p), its metrics ``metrics[j][p]`` and its k. All processes call
    this together."""
    sizes, k = [len(v[0]) for v in vectors], _slots(max(ks), self.store.num_rows)
    state = topk_lib.init_topk(_batch_bucket(sum(sizes)), k, self.mesh)
    return _split(topk_lib.finish(self.fold(state, vectors, metrics),
                                  self.store.num_rows), sizes, ks)

  def fold(self, state: topk_lib.TopKState,
           vectors: Sequence[Sequence[np.ndarray]],
           metrics: Sequence[Sequence[hessian.QueryMetric]]) -> topk_lib.TopKState:
    """``state`` (the running top-k of ``search``'s queries, padded to a
    power of two) with these rows' candidates merged in: one pass."""
    sizes = [len(v[0]) for v in vectors]
    num = sum(sizes)
    queries = []
    for p, st in enumerate(self.stores):
      q = np.zeros((_batch_bucket(num), self.store.dim), np.float32)
      q[:num] = st.stored_queries(np.concatenate([v[p] for v in vectors]))
      queries.append(q)
    owner = np.zeros(len(queries[0]), np.int32)
    held = self.held_metrics is not None and all(
        all(a is b for a, b in zip(m, self.held_metrics)) for m in metrics)
    if held:  # the norms are read; no metric arrays
      segments, arrays, norms = self.held_segments, ((), (), ()), self.held_norms
    else:
      owner[:num] = np.repeat(np.arange(len(sizes)), sizes)
      (segments, arrays), norms = self._metric_arrays(metrics), ()
    k = state.proponent_scores.shape[1]
    return _search_fn(self.mesh, k, self.layout.block, segments)(
        state, self.xs, self.row_ids, self.valid,
        *self._replicated((tuple(queries), owner)), *arrays, norms)

  def describe(self) -> str:
    per_device = (len(self.xs) * self.layout.rows_per_device * self.store.dim
                  * self.xs[0].dtype.itemsize)
    parts = f" x {len(self.xs)} stores" if len(self.xs) > 1 else ""
    held = "; the task R's row norms held" if self.held_metrics else ""
    return (f"resident: {self.store.num_rows} rows{parts} on {self.mesh.size} "
            f"devices, {per_device / 2**20:.1f} MiB per device "
            f"({topk_lib.values_dtype(self.xs[0].dtype)}){held}")


class StreamedIndex:
  """The fallback when the stores' rows do not fit the devices: a batch of
  several requests reads the stores window by window (``window_bytes`` of
  rows per device, at least one block), each window loaded as a
  ``ResidentIndex`` and scored by the same pass, the running top-k carried
  from one window to the next: one read of the stores, however many
  requests the batch holds. A batch of one request is one ``scan_stores``,
  whose reads overlap its scoring (on a 2-core CPU, 400,000 rows of d =
  1,024 from the page cache: 0.63 s against 1.33 for the windows, whose
  load and pass take turns)."""
  resident = False

  def __init__(self, stores, mesh: Mesh, verify: bool = True,
               window_bytes: int = 0):
    self.stores, self.mesh, self.verify = list(stores), mesh, verify
    scan_lib.check_summable(self.stores, "StreamedIndex")
    self.store = self.stores[0]
    whole = _layout(self.store, mesh)
    row_bytes = len(self.stores) * self.store.dim * scan_lib.device_dtype(
        self.store.dtype).itemsize
    blocks = window_bytes // (row_bytes * whole.block)
    self.layout = Layout(
        whole.block * min(max(1, blocks), whole.rows_per_device // whole.block),
        whole.block)

  def hold(self, metrics: Sequence[hessian.QueryMetric]) -> None:
    """Nothing: each pass computes its rows' norms as it reads them (holding
    them would cost a read of every store)."""
    del metrics

  def search(self, vectors, metrics, ks) -> list[topk_lib.TopK]:
    """``ResidentIndex.search``, one window at a time; a batch of one
    request, one ``scan_stores``."""
    if len(vectors) == 1:
      # Queries and k padded to powers of two, as the pass pads them: a warm
      # server compiles nothing new for most requests.
      n, k = len(vectors[0][0]), ks[0]
      padded = [np.concatenate([v, np.zeros((_batch_bucket(n) - n, v.shape[1]), v.dtype)])
                for v in vectors[0]]
      found = scan_lib.scan_stores(self.stores, padded,
                                   _slots(k, self.store.num_rows),
                                   mesh=self.mesh, verify=self.verify,
                                   metrics=[m.row_metric() for m in metrics[0]])
      return [topk_lib.TopK(*(a[:n, :k] for a in found))]
    sizes, k = [len(v[0]) for v in vectors], _slots(max(ks), self.store.num_rows)
    state = topk_lib.init_topk(_batch_bucket(sum(sizes)), k, self.mesh)
    window = self.layout.rows_per_device * self.mesh.size
    for first in range(0, self.store.num_rows, window):
      state = ResidentIndex(self.stores, self.mesh, self.layout, self.verify,
                            first).fold(state, vectors, metrics)
    return _split(topk_lib.finish(state, self.store.num_rows), sizes, ks)

  def describe(self) -> str:
    rows = self.layout.rows_per_device * self.mesh.size
    windows = -(-self.store.num_rows // rows)
    return (f"streamed from {', '.join(st.path for st in self.stores)} for "
            f"every batch of requests, {rows} rows at a time "
            f"({windows} window{'s' * (windows > 1)})")


def _layout(store, mesh: Mesh) -> Layout:
  """The layout of ``store``'s rows held whole on ``mesh`` (``plan_layout``)."""
  return plan_layout(store.num_rows, store.dim,
                     scan_lib.device_dtype(store.dtype).itemsize, mesh.size,
                     store.chunk_rows,
                     scan_lib.device_chunk_bytes(mesh.devices.flat[0].platform))


def open_index(stores, mesh: Mesh, budget_bytes: int, verify: bool = True):
  """A ``ResidentIndex`` of ``stores`` (one, or the parts of a sum) if their
  rows fit ``budget_bytes`` per device, else a ``StreamedIndex`` whose
  windows take half of it (the next window is loaded while the last one's
  pass may still hold its rows)."""
  stores = list(stores)
  store = stores[0]
  layout = _layout(store, mesh)
  if (len(stores) * layout.rows_per_device * store.dim
      * scan_lib.device_dtype(store.dtype).itemsize > budget_bytes):
    return StreamedIndex(stores, mesh, verify, window_bytes=budget_bytes // 2)
  return ResidentIndex(stores, mesh, layout, verify)


# --- answering batches ------------------------------------------------------------

class Answer(NamedTuple):
  records: list[dict] | None       # None on processes other than 0
  error: InputError | None         # a request the batch could not answer


class Tracer:
  """Answers batches of requests against one checkpoint and store (module
  doc). Every process calls ``answer`` with the same batches.

  ``summed``: (encoder, basis) of each other checkpoint of a sum over
  checkpoints, in the order of ``index``'s other stores; each projects the
  queries and fits their R in its own store's basis. ``tasks``: a task's R
  in each checkpoint's basis (``pipeline.task_metric``, one per store),
  used for every request instead of one fitted from its queries."""

  def __init__(self, ckpt, encoder, basis: hessian.Basis | None, corpus, index,
               cfg: PreconditionerConfig, summed: Sequence[tuple] = (),
               tasks: Sequence[hessian.QueryMetric] | None = None):
    self.ckpt, self.encoder, self.basis = ckpt, encoder, basis
    self.corpus, self.index, self.cfg = corpus, index, cfg
    self.parts = [(encoder, basis), *summed]
    self.tasks = list(tasks) if tasks else [None] * len(self.parts)
    if not len(self.parts) == len(self.tasks) == len(index.stores):
      raise ValueError(f"Tracer: {len(self.parts)} checkpoints, "
                       f"{len(self.tasks)} task sets, {len(index.stores)} "
                       "stores; expected one each per store")
    if tasks:
      index.hold(self.tasks)
    self.vocab = pipeline.data_config(ckpt).vocabulary()
    self.max_len = ckpt.family.max_len(ckpt.model_config)

  def examples(self, queries: Sequence[dict]) -> dict:
    """Target-only examples; InputError naming a query that does not fit."""
    return data_lib.query_examples(queries, self.vocab, self.max_len, "queries")

  def check(self, request: Request) -> None:
    """What ``answer`` would refuse, found before the request is queued:
    a query that does not fit (InputError), a task R this server lacks."""
    self.examples(request.queries)
    if request.task_r and self.tasks[0] is None:
      raise RequestError("field 'task_r': true, but this server holds no task R "
                         "(start it with --task_queries=T.jsonl); leave it out "
                         "or send false for an R fitted from the request's queries")

  def _tasks(self, request: Request) -> list[hessian.QueryMetric | None]:
    """The task R per checkpoint a request is scored under (None: fitted
    from its own queries)."""
    return [None] * len(self.parts) if request.task_r is False else self.tasks

  def answer(self, requests: Sequence[Request]) -> tuple[list[Answer], dict]:
    """Each request's records (or why not) and the batch's timing (seconds)."""
    memory.release_programs_near_map_limit()  # (a server lives long)
    clock = [time.perf_counter()]
    tick = lambda: clock.append(time.perf_counter())
    parts = [self.examples(r.queries) for r in requests]
    examples = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    projected = [project_queries(enc, basis, examples) for enc, basis in self.parts]
    tick()
    bounds = np.cumsum([0] + [len(r.queries) for r in requests])
    per_part = [[{i - a: why for i, why in skipped.items() if a <= i < b}
                 for a, b in zip(bounds, bounds[1:])] for _, skipped in projected]
    mine = [{} for _ in requests]  # a query skipped in any part; the first reason
    for part in per_part:
      for j, skipped in enumerate(part):
        for i, why in skipped.items():
          mine[j].setdefault(i, why)
    fitted, errors = {}, {}
    for j, r in enumerate(requests):
      try:
        fitted[j] = [fit_request(basis, psi[bounds[j]:bounds[j + 1]], part[j],
                                 self.cfg, [q["id"] for q in r.queries], task)
                     for (_, basis), (psi, _), part, task in zip(
                         self.parts, projected, per_part, self._tasks(r))]
      except QuarantineLimitError as e:
        errors[j] = e
    tick()
    found = dict(zip(fitted, self.index.search(
        [[v for _, v in f] for f in fitted.values()],
        [[m for m, _ in f] for f in fitted.values()],
        [requests[j].top_k for j in fitted]))) if fitted else {}
    tick()
    preds = predictions(self.ckpt, examples,
                        [q for r in requests for q in r.queries], self.vocab,
                        self.encoder.mesh)
    tick()
    answers = [Answer(None, errors.get(j)) for j in range(len(requests))]
    if jax.process_index() == 0:
      answers = [Answer(None, errors[j]) if j in errors else Answer(
          pipeline.result_rows(r.queries, self.corpus, found[j], mine[j],
                               preds[bounds[j]:bounds[j + 1]]), None)
                 for j, r in enumerate(requests)]
    tick()
    stages = ("encode", "fit_r", "scan", "decode", "records")
    return answers, {s: round(b - a, 6) for s, a, b in zip(stages, clock, clock[1:])}


class Channel:
  """Hands each batch from process 0 to the others (``jax.distributed``): a
  length (-1: stop, 0: nothing to do, which keeps idle followers' collective
  from waiting forever), then the batch as JSON bytes: of each query only
  what the others compute from (``SENT``); the records, with every other
  field, are process 0's to make."""

  STOP, IDLE = -1, 0
  SENT = ("id", "prompt", "target")

  def send(self, requests: Sequence[Request] | None) -> None:
    payload = b"" if not requests else json.dumps([
        {**r._asdict(), "queries": [{k: q[k] for k in self.SENT} for q in r.queries]}
        for r in requests]).encode()
    # Two int32 words (jax's default integers): a batch may pass 2 GiB.
    self._broadcast(np.array(divmod(self.STOP if requests is None else len(payload),
                                    1 << 31), np.int32))
    if payload:
      self._broadcast(np.frombuffer(payload, np.uint8))

  def receive(self) -> list[Request] | None:
    """The next batch ([] when there is none yet); None: stop."""
    high, low = (int(w) for w in self._broadcast(np.zeros(2, np.int32)))
    length = (high << 31) + low
    if length == self.STOP:
      return None
    if length == self.IDLE:
      return []
    payload = self._broadcast(np.zeros(length, np.uint8)).tobytes()
    return [Request(**r) for r in json.loads(payload)]

  @staticmethod
  def _broadcast(x: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.broadcast_one_to_all(x))


def follow(tracer: Tracer, channel: Channel) -> None:
  """What processes other than 0 do: answer every batch process 0 sends,
  until it says stop. A batch that fails here raises: the processes are no
  longer in step (this host's read failed while the others wait in the
  scan's collective), so the job ends (``launch.cli`` tells the others)."""
  while (batch := channel.receive()) is not None:
    if batch:
      tracer.answer(batch)


# --- batching -------------------------------------------------------------------

class _Pending(NamedTuple):
  request: Request
  future: concurrent.futures.Future


class Batcher:
  """Requests queued by the HTTP threads, answered by one worker thread:
  it takes the first waiting request and every other one that arrives within
  ``window_s`` (up to ``max_queries`` queries), and answers them with one
  ``answer(requests)`` call. ``on_idle`` runs after ``idle_s`` without a
  request; ``on_stop`` once the worker ends (multi-host: tell the others)."""

  _STOP = object()

  def __init__(self, answer: Callable[[list[Request]], tuple[list[Answer], dict]],
               window_s: float = 0.005, max_queries: int = 256,
               idle_s: float | None = None, on_idle: Callable[[], None] | None = None,
               on_stop: Callable[[], None] | None = None):
    self._answer, self._window, self._max = answer, window_s, max_queries
    self._idle, self._on_idle, self._on_stop = idle_s, on_idle, on_stop
    self._queue: queue.Queue = queue.Queue()
    self._held = None  # a request that did not fit the last batch
    self._done = False  # the worker has ended: nothing queued is answered
    self._thread = threading.Thread(target=self._run, name="tracer-batcher",
                                    daemon=True)
    self._thread.start()

  def submit(self, request: Request) -> tuple[Answer, dict]:
    """Blocks until the request's batch is answered: its ``Answer`` and the
    batch's ``{"requests", "queries", "timing_s"}``."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    self._queue.put(_Pending(request, future))
    if self._done:  # (set before the worker's last look at the queue)
      self._refuse_queued()
    return future.result()

  def _refuse_queued(self) -> None:
    """Fails every request still queued: the worker has ended."""
    while True:
      if self._held is not None:
        item, self._held = self._held, None
      else:
        try:
          item = self._queue.get_nowait()
        except queue.Empty:
          return
      if item is not self._STOP and not item.future.done():
        item.future.set_exception(RequestError(
            "the server is stopping; send the request again once it is back",
            status=503))

  def close(self) -> None:
    """Answers what is queued, then stops the worker."""
    self._queue.put(self._STOP)
    self._thread.join()

  def _next(self):
    if self._held is not None:
      item, self._held = self._held, None
      return item
    while True:
      try:
        return self._queue.get(timeout=self._idle)
      except queue.Empty:
        if self._on_idle is not None:
          self._on_idle()

  def _gather(self, first: _Pending) -> tuple[list[_Pending], bool]:
    batch, total = [first], len(first.request.queries)
    deadline = time.monotonic() + self._window
    while total < self._max:
      try:
        item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
      except queue.Empty:
        break
      if item is self._STOP:
        return batch, True
      if total + len(item.request.queries) > self._max:
        self._held = item
        break
      batch.append(item)
      total += len(item.request.queries)
    return batch, False

  def _run(self) -> None:
    try:
      stop = False
      while not stop:
        first = self._next()
        if first is self._STOP:
          break
        batch, stop = self._gather(first)
        self._serve(batch)
    except Exception:  # pylint: disable=broad-except
      traceback.print_exc()  # (on_idle's: the requests queued get a 503)
    finally:
      try:
        if self._on_stop is not None:
          self._on_stop()
      finally:
        # (an error in on_idle or on_stop ends the worker too)
        self._done = True
        self._refuse_queued()

  def _serve(self, batch: list[_Pending]) -> None:
    try:
      answers, timing = self._answer([p.request for p in batch])
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      for p in batch:
        p.future.set_exception(e)
      return
    info = {"requests": len(batch),
            "queries": sum(len(p.request.queries) for p in batch),
            "timing_s": timing}
    for p, answer in zip(batch, answers):
      p.future.set_result((answer, info))


# --- HTTP -----------------------------------------------------------------------

@dataclasses.dataclass
class Service:
  """What the HTTP handlers use: the limits, a check run before queueing
  (tokenizing: a query that does not fit is a 400, not a failed batch), the
  batcher, and what ``GET /health`` reports."""
  limits: Limits
  check: Callable[[Request], None]
  batcher: Batcher
  info: dict
  log: bool = False
  bodies_bytes: int = dataclasses.field(default=0, init=False)  # in flight
  _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock,
                                            init=False, repr=False)

  def take_body(self, size: int) -> bool:
    """Whether a body of ``size`` bytes fits beside those in flight
    (``Limits.max_bodies_bytes``); if it does, it is counted until
    ``give_body``."""
    with self._lock:
      if self.bodies_bytes and (self.bodies_bytes + size
                                > self.limits.max_bodies_bytes):
        return False
      self.bodies_bytes += size
      return True

  def give_body(self, size: int) -> None:
    with self._lock:
      self.bodies_bytes -= size


class _ReadsBy(io.RawIOBase):
  """A socket's reads, each given the time left before ``deadline``
  (``time.monotonic()``; None: the socket's own timeout). TimeoutError once
  it has passed."""

  def __init__(self, sock: socket.socket):
    super().__init__()
    self._sock = sock
    self.deadline: float | None = None

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    if self.deadline is not None:
      left = self.deadline - time.monotonic()
      if left <= 0:
        raise TimeoutError("request not sent in time")
      self._sock.settimeout(left)
    return self._sock.recv_into(buffer)


def _linger(sock: socket.socket, reads: _ReadsBy,
            read: Callable[[int], bytes], max_bytes: int,
            seconds: float) -> None:
  """Ends an answer already written on ``sock`` and drops what the client
  still sends (``read`` over ``reads``) until it closes, or ``max_bytes``,
  or ``seconds``. A socket closed with bytes unread sends a reset, which
  discards the answer on the client's side: a client that sends its whole
  request before it reads (every HTTP client) saw "Broken pipe" instead.
  Both bounds: a client cannot hold the thread, nor have it read, for long."""
  try:
    sock.shutdown(socket.SHUT_WR)  # the answer is whole: its end, sent now
    reads.deadline = time.monotonic() + seconds
    while max_bytes > 0 and (chunk := read(min(max_bytes, 1 << 16))):
      max_bytes -= len(chunk)
  except OSError:  # the deadline (TimeoutError) or a reset
    pass


# What each path takes (a 405's Allow header); other paths are a 404.
_ALLOW = {"/health": "GET, HEAD", "/trace": "POST"}


def _handler(service: Service) -> type[http.server.BaseHTTPRequestHandler]:

  class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "tracer"
    protocol_version = "HTTP/1.1"  # keep-alive: a client's next request skips the handshake
    # A request (its line, headers and body, from the first byte awaited:
    # an idle keep-alive too) must arrive within this many seconds, else
    # the connection closes: each holds a thread, and a read's own timeout
    # alone let a client sending a byte now and then hold one for ever.
    timeout = 120

    def setup(self):
      super().setup()
      self.rfile.close()  # the socket's plain reader, replaced (the socket stays)
      self._reads = _ReadsBy(self.connection)
      self.rfile = io.BufferedReader(self._reads)

    def handle_one_request(self):
      self._reads.deadline = time.monotonic() + self.timeout
      self.headers = None  # (a keep-alive's last request's, else)
      try:
        super().handle_one_request()
      finally:
        self._read_all()

    def _read_all(self) -> None:
      """The request is read: the answer's writes get the plain timeout."""
      if self._reads.deadline is not None:
        self._reads.deadline = None
        self.connection.settimeout(self.timeout)

    def parse_request(self) -> bool:
      if not super().parse_request():
        return False
      if self.request_version == "HTTP/0.9":  # "GET /path": no version
        # (http.server answers it HTTP/0.9 style: a body, no status line.)
        self.send_error(400, f"request line {self.requestline[:80]!r} has no "
                        "HTTP version")
        return False
      return True

    def send_error(self, code, message=None, explain=None):
      # http.server's own refusals (a bad request line, 414, 431, an
      # unknown method's 501) in JSON like every other answer, not its HTML
      # page; before a request line is read whole its version is unknown
      # (HTTP/0.9 by default: no status line at all), so the answer is 1.1.
      if not str(self.request_version).startswith("HTTP/1."):
        self.request_version = self.protocol_version
      what = message or self.responses.get(code, ("error",))[0]
      if explain and code == 431:
        what = f"{what} ({explain})"
      expected = {
          414: "expected a request line of at most 65,536 bytes",
          431: "expected at most 100 header lines of at most 65,536 bytes",
          501: "expected GET /health or POST /trace",
          505: "expected HTTP/1.1 or HTTP/1.0",
      }.get(code, "expected a request line 'METHOD /path HTTP/1.1'")
      self.log_error("code %d, message %s", code, what)
      self._error(code, f"{what}; {expected}", close=True)

    def handle_expect_100(self) -> bool:
      # Refused before the client sends the body, not after.
      refused = self._body_refused() if self.command == "POST" else None
      if refused is not None:
        self._error(*refused, close=True)
        return False
      return super().handle_expect_100()

    def _send(self, status: int, obj: Any, close: bool = False) -> None:
      """Answers ``obj`` as JSON; ``close``: then closes the connection,
      the request's body (if any) unread."""
      body = json.dumps(obj).encode()
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(body)))
      if status == 405:  # (RFC 9110 15.5.6: it must say what the path takes)
        self.send_header("Allow", _ALLOW[self._path()])
      if close:
        self.send_header("Connection", "close")
        self.close_connection = True
      self.end_headers()
      if self.command != "HEAD":  # (its Content-Length: what GET would get)
        self.wfile.write(body)
      if close:
        _linger(self.connection, self._reads, self.rfile.read1,
                self._unread(), self.server.DRAIN_S)

    def _unread(self) -> int:
      """How much of the request the client may still send, at most
      ``DRAIN_BYTES``: its Content-Length, that cap when its framing is
      unknown (no headers read, several lengths, a Transfer-Encoding)."""
      cap = self.server.DRAIN_BYTES
      if self.headers is None or self.headers.get("Transfer-Encoding"):
        return cap
      try:
        return min(self._content_length() or 0, cap)
      except RequestError:
        return cap

    def _content_length(self) -> int | None:
      """The request's Content-Length (None without one); RequestError for
      several, or one that is not a byte count."""
      lengths = self.headers.get_all("Content-Length", [])
      if not lengths:
        return None
      if len(lengths) > 1:
        # (RFC 9112 6.3: a 400, then close; the second would frame the rest
        # as a request smuggled past whatever read the first. Even equal
        # ones are refused: no client sends two.)
        raise RequestError(
            f"Content-Length given {len(lengths)} times "
            f"({', '.join(repr(v[:40]) for v in lengths[:4])}); expected one")
      length = lengths[0].strip(" \t")  # (its whitespace: RFC 9110 5.5)
      # int() takes "²" too, and refuses 4,300 digits or more
      if not (length.isascii() and length.isdigit() and len(length) <= 18):
        raise RequestError(f"Content-Length {lengths[0][:40]!r} is not a "
                           "byte count; expected ASCII digits")
      return int(length)

    def _error(self, status: int, message: str, **kwargs) -> None:
      self._send(status, {"error": message}, **kwargs)

    def _path(self) -> str:
      try:
        return urllib.parse.urlsplit(self.path).path
      except ValueError:  # "http://[": no path of ours, answered as unknown (404)
        return self.path

    def _bad_framing(self) -> bool:
      """Answers 400 and closes where the request's Content-Length is
      repeated or not a byte count (RFC 9112 6.3: its framing is unknown,
      whatever the method); False where it is fine."""
      try:
        self._content_length()
      except RequestError as e:
        self._read_all()
        self._error(e.status, str(e), close=True)
        return True
      return False

    def do_GET(self):  # noqa: N802 (http.server's name)
      if self._bad_framing():
        return
      self._read_all()
      # A body (unread: GET takes none) would be read as the next request.
      close = self._unread() > 0
      if self._path() == "/health":
        self._send(200, {"status": "ok", **service.info}, close=close)
      elif self._path() == "/trace":
        self._error(405, f"{self.command} '/trace': /trace takes POST",
                    close=close)
      else:
        self._error(404, f"no such path {self._path()!r}; expected GET /health "
                    "or POST /trace", close=close)

    do_HEAD = do_GET  # noqa: N815 (_send leaves out the body)

    def _other_method(self):
      if self._bad_framing():
        return
      self._read_all()
      self._error(405 if self._path() in _ALLOW else 404,
                  f"{self.command} {self._path()!r}: expected GET /health "
                  "or POST /trace", close=True)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _other_method  # noqa: N815

    def do_POST(self):  # noqa: N802
      refused = self._body_refused()
      if refused is not None:
        self._read_all()
        self._error(*refused, close=True)
        return
      size = self._content_length()
      if not service.take_body(size):
        self._read_all()
        self._error(503, f"the server holds {service.limits.max_bodies_bytes:,} "
                    "bytes of requests at most, and those it is answering "
                    f"leave too few for {size:,}; try again", close=True)
        return
      try:
        status, reply = self._answer(size)
      finally:
        # Given back before the reply is sent: a client that has its answer
        # finds the bytes free for its next request.
        service.give_body(size)
      if status == 200:
        self._send(200, reply)
      else:
        self._error(status, reply)

    def _answer(self, size: int) -> tuple[int, Any]:
      """Reads a POST /trace body of ``size`` bytes and answers it: (200, the
      reply's JSON object) or (an error status, its message)."""
      # Within the request's deadline (TimeoutError: http.server closes).
      body = self.rfile.read(size)
      if len(body) < size:
        raise TimeoutError("connection closed mid-body")
      self._read_all()
      try:
        request = parse_request(body, service.limits)
        service.check(request)
      except RequestError as e:
        return e.status, str(e)
      except InputError as e:  # this request's: a query that does not fit
        return 400, str(e)
      except Exception as e:  # pylint: disable=broad-except
        return 500, f"internal error: {type(e).__name__}: {e}"
      try:
        answer, info = service.batcher.submit(request)
      except RequestError as e:  # the server is stopping
        return e.status, str(e)
      except Exception as e:  # pylint: disable=broad-except
        # The batch failed, not this request (a damaged store chunk is an
        # InputError too, but not the client's): every request in it gets a
        # 500; the server's log has the traceback (Batcher._serve), and the
        # message names no server path.
        return 500, (f"internal error: the batch this request was in failed "
                     f"({type(e).__name__}); the server's log says why")
      if answer.error is not None:
        return 422, str(answer.error)
      return 200, {"results": answer.records, "batch": info}

    def _body_refused(self) -> tuple[int, str] | None:
      """(status, message) when the request's path or Content-Length is not
      one to read a body for (the connection then closes: an unread body
      cannot be skipped safely); None when it is."""
      if self._path() != "/trace":
        return (405 if self._path() == "/health" else 404,
                f"POST {self._path()!r}: expected POST /trace")
      if self.headers.get("Transfer-Encoding") is not None:
        # (RFC 9112 6.3: read by it or refused; read by Content-Length, the
        # chunks' framing was parsed as the body.)
        return 501, ("Transfer-Encoding is not supported; send the body with "
                     "a Content-Length")
      try:
        length = self._content_length()
      except RequestError as e:
        return e.status, str(e)
      if length is None:
        return 411, "Content-Length required"
      if length > service.limits.max_body_bytes:
        return 413, (f"body of {length:,} bytes, more than the "
                     f"{service.limits.max_body_bytes:,} this server takes")
      return None

    def log_message(self, format, *args):  # pylint: disable=redefined-builtin
      if service.log:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")

  return Handler


class _HTTPServer(http.server.ThreadingHTTPServer):
  """A thread per connection, at most ``max_connections`` at once: one past
  them gets a 503 and is closed (each open connection holds a thread, and
  a stalled one holds it for the handler's ``timeout``)."""
  daemon_threads = True
  # listen()'s backlog: the default 5 resets clients that connect together.
  request_queue_size = 1024

  # A refused request (a connection past the limit, or a request answered
  # with a 4xx/5xx before its body was read: a 413, the bodies' 503) is
  # read and dropped for up to this long and this many bytes, so that its
  # client, which sends the request before it reads, gets the answer: a
  # socket closed with unread bytes sends a reset instead (a client sending
  # an 800 KB body saw "Broken pipe" 10 times in 10; a 20 MB one, for the
  # 413, 5 in 5). At most DRAINERS threads drain refused connections; a
  # handler drains on its own connection's thread.
  DRAIN_S = 2.0
  DRAIN_BYTES = 64 << 20  # 4x the default --max_body_mb
  DRAINERS = 16

  def __init__(self, address, handler, max_connections: int):
    self.address_family = address_family(address[0])
    super().__init__(address, handler)
    self._slots = threading.BoundedSemaphore(max_connections)
    self._drainers = threading.BoundedSemaphore(self.DRAINERS)

  def process_request(self, request, client_address):
    if not self._slots.acquire(blocking=False):
      body = json.dumps({"error": "too many connections; try again"}).encode()
      try:
        request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                        b"application/json\r\nConnection: close\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
      except OSError:
        self.shutdown_request(request)
        return
      if not self._drainers.acquire(blocking=False):
        self.shutdown_request(request)
        return
      threading.Thread(target=self._drain, args=(request,), daemon=True,
                       name="tracer-refused").start()
      return
    super().process_request(request, client_address)

  def _drain(self, request) -> None:
    """Reads a refused connection's request (``_linger``), then closes it."""
    try:
      reads = _ReadsBy(request)
      _linger(request, reads, reads.read, self.DRAIN_BYTES, self.DRAIN_S)
    finally:
      self._drainers.release()
      self.close_request(request)

  def process_request_thread(self, request, client_address):
    try:
      super().process_request_thread(request, client_address)
    finally:
      self._slots.release()

  def handle_error(self, request, client_address):
    # A client that hung up before its answer was written is not the
    # server's error (socketserver prints a traceback for each).
    if not isinstance(sys.exc_info()[1], ConnectionError):
      super().handle_error(request, client_address)


def address_family(host: str) -> socket.AddressFamily:
  """IPv6 for an IPv6 address (``::1``, ``::``), else IPv4 (an IPv4 address
  or a host name)."""
  return socket.AF_INET6 if ":" in host else socket.AF_INET


def url_host(host: str) -> str:
  """``host`` as a URL writes it: an IPv6 address in brackets."""
  return f"[{host}]" if ":" in host else host


def make_server(service: Service, host: str = "127.0.0.1", port: int = 0,
                max_connections: int = 256) -> http.server.ThreadingHTTPServer:
  """The HTTP server (not started: call ``serve_forever``); port 0 picks a
  free one (``server.server_address``)."""
  return _HTTPServer((host, port), _handler(service), max_connections)


# --- clients ----------------------------------------------------------------------

# A client's cap on one answer: 64 queries of 1,000 proponents and opponents
# with their texts are tens of MB; past this a wrong URL (a file server, a
# stream) is more likely than a trace.
MAX_RESPONSE_BYTES = 1 << 30


def _call(url: str, body: dict | None = None, timeout: float = 600,
          max_bytes: int = MAX_RESPONSE_BYTES) -> dict:
  """GET (``body`` None) or POST ``url``: the JSON object answered.

  ``timeout`` bounds the whole exchange, not each read: a server that
  trickles its answer is cut off at the deadline too. InputError naming
  ``url`` on no connection, no answer in time, an HTTP error (with the
  server's ``error`` field where it gives one), an answer over
  ``max_bytes``, or one that is not a JSON object.
  """
  try:
    parts = urllib.parse.urlsplit(url)
    hostname = parts.hostname
  except ValueError as e:  # brackets unclosed, or around an IPv4 address
    raise InputError(f"{url}: {e}; expected http://HOST:PORT") from None
  if parts.scheme not in ("http", "https") or not hostname:
    raise InputError(f"{url}: expected an http:// or https:// URL")
  connection_type = (http.client.HTTPSConnection if parts.scheme == "https"
                     else http.client.HTTPConnection)
  try:
    conn = connection_type(hostname, parts.port, timeout=timeout)
  except ValueError as e:  # a port that is not a number
    raise InputError(f"{url}: {e}; expected http://HOST:PORT") from None
  expired, sockets = threading.Event(), []
  late = f"{url}: no answer within {timeout:g} s"

  def expire():
    expired.set()
    # (Not conn.sock: the connection lets go of it once an HTTP/1.0 answer
    # begins.) The shutdown wakes a read blocked on a silent server; Linux
    # still takes in what a trickling one sends after it, so each next read
    # gets a millisecond.
    for sock in sockets:
      try:
        sock.settimeout(1e-3)
        sock.shutdown(socket.SHUT_RDWR)
      except OSError:
        pass

  deadline = threading.Timer(timeout, expire)
  deadline.daemon = True
  deadline.start()
  try:
    try:
      conn.connect()
      sockets.append(conn.sock)
      if expired.is_set():  # connected after the deadline
        raise TimeoutError
    except OSError as e:
      if expired.is_set() or isinstance(e, TimeoutError):
        raise InputError(late) from None
      raise InputError(f"{url}: cannot reach the server "
                       f"({e.strerror or e})") from None
    try:
      data = None if body is None else json.dumps(body).encode()
      target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
      conn.request("GET" if data is None else "POST", target, body=data,
                   headers={"Content-Type": "application/json"})
      response = conn.getresponse()
      raw = _read_answer(url, response, max_bytes, expired)
    except (http.client.HTTPException, OSError) as e:
      if expired.is_set() or isinstance(e, TimeoutError):
        raise InputError(late) from None
      raise InputError(f"{url}: the server closed the connection without an "
                       f"answer ({type(e).__name__}: {e})") from None
    if expired.is_set():  # the read ended at the shutdown, short
      raise InputError(late)
  finally:
    deadline.cancel()
    conn.close()
  try:
    answer = json.loads(raw)
  except ValueError:
    answer = None
  if response.status != 200:
    message = answer.get("error") if isinstance(answer, dict) else None
    raise InputError(f"{url}: HTTP {response.status}: "
                     f"{message or response.reason}")
  if not isinstance(answer, dict):
    what = ("not JSON" if answer is None and raw.strip() != b"null"
            else f"JSON {type(answer).__name__}")
    raise InputError(
        f"{url}: the answer is {what} ({response.getheader('Content-Type')}, "
        f"starting {raw[:60]!r}); expected the JSON object `tracer serve` "
        "answers: is the URL a tracer server?")
  return answer


def _read_answer(url: str, response: http.client.HTTPResponse,
                 max_bytes: int, expired: threading.Event) -> bytes:
  """The body, refused past ``max_bytes`` (by its Content-Length or as
  read); cut short once ``expired`` is set."""
  too_big = (f"{url}: the answer is over {max_bytes:,} bytes; expected a "
             "tracer server's answer (fewer queries or a smaller top_k per "
             "request, or a larger max_bytes)")
  if (response.length or 0) > max_bytes:
    raise InputError(too_big)
  chunks, size = [], 0
  while not expired.is_set() and (chunk := response.read(1 << 16)):
    size += len(chunk)
    if size > max_bytes:
      raise InputError(too_big)
    chunks.append(chunk)
  return b"".join(chunks)


def _positive_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


def endpoint(server: str, name: str) -> str:
  """``server``'s URL with ``/name`` added to its path. A query or fragment
  is refused: the name went after it, so ``?token=a`` asked for ``/`` with
  the query ``token=a/health``."""
  try:
    parts = urllib.parse.urlsplit(server)
  except ValueError as e:
    raise InputError(f"{server}: {e}; expected http://HOST:PORT") from None
  if parts.query or parts.fragment:
    raise InputError(f"{server}: a server URL with a query or fragment; "
                     "expected http://HOST:PORT or http://HOST:PORT/PATH")
  return urllib.parse.urlunsplit(parts._replace(
      path=parts.path.rstrip("/") + "/" + name))


def health(server: str, timeout: float = 60) -> dict:
  """``GET server/health``: InputError unless it names a positive
  ``max_queries`` (what ``trace_all`` splits by)."""
  url = endpoint(server, "health")
  info = _call(url, timeout=timeout)
  if not _positive_int(info.get("max_queries")):
    got = (f"is {info['max_queries']!r}" if "max_queries" in info
           else "is missing")
    raise InputError(f"{url}: field 'max_queries' {got}; expected a positive "
                     "integer, as `tracer serve` answers")
  return info


def trace(server: str, queries: Sequence[dict], top_k: int | None = None,
          timeout: float = 600, task_r: bool | None = None) -> dict:
  """``POST server/trace``: the response (``results``: one record, a JSON
  object, per query, in order; InputError otherwise). ``task_r``: the
  request's field (``Request``); None leaves it out."""
  body = {"queries": list(queries)}
  if top_k is not None:
    body["top_k"] = top_k
  if task_r is not None:
    body["task_r"] = task_r
  url = endpoint(server, "trace")
  answer = _call(url, body, timeout)
  results = answer.get("results")
  if not (isinstance(results, list) and len(results) == len(queries)
          and all(isinstance(r, dict) for r in results)):
    got = ("is missing" if "results" not in answer
           else f"is a list of {len(results)}" if isinstance(results, list)
           else f"is {repr(results)[:60]}")
    raise InputError(f"{url}: field 'results' {got}; expected a list of "
                     f"{len(queries)} JSON objects, one record per query")
  return answer


def trace_all(server: str, queries: Sequence[dict], top_k: int | None = None
              ) -> list[dict]:
  """Records for any number of queries: one request, or requests of the
  server's ``max_queries`` each under the task R it holds (each request's
  own R would be fitted from its part alone: not ``tracer trace``'s
  answer); InputError when it holds none."""
  info = health(server)
  size, task_r = info["max_queries"], None  # checked by health
  if len(queries) > size:
    if not info.get("task_queries"):
      raise InputError(
          f"{server}: {len(queries)} queries, more than the {size} it takes in "
          "one request, and it holds no task R: each request would get an R "
          "fitted from its part alone; expected a server started with "
          f"--max_batch_queries={len(queries)} or more, or --task_queries")
    task_r = True
  return [record for lo in range(0, len(queries), size)
          for record in trace(server, queries[lo:lo + size], top_k,
                              task_r=task_r)["results"]]
