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
polled by ``watch_failures``' thread even while their main thread waits in a
collective) and end with that message. ``leave_together`` keeps process 0,
which hosts the store, up until every process has read it.

All of it is a no-op on one process, or where this jax has no client.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Callable, NamedTuple

import jax

from tracer.errors import InputError, OtherProcessError

FAILED = "tracer/failed"     # FAILED/<process>: {"status", "message"}
LEAVING = "tracer/leaving"   # LEAVING/<process>: this process is about to exit
WATCH_INTERVAL_S = 1.0       # how often each process asks for failures
LEAVE_TIMEOUT_S = 30.0       # process 0's longest wait for the others to read
LAST_OUT_S = 0.5             # process 0's wait after the last one said it leaves


class Failure(NamedTuple):
  """Another process's failure: its index, exit status and one-line message."""
  process: int
  status: int
  message: str

  def error(self) -> OtherProcessError:
    return OtherProcessError(f"process {self.process} of {jax.process_count()} "
                             f"failed: {self.message}")


def client():
  """jax.distributed's client of the coordination service, or None on one
  process, before ``jax.distributed.initialize``, after its shutdown, or
  where this jax has none."""
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  found = getattr(distributed.global_state, "client", None)
  return found if found is not None and jax.process_count() > 1 else None


def tell_failure(error: BaseException, bad_input: bool | None = None) -> None:
  """Leaves ``error`` for the other processes (``failures``): exit status 2
  and its message for bad input (by default an InputError), 1 and its type
  and message for anything else (a bug). Never raises: it is called while
  an error is on its way up."""
  kv = client()
  if kv is not None:
    if bad_input is None:
      bad_input = isinstance(error, InputError)
    record = ({"status": 2, "message": str(error)} if bad_input else
              {"status": 1, "message": f"{type(error).__name__}: {error}"})
    try:
      kv.key_value_set(f"{FAILED}/{jax.process_index()}", json.dumps(record),
                       allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass  # the others wait as they would without it


def failures() -> list[Failure]:
  """The other processes' failures so far, by process index."""
  kv = client()
  if kv is None:
    return []
  me, found = jax.process_index(), []
  for key, value in kv.key_value_dir_get(FAILED):
    process = int(key.rsplit("/", 1)[1])
    if process != me:
      record = json.loads(value)
      found.append(Failure(process, int(record["status"]), str(record["message"])))
  return sorted(found)


def watch_failures(on_failure: Callable[[Failure], None],
                   interval_s: float = WATCH_INTERVAL_S) -> threading.Thread:
  """Starts a daemon thread that calls ``on_failure`` with the first other
  process's failure it finds (polling every ``interval_s``), then stops. It
  also stops, silently, once jax.distributed shuts down: it keeps watching
  through the shutdown barrier, where a process that finished its work waits
  for one that may still fail."""

  def watch():
    while True:
      time.sleep(interval_s)
      try:
        found = failures() if client() is not None else None
      except Exception:  # pylint: disable=broad-except
        return  # the service is gone: the run is ending anyway
      if found is None:
        return
      if found:
        on_failure(found[0])
        return

  thread = threading.Thread(target=watch, name="tracer-failure-watch", daemon=True)
  thread.start()
  return thread


def leave_together(timeout_s: float = LEAVE_TIMEOUT_S, poll_s: float = 0.05) -> None:
  """Says this process is leaving. Process 0, which hosts the key-value
  store, then waits (at most ``timeout_s``) until every process has said so,
  i.e. has read what it needed; the others return at once. Never raises."""
  kv = client()
  if kv is None:
    return
  try:
    kv.key_value_set(f"{LEAVING}/{jax.process_index()}", "1", allow_overwrite=True)
    if jax.process_index() != 0:
      return
    deadline = time.monotonic() + timeout_s
    while (len(kv.key_value_dir_get(LEAVING)) < jax.process_count()
           and time.monotonic() < deadline):
      time.sleep(poll_s)
    # The others exit right after saying so; once process 0 has gone, the
    # agent of any still alive aborts the process (SIGABRT) within ~1 s.
    time.sleep(LAST_OUT_S)
  except Exception:  # pylint: disable=broad-except
    pass
