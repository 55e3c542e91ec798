r"""Throughput of the exact top-k scan against faiss, numpy and the roofline.

  tracer benchmark-scan --rows=200000 --dim=1024 --queries=64 \
      --k=100 --output=/tmp/scan.md

Every row of the table scans the same random ``[rows, dim]`` matrix with the
same queries for the top-k proponents AND opponents (faiss searches ``[q; -q]``
in one call for the same work). The roofline is measured in the same run:
max(encoding bytes / memory read bandwidth, 2·N·d·Q / fp32 matmul FLOP/s),
with the bandwidth from a numpy sum over the matrix and the FLOP/s the best of
numpy's and XLA's matmuls (XLA's skinny fp32 dot beats numpy's BLAS here).
Row "XLA matmul alone" is the scan's scores without the selection, chunk by
chunk from the same memory (the roofline's FLOP rate comes from a matrix in
cache): a scan row's time over it is the scan's own overhead (selection,
merge, host loop).
Store rows read a tensorstore written in the same run (warm page cache).
Times are the best of ``--repeats`` runs; other processes on a shared
machine move them by tens of percent, so compare rows of one table only.
Column ``vs_faiss``: faiss ``IndexFlatIP``'s time over the row's (> 1:
faster than faiss), when faiss is installed.

``--resident`` times instead the scan of a corpus held in device memory
(generated there: no host copies), e.g. on a GPU::

  tracer benchmark-scan --resident --rows=16000000 --repeats=3

and reports its fraction of the device's memory bandwidth and of its bf16
matmul rate, both measured in the same run (``run_resident_benchmark``).

``--serve_pass`` times ``tracer serve``'s pass (``run_serve_pass_benchmark``)
over resident bf16 and f32 stores of the same rows, for one query and for
``--queries``, each request with its own scan-time R.

Run it without ``--xla_force_host_platform_device_count``: on a CPU the scan
should use the one real device (simulated devices share the same cores).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Sequence

from absl import flags
from absl import logging
import jax
import ml_dtypes
import numpy as np

from tracer.launch import cli
from tracer import fused_scores
from tracer import hessian
from tracer import memory
from tracer import partitioning
from tracer import scan
from tracer import serving
from tracer import store as store_lib
from tracer import topk
from tracer.errors import InputError

def define_flags() -> None:
  """Defines this script's flags (only when run as a script, so that
  ``launch.benchmark`` can import ``run_scan_benchmark``)."""
  global _ROWS, _DIM, _QUERIES, _K, _CHUNK_ROWS, _STORE_CHUNK_ROWS, _REPEATS, _WORKDIR, _OUTPUT, _EVAL, _BLOCK, _RESIDENT, _FUSED_TILES, _SERVE_PASS, _REQUESTS, _QUERY_STEPS, _STAGED, _QUERY_SETS, _QUERY_SET_SIZES
  _ROWS = flags.DEFINE_integer("rows", 200_000, "N, rows to scan.", lower_bound=1)
  _DIM = flags.DEFINE_integer("dim", 1024, "d, encoding dimension.", lower_bound=1)
  _QUERIES = flags.DEFINE_integer("queries", 64, "Q, queries per scan.",
                                  lower_bound=1)
  _K = flags.DEFINE_integer("k", 100, "Top-k per query and side (at most --rows).",
                            lower_bound=1)
  _CHUNK_ROWS = flags.DEFINE_integer(
      "chunk_rows", None, "Rows per scan step; default scan.default_chunk_rows.",
      lower_bound=1)
  _STORE_CHUNK_ROWS = flags.DEFINE_integer("store_chunk_rows", 4096,
                                           "Rows per stored zarr chunk.",
                                           lower_bound=1)
  _REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per method (best kept).",
                                  lower_bound=1)
  _WORKDIR = flags.DEFINE_string("workdir", None,
                                 "Where to write the stores (default: a tmp dir).")
  _OUTPUT = flags.DEFINE_string(
      "output", None, "Write the table here: .json for JSON, else markdown.")
  _EVAL = flags.DEFINE_integer(
      "eval_examples", 240, "Examples whose R_eval the scan-time metric mixes in.",
      lower_bound=1)
  _BLOCK = flags.DEFINE_integer(
      "block", 256, "Block size of the scan-time metric's block-diagonal R.",
      lower_bound=1)
  _RESIDENT = flags.DEFINE_bool(
      "resident", False, "Time the scan of a corpus held in device memory "
      "(run_resident_benchmark) instead of the host and store scans.")
  _SERVE_PASS = flags.DEFINE_bool(
      "serve_pass", False, "Time instead tracer serve's pass over resident "
      "bf16 and f32 stores of the same rows, with a request's scan-time R "
      "(run_serve_pass_benchmark).")
  _REQUESTS = flags.DEFINE_integer(
      "requests", 8, "--serve_pass: requests in the streamed fallback's "
      "largest batch (0: the streamed rows are not run).", lower_bound=0)
  _QUERY_STEPS = flags.DEFINE_bool(
      "query_steps", False, "Time instead scan_arrays over f32 rows in its "
      "default steps, which shrink with --queries, against steps that ignore "
      "them (as before 2026-12-06), with XLA's count of a step's memory; "
      "then on a memory made to fit a quarter of the queries, in runs and, "
      "on several devices, with the queries split over them "
      "(run_query_step_benchmark).")
  _STAGED = flags.DEFINE_integer(
      "staged_pool_mb", 0, "Instead (> 0): time scan_arrays over unaligned "
      "bf16 rows (copied through pooled buffers) with a pool of this many "
      "MiB, in steps the pool bounds (as before stop 75) and, on devices of "
      "their own memory, staged a piece at a time (run_staged_benchmark).",
      lower_bound=0)
  _QUERY_SETS = flags.DEFINE_integer(
      "query_sets", 0, "Instead (> 0): time that many query sets of --queries "
      "each, every set under its own scan-time R, scanned from a bf16 store "
      "in one pass (scan.scan_sets) against a scan per set "
      "(run_query_sets_benchmark).", lower_bound=0)
  _QUERY_SET_SIZES = flags.DEFINE_list(
      "query_set_sizes", None, "With --query_sets: sets of these sizes "
      "instead of --queries each (e.g. 240,16,16,16: no set is padded to "
      "the largest).")
  _FUSED_TILES = flags.DEFINE_list(
      "fused_tiles", None, "Instead: time the fused kernel's tile settings "
      "(run_fused_tiles_benchmark) on resident bf16 rows, each as "
      "ROWS:DIM:WARPS:STAGES (fused_scores.Tiles).")
  # Each setting parsed with the flags, not after the default step's timings.
  flags.register_validator("fused_tiles", _check_tiles)
  # (int() tracebacks, a size of 0 refused by the scan without the flag's
  # name, a count off --query_sets refused once the rows were made)
  cli.check_list_flag("query_set_sizes", least=1, empty_ok=True)
  flags.register_multi_flags_validator(["query_sets", "query_set_sizes"],
                                       _check_set_sizes)


def _check_set_sizes(values: dict) -> bool:
  sets, sizes = values["query_sets"], values["query_set_sizes"]
  if sizes is not None and len(sizes) != sets:
    raise flags.ValidationError(
        f"--query_set_sizes: {len(sizes)} sizes for --query_sets={sets}; "
        "expected one size a set"
        + (" (the sizes are read only with --query_sets > 0)" if not sets
           else ""))
  return True


def _check_tiles(values: list[str] | None) -> bool:
  for text in values or ():
    try:
      parse_tiles(text)
    except ValueError as e:
      raise flags.ValidationError(str(e).removeprefix("--fused_tiles: ")) from None
  return True


def _best_time(fn: Callable[[], Any], repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def measure_bandwidth(x: np.ndarray, repeats: int = 3) -> float:
  """Bytes/s of a numpy sum over ``x`` (a big array: reads come from DRAM)."""
  return x.nbytes / _best_time(lambda: x.sum(dtype=np.float32), repeats)


def measure_sgemm(dim: int, queries: int, repeats: int = 20) -> dict[str, float]:
  """fp32 FLOP/s of XLA's dot and of numpy (the scan's shape, and square).

  XLA's CPU dot can beat the numpy BLAS severalfold on the scan's skinny
  shape, so the roofline takes the best of the three. XLA's goes first and
  each takes the best of many short runs: numpy's BLAS threads keep
  spinning for a while after a call and slow what runs next (best of 3 read
  108-139 GFLOP/s where best of 30 read 197, 2-core EPYC).
  """
  rng = np.random.default_rng(0)
  a = rng.standard_normal((2048, 2048), dtype=np.float32)
  x = rng.standard_normal((16384, dim), dtype=np.float32)
  q = rng.standard_normal((queries, dim), dtype=np.float32)
  flops = 2 * 16384 * dim * queries
  dot = jax.jit(lambda x, q: jax.lax.dot_general(
      x, q, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST))
  xj, qj = jax.device_put(x), jax.device_put(q)
  dot(xj, qj).block_until_ready()
  xla = flops / _best_time(lambda: dot(xj, qj).block_until_ready(), repeats)
  return {
      "xla_scan_shape": xla,
      "numpy_scan_shape": flops / _best_time(lambda: x @ q.T, repeats),
      "numpy_square": 2 * 2048**3 / _best_time(lambda: a @ a, repeats),
  }


def numpy_scan(x: np.ndarray, q: np.ndarray, k: int,
               chunk_rows: int = 16384) -> tuple[np.ndarray, np.ndarray]:
  """Chunked matmul + argpartition: exact top-k ids (no tie-breaking rule)."""
  best_s = np.full((q.shape[0], 0), -np.inf, np.float32)
  best_i = np.zeros((q.shape[0], 0), np.int64)
  worst_s, worst_i = -best_s, best_i
  for lo in range(0, x.shape[0], chunk_rows):
    s = q @ x[lo:lo + chunk_rows].T
    ids = np.arange(lo, lo + s.shape[1])[None, :].repeat(q.shape[0], 0)
    for side in (1, -1):
      bs, bi = (best_s, best_i) if side == 1 else (worst_s, worst_i)
      cs = np.concatenate([bs, side * s], 1)
      ci = np.concatenate([bi, ids], 1)
      kk = min(k, cs.shape[1])
      top = np.argpartition(-cs, kk - 1, axis=1)[:, :kk]
      bs, bi = np.take_along_axis(cs, top, 1), np.take_along_axis(ci, top, 1)
      if side == 1:
        best_s, best_i = bs, bi
      else:
        worst_s, worst_i = bs, bi
  return best_i, worst_i


def _figure(value: float) -> float:
  """``value`` to 4 significant digits: a small scan's roofline is not 0.0."""
  return float(f"{value:.4g}")


