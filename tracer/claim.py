"""One writer per store: a claim file that a second job cannot take while the
first lives.

A job that writes a store (one process of it: process 0 of a multi-host run;
the others follow its decision) first takes the claim: ``<store>/writer.json``,
written with a compare-and-swap (tensorstore's conditional write on the
kvstore: local files, GCS and S3 alike), so of two jobs racing for it exactly
one wins. It names its job::

  {"job": "<uuid>", "host": "...", "boot_id": "<uuid>", "pid": 1234,
   "pid_start": "...", "pid_ns": "pid:[4026531836]",
   "started": "2026-11-29T10:53:05Z", "heartbeat": 1795949655.6}

and is refreshed (``heartbeat``) every ``stale_after_s / 4`` seconds by a
background thread while the job runs, before each chunk the job writes
(``check``), and deleted when it ends (with the local directories taking
it made, where they are still empty: a job refused before it wrote the
store leaves no trace). The record holds its job's
``stale_after_s`` too. Another job finding a claim takes it over only if it
is stale: its process is gone (same host, same boot ``boot_id`` and same PID
namespace ``pid_ns``: no such pid, a zombie, or the pid now belongs to a
later process; the boot tells apart machines that share a hostname, whose
initial PID namespaces read alike) or its
heartbeat is older than the longer of the two jobs' ``stale_after_s`` (any
host, any namespace; a record without ``pid_ns`` is judged by this alone; a
job started with a shorter timeout than the owner's must not take over a
live owner that beats at its own pace). A file that is not a claim record (not
a JSON object) is stale. Otherwise it fails at once with
``StoreClaimedError`` naming the owner. A claim that cannot be read or
written (a read-only mount, a bucket the job may only read) is an
InputError naming ``writer.json``.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable

import tensorstore as ts

from tracer import storage
from tracer.errors import InputError, StoreClaimedError

CLAIM_FILE = "writer.json"
# Every record is padded to this many bytes. Claims need tensorstore's
# conditional writes, and its file driver writes a value into the
# ``writer.json.__lock`` a killed write left behind without truncating it:
# a shorter record would keep that file's tail. Records of one length
# overwrite it whole. (A record is < 600 bytes with a 253-byte host name.)
RECORD_BYTES = 1024
DEFAULT_STALE_AFTER_S = 600.0
# The longest wait between heartbeats, whatever the timeout: a wait past
# threading.TIMEOUT_MAX (~9.2e9 s) raises in the heartbeat thread.
MAX_HEARTBEAT_S = 3600.0


def _pid_start(pid: int) -> str | None:
  """When process ``pid`` started (Linux: clock ticks since boot), to tell a
  reused pid from the original; None where it cannot be known."""
  try:
    with open(f"/proc/{pid}/stat", "rb") as f:
      # Field 22; the command name (field 2) may hold spaces, so split after it.
      return f.read().rsplit(b")", 1)[1].split()[19].decode()
  except (OSError, IndexError):
    return None


def _boot_id() -> str | None:
  """This machine's boot (Linux: a random id drawn at each boot); None where
  it cannot be known."""
  try:
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
      return f.read().strip() or None
  except OSError:
    return None


def _pid_namespace() -> str | None:
  """This process's PID namespace (Linux: ``pid:[inode]``): containers that
  share a hostname (docker --net=host, Kubernetes hostNetwork) may each have
  their own, where a pid means another process. None where it cannot be known."""
  try:
    return os.readlink("/proc/self/ns/pid")
  except OSError:
    return None


def _parse(value: bytes) -> dict[str, Any]:
  """A claim record from its bytes; ValueError if it is not one (not UTF-8,
  not JSON, or not a JSON object)."""
  owner = json.loads(bytes(value).decode("utf-8"))
  if not isinstance(owner, dict):
    raise ValueError(f"expected a JSON object, got {type(owner).__name__}")
  return owner


def _process_state(pid: int) -> str | None:
  """Process ``pid``'s state letter (Linux: R, S, D, Z, ...); None where it
  cannot be known."""
  try:
    with open(f"/proc/{pid}/stat", "rb") as f:
      return f.read().rsplit(b")", 1)[1].split()[0].decode()
  except (OSError, IndexError):
    return None


def _process_alive(pid: int, start: str | None) -> bool:
  if not 0 < pid < 2**31:  # (0 and -1 would ask about process groups)
    raise ValueError(f"pid {pid} is not a process id")
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # exists, another user's
  if _process_state(pid) in ("Z", "X"):  # killed, not yet reaped by its parent
    return False
  return start is None or _pid_start(pid) in (None, start)


def describe(owner: dict[str, Any]) -> str:
  """``host H, pid P, started T`` of a claim."""
  return (f"job {owner.get('job', '?')} on host {owner.get('host', '?')}, pid "
          f"{owner.get('pid', '?')}, started {owner.get('started', '?')}")


def stale_limit(owner: dict[str, Any], stale_after_s: float) -> float:
  """The heartbeat age past which ``owner``'s claim is stale: the longer of
  ``stale_after_s`` and the owner's own (it beats at a quarter of its own)."""
  own = owner.get("stale_after_s")
  if isinstance(own, (int, float)) and not isinstance(own, bool):
    return max(float(stale_after_s), float(own))
  return float(stale_after_s)


