r"""Fits R^(-1/2) from a corpus sample and the queries, and saves it.

  python -m launch.fit_preconditioner --gin_file=configs/tiny.gin --workdir=W \
      --corpus=C.jsonl --queries=Q.jsonl [--preconditioner=W/preconditioner.npz]

``PreconditionerConfig`` (gin) picks block/full, task-specific or not, the
sample size, the lambda rule's rank and the damping.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags

from launch import config
from launch import pipeline

FLAGS = flags.FLAGS


def run(workdir, corpus_source, queries_path, out_path=None, checkpoint=None):
  ecfg = config.make(pipeline.EncodeConfig)
  pcfg = config.make(pipeline.PreconditionerConfig)
  ckpt = pipeline.load_checkpoint(workdir, checkpoint)
  corpus, _, query_examples = pipeline.read_inputs(ckpt, corpus_source, queries_path)
  encoder, _, _ = pipeline.build_encoder(ckpt, ecfg)
  pre = pipeline.fit_preconditioner(encoder, corpus, query_examples, pcfg,
                                    ecfg.batch_size)
  if pre is None:
    raise app.UsageError("PreconditionerConfig.kind is 'none': nothing to fit")
  out_path = out_path or os.path.join(workdir, "preconditioner.npz")
  pre.save(out_path)
  print(f"saved {out_path}: {pre.kind}, lambda={pre.lam:.4g}, d={pre.dim}, "
        f"{pre.num_train} corpus examples, {pre.num_eval} queries")
  return pre


def main(argv):
  del argv
  config.setup(required=("workdir", "corpus", "queries"))
  run(FLAGS.workdir, FLAGS.corpus, FLAGS.queries, FLAGS.preconditioner,
      FLAGS.checkpoint)


if __name__ == "__main__":
  app.run(main)
