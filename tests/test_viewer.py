"""Tests for tracer.viewer, tracer.plots and launch.view (no browser)."""

from __future__ import annotations

import json
import math
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from tracer import evaluate
from tracer import plots
from tracer import storage
from tracer import viewer
from tracer.errors import InputError
from tracer.launch import view as launch_view

REPO = pathlib.Path(__file__).resolve().parents[1]


def _ours(qid, **fields):
  rec = {"query_id": qid, "prompt": f"prompt of {qid}", "target": " T",
         "proponent_ids": ["d1", "d2"], "proponent_scores": [2.0, 1.0],
         "proponents": ["text one", "text two"],
         "opponent_ids": ["d9"], "opponent_scores": [-1.0],
         "opponents": ["text nine"]}
  rec.update(fields)
  return rec


def _theirs(qid, **fields):
  """A record in the authors' released field names (tracer.viewer's doc)."""
  rec = {"example_id": qid, "query_set": "trex", "inputs_plaintext": "Paris is in",
         "targets_plaintext": " France", "relation": "P17",
         "c4_frequency": 1234, "c4_frequency_bucket": 3, "8b_confidence": 0.9,
         "is_8b_correct": True,
         "proponents": ["Paris is the capital of France.", "Lyon is big."],
         "proponent_ids": ["s1", "s2"], "proponent_scores": [0.7, 0.2],
         "proponent_correct": [True, False],
         "proponent_ais_scores": [0.95, 0.1],
         "opponents": ["Berlin."], "opponent_ids": ["s9"],
         "opponent_scores": [-0.3]}
  rec.update(fields)
  return rec


def _write(path, records_or_lines):
  lines = [r if isinstance(r, str) else json.dumps(r) for r in records_or_lines]
  path.write_text("".join(l + "\n" for l in lines), encoding="utf-8")
  return str(path)


def _data_json(page: str) -> str:
  m = re.search(r'<script type="application/json" id="tracer-data">(.*?)</script>',
                page, re.S)
  assert m, "no data script in the page"
  return m.group(1)


# --- reading -----------------------------------------------------------------


def test_our_format_is_kept(tmp_path):
  rec = _ours("q1", bucket="2-3", fact_doc_ids=["d2"], relation="pet",
              prediction=" T", proponent_tail_patch=[0.5, None])
  [got] = viewer.read_results(_write(tmp_path / "r.jsonl", [rec]))
  assert got["query_id"] == "q1" and got["bucket"] == "2-3"
  assert got["proponents"] == ["text one", "text two"]
  assert got["opponent_ids"] == ["d9"] and got["opponent_scores"] == [-1.0]
  assert got["relation"] == "pet"  # an extra field, kept
  assert got["prediction_correct"] is True
  assert got["proponent_tail_patch"][0] == 0.5
  assert math.isnan(got["proponent_tail_patch"][1])


def test_our_format_without_texts_or_opponents(tmp_path):
  rec = {"query_id": "q", "proponent_ids": ["a", "b"], "proponent_scores": [1, None]}
  [got] = viewer.read_results(_write(tmp_path / "r.jsonl", [rec]))
  assert got["proponents"] == [None, None]
  assert got["opponent_ids"] == [] and got["opponents"] == []
  assert got["prompt"] == "" and got["target"] == ""
  assert got["proponent_scores"][0] == 1.0 and math.isnan(got["proponent_scores"][1])
  assert "prediction_correct" not in got


def test_prediction_right_only_when_equal_to_target(tmp_path):
  recs = viewer.read_results(_write(tmp_path / "r.jsonl", [
      _ours("a", prediction=" T"), _ours("b", prediction="T"),
      _ours("c", prediction=" X")]))
  assert [r["prediction_correct"] for r in recs] == [True, False, False]


def test_authors_format_is_mapped(tmp_path):
  [got] = viewer.read_results(_write(tmp_path / "r.jsonl", [_theirs("trex-7")]))
  assert got["query_id"] == "trex-7"
  assert got["prompt"] == "Paris is in" and got["target"] == " France"
  assert got["bucket"] == "3"
  assert got["prediction_correct"] is True
  assert got["proponent_correct"] == [True, False]
  assert got["proponent_ids"] == ["s1", "s2"] and got["opponent_ids"] == ["s9"]
  for name in ("example_id", "inputs_plaintext", "targets_plaintext",
               "c4_frequency_bucket", "is_8b_correct"):
    assert name not in got, name
  # Everything else is kept as an extra.
  for name in ("query_set", "relation", "c4_frequency", "8b_confidence",
               "proponent_ais_scores"):
    assert got[name] == _theirs("x")[name], name


