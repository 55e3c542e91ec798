"""The benchmark family (`tracer family`), its in-memory sweep and the paired
statistics behind both."""

from __future__ import annotations

import json
import os
import re
import warnings

from absl import flags
import jax.numpy as jnp
import gin
import numpy as np
import pytest

from tracer.launch import family
from tracer.launch import quality
from tracer.launch import sweep
from tracer import checkpoint as ckpt_lib
from tracer import hessian
from tracer import memory
from tracer import model as model_lib
from tracer import pipeline
from tracer import projection
from tracer import scan
from tracer import stats
from tracer import train as train_lib
from tracer.errors import InputError
# pytest puts tests/ on sys.path: the pipeline tests' small model.
from test_pipeline import BINDINGS

STYLES, SEEDS = ["dense", "paraphrase"], ["0"]
TRAIN_BINDINGS = ("TrainConfig.checkpoint_every = 50",
                  "TrainConfig.keep_checkpoints = 100")


@pytest.fixture(scope="module")
def trained_family(tmp_path_factory):
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["test"])
  gin.clear_config()
  gin.parse_config(BINDINGS + "OptimizerConfig.total_steps = 100\n")
  root = str(tmp_path_factory.mktemp("family"))
  summary = family.run(root, STYLES, SEEDS, facts_per_bucket=4, distractor_docs=10,
                       num_tail_patch=8, train_bindings=TRAIN_BINDINGS)
  yield root, summary
  gin.clear_config()


def test_family_trains_every_set_and_summarizes_across_sets(trained_family):
  root, summary = trained_family
  assert summary["sets"] == ["dense-0", "paraphrase-0"]
  for name in summary["sets"]:
    # Every checkpoint is kept (the sweep's checkpoint axis).
    assert sorted(os.listdir(os.path.join(root, "sets", name, "checkpoints"))) == [
        "100", "50"]
  reports = [family.read_set_report(os.path.join(root, "sets", n))
             for n in summary["sets"]]
  for method in quality.METHODS:
    mrr = [r["methods"][method]["mrr"] for r in reports]
    cell = summary["methods"][method]["mrr"]
    assert np.isclose(cell["mean"], np.mean(mrr)) and cell["n"] == 2
    assert np.isclose(cell["std"], np.std(mrr, ddof=1))
    assert "recall@10 b1" in summary["methods"][method]
  # The paired difference pools both sets' 8 tail-patched queries.
  ref = np.concatenate([r["per_query_tail_patch@10"]["trackstar"] for r in reports])
  other = np.concatenate([r["per_query_tail_patch@10"]["bm25"] for r in reports])
  paired = summary["methods"]["bm25"]["trackstar - this, tail_patch@10"]
  assert paired["n"] == 16 and np.isclose(paired["mean"], np.mean(ref - other))
  # What orders influence: each method's per-query rho, pooled over both sets.
  rho = summary["score_tail_patch_rho"]
  assert set(rho) == set(quality.METHODS) - {"bm25", "random"} | {
      quality.STEP_PREDICTOR}
  # The first-order step is what tail-patch measures: it orders the pairs
  # (0.68 here, against 0.44 to 0.67 for the methods' scores).
  assert np.nanmean(np.array(rho[quality.STEP_PREDICTOR], float)) > 0.4
  for values in rho.values():
    assert len(values) == 16
    assert all(v is None or -1.0 <= v <= 1.0 for v in values)
    assert sum(v is not None for v in values) >= 8
  table = open(os.path.join(root, "family.md")).read()
  assert table.startswith("| method |") and "±" in table
  assert "rho(score, tail-patch)" in table
  assert json.load(open(os.path.join(root, "family.json"))) == json.loads(
      json.dumps(summary))


def test_family_rerun_scores_nothing_again(trained_family, monkeypatch):
  root, summary = trained_family
  def fail(*args, **kwargs):
    raise AssertionError("a set was trained or scored again")
  monkeypatch.setattr(quality, "run", fail)
  monkeypatch.setattr(family.train, "train", fail)
  again = family.run(root, STYLES, SEEDS, facts_per_bucket=4, distractor_docs=10)
  assert json.loads(json.dumps(again)) == json.loads(json.dumps(summary))


