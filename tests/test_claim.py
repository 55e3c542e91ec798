"""Tests for tracer.claim: one writer per store."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from tracer import claim as claim_lib
from tracer.errors import InputError, StoreClaimedError


def _write(path, **record):
  path.mkdir(parents=True, exist_ok=True)
  (path / claim_lib.CLAIM_FILE).write_text(json.dumps(record))


def test_a_live_claim_refuses_a_second_writer_and_names_it(tmp_path):
  store = tmp_path / "s"
  with claim_lib.Claim(str(store)) as first:
    owner = json.loads((store / claim_lib.CLAIM_FILE).read_text())
    assert owner["job"] == first.job and owner["pid"] > 0
    assert owner["pid_ns"] == os.readlink("/proc/self/ns/pid")
    with pytest.raises(StoreClaimedError) as e:
      claim_lib.Claim(str(store)).acquire()
    msg = str(e.value)
    assert f"host {socket.gethostname()}, pid {owner['pid']}" in msg
    assert f"started {owner['started']}" in msg and first.job in msg
  # Released: the file is gone and the next job takes it.
  assert not (store / claim_lib.CLAIM_FILE).exists()
  claim_lib.Claim(str(store)).acquire().release()


def test_a_released_claim_removes_the_empty_directories_it_made(tmp_path):
  # A job refused after taking its claim (an encode step past the memory)
  # left its new store's directories behind, empty, before stop 81.
  store = tmp_path / "runs" / "a" / "store"
  with claim_lib.Claim(str(store)):
    assert (store / claim_lib.CLAIM_FILE).exists()
  assert sorted(os.listdir(tmp_path)) == []
  # A store begun is kept, and so are the directories above it; so is a
  # directory that was there before.
  with claim_lib.Claim(str(store)):
    (store / "manifest.json").write_text("{}")
  assert sorted(os.listdir(store)) == ["manifest.json"]
  (tmp_path / "there").mkdir()
  with claim_lib.Claim(str(tmp_path / "there")):
    pass
  assert sorted(os.listdir(tmp_path)) == ["runs", "there"]


def test_heartbeat_keeps_the_claim_fresh(tmp_path):
  store = tmp_path / "s"
  c = claim_lib.Claim(str(store), stale_after_s=0.4).acquire()
  try:
    time.sleep(1.0)  # well past stale_after_s: only the heartbeat keeps it live
    beat = json.loads((store / claim_lib.CLAIM_FILE).read_text())["heartbeat"]
    assert time.time() - beat < 0.4
    with pytest.raises(StoreClaimedError):
      claim_lib.Claim(str(store), stale_after_s=0.4).acquire()
  finally:
    c.release()


def test_a_dead_process_claim_is_taken_over(tmp_path):
  store = tmp_path / "s"
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  _write(store, job="old", host=socket.gethostname(), pid=dead.pid,
         pid_ns=claim_lib._pid_namespace(), started="2026-01-01T00:00:00Z",
         heartbeat=time.time())
  c = claim_lib.Claim(str(store)).acquire()
  assert c.taken_over == ({"job": "old", "host": socket.gethostname(),
                           "pid": dead.pid, "pid_ns": claim_lib._pid_namespace(),
                           "started": "2026-01-01T00:00:00Z",
                           "heartbeat": c.taken_over[0]["heartbeat"]},
                          "its process is gone")
  c.release()


@pytest.mark.parametrize("pid_ns", ["pid:[1]", None, "absent"])
def test_a_pid_is_judged_only_in_its_own_pid_namespace(tmp_path, pid_ns):
  # Another container with this hostname (docker --net=host, Kubernetes
  # hostNetwork) and its own PID namespace: its pid 1 is not ours, or an old
  # record says nothing of its namespace. Only the heartbeat tells.
  store = tmp_path / "s"
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  record = dict(job="other", host=socket.gethostname(), pid=dead.pid,
                started="t", heartbeat=time.time())
  if pid_ns != "absent":
    record["pid_ns"] = pid_ns
  _write(store, **record)
  with pytest.raises(StoreClaimedError, match="job other on host"):
    claim_lib.Claim(str(store)).acquire()
  assert claim_lib.clear_stale(str(store)) is None
  _write(store, **dict(record, heartbeat=time.time() - 100))
  c = claim_lib.Claim(str(store), stale_after_s=50).acquire()
  assert c.taken_over[1].startswith("no heartbeat for 100 s")
  c.release()


def test_a_pid_is_judged_only_on_its_own_boot(tmp_path):
  # Two machines of one hostname (cloned images, "localhost") both in their
  # initial PID namespace, whose inode is the same on every machine: the
  # boot tells them apart, else another machine's live job, its pid absent
  # here, was taken over at once (two writers of one store).
  store = tmp_path / "s"
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  assert claim_lib._boot_id()
  record = dict(job="other", host=socket.gethostname(), pid=dead.pid,
                pid_ns=claim_lib._pid_namespace(), boot_id="another-boot",
                started="t", heartbeat=time.time())
  _write(store, **record)
  with pytest.raises(StoreClaimedError, match="job other on host"):
    claim_lib.Claim(str(store)).acquire()
  _write(store, **dict(record, boot_id=claim_lib._boot_id()))
  c = claim_lib.Claim(str(store)).acquire()
  assert c.taken_over[1] == "its process is gone"
  assert json.loads((store / claim_lib.CLAIM_FILE).read_text())["boot_id"] == (
      claim_lib._boot_id())
  c.release()


def test_a_claim_that_cannot_be_written_is_an_input_error(tmp_path):
  # Before, tensorstore's ValueError: a traceback from the command line.
  (tmp_path / "afile").write_text("")
  with pytest.raises(InputError, match=re.escape(
      f"{tmp_path}/afile/store/writer.json: cannot write the store's claim: ")):
    claim_lib.Claim(str(tmp_path / "afile" / "store")).acquire()


def test_a_dead_claim_on_a_read_only_store_is_an_input_error(tmp_path):
  # A store on a read-only mount (or in a bucket the job may only read),
  # with a killed job's claim: clearing it, or taking the claim, names
  # writer.json (a complete store is then reused: launch.common says so).
  src, ro = tmp_path / "src", tmp_path / "ro"
  _write(src / "store", job="dead", host="elsewhere", pid=1, heartbeat=0)
  ro.mkdir()
  code = ("import sys\n"
          "from tracer import claim\n"
          "for f in (claim.clear_stale, lambda s: claim.Claim(s).acquire()):\n"
          "  try:\n"
          "    f(sys.argv[1])\n"
          "  except Exception as e:\n"
          "    print(type(e).__name__, e)\n")
  proc = subprocess.run(
      ["unshare", "-m", "sh", "-c", f"mount --bind {src} {ro} && mount -o "
       f'remount,bind,ro {ro} && exec "$0" -c "$1" "$2"', sys.executable, code,
       str(ro / "store")], capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  if proc.returncode != 0 or not proc.stdout:
    pytest.skip(f"no read-only mount here (needs unshare -m as root): {proc.stderr[-300:]}")
  where = f"{ro}/store/writer.json"
  assert proc.stdout.splitlines() == [
      f"InputError {where}: cannot delete a dead job's claim: Read-only file system",
      f"InputError {where}: cannot write the store's claim: Read-only file system"]


def test_a_claim_on_a_store_turned_read_only_is_released_with_an_input_error(
    tmp_path):
  # The mount turns read-only while the claim is held: releasing it names
  # writer.json (before 2026-12-07 tensorstore's ValueError, a traceback).
  src, rw = tmp_path / "src", tmp_path / "rw"
  (src / "store").mkdir(parents=True)
  rw.mkdir()
  code = ("import subprocess, sys\n"
          "from tracer import claim\n"
          "c = claim.Claim(sys.argv[1]).acquire()\n"
          "subprocess.run(['mount', '-o', 'remount,bind,ro', sys.argv[2]], check=True)\n"
          "try:\n"
          "  c.release()\n"
          "except Exception as e:\n"
          "  print(type(e).__name__, e)\n")
  proc = subprocess.run(
      ["unshare", "-m", "sh", "-c", f'mount --bind {src} {rw} && exec "$0" -c '
       '"$1" "$2" "$3"', sys.executable, code, str(rw / "store"), str(rw)],
      capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  if proc.returncode != 0 or not proc.stdout:
    pytest.skip(f"no read-only mount here (needs unshare -m as root): {proc.stderr[-300:]}")
  assert proc.stdout.splitlines() == [
      f"InputError {rw}/store/writer.json: cannot delete the store's claim: "
      "Read-only file system"]


def test_a_timeout_past_any_wait_beats_hourly(tmp_path):
  # Before, a wait of 1e11 / 4 s raised OverflowError in the heartbeat
  # thread, which died at once.
  c = claim_lib.Claim(str(tmp_path / "s"), stale_after_s=1e11).acquire()
  try:
    assert c.heartbeat_s == claim_lib.MAX_HEARTBEAT_S
    time.sleep(0.2)
    assert c._thread.is_alive()
  finally:
    c.release()


@pytest.mark.parametrize("text", ["[1, 2]", '"x"', "3", "null"])
def test_a_record_that_is_not_a_json_object_is_not_a_claim(tmp_path, text):
  store = tmp_path / "s"
  store.mkdir()
  (store / claim_lib.CLAIM_FILE).write_text(text)
  c = claim_lib.Claim(str(store)).acquire()
  assert c.taken_over == ({}, "it is not a claim record")
  # A job that finds its claim replaced by such a record has lost it.
  (store / claim_lib.CLAIM_FILE).write_text(text)
  c.refresh()
  with pytest.raises(StoreClaimedError, match="taken over by job \\? on host \\?"):
    c.check()
  c.release()
  assert claim_lib.clear_stale(str(store)) == {}
  assert not (store / claim_lib.CLAIM_FILE).exists()


def test_a_claim_without_heartbeat_is_taken_over_from_any_host(tmp_path):
  store = tmp_path / "s"
  _write(store, job="old", host="elsewhere", pid=1, started="t",
         heartbeat=time.time() - 100)
  with pytest.raises(StoreClaimedError, match="host elsewhere, pid 1"):
    claim_lib.Claim(str(store), stale_after_s=1000).acquire()
  c = claim_lib.Claim(str(store), stale_after_s=50).acquire()
  assert c.taken_over[1].startswith("no heartbeat for 100 s")
  c.release()


@pytest.mark.parametrize("heartbeat", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_heartbeat_that_is_not_a_time_is_stale(tmp_path, heartbeat):
  # Before 2026-12-07 never stale ("last heartbeat nan s ago; wait for it").
  store = tmp_path / "s"
  store.mkdir()
  (store / claim_lib.CLAIM_FILE).write_text(
      '{"job": "old", "host": "elsewhere", "pid": 1, "started": "t", '
      f'"heartbeat": {heartbeat}}}')
  c = claim_lib.Claim(str(store)).acquire()
  assert c.taken_over[1].startswith("its heartbeat ") and "is not a time" in c.taken_over[1]
  c.release()


def test_a_heartbeat_ahead_of_this_clock_is_refused_naming_the_clocks(tmp_path):
  """A dead job's heartbeat from a clock a day ahead: before 2026-12-07
  refused as 'last heartbeat -86400 s ago; wait for it'."""
  store = tmp_path / "s"
  _write(store, job="old", host="elsewhere", pid=1, started="t",
         heartbeat=time.time() + 86_400)
  with pytest.raises(StoreClaimedError, match=re.escape(
      "s ahead of this host's clock: the hosts' clocks disagree, so its age "
      "cannot be judged; expected clocks within 600 s (if its job is gone, "
      f"delete {store / claim_lib.CLAIM_FILE})")):
    claim_lib.Claim(str(store)).acquire()


def test_a_pid_that_is_no_process_id_is_not_a_claim(tmp_path):
  # This host's record with a pid os.kill refuses (2**63: an OverflowError
  # traceback before 2026-12-07) or that would name a process group (0, -1).
  store = tmp_path / "s"
  for pid in (2**63, 0, -1):
    _write(store, job="old", host=socket.gethostname(), pid=pid, started="t",
           heartbeat=time.time(), pid_ns=os.readlink("/proc/self/ns/pid"))
    c = claim_lib.Claim(str(store)).acquire()
    assert c.taken_over == ({}, "it is not a claim record"), pid
    c.release()


def test_the_owners_own_timeout_bounds_a_takeover(tmp_path):
  """A job started with a shorter --claim_timeout_s judges the owner by the
  owner's (it beats at a quarter of its own): before 2026-12-05 a live
  writer at the default 600 s, beating every 150 s, was taken over by a
  job given 5 s, and both wrote the store."""
  store = tmp_path / "s"
  _write(store, job="old", host="elsewhere", pid=1, started="t",
         heartbeat=time.time() - 100, stale_after_s=600.0)
  with pytest.raises(StoreClaimedError, match="without a heartbeat for 600 s"):
    claim_lib.Claim(str(store), stale_after_s=5).acquire()
  assert claim_lib.clear_stale(str(store), stale_after_s=5) is None
  _write(store, job="old", host="elsewhere", pid=1, started="t",
         heartbeat=time.time() - 100, stale_after_s=50.0)
  c = claim_lib.Claim(str(store), stale_after_s=5).acquire()
  assert c.taken_over[1] == "no heartbeat for 100 s (more than 50 s)"
  c.release()
  with claim_lib.Claim(str(store), stale_after_s=7) as c:
    assert json.loads((store / claim_lib.CLAIM_FILE).read_text())["stale_after_s"] == 7


def test_a_killed_unreaped_process_is_gone(tmp_path):
  """A zombie (killed, its parent not yet waiting) holds no claim; before
  2026-12-05 its claim was held until its heartbeat aged out."""
  store = tmp_path / "s"
  child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    child.kill()
    deadline = time.time() + 30
    while claim_lib._process_state(child.pid) != "Z" and time.time() < deadline:
      time.sleep(0.05)
    assert claim_lib._process_state(child.pid) == "Z"
    _write(store, job="old", host=socket.gethostname(), pid=child.pid,
           pid_start=claim_lib._pid_start(child.pid),
           pid_ns=claim_lib._pid_namespace(), started="t", heartbeat=time.time())
    c = claim_lib.Claim(str(store)).acquire()
    assert c.taken_over[1] == "its process is gone"
    c.release()
  finally:
    child.wait()


def test_a_heartbeat_whose_reply_was_lost_keeps_the_claim(tmp_path):
  """The write landed, its reply did not (object stores retry such writes;
  the retry fails its condition): the record is still this job's. Before
  2026-12-05 the job then reported its claim taken over by itself and
  stopped, and left the claim file behind."""
  store = tmp_path / "s"
  c = claim_lib.Claim(str(store), heartbeat_s=3600).acquire()
  kv = c._kv

  class LostReply:
    def read(self, *args, **kwargs):
      return kv.read(*args, **kwargs)

    def write(self, *args, **kwargs):
      kv.write(*args, **kwargs).result()  # applied ...
      raise ValueError("DEADLINE_EXCEEDED: the reply was lost")  # ... not told

  c._kv = LostReply()
  with pytest.raises(ValueError, match="reply was lost"):
    c.refresh()
  c._kv = kv
  c.check()  # renews from the record it finds its own
  assert c.lost is None
  c.release()
  assert not (store / claim_lib.CLAIM_FILE).exists()


def test_a_reused_pid_does_not_keep_a_dead_claim(tmp_path):
  store = tmp_path / "s"
  _write(store, job="old", host=socket.gethostname(), pid=os.getpid(),
         pid_start="1", pid_ns=claim_lib._pid_namespace(), started="t",
         heartbeat=time.time())
  c = claim_lib.Claim(str(store)).acquire()
  assert c.taken_over[1] == "its process is gone"
  c.release()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_exactly_one_of_racing_writers_wins(where, tmp_path, request):
  # On S3 the claim rests on conditional writes (if-none-match, then the
  # generation); five rounds, since one round can pass by luck of timing.
  rounds = 1
  if where == "s3":
    root = request.getfixturevalue("s3")("claim-race")
    rounds = 5
  for r in range(rounds):
    store = str(tmp_path / "s") if where == "local" else f"{root}/s{r}"
    _race_once(store)


def _race_once(store: str):
  results, barrier = [], threading.Barrier(8)

  def race():
    barrier.wait()
    try:
      results.append(claim_lib.Claim(store).acquire())
    except StoreClaimedError:
      results.append(None)

  threads = [threading.Thread(target=race) for _ in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  winners = [c for c in results if c is not None]
  assert len(winners) == 1 and len(results) == 8
  winners[0].release()


def test_a_taken_over_claim_is_lost_not_overwritten(tmp_path):
  store = tmp_path / "s"
  c = claim_lib.Claim(str(store), heartbeat_s=3600).acquire()
  _write(store, job="new", host="elsewhere", pid=7, started="t",
         heartbeat=time.time())
  # check() renews the claim itself, so it learns at once, not at the next
  # beat (an hour here).
  with pytest.raises(StoreClaimedError, match="taken over by job new on host "
                     "elsewhere, pid 7"):
    c.check()
  c.release()
  # The new owner's claim survives the old job's release.
  assert json.loads((store / claim_lib.CLAIM_FILE).read_text())["job"] == "new"


def test_clear_stale_removes_only_a_dead_jobs_claim(tmp_path):
  store = tmp_path / "s"
  _write(store, job="old", host="elsewhere", pid=1, started="t",
         heartbeat=time.time() - 100)
  assert claim_lib.clear_stale(str(store), stale_after_s=50)["job"] == "old"
  assert not (store / claim_lib.CLAIM_FILE).exists()
  assert claim_lib.clear_stale(str(store)) is None
  with claim_lib.Claim(str(store)):
    assert claim_lib.clear_stale(str(store)) is None
    assert (store / claim_lib.CLAIM_FILE).exists()
