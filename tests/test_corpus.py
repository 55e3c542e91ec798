"""Tests of tracer.corpus: a corpus tokenized once to disk, read row by row."""

from __future__ import annotations

import bz2
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorstore as ts

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
  assert len(tokenized.fingerprint) == 16
  assert tokenized.fingerprint == memory.fingerprint
  # open_corpus picks the tokenized directory and checks it against the model.
  opened = corpus_lib.open_corpus(str(tmp_path / "tok"), config, 32)
  assert isinstance(opened, corpus_lib.TokenizedCorpus)
  # (not "the checkpoint's gin config": `tracer train` has no checkpoint yet)
  with pytest.raises(InputError, match=r"tok/manifest.json: field 'max_len' is 32, "
                     r"the model expects 64 \(tokenize again with the model's gin "
                     r"config\)$"):
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


def test_a_source_changed_since_is_refused(tmp_path, records):
  """A rerun reuses a corpus only while its source files are as they were
  (size and modification time, an object's generation); before 2026-12-06
  a source edited in place (or a glob matching one more file) reused the
  stale rows."""
  config = DataConfig()
  source = tmp_path / "c.jsonl"
  facts.write_jsonl(source, records[:20])
  out = str(tmp_path / "tok")
  made = corpus_lib.tokenize(str(source), out, config, 32)
  size = source.stat().st_size
  assert made.manifest.source_files == [{
      "path": str(source), "size": size, "mtime_ns": source.stat().st_mtime_ns}]
  assert len(corpus_lib.tokenize(str(source), out, config, 32)) == 20
  facts.write_jsonl(source, records[:5])
  with pytest.raises(InputError, match=re.escape(
      f"{out}: made from {source} of {size:,} bytes, modified ")) as caught:
    corpus_lib.tokenize(str(source), out, config, 32)
  assert re.search(rf"; it is now {source.stat().st_size:,} bytes, modified "
                   rf"[-\d :.]+ UTC: tokenize it again into another directory, "
                   f"or delete {re.escape(out)} ", str(caught.value)), caught.value
  # The same size, another modification time (the same second: ns shown).
  facts.write_jsonl(source, records[:20])
  ns = made.manifest.source_files[0]["mtime_ns"]
  os.utime(source, ns=(ns, ns + 1))
  with pytest.raises(InputError, match=rf"of {size:,} bytes, modified [-\d :]+"
                     rf"\.{ns % 10**9:09d} UTC; it is now {size:,} bytes"):
    corpus_lib.tokenize(str(source), out, config, 32)
  os.remove(source)
  with pytest.raises(InputError, match="; it is now gone"):
    corpus_lib.tokenize(str(source), out, config, 32)
  # A manifest of before (no record) is reused as it was.
  manifest = os.path.join(out, corpus_lib.MANIFEST)
  with open(manifest) as f:
    old = json.load(f)
  del old["source_files"]
  with open(manifest, "w") as f:
    json.dump(old, f)
  assert len(corpus_lib.tokenize(str(source), out, config, 32)) == 20
  # A glob matching one more file; an object replaced (its generation).
  pattern = _shards(tmp_path / "shards", records[:30], files=3)
  corpus_lib.tokenize(pattern, str(tmp_path / "globbed"), config, 32)
  facts.write_jsonl(tmp_path / "shards" / "part-009.jsonl", records[30:31])
  with pytest.raises(InputError, match=re.escape(
      f"globbed: made from the 3 files {pattern} matched then; it now also "
      f"matches {tmp_path}/shards/part-009.jsonl: tokenize it again")):
    corpus_lib.tokenize(pattern, str(tmp_path / "globbed"), config, 32)
  remote = f"memory://changed-{tmp_path.name}/c.jsonl"
  storage.write_text(remote, "".join(json.dumps(r) + "\n" for r in records[:20]))
  corpus_lib.tokenize(remote, str(tmp_path / "remote"), config, 32)
  corpus_lib.tokenize(remote, str(tmp_path / "remote"), config, 32)
  storage.write_text(remote, storage.read_text(remote))  # the same bytes
  with pytest.raises(InputError, match=re.escape(
      f"remote: made from {remote} of generation ")):
    corpus_lib.tokenize(remote, str(tmp_path / "remote"), config, 32)


def test_files_landing_between_parts_are_refused_at_the_join(tmp_path, records):
  """A file lands after part 0 ran: the other parts' line shares (a.jsonl
  split over 3) and a part with no file of its own change, each part's paths
  staying the same. Before 2026-12-07 the join kept 25 of 30 rows (the last
  half of a.jsonl dropped), and joined an empty part's run unchecked."""
  config = DataConfig()
  (tmp_path / "src").mkdir()
  put = lambda name, n: facts.write_jsonl(
      str(tmp_path / "src" / name), [dict(r, id=f"{name[0]}{i}")
                                     for i, r in enumerate(records[:n])])
  put("a.jsonl", 10)
  put("b.jsonl", 10)
  pattern, out = str(tmp_path / "src" / "*.jsonl"), str(tmp_path / "tok")
  corpus_lib.tokenize(pattern, out, config, 32, num_shards=3, shard_index=0)
  put("c.jsonl", 10)
  corpus_lib.tokenize(pattern, out, config, 32, num_shards=3, shard_index=1)
  with pytest.raises(InputError, match=re.escape(
      f"{out}/parts/00000-of-00003: made from other row groups or line shares "
      f"of its files than {pattern} now gives that part")):
    corpus_lib.tokenize(pattern, out, config, 32, num_shards=3, shard_index=2)
  # Every part made again from the files as they are: all 30 rows.
  shutil.rmtree(out)
  for i in range(3):
    joined = corpus_lib.tokenize(pattern, out, config, 32, num_shards=3, shard_index=i)
  assert len(joined) == 30 and joined.manifest.source_run is None
  # A part with no file of its own (3 processes, 2 Parquet files of one row
  # group each) recorded [] and skipped the check: b.parquet was dropped.
  pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
  (tmp_path / "pq").mkdir()
  put = lambda name: pq.write_table(pa.table(
      {"id": [f"{name[0]}{i}" for i in range(10)],
       "text": [f"{name} text {i}" for i in range(10)]}), str(tmp_path / "pq" / name))
  put("a.parquet")
  put("b.parquet")
  pattern, out = str(tmp_path / "pq" / "*.parquet"), str(tmp_path / "tok2")
  assert [len(run) for run in data_lib.split_files(pattern, 3)] == [1, 0, 1]
  corpus_lib.tokenize(pattern, out, config, 32, num_shards=3, shard_index=0)
  corpus_lib.tokenize(pattern, out, config, 32, num_shards=3, shard_index=1)
  put("c.parquet")
  with pytest.raises(InputError, match=re.escape(
      f"{out}/parts/00001-of-00003: made from no files; {pattern} now gives "
      "that part 1 file")):
    corpus_lib.tokenize(pattern, out, config, 32, num_shards=3, shard_index=2)