def test_family_memorization_scores_earlier_steps(trained_family, tmp_path):
  root, summary = trained_family
  again = family.run(root, STYLES, SEEDS, facts_per_bucket=4, distractor_docs=10,
                     num_tail_patch=8, steps=[50], train_bindings=TRAIN_BINDINGS)
  # The sets' own (last-step) reports are reused; step 50's are new.
  assert again["methods"] == json.loads(json.dumps(summary["methods"]))
  for name in again["sets"]:
    report = family.read_set_report(family.step_dir(os.path.join(root, "sets", name), 50))
    assert report["step"] == 50 and report["checkpoint"].endswith("50")
  by_step = again["memorization"]
  assert list(by_step) == [50, 100]
  assert by_step[100]["methods"] == again["methods"]
  assert by_step[50]["methods"]["trackstar"]["mrr"]["n"] == 2
  table = open(os.path.join(root, "family.md")).read()
  assert "| trackstar @ step 50 |" in table and "| trackstar @ step 100 |" in table
  # A step no set keeps, or the last, is refused before any set is written
  # or trains (before 2026-12-05: after training, "checkpoints/75 does not
  # exist", and --sum_steps=-1 after scoring the sets' last step).
  fresh = tmp_path / "fresh"
  for flag, steps, message in [
      ("steps", [75], "--steps: step 75 is not an earlier checkpoint the sets keep "
       "(every 50 steps, the last 100 scored anyway); expected some of [50]"),
      ("steps", [100], "--steps: step 100 is not"),
      ("steps", [-5], "--steps: step -5 is not"),
      ("sum_steps", [50, -1], "--sum_steps: step -1 is not")]:
    with pytest.raises(InputError, match=re.escape(message)):
      family.run(str(fresh), STYLES, SEEDS, facts_per_bucket=4, distractor_docs=10,
                 train_bindings=TRAIN_BINDINGS, **{flag: steps})
  # So is a config gin binds out of range (before: after training).
  dim = gin.query_parameter("EncodeConfig.projection_dim")
  with gin.unlock_config():
    gin.bind_parameter("EncodeConfig.projection_dim", 0)
  try:
    with pytest.raises(InputError, match=re.escape(
        "gin: EncodeConfig.projection_dim = 0: expected a value >= 1")):
      family.run(str(fresh), STYLES, SEEDS, facts_per_bucket=4, distractor_docs=10,
                 train_bindings=TRAIN_BINDINGS)
  finally:
    with gin.unlock_config():
      gin.bind_parameter("EncodeConfig.projection_dim", dim)
  assert not fresh.exists()


def test_quality_sums_trackstar_over_steps(trained_family, tmp_path):
  """``--sum_steps``: trackstar_sum is scored, tail-patched and paired like
  every method; its rows are each step's normalized TrackStar side by side."""
  root, _ = trained_family
  set_dir = os.path.join(root, "sets", "dense-0")
  facts_dir = os.path.join(set_dir, "facts")
  report = quality.run(str(tmp_path), num_tail_patch=4,
                       corpus_path=os.path.join(facts_dir, "corpus.jsonl"),
                       queries_path=os.path.join(facts_dir, "queries.jsonl"),
                       checkpoint=os.path.join(set_dir, "checkpoints"), sum_steps=[50])
  assert report["step"] == 100
  summed = report["methods"][quality.SUM_METHOD]
  assert 0.0 <= summed["mrr"] <= 1.0 and "tail_patch@10" in summed
  assert quality.SUM_METHOD in report["paired_tail_patch"]
  assert quality.SUM_METHOD in report["per_query_score_tail_patch_rho"]
  assert os.path.exists(tmp_path / "quality" / f"{quality.SUM_METHOD}.jsonl")


_LAYOUT = projection.make_layout({"w": np.zeros((12, 10), np.float32)}, 48, 0)


def _raw(seed: int, rows: int, queries: int):
  """Random projections: (corpus f32[rows, d], queries f32[queries, d])."""
  rng = np.random.default_rng(seed)
  dim = _LAYOUT.dim
  return (rng.normal(size=(rows, dim)).astype(np.float32),
          rng.normal(size=(queries, dim)).astype(np.float32))


def _in_a_basis(seed: int, rows: int, queries: int, train: int, rank: int):
  """``_raw``'s rows and queries in R_train's basis (fitted on the first
  ``train`` rows), and the queries' task-specific metric."""
  corpus, q = _raw(seed, rows, queries)
  basis = hessian.fit_basis(hessian.accumulate(
      hessian.init_moments(_LAYOUT, "block"), corpus[:train]), dim=_LAYOUT.dim,
      layout_seed=0, kind="block")
  psi_c, psi_q = np.asarray(basis.rotate(corpus)), np.asarray(basis.rotate(q))
  return psi_c, psi_q, hessian.fit_metric(basis, psi_q, rank=rank)


def test_normalized_rows_score_as_the_scan(tmp_path):
  """``quality.normalized``: dividing rows by their metric norm gives the
  scan-time metric's scores with a plain dot product (what trackstar_sum
  adds up over steps)."""
  psi_c, psi_q, metric = _in_a_basis(seed=2, rows=200, queries=4, train=80, rank=3)
  vectors = metric.query_vectors(psi_q)
  want = scan.scan_arrays(psi_c, vectors, 6, metric=metric.row_metric())
  rows, q = quality.normalized(psi_c, vectors, metric)
  got = scan.scan_arrays(rows, q, 6)
  np.testing.assert_array_equal(got.proponent_rows, want.proponent_rows)
  np.testing.assert_allclose(got.proponent_scores, want.proponent_scores, rtol=1e-5)
  # Two steps side by side: one dot product is the sum of their scores.
  both = scan.scan_arrays(np.concatenate([rows, rows[::-1]], 1),
                          np.concatenate([q, q], 1), 6)
  direct = rows @ q.T + rows[::-1] @ q.T
  np.testing.assert_allclose(both.proponent_scores,
                             -np.sort(-direct, axis=0)[:6].T, rtol=1e-5)


def test_pair_scores_are_the_scan_scores():
  """``quality.pair_scores`` scores a (query, row) pair as the scan does, with
  and without a query metric."""
  (corpus, queries), (psi_c, psi_q, metric) = _raw(1, 300, 6), _in_a_basis(
      seed=1, rows=300, queries=6, train=100, rank=4)
  encodings = {"dot": (corpus, queries, None),
               "metric": (psi_c, metric.query_vectors(psi_q), metric)}
  for name, (c, q, m) in encodings.items():
    top = scan.scan_arrays(c, q, 5, metric=None if m is None else m.row_metric())
    pairs = np.stack([np.repeat(np.arange(6), 5), top.proponent_rows.ravel()], 1)
    got = quality.pair_scores({name: (c, q, m)}, pairs, batch=7)[name]
    np.testing.assert_allclose(got, top.proponent_scores.ravel(), rtol=1e-4, atol=1e-5)


