"""How every launch script runs ``main``: bad input is one line, not a traceback.

``run(main)`` replaces ``absl.app.run(main)``. What the user got wrong (a
flag absl cannot parse, a gin binding or file, ``app.UsageError``, and every
``tracer.errors.InputError``: a file, line or field that does not hold what
was expected) ends the process with exit status 2 and ONE line on stderr::

    error: corpus.jsonl:3: field 'text' is empty

Any other exception is a bug in tracer, and keeps its traceback.

On several processes (jax.distributed), a process whose ``main`` fails also
tells the others why (``tracer.coordination``) and exits at once, skipping
jax.distributed's shutdown barrier; each other process, told by its watcher
thread (``other_process_failed``) even while it waits in a collective, writes
``error: process 1 of 64 failed: <its message>`` and exits with the same
status. Before, they waited 300 s at the barrier and aborted, saying nothing.
SIGTERM, SIGINT or SIGHUP to one of them is such a failure too
(``end_on_signals``), and so is a process that falls silent (killed, lost:
process 0's watcher says so after ``--silent_process_timeout_s``). What a
process holds (a store's writer claim: ``undone_at_end``) is given up
however it ends.

This module defines no flags and imports neither tracer nor jax, so every
script uses it (``launch.bm25`` and ``launch.evaluate`` define flags of
their own, ``launch.plan`` must import without jax); ``launch.config`` re-exports
``run``.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import traceback
from typing import Any, Callable, Iterator, NoReturn, Sequence

from absl import app
from absl import flags

EXIT_BAD_INPUT = 2

# C0 and C1 control characters, DEL, and the bidirectional overrides and
# isolates (which reorder what a terminal shows): escaped by ``printable``.
_UNPRINTABLE = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7f, 0xa0)]}
_UNPRINTABLE.update({c: f"\\u{c:04x}" for c in
                     [0x061c, 0x200e, 0x200f, *range(0x202a, 0x202f),
                      *range(0x2066, 0x206a)]})


def printable(text: Any) -> str:
  """``text`` safe to show on a terminal: control characters (escape
  sequences, carriage returns, newlines, tabs) and bidi overrides are
  written as ``\\xNN`` / ``\\uNNNN``. Corpus texts and ids are untrusted."""
  return str(text).translate(_UNPRINTABLE)


def is_bad_input(error: BaseException) -> bool:
  """What a user's mistake raises (``tracer.errors.InputError`` and its
  subclasses, absl's usage and flag errors); anything else is a bug."""
  if isinstance(error, (app.UsageError, flags.Error)):
    return True
  # Not imported here: scripts such as launch.plan must not load tracer (and
  # jax). If tracer.errors was never imported, no InputError was raised.
  errors = sys.modules.get("tracer.errors")
  return errors is not None and isinstance(error, errors.InputError)


def one_line(message: Any) -> str:
  """``message`` on one line: its lines joined, control characters escaped
  (messages quote input, which may hold terminal escape sequences)."""
  text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
  return printable(text) or "(no message)"


def fail(message: Any) -> NoReturn:
  """Writes ``error: <message>`` (one line) to stderr and exits with status 2."""
  sys.stdout.flush()
  sys.stderr.write(f"error: {one_line(message)}\n")
  sys.stderr.flush()
  sys.exit(EXIT_BAD_INPUT)


# Held by whichever of the main thread (its own failure) and the watcher
# thread (another process's) ends this process first; the other then waits.
_ENDING = threading.Lock()


def _coordination():
  """``tracer.coordination`` when this process is one of several of a
  jax.distributed run, else None (it is never imported here: a run that did
  not import it, by ``launch.config``, has not started jax.distributed)."""
  module = sys.modules.get("tracer.coordination")
  return module if module is not None and module.client() is not None else None


def _end_first() -> None:
  """Returns in the first thread to end this process; blocks any other."""
  if not _ENDING.acquire(blocking=False):
    threading.Event().wait()


# What this process must undo however it ends, also where it ends without
# unwinding its stack, so that no ``finally`` runs (``_leave``; a signal to a
# lone process, ``end_on_signals``): e.g. a store's writer claim
# (``launch.common``), which a rerun from another container or host could
# otherwise take over only once its heartbeat is --claim_timeout_s old.
_UNDO: list[Callable[[], None]] = []
# Storage may not answer a dying process: it does not wait longer for it.
UNDO_TIMEOUT_S = 10.0


@contextlib.contextmanager
def undone_at_end(undo: Callable[[], None]) -> Iterator[None]:
  """Calls ``undo()`` when the block ends, and if this process is ended
  inside it by a signal or by another process's failure."""
  _UNDO.append(undo)
  try:
    yield
  finally:
    _UNDO.remove(undo)
    undo()