def test_trex_id_when_no_example_id(tmp_path):
  rec = _theirs("unused")
  del rec["example_id"]
  rec["trex_id"] = "T-1"
  [got] = viewer.read_results(_write(tmp_path / "r.jsonl", [rec]))
  assert got["query_id"] == "T-1"
  # fact_id before trex_id, as tracer evaluate and tracer bm25 take their
  # queries' ids (before 2026-12-08 the viewer took trex_id: each query of a
  # bm25 run over this file and of the authors' file showed twice).
  rec["fact_id"] = "F-1"
  path = _write(tmp_path / "f.jsonl", [rec])
  [got] = viewer.read_results(path)
  assert got["query_id"] == "F-1" == next(iter(evaluate.read_results(path)))


def test_one_file_mixing_both_formats(tmp_path):
  recs = viewer.read_results(_write(tmp_path / "r.jsonl", [
      _ours("q1"), _theirs("q2"), _ours("q3", example_id="other")]))
  assert [r["query_id"] for r in recs] == ["q1", "q2", "q3"]
  assert recs[1]["prompt"] == "Paris is in"
  # Both names on one record: ours wins, theirs stays an extra.
  assert recs[2]["example_id"] == "other"


def test_reads_a_url(tmp_path):
  storage.write_text("memory://viewer-test/r.jsonl",
                     json.dumps(_ours("q1")) + "\n" + json.dumps(_theirs("q2")) + "\n")
  recs = viewer.read_results("memory://viewer-test/r.jsonl")
  assert [r["query_id"] for r in recs] == ["q1", "q2"]


_BAD = {
    "not json": ("{nope", "not valid JSON"),
    "not an object": ("[1, 2]", "expected a JSON object"),
    "no query id": (json.dumps({"prompt": "p", "proponent_ids": [],
                                "proponent_scores": []}), "no query id"),
    "empty query id": (json.dumps(_ours("")), "no query id"),
    "no proponents": (json.dumps({"query_id": "x"}), "proponent_ids"),
    "scores shorter": (json.dumps(_ours("x", proponent_scores=[1.0])),
                       "'proponent_scores' has 1 entries but 'proponent_ids' has 2"),
    "texts longer": (json.dumps(_ours("x", proponents=["a", "b", "c"])),
                     "'proponents' has 3 entries"),
    "opponent ids without scores": (
        json.dumps({k: v for k, v in _ours("x").items() if k != "opponent_scores"}),
        "missing field 'opponent_scores'"),
    "correct marks length": (json.dumps(_theirs("x", proponent_correct=[True])),
                             "'proponent_correct' has 1 entries"),
    "correct marks type": (json.dumps(_theirs("x", proponent_correct=[1, 0])),
                           "'proponent_correct' must be a list of true/false"),
    "tail-patch length": (json.dumps(_ours("x", proponent_tail_patch=[1.0])),
                          "'proponent_tail_patch' has 1 entries"),
    "bool score": (json.dumps(_ours("x", proponent_scores=[True, 1.0])),
                   "'proponent_scores' must be a list of numbers"),
    "id not a string": (json.dumps(_ours("x", proponent_ids=["a", 3])),
                        "'proponent_ids' must be a list of strings"),
    "prompt not a string": (json.dumps(_ours("x", prompt=["p"])),
                            "'prompt' must be a string"),
    "duplicate id": (json.dumps(_ours("q0")), "duplicate query id 'q0' (first at line 1)"),
    # Tracebacks before 2026-12-04:
    "score past float's range": ('{"query_id": "x", "proponent_ids": ["a"], '
                                 '"proponent_scores": [1' + "0" * 400 + "]}",
                                 "'proponent_scores' holds a number out of float's "
                                 "range"),
    # The summary over every bucket is named "all".
    "bucket named all": (json.dumps(_ours("x", bucket="all")),
                         "field 'bucket' is 'all', the name of the summary"),
    "their bucket named all": (json.dumps(_theirs("x", c4_frequency_bucket="all")),
                               "field 'c4_frequency_bucket' is 'all'"),
    "prediction_correct not a bool": (json.dumps(_ours("x", prediction_correct=1)),
                                      "field 'prediction_correct' must be true or "
                                      "false"),
}