def test_influence_predictors_rank_correlation():
  pairs = np.array([[0, 1], [0, 2], [0, 3], [0, 4], [0, 5], [1, 1], [1, 2]])
  deltas = np.array([0.1, 0.2, 0.3, np.nan, 0.5, 0.1, 0.2])
  scores = {"up": np.array([1.0, 2.0, 3.0, 9.0, 4.0, 1.0, 2.0]),
            "down": np.array([4.0, 3.0, 2.0, 0.0, 1.0, 1.0, 2.0])}
  rho = quality.influence_predictors(scores, pairs, deltas, min_pairs=3)
  # Query 0: 4 measured pairs (the NaN is left out); query 1: too few.
  assert rho["up"][0] == pytest.approx(1.0) and rho["down"][0] == pytest.approx(-1.0)
  assert np.isnan(rho["up"][1]) and np.isnan(rho["down"][1])
  assert "+2.0000" in quality.format_predictors({"trackstar": rho["up"], **rho})


def test_sweep_on_the_family(trained_family, tmp_path, monkeypatch):
  root, _ = trained_family
  grid = ["checkpoint=50,100,sum", "EncodeConfig.projection_dim=1024",
          "query_loss=target,prediction", "PreconditionerConfig.kind=block,none",
          "PreconditionerConfig.damping=0.1,1.0"]
  out = str(tmp_path / "sweep")
  result = sweep.sweep_family(out, root, grid, design="grid")
  # 3 checkpoints x 2 losses x (2 dampings of block R + no R).
  assert len(result["points"]) == 3 * 2 * 3
  for point, cells in result["points"].items():
    for column in sweep.FAMILY_COLUMNS:
      assert 0.0 <= cells[column]["mean"] <= 1.0, (point, column)
      assert cells[column]["n"] == 2
  assert set(result["accuracy"]["dense-0"]) == {"50", "100"}
  assert ("ckpt=sum d=1024 loss=target R=block damping=0.1 lam=rule store=bfloat16"
          in result["points"])
  # A rerun reads each set's table instead of projecting again.
  monkeypatch.setattr(sweep, "sweep_set", lambda *a: pytest.fail("recomputed"))
  again = sweep.sweep_family(out, root, grid, design="grid")
  assert again["points"].keys() == result["points"].keys()
  # ... also through URLs (object storage's code path; before 2026-12-04 the
  # family's sets were listed with os.listdir: "no sets/ folder").
  assert sweep.sweep_family(f"file://{out}", f"file://{root}", grid,
                            design="grid") == again
  # A set's last step read from its config alone (no arrays restored).
  assert ckpt_lib.saved_step(f"file://{root}/sets/dense-0/checkpoints")[0] == 100
  assert sweep.trained(os.path.join(root, "sets", "dense-0"))
  # ... refuses tables scored over other points (before 2026-12-04: used
  # silently, or a KeyError once a new set was scored on the new grid) ...
  with pytest.raises(Exception, match="scored with other grid points"):
    sweep.sweep_family(out, root, grid[:-1] + ["PreconditionerConfig.damping=0.5"],
                       design="grid")
  # ... and does not mix tables scored with queries in sets of another size.
  with pytest.raises(Exception, match="scored with --query_set_size=0, this run 2"):
    sweep.sweep_family(out, root, grid, design="grid", query_set_size=2)
  # A binding of another model than the sets were trained with would be
  # ignored (their checkpoints' configs win): refused before any work
  # (before 2026-12-08 the sweep ran on the checkpoints' own, silently;
  # sweep_set fails this test since the rerun above).
  with gin.unlock_config():
    gin.bind_parameter("ModelConfig.d_model", 7)
  try:
    with pytest.raises(InputError, match=r"dense-0/checkpoints/100: a checkpoint "
                       r"of another ModelConfig than the gin bindings name "
                       r"\(ModelConfig.d_model: the checkpoint has \d+, the gin "
                       r"bindings say 7\)"):
      sweep.sweep_family(str(tmp_path / "other"), root, grid, design="grid")
  finally:  # (the family fixture's)
    gin.clear_config()
    gin.parse_config(BINDINGS + "OptimizerConfig.total_steps = 100\n")
  with gin.unlock_config():
    gin.bind_parameter("PreconditionerConfig.max_query_weight", None)
  try:
    with pytest.raises(Exception, match="max_query_weight=0.002, this run None"):
      sweep.sweep_family(out, root, grid, design="grid")
  finally:
    with gin.unlock_config():
      gin.bind_parameter("PreconditionerConfig.max_query_weight",
                         hessian.MAX_QUERY_WEIGHT)
  # ... nor a gin-bound setting off the grid.
  with open(os.path.join(out, "sweep.md")) as f:
    assert ("sample_seed=0; rank=None; max_query_weight=0.002; task_specific=True\n"
            in f.read())
  for name, value, was in (("rank", 3, None), ("task_specific", False, True)):
    with gin.unlock_config():
      gin.bind_parameter(f"PreconditionerConfig.{name}", value)
    try:
      with pytest.raises(Exception, match=f"PreconditionerConfig.{name}={was}, "
                         f"this run {value}"):
        sweep.sweep_family(out, root, grid, design="grid")
    finally:
      with gin.unlock_config():
        gin.bind_parameter(f"PreconditionerConfig.{name}", was)


