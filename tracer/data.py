"""Corpus and query inputs: strict JSONL readers, seqio sources, tokenization.

Row rule. Every corpus example has a stable integer *row*: sources are read in
order, each text is tokenized and followed by EOS, and a text longer than
``max_len`` tokens is either truncated to its first ``max_len`` tokens
(``overflow="truncate"``, the default) or split into consecutive windows of
``max_len`` tokens (``overflow="split"``), each window its own example. Rows
number the examples in that order, so they depend only on the source and the
rule, never on devices or hosts. A glob of JSONL shards is read shard after
shard in sorted name order. ``corpus.ids_of(rows)`` and ``corpus.texts_of(rows)``
map rows back to their source ids and the texts the examples cover.

Corpus files are JSONL or Parquet (HF datasets' release format: FineWeb, The
Stack), known by their first bytes, as are JSONL files compressed with gzip,
bzip2, xz or zstd; all may live in object storage (streamed). A corpus file
whose first record has no ``id`` gets ids ``"<file>:<line or row>"``
(``_PositionIds``).

Two row tables implement that interface: ``Corpus`` here (built in memory from
a source: the small path) and ``tracer.corpus.TokenizedCorpus`` (a corpus
tokenized once to disk, read row by row: the pod path).

Examples are dicts of numpy arrays (see ``tracer.model``): ``inputs``,
``targets`` int32[L] and ``weights`` float32[L].
"""

from __future__ import annotations

import bisect
import bz2
import functools
import fnmatch
import glob
import gzip
import hashlib
import importlib
import io
import json
import lzma
import os
import posixpath
import queue
import re
import sys
import tempfile
import threading
import warnings
import zlib
from typing import Any, Callable, Collection, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from tracer import storage
from tracer.config import DataConfig
from tracer.errors import InputError, at

PAD_ID = 0
EOS_ID = 1


# --- tokenizers ------------------------------------------------------------

# What TensorFlow's native libraries log while they load (absl C++ logging,
# which ignores TF_CPP_MIN_LOG_LEVEL): INFO lines and absl's notice.
_LOAD_NOISE = re.compile(
    r"(WARNING: All log messages before absl::InitializeLog\(\) is called are "
    r"written to STDERR|I\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] .*"
    # On a machine without a GPU, TensorFlow's CUDA plugin reports so as an
    # error; nothing is wrong.
    r"|[EW]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] .*(cuInit|CUDA|cuda drivers).*)\r?\n?")


def quiet_import(name: str):
  """``importlib.import_module(name)`` for a module that imports TensorFlow
  (seqio, the gemma library: seconds), without the lines TensorFlow's native
  libraries write to stderr as they load (``_LOAD_NOISE``); anything else
  written to stderr meanwhile is passed on. A launch script's stderr then
  holds only what matters (an ``error:`` line, warnings)."""
  if name in sys.modules:
    return sys.modules[name]
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      return importlib.import_module(name)
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode("utf-8", "replace").splitlines(True):
        if not _LOAD_NOISE.fullmatch(line):
          sys.stderr.write(line)
      sys.stderr.flush()


def _seqio():
  """``import seqio``, quietly (``quiet_import``)."""
  return quiet_import("seqio")


class ByteVocabulary:
  """UTF-8 bytes as ids: pad 0, eos 1, unk 2, byte b -> b + 3 (259 ids).

  The same ids, ``encode`` and ``decode`` as ``seqio.ByteVocabulary``
  (tested against it), without importing seqio, which imports TensorFlow:
  seconds of start-up and lines of its logging. ``as_seqio`` gives seqio's
  own where seqio needs one (a seqio task's output features).
  """

  pad_id, eos_id, unk_id, bos_id = 0, 1, 2, None
  _OFFSET, _BYTES = 3, 256
  vocab_size = _OFFSET + _BYTES

  def encode(self, s: str | bytes) -> list[int]:
    """Token ids of ``s``, without EOS."""
    s = s.decode() if isinstance(s, bytes) else s
    return [b + self._OFFSET for b in s.encode("utf-8")]

  def decode(self, ids: Iterable[int]) -> str:
    """The text of ``ids`` up to the first EOS; special and out-of-range ids
    are dropped, as are invalid UTF-8 sequences."""
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return bytes(i - self._OFFSET for i in ids
                 if self._OFFSET <= i < self.vocab_size).decode("utf-8", errors="ignore")

  def __eq__(self, other) -> bool:
    return isinstance(other, ByteVocabulary)

  def __hash__(self) -> int:
    return hash(ByteVocabulary)


def make_vocabulary(kind: str = "byte", sentencepiece_model: str | None = None):
  """A vocabulary that needs no download.

  ``kind="byte"``: ``ByteVocabulary`` (seqio's byte ids; seqio is not
  imported). ``kind="sentencepiece"``: ``seqio.SentencePieceVocabulary`` of a
  model file made by ``train_sentencepiece``. ``kind="gemma"``: a Gemma
  tokenizer file (``tracer.gemma_family.GemmaVocabulary``; the gemma extra).
  """
  if kind == "byte":
    return ByteVocabulary()
  if kind in ("sentencepiece", "gemma"):
    if not sentencepiece_model or not os.path.exists(sentencepiece_model):
      raise InputError(f"{sentencepiece_model}: {kind} model file not found")
    if kind == "gemma":
      from tracer import family  # pylint: disable=g-import-not-at-top
      family.get("gemma")  # imports tracer.gemma_family, or says how to install it
      from tracer import gemma_family  # pylint: disable=g-import-not-at-top
      return gemma_family.GemmaVocabulary(sentencepiece_model)
    return _seqio().SentencePieceVocabulary(sentencepiece_model)
  raise InputError(f"tokenizer kind {kind!r}: expected 'byte', 'sentencepiece' or "
                   "'gemma'")


def as_seqio(vocab):
  """``vocab`` as a seqio vocabulary (``ByteVocabulary`` -> seqio's own)."""
  return _seqio().ByteVocabulary() if isinstance(vocab, ByteVocabulary) else vocab


def train_sentencepiece(texts: Iterable[str], model_prefix: str,
                        vocab_size: int = 512) -> str:
  """Trains a sentencepiece model on ``texts``; returns the ``.model`` path.

  Ids follow seqio's convention (pad 0, eos 1, unk 2).
  """
  import sentencepiece as spm
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(list(texts)), model_prefix=model_prefix,
      vocab_size=vocab_size, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
      minloglevel=2)
  return model_prefix + ".model"


# --- strict JSONL ------------------------------------------------------------

# The longest line a JSONL reader accepts (bytes, without its line ending): a
# document longer than this is almost surely not one (a file without line
# breaks, a whole JSON array on one line, binary data), and the limit bounds
# the memory one line can take.
MAX_LINE_BYTES = 8 << 20
_BOM = b"\xef\xbb\xbf"


