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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Iterable, Sequence

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
              "fill_value": 0}}


def _open(location: str, context: ts.Context = storage.CONTEXT) -> ts.TensorStore:
  return ts.open({"driver": "zarr3", "kvstore": storage.kvstore_spec(location)},
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


def read_manifest(location: str) -> CorpusManifest:
  where = storage.join(location, MANIFEST)
  d = storage.read_json(where)
  if d.get("format") != FORMAT:
    raise InputError(f"{where}: not a tokenized corpus (expected format {FORMAT!r}, "
                     f"got {d.get('format')!r})")
  names = {f.name for f in dataclasses.fields(CorpusManifest)}
  if set(d) != names:
    raise InputError(f"{where}: fields {sorted(set(d) ^ names)} missing or unknown")
  return CorpusManifest(**d)


class _Strings:
  """Variable-length UTF-8 values: a byte string and offsets into it."""

  def __init__(self, location: str, context: ts.Context = storage.CONTEXT):
    self.bytes = _open(storage.join(location, "bytes"), context)
    self.offsets = _open(storage.join(location, "offsets"), context)

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
    self._tokens = _open(storage.join(self.location, "tokens"), context)
    self._lengths = _open(storage.join(self.location, "lengths"), context)
    self._segments = _open(storage.join(self.location, "segments"), context)
    self._ids = _Strings(storage.join(self.location, "ids"), context)
    self._texts = _Strings(storage.join(self.location, "texts"), context)
    self.rows_read = 0
    if self._tokens.shape != (self.manifest.num_rows, self.max_len):
      raise InputError(f"{self.location}/tokens: shape {self._tokens.shape}, the "
                       f"manifest says {(self.manifest.num_rows, self.max_len)}")

  def __len__(self) -> int:
    return self.manifest.num_rows

  def _read(self, array: ts.TensorStore, rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.int64)
    if len(rows) and np.all(np.diff(rows) == 1):
      return array[int(rows[0]):int(rows[-1]) + 1].read().result()
    return array[rows].read().result()

  def read_tokens(self, rows) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 ``[B, max_len]``, lengths int32 ``[B]``) of ``rows``."""
    rows = np.asarray(rows, np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
      raise InputError(f"{self.location}: rows [{rows.min()}, {rows.max()}] out "
                       f"of range [0, {len(self)})")
    self.rows_read += len(rows)
    tokens = self._read(self._tokens, rows).astype(np.int32)
    return tokens, self._read(self._lengths, rows)

  def examples(self, rows) -> dict:
    return data_lib.examples_from_tokens(*self.read_tokens(rows))

  def ids_of(self, rows) -> list[str]:
    return self._ids.get(rows)

  def texts_of(self, rows) -> list[str]:
    return self._texts.get(rows)

  def segments_of(self, rows) -> np.ndarray:
    return self._read(self._segments, rows)

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
             block_rows: int = BLOCK_ROWS, progress=None) -> TokenizedCorpus:
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

  Returns:
    The corpus, opened. An existing complete corpus at ``output`` with the
    same source and settings is returned as is (a rerun does nothing); one with
    other settings is an error.
  """
  output = storage.normalize(output)
  vocab = data_config.vocabulary()
  if is_tokenized(output):
    corpus = TokenizedCorpus(output)
    m = corpus.manifest
    want = {"source": source, "tokenizer": data_config.tokenizer,
            "sentencepiece_model": data_config.sentencepiece_model,
            "max_len": max_len, "overflow": data_config.overflow}
    diffs = [f"{k}: has {getattr(m, k)!r}, asked {v!r}" for k, v in want.items()
             if getattr(m, k) != v]
    if diffs:
      raise InputError(f"{output}: already holds a tokenized corpus with other "
                       f"settings ({'; '.join(diffs)}); choose another --output")
    return corpus
  names = storage.list_dir(output)
  strangers = sorted({n.split("/", 1)[0] for n in names} - set(_ARRAYS))
  if strangers:
    raise InputError(f"{output}: not a tokenized corpus (no {MANIFEST}) and not "
                     f"empty: {strangers[:5]}")
  storage.make_local_dirs(output)
  # Ids are checked unique at the end, in 8 bytes per document.
  label, records = (source, records) if records is not None else (
      data_lib.source_records(source, vocab, unique_ids=False))
  token_dtype = "uint16" if vocab.vocab_size <= 1 << 16 else "int32"
  token_rows = min(block_rows, max(1, TOKEN_CHUNK_BYTES // (
      max_len * np.dtype(token_dtype).itemsize)))
  token_rows = 1 << (token_rows.bit_length() - 1)  # a power of 2: divides blocks
  if block_rows % token_rows:
    raise ValueError(f"block_rows={block_rows} must be a multiple of {token_rows}")
  tokens = _Appender(storage.join(output, "tokens"), token_dtype, (max_len,),
                     token_rows)
  lengths = _Appender(storage.join(output, "lengths"), "int32", (), block_rows)
  segments = _Appender(storage.join(output, "segments"), "int32", (), block_rows)
  ids, texts = (_StringAppender(storage.join(output, n)) for n in ("ids", "texts"))
  hashes: list[np.ndarray] = []
  buf: dict[str, list] = {"ids": [], "texts": [], "segments": [], "tokens": []}
  num_docs = 0

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

  for doc_id, text, j, window in data_lib.rows_of(records, vocab, max_len,
                                                  data_config.overflow):
    num_docs += j == 0
    buf["ids"].append(doc_id)
    buf["texts"].append(text)
    buf["segments"].append(j)
    buf["tokens"].append(window)
    if len(buf["ids"]) == block_rows:
      flush()
  flush()
  if not tokens.size:
    raise InputError(f"{label}: the corpus is empty")
  _check_unique_ids(np.concatenate(hashes), output)
  manifest = CorpusManifest(
      source=source, tokenizer=data_config.tokenizer,
      sentencepiece_model=data_config.sentencepiece_model,
      vocab_size=int(vocab.vocab_size), max_len=max_len,
      overflow=data_config.overflow, num_rows=tokens.size, num_docs=num_docs,
      token_dtype=token_dtype)
  storage.write_text(storage.join(output, MANIFEST),
                     json.dumps(manifest.to_dict(), indent=2, sort_keys=True))
  return TokenizedCorpus(output)