def test_sweep_without_task_specific_r_scores_r_train_alone(trained_family,
                                                            tmp_path):
  """task_specific=False: every point's R is R_train's, lam=rule scoring as
  lam=0 does with the queries' R (before 2026-12-07 it was ignored: R_eval
  mixed in at every point)."""
  root, _ = trained_family
  grid = ["checkpoint=100", "EncodeConfig.projection_dim=1024",
          "PreconditionerConfig.kind=block", "PreconditionerConfig.lam=rule,0"]
  name = "ckpt=100 d=1024 loss=target R=block damping=0.1 lam={} store=bfloat16"
  task = sweep.sweep_family(str(tmp_path / "task"), root, grid, design="grid")
  assert task["points"][name.format("rule")] != task["points"][name.format("0")]
  with gin.unlock_config():
    gin.bind_parameter("PreconditionerConfig.task_specific", False)
  try:
    alone = sweep.sweep_family(str(tmp_path / "alone"), root, grid, design="grid")
    with pytest.raises(Exception, match="--task_size=3 with PreconditionerConfig."
                       "task_specific=False"):
      sweep.sweep_family(str(tmp_path / "other"), root, grid, query_set_size=2,
                         task_size=3)
  finally:
    with gin.unlock_config():
      gin.bind_parameter("PreconditionerConfig.task_specific", True)
  for lam in ("rule", "0"):
    assert alone["points"][name.format(lam)] == task["points"][name.format("0")]


def test_sweep_refuses_fitting_r_past_memory_before_any_gradient(
    trained_family, tmp_path, monkeypatch):
  """Before 2026-12-06 R's memory was checked only in ``quality.moments``:
  after the set's predictions and the projection of its whole corpus."""
  root, _ = trained_family
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: 1024)
  monkeypatch.setattr(pipeline, "predictions", lambda *a, **k: pytest.fail("predicted"))
  monkeypatch.setattr(quality, "project_corpus", lambda *a: pytest.fail("projected"))
  out = tmp_path / "sweep"
  grid = ["EncodeConfig.projection_dim=1024", "PreconditionerConfig.kind=block"]
  with pytest.raises(InputError, match=re.escape(
      "PreconditionerConfig.kind='block': fitting R takes at least ")
                     + r"[\d.,]+ [KMG]iB \(its largest segment"):
    sweep.sweep_family(str(out), root, grid)
  assert not (out / "sets").exists()
  # With no R to fit, the same grid's set is predicted (the check passes).
  with pytest.raises(BaseException, match="predicted"):
    sweep.sweep_family(str(out), root, grid[:1] + ["PreconditionerConfig.kind=none"])


def test_query_sets_are_scored_under_their_own_r():
  rng = np.random.default_rng(0)
  layout = projection.make_layout({"w": jnp.zeros((6, 5)), "v": jnp.zeros(4)}, 40)
  phi = rng.normal(size=(60, layout.dim)).astype(np.float32)
  moments = hessian.accumulate(hessian.init_moments(layout, "block"), jnp.asarray(phi))
  basis = hessian.fit_basis(moments, dim=layout.dim, layout_seed=0)
  rows = np.asarray(basis.rotate(jnp.asarray(phi)), np.float64)
  queries = rows[:7] + 0.1 * rng.normal(size=(7, layout.dim))
  fits = []
  def fit(q):
    fits.append(len(q))
    return hessian.fit_metric(basis, q, rank=2)
  whole = sweep._set_scores(fit, rows, queries, 0)
  np.testing.assert_array_equal(whole, sweep._scores(fit(queries), rows, queries))
  np.testing.assert_array_equal(sweep._set_scores(fit, rows, queries, 7), whole)
  fits.clear()
  sets = sweep._set_scores(fit, rows, queries, 3)
  assert sorted(fits) == [1, 3, 3]              # 7 queries in sets of 3, 3, 1
  singles = sweep._set_scores(fit, rows, queries, 1)
  for q in range(7):                            # each query alone is its own R
    np.testing.assert_array_equal(singles[:, q],
                                  sweep._scores(fit(queries[q:q + 1]), rows,
                                                queries[q:q + 1])[:, 0])
  # R from other queries changes the scores (a test that can fail).
  assert np.abs(singles - whole).max() > 1e-3 and np.abs(sets - whole).max() > 1e-3
  # With a task: each set is scored under the R of 4 other queries.
  fitted = []
  def fit_rows(q):
    fitted.append({r.tobytes() for r in q})
    return fit(q)
  tasked = sweep._set_scores(fit_rows, rows, queries, 3, task_size=4)
  for size in (0, 7):  # one set of all 7: no other queries (scored under its own R before)
    with pytest.raises(InputError, match="--task_size=4 with query sets of"):
      sweep._set_scores(fit_rows, rows, queries, size, task_size=4)
  assert [len(q) for q in fitted] == [4, 4, 4]
  order = np.random.default_rng(0).permutation(7)
  for lo, task in zip(range(0, 7, 3), fitted):
    assert not task & {r.tobytes() for r in queries[order[lo:lo + 3]]}
  assert np.abs(tasked - sets).max() > 1e-3


