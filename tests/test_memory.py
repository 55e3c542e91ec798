"""The memory a process may use: its cgroup's limit where that is below the
host's physical memory (``memory.cgroup_memory_limit``), on fake ``/proc``
trees of each cgroup layout and in a real cgroup the test makes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tracer import memory
from tracer.errors import InputError

import multiprocess  # tests/ is on sys.path

GIB = 1 << 30
V1_NO_LIMIT = "9223372036854771712"   # what v1 writes where no limit is set


def fake_proc(tmp_path: Path, cgroup: str, mounts: list[tuple[str, str, str, str]],
              files: dict[str, str]) -> str:
  """A ``/proc/self`` with ``cgroup`` as its cgroup file and ``mounts``
  (root, mount point under ``tmp_path``, fstype, super options) as its
  mountinfo; ``files`` (paths under ``tmp_path``) written too."""
  proc = tmp_path / "proc"
  proc.mkdir()
  (proc / "cgroup").write_text(cgroup)
  (proc / "mountinfo").write_text("".join(
      f"{30 + i} 23 0:{40 + i} {_escaped(root)} {_escaped(str(tmp_path / point))} "
      f"rw,relatime shared:{i} - "
      f"{fstype} {fstype} {options}\n" for i, (root, point, fstype, options) in enumerate(mounts)))
  for name, text in files.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text + "\n")
  return str(proc)


def _escaped(path: str) -> str:
  """A path as the kernel writes it in mountinfo: space, tab, newline and
  backslash in octal."""
  return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


def test_v2_takes_memory_high_where_it_is_lower(tmp_path):
  # Past memory.high the kernel throttles the group rather than kill it:
  # a plan relying on more would crawl.
  proc = fake_proc(tmp_path, "0::/user.slice/app\n", [("/", "cg", "cgroup2", "rw")], {
      "cg/user.slice/app/memory.max": str(8 * GIB),
      "cg/user.slice/app/memory.high": str(6 * GIB),
      "cg/user.slice/memory.high": "max"})
  assert memory.cgroup_memory_limit(proc) == 6 * GIB


def test_mount_points_with_escaped_characters(tmp_path):
  # mountinfo writes a space, tab, newline or backslash in a path in octal.
  point = "cg dir\twith\\odd\nnames"
  proc = fake_proc(tmp_path, "0::/job\n", [("/", point, "cgroup2", "rw")],
                   {f"{point}/job/memory.max": str(3 * GIB)})
  assert "\\011" in (Path(proc) / "mountinfo").read_text()
  assert memory.cgroup_memory_limit(proc) == 3 * GIB


def test_messages_name_the_cgroup_limit_where_it_binds(monkeypatch):
  monkeypatch.setattr(memory, "_physical_bytes", lambda: 64 * GIB)
  monkeypatch.setattr(memory, "cgroup_memory_limit", lambda: 2 * GIB)
  assert memory.host_memory_bytes() == 2 * GIB
  assert memory.host_memory_text(2 * GIB) == (
      "this process's cgroup memory limit of 2.0 GiB (the host has 64.0 GiB)")
  with pytest.raises(InputError, match=r"more than this process's cgroup memory "
                     r"limit of 2.0 GiB \(the host has 64.0 GiB\); expected less"):
    memory.check_bytes(3 * GIB, "a step", "less", device_have=None, devices=1)
  # A figure that is not the limit (a caller's own), or a limit above the
  # physical memory, is the host's.
  assert memory.host_memory_text(GIB) == "this host's 1.0 GiB"
  monkeypatch.setattr(memory, "cgroup_memory_limit", lambda: 128 * GIB)
  assert memory.host_memory_bytes() == 64 * GIB
  assert memory.host_memory_text(64 * GIB) == "this host's 64.0 GiB"


def test_v2_takes_the_lowest_limit_up_the_tree(tmp_path):
  proc = fake_proc(tmp_path, "0::/kubepods/pod1/app\n", [("/", "cg", "cgroup2", "rw")], {
      "cg/kubepods/pod1/app/memory.max": "max",
      "cg/kubepods/pod1/memory.max": str(3 * GIB),
      "cg/kubepods/memory.max": str(5 * GIB)})
  assert memory.cgroup_memory_limit(proc) == 3 * GIB


def test_v2_in_its_own_namespace_reads_the_mount_root(tmp_path):
  # A container with its own cgroup namespace: its cgroup is "/", the
  # mount's root is its cgroup on the host.
  proc = fake_proc(tmp_path, "0::/\n", [("/kubepods/pod1", "cg", "cgroup2", "rw")],
                   {"cg/memory.max": str(2 * GIB)})
  assert memory.cgroup_memory_limit(proc) == 2 * GIB


def test_v1_without_a_namespace_walks_up_to_the_mount(tmp_path):
  # Older Docker on cgroup v1: the host's path is listed, the container's
  # cgroup is bind-mounted as the mount's root; the listed path does not
  # exist under the mount point.
  proc = fake_proc(
      tmp_path, "12:cpu,cpuacct:/docker/abc\n9:memory:/docker/abc\n0::/docker/abc\n",
      [("/docker/abc", "cg/memory", "cgroup", "rw,memory"),
       ("/docker/abc", "cg/cpu,cpuacct", "cgroup", "rw,cpu,cpuacct")],
      {"cg/memory/memory.limit_in_bytes": str(4 * GIB),
       "cg/cpu,cpuacct/memory.limit_in_bytes": str(GIB)})   # not a memory mount
  assert memory.cgroup_memory_limit(proc) == 4 * GIB


def test_v1_host_path_takes_the_lowest_limit(tmp_path):
  proc = fake_proc(tmp_path, "4:memory:/slurm/uid_0/job_7\n",
                   [("/", "cg/memory", "cgroup", "rw,memory")], {
                       "cg/memory/slurm/uid_0/job_7/memory.limit_in_bytes": str(6 * GIB),
                       "cg/memory/slurm/uid_0/memory.limit_in_bytes": str(7 * GIB),
                       "cg/memory/slurm/memory.limit_in_bytes": V1_NO_LIMIT,
                       "cg/memory/memory.limit_in_bytes": V1_NO_LIMIT})
  assert memory.cgroup_memory_limit(proc) == 6 * GIB


def test_no_limit_or_no_cgroup(tmp_path):
  # A hybrid layout (this project's machines): v1 memory without a limit,
  # the v2 hierarchy without the memory controller.
  proc = fake_proc(tmp_path, "4:memory:/process_api/x\n0::/\n",
                   [("/", "cg/memory", "cgroup", "rw,memory"), ("/", "cg/unified", "cgroup2", "rw")],
                   {"cg/memory/process_api/x/memory.limit_in_bytes": V1_NO_LIMIT,
                    "cg/memory/memory.limit_in_bytes": V1_NO_LIMIT})
  assert memory.cgroup_memory_limit(proc) == int(V1_NO_LIMIT)
  assert memory.cgroup_memory_limit(str(tmp_path / "no-such-proc")) is None
  empty = tmp_path / "empty"
  empty.mkdir()
  assert memory.cgroup_memory_limit(fake_proc(empty, "0::/\n", [], {})) is None


def test_an_allocation_may_take_what_the_process_does_not_hold(monkeypatch):
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: 4 * GIB)
  monkeypatch.setattr(memory, "process_resident_bytes", lambda: GIB // 2)
  assert memory.host_budget() == (
      GIB * 7 // 2, "the 3.5 GiB this process has left of this host's 4.0 GiB "
      "(it holds 512.0 MiB)")
  # A caller's own figure is taken as it is.
  assert memory.host_budget(GIB) == (GIB, "this host's 1.0 GiB")
  monkeypatch.undo()
  # This process holds its interpreter, jax and XLA.
  assert memory.process_resident_bytes() > 50 << 20


def _make_limited_cgroup(limit: int) -> Path | None:
  """A new memory cgroup of ``limit`` bytes, on cgroup v1's memory
  hierarchy or v2 (the controller enabled at the root); None where this
  process may not make one (not root, no such hierarchy, read-only)."""
  name = f"tracer-test-{uuid.uuid4().hex[:8]}"
  for line in Path("/proc/self/mountinfo").read_text().splitlines():
    fields = line.split()
    fs = fields[fields.index("-") + 1:]
    point = Path(fields[4])
    if fs[0] == "cgroup" and "memory" in fs[2].split(","):
      limit_file = "memory.limit_in_bytes"
    elif fs[0] == "cgroup2":
      limit_file = "memory.max"
    else:
      continue
    try:
      (point / name).mkdir()
    except OSError:
      continue
    try:
      (point / name / limit_file).write_text(str(limit))
      return point / name
    except OSError:   # (v2 without the memory controller has no memory.max)
      (point / name).rmdir()
  return None


def test_a_process_in_a_limited_cgroup_plans_for_its_limit():
  group = _make_limited_cgroup(GIB)
  if group is None:
    pytest.skip("this process may not make a memory cgroup (needs root and a "
                "writable cgroup v1 memory or v2 hierarchy)")
  try:
    # The check of the scan benchmark's 70,000 x 1,024 rows (14 bytes an
    # element, 1,003,520,000 bytes) passed the limit alone, and the process
    # holding its own ~300-500 MB beside them was killed (status 137).
    code = ("from tracer import memory\n"
            "from tracer.launch import benchmark_scan\n"
            "for check in (lambda: memory.check_bytes(2 << 30, 'a step', 'less', devices=1),\n"
            "              lambda: benchmark_scan.check_memory(70000, 1024, 'scan')):\n"
            "  try:\n"
            "    check()\n"
            "  except Exception as e:\n"
            "    print(e)\n"
            "print(memory.host_memory_bytes())")
    proc = subprocess.run(
        ["sh", "-c", f'echo $$ > {group / "cgroup.procs"} && exec "$0" -c "$1"',
         sys.executable, code],
        capture_output=True, text=True, cwd=multiprocess.ROOT, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  finally:
    # The process has exited: the cgroup is empty and can go.
    group.rmdir()
  assert proc.returncode == 0, proc.stderr
  assert int(proc.stdout.split()[-1]) == GIB
  assert "more than this process's cgroup memory limit of 1.0 GiB (the host has " in proc.stdout
  assert re.search(r"1,003,520,000 bytes, more than the [\d,]+ bytes this process "
                   r"has left of its cgroup memory limit of 1,073,741,824 bytes \(it "
                   r"holds [\d,]+ bytes; the host has [\d,]+ bytes\); expected at "
                   r"most [\d,]+ rows at --dim=1024", proc.stdout), proc.stdout
  # This process, outside it, sees no such limit.
  assert memory.host_memory_bytes() > GIB