@pytest.mark.parametrize("name", sorted(_BAD))
def test_bad_line_names_file_and_line(tmp_path, name):
  line, expected = _BAD[name]
  path = _write(tmp_path / "bad.jsonl", [_ours("q0"), line])
  with pytest.raises(InputError) as e:
    viewer.read_results(path)
  assert str(e.value).startswith(f"{path}:2: "), str(e.value)
  assert expected in str(e.value)


def test_empty_file_is_an_error(tmp_path):
  path = _write(tmp_path / "empty.jsonl", [])
  with pytest.raises(InputError, match="no records"):
    viewer.read_results(path)


# --- summary -----------------------------------------------------------------


def test_summary_retrieval_equals_evaluate(tmp_path):
  rng = np.random.default_rng(0)
  records, queries = [], []
  for i in range(40):
    ids = [f"d{j}" for j in rng.permutation(30)[:12]]
    facts = [f"d{j}" for j in rng.choice(30, size=2, replace=False)]
    if i % 9 == 0:
      facts = []  # no ground truth: left out of both
    rec = _ours(f"q{i}", bucket=["1", "2-3", "11+"][i % 3], fact_doc_ids=facts,
                proponent_ids=ids, proponent_scores=sorted(rng.random(12))[::-1],
                proponents=["t"] * 12)
    if i == 5:  # an error row: no proponents, scored 0 by both
      rec.update(proponent_ids=[], proponent_scores=[], proponents=[],
                 error="non-finite gradient: no proponents computed")
    records.append(rec)
    queries.append({"id": rec["query_id"], "fact_doc_ids": facts,
                    "bucket": rec["bucket"]})
  path = _write(tmp_path / "r.jsonl", records)
  want = evaluate.retrieval_metrics(queries, evaluate.read_results(path))
  got = viewer.summary({"m": viewer.read_results(path)})["m"]
  assert list(got) == ["all", "1", "2-3", "11+"]
  for bucket in got:
    w = want if bucket == "all" else want["buckets"][bucket]
    assert got[bucket]["mrr"] == pytest.approx(w["mrr"])
    assert got[bucket]["recall@10"] == pytest.approx(w["recall@10"])
    assert got[bucket]["num_ground_truth"] == w["num_queries"]
  assert got["all"]["num_queries"] == 40
  assert got["all"]["num_ground_truth"] == 40 - 5  # i = 0, 9, 18, 27, 36
  assert got["all"]["num_errors"] == 1
  assert 0 < got["all"]["mrr"] < 1


def test_summary_from_proponent_correct_marks():
  recs = [viewer.normalize_record(_theirs(f"q{i}", proponent_correct=marks,
                                          proponent_ids=[f"s{j}" for j in range(len(marks))],
                                          proponent_scores=[0.0] * len(marks),
                                          proponents=["x"] * len(marks)))
          for i, marks in enumerate([[False, True, False], [False, False], [True]])]
  got = viewer.summary({"m": recs})["m"]["all"]
  assert got["num_ground_truth"] == 3
  assert got["mrr"] == pytest.approx((1 / 2 + 0 + 1) / 3)
  assert got["recall@10"] == pytest.approx(2 / 3)


def test_summary_marks_and_fact_ids_agree_on_a_document_listed_twice():
  # d1 is listed at ranks 1 and 2, the relevant d2 at 3: as one document
  # each, d2 ranks 2nd on both paths (before: 1/3 from the marks).
  ids, marks = ["d1", "d1", "d2", "d2"], [False, False, True, True]
  common = dict(proponent_ids=ids, proponent_scores=[0.0] * 4,
                proponents=["x"] * 4)
  by_marks = viewer.normalize_record(_theirs("q", proponent_correct=marks,
                                             **common))
  by_ids = viewer.normalize_record(_ours("q", fact_doc_ids=["d2"], **common))
  for rec in (by_marks, by_ids):
    got = viewer.summary({"m": [rec]})["m"]["all"]
    assert got["mrr"] == pytest.approx(1 / 2)
    assert got["recall@10"] == 1.0


