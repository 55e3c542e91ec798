r"""The whole pipeline: corpus + queries + checkpoint -> top-k proponents.

  tracer trace --gin_file=configs/tiny.gin --workdir=W \
      --corpus=C.jsonl --queries=Q.jsonl --output=R.jsonl --top_k=10

The model is rebuilt from the checkpoint (default: the latest in
W/checkpoints), its params restored onto the (data, model) mesh. Steps: the
corpus store (--store, default W/store, any path or gs:// / s3:// / memory://
URL): reused as it is when complete, resumed when not, else created in R_train's
eigenbasis (fitted on a corpus sample, or --basis) and encoded; then the
queries are projected, their task-specific R fitted, and the store scanned
with R applied at scan time. A new --queries file against an existing store
computes no corpus gradient, and needs no ``--corpus``: without it the
rows map back to the store's own corpus, as its manifest names it (as
``tracer scan``). ``--corpus`` may be a directory made by
``launch.tokenize``. ``--streaming`` skips the store and scores each corpus
batch as it is encoded (its basis saved at --basis, default W/basis.npz); a
store's flags (``STORE_FLAGS``) set with it are refused.

``--sum_steps=200,400`` scores each row by TrackStar summed over those
checkpoints of the run and the traced one (on the generated fact family,
MRR 0.88 against 0.66 for the last checkpoint alone: WORKSPACE.md): each
step gets its own store (``<store>-step200``, ...), basis and query metric,
and the scan reads the same rows from every store at once
(``scan.scan_stores``). Each step costs one more encode of the corpus.

``--task_queries=T.jsonl`` fits R from a task's queries instead of from
--queries: a few queries (even one) then get the R of the task they belong
to, not one fitted from themselves alone (``pipeline.task_metric``; the
family's figures are in WORKSPACE.md).

``--queries=A.jsonl,B.jsonl --output=RA.jsonl,RB.jsonl``: several query
sets (tasks), each with its own R, scanned in one pass over the store
(``scan.scan_sets``), one output per queries file (as ``tracer scan``; not
with ``--streaming``).

On several hosts run the same command on each (see WORKSPACE.md): each reads
and encodes only its share of the corpus; process 0 writes the results.
"""

from __future__ import annotations

from absl import flags
import jax

from tracer.launch import common
from tracer.launch import config
from tracer import evaluate
from tracer import pipeline
from tracer import storage
from tracer import store as store_lib
from tracer.config import PreconditionerConfig
from tracer.errors import InputError

flags.DEFINE_bool("streaming", False, "Score corpus batches as they are encoded; "
                  "no store.")
flags.DEFINE_integer("show", 5, "Queries to print in the summary table.",
                     lower_bound=0)
FLAGS = flags.FLAGS

# launch.common's flags for a store, which a streaming run neither writes nor
# reads.
STORE_FLAGS = ("store", "verify_store", "check_chunks", "claim_timeout_s")


def check_streaming_flags() -> None:
  """InputError if --streaming comes with a store's flag the user set (one
  it would ignore); defaults are not counted."""
  given = [f"--{n}" for n in STORE_FLAGS if FLAGS[n].present]
  if FLAGS.streaming and given:
    them = "they" if len(given) > 1 else "it"
    raise InputError(f"--streaming with {', '.join(given)}: a streaming run "
                     f"keeps no store, so {them} would be ignored; expected "
                     "--streaming alone, or a run on a store without it")


