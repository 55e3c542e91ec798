r"""Queries -> top-k proponents and opponents from an encoded store.

  tracer scan --gin_file=configs/tiny.gin --workdir=W --corpus=C \
      --queries=Q.jsonl --output=R.jsonl [--store=W/store] --top_k=10

The queries are projected with the same checkpoint and projection as the
store (its manifest is checked, a mismatch names the fields that differ) and
put in the store's basis; their task-specific R (``PreconditionerConfig``:
lambda rule, damping) is fitted from them and applied at scan time. No corpus
gradient is computed. ``--corpus`` maps rows back to ids
and texts (only the rows retrieved are read). Each host scans the rows of its
own devices; process 0 writes the results.
"""

from __future__ import annotations

from absl import flags

from tracer.launch import common
from tracer.launch import config
from tracer.config import PreconditionerConfig
from tracer import pipeline
from tracer import scan as scan_lib

FLAGS = flags.FLAGS


def run(workdir, corpus_source, queries_path, output, top_k=10, store_path=None,
        checkpoint=None):
  pcfg = config.make(PreconditionerConfig)
  run_ = common.start(workdir, checkpoint, corpus_source)
  config.check_top_k(top_k, len(run_.corpus))  # before any gradient
  queries, query_examples = pipeline.read_queries(run_.ckpt, queries_path)
  location = common.default_location(workdir, store_path, "store")
  store = common.stored(location, run_)
  metric, vectors, skipped = common.query_metric(
      run_, pipeline.store_basis(store), query_examples, queries, pcfg)
  topk = scan_lib.scan_store(store, vectors, top_k, mesh=run_.encoder.mesh,
                             metric=metric.row_metric(),
                             verify=FLAGS.check_chunks,
                             progress=common.Progress("scan store", "rows"))
  preds = pipeline.predictions(run_.ckpt, query_examples, queries,
                               pipeline.data_config(run_.ckpt).vocabulary())
  rows = pipeline.result_rows(queries, run_.corpus, topk, skipped, preds)
  pipeline.write_results(output, rows)
  common.say(f"wrote {len(rows)} results to {output}")
  return rows


def main(argv):
  del argv
  config.setup(required=("workdir", "corpus", "queries", "output"))
  run(FLAGS.workdir, FLAGS.corpus, FLAGS.queries, FLAGS.output, FLAGS.top_k,
      FLAGS.store, FLAGS.checkpoint)


if __name__ == "__main__":
  config.run(main)
