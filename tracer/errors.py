"""Errors raised on bad input: they always name the file, line or field at
fault; and ``quiet_failed_loads``, which keeps a library's noise about such
a failure from burying tracer's one line."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
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


_ORBAX = f"{os.sep}orbax{os.sep}"


def _is_abandoned_read_error(unraisable) -> bool:
  """Whether an unraisable exception is the noise of a read Orbax gave up
  on: asyncio's ``Event loop is closed`` from ``call_soon_threadsafe``,
  which a tensorstore callback raises in its own thread when its read ends
  after Orbax closed the loop that awaited it; or an error an Orbax
  coroutine raises as it is collected unfinished."""
  frames = [f.name for f in traceback.extract_tb(unraisable.exc_traceback)]
  if (isinstance(unraisable.exc_value, RuntimeError)
      and str(unraisable.exc_value) == "Event loop is closed"
      and frames[-2:] == ["call_soon_threadsafe", "_check_closed"]):
    return True
  code = getattr(unraisable.object, "cr_code", None)
  return code is not None and _ORBAX in code.co_filename


class _WithoutAbandonedReadErrors:
  """A ``sys.unraisablehook`` that drops ``_is_abandoned_read_error``s and
  passes every other unraisable exception to the hook it replaced."""

  def __init__(self, replaced):
    self.replaced = replaced

  def __call__(self, unraisable) -> None:
    if not _is_abandoned_read_error(unraisable):
      self.replaced(unraisable)


class _NotRetrieved(logging.Filter):
  """Drops asyncio's "exception was never retrieved" records: tracer runs no
  event loop of its own, so these are of Orbax's tasks (a failed read's
  gather, or a tensorstore future it wrapped, collected later)."""

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
    if _ORBAX not in record.pathname:
      return True
    if self.held is not None:
      self.held.append(record)
    return False


def _drop_stragglers() -> None:
  """Installs, for the rest of the process, the hook and filter that drop
  the noise of a failed read's stragglers (``quiet_failed_loads``)."""
  if not isinstance(sys.unraisablehook, _WithoutAbandonedReadErrors):
    sys.unraisablehook = _WithoutAbandonedReadErrors(sys.unraisablehook)
  asyncio_log = logging.getLogger("asyncio")
  if not any(isinstance(f, _NotRetrieved) for f in asyncio_log.filters):
    asyncio_log.addFilter(_NotRetrieved())


@contextlib.contextmanager
def quiet_failed_loads() -> Iterator[None]:
  """Around an Orbax read, which may fail on one array (a file of a partial
  copy missing) while tensorstore still reads the others. Orbax then closes
  its event loop, and each of those reads' callbacks, in tensorstore's
  threads and at any time later (also after a block Orbax let end normally,
  as its metadata read does), raises ``RuntimeError: Event loop is
  closed``, which Python prints as an unraisable exception's traceback (33
  for the tiny model's metadata); the failed gather is logged as "never
  retrieved", and its unfinished coroutines may raise, when collected.

  From a first such block on, those (and only those) are dropped for the
  rest of the process (a ``sys.unraisablehook``, ``_is_abandoned_read_error``,
  and an ``asyncio`` logger filter), so a load that fails ends in tracer's
  one line. Orbax's own warnings as it fails (no metadata found) are held:
  logged if the block ends normally, dropped if it raises, as are "never
  awaited" warnings from then on.
  """
  _drop_stragglers()
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
    absl_log.removeFilter(orbax_records)
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
