r"""Writes BM25 retrievals for a queries file in the results format.

  tracer bm25 --corpus=C.jsonl --queries=Q.jsonl --output=R.jsonl \
      --top_k=10

Proponents are the top_k highest-scoring documents sharing a word with the
query (ties to the lower corpus line; fewer where fewer match); opponents are the num_opponents lowest-scoring ones (see tracer.bm25).
"""

from __future__ import annotations

import time

from absl import flags
from absl import logging
import numpy as np

from tracer.launch import cli
from tracer.launch import outputs
from tracer import bm25
from tracer import corpus as corpus_lib
from tracer import data as data_lib
from tracer import evaluate
from tracer.errors import InputError, at

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this tool's flags; only when run as a program, so that tests can
  import several launch modules whose flag names overlap."""
  flags.DEFINE_string("corpus", None, "Corpus JSONL or Parquet ({id, text}; a "
                      "file or a glob; other field names after '#': "
                      "'FILES#text=content,id=hexsha') or a directory made by "
                      "launch.tokenize.",
                      required=True)
  flags.DEFINE_string("queries", None,
                      "Queries JSONL: {id, prompt, target, ...}, or the "
                      "TrackStar authors' query records.",
                      required=True)
  flags.DEFINE_string("output", None, "Results JSONL to write.", required=True)
  flags.DEFINE_integer("top_k", 10, "Proponents per query.", lower_bound=1)
  flags.DEFINE_integer("num_opponents", None,
                       "Opponents per query (default: top_k).", lower_bound=0)


def run(corpus_path, queries_path, output_path, top_k: int = 10,
        num_opponents: int | None = None) -> int:
  """Retrieves for every query and writes the results file; returns #queries."""
  if corpus_lib.is_tokenized(corpus_path):
    # A tokenized corpus: its rows (windows, with overflow='split').
    rows = corpus_lib.TokenizedCorpus(corpus_path)
    ids, texts = rows.ids_of(np.arange(len(rows))), rows.texts_of(np.arange(len(rows)))
  else:
    # A JSONL or Parquet file or glob (compressed, without ids: data.corpus_documents).
    ids, texts = [], []
    for doc_id, text in data_lib.corpus_documents(corpus_path):
      ids.append(doc_id)
      texts.append(text)
    if len(set(ids)) < len(ids):
      seen = set()
      twice = next(i for i in ids if i in seen or seen.add(i))
      raise data_lib.duplicate_id_error(corpus_path, twice)
  queries = data_lib.read_queries(queries_path)  # ours or the authors' format
  if not texts:
    raise InputError(f"{at(corpus_path)}: no documents")
  num_opponents = top_k if num_opponents is None else num_opponents
  # Past the corpus, every proponent would be listed as an opponent too.
  outputs.check_top_k(top_k, len(texts))
  outputs.check_top_k(num_opponents, len(texts), "--num_opponents", least=0)

  start = time.perf_counter()
  index = bm25.BM25Index(texts)
  query_texts = [bm25.query_text(q) for q in queries]
  top_idx, top_scores = index.search(query_texts, top_k)
  low_idx, low_scores = index.search(query_texts, num_opponents, lowest=True)
  logging.info("BM25 over %d documents, %d queries: %.2f s", len(texts),
               len(queries), time.perf_counter() - start)

  rows = []
  for q, ti, ts, li, ls in zip(queries, top_idx, top_scores, low_idx,
                               low_scores):
    ts, ti = ts[ti >= 0], ti[ti >= 0]  # past the query's matches
    rows.append(evaluate.make_result_row(
        q, [ids[j] for j in ti], ts, [texts[j] for j in ti],
        [ids[j] for j in li], ls, [texts[j] for j in li]))
  evaluate.write_results(output_path, rows)
  logging.info("wrote %d results to %s", len(rows), output_path)
  return len(rows)


def main(argv):
  del argv  # (cli.run refuses any)
  # Before the corpus is read (launch.config.setup's checks).
  outputs.check_writable(FLAGS.output, "--output")
  outputs.check_not_an_input(FLAGS.output, {"corpus": FLAGS.corpus,
                                            "queries": FLAGS.queries})
  run(FLAGS.corpus, FLAGS.queries, FLAGS.output, FLAGS.top_k,
      FLAGS.num_opponents)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
