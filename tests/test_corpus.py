"""Tests of tracer.corpus: a corpus tokenized once to disk, read row by row."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tracer import corpus as corpus_lib
from tracer import data as data_lib
from tracer import facts
from tracer import storage
from tracer.config import DataConfig
from tracer.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def records():
  out = facts.generate(facts.FactsConfig(facts_per_bucket=4, distractor_docs=10))[0]
  out.append({"id": "unicode", "text": "héllo wörld ünïcode ✓ " * 4})
  return out


@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory, records):
  return str(facts.write_jsonl(tmp_path_factory.mktemp("c") / "corpus.jsonl", records))


def _assert_same_rows(a, b):
  assert len(a) == len(b)
  rows = np.arange(len(a))
  assert a.ids_of(rows) == b.ids_of(rows)
  assert a.texts_of(rows) == b.texts_of(rows)
  for k, v in a.examples(rows).items():
    np.testing.assert_array_equal(v, b.examples(rows)[k], err_msg=k)
  scattered = np.array([len(a) - 1, 3, 0, 3, 7])  # any order, repeats
  assert a.ids_of(scattered) == b.ids_of(scattered)
  assert a.texts_of(scattered) == b.texts_of(scattered)
  for k, v in a.examples(scattered).items():
    np.testing.assert_array_equal(v, b.examples(scattered)[k], err_msg=k)


@pytest.mark.parametrize("overflow", ["truncate", "split"])
def test_tokenized_rows_equal_the_in_memory_rows(tmp_path, corpus_path, overflow):
  config = DataConfig(overflow=overflow)
  memory = data_lib.read_corpus(corpus_path, config.vocabulary(), 32, overflow)
  # Small blocks: several block writes, a partial last one.
  tokenized = corpus_lib.tokenize(corpus_path, str(tmp_path / "tok"), config, 32,
                                  block_rows=64)
  assert len(memory) > 64 and len(memory) % 64
  _assert_same_rows(memory, tokenized)
  np.testing.assert_array_equal(tokenized.segments_of(np.arange(len(memory))),
                                memory.segments)
  m = tokenized.manifest
  assert (m.source, m.num_rows, m.max_len, m.overflow, m.tokenizer, m.token_dtype) == (
      corpus_path, len(memory), 32, overflow, "byte", "uint16")
  assert m.num_docs == len(set(memory.ids))
  # open_corpus picks the tokenized directory and checks it against the model.
  opened = corpus_lib.open_corpus(str(tmp_path / "tok"), config, 32)
  assert isinstance(opened, corpus_lib.TokenizedCorpus)
  with pytest.raises(InputError, match=r"tok/manifest.json: field 'max_len' is 32, "
                     "the model expects 64"):
    corpus_lib.open_corpus(str(tmp_path / "tok"), config, 64)


def test_rows_read_counts_only_what_was_asked(tmp_path, corpus_path):
  tokenized = corpus_lib.tokenize(corpus_path, str(tmp_path / "tok"), DataConfig(), 32)
  assert tokenized.rows_read == 0
  tokenized.examples(np.arange(5, 12))
  tokenized.examples([2])
  assert tokenized.rows_read == 8
  tokenized.ids_of([1, 2])  # ids and texts are not example reads
  assert tokenized.rows_read == 8
  with pytest.raises(InputError, match="out of range"):
    tokenized.examples([len(tokenized)])


def test_glob_of_shards_and_object_store_output(tmp_path, records, corpus_path):
  shards = tmp_path / "shards"
  shards.mkdir()
  # Names sort in the order the records are split in.
  for i, lo in enumerate(range(0, len(records), 40)):
    facts.write_jsonl(shards / f"part-{i:03d}.jsonl", records[lo:lo + 40])
  config = DataConfig()
  whole = data_lib.read_corpus(corpus_path, config.vocabulary(), 32)
  pattern = str(shards / "part-*.jsonl")
  assert data_lib.read_corpus(pattern, config.vocabulary(), 32).ids == whole.ids
  on_memory = corpus_lib.tokenize(pattern, "memory://corpus-test/tok", config, 32)
  _assert_same_rows(whole, on_memory)
  # Shards on an object store: the pattern matches the last path component.
  for path in sorted(shards.iterdir()):
    storage.write_bytes(f"memory://corpus-test/shards/{path.name}", path.read_bytes())
  storage.write_text("memory://corpus-test/shards/other.txt", "not a shard")
  remote = "memory://corpus-test/shards/part-*.jsonl"
  assert data_lib.read_corpus(remote, config.vocabulary(), 32).ids == whole.ids
  assert corpus_lib.open_corpus("memory://corpus-test/tok", config, 32).source == pattern
  with pytest.raises(InputError, match="matches no file"):
    data_lib.read_corpus(str(shards / "none-*.jsonl"), config.vocabulary(), 32)


def test_rerun_does_nothing_and_other_settings_are_refused(tmp_path, corpus_path):
  out = str(tmp_path / "tok")
  corpus_lib.tokenize(corpus_path, out, DataConfig(), 32)
  before = {n: os.path.getmtime(os.path.join(out, n))
            for n in storage.list_dir(out)}
  again = corpus_lib.tokenize(corpus_path, out, DataConfig(), 32)
  assert len(again) > 0
  assert {n: os.path.getmtime(os.path.join(out, n)) for n in storage.list_dir(out)} == before
  with pytest.raises(InputError, match=r"other settings \(max_len: has 32, asked 16"):
    corpus_lib.tokenize(corpus_path, out, DataConfig(), 16)


def test_unfinished_tokenization_is_redone(tmp_path, corpus_path):
  out = tmp_path / "tok"
  corpus_lib.tokenize(corpus_path, str(out), DataConfig(), 32)
  (out / "manifest.json").unlink()  # as if killed before the manifest
  assert not corpus_lib.is_tokenized(str(out))
  redone = corpus_lib.tokenize(corpus_path, str(out), DataConfig(overflow="split"), 32)
  assert redone.manifest.overflow == "split"
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "notes.txt").write_text("hi")
  with pytest.raises(InputError, match="not a tokenized corpus .* not empty"):
    corpus_lib.tokenize(corpus_path, str(tmp_path / "busy"), DataConfig(), 32)


def test_duplicate_ids_across_shards_are_named(tmp_path):
  a = tmp_path / "a.jsonl"
  b = tmp_path / "b.jsonl"
  a.write_text(json.dumps({"id": "x", "text": "one"}) + "\n"
               + json.dumps({"id": "y", "text": "two"}) + "\n")
  b.write_text(json.dumps({"id": "z", "text": "three"}) + "\n"
               + json.dumps({"id": "x", "text": "four"}) + "\n")
  pattern = str(tmp_path / "*.jsonl")
  with pytest.raises(InputError, match=r"duplicate id 'x' \(rows 0 and 3\)"):
    corpus_lib.tokenize(pattern, str(tmp_path / "tok"), DataConfig(), 16)
  with pytest.raises(InputError, match="duplicate id 'x'"):
    data_lib.read_corpus(pattern, DataConfig().vocabulary(), 16)


def test_bad_manifest(tmp_path, corpus_path):
  out = tmp_path / "tok"
  corpus_lib.tokenize(corpus_path, str(out), DataConfig(), 32)
  d = json.loads((out / "manifest.json").read_text())
  d["format"] = "something else"
  (out / "manifest.json").write_text(json.dumps(d))
  with pytest.raises(InputError, match="manifest.json: not a tokenized corpus"):
    corpus_lib.TokenizedCorpus(str(out))


def test_launch_tokenize(tmp_path, corpus_path):
  out = tmp_path / "tok"
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run(
      [sys.executable, "-m", "tracer.launch.tokenize", "--gin_file=configs/tiny.gin",
       f"--corpus={corpus_path}", f"--output={out}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  corpus = corpus_lib.TokenizedCorpus(str(out))
  assert f"{out}: {len(corpus):,} rows of up to 128 tokens" in proc.stdout
  memory = data_lib.read_corpus(corpus_path, DataConfig().vocabulary(), 128)
  _assert_same_rows(memory, corpus)
