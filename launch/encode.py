r"""Encodes a corpus into a store (resumable, on one host or many).

  tracer encode --gin_file=configs/tiny.gin --workdir=W --corpus=C \
      [--basis=W/basis.npz] [--store=W/store]

``--corpus`` is a JSONL file, a glob of shards, a seqio task, or a directory
made by ``launch.tokenize`` (the way to go at scale: each host then reads only
its rows). ``--store`` may be a path or a gs:// / s3:// / memory:// URL.
Rows are the projections in R_train's eigenbasis (from ``--basis``, made by
``launch.fit_preconditioner``, or fitted here on a corpus sample; the store
keeps it): no query set enters them, so any query set can be scanned against
the store later. A killed run, run again, encodes only the chunks not yet
written.
"""

from __future__ import annotations

from absl import flags

from tracer.launch import common
from tracer.launch import config
from tracer import store as store_lib
from tracer.config import PreconditionerConfig

FLAGS = flags.FLAGS


def run(workdir, corpus_source, store_path=None, basis_path=None, checkpoint=None):
  location = common.default_location(workdir, store_path, "store")
  common.check_given_basis(basis_path)
  run_ = common.start(workdir, checkpoint, corpus_source, location)
  store, _ = common.encoded_store(
      location, run_,
      config.make(PreconditionerConfig), store_lib.fingerprint(run_.ckpt.params),
      basis_path)
  # encoded_store returns once every host's chunks are written.
  common.say(f"process 0 read {run_.corpus.rows_read} corpus rows")
  return store


def main(argv):
  del argv
  config.setup(required=("workdir", "corpus"))
  if not FLAGS.store:  # (its default, WORKDIR/store, made if new)
    config.check_workdir_writable("store")
  run(FLAGS.workdir, FLAGS.corpus, FLAGS.store, FLAGS.basis, FLAGS.checkpoint)


# The shared flags (config.SCRIPT_FLAGS) this script reads.
USES = ("workdir", "checkpoint", "corpus", "store", "basis", "tokenizer",
        "opt_state", "max_quarantined", "claim_timeout_s", "verify_store")


if __name__ == "__main__":
  config.run(main, uses=USES)
