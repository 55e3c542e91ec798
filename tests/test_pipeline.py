"""End to end: generated facts -> trained tiny model -> trace -> proponents."""

from __future__ import annotations

import json
import os
import re
import socket
import time
import types

from absl import flags
import gin
import numpy as np
import pytest

from tracer.launch import common
from tracer.launch import config
from tracer.launch import encode as encode_script
from tracer.launch import fit_preconditioner as fit_script
from tracer.launch import quality
from tracer.launch import scan as scan_script
from tracer.launch import sweep
from tracer.launch import tokenize
from tracer.launch import trace
from tracer.launch import verify as verify_script
from tracer.launch import train
from tracer import corpus as corpus_lib
from tracer import data as data_lib
from tracer import encoder as encoder_lib
from tracer import evaluate
from tracer import facts
from tracer import hessian
from tracer import pipeline
from tracer import projection
from tracer import scan as scan_lib
from tracer import storage
from tracer import store as store_lib
from tracer.config import ENCODING_SETTINGS, EncodeConfig
from tracer.errors import InputError
from tracer.errors import StoreClaimedError
# pytest puts tests/ on sys.path; reuse the store tests' file reader.
from test_store import _array_files as store_files

BINDINGS = """
ModelConfig.max_len = 128
ModelConfig.d_model = 64
ModelConfig.num_layers = 2
ModelConfig.num_heads = 4
ModelConfig.d_ff = 256
OptimizerConfig.total_steps = 150
OptimizerConfig.warmup_steps = 20
OptimizerConfig.learning_rate = 1e-2
TrainConfig.batch_size = 32
TrainConfig.log_every = 150
TrainConfig.checkpoint_every = 75
EncodeConfig.projection_dim = 4096
EncodeConfig.batch_size = 64
EncodeConfig.chunk_rows = 64
PreconditionerConfig.train_examples = 256
"""

# Calibrated on this corpus (seed 0, 8 facts per bucket, 223 rows, 150 steps,
# d = 3.7k): measured recall@10 was 1.0 for both buckets 4-10 and 11+ (0.97
# overall). The bound leaves room for numerical and platform differences while
# still failing a broken pipeline (10 random rows of 223 hold a stating
# document for roughly 10-45% of these queries).
RECALL_4_PLUS_BOUND = 0.85


def _bind(**bindings):
  with gin.unlock_config():
    for key, value in bindings.items():
      gin.bind_parameter(key.replace("__", "."), value)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["test"])
  gin.clear_config()
  gin.parse_config(BINDINGS)
  root = tmp_path_factory.mktemp("pipeline")
  corpus, queries = facts.write_fact_corpus(
      root / "facts", facts.FactsConfig(facts_per_bucket=8, distractor_docs=20))
  train.train(str(corpus), str(root))
  yield root, str(corpus), str(queries)
  gin.clear_config()


def test_trace_finds_fact_documents(trained):
  root, corpus, queries = trained
  out = root / "results.jsonl"
  rows = trace.run(str(root), corpus, queries, str(out), top_k=10, show=2)
  on_disk = [json.loads(line) for line in open(out)]
  assert on_disk == json.loads(json.dumps(rows))
  for field in ("query_id", "prompt", "target", "fact_doc_ids", "bucket",
                "proponent_ids", "proponent_scores", "proponents", "opponent_ids",
                "opponent_scores", "opponents"):
    assert field in on_disk[0], field
  scores = np.asarray(on_disk[0]["proponent_scores"])
  assert np.all(np.diff(scores) <= 0) and len(scores) == 10
  assert np.all(np.diff(on_disk[0]["opponent_scores"]) >= 0)
  query_list = evaluate.read_jsonl_records(queries, ("id", "prompt", "target"))
  metrics = evaluate.retrieval_metrics(query_list, evaluate.read_results(out))
  frequent = [metrics["buckets"][b]["recall@10"] for b in ("4-10", "11+")]
  assert min(frequent) >= RECALL_4_PLUS_BOUND, metrics


def test_streaming_equals_store_and_rerun_resumes(trained, capsys):
  root, corpus, queries = trained
  # A float32 store holds exactly what streaming scores, so results agree.
  with gin.unlock_config():
    gin.bind_parameter("EncodeConfig.store_dtype", "float32")
  try:
    path = str(root / "store_f32")
    a = trace.run(str(root), corpus, queries, str(root / "a.jsonl"), show=0,
                  store_path=path)
    store = store_lib.open_store(path)
    assert store.is_complete() and store.manifest.dtype == "float32"
    markers = sorted(os.listdir(os.path.join(path, "progress")))
    b = trace.run(str(root), corpus, queries, str(root / "b.jsonl"), show=0,
                  streaming=True)
    again = trace.run(str(root), corpus, queries, str(root / "a2.jsonl"), show=0,
                      store_path=path)
    # The queries split over the devices, from the store and streamed.
    split = [trace.run(str(root), corpus, queries, str(root / f"s{i}.jsonl"),
                       show=0, store_path=None if streaming else path,
                       streaming=streaming, shard_queries=True)
             for i, streaming in enumerate((False, True))]
    # Each says so (the store scan, then the streamed one).
    said = re.findall(r"^scan: \d+ quer(?:y|ies) split over the 8 devices .*$",
                      capsys.readouterr().out, re.M)
    assert len(said) == 2, said
  finally:
    with gin.unlock_config():
      gin.bind_parameter("EncodeConfig.store_dtype", "bfloat16")
  for key in ("proponent_ids", "opponent_ids"):
    assert [r[key] for r in a] == [r[key] for r in b]
  np.testing.assert_allclose([r["proponent_scores"] for r in a],
                             [r["proponent_scores"] for r in b], atol=1e-5)
  assert again == a
  assert sorted(os.listdir(os.path.join(path, "progress"))) == markers
  for got in split:
    for key in ("proponent_ids", "opponent_ids"):
      assert [r[key] for r in got] == [r[key] for r in a]
    np.testing.assert_allclose([r["proponent_scores"] for r in got],
                               [r["proponent_scores"] for r in a], atol=1e-5)


def test_an_int8_store_keeps_the_results(trained):
  # int8 rows over the basis' column scales: the store is half a bf16
  # one's size and the results are nearly the float32 store's.
  root, corpus, queries = trained
  runs = {}
  for dtype in ("float32", "int8"):
    _bind(EncodeConfig__store_dtype=dtype)
    try:
      runs[dtype] = trace.run(str(root), corpus, queries,
                              str(root / f"{dtype}.jsonl"), show=0,
                              store_path=str(root / f"store_{dtype}"))
    finally:
      _bind(EncodeConfig__store_dtype="bfloat16")
  store = store_lib.open_store(str(root / "store_int8"))
  basis = pipeline.store_basis(store)
  assert store.manifest.dtype == "int8" and basis is not None
  np.testing.assert_array_equal(store.column_scales, basis.column_scales())
  assert np.asarray(store.read_async(0, 4).result()).dtype == np.int8
  kept = [len(set(a["proponent_ids"]) & set(b["proponent_ids"])) / len(a["proponent_ids"])
          for a, b in zip(runs["float32"], runs["int8"])]
  top1 = np.mean([a["proponent_ids"][0] == b["proponent_ids"][0]
                  for a, b in zip(runs["float32"], runs["int8"])])
  assert np.mean(kept) >= 0.95 and top1 >= 0.95, (np.mean(kept), top1)
  np.testing.assert_allclose([r["proponent_scores"] for r in runs["int8"]],
                             [r["proponent_scores"] for r in runs["float32"]],
                             atol=2e-2)


