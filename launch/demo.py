r"""The built-in demo: facts -> tiny model -> encodings -> proponents.

  tracer demo --workdir=demo

Generates the fact corpus (WORKDIR/facts), trains the tiny model unless
WORKDIR already has a checkpoint, then runs ``launch.trace``, prints for a
few queries the prompt, the model's prediction and the top proponents, and
writes WORKDIR/report.html: every query's proponents and opponents, to open
in a browser (``tracer view``). ``--family=gemma`` does the same with a tiny
Gemma 3 architecture from the gemma library (``configs/gemma_tiny.gin``;
``pip install 'tracer[gemma]'``).
"""

from __future__ import annotations

import os

from absl import flags

from tracer.launch import config
from tracer.launch import trace
from tracer.launch import train
from tracer import facts
from tracer import viewer

FLAGS = flags.FLAGS


def ensure_model(workdir: str) -> tuple[str, str]:
  """Writes the fact corpus and trains the model unless a checkpoint exists;
  a workdir with one keeps the facts it holds (those its model was trained
  on: a `tracer family` set's, of other settings than the demo's, were
  replaced by the demo's before 2026-12-08, and scored on).

  Returns the corpus and queries paths.
  """
  made = os.path.join(workdir, "facts")
  corpus, queries = (os.path.join(made, n) for n in ("corpus.jsonl", "queries.jsonl"))
  checkpoints = os.path.join(workdir, "checkpoints")
  trained = os.path.isdir(checkpoints) and any(
      name.isdigit() for name in os.listdir(checkpoints))
  if not (trained and os.path.exists(corpus) and os.path.exists(queries)):
    corpus, queries = facts.write_fact_corpus(made)
  print(f"fact corpus: {corpus}, queries: {queries}")
  if not trained:
    print("training the model (no checkpoint in the workdir yet)")
    train.train(str(corpus), workdir)
  return str(corpus), str(queries)


def main(argv):
  del argv
  config.default_gin_file()
  config.parse_gin()
  config.use_compilation_cache()
  workdir = FLAGS.workdir or "demo"
  # (its corpus, model, results and page are all written there)
  config.check_writable(workdir, "--workdir", "directory")
  corpus, queries = ensure_model(workdir)
  rows = trace.run(workdir, corpus, queries, os.path.join(workdir, "results.jsonl"),
                   FLAGS.top_k, show=FLAGS.show)
  page = viewer.write_report(os.path.join(workdir, "report.html"), {"trackstar": rows},
                             title="tracer demo: TrackStar on the generated facts")
  print(f"\nreport: {os.path.abspath(page)} (open it in a browser)")


USES = ("workdir", "top_k", "check_chunks", "max_quarantined", "claim_timeout_s",
        "verify_store")


if __name__ == "__main__":
  config.run(main, uses=USES, shows=("family", "show"))
