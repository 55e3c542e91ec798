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
as one process would write). Nothing waits for the others: a rerun of a
finished part only tries the join again.
"""

from __future__ import annotations

import time

from absl import flags

from tracer.launch import common
from tracer.launch import config
from tracer import corpus as corpus_lib
from tracer.config import DataConfig, ModelConfig

FLAGS = flags.FLAGS


def run(source: str, output: str, num_shards: int = 1, shard_index: int = 0
        ) -> corpus_lib.TokenizedCorpus:
  data_config = config.make(DataConfig)
  max_len = config.make(ModelConfig).max_len
  start = time.perf_counter()
  progress = common.Progress("tokenize", unit="rows")
  written = [0]

  def report(n):
    written[0] += n
    progress(written[0])

  corpus = corpus_lib.tokenize(source, output, data_config, max_len, progress=report,
                               num_shards=num_shards, shard_index=shard_index)
  progress.close()  # the row count is not known until the end
  m = corpus.manifest
  seconds = time.perf_counter() - start
  where = corpus.location if m.shard else output
  if m.shard:
    where += (f" (part {shard_index} of {num_shards}; the corpus is joined when "
              "every part is written)")
  if num_shards > 1:
    done = f", {written[0]:,} rows written by process {shard_index}"
  else:
    done = (f", {written[0] / seconds:,.0f} rows/s" if written[0]
            else " (already tokenized)")
  # Every process says what it wrote (each host has its own log).
  print(f"{where}: {m.num_rows:,} rows of up to {m.max_len} tokens from "
        f"{m.num_docs:,} documents ({m.tokenizer}, overflow={m.overflow}, "
        f"{m.token_dtype}); {seconds:.1f} s{done}", flush=True)
  return corpus


def main(argv):
  del argv
  config.setup(required=("corpus", "output"), output_is="directory")
  import jax  # pylint: disable=g-import-not-at-top
  run(FLAGS.corpus, FLAGS.output, jax.process_count(), jax.process_index())


if __name__ == "__main__":
  config.run(main)
