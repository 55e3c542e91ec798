"""An on-disk store of corpus encodings: a zarr v3 ``[N, d]`` array plus a manifest.

Layout of a store directory::

  manifest.json      what makes these encodings comparable (see ``Manifest``)
  encodings/         tensorstore zarr v3 array, one zarr chunk per ``chunk_rows`` rows
  scales/            int8 stores only: each row's f32 scale, a zarr v3 ``[N]``
                     array chunked like the rows (``quantize``)
  column_scales.npy  int8 stores only: the f32 ``[d]`` scales the rows were
                     divided by before quantizing (``create_or_open``)
  progress/          one ``<chunk>.done`` marker per chunk whose rows are written
  <attachments>      files written with the store, before its manifest (the
                     pipeline keeps the basis its rows are in: ``basis.npz``)

Rows are query-independent: no query set's choice is baked into them, so one
store serves every query set (``tracer.hessian`` applies each set's R at scan
time).

Writing is resumable and deterministic: chunk ``c`` holds rows
``[c * chunk_rows, (c + 1) * chunk_rows)`` and is written whole, then marked
done. A killed writer, run again, rewrites only unmarked chunks, so the array
files end byte-identical to those of an uninterrupted run. Each chunk is
written by exactly one host (``tracer.pipeline.encode_corpus`` decides which),
so hosts never write the same file.

The store may live anywhere ``tracer.storage`` reaches (a local path,
``gs://``, ``s3://``, ``memory://``): the manifest and markers are single
atomic object writes, and the array is tensorstore's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import mmap
import operator
import os
import sys
import zlib
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import tensorstore as ts

from tracer import crashpoints
from tracer.claim import CLAIM_FILE
from tracer import corpus as corpus_lib
from tracer import data as data_lib
from tracer import storage
from tracer import topk
from tracer.errors import CorruptStoreError, InputError

MANIFEST = "manifest.json"
ARRAY_DIR = "encodings"
PROGRESS_DIR = "progress"
SCALES_DIR = "scales"
COLUMN_SCALES = "column_scales.npy"
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "int8": np.int8}
# The largest extent a manifest's num_rows, dim and chunk_rows may give
# (tensorstore's largest finite index, 2**62 - 2): past 2**64 its spec was a
# raw OverflowError from ts.open (a damaged or hand-edited manifest).
MAX_EXTENT = 2**62 - 2


def _tracer_version() -> str:
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    return metadata.version("tracer")
  except Exception:  # pylint: disable=broad-except
    return "unknown"


class IncompatibleStoreError(InputError):
  """A store's manifest disagrees with what the caller expects."""


FORMAT = "tracer.store.v2"
# Fields that define the vector space the encodings live in: two sets of
# encodings can be compared (dot products mean something) only if these agree.
# Not the checkpoint's path (a moved checkpoint is the same checkpoint) nor
# tracer's version (an upgrade must not orphan a 10 TB store): the format and
# the encoder's kernel say what a version changes.
ENCODING_FIELDS = (
    "step", "params_fingerprint", "correction", "epsilon", "projection_seed",
    "layout", "dim", "basis_fingerprint", "kernel", "format")
# Fields that describe how and what was stored; they must also agree to resume.
STORAGE_FIELDS = ("dtype", "corpus", "num_rows", "corpus_fingerprint", "chunk_rows")


# Manifest fields compared by more than equality: a fingerprint only when
# both sides have one (stores and tokenized corpora from before 2026-12-04
# have none).
_SAME = {"corpus": data_lib.same_source,
         "corpus_fingerprint": lambda a, b: not a or not b or a == b}
# What a difference in a field means, where its name does not say.
_MEANS = {"corpus_fingerprint": "the corpus's rows (ids or tokens) are not "
                                "those the store was encoded from: was the "
                                "corpus edited in place?"}

_STR, _INT = ((str,), "a string"), ((int,), "an integer")
# The JSON types of a manifest file's fields (``Manifest.from_dict``), so that
# a damaged file is an InputError naming the field, not a TypeError later.
# ``layout`` is opaque; ``factored``'s weight names and the values' ranges are
# ``_validate``'s.
_FIELD_TYPES = {
    "checkpoint": _STR, "step": _INT, "params_fingerprint": _STR,
    "correction": _STR, "epsilon": ((int, float), "a number"),
    "projection_seed": _INT, "dim": _INT,
    "basis_fingerprint": ((str, type(None)), "a string or null"),
    "kernel": _STR, "format": _STR, "dtype": _STR, "corpus": _STR,
    "num_rows": _INT, "corpus_fingerprint": _STR, "chunk_rows": _INT,
    "corpus_rows": _STR,
    "quantization": ((dict,), "an object"), "encode_config": ((dict,), "an object"),
    "tracer_version": _STR}


