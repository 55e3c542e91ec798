r"""Encodes a corpus into a store (resumable, on one host or many).

  python -m launch.encode --gin_file=configs/tiny.gin --workdir=W --corpus=C \
      [--preconditioner=W/preconditioner.npz] [--store=W/store]

``--corpus`` is a JSONL file, a glob of shards, a seqio task, or a directory
made by ``launch.tokenize`` (the way to go at scale: each host then reads only
its rows). ``--store`` may be a path or a gs:// / s3:// / memory:// URL.
Without ``--preconditioner`` the encodings get no R^(-1/2) (only the optimizer
correction, projection and unit norm). A killed run, run again, encodes only
the chunks not yet written.
"""

from __future__ import annotations

from absl import app
from absl import flags

from launch import common
from launch import config
from tracer import pipeline

FLAGS = flags.FLAGS


def run(workdir, corpus_source, store_path=None, preconditioner_path=None,
        checkpoint=None):
  ecfg, ckpt, corpus, encoder, kind, eps = common.start(workdir, checkpoint,
                                                        corpus_source)
  pre = common.load_preconditioner(preconditioner_path, encoder.dim)
  manifest = pipeline.manifest(ckpt, encoder, kind, eps, pre, corpus, ecfg)
  store = pipeline.open_store(common.default_location(workdir, store_path, "store"),
                              manifest)
  encoded = pipeline.encode_corpus(encoder, pre, corpus, store, ecfg.batch_size,
                                   common.Progress("encode corpus"))
  common.say(f"store {store.path}: {store.num_rows} rows x d={store.dim} "
             f"({store.manifest.dtype}); this process encoded {encoded} rows, read "
             f"{corpus.rows_read}; complete={store.is_complete()}")
  return store


def main(argv):
  del argv
  config.setup(required=("workdir", "corpus"))
  run(FLAGS.workdir, FLAGS.corpus, FLAGS.store, FLAGS.preconditioner, FLAGS.checkpoint)


if __name__ == "__main__":
  app.run(main)