def test_sweep_rejects_unknown_axes_and_values():
  ecfg, pcfg = sweep.EncodeConfig(), sweep.PreconditionerConfig()
  with pytest.raises(Exception, match="with --family_dir the axes are"):
    sweep.family_axes(["ModelConfig.d_model=4"], ecfg, pcfg)
  with pytest.raises(Exception, match="unknown value"):
    sweep.family_axes(["query_loss=logits"], ecfg, pcfg)
  axes = sweep.family_axes(["checkpoint=100,sum"], ecfg, pcfg)
  assert axes["checkpoint"] == ["100", "sum"] and axes["query_loss"] == ["target"]
  assert axes["PreconditionerConfig.lam"] == ["rule"]
  assert axes["EncodeConfig.store_dtype"] == ["bfloat16"]
  with pytest.raises(Exception, match="store_dtype one of"):
    sweep.family_axes(["EncodeConfig.store_dtype=int4"], ecfg, pcfg)
  # Before 2026-12-04 these passed here and failed after the projections.
  for spec, message in [
      ("PreconditionerConfig.damping=0.1,abc", "damping=abc: expected a number"),
      ("PreconditionerConfig.lam=x", "lam=x: expected rule or a number"),
      ("EncodeConfig.projection_dim=big", "projection_dim=big: expected a positive"),
      ("checkpoint=abc", "checkpoint=abc: expected a training step, last or sum"),
      ("checkpoint=", "no values"),
      # Before 2026-12-05 out of gin's ranges: lam=2 and damping=-1 were a
      # LinAlgError traceback after the projections, lam=-1 and damping=0
      # scored a meaningless row.
      ("PreconditionerConfig.lam=rule,2", "--grid: PreconditionerConfig.lam=2: "
       "expected a value in [0, 1]"),
      ("PreconditionerConfig.lam=-1", "lam=-1: expected a value in [0, 1]"),
      ("PreconditionerConfig.damping=0.1,-1", "--grid: PreconditionerConfig.damping=-1: "
       "expected a value > 0"),
      ("PreconditionerConfig.damping=0", "damping=0: expected a value > 0"),
      ("EncodeConfig.projection_dim=4096,3000000000",
       "projection_dim=3000000000: expected a value < 2**31")]:
    with pytest.raises(Exception, match=re.escape(message)):
      sweep.family_axes([spec], ecfg, pcfg)
  with pytest.raises(Exception, match="no values"):
    sweep.expand(["EncodeConfig.seed="])
  # Before 2026-12-04: the first of two specs of an axis was dropped (grid
  # mode: runs named 1024 and 4096 both ran 4096), a repeated value ran
  # twice, and checkpoint=sum alone failed after the projections.
  for spec, message in [
      (["EncodeConfig.projection_dim=1024", "EncodeConfig.projection_dim=4096"],
       "the axis EncodeConfig.projection_dim is given twice"),
      (["EncodeConfig.seed=1,1"], "the value 1 is given twice")]:
    with pytest.raises(Exception, match=re.escape(message)):
      sweep.expand(spec)
    if spec[0].startswith("EncodeConfig.projection_dim"):
      with pytest.raises(Exception, match=re.escape(message)):
        sweep.family_axes(spec, ecfg, pcfg)
  with pytest.raises(Exception, match="the sum adds the scores of the other"):
    sweep.family_axes(["checkpoint=sum"], ecfg, pcfg)


def test_stored_rows_are_what_a_store_gives_back(tmp_path):
  # The sweep's storage axis rounds rows as the store does.
  from tracer import store as store_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  rows = rng.normal(size=(9, 6)) * rng.uniform(0.1, 3, 6)
  columns = rng.uniform(0.5, 2, 6).astype(np.float32)
  for dtype in ("bfloat16", "int8", "float32"):
    m = store_lib.Manifest(
        checkpoint="c", step=1, params_fingerprint="p", correction="adam",
        epsilon=1e-8, projection_seed=0, layout=None, dim=6,
        basis_fingerprint=None, dtype=dtype, num_rows=9, chunk_rows=4)
    s = store_lib.create_or_open(tmp_path / dtype, m, column_scales=(
        columns if dtype == "int8" else None))
    for c in s.pending_chunks():
      lo, hi = s.chunk_bounds(c)
      s.write_chunk(c, rows[lo:hi].astype(np.float32))
    np.testing.assert_array_equal(sweep._stored(rows, dtype, columns),
                                  s.read_rows(0, 9))