def _check_unique_ids(hashes: np.ndarray, output: str) -> None:
  """Document ids must be unique: 8 bytes per document, sorted (not a set of
  strings, which would cost ~10x the memory at 10^8 documents)."""
  hashes = np.sort(hashes)
  dup = np.flatnonzero(hashes[1:] == hashes[:-1])
  if not len(dup):
    return
  corpus_ids = _Strings(storage.join(output, "ids"))
  segments = _open(storage.join(output, "segments"))
  num_rows = segments.shape[0]
  rows = []
  for lo in range(0, num_rows, BLOCK_ROWS):
    block = np.arange(lo, min(lo + BLOCK_ROWS, num_rows))
    first = segments[block[0]:block[-1] + 1].read().result() == 0
    rows += [(r, v) for r, v, f in zip(block, corpus_ids.get(block), first)
             if f and _id_hash(v) == hashes[dup[0]]]
    if len(rows) >= 2:
      break
  (row_a, doc_id), (row_b, _) = rows[:2]
  raise InputError(f"{output}: duplicate id {doc_id!r} (rows {row_a} and {row_b}); "
                   "document ids must be unique across the whole source")


def open_corpus(source: str, data_config: DataConfig, max_len: int):
  """The row table of ``source``: a tokenized directory (read row by row), or
  a JSONL file / glob / seqio task read into memory (``tracer.data``).

  A tokenized directory must have been made with the same tokenizer, overflow
  rule and ``max_len`` as the model expects; an error names what differs.
  """
  if is_tokenized(source):
    corpus = TokenizedCorpus(source)
    m = corpus.manifest
    want = {"tokenizer": data_config.tokenizer,
            "sentencepiece_model": data_config.sentencepiece_model,
            "overflow": data_config.overflow, "max_len": max_len}
    diffs = [f"field {k!r} is {getattr(m, k)!r}, the model expects {v!r}"
             for k, v in want.items() if getattr(m, k) != v]
    if diffs:
      raise InputError(f"{storage.join(corpus.location, MANIFEST)}: "
                       + "; ".join(diffs) + " (tokenize again with the "
                       "checkpoint's gin config)")
    return corpus
  return data_lib.read_corpus(source, data_config.vocabulary(), max_len,
                              data_config.overflow)
