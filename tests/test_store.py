"""Tests for tracer.store: manifest checks, resumable chunked writes, reads."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zlib
from unittest import mock

import ml_dtypes
import numpy as np
import pytest

from tracer import claim as claim_lib
from tracer import hessian
from tracer import storage
from tracer import store as store_lib
from tracer.errors import CorruptStoreError, InputError


def _manifest(**overrides) -> store_lib.Manifest:
  base = dict(checkpoint="/ckpt/100", step=100, params_fingerprint="abc",
              correction="adam", epsilon=1e-8, projection_seed=0,
              layout=[{"path": "w", "shape": (4, 2)}], dim=6,
              basis_fingerprint=None, dtype="bfloat16",
              corpus="corpus.jsonl", num_rows=23, chunk_rows=5,
              tracer_version="test")
  base.update(overrides)
  return store_lib.Manifest(**base)


def _data(n=23, d=6, seed=0):
  return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _write_all(store, data, chunks=None):
  for c in store.pending_chunks() if chunks is None else chunks:
    start, stop = store.chunk_bounds(c)
    store.write_chunk(c, data[start:stop])


def _array_files(path):
  """Relative path -> bytes of every file (chunk markers too: they hold only
  the rows' checksum and quarantine, so equal rows give equal markers)."""
  out = {}
  for root, _, names in os.walk(path):
    for name in names:
      full = os.path.join(root, name)
      rel = os.path.relpath(full, path)
      with open(full, "rb") as f:
        out[rel] = f.read()
  return out


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_round_trip(tmp_path, dtype):
  data = _data()
  s = store_lib.create_or_open(tmp_path / "s", _manifest(dtype=dtype))
  assert s.num_chunks == 5 and s.pending_chunks() == [0, 1, 2, 3, 4]
  assert not s.is_complete()
  _write_all(s, data)
  assert s.is_complete() and s.pending_chunks() == []
  want = data if dtype == "float32" else data.astype(
      ml_dtypes.bfloat16).astype(np.float32)
  reopened = store_lib.open_store(tmp_path / "s", _manifest())
  got = reopened.read_rows(0, 23)
  assert got.dtype == np.float32 and got.shape == (23, 6)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(reopened.read_rows(4, 11), want[4:11])
  assert (reopened.num_rows, reopened.dim) == (23, 6)
  with open(tmp_path / "s" / "manifest.json") as f:
    assert json.load(f)["dtype"] == dtype


def test_quantize():
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((50, 40)) * np.exp(rng.normal(size=(50, 1)) * 3)
       ).astype(np.float32)
  x[7] = 0
  q, scale = store_lib.quantize(x)
  assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (50,)
  assert np.abs(q.astype(int)).max() <= 127
  nonzero = np.arange(50) != 7
  assert np.all(np.abs(q[nonzero].astype(int)).max(axis=1) == 127)
  assert scale[7] == 0 and not q[7].any()
  err = np.abs(q * scale[:, None].astype(np.float64) - x)
  assert np.all(err <= scale[:, None] * (0.5 + 1e-5))
  q2, scale2 = store_lib.quantize(x.copy())
  assert q2.tobytes() == q.tobytes() and scale2.tobytes() == scale.tobytes()


def test_int8_round_trip_with_column_scales(tmp_path):
  rng = np.random.default_rng(1)
  columns = np.exp(rng.normal(size=6) * 2).astype(np.float32)
  data = _data() * columns
  s = store_lib.create_or_open(tmp_path / "s", _manifest(dtype="int8"),
                               column_scales=columns)
  _write_all(s, data)
  assert (tmp_path / "s" / "column_scales.npy").exists()
  record = s.chunk_record(1)
  assert isinstance(record["crc32"], int) and isinstance(record["scales_crc32"], int)
  reopened = store_lib.open_store(tmp_path / "s")
  np.testing.assert_array_equal(reopened.column_scales, columns)
  assert reopened.manifest.quantization == {"column_scales_sha256": mock.ANY}
  got = reopened.read_rows(0, 23)
  # Each value within half its row's step, in units of its column's scale.
  z = data / columns
  step = np.abs(z).max(axis=1, keepdims=True) / 127
  assert np.all(np.abs(got - data) <= (step * 0.5 + 1e-6) * columns * (1 + 1e-5))
  assert np.asarray(reopened.read_async(0, 23).result()).dtype == np.int8
  # A resume with other column scales would mix two quantizations.
  with pytest.raises(store_lib.IncompatibleStoreError, match="quantization"):
    store_lib.create_or_open(tmp_path / "s", _manifest(dtype="int8"),
                             column_scales=columns * 2)
  # Column scales are checked, and only int8 stores take them.
  for bad in (np.zeros(6), np.ones(5), np.full(6, np.nan)):
    with pytest.raises(InputError, match="column_scales: expected 6 positive"):
      store_lib.create_or_open(tmp_path / "t", _manifest(dtype="int8"),
                               column_scales=bad)
  with pytest.raises(InputError, match="column scales are for int8 stores"):
    store_lib.create_or_open(tmp_path / "u", _manifest(), column_scales=columns)
  # Without them an int8 store's rows cannot be read: it says so.
  os.remove(tmp_path / "s" / "column_scales.npy")
  with pytest.raises(CorruptStoreError, match="column_scales.npy: missing"):
    store_lib.open_store(tmp_path / "s")
  np.save(tmp_path / "s" / "column_scales.npy", columns * 2)
  with pytest.raises(CorruptStoreError, match="does not match the sha256"):
    store_lib.open_store(tmp_path / "s")


