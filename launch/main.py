"""The ``tracer`` command: one entry point whose subcommands are the launch scripts.

  tracer demo --workdir=demo
  tracer trace --gin_file=configs/tiny.gin --workdir=W --corpus=C --queries=Q ...
  tracer view --results=R.jsonl --output=report.html
  tracer SUBCOMMAND --help      (that script's flags)

``tracer X ARGS`` is ``python -m tracer.launch.X ARGS`` (absl flags and gin
unchanged; from a checkout, ``python -m launch.X`` too). This module imports
neither jax nor the scripts: ``tracer --help`` reads each script's first
docstring line from its source.
"""

from __future__ import annotations

import ast
import importlib.util
import runpy
import sys

# Subcommand -> module under tracer.launch, in the order --help lists them.
COMMANDS = {
    "demo": "demo",
    "make-facts": "make_facts",
    "train": "train",
    "tokenize": "tokenize",
    "fit-preconditioner": "fit_preconditioner",
    "encode": "encode",
    "scan": "scan",
    "trace": "trace",
    "serve": "serve",
    "view": "view",
    "evaluate": "evaluate",
    "bm25": "bm25",
    "quality": "quality",
    "family": "family",
    "sweep": "sweep",
    "verify": "verify",
    "plan": "plan",
    "benchmark": "benchmark",
    "benchmark-data": "benchmark_data",
    "benchmark-scan": "benchmark_scan",
}


def summary(module: str) -> str:
  """The first line of ``tracer.launch.<module>``'s docstring, without
  importing it."""
  spec = importlib.util.find_spec(f"tracer.launch.{module}")
  with open(spec.origin, encoding="utf-8") as f:
    doc = ast.get_docstring(ast.parse(f.read())) or ""
  return doc.splitlines()[0] if doc else ""


def usage() -> str:
  width = max(map(len, COMMANDS))
  lines = ["usage: tracer SUBCOMMAND [--flags]   (tracer SUBCOMMAND --help: its flags)",
           "", "Which pretraining examples made the model say this? "
           "(TrackStar in JAX)", "", "subcommands:"]
  lines += [f"  {name:<{width}}  {summary(module)}" for name, module in COMMANDS.items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  name = argv[1].replace("_", "-")
  if name not in COMMANDS:
    sys.stderr.write(f"error: unknown subcommand {argv[1]!r}; expected one of "
                     f"{', '.join(COMMANDS)} (tracer --help)\n")
    sys.exit(2)
  # As `python -m tracer.launch.X ARGS`: the script runs as __main__ (absl
  # keys its flags and --help text on that), argv[0] becomes its path.
  sys.argv = [f"tracer {name}", *argv[2:]]
  runpy.run_module(f"tracer.launch.{COMMANDS[name]}", run_name="__main__",
                   alter_sys=True)


if __name__ == "__main__":
  main()
