"""What fits in memory: the host's and a device's, and what a compiled
program needs by XLA's own count, to refuse a setting before it runs out.

Out of memory, XLA ends a run with a RESOURCE_EXHAUSTED traceback, on CPU
after minutes of work (``TrainConfig.batch_size=1000000`` on tiny.gin: 162
s); ``check_compiled_memory`` says which setting to change once the program
is compiled, before it first runs.
"""

from __future__ import annotations

import functools
import gc
import os
import re
import socket

import jax

from tracer import coordination
from tracer.errors import InputError


def size_text(n: float) -> str:
  """Bytes for a message, to one decimal in the largest binary unit in
  which that reads at least 1.0: '1.5 GiB', '151.5 KiB', '512 bytes' (not
  '0.0 GiB')."""
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if round(abs(n) / scale, 1) >= 1:
      return f"{n / scale:,.1f} {unit}"
  return f"{n:,.0f} bytes"


def host_memory_bytes() -> int:
  """The memory this process may use on its host: the physical memory, or
  its cgroup's memory limit where that is lower (``cgroup_memory_limit``),
  each shared evenly among the run's processes on that host, or in that
  cgroup (``coordination.sharing``): processes of one host (one a GPU, as
  Slurm and many GPU clusters start them) each planning for the whole
  host would together take it several times."""
  return _host_memory()[0]


def _host_memory() -> tuple[int, bool, int]:
  """(bytes this process may use, whether a cgroup's limit binds, how many
  processes of the run share what binds)."""
  limit = cgroup_memory_limit()
  on_host, in_group = coordination.sharing(host_identity())
  physical = _physical_bytes() // on_host
  if limit is not None and limit // in_group < physical:
    return limit // in_group, True, in_group
  return physical, False, on_host


def host_identity() -> list[str]:
  """``[host, memory cgroup]`` as ``coordination.sharing`` compares them:
  the kernel's boot id (one per host and boot, seen alike from every
  container on it) beside the hostname; the cgroup namespace and path
  (``/proc/self/cgroup``'s memory line), so that processes of one
  container share its limit and those of two do not."""
  def read(path: str, link: bool = False) -> str:
    try:
      if link:
        return os.readlink(path)
      with open(path, encoding="utf-8", errors="replace") as f:
        return f.read().strip()
    except OSError:
      return ""
  try:
    groups = _cgroups("/proc/self")
  except OSError:
    groups = []
  memory_group = next((g[2] for g in groups if "memory" in g[1].split(",")),
                      next((g[2] for g in groups if g[:2] == ["0", ""]), ""))
  host = f"{socket.gethostname()} {read('/proc/sys/kernel/random/boot_id')}"
  return [host, f"{host} {read('/proc/self/ns/cgroup', link=True)} {memory_group}"]


def _physical_bytes() -> int:
  return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def host_memory_text(have: int, size=size_text) -> str:
  """``have`` bytes of host memory for a message: "this host's 23.5 GiB";
  where ``have`` is a cgroup's limit below the physical memory, "this
  process's cgroup memory limit of 1.0 GiB (the host has 23.5 GiB)": a user
  in a container would otherwise read a figure that is not the machine's;
  where it is a share, "this process's share (1 of 4 processes of the run)
  of this host's 64.0 GiB: 16.0 GiB". ``size`` writes a figure."""
  mine, cgroup, sharers = _host_memory()
  if have != mine:  # a caller's own figure
    return f"this host's {size(have)}"
  return _whose(have, cgroup, sharers, size, "this process's") + (
      f" (the host has {size(_physical_bytes())})" if cgroup else "")


def _whose(total: int, cgroup: bool, sharers: int, size, owner: str) -> str:
  """What ``total`` (``_host_memory``'s) is, in words, ``owner`` its
  process's: "this host's 64.0 GiB", "its cgroup memory limit of 2.0 GiB",
  "its share (1 of 4 processes of the run) of this host's 64.0 GiB: 16.0 GiB"."""
  if sharers > 1:
    whole = (f"the cgroup memory limit of {size(cgroup_memory_limit())}" if cgroup
             else f"this host's {size(_physical_bytes())}")
    return (f"{owner} share (1 of {sharers} processes of the run) of {whole}: "
            f"{size(total)}")
  return (f"{owner} cgroup memory limit of {size(total)}" if cgroup
          else f"this host's {size(total)}")


def process_resident_bytes() -> int:
  """The memory this process holds now (its resident set,
  ``/proc/self/statm``); 0 off Linux."""
  try:
    with open("/proc/self/statm", encoding="ascii") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return 0


