"""Progress bars for the long stages (tqdm): done/total, rate, time left.

A bar shows only on process 0, only when stderr is a terminal, and not with
``--noprogress``; otherwise ``Progress`` does nothing and the scripts' own
one-line summaries are all that is printed. ``say`` prints a line without
breaking a bar that is showing.
"""

from __future__ import annotations

import os
import sys
from typing import IO

from absl import flags
import tqdm

flags.DEFINE_bool("progress", True, "Progress bars for the long stages (on a "
                  "terminal, process 0 only); --noprogress turns them off.")
FLAGS = flags.FLAGS


def _process_index() -> int:
  jax = sys.modules.get("jax")  # a script that never loaded jax is process 0
  return 0 if jax is None else jax.process_index()


def enabled() -> bool:
  """Bars show: --progress (the default; also when flags are not parsed, as
  in tests), process 0, and stderr a terminal."""
  wanted = FLAGS["progress"].value if FLAGS.is_parsed() else True
  return bool(wanted) and _process_index() == 0 and sys.stderr.isatty()


def _columns(file) -> int:
  try:
    return os.get_terminal_size(file.fileno()).columns
  except (AttributeError, OSError, ValueError):  # not a terminal, no fileno
    return 0


class Progress:
  """A bar for one stage, fed absolute counts: ``progress(done, total)``
  (the ``tracer.pipeline`` progress callback). It closes itself when ``done``
  reaches ``total``; ``close()`` ends it early. ``initial``: where a resumed
  stage starts (not counted in the rate). ``file``: draw there even if it is
  not a terminal (tests)."""

  def __init__(self, label: str, unit: str = "examples", initial: int = 0,
               file: IO[str] | None = None):
    self.label, self.unit, self.initial, self._file = label, unit, initial, file
    self._bar: tqdm.tqdm | None = None
    self._closed = False

  def __call__(self, done: int, total: int | None = None) -> None:
    if self._closed or (self._file is None and not enabled()):
      return
    if self._bar is None:
      file = self._file or sys.stderr
      # Follow the terminal's size, unless it reports none (a bare pty, where
      # tqdm would hide the bar).
      sized = _columns(file) > 0
      self._bar = tqdm.tqdm(desc=self.label, unit=self.unit, total=total, file=file,
                            dynamic_ncols=sized, ncols=None if sized else 100,
                            nrows=None if sized else 24,
                            initial=self.initial, smoothing=0.1, leave=True)
    if total is not None and self._bar.total != total:
      self._bar.total = total
    self._bar.update(done - self._bar.n)
    if total is not None and done >= total:
      self.close()

  def postfix(self, **values) -> None:
    """Shows ``key=value`` pairs after the bar (e.g. the training loss)."""
    if self._bar is not None:
      self._bar.set_postfix(values, refresh=False)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    self._closed = True


def say(*args) -> None:
  """print, on process 0 only, above any bar that is showing."""
  if _process_index() == 0:
    tqdm.tqdm.write(" ".join(map(str, args)), file=sys.stdout)
    sys.stdout.flush()
