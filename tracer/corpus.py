"""A corpus tokenized once to disk, read row by row: the pod-scale row table.

``tokenize`` turns a source (a JSONL file, a glob of JSONL shards, or a seqio
task or mixture) into a directory, local or on any ``tracer.storage`` URL::

  manifest.json     source, tokenizer, max_len, overflow, num_rows, ...
  tokens/           zarr3 [N, max_len] uint16 (int32 past 65,536 ids), 0-padded
  lengths/          zarr3 [N] int32: real tokens in the row
  segments/         zarr3 [N] int32: window index within the row's text
  ids/, texts/      each a zarr3 uint8 byte string of every row's UTF-8 value
                    (``bytes/``) and int64 [N + 1] offsets into it (``offsets/``)

Rows and ids are exactly those of ``tracer.data`` (its row rule), so a store
encoded from the source and one encoded from its tokenized directory agree row
for row. ``TokenizedCorpus`` offers the interface of ``tracer.data.Corpus``
(``len``, ``examples``, ``ids_of``, ``texts_of``), reading only the rows asked
for; host memory is O(batch), never O(N), and ``rows_read`` counts what was
read.

The manifest is written last, so a directory with one is complete; a
directory without one is an unfinished tokenization, redone from the start.
It records each source file's size and modification time (an object's
generation), taken before the file is read; a rerun reuses the corpus only
while every file is as recorded and a glob matches no other file
(``check_source_files``: one stat per file), else it is refused. On several
processes each checks its share of the files (``share_index``,
``share_count``) and they agree on one verdict
(``pipeline.tokenize_on_processes``): one stat per file in all.

Tokenized by several processes (``tokenize(num_shards=P, shard_index=i)``,
e.g. one per host of a pod), a glob's files are split into P runs of
consecutive files (or, with fewer than 8P Parquet files, of row groups
balanced by rows: ``data.split_files``); process i writes ``parts/i-of-P/``, a complete corpus of
its run (plus ``id_hashes/``, its documents' sorted 64-bit id hashes), and
whichever process finds every part done checks ids across parts and writes
the top manifest, which lists the parts. The rows are the parts' rows in
order: exactly those of one process tokenizing the whole glob.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import itertools
import json
import operator
import os
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import tensorstore as ts

from tracer import data as data_lib
from tracer import storage
from tracer.config import DataConfig
from tracer.errors import InputError

FORMAT = "tracer.tokenized_corpus.v1"
MANIFEST = "manifest.json"
# Rows per written block (and per chunk of the 1-D arrays): every block write
# covers whole chunks of the token array, so nothing is read back.
BLOCK_ROWS = 16384
TOKEN_CHUNK_BYTES = 1 << 20
BYTES_CHUNK = 1 << 20
READ_CACHE_BYTES = 32 << 20
_ARRAYS = ("tokens", "lengths", "segments", "ids", "texts")
PARTS = "parts"
ID_HASHES = "id_hashes"


@dataclasses.dataclass(frozen=True)
class CorpusManifest:
  """What a tokenized corpus holds and how its rows were made."""
  source: str
  tokenizer: str
  sentencepiece_model: str | None
  vocab_size: int
  max_len: int
  overflow: str
  num_rows: int
  num_docs: int
  token_dtype: str
  format: str = FORMAT
  # A part written by one of several processes: [shard_index, num_shards].
  shard: list[int] | None = None
  # A corpus joined from parts: [{"path": "parts/...", "num_rows": n}, ...].
  parts: list[dict[str, Any]] | None = None
  # ``data.RowsFingerprint`` of the rows; None in corpora tokenized before
  # 2026-12-04 (then nothing is compared).
  fingerprint: str | None = None
  # Every chunk inside the arrays' shapes is stored, chunks of zeros too
  # (since 2026-12-04), so a missing one is damage (a copy cut short, a lost
  # object) and reads as an error; False: it reads as zeros, as before.
  chunks_stored: bool = False
  # Each source file as it was when read: [{"path": absolute path or URL,
  # **storage.identities(...)}] (size and mtime, or an object's generation),
  # in the source's order; a rerun reuses the corpus only while every file
  # is as recorded (``check_source_files``). None: a seqio source, given
  # records, or a corpus tokenized before 2026-12-06 (reused unchecked).
  source_files: list[dict[str, Any]] | None = None
  # A part's share of the source files (``data.split_files``'s run): [[path,
  # [first, stop) Parquet row groups or None, [i, n] JSONL line share or
  # None], ...]; the join holds every part's to the split as it is then
  # (files added between parts moved row groups and line shares while each
  # part's paths stayed the same: rows were dropped, before 2026-12-07).
  # None: a part written before, checked by its paths alone.
  source_run: list[list[Any]] | None = None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _spec(location: str, dtype: str, shape: Sequence[int],
          chunk: Sequence[int]) -> dict[str, Any]:
  return {"driver": "zarr3", "kvstore": storage.kvstore_spec(location),
          "metadata": {
              "shape": list(shape), "data_type": dtype,
              "chunk_grid": {"name": "regular",
                             "configuration": {"chunk_shape": list(chunk)}},
              "chunk_key_encoding": {"name": "default"},
              "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
              "fill_value": 0},
          # (tensorstore skips chunks equal to the fill value by default)
          "store_data_equal_to_fill_value": True}


def _open(location: str, context: ts.Context = storage.CONTEXT,
          chunks_stored: bool = False) -> ts.TensorStore:
  """An array; ``chunks_stored`` (``CorpusManifest``): a missing chunk is a
  read error, not zeros."""
  return ts.open({"driver": "zarr3", "kvstore": storage.kvstore_spec(location),
                  "fill_missing_data_reads": not chunks_stored},
                 open=True, context=context).result()


def _reading_context() -> ts.Context:
  """Encode batches are smaller than a token chunk: a small chunk cache keeps
  consecutive batches from reading the same chunk again (memory stays bounded
  by it, not by N)."""
  return ts.Context(ts.Context.Spec({"cache_pool": {"total_bytes_limit": READ_CACHE_BYTES}}),
                    parent=storage.CONTEXT)


def is_tokenized(location: str) -> bool:
  """True if ``location`` holds a (complete) tokenized corpus."""
  try:
    return storage.exists(storage.join(location, MANIFEST))
  except InputError:
    return False


_STR, _INT = ((str,), "a string"), ((int,), "an integer")
_LIST_OR_NULL = ((list, type(None)), "a list or null")
# The JSON types of a manifest file's fields, so that a hand-edited or
# damaged one is an InputError naming the field, not a TypeError later.
_FIELD_TYPES = {
    "source": _STR, "tokenizer": _STR,
    "sentencepiece_model": ((str, type(None)), "a string or null"),
    "vocab_size": _INT, "max_len": _INT, "overflow": _STR, "num_rows": _INT,
    "num_docs": _INT, "token_dtype": _STR, "format": _STR,
    "shard": _LIST_OR_NULL, "parts": _LIST_OR_NULL,
    "fingerprint": ((str, type(None)), "a string or null"),
    "chunks_stored": ((bool,), "true or false"),
    "source_files": _LIST_OR_NULL, "source_run": _LIST_OR_NULL}


def read_manifest(location: str) -> CorpusManifest:
  where = storage.join(location, MANIFEST)
  d = storage.read_json(where)
  if d.get("format") != FORMAT:
    raise InputError(f"{where}: not a tokenized corpus (expected format {FORMAT!r}, "
                     f"got {d.get('format')!r})")
  fields = dataclasses.fields(CorpusManifest)
  names = {f.name for f in fields}
  required = {f.name for f in fields if f.default is dataclasses.MISSING}
  if not required <= set(d) <= names:
    raise InputError(f"{where}: fields {sorted((required - set(d)) | (set(d) - names))} "
                     "missing or unknown")
  storage.check_json_types(where, d, _FIELD_TYPES)
  for name in ("vocab_size", "max_len", "num_rows", "num_docs"):
    if d[name] < 0:
      raise InputError(f"{where}: field {name!r} must be >= 0, got {d[name]}")
  for i, part in enumerate(d.get("parts") or ()):
    if not (isinstance(part, dict) and isinstance(part.get("path"), str)
            and type(part.get("num_rows")) is int and part["num_rows"] >= 0):
      raise InputError(f"{where}: parts[{i}] is {json.dumps(part)[:200]}; expected "
                       '{"path": "parts/...", "num_rows": N}')
  for i, f in enumerate(d.get("source_files") or ()):
    if not (isinstance(f, dict) and isinstance(f.get("path"), str)):
      raise InputError(f"{where}: source_files[{i}] is {json.dumps(f)[:200]}; "
                       'expected {"path": "...", ...} (a file as it was read)')
  run = d.get("source_run")
  if run is not None and not (isinstance(run, list) and all(
      isinstance(f, list) and len(f) == 3 and isinstance(f[0], str) for f in run)):
    raise InputError(f"{where}: source_run is {json.dumps(run)[:200]}; expected "
                     "[[path, row groups or null, line share or null], ...]")
  return CorpusManifest(**d)


class _Strings:
  """Variable-length UTF-8 values: a byte string and offsets into it."""

  def __init__(self, location: str, context: ts.Context = storage.CONTEXT,
               chunks_stored: bool = False):
    self.bytes = _open(storage.join(location, "bytes"), context, chunks_stored)
    self.offsets = _open(storage.join(location, "offsets"), context, chunks_stored)

  def get(self, rows: np.ndarray) -> list[str]:
    rows = np.asarray(rows, np.int64)
    if len(rows) == 0:
      return []
    if np.all(np.diff(rows) == 1):  # one range: two reads
      lo, hi = int(rows[0]), int(rows[-1]) + 1
      off = self.offsets[lo:hi + 1].read().result()
      blob = self.bytes[int(off[0]):int(off[-1])].read().result().tobytes()
      off = off - off[0]
      return [blob[a:b].decode("utf-8") for a, b in zip(off[:-1], off[1:])]
    starts = self.offsets[rows].read().result()
    stops = self.offsets[rows + 1].read().result()
    reads = [self.bytes[int(a):int(b)].read() for a, b in zip(starts, stops)]
    return [r.result().tobytes().decode("utf-8") for r in reads]


class _Arrays:
  """One directory's row arrays (a whole corpus, or one part of one)."""

  def __init__(self, location: str, num_rows: int, max_len: int,
               context: ts.Context, chunks_stored: bool):
    opened = lambda name: _open(storage.join(location, name), context, chunks_stored)
    self.tokens, self.lengths, self.segments = map(opened, ("tokens", "lengths",
                                                           "segments"))
    self.ids = _Strings(storage.join(location, "ids"), context, chunks_stored)
    self.texts = _Strings(storage.join(location, "texts"), context, chunks_stored)
    if self.tokens.shape != (num_rows, max_len):
      raise InputError(f"{location}/tokens: shape {self.tokens.shape}, the "
                       f"manifest says {(num_rows, max_len)}")


