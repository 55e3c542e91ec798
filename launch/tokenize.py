r"""Tokenizes a corpus once, to a directory every later stage reads row by row.

  tracer tokenize --gin_file=configs/tiny.gin --corpus=SRC --output=DIR

SRC is a JSONL or Parquet file, a glob of shards (quote it: 'data/*.jsonl',
'fineweb/data/*/*.parquet'), or a
registered seqio task or mixture (with --seqio_module). DIR (a path or a
gs:// / s3:// / memory:// URL) gets the token rows, the row table and a
manifest (``tracer.corpus``); rows and ids are exactly those the other stages
would build from SRC. The tokenizer, overflow rule (``DataConfig``) and row
length (``ModelConfig.max_len``) come from the gin config, and must match the
checkpoint's. Then pass ``--corpus=DIR`` to train, trace, encode, scan: on a
pod each host reads only its share of the rows.

Under ``jax.distributed`` (``TRACER_DISTRIBUTED=1`` on a pod, or
``--coordinator_address``, ``--num_processes``, ``--process_id``) every
process tokenizes its run of a glob's files (or of Parquet row groups,
when there are fewer than 8 files per process), or of a seqio source's shards
when it names them (``--corpus=c4_task#shards=1024``), into ``DIR/parts/``; the
last to finish writes the manifest that makes DIR one corpus (the same rows
as one process would write). A process that finishes early waits for the
corpus by reading its manifest, not in a collective
(``pipeline.tokenize_on_processes``: hosts' shares may finish hours apart;
before 2026-12-04 an early process exited and jax's shutdown barrier killed
every process once a share took 10 minutes longer than process 0's). A
rerun of a finished part only tries the join again.
"""

from __future__ import annotations

import time

from absl import flags

from tracer.launch import common
from tracer.launch import config
from tracer import corpus as corpus_lib
from tracer import pipeline
from tracer.config import DataConfig, ModelConfig
from tracer.errors import InputError

FLAGS = flags.FLAGS


def run(source: str, output: str) -> corpus_lib.TokenizedCorpus:
  """``source`` tokenized into ``output`` by every process (module doc); the
  whole corpus, on every process."""
  import jax  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  progress = common.Progress("tokenize", unit="rows")
  written = [0]

  def report(n):
    written[0] += n
    progress(written[0])

  corpus = pipeline.tokenize_on_processes(
      source, output, config.make(DataConfig), config.make(ModelConfig).max_len,
      progress=report)
  progress.close()  # the row count is not known until the end
  m = corpus.manifest
  seconds = time.perf_counter() - start
  if jax.process_count() > 1:
    done = f", {written[0]:,} rows written by process {jax.process_index()}"
  else:
    done = (f", {written[0] / seconds:,.0f} rows/s" if written[0]
            else " (already tokenized)")
  # Every process says what it wrote (each host has its own log).
  print(f"{output}: {m.num_rows:,} rows of up to {m.max_len} tokens from "
        f"{m.num_docs:,} documents ({m.tokenizer}, overflow={m.overflow}, "
        f"{m.token_dtype}); {seconds:.1f} s{done}", flush=True)
  leftover = corpus_lib.leftovers(output) if jax.process_index() == 0 else []
  if leftover:
    print(f"{output}: {len(leftover)} entr{'y' if len(leftover) == 1 else 'ies'} "
          "of an unfinished run on another process count "
          f"{'is' if len(leftover) == 1 else 'are'} not part of this corpus and "
          "never read: "
          f"{', '.join(leftover[:4])}{' ...' if len(leftover) > 4 else ''}; "
          "delete them to free their space", flush=True)
  return corpus


def main(argv):
  del argv
  config.setup(required=("corpus", "output"), output_is="directory")
  if corpus_lib.is_tokenized(FLAGS.corpus):  # (it said "is a directory; expected a file")
    raise InputError(f"--corpus={FLAGS.corpus}: already a tokenized corpus; pass "
                     "it as --corpus to the commands that read one (train, encode, "
                     "trace), or give tokenize its source files")
  run(FLAGS.corpus, FLAGS.output)


# The shared flags (config.SCRIPT_FLAGS) this script reads.
USES = ("corpus", "output")


if __name__ == "__main__":
  config.run(main, uses=USES)