@dataclasses.dataclass(frozen=True)
class Manifest:
  """What makes a set of encodings comparable, and how they are stored.

  Attributes:
    checkpoint: path of the model checkpoint the gradients were taken at.
    step: training step of that checkpoint.
    params_fingerprint: ``fingerprint(params)``.
    correction: optimizer second-moment correction, e.g. "adam", "adafactor",
      "none".
    epsilon: the epsilon added to sqrt(V).
    projection_seed: seed of the random projections.
    layout: JSON-able description of the projection blocks (opaque here).
    dim: encoding dimension d.
    basis_fingerprint: ``fingerprint`` of the basis the rows are in (R_train's
      eigenbasis, ``tracer.hessian.Basis``), or None (the projections as is).
    kernel: "exact" (projections of the exact corrected gradients, by either
      encoder kernel) or "rank_one_correction" (the factored kernel with
      Adam's correction approximated: ``tracer.factored``).
    format: the store format (``FORMAT``).
    dtype: storage dtype, "bfloat16", "float32" or "int8" (``quantize``).
    corpus: where the rows came from (a source string; a local path made
      absolute, ``data.absolute_source``).
    num_rows: N.
    corpus_fingerprint: ``data.RowsFingerprint`` of the corpus's rows (ids,
      window indices, tokens, in order), so that a corpus edited in place
      is refused; compared when both sides have one ("" in older stores).
    chunk_rows: rows per stored chunk.
    corpus_rows: the tokenized corpus (``tracer.corpus``) the rows were read
      from, if they were: where to reopen them row by row (``tracer serve``),
      not the source read whole; informative, never compared (the same
      rows read from ``corpus`` itself are the same store).
    quantization: how an int8 store's rows were quantized: the sha256 of
      its column scales (``create_or_open``); empty for other dtypes.
    encode_config: the ``EncodeConfig`` settings the rows were encoded with
      (``tracer.config.ENCODING_SETTINGS``); informative (the fields above
      are what is compared), it tells a later run how to encode for this
      store: ``tracer serve``, ``scan``, ``trace`` and ``encode`` take them.
      Empty in older stores.
    factored: the weights the factored encoder kernel projected, as its
      verification found them (``GradientEncoder.factored_weights``), so that
      later runs encode as the rows were without verifying again; None with
      the exact kernel and in older stores. Informative: both kernels give
      the same encodings.
    tracer_version: version of tracer that wrote the encodings (informative).
  """
  checkpoint: str
  step: int
  params_fingerprint: str
  correction: str
  epsilon: float
  projection_seed: int
  layout: Any
  dim: int
  basis_fingerprint: str | None
  kernel: str = "exact"
  format: str = FORMAT
  dtype: str = "bfloat16"
  corpus: str = ""
  num_rows: int = 0
  corpus_fingerprint: str = ""
  chunk_rows: int = 1024
  corpus_rows: str = ""
  quantization: dict = dataclasses.field(default_factory=dict)
  encode_config: dict = dataclasses.field(default_factory=dict)
  factored: list | None = None
  tracer_version: str = dataclasses.field(default_factory=_tracer_version)

  def to_dict(self) -> dict[str, Any]:
    # A JSON round trip makes tuples lists, so in-memory and loaded manifests
    # compare equal.
    return json.loads(json.dumps(dataclasses.asdict(self), sort_keys=True))

  @classmethod
  def from_dict(cls, d: dict[str, Any], where: str = MANIFEST) -> Manifest:
    names = {f.name for f in dataclasses.fields(cls)}
    if "preconditioner_fingerprint" in d and "format" not in d:
      raise InputError(f"{where}: a store of an earlier format (its rows carry one "
                       f"query set's preconditioner); encode the corpus again")
    # The format first: another kind of tracer directory's manifest (a
    # tokenized corpus's, before 2026-12-06 "unknown field(s) ['chunks_stored',
    # ...]") is named as such, not by the fields it has.
    if "format" in d and d["format"] != FORMAT:
      _check_format(d["format"], where)
    unknown = sorted(set(d) - names)
    if unknown:
      raise InputError(f"{where}: unknown field(s) {unknown}")
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING}
    # (format has a default for Manifests made in code; a file has it always)
    missing = sorted((required | {"format"}) - set(d))
    if missing:
      raise InputError(f"{where}: missing field(s) {missing}")
    storage.check_json_types(where, d, _FIELD_TYPES, _brief)
    return cls(**d)

  def check_compatible(self, expected: Manifest,
                       fields: Sequence[str] | None = None, *,
                       where: str = "store", other: str = "query") -> None:
    """Raises IncompatibleStoreError listing every field that differs.

    Args:
      expected: the manifest the caller needs.
      fields: names to compare; default all of them.
      where: names the store in the message (e.g. its manifest path).
      other: names the expected side in the message.
    """
    fields = [f.name for f in dataclasses.fields(self)] if fields is None else fields
    mine, theirs = self.to_dict(), expected.to_dict()
    # A corpus moved or copied elsewhere is the same corpus when both sides
    # fingerprint its rows alike (ids, windows and tokens).
    moved = (mine["corpus_fingerprint"] and "corpus_fingerprint" in fields
             and mine["corpus_fingerprint"] == theirs["corpus_fingerprint"])
    same = lambda name: ((name == "corpus" and moved)
                         or _SAME.get(name, operator.eq)(mine[name], theirs[name]))
    diffs = [f"field {name!r}" + (f" ({_MEANS[name]})" if name in _MEANS else "")
             + f": store has {_brief(mine[name])}, {other} has {_brief(theirs[name])}"
             for name in fields if not same(name)]
    if diffs:
      raise IncompatibleStoreError(
          f"{where}: encodings are not comparable: " + "; ".join(diffs))


def _brief(value: Any, most: int = 80) -> str:
  """A manifest value for an error line: long ones (a layout) shortened to
  their start and a fingerprint, so two different ones still read apart."""
  text = repr(value)
  if len(text) <= most:
    return text
  digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
  return f"{text[:most - 30]}... (sha256 {digest[:12]})"


def fingerprint(tree: Any, length: int = 16) -> str:
  """Short hex fingerprint of a pytree's leaves (paths, dtypes, shapes, bits).

  Each leaf is reduced to two 32-bit checksums of its bits where it lives
  (``leaf_checksums``), so a params tree sharded over hosts is fingerprinted
  without gathering it, and the result does not depend on the sharding. Leaves
  are visited in ``jax.tree`` order (dict keys sorted), so it is stable across
  runs and hosts. Not cryptographic: it tells whether two trees differ.
  """
  h = hashlib.sha256()
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  for path, leaf in leaves:
    dtype = np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"|{dtype.newbyteorder('<').str}|{tuple(np.shape(leaf))}|".encode())
    h.update(np.asarray(leaf_checksums(leaf), "<u4").tobytes())
  return h.hexdigest()[:length]


def _fmix32(x, xp):
  """murmur3's 32-bit finalizer: spreads every input bit over the output."""
  x = x ^ (x >> 16)
  x = x * xp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * xp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _checksums(words, xp):
  """Two wrapping uint32 sums of mixed (word, position) pairs.

  Wrapping integer sums are associative and commutative, so any split of the
  words over devices, summed in any order, gives the same two numbers.
  """
  index = xp.arange(words.size, dtype=xp.uint32).reshape(words.shape)
  a = xp.sum(_fmix32(words ^ (index * xp.uint32(0x9E3779B9)), xp), dtype=xp.uint32)
  b = xp.sum(_fmix32(words + index * xp.uint32(0x27D4EB2F) + xp.uint32(0x165667B1),
                     xp), dtype=xp.uint32)
  return a, b