def test_scan_rejects_a_store_from_other_settings(trained):
  root, corpus, queries = trained
  trace.run(str(root), corpus, queries, str(root / "c.jsonl"), show=0)
  _bind(EncodeConfig__seed=1)
  try:
    with pytest.raises(store_lib.IncompatibleStoreError,
                       match="EncodeConfig.seed: the store has 0, the gin bindings say 1"):
      scan_script.run(str(root), corpus, queries, str(root / "d.jsonl"))
  finally:
    _bind(EncodeConfig__seed=0)
  # Encoded with Adam's rank-one correction (the default): exact-correction
  # queries must not be scored against it.
  assert store_lib.open_store(str(root / "store")).manifest.kernel == (
      "rank_one_correction")
  _bind(EncodeConfig__rank_one_correction=False)
  try:
    with pytest.raises(store_lib.IncompatibleStoreError,
                       match="EncodeConfig.rank_one_correction: the store has True"):
      scan_script.run(str(root), corpus, queries, str(root / "d.jsonl"))
  finally:
    _bind(EncodeConfig__rank_one_correction=True)
  # A store from before manifests kept their EncodeConfig is compared field
  # by field, and the error says where the fields come from.
  manifest = root / "store" / store_lib.MANIFEST
  saved = manifest.read_text()
  old = json.loads(saved)
  del old["encode_config"]
  manifest.write_text(json.dumps(old))
  _bind(EncodeConfig__seed=1)
  try:
    with pytest.raises(store_lib.IncompatibleStoreError, match=(
        r"field 'projection_seed': store has 0, this run has 1.* \(d, layout, "
        r"projection_seed, .* follow EncodeConfig: pass the gin files the store "
        r"was encoded with, or another --store\)")):
      scan_script.run(str(root), corpus, queries, str(root / "d.jsonl"))
  finally:
    _bind(EncodeConfig__seed=0)
    manifest.write_text(saved)
  # The store's rows are in a block basis: a full-R run cannot reuse them.
  _bind(PreconditionerConfig__kind="full")
  try:
    with pytest.raises(store_lib.IncompatibleStoreError,
                       match="kind: store has 'block', this run has 'full'"):
      trace.run(str(root), corpus, queries, str(root / "d.jsonl"), show=0)
  finally:
    _bind(PreconditionerConfig__kind="block")


def test_scan_of_query_sets_in_one_pass_equals_a_scan_per_set(trained, capsys):
  """``tracer scan --queries=A,B --output=RA,RB``: two query sets, each with
  the R fitted from its own queries, in one pass over the store; each
  set's results are what a scan of that set alone writes; and ``tracer
  trace`` of the same."""
  root, corpus, queries = trained
  trace.run(str(root), corpus, queries, str(root / "c.jsonl"), show=0)
  lines = open(queries).read().splitlines()
  paths = [str(root / "set_a.jsonl"), str(root / "set_b.jsonl")]
  for path, part in zip(paths, (lines[:5], lines[5:])):
    with open(path, "w") as f:
      f.write("\n".join(part) + "\n")
  alone = [scan_script.run(str(root), corpus, p, str(root / f"alone{i}.jsonl"),
                           top_k=10) for i, p in enumerate(paths)]
  capsys.readouterr()
  outs = [str(root / "one_a.jsonl"), str(root / "one_b.jsonl")]
  together = scan_script.run(str(root), corpus, ",".join(paths), ",".join(outs),
                             top_k=10)
  said = capsys.readouterr()
  assert (f"scan: {len(lines)} queries in 2 sets, each under its own metric, "
          "whole on each of the 8 devices, one pass over the rows") in (
              said.out + said.err)
  assert [len(r) for r in together] == [5, len(lines) - 5]
  for rows, want, out in zip(together, alone, outs):
    assert [json.loads(l) for l in open(out)] == json.loads(json.dumps(rows))
    for a, b in zip(rows, want):
      assert a["query_id"] == b["query_id"]
      assert a["proponent_ids"] == b["proponent_ids"]
      assert a["opponent_ids"] == b["opponent_ids"]
      np.testing.assert_allclose(a["proponent_scores"], b["proponent_scores"],
                                 rtol=1e-5, atol=1e-6)
  # tracer trace takes them too (its store reused: no corpus gradient).
  traced = trace.run(str(root), corpus, ",".join(paths), ",".join(
      str(root / f"traced_{i}.jsonl") for i in range(2)), top_k=10, show=1)
  assert [[r["proponent_ids"] for r in rows] for rows in traced] == [
      [r["proponent_ids"] for r in rows] for rows in together]
  with pytest.raises(InputError, match="--streaming scores one query set"):
    trace.run(str(root), corpus, ",".join(paths), ",".join(outs), streaming=True)
  with pytest.raises(InputError, match="--output: 1 file for 2 files in --queries"):
    scan_script.run(str(root), corpus, ",".join(paths), outs[0])
  # Split over the devices (since stop 80): each block's queries under
  # their own set's R.
  capsys.readouterr()
  split = scan_script.run(str(root), corpus, ",".join(paths), ",".join(outs),
                          top_k=10, shard_queries=True)
  said = capsys.readouterr()
  assert (f"scan: {len(lines)} queries in 2 sets, each under its own metric, "
          "split over the 8 devices (512 with the padding, 64 a device), one "
          "pass over the rows") in said.out + said.err
  for rows, want in zip(split, alone):
    for a, b in zip(rows, want):
      assert a["proponent_ids"] == b["proponent_ids"]
      assert a["opponent_ids"] == b["opponent_ids"]
      np.testing.assert_allclose(a["proponent_scores"], b["proponent_scores"],
                                 rtol=1e-5, atol=1e-6)


