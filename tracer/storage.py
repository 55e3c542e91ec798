"""Where tracer's files live: local paths or object-store URLs, one interface.

Every file tracer writes beside its arrays (store manifests, progress markers,
the preconditioner, tokenized-corpus tables, results) goes through
tensorstore's key-value stores, so a store may live on any of:

  ``/abs/path`` or ``rel/path``   local files (the ``file`` driver)
  ``file:///abs/path``            the same
  ``gs://bucket/path``            Google Cloud Storage
  ``s3://bucket/path``            S3 or an S3-compatible server: the endpoint is
                                  taken from ``AWS_ENDPOINT_URL`` when set, the
                                  region from ``AWS_REGION`` / ``AWS_DEFAULT_REGION``
  ``memory://path``               this process's memory (tests)

A single ``write_bytes`` is atomic on every driver: object stores replace an
object whole; a local file is written as tensorstore's ``file`` driver
writes one, into ``<name>.__lock`` beside it under an exclusive ``flock``,
fsynced, renamed over ``<name>``, and the directory fsynced. Readers
therefore see an old value or a new one, never part of one; concurrent
writers of one name take turns; and a crash leaves at most ``<name>.__lock``,
which listings and ``delete_dir`` skip (and remove) as tensorstore's own and
the next write of ``<name>`` reuses, so a rerun leaves nothing behind.
(Local files are not written through the ``file`` driver itself: it reuses
that leftover without truncating it, so a shorter value kept the old tail:
"ok" over "partial" read "okrtial", tensorstore 0.1.86.) ``delete_dir``
does not fsync.

Every open shares one ``tensorstore.Context`` (``CONTEXT``): one cache pool and
one set of request limits for the process, and one ``memory://`` namespace, so
that a store written to ``memory://x`` can be opened again by name.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import io
import json
import os
import posixpath
import re
import stat
import time
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import tensorstore as ts

from tracer.errors import InputError

CONTEXT = ts.Context()
_SCHEMES = ("gs://", "s3://", "memory://", "file://")
# A local write's temporary file, ``<name>.__lock``: tensorstore's file driver
# uses the same name and locking, and skips such files in its listings.
LOCK_SUFFIX = ".__lock"


# Any "scheme://": one tracer does not know is a typo ("gcs://") or a protocol
# it has no driver for ("http://"), never a relative path to write under.
_ANY_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# A known scheme with its "//" folded to "/" (``pathlib.Path("gs://b/s")``
# is ``gs:/b/s``): else a relative path, written under ``./gs:/b/s``.
_FOLDED_SCHEME = re.compile(r"(gs|s3|memory|file):/(?!/)")


def is_url(location: str) -> bool:
  """True for ``gs://``, ``s3://``, ``memory://`` and ``file://`` locations;
  an InputError for another ``scheme://`` (before 2026-12-05 it was taken as a
  relative path: ``--store=gcs://b/s`` was written to ``./gcs:/b/s``)."""
  location = str(location)
  if location.startswith(_SCHEMES):
    return True
  scheme = _ANY_SCHEME.match(location)
  if scheme:
    raise InputError(f"{location}: unknown URL scheme {scheme.group()!r}; "
                     "expected a local path or a gs://, s3://, memory:// or "
                     "file:// URL")
  folded = _FOLDED_SCHEME.match(location)
  if folded:
    fixed = f"{folded.group(1)}://{location[folded.end():]}"
    if folded.group(1) == "file":
      fixed = f"file:///{location[folded.end():]}"
    raise InputError(f"{location}: a URL's \"//\" folded to \"/\" (as "
                     f"pathlib.Path does); expected {fixed}")
  return False


