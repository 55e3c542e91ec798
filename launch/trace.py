r"""The whole pipeline: corpus + queries + checkpoint -> top-k proponents.

  python -m launch.trace --gin_file=configs/tiny.gin --workdir=W \
      --corpus=C.jsonl --queries=Q.jsonl --output=R.jsonl --top_k=10

The model is rebuilt from the checkpoint (default: the latest in
W/checkpoints). Steps: fit R^(-1/2) on a corpus sample and the queries, encode
the corpus into the store (W/store; a rerun resumes), encode the queries, scan.
``--streaming`` skips the store and scores each corpus batch as it is encoded.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
import jax

from launch import config
from launch import pipeline
from tracer import evaluate
from tracer import hessian
from tracer import scan as scan_lib
from tracer import store as store_lib

flags.DEFINE_bool("streaming", False, "Score corpus batches as they are encoded; "
                  "no store.")
flags.DEFINE_integer("show", 5, "Queries to print in the summary table.")
FLAGS = flags.FLAGS


def open_store(path: str, manifest: store_lib.Manifest) -> store_lib.EncodingStore:
  """Creates or resumes the store; process 0 creates it first on multi-host runs."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    if jax.process_index() == 0:
      store_lib.create_or_open(path, manifest)
    multihost_utils.sync_global_devices("tracer-store-created")
  return store_lib.create_or_open(path, manifest)


def preconditioner(workdir, encoder, corpus, query_examples, pcfg, batch_size,
                   path=None) -> hessian.Preconditioner | None:
  """Loads ``path`` when given, else fits R^(-1/2) and saves it in the workdir."""
  if path:
    pre = hessian.Preconditioner.load(path)
    if pre.dim != encoder.dim:
      raise ValueError(f"{path}: preconditioner has d={pre.dim}, encoder d={encoder.dim}")
    return pre
  pre = pipeline.fit_preconditioner(encoder, corpus, query_examples, pcfg, batch_size)
  if pre is not None:
    print(f"R^(-1/2): {pre.kind}, lambda={pre.lam:.4g}, {pre.num_train} corpus "
          f"examples, {pre.num_eval} queries, d={pre.dim}")
    if jax.process_index() == 0:
      pre.save(os.path.join(workdir, "preconditioner.npz"))
  return pre


def run(workdir: str, corpus_source: str, queries_path: str, output: str,
        top_k: int = 10, checkpoint: str | None = None, store_path: str | None = None,
        preconditioner_path: str | None = None, streaming: bool = False,
        show: int = 5) -> list[dict]:
  """Runs the pipeline; writes and returns the results rows."""
  ecfg = config.make(pipeline.EncodeConfig)
  pcfg = config.make(pipeline.PreconditionerConfig)
  ckpt = pipeline.load_checkpoint(workdir, checkpoint)
  corpus, queries, query_examples = pipeline.read_inputs(ckpt, corpus_source,
                                                         queries_path)
  encoder, kind, eps = pipeline.build_encoder(ckpt, ecfg)
  print(f"checkpoint {ckpt.path} (step {ckpt.step}); corpus {len(corpus)} rows; "
        f"{len(queries)} queries; d={encoder.dim}; correction={kind}; "
        f"mesh {dict(encoder.mesh.shape)}")
  os.makedirs(workdir, exist_ok=True)
  pre = preconditioner(workdir, encoder, corpus, query_examples, pcfg,
                       ecfg.batch_size, preconditioner_path)
  query_enc = encoder.encode(query_examples, pre, ids=[q["id"] for q in queries])
  if streaming:
    topk = pipeline.stream_corpus(encoder, pre, corpus, query_enc, top_k,
                                  ecfg.batch_size)
  else:
    manifest = pipeline.manifest(ckpt, encoder, kind, eps, pre, corpus, ecfg)
    store = open_store(store_path or os.path.join(workdir, "store"), manifest)
    pipeline.encode_corpus(encoder, pre, corpus, store, ecfg.batch_size)
    topk = scan_lib.scan_store(store, query_enc, top_k, mesh=encoder.mesh)
  rows = pipeline.result_rows(queries, corpus, topk)
  if jax.process_index() == 0:
    evaluate.write_results(output, rows)
    print(f"wrote {len(rows)} results to {output}")
    if all("fact_doc_ids" in q for q in queries):
      metrics = evaluate.retrieval_metrics(queries, {r["query_id"]: r for r in rows})
      by_bucket = {"all": metrics, **metrics.get("buckets", {})}
      print("\n" + evaluate.format_table(by_bucket, ["mrr", "recall@10",
                                                     "precision@10", "num_queries"],
                                         row_header="bucket"))
    if show:
      preds = pipeline.predictions(ckpt, query_examples, queries,
                                   pipeline.vocabulary(ckpt))
      print("\n" + evaluate.format_table(pipeline.completion_accuracy(queries, preds),
                                         ["accuracy", "num_queries"],
                                         row_header="greedy completion"))
      # The proponents come last, so a terminal shows them.
      pipeline.print_table(rows, preds, show)
  return rows


def main(argv):
  del argv
  config.setup(required=("workdir", "corpus", "queries", "output"))
  run(FLAGS.workdir, FLAGS.corpus, FLAGS.queries, FLAGS.output, FLAGS.top_k,
      FLAGS.checkpoint, FLAGS.store, FLAGS.preconditioner, FLAGS.streaming,
      FLAGS.show)


if __name__ == "__main__":
  app.run(main)