def stale_reason(owner: dict[str, Any], stale_after_s: float,
                 now: float | None = None) -> str | None:
  """Why a claim may be taken over ("its process is gone", "no heartbeat for
  N s"), or None while its job lives. The heartbeat is judged against the
  longer of ``stale_after_s`` and the owner's own (it beats at a quarter of
  its own)."""
  now = time.time() if now is None else now
  heartbeat = float(owner.get("heartbeat", 0))
  if not math.isfinite(heartbeat):  # (NaN was never stale, before 2026-12-07)
    return f"its heartbeat {owner.get('heartbeat')!r} is not a time"
  age = now - heartbeat
  stale_after_s = stale_limit(owner, stale_after_s)
  # A pid means this host's process only in this PID namespace. A record
  # without one (written before tracer recorded it, or where it cannot be
  # read) is judged by its heartbeat alone: it may be another container's
  # live job, and taking that over makes two writers of one store, whereas
  # waiting out a dead job's heartbeat costs at most ``stale_after_s``.
  # Every machine's initial PID namespace has the same inode, so the boot
  # tells apart two machines of one hostname (cloned images, "localhost").
  namespace = owner.get("pid_ns")
  if (owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int)
      and namespace is not None and namespace == _pid_namespace()
      and owner.get("boot_id", _boot_id()) == _boot_id()):
    if not _process_alive(owner["pid"], owner.get("pid_start")):
      return "its process is gone"
  if age > stale_after_s:
    return f"no heartbeat for {age:.0f} s (more than {stale_after_s:.0f} s)"
  return None


def clear_stale(location: str, stale_after_s: float = DEFAULT_STALE_AFTER_S
                ) -> dict[str, Any] | None:
  """Deletes the claim at ``location`` if its job is gone (a run killed after
  its last chunk but before releasing); returns the owner it deleted. An
  InputError naming the claim where it cannot be read or deleted."""
  location = storage.normalize(location)
  kv = _open(location)
  current = _io(location, "read the store's claim", kv.read(CLAIM_FILE).result)
  if current.state == "missing":
    return None
  try:
    owner = _parse(current.value)
    if stale_reason(owner, stale_after_s) is None:
      return None
  except (TypeError, ValueError):  # not a claim record: stale
    owner = {}
  _io(location, "delete a dead job's claim", lambda: kv.write(
      CLAIM_FILE, None, if_equal=current.stamp.generation).result())
  return owner


def _open(location: str) -> ts.KvStore:
  return _io(location, "open the store's claim", lambda: ts.KvStore.open(
      storage.kvstore_spec(location), context=storage.CONTEXT).result())


def _io(location: str, action: str, fn: Callable[[], Any]) -> Any:
  """``fn()``, its storage error (tensorstore's ValueError, an OSError) an
  InputError naming the claim: a read-only mount or a bucket the job may
  only read is the user's to fix, not a traceback."""
  with storage.writing(storage.join(location, CLAIM_FILE), action):
    return fn()


def missing_dirs(location: str) -> list[str]:
  """The directories of a local ``location`` that do not exist, from it up
  (the ones writing its claim makes); none for object storage."""
  path = storage.local_path(location)
  missing = []
  while path and not os.path.exists(path):
    missing.append(path)
    parent = os.path.dirname(path.rstrip("/"))
    path = None if parent == path else parent
  return missing


def remove_dirs(made: list[str]) -> None:
  """Removes ``missing_dirs``'s directories, deepest first, each only while
  empty (the first that is not, and those above it, stay)."""
  for path in made:
    try:
      os.rmdir(path)
    except OSError:
      break


