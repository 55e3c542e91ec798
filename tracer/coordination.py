"""What the processes of a jax.distributed run tell each other outside
collectives: that one of them failed, and why.

On a pod, a host that fails (a damaged store chunk in its share, a bad line
in its corpus files, a bug) leaves the others waiting in a collective that
will never complete. Measured before this module (two local processes, a
corrupt chunk found by one of them mid-scan): the other waited until
jax.distributed's shutdown barrier timed out, 300 s, and both then aborted
(SIGABRT), the survivor's log saying only that "another task died".

Here a failing process leaves its one-line error in jax.distributed's
key-value store (``tell_failure``: a service on process 0 that every process
reaches over RPC, with no collective); the others read it (``failures``,
polled by a ``FailureWatcher``'s thread even while their main thread waits
in a collective, and at the end while it waits for the others) and end with
that message. ``leave_together`` keeps process 0, which hosts the store, up
until every process has read it.

A process that dies without a word (SIGKILL, the OOM killer, a lost or
hung host) cannot leave one. So each watcher thread also raises a count of
its own (``ALIVE``), and process 0's watcher leaves the failure of any
process whose count has not moved for ``silent_timeout_s`` (status
``LOST_STATUS``). Measured before (two processes, one stopped by SIGSTOP
mid-encode, the other in a collective): the other aborted 79 s later at
jax.distributed's heartbeat timeout (SIGABRT, status 134, a C++ stack).
Process 0's own death takes the service with it; jax's agent then ends the
others (SIGABRT) within about a second.

A check each process makes of its own share (a tokenized corpus's source
files: ``pipeline.tokenize_on_processes``) ends the same way on all of them:
``agree`` exchanges their verdicts through the same store and returns the
first failing one to every process.

All of it is a no-op on one process, or where this jax has no client. None
of it touches jax's backend (``jax.process_index`` would): a call made while
jax tears the backend down at exit would start a new one, whose collectives
then fail against the closing service (SIGABRT).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Callable, NamedTuple

from tracer.errors import InputError, OtherProcessError

FAILED = "tracer/failed"      # FAILED/<process>: {"status", "message"}
LEAVING = "tracer/leaving"    # LEAVING/<process>: it is about to exit
FINISHED = "tracer/finished"  # FINISHED/<process>: its work is done
WATCH_INTERVAL_S = 1.0        # how often each process asks for failures
LEAVE_TIMEOUT_S = 30.0        # process 0's longest wait for the others to read
LAST_OUT_S = 0.5              # process 0's wait after the last one left
FINISH_TIMEOUT_S = 300.0      # as jax.distributed's shutdown barrier
ALIVE = "tracer/alive"        # ALIVE/<process>: a count its watcher raises
HEARTBEAT_S = 5.0             # how often (at most) the count is raised
# A process not heard from for this long is lost. Below jax.distributed's
# own heartbeat timeout (``distributed_heartbeat_s``), so that the others
# end with a message instead of jax's abort.
SILENT_TIMEOUT_S = 60.0
LOST_STATUS = 75              # sysexits' EX_TEMPFAIL: rerun to resume
AGREED = "tracer/agreed"      # AGREED/<name>/<round>/<process>: its verdict
AGREE_TIMEOUT_S = FINISH_TIMEOUT_S  # longest wait for the others' verdicts
HOSTS = "tracer/hosts"        # HOSTS/<process>: [its host, its memory cgroup]
_rounds: dict[str, int] = {}  # name: this process's calls of ``agree`` so far
# Failing verdicts ``agree`` returned, which this process raises itself: its
# watcher leaves the others' failures with these messages to it.
_agreed: set[str] = set()


class Failure(NamedTuple):
  """Another process's failure: its index, exit status and one-line message."""
  process: int
  status: int
  message: str

  def error(self) -> OtherProcessError:
    return OtherProcessError(f"process {self.process} of {_processes()[1]} "
                             f"failed: {self.message}")


def _state():
  """jax.distributed's state (client, process id and count), or None where
  this jax has none, or where jax was never imported (``launch.view``:
  nothing to ask, and importing it would take seconds)."""
  if "jax" not in sys.modules:
    return None
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return distributed.global_state


def _processes() -> tuple[int, int]:
  """(this process's index, the number of processes) of the run."""
  state = _state()
  return getattr(state, "process_id", 0) or 0, getattr(state, "num_processes", 1) or 1


