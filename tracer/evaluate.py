"""Retrieval metrics for fact tracing, and the results file format.

A results file is JSONL with one line per query, in the field names of the
TrackStar authors' released retrieval files::

  {"query_id": ..., "prompt": ..., "target": ..., <query extra fields>,
   "example_id": ..., "inputs_plaintext": ..., "targets_plaintext": ...,
   "proponent_ids": [...], "proponent_scores": [...], "proponents": [...],
   "opponent_ids": [...], "opponent_scores": [...], "opponents": [...],
   "proponent_correct": [...], "opponent_correct": [...],      # fact_doc_ids
   "prediction": ..., "temperature_samples": [...],            # predicted
   "prediction_probability": ..., "target_probability": ...,
   "model_confidence": ...}

Their viewer (PAIR-code/pretraining-tda, ``demo/``) reads the query as
``example_id`` / ``inputs_plaintext`` / ``targets_plaintext``, so every line
carries those beside our ``query_id`` / ``prompt`` / ``target`` (same values).
It marks proponents right or wrong from ``proponent_correct``, written (with
``opponent_correct``) when the query has non-empty ``fact_doc_ids``; shows
``model_confidence`` beside the target (ours: ``target_probability``) and
``temperature_samples`` as decoder samples (ours: ``prediction``, the greedy
completion, with ``prediction_probability``). It shows no opponents.

Proponents are listed best first and the file order *is* the ranking: whoever
writes the file breaks score ties, the metrics never re-sort.

Metric decisions (see ``retrieval_metrics``):

* MRR is 1/rank of the first relevant proponent over the whole retrieved list
  in the file (not cut at k), 0 if none is relevant.
* recall@k is the paper's: the fraction of queries with at least one relevant
  proponent in the top k. precision@k is (relevant among the top k) / k, with
  k as the denominator even when fewer than k were retrieved.
* An id listed more than once (the windows of one document, read with
  ``overflow='split'``, share its id) counts once, at its best rank: metrics
  are over documents. (Before 2026-12-04 each listing counted: a document
  listed 10 times scored precision@10 = 1.)
* A query with no line in the results scores 0 on every metric and is counted
  in ``missing``; one whose line has an ``error`` (its own loss or gradient
  was not finite: no proponents) scores what it lists, 0, and is counted in
  ``errors``.
* A file that lists more than k rows per query can reach past row k for its
  k distinct documents (windows of one document share an id), and MRR reads
  the whole list: compare methods on files of one length.
* A query with an empty ``fact_doc_ids`` has no right answer: it is left out
  of every average and counted in ``no_ground_truth``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from tracer import crashpoints
from tracer import data
from tracer import storage
from tracer.errors import InputError, at

RESULT_FIELDS = ("proponent_ids", "proponent_scores", "proponents",
                 "opponent_ids", "opponent_scores", "opponents")

# ---------------------------------------------------------------------------
# Reading and writing JSONL.


def _check_string_list(path, lineno, obj, field) -> None:
  value = obj[field]
  if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
    raise InputError(f"{at(path, lineno)}: field {field!r} must be a list of "
                     "strings")


def _check_number_list(path, lineno, obj, field) -> None:
  value = obj[field]
  # bool is an int subclass; a true/false score is a producer bug.
  if not isinstance(value, list) or not all(
      isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
    raise InputError(f"{at(path, lineno)}: field {field!r} must be a list of "
                     "numbers")


def read_jsonl_records(path, required: Sequence[str] = ("id", "text")
                       ) -> list[dict[str, Any]]:
  """Corpus or query lines, strictly (``tracer.data.read_records``): the
  ``required`` fields present, ``id``/``text``/``target`` among them non-empty.
  """
  nonempty = [f for f in ("id", "text", "target") if f in required]
  return [r for _, r in data.read_records(path, required, nonempty)]


def read_ground_truth(path) -> list[dict[str, Any]]:
  """Queries for the metrics: every line has ``id`` and ``fact_doc_ids`` (a
  list of strings), in tracer's format or the TrackStar authors' (a prompt
  set, or their results file with ``fact_doc_ids`` added: it serves as
  queries and results at once; ``data.from_authors``), one format per file.
  """
  return [r for _, r in data.read_records(path, ("id", "fact_doc_ids"), ("id",),
                                          convert=data.QueryFormat())]


def read_results(path) -> dict[str, dict[str, Any]]:
  """Reads a results JSONL file into ``{query_id: row}``, in file order.

  Checks that ``query_id`` (a non-empty string), ``proponent_ids`` (strings)
  and ``proponent_scores`` (numbers) are present with equal lengths, that the
  optional ``proponents`` / ``opponent_*`` lists agree in length, and that no
  query id repeats. Errors raise ``InputError`` naming file, line and field.
  A line of the TrackStar authors' results has no ``query_id``: its id is
  taken as their queries' is (``data.authors_id``: ``example_id``, ...).
  """
  rows: dict[str, dict[str, Any]] = {}
  lines: dict[str, int] = {}
  for lineno, obj in data.iter_jsonl(path):
    if "query_id" not in obj and any(f in obj for f in data.AUTHORS_QUERY_FIELDS["id"]):
      obj = {**obj, "query_id": data.authors_id(at(path, lineno), obj)}
    for field in ("query_id", "proponent_ids", "proponent_scores"):
      if field not in obj:
        raise InputError(f"{at(path, lineno)}: missing field {field!r}")
    qid = obj["query_id"]
    if not isinstance(qid, str) or not qid:
      raise InputError(f"{at(path, lineno)}: field 'query_id' must be a "
                       "non-empty string")
    if qid in rows:
      raise InputError(f"{at(path, lineno)}: duplicate query_id {qid!r} "
                       f"(first at line {lines[qid]})")
    for side in ("proponent", "opponent"):
      ids_field, scores_field = f"{side}_ids", f"{side}_scores"
      texts_field = f"{side}s"
      if ids_field not in obj and scores_field not in obj:
        continue  # Opponents are optional.
      for field, other in ((ids_field, scores_field),
                           (scores_field, ids_field)):
        if field not in obj:
          raise InputError(f"{at(path, lineno)}: missing field {field!r} "
                           f"(the line has {other!r})")
      _check_string_list(path, lineno, obj, ids_field)
      _check_number_list(path, lineno, obj, scores_field)
      n = len(obj[ids_field])
      if len(obj[scores_field]) != n:
        raise InputError(
            f"{at(path, lineno)}: field {scores_field!r} has "
            f"{len(obj[scores_field])} entries but {ids_field!r} has {n}")
      if texts_field in obj:
        _check_string_list(path, lineno, obj, texts_field)
        if len(obj[texts_field]) != n:
          raise InputError(
              f"{at(path, lineno)}: field {texts_field!r} has "
              f"{len(obj[texts_field])} entries but {ids_field!r} has {n}")
    rows[qid] = obj
    lines[qid] = lineno
  return rows


def _to_json(value):
  """json.dump fallback for numpy scalars and arrays."""
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_text_atomic(path, text: str) -> None:
  """Writes ``text`` to ``path`` (a local path or ``tracer.storage`` URL) so
  readers see the old file or the new one, never part of one."""
  storage.write_text(os.fspath(path), text)


def json_text(value: Any, indent: int | None = 2) -> str:
  """``value`` as strict JSON: a float that is not finite (a mean of no
  values, a standard error of one) written null, as NaN is not JSON and
  JSON.parse or jq refuse a file holding it."""
  def strict(v):
    if isinstance(v, float) and not math.isfinite(v):
      return None
    if isinstance(v, Mapping):
      return {k: strict(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
      return [strict(x) for x in v]
    return v
  return json.dumps(strict(value), indent=indent, allow_nan=False)


def write_results(path, rows: Iterable[Mapping[str, Any]]) -> None:
  """Writes result rows as JSONL atomically (tmp file + os.replace)."""
  text = "".join(
      json.dumps(row, ensure_ascii=False, default=_to_json) + "\n"
      for row in rows)
  crashpoints.point("results.write")
  write_text_atomic(path, text)


def make_result_row(query: Mapping[str, Any],
                    proponent_ids: Sequence[str],
                    proponent_scores: Sequence[float],
                    proponent_texts: Sequence[str],
                    opponent_ids: Sequence[str] = (),
                    opponent_scores: Sequence[float] = (),
                    opponent_texts: Sequence[str] = (),
                    prediction: str | None = None, *,
                    prediction_probability: float | None = None,
                    target_probability: float | None = None) -> dict[str, Any]:
  """Builds one results line for ``query`` (a queries-file record).

  The query's ``id`` becomes ``query_id``; every other query field (prompt,
  target, fact_doc_ids, bucket, ...) is passed through, then the authors'
  names for the query (``authors_fields``), the lists, and their marks
  against ``fact_doc_ids`` (``correct_marks``). Lists must be given best
  first; numpy values are converted to plain Python. ``prediction``: the
  model's greedy completion of the prompt; ``prediction_probability``,
  ``target_probability``: p(prediction | prompt) and p(target | prompt) under
  the model (``prediction_fields``). A query field the row would overwrite
  is a ValueError.
  """
  if "id" not in query:
    raise ValueError("query has no 'id' field")
  lists = {
      "proponent_ids": [str(x) for x in proponent_ids],
      "proponent_scores": [float(x) for x in np.asarray(proponent_scores)
                           .reshape(-1)],
      "proponents": [str(x) for x in proponent_texts],
      "opponent_ids": [str(x) for x in opponent_ids],
      "opponent_scores": [float(x) for x in np.asarray(opponent_scores)
                          .reshape(-1)],
      "opponents": [str(x) for x in opponent_texts],
  }
  for side in ("proponent", "opponent"):
    n = len(lists[f"{side}_ids"])
    if len(lists[f"{side}_scores"]) != n or len(lists[f"{side}s"]) != n:
      raise ValueError(
          f"query {query['id']!r}: {side} ids, scores and texts differ in "
          f"length ({n}, {len(lists[f'{side}_scores'])}, "
          f"{len(lists[f'{side}s'])})")
  written = {**authors_fields(query), **lists, **correct_marks(query, lists),
             **prediction_fields(prediction, prediction_probability,
                                 target_probability)}
  clash = sorted(set(query) & {"query_id", *written})
  if clash:
    raise ValueError(f"query {query['id']!r} has reserved field(s) {clash}")
  row: dict[str, Any] = {"query_id": query["id"]}
  row.update((k, v) for k, v in query.items() if k != "id")
  row.update(written)
  return row


def authors_fields(query: Mapping[str, Any]) -> dict[str, str]:
  """The query in the names the TrackStar authors' viewer reads (module doc):
  ``example_id`` (the id as a string: the viewer calls string methods on
  it), ``inputs_plaintext`` (prompt), ``targets_plaintext`` (target)."""
  out = {"example_id": str(query["id"])}
  for theirs, ours in (("inputs_plaintext", "prompt"),
                       ("targets_plaintext", "target")):
    if ours in query:
      out[theirs] = query[ours]
  return out


def correct_marks(query: Mapping[str, Any], lists: Mapping[str, Sequence[str]]
                  ) -> dict[str, list[bool]]:
  """``proponent_correct`` / ``opponent_correct``: per listed id, whether it
  is one of the query's ``fact_doc_ids``; none when the query names no fact
  documents (no ground truth: the authors' viewer would score it 0)."""
  truth = set(query.get("fact_doc_ids") or ())
  if not truth:
    return {}
  return {f"{side}_correct": [i in truth for i in lists[f"{side}_ids"]]
          for side in ("proponent", "opponent")}


def prediction_fields(prediction: str | None,
                      prediction_probability: float | None = None,
                      target_probability: float | None = None) -> dict[str, Any]:
  """The model's answer in our names and the authors' (module doc): only
  what is given. Their viewer prints ``model_confidence`` next to the target
  ("Prediction: <target> (confidence = p)"), so it gets p(target | prompt);
  ``temperature_samples`` (their "Decoder Samples") gets the greedy
  completion, a sample at temperature 0."""
  # A probability that is not finite (a model whose params are) is null:
  # NaN is not JSON, and JSON.parse or jq refuse a line holding it.
  finite = lambda p: float(p) if np.isfinite(p) else None
  out: dict[str, Any] = {}
  if prediction is not None:
    out["prediction"] = str(prediction)
    out["temperature_samples"] = [str(prediction)]
  if prediction_probability is not None:
    out["prediction_probability"] = finite(prediction_probability)
  if target_probability is not None:
    out["target_probability"] = finite(target_probability)
    out["model_confidence"] = finite(target_probability)
  return out


# ---------------------------------------------------------------------------
# Metrics.


def bucket_sort_key(bucket: str):
  """Sorts "1" < "2-3" < "4-10" < "11+" by their leading number (by its
  digits' count, then the digits: no int() of thousands of digits, which
  Python refuses past 4,300)."""
  m = re.match(r"\s*0*(\d+)", bucket)
  return (0, len(m.group(1)), m.group(1), bucket) if m else (1, 0, "", bucket)


def _query_scores(relevant: set[str], retrieved: Sequence[str] | None,
                  k: int) -> tuple[float, float, float]:
  """(reciprocal rank, hit in top k, precision at k) for one query."""
  if retrieved is None:
    return 0.0, 0.0, 0.0
  retrieved = list(dict.fromkeys(retrieved))  # each document at its best rank
  rr = 0.0
  for rank, doc_id in enumerate(retrieved, start=1):
    if doc_id in relevant:
      rr = 1.0 / rank
      break
  hits = sum(doc_id in relevant for doc_id in retrieved[:k])
  return rr, float(hits > 0), hits / k


def _summarize(scores: list[tuple[float, float, float]], missing: int,
               no_ground_truth: int, errors: int, k: int) -> dict[str, Any]:
  n = len(scores)
  def mean(i):
    # None rather than NaN: NaN is not valid JSON.
    return math.fsum(s[i] for s in scores) / n if n else None
  return {
      "mrr": mean(0),
      f"recall@{k}": mean(1),
      f"precision@{k}": mean(2),
      "num_queries": n,
      "missing": missing,
      "no_ground_truth": no_ground_truth,
      "errors": errors,
  }


def retrieval_metrics(queries: Sequence[Mapping[str, Any]],
                      results: Mapping[str, Mapping[str, Any]],
                      k: int = 10) -> dict[str, Any]:
  """MRR, recall@k and precision@k of ``results`` against ``fact_doc_ids``.

  Args:
    queries: query records with ``id`` and ``fact_doc_ids`` (the relevant
      corpus ids) and optionally ``bucket``.
    results: ``{query_id: row}`` as from ``read_results``; each row's
      ``proponent_ids`` is the ranking, best first.
    k: cut-off for recall and precision. MRR uses the whole retrieved list.

  Returns:
    ``{"mrr", "recall@k", "precision@k", "num_queries", "missing",
    "no_ground_truth", "errors", "buckets": {bucket: {same keys but
    "buckets"}}}``. ``num_queries`` counts the queries averaged over
    (``missing`` ones included as zeros, ``no_ground_truth`` ones left out;
    ``errors``: rows with an ``error``, a query whose own gradient was not
    finite, included as what they list, no proponents: zeros). A metric over no
    queries is ``None``. Queries without a ``bucket`` count only overall.
    Result rows for ids not in ``queries`` are ignored.
  """
  if k < 1:
    raise ValueError(f"k must be positive, got {k}")
  overall: list[tuple[float, float, float]] = []
  counts = {"missing": 0, "no_ground_truth": 0, "errors": 0}
  per_bucket: dict[str, list[tuple[float, float, float]]] = {}
  bucket_counts: dict[str, dict[str, int]] = {}
  for i, query in enumerate(queries):
    qid = query.get("id")
    if "fact_doc_ids" not in query:
      raise InputError(f"query {qid!r} (#{i}): missing field 'fact_doc_ids'")
    relevant = set(query["fact_doc_ids"])
    bucket = query.get("bucket")
    if bucket is not None:
      bucket = str(bucket)
      per_bucket.setdefault(bucket, [])
      bucket_counts.setdefault(bucket, {"missing": 0, "no_ground_truth": 0,
                                        "errors": 0})
    if not relevant:
      counts["no_ground_truth"] += 1
      if bucket is not None:
        bucket_counts[bucket]["no_ground_truth"] += 1
      continue
    row = results.get(qid)
    failed = "missing" if row is None else "errors" if row.get("error") else None
    if failed:
      counts[failed] += 1
      if bucket is not None:
        bucket_counts[bucket][failed] += 1
    s = _query_scores(relevant, None if row is None else row["proponent_ids"],
                      k)
    overall.append(s)
    if bucket is not None:
      per_bucket[bucket].append(s)
  metrics = _summarize(overall, k=k, **counts)
  metrics["buckets"] = {
      b: _summarize(per_bucket[b], k=k, **bucket_counts[b])
      for b in sorted(per_bucket, key=bucket_sort_key)
  }
  return metrics


# ---------------------------------------------------------------------------
# Reporting.


def _format_cell(value) -> str:
  if value is None:
    return "–"
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  if isinstance(value, (float, np.floating)):
    return f"{float(value):.4f}"
  return str(value).replace("|", "\\|")


def format_table(metrics_by_method: Mapping[str, Mapping[str, Any]],
                 columns: Sequence[str], *, row_header: str = "method") -> str:
  """A markdown table: one row per method, one column per metric key.

  Floats print with 4 decimals, ``None`` as "–", absent keys as blanks.
  """
  header = [row_header, *columns]
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"]
  for method, metrics in metrics_by_method.items():
    cells = [_format_cell(method)]
    cells += ["" if c not in metrics else _format_cell(metrics[c])
              for c in columns]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
