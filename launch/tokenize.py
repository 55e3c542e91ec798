r"""Tokenizes a corpus once, to a directory every later stage reads row by row.

  tracer tokenize --gin_file=configs/tiny.gin --corpus=SRC --output=DIR

SRC is a JSONL file, a glob of JSONL shards (quote it: 'data/*.jsonl'), or a
registered seqio task or mixture (with --seqio_module). DIR (a path or a
gs:// / s3:// / memory:// URL) gets the token rows, the row table and a
manifest (``tracer.corpus``); rows and ids are exactly those the other stages
would build from SRC. The tokenizer, overflow rule (``DataConfig``) and row
length (``ModelConfig.max_len``) come from the gin config, and must match the
checkpoint's. Then pass ``--corpus=DIR`` to train, trace, encode, scan: on a
pod each host reads only its share of the rows.
"""

from __future__ import annotations

import time

from absl import flags

from tracer.launch import common
from tracer.launch import config
from tracer import corpus as corpus_lib
from tracer.config import DataConfig, ModelConfig

FLAGS = flags.FLAGS


def run(source: str, output: str) -> corpus_lib.TokenizedCorpus:
  data_config = config.make(DataConfig)
  max_len = config.make(ModelConfig).max_len
  start = time.perf_counter()
  progress = common.Progress("tokenize", unit="rows")
  written = [0]

  def report(n):
    written[0] += n
    progress(written[0])

  corpus = corpus_lib.tokenize(source, output, data_config, max_len, progress=report)
  progress.close()  # the row count is not known until the end
  m = corpus.manifest
  seconds = time.perf_counter() - start
  common.say(f"{output}: {m.num_rows:,} rows of up to {m.max_len} tokens from "
             f"{m.num_docs:,} documents ({m.tokenizer}, overflow={m.overflow}, "
             f"{m.token_dtype}); {seconds:.1f} s"
             + (f", {written[0] / seconds:,.0f} rows/s" if written[0] else
                " (already tokenized)"))
  return corpus


def main(argv):
  del argv
  config.setup(required=("corpus", "output"))
  run(FLAGS.corpus, FLAGS.output)


if __name__ == "__main__":
  config.run(main)