def _undo_all() -> None:
  """Calls every pending ``undone_at_end`` undo, latest first, in a thread
  waited for at most ``UNDO_TIMEOUT_S``; a failure is one warning line."""
  undos = _UNDO[::-1]

  def undo_each():
    for undo in undos:
      try:
        undo()
      except Exception as e:  # pylint: disable=broad-except
        sys.stderr.write(f"warning: ending, could not undo {undo}: {one_line(e)}\n")

  if undos:
    thread = threading.Thread(target=undo_each, name="tracer-undo", daemon=True)
    thread.start()
    thread.join(UNDO_TIMEOUT_S)


def _leave(coordination, status: int) -> NoReturn:
  """Exits with ``status`` once the others can do without this process,
  skipping the shutdown barrier (which would wait for processes stuck in a
  collective this process will never join), after ``_undo_all``."""
  sys.stdout.flush()
  sys.stderr.flush()
  coordination.leave_together()
  _undo_all()
  sys.stderr.flush()
  os._exit(status)  # pylint: disable=protected-access


def _failed_here(coordination, error: Exception, status: int | None = None
                 ) -> NoReturn:
  """This process's ``main`` raised ``error`` on one of several processes
  (or, with ``status``, a signal stopped it: ``end_on_signals``).
  If another process failed first, ``error`` most likely follows from it
  (gloo's collectives raise once a peer has left): its message is given,
  unless it is this one's (every process failing alike, e.g. on a flag)."""
  bad = is_bad_input(error)
  failure = coordination.as_failure(error, bad_input=bad, status=status)
  mine = failure.message
  try:
    first = [f for f in coordination.failures() if f.message != mine][:1]
  except Exception:  # pylint: disable=broad-except
    first = []
  if first:
    other_process_failed(first[0])
  if failure.status == 1 and any(words in str(error) for words in _PEER_GONE):
    _await_word_of_peers(coordination)
  _end_first()
  if bad or status is not None:
    sys.stdout.flush()
    sys.stderr.write(f"error: {one_line(error)}\n")
  else:
    traceback.print_exc()
  if not isinstance(error, coordination.OtherProcessError):
    coordination.tell_failure(error, bad_input=bad, status=status)
  _leave(coordination, failure.status)


# What gloo's collectives raise when a peer's socket closes under them: the
# peer has died, and its own failure or process 0's word that it fell silent
# (``coordination.FailureWatcher``) will follow.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer")


def _await_word_of_peers(coordination) -> None:
  """Sleeps while the watcher thread learns why a peer left (it then ends
  this process with that message, ``other_process_failed``): at most as
  long as process 0 takes to find a silent process. Returns if no word
  comes (``--silent_process_timeout_s=0``: at once)."""
  name = "silent_process_timeout_s"
  timeout_s = flags.FLAGS[name].value if name in flags.FLAGS else 0
  if timeout_s > 0:
    threading.Event().wait(timeout_s + 2 * coordination.HEARTBEAT_S + 2)


class Stopped(Exception):
  """This process was sent a signal that stops it (``end_on_signals``)."""


# The signals that stop a job, and what usually sends them.
STOPPING_SIGNALS = {signal.SIGTERM: "the job was stopped or its machine preempted",
                    signal.SIGINT: "interrupted",
                    signal.SIGHUP: "its terminal or ssh session closed"}


def end_on_signals(coordination) -> None:
  """On one of several processes (jax.distributed): SIGTERM (a scheduler
  stopping the job, a preempted machine), SIGINT or SIGHUP ends this process
  at once and tells the others, as a failure of its ``main`` would, with
  status 128 + the signal's number (143, 130, 129). A thread does it, so it
  happens even while the main thread waits in a collective, where a Python
  signal handler would not run until the collective returned: the handlers
  only wake the thread (``signal.set_wakeup_fd``). Measured before, with
  three processes and the signalled one in a collective: SIGTERM, which
  jax.distributed's preemption service takes, and SIGINT ended nobody (until
  a SIGKILL); SIGHUP killed that process, and the others aborted 100 s later
  (the heartbeat timeout).

  On a lone process, with nobody to tell, SIGTERM and SIGHUP end it the same
  way (one line, status 143 or 129), and SIGINT stays Python's
  KeyboardInterrupt, whose unwinding runs every ``finally``. Either way,
  what ``undone_at_end`` holds is undone first: before, a lone job stopped
  by its scheduler kept its store claim, and its rerun in a new container
  was refused for --claim_timeout_s (600 s).

  Call from the main thread (after ``jax.distributed.initialize``, whose
  SIGTERM handler this one replaces). A handler the script sets later
  (``tracer serve``: a graceful stop) keeps its signal to itself."""
  lone = coordination.client() is None
  stopping = {s: why for s, why in STOPPING_SIGNALS.items()
              if not (lone and s == signal.SIGINT)}
  read_end, write_end = os.pipe()
  os.set_blocking(write_end, False)

  def ours(signum, frame):  # the thread below acts
    del signum, frame

  for signum in stopping:
    signal.signal(signum, ours)
  signal.set_wakeup_fd(write_end)

  def wait() -> None:
    # Every signal with a Python handler writes its number here.
    while True:
      signum = os.read(read_end, 1)[0]
      if signum in stopping and signal.getsignal(signum) is ours:
        break
    name = signal.Signals(signum).name
    stopped = Stopped(f"stopped by {name} ({stopping[signum]})")
    try:
      if lone:
        _end_first()
        sys.stdout.flush()
        sys.stderr.write(f"error: {stopped}\n")
        _undo_all()
        sys.stderr.flush()
      else:
        _failed_here(coordination, stopped, status=128 + signum)
    finally:  # the handlers do nothing: never leave this process up
      os._exit(128 + signum)  # pylint: disable=protected-access

  threading.Thread(target=wait, name="tracer-signals", daemon=True).start()