class _ZstdFrames(io.RawIOBase):
  """A zstd file's frames, one after another, decompressed a few blocks at a
  time. A file that ends inside a frame is an EOFError, as gzip's and bz2's
  readers report theirs.

  zstandard's decompressobj returns all that its input expands to (64 KiB of
  RLE blocks: 2 GiB), and its readers that bound their output return a file
  cut short, or followed by junk, as a shorter file without a word. So the
  frame and block headers (RFC 8878 section 3.1) are followed here as the
  bytes go by, and each decompress call is given at most ``_BLOCKS`` blocks:
  at most 128 KiB of text each, the format's block limit."""

  _BLOCKS = 32
  # Bytes in each header: a frame's magic number, a zstd frame's descriptor,
  # a skippable frame's length, a block's header.
  _HEADER = {"magic": 4, "descriptor": 1, "skippable": 4, "block": 3}

  def __init__(self, f):
    super().__init__()
    import zstandard  # pylint: disable=g-import-not-at-top
    # Up to zstd's largest window (2 GiB), which files written with
    # ``zstd --long`` declare (zstandard's default stops at 128 MiB): a
    # frame's decoder holds its window, so such a file takes that much
    # memory while it is read, as ``zstd -d --long=31`` does.
    self._f = f
    self._new_frame = zstandard.ZstdDecompressor(max_window_size=1 << 31).decompressobj
    self._error = zstandard.ZstdError
    self._frame, self._in_frame = self._new_frame(), False
    self._out, self._pending = memoryview(b""), memoryview(b"")
    self._failed: BaseException | None = None  # raised once _out is read
    # Where the headers stand: the header being read ("lost" past bytes
    # that are not zstd: the decompressor reports those), its bytes so far,
    # the bytes to pass before the next header, the frame's checksum flag.
    self._state, self._head, self._skip, self._checksum = "magic", b"", 0, 0

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    while not self._out:
      if self._failed is not None:
        raise self._failed
      if not self._pending:
        self._pending = memoryview(self._f.read(1 << 16))
        if not self._pending:
          if self._in_frame or (self._state != "lost" and (
              self._state != "magic" or self._head or self._skip)):
            raise EOFError("the file ends inside a zstd frame")
          return 0
      n = self._walk(self._pending)
      self._out = memoryview(self._decompress(self._pending[:n]))
      self._pending = self._pending[n:]
    n = min(len(buffer), len(self._out))
    buffer[:n] = self._out[:n]
    self._out = self._out[n:]
    return n

  def _decompress(self, data) -> bytes:
    out = []
    while data:
      try:
        out.append(self._frame.decompress(data))
      except self._error as e:
        # The lines before the damage are read first, so that the error
        # names the line it is in.
        self._failed = OSError(str(e))
        break
      self._in_frame = not self._frame.eof
      data = self._frame.unused_data if self._frame.eof else b""
      if self._frame.eof:
        self._frame = self._new_frame()
    return b"".join(out)

  def _walk(self, data) -> int:
    """How many bytes of ``data`` to decompress next: up to the
    (_BLOCKS + 1)-th block header that starts in it; the header state moves
    past them."""
    i, blocks = 0, 0
    while i < len(data) and self._state != "lost":
      if self._skip:
        n = min(self._skip, len(data) - i)
        self._skip, i = self._skip - n, i + n
        continue
      if self._state == "block" and not self._head:
        if blocks == self._BLOCKS:
          return i
        blocks += 1
      n = min(self._HEADER[self._state] - len(self._head), len(data) - i)
      self._head, i = self._head + bytes(data[i:i + n]), i + n
      if len(self._head) == self._HEADER[self._state]:
        self._read_header(int.from_bytes(self._head, "little"))
        self._head = b""
    return len(data)

  def _read_header(self, value: int) -> None:
    if self._state == "magic":
      self._state = ("descriptor" if value == 0xFD2FB528 else
                     "skippable" if value >> 4 == 0x184D2A5 else "lost")
    elif self._state == "skippable":
      self._skip, self._state = value, "magic"
    elif self._state == "descriptor":
      # Window byte (absent in a single segment), dictionary id, content size.
      single = value >> 5 & 1
      self._skip = (1 - single) + (0, 1, 2, 4)[value & 3] + (
          single, 2, 4, 8)[value >> 6]
      self._checksum, self._state = value >> 2 & 1, "block"
    else:  # a block: last (1 bit), type (2 bits: raw, RLE, compressed), size
      kind = value >> 1 & 3
      if kind == 3:  # reserved
        self._state = "lost"
        return
      self._skip = 1 if kind == 1 else value >> 3
      if value & 1:
        self._skip += 4 * self._checksum
        self._state = "magic"


class _Chunks(io.RawIOBase):
  """A decompressing stream (GzipFile, BZ2File, LZMAFile) as a raw stream
  of one decompressed chunk a read (``read1``). A buffered reader's fill of
  many chunks drops them all when one fails: a file cut short then lost up to
  1 MiB of whole lines, and the error named the first of them."""

  def __init__(self, stream):
    super().__init__()
    self._stream = stream

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    chunk = self._stream.read1(len(buffer))
    buffer[:len(chunk)] = chunk
    return len(chunk)


# Compressed files, known by their first bytes rather than their names (C4's
# shards are *.json.gz, the Pile's *.jsonl.zst): each is read through its
# stream, which also reports a file cut short (EOFError) or damaged.
_COMPRESSED = ((b"\x1f\x8b", "gzip",
                lambda f: _Chunks(gzip.GzipFile(fileobj=f, mode="rb"))),
               (b"BZh", "bzip2", lambda f: _Chunks(bz2.BZ2File(f))),
               (b"\xfd7zXZ\x00", "xz", lambda f: _Chunks(lzma.LZMAFile(f))),
               (b"\x28\xb5\x2f\xfd", "zstd", _ZstdFrames),
               # pzstd's files start with a skippable frame (magic 0x184D2A5?).
               *((bytes([m, 0x2A, 0x4D, 0x18]), "zstd", _ZstdFrames)
                 for m in range(0x50, 0x60)))


_DECOMPRESSION_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)


def decompressed(f: io.BufferedReader, path) -> tuple[Any, str | None]:
  """(the file's text bytes, the compression's name or None)."""
  head = f.peek(6)[:6]
  for magic, kind, stream in _COMPRESSED:
    if head.startswith(magic):
      try:
        # Lines are cut from a 1 MiB buffer (filled a chunk at a time:
        # ``_Chunks``): GzipFile's own readline took 1.6x as long (4M lines:
        # 1.46 s against 0.93 s, inflating included).
        return io.BufferedReader(stream(f), 1 << 20), kind
      except ImportError as e:
        raise InputError(f"{path}: {kind}-compressed; reading it needs the "
                         f"{e.name} package (pip install {e.name})") from None
  return f, None


def _read_error(path, lineno: int, kind: str | None, e: BaseException) -> InputError:
  what = f"the {kind} stream is damaged or cut short" if kind else "cannot read"
  return InputError(f"{at(path, lineno)}: {what} ({storage.reason(e)})"
                    f"{'; expected a whole ' + kind + ' file' if kind else ''}")


def count_lines(path) -> int:
  """How many lines ``iter_jsonl`` numbers in ``path`` (blank ones too; the
  last may lack its line break), counted in 1 MiB reads of the (decompressed)
  text, nothing parsed."""
  with storage.open_binary(path) as opened:
    f, kind = decompressed(opened, path)
    count, last = 0, b"\n"
    while True:
      try:
        # One fill at most: a read of several that fails drops the first.
        chunk = f.read1(1 << 20)
      except _DECOMPRESSION_ERRORS as e:
        raise _read_error(path, count + 1, kind, e) from None
      if not chunk:
        return count + (last != b"\n")
      count, last = count + chunk.count(b"\n"), chunk[-1:]


def line_share(num_lines: int, share: tuple[int, int]) -> range:
  """The line numbers (1-based) of the ``share[0]``-th of ``share[1]`` equal
  consecutive runs of ``num_lines`` lines."""
  index, count = share
  return range(num_lines * index // count + 1, num_lines * (index + 1) // count + 1)


def iter_jsonl(path, share: tuple[int, int] | None = None
               ) -> Iterator[tuple[int, dict]]:
  """Yields (line number, JSON object) for every non-blank line of ``path``,
  or with ``share = (i, n)`` of the i-th of n equal runs of its lines
  (``line_share``: the file is read once to count them, then the lines
  before the run are skipped unparsed; numbers are the file's).

  The file may be gzip, bzip2, xz or zstd-compressed (known by its first bytes);
  a file in object storage is streamed (``storage.open_binary``). A UTF-8
  byte order mark at the start and CRLF line endings are accepted (the same
  rows as without them). Errors (missing file, a damaged or cut-short
  compressed file, bad UTF-8, bad JSON, not an object, a line over
  ``MAX_LINE_BYTES``) name the file and line.
  """
  lines = None if share is None else line_share(count_lines(path), share)
  with storage.open_binary(path) as opened:
    f, kind = decompressed(opened, path)
    lineno = 0
    try:
      if f.peek(len(_BOM))[:len(_BOM)] == _BOM:
        f.read(len(_BOM))  # not part of line 1's MAX_LINE_BYTES
    except _DECOMPRESSION_ERRORS as e:
      raise _read_error(path, 1, kind, e) from None
    if lines is not None:
      lineno = _skip_lines(f, lines.start - 1, path, kind)
    while lines is None or lineno < lines.stop - 1:
      # Bounded: a file without line breaks is not read whole.
      try:
        raw = f.readline(MAX_LINE_BYTES + 2)
      except _DECOMPRESSION_ERRORS as e:
        raise _read_error(path, lineno + 1, kind, e) from None
      if not raw:
        if not lineno and kind is None:
          _check_empty_by_name(path)
        return
      lineno += 1
      where = at(path, lineno)
      if len(raw.rstrip(b"\r\n")) > MAX_LINE_BYTES:
        raise InputError(f"{where}: line longer than {MAX_LINE_BYTES:,} bytes "
                         "(tracer.data.MAX_LINE_BYTES); expected one JSON object "
                         "per line")
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        utf16 = lineno == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff")
        raise InputError(f"{where}: not valid UTF-8 ({e.reason} at byte "
                         f"{e.start}{'; a UTF-16 file?' if utf16 else ''}); "
                         "expected UTF-8 text") from None
      if not line.strip():
        continue
      try:
        record = json.loads(line.rstrip("\r\n"))
      except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise InputError(f"{where}: not valid JSON ({_json_reason(e)}); "
                         "expected one JSON object per line") from None
      if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got "
                         f"{type(record).__name__}")
      yield lineno, record


