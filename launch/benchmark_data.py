r"""Benchmark (not a test): host memory while tokenizing and encoding, vs. N.

  tracer benchmark-data --rows=10000,1000000 --workdir=/tmp/bench_data

For each N: writes a JSONL corpus of N generated documents, then, each in a
fresh process (so that peak RSS belongs to one phase):
  tokenize     ``tracer.corpus.tokenize`` of the JSONL into a directory;
  encode dir   ``tracer.pipeline.encode_corpus`` of every row of that
               directory into a bf16 store (the pod path: rows read per batch);
  encode jsonl the same from the JSONL read into memory (``tracer.data.Corpus``,
               the small path), as the baseline that grows with N.
Peak RSS is ``getrusage(RUSAGE_SELF).ru_maxrss`` of the phase's process. The
model is a nano LM (random init, V = 1), on one CPU device.

  tracer benchmark-data --rows=1000000 --tokenize_processes=1,2

instead times tokenizing the corpus (as 8 JSONL shards) with each number of
processes side by side (``tokenize(num_shards=P)``, the last one joining),
wall time from the first start to the last exit, against one process;
``--shards_as=jsonl,gzip,zstd,parquet`` times the same shards compressed, or
as Parquet files (snappy, pyarrow's default), as well; ``parquet1`` the
corpus as one Parquet file and ``parquet3`` as three (row groups of
``ONE_FILE_ROW_GROUP`` rows), which processes split by row groups, and
``jsonl1`` / ``gzip1`` as one JSONL file, plain or gzip, which they split
by lines (``data.split_files``).

  tracer benchmark-data --read=s3://bucket/c4-train.00000-of-01024.json.gz

reads each file's records (JSONL lines or Parquet rows) streamed
(``tracer.data.iter_records``) and, as the baseline, read whole first, each
in a fresh process: seconds, peak memory.

  tracer benchmark-data --encode_memory=examples,encodings,chunk

measures the peak host memory of an encode (``phase_encode_memory``: peak
RSS, each size in a fresh process, after the step's program is compiled)
against ``EncodeConfig.batch_size`` (per example: the ``examples`` sweep's
long rows, the ``encodings`` sweep's long encodings) and ``chunk_rows`` x d
(per chunk element: ``chunk``, ``chunk_float32``), fits each sweep's slope
and fixed cost, and sets them against what ``tracer.pipeline``'s two host
memory checks count (``BATCH_EXAMPLE_COPIES``, ``BATCH_ENCODING_COPIES``,
``CHUNK_BYTES_PER_ELEMENT``). With ``--encode_memory_devices=8``, on 8
simulated CPU devices; each run also reports XLA's count of the step's
program (the encoder's check: x the devices) and one step's own peak.

  tracer benchmark-data \
      --scan_memory=bfloat16,float32,bfloat16_8,float32_8,bfloat16_q256

measures the peak host memory of a store scan (``phase_scan_memory``:
``tracer.scan.scan_store`` of a local store written for the sweep, with an
explicit ``chunk_rows`` so that every step is read into the pooled host
buffers; peak RSS, each size in a fresh process, after a first scan has
compiled the step) against the step's rows, on 1 CPU device or (``_8``) 8
simulated ones, fits the bytes per step element and sets them against the
pool ``scan._BufferPool`` plans (``sets`` x the step's bytes) and the sets
it made.

  tracer benchmark-data --join_docs=100000000 --join_parts=64

times the join's id check over that many documents' hashes in that many
parts (zarr arrays, as ``tokenize`` writes them): the merge in blocks
(``tracer.corpus.first_shared_hash``) against, as the baseline, every hash
read and sorted at once (the join before 2026-12-01), each in a fresh
process: seconds, peak memory.
"""

from __future__ import annotations

import gc
import glob
import gzip
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time

from absl import flags

from tracer.errors import InputError
from tracer.launch import cli


def define_flags() -> None:
  """Defines this script's flags (only when run as a script, so that tests
  can import ``tokenize_table`` beside the launch scripts' flags)."""
  flags.DEFINE_list("rows", ["10000", "1000000"], "Corpus sizes N.")
  flags.DEFINE_string("workdir", "/tmp/tracer_bench_data", "Scratch directory.")
  flags.DEFINE_integer("max_len", 32, "Tokens per row.", lower_bound=1)
  flags.DEFINE_integer("batch_size", 1024, "Rows per encode call.", lower_bound=1)
  flags.DEFINE_string("phase", None, "Internal: run one phase in this process "
                      "(a JSON list: its name and arguments).")
  flags.DEFINE_string("json_out", None, "Also write the rows as JSON here.")
  flags.DEFINE_list("tokenize_processes", [], "Time tokenizing with these "
                    "numbers of processes instead (8 JSONL shards).")
  flags.DEFINE_list("shards_as", ["jsonl"], "With --tokenize_processes: the "
                    "shards' formats, each timed: jsonl, gzip, zstd, parquet, "
                    "parquet1 (one file), parquet3 (three files), jsonl1, gzip1 "
                    "(one JSONL file).")
  flags.DEFINE_integer("join_docs", 0, "Instead: time the join's id check over "
                       "this many documents' hashes (--join_parts parts).",
                       lower_bound=0)
  flags.DEFINE_integer("join_parts", 64, "Parts of --join_docs.", lower_bound=1)
  flags.DEFINE_list("encode_memory", [], "Instead: an encode's peak host "
                    "memory against EncodeConfig.batch_size and chunk_rows, in "
                    "these sweeps (ENCODE_MEMORY_SWEEPS): examples, encodings, "
                    "chunk, chunk_float32; each size in a fresh process.")
  flags.DEFINE_integer("encode_memory_devices", 1, "With --encode_memory: on "
                       "this many CPU devices (more than 1 simulated by "
                       "XLA_FLAGS).", lower_bound=1)
  flags.DEFINE_list("scan_memory", [], "Instead: a store scan's peak host "
                    "memory against its step's rows, in these sweeps "
                    "(SCAN_MEMORY_SWEEPS): bfloat16, float32 (1 CPU device), "
                    "bfloat16_8, float32_8 (8 simulated CPU devices), "
                    "bfloat16_q256 (256 queries); each size in a fresh process.")
  flags.DEFINE_list("read", [], "Instead: read these JSONL or Parquet files "
                    "(paths or URLs) record by record, streamed and read "
                    "whole, each in a fresh process: seconds and peak memory.")
  # Checked as flags, before any corpus is written (before 2026-12-06:
  # int() tracebacks, numpy's "negative dimensions", "the corpus is empty",
  # a missing manifest.json of 0 processes' corpus, after the work before).
  cli.check_list_flag("rows", least=1)
  cli.check_list_flag("tokenize_processes", least=1, empty_ok=True)
  cli.check_list_flag("shards_as", choices=SHARD_FORMATS)
  cli.check_list_flag("encode_memory", choices=tuple(ENCODE_MEMORY_SWEEPS),
                      empty_ok=True)
  cli.check_list_flag("scan_memory", choices=tuple(SCAN_MEMORY_SWEEPS),
                      empty_ok=True)