def test_a_source_changed_since_is_refused_on_several_processes(tmp_path, records):
  """Each part records its own files as its process saw them before reading
  them; the join records them all, once each; a rerun of any process
  checks every file (a part, before the join: its own)."""
  config = DataConfig()
  pattern = _shards(tmp_path / "shards", records[:40], files=4)
  files = data_lib.corpus_files(pattern)
  out = str(tmp_path / "tok")
  part = corpus_lib.tokenize(pattern, out, config, 32, num_shards=2, shard_index=0)
  assert [f["path"] for f in part.manifest.source_files] == files[:2]
  os.utime(files[0], ns=(0, 0))
  with pytest.raises(InputError, match=re.escape(
      f"{out}/parts/00000-of-00002: made from {files[0]} of ")):
    corpus_lib.tokenize(pattern, out, config, 32, num_shards=2, shard_index=0)
  shutil.rmtree(os.path.join(out, "parts", "00000-of-00002"))
  corpus_lib.tokenize(pattern, out, config, 32, num_shards=2, shard_index=0)
  joined = corpus_lib.tokenize(pattern, out, config, 32, num_shards=2,
                               shard_index=1)
  assert [f["path"] for f in joined.manifest.source_files] == files
  for i in range(2):  # reruns, on any process count
    corpus_lib.tokenize(pattern, out, config, 32, num_shards=2, shard_index=i)
  corpus_lib.tokenize(pattern, out, config, 32)
  facts.write_jsonl(files[3], records[:1])
  for shards, i in ((2, 0), (2, 1), (1, 0)):
    with pytest.raises(InputError, match=re.escape(
        f"{out}: made from {files[3]} of ")):
      corpus_lib.tokenize(pattern, out, config, 32, num_shards=shards,
                          shard_index=i)
  # With check_sources=False the caller checks them, each process its share
  # (pipeline.tokenize_on_processes): files[3] is in share 1 of 2 only.
  joined = corpus_lib.tokenize(pattern, out, config, 32, num_shards=2,
                               shard_index=0, check_sources=False)
  corpus_lib.check_source_files(out, joined.manifest, pattern, 0, 2)
  with pytest.raises(InputError, match=re.escape(
      f"{out}: made from {files[3]} of ")):
    corpus_lib.check_source_files(out, joined.manifest, pattern, 1, 2)
  # One file split between two processes, changed between their reads.
  one = str(tmp_path / "one.jsonl")
  facts.write_jsonl(one, records[:10])
  corpus_lib.tokenize(one, str(tmp_path / "split"), config, 32, num_shards=2,
                      shard_index=0)
  os.utime(one, ns=(0, 0))
  with pytest.raises(InputError, match=re.escape(
      f"split: {one} changed while it was tokenized (parts/00000-of-00002 read "
      "it as ")):
    corpus_lib.tokenize(one, str(tmp_path / "split"), config, 32, num_shards=2,
                        shard_index=1)


