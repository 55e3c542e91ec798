r"""Writes one self-contained HTML page to browse results files side by side.

  tracer view --results=R.jsonl [--results=R2.jsonl ...] \
      [--names=a --names=b] --output=report.html [--title=...]

(also ``python -m tracer.launch.view``). Each results file is one run (a
method), named by ``--names`` in order or else by its file stem, made unique
(``r``, ``r-2``). ``--server=URL --queries=Q.jsonl [--top_k=K]`` adds one
more run (named ``server``, or by the last of ``--names``): the records a
running ``tracer serve`` answers for those queries (``--queries`` and
``--top_k`` only with ``--server``). Files may be ours
(``tracer.evaluate.make_result_row``) or the TrackStar authors' released ones
(``tracer.viewer``). The page needs no
server and no network: open it from disk (``tracer.viewer.render``). Paths
may be gs://, s3:// or memory:// URLs. Prints the page's location.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from absl import app
from absl import flags

from tracer.launch import config
from tracer import data
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
  flags.DEFINE_string("server", None, "URL of a running `tracer serve`: ask it "
                      "for --queries' records and show them as one more run.")


def run_names(locations: Sequence[str], names: Sequence[str] = (),
              server: bool = False) -> list[str]:
  """``names`` checked against ``locations`` (the last the server's, with
  ``server``), or else the files' stems, a repeated stem numbered (``r``,
  ``r-2``, ``r-3``)."""
  if names:
    if len(names) != len(locations):
      runs = (f"{len(locations)} runs ({len(locations) - 1} --results files and "
              "--server); expected one name per run, the last the server's"
              if server else
              f"{len(locations)} --results files; expected one name per file")
      raise InputError(f"--names: {len(names)} names for {runs}")
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
        title: str = "tracer results", server: str | None = None,
        queries: str | None = None, top_k: int | None = None) -> str:
  """Reads the results files (and, given ``server``, asks that ``tracer
  serve`` for the records of the ``queries`` file) and writes the page;
  returns ``output``."""
  sources = [*results, *(["server"] if server else [])]
  runs = {}
  for i, name in enumerate(run_names(sources, names, bool(server))):
    if i < len(results):
      runs[name] = viewer.read_results(results[i])
    else:
      from tracer import serving  # pylint: disable=g-import-not-at-top
      runs[name] = serving.trace_all(server, data.read_queries(queries), top_k)
  return viewer.write_report(output, runs, title)


def main(argv):
  del argv  # (cli.run refuses any)
  needed = ("output",) if FLAGS.server else ("results", "output")
  missing = [f"--{n}" for n in needed if not FLAGS[n].value]
  if missing:
    raise app.UsageError(f"{', '.join(missing)} required")
  if FLAGS.server and not FLAGS.queries:
    raise app.UsageError("--server needs --queries: the queries to ask it")
  # They say what to ask a server; without one they would be ignored.
  unused = [f"--{n}" for n in ("queries", "top_k") if FLAGS[n].present]
  if unused and not FLAGS.server:
    raise app.UsageError(f"{', '.join(unused)} without --server: they say what "
                         "to ask a running `tracer serve`; expected --server=URL "
                         "with them, or neither")
  # Before reading anything, so a long read cannot end in an unwritable path.
  config.check_writable(FLAGS.output, "--output")
  inputs = [("--results", r) for r in FLAGS.results or ()] + (
      [("--queries", FLAGS.queries)] if FLAGS.queries else [])
  for flag, path in inputs:
    if config.same_file(path, FLAGS.output):
      raise InputError(f"--output={FLAGS.output}: is the {flag} file "
                       f"{path}; expected another path (the page would "
                       "replace it)")
  # --top_k only when given: else the server's default.
  top_k = FLAGS.top_k if FLAGS["top_k"].present else None
  print(run(FLAGS.results or (), FLAGS.output, FLAGS.names or (), FLAGS.title,
            FLAGS.server, FLAGS.queries, top_k))


USES = ("output", "queries", "top_k")


if __name__ == "__main__":
  define_flags()
  config.run(main, uses=USES)
