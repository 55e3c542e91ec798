"""Results files as one self-contained HTML page: summary, plots, a query browser.

Records. ``read_results`` returns one dict per query in our field names
(``tracer.evaluate``'s results format)::

  query_id, prompt, target            str ("" when the file has none)
  bucket                              str, optional (frequency bucket)
  fact_doc_ids                        [str], optional (the ground truth)
  prediction                          str, optional (the model's greedy
                                      completion; right when == target)
  prediction_correct                  bool, optional (derived: see below)
  prediction_probability, target_probability   float, optional: p(prediction
                                      | prompt), p(target | prompt)
  proponent_ids, proponent_scores     [str], [float] best first
  proponents                          [str | None] (None: no text in the file)
  opponent_ids, opponent_scores, opponents   the same, [] when absent
  proponent_correct                   [bool | None], optional, per proponent
  opponent_correct                    [bool | None], optional, per opponent
  proponent_tail_patch                [float] per proponent, NaN where missing
  error                               str, optional (no proponents computed)
  ...                                 every other field, kept as is ("extras")

Scores and tail-patch values that are null (or NaN) read as NaN.

The TrackStar authors' released files. Their viewer (PAIR-code/pretraining-tda,
``demo/example_view.ts``, ``demo/data_loader.ts``, ``demo/data_index.ts``) and
the "TDA method results" section of their ``README.md`` read these fields:

  example_id (else fact_id, trex_id)  -> query_id (as ``tracer.data`` takes
                                         their queries' ids)
  inputs_plaintext (else prompt0)     -> prompt
  targets_plaintext (else entity1)    -> target (what was traced; for their
                                         incorrect-prediction files this is
                                         the model's wrong answer and
                                         ``groundtruth`` the right one)
  c4_frequency_bucket (older files: frequency_bucket)   -> bucket (as str)
  is_8b_correct                       -> prediction_correct
  proponents, proponent_ids, proponent_scores,
  opponents, opponent_ids, opponent_scores             same names as ours
  proponent_correct                   kept: per-proponent ground-truth marks
  proponent_ranks, proponent_ais_scores, proponent_ais_best_windows,
  8b_generations (older: temperature_samples), 8b_confidence (older:
  model_confidence), c4_frequency (older: fact_frequency), groundtruth
  (older: ground_truth), relation, fact_id, query_set, task,
  has_trex_sentence                   kept as extras

Each record is mapped on its own, so one file may mix both formats; where a
record has both names (``query_id`` and ``example_id``) ours wins and theirs
stays an extra, unless it holds the same value: our own files carry the
authors' names too (``tracer.evaluate``: ``example_id``, ``inputs_plaintext``,
``targets_plaintext``, ``model_confidence`` = ``target_probability``,
``temperature_samples`` = ``[prediction]``), and those copies are dropped. ``prediction_correct`` is ``prediction == target`` (exactly,
as ``tracer.pipeline.completion_accuracy``) when a record has ``prediction``,
else the authors' ``is_8b_correct`` when it has that.

Ground truth for the metrics: ``fact_doc_ids`` when non-empty, else
``proponent_correct`` (a query whose marks are all false scores 0, as in the
authors' viewer; a document listed twice counts once, at its best rank, as
with ``fact_doc_ids``), else the query has none and is left out of MRR and recall.
Tail-patch@k averages a query's first k distinct training examples (same id
and text: one listed twice counts once).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tracer import data
from tracer import evaluate
from tracer import plots
from tracer import storage
from tracer.errors import InputError, at

TAIL_PATCH_KS = (1, 3, 5, 10)
RECALL_K = 10

# Their name(s) -> ours, first match wins (module doc).
# Query ids, prompts and targets as tracer reads their queries (the same
# rule: before 2026-12-08 a file with fact_id and trex_id took trex_id here and
# fact_id in tracer evaluate and tracer bm25, so their queries did not meet).
_ALIASES = {
    "query_id": data.AUTHORS_QUERY_FIELDS["id"],
    "prompt": data.AUTHORS_QUERY_FIELDS["prompt"],
    "target": data.AUTHORS_QUERY_FIELDS["target"],
    "bucket": ("c4_frequency_bucket", "frequency_bucket"),
    "prediction_correct": ("is_8b_correct",),
}
# Their name -> ours in our own files (tracer.evaluate), dropped when equal.
_COPIES = {"example_id": "query_id", "inputs_plaintext": "prompt",
           "targets_plaintext": "target", "model_confidence": "target_probability"}
_SIDES = (("proponent", "proponents"), ("opponent", "opponents"))
KNOWN_FIELDS = frozenset({
    "query_id", "prompt", "target", "bucket", "fact_doc_ids", "prediction",
    "prediction_correct", "prediction_probability", "target_probability",
    "error", "proponent_ids", "proponent_scores", "proponents", "opponent_ids",
    "opponent_scores", "opponents", "proponent_correct", "opponent_correct",
    "proponent_tail_patch"})

# An extra field with at most this many distinct short scalar values gets a
# filter on the page (e.g. relation); more is a free-text field (subject).
MAX_FACET_VALUES = 30
MAX_FACET_CHARS = 60

# Words never highlighted: they match nearly every text.
STOPWORDS = (
    "a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "has",
    "have", "he", "her", "his", "in", "is", "it", "its", "of", "on", "or",
    "she", "that", "the", "their", "they", "this", "to", "was", "were",
    "which", "who", "with")

# ---------------------------------------------------------------------------
# Reading.


def _is_number(v) -> bool:
  # bool is an int subclass; a true/false score is a producer bug.
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _strings(where, rec, field, nullable: bool = False) -> list[str]:
  value = rec[field]
  if not isinstance(value, list) or not all(
      isinstance(v, str) or (nullable and v is None) for v in value):
    raise InputError(f"{where}: field {field!r} must be a list of strings"
                     + (" (or null)" if nullable else ""))
  return value


def _floats(where, rec, field) -> list[float]:
  """Numbers, with null (and NaN) as NaN."""
  value = rec[field]
  if not isinstance(value, list) or not all(
      v is None or _is_number(v) for v in value):
    raise InputError(f"{where}: field {field!r} must be a list of numbers "
                     "(or null)")
  try:
    return [math.nan if v is None else float(v) for v in value]
  except OverflowError:  # a JSON integer past float's range
    raise InputError(f"{where}: field {field!r} holds a number out of float's "
                     "range") from None


def _name(v) -> str:
  """A query id or bucket given as a number, as a string: 3 and 3.0 are "3"."""
  if isinstance(v, int):
    return str(v)  # exact, however long (float() of a long one overflows)
  return str(int(v)) if v.is_integer() else str(v)


def _same_length(where, rec, field, other, n) -> None:
  if len(rec[field]) != n:
    raise InputError(f"{where}: field {field!r} has {len(rec[field])} entries "
                     f"but {other!r} has {n}; expected one per entry of "
                     f"{other!r}")


def normalize_record(obj: Mapping[str, Any], where: str = "record"
                     ) -> dict[str, Any]:
  """One results record in our field names, checked (module doc).

  Args:
    obj: a JSON object of either format.
    where: how errors name the record, e.g. ``results.jsonl:7``.

  Returns:
    A new dict; ``obj`` is not changed. InputError on a missing query id,
    a field of the wrong type, or lists of different lengths.

  >>> normalize_record({"example_id": "q1", "inputs_plaintext": "Paris is in",
  ...                   "targets_plaintext": " France", "proponent_ids": ["d"],
  ...                   "proponent_scores": [0.5]})["prompt"]
  'Paris is in'
  """
  rec = dict(obj)
  _drop_copies(rec)
  named = {}  # our field -> the file's name for it, for errors
  for ours, theirs in _ALIASES.items():
    if rec.get(ours) is None:  # absent or null: the authors' name may hold it
      for name in theirs:
        if name in rec:
          rec[ours] = rec.pop(name)
          named[ours] = name
          break
  qid = rec.get("query_id")
  if _is_number(qid) and (isinstance(qid, int) or qid.is_integer()):
    qid = _name(qid)
  if not isinstance(qid, str) or not qid:
    raise InputError(f"{where}: no query id; expected a non-empty string in "
                     "'query_id' (or the authors' 'example_id', 'fact_id' or "
                     "'trex_id')")
  rec["query_id"] = qid
  for field in ("prompt", "target"):
    if rec.get(field) is None:
      rec[field] = ""
    elif not isinstance(rec[field], str):
      raise InputError(f"{where}: field {field!r} must be a string")
  for field in ("prediction", "error"):
    if field in rec and rec[field] is not None and not isinstance(rec[field], str):
      raise InputError(f"{where}: field {field!r} must be a string")
  for field in ("prediction_probability", "target_probability"):
    if rec.get(field) is not None and not _is_number(rec[field]):
      raise InputError(f"{where}: field {field!r} must be a number")
  if rec.get("bucket") is None:
    rec.pop("bucket", None)
  elif _is_number(rec["bucket"]) or isinstance(rec["bucket"], str):
    b = rec["bucket"]
    rec["bucket"] = _name(b) if _is_number(b) else b
    if rec["bucket"] == "all":
      raise InputError(f"{where}: field {named.get('bucket', 'bucket')!r} is "
                       "'all', the name of the summary over every bucket; "
                       "expected another name")
  else:
    raise InputError(f"{where}: field 'bucket' must be a string or a number")
  if "fact_doc_ids" in rec:
    _strings(where, rec, "fact_doc_ids")
  for side, texts in _SIDES:
    ids, scores = f"{side}_ids", f"{side}_scores"
    if ids not in rec and scores not in rec:
      if side == "proponent" and not rec.get("error"):
        raise InputError(f"{where}: missing field 'proponent_ids'; expected "
                         "the proponents' ids, best first")
      rec[ids], rec[scores], rec[texts] = [], [], []
      continue
    for field, other in ((ids, scores), (scores, ids)):
      if field not in rec:
        raise InputError(f"{where}: missing field {field!r} (the line has "
                         f"{other!r})")
    n = len(_strings(where, rec, ids))
    rec[scores] = _floats(where, rec, scores)
    _same_length(where, rec, scores, ids, n)
    if rec.get(texts) is None:
      rec[texts] = [None] * n
    else:
      _strings(where, rec, texts, nullable=True)
      _same_length(where, rec, texts, ids, n)
  for side, _ in _SIDES:
    _check_marks(where, rec, side)
  n = len(rec["proponent_ids"])
  if rec.get("proponent_tail_patch") is not None:
    rec["proponent_tail_patch"] = _floats(where, rec, "proponent_tail_patch")
    _same_length(where, rec, "proponent_tail_patch", "proponent_ids", n)
  else:
    rec.pop("proponent_tail_patch", None)
  if isinstance(rec.get("prediction"), str):
    rec["prediction_correct"] = rec["prediction"] == rec["target"]
  elif rec.get("prediction_correct") is not None:
    if not isinstance(rec["prediction_correct"], bool):
      raise InputError(f"{where}: field "
                       f"{named.get('prediction_correct', 'prediction_correct')!r} "
                       "must be true or false")
  else:
    rec.pop("prediction_correct", None)
  return rec


def _drop_copies(rec: dict[str, Any]) -> None:
  """Drops the authors' names that repeat ours (module doc), in place."""
  for theirs, ours in _COPIES.items():
    if theirs in rec and ours in rec and rec[theirs] == rec[ours]:
      del rec[theirs]
  if (rec.get("prediction") is not None
      and rec.get("temperature_samples") == [rec["prediction"]]):
    del rec["temperature_samples"]