def test_scan_encodes_queries_as_its_store_was_encoded(trained, capsys, monkeypatch):
  """A store keeps the EncodeConfig settings it was encoded with; scan (and
  serve, trace, encode) take those gin does not bind, so a store made with
  other gin files is scanned as made; a binding that differs is an error
  naming it. The store records a relative --corpus absolute, so serve and
  scan find it from another directory; a store that recorded it relative
  (before) matches the same files from its run's directory only."""
  root, corpus, queries = trained
  other = str(root / "store-other")
  monkeypatch.chdir(root)
  relative = os.path.relpath(corpus)
  _bind(EncodeConfig__seed=1, EncodeConfig__projection_dim=2048)
  try:
    made = trace.run(str(root), relative, queries, str(root / "o.jsonl"), show=0,
                     store_path=other)
  finally:
    gin.clear_config()
    gin.parse_config(BINDINGS.replace("EncodeConfig.projection_dim = 4096", ""))
  try:
    manifest = store_lib.read_manifest(other)
    assert sorted(manifest.encode_config) == sorted(ENCODING_SETTINGS)
    assert (manifest.encode_config["seed"], manifest.encode_config["projection_dim"],
            manifest.encode_config["chunk_rows"]) == (1, 2048, 64)
    assert manifest.corpus == corpus
    monkeypatch.chdir(root / "facts")
    assert common.corpus_source(other, None) == corpus
    capsys.readouterr()
    # No --corpus: the store's own, found from another directory.
    rows = scan_script.run(str(root), None, queries, str(root / "p.jsonl"),
                           store_path=other)
    said = capsys.readouterr()
    assert (f"store {other}: encoded with projection_dim=2048, seed=1; encoding "
            "queries the same way") in said.out + said.err
    assert len(rows) == len(made)
    for a, b in zip(rows, made):
      assert a["proponent_ids"] == b["proponent_ids"]
      np.testing.assert_allclose(a["proponent_scores"], b["proponent_scores"],
                                 rtol=1e-5, atol=1e-6)
    _bind(EncodeConfig__projection_dim=4096)
    with pytest.raises(store_lib.IncompatibleStoreError, match=re.escape(
        f"{other}: a store encoded with another EncodeConfig than the gin "
        "bindings name (EncodeConfig.projection_dim: the store has 2048, the gin "
        "bindings say 4096); expected the gin files it was encoded with, or "
        "another --store")):
      scan_script.run(str(root), corpus, queries, str(root / "p.jsonl"),
                      store_path=other)
    gin.clear_config()
    gin.parse_config(BINDINGS.replace("EncodeConfig.projection_dim = 4096", ""))
    # A store records its corpus relative to its run's directory: the
    # same rows (fingerprint) from anywhere are the same corpus.
    path = os.path.join(other, store_lib.MANIFEST)
    with open(path) as f:
      old = json.load(f)
    with open(path, "w") as f:
      json.dump({**old, "corpus": relative}, f)
    rows = scan_script.run(str(root), corpus, queries, str(root / "p.jsonl"),
                           store_path=other)
    assert [r["proponent_ids"] for r in rows] == [r["proponent_ids"] for r in made]
    # As a store made before recorded its corpus: relative to its run, and
    # no fingerprint of its rows.
    with open(path, "w") as f:
      json.dump({**old, "corpus": relative, "corpus_fingerprint": ""}, f)
    with pytest.raises(store_lib.IncompatibleStoreError, match=re.escape(
        f"field 'corpus': store has '{relative}', this run has '{corpus}'")):
      scan_script.run(str(root), corpus, queries, str(root / "p.jsonl"),
                      store_path=other)
    monkeypatch.chdir(root)
    rows = scan_script.run(str(root), corpus, queries, str(root / "p.jsonl"),
                           store_path=other)
    assert [r["proponent_ids"] for r in rows] == [r["proponent_ids"] for r in made]
  finally:
    gin.clear_config()
    gin.parse_config(BINDINGS)


def test_sweep_skips_finished_runs(trained, tmp_path, monkeypatch):
  root, _, _ = trained
  calls = []
  real = sweep.subprocess.run

  def counting(cmd, **kw):
    calls.append(cmd)
    return real(cmd, **kw)

  monkeypatch.setattr(sweep.subprocess, "run", counting)
  # The run subprocess needs the same model sizes as the checkpoint.
  gin_file = tmp_path / "model.gin"
  gin_file.write_text(BINDINGS)
  grid = ["EncodeConfig.projection_dim=512,1024"]
  # Written through a URL (object storage's code path: before 2026-12-04 the
  # sweep looked for finished runs with os.path and made local folders named
  # "gs:"), read back from the path.
  table = sweep.sweep(f"file://{tmp_path}/sw", grid, str(root), [str(gin_file)])
  assert sorted(table) == ["projection_dim=1024", "projection_dim=512"]
  assert len(calls) == 2
  assert all(0.0 <= t["recall@10"] <= 1.0 for t in table.values())
  assert (tmp_path / "sw/runs/projection_dim=512/log.txt").read_text().startswith(
      f"checkpoint {root}/checkpoints/")
  assert not (tmp_path / "file:").exists()
  again = sweep.sweep(str(tmp_path / "sw"), grid, str(root), [str(gin_file)])
  assert len(calls) == 2 and again == table
  # A run made with other gin files is not taken for this one (before
  # 2026-12-04 it was: only the run's name was looked at) ...
  other_gin = tmp_path / "other.gin"
  other_gin.write_text(BINDINGS)
  with pytest.raises(Exception, match="metrics.json: made with gin_files"):
    sweep.sweep(str(tmp_path / "sw"), grid, str(root), [str(other_gin)])
  # ... nor one made with the same gin file before it was edited (before
  # 2026-12-04 only its path was compared) ...
  gin_file.write_text(BINDINGS + "\nPreconditionerConfig.damping = 0.5\n")
  with pytest.raises(Exception, match="metrics.json: made with gin_sha256"):
    sweep.sweep(str(tmp_path / "sw"), grid, str(root), [str(gin_file)])
  gin_file.write_text(BINDINGS)
  # ... and two points may not share a run name.
  with pytest.raises(Exception, match="both name the run 'seed=1_2'"):
    sweep.sweep(str(tmp_path / "sw"), ["EncodeConfig.seed=1/2,1 2"], str(root),
                [str(gin_file)])
  assert len(calls) == 2
  # A point whose gin would fail is refused before any point runs (before
  # 2026-12-05 the points before it ran first, and it failed with "run ...
  # failed (exit 2); see log.txt").
  try:
    for grid, message in [
        (["EncodeConfig.seed=1,01"], "--grid: the run 'seed=01': gin: "),
        (["PreconditionerConfig.damping=0.1,-1"], "--grid: the run 'damping=-1': "
         "gin: PreconditionerConfig.damping = -1: expected a value > 0"),
        (["EncodeConfig.seed=3", "EncodeConfig.nonesuch=1"], "--grid: the run "
         "'seed=3__nonesuch=1': gin: ")]:
      with pytest.raises(Exception, match=re.escape(message)):
        sweep.sweep(str(tmp_path / "sw2"), grid, str(root), [str(gin_file)])
    assert len(calls) == 2 and not (tmp_path / "sw2").exists()
  finally:  # the check parses gin in this process
    gin.clear_config()
    gin.parse_config(BINDINGS)
  assert config  # the launch flags are defined


def _sweep_base(tmp_path) -> str:
  """A base workdir for ``sweep.sweep`` with no model: its facts, and a step
  directory standing for its checkpoint (the trace runs are faked)."""
  base = tmp_path / "base"
  facts.write_fact_corpus(str(base / "facts"), facts.FactsConfig(
      facts_per_bucket=2, distractor_docs=2))
  (base / "checkpoints" / "100").mkdir(parents=True)
  return str(base)


def _fake_trace(cmds: list):
  """Stands in for ``sweep._run_logged`` (a ``tracer trace`` run): records
  its command and writes results that find no document."""
  def run(cmd, log_path):
    del log_path
    cmds.append(cmd)
    flag = lambda name: next(a.split("=", 1)[1] for a in cmd
                             if a.startswith(f"--{name}="))
    evaluate.write_results(flag("output"), [
        evaluate.make_result_row(q, [], [], []) for q in data_lib.read_queries(
            flag("queries"))])
    return 0
  return run