def test_int8_verify_finds_damaged_scales(tmp_path):
  s = store_lib.create_or_open(tmp_path / "s", _manifest(dtype="int8"))
  data = _data()
  data[12] = np.nan  # a quarantined row: zero, scale 0, without a warning
  for c in s.pending_chunks():
    lo, hi = s.chunk_bounds(c)
    s.write_chunk(c, data[lo:hi], {12: "non-finite loss"} if c == 2 else None)
  np.testing.assert_array_equal(s.read_rows(12, 13), np.zeros((1, 6)))
  assert s.scales[12].read().result() == 0
  np.testing.assert_array_equal(s.column_scales, np.ones(6, np.float32))
  assert [s.verify_chunk(c) for c in range(s.num_chunks)] == [None] * 5
  path = s._scales_file(2)
  raw = bytearray(open(path, "rb").read())
  raw[5] ^= 0x10
  open(path, "wb").write(bytes(raw))
  assert s.verify_chunk(2).startswith(f"its scales {path}: checksum mismatch")
  assert s.verify_chunk(1) is None
  # A marker without the scales' checksum (format v2's, empty, or edited):
  # nothing to check them against (before 2026-12-05 a TypeError).
  record = s.chunk_record(2)
  del record["scales_crc32"]
  with open(s._marker(2), "w") as f:
    f.write(json.dumps(record))
  assert s.verify_chunk(2) is None


def test_resume_after_crash_is_byte_identical(tmp_path):
  data = _data()
  full = store_lib.create_or_open(tmp_path / "full", _manifest())
  _write_all(full, data)

  part = store_lib.create_or_open(tmp_path / "part", _manifest())
  _write_all(part, data, chunks=[0, 3])
  # Rows of chunk 1 land on disk but the run dies before its marker.
  part.array[5:10].write(
      np.full((5, 6), 7, ml_dtypes.bfloat16)).result()
  del part
  resumed = store_lib.create_or_open(tmp_path / "part", _manifest())
  assert resumed.pending_chunks() == [1, 2, 4]
  _write_all(resumed, data)
  assert resumed.is_complete()
  a, b = _array_files(tmp_path / "full"), _array_files(tmp_path / "part")
  assert sorted(a) == sorted(b) and len(a) > 5
  for name in a:
    assert a[name] == b[name], name
  np.testing.assert_array_equal(resumed.read_rows(0, 23), full.read_rows(0, 23))


def test_a_marker_named_by_other_digits_is_ignored(tmp_path):
  """'².done' passes str.isdigit() but not int(): it made every read of
  the progress (check_complete, pending_chunks) a raw ValueError."""
  s = store_lib.create_or_open(tmp_path / "s", _manifest())
  _write_all(s, _data(), chunks=[0, 2])
  for name in ("\u00b2.done", "\u0661.done"):  # superscript 2, Arabic-Indic 1
    (tmp_path / "s" / store_lib.PROGRESS_DIR / name).write_text("")
  assert s.done_chunks() == {0, 2}
  assert s.pending_chunks() == [1, 3, 4]


def test_pending_chunks(tmp_path):
  s = store_lib.create_or_open(tmp_path / "s", _manifest())
  _write_all(s, _data(), chunks=[1, 3])
  assert s.pending_chunks() == [0, 2, 4]
  assert store_lib.open_store(tmp_path / "s").done_chunks() == {1, 3}


def test_mismatched_manifest_names_fields(tmp_path):
  store_lib.create_or_open(tmp_path / "s", _manifest())
  with pytest.raises(store_lib.IncompatibleStoreError) as e:
    store_lib.create_or_open(tmp_path / "s",
                             _manifest(projection_seed=1, correction="none"))
  msg = str(e.value)
  assert "field 'projection_seed': store has 0, this run has 1" in msg
  assert "field 'correction': store has 'adam'" in msg
  assert "manifest.json" in msg
  assert isinstance(e.value, ValueError)

  with pytest.raises(store_lib.IncompatibleStoreError,
                     match="field 'projection_seed': store has 0, query has 1"):
    store_lib.open_store(tmp_path / "s", _manifest(projection_seed=1))
  # The query side need not know the corpus or storage settings.
  store_lib.open_store(tmp_path / "s", _manifest(num_rows=1, corpus="other",
                                                 dtype="float32"))
  # A resume is refused on how rows are stored, not on informative fields:
  # a moved checkpoint, another tracer version (both were refused as "not
  # comparable" before 2026-12-05).
  with pytest.raises(store_lib.IncompatibleStoreError, match="field 'dtype'"):
    store_lib.create_or_open(tmp_path / "s", _manifest(dtype="float32"))
  resumed = store_lib.create_or_open(
      tmp_path / "s", _manifest(checkpoint="/moved/ckpt/100", tracer_version="9.9"))
  assert resumed.manifest.checkpoint == _manifest().checkpoint


