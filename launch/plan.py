r"""Prints a capacity plan for encoding and scanning a whole pretraining corpus.

  tracer plan --params=8e9 --tokens=160e9 --seq_len=2048 \
      --projection_dim=65536 --chips=256 --chip=v5p

Arithmetic only, nothing run on a device: rows and store size, encode
FLOPs and chip-hours, scan time for a query set (compute, HBM and host-read bounds; the query
set's own R applied at scan time; the passes over the store many queries
take, or their split over the chips; ``--host_memory`` bounds the pooled
reads of a store in object storage) and host memory per host while
encoding.
``--checkpoints=S`` plans TrackStar summed over S checkpoints (``tracer trace
--sum_steps``): S encodes, S stores, S times the scan. Chip figures come from
`CHIPS`, each with its source; the model FLOPs utilization, the host read
bandwidth and, off the H200, the encode/train-step time ratio are
assumptions and printed as such. The module imports without jax; a plan
imports tracer.scan and tracer.pipeline for the sizes they plan with (their
constants and step rules, so the plan cannot drift from them), which load
jax, though it runs nothing on it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

from absl import app
from absl import flags

from tracer.launch import cli

FLAGS = flags.FLAGS

_H200_RATIO = 1.33
_RATIO_MEASURED = ("measured here: H200, 27.4M-param model, d = 3,656 "
                   "(WORKSPACE.md)")
_RATIO_NOT_MEASURED = "not measured on TPU; H200 figure used"

GB = 10**9
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator's published rates and this repo's encode/train ratio."""
  name: str
  peak_flops: float        # dense bf16 FLOP/s per chip
  hbm_bytes: float         # HBM per chip, bytes
  hbm_bandwidth: float     # HBM bytes/s per chip
  chips_per_host: int      # chips per host (one JAX process each)
  source: str              # where the four figures above come from
  encode_train_ratio: float  # encode time / train-step time, same batch
  ratio_source: str


CHIPS = (
    Chip("v4", 275e12, 32 * GIB, 1200 * GB, 4,
         "Google Cloud TPU v4 spec (cloud.google.com/tpu/docs/v4): 275 TFLOP/s "
         "bf16, 32 GiB HBM2, 1,200 GBps; 4 chips per TPU VM host",
         _H200_RATIO, _RATIO_NOT_MEASURED),
    Chip("v5e", 197e12, 16 * GB, 819 * GB, 4,
         "Google Cloud TPU v5e spec (cloud.google.com/tpu/docs/v5e): 197 "
         "TFLOP/s bf16, 16 GB HBM2, 819 GBps; 8 chips per physical host, "
         "VMs of 1, 4 or 8 chips: 4 taken here (assumed: multi-host slices "
         "use 4-chip VMs, as v6e's page states for v6e)",
         _H200_RATIO, _RATIO_NOT_MEASURED),
    Chip("v5p", 459e12, 95 * GB, 2765 * GB, 4,
         "Google Cloud TPU v5p spec (cloud.google.com/tpu/docs/v5p): 459 "
         "TFLOP/s bf16, 95 GB HBM2e, 2,765 GBps; 4 chips per host (2x2x1 = "
         "1 host)",
         _H200_RATIO, _RATIO_NOT_MEASURED),
    Chip("v6e", 918e12, 32 * GB, 1640 * GB, 4,
         "Google Cloud TPU v6e spec (cloud.google.com/tpu/docs/v6e): 918 "
         "TFLOP/s bf16, 32 GB HBM, 1,640 GBps (a later revision says 1,638); "
         "8 chips per physical host, but multi-host slices run 4-chip VMs "
         "(16x16 = 64 ct6e-standard-4t VMs): 4 taken here",
         _H200_RATIO, _RATIO_NOT_MEASURED),
    Chip("a100", 312e12, 80 * GB, 2039 * GB, 8,
         "NVIDIA A100 80GB SXM datasheet: 312 TFLOP/s dense bf16, 80 GB "
         "HBM2e, 2,039 GB/s; 8 GPUs per HGX/DGX host",
         _H200_RATIO, _RATIO_MEASURED),
    Chip("h100", 989e12, 80 * GB, 3350 * GB, 8,
         "NVIDIA H100 SXM datasheet: 1,979 TFLOP/s bf16 with 2:4 sparsity, "
         "i.e. 989 dense; 80 GB HBM3, 3.35 TB/s; 8 GPUs per HGX/DGX host",
         _H200_RATIO, _RATIO_MEASURED),
    Chip("h200", 989e12, 141 * GB, 4800 * GB, 8,
         "NVIDIA H200 SXM datasheet: 1,979 TFLOP/s bf16 with 2:4 sparsity, "
         "i.e. 989 dense; 141 GB HBM3e, 4.8 TB/s; 8 GPUs per HGX/DGX host",
         _H200_RATIO, _RATIO_MEASURED),
)

ITEMSIZE = {"bfloat16": 2, "float32": 4, "int8": 1}
# Bytes a row stores besides its d values: an int8 row's f32 scale.
ROW_EXTRA_BYTES = {"int8": 4}
# bf16 matmul passes per useful product in the scan on a TPU or GPU (exact
# fp32 scores, ``topk.exact_scores``): bf16 and int8 rows against the fp32
# queries (and R's low-rank columns) split into three bf16 terms; f32 rows
# at HIGHEST precision, six on a TPU (a GPU runs them on its fp32 cores,
# slower still).
MATMUL_PASSES = {"bfloat16": 3, "int8": 3, "float32": 6}


def find_chip(name: str) -> Chip:
  """The `CHIPS` row called ``name`` (case-insensitive); ValueError if none."""
  for chip in CHIPS:
    if chip.name == name.strip().lower():
      return chip
  raise ValueError(f"unknown chip {name!r}; known chips: "
                   + ", ".join(c.name for c in CHIPS))