def test_sweep_passes_gin_bindings_to_every_run(tmp_path, monkeypatch):
  """Before 2026-12-07 ``tracer sweep --gin_bindings`` (without --family_dir)
  reached no run, silently."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["test"])
  base, cmds = _sweep_base(tmp_path), []
  monkeypatch.setattr(sweep, "_run_logged", _fake_trace(cmds))
  sw, gin_files = str(tmp_path / "sw"), ["configs/tiny.gin"]
  grid, dim = ["EncodeConfig.seed=1,2"], "EncodeConfig.projection_dim = 512"
  try:
    sweep.sweep(sw, grid, base, gin_files, [dim])
    # Before each point's own bindings (the grid's axis wins over them).
    assert [[a for a in c if a.startswith("--gin_bindings=")] for c in cmds] == [
        [f"--gin_bindings={dim}", f"--gin_bindings=EncodeConfig.seed={s}"]
        for s in (1, 2)]
    metrics = json.loads((tmp_path / "sw/runs/seed=1/metrics.json").read_text())
    assert metrics["gin_bindings"] == [dim]
    # A rerun with other --gin_bindings does not take these runs for its own.
    with pytest.raises(Exception, match=re.escape(
        "metrics.json: made with gin_bindings ['EncodeConfig.projection_dim = "
        "512'], this run []; use another --workdir")):
      sweep.sweep(sw, grid, base, gin_files)
    # They are checked with each point before any point runs.
    with pytest.raises(Exception, match=re.escape(
        "--grid: the run 'seed=1': gin: PreconditionerConfig.damping = -1: "
        "expected a value > 0")):
      sweep.sweep(str(tmp_path / "sw2"), grid, base, gin_files,
                  ["PreconditionerConfig.damping = -1"])
    assert len(cmds) == 2 and not (tmp_path / "sw2").exists()
  finally:  # the check parses gin in this process
    gin.clear_config()
    gin.parse_config(BINDINGS)


def test_sweep_runs_record_their_checkpoint_step(tmp_path, monkeypatch):
  """Before 2026-12-07 a run's metrics.json recorded no step: a rerun after
  the base trained on reused its runs, and ran new points on the later
  checkpoint, into one table."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["test"])
  base, cmds = _sweep_base(tmp_path), []
  monkeypatch.setattr(sweep, "_run_logged", _fake_trace(cmds))
  sw, gin_files = str(tmp_path / "sw"), ["configs/tiny.gin"]
  try:
    sweep.sweep(sw, ["EncodeConfig.seed=0"], base, gin_files)
    # Each run is pinned to the step recorded (the base may train on).
    assert f"--checkpoint={base}/checkpoints/100" in cmds[0]
    metrics = json.loads((tmp_path / "sw/runs/seed=0/metrics.json").read_text())
    assert metrics["checkpoint_step"] == 100
    (tmp_path / "base/checkpoints/200").mkdir()
    with pytest.raises(Exception, match=re.escape(
        "seed=0/metrics.json: made with checkpoint_step 100, this run 200; use "
        "another --workdir")):
      sweep.sweep(sw, ["EncodeConfig.seed=0,1"], base, gin_files)
    assert len(cmds) == 1
    # Runs from before steps were recorded are not compared.
    del metrics["checkpoint_step"]
    (tmp_path / "sw/runs/seed=0/metrics.json").write_text(json.dumps(metrics))
    sweep.sweep(sw, ["EncodeConfig.seed=0"], base, gin_files)
    assert len(cmds) == 1
    with pytest.raises(Exception, match=re.escape(
        f"--base_workdir={tmp_path}: {tmp_path}/checkpoints: no checkpoint "
        "directory; expected a workdir with a trained model")):
      sweep.sweep(sw, ["EncodeConfig.seed=0"], str(tmp_path), gin_files)
  finally:  # the check parses gin in this process
    gin.clear_config()
    gin.parse_config(BINDINGS)


def test_crash_mid_encode_then_rerun_gives_identical_store(trained, monkeypatch):
  root, corpus, queries = trained
  clean = str(root / "clean_store")
  trace.run(str(root), corpus, queries, str(root / "e.jsonl"), show=0,
            store_path=clean)
  crashed = str(root / "crashed_store")
  real_write = store_lib.EncodingStore.write_chunk
  written = []

  def crash_on_third(self, chunk, *args):
    if len(written) == 2:
      raise KeyboardInterrupt("simulated crash")
    written.append(chunk)
    real_write(self, chunk, *args)

  monkeypatch.setattr(store_lib.EncodingStore, "write_chunk", crash_on_third)
  with pytest.raises(KeyboardInterrupt):
    trace.run(str(root), corpus, queries, str(root / "f.jsonl"), show=0,
              store_path=crashed)
  monkeypatch.setattr(store_lib.EncodingStore, "write_chunk", real_write)
  assert not store_lib.open_store(crashed).is_complete()
  trace.run(str(root), corpus, queries, str(root / "f.jsonl"), show=0,
            store_path=crashed)
  assert store_files(clean) == store_files(crashed)
  assert open(root / "e.jsonl").read() == open(root / "f.jsonl").read()


def test_verify_finds_a_corrupt_chunk_and_a_rerun_rewrites_only_it(
    trained, capsys, monkeypatch):
  root, corpus, queries = trained
  path = str(root / "verified_store")
  trace.run(str(root), corpus, queries, str(root / "v.jsonl"), show=0,
            store_path=path)
  before = store_files(path)
  capsys.readouterr()
  assert verify_script.run(path) == 0
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last.startswith(f"OK: {path}: 4 chunks")
  store = store_lib.open_store(path)
  raw = bytearray(open(store.chunk_file(2), "rb").read())
  raw[1000] ^= 0x40
  open(store.chunk_file(2), "wb").write(bytes(raw))
  # The scan refuses it, naming the chunk.
  with pytest.raises(store_lib.CorruptStoreError, match=r"c/2/0: chunk 2 "):
    trace.run(str(root), corpus, queries, str(root / "v2.jsonl"), show=0,
              store_path=path)
  assert not os.path.exists(root / "v2.jsonl")
  assert verify_script.run(path, repair=True) == 1
  out = capsys.readouterr().out
  assert f"corrupt: {store.chunk_file(2)}: chunk 2 (rows 128..192): checksum " \
         "mismatch" in out and "unmarked" in out
  encoded = []
  real = pipeline.encode_corpus
  monkeypatch.setattr(pipeline, "encode_corpus", lambda *a, **k: encoded.append(
      real(*a, **k)) or encoded[-1])
  encode_script.run(str(root), corpus, path)
  assert encoded[0].rows == 64            # chunk 2 only
  assert store_files(path) == before
  assert verify_script.run(path) == 0
  # --verify_store: one encode run finds and rewrites a bad chunk.
  with open(store.chunk_file(3), "r+b") as f:
    f.truncate(100)
  flags.FLAGS.verify_store = True   # (monkeypatch would delete the flag after)
  try:
    encode_script.run(str(root), corpus, path)
  finally:
    flags.FLAGS.verify_store = False
  assert encoded[1].rows == 223 - 192     # chunk 3 only (the last, short one)
  assert store_files(path) == before
  # A marker of an earlier format (empty) has no checksum: the chunk under it
  # is not checked, and the OK line says so, not that all 4 match.
  with open(store._marker(1), "wb"):
    pass
  raw = bytearray(open(store.chunk_file(1), "rb").read())
  raw[1000] ^= 0x40
  open(store.chunk_file(1), "wb").write(bytes(raw))
  capsys.readouterr()
  assert verify_script.run(path) == 0
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert f"OK: {path}: 4 chunks, 223 rows x " in last
  assert "; 3 match their checksums, 1 has none to check (markers of an earlier " \
         "tracer: read back, not checked); 0 rows quarantined" in last, last


