"""Named points where the crash tests kill a run, deterministically.

``TRACER_CRASH_AT=name:n`` in the environment makes the process SIGKILL
itself the ``n``-th time (1-based) it reaches ``point(name)``: no cleanup
runs, no buffer is flushed, as when a host dies. ``name:n:SIGTERM`` sends
that signal instead (a scheduler stopping the job at that point). Unset
(always, outside the tests) a point costs one dict lookup.

Points: ``fit.batch`` (after each R_train sample batch), ``encode.batch``
(after each corpus batch is encoded, before its chunk may be full),
``chunk.data`` (a chunk's rows written, its marker not yet),
``chunk.marked`` (after the marker), ``results.write`` (results serialized,
the file not yet written).
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def _target() -> tuple[str, int, signal.Signals] | None:
  spec = os.environ.get("TRACER_CRASH_AT")
  if not spec:
    return None
  name, _, n = spec.rpartition(":")
  if n.isdigit():
    return name, int(n), signal.SIGKILL
  name, _, count = name.rpartition(":")
  return name, int(count), signal.Signals[n]


def point(name: str) -> None:
  """Kills (or signals) this process here if ``TRACER_CRASH_AT`` names this
  point and count."""
  target = _target()
  if target is None or target[0] != name:
    return
  _counts[name] = _counts.get(name, 0) + 1
  if _counts[name] == target[1]:
    os.kill(os.getpid(), target[2])
