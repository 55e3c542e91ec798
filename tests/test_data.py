"""Tests of the corpus and query readers, the row rule and seqio sources."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import subprocess
import sys
import warnings
import zlib

import jax
import numpy as np
import pytest
import zstandard as zstd

from tracer import data as data_lib
from tracer import facts
from tracer import model as model_lib
from tracer import partitioning
from tracer import storage
from tracer.errors import InputError

TINY = model_lib.ModelConfig(vocab_size=259, max_len=32, d_model=32, num_layers=1,
                             num_heads=2, d_ff=64)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def vocab():
  return data_lib.make_vocabulary("byte")


@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory):
  """21 fact documents, one of them non-ASCII and long enough to split."""
  records = facts.generate(facts.FactsConfig(facts_per_bucket=5,
                                             distractor_docs=10))[0][:20]
  records.append({"id": "unicode", "text": "héllo wörld ünïcode ✓ " * 3})
  return str(facts.write_jsonl(tmp_path_factory.mktemp("c") / "corpus.jsonl",
                               records))


def _records(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _write(tmp_path, lines, name="bad.jsonl"):
  path = tmp_path / name
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return str(path)


def _token_rows(corpus) -> list[np.ndarray]:
  return [corpus.row_tokens(r) for r in range(len(corpus))]


# --- the byte vocabulary ---------------------------------------------------------


def test_byte_vocabulary_matches_seqio():
  ours, theirs = data_lib.ByteVocabulary(), data_lib.as_seqio(data_lib.ByteVocabulary())
  assert type(theirs).__module__.startswith("seqio")
  assert (ours.vocab_size, ours.eos_id, ours.unk_id, ours.pad_id) == (
      theirs.vocab_size, theirs.eos_id, theirs.unk_id, 0)
  texts = ["", "plain ascii", "héllo wörld ✓ 日本", "\x00\x7f tab\tnewline\n", "🙂" * 3]
  for text in texts:
    assert ours.encode(text) == list(theirs.encode(text)), text
    assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text)) == text
  rng = np.random.default_rng(0)
  # Random ids: specials, bytes that are not valid UTF-8, ids past the end,
  # an EOS in the middle (decoding stops there).
  for _ in range(200):
    ids = rng.integers(0, 300, size=rng.integers(0, 40)).tolist()
    assert ours.decode(ids) == theirs.decode(ids), ids


def test_byte_vocabulary_does_not_import_seqio():
  code = ("import sys; from tracer import data; v = data.make_vocabulary('byte'); "
          "v.decode(v.encode('x')); assert 'seqio' not in sys.modules and "
          "'tensorflow' not in sys.modules, 'seqio imported'")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]


# --- the row rule --------------------------------------------------------------

def test_truncate_rows(corpus_path, vocab):
  corpus = data_lib.read_file_corpus(corpus_path, vocab, 32)
  records = _records(corpus_path)
  assert len(corpus) == len(records) and corpus.max_len == 32
  assert corpus.ids == [r["id"] for r in records]
  assert corpus.texts == [r["text"] for r in records]
  assert corpus.segments.tolist() == [0] * len(records)
  for r, tokens in zip(records, _token_rows(corpus)):
    full = vocab.encode(r["text"]) + [data_lib.EOS_ID]
    assert tokens.dtype == np.int32
    assert tokens.tolist() == full[:32]
  ex = corpus.examples([3, 0])
  assert {k: (v.shape, v.dtype) for k, v in ex.items()} == {
      "inputs": ((2, 32), np.int32), "targets": ((2, 32), np.int32),
      "weights": ((2, 32), np.float32)}
  n = len(corpus.row_tokens(3))
  np.testing.assert_array_equal(ex["targets"][0, :n], corpus.row_tokens(3))
  np.testing.assert_array_equal(ex["inputs"][0, 1:n], corpus.row_tokens(3)[:-1])
  assert ex["inputs"][0, 0] == 0
  np.testing.assert_array_equal(ex["weights"][0], np.arange(32) < n)


def test_split_rows_are_consecutive_windows(corpus_path, vocab):
  corpus = data_lib.read_file_corpus(corpus_path, vocab, 32, overflow="split")
  records = _records(corpus_path)
  row = 0
  for r in records:
    full = vocab.encode(r["text"]) + [data_lib.EOS_ID]
    k = -(-len(full) // 32)
    assert corpus.ids[row:row + k] == [r["id"]] * k
    assert corpus.segments[row:row + k].tolist() == list(range(k))
    windows = _token_rows(corpus)[row:row + k]
    # Windows of max_len tokens, in order; only the last may be shorter.
    assert [len(w) for w in windows[:-1]] == [32] * (k - 1)
    assert 1 <= len(windows[-1]) <= 32
    assert np.concatenate(windows).tolist() == full
    if k == 1:
      assert corpus.texts[row] == r["text"]
    else:
      assert corpus.texts[row:row + k] == [vocab.decode(w.tolist()) for w in windows]
    row += k
  assert row == len(corpus) > len(records)
  # The non-ASCII document is the last; its first window is its first 32 bytes.
  assert corpus.ids[-3:] == ["unicode"] * 3
  assert corpus.texts[-3] == "héllo wörld ünïcode ✓ hél"
  with pytest.raises(InputError, match="overflow 'wrap'"):
    data_lib.read_file_corpus(corpus_path, vocab, 32, overflow="wrap")


def test_segment_edge_cases():
  eos = [5, 6, 7, data_lib.EOS_ID]
  assert [w.tolist() for w in data_lib.segment(eos, 4, "split")] == [eos]
  assert [w.tolist() for w in data_lib.segment(eos, 3, "split")] == [
      [5, 6, 7], [data_lib.EOS_ID]]
  assert [w.tolist() for w in data_lib.segment(eos, 3, "truncate")] == [[5, 6, 7]]
  assert [r.tolist() for r in data_lib.batches(5, 2)] == [[0, 1], [2, 3], [4]]
  assert [r.tolist() for r in data_lib.batches(5, 2, start=3)] == [[3, 4]]


def _row_digest(corpus) -> str:
  h = hashlib.sha256()
  h.update(json.dumps([corpus.ids, corpus.texts, corpus.segments.tolist()]).encode())
  ex = corpus.examples(range(len(corpus)))
  for k in sorted(ex):
    h.update(k.encode() + ex[k].tobytes())
  return h.hexdigest()


def _per_row_losses(corpus, params, devices) -> np.ndarray:
  """Per-example losses with the batch split over ``devices``, padded to fit."""
  mesh = partitioning.make_mesh(devices=devices)
  n = len(corpus)
  rows = np.arange(partitioning.padded_size(n, mesh.size)) % n
  batch = partitioning.to_global(corpus.examples(rows),
                                 partitioning.all_devices_batch(mesh))
  loss_fn = model_lib.make_loss_fn(TINY)
  losses = jax.jit(jax.vmap(loss_fn, in_axes=(None, 0)),
                   in_shardings=(partitioning.replicated(mesh),
                                 partitioning.all_devices_batch(mesh)))(params, batch)
  assert losses.sharding.is_equivalent_to(partitioning.all_devices_batch(mesh), 1)
  return np.asarray(losses)[:n]


_ONE_DEVICE = """
import json, sys
import jax
assert jax.device_count() == 1, jax.devices()
from tracer import data as data_lib, model as model_lib, partitioning
sys.path.insert(0, "tests")
import test_data as t
vocab = data_lib.make_vocabulary("byte")
corpus = data_lib.read_file_corpus(sys.argv[1], vocab, 32, overflow="split")
losses = t._per_row_losses(corpus, model_lib.init_params(t.TINY), jax.devices())
print(json.dumps({"digest": t._row_digest(corpus), "losses": losses.tolist()}))
"""


def test_rows_and_per_row_losses_do_not_depend_on_devices(corpus_path, vocab):
  corpus = data_lib.read_file_corpus(corpus_path, vocab, 32, overflow="split")
  assert len(corpus) % 8 and len(corpus) % 2  # the batch needs padding
  params = model_lib.init_params(TINY)
  by_count = {n: _per_row_losses(corpus, params, jax.devices()[:n])
              for n in (1, 2, 8)}
  for n in (2, 8):
    np.testing.assert_array_equal(by_count[n], by_count[1], err_msg=f"{n} devices")
  # Matches the unsharded loss of each row.
  single = np.asarray(jax.vmap(model_lib.make_loss_fn(TINY), in_axes=(None, 0))(
      params, corpus.examples(range(len(corpus)))))
  np.testing.assert_allclose(by_count[8], single, rtol=1e-6)

  # A process that sees one device only builds the same row table and losses.
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run([sys.executable, "-c", _ONE_DEVICE, corpus_path], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  other = json.loads(proc.stdout.strip().splitlines()[-1])
  assert other["digest"] == _row_digest(corpus)
  np.testing.assert_array_equal(np.asarray(other["losses"], np.float32), by_count[1])


# --- malformed input ---------------------------------------------------------

GOOD = '{"id": "a", "text": "hello"}'


@pytest.mark.parametrize("lines,lineno,message", [
    ([GOOD, '{"id": "b", "text": "x"'], 2, "not valid JSON"),
    ([GOOD, "", '["id", "text"]'], 3, "expected a JSON object, got list"),
    ([GOOD, '{"text": "hi"}'], 2, "missing field 'id'"),
    (['{"id": "b"}'], 1, "missing field 'text'"),
    ([GOOD, '{"id": 7, "text": "hi"}'], 2, "field 'id' must be a string, got int"),
    (['{"id": "b", "text": null}'], 1, "field 'text' must be a string, got NoneType"),
    ([GOOD, '{"id": "b", "text": "  "}'], 2, "field 'text' is empty"),
    ([GOOD, '{"id": "b", "text": "x"}', '{"id": "a", "text": "y"}'], 3,
     "duplicate id 'a' \\(first at line 1\\)"),
    # What Python's json cannot hold: a traceback before 2026-12-04.
    ([GOOD, "[" * 100_000], 2, r"not valid JSON \(nested too deeply\)"),
    ([GOOD, '{"id": "b", "text": "x", "n": ' + "9" * 5000 + "}"], 2,
     r"not valid JSON \(Exceeds the limit \(4300 digits\) for integer string "
     r"conversion: value has 5000 digits\); expected one JSON object per line"),
])
def test_malformed_corpus_names_file_and_line(tmp_path, vocab, lines, lineno,
                                              message):
  path = _write(tmp_path, lines)
  with pytest.raises(InputError, match=f"^{re.escape(path)}:{lineno}: {message}"):
    data_lib.read_corpus(path, vocab, 32)


def test_invalid_utf8_names_file_and_line(tmp_path, vocab):
  path = tmp_path / "latin1.jsonl"
  path.write_bytes(GOOD.encode() + b"\n" + '{"id": "b", "text": "caf\xe9"}\n'
                   .encode("latin-1"))
  with pytest.raises(InputError, match=f"^{re.escape(str(path))}:2: not valid "
                     "UTF-8"):
    data_lib.read_corpus(str(path), vocab, 32)


# --- compressed and streamed files ----------------------------------------------

def _as_lists(corpus) -> list[list[int]]:
  return [r.tolist() for r in _token_rows(corpus)]


def _compress(kind: str, data: bytes) -> bytes:
  if kind == "gzip":
    return gzip.compress(data)
  if kind == "gzip, two members":  # what `cat a.gz b.gz` makes
    half = data.index(b"\n", len(data) // 2) + 1
    return gzip.compress(data[:half]) + gzip.compress(data[half:])
  if kind == "zstd, two frames":
    half = data.index(b"\n", len(data) // 2) + 1
    return zstd.compress(data[:half]) + zstd.compress(data[half:])
  return {"bzip2": bz2.compress, "xz": lzma.compress, "zstd": zstd.compress}[kind](data)


@pytest.mark.parametrize("kind", ["gzip", "gzip, two members", "bzip2", "xz", "zstd",
                                  "zstd, two frames"])
def test_compressed_files_give_the_same_rows(tmp_path, corpus_path, vocab, kind):
  """Known by their first bytes, not their names (C4's shards: *.json.gz)."""
  with open(corpus_path, "rb") as f:
    plain = f.read()
  path = tmp_path / "c4-train.00000-of-01024.json"
  path.write_bytes(_compress(kind, plain))
  want = data_lib.read_corpus(corpus_path, vocab, 32, "split")
  got = data_lib.read_corpus(str(path), vocab, 32, "split")
  assert got.ids == want.ids and _as_lists(got) == _as_lists(want)
  queries = tmp_path / "queries.jsonl.gz"
  queries.write_bytes(gzip.compress(b'{"id": "q", "prompt": "p", "target": "t"}\n'))
  assert [q["id"] for q in data_lib.read_queries(str(queries))] == ["q"]


def test_damaged_compressed_files_name_file_and_line(tmp_path, corpus_path, vocab):
  with open(corpus_path, "rb") as f:
    plain = f.read()
  packed = gzip.compress(plain)
  cut = tmp_path / "cut.jsonl.gz"
  cut.write_bytes(packed[:len(packed) // 2])
  with pytest.raises(InputError, match=rf"^{re.escape(str(cut))}:\d+: the gzip stream "
                     "is damaged or cut short .*expected a whole gzip file"):
    data_lib.read_corpus(str(cut), vocab, 32)
  flipped = bytearray(packed)
  flipped[len(flipped) // 2] ^= 0xFF
  damaged = tmp_path / "damaged.jsonl.gz"
  damaged.write_bytes(bytes(flipped))
  with pytest.raises(InputError, match=rf"^{re.escape(str(damaged))}:\d+: "):
    data_lib.read_corpus(str(damaged), vocab, 32)
  for kind in ("bzip2", "xz", "zstd", "zstd, two frames"):
    packed = _compress(kind, plain)
    for end in (len(packed) // 2, len(packed) - 1):
      cut.write_bytes(packed[:end])
      with pytest.raises(InputError, match=f"{re.escape(str(cut))}:\\d+: the "
                         f"{kind.split(',')[0]} stream is damaged or cut short"):
        data_lib.read_corpus(str(cut), vocab, 32)
  junk = tmp_path / "pile.jsonl.zst"
  junk.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(20))
  with pytest.raises(InputError, match=f"^{re.escape(str(junk))}:1: the zstd stream "
                     "is damaged"):
    data_lib.read_corpus(str(junk), vocab, 32)
  # An empty file named as compressed or Parquet, in a glob: before
  # 2026-12-05 read as a shard of no rows, without a word.
  shards = tmp_path / "shards"
  shards.mkdir()
  (shards / "a.jsonl.gz").write_bytes(gzip.compress(plain))
  for name, kind in (("b.jsonl.gz", "gzip"), ("b.jsonl.zst", "zstd"),
                     ("b.parquet", "Parquet")):
    (shards / name).write_bytes(b"")
    with pytest.raises(InputError, match=re.escape(
        f"{shards / name}: empty (0 bytes), but named as a {kind} file, which is "
        f"never empty; expected a whole {kind} file")):
      data_lib.read_corpus(str(shards / "*"), vocab, 32)
    (shards / name).unlink()
  (shards / "b.jsonl").write_bytes(b"")  # plain JSONL: an empty shard
  assert len(data_lib.read_corpus(str(shards / "*"), vocab, 32)) == len(
      data_lib.read_corpus(str(corpus_path), vocab, 32))


@pytest.mark.parametrize("kind", ["gzip", "bzip2", "xz", "zstd"])
def test_a_cut_short_file_gives_every_whole_line_then_names_the_next(tmp_path,
                                                                     kind):
  """Before 2026-12-07 a gzip, bzip2 or xz file cut short lost the lines of
  the 1 MiB read that failed, and the error named the first of them (up to
  1 MiB of text early); a line share's count (``count_lines``) did so for
  zstd too."""
  # 2 MB of digests: bzip2 gives the text of a 900 kB block only once it is
  # whole, so the cut is two blocks in; packed text would fit in one.
  plain = "".join(json.dumps({"id": f"d{i}", "text": f"doc {i} " + hashlib.sha256(
      b"%d" % i).hexdigest()}) + "\n" for i in range(20000)).encode()
  pack, unpacker = {
      "gzip": (gzip.compress, lambda: zlib.decompressobj(31)),
      "bzip2": (bz2.compress, bz2.BZ2Decompressor),
      "xz": (lambda b: lzma.compress(b, preset=1), lzma.LZMADecompressor),
      "zstd": (zstd.compress, lambda: zstd.ZstdDecompressor().decompressobj())}[kind]
  packed = pack(plain)
  cut = packed[:len(packed) * 9 // 10]
  whole = unpacker().decompress(cut).count(b"\n")
  assert whole > 15000
  path = tmp_path / "cut.jsonl"
  path.write_bytes(cut)
  message = (f"^{re.escape(str(path))}:{whole + 1}: the {kind} stream is damaged "
             "or cut short")
  got = []
  with pytest.raises(InputError, match=message):
    got.extend(n for n, _ in data_lib.iter_jsonl(str(path)))
  assert got == list(range(1, whole + 1))
  with pytest.raises(InputError, match=message):
    next(data_lib.iter_jsonl(str(path), share=(1, 2)))


def test_zstd_without_its_package_says_what_to_install(tmp_path, vocab, monkeypatch):
  monkeypatch.setitem(sys.modules, "zstandard", None)  # import fails
  path = tmp_path / "pile.jsonl.zst"
  path.write_bytes(zstd.compress(b'{"id": "a", "text": "b"}\n'))
  with pytest.raises(InputError, match=f"^{re.escape(str(path))}: zstd-compressed; "
                     "reading it needs the zstandard package"):
    data_lib.read_corpus(str(path), vocab, 32)


def test_files_without_ids_get_their_positions(tmp_path, vocab):
  """C4's release: {"text", "timestamp", "url"} per line, no id. Ids are the
  file's name below the glob's fixed directories and the line number."""
  for lang in ("de", "en"):
    (tmp_path / lang).mkdir()
    lines = [{"text": f"{lang} one", "url": "u", "timestamp": "t"}, None,
             {"text": f"{lang} two", "url": "u", "timestamp": "t"}]
    data = "".join(json.dumps(r) + "\n" if r else "\n" for r in lines).encode()
    (tmp_path / lang / "c4-train.00000-of-00001.json.gz").write_bytes(gzip.compress(data))
  got = data_lib.read_corpus(str(tmp_path / "*" / "c4-train.*.json.gz"), vocab, 32)
  assert got.ids == ["de/c4-train.00000-of-00001.json.gz:1",
                     "de/c4-train.00000-of-00001.json.gz:3",
                     "en/c4-train.00000-of-00001.json.gz:1",
                     "en/c4-train.00000-of-00001.json.gz:3"]
  one = data_lib.read_corpus(str(tmp_path / "en" / "c4-train.00000-of-00001.json.gz"),
                             vocab, 32)
  assert one.ids == ["c4-train.00000-of-00001.json.gz:1",
                     "c4-train.00000-of-00001.json.gz:3"]
  mixed = _write(tmp_path, ['{"text": "a"}', GOOD], "mixed.jsonl")
  with pytest.raises(InputError, match=f"^{re.escape(mixed)}:2: has an 'id', but "
                     f"{re.escape(mixed)}:1 has none"):
    data_lib.read_corpus(mixed, vocab, 32)
  with pytest.raises(InputError, match="queries.jsonl:1: missing field 'id'"):
    data_lib.read_queries(_write(tmp_path, ['{"prompt": "p", "target": "t"}'],
                                 "queries.jsonl"))


@pytest.fixture
def counted_windows(monkeypatch):
  """Counts the range reads of objects (``storage._RangeReader``)."""
  count = [0]
  request = storage._RangeReader._request

  def counting(self):
    count[0] += 1
    return request(self)

  monkeypatch.setattr(storage._RangeReader, "_request", counting)
  # Nothing reads an object whole any more.
  monkeypatch.setattr(storage, "read_bytes", lambda *_: pytest.fail("read whole"))
  return count


@pytest.mark.parametrize("window", [1, 7, 64, 1 << 20])
def test_objects_are_read_window_by_window(tmp_path, corpus_path, vocab,
                                           monkeypatch, counted_windows, window):
  with open(corpus_path, "rb") as f:
    plain = f.read()
  want = data_lib.read_corpus(corpus_path, vocab, 32)
  monkeypatch.setattr(storage, "READ_WINDOW", window)
  for name, data in (("plain.jsonl", plain), ("packed.jsonl.gz", gzip.compress(plain))):
    url = f"memory://windows/{window}/{name}"
    storage.write_bytes(url, data)
    counted_windows[0] = 0
    got = data_lib.read_corpus(url, vocab, 32)
    assert got.ids == want.ids and _as_lists(got) == _as_lists(want)
    assert counted_windows[0] == len(data) // window + 1


@pytest.mark.parametrize("where", ["memory", "s3", "gs"])
def test_object_replaced_while_read_is_an_error(where, request, monkeypatch):
  """In memory, on an S3 server and on a GCS emulator: every window is read
  from the version the first one read."""
  if where == "memory":
    root = "memory://replaced"
  else:
    root = request.getfixturevalue({"s3": "s3", "gs": "gcs"}[where])("replaced")
  lines = b"".join(b'{"id": "%d", "text": "abc"}\n' % i for i in range(30))
  storage.write_bytes(f"{root}/c.jsonl", lines)
  monkeypatch.setattr(storage, "READ_WINDOW", 16)
  with storage.open_binary(f"{root}/c.jsonl") as f:
    assert f.readline() == lines[:lines.index(b"\n") + 1]
    storage.write_bytes(f"{root}/c.jsonl", lines.replace(b"abc", b"xyz"))
    with pytest.raises(InputError, match=f"^{re.escape(root)}/c.jsonl: replaced while "
                       r"being read \(at byte \d+"):
      f.read()
  with pytest.raises(InputError, match=f"^{re.escape(root)}/none.jsonl: no such file"):
    storage.open_binary(f"{root}/none.jsonl")


def test_object_storage_shards_are_streamed(object_store, tmp_path, corpus_path,
                                            vocab, monkeypatch, counted_windows):
  """On an S3 server and a GCS emulator: a glob of gzip shards, and a plain
  file whose size is a whole number of windows (where object stores and files
  answer differently)."""
  records = _records(corpus_path)
  bucket = object_store("streamed")
  for i in range(3):
    data = "".join(json.dumps(r) + "\n" for r in records[i::3]).encode()
    storage.write_bytes(f"{bucket}/c4/c4-train.{i:05d}-of-00003.json.gz",
                        gzip.compress(data))
  monkeypatch.setattr(storage, "READ_WINDOW", 256)
  got = data_lib.read_corpus(f"{bucket}/c4/c4-train.*.json.gz", vocab, 32)
  assert got.ids == [r["id"] for i in range(3) for r in records[i::3]]
  assert counted_windows[0] > 3
  data = "".join(json.dumps(r) + "\n" for r in records).encode()
  pad = -(len(data) + len('{"id": "pad", "text": ""}\n')) % 256
  data += ('{"id": "pad", "text": "%s"}\n' % ("x" * pad)).encode()
  assert len(data) % 256 == 0
  storage.write_bytes(f"{bucket}/whole.jsonl", data)
  got = data_lib.read_corpus(f"{bucket}/whole.jsonl", vocab, 32)
  assert got.ids == [r["id"] for r in records] + ["pad"]


def test_zstd_damage_names_its_line_and_pzstd_files_are_read(tmp_path, corpus_path,
                                                            vocab):
  """Lines before damage are read first, so the error names the damaged
  line, not line 1; a file that starts with a skippable frame (pzstd writes
  one before each frame) is zstd, not text."""
  with open(corpus_path, "rb") as f:
    plain = f.read()
  garbage = tmp_path / "garbage.jsonl.zst"
  garbage.write_bytes(zstd.compress(plain) + b"\x28\xb5\x2f\xfd" + bytes(20))
  lines = plain.count(b"\n")
  with pytest.raises(InputError, match=f"^{re.escape(str(garbage))}:{lines + 1}: "
                     "the zstd stream is damaged"):
    data_lib.read_corpus(str(garbage), vocab, 32)
  skippable = b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + bytes(4)
  pzstd = tmp_path / "pzstd.jsonl.zst"
  pzstd.write_bytes(skippable + zstd.compress(plain))
  want = data_lib.read_corpus(corpus_path, vocab, 32)
  got = data_lib.read_corpus(str(pzstd), vocab, 32)
  assert got.ids == want.ids and _as_lists(got) == _as_lists(want)


def test_zstd_long_files_are_read(tmp_path, corpus_path, vocab):
  """A file written with ``zstd --long`` declares a window past zstandard's
  default limit (128 MiB): before 2026-12-08 it was "damaged or cut short
  (... Frame requires too much memory for decoding)"."""
  with open(corpus_path, "rb") as f:
    plain = f.read()
  packed = io.BytesIO()
  params = zstd.ZstdCompressionParameters(window_log=28, enable_ldm=True)
  with zstd.ZstdCompressor(compression_params=params).stream_writer(
      packed, closefd=False) as w:
    w.write(plain)
  long = tmp_path / "long.jsonl.zst"
  long.write_bytes(packed.getvalue())
  want = data_lib.read_corpus(corpus_path, vocab, 32)
  got = data_lib.read_corpus(str(long), vocab, 32)
  assert got.ids == want.ids and _as_lists(got) == _as_lists(want)


@pytest.mark.parametrize("options", [
    {}, {"write_checksum": True}, {"write_content_size": False},
    {"write_dict_id": True, "threads": 2}])
def test_zstd_output_is_bounded_and_every_cut_is_seen(tmp_path, options):
  """Before 2026-12-04 each 64 KiB of input was decompressed whole: these 8
  KiB of blank lines took 256 MiB at once. Now the reader follows the
  frame and block headers (a frame walker), whatever the frame's options."""
  import tracemalloc  # pylint: disable=g-import-not-at-top
  packed = zstd.ZstdCompressor(level=1, **options).compress(b"\n" * (1 << 28))
  assert len(packed) < 64 << 10
  tracemalloc.start()
  try:
    f, kind = data_lib.decompressed(io.BufferedReader(io.BytesIO(packed)), "bomb")
    total = sum(len(chunk) for chunk in iter(lambda: f.read(1 << 20), b""))
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert kind == "zstd" and total == 1 << 28
  assert peak < 32 << 20, peak
  # Frames and skippable frames back to back, cut anywhere but between
  # frames: an EOFError, not a shorter file.
  skippable = b"\x5f\x2a\x4d\x18" + (3).to_bytes(4, "little") + b"abc"
  frames = [skippable, zstd.ZstdCompressor(**options).compress(b'{"a": 1}\n' * 5000),
            skippable, zstd.ZstdCompressor(**options).compress(b"")]
  whole = b"".join(frames)
  ends = {sum(map(len, frames[:i])) for i in range(len(frames) + 1)}
  for cut in range(4, len(whole) + 1):  # (under 4 bytes: not known as zstd)
    f, _ = data_lib.decompressed(io.BufferedReader(io.BytesIO(whole[:cut])), "x")
    if cut in ends:
      assert f.read() == b'{"a": 1}\n' * 5000 * (cut > len(frames[0]))
    else:
      with pytest.raises(EOFError):
        f.read()


def test_a_bom_does_not_count_against_the_line_limit(tmp_path, vocab, monkeypatch):
  line = '{"id": "a", "text": "' + "y" * 30 + '"}'
  monkeypatch.setattr(data_lib, "MAX_LINE_BYTES", len(line))
  path = tmp_path / "bom.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + line.encode() + b"\n"
                   + line.replace('"a"', '"b"').encode() + b"\n")
  assert data_lib.read_corpus(str(path), vocab, 64).ids == ["a", "b"]


def test_a_duplicate_id_across_files_names_both_lines(tmp_path, vocab):
  (tmp_path / "dup").mkdir()
  (tmp_path / "dup" / "a.jsonl").write_text('{"id": "x", "text": "a"}\n'
                                            '{"id": "y", "text": "b"}\n')
  (tmp_path / "dup" / "b.jsonl").write_text('{"id": "z", "text": "c"}\n'
                                            '{"id": "x", "text": "d"}\n')
  source = str(tmp_path / "dup" / "*.jsonl")
  with pytest.raises(InputError, match=re.escape(
      f"{source}: duplicate id 'x' ({tmp_path}/dup/a.jsonl:1 and "
      f"{tmp_path}/dup/b.jsonl:2); ids must be unique across the whole source")):
    data_lib.read_corpus(source, vocab, 32)


# --- Parquet (HF datasets' release format) -------------------------------------


def _parquet(records, path=None, **write):
  """``records`` as a Parquet file's bytes (also written to ``path``)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  names = list(dict.fromkeys(k for r in records for k in r))
  table = pa.table({k: [r.get(k) for r in records] for k in names})
  out = pa.BufferOutputStream()
  pq.write_table(table, out, **write)
  data = out.getvalue().to_pybytes()
  if path is not None:
    with open(path, "wb") as f:
      f.write(data)
  return data


@pytest.mark.parametrize("write", [
    {}, {"row_group_size": 4, "compression": "zstd"},
    {"row_group_size": 7, "compression": "none", "use_dictionary": False,
     "write_page_index": True}])
def test_parquet_files_give_the_jsonl_rows(tmp_path, corpus_path, vocab, write):
  """FineWeb's shards: id, text and more columns; row groups of any size."""
  records = [{**r, "url": f"u{i}", "score": i / 3} for i, r in
             enumerate(_records(corpus_path))]
  path = tmp_path / "000_00000.parquet"
  _parquet(records, path, **write)
  want = data_lib.read_corpus(corpus_path, vocab, 32, "split")
  got = data_lib.read_corpus(str(path), vocab, 32, "split")
  assert got.ids == want.ids and _as_lists(got) == _as_lists(want)
  assert got.texts == want.texts


def test_parquet_ids_positions_and_types(tmp_path, corpus_path, vocab):
  records = _records(corpus_path)
  (tmp_path / "data").mkdir()
  _parquet([{"text": r["text"], "dump": "CC-MAIN"} for r in records[:3]],
           tmp_path / "data" / "a.parquet")
  _parquet([{"id": 10 + i, "text": r["text"]} for i, r in enumerate(records[3:5])],
           tmp_path / "data" / "b.parquet")
  _write(tmp_path / "data", [json.dumps(records[5])], "c.jsonl")
  got = data_lib.read_corpus(str(tmp_path / "data" / "*"), vocab, 32)
  # Positions are 1-based rows, as lines are; an integer id column is decimal.
  assert got.ids == ["a.parquet:1", "a.parquet:2", "a.parquet:3", "10", "11",
                     records[5]["id"]]
  assert got.texts[:5] == [r["text"] for r in records[:5]]
  queries = tmp_path / "queries.parquet"
  _parquet([{"id": "q1", "prompt": "p", "target": "t", "fact_doc_ids": ["a", "b"],
             "bucket": "1"}], queries)
  assert data_lib.read_queries(str(queries)) == [
      {"id": "q1", "prompt": "p", "target": "t", "fact_doc_ids": ["a", "b"],
       "bucket": "1"}]


def test_parquet_text_that_is_not_utf8_names_its_row(tmp_path, vocab):
  """pyarrow does not check the strings it reads (a writer that does not
  check, a damaged page): a traceback before 2026-12-04."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  path = tmp_path / "latin1.parquet"
  text = pa.array([b"ok", "caf\xe9".encode("latin-1")], pa.binary()).view(pa.string())
  pq.write_table(pa.table({"id": ["a", "b"], "text": text}), path)
  with pytest.raises(InputError, match=f"^{re.escape(str(path))}:2: column 'text' "
                     "is not valid UTF-8 .*; expected UTF-8 text"):
    data_lib.read_corpus(str(path), vocab, 32)
  # Inside a query's list or struct column: an ArrowNotImplementedError
  # before 2026-12-07 (the search for the row cast the column to binary).
  queries = {"id": ["q1", "q2"], "prompt": ["p", "p"], "target": ["t", "t"]}
  offsets = pa.array([0, 1, 2], pa.int32())
  for nested in (pa.ListArray.from_arrays(offsets, text),
                 pa.StructArray.from_arrays([text], names=["x"])):
    pq.write_table(pa.table({**queries, "aliases": nested}), path)
    with pytest.raises(InputError, match=f"^{re.escape(str(path))}:2: column "
                       "'aliases' is not valid UTF-8 .*; expected UTF-8 text"):
      data_lib.read_queries(str(path))


def test_a_column_name_that_is_not_utf8_in_a_parquet_footer(tmp_path, vocab):
  """A footer whose column metadata names a column in bytes that are not
  UTF-8 (one flipped bit): read from a disk, pyarrow reads it; from object
  storage the same (before 2026-12-07 a UnicodeDecodeError traceback).
  Named so in the schema too, it is refused, naming the file."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  pq.write_table(pa.table({"id": ["a", "b"], "text": ["x y", "z"], "zzzz": [1, 2]}),
                 tmp_path / "f.parquet")
  raw = (tmp_path / "f.parquet").read_bytes()
  assert raw.count(b"zzzz") == 2  # the schema's name, then the column's path
  last = raw.rindex(b"zzzz")
  for name, data in (("path", raw[:last] + b"\xe9" + raw[last + 1:]),
                     ("both", raw.replace(b"zzzz", b"\xe9zzz"))):
    (tmp_path / f"{name}.parquet").write_bytes(data)
    storage.write_bytes(f"memory://footer/{name}.parquet", data)
    for location in (str(tmp_path / f"{name}.parquet"),
                     f"memory://footer/{name}.parquet"):
      if name == "path":
        assert len(data_lib.read_corpus(location, vocab, 32)) == 2
      else:
        with pytest.raises(InputError, match=re.escape(
            f"{location}: not a whole Parquet file (its footer names a column "
            "in bytes that are not UTF-8: invalid continuation byte)")):
          data_lib.read_corpus(location, vocab, 32)


def test_a_parquet_column_named_twice_is_refused(tmp_path, vocab):
  """pyarrow writes such a file but reads neither column by its name: a
  KeyError traceback before 2026-12-07, for a corpus's id or text and for
  any column of a query file."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "twice.parquet")
  def write(names):
    pq.write_table(pa.Table.from_arrays([pa.array(["a", "b"])] * len(names),
                                        names=names), path)
  write(["id", "text", "text"])
  with pytest.raises(InputError, match=f"^{re.escape(path)}: the column 'text' "
                     "occurs 2 times; expected each column name once"):
    data_lib.read_corpus(path, vocab, 32)
  write(["id", "text", "url", "url"])  # not read: no matter
  assert data_lib.read_corpus(path, vocab, 32).ids == ["a", "b"]
  write(["id", "prompt", "target", "url", "url"])
  with pytest.raises(InputError, match=f"^{re.escape(path)}: the column 'url' "
                     "occurs 2 times; expected each column name once"):
    data_lib.read_queries(path)


@pytest.mark.parametrize("records,message", [
    ([{"id": "a", "text": "x"}, {"id": "b", "text": None}],
     r":2: field 'text' must be a string, got NoneType"),
    ([{"id": "a", "text": b"x"}], r":1: field 'text' must be a string, got bytes"),
    ([{"id": "a", "content": "x"}], r":1: missing field 'text'"),
    ([{"url": "u", "content": "x"}], r": no column 'id' or 'text'; its columns are "
     r"'url', 'content'"),
    ([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], r":2: duplicate id 'a'"),
    ([{"id": "a", "text": " "}], r":1: field 'text' is empty"),
])
def test_bad_parquet_records_name_file_and_row(tmp_path, vocab, records, message):
  path = tmp_path / "bad.parquet"
  _parquet(records, path)
  with pytest.raises(InputError, match="^" + re.escape(str(path)) + message):
    data_lib.read_corpus(str(path), vocab, 32)


# --- fields under other names (data.split_source) ---------------------------

DEFAULT_FIELDS = {"id": "id", "text": "text"}


@pytest.mark.parametrize("source,files,fields", [
    ("c.jsonl", "c.jsonl", DEFAULT_FIELDS),
    ("d/*.parquet#text=content", "d/*.parquet", {"id": "id", "text": "content"}),
    ("gs://b/stack/*.parquet#text=content, id=hexsha", "gs://b/stack/*.parquet",
     {"id": "hexsha", "text": "content"}),
    ("c.jsonl#id=text,text=id", "c.jsonl", {"id": "text", "text": "id"}),
    # A '#' without a '=' after it, or with a '/', is part of the path.
    ("notes#1.jsonl", "notes#1.jsonl", DEFAULT_FIELDS),
    ("a#b=c/d.jsonl", "a#b=c/d.jsonl", DEFAULT_FIELDS),
])
def test_split_source(source, files, fields):
  assert data_lib.split_source(source) == (files, fields)


@pytest.mark.parametrize("source,message", [
    ("c.jsonl#txt=content", r"'txt=content' after '#': expected text=<field> "
     r"and/or id=<field>"),
    ("c.jsonl#text=", r"'text=' after '#'"),
    ("c.jsonl#text=a,", r"'' after '#'"),
    ("c.jsonl#id=a,text=a", r"the id and the text name the same field 'a'"),
    ("c.jsonl#text=a,text=b", r"text= is named twice after '#'"),
])
def test_split_source_errors(source, message):
  with pytest.raises(InputError, match=f"^--corpus={re.escape(source)}: {message}"):
    data_lib.split_source(source)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_misspelt_id_name_is_an_error_not_positions(tmp_path, vocab, kind):
  """Without id=, a file with no ids gets positions; an id= naming a field
  the file lacks is a mistake, not a file without ids."""
  records = [{"hexsha": "abc", "content": "x"}, {"hexsha": "abd", "content": "y"}]
  path = tmp_path / f"s.{kind}"
  if kind == "jsonl":
    facts.write_jsonl(path, records)
  else:
    _parquet(records, path)
  assert data_lib.read_corpus(f"{path}#text=content,id=hexsha", vocab, 32).ids == [
      "abc", "abd"]
  assert data_lib.read_corpus(f"{path}#text=content", vocab, 32).ids == [
      f"s.{kind}:1", f"s.{kind}:2"]
  with pytest.raises(InputError, match=f"^{re.escape(str(path))}:1: missing field "
                     "'sha', named by id= after '#'"):
    data_lib.read_corpus(f"{path}#text=content,id=sha", vocab, 32)


def test_fields_under_other_names(tmp_path, corpus_path, vocab):
  """The Stack's content/hexsha, as JSONL and Parquet, give the rows of the
  same records under tracer's names; a field of tracer's name beside them is
  not read."""
  records = _records(corpus_path)
  theirs = [{"hexsha": r["id"], "content": r["text"], "text": "not this"}
            for r in records]
  shards = tmp_path / "stack"
  shards.mkdir()
  facts.write_jsonl(shards / "a.jsonl", theirs[:8])
  _parquet(theirs[8:], shards / "b.parquet", row_group_size=4)
  whole = data_lib.read_corpus(corpus_path, vocab, 32, "split")
  source = str(shards / "*#text=content,id=hexsha")
  assert data_lib.is_file_source(source)
  got = data_lib.read_corpus(source, vocab, 32, "split")
  assert got.source == source  # what manifests record: the names included
  assert (got.ids, got.texts) == (whole.ids, whole.texts)
  assert [t.tolist() for t in _token_rows(got)] == [
      t.tolist() for t in _token_rows(whole)]
  # Only the text renamed: a file without ids gets positions; integer ids.
  _parquet([{"blob": 7, "content": "x"}, {"blob": 8, "content": "y"}],
           tmp_path / "c.parquet")
  assert list(data_lib.corpus_documents(str(tmp_path / "c.parquet#text=content"))
              ) == [("c.parquet:1", "x"), ("c.parquet:2", "y")]
  assert list(data_lib.corpus_documents(
      str(tmp_path / "c.parquet#text=content,id=blob"))) == [("7", "x"), ("8", "y")]


@pytest.mark.parametrize("lines,message", [
    (['{"hexsha": "a", "content": null}'],
     r":1: field 'content' must be a string, got NoneType"),
    (['{"hexsha": "a", "content": " "}'], r":1: field 'content' is empty"),
    (['{"hexsha": "a", "body": "x"}'], r":1: missing field 'content'; expected an "
     r"object with 'hexsha', 'content' \(other names go after '#'"),
    # An id named after '#' is required from line 1 (a misspelt name must not
    # turn ids into positions).
    (['{"content": "x"}', '{"hexsha": "b", "content": "y"}'],
     r":1: missing field 'hexsha', named by id= after '#'"),
    (['{"hexsha": "a", "content": "x"}', '{"hexsha": "a", "content": "y"}'],
     r":2: duplicate id 'a'"),
])
def test_errors_name_the_files_own_fields(tmp_path, vocab, lines, message):
  path = _write(tmp_path, lines)
  with pytest.raises(InputError, match="^" + re.escape(path) + message):
    data_lib.read_corpus(path + "#text=content,id=hexsha", vocab, 32)


def test_field_names_are_for_corpus_files(vocab):
  with pytest.raises(InputError, match=r"^--corpus=c4_task#text=x: field names "
                     "after '#' are for corpus files"):
    data_lib.read_corpus("c4_task#text=x", vocab, 32)


def test_damaged_parquet_files_are_errors(tmp_path, corpus_path, vocab):
  records = _records(corpus_path)
  data = _parquet(records, row_group_size=5, compression="none")
  path = tmp_path / "cut.parquet"
  for location in (str(path), "memory://parquet/cut.parquet"):
    for end in (len(data) // 2, len(data) - 1, 3):
      if storage.is_url(location):
        storage.write_bytes(location, data[:end])
      else:
        path.write_bytes(data[:end])
      pattern = (f"^{re.escape(location)}: not a whole Parquet file" if end > 3 else
                 f"^{re.escape(location)}:1: not valid JSON")  # 'PAR': not Parquet
      with pytest.raises(InputError, match=pattern):
        data_lib.read_corpus(location, vocab, 32)
  # A damaged page inside the third row group: its first row is named.
  first = data.index(records[10]["text"].encode())
  damaged = bytearray(data)
  damaged[first - 30:first + 10] = bytes(40)
  path = tmp_path / "damaged.parquet"
  path.write_bytes(bytes(damaged))
  with pytest.raises(InputError, match=f"^{re.escape(str(path))}:11: the Parquet "
                     "data is damaged"):
    data_lib.read_corpus(str(path), vocab, 32)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, vocab, monkeypatch):
  path = tmp_path / "fineweb.parquet"
  _parquet([{"id": "a", "text": "b"}], path)
  monkeypatch.setitem(sys.modules, "pyarrow", None)  # import fails
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  with pytest.raises(InputError, match=f"^{re.escape(str(path))}: a Parquet file; "
                     "reading it needs the pyarrow package"):
    data_lib.read_corpus(str(path), vocab, 32)


@pytest.fixture
def counted_reads(monkeypatch):
  """The byte ranges read of objects (``storage.ObjectReads.start``)."""
  reads = []
  start = storage.ObjectReads.start

  def counting(self, lo, hi):
    reads.append((lo, hi))
    return start(self, lo, hi)

  monkeypatch.setattr(storage.ObjectReads, "start", counting)
  monkeypatch.setattr(storage, "read_bytes", lambda *_: pytest.fail("read whole"))
  return reads


def test_parquet_objects_are_read_row_group_by_row_group(tmp_path, corpus_path,
                                                         vocab, counted_reads):
  """Only the columns read: the footer (two suffix reads), then one range per
  row group, the next in flight while one is decoded."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  records = [{"url": "u" * 500, **r} for r in _records(corpus_path)]
  data = _parquet(records, row_group_size=4, compression="none")
  url = "memory://parquet/rg/c.parquet"
  storage.write_bytes(url, data)
  want = data_lib.read_corpus(corpus_path, vocab, 32)
  got = data_lib.read_corpus(url, vocab, 32)
  assert got.ids == want.ids and _as_lists(got) == _as_lists(want)
  groups = pq.ParquetFile(pa_reader(data)).metadata.num_row_groups
  assert groups == 6
  assert counted_reads[:3] == [(0, 4), (-8, None), (counted_reads[2][0], None)]
  spans = counted_reads[3:]
  assert len(spans) == groups and all(hi - lo < 3000 for lo, hi in spans)
  assert sum(hi - lo for lo, hi in spans) < len(data) // 3  # not the urls


def test_few_parquet_files_split_among_more_shards_by_row_groups(
    tmp_path, corpus_path, counted_reads, monkeypatch):
  """Two Parquet files among 5 shards, or 2: consecutive runs of row groups
  balanced by rows, every shard a share; read run after run they are the
  source's rows (position ids counted in the whole file). In object storage a
  run reads only its row groups. Enough files per shard, or a JSONL one:
  whole files."""
  records = [{"text": r["text"]} for r in _records(corpus_path)]
  assert len(records) == 21
  _parquet(records[:14], tmp_path / "a.parquet", row_group_size=3)
  _parquet(records[14:], tmp_path / "b.parquet", row_group_size=2)
  whole = list(data_lib.corpus_documents(str(tmp_path / "*.parquet")))
  for root in (str(tmp_path), "memory://split"):
    if root != str(tmp_path):
      for name in ("a.parquet", "b.parquet"):
        storage.write_bytes(f"{root}/{name}", (tmp_path / name).read_bytes())
    source = f"{root}/*.parquet"
    runs = data_lib.split_files(source, 5)
    assert all(isinstance(p, data_lib.FilePart) for run in runs for p in run)
    counted_reads.clear()
    got = [list(data_lib.corpus_documents(source, files=run)) for run in runs]
    assert [d for run in got for d in run] == whole
    assert whole[0][0] == "a.parquet:1" and whole[-1][0] == "b.parquet:7"
    sizes = [len(run) for run in got]
    assert sum(sizes) == 21 and min(sizes) >= 21 // 5 - 2 and max(sizes) <= 21 // 5 + 3
    if root != str(tmp_path):  # footer (2 reads) and one span per row group
      groups = sum(len(p.row_groups) for run in runs for p in run)
      assert len(counted_reads) == 2 * sum(len(run) for run in runs) + groups
  # Two files on two shards: by rows (9 and 12), not by files (14 and 7) ...
  a, b = f"{root}/a.parquet", f"{root}/b.parquet"
  assert data_lib.split_files(source, 2) == [
      [data_lib.FilePart(a, range(0, 3))],
      [data_lib.FilePart(a, range(3, 5)), data_lib.FilePart(b, range(0, 4))]]
  # ... but with ROW_GROUP_SPLIT_FILES files per shard, whole files.
  monkeypatch.setattr(data_lib, "ROW_GROUP_SPLIT_FILES", 1)
  assert data_lib.split_files(source, 2) == [[a], [b]]
  _write(tmp_path, ['{"text": "x"}'], "c.jsonl")
  assert data_lib.split_files(str(tmp_path / "*"), 4) == [
      [], [str(tmp_path / "a.parquet")], [str(tmp_path / "b.parquet")],
      [str(tmp_path / "c.jsonl")]]


@pytest.mark.parametrize("compress", [None, "gzip", "zstd"])
def test_few_jsonl_files_split_among_more_shards_by_lines(tmp_path, corpus_path,
                                                          compress):
  """Fewer JSONL files than shards: each file goes to a run of consecutive
  shards, which share its lines equally (counted first, blank ones too; a
  BOM, CRLF, blank lines, a line over 1 MiB, a last line without its
  break); read run after
  run they are the source's documents, ids by the file's own positions.
  A file whose first line has an id needs one on every line, whoever reads
  the line."""
  import gzip  # pylint: disable=g-import-not-at-top
  texts = [r["text"] for r in _records(corpus_path)]
  texts[6] = "long " * 300_000  # 1.5 MB: read in pieces where it is skipped
  lines = [json.dumps({"text": t}) for t in texts]
  lines[3:3] = ["", "   "]
  raw = ("\ufeff" + "\r\n".join(lines[:12]) + "\r\n").encode() + (
      "\n".join(lines[12:])).encode()  # no break after the last line
  zstd = pytest.importorskip("zstandard") if compress == "zstd" else None
  pack = {None: lambda b: b, "gzip": gzip.compress,
          "zstd": lambda b: zstd.ZstdCompressor().compress(b)}[compress]
  (tmp_path / "a.jsonl").write_bytes(pack(raw))
  (tmp_path / "b.jsonl").write_bytes(pack("\n".join(lines[:5]).encode() + b"\n"))
  source = str(tmp_path / "*.jsonl")
  assert data_lib.count_lines(str(tmp_path / "a.jsonl")) == len(lines) == 23
  whole = list(data_lib.corpus_documents(source))
  assert whole[0] == ("a.jsonl:1", texts[0]) and whole[3][0] == "a.jsonl:6"
  for shards in (3, 5, 7):
    runs = data_lib.split_files(source, shards)
    assert len(runs) == shards and all(len(run) == 1 for run in runs)
    got = [list(data_lib.corpus_documents(source, files=run)) for run in runs]
    assert [d for run in got for d in run] == whole
    # a.jsonl's shards: the first ceil(shards / 2), each with some of its 21.
    a_runs = [len(g) for g, run in zip(got, runs) if "a.jsonl" in str(run[0])]
    assert len(a_runs) == -(-shards // 2) and min(a_runs) > 0 and sum(a_runs) == 21
  assert data_lib.split_files(source, 3) == [
      [data_lib.FilePart(str(tmp_path / "a.jsonl"), share=(0, 2))],
      [data_lib.FilePart(str(tmp_path / "a.jsonl"), share=(1, 2))],
      [str(tmp_path / "b.jsonl")]]
  # Ids on the first line: every line needs one, also in a later run.
  _write(tmp_path, ['{"id": "x", "text": "a"}', '{"text": "b"}', '{"text": "c"}',
                    '{"id": "y", "text": "d"}'], "c.jsonl")
  for share in (0, 1):
    part = [data_lib.FilePart(str(tmp_path / "c.jsonl"), share=(share, 2))]
    with pytest.raises(InputError, match=r"c.jsonl:[23]: missing field 'id'"):
      list(data_lib.corpus_documents(str(tmp_path / "c.jsonl"), files=part))


def pa_reader(data):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  return pa.BufferReader(data)


def test_parquet_object_replaced_while_read_is_an_error(corpus_path, vocab):
  records = _records(corpus_path)
  url = "memory://parquet/replaced.parquet"
  storage.write_bytes(url, _parquet(records, row_group_size=4))
  rows = data_lib.iter_records(url, ("id", "text"))
  assert next(rows)[1]["id"] == records[0]["id"]
  storage.write_bytes(url, _parquet(records[::-1], row_group_size=4))
  with pytest.raises(InputError, match=f"^{re.escape(url)}: replaced while being "
                     r"read \(at byte \d+"):
    list(rows)


def test_parquet_shards_on_object_storage(object_store, corpus_path, vocab,
                                          counted_reads):
  """On an S3 server and a GCS emulator (suffix reads, the glob, position ids)."""
  records = _records(corpus_path)
  bucket = object_store("parquet")
  for i in range(3):
    storage.write_bytes(f"{bucket}/fineweb/data/CC-MAIN-{i}/00{i}_00000.parquet",
                        _parquet([{"text": r["text"]} for r in records[i::3]],
                                 row_group_size=3))
  got = data_lib.read_corpus(f"{bucket}/fineweb/data/*/*.parquet", vocab, 32)
  assert got.ids == [f"CC-MAIN-{i}/00{i}_00000.parquet:{j + 1}" for i in range(3)
                     for j in range(len(records[i::3]))]
  assert got.texts == [r["text"] for i in range(3) for r in records[i::3]]


def test_absolute_source_names_the_same_files_from_anywhere(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "shards").mkdir()
  (tmp_path / "one.jsonl").write_text("")
  absolute = data_lib.absolute_source
  assert absolute("shards/*.jsonl") == f"{tmp_path}/shards/*.jsonl"
  assert absolute("./one.jsonl#text=content,id=hexsha") == (
      f"{tmp_path}/one.jsonl#text=content,id=hexsha")
  assert absolute("a#b/c.jsonl") == f"{tmp_path}/a#b/c.jsonl"  # '#' in the path
  assert absolute("gs://b/c4/*.json.gz#text=body") == "gs://b/c4/*.json.gz#text=body"
  assert absolute("c4_task") == "c4_task"  # a seqio name
  assert absolute(f"{tmp_path}/one.jsonl") == f"{tmp_path}/one.jsonl"


def test_a_bucket_is_listed_only_under_the_patterns_fixed_characters(object_store,
                                                                     tmp_path):
  """``c4-train.*`` at a bucket's root asks the server for the keys that start
  with ``c4-train.``, not for the stores and other files beside them; the
  listing's range ends right past the prefix (a UTF-8 one too)."""
  bucket = object_store("listing")
  names = ["c4-train.0.json", "c4-train.1.json", "c4-trainX.json",
           "c4-validation.0.json", "store/chunks/0", "store/chunks/1", "é/0", "ê/0"]
  for name in names:
    storage.write_bytes(f"{bucket}/{name}", b"")
    storage.write_bytes(f"memory://listing/{name}", b"")
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(b"")
  before = len(object_store.requests().splitlines())
  assert data_lib.corpus_files(f"{bucket}/c4-train.*.json") == [
      f"{bucket}/c4-train.{i}.json" for i in (0, 1)]
  # S3 lists by prefix; GCS by a key range, to the prefix's successor.
  listing, asks = {"s3": ("list-type", "prefix=c4-train. "),
                   "gs": ("/o?", "?startOffset=c4-train.&endOffset=c4-train%2F ")
                   }[object_store.scheme]
  lists = [line for line in object_store.requests().splitlines()[before:]
           if listing in line]
  assert lists and all(asks in line for line in lists), lists
  for root in (bucket, "memory://listing", str(tmp_path)):
    assert storage.list_dir(root, prefix="c4-train") == names[:3]
    assert storage.list_dir(root, prefix="é") == ["é/0"]
    assert storage.list_dir(root, prefix="store/") == names[4:6]
    assert storage.list_dir(root, prefix="") == sorted(names)
    assert storage.list_dir(root, prefix="zz") == []


def test_a_parquet_page_that_fails_its_checksum_is_refused(tmp_path, object_store):
  """A page written with a CRC is checked against it, on disk and in a bucket
  (before 2026-12-04 a flipped bit in a text was read as it stood)."""
  records = [{"id": f"d{i}", "text": f"hello world number {i}"} for i in range(50)]
  data = bytearray(_parquet(records, write_page_checksum=True, compression="none"))
  assert [r for _, r in data_lib.iter_parquet(
      _written(tmp_path / "whole.parquet", bytes(data)))] == records
  at = data.find(b"hello world number 25")
  data[at + 2] ^= 0x20  # "heLlo"
  bucket = object_store("crc")
  storage.write_bytes(f"{bucket}/bad.parquet", bytes(data))
  for path in (_written(tmp_path / "bad.parquet", bytes(data)), f"{bucket}/bad.parquet"):
    with pytest.raises(InputError, match=re.escape(
        f"{path}:1: the Parquet data is damaged (in row group 0, rows 1-50: "
        "could not verify page integrity, CRC checksum verification failed")):
      list(data_lib.iter_parquet(path))


def _written(path, data: bytes) -> str:
  path.write_bytes(data)
  return str(path)


def test_a_file_in_a_missing_bucket_says_so(s3):
  """A missing bucket reads as a missing object; the error adds the bounded
  listing's reason (one request for that name's prefix), where a missing
  file in a bucket that exists stays plain. (S3 only: the GCS emulator lists
  a missing bucket as an empty one, so there the message stays plain.)"""
  from tracer import store as store_lib  # pylint: disable=g-import-not-at-top
  bucket = s3("present")
  gone = "s3://no-such-bucket-here"
  for read in (storage.read_text, storage.open_binary):
    with pytest.raises(InputError) as e:
      read(f"{bucket}/q.jsonl")
    assert str(e.value) == f"{bucket}/q.jsonl: no such file"
    with pytest.raises(InputError, match=r"^" + re.escape(
        f"{gone}/q.jsonl: no such file (NOT_FOUND") + r".*\)$"):
      read(f"{gone}/q.jsonl")
  with pytest.raises(InputError, match=re.escape(
      f"{gone}/s/manifest.json: no such file (NOT_FOUND")):
    store_lib.open_store(f"{gone}/s")


def test_patterns_in_directories_match_alike_on_disk_and_in_object_storage(
    tmp_path, corpus_path, vocab):
  """``data/*/0*`` reaches every dump's files (FineWeb's layout) in a bucket as
  on disk: one name per component, no deeper or shallower file, no hidden
  name unless the pattern says so, no directory (before 2026-12-07 taken on
  disk as a file, and refused); the same files, order and position ids."""
  records = [{"text": r["text"]} for r in _records(corpus_path)]
  tree = {"data/CC-A/000.parquet": _parquet(records[:4], row_group_size=3),
          "data/CC-A/001.jsonl": records[4:6], "data/CC-B/002.jsonl": records[6:9],
          "data/CC-B/sub/003.jsonl": records[9:10],
          "data/CC-B/0sub/007.jsonl": records[13:14], "data/004.jsonl": records[10:11],
          "data/.hidden/005.jsonl": records[11:12],
          "data/CC-B/.006.jsonl": records[12:13]}
  for name, content in tree.items():
    data = content if isinstance(content, bytes) else "".join(
        json.dumps(r) + "\n" for r in content).encode()
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(data)
    storage.write_bytes(f"memory://globs/{name}", data)
  want = ["data/CC-A/000.parquet", "data/CC-A/001.jsonl", "data/CC-B/002.jsonl"]
  for root in (str(tmp_path), "memory://globs"):
    pattern = f"{root}/data/*/0*"
    assert data_lib.corpus_files(pattern) == [f"{root}/{n}" for n in want]
    got = data_lib.read_corpus(pattern, vocab, 32)
    assert got.ids == ([f"CC-A/000.parquet:{i}" for i in (1, 2, 3, 4)]
                       + ["CC-A/001.jsonl:1", "CC-A/001.jsonl:2"]
                       + [f"CC-B/002.jsonl:{i}" for i in (1, 2, 3)])
    assert data_lib.corpus_files(f"{root}/data/.*/0*") == [
        f"{root}/data/.hidden/005.jsonl"]
  with pytest.raises(InputError, match="the bucket cannot be a pattern"):
    data_lib.corpus_files("gs://bucket-*/x.jsonl")


@pytest.mark.parametrize("lines,lineno,message", [
    (['{"id": "q", "prompt": "p"}'], 1, "missing field 'target'"),
    (['{"id": "q", "prompt": "p", "target": ""}'], 1, "field 'target' is empty"),
    (['{"id": "q", "prompt": 3, "target": "t"}'], 1, "field 'prompt' must be"),
    (['{"id": "q", "prompt": "", "target": "t"}', '{"id": "q", "prompt": "",'
      ' "target": "u"}'], 2, "duplicate id 'q'"),
])
def test_malformed_queries_name_file_and_line(tmp_path, lines, lineno, message):
  path = _write(tmp_path, lines, "queries.jsonl")
  with pytest.raises(InputError, match=f"^{re.escape(path)}:{lineno}: {message}"):
    data_lib.read_queries(path)


def test_query_fields_that_json_cannot_write_are_refused(tmp_path):
  """A query's fields are copied into its results line, written after all the
  work: a value strict JSON cannot hold is refused as the file is read."""
  import datetime  # pylint: disable=g-import-not-at-top
  path = _write(tmp_path, ['{"id": "q", "prompt": "p", "target": "t", '
                           '"score": NaN}'], "queries.jsonl")
  with pytest.raises(InputError, match=f"^{re.escape(path)}:1: field 'score' holds "
                     "NaN or infinity; expected a JSON value"):
    data_lib.read_queries(path)
  parquet = tmp_path / "queries.parquet"
  _parquet([{"id": "q", "prompt": "p", "target": "t",
             "when": datetime.datetime(2023, 11, 14)}], parquet)
  with pytest.raises(InputError, match=f"^{re.escape(str(parquet))}:1: field 'when' "
                     "holds a datetime; expected a JSON value"):
    data_lib.read_queries(str(parquet))


def test_missing_empty_and_unknown_sources(tmp_path, vocab):
  missing = str(tmp_path / "nope.jsonl")
  with pytest.raises(InputError, match=f"^{re.escape(missing)}: no such file"):
    data_lib.read_corpus(missing, vocab, 32)
  with pytest.raises(InputError, match=f"^{re.escape(missing)}: no such file"):
    data_lib.read_queries(missing)
  empty = _write(tmp_path, ["", "  "], "empty.jsonl")
  with pytest.raises(InputError, match=f"^{re.escape(empty)}: the corpus is empty"):
    data_lib.read_corpus(empty, vocab, 32)
  with pytest.raises(InputError, match=f"^{re.escape(empty)}: no queries"):
    data_lib.read_queries(empty)
  with pytest.raises(InputError, match="no_such_task.*no seqio task or mixture"):
    data_lib.read_corpus("no_such_task", vocab, 32)
  with pytest.raises(InputError, match="sentencepiece model file not found"):
    data_lib.make_vocabulary("sentencepiece", str(tmp_path / "x.model"))
  with pytest.raises(InputError, match="tokenizer kind 'words'"):
    data_lib.make_vocabulary("words")


def test_queries_keep_extra_fields_and_query_errors_name_the_query(tmp_path, vocab):
  path = _write(tmp_path, [
      '{"id": "q1", "prompt": "Ada was born in", "target": " London", "k": [1]}',
      '{"id": "q2", "prompt": "", "target": " Brno"}'], "queries.jsonl")
  queries = data_lib.read_queries(path)
  assert [q["id"] for q in queries] == ["q1", "q2"] and queries[0]["k"] == [1]
  ex = data_lib.query_examples(queries, vocab, 32)
  assert ex["inputs"].shape == (2, 32)
  assert ex["weights"].sum(axis=1).tolist() == [7, 5]
  assert ex["weights"][1, :5].tolist() == [1] * 5  # empty prompt
  with pytest.raises(InputError, match="^q.jsonl: query 'q1': target of 7 tokens"):
    data_lib.query_examples(queries, vocab, 7, source="q.jsonl")
  # A prompt that loses its start is named (before 2026-12-06: silently).
  with pytest.warns(UserWarning, match=re.escape(
      "q.jsonl: the prompt of query 'q1' is longer than the model's max_len 12 "
      "leaves beside its target: scored on its last 5 of 15 tokens")):
    cut = data_lib.query_examples(queries, vocab, 12, source="q.jsonl")
  assert cut["weights"][0].tolist() == [0] * 5 + [1] * 7
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    data_lib.query_examples(queries, vocab, 22)  # 15 + 7 tokens fit


# --- seqio and sentencepiece -------------------------------------------------

@pytest.mark.parametrize("overflow", ["truncate", "split"])
def test_seqio_task_gives_the_jsonl_rows(corpus_path, vocab, overflow):
  from_jsonl = data_lib.read_file_corpus(corpus_path, vocab, 32, overflow)
  data_lib.register_jsonl_task("tracer_test_corpus", corpus_path, vocab)
  from_seqio = data_lib.read_corpus("tracer_test_corpus", vocab, 32, overflow)
  assert from_seqio.source == "seqio:tracer_test_corpus"
  assert from_seqio.ids == from_jsonl.ids
  assert from_seqio.texts == from_jsonl.texts
  np.testing.assert_array_equal(from_seqio.segments, from_jsonl.segments)
  np.testing.assert_array_equal(from_seqio.lengths, from_jsonl.lengths)
  np.testing.assert_array_equal(from_seqio.tokens, from_jsonl.tokens)
  # Registering again under the same name replaces the task.
  data_lib.register_jsonl_task("tracer_test_corpus", corpus_path, vocab)


def test_seqio_errors_keep_their_own_message(corpus_path, vocab, monkeypatch):
  import seqio  # pylint: disable=g-import-not-at-top
  data_lib.register_jsonl_task("tracer_broken_task", corpus_path, vocab)

  def broken(name):
    raise ValueError(f"seqio's own complaint about {name}")

  monkeypatch.setattr(seqio, "get_mixture_or_task", broken)
  with pytest.raises(ValueError, match="^seqio's own complaint about "
                     "tracer_broken_task$"):
    data_lib.read_corpus("tracer_broken_task", vocab, 32)


def test_seqio_mixture_reads_every_example_of_every_task(tmp_path, corpus_path,
                                                         vocab):
  import seqio  # pylint: disable=g-import-not-at-top
  records = _records(corpus_path)
  a = str(facts.write_jsonl(tmp_path / "a.jsonl", records[:5]))
  b = str(facts.write_jsonl(tmp_path / "b.jsonl", records[5:]))
  data_lib.register_jsonl_task("tracer_test_b", b, vocab)
  data_lib.register_jsonl_task("tracer_test_a", a, vocab)
  if "tracer_test_mix" in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove("tracer_test_mix")
  seqio.MixtureRegistry.add("tracer_test_mix", ["tracer_test_b", "tracer_test_a"],
                            default_rate=1.0)
  try:
    corpus = data_lib.read_corpus("tracer_test_mix", vocab, 32)
  finally:
    seqio.MixtureRegistry.remove("tracer_test_mix")
  # Tasks in name order, each whole, ids qualified by the task.
  assert corpus.ids == ([f"tracer_test_a:{r['id']}" for r in records[:5]]
                        + [f"tracer_test_b:{r['id']}" for r in records[5:]])
  assert corpus.texts == [r["text"] for r in records]
  from_jsonl = data_lib.read_file_corpus(corpus_path, vocab, 32)
  np.testing.assert_array_equal(corpus.tokens, from_jsonl.tokens)


@pytest.mark.parametrize("count", ["0", "-2", "x", "\u00b3", "\u0663"])
def test_a_shard_count_is_a_whole_number(count):
  """"\u00b3" and "\u0663" are digits to str.isdigit but not to int()."""
  with pytest.raises(InputError, match=f"^--corpus=t#shards={count}: shards="
                     f"'{count}': expected a whole number of shards, at least 1"):
    data_lib.seqio_shards(f"t#shards={count}")
  assert data_lib.seqio_shards("t#shards= 12 ") == ("t", 12)


@pytest.mark.filterwarnings("ignore:--corpus=tracer_shards")
def test_seqio_source_in_shards(tmp_path, corpus_path, vocab):
  """``TASK#shards=S`` reads seqio's shard 0, 1, ... of S one after another
  (here every S-th example: the task's one source has fewer files than
  shards); without ids of their own, examples are numbered within their
  shard; a mixture is read shard-major, each shard task after task."""
  import seqio  # pylint: disable=g-import-not-at-top
  records = _records(corpus_path)[:11]
  path = str(facts.write_jsonl(tmp_path / "c.jsonl", records))
  data_lib.register_jsonl_task("tracer_shards", path, vocab)
  data_lib.register_jsonl_task("tracer_shards_no_ids", path, vocab, ids=False)
  ids = lambda source, **kw: [i for i, _, _ in data_lib.seqio_records(source, vocab, **kw)]
  by_shard = [records[s::3] for s in range(3)]
  # The task's one source is read whole for every shard: said once per read.
  with pytest.warns(UserWarning, match=re.escape(
      "--corpus=tracer_shards#shards=3: seqio task tracer_shards has 1 source "
      "file(s) in split 'train', fewer than 3 shards, so seqio shards it by "
      "examples: every shard reads all of it. Name at most 1 shard(s)")):
    got = ids("tracer_shards#shards=3")
  assert got == [r["id"] for run in by_shard for r in run]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ids("tracer_shards#shards=1")
  assert ids("tracer_shards#shards=3", shards=[2, 1]) == [
      r["id"] for r in by_shard[2] + by_shard[1]]
  assert ids("tracer_shards#shards=1") == ids("tracer_shards") == [r["id"] for r in records]
  assert ids("tracer_shards_no_ids") == [str(i) for i in range(11)]
  assert ids("tracer_shards_no_ids#shards=3") == [
      f"{s}:{i}" for s in range(3) for i in range(len(by_shard[s]))]
  corpus = data_lib.read_corpus("tracer_shards#shards=3", vocab, 32)
  assert corpus.texts == [r["text"] for run in by_shard for r in run]
  if "tracer_shards_mix" in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove("tracer_shards_mix")
  seqio.MixtureRegistry.add("tracer_shards_mix",
                            ["tracer_shards", "tracer_shards_no_ids"], default_rate=1.0)
  try:
    assert ids("tracer_shards_mix#shards=2") == [
        *(f"tracer_shards:{r['id']}" for r in records[0::2]),
        *(f"tracer_shards_no_ids:0:{i}" for i in range(6)),
        *(f"tracer_shards:{r['id']}" for r in records[1::2]),
        *(f"tracer_shards_no_ids:1:{i}" for i in range(5))]
  finally:
    seqio.MixtureRegistry.remove("tracer_shards_mix")
  assert data_lib.splits_among_processes("tracer_shards#shards=3")
  assert not data_lib.splits_among_processes("tracer_shards#shards=1")
  assert not data_lib.splits_among_processes("tracer_shards")
  assert not data_lib.is_file_source("tracer_shards#shards=3")
  for bad in ("0", "x", "-2", ""):
    with pytest.raises(InputError, match=re.escape(
        f"--corpus=tracer_shards#shards={bad}: shards={bad!r}: expected a whole "
        "number of shards, at least 1 (TASK#shards=N)")):
      ids(f"tracer_shards#shards={bad}")


def test_sentencepiece_round_trip(tmp_path, corpus_path):
  texts = [r["text"] for r in _records(corpus_path)]
  model = data_lib.train_sentencepiece(texts, str(tmp_path / "sp"), vocab_size=300)
  assert model == str(tmp_path / "sp.model") and os.path.isfile(model)
  config = data_lib.DataConfig(tokenizer="sentencepiece", sentencepiece_model=model)
  vocab = config.vocabulary()
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
  assert 3 < vocab.vocab_size <= 300
  for text in texts:
    ids = vocab.encode(text)
    assert all(3 <= i < vocab.vocab_size for i in ids)
    # Sentencepiece's default normalization folds runs of spaces (and strips
    # them at the ends), which keeps " London" after a prompt one "▁London".
    assert vocab.decode(ids) == " ".join(text.split())
  # Pieces never cross a space, so a query's prompt and target tokens are the
  # tokens of the sentence as the corpus states it.
  for prompt, target in [("Ada was born in", " London"), ("Kurt Godel is", " Brno")]:
    assert vocab.encode(prompt) + vocab.encode(target) == vocab.encode(prompt + target)
  corpus = data_lib.read_file_corpus(corpus_path, vocab, 64)
  assert corpus.row_tokens(0).tolist() == vocab.encode(texts[0]) + [data_lib.EOS_ID]
  # A corpus tokenized with this model, then the model retrained at the same
  # path: the corpus is refused (before 2026-12-05 it was read, its token ids
  # meaning other pieces).
  from tracer import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  corpus_lib.tokenize(corpus_path, str(tmp_path / "tok"), config, 64)
  assert len(corpus_lib.open_corpus(str(tmp_path / "tok"), config, 64)) == len(corpus)
  data_lib.train_sentencepiece(texts, str(tmp_path / "sp"), vocab_size=vocab.vocab_size // 2)
  import seqio  # pylint: disable=g-import-not-at-top
  seqio.vocabularies._load_model_internal.cache_clear()  # as a new process reads it
  with pytest.raises(InputError, match=re.escape(
      f"tok/manifest.json: field 'vocab_size' is {vocab.vocab_size}, the "
      f"tokenizer at '{model}' has ")):
    corpus_lib.open_corpus(str(tmp_path / "tok"), config, 64)