FLAGS = flags.FLAGS

WORDS = ("alpha beta gamma delta epsilon zeta theta iota kappa lambda sigma "
         "omega river stone cloud north south amber cedar maple").split()


def write_jsonl(path: str, n: int) -> None:
  """``n`` random documents as JSONL at ``path``, written under a temporary
  name and renamed: a run only reuses a corpus that exists, so one killed
  mid-write must leave none (a partial one was timed as if whole)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  lengths = rng.integers(3, 9, n)
  picks = rng.integers(0, len(WORDS), int(lengths.sum()))
  with open(path + ".tmp", "w") as f:
    at = 0
    for i, k in enumerate(lengths):
      text = " ".join(WORDS[j] for j in picks[at:at + k])
      at += k
      f.write(f'{{"id": "doc{i}", "text": "{text}"}}\n')
  os.replace(path + ".tmp", path)


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mb() -> float:
  """This process's resident memory now (Linux; else its peak)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
  except OSError:
    return peak_rss_mb()


def hwm_mb() -> float:
  """This process's peak RSS since ``reset_peak_rss`` (VmHWM; ``ru_maxrss``
  also keeps the peak of any thread that ended before the reset)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024  # kB
  raise OSError("/proc/self/status: no VmHWM")


def reset_peak_rss() -> bool:
  """Sets this process's peak RSS (VmHWM) to its RSS now, so that a later
  ``hwm_mb`` is one phase's, not the imports' or a compile's; False where
  the kernel does not let it (not Linux)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def phase_tokenize(jsonl: str, out: str, max_len: int, num_shards: str = "1",
                   shard_index: str = "0") -> dict:
  from tracer import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  from tracer.config import DataConfig  # pylint: disable=g-import-not-at-top
  DataConfig().vocabulary()  # seqio's import is not the tokenizer's memory
  base = peak_rss_mb()
  start = time.perf_counter()
  corpus = corpus_lib.tokenize(jsonl, out, DataConfig(), max_len,
                               num_shards=int(num_shards),
                               shard_index=int(shard_index))
  return {"seconds": time.perf_counter() - start, "rows": len(corpus),
          "baseline_mb": base, "peak_mb": peak_rss_mb()}