def host_budget(have: int | None = None, size=size_text) -> tuple[int, str]:
  """The host memory a new allocation may take, and its words for a
  message: ``have`` bytes where given (``host_memory_text``: a caller's own
  figure); else what this process may use (``host_memory_bytes``) less what
  it holds already (``process_resident_bytes``): "the 3.5 GiB this process
  has left of this host's 4.0 GiB (it holds 512.0 MiB)". Why: a process
  holds memory before its first array (measured: 176 MB after importing
  tracer, 232 MB once XLA ran a program, 312 MB with faiss; a model more),
  which in a container of a few GiB is what an allocation the whole limit
  allowed is killed for (2026-12-07, a 1 GiB cgroup:
  ``benchmark_scan --rows=70000 --dim=1024`` passed its check and was
  killed). ``size`` writes a figure."""
  if have is not None:
    return have, host_memory_text(have, size)
  total, held = host_memory_bytes(), process_resident_bytes()
  mine, cgroup, sharers = _host_memory()
  if total != mine:  # (a figure put in its place: a test's, a caller's)
    cgroup, sharers = False, 1
  return total - held, (
      f"the {size(max(0, total - held))} this process has left of "
      + _whose(total, cgroup, sharers, size, "its")
      + (f" (it holds {size(held)}; the host has {size(_physical_bytes())})"
         if cgroup else f" (it holds {size(held)})"))


def cgroup_memory_limit(proc: str = "/proc/self") -> int | None:
  """The lowest memory limit on the cgroup of the process whose ``/proc``
  directory is ``proc`` and on its ancestors, cgroup v2 (``memory.max``, or
  ``memory.high`` where lower: past it the kernel throttles the group and
  reclaims its pages, so a plan that relies on more crawls) or v1
  (``memory.limit_in_bytes``); None where none is set or readable.

  Why: a container (a Kubernetes pod on a TPU or GPU node, a Slurm job)
  sees the node's physical memory, and past its limit the kernel kills the
  process without a word; plans and checks held to the node's memory would
  let it. The process's cgroup path (``proc``/cgroup) is found under the
  hierarchy's mount point (``proc``/mountinfo) relative to the mount's
  root, and limits are read from there up to the mount point: a container
  with its own cgroup namespace sees its cgroup as the mount's root, one
  without sees the host's path, which does not exist under its mount."""
  try:
    groups = _cgroups(proc)
    with open(os.path.join(proc, "mountinfo")) as f:
      mounts = [line.split() for line in f]
  except OSError:
    return None
  limits = []
  for mount in mounts:
    if "-" not in mount[:-3]:   # the separator, then three fields
      continue
    fields = mount[mount.index("-") + 1:]   # fstype, source, super options
    root, point = _unescape(mount[3]), _unescape(mount[4])
    if fields[0] == "cgroup2":
      paths = [g[2] for g in groups if g[:2] == ["0", ""]]
      files = ("memory.max", "memory.high")
    elif fields[0] == "cgroup" and "memory" in fields[2].split(","):
      paths = [g[2] for g in groups if "memory" in g[1].split(",")]
      files = ("memory.limit_in_bytes",)
    else:
      continue
    for path in paths:
      if root != "/" and (path == root or path.startswith(root + "/")):
        path = path[len(root):]
      parts = [p for p in path.split("/") if p]
      for depth in range(len(parts), -1, -1):
        limits += [_limit_file(os.path.join(point, *parts[:depth], f)) for f in files]
  limits = [n for n in limits if n is not None]
  return min(limits) if limits else None


def _cgroups(proc: str) -> list[list[str]]:
  """``proc``/cgroup's lines as ``[hierarchy id, controllers, path]``;
  OSError where it cannot be read."""
  with open(os.path.join(proc, "cgroup")) as f:
    return [line.rstrip("\n").split(":", 2) for line in f if line.count(":") >= 2]


def _unescape(field: str) -> str:
  """A mountinfo path as the kernel wrote it, its space, tab, newline and
  backslash escaped in octal (``\\040``), back to the path."""
  return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _limit_file(path: str) -> int | None:
  """A cgroup memory limit file's bytes; None where it is missing, "max"
  (v2's no limit) or unreadable. (v1 writes no limit as ~2^63.)"""
  try:
    with open(path) as f:
      text = f.read().strip()
  except OSError:
    return None
  return int(text) if text.isdigit() else None


def device_memory_bytes() -> int | None:
  """The smallest local device's memory where the backend reports it (GPU,
  TPU); None on CPU, whose devices share the host's."""
  limits = [(d.memory_stats() or {}).get("bytes_limit") for d in jax.local_devices()]
  return min(limits) if all(limits) else None