def test_check_compatible_direct():
  a = _manifest(layout=((1, 2),))
  a.check_compatible(_manifest(layout=[[1, 2]]))  # tuples == lists after JSON
  with pytest.raises(ValueError, match="field 'dim': store has 6, query has 7"):
    a.check_compatible(_manifest(dim=7, layout=[[1, 2]]))
  # A corpus at another path is the same corpus when its rows fingerprint
  # alike (moved, mirrored); without fingerprints, or with others, it is not.
  fp = _manifest(corpus="/a/c.jsonl", corpus_fingerprint="f00d")
  fp.check_compatible(_manifest(corpus="/b/copy.jsonl", corpus_fingerprint="f00d"))
  for other in (dict(corpus_fingerprint="beef"), dict(corpus_fingerprint="")):
    with pytest.raises(ValueError, match="field 'corpus': store has '/a/c.jsonl'"):
      fp.check_compatible(_manifest(corpus="/b/copy.jsonl", **other))
  with pytest.raises(ValueError, match="field 'corpus'"):
    fp.check_compatible(_manifest(corpus="/b/copy.jsonl", corpus_fingerprint="f00d"),
                        ["corpus"])


def test_write_chunk_validates_shape(tmp_path):
  s = store_lib.create_or_open(tmp_path / "s", _manifest())
  # Rows past N read as zeros from a local store and as a CorruptStoreError
  # from object storage before 2026-12-05.
  out = np.empty((10, 6), s.dtype)
  for start in (20, -3):
    with pytest.raises(InputError, match=rf"rows \[{start}, {start + 10}\) out of range"):
      s.read_into(start, start + 10, out)
  with pytest.raises(InputError, match="chunk 4.*expected \\(3, 6\\)"):
    s.write_chunk(4, np.zeros((5, 6), np.float32))
  with pytest.raises(InputError, match="out of range"):
    s.write_chunk(5, np.zeros((5, 6), np.float32))


def test_bad_inputs(tmp_path):
  with pytest.raises(InputError, match="manifest.json: no such file"):
    store_lib.open_store(tmp_path / "nothing")
  with pytest.raises(InputError, match="'dtype'"):
    store_lib.create_or_open(tmp_path / "x", _manifest(dtype="float16"))
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "notes.txt").write_text("hi")
  with pytest.raises(InputError, match="not an encoding store"):
    store_lib.create_or_open(tmp_path / "busy", _manifest())
  # A file:// URL naming a file, as its path does (a ValueError from
  # tensorstore's listing before 2026-12-05).
  with pytest.raises(InputError, match="notes.txt: exists and is not a directory"):
    store_lib.create_or_open(f"file://{tmp_path}/busy/notes.txt", _manifest())
  s = tmp_path / "s"
  store_lib.create_or_open(s, _manifest())
  d = json.loads((s / "manifest.json").read_text())
  d["colour"] = "red"
  (s / "manifest.json").write_text(json.dumps(d))
  with pytest.raises(InputError, match="unknown field.*colour"):
    store_lib.open_store(s)
  del d["colour"]
  d["factored"] = "dense/kernel"
  (s / "manifest.json").write_text(json.dumps(d))
  with pytest.raises(InputError, match="manifest.json: field 'factored' must be a "
                     "list of weight names or null, got 'dense/kernel'"):
    store_lib.read_manifest(s)


def test_file_urls_name_absolute_paths_on_this_machine(tmp_path, monkeypatch):
  """``file:///P`` and ``file://localhost/P`` are ``/P``; ``file://host/P``
  (before 2026-12-04 the relative path ``host/P``, written under the working
  directory) is refused."""
  from tracer import storage  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  for url in (f"file://{tmp_path}/a.txt", f"file://localhost{tmp_path}/a.txt"):
    storage.write_text(url, url)
    assert (tmp_path / "a.txt").read_text() == url
    assert storage.normalize(url) == f"file://{tmp_path}/a.txt"
  assert storage.local_path("file://") == "/" and storage.normalize("file:///") == "file:///"
  assert storage.local_path("gs://b/x") is None and storage.local_path("r/x") == "r/x"
  store_lib.create_or_open(f"file://localhost{tmp_path}/s", _manifest())
  assert store_lib.open_store(tmp_path / "s").manifest.dim == _manifest().dim
  for bad in ("file://otherhost/x.txt", "file://x.txt", "file://localhostx/y"):
    with pytest.raises(InputError, match=f"^{bad}: a file URL names an absolute path"):
      storage.write_text(bad, "x")
  assert sorted(os.listdir(tmp_path)) == ["a.txt", "s"]
  # "." and ".." as in a local path (before, tensorstore's "Invalid file
  # path" for a store, while a plain write went through).
  dotted = f"file://{tmp_path}/x/../s2/./"
  assert storage.normalize(dotted) == f"file://{tmp_path}/s2"
  store_lib.create_or_open(dotted, _manifest())
  assert store_lib.open_store(tmp_path / "s2").manifest.dim == _manifest().dim
  with claim_lib.Claim(dotted):
    assert (tmp_path / "s2" / claim_lib.CLAIM_FILE).exists()


