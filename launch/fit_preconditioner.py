r"""Fits R^(-1/2) from a corpus sample and the queries, and saves it.

  python -m launch.fit_preconditioner --gin_file=configs/tiny.gin --workdir=W \
      --corpus=C --queries=Q.jsonl [--preconditioner=W/preconditioner.npz]

``PreconditionerConfig`` (gin) picks block/full, task-specific or not, the
sample size and seed, the lambda rule's rank and the damping. On several
hosts each reads and projects only its part of the sample; the moments are
all-reduced. A saved preconditioner fitted the same way is reused, not refit.
"""

from __future__ import annotations

from absl import app
from absl import flags

from launch import common
from launch import config
from tracer import pipeline
from tracer import store as store_lib
from tracer.config import PreconditionerConfig

FLAGS = flags.FLAGS


def run(workdir, corpus_source, queries_path, out_path=None, checkpoint=None):
  pcfg = config.make(PreconditionerConfig)
  if pcfg.kind == "none":
    raise app.UsageError("PreconditionerConfig.kind is 'none': nothing to fit")
  ecfg, ckpt, corpus, encoder, kind, eps = common.start(workdir, checkpoint,
                                                        corpus_source)
  _, query_examples = pipeline.read_queries(ckpt, queries_path)
  key = pipeline.fit_key(store_lib.fingerprint(ckpt.params), encoder, kind, eps,
                         corpus, query_examples, pcfg)
  return common.preconditioner(
      common.default_location(workdir, out_path, "preconditioner.npz"), encoder,
      corpus, query_examples, pcfg, ecfg.batch_size, key)


def main(argv):
  del argv
  config.setup(required=("workdir", "corpus", "queries"))
  run(FLAGS.workdir, FLAGS.corpus, FLAGS.queries, FLAGS.preconditioner,
      FLAGS.checkpoint)


if __name__ == "__main__":
  app.run(main)