# Names whose files are never empty: a 0-byte one is an aborted write or copy.
_NEVER_EMPTY = {".gz": "gzip", ".gzip": "gzip", ".bz2": "bzip2", ".xz": "xz",
                ".zst": "zstd", ".zstd": "zstd", ".parquet": "Parquet"}


def _check_empty_by_name(path) -> None:
  """InputError if the empty file ``path`` is named as a compressed or
  Parquet file (known by first bytes, an empty one would read as no lines)."""
  kind = _NEVER_EMPTY.get(os.path.splitext(str(path))[1].lower())
  if kind:
    raise InputError(f"{path}: empty (0 bytes), but named as a {kind} file, which "
                     f"is never empty; expected a whole {kind} file (was its "
                     "write or copy cut short?)")


def _json_reason(e: BaseException) -> str:
  """Why ``json.loads`` refused a text: where, for a syntax error; else what
  Python could not hold (nesting past the recursion limit, an integer past
  ``sys.get_int_max_str_digits``)."""
  if isinstance(e, json.JSONDecodeError):
    return re.sub(r"\s+at$", "", e.msg) + f" at column {e.colno}"
  if isinstance(e, RecursionError):
    return "nested too deeply"
  return str(e).split(";")[0]


def _skip_lines(f, count: int, path, kind: str | None) -> int:
  """Reads past ``count`` lines of ``f`` (any length: a piece counts once it
  ends a line) and returns how many it passed (fewer at the end)."""
  passed = 0
  while passed < count:
    try:
      piece = f.readline(1 << 20)
    except _DECOMPRESSION_ERRORS as e:
      raise _read_error(path, passed + 1, kind, e) from None
    if not piece:
      break
    passed += piece.endswith(b"\n")
  return passed


# --- Parquet ---------------------------------------------------------------------

_PARQUET_MAGIC = b"PAR1"
# Rows turned into Python objects at a time: memory beside the row group's bytes.
_PARQUET_BATCH = 1024


def _starts_with(path, magic: bytes) -> bool:
  """True if the file's first bytes are ``magic`` (InputError if it is missing)."""
  location = os.fspath(path)
  if storage.is_url(location):
    return storage.ObjectReads(location).read(0, len(magic)) == magic
  with storage.open_binary(location) as f:
    return f.read(len(magic)) == magic


def _pyarrow(path):
  try:
    return importlib.import_module("pyarrow"), importlib.import_module(
        "pyarrow.parquet")
  except ImportError:
    raise InputError(f"{path}: a Parquet file; reading it needs the pyarrow "
                     "package (pip install pyarrow)") from None


def _column_spans(metadata, names: Sequence[str], groups: Sequence[int]
                  ) -> list[tuple[int, int]]:
  """Per row group of ``groups``, the bytes ``[start, stop)`` holding the
  columns ``names``."""
  spans = []
  for g in groups:
    group = metadata.row_group(g)
    lo = hi = None
    for c in range(group.num_columns):
      column = group.column(c)
      try:
        name = column.path_in_schema.split(".")[0]
      except UnicodeDecodeError:  # read as pyarrow reads it from a disk (a
        name = None               # traceback here before 2026-12-07)
      if name is not None and name not in names:
        continue
      start = column.data_page_offset
      if column.has_dictionary_page and column.dictionary_page_offset:
        start = min(start, column.dictionary_page_offset)
      lo = start if lo is None else min(lo, start)
      hi = max(hi or 0, start + column.total_compressed_size)
    if lo is not None:
      spans.append((lo, hi))
  return spans


class _ObjectParquet(io.RawIOBase):
  """A Parquet object as the seekable file pyarrow reads, one row group ahead.

  Given the footer's metadata, pyarrow reads only the ranges the footer names:
  the column chunks, one span per row group for the columns read. Each read is
  served from its span, fetched whole while the span before it is decoded;
  any other range is read as asked. The file's size is taken as the end of
  the last span (the footer, past it, is already parsed): an object's size is
  not known without reading it.
  """

  def __init__(self, reads: "storage.ObjectReads", spans: list[tuple[int, int]]):
    super().__init__()
    self._reads, self._spans = reads, sorted(spans)
    self._size = max((hi for _, hi in self._spans), default=0)
    self._pos = 0
    self._flight: dict[int, Any] = {}  # span index -> its read in flight
    self._have = (0, 0, memoryview(b""))  # (start, stop, bytes) of a span at hand
    self._start(0)  # pyarrow's first read is the first row group's

  def readable(self) -> bool:
    return True

  def seekable(self) -> bool:
    return True

  def tell(self) -> int:
    return self._pos

  def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
    base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
    self._pos = base + offset
    return self._pos

  def _start(self, i: int) -> None:
    if i < len(self._spans) and i not in self._flight:
      self._flight[i] = self._reads.start(*self._spans[i])

  def _bytes(self, start: int, stop: int) -> memoryview:
    lo, hi, value = self._have
    if not lo <= start < stop <= hi:
      i = bisect.bisect_right(self._spans, (start, float("inf"))) - 1
      if i < 0 or stop > self._spans[i][1]:
        return memoryview(self._reads.read(start, stop) or b"")
      self._start(i)
      lo, hi = self._spans[i]
      value = memoryview(self._reads.result(self._flight.pop(i), lo) or b"")
      self._have = (lo, hi, value)
      for j in list(self._flight):  # a seek back: reads no longer needed
        if j < i:
          del self._flight[j]
      self._start(i + 1)
    return value[start - lo:stop - lo]

  def readinto(self, buffer) -> int:
    data = self._bytes(self._pos, self._pos + len(buffer)) if len(buffer) else b""
    buffer[:len(data)] = data
    self._pos += len(data)
    return len(data)


def _parquet_metadata(path):
  """(pyarrow's FileMetaData, ``storage.ObjectReads`` or None for a local
  file) of a Parquet file; its footer only (an object's by suffix reads: its
  size is not known)."""
  pa, pq = _pyarrow(path)
  location = os.fspath(path)
  cut = (f"{location}: not a whole Parquet file (%s); expected a Parquet file "
         "written to its end")
  try:
    if not storage.is_url(location):
      return pq.read_metadata(location), None
    reads = storage.ObjectReads(location)
    tail = reads.read(-8, None)
    if tail is None or len(tail) < 8 or tail[4:] != _PARQUET_MAGIC:
      raise InputError(cut % "no footer at its end")
    footer = reads.read(-(int.from_bytes(tail[:4], "little") + 8), None)
    if footer is None:
      raise InputError(cut % "its footer is longer than the file")
    return pq.read_metadata(pa.BufferReader(_PARQUET_MAGIC + footer)), reads
  except (pa.ArrowException, OSError) as e:
    raise InputError(cut % storage.reason(e)) from None
  except UnicodeDecodeError as e:  # (a traceback before 2026-12-07)
    raise InputError(cut % ("its footer names a column in bytes that are not "
                            f"UTF-8: {e.reason}")) from None


def _parquet_file(path, names: Sequence[str] | None, groups: Sequence[int] | None):
  """pyarrow's ParquetFile of a local file or an object (``_ObjectParquet``)
  reading the columns ``names`` (every column if None) of the row groups
  ``groups`` (all if None)."""
  _, pq = _pyarrow(path)
  metadata, reads = _parquet_metadata(path)
  # A page that carries a CRC (Spark's writer sets one, pyarrow's with
  # write_page_checksum=True) is checked against it: a flipped bit in a
  # text was read as it stood.
  if reads is None:
    return pq.ParquetFile(os.fspath(path), metadata=metadata,
                          page_checksum_verification=True)
  if names is None:
    names = metadata.schema.to_arrow_schema().names
  if groups is None:
    groups = range(metadata.num_row_groups)
  return pq.ParquetFile(_ObjectParquet(reads, _column_spans(metadata, names, groups)),
                        metadata=metadata, page_checksum_verification=True)