def test_a_second_writer_is_refused_while_the_first_lives(trained):
  root, corpus, _ = trained
  path = root / "claimed_store"
  path.mkdir()
  live = {"job": "other", "host": socket.gethostname(), "pid": os.getpid(),
          "started": "2026-11-29T09:00:00Z", "heartbeat": time.time()}
  (path / "writer.json").write_text(json.dumps(live))
  with pytest.raises(StoreClaimedError,
                     match=rf"job other on host {socket.gethostname()}, pid "
                     rf"{os.getpid()}, started 2026-11-29T09:00:00Z"):
    encode_script.run(str(root), corpus, str(path))
  assert os.listdir(path) == ["writer.json"]   # nothing else was written


def test_quality_table_scores_every_method(trained, tmp_path, monkeypatch):
  root, corpus, queries = trained
  # The workdir as a URL (before 2026-12-05 quality made its folder with
  # os.makedirs: a "file:" or "gs:" folder in the working directory;
  # test_benchmark_family runs it on a path).
  monkeypatch.chdir(tmp_path)
  # A top-k past the corpus is refused before any gradient (before
  # 2026-12-05: an IndexError after every method had been scored).
  with pytest.raises(InputError, match=r"^--top_k=100000: more than the corpus's"):
    quality.run(f"file://{root}", k=100_000, corpus_path=corpus,
                queries_path=queries)
  # A summed step repeated is refused as tracer trace refuses it (before
  # 2026-12-08 counted twice in trackstar_sum).
  with pytest.raises(InputError, match=re.escape("--sum_steps: [5, 5] repeats a step")):
    quality.run(f"file://{root}", corpus_path=corpus, queries_path=queries,
                sum_steps=["5", "5"])
  # The table's cut-off is 10 whatever the lists' length (before, --top_k=12
  # scored recall@12 and left the recall@10 and precision@10 columns blank);
  # shorter lists cannot fill it.
  with pytest.raises(InputError, match=re.escape(
      "--top_k=5: the quality table's columns are recall@10, precision@10 and "
      "tail_patch@10; expected --top_k >= 10")):
    quality.run(f"file://{root}", k=5, corpus_path=corpus, queries_path=queries)
  # quality.json, which a family rerun takes for a finished set, comes last
  # (before 2026-12-07 first: a crash before the page left it there).
  (root / "quality.json").unlink(missing_ok=True)
  write_report = quality.viewer.write_report
  monkeypatch.setattr(quality.viewer, "write_report", lambda path, *a, **kw: (
      pytest.fail("quality.json written before the page")
      if (root / "quality.json").exists() else write_report(path, *a, **kw)))
  report = quality.run(f"file://{root}", k=12, num_tail_patch=8, corpus_path=corpus,
                       queries_path=queries)
  assert not os.listdir(tmp_path) and (root / "quality.json").exists()
  # Strict JSON (before 2026-12-08 a standard error of one query was NaN).
  json.loads((root / "quality.json").read_text(),
             parse_constant=lambda c: pytest.fail(f"quality.json holds {c}"))
  methods = report["methods"]
  assert list(methods) == list(quality.METHODS)
  for name, m in methods.items():
    for column in quality.COLUMNS:
      assert np.isfinite(m[column]), (name, column)
    assert os.path.exists(root / "quality" / f"{name}.jsonl")
  # Unique invented names: BM25 finds the stating documents; random does not.
  assert methods["bm25"]["recall@10"] >= 0.9
  assert methods["random"]["recall@10"] < methods["trackstar"]["recall@10"]
  # Stepping on a top proponent raises the target more than a random document.
  assert methods["trackstar"]["tail_patch@1"] > methods["random"]["tail_patch@1"]
  assert report["tail_patch_queries"] == 8
  assert (root / "quality.md").read_text().startswith("| method |")
  # Its page beside the demo's report.html, not over it.
  assert "<html" in (root / "quality.html").read_text()
  # Paired tail-patch: TrackStar minus each method over the same 8 queries.
  per_query = report["per_query_tail_patch@10"]
  assert set(per_query) == set(quality.METHODS)
  assert all(len(v) == 8 for v in per_query.values())
  ref = np.array(per_query["trackstar"], float)
  for name, p in report["paired_tail_patch"].items():
    d = ref - np.array(per_query[name], float)
    assert p["n"] == 8 and np.isclose(p["mean"], d.mean()), name
    assert np.isclose(p["se"], d.std(ddof=1) / np.sqrt(8)), name
  assert set(report["paired_tail_patch"]) == set(quality.METHODS) - {"trackstar"}
  assert "| paired |" in (root / "quality.md").read_text()
  # A run that fails among its results files leaves no report: a family
  # rerun scores again (before 2026-12-08 the last run's report stayed
  # beside this run's files, and was taken as scored).
  monkeypatch.setattr(quality.evaluate, "write_results", lambda *a: 1 / 0)
  with pytest.raises(ZeroDivisionError):
    quality.run(f"file://{root}", k=12, num_tail_patch=2, corpus_path=corpus,
                queries_path=queries)
  assert not (root / "quality.json").exists()