def client():
  """jax.distributed's client of the coordination service, or None on one
  process, before ``jax.distributed.initialize``, after its shutdown, or
  where this jax has none."""
  found = getattr(_state(), "client", None)
  return found if found is not None and _processes()[1] > 1 else None


def as_failure(error: BaseException, bad_input: bool | None = None,
               status: int | None = None) -> Failure:
  """``error`` as this process's Failure: exit status 2 and its message for
  bad input (by default an InputError), 1 and its type and message for
  anything else (a bug); ``status`` and its message where given (a signal)."""
  if status is not None:
    return Failure(_processes()[0], status, str(error))
  if bad_input is None:
    bad_input = isinstance(error, InputError)
  return Failure(_processes()[0], *((2, str(error)) if bad_input else
                                    (1, f"{type(error).__name__}: {error}")))


def tell_failure(error: BaseException, bad_input: bool | None = None,
                 status: int | None = None) -> None:
  """Leaves ``error`` for the other processes (``failures``; ``as_failure``).
  Never raises: it is called while an error is on its way up."""
  kv = client()
  if kv is not None:
    failure = as_failure(error, bad_input, status)
    record = {"status": failure.status, "message": failure.message}
    try:
      kv.key_value_set(f"{FAILED}/{failure.process}", json.dumps(record),
                       allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass  # the others wait as they would without it


def failures() -> list[Failure]:
  """The other processes' failures so far, by process index."""
  kv = client()
  if kv is None:
    return []
  me, found = _processes()[0], []
  for key, value in kv.key_value_dir_get(FAILED):
    process = int(key.rsplit("/", 1)[1])
    if process != me:
      record = json.loads(value)
      found.append(Failure(process, int(record["status"]), str(record["message"])))
  return sorted(found)


def agree(name: str, verdict: str, timeout_s: float = AGREE_TIMEOUT_S,
          interval_s: float = WATCH_INTERVAL_S) -> tuple[int, str] | None:
  """One outcome, on every process, of a check each made of its own share:
  ``verdict`` is this process's ("" if its share passed, else why not);
  returns the first failing process's (index, verdict), by index, or None.
  On one process (no client), this one's.

  Call it on every process, the same number of times with the same
  ``name``: the n-th calls are one round (a run may check twice). The
  process whose verdict completes the round (the last to set one always
  sees every one) leaves the outcome; the others wait for it in blocking
  reads of ``interval_s``, reading ``failures`` between them: a process that
  failed instead ends the wait with its OtherProcessError, as does no
  outcome within ``timeout_s``. P processes cost P sets and P reads of the
  round's directory, one set of the outcome, and a read per wait.

  The caller raises a failing outcome's error itself, on every process
  alike: the others' failures with that message (told as they raise it)
  then end no process (``FailureWatcher``), so each says it as its own."""
  kv = client()
  me, count = _processes()
  if kv is None:
    return (me, verdict) if verdict else None
  _rounds[name] = _rounds.get(name, -1) + 1
  where = f"{AGREED}/{name}/{_rounds[name]}"
  kv.key_value_set(f"{where}/{me}", json.dumps(verdict), allow_overwrite=True)
  told = kv.key_value_dir_get(where)
  if len(told) >= count:
    verdicts = sorted((int(k.rsplit("/", 1)[1]), json.loads(v)) for k, v in told)
    first = next(((p, v) for p, v in verdicts if v), None)
    if first is not None:
      _agreed.add(first[1])
    kv.key_value_set(f"{where}.all", json.dumps(first), allow_overwrite=True)
    return first
  deadline = time.monotonic() + timeout_s
  while True:
    left = deadline - time.monotonic()
    outcome = _wait_for(kv, f"{where}.all", min(interval_s, max(0.0, left)))
    if outcome is None:
      found = failures()
      # A failure told after the outcome was left (a process raising what
      # all agreed on) is not the reason: the outcome is.
      outcome = _wait_for(kv, f"{where}.all", 0.1) if found else None
      if found and outcome is None:
        raise found[0].error()
    if outcome is not None:
      first = json.loads(outcome)
      if first is None:
        return None
      _agreed.add(first[1])
      return int(first[0]), str(first[1])
    if left <= 0:
      missing = sorted(set(range(count)) - {int(k.rsplit("/", 1)[1]) for k, _
                                            in kv.key_value_dir_get(where)})
      raise OtherProcessError(f"{name}: no verdict from process"
                              f"{'es' if len(missing) > 1 else ''} "
                              f"{', '.join(map(str, missing))} of {count} "
                              f"within {timeout_s:g} s")


def tell_host(identity: list[str]) -> None:
  """Leaves this process's ``[host, memory cgroup]`` (``memory.host_identity``)
  for the others' ``sharing``; a no-op on one process."""
  kv = client()
  if kv is not None:
    kv.key_value_set(f"{HOSTS}/{_processes()[0]}", json.dumps(identity),
                     allow_overwrite=True)


def sharing(identity: list[str]) -> tuple[int, int]:
  """(processes of the run on this one's host, in its memory cgroup), this
  one included, among those that told theirs (``tell_host``: the launch
  scripts' processes all do at the join; this one does now if it had not):
  (1, 1) on one process. One read of a directory of P entries."""
  kv = client()
  if kv is None:
    return 1, 1
  told = [json.loads(v) for _, v in kv.key_value_dir_get(HOSTS)]
  if identity not in told:
    tell_host(identity)
    told.append(identity)
  return (sum(t[0] == identity[0] for t in told),
          sum(t == identity for t in told))


def _wait_for(kv, key: str, timeout_s: float) -> str | None:
  """``key``'s value, once set (at most ``timeout_s`` from now), else None."""
  try:
    return kv.blocking_key_value_get(key, max(1, int(timeout_s * 1000)))
  except Exception:  # pylint: disable=broad-except
    return None  # (a deadline)


def distributed_heartbeat_s(silent_timeout_s: float) -> int:
  """jax.distributed's heartbeat timeout for a run whose lost processes are
  found after ``silent_timeout_s`` (0: not looked for): its default, 100 s,
  or twice ours, so that ours comes first."""
  return max(100, int(2 * silent_timeout_s))


class _SilenceCheck:
  """Process 0's record of when each other process's ``ALIVE`` count last
  moved, by its own clock (hosts' clocks may differ)."""

  def __init__(self, count: int, timeout_s: float, now: float):
    self.timeout_s = timeout_s
    self.seen = {p: (None, now) for p in range(1, count)}  # p: (count, since)

  def lost(self, kv, now: float) -> list[tuple[int, float]]:
    """(process, seconds silent) of each process silent past the timeout
    that has not finished, failed or left (those stop counting)."""
    counts = {int(k.rsplit("/", 1)[1]): v for k, v in kv.key_value_dir_get(ALIVE)}
    ended = {int(k.rsplit("/", 1)[1]) for topic in (FINISHED, LEAVING, FAILED)
             for k, _ in kv.key_value_dir_get(topic)}
    found = []
    for p, (count, since) in self.seen.items():
      if counts.get(p) != count:
        self.seen[p] = (counts.get(p), now)
      elif p not in ended and now - since > self.timeout_s:
        found.append((p, now - since))
    return found


def _tell_lost(kv, process: int, silent_s: float, timeout_s: float) -> None:
  """Leaves a lost process's failure, unless it left one itself, and says it
  has left (``leave_together`` waits for nobody lost)."""
  message = (f"no word from it for {silent_s:.1f} s (the limit: {timeout_s:g} s): "
             "killed, out of memory, stopped, or its host lost; rerun the same "
             "command to resume")
  try:
    kv.key_value_set(f"{FAILED}/{process}", json.dumps(
        {"status": LOST_STATUS, "message": message}), allow_overwrite=False)
  except Exception:  # pylint: disable=broad-except
    pass  # it has one already
  _say_and_wait(LEAVING, False, 0, process)


class FailureWatcher:
  """A thread that calls ``on_failure`` with the first other process's
  failure it finds (``failures``, polled every ``interval_s``), then stops.
  It also raises this process's ``ALIVE`` count every ``heartbeat_s`` (by
  default ``HEARTBEAT_S``, or a quarter of the timeout when that is less);
  on process 0 it leaves the failure of any process silent for more than
  ``silent_timeout_s`` (0: never). Call ``close`` at this process's normal
  exit (``atexit``)."""

  def __init__(self, on_failure: Callable[[Failure], None],
               interval_s: float = WATCH_INTERVAL_S,
               silent_timeout_s: float = SILENT_TIMEOUT_S,
               heartbeat_s: float | None = None):
    self._on_failure, self._interval_s = on_failure, interval_s
    self._silent_timeout_s = silent_timeout_s
    self._heartbeat_s = (heartbeat_s if heartbeat_s is not None else
                         min(HEARTBEAT_S, silent_timeout_s / 4 or HEARTBEAT_S))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, name="tracer-failure-watch",
                                    daemon=True)
    self._thread.start()

  def _watch(self) -> None:
    me, count = _processes()
    started = time.monotonic()
    check = (_SilenceCheck(count, self._silent_timeout_s, started)
             if me == 0 and self._silent_timeout_s > 0 else None)
    beats, next_beat, failing_since = 0, started, None
    while not self._stop.wait(min(self._interval_s, self._heartbeat_s)):
      try:
        kv = client()
        if kv is None:
          return  # jax.distributed was shut down: the run is ending
        now = time.monotonic()
        if now >= next_beat:
          beats, next_beat = beats + 1, now + self._heartbeat_s
          kv.key_value_set(f"{ALIVE}/{me}", str(beats), allow_overwrite=True)
          for process, silent_s in check.lost(kv, now) if check else ():
            _tell_lost(kv, process, silent_s, self._silent_timeout_s)
        found = [f for f in failures() if f.message not in _agreed]
        failing_since = None
      except Exception:  # pylint: disable=broad-except
        # One failed call (a deadline on a loaded service) must not stop the
        # beats: process 0 would take this process for lost. Calls failing
        # for longer than that limit mean the service is gone.
        now = time.monotonic()
        failing_since = now if failing_since is None else failing_since
        if now - failing_since > (self._silent_timeout_s or SILENT_TIMEOUT_S):
          return
        next_beat = min(next_beat, now)  # beat again at the next round
        continue
      if found:
        self._on_failure(found[0])
        return

  def close(self, timeout_s: float = FINISH_TIMEOUT_S) -> None:
    """Says this process has finished and waits (at most ``timeout_s``)
    until every process has, the thread watching on meanwhile, so that one
    failing after this one finished still ends it; jax.distributed's own
    shutdown barrier then passes at once. Then stops the thread: one left
    inside a call to the service while the interpreter finalizes aborts the
    process ("FATAL: exception not rethrown")."""
    _say_and_wait(FINISHED, True, timeout_s)  # jax's own barrier follows
    self._stop.set()
    self._thread.join()