def run(workdir: str, corpus_source: str | None, queries_path: str, output: str,
        top_k: int = 10, checkpoint: str | None = None, store_path: str | None = None,
        basis_path: str | None = None, streaming: bool = False,
        show: int = 5, sum_steps=(), task_queries: str | None = None,
        shard_queries: bool | None = None) -> list[dict]:
  """Runs the pipeline; writes and returns the results rows.
  ``queries_path``, ``output``: one file each, or comma-separated lists of
  as many (several query sets in one pass over the store; then one list of
  rows per set is returned). ``corpus_source`` None: the existing store's
  own. ``sum_steps``: score rows by the sum over those checkpoints of the
  run and this one. ``task_queries``: a queries file whose R scores these
  queries. ``shard_queries``: the scan's (``scan.scan_stores``; None: its
  default)."""
  sets = config.query_set_files(queries_path, output)
  common.check_query_sets(sets, streaming)
  pcfg = config.make(PreconditionerConfig)
  location = common.default_location(workdir, store_path, "store")
  if streaming and list(sum_steps):  # before the checkpoint loads
    raise InputError("--sum_steps needs a store per step; it does not go with "
                     "--streaming")
  if streaming:
    if not corpus_source:
      raise InputError("--streaming encodes the corpus: --corpus required")
    run_ = common.start(workdir, checkpoint, corpus_source, None)
  else:  # (streaming, --basis is where the basis is saved)
    common.check_given_basis(basis_path)
    run_, corpus_source = common.start_on_store(workdir, checkpoint, corpus_source,
                                                location)
  config.check_top_k(top_k, len(run_.corpus))  # before any gradient
  others = common.summed_checkpoints(sum_steps, run_.ckpt)
  ckpt, corpus, encoder = run_.ckpt, run_.corpus, run_.encoder
  read = [pipeline.read_queries(ckpt, path) for path, _ in sets]
  count = sum(len(queries) for queries, _ in read)
  common.say(f"checkpoint {ckpt.path} (step {ckpt.step}); corpus {len(corpus)} rows; "
             f"{count} queries{f' in {len(sets)} sets' if len(sets) > 1 else ''}; "
             f"d={encoder.dim}; correction={run_.correction}; "
             f"mesh {dict(encoder.mesh.shape)}")
  storage.make_local_dirs(workdir)
  params_fp = store_lib.fingerprint(ckpt.params)
  if streaming:
    (queries, query_examples), = read
    basis = common.fitted_basis(
        common.default_location(workdir, basis_path, "basis.npz"), run_, pcfg,
        params_fp)
    metric, vectors, skipped = common.query_metric(
        run_, basis, query_examples, queries, pcfg,
        common.task_metric(run_, basis, task_queries, pcfg))
    topk, quarantined = pipeline.stream_corpus(
        encoder, basis, corpus, vectors, metric, top_k,
        run_.encode_config.batch_size, common.Progress("encode + score corpus"),
        max_quarantined=FLAGS.max_quarantined, shard_queries=shard_queries,
        on_plan=common.say_query_plan)
    common.say(f"streamed {len(corpus)} corpus rows; {quarantined} left out "
               "(non-finite loss or gradient)")
    found = [(topk, skipped)]
  else:
    store, basis = common.encoded_store(location, run_, pcfg, params_fp, basis_path)
    found = common.scan_query_sets(
        run_, store, basis, read, others, workdir, corpus_source, location,
        lambda loc, other: common.encoded_store(
            loc, other, pcfg, store_lib.fingerprint(other.ckpt.params)),
        pcfg, task_queries, top_k, shard_queries)
  results = []
  for (queries, query_examples), (topk, skipped), (path, out) in zip(
      read, found, sets):
    rows, preds = common.write_set(run_, queries, query_examples, topk, skipped,
                                   out)
    results.append(rows)
    if len(sets) > 1:
      common.say(f"\nqueries {path}:")
    _summarize(queries, rows, preds, show)
  return results[0] if len(sets) == 1 else results


def _summarize(queries, rows, preds, show: int) -> None:
  """A query set's retrieval metrics (where its queries name their fact
  documents), completion accuracy and its first ``show`` queries' results."""
  if all("fact_doc_ids" in q for q in queries):
    metrics = evaluate.retrieval_metrics(queries, {r["query_id"]: r for r in rows})
    by_bucket = {"all": metrics, **metrics.get("buckets", {})}
    common.say("\n" + evaluate.format_table(
        by_bucket, ["mrr", "recall@10", "precision@10", "num_queries"],
        row_header="bucket"))
  if show:
    common.say("\n" + evaluate.format_table(
        pipeline.completion_accuracy(queries, preds), ["accuracy", "num_queries"],
        row_header="greedy completion"))
    # The proponents come last, so a terminal shows them.
    if jax.process_index() == 0:
      common.print_table(rows, preds, show)


def main(argv):
  del argv
  config.setup(required=("workdir", "queries", "output"), query_sets=True,
               reads_basis=FLAGS.streaming)
  check_streaming_flags()
  # What it makes at its defaults, if new: the basis of a streaming run, else
  # the store.
  made = ([] if FLAGS.basis else ["basis.npz"]) if FLAGS.streaming else (
      [] if FLAGS.store else ["store"])
  if made:
    config.check_workdir_writable(*made)
  run(FLAGS.workdir, FLAGS.corpus, FLAGS.queries, FLAGS.output, FLAGS.top_k,
      FLAGS.checkpoint, FLAGS.store, FLAGS.basis, FLAGS.streaming, FLAGS.show,
      FLAGS.sum_steps, FLAGS.task_queries,
      common.SHARD_QUERIES[FLAGS.shard_queries])


# The shared flags (config.SCRIPT_FLAGS) this script reads.
USES = ("workdir", "checkpoint", "corpus", "store", "basis", "queries",
        "task_queries", "output", "top_k", "sum_steps", "check_chunks",
        "max_quarantined", "claim_timeout_s", "verify_store", "tokenizer",
        "opt_state", "shard_queries")


if __name__ == "__main__":
  config.run(main, uses=USES)