def iter_parquet(path, columns: Sequence[str] | None = None, id_column: str = "id",
                 row_groups: range | None = None) -> Iterator[tuple[int, dict]]:
  """Yields (row number from 1, record) for every row of a Parquet file, or
  of its ``row_groups`` (numbered as in the whole file).

  A record holds the ``columns`` the file has (every column if None) as
  Python values; an integer ``id_column`` gives decimal strings (a column has
  one type, so ``1`` and ``"1"`` cannot both occur). A file in object storage
  is read row group by row group, the next one's bytes in flight
  (``_ObjectParquet``). A file cut short or damaged is an InputError naming
  the file, and the row for damage found while reading; so is a column to
  read that the file names twice.
  """
  pa, _ = _pyarrow(path)
  location = os.fspath(path)
  parquet_file = _parquet_file(location, columns, row_groups)
  schema = parquet_file.schema_arrow
  names = [n for n in schema.names if columns is None or n in columns]
  if not names:
    raise InputError(f"{location}: no column {' or '.join(map(repr, columns))}; "
                     f"its columns are {_quoted(schema.names)}{_OTHER_NAMES}")
  # pyarrow writes a table with a name twice, but cannot read either column
  # by that name; nor could a record hold both.
  if len(set(names)) < len(names):
    n = next(n for n in names if names.count(n) > 1)
    raise InputError(f"{location}: the column {n!r} occurs {names.count(n)} "
                     "times; expected each column name once")
  integer_ids = (id_column in names
                 and pa.types.is_integer(schema.field(id_column).type))
  metadata = parquet_file.metadata
  groups = range(metadata.num_row_groups) if row_groups is None else row_groups
  row = sum(metadata.row_group(g).num_rows for g in range(groups.start))
  for group in groups:
    first, size = row + 1, metadata.row_group(group).num_rows
    batches = parquet_file.iter_batches(batch_size=_PARQUET_BATCH, row_groups=[group],
                                        columns=names, use_threads=False)
    while True:
      try:
        batch = next(batches, None)
      except (pa.ArrowException, OSError) as e:
        raise InputError(
            f"{at(location, row + 1)}: the Parquet data is damaged (in row group "
            f"{group}, rows {first}-{first + size - 1}: {storage.reason(e)}); "
            "expected a whole Parquet file") from None
      if batch is None:
        break
      values = {}
      for n in names:
        try:
          values[n] = batch.column(n).to_pylist()
        except UnicodeDecodeError as e:  # pyarrow does not check strings it reads
          # Row by row: the string may be inside a list or struct.
          column = batch.column(n)
          bad = next(i for i in range(len(column))
                     if not _converts(column.slice(i, 1)))
          raise InputError(
              f"{at(location, row + bad + 1)}: column {n!r} is not valid UTF-8 "
              f"({e.reason}); expected UTF-8 text") from None
      if integer_ids:
        values[id_column] = [None if v is None else str(v)
                             for v in values[id_column]]
      for record in zip(*values.values()):
        row += 1
        yield row, dict(zip(names, record))


def _converts(array) -> bool:
  """False if an Arrow array holds a string that is not UTF-8."""
  try:
    array.to_pylist()
  except UnicodeDecodeError:
    return False
  return True


def iter_records(path, columns: Sequence[str] | None = None, id_column: str = "id",
                 row_groups: range | None = None,
                 share: tuple[int, int] | None = None) -> Iterator[tuple[int, dict]]:
  """(line or row number, record) of a JSONL file (``iter_jsonl``, its
  ``share`` of lines) or a Parquet file (``iter_parquet``, reading
  ``columns`` of ``row_groups``), known by its first bytes."""
  if row_groups is not None or _starts_with(path, _PARQUET_MAGIC):
    return iter_parquet(path, columns, id_column, row_groups)
  return iter_jsonl(path, share)


def _encodable(text: str) -> bool:
  """False if ``text`` holds a lone surrogate (JSON allows ``"\\ud800"``; no
  tokenizer can encode it)."""
  if text.isascii():
    return True
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def _quoted(names: Sequence[str]) -> str:
  return ", ".join(repr(n) for n in names)


# How a corpus names other fields (``split_source``), for errors about them.
_OTHER_NAMES = " (other names go after '#': --corpus='FILES#text=<field>,id=<field>')"

# Fields whose type is checked wherever they appear in corpus or query lines.
STRING_FIELDS = ("id", "text", "prompt", "target", "bucket")
_STRING_LIST_FIELDS = ("fact_doc_ids",)


def read_records(path, required: Sequence[str], nonempty: Sequence[str] = (),
                 unique_ids: bool = True,
                 convert: Callable[[str, dict], dict] | None = None,
                 columns: Sequence[str] | None = None,
                 fields: dict[str, str] | None = None,
                 row_groups: range | None = None,
                 share: tuple[int, int] | None = None
                 ) -> Iterator[tuple[int, dict]]:
  """Yields (line number, record) of corpus or query lines, strictly.

  The file is JSONL or Parquet (``iter_records``; of a Parquet file only
  ``columns`` are read, every column if None, and its row numbers stand for
  line numbers; ``row_groups``: of those only; ``share``: of a JSONL file's
  lines, that run only, ``iter_jsonl``). ``fields`` maps a field to
  its name in the file
  (``split_source``: ``{"text": "content"}``); records are yielded under
  tracer's names, and errors use the file's.

  Every record holds the ``required`` fields; ``id``, ``text``, ``prompt``,
  ``target`` and ``bucket`` are strings and ``fact_doc_ids`` a list of strings
  wherever they appear; ``nonempty`` fields must not be blank; ids are unique
  (unless ``unique_ids=False``: the caller checks, in less memory than a dict
  of every id). Blank lines are skipped. Errors name the file, line and field.
  ``convert(where, record)``, if given, maps each record (``where`` is
  ``file:line``) before these checks.
  """
  # The file's name -> ours, for fields named otherwise, and back for errors.
  renamed = {name: field for field, name in (fields or {}).items() if name != field}
  shown = {field: name for name, field in renamed.items()}
  seen = {}
  for lineno, record in iter_records(path, columns,
                                     (fields or {}).get("id", "id"), row_groups,
                                     share):
    where = at(path, lineno)
    if renamed:  # a field the file has under our name is not the one named
      record = {renamed.get(k, k): v for k, v in record.items()
                if k in renamed or k not in shown}
    if convert is not None:
      record = convert(where, record)
    for field in required:
      if field not in record:
        raise InputError(f"{where}: missing field {shown.get(field, field)!r}; "
                         "expected an object with "
                         f"{_quoted([shown.get(f, f) for f in required])}"
                         + (_OTHER_NAMES if fields is not None else ""))
    for field in STRING_FIELDS:
      if field in record:
        if not isinstance(record[field], str):
          raise InputError(f"{where}: field {shown.get(field, field)!r} must be a "
                           f"string, got {type(record[field]).__name__}")
        if not _encodable(record[field]):
          raise InputError(f"{where}: field {shown.get(field, field)!r} holds a "
                           "lone surrogate (a \\ud800-\\udfff escape); expected "
                           "Unicode text")
    for field in _STRING_LIST_FIELDS:
      value = record.get(field, [])
      if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{where}: field {field!r} must be a list of strings")
    for field in nonempty:
      if not record[field].strip():
        raise InputError(f"{where}: field {shown.get(field, field)!r} is empty or "
                         "only whitespace; expected a non-blank string")
    if "id" in required and unique_ids:
      if record["id"] in seen:
        raise InputError(f"{where}: duplicate id {record['id']!r} (first at line "
                         f"{seen[record['id']]}); ids must be unique")
      seen[record["id"]] = lineno
    yield lineno, record


def read_queries(path: str) -> list[dict]:
  """Query lines as ``{"id", "prompt", "target", ...}``; extra fields are kept.

  A file holds tracer's records or the TrackStar authors' (``from_authors``),
  not both: the first line decides, a line in the other format is an error.
  A line carrying a field tracer writes into results (``WRITTEN_FIELDS``) is
  an error in tracer's format; in the authors' it is dropped.
  """
  queries = []
  for lineno, record in read_records(path, ("id", "prompt", "target"),
                                     ("id", "target"), convert=QueryFormat()):
    check_json_values(at(path, lineno), record)
    queries.append(record)
  if not queries:
    raise InputError(f"{path}: no queries")
  return queries


