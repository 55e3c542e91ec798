"""Errors raised on bad input: they always name the file, line or field at
fault; and ``quiet_failed_loads``, which keeps a library's noise about such
a failure from burying tracer's one line."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import warnings
from typing import Iterator


class InputError(ValueError):
  """A file, line or field does not hold what was expected.

  The message starts with where the problem is, e.g. ``corpus.jsonl:17: ...``.
  """


def at(path, line=None) -> str:
  """Formats a location as ``path`` or ``path:line`` for error messages."""
  return f"{path}:{line}" if line is not None else str(path)


class CorruptStoreError(InputError):
  """A store's chunk does not hold what its marker says it was written with
  (checksum, size), or cannot be read; the message names the chunk."""


class StoreClaimedError(InputError):
  """Another live job is writing the store (the message names it)."""


class QuarantineLimitError(InputError):
  """More examples had a non-finite loss or gradient than the run allows."""


class OtherProcessError(InputError):
  """Another process of a jax.distributed run failed; the message is its own."""


# The lines of the traceback a tensorstore callback prints when Orbax's event
# loop is closed (``quiet_failed_loads``), after its header.
_LOOP_CLOSED_LINE = re.compile(
    r'  File ".*asyncio[/\\]base_events\.py", line \d+, in '
    r"(call_soon_threadsafe|_check_closed)|    self\._check_closed\(\)|"
    r"    raise RuntimeError\('Event loop is closed'\)|"
    r"RuntimeError: Event loop is closed")
_HEADER = "Traceback (most recent call last):"
# Starts of the lines above (and of the header): a partial write that may be
# one is held until its line ends.
_STARTS = ("Traceback", "  File", "    ", "RuntimeError")


class _WithoutLoopClosedTracebacks:
  """A text stream that writes to ``stream`` all but the tracebacks of
  ``_LOOP_CLOSED_LINE`` lines: each such line is dropped, with the header
  held before it. Lines are put together per thread, as several threads
  print such tracebacks at once, in pieces (an indent, then its text)."""

  def __init__(self, stream):
    self._stream = stream
    self._partial: dict[int, str] = {}
    self._headers: dict[int, int] = {}  # held, not yet known to be ours
    self._lock = threading.Lock()

  def write(self, text: str) -> int:
    thread = threading.get_ident()
    with self._lock:
      *lines, partial = (self._partial.pop(thread, "") + text).split("\n")
      for line in lines:
        if line == _HEADER:
          self._headers[thread] = self._headers.get(thread, 0) + 1
        elif _LOOP_CLOSED_LINE.fullmatch(line):
          if line.endswith("in call_soon_threadsafe") and self._headers.get(thread):
            self._headers[thread] -= 1  # its header, dropped with it
        else:
          self._stream.write((_HEADER + "\n") * self._headers.pop(thread, 0)
                             + line + "\n")
      if partial and not any(partial.startswith(p) or p.startswith(partial)
                             for p in _STARTS):
        self._stream.write((_HEADER + "\n") * self._headers.pop(thread, 0) + partial)
      elif partial:
        self._partial[thread] = partial
      return len(text)

  def release(self) -> None:
    with self._lock:
      held = "".join((_HEADER + "\n") * self._headers.get(t, 0) + self._partial.get(t, "")
                     for t in {*self._headers, *self._partial})
      self._headers, self._partial = {}, {}
    if held:
      self._stream.write(held)

  def __getattr__(self, name):
    return getattr(self._stream, name)


class _NotRetrieved(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return "exception was never retrieved" not in record.getMessage()


class _HeldOrbaxRecords(logging.Filter):
  """Holds back what Orbax logs (its warnings that it found no metadata, as
  it fails): ``quiet_failed_loads`` logs it if the load succeeds, and
  drops it (``held = None``) if it fails."""

  def __init__(self):
    super().__init__()
    self.held: list[logging.LogRecord] | None = []  # None: dropped

  def filter(self, record: logging.LogRecord) -> bool:
    if f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    if self.held is not None:
      self.held.append(record)
    return False


@contextlib.contextmanager
def quiet_failed_loads() -> Iterator[None]:
  """Around an Orbax restore, which raises (an InputError, say) when one
  array fails to load (a file of a partial copy missing): Orbax then closes
  its event loop while tensorstore is still finishing the other reads, whose
  callbacks, in tensorstore's threads and also after the raise, print a
  ``RuntimeError: Event loop is closed`` traceback each (130 lines for the
  tiny model), and its failed gather and coroutines are reported as
  "never retrieved" / "never awaited" when collected; Orbax also logs
  warnings as it fails (no metadata found). After such a raise, those are
  dropped from stderr for the rest of the process, which is about to end
  with its own one line; everything else goes through. A block that ends
  normally leaves stderr as it was, and Orbax's records held in it are
  logged then."""
  quiet, not_retrieved = _WithoutLoopClosedTracebacks(sys.stderr), _NotRetrieved()
  sys.stderr = quiet
  asyncio_log = logging.getLogger("asyncio")
  asyncio_log.addFilter(not_retrieved)
  orbax_records, absl_log = _HeldOrbaxRecords(), logging.getLogger("absl")
  absl_log.addFilter(orbax_records)
  try:
    yield
  except BaseException:
    orbax_records.held = None
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                            category=RuntimeWarning)
    raise
  else:
    asyncio_log.removeFilter(not_retrieved)
    absl_log.removeFilter(orbax_records)
    if sys.stderr is quiet:
      sys.stderr = quiet._stream  # pylint: disable=protected-access
    quiet.release()
    for record in orbax_records.held:
      absl_log.handle(record)


def unread_array(error: BaseException) -> BaseException | None:
  """The tensorstore error under the bare Exception Orbax raises for an
  array whose data it could not read (a file of a partial copy missing or
  cut: ``Encountered error while reading array index``); None for any other
  error."""
  if "error while reading array" in str(error) and error.__cause__ is not None:
    return error.__cause__
  return None