def other_process_failed(failure) -> NoReturn:
  """Ends this process with another's failure (a ``tracer.coordination
  .Failure``): its message on one line, its exit status."""
  coordination = sys.modules["tracer.coordination"]
  _end_first()
  sys.stdout.flush()
  sys.stderr.write(f"error: {one_line(failure.error())}\n")
  _leave(coordination, failure.status)


def check_list_flag(name: str, least: int | None = None,
                    choices: Sequence[str] | None = None,
                    empty_ok: bool = False) -> None:
  """Registers a validator of the list flag ``--name`` (``DEFINE_list``,
  comma-separated): at least one item (unless ``empty_ok``), each an
  integer >= ``least`` (given ``least``) or one of ``choices``: a flag
  error, before any work. Before, a benchmark's ``--rows=abc`` or
  ``--kernels=bogus`` was a traceback from int() or from deep in the run."""

  def check(values) -> bool:
    if not values and not empty_ok:
      raise flags.ValidationError(
          f"empty; expected one or more comma-separated integers >= {least}"
          if least is not None else
          f"empty; expected one or more of {', '.join(choices)} (comma-separated)"
          if choices is not None else
          "empty; expected one or more comma-separated values")
    for value in values or ():
      if choices is not None and value not in choices:
        raise flags.ValidationError(f"{value!r} is not one of {', '.join(choices)}")
      if least is not None:
        try:
          number = int(value)
        except ValueError:
          raise flags.ValidationError(
              f"{value!r} is not an integer; expected comma-separated integers "
              f">= {least}") from None
        if number < least:
          raise flags.ValidationError(f"{number}: expected integers >= {least}")
    return True

  flags.register_validator(name, check)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, but an unknown flag or a bad value is ``fail``ed (absl
  prints several lines and exits 1), and --help exits 0."""
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:
    # absl's --help, --helpshort, --helpfull and --helpxml print what was
    # asked for and exit 1, its only exit while parsing; help given as asked
    # is a success, as every other command-line tool says.
    sys.exit(0 if e.code == 1 else e.code)
  except flags.UnrecognizedFlagError as e:
    fail(e if "Did you mean" in str(e) else
         f"{e}; expected one of the flags --helpfull lists")
  except flags.Error as e:
    fail(e)


def _stdout_gone() -> bool:
  """Whether stdout's reader has gone (a pipe's: its end polls as an error;
  not a socket's broken pipe, which stays a bug); stdout is then pointed at
  /dev/null, so that Python's own flush at exit says nothing either."""
  try:
    poll = select.poll()
    poll.register(sys.stdout.fileno(), select.POLLOUT)
    gone = any(events & select.POLLERR for _, events in poll.poll(0))
  except (OSError, ValueError, AttributeError):  # no such fd, no poll
    return False
  if gone:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  return gone


def run(main: Callable[[list[str]], Any], arguments: bool = False) -> None:
  """``absl.app.run(main)``; bad input ends it as ``fail`` does (module doc),
  as do arguments that are not flags unless ``main`` reads them
  (``arguments``: no tracer script does)."""

  def guarded(argv):
    if len(argv) > 1 and not arguments:  # (``--flag false`` passes "false")
      fail(f"unexpected arguments {argv[1:]}; expected --flag=value pairs only "
           "(a boolean flag is --flag or --noflag)")
    try:
      return main(argv)
    except KeyboardInterrupt:
      # Ctrl-C: the user's own stop (finally blocks have run, a claim is
      # released), not a bug, so no traceback; 130 as a shell says.
      sys.stdout.flush()
      sys.stderr.write("interrupted\n")
      sys.exit(130)
    except Exception as e:  # pylint: disable=broad-except
      if isinstance(e, BrokenPipeError) and _stdout_gone():
        # Its reader left (``tracer evaluate ... | head``): the user's own
        # stop, not a bug; 141 (128 + SIGPIPE) as a shell says.
        sys.exit(141)
      coordination = _coordination()
      if coordination is not None:
        _failed_here(coordination, e)
      if not is_bad_input(e):
        raise
      fail(e)

  app.run(guarded, flags_parser=_parse_flags)