def phase_encode(source: str, store: str, max_len: int, batch_size: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from tracer import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  from tracer import model as model_lib  # pylint: disable=g-import-not-at-top
  from tracer import pipeline  # pylint: disable=g-import-not-at-top
  from tracer import store as store_lib  # pylint: disable=g-import-not-at-top
  from tracer.config import DataConfig, EncodeConfig  # pylint: disable=g-import-not-at-top
  from tracer.encoder import GradientEncoder  # pylint: disable=g-import-not-at-top
  cfg = model_lib.ModelConfig(max_len=max_len, d_model=16, num_layers=1,
                              num_heads=2, d_ff=32)
  params = jax.device_get(model_lib.init_params(cfg))
  encoder = GradientEncoder(model_lib.make_loss_fn(cfg), params, projection_dim=256,
                            microbatch_size=batch_size)
  DataConfig().vocabulary()
  ecfg = EncodeConfig(chunk_rows=4096, batch_size=batch_size)

  def encode(corpus, location):
    manifest = store_lib.Manifest(
        checkpoint="nano", step=0, params_fingerprint="nano", correction="none",
        epsilon=1e-8, projection_seed=0, layout=None, dim=encoder.dim,
        basis_fingerprint=None, dtype=ecfg.store_dtype, corpus=corpus.source,
        num_rows=len(corpus), chunk_rows=ecfg.chunk_rows)
    return pipeline.encode_corpus(encoder, None, corpus,
                                  pipeline.open_store(location, manifest),
                                  batch_size).rows

  # Compiled first, on one batch of another corpus (before 2026-12-04 the
  # rate included the compilation: 1,657 rows/s at 10^4 rows, 6,318 at 10^6).
  start = time.perf_counter()
  write_jsonl(store + "_warmup.jsonl", batch_size)
  encode(corpus_lib.open_corpus(store + "_warmup.jsonl", DataConfig(), max_len),
         f"memory://benchmark_data_warmup/{time.time_ns()}")  # (a new store each call)
  compile_s = time.perf_counter() - start
  base = peak_rss_mb()
  start = time.perf_counter()
  corpus = corpus_lib.open_corpus(source, DataConfig(), max_len)
  read_s = time.perf_counter() - start
  encoded = encode(corpus, store)
  seconds = time.perf_counter() - start
  return {"seconds": seconds, "read_s": read_s, "rows": encoded,
          "rows_per_s": encoded / (seconds - read_s), "compile_s": compile_s,
          "baseline_mb": base, "peak_mb": peak_rss_mb()}


def memory_model(name: str, max_len: int):
  """The model of an ``--encode_memory`` sweep: ``nano`` (phase_encode's, at
  ``max_len``: long rows against short encodings) or ``tiny`` (tiny.gin's
  sizes, ModelConfig's defaults: encodings up to d = 65,406)."""
  from tracer import model as model_lib  # pylint: disable=g-import-not-at-top
  if name == "nano":
    return model_lib.ModelConfig(max_len=max_len, d_model=16, num_layers=1,
                                 num_heads=2, d_ff=32)
  if name == "tiny":
    return model_lib.ModelConfig()
  raise ValueError(f"{name!r}: expected nano or tiny")


def phase_encode_memory(source: str, store: str, model: str, max_len: str,
                        projection_dim: str, batch_size: str, chunk_rows: str,
                        microbatch: str, dtype: str = "bfloat16") -> dict:
  """``pipeline.encode_corpus`` of every row of the tokenized ``source`` into
  a store of ``dtype``: this process's RSS before it and its peak during it
  (once the step's program is compiled), with the sizes the pipeline's two
  host-memory checks read (an example's bytes, this process's batch, a
  chunk's elements)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tracer import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  from tracer import data as data_lib  # pylint: disable=g-import-not-at-top
  from tracer import memory  # pylint: disable=g-import-not-at-top
  from tracer import model as model_lib  # pylint: disable=g-import-not-at-top
  from tracer import pipeline  # pylint: disable=g-import-not-at-top
  from tracer import store as store_lib  # pylint: disable=g-import-not-at-top
  from tracer.config import DataConfig  # pylint: disable=g-import-not-at-top
  from tracer.encoder import GradientEncoder  # pylint: disable=g-import-not-at-top
  cfg = memory_model(model, int(max_len))
  batch_size, chunk_rows = int(batch_size), int(chunk_rows)
  params = jax.device_get(model_lib.init_params(cfg))
  encoder = GradientEncoder(model_lib.make_loss_fn(cfg), params,
                            projection_dim=int(projection_dim),
                            microbatch_size=int(microbatch))
  corpus = corpus_lib.open_corpus(source, DataConfig(), cfg.max_len)
  manifest = store_lib.Manifest(
      checkpoint=model, step=0, params_fingerprint=model, correction="none",
      epsilon=1e-8, projection_seed=0, layout=None, dim=encoder.dim,
      basis_fingerprint=None, dtype=dtype, corpus=corpus.source,
      num_rows=len(corpus), chunk_rows=chunk_rows)
  example = data_lib.examples_from_tokens(np.zeros((1, cfg.max_len), np.int32),
                                          np.zeros(1, np.int32))
  local = encoder.local_batch_size(min(batch_size, len(corpus)))
  # The step's program planned, verified and compiled for this batch's shape
  # before the clock and the peak start (its first call reuses it). Compiled
  # inside the encode, its peak hid the batches' (2026-12-06, a run by hand:
  # nano, L = 512, microbatch 16, 8,192 rows: 455 MB over the baseline at
  # batches of 512, 532 at 8,192, whose examples alone are 45 MB more a copy).
  examples, _ = pipeline.read_padded(corpus, np.arange(min(local, len(corpus))),
                                     local)
  batch = jax.tree.map(encoder.put_local, examples)
  program = encoder._program(batch)  # pylint: disable=protected-access
  # What the encoder's check holds to the host: XLA's count of one device's
  # memory (this lowering is jit's, cached), times this process's devices.
  compiled = program.lower(encoder._constants, batch).compile()  # pylint: disable=protected-access
  counted = compiled.memory_analysis()
  del examples, batch
  reset = reset_peak_rss()
  base = rss_mb() if reset else peak_rss_mb()
  start = time.perf_counter()
  rows = pipeline.encode_corpus(encoder, None, corpus,
                                pipeline.open_store(store, manifest),
                                batch_size).rows
  seconds = time.perf_counter() - start
  peak = hwm_mb() if reset else peak_rss_mb()
  # Then one more step's own peak over its resident arguments (its
  # temporaries and outputs, on every device), against that count. (Run
  # before the baseline instead, what it freed was still in the baseline on
  # 1 device, 2026-12-06: 627, 910, 1,191 MB at the encodings sweep's
  # batches.)
  examples, _ = pipeline.read_padded(corpus, np.arange(min(local, len(corpus))),
                                     local)
  batch = jax.tree.map(encoder.put_local, examples)
  gc.collect()
  before = rss_mb()
  reset_peak_rss()
  jax.block_until_ready(program(encoder._constants, batch))  # pylint: disable=protected-access
  step_mb = hwm_mb() - before if reset else None
  return {"seconds": seconds, "rows": rows,
          "dim": encoder.dim, "max_len": cfg.max_len,
          "example_bytes": sum(v.nbytes for v in example.values()),
          "local_batch": local,
          "chunk_elements": min(chunk_rows, len(corpus)) * encoder.dim,
          "devices": len(encoder.mesh.local_devices),
          "xla_bytes": memory.compiled_bytes(compiled),
          "xla_argument_bytes": counted and counted.argument_size_in_bytes,
          "xla_temp_bytes": counted and counted.temp_size_in_bytes,
          "xla_output_bytes": counted and counted.output_size_in_bytes,
          "step_mb": step_mb, "baseline_mb": base, "peak_mb": peak,
          "peak_reset": reset}


def phase_scan_memory(store: str, chunk_rows: str, queries: str = "8",
                      k: str = "10") -> dict:
  """``scan.scan_store`` of the local store ``store`` in steps of
  ``chunk_rows`` rows (explicit: each step read into the pooled buffers, none
  mapped in place) over every device of this process: its RSS before the
  second of two scans (the first compiles the step and warms the page
  cache) and its peak during it, with the pool the scan planned (its sets,
  each a step's local rows) and the sets it made."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tracer import partitioning  # pylint: disable=g-import-not-at-top
  from tracer import scan  # pylint: disable=g-import-not-at-top
  from tracer import store as store_lib  # pylint: disable=g-import-not-at-top
  s = store_lib.open_store(store)
  q = np.random.default_rng(0).standard_normal((int(queries), s.dim), np.float32)
  mesh = partitioning.make_mesh()
  pools = []

  class Counted(scan._BufferPool):  # pylint: disable=protected-access
    """The pool as planned, and the sets it made by the end of the scan."""
    # pylint: disable=protected-access

    def close(self):
      elements = sum(a * b for a, b in self._shapes)
      pools.append({"sets": self._size, "made": self._made,
                    "set_bytes": elements * np.dtype(self._dtype).itemsize})
      super().close()

  run = lambda: scan.scan_store(s, q, int(k), mesh=mesh, chunk_rows=int(chunk_rows))
  real, scan._BufferPool = scan._BufferPool, Counted  # pylint: disable=protected-access
  try:
    return _scan_memory(run, s, mesh, int(chunk_rows), pools)
  finally:
    scan._BufferPool = real  # pylint: disable=protected-access


def _scan_memory(run, s, mesh, chunk_rows: int, pools: list) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from tracer import partitioning  # pylint: disable=g-import-not-at-top
  from tracer import scan  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(run())
  # What the first scan (and its compile) left for the collector, collected
  # before the baseline: uncollected, it was in the baseline and freed
  # during the second scan, whose peak then hid most of its pool (by hand,
  # 2026-12-06: 16 MiB of pooled sets, 0.4 MB over the baseline).
  gc.collect()
  reset = reset_peak_rss()
  base = rss_mb() if reset else peak_rss_mb()
  start = time.perf_counter()
  jax.block_until_ready(run())
  seconds = time.perf_counter() - start
  pool = pools[-1]
  step = partitioning.padded_size(chunk_rows, mesh.size)
  return {"seconds": seconds, "rows": s.num_rows, "dim": s.dim,
          "dtype": str(s.dtype), "devices": mesh.size,
          "step_rows": step, "step_elements": step * s.dim,
          "step_bytes": step * s.dim * scan.device_dtype(s.dtype).itemsize,
          "pool_sets": pool["sets"], "pool_made": pool["made"],
          "pool_bytes": pool["sets"] * pool["set_bytes"],
          "baseline_mb": base, "peak_mb": hwm_mb() if reset else peak_rss_mb(),
          "peak_reset": reset}


def phase_read(location: str, whole: str = "0") -> dict:
  """Every record of ``location``: streamed (``data.iter_records``), or with
  the file read whole first (how object storage was read before 2026-12-01;
  a Parquet file through ``pyarrow.parquet.read_table``)."""
  from tracer import data as data_lib  # pylint: disable=g-import-not-at-top
  from tracer import storage  # pylint: disable=g-import-not-at-top
  base = peak_rss_mb()
  start = time.perf_counter()
  columns = ("id", "text")
  if whole == "1":
    data = storage.read_bytes(location)
    if data.startswith(b"PAR1"):
      import pyarrow as pa  # pylint: disable=g-import-not-at-top
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
      table = pq.read_table(pa.BufferReader(data), columns=list(columns))
      lines = sum(1 for values in zip(*(table.column(c).to_pylist() for c in columns))
                  if dict(zip(columns, values)))  # the records iter_records makes
    else:
      text, _ = data_lib.decompressed(io.BufferedReader(io.BytesIO(data)), location)
      lines = sum(1 for line in io.BytesIO(text.read()) if json.loads(line))
  else:
    lines = sum(1 for _ in data_lib.iter_records(location, columns))
  return {"seconds": time.perf_counter() - start, "lines": lines,
          "baseline_mb": base, "peak_mb": peak_rss_mb()}


# Hashes per chunk of a part's array (``tracer.corpus.BLOCK_ROWS``, its
# appender's block), without importing tracer in the parent process.
BLOCK_ROWS = 16384


def _zarr(path: str) -> dict:
  return {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}


def phase_join(directory: str, parts: str, merged: str) -> dict:
  """The join's id check over ``parts`` hash arrays under ``directory``:
  merged in blocks, or (``merged == "0"``) read whole and sorted."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  from tracer import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  arrays = [ts.open(_zarr(os.path.join(directory, f"part{i}")), open=True).result()
            for i in range(int(parts))]
  base = peak_rss_mb()
  start = time.perf_counter()
  if merged == "1":
    shared = corpus_lib.first_shared_hash(arrays)
  else:
    everything = np.sort(np.concatenate([a.read().result() for a in arrays]))
    repeats = np.flatnonzero(everything[1:] == everything[:-1])
    shared = int(everything[repeats[0]]) if len(repeats) else None
  return {"seconds": time.perf_counter() - start, "shared": shared,
          "baseline_mb": base, "peak_mb": peak_rss_mb()}


def join_table(docs: int, parts: int, workdir: str) -> list[dict]:
  """``phase_join`` merged and whole over ``docs`` random hashes in ``parts``
  sorted arrays (written once, as tokenize's parts keep them)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, f"join{docs}x{parts}")
  if not os.path.exists(os.path.join(directory, "done")):
    rng = np.random.default_rng(0)
    for i in range(parts):
      n = docs // parts + (i < docs % parts)
      values = np.sort(rng.integers(0, 2**64 - 1, n, np.uint64, endpoint=True))
      array = ts.open(_zarr(os.path.join(directory, f"part{i}")), create=True,
                      delete_existing=True, dtype=ts.uint64, shape=[n],
                      chunk_layout=ts.ChunkLayout(chunk_shape=[BLOCK_ROWS])).result()
      array.write(values).result()
    open(os.path.join(directory, "done"), "w").close()
  results = []
  for merged in ("1", "0"):
    results.append({"how": ("whole", "merged")[int(merged)],
                    **run_phase(phase_flag("join", directory, parts, merged))})
    print(json.dumps(results[-1]), flush=True)
  if len({r["shared"] for r in results}) != 1:
    raise RuntimeError(f"the two checks disagree: {results}")
  print(f"\n| {docs:,} documents in {parts} parts | s | peak MB over baseline |")
  print("|---|---:|---:|")
  for r in results:
    print(f"| {r['how']} | {r['seconds']:.2f} | {r['peak_mb'] - r['baseline_mb']:,.0f} |")
  return results


def read_table(locations: list[str]) -> list[dict]:
  """``phase_read`` of each location, streamed then whole, in fresh processes."""
  results = []
  for location in locations:
    for whole in ("0", "1"):
      results.append({"location": location, "how": ("streamed", "whole")[int(whole)],
                      **run_phase(phase_flag("read", location, whole))})
      print(json.dumps(results[-1]), flush=True)
  print("\n| file | read | s | lines | peak MB over baseline |")
  print("|---|---|---:|---:|---:|")
  for r in results:
    print(f"| {r['location']} | {r['how']} | {r['seconds']:.2f} | {r['lines']:,} | "
          f"{r['peak_mb'] - r['baseline_mb']:,.0f} |")
  return results


def _phase_env() -> dict:
  return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
              JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")


def phase_failed(what: str, returncode: int, stderr: str) -> Exception:
  """A phase's process's failure: its own one line where bad input ended it
  (a --read file that is not JSONL: ``cli.fail``'s ``error: ...``, exit 2),
  else a RuntimeError with the end of its stderr (a bug)."""
  lines = stderr.strip().splitlines()
  if returncode == cli.EXIT_BAD_INPUT and lines and lines[-1].startswith("error: "):
    return InputError(lines[-1].removeprefix("error: "))
  return RuntimeError(f"{what} failed:\n{stderr[-3000:]}")


def phase_flag(what: str, *args) -> str:
  """The ``--phase`` flag that runs ``what`` on ``args`` in a fresh process:
  a JSON list, so that an argument holding a comma (a ``--workdir`` of
  ``w,x``) stays one (comma-joined, it was split in two)."""
  return "--phase=" + json.dumps([what, *map(str, args)])


def parse_phase(value: str) -> list[str]:
  """``phase_flag``'s value (``--phase``'s) back as [what, *args]."""
  return json.loads(value)


def run_phase(*args: str, env: dict | None = None) -> dict:
  proc = subprocess.run([sys.executable, "-m", "tracer.launch.benchmark_data", *args],
                        env={**_phase_env(), **(env or {})}, capture_output=True,
                        text=True)
  if proc.returncode:
    raise phase_failed(f"phase {args}", proc.returncode, proc.stderr)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def run_sharded_tokenize(pattern: str, out: str, processes: int,
                         max_len: int) -> dict:
  """Wall time of ``processes`` tokenize processes side by side, from the
  first start to the last exit (each process's own import time included)."""
  start = time.perf_counter()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tracer.launch.benchmark_data",
       phase_flag("tokenize", pattern, out, processes, i),
       f"--max_len={max_len}"], env=_phase_env(), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(processes)]
  outputs = [p.communicate() for p in procs]
  seconds = time.perf_counter() - start
  for p, (_, err) in zip(procs, outputs):
    if p.returncode:
      raise phase_failed(f"tokenize on {processes} processes", p.returncode, err)
  from tracer import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  corpus = corpus_lib.TokenizedCorpus(out)
  parts = corpus.manifest.parts  # (None: one process's, a corpus of one part)
  return {"processes": processes, "seconds": seconds, "rows": len(corpus),
          "part_rows": [p["num_rows"] for p in parts] if parts else [len(corpus)],
          "process_seconds": [json.loads(o.strip().splitlines()[-1])["seconds"]
                              for o, _ in outputs]}


# Each --shards_as format's file name suffix.
SHARD_SUFFIX = {"jsonl": ".jsonl", "gzip": ".jsonl.gz", "zstd": ".jsonl.zst",
                "parquet": ".parquet", "parquet1": ".parquet", "parquet3": ".parquet",
                "jsonl1": ".jsonl", "gzip1": ".jsonl.gz"}
SHARD_FORMATS = tuple(SHARD_SUFFIX)

# Rows per row group of the few-file Parquet corpora (``--shards_as=parquet1``,
# ``parquet3``).
ONE_FILE_ROW_GROUP = 1 << 16


def _shard_bytes(fmt: str, lines: list[bytes]) -> bytes:
  """JSONL ``lines`` as a shard file of the format ``fmt``."""
  if fmt in ("parquet", "parquet1", "parquet3"):
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    records = [json.loads(line) for line in lines]
    table = pa.table({k: [r[k] for r in records] for k in ("id", "text")})
    out = io.BytesIO()
    pq.write_table(table, out, row_group_size=None if fmt == "parquet"
                   else ONE_FILE_ROW_GROUP)
    return out.getvalue()
  data = b"".join(lines)
  if fmt in ("gzip", "gzip1"):
    return gzip.compress(data, 6)
  if fmt == "zstd":
    import zstandard  # pylint: disable=g-import-not-at-top
    return zstandard.ZstdCompressor(level=3).compress(data)
  return data


def tokenize_table(rows: int, counts: list[int], workdir: str, max_len: int,
                   formats: tuple[str, ...] = ("jsonl",)) -> list[dict]:
  """Tokenizing ``rows`` documents (8 shards: JSONL, compressed, Parquet; or
  ``parquet1`` / ``parquet3``: one or three Parquet files, split among
  processes by row groups; ``jsonl1`` / ``gzip1``: one JSONL file, plain or
  gzip, split among processes by lines) on each of ``counts`` processes;
  every run's corpus has the same rows."""
  root = os.path.join(workdir, f"shards{rows}")
  os.makedirs(root, exist_ok=True)
  jsonl = os.path.join(root, "corpus.jsonl")
  suffix = SHARD_SUFFIX
  files_of = {"parquet1": 1, "parquet3": 3, "jsonl1": 1, "gzip1": 1}  # else 8
  stem = {fmt: {1: "one", 3: "three"}.get(files_of.get(fmt), "shard")
          for fmt in suffix}
  if unknown := set(formats) - set(suffix):
    raise ValueError(f"--shards_as: {sorted(unknown)}; expected {', '.join(suffix)}")
  if not os.path.exists(jsonl):
    write_jsonl(jsonl, rows)
  # (a run killed mid-tokenize leaves its corpus: reruns would grow)
  for stale in glob.glob(os.path.join(glob.escape(root), "tokenized*")):
    shutil.rmtree(stale, ignore_errors=True)
  with open(jsonl, "rb") as f:
    lines = f.readlines()
  for fmt in formats:
    files = files_of.get(fmt, 8)
    for i in range(files):
      path = os.path.join(root, f"{stem[fmt]}-{i}{suffix[fmt]}")
      if not os.path.exists(path):
        part = lines[i * len(lines) // files:(i + 1) * len(lines) // files]
        with open(path + ".tmp", "wb") as f:
          f.write(_shard_bytes(fmt, part))
        os.replace(path + ".tmp", path)
  results = []
  for fmt in formats:
    for count in counts:
      out = os.path.join(root, f"tokenized{count}-{time.time_ns()}")
      results.append({"shards": fmt, **run_sharded_tokenize(
          os.path.join(root, f"{stem[fmt]}-*{suffix[fmt]}"), out, count, max_len)})
      # (measured: one corpus at a time on the disk, as check_disk counts)
      shutil.rmtree(out, ignore_errors=True)
      print(json.dumps(results[-1]), flush=True)
  if len({r["rows"] for r in results}) != 1:
    raise RuntimeError(f"the runs' corpora differ in rows: {results}")
  base = results[0]["seconds"]
  print("\n| shards | processes | wall s | x first row | each process's tokenize s |")
  print("|---|---:|---:|---:|---|")
  for r in results:
    print(f"| {r['shards']} | {r['processes']} | {r['seconds']:.1f} | "
          f"x{base / r['seconds']:.2f} | "
          f"{', '.join(f'{s:.1f}' for s in r['process_seconds'])} |")
  return results


# --encode_memory's sweeps: each varies one setting of an encode and holds
# the others (``vary``: batch or chunk_rows, over ``sizes``). ``examples``: a
# nano LM at L = 256 (an example's 3,072 bytes against its encoding's 820);
# ``encodings``: tiny.gin's sizes at d = 65,406 (an encoding's 261,624 bytes
# against an example's 1,536); ``chunk``: tiny.gin's sizes at d = 65,406,
# batches of 64, a bf16 store (``chunk_float32``: a float32 one). A batch
# sweep's corpus has 4x its largest batch, so that every size reaches the
# steady state (one batch encoded while the next are read ahead); a chunk
# sweep's the largest chunk.
ENCODE_MEMORY_SWEEPS = {
    "examples": {"vary": "batch", "sizes": (2048, 4096, 8192, 16384),
                 "model": "nano", "max_len": 256, "projection_dim": 256,
                 "microbatch": 16, "batch": None, "chunk_rows": 256,
                 "rows": 65536, "dtype": "bfloat16"},
    "encodings": {"vary": "batch", "sizes": (512, 1024, 2048), "model": "tiny",
                  "max_len": 128, "projection_dim": 65536, "microbatch": 8,
                  "batch": None, "chunk_rows": 256, "rows": 8192,
                  "dtype": "bfloat16"},
    "chunk": {"vary": "chunk_rows", "sizes": (512, 1024, 2048, 4096),
              "model": "tiny", "max_len": 128, "projection_dim": 65536,
              "microbatch": 8, "batch": 64, "chunk_rows": None, "rows": 4096,
              "dtype": "bfloat16"},
    "chunk_float32": {"vary": "chunk_rows", "sizes": (1024, 2048, 4096),
                      "model": "tiny", "max_len": 128, "projection_dim": 65536,
                      "microbatch": 8, "batch": 64, "chunk_rows": None,
                      "rows": 4096, "dtype": "float32"},
}

# The encode phases' allocator: arrays past 1 MiB mapped when made and
# unmapped when freed, so that the peak counts the arrays alive at once, not
# freed memory glibc keeps for reuse (its default threshold rises to the
# largest array freed, up to 32 MiB). The checks' arrays (GiBs) are past
# 32 MiB, mapped either way.
ENCODE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def fit_line(x, y) -> tuple[float, float, float]:
  """Least squares ``y ~ slope * x + fixed``: (slope, fixed, the largest
  residual's size)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  x, y = np.asarray(x, float), np.asarray(y, float)
  slope, fixed = np.polyfit(x, y, 1)
  return float(slope), float(fixed), float(np.max(np.abs(y - slope * x - fixed)))


def made_once(root: str, make) -> None:
  """``make(root)`` into a fresh directory ``root``, unless a run before
  finished it (its ``done`` marker); a part-made one is removed first."""
  if not os.path.exists(os.path.join(root, "done")):
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    make(root)
    open(os.path.join(root, "done"), "w").close()


def encode_memory_table(names: list[str], workdir: str,
                        sweeps: dict | None = None, devices: int = 1) -> dict:
  """``phase_encode_memory`` over each sweep of ``names`` (of ``sweeps``,
  default ``ENCODE_MEMORY_SWEEPS``), each size in a fresh process on
  ``devices`` CPU devices (more than 1 simulated by XLA_FLAGS); the
  fitted slopes (bytes per example of this process's batch, per chunk
  element: of the peak over the baseline) against the pipeline's checks."""
  sweeps = ENCODE_MEMORY_SWEEPS if sweeps is None else sweeps
  results = {"runs": [], "fits": {}}
  for name in names:
    sweep = sweeps[name]
    root = os.path.join(workdir, f"memory-{sweep['model']}-{sweep['max_len']}-"
                                 f"{sweep['rows']}")

    def tokenized(root, sweep=sweep):
      write_jsonl(os.path.join(root, "corpus.jsonl"), sweep["rows"])
      run_phase(phase_flag("tokenize", f"{root}/corpus.jsonl",
                           f"{root}/tokenized"), f"--max_len={sweep['max_len']}")
    made_once(root, tokenized)
    for size in sweep["sizes"]:
      settings = {**sweep, sweep["vary"]: size}
      store = os.path.join(root, "store")
      shutil.rmtree(store, ignore_errors=True)
      run = run_phase(
          phase_flag("encode_memory", f"{root}/tokenized", store,
                     *(settings[key] for key in (
                         "model", "max_len", "projection_dim", "batch",
                         "chunk_rows", "microbatch", "dtype"))),
          env={**ENCODE_MEMORY_ENV, "XLA_FLAGS":
               f"--xla_force_host_platform_device_count={devices}"})
      shutil.rmtree(store, ignore_errors=True)
      run = {"sweep": name, "batch": settings["batch"],
             "chunk_rows": settings["chunk_rows"], "dtype": settings["dtype"],
             "model": settings["model"], **run}
      results["runs"].append(run)
      print(json.dumps(run), flush=True)
    runs = [r for r in results["runs"] if r["sweep"] == name]
    x = [r["local_batch"] if sweep["vary"] == "batch" else r["chunk_elements"]
         for r in runs]
    slope, fixed, residual = fit_line(
        x, [(r["peak_mb"] - r["baseline_mb"]) * 2**20 for r in runs])
    # (The step's program: XLA's count x devices, as the encoder's check.)
    xla_slope, xla_fixed, _ = fit_line(
        x, [r["xla_bytes"] * r["devices"] for r in runs])
    results["fits"][name] = {
        "per": "example" if sweep["vary"] == "batch" else "chunk element",
        "bytes": slope, "fixed_mb": fixed / 2**20, "residual_mb": residual / 2**20,
        "example_bytes": runs[0]["example_bytes"], "dim": runs[0]["dim"],
        "devices": runs[0]["devices"], "xla_bytes": xla_slope,
        "xla_fixed_mb": xla_fixed / 2**20}
  print("\n| sweep | model | devices | d | example bytes | batch | chunk rows | "
        "store | chunk elements | baseline MB | peak MB | peak - baseline MB | "
        "XLA's count x devices MB | one step's peak MB | encode s |")
  print("|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
  for r in results["runs"]:
    print(f"| {r['sweep']} | {r['model']} | {r['devices']} | {r['dim']:,} | "
          f"{r['example_bytes']:,} | {r['local_batch']:,} | {r['chunk_rows']:,} | "
          f"{r['dtype']} | {r['chunk_elements']:,} | {r['baseline_mb']:,.0f} | "
          f"{r['peak_mb']:,.0f} | {r['peak_mb'] - r['baseline_mb']:,.0f} | "
          f"{r['xla_bytes'] * r['devices'] / 2**20:,.0f} | {r['step_mb'] or 0:,.0f} | "
          f"{r['seconds']:.1f} |")
  results["checks"] = check_lines(results["fits"])
  print()
  for line in results["checks"]:
    print(line)
  return results


# --scan_memory's sweeps: each scans one local store (``rows`` x ``dim`` of
# ``dtype``, stored chunks of ``store_chunk_rows``) in steps of ``sizes``
# rows with ``queries`` queries, on ``devices`` CPU devices (1, or 8
# simulated by XLA_FLAGS). The store holds 8 of the largest steps. With 8
# queries the device outruns the reads and the pool makes 4-6 of its 6
# sets; ``bfloat16_q256``'s device is the slower, so the pool makes them all
# (and the step's scores, ``[rows, Q]`` on the CPU's devices, are host
# memory too).
SCAN_MEMORY_SWEEPS = {
    f"{dtype}{suffix}": {"dtype": dtype, "devices": devices, "dim": 512,
                         "store_chunk_rows": 2048, "rows": 8 * 65536,
                         "sizes": (8192, 16384, 32768, 65536), "queries": queries}
    for suffix, devices, queries in (("", 1, 8), ("_8", 8, 8), ("_q256", 1, 256))
    for dtype in ("bfloat16", "float32")
    if dtype == "bfloat16" or suffix != "_q256"}


def write_scan_store(path: str, dtype: str, rows: int, dim: int,
                     chunk_rows: int) -> None:
  """A complete local store of ``rows`` random rows at ``path`` (written
  chunk by chunk, as the tests' stores are)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tracer import store as store_lib  # pylint: disable=g-import-not-at-top
  manifest = store_lib.Manifest(
      checkpoint="bench", step=0, params_fingerprint="-", correction="none",
      epsilon=0.0, projection_seed=0, layout=None, dim=dim,
      basis_fingerprint=None, dtype=dtype, corpus="random", num_rows=rows,
      chunk_rows=chunk_rows)
  s = store_lib.create_or_open(path, manifest)
  for c in s.pending_chunks():
    lo, hi = s.chunk_bounds(c)
    x = np.random.default_rng(c).standard_normal((hi - lo, dim), np.float32)
    s.write_chunk(c, x)


def scan_memory_table(names: list[str], workdir: str,
                      sweeps: dict | None = None) -> dict:
  """``phase_scan_memory`` over each sweep of ``names`` (of ``sweeps``,
  default ``SCAN_MEMORY_SWEEPS``), each size in a fresh process with the
  sweep's devices; each sweep's fitted bytes per step element (of the peak
  over the baseline) against the pool's planned bytes per step element."""
  sweeps = SCAN_MEMORY_SWEEPS if sweeps is None else sweeps
  results = {"runs": [], "fits": {}}
  for name in names:
    sweep = sweeps[name]
    store = os.path.join(workdir, f"scan-{sweep['dtype']}-{sweep['rows']}-"
                                  f"{sweep['dim']}-{sweep['store_chunk_rows']}")
    made_once(store, lambda root, sweep=sweep: write_scan_store(
        os.path.join(root, "store"), sweep["dtype"], sweep["rows"], sweep["dim"],
        sweep["store_chunk_rows"]))
    env = {**ENCODE_MEMORY_ENV, "XLA_FLAGS":
           f"--xla_force_host_platform_device_count={sweep['devices']}"}
    for size in sweep["sizes"]:
      run = run_phase(phase_flag("scan_memory", f"{store}/store", size,
                                 sweep["queries"]), env=env)
      run = {"sweep": name, "queries": sweep["queries"], **run}
      run["made_bytes"] = run["pool_made"] * run["step_bytes"]
      run["beyond_mb"] = run["peak_mb"] - run["baseline_mb"] - run["made_bytes"] / 2**20
      results["runs"].append(run)
      print(json.dumps(run), flush=True)
    runs = [r for r in results["runs"] if r["sweep"] == name]
    peaks = [(r["peak_mb"] - r["baseline_mb"]) * 2**20 for r in runs]
    slope, fixed, residual = fit_line([r["step_elements"] for r in runs], peaks)
    copies, made_fixed, made_residual = fit_line([r["made_bytes"] for r in runs],
                                                 peaks)
    itemsize = runs[0]["step_bytes"] / runs[0]["step_elements"]
    results["fits"][name] = {
        "bytes": slope, "fixed_mb": fixed / 2**20, "residual_mb": residual / 2**20,
        "copies": slope / itemsize, "pool_sets": runs[0]["pool_sets"],
        "pool_bytes": runs[0]["pool_sets"] * itemsize,
        "made_multiple": copies, "made_fixed_mb": made_fixed / 2**20,
        "made_residual_mb": made_residual / 2**20,
        "devices": runs[0]["devices"], "dtype": runs[0]["dtype"],
        "queries": runs[0]["queries"]}
  print("\n| sweep | devices | store | Q | step rows | step MB | pool sets "
        "(made) | pool MB | baseline MB | peak MB | peak - baseline MB | beyond "
        "the sets made MB | scan s |")
  print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in results["runs"]:
    print(f"| {r['sweep']} | {r['devices']} | {r['dtype']} | {r['queries']} | "
          f"{r['step_rows']:,} | {r['step_bytes'] / 2**20:,.0f} | {r['pool_sets']} "
          f"({r['pool_made']}) | {r['pool_bytes'] / 2**20:,.0f} | "
          f"{r['baseline_mb']:,.0f} | {r['peak_mb']:,.0f} | "
          f"{r['peak_mb'] - r['baseline_mb']:,.0f} | {r['beyond_mb']:,.1f} | "
          f"{r['seconds']:.1f} |")
  results["checks"] = []
  print()
  # (A small run's slope may be 0 or below: RSS moves in pages, and late.)
  for name, f in results["fits"].items():
    line = (f"{name}: {f['bytes']:.2f} bytes per step element (+ "
            f"{f['fixed_mb']:,.0f} MB fixed, residual <= {f['residual_mb']:.1f} "
            f"MB) = {f['copies']:.2f} copies of the step's rows; the pool plans "
            f"{f['pool_bytes']:.0f} ({f['pool_sets']} sets); against the sets "
            f"made: {f['made_multiple']:.3f} x their bytes (+ "
            f"{f['made_fixed_mb']:,.1f} MB fixed, residual <= "
            f"{f['made_residual_mb']:.1f} MB)")
    results["checks"].append(line)
    print(line)
  return results


def check_lines(fits: dict) -> list[str]:
  """Each fit, against what ``tracer.pipeline``'s checks count; the two
  batch sweeps together solved for the copies of an example and of its
  float32 encoding that the slope holds."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tracer import pipeline  # pylint: disable=g-import-not-at-top
  lines = []
  # (A small run's slope may be 0 or below: RSS moves in pages, and late.)
  times = lambda a, b: f"{a / b:.2f} x" if b > 0 else "no multiple of"
  for name, f in fits.items():
    if f["per"] == "example":
      e, row = f["example_bytes"], 4 * f["dim"]
      counted = (pipeline.BATCH_EXAMPLE_COPIES * e
                 + pipeline.BATCH_ENCODING_COPIES * row)
      lines.append(
          f"{name}: {f['bytes']:,.0f} bytes per example (+ {f['fixed_mb']:,.0f} MB "
          f"fixed, residual <= {f['residual_mb']:.1f} MB) = {times(f['bytes'], e)} "
          f"its {e:,} bytes (the check before 2026-12-06 counted 4 x); the check "
          f"counts {counted:,.0f} ({times(counted, f['bytes'])} the slope)")
    else:
      counted = pipeline.CHUNK_BYTES_PER_ELEMENT
      lines.append(
          f"{name}: {f['bytes']:.2f} bytes per chunk element (+ {f['fixed_mb']:,.0f} "
          f"MB fixed, residual <= {f['residual_mb']:.1f} MB); the check counts "
          f"{counted} ({times(counted, f['bytes'])} the slope)")
    if "xla_bytes" in f:
      lines.append(
          f"{name}: the step's program, XLA's count x {f['devices']} devices "
          f"(the encoder's check): {f['xla_bytes']:,.2f} bytes per {f['per']} + "
          f"{f['xla_fixed_mb']:,.0f} MB")
  batch = [f for f in fits.values() if f["per"] == "example"]
  if len(batch) >= 2:
    a = np.array([[f["example_bytes"], 4 * f["dim"]] for f in batch], float)
    copies, *_ = np.linalg.lstsq(a, np.array([f["bytes"] for f in batch]), rcond=None)
    lines.append(
        f"batch: {copies[0]:.2f} copies of each example's bytes and {copies[1]:.2f} "
        f"of its float32 encoding (4 d bytes) per example; the check counts "
        f"{pipeline.BATCH_EXAMPLE_COPIES} and {pipeline.BATCH_ENCODING_COPIES}")
  return lines


def check_inputs() -> None:
  """InputError, before any corpus is written or phase run, for an output
  that cannot be written (``--json_out`` a directory was an
  IsADirectoryError after the whole run; ``--workdir`` a file) or a
  ``--read`` file that is not there (a RuntimeError from its phase's
  process)."""
  from tracer import storage  # pylint: disable=g-import-not-at-top
  from tracer.launch import outputs  # pylint: disable=g-import-not-at-top
  outputs.check_writable(FLAGS.json_out, "--json_out")
  if not FLAGS.read:  # (the only mode that writes nothing there)
    outputs.check_writable(FLAGS.workdir, "--workdir", "directory")
  if not (FLAGS.read or FLAGS.join_docs or FLAGS.encode_memory
          or FLAGS.scan_memory):
    check_disk(list(map(int, FLAGS.rows)), FLAGS.max_len,
               bool(FLAGS.tokenize_processes), FLAGS.workdir,
               formats=tuple(FLAGS.shards_as),
               processes=max(map(int, FLAGS.tokenize_processes), default=1))
  for location in FLAGS.read:
    local = storage.local_path(location)
    if local is not None and os.path.isdir(local):
      why = "is a directory"
    elif not storage.exists(location):
      why = storage.missing(location)
    else:
      continue
    raise InputError(f"--read={location}: {why}; expected a JSONL or Parquet "
                     "file (a path or URL)")


# Disk per corpus row, measured (2026-12-06, --rows=20000, --max_len=32):
# the JSONL 62 bytes, the tokenized corpus 253 (about 8 per token), each of
# the two stores (dim 256, bf16) 422. A --shards_as format's shards are
# counted at the JSONL's bytes (measured: jsonl 62, Parquet 21, gzip 9).
JSONL_BYTES_PER_ROW, TOKENIZED_BYTES_PER_TOKEN, STORE_BYTES_PER_ROW = 62, 8, 422
# What each part of a tokenized corpus (one a tokenize process) rounds up
# to whole chunks: its tokens, ids and texts (corpus.TOKEN_CHUNK_BYTES,
# BYTES_CHUNK: 1 MiB each; measured, 20,000 rows took 5.1 MB on one
# process, 7.6 MB on two).
TOKENIZED_PART_BYTES = 3 << 20


def check_disk(rows: list[int], max_len: int, tokenize_only: bool,
               workdir: str, free: int | None = None,
               formats: tuple[str, ...] = ("jsonl",),
               processes: int = 1) -> None:
  """InputError, before any corpus is written, where the ``--rows`` corpora
  (each kept in its own ``n{rows}`` directory) and what is made from them
  would take more than the ``free`` bytes of ``workdir``'s disk (default:
  what its nearest existing directory's file system has free). Before,
  ``--rows=10000000000`` wrote until the disk was full. ``tokenize_only``
  (``--tokenize_processes``): each corpus's shards in each of ``formats``
  are kept, and one tokenized corpus at a time, of up to ``processes``
  parts (``tokenize_table`` removes each once measured; until 2026-12-08
  it counted no shards and kept every one)."""
  tokenized = TOKENIZED_BYTES_PER_TOKEN * max_len
  if tokenize_only:
    kept = JSONL_BYTES_PER_ROW * (1 + len(formats))
    extra = processes * TOKENIZED_PART_BYTES
    need = sum(rows) * kept + max(rows) * tokenized + extra
  else:
    kept, extra = JSONL_BYTES_PER_ROW + tokenized + 2 * STORE_BYTES_PER_ROW, 0
    need = sum(rows) * kept
  per = kept + (tokenized if tokenize_only else 0)
  if free is None:
    from tracer.launch import outputs  # pylint: disable=g-import-not-at-top
    free = shutil.disk_usage(outputs.nearest_existing(os.path.abspath(workdir))).free
  if need > free:
    from tracer import memory  # pylint: disable=g-import-not-at-top
    made = (f" (shards as {', '.join(formats)}, one tokenized corpus at a "
            f"time in up to {processes} parts of whole chunks, "
            f"{memory.size_text(extra)})" if tokenize_only else "")
    raise InputError(
        f"--rows={','.join(map(str, rows))}: the corpora and what is made of them"
        f"{made} take about {per:,} bytes per row at --max_len={max_len}, "
        f"{memory.size_text(need)}, more than the {memory.size_text(free)} free "
        f"at --workdir={workdir}; expected at most "
        f"{max(0, free - extra) // per:,} rows in all")


def write_json(results) -> None:
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(results, f, indent=2)


def main(argv):
  del argv
  if FLAGS.phase:
    what, *paths = parse_phase(FLAGS.phase)
    if what == "tokenize":
      out = phase_tokenize(*paths[:2], FLAGS.max_len, *paths[2:])
    elif what == "read":
      out = phase_read(*paths)
    elif what == "join":
      out = phase_join(*paths)
    elif what == "encode_memory":
      out = phase_encode_memory(*paths)
    elif what == "scan_memory":
      out = phase_scan_memory(*paths)
    else:
      out = phase_encode(*paths, FLAGS.max_len, FLAGS.batch_size)
    print(json.dumps(out))
    return
  check_inputs()
  if FLAGS.read:
    write_json(read_table(FLAGS.read))
    return
  if FLAGS.join_docs:
    write_json(join_table(FLAGS.join_docs, FLAGS.join_parts, FLAGS.workdir))
    return
  if FLAGS.encode_memory:
    write_json(encode_memory_table(FLAGS.encode_memory, FLAGS.workdir,
                                   devices=FLAGS.encode_memory_devices))
    return
  if FLAGS.scan_memory:
    write_json(scan_memory_table(FLAGS.scan_memory, FLAGS.workdir))
    return
  if FLAGS.tokenize_processes:
    write_json([tokenize_table(int(n), list(map(int, FLAGS.tokenize_processes)),
                               FLAGS.workdir, FLAGS.max_len, tuple(FLAGS.shards_as))
                for n in FLAGS.rows])
    return
  results = []
  for n in map(int, FLAGS.rows):
    root = os.path.join(FLAGS.workdir, f"n{n}")
    os.makedirs(root, exist_ok=True)
    jsonl = os.path.join(root, "corpus.jsonl")
    if not os.path.exists(jsonl):
      write_jsonl(jsonl, n)
    tok = os.path.join(root, "tokenized")
    # Each phase's output made anew: tokenize and encode skip what a run
    # before finished (a second run timed nothing: 0 rows/s).
    for name in ("tokenized", "store_dir", "store_jsonl"):
      shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    common = [f"--max_len={FLAGS.max_len}", f"--batch_size={FLAGS.batch_size}"]
    row = {"rows": n,
           "tokenize": run_phase(phase_flag("tokenize", jsonl, tok), *common),
           "encode_dir": run_phase(phase_flag(
               "encode", tok, os.path.join(root, "store_dir")), *common),
           "encode_jsonl": run_phase(phase_flag(
               "encode", jsonl, os.path.join(root, "store_jsonl")), *common)}
    results.append(row)
    print(json.dumps(row), flush=True)
  print("\n| rows | tokenize s | tokenize peak MB | encode dir rows/s | encode dir "
        "peak MB | encode JSONL-in-memory peak MB | JSONL read s |")
  print("|---:|---:|---:|---:|---:|---:|---:|")
  for r in results:
    print(f"| {r['rows']:,} | {r['tokenize']['seconds']:.1f} | "
          f"{r['tokenize']['peak_mb']:,.0f} | {r['encode_dir']['rows_per_s']:,.0f} | "
          f"{r['encode_dir']['peak_mb']:,.0f} | {r['encode_jsonl']['peak_mb']:,.0f} | "
          f"{r['encode_jsonl']['read_s']:.1f} |")
  write_json(results)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
