"""Tests for tracer.evaluate and launch.evaluate."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from tracer.launch import evaluate as launch_evaluate
from tracer import evaluate
from tracer.errors import InputError

REPO = pathlib.Path(__file__).resolve().parents[1]


def _q(qid, facts, bucket=None):
  q = {"id": qid, "prompt": f"p {qid}", "target": f"t {qid}",
       "fact_doc_ids": facts}
  if bucket is not None:
    q["bucket"] = bucket
  return q


def _r(qid, ids, scores=None):
  scores = list(range(len(ids), 0, -1)) if scores is None else scores
  return {"query_id": qid, "proponent_ids": ids, "proponent_scores": scores}


def _write_lines(path, lines):
  path.write_text("".join(l + "\n" for l in lines), encoding="utf-8")
  return path


# --- metrics ---------------------------------------------------------------


def test_reports_are_strict_json():
  """quality.json, the family's and sweep's tables and tracer evaluate's
  metrics (``evaluate.json_text``): a NaN (the standard error of one query,
  a mean of none) or an infinity is written null (before 2026-12-08 "NaN",
  which JSON.parse and jq refuse)."""
  value = {"a": float("nan"), "b": [1.0, float("inf"), (np.float64("-inf"), 2)],
           "c": {"d": 0.5, "e": None, "f": "x"}}
  text = evaluate.json_text(value)
  assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {
      "a": None, "b": [1.0, None, [None, 2]], "c": {"d": 0.5, "e": None, "f": "x"}}


def test_first_relevant_at_rank_three():
  m = evaluate.retrieval_metrics(
      [_q("a", ["d3"])], {"a": _r("a", ["d1", "d2", "d3", "d4"])})
  assert m["mrr"] == pytest.approx(1 / 3)
  assert m["recall@10"] == 1.0
  assert m["precision@10"] == pytest.approx(0.1)
  assert (m["num_queries"], m["missing"], m["no_ground_truth"]) == (1, 0, 0)


def test_a_query_that_failed_is_counted_as_an_error():
  # Its line has an error and no proponents: scored 0 as before, and now
  # counted (it read as a retrieval that found nothing).
  failed = {**_r("b", []), "error": "non-finite loss"}
  m = evaluate.retrieval_metrics(
      [_q("a", ["d1"]), _q("b", ["d2"], bucket="x")],
      {"a": _r("a", ["d1"]), "b": failed})
  assert (m["mrr"], m["num_queries"], m["missing"], m["errors"]) == (0.5, 2, 0, 1)
  assert m["buckets"]["x"]["errors"] == 1


def test_mrr_uses_full_list_but_recall_cuts_at_k():
  ids = [f"x{i}" for i in range(11)] + ["hit"]  # relevant at rank 12
  m = evaluate.retrieval_metrics([_q("a", ["hit"])], {"a": _r("a", ids)})
  assert m["mrr"] == pytest.approx(1 / 12)
  assert m["recall@10"] == 0.0
  assert m["precision@10"] == 0.0


def test_precision_counts_every_relevant_in_top_k():
  ids = ["r1", "x", "r2", "x2", "r3"]
  m = evaluate.retrieval_metrics([_q("a", ["r1", "r2", "r3", "r4"])],
                                 {"a": _r("a", ids)}, k=3)
  assert m["mrr"] == 1.0
  assert m["recall@3"] == 1.0
  assert m["precision@3"] == pytest.approx(2 / 3)
  assert "recall@10" not in m


def test_an_id_listed_twice_counts_once_at_its_best_rank():
  # The windows of a document read with overflow='split' share its id.
  m = evaluate.retrieval_metrics([_q("a", ["d1"])], {"a": _r("a", ["d1"] * 10)})
  assert (m["mrr"], m["recall@10"], m["precision@10"]) == (1.0, 1.0, 0.1)
  m = evaluate.retrieval_metrics(
      [_q("a", ["hit"])], {"a": _r("a", ["x", "x", "x", "y", "hit", "hit"])})
  assert m["mrr"] == pytest.approx(1 / 3)
  assert m["precision@10"] == pytest.approx(0.1)


def test_ties_follow_file_order():
  # Equal scores: the producer's order is the ranking, not the ids.
  queries = [_q("a", ["b"])]
  m1 = evaluate.retrieval_metrics(
      queries, {"a": _r("a", ["a", "b"], [1.0, 1.0])})
  m2 = evaluate.retrieval_metrics(
      queries, {"a": _r("a", ["b", "a"], [1.0, 1.0])})
  assert m1["mrr"] == 0.5
  assert m2["mrr"] == 1.0


def test_missing_query_counts_as_zero():
  queries = [_q("a", ["d1"]), _q("b", ["d2"])]
  m = evaluate.retrieval_metrics(queries, {"a": _r("a", ["d1"])})
  assert m["mrr"] == 0.5
  assert m["recall@10"] == 0.5
  assert m["precision@10"] == pytest.approx(0.05)
  assert (m["num_queries"], m["missing"]) == (2, 1)


def test_empty_ground_truth_is_excluded():
  queries = [_q("a", ["d1"]), _q("b", [])]
  results = {"a": _r("a", ["d1"]), "b": _r("b", ["d1"])}
  m = evaluate.retrieval_metrics(queries, results)
  assert m["mrr"] == 1.0
  assert (m["num_queries"], m["no_ground_truth"]) == (1, 1)


def test_no_scorable_queries_gives_none():
  m = evaluate.retrieval_metrics([_q("a", [])], {})
  assert m["mrr"] is None and m["recall@10"] is None
  assert m["num_queries"] == 0
  json.dumps(m, allow_nan=False)  # valid strict JSON


def test_results_for_unknown_queries_are_ignored():
  m = evaluate.retrieval_metrics([_q("a", ["d"])],
                                 {"a": _r("a", ["d"]), "zzz": _r("zzz", [])})
  assert m["mrr"] == 1.0 and m["num_queries"] == 1


def test_per_bucket_split():
  queries = [
      _q("a", ["d1"], "1"), _q("b", ["d2"], "11+"), _q("c", ["d3"], "2-3"),
      _q("d", ["d4"], "1"), _q("e", [], "4-10"), _q("f", ["d6"]),
  ]
  results = {
      "a": _r("a", ["d1"]),            # rr 1
      "b": _r("b", ["x", "d2"]),       # rr 1/2
      "c": _r("c", ["x", "y", "z"]),   # rr 0
      # d missing
      "f": _r("f", ["x", "y", "d6"]),  # rr 1/3, no bucket
  }
  m = evaluate.retrieval_metrics(queries, results)
  assert list(m["buckets"]) == ["1", "2-3", "4-10", "11+"]
  b = m["buckets"]
  assert b["1"]["mrr"] == 0.5 and b["1"]["missing"] == 1
  assert b["1"]["num_queries"] == 2
  assert b["2-3"]["mrr"] == 0.0
  assert b["4-10"]["num_queries"] == 0 and b["4-10"]["mrr"] is None
  assert b["4-10"]["no_ground_truth"] == 1
  assert b["11+"]["mrr"] == 0.5 and b["11+"]["recall@10"] == 1.0
  assert "buckets" not in b["1"]
  assert m["num_queries"] == 5
  assert m["mrr"] == pytest.approx((1 + 0.5 + 0 + 0 + 1 / 3) / 5)


def test_query_without_fact_doc_ids_is_an_error():
  with pytest.raises(InputError, match="fact_doc_ids"):
    evaluate.retrieval_metrics([{"id": "a"}], {})


# --- results I/O ----------------------------------------------------------


def test_make_write_read_round_trip(tmp_path):
  query = _q("q1", ["d2"], "1")
  query["extra"] = {"nested": 1}
  row = evaluate.make_result_row(
      query, np.array(["d2", "d1"]), np.array([2.5, 1.0], np.float32),
      ["two", "one"], ["d9"], [np.float32(-3)], ["nine"])
  assert list(row)[:3] == ["query_id", "prompt", "target"]
  assert "id" not in row and row["query_id"] == "q1"
  assert row["bucket"] == "1" and row["extra"] == {"nested": 1}
  assert row["proponent_scores"] == [2.5, 1.0]
  assert all(type(s) is float for s in row["opponent_scores"])
  path = tmp_path / "sub" / "r.jsonl"
  evaluate.write_results(path, [row])
  assert os.listdir(path.parent) == ["r.jsonl"]  # no temporary left behind
  back = evaluate.read_results(path)
  assert back == {"q1": row}


def test_make_result_row_checks_lengths_and_reserved_fields():
  with pytest.raises(ValueError, match="differ in length"):
    evaluate.make_result_row(_q("a", []), ["d1"], [1.0, 2.0], ["t"])
  with pytest.raises(ValueError, match="reserved"):
    evaluate.make_result_row({"id": "a", "proponent_ids": []}, [], [], [])


def test_write_results_replaces_atomically(tmp_path):
  path = tmp_path / "r.jsonl"
  evaluate.write_results(path, [_r("a", ["d"])])
  evaluate.write_results(path, [_r("b", ["d"])])
  assert list(evaluate.read_results(path)) == ["b"]
  assert os.listdir(tmp_path) == ["r.jsonl"]


def test_read_results_skips_blank_lines(tmp_path):
  path = _write_lines(tmp_path / "r.jsonl",
                      [json.dumps(_r("a", ["d"])), "", json.dumps(_r("b", []))])
  assert list(evaluate.read_results(path)) == ["a", "b"]


@pytest.mark.parametrize("bad_line, pattern", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"proponent_ids": [], "proponent_scores": []}', "'query_id'"),
    ('{"query_id": "b", "proponent_scores": []}', "'proponent_ids'"),
    ('{"query_id": "b", "proponent_ids": []}', "'proponent_scores'"),
    ('{"query_id": "b", "proponent_ids": ["x"], "proponent_scores": [1, 2]}',
     "'proponent_scores' has 2 entries but 'proponent_ids' has 1"),
    ('{"query_id": "b", "proponent_ids": ["x"], "proponent_scores": [1],'
     ' "proponents": []}', "'proponents' has 0"),
    ('{"query_id": "b", "proponent_ids": [1], "proponent_scores": [1]}',
     "'proponent_ids' must be a list of strings"),
    ('{"query_id": "b", "proponent_ids": ["x"], "proponent_scores": ["1"]}',
     "'proponent_scores' must be a list of numbers"),
    ('{"query_id": "b", "proponent_ids": [], "proponent_scores": [],'
     ' "opponent_ids": ["x"]}', "missing field 'opponent_scores'"),
    ('{"query_id": "b", "proponent_ids": [], "proponent_scores": [],'
     ' "opponent_ids": ["x"], "opponent_scores": []}',
     "'opponent_scores' has 0 entries"),
    ('{"query_id": 7, "proponent_ids": [], "proponent_scores": []}',
     "'query_id' must be a non-empty string"),
    ('{"query_id": "a", "proponent_ids": [], "proponent_scores": []}',
     "duplicate query_id 'a' \\(first at line 1\\)"),
])
def test_read_results_errors_name_file_line_and_field(tmp_path, bad_line,
                                                      pattern):
  path = _write_lines(tmp_path / "r.jsonl",
                      [json.dumps(_r("a", ["d"])), bad_line])
  with pytest.raises(InputError, match=pattern) as e:
    evaluate.read_results(path)
  assert str(e.value).startswith(f"{path}:2: ")


def test_read_results_missing_file(tmp_path):
  with pytest.raises(InputError, match="no such file"):
    evaluate.read_results(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("bad_line, pattern", [
    ("{oops", "not valid JSON"),
    ('{"id": "d2"}', "missing field 'text'"),
    ('{"id": "d2", "text": "  "}', "field 'text' is empty"),
    ('{"id": "d2", "text": 3}', "field 'text' must be a string"),
    ('{"id": "", "text": "x"}', "field 'id' is empty"),
    ('{"id": "d1", "text": "x"}', "duplicate id 'd1' \\(first at line 1\\)"),
])
def test_read_jsonl_records_errors(tmp_path, bad_line, pattern):
  path = _write_lines(tmp_path / "c.jsonl",
                      ['{"id": "d1", "text": "hello"}', bad_line])
  with pytest.raises(InputError, match=pattern) as e:
    evaluate.read_jsonl_records(path)
  assert str(e.value).startswith(f"{path}:2: ")


def test_read_jsonl_records_checks_query_fields(tmp_path):
  path = _write_lines(tmp_path / "q.jsonl", [
      json.dumps(_q("a", ["d"], "1")),
      '{"id": "b", "prompt": "p", "target": "t", "fact_doc_ids": "d"}'])
  with pytest.raises(InputError, match=f"{path}:2: field 'fact_doc_ids'"):
    evaluate.read_jsonl_records(path, required=("id", "prompt", "target"))


def test_format_table():
  table = evaluate.format_table(
      {"bm25": {"mrr": 0.5, "num_queries": 3}, "x|y": {"mrr": None}},
      ["mrr", "num_queries"])
  assert table.splitlines() == [
      "| method | mrr | num_queries |",
      "|---|---:|---:|",
      "| bm25 | 0.5000 | 3 |",
      "| x\\|y | – |  |",
  ]


# --- launch/evaluate ------------------------------------------------------


def _fixture_files(tmp_path):
  queries = _write_lines(tmp_path / "queries.jsonl", [
      json.dumps(_q("a", ["d1"], "1")), json.dumps(_q("b", ["d2"], "2-3"))])
  good = tmp_path / "good.jsonl"
  evaluate.write_results(good, [_r("a", ["d1"]), _r("b", ["x", "d2"])])
  bad = tmp_path / "bad.jsonl"
  evaluate.write_results(bad, [_r("a", ["x"])])
  return queries, good, bad


def test_launch_run_merges_existing_output(tmp_path):
  queries, good, bad = _fixture_files(tmp_path)
  out = tmp_path / "m.json"
  out.write_text(json.dumps({"good": {"tail_patch@1": 0.25, "mrr": -1},
                             "other": {"tail_patch@1": 0.1}}))
  metrics = launch_evaluate.run(queries, [good, bad], out)
  assert set(metrics) == {"good", "bad"}
  saved = json.loads(out.read_text())
  assert saved["other"] == {"tail_patch@1": 0.1}
  assert saved["good"]["tail_patch@1"] == 0.25
  assert saved["good"]["mrr"] == 0.75  # recomputed value wins
  assert saved["bad"]["missing"] == 1
  text = launch_evaluate.tables(metrics)
  assert "| good | 0.7500 | 1.0000 | 0.1000 | 2 | 0 |" in text
  # At another k, the old cut-off's figures go (they were of other results)
  # and the tail-patch figure stays.
  launch_evaluate.run(queries, [good], out, k=5)
  saved = json.loads(out.read_text())["good"]
  assert "recall@5" in saved and "recall@10" not in saved and "precision@10" not in saved
  assert saved["tail_patch@1"] == 0.25
  assert text.index("Overall") < text.index("Bucket 1") < text.index(
      "Bucket 2-3")


def test_launch_run_refuses_results_of_other_queries(tmp_path, capsys):
  # Before 2026-12-05, each scored 0 with every query counted as missing.
  queries, good, _ = _fixture_files(tmp_path)
  other = tmp_path / "other.jsonl"
  evaluate.write_results(other, [_r("q7", ["d1"]), _r("q8", ["d2"])])
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  out = tmp_path / "m.json"
  with pytest.raises(InputError, match=re.escape(
      f"{other}: none of its 2 rows is of a query in {queries} (query_id 'q7'; "
      f"its ids are such as 'a'); expected the results of the queries in {queries}")):
    launch_evaluate.run(queries, [good, other], out)
  with pytest.raises(InputError, match=re.escape(f"{empty}: no results; expected")):
    launch_evaluate.run(queries, [empty], out)
  assert not out.exists()
  # A cut-off past every list is said (the lists hold 1 and 2 ids).
  capsys.readouterr()
  launch_evaluate.run(queries, [good], k=3)
  assert capsys.readouterr().err == (
      f"warning: {good}: --k=3 is past its longest proponent list (2 documents), "
      "so recall@3 counts only those listed and precision@3 divides by 3\n")
  launch_evaluate.run(queries, [good], k=2)
  assert capsys.readouterr().err == ""


def test_launch_run_rejects_bad_existing_output(tmp_path):
  queries, good, _ = _fixture_files(tmp_path)
  out = tmp_path / "m.json"
  out.write_text("{\n broken")
  with pytest.raises(InputError, match=f"{out}:2"):
    launch_evaluate.run(queries, [good], out)


def test_launch_evaluate_subprocess(tmp_path):
  queries, good, bad = _fixture_files(tmp_path)
  out = tmp_path / "m.json"
  proc = subprocess.run(
      [sys.executable, "-m", "tracer.launch.evaluate", f"--queries={queries}",
       f"--results={good}", f"--results={bad}", f"--output={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  assert "| bad | 0.0000 | 0.0000 | 0.0000 | 2 | 1 |" in proc.stdout
  assert set(json.loads(out.read_text())) == {"good", "bad"}
  # An --output that is an input is refused before anything is written
  # (before 2026-12-05 the metrics replaced the second results file).
  before = bad.read_bytes()
  proc = subprocess.run(
      [sys.executable, "-m", "tracer.launch.evaluate", f"--queries={queries}",
       f"--results={good}", f"--results={bad}", f"--output={bad}"],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr == (f"error: --output={bad}: is the --results file; "
                         "expected another path (the output would replace it)\n")
  assert bad.read_bytes() == before
