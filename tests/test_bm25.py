"""Tests for tracer.bm25 and launch.bm25."""

from __future__ import annotations

import gzip
import json
import re
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tracer.launch import bm25 as launch_bm25
from tracer import bm25
from tracer import corpus as corpus_lib
from tracer import evaluate
from tracer.config import DataConfig
from tracer.errors import InputError

REPO = pathlib.Path(__file__).resolve().parents[1]

CORPUS = [
    "The cat sat on the mat.",
    "Zorblat Quenwick was born in Fiddlestown.",
    "Paris is the capital of France.",
    "A dog chased the cat around the garden.",
    "Fiddlestown is a small village by the river.",
    "Nothing relevant here at all.",
]


def test_tokenize():
  assert bm25.tokenize("Hello, WORLD! it's 42") == [
      "hello", "world", "it", "s", "42"]
  # One spelling of a word, however its letters are encoded (before
  # 2026-12-07 "Cafe\u0301" was the word "cafe", and missed "café").
  assert bm25.tokenize("Cafe\u0301 ZOE\u0308 \ufb01le Straße q\u0307x") == [
      "café", "zoë", "file", "strasse", "q\u0307x"]


def test_exact_match_is_rank_one():
  queries = ["Zorblat Quenwick was born in Fiddlestown",
             "Paris is the capital of France"]
  idx, scores = bm25.bm25_topk(CORPUS, queries, 3)
  assert idx.shape == (2, 3) and scores.shape == (2, 3)
  assert scores.dtype == np.float32
  assert idx[0, 0] == 1 and idx[1, 0] == 2
  # The first query shares words with two documents only: two proponents.
  assert idx[0].tolist()[1:] == [4, -1] and np.isnan(scores[0, 2])
  assert np.all(np.diff(scores[1]) <= 0)
  assert scores[0, 0] > scores[0, 1]


def test_ties_go_to_lower_index():
  corpus = ["alpha beta", "gamma", "alpha beta", "alpha beta", "delta"]
  idx, scores = bm25.bm25_topk(corpus, ["alpha"], 2)
  assert idx.tolist() == [[0, 2]]
  assert scores[0, 0] == scores[0, 1]
  # Zero scores tie too: the lowest ones, lowest index first.
  low, low_scores = bm25.bm25_bottomk(corpus, ["alpha"], 3)
  assert low.tolist() == [[1, 4, 0]]
  assert low_scores[0].tolist()[:2] == [0.0, 0.0]


def test_k_capped_and_empty_query():
  idx, scores = bm25.bm25_topk(CORPUS, ["!!!", "unseenword"], 100)
  assert idx.shape == (2, len(CORPUS))
  assert (idx == -1).all() and np.isnan(scores).all()


def test_only_matching_documents_are_proponents():
  """Before 2026-12-04 a query matching one document got k proponents, the
  rest the first corpus documents sharing no word with it (score 0), so a
  fact document early in the corpus was credited to BM25 by its position."""
  idx, scores = bm25.bm25_topk(CORPUS, ["Paris"], 3)
  assert idx.tolist() == [[2, -1, -1]]
  assert scores[0, 0] > 0 and np.isnan(scores[0, 1:]).all()
  low, _ = bm25.bm25_bottomk(CORPUS, ["Paris"], 2)  # opponents: every document
  assert low.tolist() == [[0, 1]]


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def _files(tmp_path):
  corpus = _write(tmp_path / "corpus.jsonl",
                  [{"id": f"doc{i}", "text": t} for i, t in enumerate(CORPUS)])
  queries = _write(tmp_path / "queries.jsonl", [
      {"id": "q0", "prompt": "Zorblat Quenwick was born in",
       "target": "Fiddlestown", "fact_doc_ids": ["doc1"], "bucket": "1"},
      {"id": "q1", "prompt": "The capital of France is", "target": "Paris",
       "fact_doc_ids": ["doc2"], "bucket": "2-3"},
  ])
  return corpus, queries


def test_launch_run_writes_results(tmp_path):
  corpus, queries = _files(tmp_path)
  out = tmp_path / "bm25.jsonl"
  assert launch_bm25.run(corpus, queries, out, top_k=2, num_opponents=1) == 2
  rows = evaluate.read_results(out)
  r = rows["q0"]
  assert r["proponent_ids"][0] == "doc1"
  assert r["proponents"][0] == CORPUS[1]
  assert len(r["proponent_ids"]) == 2 and len(r["opponent_ids"]) == 1
  # A query matching one document lists one proponent, not top_k.
  one = launch_bm25.run(corpus, _write(tmp_path / "one.jsonl", [
      {"id": "q", "prompt": "Zorblat", "target": "x"}]), tmp_path / "one_out.jsonl",
      top_k=3)
  assert one == 1
  only = evaluate.read_results(tmp_path / "one_out.jsonl")["q"]
  assert only["proponent_ids"] == ["doc1"] and len(only["proponent_scores"]) == 1
  assert r["opponent_scores"][0] <= r["proponent_scores"][-1]
  assert r["bucket"] == "1" and r["fact_doc_ids"] == ["doc1"]
  m = evaluate.retrieval_metrics(
      evaluate.read_jsonl_records(queries, ("id", "fact_doc_ids")), rows)
  assert m["mrr"] == 1.0
  # Past the corpus (6 documents), every proponent would also be listed as
  # an opponent: refused, as tracer trace refuses it, before any scoring.
  for kwargs, message in [({"top_k": 7}, "--top_k=7: more than the corpus's 6 "
                           "rows; expected 1..6"),
                          ({"top_k": 2, "num_opponents": 9}, "--num_opponents=9: "
                           "more than the corpus's 6 rows; expected 0..6")]:
    with pytest.raises(InputError, match=re.escape(message)):
      launch_bm25.run(corpus, queries, tmp_path / "past.jsonl", **kwargs)
  assert not (tmp_path / "past.jsonl").exists()