def _words(x, xp, bitcast):
  """A leaf's bits as uint32 words (one per element up to 32 bits, two for 64)."""
  itemsize = np.dtype(x.dtype).itemsize
  if x.dtype == bool:
    return x.astype(xp.uint32)
  unsigned = {1: xp.uint8, 2: xp.uint16, 4: xp.uint32}
  if itemsize in unsigned:
    return bitcast(x, unsigned[itemsize]).astype(xp.uint32)
  return bitcast(x, xp.uint32)  # 8 bytes: a trailing axis of two words


@jax.jit
def _device_checksums(x):
  return _checksums(_words(x, jnp, jax.lax.bitcast_convert_type).ravel(), jnp)


def leaf_checksums(leaf) -> tuple[int, int]:
  """``_checksums`` of one leaf's bits: on its devices for a ``jax.Array``
  (fully replicated result, read on this host), in numpy otherwise."""
  if isinstance(leaf, jax.Array):
    a, b = _device_checksums(leaf)
    return int(np.asarray(a.addressable_data(0))), int(np.asarray(b.addressable_data(0)))
  x = np.ascontiguousarray(np.asarray(leaf))
  words = _words(x.astype(x.dtype.newbyteorder("<"), copy=False), np,
                 lambda v, t: v.view(t)).ravel()
  with np.errstate(over="ignore"):
    a, b = _checksums(words, np)
  return int(a), int(b)


def _array_spec(path: str, manifest: Manifest) -> dict[str, Any]:
  return _zarr_spec(storage.join(path, ARRAY_DIR), manifest.dtype,
                    [manifest.num_rows, manifest.dim],
                    [manifest.chunk_rows, manifest.dim])


def _scales_spec(path: str, manifest: Manifest) -> dict[str, Any]:
  return _zarr_spec(storage.join(path, SCALES_DIR), "float32",
                    [manifest.num_rows], [manifest.chunk_rows])


def stored_rows(x: np.ndarray, dtype: str, column_scales: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray | None]:
  """Rows ``x [r, d]`` as a store of ``dtype`` holds them: C-ordered in that
  dtype (``x`` itself if it is so already), and for int8 each row's f32
  scale (``quantize`` of ``x / column_scales``; default ones), else None.
  bf16 rounds to nearest even (``ml_dtypes``): the same input always gives
  the same bytes."""
  if dtype != "int8":
    return np.ascontiguousarray(x, DTYPES[dtype]), None
  x = np.asarray(x, np.float32)
  return quantize(x if column_scales is None else x / column_scales)


def stored_values(rows: np.ndarray, scale: np.ndarray | None = None,
                  column_scales: np.ndarray | None = None) -> np.ndarray:
  """float32 values of rows as stored (``stored_rows``'s outputs)."""
  out = np.asarray(rows, np.float32)
  if scale is not None:
    out = out * np.asarray(scale, np.float32)[:, None]
  return out if column_scales is None else out * column_scales


