r"""Queries -> top-k proponents and opponents from an encoded store.

  python -m launch.scan --gin_file=configs/tiny.gin --workdir=W --corpus=C \
      --queries=Q.jsonl --output=R.jsonl [--store=W/store] \
      [--preconditioner=W/preconditioner.npz] --top_k=10

The queries are encoded with the same checkpoint, projection and
preconditioner as the store; the store's manifest is checked against them and
a mismatch names the fields that differ. ``--corpus`` maps rows back to ids
and texts (only the rows retrieved are read). Each host scans the rows of its
own devices; process 0 writes the results.
"""

from __future__ import annotations

from absl import app
from absl import flags

from launch import common
from launch import config
from tracer import pipeline
from tracer import scan as scan_lib
from tracer import store as store_lib

FLAGS = flags.FLAGS


def run(workdir, corpus_source, queries_path, output, top_k=10, store_path=None,
        preconditioner_path=None, checkpoint=None):
  ecfg, ckpt, corpus, encoder, kind, eps = common.start(workdir, checkpoint,
                                                        corpus_source)
  queries, query_examples = pipeline.read_queries(ckpt, queries_path)
  pre = common.load_preconditioner(preconditioner_path, encoder.dim)
  expected = pipeline.manifest(ckpt, encoder, kind, eps, pre, corpus, ecfg)
  store = store_lib.open_store(common.default_location(workdir, store_path, "store"),
                               expected)
  if store.num_rows != len(corpus):
    raise store_lib.IncompatibleStoreError(
        f"{store.path}: {store.num_rows} rows, but --corpus={corpus_source} has "
        f"{len(corpus)}")
  query_enc = encoder.encode(query_examples, pre, ids=[q["id"] for q in queries])
  topk = scan_lib.scan_store(store, query_enc, top_k, mesh=encoder.mesh)
  rows = pipeline.result_rows(queries, corpus, topk)
  pipeline.write_results(output, rows)
  common.say(f"wrote {len(rows)} results to {output}")
  return rows


def main(argv):
  del argv
  config.setup(required=("workdir", "corpus", "queries", "output"))
  run(FLAGS.workdir, FLAGS.corpus, FLAGS.queries, FLAGS.output, FLAGS.top_k,
      FLAGS.store, FLAGS.preconditioner, FLAGS.checkpoint)


if __name__ == "__main__":
  app.run(main)