def test_star_design_varies_one_axis_at_a_time():
  axes = {"checkpoint": ["600", "200", "sum"], "EncodeConfig.projection_dim": ["16384"],
          "query_loss": ["target", "prediction"],
          "PreconditionerConfig.kind": ["block", "none"],
          "PreconditionerConfig.damping": ["0.1", "1.0"],
          "PreconditionerConfig.lam": ["rule"],
          "EncodeConfig.store_dtype": ["bfloat16", "int8"]}
  star = sweep.family_points(axes, "star")
  base = ("600", "16384", "target", "block", "0.1", "rule", "bfloat16")
  assert star == [base, ("200",) + base[1:], ("sum",) + base[1:],
                  base[:2] + ("prediction",) + base[3:],
                  base[:3] + ("none", "-", "-", "bfloat16"),
                  base[:4] + ("1.0", "rule", "bfloat16"), base[:6] + ("int8",)]
  grid = sweep.family_points(axes, "grid")
  # 3 checkpoints x 2 losses x (2 dampings with R + 1 point without) x 2 dtypes.
  assert len(grid) == 36 and set(star) <= set(grid)
  # A centre of no R: damping varies about block's (before 2026-12-04 its
  # values collapsed into the centre's "-" and were not scored).
  none_first = dict(axes, **{"PreconditionerConfig.kind": ["none", "block"],
                             "checkpoint": ["600"], "query_loss": ["target"],
                             "EncodeConfig.store_dtype": ["bfloat16"]})
  centre = ("600", "16384", "target")
  assert sweep.family_points(none_first, "star") == [
      centre + ("none", "-", "-", "bfloat16"),
      centre + ("block", "0.1", "rule", "bfloat16"),
      centre + ("block", "1.0", "rule", "bfloat16")]


def test_scores_with_no_r_are_cosines():
  rng = np.random.default_rng(0)
  rows, queries = rng.normal(size=(30, 16)), rng.normal(size=(5, 16))
  scores = sweep._scores(hessian.identity_metric(16), rows, queries)
  cosine = (rows / np.linalg.norm(rows, axis=1, keepdims=True)) @ (
      queries / np.linalg.norm(queries, axis=1, keepdims=True)).T
  np.testing.assert_allclose(scores, cosine, rtol=1e-5, atol=1e-6)