def run_bytes(queries: int, d: int, itemsize: int, k: int,
              split: bool, parts: int = 1, piece: int | None = None,
              multiple: int = 1, hbm_bytes: float | None = None,
              mapped: bool = False, chip_rows: int | None = None) -> int:
  """A chip's bytes for one streamed scan step with ``queries`` queries on
  it (the whole set, or a block when ``split``), as ``tracer.scan`` sizes
  the step: rows of ``scan.ACCELERATOR_CHUNK_BYTES``, fewer where the
  scores (``PAIR_BYTES`` a row and query) would pass ``SCORE_STEPS`` times
  that; the queries in f32 and their top-k (16 B a query and k: scores
  and rows, both sides), twice over when split (a block arrives while one
  is scored). ``parts``: a summed scan's stores (``scan.scan_stores``, one
  per checkpoint), whose rows share a step's bytes, each with its own
  queries, one top-k. ``piece``: a step read from object storage is
  staged in pieces of at most that many rows a chip (``staged_rows``);
  ``multiple``: its rows are whole store chunks of that many;
  ``hbm_bytes``: a chip's memory, ``mapped``: a local store's chunks,
  ``chip_rows``: the corpus's rows a chip (``step_rows``). An estimate: at run time
  XLA's count of the step decides."""
  from tracer import scan  # pylint: disable=g-import-not-at-top
  rows = step_rows(queries, d, itemsize, parts, piece, multiple, hbm_bytes,
                   mapped, chip_rows)
  held = queries * (4 * d * parts + 16 * k) * (2 if split else 1)
  return (parts * rows * d * itemsize + rows * queries * scan.PAIR_BYTES
          + held)


