"""Running tests over several local jax processes (jax.distributed over gloo).

Each process sees ``devices`` simulated CPU devices; together they form one
global mesh, as the hosts of a pod do.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env(devices: int = 4, **extra: str) -> dict[str, str]:
  """The environment of a worker process (CPU, ``devices`` devices, repo on
  the path, long collective timeouts for a loaded 2-core machine)."""
  return dict(
      os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
      XLA_FLAGS=(f"--xla_force_host_platform_device_count={devices}"
                 " --xla_cpu_collective_call_terminate_timeout_seconds=900"
                 " --xla_cpu_collective_timeout_seconds=900"),
      PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
      **extra)


def distributed_flags(port: int, process_id: int, num_processes: int = 2
                      ) -> list[str]:
  """The launch scripts' jax.distributed flags for one local process."""
  return [f"--coordinator_address=127.0.0.1:{port}",
          f"--num_processes={num_processes}", f"--process_id={process_id}"]


def gloo_available() -> bool:
  try:
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
    return hasattr(_jax, "make_gloo_tcp_collectives")
  except ImportError:
    return True  # let the workers say what is wrong


def start(commands: list[list[str]], workdir, environ,
          cwd: str = ROOT) -> tuple[list[subprocess.Popen], list[str]]:
  """Starts one process per command, each logging to ``workdir/worker<i>.log``,
  in ``environ`` (one for all, or a list: one per command)."""
  if not gloo_available():
    pytest.skip("this jaxlib has no gloo CPU collectives")
  environs = environ if isinstance(environ, list) else [environ] * len(commands)
  procs, logs = [], []
  for i, (cmd, environ) in enumerate(zip(commands, environs, strict=True)):
    log = os.path.join(workdir, f"worker{i}.log")
    with open(log, "wb") as f:
      procs.append(subprocess.Popen(cmd, env=environ, cwd=cwd, stdout=f,
                                    stderr=subprocess.STDOUT))
    logs.append(log)
  return procs, logs


def wait(procs, logs, deadline: float) -> list[str]:
  """Waits for every process; on the first failure kills the others (which
  would wait forever in a collective) and fails with every log. Returns the
  logs' text."""
  try:
    while any(p.poll() is None for p in procs):
      if any(p.returncode not in (None, 0) for p in procs):
        break
      if time.monotonic() > deadline:
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  texts = []
  for log in logs:
    with open(log, errors="replace") as f:
      texts.append(f.read())
  if any(p.returncode != 0 for p in procs):
    report = [f"--- worker {i} (exit {p.returncode}) ---\n{text[-6000:]}"
              for i, (p, text) in enumerate(zip(procs, texts))]
    pytest.fail("multi-process workers failed:\n" + "\n".join(report),
                pytrace=False)
  return texts


def init_worker(port: int, process_id: int, num_processes: int = 2) -> None:
  """What a worker does first: gloo collectives, then jax.distributed."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)


def ends(procs, logs, deadline: float) -> tuple[list[int], list[str]]:
  """Waits for every process to end (unlike ``wait``, a failure does not stop
  the wait), killing any still running at ``deadline``. Returns their exit
  statuses (-9: killed) and the logs' text."""
  while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
    time.sleep(0.2)
  for p in procs:
    if p.poll() is None:
      p.kill()
  return [p.wait() for p in procs], [open(log, errors="replace").read() for log in logs]