@pytest.mark.parametrize("folded, expected", [
    ("gs:/b/s", "gs://b/s"), ("s3:/b/s", "s3://b/s"), ("memory:/s", "memory://s"),
    ("file:/abs/s", "file:///abs/s")])
def test_a_url_with_its_slashes_folded_is_refused(tmp_path, monkeypatch, folded,
                                                  expected):
  # pathlib.Path("gs://b/s") is "gs:/b/s": before, a relative path, the
  # store written under ./gs:/b/s and nothing in the bucket.
  from tracer import storage  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  with pytest.raises(InputError, match=re.escape(
      f'{folded}: a URL\'s "//" folded to "/" (as pathlib.Path does); '
      f"expected {expected}")):
    store_lib.create_or_open(folded, _manifest())
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("field,value,expected", [
    ("dim", None, "an integer"), ("num_rows", "16x", "an integer"),
    ("chunk_rows", 2.5, "an integer"), ("step", True, "an integer"),
    ("dtype", ["bfloat16"], "a string"), ("epsilon", "1e-8", "a number"),
    ("basis_fingerprint", 3, "a string or null"),
    ("quantization", None, "an object"), ("encode_config", [], "an object")])
def test_manifest_fields_of_the_wrong_type_are_named(tmp_path, field, value,
                                                     expected):
  s = tmp_path / "s"
  store_lib.create_or_open(s, _manifest())
  d = json.loads((s / "manifest.json").read_text())
  (s / "manifest.json").write_text(json.dumps({**d, field: value}))
  with pytest.raises(InputError, match=f"manifest.json: field '{field}' must be "
                     f"{expected}, got "):
    store_lib.open_store(s)


@pytest.mark.parametrize("field", ["num_rows", "dim", "chunk_rows"])
def test_manifest_extents_past_an_array_s_are_named(tmp_path, field):
  """A damaged manifest's 10**30 rows (or d, or chunk) was a raw
  OverflowError from ts.open."""
  s = tmp_path / "s"
  store_lib.create_or_open(s, _manifest())
  d = json.loads((s / "manifest.json").read_text())
  (s / "manifest.json").write_text(json.dumps({**d, field: 10**30}))
  with pytest.raises(InputError, match=re.escape(
      f"manifest.json: field '{field}' must be at most {2**62 - 2} (2**62 - 2, "
      f"the largest array extent), got {10**30}")):
    store_lib.open_store(s)


def test_unfinished_creation_is_reset(tmp_path):
  s = store_lib.create_or_open(tmp_path / "s", _manifest())
  _write_all(s, _data(), chunks=[0])
  os.remove(tmp_path / "s" / "manifest.json")  # as if creation never finished
  s = store_lib.create_or_open(tmp_path / "s", _manifest(dim=4))
  assert s.pending_chunks() == [0, 1, 2, 3, 4]  # stale marker gone
  assert s.dim == 4
  # Attachments of other settings are leftovers too (before 2026-12-05 an
  # int8 creation's column scales, or a basis, made the location "not an
  # encoding store").
  store_lib.create_or_open(tmp_path / "t", _manifest(dtype="int8"),
                           {"basis.npz": b"B"})
  os.remove(tmp_path / "t" / "manifest.json")
  t = store_lib.create_or_open(tmp_path / "t", _manifest(),
                               other_attachments=("basis.npz",))
  assert t.dtype == np.dtype(store_lib.DTYPES["bfloat16"])
  assert not (tmp_path / "t" / "basis.npz").exists()
  assert not (tmp_path / "t" / store_lib.COLUMN_SCALES).exists()
  # An unknown file is still not the store's to delete.
  os.remove(tmp_path / "t" / "manifest.json")
  (tmp_path / "t" / "basis.npz").write_bytes(b"B")
  with pytest.raises(InputError, match=r"not empty: \['basis.npz'\]"):
    store_lib.create_or_open(tmp_path / "t", _manifest())


def test_fingerprint():
  params = {"b": np.arange(3, dtype=np.float32), "a": {"w": np.ones((2, 2))}}
  f = store_lib.fingerprint(params)
  assert isinstance(f, str) and len(f) == 16
  assert f == store_lib.fingerprint(dict(reversed(list(params.items()))))
  changed = dict(params, b=np.array([0, 1, 2.5], np.float32))
  assert store_lib.fingerprint(changed) != f
  # dtype and shape count, not just bytes
  assert (store_lib.fingerprint(np.zeros(4, np.float32))
          != store_lib.fingerprint(np.zeros(2, np.float64)))
  assert (store_lib.fingerprint(np.zeros((2, 2)))
          != store_lib.fingerprint(np.zeros(4)))