def _check_marks(where: str, rec: dict[str, Any], side: str) -> None:
  """``<side>_correct``: one true/false (or null) per ``<side>_ids``; dropped
  when null."""
  field, ids = f"{side}_correct", f"{side}_ids"
  if rec.get(field) is None:
    rec.pop(field, None)
    return
  marks = rec[field]
  if not isinstance(marks, list) or not all(
      v is None or isinstance(v, bool) for v in marks):
    raise InputError(f"{where}: field {field!r} must be a list of true/false "
                     "(or null)")
  _same_length(where, rec, field, ids, len(rec[ids]))


def read_results(location: str) -> list[dict[str, Any]]:
  """Reads a results JSONL file (path or gs:// s3:// memory:// URL), in order.

  Each line is one query in our format or the authors' (``normalize_record``).
  InputError naming ``file:line`` on a line that is not JSON, not an object,
  has no query id, bad field types, lists of different lengths, or a query id
  seen before; and on a file without records.

  >>> import tempfile, os
  >>> path = os.path.join(tempfile.mkdtemp(), "r.jsonl")
  >>> _ = open(path, "w").write('{"query_id": "q", "proponent_ids": ["d"], '
  ...                           '"proponent_scores": [1.0]}\\n')
  >>> [r["query_id"] for r in read_results(path)]
  ['q']
  """
  records, first = [], {}
  for lineno, obj in data.iter_jsonl(location):
    rec = normalize_record(obj, at(location, lineno))
    qid = rec["query_id"]
    if qid in first:
      raise InputError(f"{at(location, lineno)}: duplicate query id {qid!r} "
                       f"(first at line {first[qid]}); expected one line per "
                       "query")
    first[qid] = lineno
    records.append(rec)
  if not records:
    raise InputError(f"{location}: no records; expected one JSON object per "
                     "query")
  return records