def test_summary_accuracy_and_tail_patch_by_hand():
  recs = [viewer.normalize_record(r) for r in [
      _ours("a", bucket="1", prediction=" T",
            proponent_ids=["1", "2", "3", "4"], proponent_scores=[4, 3, 2, 1],
            proponents=["x"] * 4, proponent_tail_patch=[1.0, 3.0, None, 5.0]),
      _ours("b", bucket="1", prediction=" no", proponent_tail_patch=[2.0, float("nan")]),
      _ours("c", bucket="2", prediction=" no"),
      _ours("d", bucket="2"),
      # Tail-patched, but not one value: not counted, as not averaged.
      _ours("e", bucket="3", proponent_tail_patch=[None, None]),
  ]]
  got = viewer.summary({"m": recs})["m"]
  a = got["all"]
  assert a["num_predictions"] == 3 and a["accuracy"] == pytest.approx(1 / 3)
  assert a["num_tail_patched"] == 2
  # Per query, the mean over its first k proponents that have a value.
  # k=1: a 1, b 2; k=3: a mean(1, 3) = 2, b 2; k=5 and 10: a mean(1, 3, 5) = 3, b 2.
  assert a["tail_patch@1"] == pytest.approx(1.5)
  assert a["tail_patch@1_se"] == pytest.approx(0.5)  # std([1, 2], ddof=1) / sqrt(2)
  assert a["tail_patch@3"] == pytest.approx(2.0)
  assert a["tail_patch@3_se"] == pytest.approx(0.0)
  assert a["tail_patch@5"] == pytest.approx(2.5)
  assert a["tail_patch@10_se"] == pytest.approx(0.5)
  assert got["1"]["accuracy"] == pytest.approx(0.5)
  assert got["2"]["num_tail_patched"] == 0 and got["2"]["tail_patch@1"] is None
  assert got["2"]["accuracy"] == 0.0
  # No ground truth anywhere: no retrieval metrics.
  assert a["mrr"] is None and a["num_ground_truth"] == 0


def test_single_tail_patched_query_has_no_standard_error():
  rec = viewer.normalize_record(_ours("a", proponent_tail_patch=[1.0, 2.0]))
  got = viewer.summary({"m": [rec]})["m"]["all"]
  assert got["tail_patch@3"] == pytest.approx(1.5)
  assert got["tail_patch@3_se"] is None


def test_tail_patch_counts_an_example_listed_twice_once():
  # The same example (id and text) twice is one step's delta; two windows of
  # a split document (one id, two texts) are two examples.
  rec = viewer.normalize_record(_ours(
      "a", proponent_ids=["d1", "d1", "d2", "d2"], proponent_scores=[4, 3, 2, 1],
      proponents=["x", "x", "w1", "w2"], proponent_tail_patch=[1.0, 1.0, 4.0, 7.0]))
  got = viewer.summary({"m": [rec]})["m"]["all"]
  assert got["tail_patch@1"] == pytest.approx(1.0)
  assert got["tail_patch@3"] == pytest.approx(4.0)  # not mean(1, 1, 4) = 2


# --- the page ----------------------------------------------------------------


def _runs():
  a = [viewer.normalize_record(_ours(f"q{i}", bucket=str(i % 2), fact_doc_ids=["d2"],
                                     relation=["pet", "job"][i % 2],
                                     prediction=" T" if i % 3 else " X",
                                     proponent_tail_patch=[0.1 * i, 0.2]))
       for i in range(6)]
  b = [viewer.normalize_record(_theirs(f"q{i}")) for i in range(3, 8)]
  return {"ours": a, "theirs": b}


def test_page_is_self_contained():
  page = viewer.render(_runs(), title="t")
  assert page.startswith("<!doctype html>")
  # Nothing fetched: no src/href to a host, no stylesheet or font links.
  assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
  assert not re.search(r"<link\b|@import|url\(\s*['\"]?(https?:)?//", page, re.I)
  assert not re.search(r"\bfetch\(|XMLHttpRequest|\.innerHTML\b", page)
  assert page.count('<script type="application/json"') == 1
  assert page.count("<svg") == 2  # retrieval and tail-patch figures
  assert "<?xml" not in page and "<!DOCTYPE svg" not in page