def test_tokenized_corpus_and_object_stores_give_the_same_results(
    trained, s3, gcs, tmp_path):
  root, corpus, queries = trained
  basis = str(tmp_path / "basis.npz")
  fit_script.run(str(root), corpus, basis)  # every store below uses this basis
  local = trace.run(str(root), corpus, queries, str(tmp_path / "local.jsonl"),
                    show=0, store_path=str(tmp_path / "store"), basis_path=basis)
  tok = str(tmp_path / "tokenized")
  tokenize.run(corpus, tok)
  from_dir = trace.run(str(root), tok, queries, str(tmp_path / "dir.jsonl"), show=0,
                       store_path=str(tmp_path / "store_dir"), basis_path=basis)
  assert from_dir == local
  a, b = store_files(tmp_path / "store"), store_files(tmp_path / "store_dir")
  # The same store, but for where its rows were read from (corpus_rows).
  ma, mb = (json.loads(files.pop(store_lib.MANIFEST)) for files in (a, b))
  assert (ma.pop("corpus_rows"), mb.pop("corpus_rows")) == ("", storage.normalize(tok))
  assert a == b and ma == mb
  # Store and results on an S3-compatible server, then in memory.
  bucket = s3("tracer-pipeline")
  on_s3 = trace.run(str(root), tok, queries, f"{bucket}/results.jsonl", show=0,
                    store_path=f"{bucket}/store", basis_path=basis)
  assert on_s3 == local
  assert (storage.read_text(f"{bucket}/results.jsonl")
          == (tmp_path / "local.jsonl").read_text())
  s3_store = store_lib.open_store(f"{bucket}/store")
  local_store = store_lib.open_store(str(tmp_path / "store"))
  assert s3_store.done_chunks() == local_store.done_chunks()
  np.testing.assert_array_equal(s3_store.read_rows(0, s3_store.num_rows),
                                local_store.read_rows(0, local_store.num_rows))
  scanned = scan_script.run(str(root), tok, queries, f"{bucket}/scanned.jsonl",
                            store_path=f"{bucket}/store")
  assert scanned == local
  encoded = encode_script.run(str(root), tok, f"{bucket}/encoded", basis)
  np.testing.assert_array_equal(encoded.read_rows(0, encoded.num_rows),
                                local_store.read_rows(0, local_store.num_rows))
  # A pod's layout on a GCS emulator: the corpus tokenized into the bucket,
  # the store and the results beside it.
  gs = gcs("tracer-pipeline")
  tokenize.run(corpus, f"{gs}/tokenized")
  on_gcs = trace.run(str(root), f"{gs}/tokenized", queries, f"{gs}/results.jsonl",
                     show=0, store_path=f"{gs}/store", basis_path=basis)
  assert on_gcs == local
  assert (storage.read_text(f"{gs}/results.jsonl")
          == (tmp_path / "local.jsonl").read_text())
  gcs_store = store_lib.open_store(f"{gs}/store")
  assert gcs_store.done_chunks() == local_store.done_chunks()
  np.testing.assert_array_equal(gcs_store.read_rows(0, gcs_store.num_rows),
                                local_store.read_rows(0, local_store.num_rows))
  in_memory = trace.run(str(root), corpus, queries, "memory://pipeline/r.jsonl",
                        show=0, store_path="memory://pipeline/store",
                        basis_path=basis)
  assert in_memory == local
  assert storage.read_text("memory://pipeline/r.jsonl") == (
      tmp_path / "local.jsonl").read_text()


def _count_corpus_rows(monkeypatch) -> list[int]:
  """Rows of corpus examples built (the only way corpus rows reach the encoder)."""
  counted = []
  for cls in (data_lib.Corpus, corpus_lib.TokenizedCorpus):
    real = cls.examples

    def counting(self, rows, real=real):
      counted.append(len(rows))
      return real(self, rows)

    monkeypatch.setattr(cls, "examples", counting)
  return counted


def test_new_queries_reuse_the_store_without_corpus_gradients(
    trained, tmp_path, monkeypatch, capsys):
  root, corpus, queries = trained
  records = evaluate.read_jsonl_records(queries, ("id", "prompt", "target"))
  other = facts.write_jsonl(tmp_path / "other.jsonl", records[::3])
  store = str(tmp_path / "store")
  _bind(EncodeConfig__store_dtype="float32")
  try:
    trace.run(str(root), corpus, queries, str(tmp_path / "a.jsonl"), show=0,
              store_path=store)
    before = store_files(store)
    # The store keeps its encoder's verified factored kernel: every matrix
    # of the LM, and query encoders take it without verifying again.
    manifest = store_lib.read_manifest(store)
    assert manifest.factored == sorted(b["name"] for b in manifest.layout["blocks"]
                                       if b["name"] != projection.VECTORS)
    counted = _count_corpus_rows(monkeypatch)
    verified = []
    monkeypatch.setattr(encoder_lib.GradientEncoder, "_verified",
                        lambda self, plan, batch: verified.append(1) or plan)
    capsys.readouterr()
    # No corpus named: the store's own (its manifest), as `tracer scan`.
    reused = trace.run(str(root), None, str(other), str(tmp_path / "b.jsonl"),
                       show=0, store_path=store)
    assert sum(counted) == 0  # not one corpus row was encoded
    assert "complete, reused as it is (no corpus gradient computed)" in (
        capsys.readouterr().out)
    _bind(PreconditionerConfig__damping=0.5)  # a query-time setting
    try:
      trace.run(str(root), corpus, str(other), str(tmp_path / "c.jsonl"), show=0,
                store_path=store)
    finally:
      _bind(PreconditionerConfig__damping=0.1)
    assert sum(counted) == 0 and not verified
    assert store_files(store) == before  # the store's files are untouched
    with pytest.raises(InputError, match="--streaming encodes the corpus: "
                       "--corpus required"):
      trace.run(str(root), None, str(other), str(tmp_path / "e.jsonl"), show=0,
                streaming=True)
    monkeypatch.undo()
    # The same query set scored while streaming (no store) agrees.
    streamed = trace.run(str(root), corpus, str(other), str(tmp_path / "d.jsonl"),
                         show=0, streaming=True, basis_path=str(tmp_path / "b.npz"))
  finally:
    _bind(EncodeConfig__store_dtype="bfloat16")
  assert [r["query_id"] for r in reused] == [r["id"] for r in records[::3]]
  for a, b in zip(reused, streamed):
    assert a["proponent_ids"] == b["proponent_ids"]
    np.testing.assert_allclose(a["proponent_scores"], b["proponent_scores"],
                               atol=1e-4)


def test_streaming_basis_is_saved_and_reused(trained, tmp_path, monkeypatch):
  root, corpus, queries = trained
  fits = []
  real_fit = pipeline.fit_basis

  def counting(*args, **kwargs):
    fits.append(1)
    return real_fit(*args, **kwargs)

  monkeypatch.setattr(pipeline, "fit_basis", counting)
  basis = str(tmp_path / "basis.npz")
  first = trace.run(str(root), corpus, queries, str(tmp_path / "a.jsonl"), show=0,
                    streaming=True, basis_path=basis)
  assert len(fits) == 1
  saved = hessian.Basis.load(basis)
  again = trace.run(str(root), corpus, queries, str(tmp_path / "b.jsonl"), show=0,
                    streaming=True, basis_path=basis)
  assert len(fits) == 1 and again == first  # reused, not refit
  assert hessian.Basis.load(basis).fingerprint() == saved.fingerprint()
  # The key names the corpus absolute: the same files named relative from
  # another directory are the same fit.
  assert saved.fit_key["corpus"] == corpus
  monkeypatch.chdir(os.path.dirname(corpus))
  trace.run(str(root), os.path.basename(corpus), queries, str(tmp_path / "r.jsonl"),
            show=0, streaming=True, basis_path=basis)
  assert len(fits) == 1
  _bind(PreconditionerConfig__train_examples=128)
  try:
    trace.run(str(root), corpus, queries, str(tmp_path / "c.jsonl"), show=0,
              streaming=True, basis_path=basis)
  finally:
    _bind(PreconditionerConfig__train_examples=256)
  assert len(fits) == 2  # another sample: refit and saved over the old one
  assert hessian.Basis.load(basis).num_train == 128
  # ... but not over a store's own basis, whose rows are in it (before
  # 2026-12-07 saved over it: every later scan of the store refused it).
  store = tmp_path / "store"
  store.mkdir()
  (store / "manifest.json").write_text("{}")
  (store / "basis.npz").write_bytes(open(basis, "rb").read())
  with pytest.raises(InputError, match=re.escape(
      f"{store / 'basis.npz'}: the basis of the store {store}, whose rows are in "
      "it, fitted with other settings than this run's")):
    trace.run(str(root), corpus, queries, str(tmp_path / "d.jsonl"), show=0,
              streaming=True, basis_path=str(store / "basis.npz"))
  assert len(fits) == 2 and hessian.Basis.load(str(store / "basis.npz")).num_train == 128
  # A --basis to encode a store in that names no file is refused before any
  # work (before 2026-12-07 the store fitted its own, silently).
  missing = str(tmp_path / "no_such_basis.npz")
  for run in (lambda: encode_script.run(str(root), corpus, str(tmp_path / "s"),
                                        missing),
              lambda: trace.run(str(root), corpus, queries, str(tmp_path / "e.jsonl"),
                                show=0, store_path=str(tmp_path / "s"),
                                basis_path=missing)):
    with pytest.raises(InputError, match=re.escape(f"--basis={missing}: no such file")):
      run()
  assert len(fits) == 2 and not os.path.exists(tmp_path / "s")
  # A --basis beside an existing store names the basis its rows are in
  # (before 2026-12-08 another one was ignored, silently).
  own = str(tmp_path / "own")
  encode_script.run(str(root), corpus, own)
  assert len(fits) == 3
  with pytest.raises(InputError, match=re.escape(
      f"--basis={basis}: the store {own} exists, and its rows are in another "
      "basis (fingerprint")):
    encode_script.run(str(root), corpus, own, basis)
  encode_script.run(str(root), corpus, own, os.path.join(own, "basis.npz"))
  assert len(fits) == 3


