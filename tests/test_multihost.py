"""Several processes, one global mesh: the pod-scale data path under
``jax.distributed`` (gloo) equals a single-process run, and no host does
another host's work.

Workers (2 processes x 4 simulated CPU devices = 8 global devices) run while
the pytest process computes the same things over its own 8 devices. Run as a
script (``python tests/test_multihost.py worker PORT ID WORKDIR SHARED``) this
file is the worker.

Covered:
  1. ``GradientEncoder.project`` / ``encode`` of a batch of 11 examples, with
     and without a preconditioner, on the (8, 1) and (4, 2) meshes.
  2. The store pipeline over a tokenized corpus on disk (``tracer.pipeline``):
     the sharded R_train moments, ``encode_corpus`` (rows in a shared basis) (each process reads exactly its
     share of rows and writes its own chunks; the bf16 store is bitwise the
     single-process store), a rerun after chunks were lost (only those are
     redone), ``scan_store`` and ``stream_corpus`` with the query set's R
     applied at scan time.
     The same store with the model axis spanning both processes (one data
     group: both read every row, one writes) equals the single-process one
     to the last bf16 bit of a few values (the model axis's sums then cross
     processes, in another order).
  3. ``launch.trace`` itself on 2 processes with ``model_axis=2``, the store
     (with its basis) and results on an S3-compatible server: the results equal
     a single-process run's with a local store.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
import types

import jax
import ml_dtypes
import numpy as np
import pytest

import tracer
import tracer.hessian
from tracer import checkpoint as ckpt_lib
from tracer import corpus as corpus_lib
from tracer import data as data_lib
from tracer import model as model_lib
from tracer import partitioning
from tracer import pipeline
from tracer import scan as scan_lib
from tracer import storage
from tracer import store as store_lib
from tracer import train as train_lib
from tracer.config import DataConfig, EncodeConfig, PreconditionerConfig
from tracer.errors import InputError

import multiprocess  # tests/ is on sys.path (pytest rootdir, or the script's dir)

CONFIG = model_lib.ModelConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32,
                               max_len=8)
EPS = 1e-4
SEED = 3
PROJECTION_DIM = 600
K = 4
NUM_DOCS = 96
CHUNK_ROWS = 16          # 6 chunks: 3 per process
BATCH_SIZE = 11          # global examples per encode call (not a step multiple)
R_SAMPLE = 64
LOST_CHUNKS = (1, 4)     # chunks whose markers vanish before the rerun
TIMEOUT_S = 300  # both workers; a normal run takes ~60 s on 2 loaded cores

# Meshes, with a microbatch size that makes each encode call one step (a
# batch of up to 16 or 12 examples): one compilation per encoder.
MESHES = {
    "8x1": (lambda: partitioning.make_mesh(), 2),
    "4x2": (lambda: partitioning.make_mesh(4, 2), 3),
}
PIPELINE_MESH = "4x2"
# The model axis across both processes: one data group, process 0 writes.
SPANNING_MESH = (lambda: partitioning.make_mesh(1, 8), 11)

# Few examples for R: rank deficient on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:R is estimated")


def lm_batch(n: int, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return data_lib.stack_examples([
      data_lib.corpus_example(
          rng.integers(3, CONFIG.vocab_size, rng.integers(2, CONFIG.max_len + 1)
                       ).astype(np.int32), CONFIG.max_len)
      for _ in range(n)])


def second_moment(params) -> dict:
  rng = np.random.default_rng(1)
  return jax.tree.map(
      lambda x: np.exp(rng.normal(size=x.shape) * 1.5).astype(np.float32) * 1e-4,
      params)


def params_and_v():
  params = jax.device_get(model_lib.init_params(CONFIG, seed=0))
  return params, second_moment(params)


@functools.lru_cache(maxsize=None)
def make_encoder(mesh_name: str) -> tracer.GradientEncoder:
  """One encoder per mesh (parts 1 and 2 share it: one compilation)."""
  make, microbatch = MESHES.get(mesh_name, SPANNING_MESH)
  params, v = params_and_v()
  return tracer.GradientEncoder(
      model_lib.make_loss_fn(CONFIG), params, second_moment=v, epsilon=EPS,
      projection_dim=PROJECTION_DIM, seed=SEED, mesh=make(),
      microbatch_size=microbatch)


def encoder_case(mesh_name: str) -> dict[str, np.ndarray]:
  """Part 1: projections and encodings of 11 examples on one mesh."""
  enc = make_encoder(mesh_name)
  batch = lm_batch(11, 10)
  train, queries = lm_batch(16, 11), lm_batch(5, 12)
  halves = [{k: v[:9] for k, v in train.items()},
            {k: v[9:] for k, v in train.items()}]
  pre = tracer.fit_preconditioner(enc, halves, [queries], kind="full",
                                  rank=3, damping=0.1)
  out = {"project": partitioning.fetch(enc.project(batch)),
         "plain": enc.encode(batch),
         "encode": enc.encode(batch, pre),
         "lam": np.float64(pre.lam)}
  for i, m in enumerate(pre.inv_sqrt):
    out[f"inv_sqrt{i}"] = np.asarray(m)
  return {f"{mesh_name}/{k}": v for k, v in out.items()}


def query_examples() -> dict:
  rng = np.random.default_rng(12)
  return data_lib.stack_examples([
      data_lib.query_example(rng.integers(3, CONFIG.vocab_size, 3),
                             rng.integers(3, CONFIG.vocab_size, 2), CONFIG.max_len)
      for _ in range(3)])


def write_shared(shared: str) -> None:
  """What both runs read: a tokenized corpus and a fitted basis."""
  rng = np.random.default_rng(7)
  texts = set()
  while len(texts) < NUM_DOCS:
    texts.add("".join(rng.choice(list("abcdefghij"), rng.integers(3, 8))))
  path = os.path.join(shared, "corpus.jsonl")
  with open(path, "w") as f:
    for i, text in enumerate(sorted(texts)):
      f.write(json.dumps({"id": f"doc{i}", "text": text}) + "\n")
  corpus = corpus_lib.tokenize(path, os.path.join(shared, "corpus"), DataConfig(),
                               CONFIG.max_len)
  basis = pipeline.fit_basis(make_encoder(PIPELINE_MESH), corpus, pcfg(), BATCH_SIZE)
  basis.save(os.path.join(shared, "basis.npz"))


def pcfg() -> PreconditionerConfig:
  return PreconditionerConfig(kind="block", train_examples=R_SAMPLE, rank=3)


def pipeline_case(workdir: str, shared: str) -> dict[str, np.ndarray]:
  """Part 2: the sharded fit, encode_corpus, a rerun, scan and streaming."""
  corpus = corpus_lib.TokenizedCorpus(os.path.join(shared, "corpus"))
  enc = make_encoder(PIPELINE_MESH)
  out = {}
  corpus.rows_read = 0
  fitted = pipeline.train_moments(enc, corpus, pcfg(), BATCH_SIZE)
  out["fit_rows_read"] = np.int64(corpus.rows_read)
  for i, m in enumerate(fitted.sums):
    out[f"fitted{i}"] = np.asarray(m.addressable_data(0)) / fitted.count
  # The rows use the shared basis, so stores can be compared bit for bit.
  basis = tracer.hessian.Basis.load(os.path.join(shared, "basis.npz"))
  metric, queries, skipped = pipeline.query_metric(enc, basis, query_examples(),
                                                   pcfg(), BATCH_SIZE)
  assert not skipped
  ecfg = EncodeConfig(store_dtype="bfloat16", chunk_rows=CHUNK_ROWS,
                      batch_size=BATCH_SIZE)
  ckpt = types.SimpleNamespace(path="/nonexistent/checkpoint", step=7, params=None)
  manifest = pipeline.manifest(ckpt, enc, "adamw", EPS, basis, corpus, ecfg,
                               params_fingerprint="test")
  store = pipeline.open_store(os.path.join(workdir, "store"), manifest, basis)
  corpus.rows_read = 0
  out["encoded"] = np.int64(pipeline.encode_corpus(enc, basis, corpus, store,
                                                   BATCH_SIZE).rows)
  out["encode_rows_read"] = np.int64(corpus.rows_read)
  # On return every host's chunks are written, on every host.
  store.check_complete()
  topk = scan_lib.scan_store(store, queries, K, mesh=enc.mesh,
                             metric=metric.row_metric())
  out["store_before_rerun"] = store.array.read().result().view(np.uint16)
  # A host died before marking two chunks: the rerun redoes exactly those.
  pipeline._barrier("test-lose")
  if jax.process_index() == 0:
    for c in LOST_CHUNKS:
      store.unmark(c)
  pipeline._barrier("test-lost")
  corpus.rows_read = 0
  out["reencoded"] = np.int64(pipeline.encode_corpus(enc, basis, corpus, store,
                                                     BATCH_SIZE).rows)
  out["rerun_rows_read"] = np.int64(corpus.rows_read)
  store.check_complete()
  streamed, _ = pipeline.stream_corpus(enc, basis, corpus, queries, metric, K,
                                       BATCH_SIZE)
  # An int8 store: its column scales come from the basis, written once.
  int8 = pipeline.open_store(os.path.join(workdir, "store_int8"), dataclasses.replace(
      manifest, dtype="int8"), basis)
  pipeline.encode_corpus(enc, basis, corpus, int8, BATCH_SIZE)
  topk8 = scan_lib.scan_store(int8, queries, K, mesh=enc.mesh,
                              metric=metric.row_metric())
  # With the model axis across hosts both processes encode every row
  # together; one writes.
  spanning = make_encoder("1x8")
  store = pipeline.open_store(os.path.join(workdir, "store_1x8"), manifest, basis)
  corpus.rows_read = 0
  out["spanning_encoded"] = np.int64(pipeline.encode_corpus(
      spanning, basis, corpus, store, BATCH_SIZE).rows)
  out["spanning_rows_read"] = np.int64(corpus.rows_read)
  out["store_1x8"] = store.array.read().result().view(np.uint16)
  out["queries"] = queries
  out.update({f"topk.{f}": v for f, v in topk._asdict().items()})
  out.update({f"streamed.{f}": v for f, v in streamed._asdict().items()})
  out.update({f"topk8.{f}": v for f, v in topk8._asdict().items()})
  return out


def kernels_case() -> dict[str, np.ndarray]:
  """Uncorrected projections by both kernels, on a mesh whose model axis spans
  the processes: the factored kernel (every matrix factored) must equal the
  materialized one, in each process and in the single-process run."""
  params, _ = params_and_v()
  batch = lm_batch(11, 13)
  out = {}
  for kernel in ("factored", "exact"):
    enc = tracer.GradientEncoder(
        model_lib.make_loss_fn(CONFIG), params, projection_dim=PROJECTION_DIM,
        seed=SEED, mesh=SPANNING_MESH[0](), microbatch_size=SPANNING_MESH[1],
        kernel=kernel)
    out[f"kernels/{kernel}/project"] = partitioning.fetch(enc.project(batch))
  return out


def run_all(workdir: str, shared: str) -> dict[str, np.ndarray]:
  out = kernels_case()
  for name in MESHES:
    out.update(encoder_case(name))
  out.update({f"pipeline/{k}": v for k, v in pipeline_case(workdir, shared).items()})
  return out


# --------------------------------------------------------------------------
# Parts 1 and 2: the worker and the test.


def _worker(port: int, process_id: int, workdir: str, shared: str) -> None:
  multiprocess.init_worker(port, process_id)
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  assert jax.process_count() == 2
  try:
    out = run_all(workdir, shared)
  except BaseException:  # pylint: disable=broad-except
    # Exit now: jax.distributed's exit barrier would wait for the other
    # process, itself waiting for this one in a collective.
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
  np.savez(os.path.join(workdir, f"out{process_id}.npz"), **out)
  jax.distributed.shutdown()


def test_two_processes_equal_one(tmp_path):
  shared = tmp_path / "shared"
  shared.mkdir()
  write_shared(str(shared))
  workers = tmp_path / "workers"
  workers.mkdir()
  port = multiprocess.free_port()
  procs, logs = multiprocess.start(
      [[sys.executable, os.path.abspath(__file__), "worker", str(port), str(i),
        str(workers), str(shared)] for i in range(2)], workers, multiprocess.env())
  deadline = time.monotonic() + TIMEOUT_S
  try:
    single = tmp_path / "single"
    single.mkdir()
    want = run_all(str(single), str(shared))
  finally:
    multiprocess.wait(procs, logs, deadline)

  got = [dict(np.load(workers / f"out{i}.npz", allow_pickle=False))
         for i in range(2)]
  assert set(got[0]) == set(got[1]) == set(want)
  per_process = {"pipeline/fit_rows_read", "pipeline/encoded",
                 "pipeline/encode_rows_read", "pipeline/reencoded",
                 "pipeline/rerun_rows_read", "pipeline/spanning_encoded",
                 "pipeline/spanning_rows_read"}

  # Global values: both processes hold the same, equal to the single run.
  for key, w in want.items():
    if key in per_process:
      continue
    np.testing.assert_array_equal(got[0][key], got[1][key], err_msg=key)
    g = got[0][key]
    if key == "pipeline/store_1x8":
      # The model axis's sums now span processes: gloo adds the 8 terms in
      # another order than one process does, so a few values round to the
      # neighbouring bf16 number.
      as_f32 = lambda x: x.view(ml_dtypes.bfloat16).astype(np.float32)
      a, b = as_f32(g), as_f32(w)
      # One bf16 step of the value, or 1e-4 of its row's largest (values
      # near zero, where f32 sums cancel).
      bound = 2**-7 * np.abs(b) + 1e-4 * np.abs(b).max(axis=1, keepdims=True)
      assert np.all(np.abs(a - b) <= bound), key
      assert np.mean(g != w) < 0.01, np.mean(g != w)
    elif key.endswith("rows") or key.startswith("pipeline/store"):
      np.testing.assert_array_equal(g, w, err_msg=key)
    elif "inv_sqrt" in key or "fitted" in key:
      # R^(-1/2) of a rank-deficient R: eigh amplifies rounding differences.
      np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-3 * np.abs(w).max(),
                                 err_msg=key)
    elif key.endswith("/project"):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max(),
                                 err_msg=key)
    else:
      np.testing.assert_allclose(g, w, rtol=0, atol=1e-5, err_msg=key)
  for g in got + [want]:
    f, e = g["kernels/factored/project"], g["kernels/exact/project"]
    assert np.linalg.norm(f - e) < 1e-5 * np.linalg.norm(e)
  for name in MESHES:
    assert got[0][f"{name}/encode"].shape == (11, want[f"{name}/plain"].shape[1])
    # A meaningful comparison: the preconditioner changes the encodings.
    assert np.abs(want[f"{name}/encode"] - want[f"{name}/plain"]).max() > 1e-2

  # Each process read and encoded exactly its share: 3 of the 6 chunks.
  share = NUM_DOCS // 2
  for g in got:
    assert int(g["pipeline/encode_rows_read"]) == int(g["pipeline/encoded"]) == share
    assert int(g["pipeline/rerun_rows_read"]) == CHUNK_ROWS  # one lost chunk each
    assert 0 < int(g["pipeline/fit_rows_read"]) < R_SAMPLE
  assert sum(int(g["pipeline/fit_rows_read"]) for g in got) == R_SAMPLE
  for g in got + [want]:
    assert int(g["pipeline/spanning_encoded"]) == NUM_DOCS
    assert int(g["pipeline/spanning_rows_read"]) == NUM_DOCS
  assert int(want["pipeline/encode_rows_read"]) == NUM_DOCS
  assert int(want["pipeline/rerun_rows_read"]) == len(LOST_CHUNKS) * CHUNK_ROWS

  # The stores: same manifest, every chunk done, bitwise the same bf16 rows
  # (and the same files), before and after the rerun.
  s_multi = store_lib.open_store(workers / "store")
  s_single = store_lib.open_store(single / "store")
  assert s_multi.manifest == s_single.manifest
  assert s_multi.done_chunks() == set(range(NUM_DOCS // CHUNK_ROWS))
  raw = s_multi.array.read().result().view(np.uint16)
  np.testing.assert_array_equal(raw, s_single.array.read().result().view(np.uint16))
  np.testing.assert_array_equal(raw, got[0]["pipeline/store_before_rerun"])
  from test_store import _array_files  # pylint: disable=g-import-not-at-top
  assert _array_files(workers / "store") == _array_files(single / "store")
  # The int8 store too (rows, scales, column scales, markers), and its scan.
  assert _array_files(workers / "store_int8") == _array_files(single / "store_int8")
  assert len(_array_files(workers / "store_int8")) > len(_array_files(workers / "store"))
  rows = s_multi.read_rows(0, NUM_DOCS)
  # The top-k is the store's own exact top-k under the query set's metric.
  metric, _, _ = pipeline.query_metric(
      make_encoder(PIPELINE_MESH),
      tracer.hessian.Basis.load(str(shared / "basis.npz")), query_examples(),
      pcfg(), BATCH_SIZE)
  scores = got[0]["pipeline/queries"] @ rows.T / metric.norms(rows)
  order = np.argsort(-scores, axis=1, kind="stable")
  np.testing.assert_array_equal(got[0]["pipeline/topk.proponent_rows"], order[:, :K])
  rows8 = store_lib.open_store(workers / "store_int8").read_rows(0, NUM_DOCS)
  scores8 = got[0]["pipeline/queries"] @ rows8.T / metric.norms(rows8)
  np.testing.assert_array_equal(got[0]["pipeline/topk8.proponent_rows"],
                                np.argsort(-scores8, axis=1, kind="stable")[:, :K])
  top = np.take_along_axis(scores, order[:, :K + 1], axis=1)
  assert np.abs(np.diff(top, axis=1)).min() > 1e-4  # no near ties


def _failing_worker() -> None:
  """``python tests/test_multihost.py fail F KIND WAIT <jax.distributed
  flags>``: a launch script (``launch.config.setup``, ``cli.run``) whose
  process F (F ``every``: every process) raises KIND (``bad_input`` or
  ``bug``) once every process is up, while the others wait for it in a
  collective (WAIT ``collective``: gloo's raises once F has left), work on
  for an hour (``work``: only the watcher thread can end them, as it ends a
  TPU host stuck in a collective), or finish (``finish``: F fails 2 s later,
  while they wait for it at exit). KIND ``sigterm``, ``sigint`` or
  ``sighup``: nobody raises; every process says it is up, F waits in a
  collective the others never join, and they wait as WAIT says, for the
  test's signal to F. KIND ``sigstop`` or ``sigkill``: F sleeps instead,
  until the test stops or kills it."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from tracer.launch import cli, config as launch_config  # pylint: disable=g-import-not-at-top

  def main(argv):
    failing = -1 if argv[2] == "every" else int(argv[2])
    kind, wait = argv[3], argv[4]
    launch_config.setup()
    multihost_utils.sync_global_devices("every process is up")
    if kind.startswith("sig"):
      print("every process is up", flush=True)
      if jax.process_index() == failing and kind in ("sigstop", "sigkill"):
        time.sleep(3600)  # until stopped: it joins no collective
      elif jax.process_index() == failing:
        # Inside XLA, where a Python signal handler does not run.
        multihost_utils.sync_global_devices("never: only this process joins")
    elif failing in (jax.process_index(), -1):
      if wait == "finish":
        time.sleep(2)
      if kind == "bad_input":
        raise InputError("corpus.jsonl:3: field 'text' is empty")
      raise RuntimeError("a bug in tracer")
    if wait == "finish":
      return
    if wait == "work":
      time.sleep(3600)
    multihost_utils.sync_global_devices("never: one process is missing")
    print("the collective completed")

  cli.run(main, arguments=True)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
  _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
if __name__ == "__main__" and sys.argv[1:2] == ["fail"]:
  _failing_worker()


@pytest.mark.parametrize("failing,kind,wait", [(1, "bad_input", "collective"),
                                               (0, "bug", "work"),
                                               (2, "bad_input", "finish"),
                                               (-1, "bad_input", "collective"),
                                               (1, "sigterm", "work"),
                                               (0, "sigterm", "work"),
                                               (2, "sigint", "work"),
                                               (1, "sighup", "work")])
def test_a_failure_on_one_process_ends_every_process_with_its_message(
    tmp_path, failing, kind, wait):
  """One of 3 processes fails while the others wait for it (in a collective,
  working on, or at their end):
  every one ends within seconds, the failing one with its own error, each
  other with ``error: process F of 3 failed: <its message>``, all with its
  exit status (2 for bad input, 1 for a bug). Process 0 hosts the key-value
  store the message goes through, so it leaves last, whichever failed.
  When every process fails alike (F = -1), each gives its own error. SIGTERM
  to one (a scheduler, a preemption), SIGINT or SIGHUP is a failure of status
  128 + its number, also while that process's main thread waits in a
  collective.
  Without it (measured: a damaged store chunk found by one of two ``tracer
  trace`` processes) the others waited 300 s at jax.distributed's shutdown
  barrier and every process aborted, the survivor saying only that another
  task died."""
  port = multiprocess.free_port()
  commands = [[sys.executable, os.path.abspath(__file__), "fail",
               "every" if failing == -1 else str(failing), kind, wait,
               *multiprocess.distributed_flags(port, i, 3)] for i in range(3)]
  procs, logs = multiprocess.start(commands, tmp_path, multiprocess.env(devices=1))
  deadline = time.monotonic() + 120  # a run takes ~10 s; the barrier 300 s
  if kind.startswith("sig"):
    _signal_once_up(procs[failing], logs[failing], deadline, kind)
  codes, texts = multiprocess.ends(procs, logs, deadline)
  status, message = {
      "bad_input": (2, "corpus.jsonl:3: field 'text' is empty"),
      "bug": (1, "RuntimeError: a bug in tracer"),
      "sigterm": (143, "stopped by SIGTERM (the job was stopped or its machine "
                       "preempted)"),
      "sigint": (130, "stopped by SIGINT (interrupted)"),
      "sighup": (129, "stopped by SIGHUP (its terminal or ssh session closed)")}[kind]
  assert codes == [status] * 3, (codes, texts)
  for i, text in enumerate(texts):
    assert "the collective completed" not in text
    if failing not in (i, -1):
      assert f"\nerror: process {failing} of 3 failed: {message}\n" in text, text
    elif kind != "bug":
      assert f"\nerror: {message}\n" in text, text
    else:  # a bug keeps its traceback
      assert "Traceback (most recent call last)" in text and message in text, text


def _signal_once_up(proc, log: str, deadline: float, kind: str) -> None:
  """Signal ``kind`` (``sigterm``...) to ``proc`` once its log says every
  process is up (a failing worker of that kind)."""
  while "every process is up" not in open(log).read():
    assert time.monotonic() < deadline and proc.poll() is None, open(log).read()
    time.sleep(0.1)
  time.sleep(0.5)  # into its collective or its work
  proc.send_signal(getattr(signal, kind.upper()))


def test_the_watcher_outlives_failed_calls(monkeypatch):
  """A FailureWatcher whose calls to the key-value store fail for a while (a
  deadline on a loaded service) keeps beating once they pass; before
  2026-12-04 its thread ended at the first, and process 0 then took the
  process for lost. Calls failing past the silent limit end it."""
  from tracer import coordination  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top

  class KV:  # jax's key-value client, in memory; calls fail while `down`
    def __init__(self):
      self.values, self.down, self.lock = {}, False, threading.Lock()

    def key_value_set(self, key, value, allow_overwrite=False):
      with self.lock:
        if self.down:
          raise RuntimeError("DEADLINE_EXCEEDED")
        self.values[key] = value

    def key_value_dir_get(self, key):
      with self.lock:
        if self.down:
          raise RuntimeError("DEADLINE_EXCEEDED")
        return [(k, v) for k, v in self.values.items() if k.startswith(key + "/")]

  kv = KV()
  monkeypatch.setattr(coordination, "client", lambda: kv)
  monkeypatch.setattr(coordination, "_processes", lambda: (1, 2))
  watcher = coordination.FailureWatcher(lambda failure: None, interval_s=0.02,
                                        silent_timeout_s=1.0, heartbeat_s=0.05)
  alive = f"{coordination.ALIVE}/1"
  beat = lambda: int(kv.values.get(alive, 0))
  deadline = time.monotonic() + 30
  while beat() < 2 and time.monotonic() < deadline:
    time.sleep(0.02)
  kv.down = True
  time.sleep(0.3)  # failing for less than the silent limit
  before, kv.down = beat(), False
  while beat() <= before and time.monotonic() < deadline:
    time.sleep(0.02)
  assert beat() > before and watcher._thread.is_alive()
  kv.down = True
  watcher._thread.join(timeout=10)
  assert not watcher._thread.is_alive()


@pytest.mark.parametrize("silent,wait,kind", [(1, "collective", "sigstop"),
                                              (2, "work", "sigstop"),
                                              (1, "collective", "sigkill")])
def test_a_process_that_falls_silent_ends_the_others(tmp_path, silent, wait, kind):
  """One of 3 processes is stopped (SIGSTOP: its sockets left open, as a
  hung or cut-off host) or killed (SIGKILL, the OOM killer: its sockets
  closed, so gloo's collective raises in the others at once) while the
  others wait for it in a collective or work on: after
  --silent_process_timeout_s without a word from it, the others end, each
  saying which one and how long, with status 75. Measured before (two
  ``tracer encode`` processes, one stopped mid-encode): the other aborted
  79 s later at jax.distributed's heartbeat timeout (SIGABRT, status 134,
  a C++ stack in its log); one killed: the other wrote gloo's error's
  traceback ("Connection closed by peer"), status 1."""
  port = multiprocess.free_port()
  commands = [[sys.executable, os.path.abspath(__file__), "fail", str(silent),
               kind, wait, *multiprocess.distributed_flags(port, i, 3),
               "--silent_process_timeout_s=4"] for i in range(3)]
  procs, logs = multiprocess.start(commands, tmp_path, multiprocess.env(devices=1))
  deadline = time.monotonic() + 120
  _signal_once_up(procs[silent], logs[silent], deadline, kind)
  codes, texts = multiprocess.ends(procs[:silent] + procs[silent + 1:],
                                   logs[:silent] + logs[silent + 1:], deadline)
  procs[silent].kill()
  procs[silent].wait()
  assert codes == [75, 75], (codes, texts)
  for text in texts:
    assert "the collective completed" not in text
    line = re.search(rf"\nerror: process {silent} of 3 failed: no word from it for "
                     r"([\d.]+) s \(the limit: 4 s\): killed, out of memory, stopped, "
                     r"or its host lost; rerun the same command to resume\n", text)
    assert line and 4 <= float(line[1]) < 10, text
    assert "Check failure" not in text and "Fatal Python error" not in text, text


def test_sigterm_ends_a_lone_distributed_process(tmp_path):
  """jax.distributed's preemption service takes SIGTERM, also on one process
  (measured: the process ran on); with nobody to tell, SIGTERM ends it with
  one line and status 143, as on several processes."""
  commands = [[sys.executable, os.path.abspath(__file__), "fail", "0", "sigterm",
               "work", *multiprocess.distributed_flags(multiprocess.free_port(), 0, 1)]]
  procs, logs = multiprocess.start(commands, tmp_path, multiprocess.env(devices=1))
  deadline = time.monotonic() + 120
  _signal_once_up(procs[0], logs[0], deadline, "sigterm")
  codes, texts = multiprocess.ends(procs, logs, deadline)
  assert codes == [143], (codes, texts)
  assert texts[0].endswith("\nerror: stopped by SIGTERM (the job was stopped or "
                           "its machine preempted)\n"), texts


# Process 1 lists a store's markers 3 s late, as a slow host of a pod might:
# after process 0 has checked its chunks and unmarked the bad ones.
_LATE_LISTING_VERIFY = """
import sys, time
from tracer import store as store_lib
if sys.argv[1] == "1":
  listed = store_lib.EncodingStore.done_chunks
  store_lib.EncodingStore.done_chunks = lambda self: (time.sleep(3), listed(self))[1]
sys.argv = ["verify", *sys.argv[2:]]
from tracer.launch import config, verify
config.run(verify.main)
"""


def test_verify_repair_on_two_processes_checks_every_chunk_once(tmp_path):
  """``tracer verify --repair`` on 2 processes: the chunks each checks come
  from one listing (process 0's), so a host that lists after another has
  unmarked a bad chunk still checks its share; every bad chunk is found
  and unmarked, and the good ones keep their markers."""
  location = str(tmp_path / "store")
  manifest = store_lib.Manifest(
      checkpoint="/ckpt/1", step=1, params_fingerprint="abc", correction="adam",
      epsilon=1e-8, projection_seed=0, layout=[{"path": "w", "shape": (4, 2)}],
      dim=6, basis_fingerprint=None, dtype="float32", corpus="corpus.jsonl",
      num_rows=30, chunk_rows=5, tracer_version="test")
  store = store_lib.create_or_open(location, manifest)
  rows = np.random.default_rng(0).standard_normal((30, 6)).astype(np.float32)
  for chunk in range(store.num_chunks):
    store.write_chunk(chunk, rows[slice(*store.chunk_bounds(chunk))])
  for chunk in (0, 3):  # one in each process's share of [0..5]
    with open(store.chunk_file(chunk), "r+b") as f:
      raw = bytearray(f.read())
      raw[7] ^= 0x10
      f.seek(0)
      f.write(bytes(raw))
  port = multiprocess.free_port()
  procs, logs = multiprocess.start(
      [[sys.executable, "-c", _LATE_LISTING_VERIFY, str(i), f"--store={location}",
        "--repair", *multiprocess.distributed_flags(port, i)] for i in range(2)],
      tmp_path, multiprocess.env(devices=1))
  codes, texts = multiprocess.ends(procs, logs, time.monotonic() + 180)
  assert codes == [1, 1], (codes, texts)
  assert f"{location}: 2 corrupt and 0 missing of 6 chunks" in texts[0], texts
  assert sorted(store_lib.open_store(location).done_chunks()) == [1, 2, 4, 5]
  # A complete store with a stray marker alone: every process exits 1 (before
  # 2026-12-07 process 1 exited 0, which process 0 alone had listed).
  for chunk in (0, 3):
    store.write_chunk(chunk, rows[slice(*store.chunk_bounds(chunk))])
  progress = tmp_path / "store" / "progress"
  (progress / "000000009.done").write_text((progress / "000000000.done").read_text())
  port = multiprocess.free_port()
  procs, logs = multiprocess.start(
      [[sys.executable, "-m", "tracer.launch.verify", f"--store={location}",
        *multiprocess.distributed_flags(port, i)] for i in range(2)],
      tmp_path, multiprocess.env(devices=1))
  codes, texts = multiprocess.ends(procs, logs, time.monotonic() + 180)
  assert codes == [1, 1], (codes, texts)
  assert f"{location}: 0 corrupt and 0 missing of 6 chunks; 1 stray markers" in texts[0]


def _processes(tmp_path, script: str, count: int = 2) -> list[str]:
  """The logs of ``script`` (``python -c``, argv: port, process) run as
  ``count`` jax.distributed processes of 2 CPU devices each, all exited 0."""
  port = multiprocess.free_port()
  procs, logs = multiprocess.start(
      [[sys.executable, "-c", script, str(port), str(i)] for i in range(count)],
      tmp_path, multiprocess.env(devices=2))
  codes, texts = multiprocess.ends(procs, logs, time.monotonic() + 120)
  assert codes == [0] * count, (codes, texts)
  return texts


def _first_lines(texts: list[str], prefix: str) -> list[str]:
  """Each log's first line starting with ``prefix``."""
  return [next(l for l in text.splitlines() if l.startswith(prefix))
          for text in texts]


# The start of a two-process scan script (argv: port, process): jax.distributed
# over gloo, and ``held_rows(x)``: process 0's rows aligned (used in place),
# process 1's the same values unaligned (copied by the scan).
_TWO_PROCESS_SCAN = """
import sys
import jax
import numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", 2, int(sys.argv[2]))
from tracer import memory, partitioning, scan
me = int(sys.argv[2])


def held_rows(x):
  if me == 0:
    out = scan.aligned_empty(x.shape, x.dtype)
  else:
    raw = scan.aligned_empty((x.size * 4 + 64,), np.uint8)
    out = raw[4:4 + x.size * 4].view(np.float32).reshape(x.shape)
  out[...] = x
  return out
"""


_UNEVEN_HOSTS_SCAN = _TWO_PROCESS_SCAN + """
from tracer.errors import InputError
# Process 0: an aligned matrix (used in place) on a host of 64 GiB;
# process 1: the same values unaligned (copied into pooled buffers) on a
# host of 4 MiB.
memory.host_memory_bytes = lambda: (64 << 30) if me == 0 else (4 << 20)
rng = np.random.default_rng(0)
x = rng.standard_normal((3000, 64), dtype=np.float32)
q = rng.standard_normal((3, 64), dtype=np.float32)
held = held_rows(x)
counts, runs = [], []
count, run = memory.program_bytes, scan._scan_run
memory.program_bytes = lambda *a: counts.append(count(*a)) or counts[-1]
splits = []
scan._scan_run = lambda sources, qs, *a: (
    runs.append(len(qs[0])) or splits.append(a[-1]) or run(sources, qs, *a))
got = scan.scan_arrays(held, q, 5, mesh=partitioning.make_mesh())
want = np.argsort(-(x @ q.T), axis=0, kind="stable")[:5].T
print("rows", got.proponent_rows.tolist(), "want", want.tolist(), flush=True)
# Process 1's host now fits fewer queries' step (2 devices, at most half
# of each one's share) than 3; process 0's fits all: both scan in runs of
# fewer, the same.
memory.host_memory_bytes = lambda: 64 << 30
scan.scan_arrays(held, q, 5, mesh=partitioning.make_mesh(), chunk_rows=1000)
step3 = counts[-1]
memory.host_memory_bytes = lambda: (64 << 30) if me == 0 else 2 * 2 * step3 - 1
runs.clear()
got = scan.scan_arrays(held, q, 5, mesh=partitioning.make_mesh(), chunk_rows=1000)
print("split", runs, flush=True)
print("rows", got.proponent_rows.tolist(), "want", want.tolist(), flush=True)
# 2,048 queries on a host that fits half of them whole but all of them
# split over the 4 devices: both processes split them, in one pass, and
# the blocks cross hosts.
many = rng.standard_normal((2048, 64), dtype=np.float32)
memory.host_memory_bytes = lambda: 64 << 30
scan.scan_arrays(held, many, 5, mesh=partitioning.make_mesh(), chunk_rows=1000)
whole = counts[-1]
memory.host_memory_bytes = lambda: (64 << 30) if me == 0 else 2 * 2 * whole - 1
runs.clear(), splits.clear()
got = scan.scan_arrays(held, many, 5, mesh=partitioning.make_mesh(), chunk_rows=1000)
print("ring", runs, splits, flush=True)
want_many = np.argsort(-(x @ many[:4].T), axis=0, kind="stable")[:5].T
print("rows", got.proponent_rows[:4].tolist(), "want", want_many.tolist(), flush=True)
if me == 0:  # a scan of this process's own devices agrees with no other
  local = scan.scan_arrays(held, q, 5, mesh=partitioning.make_mesh(
      devices=jax.local_devices()))
  print("local rows", local.proponent_rows.tolist(), "want", want.tolist(), flush=True)
# A mesh of 1 of process 0's devices and both of process 1's, on hosts
# alike: a device of process 1 has half the share of process 0's. Its
# share is agreed (first written, each divided the agreed host by its own
# devices: process 0 took 64 queries a run, process 1 fewer, and both hung in
# the scan's collectives), and so is the pool's step for copied rows.
uneven = partitioning.make_mesh(devices=[
    d for d in jax.devices() if d.process_index == 1 or d.id == 0])
some, big = many[:64], rng.standard_normal((12000, 64), dtype=np.float32)
memory.host_memory_bytes = lambda: 64 << 30
scan.scan_arrays(big, some, 5, mesh=uneven, chunk_rows=12000)
step64 = counts[-1]
# (process 1's devices: half of 1.5 steps each; process 0's: 1.5 steps)
memory.host_memory_bytes = lambda: 3 * step64
runs.clear()
got = scan.scan_arrays(big, some, 5, mesh=uneven, chunk_rows=12000,
                      shard_queries=False)
want_some = np.argsort(-(big @ some.T), axis=0, kind="stable")[:5].T
print("uneven runs", runs, flush=True)
print("rows", got.proponent_rows.tolist(), "want", want_some.tolist(), flush=True)
steps = []
scan._scan_run = lambda sources, qs, k, mesh, layout, *a: (
    steps.append(layout.step) or run(sources, qs, k, mesh, layout, *a))
# (process 1 copies its unaligned rows; a pool a quarter of the host:
# 1,000 rows a set for process 0's device, 500 for process 1's)
memory.host_memory_bytes = lambda: 4 * scan.pool_sets(2, 0) * 64 * 4 * 1000
got = scan.scan_arrays(held, q, 5, mesh=uneven)
print("uneven steps", steps, flush=True)
print("rows", got.proponent_rows.tolist(), "want", want.tolist(), flush=True)
# A step past the agreed share (process 1's 512 KiB a device): both refuse
# it with one message, naming the share, not each host's own memory.
memory.host_memory_bytes = lambda: (64 << 30) if me == 0 else (1 << 20)
try:
  scan.scan_arrays(big, some, 5, mesh=uneven, chunk_rows=12000,
                   shard_queries=False)
except InputError as e:
  print("refused", str(e), flush=True)
"""


def test_a_scan_plans_one_step_on_uneven_hosts(tmp_path):
  """Each process's pool plan (whether it copies rows, and the budget of a
  quarter of its memory) differs here; the step is agreed, so the steps'
  programs match (first written, the process that copied waited in the
  agreement alone and failed after 30 s) and the answer is the single-host
  one. Then process 1's host fits fewer queries a run than process 0's:
  both scan in the smaller host's runs (stop 71); and 2,048 queries that
  fit its devices only split over them: both split them, in one pass
  (stop 72). Then process 0 scans its own devices alone: nothing to
  agree. Then a mesh of 1 device of process 0 and 2 of process 1: a
  device's share of the host is agreed, not the host's bytes (stop 74)."""
  texts = _processes(tmp_path, _UNEVEN_HOSTS_SCAN)
  splits = _first_lines(texts, "split ")
  assert splits[0] == splits[1] and max(json.loads(splits[0][6:])) < 3, texts
  rings = _first_lines(texts, "ring ")
  assert rings[0] == rings[1] == "ring [2048] [True]", texts
  # A mesh of 1 device of process 0 and 2 of process 1: the smaller
  # share (process 1's) plans both.
  uneven = [[json.loads(l.split(" ", 2)[2]) for l in text.splitlines()
             if l.startswith("uneven ")] for text in texts]
  assert uneven[0] == uneven[1] and len(uneven[0][0]) > 1, texts
  assert uneven[0][1] == [500 * 3], texts  # (process 0 alone: 1,000 a device)
  refused = _first_lines(texts, "refused ")
  assert refused[0] == refused[1], texts
  assert re.search(r"in 64 runs of 1: a scan step of 4,000 rows per device "
                   r"takes [\d.]+ \w+ on each device \(XLA's count after "
                   r"compiling\), more than a device's 512\.0 KiB", refused[0]), texts
  for text, prefixes in zip(texts, [("rows ", "local rows "), ("rows ",)]):
    for prefix in prefixes:
      lines = [l for l in text.splitlines() if l.startswith(prefix)]
      assert lines, text
      for line in lines:
        got, want = line[len(prefix):].split(" want ")
        assert got == want, text


_STAGED_SCAN = _TWO_PROCESS_SCAN + """
# Devices of their own memory (as GPUs), 1 MiB on process 0's and 2 MiB on
# process 1's; process 0's rows aligned (used in place), process 1's
# unaligned (staged through a pool of 40 KiB: 2 sets of 80 rows a device).
memory.device_memory_bytes = lambda: (1 << 20) * (1 + me)
scan.HOST_BUFFER_BYTES = 2 * 2 * 80 * 64 * 4
rng = np.random.default_rng(0)
x = rng.standard_normal((6000, 64), dtype=np.float32)
q = rng.standard_normal((3, 64), dtype=np.float32)
held = held_rows(x)
layouts, run = [], scan._scan_run
scan._scan_run = lambda sources, qs, *a: (
    layouts.append((a[2].step, a[2].num_pieces, a[2].staged, a[5]))
    or run(sources, qs, *a))
got = scan.scan_arrays(held, q, 5, mesh=partitioning.make_mesh())
want = np.argsort(-(x @ q.T), axis=0, kind="stable")[:5].T
print("layouts", layouts, flush=True)
print("rows", got.proponent_rows.tolist(), "want", want.tolist(), flush=True)
"""


def test_a_staged_scan_plans_one_step_on_hosts_of_different_memories(tmp_path):
  """Devices of their own memory (patched in: 1 MiB on process 0's, 2 MiB
  on process 1's), one process copying its rows and the other using them
  in place: both stage the same steps (the least device's: 5 other steps'
  256-byte rows within half of 1 MiB, 409 rows a device; the pool's
  pieces of at most 80 rows: 6 of 68, 408 rows) and the answer is the
  single-host one (stop 75)."""
  texts = _processes(tmp_path, _STAGED_SCAN)
  layouts = _first_lines(texts, "layouts ")
  assert layouts[0] == layouts[1] == "layouts [(1632, 6, True, 2)]", texts
  for text in texts:
    line, = _first_lines([text], "rows ")
    got, want = line[len("rows "):].split(" want ")
    assert got == want, text


_BASIS_FIT = """
import sys
import jax
import numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", 2, int(sys.argv[2]))
from tracer import hessian
rng = np.random.default_rng(0)
g = rng.standard_normal((50, 12))
moments = hessian.Moments(((0, 4), (4, 12)), [g[:, :4].T @ g[:, :4],
                                              g[:, 4:].T @ g[:, 4:]], 50)
if jax.process_index() == 1:  # another LAPACK's choice of eigenvectors' signs
  eigh = np.linalg.eigh
  np.linalg.eigh = lambda a: (lambda w, v: (w, -v))(*eigh(a))
basis = hessian.fit_basis(moments, dim=12, layout_seed=0)
print("basis", basis.fingerprint(), flush=True)
"""


def test_every_process_fits_process_0s_basis(tmp_path):
  """Processes whose eigh picks other eigenvectors (here: every sign
  flipped on process 1, as another thread count or CPU can) fit one basis:
  process 0's. Before 2026-12-08 each rotated its rows by its own, and
  queries rotated by the saved (process 0's) scored them."""
  texts = _processes(tmp_path, _BASIS_FIT)
  fingerprints = _first_lines(texts, "basis ")
  assert fingerprints[0] == fingerprints[1], texts


_HOST_SHARES = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", 3, int(sys.argv[2]))
from tracer import coordination, memory
me = jax.process_index()
if me == 2:  # as if on another host
  memory.host_identity = lambda: ["elsewhere", "elsewhere /"]
coordination.tell_host(memory.host_identity())
coordination.agree("hosts told", "")
memory.cgroup_memory_limit = lambda: None
print("host", memory.host_memory_bytes(), memory._physical_bytes(), flush=True)
print("says", memory.host_budget(size=str)[1], flush=True)
memory.cgroup_memory_limit = lambda: 3 * 2**30 if me < 2 else None
print("cgroup", memory.host_memory_bytes(), flush=True)
"""


def test_processes_of_one_host_share_its_memory(tmp_path):
  """Three processes, two of them on one host (this one) and the third as
  if on another: each of the two plans for half of the host's memory, or
  of its cgroup's limit, the third for all of its own. Before 2026-12-08
  each process took the whole host for its own."""
  texts = _processes(tmp_path, _HOST_SHARES, count=3)
  hosts = [line.split()[1:] for line in _first_lines(texts, "host ")]
  physical = int(hosts[0][1])
  assert [int(h[0]) for h in hosts] == [physical // 2] * 2 + [physical], texts
  says = _first_lines(texts, "says ")
  assert f"its share (1 of 2 processes of the run) of this host's {physical}: " \
      f"{physical // 2} (it holds" in says[0], says
  assert "left of this host's" in says[2], says
  cgroups = [int(line.split()[1]) for line in _first_lines(texts, "cgroup ")]
  assert cgroups == [3 * 2**30 // 2] * 2 + [physical], texts


_SOME_PROCESSES_SCAN = """
import sys
import jax
import numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", 3, int(sys.argv[2]))
from jax.sharding import Mesh
from tracer import scan
from tracer.errors import InputError
held = [d for d in jax.devices() if d.process_index < 2]
mesh = Mesh(np.array(held).reshape(4, 1), ("data", "model"))
x = np.ones((100, 8), np.float32)
if jax.process_index() < 2:
  try:
    scan.scan_arrays(x, x[:2], 3, mesh=mesh)
  except InputError as e:
    print("refused", e, flush=True)
else:
  from tracer import partitioning
  try:  # (a KeyError before 2026-12-07)
    partitioning.data_block(mesh)
  except InputError as e:
    print("refused", e, flush=True)
"""


def test_a_scan_over_some_of_the_processes_is_refused(tmp_path):
  """A mesh over the devices of processes 0 and 1 of 3: the scan's
  agreement between processes runs over all of them, so it waited on
  process 2 until jax's gloo gave up after 30 s ("Gloo context
  initialization failed: DEADLINE_EXCEEDED"). Refused at once, naming the
  processes (stop 76)."""
  texts = _processes(tmp_path, _SOME_PROCESSES_SCAN, count=3)
  want = ("refused mesh: holds devices of processes [0, 1] of the 3; expected "
          "a mesh over every process's devices (partitioning.make_mesh) or "
          "over one process's alone")
  assert _first_lines(texts, "refused ") == [
      want, want, "refused a mesh of 4 devices holds none of process 2's; "
      "expected a mesh over every process's devices (make_mesh)"]


def test_processes_of_different_device_counts_are_refused_at_start(tmp_path):
  """jax.distributed over processes of 2 and 4 devices: jax's
  ``multihost_utils`` (and so the scan's agreement) fail deep in a scan
  with "cannot reshape array of size 6 into shape (2,2)". A launch
  script refuses it as it starts, on every process, naming the counts."""
  port = multiprocess.free_port()
  procs, logs = multiprocess.start(
      [[sys.executable, "-m", "launch.verify", f"--store={tmp_path / 'none'}",
        *multiprocess.distributed_flags(port, i)] for i in range(2)],
      tmp_path, [multiprocess.env(devices=n) for n in (2, 4)])
  codes, texts = multiprocess.ends(procs, logs, time.monotonic() + 120)
  assert codes == [2, 2], texts
  for text in texts:
    assert any(line.startswith(
        "error: jax.distributed: the processes have different numbers of "
        "devices (process 0: 2, process 1: 4); expected as many on every "
        "process") for line in text.splitlines()), text


_SERVE_BUDGETS = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", 2, int(sys.argv[2]))
from tracer import partitioning
from tracer.launch import serve
me, mesh = int(sys.argv[2]), partitioning.make_mesh()
# --resident_budget_mb as each process was given it: 5 and 7, then -1 and 7
print("budgets", serve.budget_bytes(5 if me == 0 else 7, mesh),
      serve.budget_bytes(-1 if me == 0 else 7, mesh), flush=True)
"""


def test_serve_processes_agree_a_given_resident_budget(tmp_path):
  """--resident_budget_mb given differently to two processes: both take
  process 0's (as before stop 74), so both choose the same index; with -1
  on one of them, both take the default, in the same collectives (each
  took its own flag, and the -1 waited alone in the memory's allgather)."""
  texts = _processes(tmp_path, _SERVE_BUDGETS)
  budgets = _first_lines(texts, "budgets ")
  assert budgets[0] == budgets[1], texts
  assert budgets[0].split()[1] == str(5 << 20), texts


# --------------------------------------------------------------------------
# Part 3: the launch script itself, on 2 processes and on 1.


def write_checkpoint(path: str, corpus, steps: int = 1) -> None:
  """The tiny model after each of ``steps`` AdamW steps on the corpus (so V
  is not zero), a checkpoint per step."""
  opt_config = train_lib.OptimizerConfig(total_steps=steps, warmup_steps=0)
  optimizer = train_lib.make_optimizer(opt_config)
  mesh = partitioning.make_mesh()
  params = jax.device_put(model_lib.init_params(CONFIG), partitioning.replicated(mesh))
  opt_state = optimizer.init(params)
  step = train_lib.make_train_step(model_lib.make_loss_fn(CONFIG), optimizer, mesh, params)
  mngr = ckpt_lib.manager(path)
  for i in range(steps):
    batch = partitioning.to_global(corpus.examples(np.arange(8 * i, 8 * i + 8)),
                                   partitioning.all_devices_batch(mesh))
    params, opt_state, _ = step(params, opt_state, batch)
    ckpt_lib.save(mngr, i + 1, params, opt_state, CONFIG, opt_config,
                  {**DataConfig().to_dict(), "num_rows": len(corpus)})
  mngr.close()


GIN_BINDINGS = (f"EncodeConfig.projection_dim={PROJECTION_DIM}",
                "EncodeConfig.model_axis=2", "EncodeConfig.microbatch_size=2",
                f"EncodeConfig.batch_size={BATCH_SIZE}",
                f"EncodeConfig.chunk_rows={CHUNK_ROWS}",
                f"PreconditionerConfig.train_examples={R_SAMPLE}",
                "PreconditionerConfig.rank=3")


def trace_command(workdir, shared, store, output, distributed=None, corpus=None):
  cmd = [sys.executable, "-m", "tracer.launch.trace", f"--workdir={workdir}",
         f"--checkpoint={os.path.join(shared, 'checkpoints')}",
         f"--corpus={corpus or os.path.join(shared, 'corpus')}",
         f"--queries={os.path.join(shared, 'queries.jsonl')}",
         f"--output={output}", f"--store={store}", f"--top_k={K}", "--show=0"]
  cmd += [f"--gin_bindings={b}" for b in GIN_BINDINGS]
  if distributed:
    cmd += multiprocess.distributed_flags(*distributed)
  return cmd


def test_launch_trace_on_two_processes_with_object_storage(tmp_path, s3_server, s3,
                                                          gcs_server, gcs):
  """Both object stores in one run: the corpus files and the results in a
  bucket of a GCS emulator, the store on an S3 server."""
  shared = tmp_path / "shared"
  shared.mkdir()
  rng = np.random.default_rng(5)
  with open(shared / "corpus.jsonl", "w") as f:
    for i in range(NUM_DOCS):
      text = "".join(rng.choice(list("abcdefghij"), rng.integers(3, 8)))
      f.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
  with open(shared / "queries.jsonl", "w") as f:
    for i in range(5):
      prompt = "".join(rng.choice(list("abcdefghij"), 4))
      f.write(json.dumps({"id": f"q{i}", "prompt": prompt, "target": "ab"}) + "\n")
  corpus = corpus_lib.tokenize(str(shared / "corpus.jsonl"), str(shared / "corpus"),
                               DataConfig(), CONFIG.max_len)
  write_checkpoint(str(shared / "checkpoints"), corpus)
  # The two processes get the corpus as three files: each tokenizes its share
  # into WORKDIR/corpus first (common.tokenized_once), none reads it whole.
  lines = (shared / "corpus.jsonl").read_text().splitlines(True)
  gs = gcs("tracer-multihost")
  for i, lo in enumerate((0, 30, 70)):
    storage.write_text(f"{gs}/shards/part-{i}.jsonl", "".join(lines[lo:(30, 70, None)[i]]))
  shards = f"{gs}/shards/part-*.jsonl"
  bucket = s3("tracer-multihost")
  port = multiprocess.free_port()
  env = multiprocess.env(devices=4, **s3_server[0], **gcs_server[0])
  commands = [trace_command(tmp_path / "w", shared, f"{bucket}/run/store",
                            f"{gs}/run/results.jsonl", (port, i), shards)
              for i in range(2)]
  procs, logs = multiprocess.start(commands, tmp_path, env)
  # The same command on one process with all 8 devices, a local store.
  (tmp_path / "one").mkdir()
  one, one_log = multiprocess.start(
      [trace_command(tmp_path / "one", shared, tmp_path / "one" / "store",
                     tmp_path / "one" / "results.jsonl")], tmp_path / "one",
      multiprocess.env(devices=8))
  texts = multiprocess.wait(procs + one, logs + one_log, time.monotonic() + TIMEOUT_S)
  assert "mesh {'data': 4, 'model': 2}" in texts[0] and "rows" in texts[0]
  assert "wrote 5 results" in texts[0] and "wrote 5 results" not in texts[1]
  assert f"tokenizing {shards} into {tmp_path / 'w' / 'corpus'}, each of 2" in texts[0]
  tokenized = corpus_lib.TokenizedCorpus(str(tmp_path / "w" / "corpus"))
  assert [p["num_rows"] for p in tokenized.manifest.parts] == [30, NUM_DOCS - 30]
  assert tokenized.ids_of(np.arange(NUM_DOCS)) == [f"d{i}" for i in range(NUM_DOCS)]

  # Results: written once, by process 0, complete; equal to the 1-process run.
  results = [json.loads(line) for line in
             storage.read_text(f"{gs}/run/results.jsonl").splitlines()]
  local = [json.loads(line) for line in open(tmp_path / "one" / "results.jsonl")]
  assert [r["query_id"] for r in results] == [f"q{i}" for i in range(5)]
  for a, b in zip(results, local):
    assert a["proponent_ids"] == b["proponent_ids"]
    assert a["opponent_ids"] == b["opponent_ids"]
    np.testing.assert_allclose(a["proponent_scores"], b["proponent_scores"],
                               atol=1e-4)
  # The store and its basis live on the S3 server, complete.
  store = store_lib.open_store(f"{bucket}/run/store")
  assert store.is_complete() and store.num_rows == NUM_DOCS
  assert (store.manifest.corpus, store.manifest.corpus_rows) == (
      shards, str(tmp_path / "w" / "corpus"))
  assert pipeline.store_basis(store).num_train == R_SAMPLE
  assert not os.path.exists(tmp_path / "w" / "store")


def test_a_bad_line_in_one_hosts_share_ends_every_process_with_its_message(tmp_path):
  """Process 1's share of the corpus files has a line without a text. Both
  processes end soon with status 2 and one line: process 1 names the file and
  line, process 0 passes its message on (jax.distributed's key-value store).
  Before, process 0 waited for the corpus until jax.distributed's shutdown
  barrier timed out after 5 minutes and aborted both, with no word of why."""
  shared = tmp_path / "shared"
  (shared / "shards").mkdir(parents=True)
  docs = [json.dumps({"id": f"d{i}", "text": "abcab"[:1 + i % 5]}) + "\n"
          for i in range(NUM_DOCS)]
  (shared / "all.jsonl").write_text("".join(docs))
  write_checkpoint(str(shared / "checkpoints"), corpus_lib.tokenize(
      str(shared / "all.jsonl"), str(shared / "corpus"), DataConfig(), CONFIG.max_len))
  (shared / "queries.jsonl").write_text(
      json.dumps({"id": "q0", "prompt": "ab", "target": "ab"}) + "\n")
  docs[80] = json.dumps({"id": "d80", "txt": "ab"}) + "\n"
  for i, (lo, hi) in enumerate(((0, 30), (30, 70), (70, NUM_DOCS))):
    (shared / "shards" / f"part-{i}.jsonl").write_text("".join(docs[lo:hi]))
  shards = str(shared / "shards" / "part-*.jsonl")
  port = multiprocess.free_port()
  procs, logs = multiprocess.start(
      [trace_command(tmp_path / "w", shared, tmp_path / "store",
                     tmp_path / "results.jsonl", (port, i), shards) for i in range(2)],
      tmp_path, multiprocess.env(devices=4))
  deadline = time.monotonic() + 240  # inside the barrier's 300 s
  codes, texts = multiprocess.ends(procs, logs, deadline)
  assert codes == [2, 2], texts
  bad = f"{shared / 'shards' / 'part-2.jsonl'}:11: missing field 'text'"
  assert f"\nerror: {bad}" in texts[1], texts[1]
  assert f"\nerror: process 1 of 2 failed: {bad}" in texts[0], texts[0]
  assert not corpus_lib.is_tokenized(str(tmp_path / "w" / "corpus"))


@pytest.mark.parametrize("case", ["gin_file", "gin_bindings", "unused_flags"])
def test_an_error_before_the_join_ends_every_process_with_its_message(
    tmp_path, case):
  """Process 1 alone is given a gin file it cannot find, a binding gin
  refuses, or flags its script does not read (it runs tracer verify with
  trace's flags): errors found before jax.distributed is joined. Both end
  soon with status 2, process 0 with process 1's message. Before 2026-12-07
  process 0 waited for process 1 to join until jax's 5-minute deadline, then
  aborted (status 134)."""
  shared = tmp_path / "shared"
  (shared / "corpus").mkdir(parents=True)
  (shared / "all.jsonl").write_text("".join(
      json.dumps({"id": f"d{i}", "text": "abcab"[:1 + i % 5]}) + "\n"
      for i in range(NUM_DOCS)))
  write_checkpoint(str(shared / "checkpoints"), corpus_lib.tokenize(
      str(shared / "all.jsonl"), str(shared / "corpus"), DataConfig(), CONFIG.max_len))
  (shared / "queries.jsonl").write_text(
      json.dumps({"id": "q0", "prompt": "ab", "target": "ab"}) + "\n")
  port = multiprocess.free_port()
  commands = [trace_command(tmp_path / "w", shared, tmp_path / "store",
                            tmp_path / "results.jsonl", (port, i)) for i in range(2)]
  extra, message = {
      "gin_file": ("--gin_file=nosuch", "--gin_file=nosuch: no such file, and "
                   "not a config tracer ships"),
      "gin_bindings": ("--gin_bindings=ModelConfig.nosuch=1", "ModelConfig.nosuch"),
      "unused_flags": (None, "tracer verify does not read them")}[case]
  if case == "unused_flags":  # (verify defines no --show: absl would refuse it)
    commands[1] = [a for a in commands[1] if a != "--show=0"]
    commands[1][2] = "tracer.launch.verify"
  else:
    commands[1].append(extra)
  procs, logs = multiprocess.start(commands, tmp_path, multiprocess.env(devices=4))
  deadline = time.monotonic() + 120  # well inside jax's 300 s
  codes, texts = multiprocess.ends(procs, logs, deadline)
  assert codes == [2, 2], texts
  assert re.search(f"(^|\n)error: .*{re.escape(message)}", texts[1]), texts[1]
  assert re.search(f"(^|\n)error: process 1 of 2 failed: .*{re.escape(message)}",
                   texts[0]), texts[0]


def test_tokenized_once_refuses_what_it_cannot_share(tmp_path, monkeypatch):
  """On several processes a corpus of files is tokenized into WORKDIR/corpus:
  without a workdir, or with one holding another source's corpus, that is an
  error before any work; a tokenized corpus, or one process, is left as is."""
  from tracer.launch import common  # pylint: disable=g-import-not-at-top
  source = str(tmp_path / "a.jsonl")
  with open(source, "w") as f:
    f.write(json.dumps({"id": "d0", "text": "abc"}) + "\n")
  tokenized = str(tmp_path / "w" / "corpus")
  corpus_lib.tokenize(source, tokenized, DataConfig(), CONFIG.max_len)
  assert common.tokenized_once(None, source, None) == source  # one process
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  assert common.tokenized_once(None, tokenized, None) == tokenized
  with pytest.raises(InputError, match=r"on 2 processes a corpus is tokenized "
                     r"once for all of them, into WORKDIR/corpus: pass --workdir"):
    common.tokenized_once(None, source, None)
  other = source + "#text=body"
  with pytest.raises(InputError, match=f"corpus: holds the tokenized corpus of "
                     f"{re.escape(source)}, not of --corpus={re.escape(other)}; "
                     "pass --corpus="):
    common.tokenized_once(str(tmp_path / "w"), other, None)
  # WORKDIR/corpus of a source edited since is refused, as by tracer tokenize
  # (before 2026-12-06 its stale rows were traced).
  ckpt = types.SimpleNamespace(data_config=dataclasses.asdict(DataConfig()),
                               model_config=CONFIG,
                               family=types.SimpleNamespace(
                                   max_len=lambda config: config.max_len))
  workdir = str(tmp_path / "w")
  assert common.tokenized_once(workdir, source, ckpt) == tokenized
  with open(source, "a") as f:
    f.write(json.dumps({"id": "d1", "text": "def"}) + "\n")
  with pytest.raises(InputError, match=f"{re.escape(tokenized)}: made from "
                     f"{re.escape(source)} of [0-9]+ bytes, modified "):
    common.tokenized_once(workdir, source, ckpt)


# Three processes agree (coordination.agree) three times: all pass; processes
# 1 and 2 fail; process 1 fails instead of giving a verdict.
_AGREE = """
import json, os, sys, time
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
me = int(sys.argv[2])
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", 3, me)
from tracer import coordination
print("agreed:", json.dumps(coordination.agree("t", "")), flush=True)
print("agreed:", json.dumps(coordination.agree("t", f"bad {me}" if me else "")),
      flush=True)
if me == 1:
  time.sleep(1)
  coordination.tell_failure(ValueError("lost its way"))
else:
  start = time.monotonic()
  try:
    coordination.agree("t", "", timeout_s=120)
  except coordination.OtherProcessError as e:
    print(f"raised after {time.monotonic() - start:.0f} s:", e, flush=True)
coordination.leave_together()
os._exit(0)
"""


def test_processes_agree_on_the_first_failing_verdict(tmp_path):
  """``coordination.agree``: every process gets the first failing process's
  verdict (by index), or None; a process that fails instead of giving one
  ends the others' wait at once with its message, not at the timeout."""
  port = multiprocess.free_port()
  procs, logs = multiprocess.start(
      [[sys.executable, "-c", _AGREE, str(port), str(i)] for i in range(3)],
      tmp_path, multiprocess.env(devices=1))
  texts = multiprocess.wait(procs, logs, time.monotonic() + 180)
  for i, text in enumerate(texts):
    lines = [l for l in text.splitlines() if l.startswith(("agreed:", "raised"))]
    assert lines[:2] == ["agreed: null", 'agreed: [1, "bad 1"]'], text
    if i != 1:
      assert re.fullmatch(r"raised after \d s: process 1 of 3 failed: "
                          "ValueError: lost its way", lines[2]), text


# A one-source task read in shards: seqio reads it whole for each (warned).
@pytest.mark.filterwarnings("ignore:--corpus=tracer_")
@pytest.mark.parametrize("kind", ["files", "unjoined", "seqio", "seqio_shards"])
def test_tokenize_on_processes_waits_without_a_collective(tmp_path, monkeypatch,
                                                          kind):
  """Two simulated processes (threads, each its own process_index): process 1
  starts late, so process 0 waits by reading the manifest; both get the
  whole corpus, the rows of one process. ``unjoined``: neither process's
  own tokenize joins the parts (as if the last two finished together);
  process 0 joins them while it waits. ``seqio``: process 0 tokenizes alone;
  ``seqio_shards`` (``TASK#shards=3``): each process a run of shards."""
  import threading  # pylint: disable=g-import-not-at-top
  records = [{"id": f"d{i}", "text": "ab" * (1 + i % 5)} for i in range(12)]
  for i in range(3):
    with open(tmp_path / f"part-{i}.jsonl", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records[4 * i:4 * i + 4])
  source = str(tmp_path / "part-*.jsonl")
  output = str(tmp_path / "corpus")
  if kind.startswith("seqio"):
    with open(tmp_path / "all.jsonl", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
    source = "tracer_test_processes"
    data_lib.register_jsonl_task(source, str(tmp_path / "all.jsonl"),
                                 DataConfig().vocabulary())
    source += "#shards=3" if kind == "seqio_shards" else ""
  local = threading.local()
  if kind == "unjoined":
    # Each process's own tokenize call misses the other's part, as when both
    # finish together on a store slow to list.
    join = corpus_lib.join_parts

    def late_join(*args):
      local.joins = getattr(local, "joins", 0) + 1
      return join(*args) if local.joins > 1 else None

    monkeypatch.setattr(corpus_lib, "join_parts", late_join)
  statted = {0: [], 1: []}  # the source files each process statted
  identities = storage.identities
  monkeypatch.setattr(storage, "identities", lambda paths: statted[
      local.index].append(list(paths)) or identities(paths))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: local.index)
  got, errors = {}, []

  def process(index):
    local.index = index
    try:
      if index == 1:
        time.sleep(0.5)
      got[index] = pipeline.tokenize_on_processes(source, output, DataConfig(),
                                                  CONFIG.max_len, poll_s=0.2)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=process, args=(i,), daemon=True)
             for i in (0, 1)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60)
  assert not errors, errors
  whole = data_lib.read_corpus(source, DataConfig().vocabulary(), CONFIG.max_len)
  for index in (0, 1):
    rows = np.arange(len(whole))
    assert got[index].ids_of(rows) == whole.ids
    np.testing.assert_array_equal(got[index].examples(rows)["targets"],
                                  whole.examples(rows)["targets"])
  parts = got[0].manifest.parts
  assert (None if parts is None else [p["num_rows"] for p in parts]) == (
      {"seqio": None, "seqio_shards": [4, 8]}.get(kind, [4, 8]))
  if kind in ("files", "unjoined"):
    # Each statted its share once, as it read it. Until 2026-12-06 process
    # 0 statted its share again on every poll while it waited.
    files = [str(tmp_path / f"part-{i}.jsonl") for i in range(3)]
    assert statted == {0: [files[:1]], 1: [files[1:]]}, statted