def test_page_payload_joins_runs_by_query_id():
  data = json.loads(_data_json(viewer.render(_runs())))
  assert data["methods"] == ["ours", "theirs"]
  assert [q["id"] for q in data["queries"]] == [f"q{i}" for i in range(8)]
  ours, theirs = data["runs"]
  assert ours[6] is None and theirs[0] is None
  assert theirs[3]["p"][0][:2] == ["s1", 0.7]
  assert theirs[3]["p"][0][3] == 1 and theirs[3]["p"][1][3] == 0  # proponent_correct
  assert ours[0]["p"][1][3] == 1  # d2 is in fact_doc_ids
  assert ours[2]["p"][0][4] == pytest.approx(0.2)  # tail-patch
  assert data["texts"][ours[0]["p"][0][2]] == "text one"
  # q6, q7 come from the authors' records only; query_set (one value) is no filter.
  assert data["facets"] == [{"field": "relation", "values": ["P17", "job", "pet"]}]
  # Query fields come from the first run holding the query.
  assert data["queries"][3]["prompt"] == "prompt of q3"
  assert data["queries"][7]["prompt"] == "Paris is in"


def test_each_runs_verdict_is_its_own():
  """A second run's own verdict (the authors' is_8b_correct, no prediction
  text) is shown in its column: before 2026-12-08 only a run whose prediction
  text differed from the first's kept its verdict."""
  rec = lambda run, qid, **kw: viewer.normalize_record(
      {"query_id": qid, "prompt": "p", "target": " France", "proponent_ids": [],
       "proponent_scores": [], **kw})
  runs = {"ours": [rec("ours", "q1", prediction=" France")],
          "theirs": [rec("theirs", "q1", is_8b_correct=False)],
          "again": [rec("again", "q1", prediction=" France")]}
  data = viewer.payload(runs, "t")
  assert data["queries"][0]["correct"] is True
  ours, theirs, again = (r[0] for r in data["runs"])
  assert theirs["correct"] is False and "pred" not in theirs
  assert "correct" not in ours and "correct" not in again  # (the query's)


def test_facets_keep_true_apart_from_1():
  """The page compares with ===: true and 1 are two values (before
  2026-12-05 a set merged them, and the filter for 1 missed the true row)."""
  recs = [viewer.normalize_record({"query_id": f"q{i}", "flag": v,
                                   "proponent_ids": [], "proponent_scores": []})
          for i, v in enumerate([1, True, 2, 1.0])]
  assert viewer.payload({"m": recs}, "t")["facets"] == [
      {"field": "flag", "values": [True, 1, 2]}]


def test_render_normalizes_records_as_written():
  """Records straight from ``tracer.pipeline.result_rows`` (not read back)
  get their right/wrong marks and the authors' names mapped."""
  raw = {"m": [_ours("q0", prediction=" T"), _ours("q1", prediction=" X")],
         "a": [_theirs("q0")]}
  data = json.loads(_data_json(viewer.render(raw)))
  assert [q.get("correct") for q in data["queries"]] == [True, False]
  assert data["runs"][1][0]["p"][0][3] == 1  # proponent_correct, unnormalized


def test_script_end_tag_in_text_cannot_break_out():
  evil = ("</script><script>alert(1)</script> <!-- & \u2028\u2029 "
          "</SCRIPT >")
  rec = viewer.normalize_record(_ours("q<1>", prompt=evil, proponents=[evil, "ok"]))
  page = viewer.render({"m<b>": [rec]}, title="</title><script>x</script>")
  raw = _data_json(page)
  for bad in ("<", ">", "&", "\u2028", "\u2029"):
    assert bad not in raw, bad
  # Only the page's own two script elements close.
  assert len(re.findall(r"</script", page, re.I)) == 2
  assert "<title>&lt;/title&gt;&lt;script&gt;x&lt;/script&gt;</title>" in page
  data = json.loads(raw)
  assert data["queries"][0]["prompt"] == evil
  assert data["texts"][0] == evil
  assert data["methods"] == ["m<b>"]