def local_path(location: str | os.PathLike[str]) -> str | None:
  """The file path of a local location: a path as given, a ``file://`` URL's
  path; None for any other URL. A file URL names an absolute path on this
  machine, ``file:///PATH`` or ``file://localhost/PATH`` (``file://`` alone,
  a parent ``split`` gives, is the root); another host is an InputError, not
  a relative path. Its name is taken as written, not percent-decoded: tracer
  joins names onto URLs as they are."""
  location = os.fspath(location)
  if not location.startswith("file://"):
    return None if is_url(location) else location
  path = location[len("file://"):]
  if path == "localhost" or path.startswith("localhost/"):
    path = path[len("localhost"):]
  if path and not path.startswith("/"):
    raise InputError(f"{location}: a file URL names an absolute path on this "
                     "machine; expected file:///PATH (or file://localhost/PATH)")
  return path or "/"


def normalize(location: str | os.PathLike[str]) -> str:
  """A URL without a trailing slash (a scheme's root keeps its ``://``;
  ``file://localhost/PATH`` becomes ``file:///PATH``); a local path made
  absolute."""
  location = os.fspath(location)
  if location.startswith("file://"):
    # ``file:///``'s path is the root: its slash is not a trailing one.
    # ``.`` and ``..`` resolved as for a local path (tensorstore's file
    # driver refuses them).
    return "file://" + os.path.normpath(local_path(location)).replace("//", "/", 1)
  if is_url(location):
    scheme, rest = location.split("://", 1)
    rest = rest.rstrip("/")
    if scheme in ("gs", "s3") and ("//" in rest or rest.startswith("/")):
      # An object's key may hold "//", but a name split from it and joined
      # again (``split``, ``join``) would lose it: the same file would have
      # two keys.
      raise InputError(f"{location}: an empty name between slashes; expected "
                       f"{scheme}://BUCKET/NAME/... with one slash between names")
    return f"{scheme}://{rest}"
  return os.path.abspath(location)


def join(location: str, *names: str) -> str:
  """``location/name/...`` for URLs and paths alike."""
  location = os.fspath(location)
  if is_url(location):
    # normalize, not rstrip: ``memory://`` must keep the slashes of its scheme.
    return posixpath.join(normalize(location), *names)
  return os.path.join(location, *names)


def split(location: str) -> tuple[str, str]:
  """``(parent, name)`` of a file location."""
  location = normalize(location)
  if is_url(location):
    scheme, rest = location.split("://", 1)
    parent, _, name = rest.rpartition("/")
    return f"{scheme}://{parent}", name  # ``memory://name``: the scheme's root
  return os.path.dirname(location), os.path.basename(location)


def kvstore_spec(location: str) -> dict[str, Any]:
  """The tensorstore kvstore spec of a directory-like location (path ends in /)."""
  location = normalize(location)
  if location.startswith("gs://") or location.startswith("s3://"):
    scheme, rest = location.split("://", 1)
    bucket, _, path = rest.partition("/")
    if not bucket:
      raise InputError(f"{location}: no bucket in the URL")
    spec: dict[str, Any] = {"driver": "gcs" if scheme == "gs" else "s3",
                            "bucket": bucket, "path": path + "/" if path else ""}
    if scheme == "s3":
      endpoint = os.environ.get("AWS_ENDPOINT_URL")
      region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
      if endpoint:
        spec["endpoint"] = endpoint
      if region:
        spec["aws_region"] = region
    _check_reachable(json.dumps({**spec, "path": ""}, sort_keys=True))
    return spec
  if location.startswith("memory://"):
    path = location[len("memory://"):]
    return {"driver": "memory", "path": path + "/" if path else ""}
  return {"driver": "file", "path": local_path(location).rstrip("/") + "/"}


# A bucket's first request (``_check_reachable``): 5 tries, with
# tensorstore's backoff from 0.5 s (17 s in all when each fails at once:
# `tracer benchmark-data --read=s3://...` against a closed port), and at
# most FIRST_REQUEST_SECONDS in all (a
# server that takes the connection and never replies held each try 60 s,
# curl's low-speed limit: 377 s for the 5).
FIRST_REQUEST_RETRIES = {"max_retries": 5, "initial_delay": "0.5s", "max_delay": "8s"}
FIRST_REQUEST_SECONDS = 60.0
_FIRST_REQUEST_CONTEXT = ts.Context({"gcs_request_retries": FIRST_REQUEST_RETRIES,
                                     "s3_request_retries": FIRST_REQUEST_RETRIES})