def check_json_values(where: str, record: dict) -> None:
  """A query's fields are copied into its results line: each must be a JSON
  value (a Parquet column may hold a timestamp or bytes; a JSONL line may
  hold NaN, which strict JSON readers refuse)."""
  for key, value in record.items():
    try:
      json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
      kind = re.search(r"type (\w+)", str(e))  # TypeError: "Object of type X ..."
      what = ("NaN or infinity" if isinstance(e, ValueError) else
              "values nested too deeply" if isinstance(e, RecursionError) else
              f"a {kind.group(1) if kind else type(value).__name__}")
      raise InputError(f"{where}: field {key!r} holds {what}; expected a JSON "
                       "value (a string, number, bool, list, object or null), "
                       "copied into the results") from None


# --- the TrackStar authors' query records --------------------------------------
# PAIR-code/pretraining-tda (README "Evaluation queries" and "TDA method
# results"): their results files hold each query as example_id,
# inputs_plaintext, targets_plaintext; their T-REx prompt sets as fact_id,
# prompt0 (the prompt the paper used; prompt1, prompt2 are other templates),
# entity1 (the target), with entity0, relation, aliases, URIs, ... beside.

# Where each of our query fields is found in their records, first match wins.
AUTHORS_QUERY_FIELDS = {
    "id": ("example_id", "fact_id", "trex_id"),
    "prompt": ("inputs_plaintext", "prompt0"),
    "target": ("targets_plaintext", "entity1"),
}
# Their names tracer writes back from ours, so not passed through twice.
_AUTHORS_RENAMED = frozenset({"example_id", "inputs_plaintext", "targets_plaintext"})

# What tracer writes into a results line besides the query's own fields
# (``tracer.evaluate.make_result_row``, ``tracer.pipeline.result_rows``): a
# query carrying one of them would be overwritten, so none may.
WRITTEN_FIELDS = frozenset({
    "query_id", "example_id", "inputs_plaintext", "targets_plaintext",
    "proponent_ids", "proponent_scores", "proponents", "proponent_correct",
    "opponent_ids", "opponent_scores", "opponents", "opponent_correct",
    "prediction", "prediction_probability", "target_probability",
    "model_confidence", "temperature_samples", "error"})


def is_authors_query(record: dict) -> bool:
  """True for a query line in the authors' format: their prompt field, not ours."""
  return "prompt" not in record and any(
      f in record for f in AUTHORS_QUERY_FIELDS["prompt"])


def _authors_value(where: str, record: dict, ours: str) -> str:
  """Our field ``ours`` from their record: a non-blank string (an integer id
  is taken as its decimal string)."""
  names = AUTHORS_QUERY_FIELDS[ours]
  name = next((n for n in names if n in record), None)
  if name is None:
    raise InputError(f"{where}: missing field {names[0]!r}; a query in the "
                     f"TrackStar authors' format needs one of {_quoted(names)}")
  value = record[name]
  if ours == "id" and isinstance(value, int) and not isinstance(value, bool):
    value = str(value)
  if not isinstance(value, str):
    raise InputError(f"{where}: field {name!r} must be a string, got "
                     f"{type(value).__name__}")
  if ours != "prompt" and not value.strip():
    raise InputError(f"{where}: field {name!r} is empty or only whitespace; "
                     "expected a non-blank string")
  return value


def authors_id(where: str, record: dict) -> str:
  """The query id of a record in the authors' format (``example_id``, else
  ``fact_id``, else ``trex_id``), as ``from_authors`` takes it."""
  return _authors_value(where, record, "id")


def from_authors(where: str, record: dict) -> dict:
  """One query line in the authors' format as ours (``AUTHORS_QUERY_FIELDS``).

  Returns ``{"id", "prompt", "target", ...}`` with every other field of the
  line passed through (``fact_id``, ``relation``, aliases, ``prompt0`` and
  ``entity1`` of a prompt set, ...), except ``example_id``,
  ``inputs_plaintext``, ``targets_plaintext`` (tracer writes them back, the
  same values) and another run's outputs: ``WRITTEN_FIELDS`` and every
  ``proponent*`` / ``opponent*`` list (e.g. ``proponent_ais_scores``), which
  would sit beside our proponents and describe theirs.
  """
  out = {ours: _authors_value(where, record, ours) for ours in AUTHORS_QUERY_FIELDS}
  for key, value in record.items():
    if (key in _AUTHORS_RENAMED or key in WRITTEN_FIELDS
        or key.startswith(("proponent", "opponent"))):
      continue
    out.setdefault(key, value)
  return out


class QueryFormat:
  """``read_records``'s ``convert`` for query files: our records as they are,
  the authors' through ``from_authors``; one format per file."""

  def __init__(self):
    self.first: tuple[bool, str] | None = None  # (authors?, where) of line 1

  def __call__(self, where: str, record: dict) -> dict:
    authors = is_authors_query(record)
    if "prompt" not in record and self.first is not None:
      # No prompt in either format: the file's format says which is missing
      # (not "a query in tracer's format").
      authors = authors or self.first[0]
    if self.first is None:
      self.first = (authors, where)
    elif authors != self.first[0]:
      names = ("the TrackStar authors' format (inputs_plaintext/prompt0)",
               "tracer's format (id, prompt, target)")
      raise InputError(f"{where}: a query in {names[not authors]}, but "
                       f"{self.first[1]} is in {names[authors]}; expected one "
                       "format per file")
    if authors:
      record = from_authors(where, record)
    clash = [] if authors else sorted(WRITTEN_FIELDS.intersection(record))
    if clash:
      raise InputError(f"{where}: field {clash[0]!r} is one tracer writes into "
                       "results; expected a query without it (rename it)")
    if record.get("bucket") == "all":
      # (the summaries' row over every bucket: it would be replaced by this
      # bucket's, and counted twice in accuracy)
      raise InputError(f"{where}: field 'bucket' is 'all', the name of the "
                       "summary over every bucket; expected another name")
    return record


# --- corpus ------------------------------------------------------------------

Record = tuple[str, str, Sequence[int]]  # (id, text, tokens without EOS)


class Corpus:
  """The examples of a corpus held in memory, one per row (the small path).

  ``tokens[row, :lengths[row]]`` are the row's tokens (ending with EOS unless
  the text was cut), zero-padded to ``max_len``; ``segments[row]`` is the
  window index within its text. ``tracer.corpus.TokenizedCorpus`` offers the
  same methods over a tokenized corpus on disk, read row by row.
  """

  def __init__(self, source: str, ids: list[str], texts: list[str],
               segments: np.ndarray, tokens: np.ndarray, lengths: np.ndarray,
               max_len: int):
    self.source, self.ids, self.texts, self.max_len = source, ids, texts, max_len
    self.segments, self.tokens, self.lengths = segments, tokens, lengths
    self.rows_read = 0  # rows whose examples were built (see TokenizedCorpus)

  def __len__(self) -> int:
    return len(self.ids)

  def row_tokens(self, row: int) -> np.ndarray:
    return self.tokens[row, :self.lengths[row]]

  def examples(self, rows: Sequence[int] | np.ndarray) -> dict:
    """The example batch for ``rows``: arrays with leading axis len(rows)."""
    rows = np.asarray(rows, np.int64)
    self.rows_read += len(rows)
    return examples_from_tokens(self.tokens[rows], self.lengths[rows])

  def ids_of(self, rows: Sequence[int] | np.ndarray) -> list[str]:
    return [self.ids[r] for r in np.asarray(rows, np.int64).tolist()]

  def texts_of(self, rows: Sequence[int] | np.ndarray) -> list[str]:
    return [self.texts[r] for r in np.asarray(rows, np.int64).tolist()]

  @functools.cached_property
  def fingerprint(self) -> str:
    """``RowsFingerprint`` of every row (computed once: 7-13 us a row at
    max_len 512-2,048, WORKSPACE.md)."""
    rows = RowsFingerprint()
    for row, (doc_id, seg) in enumerate(zip(self.ids, self.segments.tolist())):
      rows.add(doc_id, seg, self.row_tokens(row))
    return rows.hex()