def test_paired_statistics():
  a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.5, 2.5, 2.0, 3.0])
  p = stats.paired(a, b)
  d = a - b
  assert p["n"] == 4 and np.isclose(p["mean"], d.mean())
  assert np.isclose(p["se"], d.std(ddof=1) / 2) and p["win"] == 0.75
  assert np.isclose(p["z"], p["mean"] / p["se"])
  # Pairing resolves a shift that the spread across queries would hide.
  base = np.random.default_rng(0).normal(size=200) * 10
  shifted = stats.paired(base + 0.1, base)
  assert shifted["z"] > 1e6 and shifted["win"] == 1.0
  with pytest.raises(ValueError, match="one shape"):
    stats.paired(a, b[:3])
  assert stats.mean_std([2.0]) == {"mean": 2.0, "std": 0.0, "n": 1}
  assert stats.format_cell({"mean": 0.5, "std": 0.25, "n": 2}) == "0.5000 ± 0.2500"
  assert stats.format_cell(p) == "+0.5000 ± 0.3536 (z +1.4)"
  # Every query one non-zero difference: z is infinite, not NaN (before
  # 2026-12-08 tabled "(z +nan)"); none at all: NaN without numpy's warning.
  same = stats.paired([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
  assert same["se"] == 0 and same["z"] == np.inf
  assert stats.format_cell(same) == "+1.0000 ± 0.0000 (z +inf)"
  assert stats.paired([1.0, 1.0], [2.0, 2.0])["z"] == -np.inf
  assert np.isnan(stats.paired([1.0, 1.0], [1.0, 1.0])["z"])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    empty = stats.paired([np.nan], [1.0])
  assert empty["n"] == 0 and np.isnan(empty["mean"]) and np.isnan(empty["win"])


def test_rank_statistics():
  assert stats.ranks([3.0, 1.0, 2.0, 2.0]).tolist() == [3.0, 0.0, 1.5, 1.5]
  assert stats.spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)
  assert stats.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  assert np.isnan(stats.spearman([1, 1, 1], [1, 2, 3]))
  # Ties: Pearson's r of the average ranks (worked by hand).
  assert stats.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(
      np.corrcoef([0, 1.5, 1.5, 3], [0, 1, 2, 3])[0, 1])
  m = stats.mean_se([0.1, None, 0.3])
  assert m["n"] == 2 and m["mean"] == pytest.approx(0.2)
  assert m["se"] == pytest.approx(np.std([0.1, 0.3], ddof=1) / np.sqrt(2))


def test_statistics_of_non_finite_values():
  """Before 2026-12-07 paired() kept a query whose values were both inf (a NaN
  difference: the mean, se and z NaN), spearman() ranked a NaN as the largest
  value and broadcast values of two lengths."""
  p = stats.paired([np.inf, 1.0, 2.0, 3.0, -np.inf], [np.inf, 0.0, 0.0, 1.0, 5.0])
  assert p["n"] == 3 and p["mean"] == pytest.approx(5 / 3)
  assert stats.mean_se([0.5, np.inf, 1.5])["n"] == 2
  assert np.isnan(stats.spearman([1.0, 2.0, np.nan], [1.0, 2.0, 3.0]))
  assert np.isnan(stats.spearman([1.0, 2.0, 3.0], [np.nan, 2.0, 3.0]))
  with pytest.raises(ValueError, match=re.escape(
      "spearman: need two f[n] of one shape, got (3,), (1,)")):
    stats.spearman([1.0, 2.0, 3.0], [1.0])


class _Corpus:
  def __init__(self, rows):
    self.rows = rows

  def ids_of(self, rows):
    return [self.rows[r][0] for r in rows]

  def texts_of(self, rows):
    return [self.rows[r][1] for r in rows]


def test_influence_by_kind_of_proponent():
  corpus = _Corpus([("d0", "Ann Vel plays the Zorn."), ("d1", "Bo Kes plays the Zorn."),
                    ("d2", "Ann Vel's favourite colour is Mur."), ("d3", "Rain fell.")])
  queries = [{"id": "q", "subject": "Ann Vel", "object": "Zorn",
              "fact_doc_ids": ["d0"]}]
  pairs = np.array([[0, 0], [0, 1], [0, 2], [0, 3]])
  kinds = quality.pair_kinds(queries, corpus, pairs)
  assert [quality.KINDS[i] for i in kinds] == [
      "fact", "same object", "same subject", "other"]
  assert quality.pair_kinds([{"id": "q", "prompt": "p"}], corpus, pairs) is None
  deltas = np.array([0.4, 0.2, 0.1, np.nan], np.float32)
  # Three methods x one query x two proponents, as pair indices; the third
  # method lists one proponent (-1: BM25 with one matching document).
  inverse = np.array([[[0, 1]], [[2, 3]], [[0, -1]]])
  by_kind = quality.influence_by_kind(kinds, deltas, inverse, k=2)
  assert by_kind["pairs"] == {"fact": 1, "same object": 1, "same subject": 1,
                              "other": 0}
  assert np.isclose(by_kind["mean_delta"]["fact"], 0.4)
  assert by_kind["mean_delta"]["other"] is None
  shares = by_kind["share@2"]
  assert shares[quality.METHODS[0]] == {"fact": 0.5, "same object": 0.5,
                                        "same subject": 0.0, "other": 0.0}
  assert shares[quality.METHODS[1]]["other"] == 0.5
  # Shares of the proponents listed, not of the K slots.
  assert shares[quality.METHODS[2]] == {"fact": 1.0, "same object": 0.0,
                                        "same subject": 0.0, "other": 0.0}
  assert "| top-2 proponents |" in quality.format_kinds(by_kind, 2)


def test_family_flags_and_a_set_made_otherwise_are_refused(tmp_path):
  """Each a traceback, a silent double count or stale scores before
  2026-12-04."""
  from tracer.launch import config as launch_config  # pylint: disable=g-import-not-at-top
  with pytest.raises(InputError, match="the set dense-0 twice"):
    family.set_names(["dense"], [0, 0])
  with pytest.raises(InputError, match="at least one of each"):
    family.set_names(["dense"], [])
  with pytest.raises(InputError, match="--seeds: 'a' is not an integer"):
    launch_config.integers("seeds", ["1", "a"])
  with pytest.raises(InputError, match="--styles: unknown style 'bogus'"):
    family.set_names(["dense", "bogus"], [0])
  with pytest.raises(InputError, match="--seeds: -1; expected seeds >= 0"):
    family.set_names(["dense"], [-1])
  set_dir = tmp_path / "sets" / "dense-0"
  set_dir.mkdir(parents=True)
  (set_dir / "set.json").write_text(json.dumps(
      {"style": "dense", "seed": 0, "facts_per_bucket": 4, "distractor_docs": 2}))
  with pytest.raises(InputError, match="set.json: the set was made with .*'facts_per_"
                     "bucket': 4.*this run asks .*'facts_per_bucket': 9"):
    family.ensure_set(str(set_dir), "dense", 0, 9, 2)
  assert not (set_dir / "facts").exists()  # refused before anything is written


def test_a_set_whose_training_was_killed_is_resumed_and_scored_again(
    trained_family, tmp_path, monkeypatch):
  """Before 2026-12-04 any checkpoint counted as a trained set: a training
  run killed after its first checkpoint was never resumed, and its partial
  model was scored and summarized as the set's."""
  import shutil  # pylint: disable=g-import-not-at-top
  root, _ = trained_family
  set_dir = tmp_path / "dense-0"
  shutil.copytree(os.path.join(root, "sets", "dense-0"), set_dir)
  report = family.read_set_report(str(set_dir))
  checkpoints = str(set_dir / "checkpoints")
  assert family.stale(report, checkpoints, 8, ()) == []
  assert family.stale(report, checkpoints, 0, ()) == []  # (none asked)
  assert family.stale(report, checkpoints, 3, ()) == [
      "with 8 tail-patch queries, this run asks 3"]
  assert family.stale(report, checkpoints, 8, [50]) == [
      "summed over no steps, this run asks [50] (--sum_steps)"]
  with gin.unlock_config():
    gin.bind_parameter("PreconditionerConfig.damping", 0.5)
  try:
    assert family.stale(report, checkpoints, 8, ()) == [
        "with other PreconditionerConfig.damping"]
  finally:
    with gin.unlock_config():
      gin.bind_parameter("PreconditionerConfig.damping", 0.1)
  shutil.rmtree(set_dir / "checkpoints" / "100")  # killed between 50 and 100
  assert not ckpt_lib.finished(checkpoints)
  assert family.stale(report, checkpoints, 8, ()) == [
      "at step 100, the checkpoint is at 50"]
  calls = []
  monkeypatch.setattr(family.train, "train", lambda *a: calls.append(a))
  family.ensure_set(str(set_dir), "dense", 0, 4, 10)
  assert [os.path.basename(a[1]) for a in calls] == ["dense-0"]
  with pytest.raises(InputError, match="--steps names step 50 twice"):
    family.run(str(tmp_path), STYLES, SEEDS, 4, 10, steps=[50, 50])


# A model small enough to save in a test without training it.
TINY_MODEL = model_lib.ModelConfig(max_len=16, d_model=16, num_layers=1,
                                   num_heads=2, d_ff=32)


def _saved_set(set_dir, steps, total_steps: int) -> str:
  """A family set's checkpoints directory holding ``steps`` (untrained
  weights: only their configs and steps are read)."""
  opt_config = train_lib.OptimizerConfig(total_steps=total_steps, warmup_steps=0)
  params = model_lib.init_params(TINY_MODEL)
  opt_state = train_lib.make_optimizer(opt_config).init(params)
  checkpoints = os.path.join(set_dir, "checkpoints")
  mngr = ckpt_lib.manager(checkpoints, max_to_keep=len(steps))
  for step in steps:
    ckpt_lib.save(mngr, step, params, opt_state, TINY_MODEL, opt_config,
                  {"tokenizer": "byte", "overflow": "truncate"})
  mngr.close()
  return checkpoints


def test_sweep_family_checks_steps_before_any_set(tmp_path, monkeypatch):
  """Before 2026-12-07 a step no set saved (checkpoint=10,20 on sets that
  saved 10) failed after the first set's earlier steps were projected and
  scored; checkpoint=0600 loaded no step, and 600,0600 scored 600 twice."""
  root = tmp_path / "family"
  for name in ("dense-0", "paraphrase-0"):
    _saved_set(str(root / "sets" / name), [10], total_steps=10)
  monkeypatch.setattr(sweep, "sweep_set", lambda *a: pytest.fail("scored"))
  grid = ["EncodeConfig.projection_dim=256"]
  # The sets' own model in gin (another would be refused first, 2026-12-08).
  gin.clear_config()
  gin.parse_config("".join(f"ModelConfig.{k} = {getattr(TINY_MODEL, k)}\n" for k in (
      "max_len", "d_model", "num_layers", "num_heads", "d_ff")))
  try:
    with pytest.raises(Exception, match=re.escape(
        f"--grid: checkpoint: {root}/sets/dense-0/checkpoints: no step [20]; it "
        "holds step(s) [10]; expected steps every set saved")):
      sweep.sweep_family(str(tmp_path / "sweep"), str(root),
                         ["checkpoint=10,20"] + grid)
    for spec, padded in (("checkpoint=600,0600", "0600"),
                         ("checkpoint=010,sum", "010")):
      with pytest.raises(Exception, match=re.escape(
          f"--grid: checkpoint={padded}: a step with leading zeros; expected "
          f"{int(padded)} (step directories are named without them)")):
        sweep.sweep_family(str(tmp_path / "sweep"), str(root), [spec] + grid)
    assert not (tmp_path / "sweep").exists()
    # A step every set saved passes the check (and goes on to be scored).
    with pytest.raises(BaseException, match="scored"):
      sweep.sweep_family(str(tmp_path / "sweep"), str(root), ["checkpoint=10"] + grid)
  finally:  # (the family fixture's)
    gin.clear_config()
    gin.parse_config(BINDINGS + "OptimizerConfig.total_steps = 100\n")


def test_family_refuses_a_binding_of_another_model_than_the_sets(tmp_path,
                                                                  monkeypatch):
  """Before 2026-12-07 a rerun with ModelConfig.d_model = 48 on sets trained
  at 32 reused their models and scores (the old table, exit 0), where
  `tracer quality` on a set's checkpoint refuses the binding."""
  checkpoints = _saved_set(str(tmp_path / "sets" / "dense-0"), [10], total_steps=10)
  fail = lambda *a, **k: pytest.fail("a set was trained or scored")
  monkeypatch.setattr(family.train, "train", fail)
  monkeypatch.setattr(quality, "run", fail)
  model = "".join(f"ModelConfig.{k} = {getattr(TINY_MODEL, k)}\n" for k in (
      "max_len", "num_layers", "num_heads", "d_ff"))
  gin.clear_config()
  try:
    for binding, message in (
        ("ModelConfig.d_model = 24", "ModelConfig.d_model: the checkpoint has 16, "
         "the gin bindings say 24"),
        ("OptimizerConfig.b2 = 0.9", "OptimizerConfig.b2: the checkpoint has "
         "0.99, the gin bindings say 0.9"),
        ("DataConfig.overflow = 'split'", "DataConfig.overflow: the checkpoint has "
         "'truncate', the gin bindings say 'split'"),
        # The schedule too (before 2026-12-08 ignored: the old table, exit 0).
        ("OptimizerConfig.learning_rate = 0.05", "OptimizerConfig.learning_rate: "
         "the checkpoint has 0.003, the gin bindings say 0.05")):
      gin.parse_config(model + "OptimizerConfig.total_steps = 10\n" + binding)
      with pytest.raises(InputError, match=re.escape(
          f"{checkpoints}/10: a checkpoint of another {binding.split('.')[0]} than "
          f"the gin bindings name ({message}); expected the gin files the model "
          "was trained with")):
        family.run(str(tmp_path), ["dense"], ["0"], 4, 10)
      gin.clear_config()
    assert sorted(os.listdir(tmp_path / "sets" / "dense-0")) == ["checkpoints"]
  finally:  # (the family fixture's)
    gin.clear_config()
    gin.parse_config(BINDINGS + "OptimizerConfig.total_steps = 100\n")
