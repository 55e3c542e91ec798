r"""Queries -> top-k proponents and opponents from an encoded store.

  tracer scan --gin_file=configs/tiny.gin --workdir=W --queries=Q.jsonl \
      --output=R.jsonl [--store=W/store] [--corpus=C] --top_k=10

The queries are projected with the same checkpoint and projection as the
store (its manifest is checked, a mismatch names the fields that differ) and
put in the store's basis; their task-specific R (``PreconditionerConfig``:
lambda rule, damping) is fitted from them and applied at scan time. No corpus
gradient is computed. ``--corpus`` maps rows back to ids and texts (only
the rows retrieved are read); by default the store's own, as its manifest
names it (``common.corpus_source``; ``tracer serve`` does the same). Each
host scans the rows of its own devices; process 0 writes the results.

``--sum_steps=200,400`` scores rows by TrackStar summed over those
checkpoints and this one, from the stores ``tracer trace --sum_steps`` made
(``<store>-step200``, ...); each step's queries are projected with its own
checkpoint and put in its store's basis.

Several query sets (tasks), each with its own R, in one pass over the store:

  tracer scan ... --queries=A.jsonl,B.jsonl --output=RA.jsonl,RB.jsonl

one output per queries file, in order (``scan.scan_sets``: each set's
results are what its own scan gives, up to the last bits of a score).
"""

from __future__ import annotations

import functools

from absl import flags

from tracer.launch import common
from tracer.launch import config
from tracer.config import PreconditionerConfig
from tracer import pipeline

FLAGS = flags.FLAGS


def _stored(location, run_, pcfg):
  store = common.stored(location, run_, pcfg)
  return store, pipeline.store_basis(store)


def run(workdir, corpus_source, queries_path, output, top_k=10, store_path=None,
        checkpoint=None, sum_steps=(), task_queries=None, shard_queries=None):
  """Writes and returns the results rows. ``queries_path``, ``output``: one
  file each, or comma-separated lists of as many: several query sets, each
  with its own R (``task_queries``' where given), in one pass over the
  store (``scan.scan_sets``); then one list of rows per set is returned.
  ``corpus_source`` None: the store's own. ``sum_steps``: score rows by
  the sum over those checkpoints and this one, each from its own store
  (``<store>-step<N>``, as ``tracer trace --sum_steps`` made them).
  ``task_queries``: a queries file whose R scores these queries.
  ``shard_queries``: ``scan.scan_stores``'s (``scan.scan_sets``')."""
  sets = config.query_set_files(queries_path, output)
  common.check_query_sets(sets)
  pcfg = config.make(PreconditionerConfig)
  location = common.default_location(workdir, store_path, "store")
  run_, corpus_source = common.start_on_store(workdir, checkpoint, corpus_source,
                                              location)
  config.check_top_k(top_k, len(run_.corpus))  # before any gradient
  others = common.summed_checkpoints(sum_steps, run_.ckpt, stores_at=location)
  read = [pipeline.read_queries(run_.ckpt, path) for path, _ in sets]
  store, basis = _stored(location, run_, pcfg)
  found = common.scan_query_sets(
      run_, store, basis, read, others, workdir, corpus_source, location,
      functools.partial(_stored, pcfg=pcfg), pcfg, task_queries, top_k,
      shard_queries)
  results = [common.write_set(run_, queries, examples, topk, skipped, out)[0]
             for (queries, examples), (topk, skipped), (_, out) in zip(
                 read, found, sets)]
  return results[0] if len(sets) == 1 else results


def main(argv):
  del argv
  config.setup(required=("workdir", "queries", "output"), query_sets=True)
  run(FLAGS.workdir, FLAGS.corpus, FLAGS.queries, FLAGS.output, FLAGS.top_k,
      FLAGS.store, FLAGS.checkpoint, FLAGS.sum_steps, FLAGS.task_queries,
      common.SHARD_QUERIES[FLAGS.shard_queries])


# The shared flags (config.SCRIPT_FLAGS) this script reads.
USES = ("workdir", "checkpoint", "corpus", "store", "queries", "task_queries",
        "output", "top_k", "sum_steps", "check_chunks", "tokenizer", "opt_state",
        "shard_queries")


if __name__ == "__main__":
  config.run(main, uses=USES)