# tensorstore's codes for a request that got no answer it could use.
_UNREACHED = ("ABORTED", "UNAVAILABLE", "DEADLINE_EXCEEDED")


@functools.lru_cache(maxsize=64)
def _check_reachable(bucket_spec: str) -> None:
  """InputError if the bucket of ``bucket_spec`` (a kvstore spec as JSON)
  does not answer a metadata request within ``FIRST_REQUEST_RETRIES`` and
  ``FIRST_REQUEST_SECONDS``.

  Once per bucket and endpoint per process, before its first open. With no
  network or a wrong endpoint, tensorstore's default tries kept every
  request (``tracer benchmark-data --read=s3://...``, ``--store=gs://...``)
  waiting through 32 tries before it failed (14 min 59 s for
  ``exists("s3://bucket/x.jsonl")`` against a closed port); every
  later request keeps those default tries, so that a pod's hours of reads
  ride out a passing outage. Only an unanswered request fails here: a
  refusal (no such bucket, no permission) is left to the request it
  concerns, which names its file.
  """
  spec = json.loads(bucket_spec)
  start = time.monotonic()
  left = lambda: max(0.0, FIRST_REQUEST_SECONDS - (time.monotonic() - start))
  try:
    # (an S3 open without AWS_REGION asks for the bucket's region)
    request = ts.KvStore.open(spec, context=_FIRST_REQUEST_CONTEXT)
    kv = request.result(timeout=left())
    # (a name no tracer writes: its answer is "missing", a HEAD's 404)
    request = kv.read(".tracer-reachable", byte_range=slice(0, 0))
    request.result(timeout=left())
    return
  except TimeoutError:
    request.cancel()
    why = "no reply"
  except ValueError as e:
    if not str(e).startswith(_UNREACHED):
      return
    why = reason(e)
  where = f"{'gs' if spec['driver'] == 'gcs' else 's3'}://{spec['bucket']}"
  via = (f" at AWS_ENDPOINT_URL={spec['endpoint']}" if spec.get("endpoint")
         else "")
  raise InputError(
      f"{where}: no answer from the bucket{via} in "
      f"{time.monotonic() - start:.0f} s ({why}); expected a network that "
      "reaches it")


@functools.lru_cache(maxsize=256)
def _open_dir(location: str) -> ts.KvStore:
  spec = kvstore_spec(location)
  try:
    return ts.KvStore.open(spec, context=CONTEXT).result()
  except ValueError as e:
    raise InputError(f"{location}: cannot open: {e}") from e


def _kv(location: str) -> tuple[ts.KvStore, str]:
  parent, name = split(location)
  if parent in ("gs://", "s3://"):
    raise InputError(f"{location}: names a bucket, not a file in one; expected "
                     f"{parent}BUCKET/PATH")
  return _open_dir(parent), name


def read_bytes(location: str) -> bytes | None:
  """The file's bytes, or None if it does not exist."""
  kv, name = _kv(location)
  try:
    result = kv.read(name).result()
  except ValueError as e:
    raise InputError(f"{location}: cannot read: {e}") from e
  return None if result.state == "missing" else bytes(result.value)


def missing(location: str, what: str = "file") -> str:
  """Why ``location`` was not found, for an error: ``no such file``; a local
  directory ``is a directory``; and for an object in a bucket that cannot be listed (a missing bucket reads as a
  missing object) the listing's reason. The listing is of that one name's
  prefix: one request, however large the bucket."""
  text = f"no such {what}"
  path = local_path(location)
  if path is not None and os.path.isdir(path):  # (tensorstore: "missing")
    return f"is a directory; expected a {what}"
  if not is_url(location) or location.startswith(("memory://", "file://")):
    return text
  kv, name = _kv(location)
  try:
    kv.list(ts.KvStore.KeyRange(name, name + "\0")).result()
  except ValueError as e:
    return f"{text} ({reason(e)})"
  return text


