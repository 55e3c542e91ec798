r"""Every method on a family of fact sets (styles x seeds): mean and spread.

Each set of the family has its own tiny model; every method is scored on
each, then summarized across sets.

  tracer family --workdir=family [--styles=paraphrase,natural,dense] \
      [--seeds=0,1,2] [--set_facts_per_bucket=40] [--tail_patch_queries=80]

For each (style, seed), in WORKDIR/sets/STYLE-SEED: the facts
(``tracer.facts.style_config``), the tiny model trained as the demo's is
unless a checkpoint exists (a checkpoint every 100 steps, all kept, for the
checkpoint axis of ``tracer sweep --family_dir``), then ``tracer quality`` on it (skipped when its
quality.json exists, so a rerun finishes only what is missing). Writes
WORKDIR/family.json and WORKDIR/family.md and prints them: per method, the mean
and standard deviation across sets of MRR, recall@10 (overall and per bucket)
and tail-patch@k, and TrackStar's paired tail-patch@10 difference against each
other method, pooled over every query of every set (``tracer.stats``).
``--only_train`` prepares and trains the sets and stops.
"""

from __future__ import annotations

import json
import os

from absl import flags
import gin
import numpy as np

from tracer.launch import config
from tracer.launch import progress
from tracer.launch import quality
from tracer.launch import train
from tracer import evaluate
from tracer import facts
from tracer import stats

flags.DEFINE_list("styles", ["paraphrase", "natural", "dense"],
                  f"Fact styles of the family ({', '.join(facts.STYLES)}).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the family, one set each "
                  "per style.")
# Named apart from make-facts' --facts_per_bucket: absl flags are global.
flags.DEFINE_integer("set_facts_per_bucket", 40, "Query facts per bucket in each set.")
flags.DEFINE_integer("set_distractor_docs", 100, "Filler-only documents in each set.")
flags.DEFINE_bool("only_train", False, "Prepare and train every set, then stop.")
FLAGS = flags.FLAGS

# Every checkpoint kept, for the sweep's checkpoint axis (memorization).
TRAIN_BINDINGS = ("TrainConfig.checkpoint_every = 100",
                  "TrainConfig.keep_checkpoints = 100")
REFERENCE = "trackstar"


def set_names(styles, seeds) -> list[str]:
  return [f"{style}-{int(seed)}" for style in styles for seed in seeds]


def ensure_set(set_dir: str, style: str, seed: int, facts_per_bucket: int,
               distractor_docs: int) -> tuple[str, str]:
  """Writes the set's facts and trains its model unless a checkpoint exists;
  returns the corpus and queries paths."""
  cfg = facts.style_config(style, seed, facts_per_bucket=facts_per_bucket,
                           distractor_docs=distractor_docs)
  corpus, queries = facts.write_fact_corpus(os.path.join(set_dir, "facts"), cfg)
  checkpoints = os.path.join(set_dir, "checkpoints")
  if not os.path.isdir(checkpoints) or not any(
      name.isdigit() for name in os.listdir(checkpoints)):
    progress.say(f"{set_dir}: training the model")
    train.train(str(corpus), set_dir)
  return str(corpus), str(queries)


def read_set_report(set_dir: str) -> dict:
  with open(os.path.join(set_dir, "quality.json")) as f:
    return json.load(f)


