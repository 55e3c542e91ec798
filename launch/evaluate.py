r"""Scores results files against the queries' fact_doc_ids.

  tracer evaluate --queries=Q.jsonl --results=R.jsonl \
      [--results=R2.jsonl ...] --output=M.json

Each results file is a method, named by its file stem. M.json maps method to
its metrics (tracer.evaluate.retrieval_metrics); an existing M.json (a path
or tracer.storage URL) is merged into, key by key within each method, so
numbers other tools wrote there (e.g. tail-patch) are kept. Prints markdown
tables: overall, then one per bucket.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags

from tracer.launch import cli
from tracer.launch import outputs
from tracer import evaluate
from tracer import storage
from tracer.errors import InputError, at

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this tool's flags; only when run as a program, so that tests can
  import several launch modules whose flag names overlap."""
  flags.DEFINE_string("queries", None,
                      "Queries JSONL with fact_doc_ids (and bucket).",
                      required=True)
  flags.DEFINE_multi_string("results", None,
                            "Results JSONL; repeat for several methods.",
                            required=True)
  flags.DEFINE_string("output", None,
                      "Metrics JSON to write or merge into (optional).")
  flags.DEFINE_integer("k", 10, "Cut-off for recall and precision.",
                       lower_bound=1)


def _load_existing(location) -> dict[str, Any]:
  """The metrics file at ``location`` (a path or ``tracer.storage`` URL) to
  merge into; {} if there is none. Read through ``storage``, as it is
  written, so a URL's file is merged into too."""
  location = os.fspath(location)
  expected = "expected a metrics file: a JSON object of method -> metrics"
  local = storage.local_path(location)
  if local is not None and os.path.isdir(local):
    raise InputError(f"{location}: is a directory; {expected}")
  data = storage.read_bytes(location)
  if data is None:
    return {}
  try:
    data = json.loads(data.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise InputError(f"{location}: not valid UTF-8 ({e.reason} at byte "
                     f"{e.start}); {expected}") from None
  except json.JSONDecodeError as e:
    raise InputError(f"{at(location, e.lineno)}: bad JSON: {e.msg}; "
                     f"{expected}") from None
  if not isinstance(data, dict) or not all(
      isinstance(v, dict) for v in data.values()):
    raise InputError(f"{at(location)}: {expected}")
  return data


def tables(metrics_by_method: dict[str, dict[str, Any]], k: int = 10) -> str:
  """Markdown: an overall table, then one per bucket."""
  columns = ["mrr", f"recall@{k}", f"precision@{k}", "num_queries", "missing"]
  parts = ["Overall\n\n" + evaluate.format_table(metrics_by_method, columns)]
  buckets: list[str] = []
  for m in metrics_by_method.values():
    buckets += [b for b in m.get("buckets", {}) if b not in buckets]
  buckets.sort(key=evaluate.bucket_sort_key)
  for b in buckets:
    per = {name: m["buckets"][b] for name, m in metrics_by_method.items()
           if b in m.get("buckets", {})}
    parts.append(f"Bucket {b}\n\n" + evaluate.format_table(per, columns))
  return "\n".join(parts)


# The keys ``evaluate.retrieval_metrics`` writes, at any k.
_RETRIEVAL_KEY = re.compile(r"mrr|num_queries|missing|no_ground_truth|errors|buckets|"
                            r"(recall|precision)@\d+")


def _check_results_of(queries, results, path, queries_path, k: int) -> None:
  """InputError if no row of ``results`` is of a query in ``queries`` (the
  method would score 0, its queries all counted as missing: the results of
  another query set); a warning line if ``k`` is past every proponent list
  (recall@k is then recall at that list's length, precision@k still divides
  by k)."""
  ids = [q.get("id") for q in queries]
  expected = f"expected the results of the queries in {queries_path}"
  if not results:
    raise InputError(f"{at(path)}: no results; {expected}")
  if not set(ids) & set(results):
    raise InputError(
        f"{at(path)}: none of its {len(results)} rows is of a query in "
        f"{queries_path} (query_id {next(iter(results))!r}; "
        f"{'its ids are such as ' + repr(ids[0]) if ids else 'it has none'}); "
        f"{expected}")
  longest = max(len(set(row["proponent_ids"])) for row in results.values())
  if longest < k:
    sys.stderr.write(
        f"warning: {path}: --k={k} is past its longest proponent list "
        f"({longest} documents), so recall@{k} counts only those listed and "
        f"precision@{k} divides by {k}\n")


def run(queries_path, results_paths: Sequence[str], output_path=None,
        k: int = 10) -> dict[str, dict[str, Any]]:
  """Evaluates each results file; merges into ``output_path`` if given.

  Returns the metrics of the methods evaluated in this call.
  """
  queries = evaluate.read_ground_truth(queries_path)  # ours or the authors'
  names = [pathlib.Path(p).stem for p in results_paths]
  if len(set(names)) != len(names):
    raise InputError(f"results files share a stem (method name): {names}")
  # Before any scoring: a metrics file that cannot be merged into ends the
  # run with nothing done.
  merged = _load_existing(output_path) if output_path else {}
  if output_path:
    outputs.check_writable(os.fspath(output_path), "--output")
  metrics = {}
  for name, path in zip(names, results_paths):
    results = evaluate.read_results(path)
    _check_results_of(queries, results, path, queries_path, k)
    metrics[name] = evaluate.retrieval_metrics(queries, results, k=k)
  if output_path:
    for name, m in metrics.items():
      # This tool's keys are replaced as one set (a rerun at another --k
      # must not leave the old recall@k beside the new mrr); other tools'
      # keys (tail-patch) stay.
      kept = {key: v for key, v in merged.get(name, {}).items()
              if not _RETRIEVAL_KEY.fullmatch(key)}
      merged[name] = {**kept, **m}
    evaluate.write_text_atomic(
        output_path, evaluate.json_text(merged, indent=2) + "\n")
  return metrics


def main(argv):
  del argv  # (cli.run refuses any)
  if FLAGS.output:  # before anything is read (run checks it can be written)
    outputs.check_not_an_input(FLAGS.output, {"queries": FLAGS.queries})
    for results in FLAGS.results:
      outputs.check_not_an_input(FLAGS.output, {"results": results})
  metrics = run(FLAGS.queries, FLAGS.results, FLAGS.output, FLAGS.k)
  print(tables(metrics, FLAGS.k))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