def test_manifest_round_trips_through_json(tmp_path):
  m = _manifest(basis_fingerprint="ff00", factored=["a/kernel", "b/kernel"])
  store_lib.create_or_open(tmp_path / "s", m)
  s = store_lib.open_store(tmp_path / "s")
  assert s.manifest == dataclasses.replace(m, layout=m.to_dict()["layout"])


# Integrity and quarantine -------------------------------------------------------

def test_markers_record_checksums_and_verify_finds_corruption(tmp_path):
  s = store_lib.create_or_open(tmp_path / "s", _manifest())
  _write_all(s, _data())
  record = s.chunk_record(2)
  assert record["rows"] == [10, 15] and isinstance(record["crc32"], int)
  assert [s.verify_chunk(c) for c in range(s.num_chunks)] == [None] * 5
  # One flipped byte in chunk 2's file, and chunk 4's file cut short.
  path = s.chunk_file(2)
  raw = bytearray(open(path, "rb").read())
  raw[7] ^= 0x10
  open(path, "wb").write(bytes(raw))
  with open(s.chunk_file(4), "r+b") as f:
    f.truncate(10)
  s = store_lib.open_store(tmp_path / "s")
  assert s.verify_chunk(2).startswith("checksum mismatch")
  assert s.verify_chunk(4).startswith("unreadable")
  assert s.verify_chunk(0) is None
  s.unmark(3)
  assert s.verify_chunk(3) == "not written"
  # A damaged marker is the chunk's damage, which --repair unmarks (before
  # 2026-12-05 verify stopped at it, and nothing could repair it).
  with open(s._marker(0), "w") as f:
    f.write("{not json")
  assert s.verify_chunk(0).startswith(
      f"damaged marker: {s._marker(0)}: not a chunk marker")
  s.unmark(0)
  assert s.verify_chunk(0) == "not written"
  # A deleted chunk file reads as zeros: named missing (before 2026-12-05
  # only "checksum mismatch"), by verify and by a scan's read.
  os.remove(s.chunk_file(1))
  assert s.verify_chunk(1).startswith(
      f"its file {s.chunk_file(1)} is missing (read back as zeros: checksum "
      "mismatch")
  with pytest.raises(CorruptStoreError, match=re.escape(
      f"chunk 1 (rows 5..10) of store {s.path}: its file {s.chunk_file(1)} is "
      "missing")):
    s.check_read(5, 10, s.read_rows(5, 10), {1: s.chunk_record(1)})
  # An all-zero chunk is stored as no file (tensorstore's fill value): not
  # missing.
  s.unmark(1)
  lo, hi = s.chunk_bounds(1)
  s.write_chunk(1, np.zeros((hi - lo, _data().shape[1]), np.float32))
  assert not os.path.exists(s.chunk_file(1)) and s.verify_chunk(1) is None


def test_quarantined_rows_are_zero_and_recorded(tmp_path):
  s = store_lib.create_or_open(tmp_path / "s", _manifest(dtype="float32"))
  data = _data()
  for c in s.pending_chunks():
    lo, hi = s.chunk_bounds(c)
    s.write_chunk(c, data[lo:hi], {12: "non-finite loss"} if c == 2 else None)
  assert s.quarantined() == {12: "non-finite loss"}
  np.testing.assert_array_equal(s.read_rows(12, 13), np.zeros((1, 6)))
  np.testing.assert_array_equal(s.read_rows(11, 12), data[11:12])
  assert s.verify_chunk(2) is None
  with pytest.raises(InputError, match=r"quarantined rows \[3\] are not in"):
    s.write_chunk(2, data[10:15], {3: "non-finite loss"})
  # A damaged marker's quarantined rows: an error naming the marker (before
  # 2026-12-05 an AttributeError, a ValueError, or, for a row outside the
  # chunk, a row the scan silently never returned).
  marker = tmp_path / "s" / "progress" / "000000002.done"
  record = json.loads(marker.read_text())
  for bad in (["12"], {"x": "nan"}, {"20": "nan"}, {"12": 5}):
    marker.write_text(json.dumps({**record, "quarantined": bad}))
    with pytest.raises(CorruptStoreError, match=re.escape(
        f"{marker}: field 'quarantined' must map rows of the chunk [10, 15) "
        "to reasons")):
      s.quarantined()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_non_finite_rows_are_quarantined_in_every_dtype(tmp_path, dtype):
  """Rows a caller left NaN or inf: before 2026-12-08 an int8 store kept
  them as zeros (their peak NaN), which the scan ranked, where bf16 and f32
  kept the NaN, which it never ranks. Now each is quarantined."""
  from tracer import scan  # pylint: disable=g-import-not-at-top
  s = store_lib.create_or_open(tmp_path / dtype, _manifest(dtype=dtype))
  # (int8 rows are scaled row by row: scored as cosines)
  metric = hessian.identity_metric(6).row_metric()
  data = _data()
  data[3] = np.nan
  data[7, 2] = np.inf
  _write_all(s, data)
  assert s.quarantined() == {3: "non-finite encoding", 7: "non-finite encoding"}
  got = scan.scan_store(s, _data(2, seed=1), 23, metric=metric)
  listed = set(got.proponent_rows.ravel()) | set(got.opponent_rows.ravel())
  assert listed == set(range(23)) - {3, 7} | {scan.INVALID_ROW}, listed