def _read(array: ts.TensorStore, rows: np.ndarray) -> np.ndarray:
  if len(rows) and np.all(np.diff(rows) == 1):
    return array[int(rows[0]):int(rows[-1]) + 1].read().result()
  return array[rows].read().result()


@contextlib.contextmanager
def _reading(location: str) -> Iterator[None]:
  """A failed open or read of a corpus's arrays (a part or chunk gone: a copy
  cut short, a lost object) as one InputError naming ``location``."""
  try:
    yield
  except ValueError as e:
    if isinstance(e, InputError):  # (the shape check's)
      raise
    raise InputError(f"{location}: cannot read this corpus's arrays "
                     f"({storage.reason(e)}); copy the corpus again, or "
                     "tokenize it again") from None


class TokenizedCorpus:
  """A tokenized corpus directory, read row by row (module doc).

  Same interface as ``tracer.data.Corpus``: ``len(corpus)``,
  ``examples(rows)``, ``ids_of(rows)``, ``texts_of(rows)``, ``source``,
  ``max_len``. ``rows_read`` counts the rows whose tokens were read.
  """

  def __init__(self, location: str):
    self.location = storage.normalize(location)
    self.manifest = read_manifest(self.location)
    self.source = self.manifest.source
    self.max_len = self.manifest.max_len
    context = _reading_context()
    parts = self.manifest.parts or [{"path": "", "num_rows": self.manifest.num_rows}]
    # Parts are opened when first read (a host reads few of a pod's parts;
    # each open reads metadata).
    self._context = context
    self._part_specs = [(storage.join(self.location, p["path"]) if p["path"]
                         else self.location, p["num_rows"]) for p in parts]
    self._parts: dict[int, _Arrays] = {}
    if not self.manifest.parts:
      self._part(0)  # a whole corpus is checked on opening, as before
    # Row r lies in the last part starting at or before it (empty parts too).
    self._starts = np.cumsum([0] + [p["num_rows"] for p in parts[:-1]])
    if sum(p["num_rows"] for p in parts) != self.manifest.num_rows:
      raise InputError(f"{self.location}/{MANIFEST}: its parts hold "
                       f"{sum(p['num_rows'] for p in parts)} rows, num_rows is "
                       f"{self.manifest.num_rows}")
    self.rows_read = 0

  def __len__(self) -> int:
    return self.manifest.num_rows

  @property
  def fingerprint(self) -> str:
    """``data.RowsFingerprint`` of the rows, from the manifest ("" if it has
    none)."""
    return self.manifest.fingerprint or ""

  def _part(self, p: int) -> _Arrays:
    if p not in self._parts:
      location, num_rows = self._part_specs[p]
      with _reading(location):
        self._parts[p] = _Arrays(location, num_rows, self.max_len, self._context,
                                 self.manifest.chunks_stored)
    return self._parts[p]

  def _gather(self, rows, read) -> np.ndarray:
    """``read(part_arrays, rows_within_part)`` over the parts that hold
    ``rows``, in the order of ``rows``."""
    rows = np.asarray(rows, np.int64).reshape(-1)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
      raise InputError(f"{self.location}: rows [{rows.min()}, {rows.max()}] out "
                       f"of range [0, {len(self)})")

    def read_part(p, rows_within):
      with _reading(self._part_specs[p][0]):
        return read(self._part(p), rows_within)

    if len(self._part_specs) == 1 or not len(rows):  # (no rows: part 0's empty)
      return read_part(0, rows)
    part = np.searchsorted(self._starts, rows, side="right") - 1
    pieces = [(np.flatnonzero(part == p), p) for p in np.unique(part)]
    got = [read_part(p, rows[at] - self._starts[p]) for at, p in pieces]
    out = np.empty((len(rows), *got[0].shape[1:]), got[0].dtype)
    for (at, _), values in zip(pieces, got):
      out[at] = values
    return out

  def read_tokens(self, rows) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 ``[B, max_len]``, lengths int32 ``[B]``) of ``rows``."""
    rows = np.asarray(rows, np.int64)
    tokens = self._gather(rows, lambda a, r: _read(a.tokens, r)).astype(np.int32)
    self.rows_read += len(rows)
    return tokens, self._gather(rows, lambda a, r: _read(a.lengths, r))

  def examples(self, rows) -> dict:
    return data_lib.examples_from_tokens(*self.read_tokens(rows))

  def _strings(self, rows, which: str) -> list[str]:
    if len(rows) == 0:
      return []
    return self._gather(
        rows, lambda a, r: np.array(getattr(a, which).get(r), object)).tolist()

  def ids_of(self, rows) -> list[str]:
    return self._strings(rows, "ids")

  def texts_of(self, rows) -> list[str]:
    return self._strings(rows, "texts")

  def segments_of(self, rows) -> np.ndarray:
    return self._gather(rows, lambda a, r: _read(a.segments, r))

  def __repr__(self) -> str:
    return f"TokenizedCorpus({self.location!r}, rows={len(self)})"


class _Appender:
  """Appends rows to a growing 1- or 2-D zarr array (block writes, then
  ``expand_only`` resizes, so nothing is ever deleted or read back)."""

  def __init__(self, location: str, dtype: str, row_shape: tuple[int, ...],
               chunk_rows: int):
    spec = _spec(location, dtype, (0, *row_shape), (chunk_rows, *row_shape))
    self.array = ts.open(spec, create=True, delete_existing=True,
                         context=storage.CONTEXT).result()
    self.size = 0

  def append(self, values: np.ndarray) -> None:
    if not len(values):
      return
    stop = self.size + len(values)
    self.array = self.array.resize(
        exclusive_max=[stop, *([None] * (self.array.rank - 1))],
        expand_only=True).result()
    self.array[self.size:stop].write(values).result()
    self.size = stop


class _StringAppender:

  def __init__(self, location: str):
    self.bytes = _Appender(storage.join(location, "bytes"), "uint8", (), BYTES_CHUNK)
    self.offsets = _Appender(storage.join(location, "offsets"), "int64", (),
                             BLOCK_ROWS)
    self.offsets.append(np.zeros(1, np.int64))

  def append(self, values: list[str]) -> None:
    encoded = [v.encode("utf-8") for v in values]
    sizes = np.fromiter((len(b) for b in encoded), np.int64, len(encoded))
    self.offsets.append(self.bytes.size + np.cumsum(sizes))
    self.bytes.append(np.frombuffer(b"".join(encoded), np.uint8))


def _id_hash(doc_id: str) -> int:
  return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(),
                        "little")


def tokenize(source: str, output: str, data_config: DataConfig, max_len: int,
             *, records: Iterable[data_lib.Record] | None = None,
             block_rows: int = BLOCK_ROWS, progress=None, num_shards: int = 1,
             shard_index: int = 0, check_sources: bool = True) -> TokenizedCorpus:
  """Tokenizes ``source`` into the directory ``output`` (module doc).

  Args:
    source: a JSONL file, a glob of JSONL shards, or a seqio task/mixture name
      (see ``tracer.data.source_records``).
    output: where to write (a path or ``tracer.storage`` URL).
    data_config: tokenizer and overflow rule (the checkpoint's, so rows match).
    max_len: tokens per row (the model's ``max_len``).
    records: (id, text, tokens) records to use instead of reading ``source``.
    block_rows: rows per write; memory is O(block_rows * max_len).
    progress: called with the number of rows of each written block.
    num_shards, shard_index: this process writes part ``shard_index`` of
      ``num_shards`` (a file source's files split into runs of consecutive
      files, or of Parquet row groups: ``data.split_files``); the process
      that finds every part written joins them.
    check_sources: False: an existing whole corpus's source files are left
      to the caller to check (``check_source_files``; on several processes,
      each its share: ``pipeline.tokenize_on_processes``). A part's are
      always checked, by the process that writes it.

  Returns:
    The corpus, opened; with several shards, this shard's part until every
    part is written. An existing complete corpus (or part) at ``output``
    with the same source and settings is returned as is (a rerun does
    nothing); one with other settings is an error.
  """
  output = storage.normalize(output)
  settings = {"source": data_lib.absolute_source(source),
              "tokenizer": data_config.tokenizer,
              "sentencepiece_model": data_config.sentencepiece_model,
              "max_len": max_len, "overflow": data_config.overflow}
  if is_tokenized(output):
    return _existing(output, settings, check_sources)
  if not 0 <= shard_index < num_shards:
    raise InputError(f"shard {shard_index} of {num_shards}: expected 0 <= "
                     f"shard_index < num_shards")
  if num_shards == 1:
    # (parts: left by an unfinished run on several processes, not read)
    _check_empty_or_unfinished(output, {*_ARRAYS, PARTS})
    source_files = None
    if records is None:
      if data_lib.is_file_source(source):  # as they are before they are read
        source_files = _source_files(data_lib.corpus_files(source))
      source, records = data_lib.source_records(source, data_config.vocabulary(),
                                                unique_ids=False)
    _write(output, source, records, data_config, max_len, block_rows, progress,
           settings, source_files=source_files)
    return TokenizedCorpus(output)
  if records is not None or not data_lib.splits_among_processes(source):
    raise InputError(f"{source}: tokenizing in {num_shards} shards splits a file "
                     "source's files, or a seqio source's shards when it names "
                     "them (TASK#shards=N); one process tokenizes a seqio source "
                     "that does not")
  part = storage.join(output, _part_name(shard_index, num_shards))
  if is_tokenized(part):
    _existing(part, settings)
  else:
    _check_empty_or_unfinished(part, set(_ARRAYS) | {ID_HASHES})
    vocab = data_config.vocabulary()
    files = source_files = None
    if data_lib.is_file_source(source):
      mine = data_lib.split_files(source, num_shards)[shard_index]
      # This process's files as it sees them before it reads them: each
      # part records its own share's, the join all of them.
      source_files = _source_files(_run_paths(mine))
      settings = {**settings, "source_run": _run_record(mine)}
      records = data_lib.corpus_records(source, vocab, False, mine)
      files = _paths(mine)
    else:  # a run of the seqio source's shards
      n = data_lib.seqio_shards(source)[1]
      records = data_lib.seqio_records(source, vocab, shards=range(
          shard_index * n // num_shards, (shard_index + 1) * n // num_shards))
    _write(part, source, records, data_config, max_len, block_rows, progress,
           settings, shard=[shard_index, num_shards], files=files,
           source_files=source_files)
  return join_parts(output, source, num_shards) or TokenizedCorpus(part)


def _existing(location: str, settings: dict,
              check_sources: bool = True) -> TokenizedCorpus:
  """The corpus at ``location``, if made from the same source and settings
  (and, with ``check_sources``, from its files as they are now)."""
  corpus = TokenizedCorpus(location)
  same = lambda k, v: (data_lib.same_source if k == "source" else operator.eq)(
      getattr(corpus.manifest, k), v)
  diffs = [f"{k}: has {getattr(corpus.manifest, k)!r}, asked {v!r}"
           for k, v in settings.items() if not same(k, v)]
  if diffs:
    raise InputError(f"{location}: already holds a tokenized corpus with other "
                     f"settings ({'; '.join(diffs)}); choose another --output")
  if check_sources:
    check_source_files(location, corpus.manifest, settings["source"])
  return corpus


def _source_files(paths: Sequence[str]) -> list[dict[str, Any]]:
  """``CorpusManifest.source_files`` of ``paths``: one stat (or an object's
  metadata request) each, never a read. A file missing here fails when it
  is read."""
  paths = [storage.normalize(p) for p in paths]
  return [{"path": p, **(identity or {})}
          for p, identity in zip(paths, storage.identities(paths))]


def _described(identity: dict[str, Any] | None, other: dict[str, Any] | None
               ) -> str:
  """A file's identity for an error (``other``: what it is compared with,
  so that two modification times in one second still read apart)."""
  if identity is None:
    return "gone (no such file)"
  if "generation" in identity:
    return f"at generation {identity['generation']}"
  ns = identity.get("mtime_ns", 0)
  fine = other is not None and other.get("mtime_ns", ns) // 10**9 == ns // 10**9
  when = datetime.datetime.fromtimestamp(ns / 1e9, datetime.timezone.utc)
  return (f"{identity.get('size', 0):,} bytes, modified "
          f"{when.strftime('%Y-%m-%d %H:%M:%S')}"
          f"{f'.{ns % 10**9:09d}' if fine else ''} UTC")


def source_share(count: int, share_index: int, share_count: int) -> slice:
  """Share ``share_index`` of ``share_count`` of ``count`` recorded source
  files: a run of consecutive ones, as ``data.split_files`` runs whole
  files. Consecutive, so that the first failing share (by index) holds the
  first changed file: the verdict of one process checking them all."""
  return slice(share_index * count // share_count,
               (share_index + 1) * count // share_count)


def check_source_files(location: str, manifest: CorpusManifest, source: str,
                       share_index: int = 0, share_count: int = 1) -> None:
  """InputError unless every file the corpus at ``location`` was made from
  is as it was then (``CorpusManifest.source_files``: size and modification
  time, an object's generation), and a glob matches no other file now: its
  rows would be stale (before 2026-12-06 a rerun after the source was
  edited reused them). One stat per file (objects: metadata requests in
  flight together) and, for a glob, one listing; a part checks its own
  files only. A manifest without the record is not checked.

  ``share_index`` of ``share_count``: only that share of the files
  (``source_share``), the last share also the glob's listing, after its
  files (as one process lists after all of them), so that the shares'
  errors, the first by index, are the one a single check would raise."""
  recorded = manifest.source_files
  if recorded is None:
    return
  fix = (f"tokenize it again into another directory, or delete {location} "
         "(its rows are those of the source as it was)")
  mine = recorded[source_share(len(recorded), share_index, share_count)]
  now = storage.identities([f["path"] for f in mine])
  for f, identity in zip(mine, now):
    was = {k: v for k, v in f.items() if k != "path"}
    if identity != was:
      raise InputError(f"{location}: made from {f['path']} of "
                       f"{_described(was, identity).removeprefix('at ')}; it is "
                       f"now {_described(identity, was)}: {fix}")
  if (share_index == share_count - 1 and manifest.shard is None
      and data_lib.is_file_source(source)):
    known = {f["path"] for f in recorded}
    added = [p for p in map(storage.normalize, data_lib.corpus_files(source))
             if p not in known]
    if added:
      more = f" and {len(added) - 1} more" if len(added) > 1 else ""
      raise InputError(f"{location}: made from the {len(recorded):,} files "
                       f"{source} matched then; it now also matches "
                       f"{added[0]}{more}: {fix}")


def _check_empty_or_unfinished(location: str, allowed: set[str]) -> None:
  names = storage.list_dir(location)
  strangers = sorted({n.split("/", 1)[0] for n in names} - allowed)
  if strangers:
    raise InputError(f"{location}: not a tokenized corpus (no {MANIFEST}) and not "
                     f"empty: {strangers[:5]}")


def leftovers(location: str) -> list[str]:
  """What the tokenized corpus at ``location`` holds but its manifest does
  not use, left by an unfinished run on another process count: part
  directories ``parts/i-of-P`` it does not list, and beside a joined corpus
  the top-level arrays (``tokens``, ``ids``, ...) of a one-process run. Never
  read, but each holds its share of the corpus. Costs one listing of the keys
  under ``parts/``, and for a joined corpus one under each array name (a
  request per 1,000 keys on object storage)."""
  parts = read_manifest(location).parts
  listed = {p["path"] for p in parts or ()}
  found = {"/".join(n.split("/")[:2])
           for n in storage.list_dir(location, PARTS + "/")}
  if parts:  # a one-process corpus's own arrays are these names
    found |= {name for name in _ARRAYS if storage.list_dir(location, name + "/")}
  return sorted(found - listed)


def _part_name(shard_index: int, num_shards: int) -> str:
  return f"{PARTS}/{shard_index:05d}-of-{num_shards:05d}"


def _write_manifest(location: str, manifest: CorpusManifest) -> None:
  d = {k: v for k, v in manifest.to_dict().items()
       if v is not None or k not in ("shard", "parts", "fingerprint",
                                     "source_files")}
  storage.write_text(storage.join(location, MANIFEST),
                     json.dumps(d, indent=2, sort_keys=True))


def _write(output: str, label: str, records, data_config: DataConfig,
           max_len: int, block_rows: int, progress, settings: dict,
           shard: list[int] | None = None, files: set[str] | None = None,
           source_files: list[dict[str, Any]] | None = None) -> None:
  """Writes ``records``' rows to ``output``, then (ids checked unique) its
  manifest; a shard's part also keeps its sorted id hashes (``ID_HASHES``).
  ``files``: a shard's files of the source ``label`` (None: all of them).
  ``source_files``: the manifest's (``CorpusManifest``)."""
  vocab = data_config.vocabulary()
  token_dtype = "uint16" if vocab.vocab_size <= 1 << 16 else "int32"
  token_rows = min(block_rows, max(1, TOKEN_CHUNK_BYTES // (
      max_len * np.dtype(token_dtype).itemsize)))
  token_rows = 1 << (token_rows.bit_length() - 1)  # a power of 2: divides blocks
  if block_rows % token_rows:
    raise ValueError(f"block_rows={block_rows} must be a multiple of {token_rows}")
  # The source's first row is read before anything is created, so a source
  # that is missing, empty or bad at its start leaves no output behind.
  rows = data_lib.rows_of(records, vocab, max_len, data_config.overflow)
  first = next(rows, None)
  if first is None and shard is None:  # a shard's run of files may be empty
    raise InputError(f"{label}: the corpus is empty")
  storage.make_local_dirs(output)
  tokens = _Appender(storage.join(output, "tokens"), token_dtype, (max_len,),
                     token_rows)
  lengths = _Appender(storage.join(output, "lengths"), "int32", (), block_rows)
  segments = _Appender(storage.join(output, "segments"), "int32", (), block_rows)
  ids, texts = (_StringAppender(storage.join(output, n)) for n in ("ids", "texts"))
  hashes: list[np.ndarray] = [np.zeros(0, np.uint64)]
  buf: dict[str, list] = {"ids": [], "texts": [], "segments": [], "tokens": []}
  num_docs = 0
  fingerprint = data_lib.RowsFingerprint()

  def flush():
    n = len(buf["ids"])
    if not n:
      return
    lens = np.fromiter((len(t) for t in buf["tokens"]), np.int32, n)
    block = np.zeros((n, max_len), token_dtype)
    block[np.arange(max_len)[None, :] < lens[:, None]] = np.concatenate(buf["tokens"])
    tokens.append(block)
    lengths.append(lens)
    segments.append(np.asarray(buf["segments"], np.int32))
    ids.append(buf["ids"])
    texts.append(buf["texts"])
    hashes.append(np.fromiter((_id_hash(i) for i, s in zip(buf["ids"], buf["segments"])
                               if s == 0), np.uint64))
    for v in buf.values():
      v.clear()
    if progress is not None:
      progress(n)

  for doc_id, text, j, window in itertools.chain([first] if first else [], rows):
    num_docs += j == 0
    fingerprint.add(doc_id, j, window)
    buf["ids"].append(doc_id)
    buf["texts"].append(text)
    buf["segments"].append(j)
    buf["tokens"].append(window)
    if len(buf["ids"]) == block_rows:
      flush()
  flush()
  hashes = np.sort(np.concatenate(hashes))
  for value in np.unique(hashes[1:][hashes[1:] == hashes[:-1]]):
    _duplicate_id(int(value), [(output, 0, files)], output, label)
  if shard is not None:
    _Appender(storage.join(output, ID_HASHES), "uint64", (), BLOCK_ROWS).append(hashes)
  _write_manifest(output, CorpusManifest(
      **settings, vocab_size=int(vocab.vocab_size), num_rows=tokens.size,
      num_docs=num_docs, token_dtype=token_dtype, shard=shard,
      fingerprint=fingerprint.hex(), chunks_stored=True,
      source_files=source_files))


def join_parts(output: str, source: str, num_shards: int) -> TokenizedCorpus | None:
  """The whole corpus, if every part of ``output`` is written (the top
  manifest is then written, after ids are checked unique across parts);
  None while some part is not."""
  paths = [_part_name(i, num_shards) for i in range(num_shards)]
  if not all(is_tokenized(storage.join(output, p)) for p in paths):
    return None
  manifests = [read_manifest(storage.join(output, p)) for p in paths]
  first = manifests[0]
  made_as = lambda m: (data_lib.absolute_source(m.source), m.tokenizer,
                       m.sentencepiece_model,
                       m.max_len, m.overflow, m.token_dtype)
  for i, (p, m) in enumerate(zip(paths, manifests)):
    if made_as(m) != made_as(first) or m.shard != [i, num_shards]:
      raise InputError(f"{storage.join(output, p, MANIFEST)}: made with other "
                       f"settings than {paths[0]} (or not as shard {i} of "
                       f"{num_shards})")
  runs = None  # each part's files
  # (`is not None`: a part with no file recorded [], which skipped the check)
  if data_lib.is_file_source(source) and all(m.source_files is not None
                                             for m in manifests):
    runs = [_paths(run) for run in _check_parts_files(output, source, paths, manifests)]
  starts = np.cumsum([0] + [m.num_rows for m in manifests[:-1]])
  for shared in shared_hashes([_open(storage.join(output, p, ID_HASHES))
                               for p in paths]):
    if runs is None:
      runs = ([_paths(run) for run in data_lib.split_files(source, num_shards)]
              if data_lib.is_file_source(source) else [None] * num_shards)
    _duplicate_id(shared, [(storage.join(output, p), int(s), files)
                           for p, s, files in zip(paths, starts, runs)], output, source)
  total = sum(m.num_rows for m in manifests)
  if not total:
    raise InputError(f"{source}: the corpus is empty")
  fingerprint = (data_lib.RowsFingerprint.combined(
      [(m.fingerprint, m.num_rows) for m in manifests])
      if all(m.fingerprint for m in manifests) else None)
  _write_manifest(output, dataclasses.replace(
      first, num_rows=total, num_docs=sum(m.num_docs for m in manifests),
      fingerprint=fingerprint, shard=None, source_run=None,
      source_files=_joined_source_files(output, paths, manifests),
      chunks_stored=all(m.chunks_stored for m in manifests),
      parts=[{"path": p, "num_rows": m.num_rows} for p, m in zip(paths, manifests)]))
  return TokenizedCorpus(output)


def _check_parts_files(output: str, source: str, paths: Sequence[str],
                       manifests: Sequence[CorpusManifest]) -> list[list]:
  """The runs of ``data.split_files`` of ``source`` as they are now, each the
  files its part recorded; else an InputError naming the first part made
  from other files. Each process splits the source as it finds it: files
  added or removed between parts (a rerun after a crash, shards landing
  while a pod tokenizes) dropped a file from the join or tokenized one
  twice (reported as a duplicate id)."""
  runs = data_lib.split_files(source, len(paths))
  for path, m, run in zip(paths, manifests, runs):
    was, now = [f["path"] for f in m.source_files], _run_paths(run)
    if was == now and m.source_run is not None and m.source_run != _run_record(run):
      raise InputError(
          f"{storage.join(output, path)}: made from other row groups or line "
          f"shares of its files than {source} now gives that part: files were "
          "added or removed while the corpus was tokenized; expected the same "
          f"files for every part (delete {storage.join(output, path)} and "
          "tokenize it again)")
    if was != now:
      span = lambda files: (f"{len(files):,} files, {files[0]} to {files[-1]}"
                            if len(files) > 1 else f"1 file, {files[0]}"
                            if files else "no files")
      raise InputError(
          f"{storage.join(output, path)}: made from {span(was)}; {source} now "
          f"gives that part {span(now)}: its files changed while the corpus was "
          f"tokenized; expected the same files for every part (delete "
          f"{storage.join(output, path)} and tokenize it again)")
  return runs


def _joined_source_files(output: str, paths: Sequence[str],
                         manifests: Sequence[CorpusManifest]
                         ) -> list[dict[str, Any]] | None:
  """The parts' ``source_files`` in order, once each (parts sharing a file
  each recorded it); None if a part has none. A file two parts saw
  differently changed while the corpus was tokenized: an InputError."""
  if any(m.source_files is None for m in manifests):
    return None
  seen: dict[str, tuple[str, dict[str, Any]]] = {}
  for path, m in zip(paths, manifests):
    for f in m.source_files:
      if f["path"] in seen and seen[f["path"]][1] != f:
        other, was = seen[f["path"]]
        raise InputError(
            f"{output}: {f['path']} changed while it was tokenized ({other} "
            f"read it as {_described(was, f).removeprefix('at ')}, {path} as "
            f"{_described(f, was).removeprefix('at ')}); delete {output} and "
            "tokenize it again")
      seen.setdefault(f["path"], (path, f))
  return [f for _, f in seen.values()]


# Hashes the join holds at once, over all parts (``first_shared_hash``).
JOIN_BYTES = 64 << 20


def first_shared_hash(parts: Sequence, block: int | None = None) -> int | None:
  """The smallest value found twice in the sorted uint64 arrays ``parts``
  (``shared_hashes``), or None."""
  return next(shared_hashes(parts, block), None)


def shared_hashes(parts: Sequence, block: int | None = None) -> Iterator[int]:
  """Each value found more than once in the sorted uint64 arrays ``parts``
  (tensorstore arrays or numpy), ascending.

  Document ids must be unique across a source; each part checked its own
  through its sorted 64-bit id hashes (8 bytes per document: a set of id
  strings costs ~10x that). Across parts this is a k-way merge that reads
  each part ``block`` hashes at a time (default: ``JOIN_BYTES`` over all
  parts), so the joining host holds O(parts x block), not 8 bytes per
  document of the whole corpus (C4's 365M documents: 2.9 GB).
  """
  block = block or max(1024, JOIN_BYTES // 8 // max(1, len(parts)))
  sizes = [int(p.shape[0]) for p in parts]
  read = [0] * len(parts)  # hashes of each part loaded so far
  current: list[np.ndarray] = [np.zeros(0, np.uint64)] * len(parts)

  def load(i: int) -> None:
    lo, read[i] = read[i], min(read[i] + block, sizes[i])
    values = parts[i][lo:read[i]]
    current[i] = np.asarray(values if isinstance(values, np.ndarray)
                            else values.read().result(), np.uint64)

  for i in range(len(parts)):
    load(i)
  last = np.zeros(0, np.uint64)  # the largest value merged so far
  told = None  # the last value yielded
  while True:
    # Values up to the least last-loaded value of a part with more to load
    # are all loaded: merge those, then load behind what was used up.
    more = [i for i in range(len(parts)) if read[i] < sizes[i]]
    bound = min((current[i][-1] for i in more), default=None)
    pieces = [last]
    for i, values in enumerate(current):
      cut = len(values) if bound is None else int(np.searchsorted(values, bound, "right"))
      pieces.append(values[:cut])
      current[i] = values[cut:]
    merged = np.sort(np.concatenate(pieces))
    for value in np.unique(merged[1:][merged[1:] == merged[:-1]]):
      if value != told:  # (the carried largest value, repeated again)
        told = value
        yield int(value)
    if bound is None:
      return
    last = merged[-1:]
    for i in more:
      if not len(current[i]):
        load(i)


def _paths(run: list) -> set[str]:
  """The file paths of a run of ``data.split_files`` (files or FileParts)."""
  return {f if isinstance(f, str) else f.path for f in run}


def _run_record(run: list) -> list[list[Any]]:
  """A run of ``data.split_files`` as a part's manifest records it
  (``CorpusManifest.source_run``)."""
  part = lambda f: f if isinstance(f, data_lib.FilePart) else data_lib.FilePart(f)
  return [[storage.normalize(f.path),
           None if f.row_groups is None else [f.row_groups.start, f.row_groups.stop],
           None if f.share is None else list(f.share)] for f in map(part, run)]


def _run_paths(run: list) -> list[str]:
  """A run's file paths, each once, in order, as its part records them."""
  return [storage.normalize(p) for p in
          dict.fromkeys(f if isinstance(f, str) else f.path for f in run)]


def _duplicate_id(value: int, parts: list[tuple[str, int, set[str] | None]],
                  output: str, source: str) -> None:
  """Raises the InputError for a duplicate id whose hash is ``value``, naming
  two of its rows and, for a file source, their ``file:line``s; returns if
  the documents with that hash have different ids (a 64-bit collision: ~0.4%
  for C4's 365M documents). ``parts``: (directory, its first row, its files
  of ``source`` or None: all) of the rows hashed. Reads every part's ids,
  and then the files of the two parts holding the id, which only a repeated
  hash costs."""
  seen = {}  # id -> (its first row, its part's files)
  for location, first_row, files in parts:
    corpus_ids = _Strings(storage.join(location, "ids"))
    segments = _open(storage.join(location, "segments"))
    num_rows = segments.shape[0]
    for lo in range(0, num_rows, BLOCK_ROWS):
      block = np.arange(lo, min(lo + BLOCK_ROWS, num_rows))
      first = segments[block[0]:block[-1] + 1].read().result() == 0
      for r, doc_id, f in zip(block, corpus_ids.get(block), first):
        if not f or _id_hash(doc_id) != value:
          continue
        if doc_id in seen:
          first, first_files = seen[doc_id]
          places = data_lib.id_places(source, doc_id, None if files is None
                                      else first_files | files)
          # Named as the source's own reader names it (its lines), with
          # the rows (0-based) a reader of the tokenized corpus would see.
          at_lines = f"{' and '.join(places)}; " if len(places) == 2 else ""
          raise InputError(f"{source}: duplicate id {doc_id!r} ({at_lines}"
                           f"tokenized rows {first} and {first_row + r} of "
                           f"{output}); ids must be unique across the whole source")
        seen[doc_id] = first_row + r, files


def _unfinished_parts(source: str) -> list[str] | None:
  """The parts written of a directory without a manifest (a run on several
  processes not finished), sorted; None where ``source`` is no directory (a
  file, a glob, an object storage location holding no parts)."""
  if not storage.is_url(source):
    if not os.path.isdir(source):
      return None
    parts = os.path.join(source, PARTS)
    return sorted(n for n in (os.listdir(parts) if os.path.isdir(parts) else [])
                  if os.path.exists(os.path.join(parts, n, MANIFEST)))
  # Object storage has no directories: one listing of its parts' keys
  # (before 2026-12-07 such a location read as "no such file").
  try:
    keys = storage.list_dir(source, PARTS + "/")
  except InputError:  # (no such bucket: said by the read that follows)
    return None
  if not keys:
    return None
  return sorted(k.split("/")[1] for k in keys
                if k.count("/") == 2 and k.endswith("/" + MANIFEST))


def open_corpus(source: str, data_config: DataConfig, max_len: int):
  """The row table of ``source``: a tokenized directory (read row by row), or
  a JSONL file / glob / seqio task read into memory (``tracer.data``).

  A tokenized directory must have been made with the same tokenizer, overflow
  rule and ``max_len`` as the model expects; an error names what differs.
  """
  files, _ = data_lib.split_source(source)
  if files != source and is_tokenized(files):
    raise InputError(f"--corpus={source}: {files} is a tokenized corpus, whose "
                     "fields were read when it was tokenized; expected it "
                     "without the field names after '#'")
  if is_tokenized(source):
    corpus = TokenizedCorpus(source)
    m = corpus.manifest
    want = {"tokenizer": data_config.tokenizer,
            "sentencepiece_model": data_config.sentencepiece_model,
            "overflow": data_config.overflow, "max_len": max_len}
    diffs = [f"field {k!r} is {getattr(m, k)!r}, the model expects {v!r}"
             for k, v in want.items() if getattr(m, k) != v]
    if not diffs:  # the same path, another model file (retrained, replaced)
      size = int(data_config.vocabulary().vocab_size)
      if m.vocab_size != size:
        diffs.append(f"field 'vocab_size' is {m.vocab_size}, the tokenizer "
                     f"at {data_config.sentencepiece_model or data_config.tokenizer!r} "
                     f"has {size}")
    if diffs:
      raise InputError(f"{storage.join(corpus.location, MANIFEST)}: "
                       + "; ".join(diffs) + " (tokenize again with the "
                       "model's gin config)")
    return corpus
  done = _unfinished_parts(source)
  if done is not None:
    # Grouped by process count: a run on P processes writes "i-of-P", and
    # parts a run on another count left behind are not this run's.
    groups: dict[str, list[str]] = {}
    for name in done:
      groups.setdefault(name.rpartition("-of-")[2] or "?", []).append(name)
    more = "; ".join(
        f"{len(names)} of {int(total) if total.isdigit() else total} "
        f"({', '.join(names[:4])}" + (f" and {len(names) - 4} more" if
                                      len(names) > 4 else "") + ")"
        for total, names in sorted(groups.items()))
    more = f"; parts written so far: {more}" if more else ""
    raise InputError(f"{source}: a directory without {MANIFEST}: not a tokenized "
                     "corpus, or an unfinished one (rerun tracer tokenize; on "
                     f"several processes every part must be written){more}")
  return data_lib.read_corpus(source, data_config.vocabulary(), max_len,
                              data_config.overflow)
