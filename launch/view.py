r"""Writes one self-contained HTML page to browse results files side by side.

  tracer view --results=R.jsonl [--results=R2.jsonl ...] \
      [--names=a --names=b] --output=report.html [--title=...]

(also ``python -m tracer.launch.view``). Each results file is one run (a
method), named by ``--names`` in order or else by its file stem, made unique
(``r``, ``r-2``). Files may be ours (``tracer.evaluate.make_result_row``) or
the TrackStar authors' released ones (``tracer.viewer``). The page needs no
server and no network: open it from disk (``tracer.viewer.render``). Paths
may be gs://, s3:// or memory:// URLs. Prints the page's location.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from absl import app
from absl import flags

from tracer.launch import config
from tracer import viewer
from tracer.errors import InputError

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines this tool's flags (``--output`` is ``launch.config``'s); only
  when run as a program, as ``launch.evaluate``, whose --results this shares."""
  flags.DEFINE_multi_string("results", None,
                            "Results JSONL; repeat for runs side by side.")
  flags.DEFINE_multi_string("names", None,
                            "Run names, one per --results in order; default: "
                            "each file's stem, made unique.")
  flags.DEFINE_string("title", "tracer results", "The page's title.")


def run_names(locations: Sequence[str], names: Sequence[str] = ()) -> list[str]:
  """``names`` checked against ``locations``, or else the files' stems, a
  repeated stem numbered (``r``, ``r-2``, ``r-3``)."""
  if names:
    if len(names) != len(locations):
      raise InputError(f"--names: {len(names)} names for {len(locations)} "
                       "--results files; expected one name per file")
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
      raise InputError(f"--names: {', '.join(map(repr, repeated))} given more "
                       "than once; expected a distinct name per run")
    if not all(names):
      raise InputError("--names: an empty name; expected a name per run")
    return list(names)
  out: list[str] = []
  for location in locations:
    stem = pathlib.PurePosixPath(str(location).rstrip("/")).stem or "results"
    name, i = stem, 1
    while name in out:
      i += 1
      name = f"{stem}-{i}"
    out.append(name)
  return out


def run(results: Sequence[str], output: str, names: Sequence[str] = (),
        title: str = "tracer results") -> str:
  """Reads the results files and writes the page; returns ``output``."""
  runs = {name: viewer.read_results(location)
          for name, location in zip(run_names(results, names), results)}
  return viewer.write_report(output, runs, title)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  missing = [f"--{n}" for n in ("results", "output") if not FLAGS[n].value]
  if missing:
    raise app.UsageError(f"{', '.join(missing)} required")
  # Before reading anything, so a long read cannot end in an unwritable path.
  config.check_writable(FLAGS.output, "--output")
  print(run(FLAGS.results, FLAGS.output, FLAGS.names or (), FLAGS.title))


if __name__ == "__main__":
  define_flags()
  config.run(main)
