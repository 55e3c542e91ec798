"""Crash at any point (issue 11): ``launch.encode`` and ``launch.trace``
SIGKILLed at seeded moments, then run again, end bitwise where an
uninterrupted run ends, and no half-written file is ever visible under its
final name.

An uninterrupted ``launch.trace`` gives the reference store and results file
(a second one must equal it, and is timed). Then ``MOMENTS`` seeded moments
(``numpy.random.default_rng(SEED)``) each start from an empty store and kill
a run: at each named point of ``tracer.crashpoints`` once (during R_train's
fit, after the first of a chunk's two encoded batches, between a chunk's
data and its marker, after a marker, before the results are written), and
the rest by the test's own SIGKILL a seeded delay after the store's array
metadata appears (within the reference run's time from there to its results),
so that kills also land in store creation, chunk writes and the results
write. After each kill every file under a final name must be whole (see
``check_no_torn_files``); the same command, run again without the kill, must
exit 0 and leave every file of the store, and the results file, bitwise the
reference's.

Then one of 2 processes (``jax.distributed`` over gloo) is killed
mid-encode; the survivor, waiting in a collective, is killed too (a pod
scheduler restarts the whole job), and both are run again: the store equals
the 1-process reference's bitwise. The 2 processes encode in the reference
store's basis (``--basis``): a basis fitted over 2 processes sums R_train's
moments in another order, and the eigenvectors of its (rank-deficient)
blocks, so every row, differ from a 1-process fit's. And a chunk damaged in
one host's share ends both processes of a 2-process trace, each with the
message of the host that found it.

Subprocesses share a persistent JAX compilation cache, filled by the first
reference run, so each later run pays little compilation.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tracer import corpus as corpus_lib
from tracer import store as store_lib
from tracer.config import DataConfig

import multiprocess  # tests/ is on sys.path
import test_multihost as mh

SEED = 0
MOMENTS = 10
NUM_DOCS = 96
CHUNK_ROWS = 16        # 6 chunks
BATCH_SIZE = 8         # global examples per encode step: 2 steps per chunk
R_SAMPLE = 32          # R_train's sample: 4 fit batches
NUM_QUERIES = 5
K = 4
DEVICES = 4            # one process; the 2-process runs have 2 each
RUN_TIMEOUT_S = 180    # one launch subprocess
# Files under a store that are not its content: the one-writer claim
# (``tracer.claim``), which a killed run leaves behind and a successful one
# deletes at its end.
CLAIM_FILES = {"writer.json"}
# A write puts its new value in "<key>.__lock" (tensorstore's file kvstore and
# tracer.storage's own local writes), fsyncs it and renames it over the key: a
# killed write leaves that file, and the next write of the key reuses it.
TEMP_SUFFIX = ".__lock"
# The first file of a new store (``store.create_or_open``, before its basis and
# manifest): the wall-clock kills count their delay from its appearance.
TRIGGER = os.path.join(store_lib.ARRAY_DIR, "zarr.json")

GIN_BINDINGS = (f"EncodeConfig.projection_dim={mh.PROJECTION_DIM}",
                "EncodeConfig.model_axis=1", "EncodeConfig.microbatch_size=2",
                f"EncodeConfig.batch_size={BATCH_SIZE}",
                f"EncodeConfig.chunk_rows={CHUNK_ROWS}",
                f"PreconditionerConfig.train_examples={R_SAMPLE}",
                "PreconditionerConfig.rank=3")

pytestmark = pytest.mark.filterwarnings("ignore:R is estimated")


# --------------------------------------------------------------------------
# Inputs and commands.


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """Corpus (tokenized), queries, a checkpoint, and a compilation cache."""
  shared = tmp_path_factory.mktemp("crash_shared")
  rng = np.random.default_rng(5)
  texts = set()
  while len(texts) < NUM_DOCS:
    texts.add("".join(rng.choice(list("abcdefghij"), rng.integers(3, 8))))
  with open(shared / "corpus.jsonl", "w") as f:
    for i, text in enumerate(sorted(texts)):
      f.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
  with open(shared / "queries.jsonl", "w") as f:
    for i in range(NUM_QUERIES):
      prompt = "".join(rng.choice(list("abcdefghij"), 4))
      f.write(json.dumps({"id": f"q{i}", "prompt": prompt, "target": "ab"}) + "\n")
  corpus = corpus_lib.tokenize(str(shared / "corpus.jsonl"), str(shared / "corpus"),
                               DataConfig(), mh.CONFIG.max_len)
  mh.write_checkpoint(str(shared / "checkpoints"), corpus)
  (shared / "jax_cache").mkdir()
  return shared


def environ(shared, devices: int = DEVICES, crash_at: str | None = None) -> dict:
  extra = {"JAX_COMPILATION_CACHE_DIR": str(shared / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  env = multiprocess.env(devices=devices, **extra)
  env.pop("TRACER_CRASH_AT", None)
  if crash_at:
    env["TRACER_CRASH_AT"] = crash_at
  return env


def command(script: str, shared, workdir, distributed=None, basis=None,
            extra=()) -> list[str]:
  cmd = [sys.executable, "-m", f"tracer.launch.{script}", f"--workdir={workdir}",
         f"--checkpoint={shared / 'checkpoints'}", f"--corpus={shared / 'corpus'}",
         f"--store={workdir / 'store'}"]
  if script == "trace":
    cmd += [f"--queries={shared / 'queries.jsonl'}",
            f"--output={workdir / 'results.jsonl'}", f"--top_k={K}", "--show=0"]
  if basis:
    cmd.append(f"--basis={basis}")
  cmd += [f"--gin_bindings={b}" for b in GIN_BINDINGS]
  if distributed:
    cmd += multiprocess.distributed_flags(*distributed)
  return cmd + list(extra)


def run_ok(cmd, env, log) -> float:
  """Runs to the end; fails with its log unless it exits 0. Returns seconds."""
  t0 = time.monotonic()
  with open(log, "wb") as f:
    proc = subprocess.run(cmd, env=env, cwd=multiprocess.ROOT, stdout=f,
                          stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S,
                          check=False)
  if proc.returncode != 0:
    pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n"
                f"{open(log, errors='replace').read()[-6000:]}", pytrace=False)
  return time.monotonic() - t0


# --------------------------------------------------------------------------
# What a store directory holds.


def files_under(path) -> dict[str, bytes]:
  """Relative path -> bytes of every file under ``path``."""
  out = {}
  for root, _, names in os.walk(path):
    for name in names:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        out[os.path.relpath(full, path)] = f.read()
  return out


def assert_same_files(got: dict, want: dict, what: str) -> None:
  extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
  differ = sorted(k for k in set(got) & set(want) if got[k] != want[k])
  assert not (extra or missing or differ), (
      f"{what}: extra {extra}, missing {missing}, different {differ}")


def check_no_torn_files(workdir, reference, moment: str) -> list[str]:
  """What a kill left under ``workdir``: every file under a final name is
  whole. JSON files parse; the manifest, basis, zarr metadata and markers
  equal the reference's (each is written once, whole); every array chunk has
  its full size (``chunk_rows * d * itemsize``, uncompressed zarr3) and the
  reference's bytes; the results file is absent or equal to the reference's.
  Returns the temporary files found (allowed: never under a final name)."""
  store = os.path.join(workdir, "store")
  itemsize = np.dtype(store_lib.DTYPES[reference["dtype"]]).itemsize
  chunk_bytes = CHUNK_ROWS * reference["dim"] * itemsize
  temps = []
  for rel, data in sorted(files_under(workdir).items()):
    where = f"{moment}: {rel}"
    if rel.endswith(TEMP_SUFFIX):
      temps.append(rel)
      continue
    if rel == "results.jsonl":
      assert data == reference["results"], f"{where}: a partial results file"
      continue
    assert rel.startswith("store" + os.sep), f"{where}: an unexpected file"
    srel = os.path.relpath(os.path.join(workdir, rel), store)
    if srel.endswith((".json", ".done")):
      json.loads(data)  # whole (manifest, zarr metadata, claim, marker), or raises
    if srel in CLAIM_FILES:
      continue
    assert srel in reference["store"], f"{where}: a file the reference lacks"
    if srel.startswith(os.path.join(store_lib.ARRAY_DIR, "c") + os.sep):
      assert len(data) == chunk_bytes, (
          f"{where}: a chunk of {len(data)} bytes, expected {chunk_bytes}")
    assert data == reference["store"][srel], f"{where}: differs from the reference"
  return temps


def describe(workdir, temps) -> str:
  """What is on disk after a kill, in a few words."""
  store = os.path.join(workdir, "store")
  if not os.path.isdir(store):
    state = "no store"
  else:
    names = files_under(store)
    chunks = sum(k.startswith(os.path.join(store_lib.ARRAY_DIR, "c")) for k in names)
    marks = sum(k.endswith(".done") for k in names)
    state = (f"{'manifest' if store_lib.MANIFEST in names else 'no manifest'}, "
             f"{chunks} chunks, {marks} markers"
             + "".join(f", {n}" for n in sorted(CLAIM_FILES & set(names))))
  if os.path.exists(os.path.join(workdir, "results.jsonl")):
    state += ", results"
  if temps:
    state += f", temporary {temps}"
  return state


# --------------------------------------------------------------------------
# Runs.


def timed_run(cmd, env, log, store, num_chunks) -> dict[str, float]:
  """Runs to the end, watching ``store``: seconds from the start to its
  array's metadata (``TRIGGER``), its manifest, its last marker, the results
  file beside it, and to the end."""
  times = {}
  t0 = time.monotonic()
  with open(log, "wb") as f:
    proc = subprocess.Popen(cmd, env=env, cwd=multiprocess.ROOT, stdout=f,
                            stderr=subprocess.STDOUT)
  progress = os.path.join(store, store_lib.PROGRESS_DIR)
  try:
    while proc.poll() is None:
      now = time.monotonic() - t0
      assert now < RUN_TIMEOUT_S, f"{cmd} timed out"
      if "trigger" not in times and os.path.exists(os.path.join(store, TRIGGER)):
        times["trigger"] = now
      if "manifest" not in times and os.path.exists(
          os.path.join(store, store_lib.MANIFEST)):
        times["manifest"] = now
      if "marked" not in times and os.path.isdir(progress) and sum(
          n.endswith(".done") for n in os.listdir(progress)) >= num_chunks:
        times["marked"] = now
      if "results" not in times and os.path.exists(
          os.path.join(os.path.dirname(store), "results.jsonl")):
        times["results"] = now
      time.sleep(0.005)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  times["end"] = time.monotonic() - t0
  if proc.returncode != 0:
    pytest.fail(f"{cmd} exited {proc.returncode}:\n"
                f"{open(log, errors='replace').read()[-6000:]}", pytrace=False)
  return times


def killed_run(cmd, env, log, store, delay: float | None = None) -> int:
  """Runs until it dies (a crash point in ``env``) or, given ``delay``, until
  the test SIGKILLs it ``delay`` seconds after ``store/TRIGGER`` appears
  (so that startup and R_train's fit, whose time varies on a loaded machine,
  do not decide where the kill lands). Returns its exit status (-9: killed;
  0: it ended before the kill)."""
  with open(log, "wb") as f:
    proc = subprocess.Popen(cmd, env=env, cwd=multiprocess.ROOT, stdout=f,
                            stderr=subprocess.STDOUT)
  t0 = time.monotonic()
  seen = None
  try:
    while proc.poll() is None:
      now = time.monotonic()
      if now - t0 > RUN_TIMEOUT_S:
        pytest.fail(f"{cmd} timed out", pytrace=False)
      if delay is not None:
        if seen is None and os.path.exists(os.path.join(store, TRIGGER)):
          seen = now
        if seen is not None and now - seen >= delay:
          os.kill(proc.pid, signal.SIGKILL)  # not yet reaped: still this pid
          break
      time.sleep(0.002)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  if proc.returncode not in (0, -signal.SIGKILL):
    pytest.fail(f"{cmd} exited {proc.returncode}:\n"
                f"{open(log, errors='replace').read()[-6000:]}", pytrace=False)
  return proc.returncode


@pytest.fixture(scope="module")
def reference(shared, tmp_path_factory):
  """An uninterrupted ``launch.trace`` (it fills the compilation cache), and a
  second one, timed, that must end bitwise the same."""
  root = tmp_path_factory.mktemp("crash_reference")
  num_chunks = NUM_DOCS // CHUNK_ROWS
  runs = []
  for name in ("cold", "warm"):
    workdir = root / name
    workdir.mkdir()
    times = timed_run(command("trace", shared, workdir), environ(shared),
                      root / f"{name}.log", workdir / "store", num_chunks)
    runs.append((workdir, times))
  (cold, _), (warm, times) = runs
  want = files_under(cold / "store")
  assert not CLAIM_FILES & set(want), "a finished run released its claim"
  assert_same_files(files_under(warm / "store"), want, "a second uninterrupted run")
  results = (cold / "results.jsonl").read_bytes()
  assert (warm / "results.jsonl").read_bytes() == results
  chunks = [k for k in want if k.startswith(os.path.join(store_lib.ARRAY_DIR, "c"))]
  marks = [k for k in want if k.endswith(".done")]
  assert len(chunks) == len(marks) == num_chunks, sorted(want)
  assert len(results.splitlines()) == NUM_QUERIES
  manifest = json.loads(want[store_lib.MANIFEST])
  print(f"\nreference runs: {[t for _, t in runs]}")
  return {"store": want, "results": results, "dim": manifest["dim"],
          "dtype": manifest["dtype"], "times": times,
          "basis": str(cold / "store" / "basis.npz")}


# --------------------------------------------------------------------------
# The moments.


def moments(reference) -> list[dict]:
  """``MOMENTS`` seeded kills: each named point once (a batch of R_train's
  fit; an encoded batch that leaves its chunk half full; a chunk's data
  written, its marker not; a marker written; the results serialized, not
  yet written), the rest wall-clock kills from the test, each a seeded
  delay after the store's array metadata appears, within the time the
  reference run took from there to its results file (``encode``: to its last
  marker), + 50 ms: the rest of the store's creation, the chunk writes, the
  queries and scan, the results write. In a seeded order, each of ``encode``
  or ``trace`` (the wall-clock kills by turns, ``encode`` first)."""
  rng = np.random.default_rng(SEED)
  chunks = NUM_DOCS // CHUNK_ROWS
  kinds = ["fit.batch", "encode.batch", "chunk.data", "chunk.marked",
           "results.write"]
  kinds += ["time"] * (MOMENTS - len(kinds))
  out = []
  timed = 0
  for kind in rng.permutation(kinds):
    kind = str(kind)
    if kind == "time":
      # encode and trace by turns: encode's window is its chunk writes.
      script = ("encode", "trace")[timed % 2]
      timed += 1
    elif kind == "results.write":
      script = "trace"
    else:
      script = str(rng.choice(["encode", "trace"]))
    if kind == "time":
      t = reference["times"]
      end = t.get("results", t["end"]) if script == "trace" else t["marked"]
      window = end + 0.05 - t["trigger"]
      out.append({"script": script, "delay": float(rng.uniform() * window)})
      continue
    n = {"fit.batch": lambda: rng.integers(1, R_SAMPLE // BATCH_SIZE + 1),
         # Odd: the first of a chunk's two batches.
         "encode.batch": lambda: 2 * rng.integers(0, chunks) + 1,
         "chunk.data": lambda: rng.integers(1, chunks + 1),
         "chunk.marked": lambda: rng.integers(1, chunks + 1),
         "results.write": lambda: 1}[kind]()
    out.append({"script": script, "crash_at": f"{kind}:{int(n)}"})
  return out


def test_killed_at_seeded_moments_and_rerun(shared, reference, tmp_path):
  report = []
  for i, moment in enumerate(moments(reference)):
    script = moment["script"]
    workdir = tmp_path / f"m{i}"
    cmd = command(script, shared, workdir)
    if "crash_at" in moment:
      what = moment["crash_at"]
      workdir.mkdir()
      rc = killed_run(cmd, environ(shared, crash_at=what), tmp_path / f"m{i}.log",
                      workdir / "store")
      assert rc == -signal.SIGKILL, (
          f"moment {i} ({script} at {what}): exited {rc}, the point was not reached")
    else:
      delay = moment["delay"]
      for _ in range(8):
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir()
        rc = killed_run(cmd, environ(shared), tmp_path / f"m{i}.log",
                        workdir / "store", delay)
        if rc == -signal.SIGKILL:
          break
        delay *= 0.7  # it ended first: a shorter delay, deterministically
      assert rc == -signal.SIGKILL, f"moment {i}: never killed ({script})"
      what = f"{delay:.3f}s after {TRIGGER}"
    label = f"moment {i}: {script} killed at {what}"
    temps = check_no_torn_files(workdir, reference, label)
    state = describe(workdir, temps)
    t0 = time.monotonic()
    run_ok(cmd, environ(shared), tmp_path / f"m{i}.rerun.log")
    # Strict: a completed rerun leaves no claim (writer.json) behind.
    assert_same_files(files_under(workdir / "store"), reference["store"],
                      f"{label}, rerun")
    if script == "trace":
      assert (workdir / "results.jsonl").read_bytes() == reference["results"], label
    report.append(f"{label} (exit {rc}); left: {state}; rerun "
                  f"{time.monotonic() - t0:.1f}s, store"
                  + (" and results" if script == "trace" else "") + " equal")
  print("\n" + "\n".join(report))


# --------------------------------------------------------------------------
# One of 2 processes.


def test_one_of_two_processes_killed_mid_encode(shared, reference, tmp_path):
  """Process 1 dies after a seeded number of its encode batches; process 0,
  left waiting in a collective, is killed too; both run again."""
  rng = np.random.default_rng(SEED + 1)
  steps = NUM_DOCS // 2 // (BATCH_SIZE // 2)  # process 1's local batches
  n = int(rng.integers(2, steps))
  workdir = tmp_path / "w"
  workdir.mkdir()
  logs = tmp_path / "logs"
  logs.mkdir()

  def commands():
    port = multiprocess.free_port()
    return [command("encode", shared, workdir, (port, i), reference["basis"])
            for i in range(2)]

  if not multiprocess.gloo_available():
    pytest.skip("this jaxlib has no gloo CPU collectives")
  cmds = commands()
  envs = [environ(shared, 2), environ(shared, 2, crash_at=f"encode.batch:{n}")]
  procs = []
  for i in range(2):
    with open(logs / f"killed{i}.log", "wb") as f:
      procs.append(subprocess.Popen(cmds[i], env=envs[i], cwd=multiprocess.ROOT,
                                    stdout=f, stderr=subprocess.STDOUT))
  deadline = time.monotonic() + RUN_TIMEOUT_S
  try:
    # Until process 1 dies; process 0 cannot end first (the encode ends in a
    # barrier of both) unless it fails.
    while procs[1].poll() is None and procs[0].poll() is None:
      if time.monotonic() > deadline:
        break
      time.sleep(0.01)
    rc1 = procs[1].poll()
    rc0 = procs[0].poll()
    if rc1 is not None and rc0 is None:
      # The survivor waits in a collective: a pod scheduler kills it too.
      procs[0].send_signal(signal.SIGKILL)
      rc0 = procs[0].wait()
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  logs_text = [open(logs / f"killed{i}.log", errors="replace").read()[-4000:]
               for i in range(2)]
  assert rc1 == -signal.SIGKILL, (
      f"process 1 exited {rc1} (process 0: {rc0}):\n{logs_text[1]}\n"
      f"--- process 0 ---\n{logs_text[0]}")
  label = f"2 processes: process 1 killed at encode.batch:{n}, process 0 exit {rc0}"
  temps = check_no_torn_files(workdir, reference, label)
  state = describe(workdir, temps)

  procs, plogs = multiprocess.start(commands(), logs, environ(shared, 2))
  multiprocess.wait(procs, plogs, time.monotonic() + RUN_TIMEOUT_S)
  assert_same_files(files_under(workdir / "store"), reference["store"],
                    f"{label}, rerun")
  print(f"\n{label}; left: {state}; rerun on 2 processes: store equal to the "
        "1-process reference")


@pytest.mark.parametrize("how", ["peer_killed", "sigterm"])
def test_a_run_ended_midway_gives_up_its_store_claim(shared, reference, tmp_path,
                                                      how):
  """Encodes ended mid-store without unwinding their stack: process 0 of 2
  when process 1 is killed (it exits 75, "rerun the same command to
  resume"), and a lone process sent SIGTERM (its scheduler stopping it:
  143). Each gives up the store's claim as it ends. Before, writer.json was
  left naming the dead pid; a rerun from another PID namespace (a
  rescheduled pod; measured with ``unshare --pid``) was refused ("being
  written by another job") until --claim_timeout_s (600 s) had passed. The
  rerun then completes the store as the uninterrupted run made it."""
  workdir = tmp_path / "w"
  store = workdir / "store"
  if how == "peer_killed":
    if not multiprocess.gloo_available():
      pytest.skip("this jaxlib has no gloo CPU collectives")
    port = multiprocess.free_port()
    commands = [command("encode", shared, workdir, (port, i), reference["basis"],
                        ["--silent_process_timeout_s=5"]) for i in range(2)]
    envs = [environ(shared, 2), environ(shared, 2, crash_at="encode.batch:3")]
    want = [75, -signal.SIGKILL]
  else:
    commands = [command("encode", shared, workdir, basis=reference["basis"])]
    envs = [environ(shared, crash_at="encode.batch:5:SIGTERM")]
    want = [143]
  procs, logs = [], []
  for i, (cmd, env) in enumerate(zip(commands, envs)):
    logs.append(tmp_path / f"ended{i}.log")
    with open(logs[-1], "wb") as f:
      procs.append(subprocess.Popen(cmd, env=env, cwd=multiprocess.ROOT,
                                    stdout=f, stderr=subprocess.STDOUT))
  codes, texts = multiprocess.ends(procs, logs, time.monotonic() + RUN_TIMEOUT_S)
  assert codes == want, (codes, texts)
  left = files_under(store)
  assert len([k for k in left if k.endswith(".done")]) < NUM_DOCS // CHUNK_ROWS, (
      "the run ended before its last chunk", sorted(left))
  assert not CLAIM_FILES & set(left), (codes, texts[0][-3000:])
  run_ok(command("encode", shared, workdir), environ(shared), tmp_path / "rerun.log")
  assert_same_files(files_under(store), reference["store"], f"{how}, rerun")


def test_a_chunk_damaged_in_one_hosts_share_ends_both_processes(shared, reference,
                                                                  tmp_path):
  """The reference store with a bit flipped in chunk 4, traced on 2
  processes: the host that reads the chunk names it and exits 2; the other,
  waiting for it in the scan's collectives, ends with its message
  (``tracer.coordination``; here gloo's collective raises once the first has
  left, and the failure it reads first is reported instead), not after
  jax.distributed's 300 s shutdown barrier with a SIGABRT (measured before:
  320.6 s, both -6). No results."""
  store = tmp_path / "w" / "store"
  for rel, data in reference["store"].items():
    (store / rel).parent.mkdir(parents=True, exist_ok=True)
    (store / rel).write_bytes(data)
  chunk = store_lib.open_store(str(store)).chunk_file(4)
  raw = bytearray(open(chunk, "rb").read())
  raw[100] ^= 0x01
  open(chunk, "wb").write(bytes(raw))
  port = multiprocess.free_port()
  procs, logs = multiprocess.start(
      [command("trace", shared, tmp_path / "w", (port, i)) for i in range(2)],
      tmp_path, environ(shared, 2))
  deadline = time.monotonic() + RUN_TIMEOUT_S  # inside the barrier's 300 s
  codes, texts = multiprocess.ends(procs, logs, deadline)
  assert codes == [2, 2], (codes, texts)
  message = f"{chunk}: chunk 4 (rows 64..80) of store {store}: checksum mismatch"
  found = [i for i, text in enumerate(texts) if f"\nerror: {message}" in text]
  assert len(found) == 1, texts
  other = 1 - found[0]
  assert f"\nerror: process {found[0]} of 2 failed: {message}" in texts[other], texts
  assert not (tmp_path / "w" / "results.jsonl").exists()


def test_a_killed_writes_leftover_never_reaches_a_later_value(tmp_path):
  """A killed write leaves its temporary file. tensorstore's file driver
  writes the next value of that name into it without truncating it, so a
  shorter value kept the old tail ("ok" over "partial" read "okrtial"):
  tracer's local writes truncate it first (and consume it: a rerun leaves
  nothing behind), and claim records (which need tensorstore's conditional
  writes) all have one length."""
  from tracer import claim as claim_lib  # pylint: disable=g-import-not-at-top
  from tracer import storage  # pylint: disable=g-import-not-at-top
  from tracer.errors import StoreClaimedError  # pylint: disable=g-import-not-at-top
  path = tmp_path / "manifest.json"
  (tmp_path / "manifest.json.__lock").write_bytes(b"partial" * 1000)
  for location, value in ((str(path), "ok"), (f"file://{path}", "k")):
    storage.write_text(location, value)
    assert path.read_text() == value
  assert sorted(os.listdir(tmp_path)) == ["manifest.json"]
  # A claim write killed part-way: at most a record's length.
  store = tmp_path / "store"
  store.mkdir()
  (store / (claim_lib.CLAIM_FILE + TEMP_SUFFIX)).write_bytes(
      b"{" + b"x" * (claim_lib.RECORD_BYTES - 2))
  first = claim_lib.Claim(str(store)).acquire()
  with pytest.raises(StoreClaimedError, match=f"job {first.job}"):
    claim_lib.Claim(str(store)).acquire()   # (not taken over as unreadable)
  first.release()


def test_concurrent_writes_of_one_file_take_turns(tmp_path):
  """Writers of one local file share ``<name>.__lock``: each waits for the
  lock and checks that the file it locked is still the temporary one (not
  renamed over the name by the writer before it), so a reader never sees a
  truncated or mixed value, and nothing is left beside the file."""
  import threading  # pylint: disable=g-import-not-at-top
  from tracer import storage  # pylint: disable=g-import-not-at-top
  path = tmp_path / "manifest.json"
  values = [bytes([ord("a") + i]) * (7 ** i) for i in range(5)]  # 1 B .. 2.4 kB
  seen, errors = set(), []
  done = threading.Event()

  def write(value):
    try:
      for _ in range(200):
        storage.write_bytes(str(path), value)
    except BaseException as e:  # pylint: disable=broad-except
      errors.append(e)

  def read():
    while not done.is_set():
      try:
        seen.add(path.read_bytes())
      except FileNotFoundError:
        pass

  reader = threading.Thread(target=read)
  reader.start()
  writers = [threading.Thread(target=write, args=(v,)) for v in values]
  for t in writers:
    t.start()
  for t in writers:
    t.join()
  done.set()
  reader.join()
  assert not errors, errors
  assert seen <= set(values), sorted(len(v) for v in seen - set(values))
  assert len(seen) > 1  # the writers did interleave
  assert sorted(os.listdir(tmp_path)) == ["manifest.json"]


def _running(pid: int) -> bool:
  """Whether ``pid`` runs (a zombie, killed but not yet reaped, does not)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
  except FileNotFoundError:
    return False


def test_a_test_server_dies_with_the_process_that_started_it(tmp_path):
  """A session fixture's server (``conftest._serve``: moto, the GCS
  emulator) is killed with the pytest worker that started it, even where
  the worker dies before the fixture's teardown (a crash); before stop 80
  it lived on, holding its port and memory."""
  child = (
      "import os, sys\n"
      f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
      "import conftest\n"
      "port = conftest.free_port()\n"
      "proc = conftest._serve([sys.executable, '-m', 'http.server', '-b', "
      "'127.0.0.1', str(port)], f'http://127.0.0.1:{port}/', "
      f"{str(tmp_path / 'server.log')!r})\n"
      "print(proc.pid, flush=True)\n"
      "os._exit(3)  # as a crash: no teardown\n")
  out = subprocess.run([sys.executable, "-c", child], capture_output=True,
                       text=True, timeout=120, check=False)
  assert out.returncode == 3, out.stderr[-2000:]
  pid = int(out.stdout.split()[-1])
  try:
    deadline = time.monotonic() + 30
    while _running(pid) and time.monotonic() < deadline:
      time.sleep(0.1)
    assert not _running(pid), "the server outlived the process that started it"
  finally:
    if _running(pid):
      os.kill(pid, signal.SIGKILL)
