"""Two processes, one global mesh: encodings and the store pipeline under
``jax.distributed`` equal a single-process run.

The test starts two worker processes (4 simulated CPU devices each, 8 global
devices, gloo collectives) and, while they run, computes the same things in
the pytest process itself over its 8 simulated devices. Run as a script
(``python tests/test_multihost.py worker PORT ID WORKDIR``) this file is the
worker.

Covered, in both processes:
  1. ``GradientEncoder.project`` / ``encode`` of a batch of 11 examples (not a
     multiple of any step size), with and without a preconditioner fitted by
     ``tracer.fit_preconditioner`` inside the workers, on the default mesh
     (8 x 1, ``data`` spanning both processes) and on a (4, 2) data x model
     mesh.
  2. The store pipeline: manifest, ``launch.trace.open_store`` (process 0
     creates), ``launch.pipeline.encode_corpus`` (chunk c written by host
     c % 2) and ``scan.scan_store``; store content and top-k equal those of a
     single-process run.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time
import traceback
import types

import jax
import numpy as np
import pytest

import tracer
from tracer import data as data_lib
from tracer import model as model_lib
from tracer import partitioning
from tracer import scan as scan_lib
from tracer import store as store_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = model_lib.ModelConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32,
                               max_len=8)
EPS = 1e-4
SEED = 3
PROJECTION_DIM = 600
K = 4
NUM_DOCS = 45
CHUNK_ROWS = 16          # chunks of 16, 16 and 13 rows: hosts 0, 1, 0
BATCH_SIZE = 11          # every chunk is encoded in a full and a short batch
TIMEOUT_S = 180  # both workers; a normal run takes ~35 s

# Meshes, with a microbatch size that makes each encode call one step (a
# batch of up to 16 or 12 examples): one compilation per encoder.
MESHES = {
    "8x1": (lambda: partitioning.make_mesh(), 2),
    "4x2": (lambda: partitioning.make_mesh(4, 2), 3),
}
PIPELINE_MESH = "4x2"

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
  make, microbatch = MESHES[mesh_name]
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


def make_corpus() -> tuple[data_lib.Corpus, dict]:
  """45 distinct hand-made token documents (no vocabulary) and 3 queries."""
  rng = np.random.default_rng(7)
  records, seen = [], set()
  while len(records) < NUM_DOCS:
    tokens = tuple(int(t) for t in rng.integers(
        3, CONFIG.vocab_size, rng.integers(2, CONFIG.max_len)))
    if tokens not in seen:
      seen.add(tokens)
      records.append((f"doc{len(records)}", f"text {len(records)}", list(tokens)))
  corpus = data_lib.build_corpus("handmade", records, None, CONFIG.max_len)
  queries = data_lib.stack_examples([
      data_lib.query_example(rng.integers(3, CONFIG.vocab_size, 3),
                             rng.integers(3, CONFIG.vocab_size, 2), CONFIG.max_len)
      for _ in range(3)])
  return corpus, queries


def pipeline_case(store_path: str) -> dict[str, np.ndarray]:
  """Part 2: preconditioner, store, encode_corpus, query encodings, scan."""
  from launch import pipeline  # pylint: disable=g-import-not-at-top
  from launch import trace  # pylint: disable=g-import-not-at-top
  corpus, query_examples = make_corpus()
  params, _ = params_and_v()
  enc = make_encoder(PIPELINE_MESH)
  pcfg = pipeline.PreconditionerConfig(kind="block", train_examples=32, rank=3)
  pre = pipeline.fit_preconditioner(enc, corpus, query_examples, pcfg, BATCH_SIZE)
  ecfg = pipeline.EncodeConfig(store_dtype="float32", chunk_rows=CHUNK_ROWS,
                               batch_size=BATCH_SIZE)
  ckpt = types.SimpleNamespace(path="/nonexistent/checkpoint", step=7,
                               params=params)
  manifest = pipeline.manifest(ckpt, enc, "adamw", EPS, pre, corpus, ecfg)
  # As launch.trace.run does it: queries first, then the corpus, then the scan.
  queries = enc.encode(query_examples, pre)
  store = trace.open_store(store_path, manifest)
  pipeline.encode_corpus(enc, pre, corpus, store, BATCH_SIZE)
  # On return every host's chunks are on disk, on every host: the last chunk
  # belongs to host 0, and host 1 would otherwise scan before it is written.
  store.check_complete()
  topk = scan_lib.scan_store(store, queries, K, mesh=enc.mesh)
  out = {"queries": queries,
         "precond_fingerprint": np.asarray(pre.fingerprint()),
         **{f"topk.{f}": v for f, v in topk._asdict().items()}}
  for i, m in enumerate(pre.inv_sqrt):
    out[f"precond{i}"] = np.asarray(m)
  return out


def run_all(workdir: str) -> dict[str, np.ndarray]:
  out = {}
  for name in MESHES:
    out.update(encoder_case(name))
  out.update({f"pipeline/{k}": v for k, v in
              pipeline_case(os.path.join(workdir, "store")).items()})
  return out


# --------------------------------------------------------------------------
# The worker and the test.


def _worker(port: int, process_id: int, workdir: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", 2, process_id)
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  assert jax.process_count() == 2
  try:
    out = run_all(workdir)
  except BaseException:  # pylint: disable=broad-except
    # Exit now: jax.distributed's exit barrier would wait for the other
    # process, itself waiting for this one in a collective.
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
  np.savez(os.path.join(workdir, f"out{process_id}.npz"), **out)
  jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _gloo_available() -> bool:
  try:
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
    return hasattr(_jax, "make_gloo_tcp_collectives")
  except ImportError:
    return True  # let the workers say what is wrong


def _start_workers(workdir) -> tuple[list[subprocess.Popen], list[str]]:
  port = _free_port()
  env = dict(
      os.environ, JAX_PLATFORMS="cpu",
      XLA_FLAGS=("--xla_force_host_platform_device_count=4"
                 " --xla_cpu_collective_call_terminate_timeout_seconds=900"
                 " --xla_cpu_collective_timeout_seconds=900"),
      PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  procs, logs = [], []
  for i in range(2):
    log = os.path.join(workdir, f"worker{i}.log")
    with open(log, "wb") as f:
      procs.append(subprocess.Popen(
          [sys.executable, os.path.abspath(__file__), "worker", str(port), str(i),
           str(workdir)], env=env, stdout=f, stderr=subprocess.STDOUT))
    logs.append(log)
  return procs, logs


def _wait(procs, logs, deadline: float) -> None:
  """Waits for both workers; on the first failure kills the other (which
  would otherwise wait in a collective) and fails with every worker's log."""
  try:
    while any(p.poll() is None for p in procs):
      if any(p.returncode not in (None, 0) for p in procs):
        break
      if time.monotonic() > deadline:
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  if any(p.returncode != 0 for p in procs):
    report = []
    for i, (p, log) in enumerate(zip(procs, logs)):
      with open(log, errors="replace") as f:
        text = f.read()[-6000:]
      report.append(f"--- worker {i} (exit {p.returncode}) ---\n{text}")
    pytest.fail("multi-process workers failed:\n" + "\n".join(report),
                pytrace=False)