def test_markers_of_the_earlier_format_count_as_done_unchecked(tmp_path):
  s = store_lib.create_or_open(tmp_path / "s", _manifest())
  _write_all(s, _data())
  with open(s._marker(1), "wb"):
    pass  # format v2 wrote empty markers
  assert s.chunk_record(1) == {} and s.verify_chunk(1) is None and s.is_complete()
  assert s.check_chunk(1) == (None, False) and s.check_chunk(0) == (None, True)


def test_a_damaged_last_chunk_is_rewritten(tmp_path):
  s = store_lib.create_or_open(tmp_path / "s", _manifest())
  data = _data()
  _write_all(s, data)
  with open(s.chunk_file(4), "r+b") as f:   # rows 20..23 of a 5-row chunk
    f.truncate(7)
  s.unmark(4)
  _write_all(s, data)
  assert s.verify_chunk(4) is None
  np.testing.assert_array_equal(
      s.read_rows(20, 23), data[20:23].astype(ml_dtypes.bfloat16).astype(np.float32))


# Local reads without tensorstore -------------------------------------------------

def test_crc32_is_zlibs():
  data = np.random.default_rng(0).integers(0, 256, 100_003).astype(np.uint8)
  assert store_lib._crc32(data) == zlib.crc32(data.tobytes())
  assert store_lib._crc32(data[:0]) == 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "int8"])
def test_local_reads_equal_tensorstores(tmp_path, dtype):
  data = _data()
  data[5:10] = 0  # chunk 1 is all zeros: no file is stored for it
  s = store_lib.create_or_open(tmp_path / "s", _manifest(dtype=dtype))
  _write_all(s, data)
  assert s.local and not os.path.exists(s.chunk_file(1))
  want = np.asarray(s.read_async(0, 23).result())  # tensorstore
  for lo, hi in [(0, 23), (3, 17), (5, 10), (21, 23), (7, 7)]:
    out = np.full((hi - lo, 6), 9, s.dtype)
    assert s.read_into(lo, hi, out) == []  # local: done on return
    np.testing.assert_array_equal(out, want[lo:hi])
  for c in range(s.num_chunks):
    lo, hi = s.chunk_bounds(c)
    view = s.chunk_view(c)
    assert view.shape == (5, 6) and not view.flags.writeable
    np.testing.assert_array_equal(view[:hi - lo], want[lo:hi])
  # Pieces (one per chunk) check like one array.
  records = {c: s.chunk_record(c) for c in range(s.num_chunks)}
  s.check_read(0, 23, [s.chunk_view(c) for c in range(s.num_chunks)], records)
  s.check_read(0, 23, want, records)
  assert s.chunk_records_later(3, 12)() == {c: records[c] for c in (0, 1, 2)}


def test_local_reads_refuse_a_damaged_chunk(tmp_path):
  s = store_lib.create_or_open(tmp_path / "s", _manifest())
  _write_all(s, _data())
  with open(s.chunk_file(2), "r+b") as f:
    f.truncate(10)
  with pytest.raises(CorruptStoreError, match=r"c/2/0: chunk 2 \(rows 10..15\).*"
                     "cannot be read.*10 bytes"):
    s.chunk_view(2)
  with pytest.raises(CorruptStoreError, match="chunk 2 .*cannot be read"):
    s.read_into(8, 12, np.empty((4, 6), s.dtype))
  # read_rows too (before 2026-12-07 tensorstore's ValueError).
  with pytest.raises(CorruptStoreError, match="chunk 2 .*cannot be read"):
    s.read_rows(8, 12)
  pieces = [s.chunk_view(c) for c in (0, 1)]
  bad = pieces[1].copy()
  bad[0, 0] += 1
  with pytest.raises(CorruptStoreError, match=r"chunk 1 \(rows 5..10\).*checksum"):
    s.check_read(0, 10, [pieces[0], bad], {c: s.chunk_record(c) for c in (0, 1)})
  s.unmark(3)
  with pytest.raises(CorruptStoreError, match="chunk 3 .*has no marker"):
    s.chunk_records_later(15, 20)()


# Storage locations --------------------------------------------------------------