# ---------------------------------------------------------------------------
# Metrics.

# A relevant id no positional id ("#0", "#1", ...) equals: a query whose
# proponent_correct marks are all false has ground truth and scores 0.
_NO_CORRECT = "\0none"


def _ground_truth(rec) -> tuple[list[str], list[str]] | None:
  """(relevant ids, retrieved ids) for the metrics, or None (module doc)."""
  if rec.get("fact_doc_ids"):
    return rec["fact_doc_ids"], rec["proponent_ids"]
  if "proponent_correct" in rec:
    # Each proponent is named by its id's first position, so that a document
    # listed twice counts once, at its best rank, and is relevant when any of
    # its marks is: what fact_doc_ids give (evaluate._query_scores).
    first: dict[str, int] = {}
    names = [f"#{first.setdefault(i, n)}"
             for n, i in enumerate(rec["proponent_ids"])]
    relevant = sorted({names[n] for n, c in enumerate(rec["proponent_correct"])
                       if c}) or [_NO_CORRECT]
    return relevant, names
  return None


def bucket_order(records: Sequence[Mapping[str, Any]]) -> list[str]:
  """"all", then the records' buckets by ``evaluate.bucket_sort_key``."""
  buckets = {r["bucket"] for r in records if "bucket" in r}
  return ["all", *sorted(buckets, key=evaluate.bucket_sort_key)]


def _finite_or_none(x) -> float | None:
  return None if x is None or not math.isfinite(x) else float(x)


def summary(runs: Mapping[str, Sequence[Mapping[str, Any]]]
            ) -> dict[str, dict[str, dict[str, Any]]]:
  """Per run and per bucket ("all" first): retrieval, accuracy, tail-patch.

  Args:
    runs: method name -> its records (``read_results``).

  Returns:
    ``{method: {bucket: metrics}}``, metrics being ``num_queries``,
    ``num_errors``; ``num_ground_truth``, ``mrr``, ``recall@10``
    (``tracer.evaluate.retrieval_metrics`` over the queries with ground truth,
    module doc); ``num_predictions``, ``accuracy`` (over queries with
    ``prediction_correct``); ``num_tail_patched``, ``tail_patch@k`` and
    ``tail_patch@k_se`` for k in ``TAIL_PATCH_KS``
    (``tracer.tailpatch.tail_patch_at_k`` over the queries with
    ``proponent_tail_patch``). A metric over no queries is None.

  >>> rec = {"query_id": "q", "bucket": "1", "fact_doc_ids": ["d2"],
  ...        "proponent_ids": ["d1", "d2"], "proponent_scores": [2.0, 1.0]}
  >>> summary({"m": [normalize_record(rec)]})["m"]["1"]["mrr"]
  0.5
  """
  out = {}
  for method, records in runs.items():
    queries, results = [], {}
    for rec in records:
      truth = _ground_truth(rec)
      if truth is not None:
        q = {"id": rec["query_id"], "fact_doc_ids": truth[0]}
        if "bucket" in rec:
          q["bucket"] = rec["bucket"]
        queries.append(q)
        results[rec["query_id"]] = {"proponent_ids": truth[1]}
    retrieval = evaluate.retrieval_metrics(queries, results, k=RECALL_K)
    retrieval_by_bucket = {"all": retrieval, **retrieval["buckets"]}
    tail_patched = {r["query_id"]: _first_listings(r)
                    for r in records if "proponent_tail_patch" in r}
    by_bucket: dict[Any, list] = {}
    for r in records:
      by_bucket.setdefault(r.get("bucket"), []).append(r)
    per_bucket = {}
    for bucket in bucket_order(records):
      group = records if bucket == "all" else by_bucket.get(bucket, [])
      m: dict[str, Any] = {"num_queries": len(group),
                           "num_errors": sum(bool(r.get("error")) for r in group)}
      got = retrieval_by_bucket.get(bucket)
      m["num_ground_truth"] = got["num_queries"] if got else 0
      m["mrr"] = got["mrr"] if got else None
      m[f"recall@{RECALL_K}"] = got[f"recall@{RECALL_K}"] if got else None
      marks = [r["prediction_correct"] for r in group if "prediction_correct" in r]
      m["num_predictions"] = len(marks)
      m["accuracy"] = sum(marks) / len(marks) if marks else None
      deltas = {r["query_id"]: tail_patched[r["query_id"]] for r in group
                if r["query_id"] in tail_patched}
      # Queries with a value to average (tail_patch_at_k skips the others).
      m["num_tail_patched"] = sum(any(math.isfinite(v) for v in d)
                                  for d in deltas.values())
      m.update(_tail_patch(deltas))
      per_bucket[bucket] = m
    out[method] = per_bucket
  return out