def test_nan_and_infinity_become_null(tmp_path):
  path = tmp_path / "r.jsonl"
  # Python's json writes NaN and Infinity; JSON.parse would reject them.
  path.write_text('{"query_id": "q", "proponent_ids": ["a", "b", "c"], '
                  '"proponent_scores": [NaN, Infinity, 1.5], '
                  '"proponent_tail_patch": [NaN, 2.0, null]}\n')
  page = viewer.render({"m": viewer.read_results(str(path))})
  raw = _data_json(page)
  assert "NaN" not in raw and "Infinity" not in raw
  def reject(name):
    raise AssertionError(f"{name} in the page's JSON")
  data = json.loads(raw, parse_constant=reject)
  p = data["runs"][0][0]["p"]
  assert [d[1] for d in p] == [None, None, 1.5]
  assert [d[4] for d in p] == [None, 2.0, None]


def test_lone_surrogate_in_text_still_writes(tmp_path):
  path = tmp_path / "r.jsonl"
  path.write_text('{"query_id": "q", "proponent_ids": ["a"], '
                  '"proponent_scores": [1], "proponents": ["bad \\ud800 x"]}\n')
  out = viewer.write_report(str(tmp_path / "page.html"),
                            {"m": viewer.read_results(str(path))})
  data = json.loads(_data_json(pathlib.Path(out).read_text(encoding="utf-8")))
  assert data["texts"] == ["bad \ud800 x"]


def test_lone_surrogates_in_names_and_title_still_write(tmp_path):
  """Bucket and run names reach matplotlib, the title the page's UTF-8: a
  lone surrogate (valid JSON) is drawn and written as U+FFFD."""
  rec = viewer.normalize_record(_ours("q", bucket="b\ud800"))
  out = viewer.write_report(str(tmp_path / "page.html"), {"m\udfff": [rec]},
                            title="t\ud800")
  page = pathlib.Path(out).read_text(encoding="utf-8")
  assert "<title>t\ufffd</title>" in page


def test_write_report_to_a_url():
  location = viewer.write_report("memory://viewer-test/page.html", _runs(), "t")
  assert location == "memory://viewer-test/page.html"
  assert storage.read_text(location).startswith("<!doctype html>")


def test_render_without_runs_is_an_error():
  with pytest.raises(InputError):
    viewer.render({})


# --- plots -------------------------------------------------------------------


def test_svg_is_deterministic_and_inlinable():
  stats = viewer.summary(_runs())
  one = plots.to_svg(plots.retrieval_figure(stats))
  two = plots.to_svg(plots.retrieval_figure(stats))
  assert one == two
  assert one.startswith("<svg") and one.endswith("</svg>")
  assert "<metadata" not in one


def test_write_pngs_only_what_has_data(tmp_path):
  runs = _runs()
  both = plots.write_pngs(viewer.summary(runs), str(tmp_path / "a"))
  assert [pathlib.Path(p).name for p in both] == ["retrieval.png", "tail_patch.png"]
  no_patch = {"m": [viewer.normalize_record(_ours("q", fact_doc_ids=["d1"]))]}
  one = plots.write_pngs(viewer.summary(no_patch), str(tmp_path / "b"))
  assert [pathlib.Path(p).name for p in one] == ["retrieval.png"]
  for p in both + one:
    assert pathlib.Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  nothing = {"m": [viewer.normalize_record(_ours("q"))]}
  assert plots.write_pngs(viewer.summary(nothing), str(tmp_path / "c")) == []


def test_plot_labels_are_literal():
  # "$...$" would be parsed as mathtext (an error when it does not parse).
  runs = {"cost $x^$": [viewer.normalize_record(_ours("q", fact_doc_ids=["d1"],
                                                      bucket="$\\frac{"))]}
  assert plots.to_svg(plots.retrieval_figure(viewer.summary(runs))).startswith("<svg")


def test_retrieval_figure_draws_at_most_max_plot_buckets():
  """1,000 buckets: the first 24 and "all", said on the axis (before
  2026-12-05 every one: 12 s and a 1.6 MB SVG of unreadable bars)."""
  runs = {"m": [viewer.normalize_record(_ours(f"q{i}", fact_doc_ids=["d1"],
                                              bucket=f"b{i:04d}"))
                for i in range(1000)]}
  fig = plots.retrieval_figure(viewer.summary(runs))
  for ax in fig.axes:
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["all", *(f"b{i:04d}" for i in range(24))], labels
    assert ax.get_xlabel() == "bucket (the first 24 of 1000, in order)"


