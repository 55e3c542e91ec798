r"""Encodes a corpus into a tensorstore store (resumable).

  python -m launch.encode --gin_file=configs/tiny.gin --workdir=W --corpus=C.jsonl \
      [--preconditioner=W/preconditioner.npz] [--store=W/store]

Without ``--preconditioner`` the encodings get no R^(-1/2) (only the optimizer
correction, projection and unit norm). A killed run, run again, skips the
chunks already written.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags

from launch import config
from launch import pipeline
from launch import trace
from tracer import data as data_lib
from tracer import hessian

FLAGS = flags.FLAGS


def run(workdir, corpus_source, store_path=None, preconditioner_path=None,
        checkpoint=None):
  ecfg = config.make(pipeline.EncodeConfig)
  ckpt = pipeline.load_checkpoint(workdir, checkpoint)
  corpus = data_lib.read_corpus(corpus_source, pipeline.vocabulary(ckpt),
                                ckpt.model_config.max_len,
                                ckpt.data_config.get("overflow", "truncate"))
  encoder, kind, eps = pipeline.build_encoder(ckpt, ecfg)
  pre = hessian.Preconditioner.load(preconditioner_path) if preconditioner_path else None
  manifest = pipeline.manifest(ckpt, encoder, kind, eps, pre, corpus, ecfg)
  store = trace.open_store(store_path or os.path.join(workdir, "store"), manifest)
  pipeline.encode_corpus(encoder, pre, corpus, store, ecfg.batch_size)
  print(f"store {store.path}: {store.num_rows} rows x d={store.dim} "
        f"({store.manifest.dtype}), complete={store.is_complete()}")
  return store


def main(argv):
  del argv
  config.setup(required=("workdir", "corpus"))
  run(FLAGS.workdir, FLAGS.corpus, FLAGS.store, FLAGS.preconditioner, FLAGS.checkpoint)


if __name__ == "__main__":
  app.run(main)
