r"""Sweeps gin bindings: one ``trace`` run per grid point, one metrics table.

  tracer sweep --workdir=sweeps/dim_rank --base_workdir=demo \
      --grid="EncodeConfig.projection_dim=1024,4096,16384" \
      --grid="PreconditionerConfig.rank=10,60"

Every combination of the ``--grid`` values (``Binding=v1,v2,...``; repeat the
flag for more axes) runs ``launch.trace --streaming`` in its own process under
``WORKDIR/runs/NAME`` with the base workdir's checkpoint and fact corpus, then
its retrieval metrics go to ``NAME/metrics.json``. A run with a metrics file is
skipped, so a rerun finishes only what is missing. The table of all runs is
written to ``WORKDIR/sweep.md`` and ``WORKDIR/sweep.json`` and printed.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys

from absl import app
from absl import flags

from tracer.launch import config
from tracer import data as data_lib
from tracer import evaluate

flags.DEFINE_multi_string("grid", [], "'Binding=v1,v2,...' (repeatable).")
flags.DEFINE_string("base_workdir", "demo", "Workdir with the checkpoint and the "
                    "fact corpus (as made by launch.demo).")
FLAGS = config.FLAGS  # with the shared flags (--workdir, --gin_file) defined

COLUMNS = ("mrr", "recall@10", "precision@10")


def expand(grid: list[str]) -> list[list[str]]:
  """``["A=1,2", "B=x"]`` -> ``[["A=1", "B=x"], ["A=2", "B=x"]]``."""
  axes = []
  for spec in grid:
    if "=" not in spec:
      raise app.UsageError(f"--grid={spec!r}: expected 'Binding=v1,v2,...'")
    key, values = spec.split("=", 1)
    axes.append([f"{key.strip()}={v.strip()}" for v in values.split(",") if v.strip()])
  return [list(point) for point in itertools.product(*axes)]


def run_name(bindings: list[str]) -> str:
  """``["EncodeConfig.projection_dim=4096", "X.damping=0.1"]`` ->
  ``projection_dim=4096__damping=0.1``."""
  short = [f"{k.strip().rsplit('.', 1)[-1]}={v.strip()}"
           for k, v in (b.split("=", 1) for b in bindings)]
  return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "__".join(short)) or "base"


def run_one(run_dir: str, bindings: list[str], base_workdir: str,
            gin_files: list[str]) -> dict:
  """Runs trace for one grid point (unless done); returns its metrics."""
  metrics_path = os.path.join(run_dir, "metrics.json")
  if os.path.exists(metrics_path):
    with open(metrics_path) as f:
      return json.load(f)
  os.makedirs(run_dir, exist_ok=True)
  corpus = os.path.join(base_workdir, "facts", "corpus.jsonl")
  queries = os.path.join(base_workdir, "facts", "queries.jsonl")
  results = os.path.join(run_dir, "results.jsonl")
  cmd = [sys.executable, "-m", "tracer.launch.trace", f"--workdir={run_dir}",
         f"--checkpoint={os.path.join(base_workdir, 'checkpoints')}",
         f"--corpus={corpus}", f"--queries={queries}", f"--output={results}",
         "--streaming", "--show=0"]
  cmd += [f"--gin_file={g}" for g in gin_files]
  cmd += [f"--gin_bindings={b}" for b in bindings]
  with open(os.path.join(run_dir, "log.txt"), "w") as log:
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
  if proc.returncode:
    raise RuntimeError(f"run {run_dir} failed (exit {proc.returncode}); see "
                       f"{run_dir}/log.txt")
  metrics = evaluate.retrieval_metrics(data_lib.read_queries(queries),
                                       evaluate.read_results(results))
  metrics["bindings"] = bindings
  evaluate.write_text_atomic(metrics_path, json.dumps(metrics, indent=2))
  return metrics


def sweep(workdir: str, grid: list[str], base_workdir: str,
          gin_files: list[str]) -> dict:
  table = {}
  points = expand(grid)
  for i, bindings in enumerate(points, 1):
    name = run_name(bindings)
    print(f"[{i}/{len(points)}] {name}", flush=True)
    table[name] = run_one(os.path.join(workdir, "runs", name), bindings,
                          base_workdir, gin_files)
  text = evaluate.format_table(table, COLUMNS, row_header="run")
  evaluate.write_text_atomic(os.path.join(workdir, "sweep.md"), text + "\n")
  evaluate.write_text_atomic(os.path.join(workdir, "sweep.json"),
                             json.dumps(table, indent=2))
  print(text)
  return table


def main(argv):
  del argv
  if not FLAGS.workdir or not FLAGS.grid:
    raise app.UsageError("--workdir and at least one --grid are required")
  gin_files = FLAGS.gin_file or ["configs/tiny.gin"]
  sweep(FLAGS.workdir, FLAGS.grid, FLAGS.base_workdir, gin_files)


if __name__ == "__main__":
  config.run(main)