def test_two_processes_equal_one(tmp_path):
  if not _gloo_available():
    pytest.skip("this jaxlib has no gloo CPU collectives")
  workers = tmp_path / "workers"
  workers.mkdir()
  procs, logs = _start_workers(workers)
  deadline = time.monotonic() + TIMEOUT_S
  try:
    # The single-process reference, over this process's 8 devices, while the
    # workers run.
    single = tmp_path / "single"
    single.mkdir()
    want = run_all(str(single))
  finally:
    _wait(procs, logs, deadline)

  got = [dict(np.load(workers / f"out{i}.npz")) for i in range(2)]
  assert set(got[0]) == set(got[1]) == set(want)

  # Both processes hold exactly the same results (every result is a global
  # value gathered to each host).
  for key in want:
    np.testing.assert_array_equal(got[0][key], got[1][key], err_msg=key)

  # ...which equal the single-process run.
  for key, w in want.items():
    g = got[0][key]
    if "fingerprint" in key:
      continue
    if key.startswith("pipeline/topk.") and key.endswith("rows"):
      np.testing.assert_array_equal(g, w, err_msg=key)
    elif "inv_sqrt" in key or "precond" in key:
      # R^(-1/2) of a rank-deficient R: eigh amplifies rounding differences.
      np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-3 * np.abs(w).max(),
                                 err_msg=key)
    elif key.endswith("/project"):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max(),
                                 err_msg=key)
    else:
      np.testing.assert_allclose(g, w, rtol=0, atol=1e-5, err_msg=key)
  for name in MESHES:
    assert got[0][f"{name}/encode"].shape == (11, want[f"{name}/plain"].shape[1])
    # A meaningful comparison: the preconditioner changes the encodings.
    assert np.abs(want[f"{name}/encode"] - want[f"{name}/plain"]).max() > 1e-2

  # The store: same manifest (but for where it lives), every chunk done, same
  # rows.
  s_multi = store_lib.open_store(workers / "store")
  s_single = store_lib.open_store(single / "store")
  m_multi, m_single = s_multi.manifest.to_dict(), s_single.manifest.to_dict()
  m_multi.pop("preconditioner_fingerprint")
  m_single.pop("preconditioner_fingerprint")
  assert m_multi == m_single
  assert s_multi.manifest.preconditioner_fingerprint == str(
      got[0]["pipeline/precond_fingerprint"])
  assert s_multi.done_chunks() == set(range(3)) == s_single.done_chunks()
  rows_multi = s_multi.read_rows(0, NUM_DOCS)
  rows_single = s_single.read_rows(0, NUM_DOCS)
  np.testing.assert_allclose(rows_multi, rows_single, rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(rows_multi, axis=1), 1, atol=1e-5)
  # The top-k is the store's own exact top-k, and the rows compared above are
  # well separated: no near ties that rounding could reorder.
  scores = got[0]["pipeline/queries"] @ rows_multi.T
  order = np.argsort(-scores, axis=1, kind="stable")
  np.testing.assert_array_equal(got[0]["pipeline/topk.proponent_rows"],
                                order[:, :K])
  top = np.take_along_axis(scores, order[:, :K + 1], axis=1)
  assert np.abs(np.diff(top, axis=1)).min() > 5e-5


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
  _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
