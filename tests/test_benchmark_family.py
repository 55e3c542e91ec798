"""The benchmark family (`tracer family`), its in-memory sweep and the paired
statistics behind both."""

from __future__ import annotations

import json
import os

from absl import flags
import gin
import numpy as np
import pytest

from tracer.launch import family
from tracer.launch import quality
from tracer.launch import sweep
from tracer import hessian
from tracer import stats
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
  table = open(os.path.join(root, "family.md")).read()
  assert table.startswith("| method |") and "±" in table
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
  assert "ckpt=sum d=1024 loss=target R=block damping=0.1 lam=rule" in result["points"]
  # A rerun reads each set's table instead of projecting again.
  monkeypatch.setattr(sweep, "sweep_set", lambda *a: pytest.fail("recomputed"))
  again = sweep.sweep_family(out, root, grid, design="grid")
  assert again["points"].keys() == result["points"].keys()


def test_sweep_rejects_unknown_axes_and_values():
  ecfg, pcfg = sweep.EncodeConfig(), sweep.PreconditionerConfig()
  with pytest.raises(Exception, match="with --family_dir the axes are"):
    sweep.family_axes(["ModelConfig.d_model=4"], ecfg, pcfg)
  with pytest.raises(Exception, match="unknown value"):
    sweep.family_axes(["query_loss=logits"], ecfg, pcfg)
  axes = sweep.family_axes(["checkpoint=100,sum"], ecfg, pcfg)
  assert axes["checkpoint"] == ["100", "sum"] and axes["query_loss"] == ["target"]
  assert axes["PreconditionerConfig.lam"] == ["rule"]


def test_star_design_varies_one_axis_at_a_time():
  axes = {"checkpoint": ["600", "200", "sum"], "EncodeConfig.projection_dim": ["16384"],
          "query_loss": ["target", "prediction"],
          "PreconditionerConfig.kind": ["block", "none"],
          "PreconditionerConfig.damping": ["0.1", "1.0"],
          "PreconditionerConfig.lam": ["rule"]}
  star = sweep.family_points(axes, "star")
  base = ("600", "16384", "target", "block", "0.1", "rule")
  assert star == [base, ("200",) + base[1:], ("sum",) + base[1:],
                  base[:2] + ("prediction",) + base[3:],
                  base[:3] + ("none", "-", "-"), base[:4] + ("1.0", "rule")]
  grid = sweep.family_points(axes, "grid")
  # 3 checkpoints x 2 losses x (2 dampings with R + 1 point without).
  assert len(grid) == 18 and set(star) <= set(grid)


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
  # Two methods x one query x two proponents, as pair indices.
  inverse = np.array([0, 1, 2, 3])
  by_kind = quality.influence_by_kind(kinds, deltas, inverse, (2, 1, 2), k=2)
  assert by_kind["pairs"] == {"fact": 1, "same object": 1, "same subject": 1,
                              "other": 0}
  assert np.isclose(by_kind["mean_delta"]["fact"], 0.4)
  assert by_kind["mean_delta"]["other"] is None
  shares = by_kind["share@2"]
  assert shares[quality.METHODS[0]] == {"fact": 0.5, "same object": 0.5,
                                        "same subject": 0.0, "other": 0.0}
  assert shares[quality.METHODS[1]]["other"] == 0.5
  assert "| top-2 proponents |" in quality.format_kinds(by_kind, 2)