class RowsFingerprint:
  """What a corpus's rows are, in order, as 16 hex digits.

  F = sum_i h_i * B^i mod P (P = 2^61 - 1, a prime), where h_i is a blake2b
  hash of row i's id, window index and tokens (what its encoding was made
  from). A store records its corpus's F, so a corpus edited in place (same
  row count, other rows) is refused rather than mapping the store's rows to
  the wrong ids. Parts combine without rereading: F(A || C) = F(A) +
  B^|A| * F(C) (``combined``), so the value does not depend on how the rows
  were split among processes. B is a primitive root of P, so no two rows
  share a power below 2^61 rows: any edit (a changed, moved or swapped row)
  goes unseen with probability about 2^-61. Not cryptographic.
  """
  P = (1 << 61) - 1
  B = 37

  def __init__(self):
    self.value, self._power = 0, 1

  def add(self, doc_id: str, seg: int, tokens: np.ndarray) -> None:
    key = doc_id.encode()
    h = hashlib.blake2b(len(key).to_bytes(8, "little") + key
                        + int(seg).to_bytes(8, "little"), digest_size=8)
    h.update(np.asarray(tokens, "<i4").tobytes())
    self.value = (self.value + int.from_bytes(h.digest(), "little") * self._power
                  ) % self.P
    self._power = self._power * self.B % self.P

  def hex(self) -> str:
    return f"{self.value:016x}"

  @classmethod
  def combined(cls, parts: Sequence[tuple[str, int]]) -> str:
    """F of parts' rows in order, from each part's (F as hex, row count)."""
    value, start = 0, 0
    for part, count in parts:
      value = (value + int(part, 16) * pow(cls.B, start, cls.P)) % cls.P
      start += count
    return f"{value:016x}"


def examples_from_tokens(tokens: np.ndarray, lengths: np.ndarray) -> dict:
  """LM examples for token rows ``[B, L]`` (zero past ``lengths [B]``).

  Vectorized ``corpus_example``: every real token is a target, inputs are the
  targets shifted right, padding has weight 0.
  """
  tokens = np.asarray(tokens, np.int32)
  real = np.arange(tokens.shape[1])[None, :] < np.asarray(lengths)[:, None]
  targets = np.where(real, tokens, 0).astype(np.int32)
  inputs = np.zeros_like(targets)
  inputs[:, 1:] = targets[:, :-1]
  inputs[~real] = 0
  return {"inputs": inputs, "targets": targets, "weights": real.astype(np.float32)}


def corpus_example(tokens: np.ndarray, max_len: int) -> dict:
  """One LM example: every real token is a target, padding has weight 0."""
  n = len(tokens)
  targets = np.zeros(max_len, np.int32)
  targets[:n] = tokens
  return {k: v[0] for k, v in examples_from_tokens(targets[None], np.array([n])).items()}


def query_example(prompt_tokens: Sequence[int], target_tokens: Sequence[int],
                  max_len: int) -> dict:
  """One (prompt, target) example: only target tokens carry weight.

  A sequence longer than ``max_len`` loses tokens from the prompt's start.
  """
  prompt, target = list(prompt_tokens), list(target_tokens)
  if len(target) > max_len - 1:
    raise InputError(f"target of {len(target)} tokens does not fit max_len "
                     f"{max_len}: expected at most {max_len - 1} (one position "
                     "is left for the prompt)")
  prompt = prompt[max(0, len(prompt) + len(target) - max_len):]
  ex = corpus_example(np.asarray(prompt + target, np.int32), max_len)
  ex["weights"][:len(prompt)] = 0.0
  return ex


def stack_examples(examples: Sequence[dict]) -> dict:
  return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


def segment(tokens: Sequence[int], max_len: int, overflow: str) -> list[np.ndarray]:
  """Token windows for one text (tokens already end with EOS); see module doc."""
  tokens = np.asarray(tokens, np.int32)
  if overflow == "truncate":
    return [tokens[:max_len]]
  if overflow == "split":
    return [tokens[i:i + max_len] for i in range(0, len(tokens), max_len)]
  check_overflow(overflow)
  return []


def check_overflow(overflow: str) -> None:
  if overflow not in ("truncate", "split"):
    raise InputError(f"overflow {overflow!r}: expected 'truncate' or 'split'")


def rows_of(records: Iterable[Record], vocab, max_len: int, overflow: str
            ) -> Iterator[tuple[str, str, int, np.ndarray]]:
  """(id, text, segment, tokens) of every row, in row order (module doc)."""
  check_overflow(overflow)
  for doc_id, text, tokens in records:
    windows = segment(list(tokens) + [EOS_ID], max_len, overflow)
    for j, window in enumerate(windows):
      yield (doc_id, text if len(windows) == 1 else vocab.decode(window.tolist()),
             j, window)


def build_corpus(source: str, records: Iterable[Record], vocab, max_len: int,
                 overflow: str = "truncate") -> Corpus:
  """Builds the in-memory row table from (id, text, tokens-without-EOS) records."""
  ids, texts, segs, toks, docs = [], [], [], [], set()
  for doc_id, text, j, window in rows_of(records, vocab, max_len, overflow):
    if j == 0:
      if doc_id in docs:
        raise duplicate_id_error(source, doc_id)
      docs.add(doc_id)
    ids.append(doc_id)
    texts.append(text)
    segs.append(j)
    toks.append(window)
  if not ids:
    raise InputError(f"{source}: the corpus is empty")
  lengths = np.array([len(t) for t in toks], np.int32)
  tokens = np.zeros((len(toks), max_len), np.int32)
  tokens[np.arange(max_len)[None, :] < lengths[:, None]] = np.concatenate(toks)
  return Corpus(source, ids, texts, np.asarray(segs, np.int32), tokens, lengths,
                max_len)


def duplicate_id_error(source: str, doc_id: str) -> InputError:
  """The error for an id found twice in ``source``, naming both places when
  its files can be read again."""
  places = id_places(source, doc_id)
  return InputError(f"{source}: duplicate id {doc_id!r}" + (
      f" ({' and '.join(places)})" if len(places) == 2 else "")
      + "; ids must be unique across the whole source")


def id_places(source: str, doc_id: str, files: Collection[str] | None = None
              ) -> list[str]:
  """``file:line`` of the first two records of ``source`` with the id
  ``doc_id``: an error's second read of its files, or only of those in
  ``files`` (a process's share); [] for a source that is not files."""
  if not is_file_source(source):
    return []
  fields = split_source(source)[1]
  places = []
  for path in corpus_files(source):
    if files is not None and path not in files:
      continue
    for lineno, record in read_records(path, (), unique_ids=False, fields=fields,
                                       columns=tuple(fields.values())):
      if record.get("id") == doc_id:
        places.append(at(path, lineno))
        if len(places) == 2:
          return places
  return places


# The fields of a corpus record; ``split_source`` reads other names for them.
CORPUS_FIELDS = ("id", "text")


def split_source(source: str) -> tuple[str, dict[str, str]]:
  """(files, fields) of a corpus source: the path, URL or glob of its files,
  and the name in those files of each of ``CORPUS_FIELDS``.

  Other names follow a ``#``: ``stack/*.parquet#text=content,id=hexsha``
  reads the text from the field (or column) ``content`` and the id from
  ``hexsha``; a field not named keeps its own name. The names are part of
  the source string, so the manifests that record a source (a tokenized
  corpus's, a store's, a checkpoint's) record them too. A ``#`` followed by
  no ``=``, or by a ``/``, is part of the path; ``#shards=N`` is a seqio
  source's shard count (``seqio_shards``), returned as it is.
  """
  fields = {f: f for f in CORPUS_FIELDS}
  files, sep, spec = source.rpartition("#")
  if not sep or "=" not in spec or "/" in spec:
    return source, fields
  if spec.partition("=")[0].strip() == "shards":
    return source, fields  # a seqio source's shards (``seqio_shards``)
  named = set()
  for item in spec.split(","):
    key, eq, name = (s.strip() for s in item.partition("="))
    if key not in fields or not eq or not name:
      raise InputError(f"--corpus={source}: {item!r} after '#': expected "
                       "text=<field> and/or id=<field>, separated by commas")
    if key in named:
      raise InputError(f"--corpus={source}: {key}= is named twice after '#'; "
                       f"expected one name for the {key}")
    named.add(key)
    fields[key] = name
  if fields["id"] == fields["text"]:
    raise InputError(f"--corpus={source}: the id and the text name the same "
                     f"field {fields['id']!r}; expected two fields")
  return files, fields


def corpus_files(source: str) -> list[str]:
  """The files a corpus source names (JSONL or Parquet): one path or URL, or a
  glob of shards (sorted; patterns in any path component, on a bucket too:
  ``_url_glob``; a directory matched is skipped, as a bucket lists none);
  field names after a ``#`` (``split_source``) are not part of them."""
  source, _ = split_source(source)
  if glob.has_magic(source):
    files = (_url_glob(source) if storage.is_url(source) else
             sorted(f for f in glob.glob(source) if not os.path.isdir(f)))
    if not files:
      raise InputError(f"--corpus={source}: the pattern matches no file")
    return files
  return [source]


class FilePart(NamedTuple):
  """A share of one file (``split_files``): the row groups ``row_groups`` of
  the Parquet file ``path``, or of the JSONL file ``path`` the ``share =
  (i, n)``: i-th of n equal runs of its lines (``iter_jsonl``)."""
  path: str
  row_groups: range | None = None
  share: tuple[int, int] | None = None