# --- launch.view -------------------------------------------------------------


def test_run_names():
  assert launch_view.run_names(["x/r.jsonl", "y/r.jsonl", "gs://b/s.jsonl",
                                "z/r.jsonl"]) == ["r", "r-2", "s", "r-3"]
  assert launch_view.run_names(["x/r.jsonl", "y/r.jsonl"], ["a", "b"]) == ["a", "b"]
  with pytest.raises(InputError, match="2 names for 1"):
    launch_view.run_names(["r.jsonl"], ["a", "b"])
  # The server is a run too (before 2026-12-08: "2 names for 3 --results
  # files" of 2 files).
  with pytest.raises(InputError, match=re.escape(
      "--names: 2 names for 3 runs (2 --results files and --server); expected "
      "one name per run, the last the server's")):
    launch_view.run(["r.jsonl", "s.jsonl"], "out.html", ["a", "b"],
                    server="http://127.0.0.1:9", queries="q.jsonl")
  with pytest.raises(InputError, match="'a' given more than once"):
    launch_view.run_names(["r.jsonl", "s.jsonl"], ["a", "a"])


def _view(*args):
  return subprocess.run([sys.executable, "-m", "tracer.launch.view", *map(str, args)],
                        cwd=REPO, capture_output=True, text=True, timeout=120)


def test_view_writes_the_page(tmp_path):
  r1 = _write(tmp_path / "ours.jsonl", [_ours("q1"), _ours("q2")])
  r2 = _write(tmp_path / "theirs.jsonl", [_theirs("q2")])
  out = tmp_path / "out" / "report.html"
  proc = _view(f"--results={r1}", f"--results={r2}", f"--output={out}",
               "--title=my <title>")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == str(out)
  page = out.read_text(encoding="utf-8")
  assert "<title>my &lt;title&gt;</title>" in page
  assert json.loads(_data_json(page))["methods"] == ["ours", "theirs"]


def test_view_bad_results_is_one_error_line(tmp_path):
  bad = _write(tmp_path / "bad.jsonl", [_ours("q1"), "{not json"])
  proc = _view(f"--results={bad}", f"--output={tmp_path / 'r.html'}")
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: {bad}:2: not valid JSON"), \
      proc.stderr
  assert not (tmp_path / "r.html").exists()


def test_view_does_not_write_over_its_results(tmp_path):
  results = _write(tmp_path / "r.jsonl", [_ours("q1")])
  before = pathlib.Path(results).read_bytes()
  (tmp_path / "link.html").symlink_to(results)
  for output in (results, tmp_path / "link.html"):
    proc = _view(f"--results={results}", f"--output={output}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: --output={output}: is the --results "
                                   f"file {results}; expected another path (the "
                                   "page would replace it)")
  assert pathlib.Path(results).read_bytes() == before
  # Nor over the queries it would ask a server (before, replaced, status 0);
  # refused before any request.
  queries = tmp_path / "q.jsonl"
  queries.write_text('{"id": "q1", "prompt": "p", "target": "t"}\n')
  proc = _view("--server=http://127.0.0.1:9", f"--queries={queries}",
               f"--output={queries}")
  assert proc.returncode == 2
  assert proc.stderr.strip() == (f"error: --output={queries}: is the --queries "
                                 f"file {queries}; expected another path (the "
                                 "page would replace it)")
  assert queries.read_text() == '{"id": "q1", "prompt": "p", "target": "t"}\n'


def test_view_needs_results_and_output(tmp_path):
  proc = _view(f"--output={tmp_path / 'r.html'}")
  assert proc.returncode == 2
  assert proc.stderr.strip() == "error: --results required"


def test_normalizing_twice_changes_nothing():
  for rec in (_ours("q", proponents=None, prediction=" T",
                    proponent_tail_patch=[None, 1.0]), _theirs("t"),
              # Ours null, theirs given: theirs is taken, on the first pass.
              {**_theirs("n", c4_frequency_bucket=3), "bucket": None,
               "prompt": None}):
    once = viewer.normalize_record(rec)
    twice = viewer.normalize_record(once)
    assert json.dumps(once, sort_keys=True) == json.dumps(twice, sort_keys=True)