def test_exists_reads_no_bytes(tmp_path):
  big = tmp_path / "basis.npz"
  big.write_bytes(b"x" * 1000)
  (tmp_path / "sub").mkdir()
  storage.write_bytes("memory://exists/a/basis.npz", b"x" * 1000)
  # A basis may be GiBs: exists must not read it (nor anything else).
  with mock.patch.object(storage, "read_bytes", side_effect=AssertionError):
    for root in (str(tmp_path), f"file://{tmp_path}"):
      assert storage.exists(storage.join(root, "basis.npz"))
      assert not storage.exists(storage.join(root, "missing.npz"))
      assert not storage.exists(storage.join(root, "no_dir", "basis.npz"))
      assert not storage.exists(storage.join(root, "sub"))  # a directory
    assert storage.exists("memory://exists/a/basis.npz")
    assert not storage.exists("memory://exists/a/missing.npz")
    assert not storage.exists("memory://exists/no_dir/basis.npz")
    assert not storage.exists("memory://exists/a")  # a prefix, not an object
  storage.delete_dir("memory://exists")
  # A path that cannot be looked at is not "missing" (os.path.isfile said so:
  # a basis then refitted, a store created over one it could not read).
  with pytest.raises(InputError, match="cannot read: File name too long"):
    storage.exists(str(tmp_path / ("x" * 300)))
  assert not storage.exists(str(big / "below_a_file"))
  for bucket in ("s3://bkt", "gs://bkt"):  # (the message named "s3://")
    with pytest.raises(InputError, match=f"{bucket}: names a bucket, not "
                       "a file in one"):
      storage.read_bytes(bucket)


