r"""Fits R_train's eigenbasis on a corpus sample and saves it.

  tracer fit-preconditioner --gin_file=configs/tiny.gin --workdir=W \
      --corpus=C [--basis=W/basis.npz]

``PreconditionerConfig`` (gin) picks block or full R, the sample size and
seed. On several hosts each reads and projects only its part of the sample;
the moments are all-reduced. A saved basis fitted the same way is reused, not
refit. Stores are encoded in this basis (``launch.encode --basis``); each
query set's task-specific R (lambda rule, damping) is applied at scan time.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags

from tracer.launch import common
from tracer.launch import config
from tracer.launch import outputs
from tracer import storage
from tracer import store as store_lib
from tracer.config import PreconditionerConfig

FLAGS = flags.FLAGS


def run(workdir, corpus_source, out_path=None, checkpoint=None):
  pcfg = config.make(PreconditionerConfig)
  if pcfg.kind == "none":
    raise app.UsageError("PreconditionerConfig.kind is 'none': nothing to fit")
  run_ = common.start(workdir, checkpoint, corpus_source)
  return common.fitted_basis(common.default_location(workdir, out_path, "basis.npz"),
                             run_, pcfg, store_lib.fingerprint(run_.ckpt.params))


def main(argv):
  del argv
  config.setup(required=("workdir", "corpus"))
  # Before the fit, a new basis's path (a saved one may be reused read-only).
  basis = common.default_location(FLAGS.workdir, FLAGS.basis, "basis.npz")
  if not FLAGS.basis:  # (named as the workdir the user gave)
    config.check_workdir_writable("basis.npz")
  if not os.path.exists(storage.local_path(basis) or basis):
    config.check_writable(basis, "--basis")
  # A store's own basis.npz (the default store's, or any store's) or a file
  # in a checkpoint would be replaced: the store's rows are in its basis.
  parent = storage.split(basis)[0]
  store = (parent if storage.exists(storage.join(parent, store_lib.MANIFEST))
           else storage.join(FLAGS.workdir, "store"))
  outputs.check_not_an_input(basis, {
      "corpus": FLAGS.corpus, "store": store,
      "checkpoint": FLAGS.checkpoint or storage.join(FLAGS.workdir, "checkpoints")},
      what="--basis")
  run(FLAGS.workdir, FLAGS.corpus, FLAGS.basis, FLAGS.checkpoint)


# The shared flags (config.SCRIPT_FLAGS) this script reads.
USES = ("workdir", "checkpoint", "corpus", "basis", "tokenizer", "opt_state")


if __name__ == "__main__":
  config.run(main, uses=USES)