# Below this many Parquet files per process, ``split_files`` balances runs of
# row groups by rows: whole files by count would leave some processes twice
# the rows of others (3 files on 2: two and one). Every process then reads
# every file's footer: fewer than this many per process of the run (512
# footers on 64 hosts).
ROW_GROUP_SPLIT_FILES = 8


def split_files(source: str, num_shards: int) -> list[list[str | FilePart]]:
  """The files of ``source`` in ``num_shards`` consecutive runs (one per
  process tokenizing it); in order, the runs hold the source's rows in order.

  Runs of whole files, by count; but with fewer than
  ``ROW_GROUP_SPLIT_FILES`` files per shard, all of them Parquet, runs of row
  groups balanced by rows (``FilePart``s), so that every process has an
  even share: each process reads every file's footer. With fewer files than
  shards, none of them Parquet (JSONL, plain or compressed), each file goes
  to a run of consecutive shards, which share its lines equally
  (``FilePart.share``): each of them reads the file twice, once to count
  its lines and once to its run's end, and parses only its run.
  """
  files = corpus_files(source)
  if num_shards > len(files) and not any(_starts_with(f, _PARQUET_MAGIC)
                                         for f in files):
    firsts = [-(-f * num_shards // len(files)) for f in range(len(files) + 1)]
    return [[files[f]] if firsts[f + 1] - firsts[f] == 1 else
            [FilePart(files[f], share=(i - firsts[f], firsts[f + 1] - firsts[f]))]
            for f in range(len(files)) for i in range(firsts[f], firsts[f + 1])]
  if (num_shards == 1 or len(files) >= ROW_GROUP_SPLIT_FILES * num_shards
      or not all(_starts_with(f, _PARQUET_MAGIC) for f in files)):
    return [files[i * len(files) // num_shards:(i + 1) * len(files) // num_shards]
            for i in range(num_shards)]
  groups = []  # (file, row group, rows)
  for path in files:
    metadata, _ = _parquet_metadata(path)
    groups += [(path, g, metadata.row_group(g).num_rows)
               for g in range(metadata.num_row_groups)]
  total = max(1, sum(n for *_, n in groups))
  runs: list[list[str | FilePart]] = [[] for _ in range(num_shards)]
  before = 0
  for path, g, n in groups:
    shard = (2 * before + n) * num_shards // (2 * total)  # by its middle row
    before += n
    run = runs[min(shard, num_shards - 1)]
    if run and run[-1].path == path:
      run[-1] = FilePart(path, range(run[-1].row_groups.start, g + 1))
    else:
      run.append(FilePart(path, range(g, g + 1)))
  return runs


def _url_glob(pattern: str) -> list[str]:
  """The objects a glob names in object storage, as ``glob.glob`` matches
  local files: each pattern component matches one name (so
  ``gs://b/fineweb/data/*/*.parquet`` reaches every dump's files), a leading
  ``.`` only explicitly; sorted. One listing, of the keys below the
  pattern's fixed directories that start with the first pattern's fixed
  characters (``c4-train.`` of ``c4-train.*.json.gz``): a bucket whose root
  also holds stores is not listed whole."""
  parts = pattern.split("/")
  fixed = next(i for i, p in enumerate(parts) if glob.has_magic(p))
  if fixed < 3:  # scheme, '', bucket
    raise InputError(f"--corpus={pattern}: the bucket cannot be a pattern")
  parent, wanted = "/".join(parts[:fixed]), parts[fixed:]
  matches = []
  for name in storage.list_dir(parent, prefix=re.split(r"[*?[]", wanted[0])[0]):
    names = name.split("/")
    if len(names) == len(wanted) and all(
        fnmatch.fnmatchcase(n, w) and (w.startswith(".") or not n.startswith("."))
        for n, w in zip(names, wanted)):
      matches.append(storage.join(parent, name))
  return matches


class _PositionIds:
  """``read_records``'s ``convert`` for corpus files: a file whose first line
  has no ``id`` (C4's and the Pile's releases carry none) gets the id
  ``"<file name>:<line>"`` for every line, which does not depend on how files
  are split among processes; a file whose first line has one needs it on
  every line. ``id_name`` is the id's name in the file (``split_source``);
  one named there (``#id=<field>``) is required: a misspelt name must not
  turn every id into a position."""

  def __init__(self, name: str, id_name: str = "id",
               first: tuple[bool, str] | None = None):
    self.name, self.id_name = name, id_name
    self.first = first  # (has an id?, where) of the first record

  def __call__(self, where: str, record: dict) -> dict:
    if self.first is None:
      self.first = ("id" in record, where)
    if self.first[0]:
      return record  # read_records names a missing id
    if self.id_name != "id":
      raise InputError(f"{self.first[1]}: missing field {self.id_name!r}, named "
                       "by id= after '#'; expected it on every line (or leave "
                       "out id= for a file without ids)")
    if "id" in record:
      raise InputError(f"{where}: has an {self.id_name!r}, but {self.first[1]} has "
                       f"none, so this file's ids are its positions "
                       f"('{self.name}:<line>'); expected an {self.id_name!r} on "
                       "every line or on none")
    return {**record, "id": f"{self.name}:{where.rsplit(':', 1)[1]}"}


def corpus_documents(source: str, unique_ids: bool = True,
                     files: Sequence[str | FilePart] | None = None
                     ) -> Iterator[tuple[str, str]]:
  """(id, text) of the corpus records ``{"id": str, "text": str}`` (JSONL
  lines, or Parquet rows of the columns ``id`` and ``text``; other names as
  ``split_source`` says) of one file or a glob of shards, shard after shard
  (``read_records`` checks ids within each file), or of ``files``, some of
  its shards or parts of them (``split_files``); a file without ids gets
  positions (``_PositionIds``)."""
  source = os.fspath(source)
  location, fields = split_source(source)
  columns = tuple(fields.values())
  for part in corpus_files(source) if files is None else files:
    path, groups, share = part if isinstance(part, FilePart) else FilePart(part)
    first = None
    if share is not None:  # ids or positions: as the file's first record says
      records = read_records(path, (), columns=columns, fields=fields)
      lineno, record = next(records, (0, {}))
      records.close()  # the file too
      first = ("id" in record, at(path, lineno))
    for _, r in read_records(
        path, CORPUS_FIELDS, CORPUS_FIELDS, unique_ids,
        convert=_PositionIds(_name_in_source(location, path), fields["id"], first),
        columns=columns, fields=fields, row_groups=groups, share=share):
      yield r["id"], r["text"]


def corpus_records(source: str, vocab, unique_ids: bool = True,
                   files: Sequence[str | FilePart] | None = None
                   ) -> Iterator[Record]:
  """``corpus_documents`` as records: (id, text, tokens)."""
  for doc_id, text in corpus_documents(source, unique_ids, files):
    yield doc_id, text, vocab.encode(text)


def _name_in_source(source: str, path: str) -> str:
  """``path``'s name within ``source``: below the glob's fixed directories
  (``data/*/c4.json.gz`` -> ``en/c4.json.gz``), else the file's name."""
  parts = source.split("/")
  fixed = next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts) - 1)
  prefix = "/".join(parts[:fixed])
  return path[len(prefix) + 1:] if prefix and path.startswith(prefix + "/") else (
      posixpath.basename(path))


def seqio_shards(source: str) -> tuple[str, int]:
  """(name, shards) of a seqio source: ``c4_task#shards=1024`` is the task
  read as 1,024 shards, one after another (seqio's ``ShardInfo``: shard i
  holds files i, i + 1024, ... of a source with that many files, else
  every 1,024th example), so that processes tokenizing consecutive runs of
  shards write the rows one process would. 1 without ``#shards=``."""
  name, sep, spec = source.rpartition("#")
  key, eq, value = spec.partition("=")
  if not sep or key.strip() != "shards" or not eq:
    return source, 1
  if not re.fullmatch(r"[0-9]+", value.strip()) or int(value) < 1:
    raise InputError(f"--corpus={source}: shards={value.strip()!r}: expected a "
                     "whole number of shards, at least 1 (TASK#shards=N)")
  return name, int(value)


def splits_among_processes(source: str) -> bool:
  """True if processes can each tokenize a share of ``source``: corpus files
  (``split_files``), or a seqio source that names its shards (``seqio_shards``)."""
  return is_file_source(source) or seqio_shards(source)[1] > 1


def seqio_records(name: str, vocab, split: str = "train",
                  feature: str = "targets", shards: Sequence[int] | None = None
                  ) -> Iterator[Record]:
  """Any registered seqio Task or Mixture as corpus records, in source order.

  The task's preprocessors run (``shuffle=False``); the example's ``feature``
  tokens are used, its text is ``<feature>_pretokenized`` when present, and its
  id is the example's ``id`` feature when present, else its position. A
  Mixture is read task after task (seqio's name order, tasks of rate > 0),
  every example once, with ids ``"<task name>:<id>"``: seqio's own sampling
  would stop at the first exhausted task and drop ids.

  ``name#shards=S`` (``seqio_shards``) reads shard after shard (each shard
  task after task), positions counted within the shard (``"<shard>:<i>"``);
  ``shards``: only those shards, in that order (a process's run).
  """
  name, num_shards = seqio_shards(name)
  seqio = _seqio()
  if (name not in seqio.MixtureRegistry.names()
      and name not in seqio.TaskRegistry.names()):
    raise InputError(f"--corpus={name}: not a file, and no seqio task or mixture "
                     f"of that name is registered")
  # Registered: any error from here on is seqio's own, passed on as it is.
  provider = seqio.get_mixture_or_task(name)
  if isinstance(provider, seqio.Mixture):
    parts = [(t, f"{t.name}:") for t in provider.tasks if provider.get_rate(t) > 0]
  else:
    parts = [(provider, "")]
  for task, _ in parts if num_shards > 1 else []:
    files = len(task.source.list_shards(split))
    if files < num_shards:
      # seqio then reads the whole source for every shard and keeps every
      # S-th example (Task.get_dataset): S processes read it S times over.
      warnings.warn(
          f"--corpus={name}#shards={num_shards}: seqio task {task.name} has "
          f"{files} source file(s) in split {split!r}, fewer than {num_shards} "
          f"shards, so seqio shards it by examples: every shard reads all of "
          f"it. Name at most {files} shard(s) to have each read only its files.")
  for shard in range(num_shards) if shards is None else shards:
    info = seqio.ShardInfo(shard, num_shards) if num_shards > 1 else None
    at = f"{shard}:" if info else ""
    for task, prefix in parts:
      dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False,
                                 num_epochs=1, shard_info=info)
      for i, ex in enumerate(dataset.as_numpy_iterator()):
        if feature not in ex:
          raise InputError(f"seqio {task.name}: example {at}{i} has no feature "
                           f"{feature!r}")
        tokens = [int(t) for t in ex[feature] if t != EOS_ID]
        text = ex.get(f"{feature}_pretokenized")
        text = text.decode() if isinstance(text, bytes) else vocab.decode(tokens)
        doc_id = ex.get("id", f"{at}{i}")
        doc_id = doc_id.decode() if isinstance(doc_id, bytes) else str(doc_id)
        yield prefix + doc_id, text, tokens