def test_launch_run_reads_a_glob_of_gzip_shards_without_ids(tmp_path):
  """C4's layout: gzip shards of {"text", "url"} lines; ids are positions.
  And FineWeb's: Parquet shards."""
  _, queries = _files(tmp_path)
  for half in range(2):
    lines = [{"text": t, "url": "u"} for t in CORPUS[half * 3:half * 3 + 3]]
    (tmp_path / f"c4-{half}.json.gz").write_bytes(gzip.compress(
        "".join(json.dumps(r) + "\n" for r in lines).encode()))
  out = tmp_path / "bm25.jsonl"
  launch_bm25.run(str(tmp_path / "c4-*.json.gz"), queries, out, top_k=1)
  assert evaluate.read_results(out)["q0"]["proponent_ids"] == ["c4-0.json.gz:2"]
  # FineWeb's layout: Parquet shards (id and text columns, more beside).
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  for half in range(2):
    pq.write_table(pa.table({"text": CORPUS[half * 3:half * 3 + 3],
                             "id": [f"<urn:{half}:{i}>" for i in range(3)],
                             "dump": ["CC-MAIN"] * 3}),
                   tmp_path / f"00{half}_00000.parquet")
  launch_bm25.run(str(tmp_path / "*.parquet"), queries, out, top_k=1)
  assert evaluate.read_results(out)["q0"]["proponent_ids"] == ["<urn:0:1>"]
  dup = tmp_path / "dup"
  dup.mkdir()
  for name in ("a.jsonl", "b.jsonl"):
    _write(dup / name, [{"id": "same", "text": "x"}])
  with pytest.raises(InputError, match=re.escape(
      f"dup/*.jsonl: duplicate id 'same' ({dup}/a.jsonl:1 and {dup}/b.jsonl:1)")):
    launch_bm25.run(str(dup / "*.jsonl"), queries, out)
  # No word in any document: every score 0, so no proponent, and opponents
  # in corpus order (before 2026-12-04 bm25s raised "max() arg is an empty
  # sequence").
  marks = tmp_path / "marks.jsonl"
  _write(marks, [{"id": "p", "text": "!!!"}, {"id": "q", "text": "..."}])
  launch_bm25.run(str(marks), queries, out, top_k=2)
  row = evaluate.read_results(out)["q0"]
  assert row["proponent_ids"] == [] and row["proponent_scores"] == []
  assert row["opponent_ids"] == ["p", "q"] and row["opponent_scores"] == [0.0, 0.0]


def test_launch_run_reads_the_authors_prompt_sets(tmp_path):
  """``--queries`` in the TrackStar authors' T-REx format (fact_id, prompt0,
  entity1), as ``tracer trace`` reads it."""
  corpus, _ = _files(tmp_path)
  theirs = tmp_path / "trex.jsonl"
  theirs.write_text(json.dumps({"fact_id": "f-1", "prompt0": "Ada Lovelace was born",
                                "entity1": "in London", "relation": "born"}) + "\n")
  launch_bm25.run(corpus, theirs, tmp_path / "out.jsonl", top_k=1)
  row = evaluate.read_results(tmp_path / "out.jsonl")["f-1"]
  assert row["prompt"] == "Ada Lovelace was born" and row["relation"] == "born"
  assert len(row["proponent_ids"]) == 1


def test_launch_run_on_a_tokenized_corpus(tmp_path):
  corpus, queries = _files(tmp_path)
  tokenized = str(tmp_path / "tokenized")
  corpus_lib.tokenize(str(corpus), tokenized, DataConfig(), 256)
  launch_bm25.run(corpus, queries, tmp_path / "a.jsonl", top_k=2)
  launch_bm25.run(tokenized, queries, tmp_path / "b.jsonl", top_k=2)
  assert evaluate.read_results(tmp_path / "a.jsonl") == evaluate.read_results(
      tmp_path / "b.jsonl")


def test_launch_bm25_subprocess(tmp_path):
  corpus, queries = _files(tmp_path)
  out = tmp_path / "bm25.jsonl"
  proc = subprocess.run(
      [sys.executable, "-m", "tracer.launch.bm25", f"--corpus={corpus}",
       f"--queries={queries}", f"--output={out}", "--top_k=3"],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  rows = evaluate.read_results(out)
  assert [len(r["opponent_ids"]) for r in rows.values()] == [3, 3]
  # An --output that is an input is refused before the corpus is read
  # (before 2026-12-05 the results replaced the queries).
  before = pathlib.Path(queries).read_bytes()
  proc = subprocess.run(
      [sys.executable, "-m", "tracer.launch.bm25", f"--corpus={corpus}",
       f"--queries={queries}", f"--output={queries}"],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr == (f"error: --output={queries}: is the --queries file; "
                         "expected another path (the output would replace it)\n")
  assert pathlib.Path(queries).read_bytes() == before