def _say_and_wait(topic: str, wait: bool, timeout_s: float,
                  process: int | None = None) -> None:
  """Sets ``topic/<this process>`` (or ``process``'s, for it); with ``wait``,
  then waits (at most ``timeout_s``) until every process has. Never raises.

  No polling: the process whose key completes the set (it sees every key
  right after setting its own; the last to set always does) sets
  ``topic.all``, which the others wait for in one blocking call each. At
  P hosts that is O(P) calls in all, where a poll of the P keys every 0.1 s
  had each host read them 10 times a second."""
  kv = client()
  if kv is None:
    return
  try:
    index, count = _processes()
    index = index if process is None else process
    kv.key_value_set(f"{topic}/{index}", "1", allow_overwrite=True)
    if len(kv.key_value_dir_get(topic)) >= count:
      kv.key_value_set(f"{topic}.all", "1", allow_overwrite=True)
    if wait:
      kv.blocking_key_value_get(f"{topic}.all", int(timeout_s * 1000))
  except Exception:  # pylint: disable=broad-except
    pass  # a timeout, or the service is gone: the run is ending anyway


def leave_together(timeout_s: float = LEAVE_TIMEOUT_S) -> None:
  """Says this process is leaving. Process 0, which hosts the key-value
  store, then waits (at most ``timeout_s``) until every process has said so,
  i.e. has read what it needed; the others return at once. Never raises."""
  if client() is None:
    return
  first = _processes()[0] == 0
  _say_and_wait(LEAVING, first, timeout_s)
  if first:
    # The others exit right after saying so; once process 0 has gone, the
    # agent of any still alive aborts the process (SIGABRT) within ~1 s.
    time.sleep(LAST_OUT_S)