def _first_listings(rec: Mapping[str, Any]) -> list[float]:
  """A record's ``proponent_tail_patch``, each training example at its first
  listing only: one listed twice (same id and text; a results file can,
  tracer's scans never do) is one step's delta, not two in the mean over the
  top k. The windows of a document split by ``overflow='split'`` share its id
  but not its text: they are distinct examples, each patched."""
  seen: set = set()
  keys = zip(rec["proponent_ids"], rec["proponents"])
  return [v for key, v in zip(keys, rec["proponent_tail_patch"])
          if not (key in seen or seen.add(key))]


def _tail_patch(deltas: Mapping[str, Sequence[float]]) -> dict[str, float | None]:
  if not deltas:
    return {f"tail_patch@{k}{s}": None for k in TAIL_PATCH_KS for s in ("", "_se")}
  # Imported here: tracer.tailpatch loads jax (a second or more), which only
  # files with tail-patch data need.
  from tracer import tailpatch  # pylint: disable=g-import-not-at-top
  got = tailpatch.tail_patch_at_k(deltas, TAIL_PATCH_KS, stderr=True)
  return {key: _finite_or_none(value) for key, value in got.items()}


# ---------------------------------------------------------------------------
# The page.


def _clean(value):
  """JSON-ready: NaN and infinities as None (JSON.parse rejects NaN), numpy
  scalars and arrays as Python."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, Mapping):
    return {str(k): _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  if isinstance(value, np.ndarray):
    return _clean(value.tolist())
  if isinstance(value, np.generic):
    return _clean(value.item())
  return value


# Inside <script>, "</script>" or "<!--" in a string would end or change the
# element whatever JSON says; as \u escapes they are the same JSON strings.
# U+2028/2029 are escaped for JS parsers older than ES2019.
_SCRIPT_ESCAPES = {ord("<"): "\\u003c", ord(">"): "\\u003e",
                   ord("&"): "\\u0026", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def _numpy(value):
  """json.dumps fallback for numpy scalars and arrays."""
  if isinstance(value, (np.ndarray, np.generic)):
    return value.tolist()
  raise TypeError(f"not JSON serializable: {type(value).__name__}")


def script_json(value) -> str:
  """``value`` as JSON safe to put inside a ``<script>`` element; NaN and
  infinities become null."""
  def dumps(v, ascii_only):
    return json.dumps(v, ensure_ascii=ascii_only, allow_nan=False,
                      separators=(",", ":"), default=_numpy)
  try:
    text = dumps(value, False)
  except ValueError:  # a NaN or infinity somewhere: the slow walk.
    value = _clean(value)
    text = dumps(value, False)
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    # A lone surrogate (JSON allows "\ud800") cannot be written as UTF-8;
    # ASCII JSON keeps it as an escape, which JSON.parse accepts.
    text = dumps(value, True)
  return text.translate(_SCRIPT_ESCAPES)


def _scalar(v) -> bool:
  return isinstance(v, (str, bool)) or _is_number(v)


def _facets(queries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Extra fields worth a filter: few distinct short scalar values."""
  # Keyed apart from numbers: Python's True == 1, the page's true !== 1.
  values: dict[str, dict[tuple[bool, Any], Any]] = {}
  skip = set()
  for q in queries:
    for key, v in q["x"].items():
      if key in skip:
        continue
      if v is None:
        continue
      if not _scalar(v) or len(str(v)) > MAX_FACET_CHARS:
        skip.add(key)
        continue
      values.setdefault(key, {})[isinstance(v, bool), v] = v
      if len(values[key]) > MAX_FACET_VALUES:
        skip.add(key)
  return [{"field": key,
           "values": sorted(vals.values(), key=lambda v: (str(type(v)), v))}
          for key, vals in values.items()
          if key not in skip and len(vals) >= 2]