def _row(method: str, seconds: float, n: int, d: int, q: int, bytes_per: int,
         roofline_s: float, note: str = "") -> dict[str, Any]:
  return {
      "method": method,
      "seconds": _figure(seconds),
      "rows_per_s": round(n / seconds),
      "GB_per_s": _figure(n * d * bytes_per / seconds / 1e9),
      "GFLOP_per_s": _figure(2 * n * d * q / seconds / 1e9),
      "roofline_s": _figure(roofline_s),
      "fraction_of_roofline": _figure(roofline_s / seconds),
      "note": note,
  }


def run_scan_benchmark(rows: int = 200_000, dim: int = 1024, queries: int = 64,
                       k: int = 100, chunk_rows: int | None = None,
                       store_chunk_rows: int = 4096, repeats: int = 5,
                       workdir: str | None = None, mesh=None,
                       eval_examples: int = 240, block: int = 256,
                       probe_repeats: int = 20) -> list[dict[str, Any]]:
  """Runs every method on the same data; one dict per table row.

  Each row: method, seconds (best of ``repeats``), rows_per_s, GB_per_s
  (encoding bytes read), GFLOP_per_s (2·N·d·Q useful FLOPs), roofline_s and
  fraction_of_roofline (roofline_s / seconds) for that row's dtype, note.
  The first row holds the measured machine figures. Rows "+ scan-time R"
  apply a query set's task-specific R^(-1) at scan time (``hessian.QueryMetric``
  from a block-diagonal basis with ``block``-sized blocks and ``eval_examples``
  eval examples) and give their time as a ratio of the same scan without it.
  ``probe_repeats``: runs of each matmul the roofline's FLOP rate is the best
  of (``measure_sgemm``).
  """
  mesh = partitioning.make_mesh() if mesh is None else mesh
  rng = np.random.default_rng(0)
  logging.info("generating %d x %d encodings", rows, dim)
  x = rng.standard_normal((rows, dim), dtype=np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  xb = x.astype(ml_dtypes.bfloat16)
  q = rng.standard_normal((queries, dim), dtype=np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)

  bandwidth = measure_bandwidth(x)
  sgemm = measure_sgemm(dim, queries, probe_repeats)
  flops = max(sgemm.values())
  compute_s = 2 * rows * dim * queries / flops

  def roofline(bytes_per: int) -> float:
    return max(rows * dim * bytes_per / bandwidth, compute_s)

  table = [{
      "method": "machine", "seconds": None, "rows_per_s": None,
      "GB_per_s": round(bandwidth / 1e9, 2),
      "GFLOP_per_s": round(flops / 1e9, 1),
      "roofline_s": _figure(roofline(4)), "fraction_of_roofline": None,
      "note": (f"GB/s: numpy sum; GFLOP/s: best fp32 matmul of "
               + ", ".join(f"{n} {v / 1e9:.0f}" for n, v in sgemm.items())
               + f"; N={rows} d={dim} Q={queries} k={k}; jax {jax.__version__}"
               f" on {mesh.size} {mesh.devices.flat[0].platform} device(s)"),
  }]
  step = chunk_rows or scan.default_chunk_rows(dim, 4, mesh.size)
  # What the scan itself steps by: no step is longer than the rows.
  step = min(partitioning.padded_size(step, mesh.size),
             partitioning.padded_size(rows, mesh.size))

  def add(method, fn, bytes_per, note=""):
    logging.info("timing %s", method)
    seconds = _best_time(fn, repeats)
    table.append(_row(method, seconds, rows, dim, queries, bytes_per,
                      roofline(bytes_per), note))
    logging.info("%s", table[-1])

  # Warm up compilation on a prefix with the same step shape.
  warm = min(rows, 2 * step)
  for data in (x, xb):
    scan.scan_arrays(data[:warm], q, k, mesh=mesh, chunk_rows=step)
  want = scan.scan_arrays(x, q, k, mesh=mesh, chunk_rows=step)
  add("tracer scan_arrays f32", lambda: scan.scan_arrays(
      x, q, k, mesh=mesh, chunk_rows=step), 4,
      f"step {step} rows; numpy input (16B-aligned): copied per chunk")
  # numpy's own buffers are 16-byte aligned; XLA's CPU client needs 64 to use
  # host memory in place, else each chunk is copied once more.
  xa = scan.aligned_empty(x.shape, x.dtype)
  xa[...] = x
  add("tracer scan_arrays f32, 64B-aligned", lambda: scan.scan_arrays(
      xa, q, k, mesh=mesh, chunk_rows=step), 4, "input used in place")
  scan_s = table[-1]["seconds"]
  add("XLA matmul alone, f32 64B-aligned", matmul_alone(xa, q, step, mesh), 4)
  steps = -(-rows // step)
  table[-1]["note"] = (
      f"the scan's scores without the selection, {steps} "
      f"step{'s' * (steps != 1)} of {step} rows; the aligned scan takes x{scan_s / table[-1]['seconds']:.2f}"
      " this time")
  xa = None  # free it before the next methods
  add("tracer scan_arrays bf16", lambda: scan.scan_arrays(
      xb, q, k, mesh=mesh, chunk_rows=step), 2,
      "bf16 rows, fp32 scores; numpy input (16B-aligned): copied per chunk")
  xba = scan.aligned_empty(xb.shape, xb.dtype)
  xba[...] = xb
  add("tracer scan_arrays bf16, 64B-aligned", lambda: scan.scan_arrays(
      xba, q, k, mesh=mesh, chunk_rows=step), 2,
      "input used in place" + (
          "; three bf16 matmuls" if not topk.widens_bf16(mesh) else
          f"; rows widened to f32 in tiles of {topk.score_tile_rows(dim)}"
          if topk.tiles_bf16(mesh) else "; rows widened to f32 inside the matmul"))
  xba = None
  metric, mq = synthetic_metric(dim, q, eval_examples, block, rng)
  x8 = store_lib.quantize(x)[0]  # an int8 store's rows (column scales: ones)
  for data, name, bytes_per in ((x, "f32", 4), (xb, "bf16", 2), (x8, "int8", 1)):
    scan.scan_arrays(data[:warm], mq, k, mesh=mesh, chunk_rows=step, metric=metric)
    add(f"tracer scan_arrays {name} + scan-time R", lambda data=data: scan.scan_arrays(
        data, mq, k, mesh=mesh, chunk_rows=step, metric=metric), bytes_per)
    # int8 rows have no plain row (a store of them needs a metric): they
    # are compared with bf16's scan with R.
    against, what = (
        (f"tracer scan_arrays {name}", "the plain scan") if name != "int8" else
        ("tracer scan_arrays bf16 + scan-time R", "the bf16 scan with R"))
    ratio = table[-1]["seconds"] / next(
        r for r in table if r["method"] == against)["seconds"]
    table[-1]["note"] = (f"{sum(c.shape[1] for c in metric.lowrank)} low-rank "
                         f"columns ({eval_examples} eval examples, blocks of "
                         f"{block}); x{ratio:.2f} {what}")

  tmp = workdir or tempfile.mkdtemp(prefix="tracer-bench-")
  try:
    for dtype, data, bytes_per in (("float32", x, 4), ("bfloat16", xb, 2),
                                   ("int8", x, 1)):
      t = time.perf_counter()
      s = write_store(os.path.join(tmp, f"store-{dtype}"), data, dtype,
                      store_chunk_rows)
      write_s = time.perf_counter() - t
      if dtype == "int8":  # scanned with a metric only (its rows' scales)
        add("tracer scan_store int8 + scan-time R", lambda s=s: scan.scan_store(
            s, mq, k, mesh=mesh, chunk_rows=chunk_rows, metric=metric), bytes_per)
        table[-1]["note"] = (f"x{table[-1]['seconds'] / with_r_s:.2f} the bf16 "
                             f"store's scan with R; write took {write_s:.1f} s")
        continue
      got = scan.scan_store(s, q, k, mesh=mesh, chunk_rows=chunk_rows)
      if dtype == "float32":
        assert np.array_equal(got.proponent_rows, want.proponent_rows)
      add(f"tracer scan_store {dtype}", lambda s=s: scan.scan_store(
          s, q, k, mesh=mesh, chunk_rows=chunk_rows), bytes_per,
          f"warm page cache; write took {write_s:.1f} s")
      verified_s = table[-1]["seconds"]
      add(f"tracer scan_store {dtype}, checksums not verified",
          lambda s=s: scan.scan_store(s, q, k, mesh=mesh, chunk_rows=chunk_rows,
                                      verify=False), bytes_per)
      table[-1]["note"] = (f"the verified scan takes x{verified_s / table[-1]['seconds']:.2f}"
                           " this time")
      if dtype == "bfloat16":
        plain_s = verified_s
        add("tracer scan_store bfloat16 + scan-time R", lambda s=s: scan.scan_store(
            s, mq, k, mesh=mesh, chunk_rows=chunk_rows, metric=metric), bytes_per)
        table[-1]["note"] = f"x{table[-1]['seconds'] / plain_s:.2f} the plain scan"
        with_r_s = table[-1]["seconds"]
  finally:
    if workdir is None:
      shutil.rmtree(tmp, ignore_errors=True)

  pro, _ = numpy_scan(x, q, k)
  assert np.array_equal(np.sort(pro, 1), np.sort(want.proponent_rows, 1))
  add("numpy matmul+argpartition f32", lambda: numpy_scan(x, q, k), 4,
      "chunks of 16384 rows")

  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning("faiss is not installed: skipping its row")
    table.append({"method": "faiss IndexFlatIP f32", "seconds": None,
                  "note": "skipped: faiss not installed (pip install faiss-cpu)"})
  else:
    index = faiss.IndexFlatIP(dim)
    index.add(x)
    both = np.concatenate([q, -q])
    _, ids = index.search(both, k)
    assert np.array_equal(np.sort(ids[:queries], 1),
                          np.sort(want.proponent_rows, 1))
    add("faiss IndexFlatIP f32", lambda: index.search(both, k), 4,
        f"search of [q; -q], {faiss.omp_get_max_threads()} threads; "
        "index.add not timed")
    for row in table[1:]:
      if row.get("seconds"):
        row["vs_faiss"] = round(table[-1]["seconds"] / row["seconds"], 2)
  return table


def matmul_alone(x: np.ndarray, q: np.ndarray, step: int, mesh
                 ) -> Callable[[], None]:
  """A run of XLA's fp32 matmul of ``x [N, d]``'s chunks of ``step`` rows
  (rows split over ``mesh``, placed as the scan places them) with ``q``: the
  scan's scores alone, from the same memory. The roofline's FLOP rate comes
  from a matrix that fits the cache (``measure_sgemm``); this is the rate
  from memory. The last chunk is the last ``step`` rows (the scan pads its
  last step to the same size)."""
  dot = jax.jit(topk.exact_scores)  # an f32 chunk's: one fp32 dot
  qd = jax.device_put(q, partitioning.replicated(mesh))
  rows = partitioning.rows_sharding(mesh)
  step = min(step, len(x) // mesh.size * mesh.size)
  starts = [min(lo, len(x) - step) for lo in range(0, len(x), step)]
  dot(jax.device_put(x[:step], rows), qd).block_until_ready()

  def run():
    last = None  # two steps in flight, as the scan keeps them
    for lo in starts:
      scores = dot(jax.device_put(x[lo:lo + step], rows), qd)
      if last is not None:
        last.block_until_ready()
      last = scores
    last.block_until_ready()
  return run


def write_store(path: str, rows: np.ndarray, dtype: str, chunk_rows: int
                ) -> store_lib.EncodingStore:
  """A new store at ``path`` (replacing one there) holding ``rows [N, d]``."""
  shutil.rmtree(path, ignore_errors=True)
  manifest = store_lib.Manifest(
      checkpoint="bench", step=0, params_fingerprint="-", correction="none",
      epsilon=0.0, projection_seed=0, layout=None, dim=rows.shape[1],
      basis_fingerprint=None, dtype=dtype, corpus="random",
      num_rows=len(rows), chunk_rows=chunk_rows)
  s = store_lib.create_or_open(path, manifest)
  for c in s.pending_chunks():
    lo, hi = s.chunk_bounds(c)
    s.write_chunk(c, rows[lo:hi])
  return s


def run_serve_pass_benchmark(rows: int = 400_000, dim: int = 1024,
                             queries: int = 64, k: int = 100,
                             store_chunk_rows: int = 4096, repeats: int = 3,
                             block: int = 256, workdir: str | None = None,
                             mesh=None, task: int = 240, requests: int = 8
                             ) -> list[dict[str, Any]]:
  """``tracer serve``'s pass (``serving.ResidentIndex.search``: one request
  and its own scan-time R, fitted from its queries as serve fits it) over a
  bf16 store and an f32 store of the same values, both resident on
  ``mesh`` (default: every device), for one query and for ``queries``. The
  baseline is the f32 store's pass in the same run; ``agrees`` and
  ``error`` as ``_agreement``'s (1.0 and 0.0 on a CPU, where bf16 rows are
  widened to f32; elsewhere they take the bf16 units, whose three products
  sum in another order: a near tie may swap).

  Then one query under a task's R (``tracer serve --task_queries``: fitted
  from ``task`` other queries) over the bf16 store: its row norms computed
  in the pass (the baseline), then held (``ResidentIndex.hold``);
  ``agrees`` and ``error`` as above.

  Then the streamed fallback (``_streamed_rows``) for 1 and ``requests``
  requests at once (0: not run)."""
  mesh = mesh or partitioning.make_mesh()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((rows, dim), dtype=np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  x = x.astype(ml_dtypes.bfloat16).astype(np.float32)  # exact in both stores
  segments = tuple((lo, min(lo + block, dim)) for lo in range(0, dim, block))
  basis = hessian.Basis("block", segments, [None] * len(segments),
                        [np.sort(rng.exponential(size=hi - lo))[::-1]
                         for lo, hi in segments], 4096, dim, 0)
  tmp = workdir or tempfile.mkdtemp(prefix="tracer-bench-")
  table = []
  try:
    indexes = {dtype: serving.open_index(
        [write_store(os.path.join(tmp, f"serve-{dtype}"), x, dtype,
                     store_chunk_rows)], mesh, budget_bytes=1 << 62)
               for dtype in ("float32", "bfloat16")}
    for n in sorted({1, queries}):
      psi = rng.standard_normal((n, dim)) * 3
      metric = hessian.fit_metric(basis, psi, rank=max(1, dim // 64))
      vectors = metric.query_vectors(psi)
      answers, seconds = {}, {}
      for dtype, index in indexes.items():
        search = lambda index=index: index.search([[vectors]], [[metric]], [k])[0]
        answers[dtype] = search()  # compiles
        seconds[dtype] = _best_time(search, repeats)
      agrees, error = _agreement([answers["bfloat16"]], [answers["float32"]])
      for dtype in indexes:
        table.append({
            "method": f"serve pass {dtype}, {n} quer{'y' if n == 1 else 'ies'}",
            "seconds": _figure(seconds[dtype]),
            "rows_per_s": round(rows / seconds[dtype]),
            "agrees": agrees if dtype == "bfloat16" else None,
            "error": error if dtype == "bfloat16" else None,
            "note": (f"x{seconds[dtype] / seconds['float32']:.2f} the float32 "
                     f"store's pass; {indexes[dtype].describe()}")})
    if task:
      index = indexes["bfloat16"]
      metric = hessian.fit_metric(basis, rng.standard_normal((task, dim)) * 3,
                                  rank=max(1, dim // 64))
      vectors = metric.query_vectors(rng.standard_normal((1, dim)) * 3)
      search = lambda: index.search([[vectors]], [[metric]], [k])[0]
      answers, seconds = [search()], [_best_time(search, repeats)]
      index.hold([metric])  # compiles; the second hold is timed
      hold = lambda: jax.block_until_ready(index.hold([metric]) or index.held_norms)
      hold_seconds = _best_time(hold, repeats)
      answers.append(search())
      seconds.append(_best_time(search, repeats))
      columns = sum(c.shape[1] for c in metric.lowrank)
      agrees, error = _agreement([answers[1]], [answers[0]])
      for held, (answer, sec) in enumerate(zip(answers, seconds)):
        table.append({
            "method": (f"serve pass bfloat16, 1 query, task R of {task}: norms "
                       + ("held" if held else "in the pass")),
            "seconds": _figure(sec), "rows_per_s": round(rows / sec),
            "agrees": agrees if held else None,
            "error": error if held else None,
            "note": (f"x{sec / seconds[0]:.2f} the norms in the pass; "
                     f"{columns} low-rank columns"
                     + (f"; holding them took {hold_seconds:.3f} s (once, at start)"
                        if held else ""))})
    if requests:
      table += _streamed_rows(indexes["bfloat16"].stores, mesh, basis, dim, k,
                              requests, repeats, rng)
  finally:
    if workdir is None:
      shutil.rmtree(tmp, ignore_errors=True)
  return table


def _agreement(got: Sequence[topk.TopK], want: Sequence[topk.TopK]
               ) -> tuple[float, float]:
  """How far two lists of answers to the same queries agree: the fraction
  of their rows (proponents and opponents, by position) that are the same,
  and the largest difference of their scores relative to ``want``'s."""
  same = [(getattr(a, f) == getattr(b, f)).ravel() for a, b in zip(got, want)
          for f in ("proponent_rows", "opponent_rows")]
  error = max(float(np.max(np.abs(getattr(a, f) - getattr(b, f))
                           / np.abs(getattr(b, f))))
              for a, b in zip(got, want)
              for f in ("proponent_scores", "opponent_scores"))
  return float(np.mean(np.concatenate(same))), error


def _streamed_rows(stores, mesh, basis, dim: int, k: int, requests: int,
                   repeats: int, rng) -> list[dict[str, Any]]:
  """``tracer serve``'s streamed fallback (``serving.StreamedIndex``, windows
  of a quarter of the rows) for 1, 2 and ``requests`` requests of 8 queries
  each, each with its own R, in one batch; the baseline, a
  ``scan.scan_stores`` per request (the fallback before 2026-12-04), in the
  same run. ``agrees`` and ``error`` as ``_agreement``'s (the two passes
  compute the norms in another order, so a near tie may swap)."""
  store = stores[0]
  row_bytes = store.dim * scan.device_dtype(store.dtype).itemsize
  streamed = serving.StreamedIndex(
      stores, mesh, window_bytes=store.num_rows * row_bytes // (4 * mesh.size))
  table = []
  for j in sorted({1, 2, requests}):
    psis = [rng.standard_normal((8, dim)) * 3 for _ in range(j)]
    metrics = [hessian.fit_metric(basis, psi, rank=max(1, dim // 64)) for psi in psis]
    vectors = [m.query_vectors(psi) for m, psi in zip(metrics, psis)]
    batch = lambda: streamed.search([[v] for v in vectors], [[m] for m in metrics],
                                    [k] * j)
    each = lambda: [scan.scan_stores(stores, [v], k, mesh=mesh,
                                     metrics=[m.row_metric()])
                    for v, m in zip(vectors, metrics)]
    answers = [batch(), each()]  # compiles
    seconds = [_best_time(batch, repeats), _best_time(each, repeats)]
    agrees, error = _agreement(*answers)
    batched = "one scan_stores" if j == 1 else "one pass of windows"
    for i, name in enumerate((batched, "a scan_stores per request")):
      table.append({
          "method": (f"serve streamed bfloat16, {j} request{'s' * (j > 1)} of 8 "
                     f"queries: {name}"),
          "seconds": _figure(seconds[i]),
          "rows_per_s": round(store.num_rows / seconds[i]),
          "agrees": None if i else agrees, "error": None if i else error,
          "note": "baseline" if i else (
              f"x{seconds[0] / seconds[1]:.2f} a scan per request; "
              f"{streamed.describe()}")})
  return table


def xla_topk_step(k: int, widen: bool):
  """A baseline scan step for one device: the same scores, then XLA's own
  ``top_k`` over each chunk and over the running list plus the chunk's best
  (what a GPU library would do), to compare with ``topk.step_fn``'s
  selection on accelerators. Returns ``step(state, x, row_ids, queries)``."""
  def best(scores, rows, chunk, chunk_rows):
    cand, at = jax.lax.top_k(chunk, k)
    merged = jax.numpy.concatenate([scores, cand], 1)
    merged_rows = jax.numpy.concatenate([rows, chunk_rows[at]], 1)
    top, at = jax.lax.top_k(merged, k)
    return top, jax.numpy.take_along_axis(merged_rows, at, 1)

  def step(state, x, row_ids, queries):
    s = topk.exact_scores(x, queries, widen).T  # [Q, r]
    ps, pr = best(state.proponent_scores, state.proponent_rows, s, row_ids)
    os_, orows = best(-state.opponent_scores, state.opponent_rows, -s, row_ids)
    return topk.TopKState(ps, pr, -os_, orows)
  return jax.jit(step, donate_argnums=0)


def one_dot_scores(x, queries):
  """``topk.exact_scores`` of bf16 rows without widening, as one dot that
  contracts the three query terms with d: ``f32[r, Q]`` written once, where
  the scan's form writes ``f32[r, 3Q]`` and sums it. Each score is then one
  fp32 sum of 3d exact products (error <= 3d u sum|x_i q_i|, against d u per
  term): a candidate for GPUs, timed by the resident benchmark."""
  x3 = jax.numpy.broadcast_to(x[:, None, :], (x.shape[0], 3, x.shape[1]))
  return jax.lax.dot_general(x3, topk.bf16_terms(queries), (((1, 2), (0, 2)), ((), ())),
                             preferred_element_type=np.float32)


def step_bytes(mesh, step: int, dim: int, queries: int, k: int) -> int | None:
  """XLA's count (``memory.compiled_bytes``) of one device's memory for one
  ``topk.step_fn`` step of ``step`` f32 rows over ``mesh``."""
  rows_1d, rows_2d = (partitioning.rows_sharding(mesh, n) for n in (1, 2))
  shaped = lambda shape, dtype, sharding: jax.ShapeDtypeStruct(
      shape, dtype, sharding=sharding)
  compiled = topk.step_fn(mesh, k, True).lower(
      topk.init_topk(queries, k, mesh), shaped((step, dim), np.float32, rows_2d),
      shaped((step,), np.int32, rows_1d), shaped((step,), np.bool_, rows_1d),
      shaped((queries, dim), np.float32, partitioning.replicated(mesh))).compile()
  return memory.compiled_bytes(compiled)


def run_query_step_benchmark(rows: int = 100_000, dim: int = 256,
                             queries: int = 20_000, k: int = 10,
                             repeats: int = 3) -> list[dict[str, Any]]:
  """``scan_arrays`` over ``[rows, dim]`` f32 rows against ``queries``
  queries in its default steps (``scan.query_capped_step``: fewer rows per
  step as Q grows) and in steps that ignore Q (as before 2026-12-06): best
  seconds of ``repeats`` after a warm-up, and XLA's count of one step's
  memory per device. A step past the memory is refused by the scan's own
  check (``error``) instead of run. Then (``_query_runs_row``) the default
  scan on a memory that fits a quarter of the queries' step, in runs and,
  on several devices, split over them, and split on this machine's memory."""
  mesh = partitioning.make_mesh()
  rng = np.random.default_rng(0)
  x = scan.aligned_empty((rows, dim), np.float32)
  x[...] = rng.standard_normal((rows, dim), dtype=np.float32)
  q = rng.standard_normal((queries, dim), dtype=np.float32)
  platform = mesh.devices.flat[0].platform
  ignoring = min(scan.default_chunk_rows(dim, 4, mesh.size, platform=platform),
                 partitioning.padded_size(rows, mesh.size))
  capped = min(scan.query_capped_step(ignoring, queries, mesh), ignoring)
  table = [{"method": "machine", "note": (
      f"N={rows} d={dim} Q={queries} k={k}, f32 rows 64B-aligned; jax "
      f"{jax.__version__} on {mesh.size} {platform} device(s); "
      f"step_GiB: XLA's count of one step on one device")}]
  for name, step in (("steps that ignore Q (before 2026-12-06)", ignoring),
                     ("default steps, capped by Q", capped)):
    run = lambda step=step: scan.scan_arrays(x, q, k, mesh=mesh, chunk_rows=step)
    row = {"method": name, "step_rows_per_device": step // mesh.size,
           "step_GiB": _figure(step_bytes(mesh, step, dim, queries, k) / 2**30)}
    try:
      run()  # (compiles)
      row["seconds"] = _figure(_best_time(run, repeats))
    except InputError as e:
      row["error"] = str(e)
    table.append(row)
  before, now = table[1:]
  now["note"] = (f"x{now['step_GiB'] / before['step_GiB']:.2f} the memory"
                 + (f", x{now['seconds'] / before['seconds']:.2f} the time"
                    if before.get("seconds") and now.get("seconds") else "")
                 + " of the steps that ignore Q")
  table.append(_query_runs_row(x, q, k, mesh, ignoring, repeats, now))
  if mesh.size > 1:
    table.append(_query_runs_row(x, q, k, mesh, ignoring, repeats, now, split=True))
    table.append(_query_runs_row(x, q, k, mesh, ignoring, repeats, now, split=True,
                                 quarter=False))
  return table


# Rows of f32 noise that run_staged_benchmark draws at a time into its bf16
# rows: all at once would be 4 bytes an element beside their 2.
STAGED_FILL_ROWS = 1 << 20


@contextlib.contextmanager
def _scan_pool(pool_mb: int):
  """``scan.HOST_BUFFER_BYTES`` as ``pool_mb`` MiB within the block (a
  scan still takes at most a quarter of the host, ``scan.host_buffer_bytes``)."""
  saved = scan.HOST_BUFFER_BYTES
  scan.HOST_BUFFER_BYTES = pool_mb << 20
  try:
    yield
  finally:
    scan.HOST_BUFFER_BYTES = saved


def staged_beside_bytes(rows: int, dim: int, pool_mb: int,
                        host: int | None = None) -> int:
  """Host bytes that ``run_staged_benchmark`` holds beside its ``[rows,
  dim]`` bf16 rows: a block of f32 noise (``STAGED_FILL_ROWS`` rows at
  most) and the pool as a scan on a host of ``host`` bytes (default this
  one's) takes it."""
  with _scan_pool(pool_mb):
    pool = scan.host_buffer_bytes(host)
  return min(rows, STAGED_FILL_ROWS) * dim * 4 + pool


def run_staged_benchmark(rows: int = 4_000_000, dim: int = 1024,
                         queries: int = 64, k: int = 100, pool_mb: int = 768,
                         repeats: int = 3) -> list[dict[str, Any]]:
  """``scan_arrays`` over ``[rows, dim]`` bf16 rows that are copied (one
  element off 64-byte alignment) through a pool of ``pool_mb`` MiB (at most
  a quarter of the host, as the scan takes it), best seconds of ``repeats``
  after a warm-up: in steps the pool bounds (its default sets of a step;
  ``chunk_rows``, as every default step was until stop 75) and in the
  default steps, which on devices of their own memory (GPU, TPU) are staged
  through the pool a piece at a time; on a CPU the default is the pooled
  steps. Each row's step and note are the scan's plan (``on_plan``)."""
  mesh = partitioning.make_mesh()
  rng = np.random.default_rng(0)
  bf16 = np.dtype(ml_dtypes.bfloat16)
  x = np.empty(rows * dim + 1, bf16)[1:].reshape(rows, dim)
  for lo in range(0, rows, STAGED_FILL_ROWS):
    x[lo:lo + STAGED_FILL_ROWS] = rng.standard_normal(
        (min(rows, lo + STAGED_FILL_ROWS) - lo, dim), dtype=np.float32)
  q = rng.standard_normal((queries, dim), dtype=np.float32)
  platform = mesh.devices.flat[0].platform
  full = min(scan.default_chunk_rows(dim, 2, mesh.size, platform=platform),
             partitioning.padded_size(rows, mesh.size))
  with _scan_pool(pool_mb):
    agreed, taken = scan.agreed_memory(True, mesh), scan.host_buffer_bytes()
    if not agreed.shared:
      # (as scan._scan holds a step: the other steps' rows a device holds)
      room = agreed.device - agreed.device // scan.QUERY_MEMORY_FRACTION
      full = scan.buffered_step(full, mesh, dim * 2, scan.device_steps(2) - 1, 1,
                                room)
    pooled = scan.buffered_step(full, mesh, dim * 2, scan.pool_sets(2, 0), 1,
                                agreed.pool)
    table = [{"method": "machine", "note": (
        f"N={rows} d={dim} Q={queries} k={k}, bf16 rows copied (unaligned), a "
        f"pool of {pool_mb} MiB" + (
            f" asked, {taken / 2**20:g} MiB taken (a quarter of the host's "
            "memory)" if taken < pool_mb << 20 else "")
        + f"; jax {jax.__version__} on {mesh.size} {platform} device(s)")}]
    for name, step in (("steps the pool bounds (before stop 75)", pooled),
                       ("default steps", None)):
      plans = []
      run = lambda step=step: scan.scan_arrays(x, q, k, mesh=mesh, chunk_rows=step,
                                               on_plan=plans.append)
      run()  # (compiles)
      seconds = _best_time(run, repeats)
      got = plans[0].step
      note = (f"staged: {got.pieces} pieces of {got.piece_rows:,} rows a device, "
              f"{got.sets} sets of a piece" if got.staged else
              f"{got.sets} sets of a step" + (
                  "; the devices share the host's memory: the pooled steps"
                  if step is None and agreed.shared else ""))
      table.append({"method": name, "step_rows_per_device": got.rows,
                    "seconds": _figure(seconds),
                    "GB_per_s": _figure(rows * dim * 2 / seconds / 1e9),
                    "note": note})
  table[-1]["note"] += f"; x{table[-1]['seconds'] / table[-2]['seconds']:.2f} the time"
  return table


def _query_runs_row(x, q, k: int, mesh, step: int, repeats: int,
                    one_run: dict[str, Any], split: bool = False,
                    quarter: bool = True) -> dict[str, Any]:
  """The default scan of ``run_query_step_benchmark`` on a memory that fits
  a step of a quarter of the whole queries (``scan.query_batch``; not
  ``quarter``: this machine's memory): in about 4 passes over the rows, or,
  ``split``, with the queries split over the devices
  (``topk.ring_step_fn``), in as many as that needs."""
  fits = -(-len(q) // 4)
  runs, counts = [], []
  run_once, host, device = scan._scan_run, memory.host_memory_bytes, memory.device_memory_bytes
  count = memory.program_bytes
  if quarter:
    step = min(scan.query_capped_step(step, fits, mesh), step)
    per_device = scan.QUERY_MEMORY_FRACTION * step_bytes(mesh, step, x.shape[1],
                                                         fits, k)
    if device() is None:  # (CPU: the devices share the host's memory)
      memory.host_memory_bytes = lambda: per_device * len(mesh.local_devices)
    else:
      memory.device_memory_bytes = lambda: per_device
  scan._scan_run = lambda sources, qs, *a: runs.append(len(qs[0])) or run_once(
      sources, qs, *a)
  memory.program_bytes = lambda *a: counts.append(count(*a)) or counts[-1]
  try:
    run = lambda: scan.scan_arrays(x, q, k, mesh=mesh, shard_queries=split)
    run()  # (compiles)
    batches, step_count = list(runs), counts[-1]  # (the first step's check)
    seconds = _best_time(run, repeats)
  finally:
    scan._scan_run, memory.host_memory_bytes, memory.device_memory_bytes = (
        run_once, host, device)
    memory.program_bytes = count
  row = {"method": (f"default steps, queries split over {mesh.size} devices"
                    if split else "default steps, in runs")
                   + (f" (memory fits {fits:,} whole queries' step)" if quarter
                      else " (shard_queries=True, this machine's memory)"),
         "step_GiB": _figure(step_count / 2**30),
         "seconds": _figure(seconds),
         "note": f"{len(batches)} run{'s' * (len(batches) > 1)} of "
                 f"{batches[0]:,} queries"}
  if one_run.get("seconds"):
    row["note"] += f", x{seconds / one_run['seconds']:.2f} the time of one run"
  return row


def run_resident_benchmark(rows: int = 16_000_000, dim: int = 1024,
                           queries: int = 64, k: int = 100,
                           step_rows: int | None = None, repeats: int = 3,
                           mesh=None, dtypes=("bfloat16", "float32", "int8"),
                           matmul_size: int = 8192,
                           fused: bool | None = None) -> list[dict[str, Any]]:
  """The scan of a corpus resident in device memory (as at pod scale, where
  the store fits in HBM), against the device's own measured rates.

  The rows are generated on the devices (split over every device, like a
  scan step) and never leave them; the timed loop is the scan's jitted step
  over them. Reported per dtype: seconds (best of ``repeats``), GB/s read,
  ``fraction_of_bandwidth`` (of a jitted sum over the same resident rows),
  useful GFLOP/s (2·N·d·Q) and ``fraction_of_matmul`` (of a measured
  square bf16 matmul of ``matmul_size`` with fp32 accumulation, per device,
  times the devices; bf16 and int8 rows on a GPU/TPU issue three bf16
  products per useful one: ``topk.exact_scores``). int8 rows (an int8
  store's) are timed with scan-time R too: a store of them is scanned with
  a metric only.
  ``fused`` (default: on GPUs): also time bf16 rows with the
  ``fused_scores`` kernel, the whole step and the kernel alone; a kernel that
  fails to compile or disagrees is reported in ``fused_error``, not raised.
  """
  mesh = partitioning.make_mesh() if mesh is None else mesh
  platform = mesh.devices.flat[0].platform
  fused = platform == "gpu" if fused is None else fused
  step = step_rows or scan.default_chunk_rows(dim, 2, mesh.size, platform=platform)
  step = min(step, partitioning.padded_size(rows, mesh.size))
  rows = -(-rows // step) * step
  rows_sharding = partitioning.rows_sharding(mesh)
  ids_sharding = partitioning.rows_sharding(mesh, ndim=1)
  rng = np.random.default_rng(0)
  q = rng.standard_normal((queries, dim), dtype=np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  qs = partitioning.put_global(q, partitioning.replicated(mesh))

  n = matmul_size
  # Random operands: tensor cores run faster on zeros and ones than on data.
  a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), jax.numpy.bfloat16),
                     mesh.devices.flat[0])
  matmul = jax.jit(lambda a: jax.lax.dot(a, a, preferred_element_type=np.float32))
  matmul(a).block_until_ready()
  peak = 2 * n**3 / _best_time(lambda: matmul(a).block_until_ready(), repeats)
  del a
  table = [{"method": "machine", "note": (
      f"{mesh.size} {platform} device(s) ({mesh.devices.flat[0].device_kind}); "
      f"bf16 matmul {peak / 1e12:.1f} TFLOP/s (measured, one device); "
      f"N={rows} d={dim} Q={queries} k={k}, steps of {step} rows; "
      f"jax {jax.__version__}")}]
  for dtype in dtypes:
    make = jax.jit(lambda key: jax.random.randint(key, (step, dim), -127, 128, dtype)
                   if dtype == "int8" else jax.random.normal(key, (step, dim), dtype),
                   out_shardings=rows_sharding)
    itemsize = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype).itemsize
    chunks = [make(jax.random.key(i)) for i in range(rows // step)]
    ids = [jax.device_put(np.arange(lo, lo + step, dtype=np.int32), ids_sharding)
           for lo in range(0, rows, step)]
    valid = jax.device_put(np.ones(step, bool), ids_sharding)
    total = jax.jit(lambda x: x.sum(dtype=np.float32))
    jax.block_until_ready([total(c) for c in chunks])
    bandwidth = rows * dim * itemsize / _best_time(
        lambda: jax.block_until_ready([total(c) for c in chunks]), repeats)
    def scan_with(update):  # update(state, chunk, row_ids) -> state
      state = topk.init_topk(queries, k, mesh)
      for c, i in zip(chunks, ids):
        state = update(state, c, i)
      return jax.block_until_ready(state)

    def run(branch_free=False, fused=False):
      step = topk.step_fn(mesh, k, True, branch_free=branch_free, fused=fused)
      return scan_with(lambda state, c, i: step(state, c, i, valid, qs))

    want = run()
    seconds = _best_time(run, repeats)
    # The step without data-dependent branches (``topk._pick``): the same
    # top-k, for accelerators, where a branch reads its predicate back.
    got = run(branch_free=True)
    for a, b in zip(got, want):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    branch_free_seconds = _best_time(lambda: run(branch_free=True), repeats)
    # The matmul alone (each step's scores reduced to one max per query, so
    # nothing large is written): the rest of ``seconds`` is selection.
    widen = topk.widens_bf16(mesh)
    tiles = topk.score_tile_rows(dim) if topk.tiles_bf16(mesh) else None
    scores_max = jax.jit(lambda x, q: topk.exact_scores(x, q, widen, tiles).max(0))
    jax.block_until_ready([scores_max(c, qs) for c in chunks])
    matmul_seconds = _best_time(
        lambda: jax.block_until_ready([scores_max(c, qs) for c in chunks]), repeats)
    # bf16 rows: the three-term product as one dot over [3, d]
    # (``one_dot_scores``), scores only. The scan's form writes [rows, 3Q] f32 and sums it; on the
    # H200 its scores-only time matched that traffic (WORKSPACE).
    one_dot_seconds = None
    if dtype == "bfloat16":
      one_max = jax.jit(lambda x, q: one_dot_scores(x, q).max(0))
      exact_max = jax.jit(lambda x, q: topk.exact_scores(x, q).max(0))
      np.testing.assert_allclose(np.asarray(one_max(chunks[0], qs)),
                                 np.asarray(exact_max(chunks[0], qs)),
                                 rtol=1e-5, atol=1e-6)
      one_dot_seconds = _best_time(
          lambda: jax.block_until_ready([one_max(c, qs) for c in chunks]), repeats)
    # Scan-time R for bf16 rows (a RowMetric with blocks of 256 dims and Q
    # low-rank columns each, as one request of Q queries has): the whole
    # step, and the row norms alone with the low-rank products on the bf16
    # units (``topk.lowrank_products``, the default off the CPU) and as an
    # f32 matmul at HIGHEST (the CPU's form; before 2026-11-30 everywhere).
    metric_seconds = norms_seconds = norms_highest_seconds = None
    if dtype in ("bfloat16", "int8"):
      rep = partitioning.replicated(mesh)
      segments = tuple((lo, min(lo + 256, dim)) for lo in range(0, dim, 256))
      diag = partitioning.put_global(np.ones(dim, np.float32), rep)
      lowrank = tuple(partitioning.put_global(
          0.01 * rng.standard_normal((hi - lo, queries)).astype(np.float32), rep)
          for lo, hi in segments)
      with_metric = topk.step_fn(mesh, k, True, segments)
      run_metric = lambda: scan_with(lambda state, c, i: with_metric(
          state, c, i, valid, qs, diag, lowrank))
      run_metric()
      metric_seconds = _best_time(run_metric, repeats)
      for on_units in (True, False):
        norms_max = jax.jit(lambda x, w=not on_units: topk._row_norms(  # pylint: disable=protected-access
            x, diag, lowrank, segments, w).max())
        all_norms = lambda: jax.block_until_ready([norms_max(c) for c in chunks])
        all_norms()  # compiled before the clock (it was timed at --repeats=1)
        took = _best_time(all_norms, repeats)
        if on_units:
          norms_seconds = took
        else:
          norms_highest_seconds = took
    # bf16 rows through the fused kernel: the kernel alone (thresholds of
    # +inf: no bit set; its scores reduced to one max per query), then the
    # whole step, with and without branches. Each failure is reported.
    fused_seconds = fused_scores_seconds = fused_branch_free_seconds = None
    fused_errors = []
    if dtype == "bfloat16" and fused:
      try:
        if mesh.size == 1 and fused_scores.supported(step, dim, chunks[0].dtype):
          inf = jax.numpy.full((queries,), np.inf, np.float32)
          kernel_max = jax.jit(lambda x, q: fused_scores.scores_and_words(
              x, topk.bf16_terms(q), inf, -inf, valid,
              interpret=platform != "gpu")[0].max(0))
          np.testing.assert_allclose(np.asarray(kernel_max(chunks[0], qs)),
                                     np.asarray(scores_max(chunks[0], qs)),
                                     rtol=1e-5, atol=1e-6)
          fused_scores_seconds = _best_time(
              lambda: jax.block_until_ready([kernel_max(c, qs) for c in chunks]),
              repeats)
      except Exception as e:  # pylint: disable=broad-except
        fused_errors.append(f"kernel: {type(e).__name__}: {str(e)[:300]}")
        logging.exception("fused kernel alone")
      try:
        got = run(fused=True)
        for name in ("proponent_scores", "opponent_scores"):
          np.testing.assert_allclose(np.asarray(getattr(got, name)),
                                     np.asarray(getattr(want, name)),
                                     rtol=1e-5, atol=1e-6)
        fused_seconds = _best_time(lambda: run(fused=True), repeats)
        for a, b in zip(run(branch_free=True, fused=True), got):
          np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        fused_branch_free_seconds = _best_time(
            lambda: run(branch_free=True, fused=True), repeats)
      except Exception as e:  # pylint: disable=broad-except
        fused_errors.append(f"step: {type(e).__name__}: {str(e)[:300]}")
        logging.exception("fused step")
    # The same scan with XLA's top_k as the selection (one device only).
    baseline_seconds = None
    if mesh.size == 1:
      baseline = xla_topk_step(k, widen)
      run_baseline = lambda: scan_with(lambda state, c, i: baseline(state, c, i, qs))
      got = run_baseline()
      # Equal up to summation order (another matmul library may be picked).
      np.testing.assert_allclose(np.asarray(got.proponent_scores),
                                 np.asarray(want.proponent_scores), rtol=1e-5, atol=1e-6)
      baseline_seconds = _best_time(run_baseline, repeats)
    nbytes = rows * dim * itemsize
    useful = 2 * rows * dim * queries
    three = dtype in ("bfloat16", "int8") and not topk.widens_bf16(mesh)
    issued = useful * (3 if three else 1)
    table.append({
        "method": f"resident scan {dtype}", "seconds": _figure(seconds),
        "rows_per_s": round(rows / seconds), "GB_per_s": _figure(nbytes / seconds / 1e9),
        "fraction_of_bandwidth": _figure(nbytes / seconds / bandwidth),
        "GFLOP_per_s": _figure(useful / seconds / 1e9),
        "fraction_of_matmul": _figure(issued / seconds / (peak * mesh.size)),
        "scores_only_seconds": _figure(matmul_seconds),
        "branch_free_seconds": _figure(branch_free_seconds),
        "one_dot_scores_seconds": (None if one_dot_seconds is None
                                   else _figure(one_dot_seconds)),
        "xla_top_k_seconds": (None if baseline_seconds is None
                              else _figure(baseline_seconds)),
        "fused_seconds": None if fused_seconds is None else _figure(fused_seconds),
        "fused_scores_seconds": (None if fused_scores_seconds is None
                                 else _figure(fused_scores_seconds)),
        "fused_branch_free_seconds": (None if fused_branch_free_seconds is None
                                      else _figure(fused_branch_free_seconds)),
        "fused_error": "; ".join(fused_errors) or None,
        "metric_seconds": None if metric_seconds is None else _figure(metric_seconds),
        "norms_seconds": None if norms_seconds is None else _figure(norms_seconds),
        "norms_highest_seconds": (None if norms_highest_seconds is None
                                  else _figure(norms_highest_seconds)),
        "note": (f"bandwidth {bandwidth / 1e9:.0f} GB/s (jitted sum over the "
                 f"resident rows); {issued // useful} matmul pass(es)"
                 + ("; fp32 matmul (HIGHEST), not the bf16 units"
                    if dtype == "float32" else ""))})
    logging.info("%s", table[-1])
    del chunks
  return table


def run_fused_tiles_benchmark(tiles: list[fused_scores.Tiles], rows: int = 4_194_304,
                              dim: int = 1024, queries: int = 64, k: int = 100,
                              step_rows: int | None = None, repeats: int = 3
                              ) -> list[dict[str, Any]]:
  """The fused kernel under each of ``tiles`` against XLA's form, on bf16
  rows resident on one device (generated there, as ``run_resident_benchmark``).

  Per setting: the kernel alone (no bit set; scores reduced to one max per
  query) and the whole fused step, beside the default step and XLA's scores
  alone in the same run; ``agrees``: the step's top-k scores match the
  default step's (rtol 1e-5: the contraction tile orders each sum). A setting
  that fails to compile is reported in ``error``, not raised. Off a GPU the
  kernel runs in Pallas's interpreter (a check of this code, not a timing).
  """
  device = jax.devices()[0]
  interpret = device.platform != "gpu"
  mesh = partitioning.make_mesh(devices=[device])
  step = step_rows or scan.default_chunk_rows(dim, 2, 1, platform=device.platform)
  step = min(step, rows)
  rows = -(-rows // step) * step
  rng = np.random.default_rng(0)
  q = rng.standard_normal((queries, dim), dtype=np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  qs = jax.device_put(q, device)
  make = jax.jit(lambda key: jax.random.normal(key, (step, dim), jax.numpy.bfloat16))
  chunks = [make(jax.random.key(i)) for i in range(rows // step)]
  ids = [jax.device_put(np.arange(lo, lo + step, dtype=np.int32), device)
         for lo in range(0, rows, step)]
  valid = jax.device_put(np.ones(step, bool), device)
  terms = topk.bf16_terms(qs)
  inf = jax.numpy.full((queries,), np.inf, np.float32)

  def scan_with(update):
    state = topk.init_topk(queries, k, mesh)
    for c, i in zip(chunks, ids):
      state = update(state, c, i, valid, qs)
    return jax.block_until_ready(state)

  def timed(fn):
    fn()
    return _figure(_best_time(fn, repeats))

  default = topk.step_fn(mesh, k, True)
  want = scan_with(default)
  scores_max = jax.jit(lambda x, q: topk.exact_scores(x, q, False).max(0))
  table = [{"method": "machine", "note": (
      f"{device.device_kind}; N={rows} d={dim} Q={queries} k={k}, steps of "
      f"{step} rows; jax {jax.__version__}")},
           {"method": "default step (XLA)", "step_seconds": timed(
               lambda: scan_with(default)),
            "scores_seconds": timed(lambda: jax.block_until_ready(
                [scores_max(c, qs) for c in chunks]))}]
  for t in tiles:
    row = {"method": f"fused {t.rows}:{t.dim}:{t.num_warps}:{t.num_stages}"}
    try:
      if not fused_scores.supported(step, dim, jax.numpy.bfloat16, t):
        raise ValueError(f"unsupported for steps of {step} rows, d={dim}")
      kernel_max = jax.jit(lambda x, t=t: fused_scores.scores_and_words(
          x, terms, inf, -inf, valid, interpret=interpret, tiles=t)[0].max(0))
      row["scores_seconds"] = timed(lambda: jax.block_until_ready(
          [kernel_max(c) for c in chunks]))
      fused = topk.step_fn(mesh, k, True, fused=True, tiles=t)
      got = scan_with(fused)
      row["agrees"] = all(np.allclose(np.asarray(getattr(got, n)),
                                      np.asarray(getattr(want, n)),
                                      rtol=1e-5, atol=1e-6)
                          for n in ("proponent_scores", "opponent_scores"))
      row["step_seconds"] = timed(lambda: scan_with(fused))
    except Exception as e:  # pylint: disable=broad-except
      row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
      logging.exception("tiles %s", t)
    logging.info("%s", row)
    table.append(row)
  return table


def parse_tiles(text: str) -> fused_scores.Tiles:
  """``ROWS:DIM:WARPS:STAGES`` as ``fused_scores.Tiles``."""
  try:
    values = [int(v) for v in text.split(":")]
  except ValueError:
    values = []
  if len(values) != 4:
    raise ValueError(f"--fused_tiles: {text!r} is not ROWS:DIM:WARPS:STAGES "
                     "(four integers)")
  tiles = fused_scores.Tiles(*values)
  if not fused_scores.valid_tiles(tiles):
    raise ValueError(f"--fused_tiles: {text!r}: expected ROWS and DIM powers of "
                     f"two, ROWS >= {fused_scores.GROUP}, DIM >= 16, WARPS and "
                     "STAGES > 0")
  return tiles


def synthetic_metric(dim: int, q: np.ndarray, eval_examples: int, block: int,
                     rng) -> tuple[Any, np.ndarray]:
  """A task-specific scan-time metric of the shape a real run has: R_train's
  spectrum random, R_eval from ``eval_examples`` random examples."""
  segments = tuple((lo, min(lo + block, dim)) for lo in range(0, dim, block))
  basis = hessian.Basis("block", segments, [None] * len(segments),
                        [np.sort(rng.exponential(size=hi - lo))[::-1]
                         for lo, hi in segments], 4096, dim, 0)
  evals = rng.standard_normal((eval_examples, dim)) * 3
  metric = hessian.fit_metric(basis, evals, rank=max(1, dim // 64))
  return metric.row_metric(), metric.query_vectors(q)


def run_query_sets_benchmark(sets: int = 4, rows: int = 400_000, dim: int = 1024,
                             queries: int = 16, k: int = 100,
                             store_chunk_rows: int = 4096, repeats: int = 3,
                             workdir: str | None = None, eval_examples: int = 240,
                             block: int = 256, sizes=None
                             ) -> list[dict[str, Any]]:
  """``sets`` query sets of ``queries`` each (or of ``sizes``), every set
  under its own synthetic scan-time metric (``synthetic_metric``), over
  unit-norm rows in a bf16 store: ``scan.scan_sets`` (one pass, every
  set's norms a row) against ``scan.scan_store`` per set (a pass each),
  and, on several devices, the sets split over them; best of ``repeats``
  after a compiling run; with how far their answers agree. The local
  store's chunks are mapped from a warm page cache, so this measures the
  products and norms, not the reads a pass saves on object storage. A
  ``workdir`` URL (``s3://``, ``gs://``) puts the store there: each pass
  then reads it all."""
  sizes = [queries] * sets if sizes is None else [int(n) for n in sizes]
  if len(sizes) != sets:
    raise InputError(f"query_set_sizes: {len(sizes)} sizes for "
                     f"--query_sets={sets}")
  rng = np.random.default_rng(0)
  # (drawn in f32 and normed without a [rows, dim] temporary: the f32 rows
  # are what check_memory counts beside the store's bf16 chunks)
  x = rng.standard_normal((rows, dim), dtype=np.float32)
  x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
  tmp = workdir or tempfile.mkdtemp(prefix="tracer-bench-sets-")
  store = write_store(os.path.join(tmp, "sets-bf16"), x, "bfloat16",
                      store_chunk_rows)
  del x
  made = [synthetic_metric(dim, rng.standard_normal((n, dim)).astype(
      np.float32), eval_examples, block, rng) for n in sizes]
  mesh = partitioning.make_mesh()
  each = lambda: [scan.scan_store(store, v, k, mesh=mesh, metric=m)
                  for m, v in made]
  one = lambda: scan.scan_sets([store], [[v] for _, v in made], k,
                                   metrics=[[m] for m, _ in made], mesh=mesh)
  wanted = each()
  same, error = _agreement(one(), wanted)
  t_each, t_one = _best_time(each, repeats), _best_time(one, repeats)
  row = lambda method, s, note: {
      "method": method, "seconds": _figure(s), "rows_per_s": round(rows / s),
      "GB_per_s": _figure(rows * dim * 2 / s / 1e9),
      "GFLOP_per_s": _figure(2 * rows * dim * sum(sizes) / s / 1e9),
      "roofline_s": "", "fraction_of_roofline": "", "note": note}
  table = [row(f"scan_store per set ({sets} passes)", t_each,
               f"sets of {'+'.join(map(str, sizes))} queries, k={k}, d={dim}"),
           row("scan_sets (one pass)", t_one,
               f"{t_each / t_one:.2f}x the passes' speed; rows the same: "
               f"{same:.4f}, scores within {error:.1e} (relative)")]
  if mesh.size > 1:  # the sets split over the devices (a ring's blocks)
    split = lambda: scan.scan_sets([store], [[v] for _, v in made], k,
                                   metrics=[[m] for m, _ in made], mesh=mesh,
                                   shard_queries=True)
    same, error = _agreement(split(), wanted)
    t_split = _best_time(split, repeats)
    table.append(row(f"scan_sets split over {mesh.size} devices (one pass)",
                     t_split, f"{t_one / t_split:.2f}x the whole sets' pass; "
                     f"rows the same: {same:.4f}, scores within {error:.1e} "
                     "(relative)"))
  return table


def to_markdown(table: list[dict[str, Any]]) -> str:
  cols = ["method", "seconds", "rows_per_s", "GB_per_s", "GFLOP_per_s",
          "roofline_s", "fraction_of_roofline", "vs_faiss", "scores_only_seconds",
          "branch_free_seconds", "one_dot_scores_seconds", "xla_top_k_seconds",
          "fused_seconds", "fused_scores_seconds", "fused_branch_free_seconds",
          "fused_error", "step_seconds", "scores_seconds", "agrees", "error",
          "fraction_of_bandwidth", "fraction_of_matmul", "step_rows_per_device",
          "step_GiB", "note"]
  cols = [c for c in cols if any(row.get(c) is not None for row in table)
          or c in ("method", "seconds", "note")]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for row in table:
    lines.append("| " + " | ".join(
        "" if row.get(c) is None else str(row[c]) for c in cols) + " |")
  return "\n".join(lines)


# Bytes per element of the [rows, dim] encodings a benchmark holds at once,
# at its peak (read off the functions above). In the host's memory:
# run_scan_benchmark's f32 rows and their bf16 copy while an int8 copy is
# quantized through two f32 temporaries (4 + 2 + 4 + 4);
# run_serve_pass_benchmark's f32 rows beside their bf16 copy and its f32
# widening (4 + 2 + 4), then beside the f32 and bf16 stores made resident
# (on a CPU, device memory is the host's). On the devices (the host's on a
# CPU): run_resident_benchmark's f32 rows (its largest dtype; one at a
# time), split over every device, and run_fused_tiles_benchmark's bf16
# rows on one device. run_query_step_benchmark's aligned f32 rows and the
# draw they are copied from (4 + 4). run_staged_benchmark's bf16 rows (2),
# and beside them, whatever their number, a block of f32 noise and the pool
# (``staged_beside_bytes``; measured with tracemalloc, 2^18 rows x 256 filled
# in blocks of 2^16: the peak was the rows and one f32 block, 1 MB more).
# run_query_sets_benchmark's f32 rows and the bf16 store written from them
# (4 + 2; measured with tracemalloc, 40,000 x 512: 4.2, the store's chunks
# written one at a time; 12 until 2026-12-08, drawn in f64 then narrowed).
HOST_BYTES_PER_ELEMENT = {"scan": 14, "serve_pass": 10, "query_steps": 8,
                          "staged": 2, "query_sets": 6}
DEVICE_BYTES_PER_ELEMENT = {"resident": 4, "fused_tiles": 2}
MODE_NAMES = {"scan": "the scan benchmark", "serve_pass": "--serve_pass",
              "query_steps": "--query_steps", "staged": "--staged_pool_mb",
              "resident": "--resident", "fused_tiles": "--fused_tiles",
              "query_sets": "--query_sets"}


def check_memory(rows: int, dim: int, mode: str, host_bytes: int | None = None,
                 device_bytes: int | None = None, devices: int = 1,
                 beside: int = 0) -> None:
  """InputError, before any array is made, where ``mode``'s (a key of
  ``HOST_BYTES_PER_ELEMENT`` or ``DEVICE_BYTES_PER_ELEMENT``) rows, and
  ``beside`` bytes more (held whatever the rows), would take more than the
  host's memory (``host_bytes``, default ``memory.host_budget``: what
  the process may use less what it holds) or, for the resident modes, more than a
  device's (``device_bytes``; None: the host's, as on a CPU) over
  ``devices`` devices. Before, ``--rows=100000000000`` was numpy's "Unable
  to allocate 373 TiB" traceback (or an OOM kill, past the free memory)."""
  from tracer import memory  # pylint: disable=g-import-not-at-top
  on_device = mode in DEVICE_BYTES_PER_ELEMENT
  per = (DEVICE_BYTES_PER_ELEMENT if on_device else HOST_BYTES_PER_ELEMENT)[mode]
  shares = devices if on_device and device_bytes is not None else 1
  need = -(-rows * dim * per // shares) + beside
  if on_device and device_bytes is not None:
    have, where = device_bytes, f"a device's {device_bytes:,} bytes of memory"
  else:
    have, where = memory.host_budget(host_bytes, lambda n: f"{n:,} bytes")
  if need <= have:
    return
  split = f" on each of {shares} devices" if shares > 1 else ""
  raise InputError(
      f"--rows={rows} --dim={dim}: {MODE_NAMES[mode]} holds about {per} "
      f"bytes per element of its rows x dim encodings"
      + (f" and {beside:,} bytes beside them" if beside else "")
      + f", {need:,} bytes{split}, more than {where}; expected at most "
      f"{max(0, have - beside) * shares // (per * dim):,} rows at --dim={dim}")


def check_flags() -> None:
  """InputError for flags that would fail a run at its end or midway, before
  any array is made: --k past --rows, an --output or --workdir that cannot
  be written (a directory at --output was an IsADirectoryError after every
  timing), rows past the memory."""
  from tracer.launch import outputs  # pylint: disable=g-import-not-at-top
  if _K.value > _ROWS.value:
    raise InputError(f"--k={_K.value}: more than the --rows={_ROWS.value} "
                     "scanned; expected k <= rows")
  outputs.check_writable(_OUTPUT.value, "--output")
  outputs.check_writable(_WORKDIR.value, "--workdir", "directory")
  mode = ("fused_tiles" if _FUSED_TILES.value else "serve_pass"
          if _SERVE_PASS.value else "resident" if _RESIDENT.value else
          "query_steps" if _QUERY_STEPS.value else "staged"
          if _STAGED.value else "query_sets" if _QUERY_SETS.value else "scan")
  if mode in DEVICE_BYTES_PER_ELEMENT:
    from tracer import memory  # pylint: disable=g-import-not-at-top
    # Starting the backends logs (at INFO) each one missing, e.g. libtpu:
    # not before a refusal's one line.
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)
    try:
      device_bytes = memory.device_memory_bytes()
    finally:
      logging.set_verbosity(verbosity)
    check_memory(_ROWS.value, _DIM.value, mode, device_bytes=device_bytes,
                 devices=jax.device_count() if mode == "resident" else 1)
  else:
    check_memory(_ROWS.value, _DIM.value, mode, beside=staged_beside_bytes(
        _ROWS.value, _DIM.value, _STAGED.value) if mode == "staged" else 0)


def main(argv):
  del argv
  check_flags()
  if _FUSED_TILES.value:
    table = run_fused_tiles_benchmark(
        [parse_tiles(t) for t in _FUSED_TILES.value], rows=_ROWS.value,
        dim=_DIM.value, queries=_QUERIES.value, k=_K.value,
        step_rows=_CHUNK_ROWS.value, repeats=_REPEATS.value)
  elif _SERVE_PASS.value:
    table = run_serve_pass_benchmark(
        rows=_ROWS.value, dim=_DIM.value, queries=_QUERIES.value, k=_K.value,
        store_chunk_rows=_STORE_CHUNK_ROWS.value, repeats=_REPEATS.value,
        block=_BLOCK.value, workdir=_WORKDIR.value, requests=_REQUESTS.value)
  elif _QUERY_STEPS.value:
    table = run_query_step_benchmark(rows=_ROWS.value, dim=_DIM.value,
                                     queries=_QUERIES.value, k=_K.value,
                                     repeats=_REPEATS.value)
  elif _STAGED.value:
    table = run_staged_benchmark(rows=_ROWS.value, dim=_DIM.value,
                                 queries=_QUERIES.value, k=_K.value,
                                 pool_mb=_STAGED.value, repeats=_REPEATS.value)
  elif _QUERY_SETS.value:
    table = run_query_sets_benchmark(
        sets=_QUERY_SETS.value, rows=_ROWS.value, dim=_DIM.value,
        queries=_QUERIES.value, k=_K.value,
        store_chunk_rows=_STORE_CHUNK_ROWS.value, repeats=_REPEATS.value,
        workdir=_WORKDIR.value, eval_examples=_EVAL.value, block=_BLOCK.value,
        sizes=_QUERY_SET_SIZES.value)
  elif _RESIDENT.value:
    table = run_resident_benchmark(
        rows=_ROWS.value, dim=_DIM.value, queries=_QUERIES.value, k=_K.value,
        step_rows=_CHUNK_ROWS.value, repeats=_REPEATS.value)
  else:
    table = run_scan_benchmark(
        rows=_ROWS.value, dim=_DIM.value, queries=_QUERIES.value, k=_K.value,
        chunk_rows=_CHUNK_ROWS.value, store_chunk_rows=_STORE_CHUNK_ROWS.value,
        repeats=_REPEATS.value, workdir=_WORKDIR.value,
        eval_examples=_EVAL.value, block=_BLOCK.value)
  text = to_markdown(table)
  print(text)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      if _OUTPUT.value.endswith(".json"):
        json.dump(table, f, indent=2)
      else:
        f.write(text + "\n")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