# Bytes per range read of a streamed object (``open_binary``): what one open
# file holds in memory, twice (the window being read and the next, in flight).
READ_WINDOW = 16 << 20


def open_binary(location: str) -> BinaryIO:
  """A file opened for reading as a stream of bytes; InputError if missing.

  A local file is opened as usual. An object (``gs://``, ``s3://``, ...) is
  read in range reads of ``READ_WINDOW`` bytes, the next one in flight while
  the last is used, so memory does not grow with the file; if the object is
  replaced while it is read, the read fails rather than mixing two versions.
  """
  shown = os.fspath(location)  # errors name the file as the caller did
  if not is_url(shown):
    if os.path.isdir(shown):
      raise InputError(f"{shown}: is a directory; expected a file")
    try:
      return open(shown, "rb")
    except FileNotFoundError:
      raise InputError(f"{shown}: no such file") from None
    except OSError as e:
      raise InputError(f"{shown}: cannot read: {reason(e)}") from None
  # A buffer of at least 64 bytes: readers peek at a file's first bytes.
  return io.BufferedReader(_RangeReader(shown),
                           min(max(READ_WINDOW, 64), 1 << 20))


class ObjectReads:
  """Range reads of one object (``gs://``, ``s3://``, ...), all of one version
  of it: once a read has seen the object, a read of a replaced or deleted
  object is an InputError, never a mix of two versions."""

  def __init__(self, location: str):
    self.location = location
    self._kv, self._name = _kv(location)
    self._generation = None  # the version being read

  def start(self, start: int, stop: int | None):
    """A read of bytes ``[start, stop)`` in flight (``start < 0``, ``stop``
    None: the last ``-start`` bytes); ``result`` gives its bytes."""
    return self._kv.read(self._name, byte_range=slice(start, stop))

  def result(self, read, start: int) -> bytes | None:
    """The bytes of a read from ``start``; None if the range is not in the
    object (past its end, or a suffix longer than it)."""
    try:
      result = read.result()
    except ValueError as e:
      if "OUT_OF_RANGE" in str(e):
        return None
      raise InputError(f"{self.location}: cannot read: {reason(e)}") from None
    if result.state == "missing":
      raise InputError(f"{self.location}: {missing(self.location)}"
                       if self._generation is None
                       else f"{self.location}: deleted while being read")
    generation = result.stamp.generation
    if self._generation is None:
      self._generation = generation
    elif generation != self._generation:
      at = f"byte {start:,}" if start >= 0 else f"its last {-start:,} bytes"
      raise InputError(f"{self.location}: replaced while being read (at {at}); "
                       "read it again")
    return result.value

  def read(self, start: int, stop: int | None) -> bytes | None:
    """``result(start(start, stop), start)``: one read, waited for."""
    return self.result(self.start(start, stop), start)


class _RangeReader(io.RawIOBase):
  """An object read window by window (``open_binary``)."""

  def __init__(self, location: str):
    super().__init__()
    self._reads = ObjectReads(location)
    self._size = READ_WINDOW
    self._offset = 0            # where the window in flight starts
    self._window = memoryview(b"")
    self._next = self._request()
    self._take()                # a missing object fails here, on open

  def readable(self) -> bool:
    return True

  def _request(self):
    start, self._offset = self._offset, self._offset + self._size
    return self._reads.start(start, self._offset)

  def _take(self) -> None:
    start = self._offset - self._size
    value = self._reads.result(self._next, start)
    self._next = None
    if value is None:
      # The last window: whatever is left from ``start`` (past the end, object
      # stores answer "not satisfiable" where files answer no bytes).
      value = self._reads.read(start, None)
    if value is not None:
      self._window = memoryview(value)
      if len(value) == self._size:
        self._next = self._request()

  def readinto(self, buffer) -> int:
    """Fills ``buffer`` from as many windows as it takes (0 at the end)."""
    n = 0
    while n < len(buffer):
      if not self._window:
        if self._next is None:
          break
        self._take()
      m = min(len(buffer) - n, len(self._window))
      buffer[n:n + m] = self._window[:m]
      self._window = self._window[m:]
      n += m
    return n