def is_file_source(source: str) -> bool:
  """True if ``source`` names corpus files, not a seqio task or mixture."""
  source, _ = split_source(source)
  return (source.endswith((".jsonl", ".parquet")) or os.path.sep in source
          or os.path.exists(source) or glob.has_magic(source))


def absolute_source(source: str) -> str:
  """``source`` naming the same files from any working directory: a local
  path or glob made absolute, other field names after ``#`` kept; a URL or a
  seqio name as it is. What a store's manifest records."""
  if not is_file_source(source):
    return source
  files, _ = split_source(source)
  return storage.normalize(files) + source[len(files):]


def same_source(recorded: str, source: str) -> bool:
  """``recorded`` (by a store, a tokenized corpus, a basis) names the files
  ``source`` names: equal once made absolute. Records made before sources
  were recorded absolute (2026-12) hold the path as given, resolved here
  against the current directory."""
  return recorded == source or absolute_source(recorded) == absolute_source(source)


def source_records(source: str, vocab, unique_ids: bool = True
                   ) -> tuple[str, Iterator[Record]]:
  """(label, records) of a JSONL or Parquet file or glob, or of a seqio task
  or mixture."""
  if is_file_source(source):
    return source, corpus_records(source, vocab, unique_ids)
  if split_source(source)[0] != source:
    raise InputError(f"--corpus={source}: field names after '#' are for corpus "
                     "files; a seqio task names its own features")
  return f"seqio:{source}", seqio_records(source, vocab)


def read_file_corpus(path: str, vocab, max_len: int,
                     overflow: str = "truncate") -> Corpus:
  """Corpus records ``{"id": str, "text": str}`` (a JSONL or Parquet file or a
  glob of shards)."""
  return build_corpus(path, corpus_records(path, vocab), vocab, max_len, overflow)


def read_seqio_corpus(name: str, vocab, max_len: int, overflow: str = "truncate",
                      split: str = "train", feature: str = "targets") -> Corpus:
  """A registered seqio Task or Mixture as an in-memory corpus (``seqio_records``)."""
  return build_corpus(f"seqio:{name}", seqio_records(name, vocab, split, feature),
                      vocab, max_len, overflow)


def read_corpus(source: str, vocab, max_len: int, overflow: str = "truncate") -> Corpus:
  """A JSONL file or glob, or the name of a registered seqio task or mixture,
  read into memory. (``tracer.corpus.open_corpus`` also takes tokenized dirs.)"""
  label, records = source_records(source, vocab)
  return build_corpus(label, records, vocab, max_len, overflow)


def register_jsonl_task(name: str, path: str, vocab, ids: bool = True) -> Any:
  """Registers a seqio Task reading corpus lines from ``path``.

  Its examples hold ``id``, ``targets`` (tokens + EOS) and
  ``targets_pretokenized``; ``read_seqio_corpus(name, ...)`` then gives the same
  rows as ``read_file_corpus(path, ...)``. ``ids=False``: no ``id`` (as many
  seqio tasks), so the records' ids are positions.
  """
  seqio = _seqio()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  records = [r for _, r in read_records(path, ("id", "text"), ("text",))]

  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_generator(
        lambda: ((r["id"], r["text"]) for r in records),
        output_signature=(tf.TensorSpec((), tf.string), tf.TensorSpec((), tf.string)),
    ).map(lambda i, t: {"id": i, "targets": t} if ids else {"targets": t})

  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(dataset_fn, splits=["train"]),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features={"targets": seqio.Feature(as_seqio(vocab), add_eos=True)})


# --- queries -----------------------------------------------------------------

def query_examples(queries: Sequence[dict], vocab, max_len: int,
                   source: str = "queries") -> dict:
  """Stacked target-only examples for query records; a warning names the
  queries whose prompts lose their start (``query_example``)."""
  out, cut = [], []
  for i, q in enumerate(queries):
    prompt, target = vocab.encode(q["prompt"]), vocab.encode(q["target"])
    try:
      out.append(query_example(prompt, target, max_len))
    except InputError as e:
      raise InputError(f"{source}: query {q.get('id', i)!r}: {e}") from None
    if len(prompt) + len(target) > max_len:
      cut.append((q.get("id", i), len(prompt), max_len - len(target)))
  if cut:
    qid, have, kept = cut[0]
    more = f" and {len(cut) - 1} more" if len(cut) > 1 else ""
    warnings.warn(f"{source}: the prompt of query {qid!r}{more} is longer than the "
                  f"model's max_len {max_len} leaves beside its target: scored on "
                  f"its last {kept} of {have} tokens", stacklevel=2)
  return stack_examples(out)


def batches(num_rows: int, batch_size: int, start: int = 0) -> Iterator[np.ndarray]:
  """Row index batches ``[start, num_rows)`` in order; the last may be short."""
  for lo in range(start, num_rows, batch_size):
    yield np.arange(lo, min(lo + batch_size, num_rows))


# --- background reading ---------------------------------------------------------

def prefetch(items: Iterator[Any], depth: int) -> Iterator[Any]:
  """Runs ``items`` in a background thread, up to ``depth`` items ahead."""
  if depth <= 0:
    yield from items
    return
  buf: queue.Queue = queue.Queue(depth)
  stop = threading.Event()
  done = object()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        buf.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def run():
    try:
      for item in items:
        if not put((item, None)):
          return
      put((done, None))
    except BaseException as e:  # pylint: disable=broad-except
      put((None, e))

  thread = threading.Thread(target=run, name="tracer-prefetch", daemon=True)
  thread.start()
  try:
    while True:
      item, error = buf.get()
      if error is not None:
        raise error
      if item is done:
        return
      yield item
  finally:
    stop.set()
    thread.join()