def step_rows(queries: int, d: int, itemsize: int, parts: int = 1,
              piece: int | None = None, multiple: int = 1,
              hbm_bytes: float | None = None, mapped: bool = False,
              chip_rows: int | None = None) -> int:
  """A chip's rows of each store in a streamed scan step with ``queries``
  queries on it (``run_bytes``), in whole ``multiple``s (store chunks) as
  the scan takes them: its bytes' rows rounded up
  (``scan.default_chunk_rows``); on a chip of ``hbm_bytes``, the rows of
  the other steps it holds (``other_steps``) within the half a run
  leaves, rounded down; a local store's
  (``mapped``) at most ``MAX_PIECES`` chunks, mapped in place; the scores'
  cap down, at least one (``scan.query_capped_step``); no more than the
  corpus's ``chip_rows`` a chip, in whole chunks; staged in pieces of
  at most ``piece`` rows (``scan.staged_pieces``: whole pieces, at most
  ``MAX_PIECES``)."""
  from tracer import scan  # pylint: disable=g-import-not-at-top
  step = scan.ACCELERATOR_CHUNK_BYTES
  rows = -(-max(1, step // (d * itemsize * parts)) // multiple) * multiple
  if hbm_bytes is not None:  # (as scan._scan caps it)
    have = int(hbm_bytes)
    fits = (have - have // scan.QUERY_MEMORY_FRACTION) // (
        other_steps(d, itemsize, parts, multiple, hbm_bytes) * d * itemsize
        * parts)
    rows = min(rows, max(multiple, fits // multiple * multiple))
  if mapped:
    rows = min(rows, scan.MAX_PIECES * multiple)
  fits = scan.SCORE_STEPS * step // (scan.PAIR_BYTES * queries)
  rows = min(rows, max(multiple, fits // multiple * multiple))
  if chip_rows is not None:  # (no step longer than the corpus, as _scan's)
    rows = min(rows, -(-max(1, chip_rows) // multiple) * multiple)
  if piece is not None:
    rows, count = scan.staged_pieces(rows, piece, multiple)
    rows *= count
  return max(1, rows)


def other_steps(d: int, itemsize: int, parts: int, multiple: int,
                hbm_bytes: float) -> int:
  """Steps a chip holds beside the one it scores (``scan.device_steps``
  less one) at the default prefetch of 2, fewer where even a chunk
  (``multiple`` rows of each of the ``parts`` stores) in each passes the
  half of ``hbm_bytes`` a run leaves (``scan.held_prefetch``)."""
  from tracer import scan  # pylint: disable=g-import-not-at-top
  have = int(hbm_bytes)
  prefetch = scan.held_prefetch(2, multiple * d * itemsize * parts,
                                have - have // scan.QUERY_MEMORY_FRACTION)
  return scan.device_steps(prefetch) - 1


def pool_bytes(host_memory: float | None = None) -> int:
  """Bytes a scan's pooled read buffers take on a host of ``host_memory``
  bytes (``scan.host_buffer_bytes``); None: a host of at least
  ``HOST_BUFFER_FRACTION`` times ``HOST_BUFFER_BYTES`` (32 GiB), whose
  pool is all of ``HOST_BUFFER_BYTES``."""
  from tracer import scan  # pylint: disable=g-import-not-at-top
  if host_memory is None:
    host_memory = scan.HOST_BUFFER_FRACTION * scan.HOST_BUFFER_BYTES
  return scan.host_buffer_bytes(int(host_memory))


@dataclasses.dataclass(frozen=True)
class StagedPool:
  """A host's pooled buffers reading object storage onto chips of their
  own memory (``staged_pool``): ``piece_rows`` a chip a piece, ``sets``
  pieces in flight (a buffer a chip each), ``bytes`` the most those
  buffers take (a step's pieces may be shorter: ``plan``'s
  ``host_pool_bytes``), within ``allowed`` (``pool_bytes``) but at the
  floor: two sets of a chunk a chip, however little the host."""
  piece_rows: int
  sets: int
  bytes: int
  allowed: int

  @property
  def floor(self) -> bool:
    return self.bytes > self.allowed


def staged_pool(d: int, itemsize: int, chips_per_host: int, chunk_rows: int,
                host_memory: float | None = None) -> StagedPool:
  """The pool ``scan_store`` takes reading object storage, as ``scan._scan``
  plans it: each chip's share of ``pool_bytes(host_memory)`` holds
  ``REMOTE_READ_AHEAD`` pieces read ahead and two more
  (``scan.staged_sets``), fewer read ahead where that many of a chunk a
  chip would not fit (``scan.staged_read_ahead``: down to two, the floor,
  which the scan keeps past the share); a piece is the whole chunks a
  chip's share of a set holds, at least one (``scan.buffered_step``),
  whatever the stores summed (each store's pieces are read in turn)."""
  from tracer import scan  # pylint: disable=g-import-not-at-top
  allowed, row = pool_bytes(host_memory), d * itemsize
  share = allowed // chips_per_host  # (a chip's, as scan.agreed_memory)
  sets = scan.staged_sets(scan.staged_read_ahead(
      scan.REMOTE_READ_AHEAD, chunk_rows * row, share))
  rows = max(chunk_rows, share // (sets * row) // chunk_rows * chunk_rows)
  return StagedPool(rows, sets, sets * chips_per_host * rows * row, allowed)


def staged_rows(d: int, itemsize: int, chips_per_host: int, chunk_rows: int,
                host_memory: float | None = None) -> int:
  """A chip's rows of a piece of a step read from object storage: a step
  is staged through a host's pooled buffers a piece at a time
  (``staged_pool``). The pool bounds a piece, not the step (since stop
  75). A local store's chunks are mapped in place instead."""
  return staged_pool(d, itemsize, chips_per_host, chunk_rows,
                     host_memory).piece_rows


def query_passes(queries: int, d: int, itemsize: int, k: int, chips: int,
                 hbm_bytes: float, parts: int = 1,
                 piece: int | None = None, multiple: int = 1,
                 mapped: bool = False, chip_rows: int | None = None) -> dict:
  """How a streamed scan takes ``queries`` queries on ``chips`` chips of
  ``hbm_bytes``, as ``tracer.scan``'s default plans it (``_scan``, with
  ``run_bytes`` for XLA's count of a step): runs of whole queries on every
  chip (``scan.query_batch``: all of them where their step fits 1 /
  ``QUERY_MEMORY_FRACTION`` of a chip, else the fewest equal runs that do;
  where even one query's step passes that, all of a chip); where that
  takes several, split over the chips (``topk.ring_queries``: blocks of
  ``RING_BLOCK_QUERIES`` a chip) if that takes fewer runs and its step fits
  the chip. Each run is a pass over the store and scans ``per_run``
  queries (padding included); ``step_bytes``: a chip's bytes for its step,
  ``limit_bytes``: the bound the runs were held to (half a chip, or all of
  it). ``parts``, ``piece``, ``multiple``, ``mapped``, ``chip_rows``: as in
  ``run_bytes``. None where not even
  one query's step fits a chip."""
  from tracer import scan, topk  # pylint: disable=g-import-not-at-top
  have = int(hbm_bytes)
  unit = topk.RING_BLOCK_QUERIES * chips

  def padded(n: int, split: bool) -> int:  # (as topk.ring_queries pads them)
    return -(-n // unit) * unit if split else n

  def step_bytes(n: int, split: bool) -> int:
    n = padded(n, split)  # (a chip holds a block of them when split)
    return run_bytes(n // chips if split else n, d, itemsize, k, split, parts,
                     piece, multiple, have, mapped, chip_rows)

  def run_queries(split: bool) -> int:  # (as _scan's)
    batch = scan.query_batch(queries, lambda n: step_bytes(n, split), have)
    return min(queries, padded(batch, split))

  split, batch = False, run_queries(False)
  whole_runs = -(-queries // batch)
  if batch < queries and chips > 1:
    ring_batch = run_queries(True)
    if (-(-queries // ring_batch) < whole_runs
        and step_bytes(ring_batch, True) <= have):
      split, batch = True, ring_batch
  need = step_bytes(batch, split)
  if need > have:
    return None
  per_run = padded(batch, split)
  half = have // scan.QUERY_MEMORY_FRACTION
  return dict(passes=-(-queries // batch), split=split, per_run=per_run,
              whole_runs=whole_runs, block=per_run // chips if split else None,
              whole_bytes=queries * (4 * d * parts + 16 * k),
              split_bytes=2 * (per_run // chips) * (4 * d * parts + 16 * k)
              if split else None, step_bytes=need,
              limit_bytes=have if need > half else half)


def _finite(plan_fn):
  """``plan_fn`` (``plan``), whose figures overflow a float for some finite
  inputs (tokens=1e300, mfu=1e-320: an OverflowError traceback, or inf in
  the report), raising ValueError instead, naming the input furthest from 1
  in orders of magnitude: the one that took the figures past a float."""
  signature = inspect.signature(plan_fn)

  @functools.wraps(plan_fn)
  def checked(*args, **kwargs) -> dict:
    try:
      p = plan_fn(*args, **kwargs)
      figure = next((f"{key} is {value}" for key, value in p.items()
                     if isinstance(value, float) and not math.isfinite(value)),
                    None)
    except OverflowError:
      p, figure = None, "one is past the largest float"
    if figure is None:
      return p
    inputs = {name: value for name, value in
              signature.bind(*args, **kwargs).arguments.items()
              if isinstance(value, (int, float)) and not isinstance(value, bool)
              and value > 0}
    # (math.log10 takes an int past the largest float too)
    name = max(inputs, key=lambda n: abs(math.log10(inputs[n])))
    value = inputs[name]
    shown = f"{value:g}" if isinstance(value, float) else f"{value:,}"
    raise ValueError(f"{name} makes the plan's figures too large to compute "
                     f"({figure}), got {shown}; expected a "
                     f"{'larger' if value < 1 else 'smaller'} value")

  return checked


def _hosts(chips: int, spec: Chip, hosts: int | None) -> int:
  """``hosts``, or by default the ``spec`` chip's hosts for ``chips``;
  ValueError unless each host drives as many chips. A default that does
  not divide is worded around the chips and the chip's hosts, as the user
  gave no host count."""
  divisors = [h for h in range(1, chips + 1) if chips % h == 0]
  shown = (", ".join(map(str, divisors[:12]))
           + (", ..." if len(divisors) > 12 else ""))
  if hosts is None:
    per_host = spec.chips_per_host
    default = max(1, -(-chips // per_host))
    if chips % default:
      raise ValueError(
          f"chips: {chips} {spec.name} chips do not split evenly over hosts "
          f"of at most {per_host} (the {spec.name}'s chips per host: "
          f"ceil({chips} / {per_host}) = {default} hosts by default); expected "
          f"--chips that do (a multiple of {per_host} does), or --hosts set "
          f"to one of {shown}")
    return default
  if not 1 <= hosts <= chips:
    raise ValueError(f"hosts must be between 1 and the {chips} chips (a host "
                     f"drives at least one), got {hosts}")
  if chips % hosts:
    raise ValueError(f"hosts must divide the {chips} chips (each host drives as "
                     f"many), got {hosts}; expected one of {shown}")
  return hosts


@_finite
def plan(params: float, tokens: float, seq_len: int, projection_dim: int,
         chips: int, chip: str, store_dtype: str = "bfloat16",
         queries: int = 64, mfu: float = 0.4,
         encode_train_ratio: float | None = None, hosts: int | None = None,
         chunk_rows: int = 512, batch_per_host: int = 64,
         host_read_gbps: float = 1.0, r_block_dim: int = 1024,
         checkpoints: int = 1, vocab_size: int = 256_000,
         text_bytes_per_token: float = 4.0, top_k: int = 10,
         local_store: bool = False,
         host_memory: float | None = None) -> dict:
  """The capacity plan as a dict; units in the keys' suffixes (_bytes, _flops,
  _s, _hours).

  ``params`` and ``tokens`` are counts, ``host_read_gbps`` GB/s (10^9 bytes/s)
  per host; ``encode_train_ratio`` and ``hosts`` default to the chip's row.
  ``checkpoints``: S, the checkpoints TrackStar is summed over.
  ``vocab_size`` and ``text_bytes_per_token`` size the tokenized corpus.
  ``queries`` and ``top_k``: the query set a scan takes, and its proponents
  per query (``query_passes``: the passes over the store it takes); a
  ``top_k`` past the corpus's rows is cut to them, as ``scan._scan`` cuts k
  (``top_k_asked`` keeps the one given).
  ``local_store``: the store on each host's disk (its chunks mapped) rather
  than object storage (staged through pooled host buffers: ``staged_rows``).
  ``host_memory``: a host's bytes, which bound that pool (``pool_bytes``;
  None: at least 32 GiB, a pool of ``scan.HOST_BUFFER_BYTES``).
  """
  spec = find_chip(chip)
  if store_dtype not in ITEMSIZE:
    raise ValueError(f"store_dtype {store_dtype!r}: expected one of "
                     + ", ".join(ITEMSIZE))
  positive = dict(params=params, tokens=tokens, seq_len=seq_len,
                  projection_dim=projection_dim, chips=chips, queries=queries,
                  chunk_rows=chunk_rows, batch_per_host=batch_per_host,
                  host_read_gbps=host_read_gbps, r_block_dim=r_block_dim,
                  checkpoints=checkpoints, vocab_size=vocab_size,
                  text_bytes_per_token=text_bytes_per_token, top_k=top_k)
  if host_memory is not None:
    positive.update(host_memory=host_memory)
  for key, value in positive.items():
    if not (value > 0 and math.isfinite(value)):
      raise ValueError(f"{key} must be a positive, finite number, got {value}")
  if host_memory is not None and local_store:
    raise ValueError("host_memory bounds the pooled reads of a store in object "
                     "storage, and local_store maps the store's chunks with no "
                     "pool: it would be ignored; expected one of them")
  if round(tokens) < 1:
    raise ValueError(f"tokens must be at least 1 (a corpus of at least one "
                     f"row), got {tokens:g}")
  if not 0 < mfu <= 1:
    raise ValueError(f"mfu must be in (0, 1], got {mfu}")
  ratio = encode_train_ratio
  if ratio is None:
    ratio = spec.encode_train_ratio
  if not (ratio > 0 and math.isfinite(ratio)):
    raise ValueError(f"encode_train_ratio must be a positive, finite number, "
                     f"got {ratio}")
  hosts = _hosts(chips, spec, hosts)
  if round(tokens) < seq_len:
    raise ValueError(f"tokens must be at least one row of seq_len={seq_len}, got "
                     f"{tokens:g}; expected more tokens or a shorter seq_len")
  if params * 2 > chips * spec.hbm_bytes:
    raise ValueError(f"params: their bf16 weights ({size(params * 2, binary=False)}) "
                     f"exceed the HBM of {chips} {spec.name} chips "
                     f"({size(chips * spec.hbm_bytes, binary=False)}); expected more "
                     "chips")

  d = projection_dim
  steps_summed = int(checkpoints)
  rows = -(-int(round(tokens)) // seq_len)             # ceil(tokens / seq_len)
  itemsize = ITEMSIZE[store_dtype]
  row_bytes = d * itemsize + ROW_EXTRA_BYTES.get(store_dtype, 0)
  store_bytes = rows * row_bytes * steps_summed         # one store per checkpoint
  # The tokenized corpus (tracer.corpus): token rows padded to seq_len, in
  # uint16 when the vocabulary fits, and each row's text (UTF-8).
  token_itemsize = 2 if vocab_size <= 1 << 16 else 4
  tokenized_tokens_bytes = rows * seq_len * token_itemsize
  tokenized_text_bytes = tokens * text_bytes_per_token
  tokenized_bytes = tokenized_tokens_bytes + tokenized_text_bytes

  train_flops = 6.0 * params * tokens
  encode_flops = train_flops * ratio * steps_summed
  encode_chip_hours = encode_flops / (spec.peak_flops * mfu) / 3600
  encode_wall_hours = encode_chip_hours / chips
  # (each checkpoint's encode takes its own steps over every row)
  encode_steps = -(-rows // (hosts * batch_per_host)) * steps_summed

  params_bytes = params * 2 * steps_summed             # bf16 weights, each step's
  pod_hbm_bytes = chips * spec.hbm_bytes
  # (none where the summed checkpoints' params take it all: encoding takes
  # them one at a time, a resident scan holds them all)
  pod_hbm_free_bytes = max(0.0, pod_hbm_bytes - params_bytes)
  fits = store_bytes <= pod_hbm_free_bytes
  # The query set's R^(-1) at scan time: each row's norm under it costs one
  # column for its diagonal and, per block of at most r_block_dim dims, one
  # low-rank column per query (the queries are R_eval), each over that block
  # only: about 1 + min(Q, block) columns over the whole row.
  # Many queries take several passes over the store, or are split over the
  # chips (padded), as tracer.scan plans them.
  from tracer import scan  # pylint: disable=g-import-not-at-top
  staged = staged_pool(d, itemsize, chips // hosts, chunk_rows, host_memory)
  full_sets = scan.staged_sets(scan.REMOTE_READ_AHEAD)  # (before any cut)
  piece = None if local_store else staged.piece_rows
  chip_rows = -(-rows // chips)  # (a step is no longer than the corpus)
  top_k_asked, top_k = top_k, min(int(top_k), max(rows, 1))  # (as _scan cuts k)
  runs = query_passes(queries, d, itemsize, top_k, chips, spec.hbm_bytes,
                      steps_summed, piece, multiple=chunk_rows,
                      mapped=local_store, chip_rows=chip_rows)
  if runs is None:
    raise ValueError(f"projection_dim: one query's scan step at d={d:,} "
                     f"with k={top_k:,} does not fit a {spec.name} chip's "
                     f"{size(spec.hbm_bytes, binary=False)}"
                     + (f" (a step of each of the {steps_summed} checkpoints' "
                        "stores)" if steps_summed > 1 else "")
                     + "; expected a smaller d or top_k"
                     + (" or fewer checkpoints" if steps_summed > 1 else ""))
  scan_passes, per_run = runs["passes"], runs["per_run"]
  norm_columns = 1 + min(per_run, r_block_dim)
  passes = MATMUL_PASSES[store_dtype]
  # (each pass computes the row norms under R again)
  scan_compute_s = (2.0 * rows * d * (per_run + norm_columns) * passes
                    * steps_summed * scan_passes / (chips * spec.peak_flops))
  scan_hbm_s = store_bytes / (chips * spec.hbm_bandwidth)
  # tracer's scan today streams the store from storage for every query batch,
  # each host reading its devices' rows, once a pass.
  read_pass_s = store_bytes / (hosts * host_read_gbps * GB)
  scan_host_read_s = read_pass_s * scan_passes
  bounds = {"compute": scan_compute_s, "host read": scan_host_read_s}
  scan_bound = max(bounds, key=bounds.get)
  scan_estimate_s = bounds[scan_bound]
  # Queries per pass at which compute and the read would take equally long:
  # the read's time in matmul columns, Q + 1 + min(Q, block) of them.
  columns = read_pass_s / (scan_compute_s / scan_passes / (per_run + norm_columns))
  balance_queries = max(0.0, (columns - 1) / 2 if columns <= 1 + 2 * r_block_dim
                        else columns - 1 - r_block_dim)
  # Split queries go around the chips every step: a chip sends each block
  # but its own (P - 1 of P; a summed scan's, one per checkpoint) and every
  # block's top-k (one for the sum) on.
  on_chip = runs["block"] or per_run
  scan_rows = step_rows(on_chip, d, itemsize, steps_summed, piece, chunk_rows,
                        spec.hbm_bytes, local_store, chip_rows)
  ring_bytes = 0.0
  if runs["split"]:
    steps = -(-rows // (chips * scan_rows))
    ring_bytes = (scan_passes * steps * per_run
                  * (4 * d * steps_summed * (chips - 1) / chips + 16 * top_k))
  # A staged step's (rows of a piece, pieces) a chip; the pool's buffers are
  # of a piece, fewer rows than the pool allows where the step is short (a
  # small corpus) or divides into no larger whole chunks.
  scan_pieces = None if piece is None else scan.staged_pieces(
      step_rows(on_chip, d, itemsize, steps_summed, None, chunk_rows,
                spec.hbm_bytes, chip_rows=chip_rows), piece, chunk_rows)
  host_pool_bytes = staged.sets * (chips // hosts) * d * itemsize * (
      staged.piece_rows if scan_pieces is None else scan_pieces[0])
  # A store kept resident in HBM (tracer serve) pays only this.
  scan_resident_s = max(scan_compute_s, scan_hbm_s * scan_passes) if fits else None

  # The copies an encode holds, as measured (``tracer benchmark-data
  # --encode_memory``; ``pipeline``'s checks count the same): a chunk's 8
  # bytes per element, 4.5 float32 copies of each encoding of a batch, 5 of
  # each example (its inputs, targets and weights: 12 bytes per token).
  from tracer import pipeline  # pylint: disable=g-import-not-at-top
  host_chunk_bytes = pipeline.CHUNK_BYTES_PER_ELEMENT * chunk_rows * d
  host_encoded_bytes = int(pipeline.BATCH_ENCODING_COPIES * batch_per_host * d * 4)
  host_tokens_bytes = pipeline.BATCH_EXAMPLE_COPIES * batch_per_host * seq_len * 12
  host_r_bytes = d * min(r_block_dim, d) * 4
  host_memory_bytes = (host_chunk_bytes + host_encoded_bytes
                       + host_tokens_bytes + host_r_bytes)

  return dict(
      chip=spec, params=params, tokens=tokens, seq_len=seq_len,
      projection_dim=d, chips=chips, hosts=hosts, store_dtype=store_dtype,
      queries=queries, mfu=mfu, encode_train_ratio=ratio,
      chunk_rows=chunk_rows, batch_per_host=batch_per_host,
      host_read_gbps=host_read_gbps, r_block_dim=r_block_dim,
      checkpoints=steps_summed, norm_columns=norm_columns, top_k=top_k,
      top_k_asked=top_k_asked,
      scan_passes=scan_passes, queries_per_pass=per_run,
      queries_split=runs["split"], query_block=runs["block"],
      whole_query_runs=runs["whole_runs"], query_bytes=runs["whole_bytes"],
      query_block_bytes=runs["split_bytes"], ring_bytes_per_chip=ring_bytes,
      scan_step_bytes=runs["step_bytes"],
      scan_step_limit_bytes=runs["limit_bytes"],
      local_store=local_store, scan_step_rows=scan_rows,
      scan_other_steps=other_steps(d, itemsize, steps_summed, chunk_rows,
                                   spec.hbm_bytes),
      host_memory=host_memory, host_pool_bytes=host_pool_bytes,
      host_pool_allowed_bytes=staged.allowed, host_pool_floor=staged.floor,
      host_pool_sets=staged.sets,
      host_pool_full_sets=full_sets, host_pool_short=staged.sets < full_sets,
      scan_pieces=scan_pieces,
      matmul_passes=passes, rows=rows,
      itemsize=itemsize, row_bytes=row_bytes, store_bytes=store_bytes,
      store_bytes_per_host=store_bytes / hosts, vocab_size=vocab_size,
      token_itemsize=token_itemsize, text_bytes_per_token=text_bytes_per_token,
      tokenized_tokens_bytes=tokenized_tokens_bytes,
      tokenized_text_bytes=tokenized_text_bytes, tokenized_bytes=tokenized_bytes,
      tokenized_bytes_per_host=tokenized_bytes / hosts,
      train_flops=train_flops, encode_flops=encode_flops,
      encode_chip_hours=encode_chip_hours, encode_wall_hours=encode_wall_hours,
      encode_steps=encode_steps,
      encode_step_s=encode_wall_hours * 3600 / encode_steps,
      params_bytes=params_bytes, pod_hbm_bytes=pod_hbm_bytes,
      pod_hbm_free_bytes=pod_hbm_free_bytes, store_fits_in_hbm=fits,
      scan_compute_s=scan_compute_s, scan_hbm_s=scan_hbm_s,
      scan_host_read_s=scan_host_read_s, scan_estimate_s=scan_estimate_s,
      scan_bound=scan_bound, balance_queries=balance_queries,
      scan_resident_s=scan_resident_s,
      host_chunk_bytes=host_chunk_bytes, host_encoded_bytes=host_encoded_bytes,
      host_tokens_bytes=host_tokens_bytes, host_r_bytes=host_r_bytes,
      host_memory_bytes=host_memory_bytes)


def count(n: float) -> str:
  """12,345,678 (rounded to an integer)."""
  return f"{round(n):,}"


def number(n: float) -> str:
  """12,346 at 100 or more, else three significant digits (0.0123)."""
  return count(n) if abs(n) >= 100 else f"{n:.3g}"


def plural(n: int, noun: str) -> str:
  """'1 host', '64 hosts'."""
  return f"{n:,} {noun}" + ("" if n == 1 else "s")


def passes_text(n: int) -> str:
  """'1 pass', '7 passes'."""
  return f"{n:,} pass" + ("" if n == 1 else "es")


def size(n: float, binary: bool = True) -> str:
  """Bytes as '10.2 TB (9.31 TiB)': decimal units, then binary ones."""
  def scaled(n, base, units):
    i = 0
    while abs(n) >= base and i < len(units) - 1:
      n, i = n / base, i + 1
    return f"{n:.3g} {units[i]}" if i else f"{n:,.0f} {units[i]}"
  decimal = scaled(n, 1000, ("B", "kB", "MB", "GB", "TB", "PB", "EB"))
  if not binary:
    return decimal
  return (decimal + " ("
          + scaled(n, 1024, ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"))
          + ")")


def tflops(flops: float) -> str:
  """FLOP/s as '459 TFLOP/s'."""
  return f"{flops / 1e12:,.0f} TFLOP/s"


def bandwidth(bytes_per_s: float) -> str:
  """Bytes/s as '2,765 GB/s'."""
  return f"{bytes_per_s / GB:,.4g} GB/s"


def sci(x: float) -> str:
  """7.68e21, not 7.68e+21."""
  mantissa, _, exponent = f"{x:.3g}".partition("e")
  return f"{mantissa}e{int(exponent)}" if exponent else mantissa


def duration(seconds: float) -> str:
  """Seconds in the largest unit that keeps the number at least 1."""
  for unit, scale in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1),
                      ("ms", 1e-3)):
    if seconds >= scale:
      return f"{seconds / scale:.3g} {unit}"
  return f"{seconds * 1e6:.3g} us"


def report(p: dict) -> str:
  """The plan as aligned text: section, quantity, value, formula."""
  from tracer import scan  # pylint: disable=g-import-not-at-top
  c = p["chip"]
  d = p["projection_dim"]
  s = p["checkpoints"]
  times_s = f" * {s} checkpoints" if s > 1 else ""
  lines = [
      f"Capacity plan: {sci(p['params'])}-parameter model, "
      f"{count(p['tokens'])} tokens, d = {count(d)} ({p['store_dtype']}), "
      f"{p['chips']} x {c.name} on {plural(p['hosts'], 'host')}"
      + (f", TrackStar summed over {s} checkpoints" if s > 1 else ""),
      f"chip {c.name}: {tflops(c.peak_flops)} bf16, {size(c.hbm_bytes)} HBM "
      f"at {bandwidth(c.hbm_bandwidth)}, {c.chips_per_host} chips per host",
      f"  source: {c.source}",
  ]
  rows = []

  def section(title):
    rows.append((title, None, None))

  def row(label, value, formula=""):
    rows.append((label, value, formula))

  section("corpus")
  row("rows", f"{count(p['rows'])} rows",
      f"ceil(tokens / seq_len) = ceil({count(p['tokens'])} / "
      f"{count(p['seq_len'])})")
  extra = p["row_bytes"] - d * p["itemsize"]
  per_row, per_row_n = ((f"d * {p['itemsize']}", f"{count(d)} * {p['itemsize']}")
                        if not extra else
                        (f"(d * {p['itemsize']} + {extra})",
                         f"({count(d)} * {p['itemsize']} + {extra})"))
  row("store" + ("s" if s > 1 else ""), size(p["store_bytes"]),
      f"rows * {per_row} B{times_s} = {count(p['rows'])} * {per_row_n}"
      + (f" * {s}" if s > 1 else ""))
  row("store" + ("s" if s > 1 else "") + " per host",
      size(p["store_bytes_per_host"]),
      f"store / {plural(p['hosts'], 'host')}")
  token_type = "uint16" if p["token_itemsize"] == 2 else "int32"
  row("tokenized tokens", size(p["tokenized_tokens_bytes"]),
      f"rows * seq_len * {p['token_itemsize']} B ({token_type}: vocab "
      f"{count(p['vocab_size'])})")
  row("tokenized texts", size(p["tokenized_text_bytes"]),
      f"tokens * {p['text_bytes_per_token']:g} B of UTF-8 per token")
  row("tokenized per host", size(p["tokenized_bytes_per_host"]),
      f"(tokens + texts) / {plural(p['hosts'], 'host')}: what each host "
      "writes tokenizing its share")

  section("encode")
  row("train-step FLOPs", f"{sci(p['train_flops'])} FLOP",
      "6 * params * tokens")
  row("encode FLOPs", f"{sci(p['encode_flops'])} FLOP",
      f"train FLOPs * {p['encode_train_ratio']:g} (encode/train time ratio)"
      + times_s)
  row("encode chip-hours", f"{number(p['encode_chip_hours'])} chip-hours",
      f"encode FLOPs / ({tflops(c.peak_flops)} * mfu {p['mfu']:g}) / 3600 s")
  wall_h = p["encode_wall_hours"]
  if wall_h >= 24:
    wall = f"{number(wall_h)} h ({duration(wall_h * 3600)})"
  else:
    wall = duration(wall_h * 3600)
  row("encode wall-clock", f"{wall} on {plural(p['chips'], 'chip')}",
      f"chip-hours / {plural(p['chips'], 'chip')}")
  row("encode steps", f"{count(p['encode_steps'])} steps",
      f"ceil(rows / (hosts * batch_per_host)){times_s} = ceil(rows / "
      f"({p['hosts']} * {p['batch_per_host']}))" + (f" * {s}" if s > 1 else ""))
  row("time per step", duration(p["encode_step_s"]), "wall-clock / steps")

  passes = p["scan_passes"]
  per_pass = "Q" if p["queries_per_pass"] == p["queries"] else count(
      p["queries_per_pass"])
  times_passes = f" * {passes} store passes" if passes > 1 else ""
  section(f"scan of Q = {count(p['queries'])} queries, k = {count(p['top_k'])}")
  summed = p["checkpoints"]
  if p["top_k"] < p["top_k_asked"]:
    row("k", f"{count(p['top_k'])} of the {count(p['top_k_asked'])} asked",
        "cut to the corpus's rows, as the scan cuts k (no more proponents "
        "than rows)")
  row("queries on a chip", size(p["query_bytes"]),
      (f"Q * ({summed} * d * 4 + k * 16) B: f32 queries of each checkpoint "
       "and their top-k, whole on each chip" if summed > 1 else
       "Q * (d * 4 + k * 16) B: f32 queries and their top-k, whole on each chip"))
  if p["queries_split"]:
    row("split over the chips",
        f"{count(p['query_block'])} a chip, {size(p['query_block_bytes'])}",
        f"{count(p['queries_per_pass'])} with the padding (blocks of a "
        "multiple of 64), twice a block while one is sent around the ring: "
        f"whole, they take {passes_text(p['whole_query_runs'])}")
  if p["queries_split"]:
    ring = p["ring_bytes_per_chip"]
    row("ring traffic a chip", f"{bandwidth(ring / p['scan_estimate_s'])} "
        f"({bandwidth(ring / p['scan_compute_s'])} at the compute bound)",
        f"{size(ring, binary=False)} sent over the scan: each step, every "
        "block but the chip's own and every top-k, over the estimate below")
  # (query_batch holds the runs to half a chip, or to all of it where even
  # the least step passes half: then so does the planned one)
  bound = ("half a chip's HBM"
           if p["scan_step_limit_bytes"] < c.hbm_bytes else
           "all of a chip's HBM (even the least step passes half)")
  default_others = scan.device_steps(2) - 1  # (at the default prefetch)
  row("store passes", passes_text(passes)
      + (" (queries split)" if p["queries_split"] else ""),
      f"each step {size(p['scan_step_bytes'], binary=False)} a chip, within "
      f"{bound}: its rows (at most 2 GiB"
      + (", of the checkpoints' stores together" if summed > 1 else "")
      + f", and the rows of the {plural(p['scan_other_steps'], 'other step')}"
      " a chip holds within the other half"
      + ("" if p["scan_other_steps"] == default_others else
         ": fewer prefetched, as even a chunk in each of the default's "
         f"{default_others} would not fit")
      + "), "
      "its scores, "
      "the queries and top-k; whole where they fit, else split over the "
      "chips where that takes fewer passes, else in runs")
  host = ("" if p["host_memory"] is None else
          f" of a host's {size(p['host_memory'], binary=False)}")
  sets = f"{p['host_pool_sets']} pieces in flight, a buffer a chip"
  buffers = (
      f"{size(p['host_pool_bytes'])} for {sets}: the floor, as few as a scan "
      f"keeps, past the pool of {size(p['host_pool_allowed_bytes'])}{host}"
      if p["host_pool_floor"] else
      f"{size(p['host_pool_bytes'])} for {sets}, within the pool of "
      f"{size(p['host_pool_allowed_bytes'])}{host}" + (
          f": {p['host_pool_full_sets']} of a chunk would not fit"
          if p["host_pool_short"] else ""))
  row("scan step", f"{count(p['scan_step_rows'])} rows a chip"
      + (" of each store" if summed > 1 else ""),
      "the store's chunks mapped from the host's disk (--local_store)"
      if p["local_store"] else
      "read from object storage in {} of {} rows a chip, each staged through "
      "the host's pooled buffers ({}) and copied to the chip; "
      "--local_store: mapped chunks".format(
          plural(p["scan_pieces"][1], "piece"), count(p["scan_pieces"][0]),
          buffers))
  row("pod HBM free", size(p["pod_hbm_free_bytes"]),
      f"chips * HBM - params * 2 B{times_s} = {p['chips']} * "
      f"{size(c.hbm_bytes, binary=False)} - "
      f"{size(p['params_bytes'], binary=False)}")
  share = p["store_bytes"] / p["pod_hbm_free_bytes"] if (
      p["pod_hbm_free_bytes"] > 0) else math.inf
  row("store fits in HBM", "yes" if p["store_fits_in_hbm"] else "no",
      f"store / free HBM = {share * 100:.3g}%")
  row("compute bound", duration(p["scan_compute_s"]),
      f"2 * rows * d * ({per_pass} + {p['norm_columns']} for R) * "
      f"{p['matmul_passes']} passes{times_passes} / (chips * "
      f"{tflops(c.peak_flops)})" + times_s)
  row("host read bound", duration(p["scan_host_read_s"]),
      f"store / (hosts * {p['host_read_gbps']:g} GB/s){times_passes} = store / "
      f"({p['hosts']} * {p['host_read_gbps']:g} GB/s)"
      + (f" * {passes}" if passes > 1 else ""))
  row("estimate", f"{duration(p['scan_estimate_s'])} ({p['scan_bound']} bound)",
      "tracer scan: the store streamed from storage once a pass")
  row("HBM bound", duration(p["scan_hbm_s"]),
      f"store / (chips * {bandwidth(c.hbm_bandwidth)}) a pass")
  if p["scan_resident_s"] is not None:
    row("if resident in HBM", duration(p["scan_resident_s"]),
        "max(compute, HBM): tracer serve, the store kept in device memory")
  row("compute-bound when", f"Q > {count(p['balance_queries'])} queries a pass",
      "Q where compute = host read (each query adds a column, and one "
      "for R up to the block size)")

  section("host memory per host while encoding: O(batch), not O(rows); copies "
          "as measured by tracer benchmark-data --encode_memory")
  from tracer import pipeline  # pylint: disable=g-import-not-at-top
  chunk, encodings, examples = (pipeline.CHUNK_BYTES_PER_ELEMENT,
                                pipeline.BATCH_ENCODING_COPIES,
                                pipeline.BATCH_EXAMPLE_COPIES)
  row("store chunk", size(p["host_chunk_bytes"]),
      f"chunk_rows * d * {chunk} B = {p['chunk_rows']} * {count(d)} * {chunk} "
      "(its f32 buffer, and as much again as it is written)")
  row("encoded batches f32", size(p["host_encoded_bytes"]),
      f"batch_per_host * d * 4 B * {encodings} copies = {p['batch_per_host']} "
      f"* {count(d)} * 4 * {encodings}")
  row("example batches", size(p["host_tokens_bytes"]),
      f"batch_per_host * seq_len * 12 B * {examples} copies = "
      f"{p['batch_per_host']} * {count(p['seq_len'])} * 12 * {examples} "
      "(inputs, targets, weights)")
  row("R^(-1/2) blocks f32", size(p["host_r_bytes"]),
      f"d * {count(min(p['r_block_dim'], d))} * 4 B (upper bound: blocks "
      f"<= {count(p['r_block_dim'])} dims summing to d)")
  row("total", size(p["host_memory_bytes"]),
      "sum of the above; independent of rows and tokens")

  width_label = max(len(r[0]) for r in rows if r[1] is not None) + 2
  width_value = max(len(r[1]) for r in rows if r[1] is not None) + 2
  for label, value, formula in rows:
    if value is None:
      lines += ["", label]
    else:
      lines.append(f"  {label:<{width_label}}{value:<{width_value}}{formula}"
                   .rstrip())

  lines += [
      "",
      "Assumptions",
      f"  - mfu = {p['mfu']:g}: ASSUMED model FLOPs utilization of a training "
      "step at this scale (not measured here); encode time scales as 1/mfu.",
      f"  - encode/train-step time ratio {p['encode_train_ratio']:g}: "
      + (c.ratio_source + "; the 2-core CPU measured 1.07-1.09"
         if p["encode_train_ratio"] == c.encode_train_ratio else
         "set by --encode_train_ratio (measured here: 1.33 on the H200, "
         "1.07-1.09 on the 2-core CPU, 27.4M-param model)")
      + "; not measured at this model size.",
      *([] if p["local_store"] else [
          "  - host memory "
          + ("at least 32 GiB: ASSUMED (--host_memory)"
             if p["host_memory"] is None else
             f"{size(p['host_memory'], binary=False)} (--host_memory)")
          + "; a scan from object storage pools its reads in a quarter of "
          "it, at most 8 GiB (scan.host_buffer_bytes): "
          f"{size(p['host_pool_allowed_bytes'])}"
          + (f"; at its floor, {p['host_pool_sets']} pieces of a chunk a chip "
             f"in flight, it takes {size(p['host_pool_bytes'])}"
             if p["host_pool_floor"] else "") + "."]),
      f"  - host read bandwidth {p['host_read_gbps']:g} GB/s per host: ASSUMED"
      " (object storage or local disk); the scan as built streams the store "
      "at this rate for every query batch.",
      f"  - R^(-1/2): blocks of at most {count(p['r_block_dim'])} dims "
      "summing to d, so at most d * block * 4 B; tracer.projection's blocks "
      "(k_a * k_b) are not capped, so a larger block breaks this bound.",
      f"  - R at scan time: 1 + min(Q, {count(p['r_block_dim'])}) = "
      f"{p['norm_columns']} more columns per row (the row norms under the "
      "query set's own R; measured on the CPU: (Q + 240) / Q of the plain "
      "scan with 240 eval examples in blocks of 256, WORKSPACE.md).",
      f"  - scan bounds use peak bf16 FLOP/s and HBM bandwidth (no MFU), and "
      f"{p['matmul_passes']} bf16 matmul passes per product: the scan's "
      "scores are exact in fp32 (bf16 and int8 rows against the fp32 queries "
      "as three bf16 terms; f32 rows at HIGHEST, six on a TPU and slower on "
      "a GPU's fp32 cores). Free HBM subtracts one "
      "bf16 copy of the weights per summed checkpoint, sharded over the "
      "pod, and ignores activations and scan workspace.",
      f"  - {p['text_bytes_per_token']:g} bytes of text per token: ASSUMED "
      "(English under a subword vocabulary; the byte tokenizer's is 1); the "
      "tokenized corpus keeps each row's text for results and the viewer, "
      "and its ids (not counted).",
      "  - chip figures are vendor-published specs (see source above); vendor "
      "GB = 10^9 bytes.",
  ]
  return "\n".join(lines)


def define_flags() -> None:
  """Defines this tool's flags; only when run as a program, so that tests can
  import several launch modules whose flag names overlap."""
  flags.DEFINE_float("params", None, "Model parameters (count).",
                     required=True)
  flags.DEFINE_float("tokens", None, "Corpus tokens (count).", required=True)
  flags.DEFINE_integer("seq_len", 2048, "Tokens per row.", lower_bound=1)
  flags.DEFINE_integer("projection_dim", 65536,
                       "d: dimensions of one encoding.", lower_bound=1)
  flags.DEFINE_integer("chips", None, "Accelerator chips.", required=True,
                       lower_bound=1)
  flags.DEFINE_string("chip", None, "Chip name: "
                      + ", ".join(c.name for c in CHIPS) + ".", required=True)
  flags.register_validator("chip", _check_chip)
  flags.DEFINE_enum("store_dtype", "bfloat16", list(ITEMSIZE),
                    "Dtype of the stored encodings.")
  flags.DEFINE_integer("queries", 64, "Q: queries a scan takes (many take "
                       "several passes over the store, or are split over "
                       "the chips).", lower_bound=1)
  flags.DEFINE_integer("top_k", 10, "Proponents and opponents per query.",
                       lower_bound=1)
  flags.DEFINE_float("host_memory", None, "A host's memory, bytes (e.g. "
                     "400e9): a scan from object storage pools its reads in "
                     "at most a quarter of it, and 8 GiB (default: ASSUMED "
                     "at least 32 GiB).")
  flags.DEFINE_bool("local_store", False, "The store on each host's disk "
                    "(its chunks mapped into the scan's steps), not object "
                    "storage (staged through pooled host buffers).")
  flags.DEFINE_float("mfu", 0.4, "ASSUMED model FLOPs utilization of a "
                     "training step at scale (0, 1].")
  flags.DEFINE_float("encode_train_ratio", None, "Encode time / train-step "
                     "time (default: the chip row's, measured on the H200).")
  flags.DEFINE_integer("hosts", None,
                       "Hosts (default: chips / the chip's chips per host).",
                       lower_bound=1)
  flags.DEFINE_integer("chunk_rows", 512, "Store rows per chunk.",
                       lower_bound=1)
  flags.DEFINE_integer("batch_per_host", 64,
                       "Rows encoded per host per step.", lower_bound=1)
  flags.DEFINE_float("host_read_gbps", 1.0, "ASSUMED read bandwidth per host, "
                     "GB/s, when the store does not fit in HBM.")
  flags.DEFINE_integer("r_block_dim", 1024, "Largest R block, dims (bounds "
                       "R^(-1/2)'s host memory).", lower_bound=1)
  flags.DEFINE_integer("vocab_size", 256_000, "Tokenizer vocabulary (tokens "
                       "are stored as uint16 up to 65,536, else int32).",
                       lower_bound=1)
  flags.DEFINE_float("text_bytes_per_token", 4.0, "ASSUMED UTF-8 bytes of "
                     "text per token, for the tokenized corpus's texts.")
  flags.DEFINE_integer("checkpoints", 1, "S: checkpoints TrackStar is summed "
                       "over (tracer trace --sum_steps): S encodes, S stores, "
                       "S times the scan.", lower_bound=1)


def _check_chip(name: str | None) -> bool:
  if name is not None:
    try:
      find_chip(name)
    except ValueError as e:
      raise flags.ValidationError(str(e)) from None
  return True


def main(argv):
  del argv  # (cli.run refuses any)
  try:
    p = plan(FLAGS.params, FLAGS.tokens, FLAGS.seq_len, FLAGS.projection_dim,
             FLAGS.chips, FLAGS.chip, FLAGS.store_dtype, FLAGS.queries,
             FLAGS.mfu, FLAGS.encode_train_ratio, FLAGS.hosts,
             FLAGS.chunk_rows, FLAGS.batch_per_host, FLAGS.host_read_gbps,
             FLAGS.r_block_dim, FLAGS.checkpoints, FLAGS.vocab_size,
             FLAGS.text_bytes_per_token, FLAGS.top_k, FLAGS.local_store,
             FLAGS.host_memory)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  print(report(p))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