def read_text(location: str) -> str:
  """The file as UTF-8 text; InputError naming it if missing or not UTF-8."""
  data = read_bytes(location)
  if data is None:
    raise InputError(f"{location}: {missing(location)}")
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise InputError(f"{location}: not valid UTF-8 ({e.reason} at byte "
                     f"{e.start})") from None


def read_json(location: str) -> dict:
  """A JSON object file; InputError naming it if missing, bad, or not an object."""
  try:
    d = json.loads(read_text(location))
  except json.JSONDecodeError as e:
    raise InputError(f"{location}: not valid JSON: {e}") from e
  except RecursionError:
    raise InputError(f"{location}: not a file tracer wrote (values nested too "
                     "deep to read)") from None
  if not isinstance(d, dict):
    raise InputError(f"{location}: expected a JSON object, got {type(d).__name__}")
  return d


def check_json_types(where: str, d: dict, types: dict,
                     describe: Callable[[Any], str] | None = None) -> None:
  """InputError naming the first field of ``d`` (a JSON file's object, read
  from ``where``) whose value is not of its ``types[name] = (python types,
  "what they are in words")``; fields ``types`` does not name pass. A bool
  is no int here (a count, a seed)."""
  for name, value in d.items():
    allowed, what = types.get(name, (object, ""))
    if not isinstance(value, allowed) or (isinstance(value, bool)
                                          and bool not in allowed):
      shown = describe(value) if describe else json.dumps(value)[:80]
      raise InputError(f"{where}: field {name!r} must be {what}, got {shown}")


_OS_ERROR = re.compile(r"([^:]*?)\s*\[os_error_code='?(\d+)'?\]")