class Claim:
  """This job's claim on a store; ``release()`` it (or use ``with``)."""

  def __init__(self, location: str, stale_after_s: float = DEFAULT_STALE_AFTER_S,
               heartbeat_s: float | None = None):
    self.location = storage.normalize(location)
    self.stale_after_s = float(stale_after_s)
    self.heartbeat_s = (min(max(0.05, self.stale_after_s / 4), MAX_HEARTBEAT_S)
                        if heartbeat_s is None else heartbeat_s)
    self.taken_over: tuple[dict[str, Any], str] | None = None
    self.lost: str | None = None
    self._kv = _open(self.location)
    self._record = {"job": uuid.uuid4().hex[:12], "host": socket.gethostname(),
                    "boot_id": _boot_id(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
                    "pid_ns": _pid_namespace(), "stale_after_s": self.stale_after_s,
                    "started": datetime.datetime.now(datetime.timezone.utc)
                    .strftime("%Y-%m-%dT%H:%M:%SZ")}
    self._generation = None
    self._made_dirs: list[str] = []   # local directories the claim made, deepest first
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._thread = None

  @property
  def job(self) -> str:
    return self._record["job"]

  def _put(self, if_equal: bytes) -> bytes | None:
    """Writes our record if the claim's generation is still ``if_equal``;
    the new generation, or None if someone else changed it first. A write
    that landed although its reply was lost (a retried conditional write
    then fails its condition) left our own record: its generation."""
    data = json.dumps({**self._record, "heartbeat": time.time()}, sort_keys=True)
    data = data.encode().ljust(RECORD_BYTES)  # (JSON ignores the spaces)
    stamp = self._kv.write(CLAIM_FILE, data, if_equal=if_equal).result()
    if stamp.generation:
      return stamp.generation
    current = self._kv.read(CLAIM_FILE).result()
    if current.state != "missing":
      try:
        if _parse(current.value).get("job") == self.job:
          return current.stamp.generation
      except ValueError:
        pass
    return None

  def acquire(self) -> Claim:
    """Takes the claim, taking over a stale one; StoreClaimedError if a live
    job holds it, an InputError if the claim cannot be read or written."""
    self._made_dirs = missing_dirs(self.location)
    for _ in range(10):  # each retry means another job changed it meanwhile
      current = _io(self.location, "read the store's claim",
                    self._kv.read(CLAIM_FILE).result)
      if current.state == "missing":
        generation = _io(self.location, "write the store's claim",
                         lambda: self._put(current.stamp.generation))
      else:
        where = storage.join(self.location, CLAIM_FILE)
        try:
          owner = _parse(current.value)
          why = stale_reason(owner, self.stale_after_s)
        except (TypeError, ValueError):
          owner, why = {}, "it is not a claim record"
        if why is None:
          age = time.time() - float(owner["heartbeat"])
          limit = stale_limit(owner, self.stale_after_s)
          # A heartbeat ahead of this clock by more than the limit is judged
          # by neither: a dead job's would hold the store until the clocks
          # meet (before 2026-12-07 "last heartbeat -82800 s ago; wait").
          raise StoreClaimedError(
              f"{where}: the store is being written by another {describe(owner)} "
              f"(last heartbeat {age:.0f} s ago); wait for it or stop it (a "
              f"claim without a heartbeat for {limit:.0f} s is taken over)"
              if age >= -limit else
              f"{where}: the store is claimed by {describe(owner)}, whose last "
              f"heartbeat is {-age:.0f} s ahead of this host's clock: the "
              "hosts' clocks disagree, so its age cannot be judged; expected "
              f"clocks within {limit:.0f} s (if its job is gone, delete {where})")
        generation = _io(self.location, "write the store's claim",
                         lambda: self._put(current.stamp.generation))
        if generation:
          self.taken_over = (owner, why)
      if generation:
        self._generation = generation
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name="tracer-claim-heartbeat")
        self._thread.start()
        return self
    raise StoreClaimedError(f"{self.location}: could not take the store's claim: "
                            "other jobs keep changing it")

  def refresh(self) -> None:
    """Renews the heartbeat; records in ``lost`` if another job took over."""
    with self._lock:
      if self._generation is None or self.lost:
        return
      generation = self._put(self._generation)
      if generation is None:
        current = self._kv.read(CLAIM_FILE).result()
        owner = {}
        if current.state != "missing":
          try:
            owner = _parse(current.value)
          except ValueError:
            pass
        self.lost = (f"{storage.join(self.location, CLAIM_FILE)}: this job's claim "
                     f"on the store was taken over by {describe(owner)}")
      else:
        self._generation = generation

  def check(self) -> None:
    """Renews the claim and raises StoreClaimedError if it was lost (call
    before writing: a job that lost it learns so now, not at the next beat).
    A storage error renewing it is left to the beats."""
    try:
      self.refresh()
    except ValueError:
      pass
    if self.lost:
      raise StoreClaimedError(self.lost)

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        self.refresh()
      except ValueError:
        pass  # a transient storage error: the next beat tries again

  def release(self) -> None:
    """Stops the heartbeat and deletes the claim if it is still ours."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    with self._lock:
      if self._generation is not None and not self.lost:
        _io(self.location, "delete the store's claim",  # (a raw ValueError before)
            self._kv.write(CLAIM_FILE, None, if_equal=self._generation).result)
        remove_dirs(self._made_dirs)  # only while empty: a store begun stays
      self._generation = None

  def __enter__(self) -> Claim:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