def test_each_share_checks_its_own_source_files(tmp_path, records, monkeypatch):
  """On several processes each checks a share of the recorded files
  (``check_source_files(..., share_index, share_count)``): the shares,
  consecutive runs, cover every file once, only the last lists the glob,
  and the first failing share raises what one process checking them all
  would. Until 2026-12-06 every process statted every file (1,024 shards on
  64 hosts: 65k metadata requests)."""
  config = DataConfig()
  pattern = _shards(tmp_path / "shards", records[:40], files=5)
  files = data_lib.corpus_files(pattern)
  out = str(tmp_path / "tok")
  manifest = corpus_lib.tokenize(pattern, out, config, 32).manifest
  asked, listed = [], []
  identities, corpus_files = storage.identities, data_lib.corpus_files
  monkeypatch.setattr(storage, "identities",
                      lambda paths: asked.append(list(paths)) or identities(paths))
  monkeypatch.setattr(data_lib, "corpus_files",
                      lambda source: listed.append(source) or corpus_files(source))
  source = data_lib.absolute_source(pattern)
  for count in (1, 2, 3, 5, 7):  # more shares than files: some are empty
    asked.clear(), listed.clear()
    for i in range(count):
      corpus_lib.check_source_files(out, manifest, source, i, count)
      assert listed == ([source] if i == count - 1 else []), (count, i)
    assert [p for share in asked for p in share] == files, count
    assert [len(share) for share in asked] == [
        (i + 1) * 5 // count - i * 5 // count for i in range(count)], count

  def verdicts(count):
    """Each share's error, or None."""
    found = []
    for i in range(count):
      try:
        corpus_lib.check_source_files(out, manifest, source, i, count)
        found.append(None)
      except InputError as e:
        found.append(str(e))
    return found

  facts.write_jsonl(tmp_path / "shards" / "part-009.jsonl", records[40:41])
  added = verdicts(1)[0]
  assert "it now also matches" in added
  assert verdicts(3) == [None, None, added]  # the last share lists the glob
  facts.write_jsonl(files[3], records[:1])  # in share 2 of 3, and 1 of 2
  one = verdicts(1)[0]
  assert one.startswith(f"{out}: made from {files[3]} of "), one
  assert verdicts(3) == [None, None, one]  # (its files before the listing)
  assert verdicts(2) == [None, one]
  facts.write_jsonl(files[4], records[:2])  # a later file changed too
  assert verdicts(3) == [None, None, one]
  assert [v is not None for v in verdicts(5)] == [False, False, False, True, True]
  assert next(v for v in verdicts(5) if v) == one


# A launch script on several processes that says which source files it
# statted (storage.identities) and which globs it listed.
_COUNTED_TOKENIZE = """
import runpy, sys
from tracer import data, storage
identities, corpus_files = storage.identities, data.corpus_files
def counted_identities(paths):
  print("statted:", *paths, flush=True)
  return identities(paths)
def counted_files(source):
  print("listed:", source, flush=True)
  return corpus_files(source)
storage.identities, data.corpus_files = counted_identities, counted_files
sys.argv = ["tracer tokenize", *sys.argv[1:]]
runpy.run_module("tracer.launch.tokenize", run_name="__main__")
"""


def test_a_file_changed_in_one_share_ends_every_process_alike(tmp_path, records):
  """``tracer tokenize`` on 3 processes reusing a joined corpus, one file of
  process 1's share changed since: each process stats only its share (and
  process 2 lists the glob), and all three end with status 2 and the same
  line naming that file (``coordination.agree``). Until 2026-12-06 every
  process statted every file."""
  import multiprocess  # pylint: disable=g-import-not-at-top
  pattern = _shards(tmp_path / "shards", records[:60], files=6)
  files = data_lib.corpus_files(pattern)
  out = tmp_path / "tok"
  for i in range(3):  # the last joins
    corpus_lib.tokenize(pattern, str(out), DataConfig(), 128, num_shards=3,
                        shard_index=i)
  assert corpus_lib.is_tokenized(str(out))
  facts.write_jsonl(files[3], records[:1])  # process 1's share: files[2:4]
  port = multiprocess.free_port()
  commands = [[sys.executable, "-c", _COUNTED_TOKENIZE,
               "--gin_file=configs/tiny.gin", f"--corpus={pattern}",
               f"--output={out}", *multiprocess.distributed_flags(port, i, 3)]
              for i in range(3)]
  procs, logs = multiprocess.start(commands, tmp_path, multiprocess.env(devices=1))
  codes, texts = multiprocess.ends(procs, logs, time.monotonic() + 240)
  assert codes == [2, 2, 2], texts
  errors = [[l for l in t.splitlines() if l.startswith("error: ")] for t in texts]
  assert errors[0] == errors[1] == errors[2], errors
  assert errors[0][0].startswith(f"error: {out}: made from {files[3]} of "), errors
  statted = [[l.split()[1:] for l in t.splitlines() if l.startswith("statted:")]
             for t in texts]
  assert statted == [[files[0:2]], [files[2:4]], [files[4:6]]], statted
  listed = [sum(l.startswith("listed:") for l in t.splitlines()) for t in texts]
  assert listed == [0, 0, 1], listed


def test_the_source_is_recorded_absolute(tmp_path, corpus_path, monkeypatch):
  """A relative source is recorded absolute, so the corpus names its files
  from any directory; a rerun naming them either way, or a corpus that
  recorded them relative (before), is the same corpus."""
  monkeypatch.chdir(os.path.dirname(corpus_path))
  relative = os.path.basename(corpus_path)
  out = str(tmp_path / "tok")
  assert corpus_lib.tokenize(relative, out, DataConfig(), 32).source == corpus_path
  before = {n: os.path.getmtime(os.path.join(out, n)) for n in storage.list_dir(out)}
  for source in (relative, corpus_path):
    corpus_lib.tokenize(source, out, DataConfig(), 32)
  manifest = os.path.join(out, corpus_lib.MANIFEST)
  with open(manifest) as f:
    old = json.load(f)
  with open(manifest, "w") as f:
    json.dump({**old, "source": relative}, f)
  corpus_lib.tokenize(corpus_path, out, DataConfig(), 32)
  assert {n: os.path.getmtime(os.path.join(out, n))
          for n in storage.list_dir(out) if n != corpus_lib.MANIFEST} == {
              n: t for n, t in before.items() if n != corpus_lib.MANIFEST}


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


def test_a_source_that_cannot_be_read_leaves_no_output(tmp_path):
  """The source is opened, and its first row read, before anything is
  created: a missing, empty or bad source leaves no output behind (also a
  process's part of a sharded run)."""
  (tmp_path / "blank.jsonl").write_text("\n\n")
  (tmp_path / "list.jsonl").write_text("[1]\n")
  out = tmp_path / "tok"
  for source, shards, message in [
      ("missing.jsonl", 1, "missing.jsonl: no such file"),
      ("blank.jsonl", 1, "blank.jsonl: the corpus is empty"),
      ("list.jsonl", 1, "list.jsonl:1: expected a JSON object, got list"),
      ("none-*.jsonl", 2, "matches no file")]:
    with pytest.raises(InputError, match=re.escape(message)):
      corpus_lib.tokenize(str(tmp_path / source), str(out), DataConfig(), 32,
                          num_shards=shards)
    assert not out.exists(), (source, sorted(os.listdir(out)))


@pytest.mark.parametrize("change", ["added", "removed"])
def test_parts_made_from_other_files_of_a_glob_are_refused(tmp_path, records, change):
  """Each process splits a glob as it finds it. Before, files landing after
  part 0 was written (a rerun after a crash) dropped a file that was there
  all along from the joined corpus, silently; a file removed had another
  tokenized by both parts (a false duplicate id)."""
  config = DataConfig()
  pattern = _shards(tmp_path / "shards", records[:40], files=4)
  files = data_lib.corpus_files(pattern)
  out = str(tmp_path / "tok")
  corpus_lib.tokenize(pattern, out, config, 32, num_shards=2, shard_index=0)
  if change == "added":
    for i, name in enumerate(("part-008.jsonl", "part-009.jsonl")):
      facts.write_jsonl(str(tmp_path / "shards" / name), records[40 + i:41 + i])
    now = data_lib.corpus_files(pattern)[:3]
  else:
    os.remove(files[3])
    now = files[:1]
  part0 = f"{out}/parts/00000-of-00002"
  span = (f"{len(now)} files, {now[0]} to {now[-1]}" if len(now) > 1
          else f"1 file, {now[0]}")
  with pytest.raises(InputError, match=re.escape(
      f"{part0}: made from 2 files, {files[0]} to {files[1]}; {pattern} now "
      f"gives that part {span}: its files changed while the corpus was "
      f"tokenized; expected the same files for every part (delete {part0} and "
      "tokenize it again)")):
    corpus_lib.tokenize(pattern, out, config, 32, num_shards=2, shard_index=1)
  assert not os.path.exists(f"{out}/{corpus_lib.MANIFEST}")
  # As told: part 0 again, then the join holds every file's rows once.
  shutil.rmtree(part0)
  joined = corpus_lib.tokenize(pattern, out, config, 32, num_shards=2, shard_index=0)
  whole = corpus_lib.tokenize(pattern, str(tmp_path / "one"), config, 32)
  assert joined.manifest.fingerprint == whole.manifest.fingerprint
  assert len(joined) == len(whole)


def test_duplicate_ids_across_shards_are_named(tmp_path):
  a = tmp_path / "a.jsonl"
  b = tmp_path / "b.jsonl"
  a.write_text(json.dumps({"id": "x", "text": "one"}) + "\n"
               + json.dumps({"id": "y", "text": "two"}) + "\n")
  b.write_text(json.dumps({"id": "z", "text": "three"}) + "\n"
               + json.dumps({"id": "x", "text": "four"}) + "\n")
  pattern = str(tmp_path / "*.jsonl")
  # Named by rows and by file:line (before 2026-12-05 by rows alone).
  with pytest.raises(InputError, match=re.escape(
      f"{pattern}: duplicate id 'x' ({a}:1 and {b}:2; tokenized rows 0 and 3 of "
      f"{tmp_path}/tok); ids must be unique")):
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
  # A hand-edited record of the source files (before, a TypeError on rerun).
  d["format"] = corpus_lib.FORMAT
  # Other fields of another JSON type, or nested past what Python reads,
  # were TypeErrors or a RecursionError before 2026-12-08.
  for field, value, message in (
      ("source_files", "x", "field 'source_files' must be a list or null, got \"x\""),
      ("source_files", [{"path": 3}], 'source_files[0] is {"path": 3}; expected'),
      ("num_rows", 5.0, "field 'num_rows' must be an integer, got 5.0"),
      ("num_rows", True, "field 'num_rows' must be an integer, got true"),
      ("num_rows", -1, "field 'num_rows' must be >= 0, got -1"),
      ("parts", 5, "field 'parts' must be a list or null, got 5"),
      ("max_len", "32", "field 'max_len' must be an integer, got \"32\""),
      ("chunks_stored", 1, "field 'chunks_stored' must be true or false, got 1")):
    (out / "manifest.json").write_text(json.dumps({**d, field: value}))
    with pytest.raises(InputError, match=re.escape(f"manifest.json: {message}")):
      corpus_lib.tokenize(corpus_path, str(out), DataConfig(), 32)
  (out / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
  with pytest.raises(InputError, match="manifest.json: not a file tracer wrote "
                     r"\(values nested too deep to read\)"):
    corpus_lib.TokenizedCorpus(str(out))


def test_launch_tokenize(tmp_path, corpus_path):
  out = tmp_path / "tok"
  source = shutil.copy(corpus_path, str(tmp_path / "corpus.jsonl"))
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  tokenize = lambda: subprocess.run(
      [sys.executable, "-m", "tracer.launch.tokenize", "--gin_file=configs/tiny.gin",
       f"--corpus={source}", f"--output={out}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  proc = tokenize()
  assert proc.returncode == 0, proc.stderr[-3000:]
  corpus = corpus_lib.TokenizedCorpus(str(out))
  assert f"{out}: {len(corpus):,} rows of up to 128 tokens" in proc.stdout
  memory = data_lib.read_corpus(source, DataConfig().vocabulary(), 128)
  _assert_same_rows(memory, corpus)
  # The source edited since: one error line, not "(already tokenized)" and
  # the stale rows (before 2026-12-06).
  with open(source, "a", encoding="utf-8") as f:
    f.write(json.dumps({"id": "new", "text": "one more"}) + "\n")
  proc = tokenize()
  assert proc.returncode == 2 and proc.stdout == "", proc.stdout
  assert re.fullmatch(
      rf"error: {out}: made from {source} of [\d,]+ bytes, modified "
      r"[-\d :.]+ UTC; it is now [\d,]+ bytes, modified [-\d :.]+ UTC: "
      r"tokenize it again into another directory, or delete .*\n",
      proc.stderr), proc.stderr


def _fingerprint(rows) -> str:
  f = data_lib.RowsFingerprint()
  for row in rows:
    f.add(*row)
  return f.hex()


def test_rows_fingerprint_sees_every_edit_and_combines_parts():
  rng = np.random.default_rng(0)
  rows = [(f"d{i // 2}", i % 2, rng.integers(0, 300, 5)) for i in range(40)]
  whole = _fingerprint(rows)
  edits = {
      "swap two rows": rows[:3] + [rows[30]] + rows[4:30] + [rows[3]] + rows[31:],
      "reverse": rows[::-1],
      "another id": rows[:7] + [("d99", *rows[7][1:])] + rows[8:],
      "another window index": rows[:7] + [(rows[7][0], 5, rows[7][2])] + rows[8:],
      "another token": rows[:7] + [(*rows[7][:2], rows[7][2] + (
          np.arange(5) == 4))] + rows[8:],
      "a token dropped": rows[:7] + [(*rows[7][:2], rows[7][2][:4])] + rows[8:],
      "a row dropped, one added": rows[1:] + [("new", 0, rows[0][2])],
      "id and window index run together": rows[:7] + [("d31", 0, rows[7][2])]
      + rows[8:],
  }
  for name, edited in edits.items():
    assert _fingerprint(edited) != whole, name
  # Parts combine to the whole however the rows are cut, empty parts too.
  for cuts in ([20], [0, 1, 39], [5, 5, 17, 40]):
    bounds = [0, *cuts, len(rows)]
    parts = [(_fingerprint(rows[a:b]), b - a) for a, b in zip(bounds, bounds[1:])]
    assert data_lib.RowsFingerprint.combined(parts) == whole, cuts


def _shards(directory, records, files=6):
  directory.mkdir()
  size = -(-len(records) // files)
  for i, lo in enumerate(range(0, len(records), size)):
    facts.write_jsonl(directory / f"part-{i:03d}.jsonl", records[lo:lo + size])
  return str(directory / "part-*.jsonl")


@pytest.mark.parametrize("num_shards", [3, 9])
def test_shards_tokenized_apart_join_into_the_same_rows(tmp_path, records, num_shards):
  """Each shard writes its run of files as a part; the last one joins them
  into one corpus whose rows are one process's (9 shards > 6 files: three
  files are shared by two shards each, by lines, and no part is empty)."""
  pattern = _shards(tmp_path / "shards", records)
  assert len(data_lib.corpus_files(pattern)) == 6
  config = DataConfig(overflow="split")
  whole = data_lib.read_corpus(pattern, config.vocabulary(), 32, "split")
  out = str(tmp_path / "tok")
  order = list(range(num_shards))[::-1]  # any order: the last one joins
  for n, i in enumerate(order):
    got = corpus_lib.tokenize(pattern, out, config, 32, num_shards=num_shards,
                              shard_index=i, block_rows=64)
    assert corpus_lib.is_tokenized(out) == (n == num_shards - 1)
    if n < num_shards - 1:
      assert got.manifest.shard == [i, num_shards]
  m = got.manifest
  assert m.shard is None and len(m.parts) == num_shards
  assert m.num_rows == len(whole) and m.num_docs == len(set(whole.ids))
  assert m.source == pattern
  assert all(p["num_rows"] > 0 for p in m.parts)
  assert got.fingerprint == whole.fingerprint  # however the rows were split
  _assert_same_rows(whole, got)
  every = np.arange(len(whole))
  np.testing.assert_array_equal(got.segments_of(every), whole.segments)
  shuffled = np.random.default_rng(0).permutation(len(whole))
  assert got.ids_of(shuffled) == [whole.ids[r] for r in shuffled]
  for k, v in got.examples(shuffled).items():
    np.testing.assert_array_equal(v, whole.examples(shuffled)[k], err_msg=k)
  # Reruns (of any shard) return the joined corpus; a part alone reads too.
  again = corpus_lib.tokenize(pattern, out, config, 32, num_shards=num_shards,
                              shard_index=0)
  assert len(again) == len(whole)
  part = corpus_lib.TokenizedCorpus(os.path.join(out, m.parts[0]["path"]))
  assert part.ids_of(np.arange(len(part))) == whole.ids[:len(part)]
  # A reader opens only the parts it reads (a pod host reads few of them).
  fresh = corpus_lib.TokenizedCorpus(out)
  assert fresh.ids_of([0, 1]) == whole.ids[:2] and len(fresh._parts) == 1
  # No rows read as from one part (an IndexError before 2026-12-04), and a
  # row out of range is one error for every read (a tensorstore error for
  # ids, texts and segments before; -1 went to the last part).
  assert fresh.examples([])["targets"].shape == (0, 32)
  assert fresh.segments_of([]).shape == (0,) and fresh.ids_of([]) == []
  for read in (fresh.ids_of, fresh.texts_of, fresh.segments_of, fresh.examples):
    for row in (-1, len(whole)):
      with pytest.raises(InputError, match=re.escape(
          f"rows [{row}, {row}] out of range [0, {len(whole)})")):
        read([row])


def _as_parquet(data: bytes) -> bytes:
  """JSONL corpus lines as a Parquet file (columns id, text; HF's format)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  lines = [json.loads(line) for line in data.splitlines()]
  out = pa.BufferOutputStream()
  pq.write_table(pa.table({k: [r[k] for r in lines] for k in ("id", "text")}), out,
                 row_group_size=2)
  return out.getvalue().to_pybytes()


def test_compressed_shards_tokenized_apart_give_the_same_rows(tmp_path, records):
  """gzip, bzip2, Parquet and plain shards in one glob, in two parts (C4 ships
  as *.json.gz, FineWeb as *.parquet): the rows of the plain files in one
  process."""
  pattern = _shards(tmp_path / "shards", records)
  whole = data_lib.read_corpus(pattern, DataConfig().vocabulary(), 32)
  packed = tmp_path / "packed"
  packed.mkdir()
  for i, path in enumerate(data_lib.corpus_files(pattern)):
    data = open(path, "rb").read()
    packed.joinpath(os.path.basename(path)).write_bytes(
        (gzip.compress, bz2.compress, _as_parquet, bytes)[i % 4](data))
  out = str(tmp_path / "tok")
  for i in (1, 0):
    got = corpus_lib.tokenize(str(packed / "part-*.jsonl"), out, DataConfig(), 32,
                              num_shards=2, shard_index=i)
  assert got.manifest.parts is not None
  _assert_same_rows(whole, got)


def test_fields_under_other_names_tokenized_apart(tmp_path, records):
  """Parquet shards whose fields are content/hexsha (The Stack's), in two
  parts: the rows of tracer's own names. The names are part of the source
  the manifest records, so other names are other settings."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  pattern = _shards(tmp_path / "shards", records)
  whole = data_lib.read_corpus(pattern, DataConfig().vocabulary(), 32)
  theirs = tmp_path / "theirs"
  theirs.mkdir()
  for path in data_lib.corpus_files(pattern):
    lines = [json.loads(line) for line in open(path, encoding="utf-8")]
    pq.write_table(pa.table({"hexsha": [r["id"] for r in lines],
                             "content": [r["text"] for r in lines]}),
                   theirs / os.path.basename(path).replace(".jsonl", ".parquet"))
  source = str(theirs / "part-*.parquet#text=content,id=hexsha")
  out = str(tmp_path / "tok")
  for i in (1, 0):
    got = corpus_lib.tokenize(source, out, DataConfig(), 32, num_shards=2,
                              shard_index=i)
  assert got.manifest.source == source and got.manifest.parts is not None
  _assert_same_rows(whole, got)
  with pytest.raises(InputError, match=r"other settings \(source: has .*"
                     r"#text=content,id=hexsha', asked .*#text=content'"):
    corpus_lib.tokenize(source.replace(",id=hexsha", ""), out, DataConfig(), 32)
  # A tokenized corpus's fields were read when it was tokenized.
  with pytest.raises(InputError, match=r"tok is a tokenized corpus, whose fields "
                     "were read when it was tokenized"):
    corpus_lib.open_corpus(out + "#text=content", DataConfig(), 32)


@pytest.mark.parametrize("kind", ["parquet", "jsonl.gz"])
def test_one_file_tokenized_by_three_processes(tmp_path, records, kind):
  """One file, three processes: each tokenizes a run of its Parquet row
  groups, or an equal run of a gzip JSONL file's lines (``data.split_files``);
  joined, the rows and the position ids of one process."""
  path = str(tmp_path / f"one.{kind}")
  if kind == "parquet":
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    pq.write_table(pa.table({"text": [r["text"] for r in records]}), path,
                   row_group_size=5)
  else:
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.writelines(json.dumps({"text": r["text"]}) + "\n" for r in records)
  whole = data_lib.read_corpus(path, DataConfig().vocabulary(), 32, "split")
  out = str(tmp_path / "tok")
  for i in (2, 0, 1):
    got = corpus_lib.tokenize(path, out, DataConfig(overflow="split"), 32,
                              num_shards=3, shard_index=i)
  sizes = [p["num_rows"] for p in got.manifest.parts]
  assert len(sizes) == 3 and min(sizes) > 0
  _assert_same_rows(whole, got)
  assert got.ids_of(np.array([0]))[0] == f"one.{kind}:1"


# A one-source task read in shards: seqio reads it whole for each (warned).
@pytest.mark.filterwarnings("ignore:--corpus=tracer_")
def test_seqio_shards_tokenized_by_two_processes(tmp_path, records):
  """``TASK#shards=5`` tokenized by two processes (runs of 2 and 3 shards)
  joins to the rows one process reads; a seqio source without shards is
  tokenized by one process only."""
  path = str(facts.write_jsonl(tmp_path / "c.jsonl", records))
  vocab = DataConfig().vocabulary()
  data_lib.register_jsonl_task("tracer_tokenize_shards", path, vocab, ids=False)
  source = "tracer_tokenize_shards#shards=5"
  whole = data_lib.read_corpus(source, vocab, 32, "split")
  out = str(tmp_path / "tok")
  for i in (1, 0):
    got = corpus_lib.tokenize(source, out, DataConfig(overflow="split"), 32,
                              num_shards=2, shard_index=i)
  first = sum(i.split(":")[0] in ("0", "1") for i in whole.ids)  # shards 0, 1
  assert [p["num_rows"] for p in got.manifest.parts] == [first, len(whole) - first]
  assert 0 < first < len(whole)
  _assert_same_rows(whole, got)
  assert got.source == source
  with pytest.raises(InputError, match=re.escape(
      "tracer_tokenize_shards: tokenizing in 2 shards splits a file source's "
      "files, or a seqio source's shards when it names them (TASK#shards=N)")):
    corpus_lib.tokenize("tracer_tokenize_shards", str(tmp_path / "tok2"),
                        DataConfig(), 32, num_shards=2, shard_index=0)


def test_first_shared_hash_merges_parts_in_blocks():
  """The join's id check (a k-way merge of the parts' sorted hashes, a block
  of each at a time) against a sort of everything: no repeat, a repeat
  across parts or within one, at block edges, empty parts, extreme values."""
  rng = np.random.default_rng(0)
  top = np.iinfo(np.uint64).max
  for trial in range(300):
    num_parts = int(rng.integers(1, 7))
    values = rng.permutation(np.unique(rng.integers(
        0, 1 << int(rng.integers(4, 63)), int(rng.integers(0, 200)), np.uint64)))
    values[:int(rng.integers(0, 2))] = top  # unique: the others are < 2^63
    cuts = np.sort(rng.integers(0, len(values) + 1, num_parts - 1))
    parts = [np.sort(p) for p in np.split(values, cuts)]
    if trial % 3 and len(values):  # plant a repeat
      a, b = rng.integers(0, num_parts, 2)
      if len(parts[a]):
        parts[b] = np.sort(np.append(parts[b], rng.choice(parts[a])))
      if trial % 5 == 0 and len(parts[b]):  # a second, or a third copy
        c = int(rng.integers(0, num_parts))
        parts[c] = np.sort(np.append(parts[c], rng.choice(parts[b])))
    everything = np.sort(np.concatenate(parts))
    repeated = np.unique(everything[1:][everything[1:] == everything[:-1]])
    want = int(repeated[0]) if len(repeated) else None
    for block in (1, 2, 3, 7, 1000):
      assert corpus_lib.first_shared_hash(parts, block) == want, (trial, block)
      assert list(corpus_lib.shared_hashes(parts, block)) == repeated.tolist(), (
          trial, block)
  # Stored parts (tensorstore arrays), read a block at a time.
  stored = []
  for i, part in enumerate(np.array_split(np.arange(0, 5000, 3, dtype=np.uint64), 3)):
    stored.append(ts.open({"driver": "zarr3", "kvstore": {"driver": "memory",
                                                         "path": f"h{i}/"}},
                          create=True, dtype=ts.uint64, shape=part.shape).result())
    stored[-1].write(part).result()
  assert corpus_lib.first_shared_hash(stored, 64) is None
  stored[2][0].write(np.uint64(3)).result()  # part 0 holds 3 too
  assert corpus_lib.first_shared_hash(stored, 64) == 3


def test_a_hash_collision_is_no_duplicate_id(tmp_path, monkeypatch):
  """Ids are checked unique by their 64-bit hashes; two ids of one hash are
  told apart by their strings (before 2026-12-04 a collision was reported as
  "duplicate id"), in one part and across parts, and a true repeat among
  colliding ids is still found. The hash narrowed to 2 bits here."""
  real = corpus_lib._id_hash
  monkeypatch.setattr(corpus_lib, "_id_hash", lambda doc_id: real(doc_id) % 4)
  src = tmp_path / "src"
  src.mkdir()
  for name, ids in (("a", "abcdefg"), ("b", "hijklmn")):
    (src / f"{name}.jsonl").write_text("".join(
        json.dumps({"id": i, "text": f"text {i}"}) + "\n" for i in ids))
  pattern = str(src / "*.jsonl")
  config = DataConfig()
  memory = data_lib.read_corpus(pattern, config.vocabulary(), 16)
  for shards in (1, 2):
    out = str(tmp_path / f"tok{shards}")
    for index in range(shards):
      corpus_lib.tokenize(pattern, out, config, 16, num_shards=shards,
                          shard_index=index)
    _assert_same_rows(memory, corpus_lib.TokenizedCorpus(out))
  (src / "c.jsonl").write_text(json.dumps({"id": "c", "text": "again"}) + "\n")
  places = f"{src}/a.jsonl:3 and {src}/c.jsonl:1"
  with pytest.raises(InputError, match=re.escape(
      f"{pattern}: duplicate id 'c' ({places}; tokenized rows 2 and 14 of "
      f"{tmp_path}/dup1)")):
    corpus_lib.tokenize(pattern, str(tmp_path / "dup1"), config, 16)
  out = str(tmp_path / "dup3")
  for index in range(2):
    corpus_lib.tokenize(pattern, out, config, 16, num_shards=3, shard_index=index)
  # The join reads again only the files of the two parts holding the id.
  read = []
  real_places = data_lib.id_places
  monkeypatch.setattr(data_lib, "id_places", lambda source, doc_id, files=None: (
      read.append(sorted(files)), real_places(source, doc_id, files))[1])
  with pytest.raises(InputError, match=re.escape(
      f"duplicate id 'c' ({places}; tokenized rows 2 and 14 of {out})")):
    corpus_lib.tokenize(pattern, out, config, 16, num_shards=3, shard_index=2)
  assert read == [[f"{src}/a.jsonl", f"{src}/c.jsonl"]]


def test_a_damaged_joined_corpus_is_one_error(tmp_path, records):
  """A part gone (a copy cut short) or a manifest's part entry damaged:
  one error naming it (before 2026-12-04 a tensorstore NOT_FOUND at the
  first read of that part, or a KeyError)."""
  pattern = _shards(tmp_path / "shards", records)
  out = tmp_path / "tok"
  for index in range(2):
    corpus = corpus_lib.tokenize(pattern, str(out), DataConfig(), 32,
                                 num_shards=2, shard_index=index)
  assert corpus.manifest.chunks_stored
  # Chunks of zeros are stored too (tensorstore skips them by default), so
  # a missing chunk is damage: one error, not rows of zeros (before).
  part0 = out / "parts" / "00000-of-00002"
  assert not np.any(corpus.segments_of(np.arange(2)))
  assert (part0 / "segments" / "c" / "0").exists()
  (part0 / "tokens" / "c" / "0" / "0").unlink()
  shutil.rmtree(out / "parts" / "00001-of-00002" / "ids")
  fresh = corpus_lib.TokenizedCorpus(str(out))
  assert fresh.ids_of([0]) == corpus.ids_of([0])
  with pytest.raises(InputError, match=re.escape(
      f"{part0}: cannot read this corpus's arrays (NOT_FOUND: ")):
    fresh.examples([0])
  with pytest.raises(InputError, match=re.escape(
      f"{out}/parts/00001-of-00002: cannot read this corpus's arrays (")):
    fresh.ids_of([len(corpus) - 1])
  manifest = json.loads((out / "manifest.json").read_text())
  del manifest["parts"][1]["num_rows"]
  (out / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(InputError, match=re.escape(
      'manifest.json: parts[1] is {"path": "parts/00001-of-00002"}; expected')):
    corpus_lib.TokenizedCorpus(str(out))


def test_shard_errors(tmp_path, records):
  pattern = _shards(tmp_path / "shards", records)
  config = DataConfig()
  with pytest.raises(InputError, match="shard 3 of 3: expected"):
    corpus_lib.tokenize(pattern, str(tmp_path / "a"), config, 32, num_shards=3,
                        shard_index=3)
  with pytest.raises(InputError, match="seqio:none: tokenizing in 2 shards"):
    corpus_lib.tokenize("seqio:none", str(tmp_path / "a"), config, 32,
                        num_shards=2, shard_index=0)
  # A duplicate id in two parts is found at the join and named by its rows.
  dup = tmp_path / "dup"
  dup.mkdir()
  (dup / "a.jsonl").write_text(json.dumps({"id": "x", "text": "one"}) + "\n"
                               + json.dumps({"id": "y", "text": "two"}) + "\n")
  (dup / "b.jsonl").write_text(json.dumps({"id": "z", "text": "three"}) + "\n"
                               + json.dumps({"id": "x", "text": "four"}) + "\n")
  out = str(tmp_path / "dup-tok")
  corpus_lib.tokenize(str(dup / "*.jsonl"), out, config, 16, num_shards=2,
                      shard_index=0)
  with pytest.raises(InputError, match=re.escape(
      f"duplicate id 'x' ({dup}/a.jsonl:1 and {dup}/b.jsonl:2; tokenized rows 0 "
      f"and 3 of {out})")):
    corpus_lib.tokenize(str(dup / "*.jsonl"), out, config, 16, num_shards=2,
                        shard_index=1)
  assert not corpus_lib.is_tokenized(out)
  with pytest.raises(InputError, match=r"dup-tok: a directory without manifest.json: "
                     r".* parts written so far: 2 of 2 \(00000-of-00002, "
                     r"00001-of-00002\)$"):
    corpus_lib.open_corpus(out, config, 16)
  # A part left by a run on another process count is listed as such.
  os.rename(os.path.join(out, "parts", "00001-of-00002"),
            os.path.join(out, "parts", "00002-of-00003"))
  with pytest.raises(InputError, match=r"parts written so far: 1 of 2 "
                     r"\(00000-of-00002\); 1 of 3 \(00002-of-00003\)$"):
    corpus_lib.open_corpus(out, config, 16)
  # The same in object storage (before 2026-12-07 "no such file").
  remote = "memory://unfinished/tok"
  corpus_lib.tokenize(str(dup / "*.jsonl"), remote, config, 16, num_shards=2,
                      shard_index=0)
  with pytest.raises(InputError, match=re.escape(
      f"{remote}: a directory without manifest.json: not a tokenized corpus, or "
      "an unfinished one") + r".* parts written so far: 1 of 2 \(00000-of-00002\)$"):
    corpus_lib.open_corpus(remote, config, 16)
  # The parts of an unfinished run on 2 processes, rerun on 1 (before
  # 2026-12-05 refused: "not a tokenized corpus ... and not empty").
  corpus_lib.tokenize(pattern, str(tmp_path / "again"), config, 32,
                      num_shards=2, shard_index=0)
  one = corpus_lib.tokenize(pattern, str(tmp_path / "again"), config, 32)
  assert len(one) == len(records)
  # That part is left over, named (`tracer tokenize` says so).
  assert corpus_lib.leftovers(str(tmp_path / "again")) == ["parts/00000-of-00002"]
  # Parts made with other settings are not joined.
  out = str(tmp_path / "mixed")
  corpus_lib.tokenize(pattern, out, config, 32, num_shards=2, shard_index=0)
  with pytest.raises(InputError, match="made with other settings"):
    corpus_lib.tokenize(pattern, out, DataConfig(overflow="split"), 32,
                        num_shards=2, shard_index=1)


def test_launch_tokenize_on_two_processes(tmp_path, records):
  """``tracer tokenize`` under jax.distributed: each process writes its part,
  the last one joins; the rows are one process's. Each process returns once
  the corpus is joined (before 2026-12-04 the first to finish printed its
  part and exited: jax's shutdown barrier then killed both once the other's
  share took 10 minutes longer)."""
  import multiprocess  # pylint: disable=g-import-not-at-top
  pattern = _shards(tmp_path / "shards", records)
  out = tmp_path / "tok"
  # What a killed one-process run leaves: its arrays, no manifest. They are
  # not read, and process 0 names them (before 2026-12-05 nothing did).
  corpus_lib.tokenize(pattern, str(out), DataConfig(), 128)
  os.remove(out / corpus_lib.MANIFEST)
  port = multiprocess.free_port()
  commands = [[sys.executable, "-m", "tracer.launch.tokenize",
               "--gin_file=configs/tiny.gin", f"--corpus={pattern}",
               f"--output={out}", *multiprocess.distributed_flags(port, i)]
              for i in range(2)]
  procs, logs = multiprocess.start(commands, tmp_path, multiprocess.env(devices=1))
  texts = multiprocess.wait(procs, logs, time.monotonic() + 300)
  corpus = corpus_lib.TokenizedCorpus(str(out))
  assert [p["path"] for p in corpus.manifest.parts] == [
      "parts/00000-of-00002", "parts/00001-of-00002"]
  leftover = ["ids", "lengths", "segments", "texts", "tokens"]
  assert corpus_lib.leftovers(str(out)) == leftover
  assert (f"{out}: 5 entries of an unfinished run on another process count are "
          f"not part of this corpus and never read: {', '.join(leftover[:4])} ...; "
          "delete them to free their space") in texts[0].splitlines()
  assert "unfinished run" not in texts[1]
  memory = data_lib.read_corpus(pattern, DataConfig().vocabulary(), 128)
  _assert_same_rows(memory, corpus)
  for i, text in enumerate(texts):
    line = next(l for l in text.splitlines() if l.startswith(f"{out}: "))
    assert line.startswith(f"{out}: {len(corpus):,} rows of up to 128 tokens"), line
    assert line.endswith(f"rows written by process {i}"), line
  assert sum(int(re.search(r", ([\d,]+) rows written", t).group(1).replace(",", ""))
             for t in texts) == len(corpus)


def test_sharded_tokenize_benchmark_runs(tmp_path, capsys, monkeypatch):
  """``tracer benchmark-data --tokenize_processes`` small: every run's corpus
  has all the rows."""
  from tracer.launch import benchmark_data  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(benchmark_data, "ONE_FILE_ROW_GROUP", 50)
  results = benchmark_data.tokenize_table(
      400, [1, 3], str(tmp_path), 16, ("jsonl", "gzip", "zstd", "parquet", "parquet1"))
  assert [(r["shards"], r["processes"], r["rows"], len(r["process_seconds"]))
          for r in results] == [("jsonl", 1, 400, 1), ("jsonl", 3, 400, 3),
                                ("gzip", 1, 400, 1), ("gzip", 3, 400, 3),
                                ("zstd", 1, 400, 1), ("zstd", 3, 400, 3),
                                ("parquet", 1, 400, 1), ("parquet", 3, 400, 3),
                                ("parquet1", 1, 400, 1), ("parquet1", 3, 400, 3)]
  # The one file's 8 row groups went to all three processes.
  assert len(data_lib.corpus_files(str(tmp_path / "shards400" / "*.parquet"))) == 9
  # Each tokenized corpus removed once measured, and a run's left behind
  # (a kill mid-tokenize) by the next: reruns no longer grow the disk (until
  # an audit on 2026-12-08 every run's were kept, 113 MB after two runs
  # that check_disk had counted as 6.36 MB).
  assert not list((tmp_path / "shards400").glob("tokenized*"))
  assert results[-1]["part_rows"] == [150, 100, 150]
  (tmp_path / "shards400" / "tokenized1-0").mkdir()
  benchmark_data.tokenize_table(400, [1], str(tmp_path), 16, ("jsonl",))
  assert not list((tmp_path / "shards400").glob("tokenized*"))
  assert all(r["seconds"] > 0 for r in results)
  assert "| gzip | 3 |" in capsys.readouterr().out
  assert len(data_lib.corpus_files(str(tmp_path / "shards400" / "shard-*.jsonl.gz"))) == 8


def test_data_benchmark_corpus_killed_mid_write_leaves_none(tmp_path,
                                                            monkeypatch):
  """A run reuses a ``corpus.jsonl`` that exists: one killed mid-write must
  leave none. Until an audit on 2026-12-08 it was written in place, and a
  rerun timed the 235,937 lines a kill had left of 3,000,000."""
  from tracer.launch import benchmark_data  # pylint: disable=g-import-not-at-top

  class Killed(list):  # (the words, the process killed at the 50th)
    def __getitem__(self, i):
      self.taken = getattr(self, "taken", 0) + 1
      if self.taken > 50:
        raise KeyboardInterrupt
      return super().__getitem__(i)

  path = str(tmp_path / "corpus.jsonl")
  monkeypatch.setattr(benchmark_data, "WORDS", Killed(benchmark_data.WORDS))
  with pytest.raises(KeyboardInterrupt):
    benchmark_data.write_jsonl(path, 100)
  assert not os.path.exists(path)
  monkeypatch.undo()
  benchmark_data.write_jsonl(path, 100)
  with open(path) as f:
    assert len(f.readlines()) == 100
  assert os.listdir(tmp_path) == ["corpus.jsonl"]


def test_data_benchmark_refuses_corpora_past_the_free_disk(tmp_path):
  from tracer.launch import benchmark_data  # pylint: disable=g-import-not-at-top
  # 100 + 50 rows of 62 + 8 * 16 bytes, and two stores of 422 bytes a row.
  # Tokenizing: the JSONL and its shards in each format (62 bytes a row
  # each) of every corpus, one tokenized corpus at a time (the largest's)
  # and its parts' chunks (3 MiB each). Until an audit on 2026-12-08 it
  # counted one JSONL and one tokenized corpus a row.
  need = 150 * 62 * 3 + 100 * 8 * 16 + 4 * 3 * 2**20
  tokenize = dict(formats=("jsonl", "parquet"), processes=4)
  benchmark_data.check_disk([100, 50], 16, True, str(tmp_path), free=need,
                            **tokenize)
  with pytest.raises(ValueError, match=re.escape(
      "--rows=100,50: the corpora and what is made of them (shards as jsonl, "
      "parquet, one tokenized corpus at a time in up to 4 parts of whole "
      "chunks, 12.0 MiB) take about 314 bytes per row at --max_len=16, ")):
    benchmark_data.check_disk([100, 50], 16, True, str(tmp_path),
                              free=need - 1, **tokenize)
  with pytest.raises(ValueError, match=re.escape(
      "--rows=100,50: the corpora and what is made of them take about 1,034 bytes "
      "per row at --max_len=16, 151.5 KiB, more than the 27.8 KiB free at "
      f"--workdir={tmp_path}/new; expected at most 27 rows in all")):
    benchmark_data.check_disk([100, 50], 16, False, str(tmp_path / "new"),
                              free=28_500)
  benchmark_data.check_disk([100], 16, False, str(tmp_path / "new" / "deeper"))


def test_encode_memory_benchmark_fits_its_sweeps(tmp_path, capsys, monkeypatch):
  """``tracer benchmark-data --encode_memory`` small, its phases in this
  process: each run reports the sizes the pipeline's checks read and XLA's
  count of the step (the encoder's check) on its devices, each sweep a
  slope, and the batch sweeps together the copies they hold."""
  from tracer import pipeline  # pylint: disable=g-import-not-at-top
  from tracer.launch import benchmark_data  # pylint: disable=g-import-not-at-top
  envs = []

  def in_process(phase, *flags_, env=None):
    envs.append(env)
    what, *args = benchmark_data.parse_phase(phase.removeprefix("--phase="))
    if what == "tokenize":
      return benchmark_data.phase_tokenize(*args, int(flags_[0].split("=")[1]))
    assert what == "encode_memory"
    return benchmark_data.phase_encode_memory(*args)

  monkeypatch.setattr(benchmark_data, "run_phase", in_process)
  nano = {"model": "nano", "max_len": 16, "projection_dim": 64, "microbatch": 2,
          "dtype": "bfloat16"}
  sweeps = {"examples": {**nano, "vary": "batch", "sizes": (16, 32), "batch": None,
                         "chunk_rows": 16, "rows": 128},
            "chunk": {**nano, "vary": "chunk_rows", "sizes": (16, 32), "batch": 16,
                      "chunk_rows": None, "rows": 32}}
  # (This process has 8 devices: --encode_memory_devices=8's phases.)
  out = benchmark_data.encode_memory_table(list(sweeps), str(tmp_path), sweeps,
                                           devices=8)
  assert {e["XLA_FLAGS"] for e in envs if e} == {
      "--xla_force_host_platform_device_count=8"}
  dim = out["runs"][0]["dim"]
  # 8 devices of 2 examples a step: batches of 16 and 32 are this process's.
  assert [(r["sweep"], r["rows"], r["local_batch"], r["chunk_elements"],
           r["example_bytes"]) for r in out["runs"]] == [
               ("examples", 128, 16, 16 * dim, 12 * 16),
               ("examples", 128, 32, 16 * dim, 12 * 16),
               ("chunk", 32, 16, 16 * dim, 12 * 16),
               ("chunk", 32, 16, 32 * dim, 12 * 16)]
  # (Runs this small move RSS by less than its counters' lag: no order.)
  assert all(r["peak_mb"] > 0 and r["baseline_mb"] > 0 for r in out["runs"])
  # XLA's count of the step (the encoder's check: x 8 devices) splits the
  # batch's encodings and losses among the devices: counted once in all.
  assert all(r["devices"] == 8 for r in out["runs"])
  for r in out["runs"]:
    assert r["xla_output_bytes"] * 8 == pytest.approx(
        r["local_batch"] * (4 * dim + 4), abs=8 * 64)
  counts = [r["xla_bytes"] for r in out["runs"]]
  assert counts[0] < counts[1] and counts[2] == counts[3]  # (not chunk_rows)
  assert out["fits"]["examples"]["per"] == "example"
  assert out["fits"]["chunk"]["per"] == "chunk element"
  printed = capsys.readouterr().out
  assert "| examples | nano |" in printed and "bytes per chunk element" in printed
  assert not list(tmp_path.glob("*/store"))  # each run's store removed
  # Two batch sweeps give the copies of an example and of its encoding.
  fits = {name: {"per": "example", "example_bytes": e, "dim": d,
                 "bytes": 4.5 * e + 4.0 * 4 * d, "fixed_mb": 80.0,
                 "residual_mb": 1.0}
          for name, e, d in (("examples", 3072, 205), ("encodings", 1536, 65406))}
  fits["chunk"] = {"per": "chunk element", "bytes": 8.0, "fixed_mb": 33.0,
                   "residual_mb": 1.0, "example_bytes": 1536, "dim": 65406}
  lines = benchmark_data.check_lines(fits)
  assert lines[-1] == (
      "batch: 4.50 copies of each example's bytes and 4.00 of its float32 "
      "encoding (4 d bytes) per example; the check counts "
      f"{pipeline.BATCH_EXAMPLE_COPIES} and {pipeline.BATCH_ENCODING_COPIES}")
  assert lines[2].startswith("chunk: 8.00 bytes per chunk element (+ 33 MB fixed")
  # A small run's slope may be 0 (RSS moves in pages): no ZeroDivisionError.
  zero = benchmark_data.check_lines({"chunk": {**fits["chunk"], "bytes": 0.0}})
  assert zero[0].endswith("the check counts 8 (no multiple of the slope)")
  assert benchmark_data.fit_line([1, 2, 4], [12, 14, 18]) == pytest.approx((2, 10, 0))


def test_data_benchmark_phases_take_paths_with_commas(tmp_path):
  """A phase's arguments reach its process whole, commas and all (a
  ``--workdir`` of ``w,x``). Until an audit on 2026-12-08 they were
  comma-joined into ``--phase`` and split apart there: a ValueError
  traceback from the tokenize phase."""
  from tracer.launch import benchmark_data  # pylint: disable=g-import-not-at-top
  jsonl = tmp_path / "w,x" / "corpus.jsonl"
  jsonl.parent.mkdir()
  benchmark_data.write_jsonl(str(jsonl), 30)
  runs = benchmark_data.read_table([str(jsonl)])
  assert [(r["how"], r["lines"]) for r in runs] == [("streamed", 30), ("whole", 30)]
  assert benchmark_data.parse_phase(benchmark_data.phase_flag(
      "read", jsonl, 1).removeprefix("--phase=")) == ["read", str(jsonl), "1"]


def test_data_benchmark_phases_run(tmp_path):
  """``tracer benchmark-data``'s phases, small and in this process: tokenize
  a generated corpus, then encode it from the directory and from the JSONL."""
  from tracer.launch import benchmark_data  # pylint: disable=g-import-not-at-top
  jsonl = str(tmp_path / "corpus.jsonl")
  benchmark_data.write_jsonl(jsonl, 200)
  tok = benchmark_data.phase_tokenize(jsonl, str(tmp_path / "tok"), 16)
  assert tok["rows"] == 200 and tok["peak_mb"] >= tok["baseline_mb"] > 0
  for source in (str(tmp_path / "tok"), jsonl):
    out = benchmark_data.phase_encode(source, str(tmp_path / f"store{len(source)}"),
                                      16, 64)
    assert out["rows"] == 200 and out["rows_per_s"] > 0
  packed = tmp_path / "corpus.jsonl.gz"
  packed.write_bytes(gzip.compress(open(jsonl, "rb").read()))
  parquet = tmp_path / "corpus.parquet"
  parquet.write_bytes(_as_parquet(open(jsonl, "rb").read()))
  for location in (jsonl, str(packed), str(parquet)):
    for whole in ("0", "1"):
      read = benchmark_data.phase_read(location, whole)
      assert read["lines"] == 200 and read["peak_mb"] >= read["baseline_mb"] > 0
  join = benchmark_data.join_table(3000, 3, str(tmp_path))
  assert [(r["how"], r["shared"]) for r in join] == [("merged", None), ("whole", None)]