def test_a_sample_of_every_row_is_the_same_fit_whatever_its_seed(tmp_path):
  """``train_examples`` 0 or past the corpus's rows samples every row, so
  the sample seed changes nothing: before 2026-12-08 a --basis of another
  seed was refused, and a streaming run refitted its saved basis."""
  rng = np.random.default_rng(0)
  g = rng.standard_normal((20, 6))
  basis = hessian.fit_basis(hessian.Moments(((0, 6),), [g.T @ g], 20), dim=6,
                            layout_seed=0)
  key = lambda count, seed: {"dim": 6, "projection_seed": 0, "kind": "block",
                             "corpus": "/c.jsonl", "num_rows": 20,
                             "train_examples": count, "sample_seed": seed}
  for count in (0, 20, 256):
    basis.fit_key = key(count, 0)
    where = str(tmp_path / f"basis{count}.npz")
    basis.save(where)
    assert pipeline.given_basis(where, key(count, 5)).fit_key == key(count, 0)
    refit = lambda: pytest.fail("refitted")
    assert pipeline.load_or_fit_basis(where, key(count, 5), refit)[1]
  basis.fit_key = key(10, 0)  # a sample of half the rows: the seed counts
  basis.save(str(tmp_path / "half.npz"))
  with pytest.raises(InputError, match="sample_seed: the basis has 0, this run has 5"):
    pipeline.given_basis(str(tmp_path / "half.npz"), key(10, 5))


def test_model_axis_2_gives_the_same_proponents(trained, tmp_path):
  root, corpus, queries = trained
  base = trace.run(str(root), corpus, queries, str(tmp_path / "a.jsonl"), show=0,
                   store_path=str(tmp_path / "s1"))
  _bind(EncodeConfig__model_axis=2)
  try:
    split = trace.run(str(root), corpus, queries, str(tmp_path / "b.jsonl"), show=0,
                      store_path=str(tmp_path / "s2"))
  finally:
    _bind(EncodeConfig__model_axis=1)
  agree = np.mean([a["proponent_ids"][:3] == b["proponent_ids"][:3]
                   for a, b in zip(base, split)])
  assert agree >= 0.95, agree
  np.testing.assert_allclose([r["proponent_scores"] for r in base],
                             [r["proponent_scores"] for r in split], atol=2e-3)


def test_summed_trace_scores_rows_by_the_sum_over_checkpoints(
    trained, tmp_path, monkeypatch):
  # --sum_steps=75 beside the latest checkpoint (150): a store per step, each
  # with the rows of its own checkpoint, queried with that checkpoint's
  # vectors and metric; every results line is numpy's top-k of the summed
  # scores. Bad steps are refused before any gradient.
  root, corpus, queries = trained
  seen = {}
  real = scan_lib.scan_stores

  def spy(stores, vectors, k, **kwargs):
    seen.update(stores=stores, vectors=vectors, metrics=kwargs["metrics"])
    seen["top"] = real(stores, vectors, k, **kwargs)
    return seen["top"]

  monkeypatch.setattr(scan_lib, "scan_stores", spy)
  store = str(tmp_path / "store")
  rows = trace.run(str(root), corpus, queries, str(tmp_path / "sum.jsonl"), show=0,
                   store_path=store, sum_steps=["75"])
  parts = seen["stores"]
  assert [p.path for p in parts] == [store, store + "-step75"]
  assert [p.manifest.step for p in parts] == [150, 75]
  assert parts[0].manifest.params_fingerprint != parts[1].manifest.params_fingerprint
  assert np.abs(seen["vectors"][0] - seen["vectors"][1]).max() > 1e-3
  summed = 0.0
  for part, vectors, metric in zip(parts, seen["vectors"], seen["metrics"]):
    x = part.read_rows(0, part.num_rows).astype(np.float64)
    norms = np.sqrt(np.maximum(
        (x * x) @ np.asarray(metric.diag, np.float64) - sum(
            np.sum((x[:, lo:hi] @ np.asarray(c, np.float64)) ** 2, axis=1)
            for (lo, hi), c in zip(metric.segments, metric.lowrank)), 0.0))
    summed = summed + np.asarray(vectors, np.float64) @ x.T / norms
  best = np.argsort(-summed, axis=1, kind="stable")[:, :10]
  np.testing.assert_array_equal(seen["top"].proponent_rows, best)
  np.testing.assert_allclose([r["proponent_scores"] for r in rows],
                             np.take_along_axis(summed, best, 1), atol=1e-4)
  single = trace.run(str(root), corpus, queries, str(tmp_path / "one.jsonl"),
                     show=0, store_path=store)
  assert [r["proponent_ids"] for r in single] != [r["proponent_ids"] for r in rows]
  # From here on no store is encoded: bad steps are refused before, and
  # tracer scan gives the same summed answer from the stores trace left.
  monkeypatch.setattr(scan_script.common, "encoded_store", None)
  for bad in (["150"], ["75", "75"], ["x"], ["²"], ["30"]):  # 30: no such checkpoint
    with pytest.raises(ValueError, match="--sum_steps"):
      trace.run(str(root), corpus, queries, str(tmp_path / "bad.jsonl"), show=0,
                store_path=store, sum_steps=bad)
  scanned = scan_script.run(str(root), corpus, queries, str(tmp_path / "scan.jsonl"),
                            store_path=store, sum_steps=["75"])
  assert ([(r["proponent_ids"], r["proponent_scores"]) for r in scanned]
          == [(r["proponent_ids"], r["proponent_scores"]) for r in rows])
  os.rename(store + "-step75", store + "-moved")
  with pytest.raises(ValueError, match="store-step75: no store for --sum_steps"):
    scan_script.run(str(root), corpus, queries, str(tmp_path / "bad.jsonl"),
                    store_path=store, sum_steps=["75"])
  with pytest.raises(ValueError, match="--sum_steps"):
    scan_script.run(str(root), corpus, queries, str(tmp_path / "bad.jsonl"),
                    store_path=store, sum_steps=["150"])