def _zarr_spec(where: str, dtype: str, shape: list[int], chunk: list[int]
               ) -> dict[str, Any]:
  return {
      "driver": "zarr3",
      "kvstore": storage.kvstore_spec(where),
      "metadata": {
          "shape": shape,
          "data_type": dtype,
          "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
          "chunk_key_encoding": {"name": "default"},
          # Uncompressed: projected gradients barely compress and the scan is
          # read-bound, so decompression would only cost time.
          "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
          "fill_value": 0,
      },
  }


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Rows ``x [r, d]`` as int8 ``[r, d]`` and an f32 scale per row ``[r]``:
  ``x ~ q * scale``, symmetric, ``scale = max|x_i| / 127`` (a zero row: all
  zeros, scale 0). Deterministic (numpy's f32 arithmetic, ties to even).

  Each element is off by at most half its row's scale. An int8 store
  quantizes its rows divided by its column scales (``create_or_open``), so
  that the error is spread evenly over the directions the metric weighs.
  The scan never needs a row's scale: every store scan divides a row's
  scores by its norm under the query set's metric (``topk.RowMetric``), in
  which the scale cancels exactly, so the int8 values are scored as they are.
  """
  x = np.asarray(x, np.float32)
  peak = np.max(np.abs(x), axis=1, initial=0)
  scale = (peak / np.float32(127)).astype(np.float32)
  safe = np.where(scale > 0, scale, np.float32(1))
  q = np.clip(np.rint(x / safe[:, None]), -127, 127).astype(np.int8)
  return q, scale


def _check_format(value: Any, where: str) -> None:
  """InputError unless ``value``, a manifest's format, is ``FORMAT``; a
  tokenized corpus's is named as one (as ``corpus.read_manifest`` names a
  store's)."""
  if value == FORMAT:
    return
  if value == corpus_lib.FORMAT:
    raise InputError(f"{where}: a tokenized corpus, not a store (expected "
                     f"format {FORMAT!r}, got {value!r}); pass it as --corpus, "
                     "and as --store a directory tracer encode or trace wrote")
  raise InputError(f"{where}: field 'format' must be {FORMAT!r} (the store "
                   f"format this tracer reads), got {_brief(value)}")


def _validate(manifest: Manifest, where: str) -> None:
  _check_format(manifest.format, where)
  if not (math.isfinite(manifest.epsilon) and manifest.epsilon >= 0):
    raise InputError(f"{where}: field 'epsilon' must be a finite number >= 0, "
                     f"got {manifest.epsilon!r}")
  if manifest.dtype not in DTYPES:
    raise InputError(f"{where}: field 'dtype' must be one of {sorted(DTYPES)}, "
                     f"got {manifest.dtype!r}")
  for name in ("dim", "chunk_rows"):
    if int(getattr(manifest, name)) < 1:
      raise InputError(f"{where}: field {name!r} must be >= 1, "
                       f"got {getattr(manifest, name)!r}")
  if int(manifest.num_rows) < 0:
    raise InputError(f"{where}: field 'num_rows' must be >= 0, "
                     f"got {manifest.num_rows!r}")
  for name in ("num_rows", "dim", "chunk_rows"):
    if int(getattr(manifest, name)) > MAX_EXTENT:
      raise InputError(f"{where}: field {name!r} must be at most {MAX_EXTENT} "
                       f"(2**62 - 2, the largest array extent), got "
                       f"{getattr(manifest, name)!r}")
  if manifest.factored is not None and not (
      isinstance(manifest.factored, list)
      and all(isinstance(w, str) for w in manifest.factored)):
    raise InputError(f"{where}: field 'factored' must be a list of weight names "
                     f"or null, got {_brief(manifest.factored)}")


class _ChunkRead:
  """A read of one chunk's rows; ``result()`` names the chunk if it fails
  (e.g. a truncated chunk file)."""

  def __init__(self, future: ts.Future, store: EncodingStore, chunk: int):
    self.future, self.store, self.chunk = future, store, chunk

  def result(self):
    try:
      return self.future.result()
    except ValueError as e:
      lo, hi = self.store.chunk_bounds(self.chunk)
      raise CorruptStoreError(
          f"{self.store.chunk_file(self.chunk)}: chunk {self.chunk} (rows "
          f"{lo}..{hi}) of store {self.store.path} cannot be read: "
          f"{_one_line(e)}") from None


try:  # The same CRC-32 as zlib's, with SIMD (about 20 GB/s here, zlib's 2-4).
  from zlib_ng.zlib_ng import crc32 as _crc32_bytes  # pylint: disable=g-import-not-at-top
except ImportError:
  try:
    from isal.isal_zlib import crc32 as _crc32_bytes  # pylint: disable=g-import-not-at-top
  except ImportError:
    _crc32_bytes = zlib.crc32


def _crc32(x: np.ndarray) -> int:
  """CRC-32 of an array's bytes as stored (little-endian, C order)."""
  return _crc32_bytes(np.ascontiguousarray(x).reshape(-1).view(np.uint8))


def _one_line(e: Exception) -> str:
  return " ".join(str(e).split())


def _parse_marker(data: bytes, where: str, bounds: tuple[int, int]
                  ) -> dict[str, Any]:
  """A chunk marker's record; CorruptStoreError naming ``where`` unless it
  is one as ``write_chunk`` writes them, its quarantined rows within the
  chunk's ``bounds`` ``[start, stop)``."""
  if not data:
    return {}  # an earlier format's marker: done, no checksum
  try:
    record = json.loads(data.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CorruptStoreError(f"{where}: not a chunk marker ({e})") from None
  if not isinstance(record, dict) or not isinstance(record.get("crc32"), int):
    raise CorruptStoreError(f"{where}: not a chunk marker (no 'crc32')")
  if not isinstance(record.get("scales_crc32", 0), int):
    raise CorruptStoreError(f"{where}: field 'scales_crc32' must be an integer")
  if record.get("rows", list(bounds)) != list(bounds):
    # (a marker edited, or copied from another chunk or store)
    raise CorruptStoreError(f"{where}: field 'rows' is {_brief(record['rows'])}, "
                            f"but the chunk holds rows {list(bounds)}")
  quarantined = record.get("quarantined", {})
  # (a row outside the chunk would never be returned by a scan, silently)
  if not isinstance(quarantined, dict) or not all(
      isinstance(r, str) and r.isascii() and r.isdigit()
      and bounds[0] <= int(r) < bounds[1] and isinstance(why, str)
      for r, why in quarantined.items()):
    raise CorruptStoreError(
        f"{where}: field 'quarantined' must map rows of the chunk "
        f"[{bounds[0]}, {bounds[1]}) to reasons, got {_brief(quarantined)}")
  return record


def _mismatch(record: dict[str, Any], rows: np.ndarray) -> str | None:
  """Why ``rows`` (a whole chunk as read) disagree with its marker, or None."""
  if "crc32" not in record:
    return None  # nothing recorded to check against
  got = _crc32(rows)
  if got != record["crc32"]:
    return (f"checksum mismatch (crc32 {got:08x}, its marker records "
            f"{record['crc32']:08x})")
  return None


def read_manifest(path: str) -> Manifest:
  """The manifest of the store at ``path`` (its array not opened)."""
  where = storage.join(storage.normalize(path), MANIFEST)
  manifest = Manifest.from_dict(storage.read_json(where), where)
  _validate(manifest, where)
  return manifest


class EncodingStore:
  """A handle on a store directory. Use ``create_or_open`` or ``open_store``."""

  def __init__(self, path: str, manifest: Manifest, array: ts.TensorStore,
               scales: ts.TensorStore | None = None,
               column_scales: np.ndarray | None = None):
    self.path = path
    self.manifest = manifest
    self.array = array
    # int8 stores: each row's scale (``quantize``), and the f32 [d] scales
    # its rows were divided by before (``create_or_open``).
    self.scales = scales
    self.column_scales = column_scales
    self._progress_kv = None

  @property
  def num_rows(self) -> int:
    return self.manifest.num_rows

  @property
  def dim(self) -> int:
    return self.manifest.dim

  @property
  def chunk_rows(self) -> int:
    return self.manifest.chunk_rows

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(DTYPES[self.manifest.dtype])

  @property
  def num_chunks(self) -> int:
    return math.ceil(self.num_rows / self.chunk_rows)

  def chunk_bounds(self, chunk: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a chunk."""
    if not 0 <= chunk < self.num_chunks:
      raise InputError(f"{self.path}: chunk {chunk} out of range "
                       f"[0, {self.num_chunks})")
    start = chunk * self.chunk_rows
    return start, min(start + self.chunk_rows, self.num_rows)

  def _marker(self, chunk: int) -> str:
    return storage.join(self.path, PROGRESS_DIR, f"{chunk:09d}.done")

  def chunk_record(self, chunk: int) -> dict[str, Any] | None:
    """What chunk ``chunk``'s marker records (``write_chunk``), or None if
    the chunk is not marked done. A marker of an earlier format (empty)
    gives ``{}``: done, without a checksum."""
    data = storage.read_bytes(self._marker(chunk))
    return None if data is None else _parse_marker(
        data, self._marker(chunk), self.chunk_bounds(chunk))

  def chunk_file(self, chunk: int) -> str:
    """The location of a chunk's bytes (zarr3's default chunk key)."""
    return storage.join(self.path, ARRAY_DIR, "c", str(chunk), "0")

  def _scales_file(self, chunk: int) -> str:
    return storage.join(self.path, SCALES_DIR, "c", str(chunk))

  def done_chunks(self) -> set[int]:
    names = storage.list_dir(storage.join(self.path, PROGRESS_DIR))
    # (ASCII digits only: str.isdigit() also takes '²', which int() refuses,
    # so a stray '².done' made every read of the progress a ValueError; it
    # is ignored, as other names are)
    return {int(n[:-5]) for n in names if n.endswith(".done")
            and n[:-5].isascii() and n[:-5].isdigit()}

  def stray_markers(self) -> dict[int, str]:
    """``{chunk: marker}`` of done markers past the last chunk (copied from
    a larger store's files): never read; ``tracer verify`` reports them."""
    return {c: self._marker(c) for c in sorted(self.done_chunks())
            if c >= self.num_chunks}

  def pending_chunks(self) -> list[int]:
    """Chunks without a done marker, in order."""
    done = self.done_chunks()
    return [c for c in range(self.num_chunks) if c not in done]

  def is_complete(self) -> bool:
    return len(self.done_chunks() & set(range(self.num_chunks))) == self.num_chunks

  def write_chunk(self, chunk: int, encodings: np.ndarray,
                  quarantined: dict[int, str] | None = None) -> None:
    """Writes rows of ``chunk`` (``[rows_in_chunk, d]``, any float dtype), then
    marks it done, recording the checksum of its stored bytes (and of its
    rows' scales in an int8 store) and the rows ``quarantined`` (``{row:
    reason}``, global row ids; their rows are zero and the scan never
    returns them). A row that is not finite is quarantined as well
    ("non-finite encoding").

    Conversion to bf16 rounds to nearest even (``ml_dtypes``), to int8 as
    ``quantize`` says, so the same float32 input always gives the same bytes.
    """
    start, stop = self.chunk_bounds(chunk)
    x = np.asarray(jax.device_get(encodings))
    if x.shape != (stop - start, self.dim):
      raise InputError(
          f"{self.path}: chunk {chunk}: encodings have shape {x.shape}, "
          f"expected {(stop - start, self.dim)} (rows {start}..{stop})")
    quarantined = {int(r): str(why) for r, why in (quarantined or {}).items()}
    outside = [r for r in quarantined if not start <= r < stop]
    if outside:
      raise InputError(f"{self.path}: chunk {chunk}: quarantined rows {outside[:5]} "
                       f"are not in its rows [{start}, {stop})")
    # A row the caller left non-finite is quarantined too: int8 would store
    # it as zeros (a NaN peak), which the scan ranks, where bf16 and f32 keep
    # the NaN, which it never does.
    for r in np.flatnonzero(~np.isfinite(x).all(axis=1)):
      quarantined.setdefault(start + int(r), "non-finite encoding")
    if quarantined:  # zero before quantizing: their values may be NaN
      x = x.copy()
      x[[r - start for r in quarantined]] = 0
    x, scale = stored_rows(x, self.manifest.dtype, self.column_scales)
    record = {"rows": [start, stop]}
    parts = [(self.chunk_file(chunk), self.array, x)]
    if scale is not None:
      parts.append((self._scales_file(chunk), self.scales, scale))
      record["scales_crc32"] = _crc32(scale)
    for where, array, values in parts:
      with storage.writing(where):
        if stop - start < self.chunk_rows:
          # The last chunk is only partly inside the array, so tensorstore
          # merges it with the stored one; a damaged one would fail that read.
          storage.delete(where)
        array[start:stop].write(values).result()
    crashpoints.point("chunk.data")
    # The marker goes last: a chunk without one is rewritten whole on resume.
    # Its bytes depend only on the rows, so a rerun writes the same marker.
    record.update(crc32=_crc32(x), quarantined={
        str(r): quarantined[r] for r in sorted(quarantined)})
    storage.write_text(self._marker(chunk), json.dumps(record, sort_keys=True))
    crashpoints.point("chunk.marked")

  def verify_chunk(self, chunk: int) -> str | None:
    """Why chunk ``chunk`` is bad ("not written", "unreadable: ...",
    "checksum mismatch ...", "its file ... is missing ..."), or None if its
    bytes match its marker. Reads it."""
    return self.check_chunk(chunk)[0]

  def check_chunk(self, chunk: int) -> tuple[str | None, bool]:
    """``(verify_chunk(chunk), checked)``: ``checked`` is False where a good
    chunk's marker, of an earlier format, records no checksum (only that the
    chunk was written and reads back is known)."""
    try:
      record = self.chunk_record(chunk)
    except CorruptStoreError as e:
      # Reported as the chunk's damage, so --repair unmarks it and the next
      # encode rewrites it and its marker (raised, nothing could mend it).
      return f"damaged marker: {e}", True
    if record is None:
      return "not written", True
    start, stop = self.chunk_bounds(chunk)
    try:
      x = self.read_async(start, stop).result()
      scale = None if self.scales is None else self.scales[start:stop].read().result()
    except ValueError as e:
      return f"unreadable: {_one_line(e)}", True
    why = _mismatch(record, np.asarray(x))
    if why is None and scale is not None and "scales_crc32" in record:
      why = _mismatch({"crc32": record["scales_crc32"]}, np.asarray(scale))
      why = why and f"its scales {self._scales_file(chunk)}: {why}"
    return why and self._missing_file(chunk, why), "crc32" in record

  def _missing_file(self, chunk: int, why: str) -> str:
    """``why`` led by the chunk's missing file, if one is: tensorstore reads
    a missing chunk as zeros, so its checksum alone would not say so. (An
    all-zero chunk is never stored: missing is not by itself damage.)"""
    files = [self.chunk_file(chunk)]
    if self.scales is not None:
      files.append(self._scales_file(chunk))
    missing = [f for f in files if not storage.exists(f)]
    if not missing:
      return why
    return f"its file {missing[0]} is missing (read back as zeros: {why})"

  def check_read(self, start: int, stop: int,
                 rows: np.ndarray | Sequence[np.ndarray],
                 records: dict[int, dict[str, Any]]) -> None:
    """Checks rows ``[start, stop)`` as read (``rows``, or consecutive arrays
    holding them from ``start`` on) against the markers ``records`` of every
    chunk they cover whole; raises CorruptStoreError naming the first bad
    chunk."""
    pieces = [rows] if isinstance(rows, np.ndarray) else list(rows)
    firsts = np.cumsum([start] + [len(p) for p in pieces])

    def rows_of(lo, hi):
      i = int(np.searchsorted(firsts, lo, side="right")) - 1
      if hi <= firsts[i + 1]:
        return pieces[i][lo - firsts[i]:hi - firsts[i]]
      return np.concatenate(pieces)[lo - start:hi - start]  # spans pieces

    for chunk, record in records.items():
      lo, hi = self.chunk_bounds(chunk)
      if start <= lo and hi <= stop:
        why = _mismatch(record, rows_of(lo, hi))
        if why:
          why = self._missing_file(chunk, why)
          raise CorruptStoreError(
              f"{self.chunk_file(chunk)}: chunk {chunk} (rows {lo}..{hi}) of "
              f"store {self.path}: {why}; run `tracer verify "
              f"--store={self.path} --repair` and encode again to rewrite it")

  def chunk_records_later(self, start: int, stop: int
                          ) -> Callable[[], dict[int, dict[str, Any]]]:
    """Starts reading the markers of the chunks overlapping rows
    ``[start, stop)`` (a local store's when asked); the returned function
    waits and gives ``{chunk: record}`` (CorruptStoreError for a chunk
    without one)."""
    first, last = start // self.chunk_rows, -(-stop // self.chunk_rows)
    chunks = range(first, min(last, self.num_chunks))
    if self.local:
      # Small local files: read when asked (a tensorstore read costs ~1 ms
      # of Python each; the scan asks for several per step).
      return lambda: self._local_records(chunks)
    if self._progress_kv is None:
      self._progress_kv = ts.KvStore.open(
          storage.kvstore_spec(storage.join(self.path, PROGRESS_DIR)),
          context=storage.CONTEXT).result()
    futures = {c: self._progress_kv.read(f"{c:09d}.done") for c in chunks}

    def records():
      out = {}
      for c, f in futures.items():
        r = f.result()
        if r.state == "missing":
          raise CorruptStoreError(f"{self._marker(c)}: chunk {c} of store "
                                  f"{self.path} has no marker (not written)")
        out[c] = _parse_marker(bytes(r.value), self._marker(c), self.chunk_bounds(c))
      return out
    return records

  def _local_records(self, chunks: Sequence[int]) -> dict[int, dict[str, Any]]:
    out = {}
    for c in chunks:
      path = storage.local_path(self._marker(c))
      try:
        with open(path, "rb") as f:
          data = f.read()
      except FileNotFoundError:
        raise CorruptStoreError(f"{self._marker(c)}: chunk {c} of store "
                                f"{self.path} has no marker (not written)") from None
      out[c] = _parse_marker(data, self._marker(c), self.chunk_bounds(c))
    return out

  def quarantined(self, chunks: Sequence[int] | None = None) -> dict[int, str]:
    """``{row: reason}`` of the rows quarantined in ``chunks`` (default all
    written chunks; reads their markers)."""
    chunks = sorted(self.done_chunks()) if chunks is None else chunks
    out = {}
    for c in chunks:
      record = self.chunk_record(c) or {}
      out.update({int(r): why for r, why in record.get("quarantined", {}).items()})
    return out

  def attachment(self, name: str) -> bytes | None:
    """A file written with the store (``create_or_open``), or None."""
    return storage.read_bytes(storage.join(self.path, name))

  def unmark(self, chunk: int) -> None:
    """Removes a chunk's done marker, so the next encode rewrites it."""
    self.chunk_bounds(chunk)
    storage.delete(self._marker(chunk))

  def read_async(self, start: int, stop: int) -> ts.Future:
    """A future of rows ``[start, stop)`` in the stored dtype."""
    return self.array[start:stop].read()

  @property
  def local(self) -> bool:
    """Whether chunk files are local files, read without tensorstore
    (``read_into``, ``chunk_view``): the array's format is fixed
    (``_array_spec``: uncompressed little-endian C-order chunks, each stored
    whole), so a chunk file's bytes are its rows."""
    return (sys.byteorder == "little"
            and storage.local_path(self.path) is not None)

  def _open_chunk(self, chunk: int) -> int | None:
    """A read-only descriptor of a local chunk file, or None if it does not
    exist (tensorstore then reads the fill value, 0: a chunk of zeros is not
    stored). Raises CorruptStoreError if its size is not a whole chunk's."""
    path = storage.local_path(self.chunk_file(chunk))
    try:
      fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
      return None
    size = os.fstat(fd).st_size
    want = self.chunk_rows * self.dim * self.dtype.itemsize
    if size != want:
      os.close(fd)
      lo, hi = self.chunk_bounds(chunk)
      raise CorruptStoreError(
          f"{self.chunk_file(chunk)}: chunk {chunk} (rows {lo}..{hi}) of store "
          f"{self.path} cannot be read: the file has {size} bytes, a chunk "
          f"has {want}")
    return fd

  def chunk_view(self, chunk: int) -> np.ndarray:
    """All ``chunk_rows`` rows of a local chunk (rows past N included, as
    stored) ``[chunk_rows, d]``, read-only, without a copy: the file mapped
    from the page cache, page-aligned (a CPU device uses it in place).

    The mapping lives as long as the array; a file truncated meanwhile
    would fault (SIGBUS) on access: stores are not rewritten while scanned.
    """
    fd = self._open_chunk(chunk)
    if fd is None:
      zeros = np.zeros((self.chunk_rows, self.dim), self.dtype)
      zeros.flags.writeable = False
      return zeros
    try:
      m = mmap.mmap(fd, 0, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                    prot=mmap.PROT_READ)
    finally:
      os.close(fd)
    return np.frombuffer(m, self.dtype).reshape(self.chunk_rows, self.dim)

  def read_into(self, start: int, stop: int, out: np.ndarray) -> list[ts.Future]:
    """Starts reading rows ``[start, stop)`` into ``out`` (writable, C order,
    stored dtype, ``[stop - start, d]``); wait on the returned futures.

    Reads go straight into ``out`` (no intermediate array): local chunk
    files with one ``preadv`` each (done on return; tensorstore's read path
    copies twice, 2.5x slower here), other locations one tensorstore
    request per stored chunk, so they proceed in parallel.
    """
    if not 0 <= start <= stop <= self.num_rows:
      raise InputError(f"{self.path}: rows [{start}, {stop}) out of range "
                       f"[0, {self.num_rows}]")
    if out.shape != (stop - start, self.dim) or out.dtype != self.dtype:
      raise InputError(f"{self.path}: read_into needs a {(stop - start, self.dim)} "
                       f"{self.dtype} array, got {out.shape} {out.dtype}")
    futures = []
    lo = start
    while lo < stop:
      chunk = lo // self.chunk_rows
      hi = min(stop, (chunk + 1) * self.chunk_rows)
      if self.local and out.flags.c_contiguous:
        self._pread(chunk, lo, out[lo - start:hi - start])
      else:
        target = ts.array(out[lo - start:hi - start], copy=False, write=True)
        futures.append(_ChunkRead(target.write(self.array[lo:hi].translate_to[0]),
                                  self, chunk))
      lo = hi
    return futures

  def _pread(self, chunk: int, lo: int, out: np.ndarray) -> None:
    """Rows ``lo..lo + len(out)`` of local chunk ``chunk`` into ``out``."""
    fd = self._open_chunk(chunk)
    if fd is None:
      out[...] = 0
      return
    row_bytes = self.dim * self.dtype.itemsize
    view = memoryview(out.reshape(-1).view(np.uint8))
    offset = (lo - chunk * self.chunk_rows) * row_bytes
    try:
      while len(view):
        n = os.preadv(fd, [view], offset)
        if n == 0:  # the file shrank since its size was checked
          raise CorruptStoreError(f"{self.chunk_file(chunk)}: chunk {chunk} of "
                                  f"store {self.path} cannot be read: truncated")
        view, offset = view[n:], offset + n
    finally:
      os.close(fd)

  def read_rows(self, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` as float32 ``[stop - start, d]`` (an int8
    store's times their scales)."""
    if not 0 <= start <= stop <= self.num_rows:
      raise InputError(f"{self.path}: rows [{start}, {stop}) out of range "
                       f"[0, {self.num_rows}]")
    # Through read_into: a chunk that cannot be read is named (before
    # 2026-12-07 tensorstore's ValueError, a traceback).
    rows = np.empty((stop - start, self.dim), self.dtype)
    for future in self.read_into(start, stop, rows):
      future.result()
    scale = None if self.scales is None else self.scales[start:stop].read().result()
    return stored_values(rows, scale, self.column_scales)

  def stored_queries(self, queries: np.ndarray) -> np.ndarray:
    """Queries ``f32[Q, d]`` against the rows as stored: an int8 store's rows
    are ``x / column_scales`` (times a row's scale, which a normalized
    score drops), so ``q . x = (q * column_scales) . stored``."""
    if self.column_scales is None:
      return queries
    return (np.asarray(queries, np.float32) * self.column_scales).astype(np.float32)

  def stored_metric(self, metric):
    """A metric (``topk.RowMetric`` or ``hessian.QueryMetric``; None: None) as
    a ``RowMetric`` of the rows as stored (``stored_queries``): with ``D =
    diag(column_scales)``, ``x^T M x = stored^T (D M D) stored``."""
    if metric is None or self.column_scales is None:
      return metric
    scales = self.column_scales.astype(np.float64)
    return topk.RowMetric(
        (np.asarray(metric.diag, np.float64) * scales ** 2).astype(np.float32),
        tuple((np.asarray(c, np.float64) * scales[lo:hi, None]).astype(np.float32)
              for (lo, hi), c in zip(metric.segments, metric.lowrank)),
        tuple(metric.segments))

  def check_complete(self) -> None:
    """Raises InputError naming the missing chunks if not every chunk is done."""
    missing = sorted(set(range(self.num_chunks)) - self.done_chunks())
    if missing:
      raise InputError(
          f"{self.path}: store is incomplete: {len(missing)} of "
          f"{self.num_chunks} chunks not written (first: {missing[:5]}); "
          "finish encoding before scanning")

  def __repr__(self) -> str:
    return (f"EncodingStore({self.path!r}, rows={self.num_rows}, dim={self.dim}, "
            f"dtype={self.manifest.dtype})")


def check_creatable(path: str | os.PathLike[str], attachments: Iterable[str] = ()
                    ) -> list[str]:
  """The names under ``path`` (no manifest there), where a store can be
  created: nothing, or what an unfinished creation leaves (its arrays,
  progress marks, claim, ``attachments`` by name). Else InputError: called
  before a new store's costly inputs are made (its basis, fitted from the
  corpus), not only when it is created."""
  path = storage.normalize(path)
  local = storage.local_path(path)
  if local is not None and os.path.exists(local) and not os.path.isdir(local):
    raise InputError(f"{path}: exists and is not a directory")
  names = storage.list_dir(path)
  strangers = sorted({n.split("/", 1)[0] for n in names}
                     - {ARRAY_DIR, SCALES_DIR, PROGRESS_DIR, CLAIM_FILE,
                        COLUMN_SCALES, *attachments})
  if strangers:
    raise InputError(f"{path}: not an encoding store (no {MANIFEST}) and not "
                     f"empty: {strangers[:5]}")
  return names


def create_or_open(path: str | os.PathLike[str], manifest: Manifest,
                   attachments: dict[str, bytes] | None = None,
                   column_scales: np.ndarray | None = None,
                   other_attachments: Sequence[str] = ()) -> EncodingStore:
  """Creates a store, or opens an existing one with the same manifest to resume.

  ``attachments`` (name -> bytes) are written with a new store, before its
  manifest. The manifest is written last (one atomic write), so a location
  with a manifest always holds a created array and its attachments. A location
  without one is a creation that never finished and is reset, its
  attachments too (those of ``other_attachments`` this run does not write:
  names the caller's other settings attach). With several
  hosts, call this on process 0 first, synchronize, then on the others.

  ``column_scales`` (int8 stores; positive f32 ``[d]``, default ones): rows
  are divided by them before ``quantize``, so that a column the scan's
  metric weighs up (a small one, whitened) is not rounded away; the
  pipeline passes R_train's spread along each coordinate of its basis
  (``hessian.Basis.column_scales``). They are kept in ``COLUMN_SCALES``,
  their sha256 in the manifest's ``quantization``.

  Raises:
    IncompatibleStoreError: ``path`` holds a store with a different manifest.
  """
  path = storage.normalize(path)
  _validate(manifest, storage.join(path, MANIFEST))
  attachments = dict(attachments or {})
  if manifest.dtype == "int8":
    data = _column_scales_bytes(column_scales, manifest.dim)
    attachments[COLUMN_SCALES] = data
    manifest = dataclasses.replace(manifest, quantization={
        "column_scales_sha256": hashlib.sha256(data).hexdigest()[:16]})
  elif column_scales is not None:
    raise InputError(f"{path}: column scales are for int8 stores; this one "
                     f"stores {manifest.dtype}")
  if storage.exists(storage.join(path, MANIFEST)):
    store = open_store(path)
    # What the rows are and how they are stored; not the informative fields
    # (the checkpoint's path, tracer's version, the encode config's batch
    # sizes): a moved checkpoint or an upgrade resumes the same store.
    store.manifest.check_compatible(
        manifest, ENCODING_FIELDS + STORAGE_FIELDS + ("quantization",),
        where=storage.join(path, MANIFEST), other="this run")
    return store
  # Files an unfinished creation may have left, with other settings.
  leftovers = {COLUMN_SCALES, *attachments, *other_attachments}
  names = check_creatable(path, leftovers)
  # Leftovers of an unfinished creation may hold other settings or stale
  # markers: start clean.
  for name in (ARRAY_DIR, SCALES_DIR, PROGRESS_DIR):
    storage.delete_dir(storage.join(path, name))
  for name in sorted(leftovers & set(names) - set(attachments)):
    storage.delete(storage.join(path, name))
  storage.make_local_dirs(path)
  with storage.writing(storage.join(path, ARRAY_DIR), "create the array"):
    array, scales = (
        None if spec is None else ts.open(spec, create=True, delete_existing=True,
                                          context=storage.CONTEXT).result()
        for spec in _specs(path, manifest))
  for name, data in attachments.items():
    storage.write_bytes(storage.join(path, name), data)
  storage.write_text(storage.join(path, MANIFEST),
                     json.dumps(manifest.to_dict(), indent=2, sort_keys=True))
  return EncodingStore(path, manifest, array, scales, _column_scales(path, manifest))


def _column_scales_bytes(scales: np.ndarray | None, dim: int) -> bytes:
  """An int8 store's column scales as ``COLUMN_SCALES`` holds them."""
  scales = np.ones(dim, np.float32) if scales is None else np.asarray(scales)
  if (scales.shape != (dim,) or not np.all(np.isfinite(scales))
      or not np.all(scales > 0)):
    raise InputError(f"column_scales: expected {dim} positive finite values, got "
                     f"shape {scales.shape}")
  buf = io.BytesIO()
  np.save(buf, scales.astype("<f4"), allow_pickle=False)
  return buf.getvalue()


def _column_scales(path: str, manifest: Manifest) -> np.ndarray | None:
  """An int8 store's column scales, checked against its manifest; None for
  other dtypes."""
  if manifest.dtype != "int8":
    return None
  where = storage.join(path, COLUMN_SCALES)
  data = storage.read_bytes(where)
  want = manifest.quantization.get("column_scales_sha256")
  if data is None or hashlib.sha256(data).hexdigest()[:16] != want:
    raise CorruptStoreError(
        f"{where}: " + ("missing" if data is None else "does not match the sha256 "
                        f"in {MANIFEST} ({want})")
        + "; an int8 store needs its column scales to be read")
  scales = np.load(io.BytesIO(data), allow_pickle=False)
  if scales.shape != (manifest.dim,) or scales.dtype != np.dtype("<f4"):
    raise CorruptStoreError(f"{where}: expected float32 [{manifest.dim}], got "
                            f"{scales.dtype} {scales.shape}")
  return scales.astype(np.float32)


def _specs(path: str, manifest: Manifest) -> tuple[dict, dict | None]:
  """The specs of a store's rows and (int8 stores) scales arrays."""
  return (_array_spec(path, manifest),
          _scales_spec(path, manifest) if manifest.dtype == "int8" else None)


def open_store(path: str | os.PathLike[str],
               expected: Manifest | None = None,
               fields: Sequence[str] = ENCODING_FIELDS) -> EncodingStore:
  """Opens an existing store for reading (and writing, to resume).

  Args:
    path: the store's location (a path or a ``tracer.storage`` URL).
    expected: if given, the store's manifest must agree with it on ``fields``
      (default: the fields that define the encoding space, not corpus/size).
    fields: which manifest fields to compare.

  Raises:
    InputError: ``path`` is not a store.
    IncompatibleStoreError: the manifest disagrees with ``expected``.
  """
  path = storage.normalize(path)
  where = storage.join(path, MANIFEST)
  if not storage.exists(where):
    raise InputError(f"{where}: {storage.missing(where)}; {path} is not an "
                     "encoding store")
  manifest = read_manifest(path)
  if expected is not None:
    manifest.check_compatible(expected, fields, where=where)
  arrays = []
  for name, spec in zip((ARRAY_DIR, SCALES_DIR), _specs(path, manifest)):
    try:
      arrays.append(None if spec is None else ts.open(
          spec, open=True, context=storage.CONTEXT).result())
    except ValueError as e:
      raise InputError(f"{storage.join(path, name)}: cannot open the array "
                       f"described by {where}: {e}") from e
  return EncodingStore(path, manifest, *arrays, _column_scales(path, manifest))