def test_a_schemes_root_keeps_its_slashes(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert storage.normalize("memory://") == storage.normalize("memory:///") == "memory://"
  assert storage.join("memory://", "root_test.json") == "memory://root_test.json"
  assert storage.join("s3://bucket/", "a", "b") == "s3://bucket/a/b"
  assert storage.split("memory://root_test.json") == ("memory://", "root_test.json")
  assert storage.split("gs://bucket/a/b") == ("gs://bucket/a", "b")
  # Before 2026-12-08 split("gs://bucket//b") gave ("gs://bucket/", "b"),
  # which joins again to another key: gs://bucket/b.
  # A directory read as a file said "no such file" before 2026-12-08.
  for where in (str(tmp_path), f"file://{tmp_path}"):
    with pytest.raises(InputError, match=re.escape(
        f"{where}: is a directory; expected a file")):
      storage.read_json(where)
  with pytest.raises(InputError, match=re.escape(
      f"{tmp_path}: is a directory; expected a basis file")):
    hessian.Basis.load(str(tmp_path))
  for url in ("gs://bucket//b", "s3://bucket/a//b/", "gs:///b"):
    with pytest.raises(InputError, match=re.escape(
        f"{url}: an empty name between slashes; expected {url[:2]}://BUCKET/")):
      storage.split(url)
  where = storage.join("memory://", "root_test.json")
  storage.write_text(where, "{}")
  assert storage.read_json(where) == {} and storage.exists(where)
  assert "root_test.json" in storage.list_dir("memory://", "root_test")
  assert os.listdir(tmp_path) == []  # not a local directory named "memory:"
  storage.delete(where)
  # file:///'s one slash is the root, not a trailing slash (it was dropped,
  # and the file written under the working directory).
  assert storage.normalize("file:///") == "file:///"
  where = storage.join("file:///", str(tmp_path / "abs")[1:], "f.txt")
  assert where == f"file://{tmp_path}/abs/f.txt"
  storage.write_text(where, "x")
  assert (tmp_path / "abs" / "f.txt").read_text() == "x"
  assert os.listdir(tmp_path) == ["abs"]


def test_a_missing_bucket_is_named_in_one_line(s3):
  """Listing (a corpus pattern, a store's parts) a bucket that does not
  exist: an InputError naming the URL and the server's status, without the
  XML of its reply (was a ValueError traceback from the command line)."""
  s3("present")
  with pytest.raises(InputError) as caught:
    storage.list_dir("s3://no-such-bucket/tok")
  message = str(caught.value)
  assert message.startswith("s3://no-such-bucket/tok: cannot list: NOT_FOUND: NoSuchBucket")
  assert "<?xml" not in message and "\n" not in message


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_a_bucket_that_cannot_be_reached_is_an_error_in_seconds(scheme, tmp_path):
  """No network, or an endpoint nobody serves: the first request to the
  bucket is an error after a few tries. Before 2026-12-06 it waited out
  tensorstore's default tries, about 15 minutes (`tracer benchmark-data
  --read=s3://...` seemed to hang)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from multiprocess import free_port  # pylint: disable=g-import-not-at-top
  endpoint = f"http://127.0.0.1:{free_port()}"  # (freed: nothing listens)
  env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1",
         "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
         "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
         "TENSORSTORE_GCS_HTTP_URL": endpoint, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test"}
  done = subprocess.run(
      [os.path.join(os.path.dirname(sys.executable), "tracer"), "benchmark-data",
       f"--read={scheme}://bucket/c4-00000.json.gz"],
      env=env, capture_output=True, text=True, timeout=240, check=False)
  assert done.returncode == 2, done.stderr[-2000:]
  assert re.search(
      rf"error: {scheme}://bucket: no answer from the bucket"
      f"{re.escape(f' at AWS_ENDPOINT_URL={endpoint}') if scheme == 's3' else ''}"
      r" in \d+ s \(ABORTED: All 5 retry attempts failed: CURL error Could not "
      r"connect to server: .*\); expected a network that reaches it\n",
      done.stderr), done.stderr[-2000:]


def test_a_bucket_that_takes_the_connection_and_never_replies(monkeypatch):
  """Each try would wait 60 s for a reply (curl's low-speed limit; 377 s for
  5 tries): the first request is bounded as a whole."""
  import socket  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  server = socket.create_server(("127.0.0.1", 0))
  taken = []

  def take():
    while True:
      try:
        taken.append(server.accept()[0])
      except OSError:
        return
  threading.Thread(target=take, daemon=True).start()
  endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
  for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1",
               "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}.items():
    monkeypatch.setenv(k, v)
  monkeypatch.setattr(storage, "FIRST_REQUEST_SECONDS", 2.0)
  try:
    with pytest.raises(InputError, match=re.escape(
        f"s3://silent: no answer from the bucket at AWS_ENDPOINT_URL={endpoint} "
        "in 2 s (no reply); expected a network that reaches it")):
      storage.exists("s3://silent/x.jsonl")
    assert taken  # (it was reached, and said nothing)
  finally:
    server.close()
    for conn in taken:
      conn.close()


def test_verify_refuses_an_edited_manifest_and_reports_stray_markers(tmp_path, capsys):
  """Before 2026-12-05 `tracer verify` said OK on all of these (a scan
  refused the manifest; a stray marker was never read, and a marker's rows
  were not compared with its chunk's)."""
  from tracer.launch import verify  # pylint: disable=g-import-not-at-top
  path = tmp_path / "s"
  s = store_lib.create_or_open(path, _manifest())
  _write_all(s, _data())
  manifest = path / store_lib.MANIFEST
  good = json.loads(manifest.read_text())
  assert verify.run(str(path)) == 0
  for edit, message in [
      ({"format": "tracer.store.v9"}, "field 'format' must be 'tracer.store.v2' "
       "(the store format this tracer reads), got 'tracer.store.v9'"),
      ({"format": ...}, "missing field(s) ['format']"),
      ({"epsilon": float("nan")}, "field 'epsilon' must be a finite number >= 0, "
       "got nan"),
      ({"epsilon": -1e-8}, "field 'epsilon' must be a finite number >= 0")]:
    edited = {k: v for k, v in {**good, **edit}.items() if v is not ...}
    manifest.write_text(json.dumps(edited))
    with pytest.raises(InputError, match=re.escape(f"{manifest}: {message}")):
      verify.run(str(path))
  manifest.write_text(json.dumps(good))
  # A tokenized corpus given as the store (before 2026-12-06 "unknown
  # field(s) ['chunks_stored', 'fingerprint', 'max_len', ...]").
  from tracer import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  from tracer.config import DataConfig  # pylint: disable=g-import-not-at-top
  (tmp_path / "c.jsonl").write_text(json.dumps({"id": "a", "text": "one"}) + "\n")
  tokenized = tmp_path / "tok"
  corpus_lib.tokenize(str(tmp_path / "c.jsonl"), str(tokenized), DataConfig(), 8)
  for read in (verify.run, store_lib.open_store):
    with pytest.raises(InputError, match=re.escape(
        f"{tokenized / store_lib.MANIFEST}: a tokenized corpus, not a store "
        "(expected format 'tracer.store.v2', got 'tracer.tokenized_corpus.v1'); "
        "pass it as --corpus")):
      read(str(tokenized))
  # A marker whose rows are not its chunk's (edited, or another store's).
  marker = path / "progress" / "000000001.done"
  record = json.loads(marker.read_text())
  marker.write_text(json.dumps({**record, "rows": [0, 5]}))
  capsys.readouterr()
  assert verify.run(str(path)) == 1
  out = capsys.readouterr().out
  assert (f"corrupt: {s.chunk_file(1)}: chunk 1 (rows 5..10): damaged marker: "
          f"{marker}: field 'rows' is [0, 5], but the chunk holds rows "
          "[5, 10]") in out, out
  marker.write_text(json.dumps(record))
  # A marker past the last chunk: reported, and removed by --repair.
  stray = path / "progress" / "000000007.done"
  stray.write_text((path / "progress" / "000000000.done").read_text())
  assert verify.run(str(path)) == 1
  out = capsys.readouterr().out
  assert f"stray: {stray}: marks chunk 7, past the store's 5 chunks\n" in out
  assert out.endswith(f"{path}: 0 corrupt and 0 missing of 5 chunks; 1 stray markers\n")
  assert verify.run(str(path), repair=True) == 1 and not stray.exists()
  assert verify.run(str(path)) == 0