def test_a_memory_store_is_refused_on_several_processes(monkeypatch):
  """Each process wrote its share into its own memory and then found the
  store incomplete (the audit's 2 processes x 2 devices, before
  2026-12-05): refused before anything is encoded."""
  import jax  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(InputError, match="memory://s: a memory:// store lives in "
                     "one process; this run has 2"):
    pipeline.open_store("memory://s", None)


@pytest.mark.parametrize("bad,expected", [
    ({"projection_dim": "4096"}, "EncodeConfig.projection_dim = '4096': expected int"),
    ({"store_dtype": "float16"}, "EncodeConfig.store_dtype = 'float16': expected one of"),
    ({"chunk_rows": 0}, "EncodeConfig.chunk_rows = 0: expected a value >= 1")])
def test_a_damaged_encode_config_in_a_manifest_is_named(tmp_path, bad, expected):
  """Taken as it was before 2026-12-05: the encoder then failed with
  "'<' not supported between instances of 'str' and 'int'"."""
  location = str(tmp_path / "s")
  store_lib.create_or_open(location, store_lib.Manifest(
      checkpoint="/ckpt/100", step=100, params_fingerprint="abc",
      correction="adam", epsilon=1e-8, projection_seed=0, layout=[], dim=6,
      basis_fingerprint=None, dtype="bfloat16", corpus="c.jsonl", num_rows=3,
      chunk_rows=5, encode_config=bad))
  gin.clear_config()
  try:
    with pytest.raises(InputError, match=re.escape(
        f"{location}/manifest.json: encode_config: {expected}")):
      common.encode_config(location)
  finally:
    gin.parse_config(BINDINGS)


def test_an_encode_batch_past_the_rows_pads_no_further(tmp_path, monkeypatch):
  """A batch larger than the rows is cut to them (a demo's
  ``EncodeConfig.batch_size=10^8`` padded 1,719 rows to 10^8 examples:
  numpy's "Unable to allocate 47.7 GiB", before 2026-12-06), and batches
  past the host's memory are refused before any is read."""
  from tracer import memory  # pylint: disable=g-import-not-at-top
  from tracer import model as model_lib  # pylint: disable=g-import-not-at-top
  cfg = model_lib.ModelConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32,
                              max_len=8)
  path = tmp_path / "c.jsonl"
  path.write_text("".join(json.dumps({"id": f"d{i}", "text": "abc" * (i % 3 + 1)})
                          + "\n" for i in range(20)))
  corpus = data_lib.read_corpus(str(path), data_lib.make_vocabulary(), cfg.max_len)
  encoder = encoder_lib.GradientEncoder(model_lib.make_loss_fn(cfg),
                                        model_lib.init_params(cfg),
                                        projection_dim=64, microbatch_size=2)
  # 10^9 examples of 8 tokens: 96 GB of numpy arrays on the old code.
  corpus.rows_read = 0
  batches = list(pipeline._run_local_batches(encoder, corpus, iter([(0, 20)]), 20,
                                             10**9))
  assert [len(valid) for _, _, valid in batches] == [32]  # 2 steps of 8 x 2
  assert sum(len(rows) for rows, _, _ in batches) == 20
  assert corpus.rows_read == 20  # its rows once, none to size an example
  # Each example's encoding counts (measured 2026-12-06: 4 float32 copies of
  # it, at d = 65,406 nearly 700 times an example's bytes): 64 examples of 96
  # bytes and d = 34 take 64 x (5 x 96 + 4.5 x 4 x 34) = 69,888 bytes, where
  # the count before (4 copies of an example) was 24,576.
  # What the process holds already is not there to take (stop 82: in a
  # 1 GiB container 300-600 MB of it).
  held = 2048
  monkeypatch.setattr(memory, "process_resident_bytes", lambda: held)
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: held + 69_887)
  with pytest.raises(InputError, match="batches of 64 examples take about"):
    pipeline._run_local_batches(encoder, corpus, iter([(0, 20)]), 2000, 64)
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: held + 69_888)
  pipeline._run_local_batches(encoder, corpus, iter([(0, 20)]), 2000, 64)
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: held + 10_000)
  with pytest.raises(InputError, match=re.escape(
      "EncodeConfig.batch_size=64: this process's batches of 64 examples take "
      "about 68.2 KiB of host memory (two at once, padded, with their "
      "encodings), more than the 9.8 KiB this process has left of this "
      "host's 11.8 KiB (it holds 2.0 KiB); expected a smaller EncodeConfig.batch_size")):
    pipeline._run_local_batches(encoder, corpus, iter([(0, 20)]), 2000, 64)
  # A store chunk (8 bytes an element, measured: a float32 buffer, as much
  # again as it is written):
  # 20 x 34 x 8 bytes (projection_dim 64 leaves this model 34).
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: held + 5_000)
  manifest = pipeline.manifest(
      types.SimpleNamespace(path="/nonexistent", step=1, params=None), encoder,
      "none", 0.0, None, corpus, EncodeConfig(chunk_rows=10**8),
      params_fingerprint="test")
  with pytest.raises(InputError, match=re.escape(
      "EncodeConfig.chunk_rows=100000000: a chunk of 20 rows x d=34 takes about "
      "5.3 KiB of memory as it is encoded and written, more than the 4.9 KiB "
      "this process has left of this host's 6.9 KiB (it holds 2.0 KiB); expected a "
      "smaller EncodeConfig.chunk_rows")):
    pipeline.open_store(str(tmp_path / "store"), manifest)
  assert not (tmp_path / "store").exists()
  # The batches and the chunk filling beside them are held together: each
  # fits alone (a chunk of 5,440 bytes; 32 examples, 20 rows padded to the
  # devices' microbatches, of 1,092 bytes: 34,944),
  # not both.
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: held + 10**6)
  store = pipeline.open_store(str(tmp_path / "store"), manifest)
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: held + 40_383)
  corpus.rows_read = 0
  with pytest.raises(InputError, match=re.escape(
      "EncodeConfig.batch_size=64: this process's batches of 32 examples take "
      "about 34.1 KiB of host memory (two at once, padded, with their "
      "encodings), beside a store chunk's 5.3 KiB, more than the 39.4 KiB this "
      "process has left of this host's 41.4 KiB (it holds 2.0 KiB); expected a "
      "smaller EncodeConfig.batch_size or EncodeConfig.chunk_rows")):
    pipeline.encode_corpus(encoder, None, corpus, store, 64)
  assert corpus.rows_read == 0
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: held + 40_384)
  pipeline._run_local_batches(encoder, corpus, iter([(0, 20)]), 20, 64, 5_440)