def reason(error: BaseException) -> str:
  """Why an I/O operation failed, in a few words: the OS's reason (``No space
  left on device``, ``Read-only file system``) when tensorstore reports one,
  else its message on one line."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  # (an object store's whole XML or JSON reply says no more than its status)
  text = " ".join(str(error).split(" [http_response_body=")[0].split())
  found = _OS_ERROR.search(text)
  return found.group(1).strip() if found else text


@contextlib.contextmanager
def writing(location: str, action: str = "write") -> Iterator[None]:
  """Turns a failed write or listing (tensorstore's ValueError, an OSError)
  inside the block into an InputError naming ``location`` and the reason: a full disk,
  a read-only file system and a bucket without access are the user's to fix.
  Keep only I/O in the block: any ValueError in it is reported this way."""
  try:
    yield
  except (ValueError, OSError) as e:
    if isinstance(e, InputError):
      raise
    raise InputError(f"{location}: cannot {action}: {reason(e)}") from None


def write_bytes(location: str, data: bytes) -> None:
  """Writes (or replaces) a file whole and atomically (module doc). A failed
  write (a full disk, no permission) is an InputError naming ``location``;
  nothing is left under its name."""
  with writing(location):
    local = local_path(location)
    if local is None:
      kv, name = _kv(location)
      kv.write(name, data).result()
    else:
      _write_local(local, data)



def _write_local(path: str, data: bytes) -> None:
  """``data`` to ``path`` through ``<path>.__lock`` (module doc); the
  directories made as tensorstore's file driver makes them."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  temp = path + LOCK_SUFFIX
  while True:
    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)  # the umask
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
      # Another writer may have renamed the file we opened over ``path``
      # while we waited: writing into it would tear ``path``. Lock again.
      locked = os.fstat(fd)
      try:
        now = os.stat(temp)
      except FileNotFoundError:
        now = None
      if now is not None and (now.st_dev, now.st_ino) == (locked.st_dev,
                                                          locked.st_ino):
        break
    except BaseException:
      os.close(fd)
      raise
    os.close(fd)
  try:
    os.ftruncate(fd, 0)  # a killed write's leftover may be longer
    view = memoryview(data)
    while view:
      view = view[os.write(fd, view):]
    os.fsync(fd)
    os.replace(temp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(temp)  # still ours: the lock is held
    raise
  finally:
    os.close(fd)  # releases the lock
  directory = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
  try:
    os.fsync(directory)
  finally:
    os.close(directory)


def write_text(location: str, text: str) -> None:
  write_bytes(location, text.encode("utf-8"))


def exists(location: str) -> bool:
  """Whether the file exists, without reading it (a basis may be GiBs): a
  local path is a stat; an object a read of zero bytes, which tensorstore
  makes a metadata request (GCS's object metadata, S3's HEAD). False for a
  directory and for a file whose directory is missing."""
  location = os.fspath(location)
  if not is_url(location):
    try:  # (not os.path.isfile: it reads "permission denied" as "missing")
      return stat.S_ISREG(os.stat(location).st_mode)
    except (FileNotFoundError, NotADirectoryError):
      return False
    except OSError as e:
      raise InputError(f"{location}: cannot read: {reason(e)}") from None
  kv, name = _kv(location)
  try:
    result = kv.read(name, byte_range=slice(0, 0)).result()
  except ValueError as e:
    raise InputError(f"{location}: cannot read: {reason(e)}") from None
  return result.state == "value"


def identities(locations: Sequence[str]) -> list[dict[str, Any] | None]:
  """A cheap identity of each file, without reading it (a corpus's shards
  may be terabytes), to tell later whether it was changed: a local file's
  ``{"size": bytes, "mtime_ns": ns}`` (a stat), an object's
  ``{"generation": hex}`` (a read of zero bytes, a metadata request: GCS's
  generation, S3's ETag; every object's in flight together). None for a
  missing file."""
  out: list[dict[str, Any] | None] = [None] * len(locations)
  reads = []
  for i, location in enumerate(locations):
    location = os.fspath(location)
    local = local_path(location)
    if local is None:
      kv, name = _kv(location)
      reads.append((i, location, kv.read(name, byte_range=slice(0, 0))))
      continue
    try:
      st = os.stat(local)
    except (FileNotFoundError, NotADirectoryError):
      continue
    except OSError as e:
      raise InputError(f"{location}: cannot read: {reason(e)}") from None
    out[i] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
  for i, location, read in reads:
    try:
      result = read.result()
    except ValueError as e:
      raise InputError(f"{location}: cannot read: {reason(e)}") from None
    if result.state == "value":
      out[i] = {"generation": bytes(result.stamp.generation).hex()}
  return out


def delete(location: str) -> None:
  """Deletes a file (no error if it is missing)."""
  with writing(location, "delete"):
    kv, name = _kv(location)
    kv.write(name, None).result()


def list_dir(location: str, prefix: str = "") -> list[str]:
  """Every key under a directory-like location that starts with ``prefix``,
  relative to the location, sorted. Object storage is asked only for the
  keys with that prefix (one listing request per 1,000 of them)."""
  start = prefix.encode()
  # The least key past every key with the prefix: its last byte raised by one
  # (UTF-8 has no byte 0xff); '' is past every key.
  end = start[:-1] + bytes([start[-1] + 1]) if start else b""
  with writing(location, "list"):  # (a missing bucket, no permission)
    keys = _open_dir(normalize(location)).list(
        ts.KvStore.KeyRange(inclusive_min=start, exclusive_max=end)).result()
  return sorted(k.decode() for k in keys)


def delete_dir(location: str) -> None:
  """Deletes every key under a directory-like location."""
  with writing(location, "delete"):
    _open_dir(normalize(location)).delete_range(ts.KvStore.KeyRange()).result()


def make_local_dirs(location: str) -> None:
  """Creates a local directory (URLs need none: keys create their prefixes)."""
  if not is_url(location):
    with writing(location, "create the directory"):
      os.makedirs(location, exist_ok=True)