def memory_maps() -> int | None:
  """How many memory maps this process holds (``/proc/self/maps``); None
  off Linux."""
  try:
    with open("/proc/self/maps", "rb") as f:
      return f.read().count(b"\n")
  except OSError:
    return None


def map_limit() -> int | None:
  """The most memory maps a process may hold (``vm.max_map_count``,
  65,530 by default); None off Linux."""
  try:
    with open("/proc/sys/vm/max_map_count", encoding="ascii") as f:
      return int(f.read())
  except (OSError, ValueError):
    return None


def release_programs_near_map_limit() -> bool:
  """Drops every compiled program of the process (``jax.clear_caches``)
  where it holds more than half the memory maps Linux allows it; returns
  whether it did. Called where programs are made (a scan, an encoder, a
  served batch): they are compiled again when next called.

  Why: XLA:CPU keeps each compiled program's machine code in memory maps
  of its own for as long as the program is cached, and jit caches every
  shape it sees for the life of the process: a scan step of another shape
  added 75-190 maps on 8 CPU devices, an encoder's step and verification
  ~600. At the limit the next native allocation fails ("cannot map
  zero-fill pages", a segfault) or XLA aborts (a thread it could not
  start): a long ``tracer serve``, a ``tracer family`` of many sets, or a
  loop of scans in one process would end so."""
  limit, held = map_limit(), memory_maps()
  if limit is None or held is None or held <= limit // 2:
    return False
  jax.clear_caches()
  gc.collect()
  return True


def compiled_bytes(compiled: jax.stages.Compiled) -> int | None:
  """One device's memory for one run of ``compiled``, by XLA's own count
  after compiling: its arguments, temporaries, and outputs not aliased to a
  donated argument. None where the backend does not say."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes
             + m.temp_size_in_bytes - m.alias_size_in_bytes)


def check_compiled_memory(compiled: jax.stages.Compiled, what: str, fix: str,
                          have: int | None = None,
                          device_have: int | None = None,
                          devices: int | None = None) -> None:
  """InputError, before ``compiled`` first runs, where one run needs more
  than a device's ``device_have`` bytes (default ``device_memory_bytes``:
  GPU, TPU) or, where the devices share the host's memory (CPU), more than
  ``have`` bytes (default ``host_memory_bytes``) for the ``devices`` it runs
  on in this host together (default all of them). Without it, a batch too
  large ends in XLA's RESOURCE_EXHAUSTED traceback, on CPU minutes later
  (2026-12-06: ``TrainConfig.batch_size=1000000`` on tiny.gin, 162 s).
  ``what`` names the setting and the program (``"TrainConfig.batch_size=N:
  a training step"``), ``fix`` what to change."""
  check_bytes(compiled_bytes(compiled), what, fix, have, device_have, devices)


@functools.lru_cache(maxsize=1024)
def _program_bytes(fn, specs) -> int | None:
  return compiled_bytes(fn.lower(*specs).compile())


def program_bytes(fn, *args) -> int | None:
  """``compiled_bytes`` of the jitted ``fn`` for arguments shaped, typed and
  placed as ``args``; lowered once per ``fn`` and argument shapes in a
  process (the lowering costs a small scan step ~3 ms; the compile is jit's,
  which its call then reuses)."""
  specs = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                     sharding=getattr(a, "sharding", None),
                                     weak_type=getattr(a, "weak_type", False)), args)
  return _program_bytes(fn, specs)


def check_bytes(need: int | None, what: str, fix: str, have: int | None = None,
                device_have: int | None = None, devices: int | None = None) -> None:
  """``check_compiled_memory`` for a count already made (``need`` bytes on
  each device; None: not known, nothing checked)."""
  if need is None:
    return
  device_have = device_memory_bytes() if device_have is None else device_have
  if device_have is not None:
    if need > device_have:
      raise InputError(f"{what} takes {size_text(need)} on each device "
                       f"(XLA's count after compiling), more than a device's "
                       f"{size_text(device_have)}; expected {fix}")
    return
  have = host_memory_bytes() if have is None else have
  devices = len(jax.local_devices()) if devices is None else devices
  if need * devices > have:
    each = (f" on each of this host's {devices} devices, "
            f"{size_text(need * devices)} in all" if devices > 1 else "")
    raise InputError(f"{what} takes {size_text(need)}{each} (XLA's count "
                     f"after compiling), more than {host_memory_text(have)}; "
                     f"expected {fix}")