def payload(runs: Mapping[str, Sequence[Mapping[str, Any]]], title: str,
            stats: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """What the page embeds (JSON).

  ``queries``: one per query id over all runs (first run's order, then new
  ids), ``{id, prompt, target, prediction?, correct?, pp?, tp?, bucket?,
  facts?, x}`` (pp, tp: the prediction's and the target's probabilities)
  from the first run holding it, ``x`` its extra fields. ``runs``: per method
  a list aligned with ``queries``, null where the run lacks the query, else
  ``{p: proponents, o: opponents, e?: error, pred?, correct?}`` with each
  proponent ``[id, score, text index, is fact (0/1), tail-patch]`` and each
  opponent ``[id, score, text index, is fact]``. ``texts``: every text once.
  """
  texts: list[str] = []
  text_index: dict[str, int] = {}

  def intern(text):
    if text is None:
      return None
    if text not in text_index:
      text_index[text] = len(texts)
      texts.append(text)
    return text_index[text]

  queries: list[dict[str, Any]] = []
  qindex: dict[str, int] = {}
  for records in runs.values():
    for rec in records:
      if rec["query_id"] in qindex:
        continue
      qindex[rec["query_id"]] = len(queries)
      q = {"id": rec["query_id"], "prompt": rec["prompt"], "target": rec["target"]}
      for ours, short in (("prediction", "prediction"),
                          ("prediction_correct", "correct"),
                          ("prediction_probability", "pp"),
                          ("target_probability", "tp"),
                          ("bucket", "bucket"), ("fact_doc_ids", "facts")):
        if rec.get(ours) is not None:
          q[short] = rec[ours]
      q["x"] = {k: _clean(v) for k, v in rec.items() if k not in KNOWN_FIELDS}
      queries.append(q)
  by_run = []
  for records in runs.values():
    rows: list[dict[str, Any] | None] = [None] * len(queries)
    for rec in records:
      facts = set(rec.get("fact_doc_ids") or ())
      marks = rec.get("proponent_correct") or [None] * len(rec["proponent_ids"])
      opp_marks = rec.get("opponent_correct") or [None] * len(rec["opponent_ids"])
      patch = rec.get("proponent_tail_patch") or [None] * len(rec["proponent_ids"])
      # Scores and tail-patch values made finite here, where they are
      # built: script_json then needs no walk over the whole payload.
      row: dict[str, Any] = {
          "p": [[i, _finite_or_none(s), intern(t), int(i in facts or c is True),
                 _finite_or_none(tp)]
                for i, s, t, c, tp in zip(rec["proponent_ids"],
                                          rec["proponent_scores"],
                                          rec["proponents"], marks, patch)],
          "o": [[i, _finite_or_none(s), intern(t), int(i in facts or c is True)]
                for i, s, t, c in zip(rec["opponent_ids"], rec["opponent_scores"],
                                      rec["opponents"], opp_marks)]}
      if rec.get("error"):
        row["e"] = rec["error"]
      q = queries[qindex[rec["query_id"]]]
      # A run of another model may predict differently: shown in its column,
      # as is a verdict of its own (the authors' files carry is_8b_correct
      # without the prediction: before 2026-12-08 a second run's was dropped).
      if rec.get("prediction") is not None and rec["prediction"] != q.get("prediction"):
        row["pred"] = rec["prediction"]
      if "pred" in row or rec.get("prediction_correct") != q.get("correct"):
        row["correct"] = rec.get("prediction_correct")
      rows[qindex[rec["query_id"]]] = row
    by_run.append(rows)
  all_records = [r for records in runs.values() for r in records]
  return {
      "title": title,
      "methods": list(runs),
      "buckets": bucket_order(all_records),
      "ks": list(TAIL_PATCH_KS),
      "recall_k": RECALL_K,
      "summary": summary(runs) if stats is None else stats,
      "queries": queries,
      "runs": by_run,
      "texts": texts,
      "facets": _facets(queries),
      "stopwords": list(STOPWORDS),
  }


def render(runs: Mapping[str, Sequence[Mapping[str, Any]]],
           title: str = "tracer results") -> str:
  """One self-contained HTML page browsing ``runs`` (method -> records, in
  either format: each is passed through ``normalize_record``).

  No server, network, CDN or external font: the data is JSON in a
  ``<script type="application/json">`` element (``script_json``), the plots
  inline SVG (``tracer.plots``), CSS and JS inline. The page's JS builds
  every text from the data with ``textContent``, never as HTML.

  >>> rec = normalize_record({"query_id": "q", "proponent_ids": ["d"],
  ...                         "proponent_scores": [1.0]})
  >>> render({"m": [rec]}).startswith("<!doctype html>")
  True
  """
  if not runs:
    raise InputError("no results to show; expected at least one run")
  runs = {name: [normalize_record(r, f"{name}: record {i + 1}")
                 for i, r in enumerate(records)] for name, records in runs.items()}
  stats = summary(runs)
  figures = {"retrieval": plots.retrieval_figure(stats),
             "tail-patch": plots.tail_patch_figure(stats)}
  # Each figure its own id salt: inline SVGs share one id namespace.
  svgs = "\n".join(f'<figure class="plot">{plots.to_svg(f, salt=name)}</figure>'
                   for name, f in figures.items() if f is not None)
  return _PAGE.format(title=html.escape(plots.printable(title)), css=_CSS,
                      plots=svgs,
                      data=script_json(payload(runs, title, stats)), js=_JS)


def write_report(location: str,
                 runs: Mapping[str, Sequence[Mapping[str, Any]]],
                 title: str = "tracer results") -> str:
  """Writes ``render(runs, title)`` to ``location`` (path or URL) atomically
  (``tracer.storage.write_text``); returns ``location``."""
  page = render(runs, title)
  if not storage.is_url(location):
    storage.make_local_dirs(storage.split(location)[0])
  storage.write_text(location, page)
  return location


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<header><h1>{title}</h1><p id="meta"></p></header>
<section id="summary">
<div id="metrics"></div>
<div class="plots">{plots}</div>
</section>
<section id="browser">
<aside id="sidebar">
<input id="search" type="search" placeholder="search id, prompt, target, prediction" aria-label="search">
<div id="filters">
<label id="bucket-filter">bucket <select id="f-bucket"><option value="">all</option></select></label>
<label id="correct-filter">prediction <select id="f-correct">
<option value="">any</option><option value="right">right</option>
<option value="wrong">wrong</option><option value="none">none</option>
</select></label>
</div>
<div id="count" aria-live="polite"></div>
<ol id="list"></ol>
<button id="more" type="button" hidden>show more</button>
</aside>
<main id="detail"><p class="muted">Select a query (j / k: next / previous).</p></main>
</section>
<script type="application/json" id="tracer-data">{data}</script>
<script>{js}</script>
</body>
</html>
"""

_CSS = """
:root { --fg: #1f2328; --muted: #656d76; --line: #d0d7de; --bg: #f6f8fa;
  --sel: #dbe9ff; --good: #1a7f37; --bad: #cf222e; --mark: #fff1a8; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
header { padding: 14px 20px 0; }
h1 { font-size: 20px; margin: 0; }
h2 { font-size: 17px; margin: 0 0 8px; word-break: break-all; }
h3 { font-size: 15px; margin: 0 0 6px; }
h4 { font-size: 13px; margin: 10px 0 4px; color: var(--muted); }
.muted, #meta { color: var(--muted); }
#meta { margin: 2px 0 0; }
#summary { padding: 8px 20px 14px; display: flex; flex-wrap: wrap;
  align-items: flex-start; gap: 12px 28px; }
#metrics { max-width: 100%; min-width: 0; }
.table-box { max-width: 100%; overflow-x: auto; margin-bottom: 10px; }
table.metrics { border-collapse: collapse; font-variant-numeric: tabular-nums; }
table.metrics th, table.metrics td { padding: 3px 10px; text-align: right;
  border-bottom: 1px solid var(--line); white-space: nowrap; }
table.metrics th { background: var(--bg); font-weight: 600; }
table.metrics td.name, table.metrics th.name { text-align: left; }
table.metrics tr.first td { border-top: 2px solid var(--line); }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
.plot { margin: 0; }
.plot svg { max-width: 100%; height: auto; }
#browser { display: grid; grid-template-columns: minmax(260px, 340px) minmax(0, 1fr);
  border-top: 1px solid var(--line); }