def summarize(set_dirs: list[str], k: int = 10) -> dict:
  """Per method: mean and std across sets of each metric, and the paired
  tail-patch@k difference of ``REFERENCE`` minus the method, pooled over all
  queries of all sets."""
  reports = [read_set_report(d) for d in set_dirs]
  methods = list(reports[0]["methods"])
  summary = {}
  for method in methods:
    rows = [r["methods"][method] for r in reports]
    columns = {"mrr": [r["mrr"] for r in rows],
               f"recall@{k}": [r[f"recall@{k}"] for r in rows],
               f"tail_patch@{k}": [r[f"tail_patch@{k}"] for r in rows]}
    for bucket in rows[0].get("buckets", {}):
      columns[f"recall@{k} b{bucket}"] = [
          r["buckets"][bucket][f"recall@{k}"] for r in rows]
    summary[method] = {name: stats.mean_std(v) for name, v in columns.items()}
  # Paired over the same queries: each set's per-query tail-patch, pooled.
  key = f"per_query_tail_patch@{k}"
  pooled = {m: np.concatenate([np.asarray(r[key][m], np.float64) for r in reports])
            for m in methods if m != "random"}
  reference = pooled[REFERENCE]
  for method, values in pooled.items():
    if method != REFERENCE:
      summary[method][f"{REFERENCE} - this, tail_patch@{k}"] = stats.paired(
          reference, values)
  return {"sets": [os.path.basename(d) for d in set_dirs], "methods": summary,
          "influence_by_kind": pooled_kinds(reports, k)}


def pooled_kinds(reports: list[dict], k: int) -> dict | None:
  """``quality.influence_by_kind`` over the family: each kind's mean delta over
  the pairs of every set, each method's share averaged over sets."""
  parts = [r.get("influence_by_kind") for r in reports]
  if not all(parts):
    return None
  out = {"mean_delta": {}, "pairs": {}, f"share@{k}": {}}
  for kind in quality.KINDS:
    n = [p["pairs"][kind] for p in parts]
    total = sum(p["mean_delta"][kind] * c for p, c in zip(parts, n) if c)
    out["pairs"][kind] = sum(n)
    out["mean_delta"][kind] = total / sum(n) if sum(n) else None
  for method in parts[0][f"share@{k}"]:
    out[f"share@{k}"][method] = {
        kind: float(np.mean([p[f"share@{k}"][method][kind] for p in parts]))
        for kind in quality.KINDS}
  return out


def format_summary(summary: dict) -> str:
  """The family table: ``mean ± std`` cells, paired differences ``d ± se``."""
  cells = {m: {c: stats.format_cell(v) for c, v in cols.items()}
           for m, cols in summary["methods"].items()}
  columns = list(dict.fromkeys(c for cols in cells.values() for c in cols))
  return evaluate.format_table(cells, columns)


def run(workdir: str, styles, seeds, facts_per_bucket: int, distractor_docs: int,
        only_train: bool = False, num_tail_patch: int = 0,
        train_bindings=TRAIN_BINDINGS) -> dict | None:
  with gin.unlock_config():
    gin.parse_config(train_bindings)
  set_dirs = []
  for name in set_names(styles, seeds):
    style, seed = name.rsplit("-", 1)
    set_dir = os.path.join(workdir, "sets", name)
    corpus, queries = ensure_set(set_dir, style, int(seed), facts_per_bucket,
                                 distractor_docs)
    if not only_train and not os.path.exists(os.path.join(set_dir, "quality.json")):
      progress.say(f"{set_dir}: scoring every method")
      quality.run(set_dir, num_tail_patch=num_tail_patch, corpus_path=corpus,
                  queries_path=queries)
    set_dirs.append(set_dir)
  if only_train:
    return None
  summary = summarize(set_dirs)
  table = format_summary(summary)
  if summary["influence_by_kind"]:
    table += "\n\n" + quality.format_kinds(summary["influence_by_kind"], 10)
  evaluate.write_text_atomic(os.path.join(workdir, "family.json"),
                             json.dumps(summary, indent=2))
  evaluate.write_text_atomic(os.path.join(workdir, "family.md"), table + "\n")
  print(f"\n{len(set_dirs)} sets: {', '.join(summary['sets'])}\n\n{table}")
  return summary


def main(argv):
  del argv
  config.default_gin_file()
  config.parse_gin()
  run(FLAGS.workdir or "family", FLAGS.styles, FLAGS.seeds, FLAGS.set_facts_per_bucket,
      FLAGS.set_distractor_docs, FLAGS.only_train, FLAGS.tail_patch_queries)


if __name__ == "__main__":
  config.run(main)
