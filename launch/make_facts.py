r"""Writes the generated fact corpus: DIR/corpus.jsonl and DIR/queries.jsonl.

  tracer make-facts --out=/tmp/facts [--style=plain] [--seed=0] \
      [--facts_per_bucket=60] [--distractor_docs=150]

DIR may be a local path or a gs://, s3://, memory:// or file:// URL
(``tracer.storage``). ``--style`` picks one of ``tracer.facts.STYLES``
(plain, paraphrase, natural, dense): what makes attribution hard in the set
(see ``tracer.facts``).
"""

from __future__ import annotations

import json

from absl import flags

from tracer.launch import cli
from tracer.launch import outputs
from tracer import facts
from tracer import storage

_OUT = flags.DEFINE_string(
    "out", None, "Output directory: a path or a gs://, s3://, memory:// or "
    "file:// URL.", required=True)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every random choice.",
                             lower_bound=0)
_STYLE = flags.DEFINE_enum("style", "plain", list(facts.STYLES),
                           "Fact style (tracer.facts.STYLES).")
_FACTS_PER_BUCKET = flags.DEFINE_integer(
    "facts_per_bucket", 60, "Query facts per frequency bucket.", lower_bound=1,
    upper_bound=facts.MAX_FACTS_PER_BUCKET)
_DISTRACTOR_DOCS = flags.DEFINE_integer(
    "distractor_docs", 150, "Documents holding only filler sentences.",
    lower_bound=0, upper_bound=facts.MAX_DISTRACTOR_DOCS)


def main(argv):
  del argv  # (cli.run refuses any)
  # Before any work: an unknown URL scheme, a file where the directory goes,
  # a directory that cannot be written (before 2026-12-06 a file was
  # "FILE/corpus.jsonl: cannot write: File exists").
  outputs.check_writable(_OUT.value, "--out", "directory")
  config = facts.style_config(
      _STYLE.value, _SEED.value,
      facts_per_bucket=_FACTS_PER_BUCKET.value,
      distractor_docs=_DISTRACTOR_DOCS.value)
  corpus_path, queries_path = facts.write_fact_corpus(_OUT.value, config)
  # Re-read what was written, so the counts describe the files themselves.
  # (split at "\n" only: a text may hold U+2028, which splitlines splits at)
  corpus, queries = ([json.loads(line) for line in
                      storage.read_text(path).split("\n") if line]
                     for path in (corpus_path, queries_path))
  fact_docs = {d for q in queries for d in q["fact_doc_ids"]}
  print(f"style:     {_STYLE.value}")
  print(f"corpus:    {corpus_path}")
  print(f"queries:   {queries_path}")
  print(f"rows:      {len(corpus)} ({len(fact_docs)} state a fact, "
        f"{len(corpus) - len(fact_docs)} state none)")
  print(f"characters: {sum(len(d['text']) for d in corpus)} total, "
        f"{max(len(d['text']) for d in corpus)} longest document")
  print(f"queries:   {len(queries)}")
  for bucket, n in facts.bucket_counts(queries).items():
    docs = [len(q["fact_doc_ids"]) for q in queries if q["bucket"] == bucket]
    print(f"  bucket {bucket:>5}: {n} queries, {sum(docs)} fact documents "
          f"({min(docs)}-{max(docs)} per fact)")


if __name__ == "__main__":
  cli.run(main)