#sidebar { position: sticky; top: 0; align-self: start; height: 100vh;
  overflow-y: auto; padding: 10px; background: var(--bg);
  border-right: 1px solid var(--line); }
#search { width: 100%; padding: 5px 8px; font: inherit; }
#filters { display: flex; flex-wrap: wrap; gap: 4px 10px; margin: 8px 0; }
#filters label { font-size: 12px; color: var(--muted); }
#filters select { font: inherit; font-size: 12px; max-width: 150px; }
#count { font-size: 12px; color: var(--muted); margin-bottom: 4px; }
#list { list-style: none; margin: 0; padding: 0; }
#list li { padding: 4px 6px; border-radius: 4px; cursor: pointer;
  border-bottom: 1px solid var(--line); }
#list li:hover { background: #eaeef2; }
#list li.selected { background: var(--sel); }
#list .qid { font-weight: 600; margin-right: 6px; }
#list .qtext { display: block; font-size: 12px; overflow: hidden;
  text-overflow: ellipsis; white-space: nowrap; }
.chip { font-size: 11px; padding: 0 5px; border-radius: 8px; margin-left: 4px;
  background: #eaeef2; color: var(--muted); }
.right { color: var(--good); font-weight: 600; }
.wrong { color: var(--bad); font-weight: 600; }
#more { margin: 8px 0; width: 100%; }
#detail { padding: 12px 20px 40px; min-width: 0; }
dl.query { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px;
  margin: 0 0 12px; }
dl.query dt { color: var(--muted); }
dl.query dd { margin: 0; word-break: break-word; white-space: pre-wrap; }
.error { color: var(--bad); }
.runs { display: grid; gap: 14px; overflow-x: auto;
  grid-template-columns: repeat(var(--n, 1), minmax(300px, 1fr)); }
.run { min-width: 0; }
.doc { border: 1px solid var(--line); border-left: 4px solid var(--line);
  border-radius: 4px; padding: 5px 8px; margin: 0 0 6px; }
.doc.fact { border-left-color: var(--good); background: #f3fbf5; }
.doc .head { display: flex; flex-wrap: wrap; gap: 2px 10px; font-size: 12px;
  color: var(--muted); font-variant-numeric: tabular-nums; }
.doc .docid { color: var(--fg); word-break: break-all; }
.doc .fact-badge { color: var(--good); font-weight: 600; }
.doc .text { white-space: pre-wrap; word-break: break-word; margin-top: 2px; }
mark { background: var(--mark); color: inherit; padding: 0 1px; }
.metrics tr.bucket-row { display: none; }
body.show-buckets .metrics tr.bucket-row { display: table-row; }
label.toggle { display: block; color: var(--muted); font-size: 13px; margin: 4px 0; }
details > summary { cursor: pointer; color: var(--muted); font-size: 13px;
  margin: 10px 0 4px; font-weight: 600; }
"""

# The page's script. Every string from the data reaches the page through
# textContent or createTextNode (el(), highlight()): never innerHTML.
_JS = r"""
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("tracer-data").textContent);
  var Q = DATA.queries, RUNS = DATA.runs, TEXTS = DATA.texts;
  var METHODS = DATA.methods, PAGE = 200;
  var STOP = new Set(DATA.stopwords);
  var $ = function (id) { return document.getElementById(id); };
  var list = $("list"), count = $("count"), more = $("more"), detail = $("detail");
  var search = $("search"), fBucket = $("f-bucket"), fCorrect = $("f-correct");
  var facetSelects = [];
  var byId = new Map();
  var hay = Q.map(function (q, i) {
    byId.set(q.id, i);
    return [q.id, q.prompt, q.target, q.prediction == null ? "" : q.prediction]
      .join("\n").toLowerCase();
  });
  var state = {matches: [], shown: 0, selected: -1};

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = String(text);
    return e;
  }
  function num(x, digits) {
    if (x == null) return "\u2013";
    var n = Number(x);
    // Below half the last digit's unit, fixed digits read 0.0000 (unnormalized
    // scores of 1e-5 looked tied): three significant digits instead.
    if (n !== 0 && Math.abs(n) < 0.5 * Math.pow(10, -digits))
      return n.toExponential(2);
    return n.toFixed(digits);
  }
  function show(x) {
    if (typeof x === "string") return x;
    var s = JSON.stringify(x);
    return s.length > 300 ? s.slice(0, 300) + "\u2026" : s;
  }

  // --- summary -----------------------------------------------------------
  function metricsTable(cols) {
    // cols: [label, cell -> text]; one row per bucket and method.
    var S = DATA.summary, table = el("table", "metrics"), head = el("tr");
    ["bucket", "method"].forEach(function (h) { head.appendChild(el("th", "name", h)); });
    cols.forEach(function (c) { head.appendChild(el("th", null, c[0])); });
    table.appendChild(head);
    DATA.buckets.forEach(function (b) {
      var first = true;
      METHODS.forEach(function (m) {
        var c = S[m][b];
        if (!c) return;
        // Per-bucket rows show on demand (the "per bucket" box): with many
        // methods they would push the query browser off the first screen.
        var tr = el("tr", (first ? "first" : "") + (b === "all" ? "" : " bucket-row"));
        tr.appendChild(el("td", "name", first ? b : ""));
        tr.appendChild(el("td", "name", m));
        cols.forEach(function (col) { tr.appendChild(el("td", null, col[1](c))); });
        table.appendChild(tr);
        first = false;
      });
    });
    var box = el("div", "table-box");
    box.appendChild(table);
    $("metrics").appendChild(box);
  }
  function bucketToggle() {
    if (!DATA.buckets.some(function (b) { return b !== "all"; })) return;
    var label = el("label", "toggle"), box = el("input");
    box.type = "checkbox";
    box.id = "per-bucket";
    box.addEventListener("change", function () {
      document.body.classList.toggle("show-buckets", box.checked);
    });
    label.appendChild(box);
    label.appendChild(document.createTextNode(" per bucket"));
    $("metrics").appendChild(label);
  }
  function summaryTables() {
    bucketToggle();
    var cells = [];
    METHODS.forEach(function (m) {
      Object.keys(DATA.summary[m]).forEach(function (b) { cells.push(DATA.summary[m][b]); });
    });
    function any(key) {
      return cells.some(function (c) { return c[key] != null; });
    }
    function col(label, key, digits) {
      return [label, function (c) { return num(c[key], digits); }];
    }
    var cols = [col("queries", "num_queries", 0)];
    if (cells.some(function (c) { return c.num_errors > 0; }))
      cols.push(col("errors", "num_errors", 0));
    if (any("mrr")) {
      var r = "recall@" + DATA.recall_k;
      cols.push(col("with ground truth", "num_ground_truth", 0), col("MRR", "mrr", 3),
                col(r, r, 3));
    }
    if (any("accuracy"))
      cols.push(col("predictions", "num_predictions", 0), col("accuracy", "accuracy", 3));
    metricsTable(cols);
    var ks = DATA.ks.filter(function (k) { return any("tail_patch@" + k); });
    if (!ks.length) return;
    var tp = [col("tail-patched", "num_tail_patched", 0)];
    ks.forEach(function (k) {
      tp.push(["tail-patch@" + k + " \u00b1 se", function (c) {
        var v = c["tail_patch@" + k], se = c["tail_patch@" + k + "_se"];
        return v == null ? "\u2013" : num(v, 4) + (se == null ? "" : " \u00b1 " + num(se, 4));
      }]);
    });
    metricsTable(tp);
  }

  // --- filters and list ---------------------------------------------------
  function addOptions(select, values) {
    values.forEach(function (v) {
      var o = el("option", null, String(v));
      o.value = String(v);
      select.appendChild(o);
    });
  }
  function setupFilters() {
    var buckets = DATA.buckets.filter(function (b) { return b !== "all"; });
    if (buckets.length) addOptions(fBucket, buckets);
    else $("bucket-filter").hidden = true;
    if (!Q.some(function (q) { return q.correct != null; }))
      $("correct-filter").hidden = true;
    DATA.facets.forEach(function (f) {
      var label = el("label", null, f.field + " ");
      var select = el("select");
      select.dataset.field = f.field;
      var o = el("option", null, "all");
      o.value = "";
      select.appendChild(o);
      addOptions(select, f.values);
      label.appendChild(select);
      $("filters").appendChild(label);
      facetSelects.push(select);
    });
    var timer = null;
    search.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(applyFilters, 120);
    });
    [fBucket, fCorrect].concat(facetSelects).forEach(function (s) {
      s.addEventListener("change", applyFilters);
    });
    more.addEventListener("click", function () { showMore(PAGE); });
  }
  function applyFilters() {
    var terms = search.value.toLowerCase().split(/\s+/).filter(Boolean);
    // The first option is "all": a value "" is a bucket's too, not "all".
    var bucket = fBucket.selectedIndex > 0 ? fBucket.value : null;
    var correct = fCorrect.value;
    var facets = facetSelects.filter(function (s) { return s.selectedIndex > 0; })
      .map(function (s) { return [s.dataset.field, s.value]; });
    var out = [];
    for (var i = 0; i < Q.length; i++) {
      var q = Q[i], ok = true;
      for (var t = 0; ok && t < terms.length; t++) ok = hay[i].indexOf(terms[t]) >= 0;
      if (!ok) continue;
      if (bucket !== null && q.bucket !== bucket) continue;
      if (correct === "right" && q.correct !== true) continue;
      if (correct === "wrong" && q.correct !== false) continue;
      if (correct === "none" && q.correct != null) continue;
      for (var f = 0; ok && f < facets.length; f++) {
        var v = q.x[facets[f][0]];
        ok = v != null && String(v) === facets[f][1];
      }
      if (ok) out.push(i);
    }
    state.matches = out;
    state.shown = 0;
    list.textContent = "";
    showMore(PAGE);
  }
  function listItem(i) {
    var q = Q[i], li = el("li");
    li.dataset.index = i;
    li.appendChild(el("span", "qid", q.id));
    if (q.correct != null)
      li.appendChild(el("span", q.correct ? "right" : "wrong", q.correct ? "\u2713" : "\u2717"));
    if (q.bucket != null) li.appendChild(el("span", "chip", q.bucket));
    li.appendChild(el("span", "qtext", q.prompt + " \u2192 " + q.target));
    if (i === state.selected) li.className = "selected";
    li.addEventListener("click", function () { select(i); });
    return li;
  }
  function showMore(n) {
    var end = Math.min(state.matches.length, state.shown + n);
    var frag = document.createDocumentFragment();
    for (var j = state.shown; j < end; j++) frag.appendChild(listItem(state.matches[j]));
    list.appendChild(frag);
    state.shown = end;
    count.textContent = state.matches.length + " of " + Q.length + " queries" +
      (end < state.matches.length ? " (first " + end + " listed)" : "");
    count.dataset.matches = state.matches.length;
    more.hidden = end >= state.matches.length;
    more.textContent = "show more (" + (state.matches.length - end) + " not listed)";
  }

  // --- one query ------------------------------------------------------------
  function words(text) {
    var out = new Set(), re = /[\p{L}\p{N}]+/gu, m;
    while ((m = re.exec(text))) {
      var w = m[0].toLowerCase();
      if (!STOP.has(w)) out.add(w);
    }
    return out;
  }
  function highlight(node, text, ws) {
    var re = /[\p{L}\p{N}]+/gu, last = 0, m;
    while ((m = re.exec(text))) {
      if (!ws.has(m[0].toLowerCase())) continue;
      if (m.index > last) node.appendChild(document.createTextNode(text.slice(last, m.index)));
      node.appendChild(el("mark", null, m[0]));
      last = m.index + m[0].length;
    }
    if (last < text.length) node.appendChild(document.createTextNode(text.slice(last)));
    return node;
  }
  function verdict(correct) {
    return el("span", correct ? "right" : "wrong", correct ? " \u2713 right" : " \u2717 wrong");
  }
  function doc(d, rank, ws, tailPatch) {
    var box = el("div", "doc" + (d[3] ? " fact" : "")), head = el("div", "head");
    head.appendChild(el("span", "rank", "#" + rank));
    head.appendChild(el("span", "score", "score " + num(d[1], 4)));
    head.appendChild(el("span", "docid", d[0]));
    if (d[3]) head.appendChild(el("span", "fact-badge", "\u2713 fact"));
    if (tailPatch && d[4] != null)
      head.appendChild(el("span", "tail-patch", "tail-patch " + num(d[4], 4)));
    box.appendChild(head);
    if (d[2] == null) box.appendChild(el("div", "text muted", "(no text in the results file)"));
    else box.appendChild(highlight(el("div", "text"), TEXTS[d[2]], ws));
    return box;
  }
  function field(dl, name, value) {
    dl.appendChild(el("dt", null, name));
    var dd = el("dd");
    if (value instanceof Node) dd.appendChild(value); else dd.textContent = value;
    dl.appendChild(dd);
    return dd;
  }
  function renderDetail(i) {
    var q = Q[i], ws = words(q.prompt + " " + q.target);
    detail.textContent = "";
    detail.appendChild(el("h2", null, q.id));
    var dl = el("dl", "query");
    field(dl, "prompt", q.prompt);
    field(dl, "target", q.target);
    if (q.tp != null) field(dl, "p(target)", q.tp.toPrecision(3));
    if (q.prediction != null) {
      var p = field(dl, "prediction", q.prediction);
      if (q.correct != null) p.appendChild(verdict(q.correct));
    } else if (q.correct != null) {
      field(dl, "prediction", "").appendChild(verdict(q.correct));
    }
    if (q.pp != null) field(dl, "p(prediction)", q.pp.toPrecision(3));
    if (q.bucket != null) field(dl, "bucket", q.bucket);
    if (q.facts) field(dl, "fact documents", q.facts.join(", ") || "(none)");
    Object.keys(q.x).forEach(function (k) { field(dl, k, show(q.x[k])); });
    detail.appendChild(dl);
    var grid = el("div", "runs");
    grid.style.setProperty("--n", METHODS.length);
    METHODS.forEach(function (m, r) {
      var col = el("section", "run"), e = RUNS[r][i];
      col.dataset.method = m;
      col.appendChild(el("h3", null, m));
      if (!e) {
        col.appendChild(el("p", "muted", "not in this run"));
        grid.appendChild(col);
        return;
      }
      if (e.pred != null || e.correct != null) {
        var pp = el("p", null, "prediction" + (e.pred != null ? ": " + e.pred : ""));
        if (e.correct != null) pp.appendChild(verdict(e.correct));
        col.appendChild(pp);
      }
      if (e.e) col.appendChild(el("p", "error", "error: " + e.e));
      var hasPatch = e.p.some(function (d) { return d[4] != null; });
      col.appendChild(el("h4", null, "proponents (" + e.p.length + ")"));
      var props = el("div", "proponents");
      e.p.forEach(function (d, k) { props.appendChild(doc(d, k + 1, ws, hasPatch)); });
      col.appendChild(props);
      if (e.o.length) {
        var det = el("details", "opponents");
        det.appendChild(el("summary", null, "opponents (" + e.o.length + ")"));
        e.o.forEach(function (d, k) { det.appendChild(doc(d, k + 1, ws, false)); });
        col.appendChild(det);
      }
      grid.appendChild(col);
    });
    detail.appendChild(grid);
  }
  function select(i, keepHash) {
    state.selected = i;
    Array.prototype.forEach.call(list.querySelectorAll("li.selected"), function (li) {
      li.className = "";
    });
    var li = list.querySelector('li[data-index="' + i + '"]');
    if (li) li.className = "selected";
    renderDetail(i);
    var link = null;
    try { link = "#q=" + encodeURIComponent(Q[i].id); }
    catch (err) {}  // an id with a lone surrogate has no URI: no link, no error
    if (!keepHash && link !== null) history.replaceState(null, "", link);
    return li;
  }
  function fromHash() {
    var m = /^#q=(.*)$/.exec(location.hash), id = null;
    if (!m) return false;
    try { id = decodeURIComponent(m[1]); } catch (err) { return false; }
    if (!byId.has(id)) return false;
    select(byId.get(id), true);
    return true;
  }
  document.addEventListener("keydown", function (ev) {
    var tag = ev.target.tagName;
    if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA" ||
        ev.ctrlKey || ev.metaKey || ev.altKey) return;
    var step = ev.key === "j" ? 1 : ev.key === "k" ? -1 : 0;
    if (!step || !state.matches.length) return;
    var pos = state.matches.indexOf(state.selected);
    pos = pos < 0 ? 0 : Math.max(0, Math.min(state.matches.length - 1, pos + step));
    if (pos >= state.shown) showMore(pos + 1 - state.shown);
    var li = select(state.matches[pos]);
    if (li) li.scrollIntoView({block: "nearest"});
  });
  window.addEventListener("hashchange", fromHash);

  $("meta").textContent = METHODS.length + (METHODS.length === 1 ? " run (" : " runs (") +
    METHODS.join(", ") + "), " + Q.length + " queries";
  summaryTables();
  setupFilters();
  applyFilters();
  if (!fromHash() && state.matches.length) select(state.matches[0], true);
})();
"""
