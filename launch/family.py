r"""Every method on a family of fact sets (styles x seeds): mean and spread.

Each set of the family has its own tiny model; every method is scored on
each, then summarized across sets.

  tracer family --workdir=family [--styles=paraphrase,natural,dense] \
      [--seeds=0,1,2] [--set_facts_per_bucket=40] [--tail_patch_queries=80]

For each (style, seed), in WORKDIR/sets/STYLE-SEED: the facts
(``tracer.facts.style_config``), the tiny model trained as the demo's is
unless its training finished (a killed run resumes; a checkpoint every 100
steps, all kept, for the checkpoint axis of ``tracer sweep --family_dir``;
gin naming another model than a set's checkpoint is refused, ``check_trained``),
then ``tracer quality`` on it (skipped when its quality.json was scored as
this run asks, ``stale``, so a rerun finishes only what is missing). Writes
WORKDIR/family.json and WORKDIR/family.md and prints them: per method, the mean
and standard deviation across sets of MRR, recall@10 (overall and per bucket)
and tail-patch@k, and TrackStar's paired tail-patch@10 difference against each
other method, pooled over every query of every set (``tracer.stats``).
``--only_train`` prepares and trains the sets and stops.

Memorization: ``--steps=200,400`` also scores every set at those earlier
checkpoints (``tracer quality --checkpoint``, into WORKDIR/sets/NAME/step-S,
resumable the same way) and adds a table of each method's MRR, recall@10 and
tail-patch@10 by training step (mean and spread across sets): attribution
and influence on the model as it was at that step. ``--sum_steps=200,400``
adds ``tracer quality``'s ``trackstar_sum`` (TrackStar summed over those
steps and the last) to every set's scores.
"""

from __future__ import annotations

import json
import os

from absl import flags
import gin
import numpy as np

from tracer.launch import common
from tracer.launch import config
from tracer.launch import progress
from tracer.launch import quality
from tracer.launch import train
from tracer import checkpoint as ckpt_lib
from tracer import evaluate
from tracer import facts
from tracer import stats
from tracer.config import EncodeConfig
from tracer.config import OptimizerConfig
from tracer.config import PreconditionerConfig
from tracer.config import TrainConfig
from tracer.errors import InputError

flags.DEFINE_list("styles", ["paraphrase", "natural", "dense"],
                  f"Fact styles of the family ({', '.join(facts.STYLES)}).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the family, one set each "
                  "per style.")
# Named apart from make-facts' --facts_per_bucket: absl flags are global.
flags.DEFINE_integer("set_facts_per_bucket", 40, "Query facts per bucket in each set.",
                     lower_bound=1, upper_bound=facts.MAX_FACTS_PER_BUCKET)
flags.DEFINE_integer("set_distractor_docs", 100, "Filler-only documents in each set.",
                     lower_bound=0, upper_bound=facts.MAX_DISTRACTOR_DOCS)
flags.DEFINE_bool("only_train", False, "Prepare and train every set, then stop.")
flags.DEFINE_list("steps", [], "Earlier checkpoints (training steps) to score "
                  "every set at as well, for the memorization table.")
FLAGS = flags.FLAGS

# Every checkpoint kept, for the sweep's checkpoint axis (memorization).
TRAIN_BINDINGS = ("TrainConfig.checkpoint_every = 100",
                  "TrainConfig.keep_checkpoints = 100")
REFERENCE = "trackstar"


def set_names(styles, seeds) -> list[str]:
  """``style-seed`` of every set; each once (a set scored twice would count
  its queries twice in the spread and the paired test)."""
  if not styles or not seeds:
    raise InputError("--styles and --seeds: expected at least one of each")
  # Checked before any set trains (an unknown style was found after the sets
  # before it had trained; a seed -1 made the set dense--1, read back as a
  # style "dense-").
  unknown = [s for s in styles if s not in facts.STYLES]
  if unknown:
    raise InputError(f"--styles: unknown style {unknown[0]!r}; expected some of "
                     f"{', '.join(facts.STYLES)}")
  negative = [int(s) for s in seeds if int(s) < 0]
  if negative:
    raise InputError(f"--seeds: {negative[0]}; expected seeds >= 0")
  names = [f"{style}-{int(seed)}" for style in styles for seed in seeds]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise InputError(f"--styles/--seeds name the set {repeated[0]} twice; "
                     "expected each style and seed once")
  return names



def check_kept(flag: str, steps) -> None:
  """InputError for a step of ``--{flag}`` that is not an earlier checkpoint
  every set's training keeps (``train.kept_steps`` under ``TRAIN_BINDINGS``
  and gin's total_steps)."""
  train_config, last = config.make(TrainConfig), config.make(OptimizerConfig).total_steps
  kept = [s for s in train.kept_steps(train_config, last) if s != last]
  wrong = [int(s) for s in steps if int(s) not in kept]
  if wrong:
    raise InputError(f"--{flag}: step {wrong[0]} is not an earlier checkpoint the "
                     f"sets keep (every {train_config.checkpoint_every} steps, the "
                     f"last {last} scored anyway); expected some of {kept}")


def check_trained(set_dir: str) -> None:
  """InputError where a gin binding names another model, data or optimizer
  than the set's checkpoint was trained with (``common.check_bound_configs``,
  as ``tracer quality`` on it refuses; and every OptimizerConfig field, the
  schedule too: before 2026-12-08 ``total_steps`` or ``learning_rate`` were
  ignored): a trained set's model and scores are reused as they are, not
  made again under the binding. (TrainConfig is not kept in checkpoints:
  its bindings are not compared.)"""
  checkpoints = os.path.join(set_dir, "checkpoints")
  if os.path.isdir(checkpoints) and any(
      name.isdigit() for name in os.listdir(checkpoints)):
    saved = ckpt_lib.saved_config(checkpoints)
    common.check_bound_configs(saved)
    config.check_bound_fields(OptimizerConfig, saved.optimizer_config, saved.path)


def ensure_set(set_dir: str, style: str, seed: int, facts_per_bucket: int,
               distractor_docs: int) -> tuple[str, str]:
  """Writes the set's facts and trains its model unless a checkpoint exists;
  returns the corpus and queries paths."""
  cfg = facts.style_config(style, seed, facts_per_bucket=facts_per_bucket,
                           distractor_docs=distractor_docs)
  # A set's model and scores are reused by later runs: only for the set they
  # were made from.
  made = {"style": style, "seed": seed, "facts_per_bucket": facts_per_bucket,
          "distractor_docs": distractor_docs}
  record = os.path.join(set_dir, "set.json")
  if os.path.exists(record):
    with open(record) as f:
      before = json.load(f)
    if before != made:
      raise InputError(f"{record}: the set was made with {before}, this run "
                       f"asks {made}; expected the same settings, or another "
                       "--workdir")
  elif os.path.isdir(os.path.join(set_dir, "checkpoints")):
    progress.say(f"{set_dir}: made before sets recorded their settings; reusing "
                 "it as it is")
  corpus, queries = facts.write_fact_corpus(os.path.join(set_dir, "facts"), cfg)
  if not os.path.exists(record):
    evaluate.write_text_atomic(record, json.dumps(made))
  checkpoints = os.path.join(set_dir, "checkpoints")
  started = os.path.isdir(checkpoints) and any(
      name.isdigit() for name in os.listdir(checkpoints))
  # A killed training run left its last checkpoint: resumed, not scored.
  if not started or not ckpt_lib.finished(checkpoints):
    progress.say(f"{set_dir}: {'resuming' if started else 'training'} the model")
    train.train(str(corpus), set_dir)
  return str(corpus), str(queries)


def read_set_report(set_dir: str) -> dict:
  with open(os.path.join(set_dir, "quality.json")) as f:
    return json.load(f)


def report_step(report: dict) -> int:
  """The training step a quality report scored (its checkpoint's name)."""
  return int(report.get("step", os.path.basename(report["checkpoint"].rstrip("/"))))


def step_dir(set_dir: str, step: int) -> str:
  """Where a set's scores at an earlier checkpoint go."""
  return os.path.join(set_dir, f"step-{int(step)}")


def set_name(scored_dir: str) -> str:
  """The set a set's directory or ``step_dir`` belongs to."""
  parent, name = os.path.split(scored_dir.rstrip("/"))
  return os.path.basename(parent) if name.startswith("step-") else name


def score_set(out_dir: str, corpus: str, queries: str, num_tail_patch: int,
              checkpoint: str | None = None, sum_steps=()) -> None:
  """``tracer quality`` into ``out_dir`` unless its quality.json was scored as
  this run asks (``stale``)."""
  path = os.path.join(out_dir, "quality.json")
  if os.path.exists(path):
    with open(path) as f:
      why = stale(json.load(f), checkpoint or os.path.join(out_dir, "checkpoints"),
                  num_tail_patch, sum_steps)
    if not why:
      return
    progress.say(f"{out_dir}: scored {'; '.join(why)}; scoring again")
  else:
    progress.say(f"{out_dir}: scoring every method")
  quality.run(out_dir, num_tail_patch=num_tail_patch, corpus_path=corpus,
              queries_path=queries, checkpoint=checkpoint, sum_steps=sum_steps)


def stale(report: dict, checkpoint: str, num_tail_patch: int, sum_steps) -> list[str]:
  """How a set's report differs from what this run would score: another
  step of ``checkpoint`` (a directory: its latest; a set whose training was
  resumed), another number of tail-patch queries (when one is asked for:
  without one, a report is reused however many it patched), other sums or
  other settings. Reports from before
  2026-12-04 recorded no sums or settings: those are not compared."""
  directory, step = ckpt_lib.step_of(checkpoint.rstrip("/"))
  step = ckpt_lib.saved_step(directory)[0] if step is None else step
  asked = min(num_tail_patch, report["queries"])
  why = []
  if report_step(report) != step:
    why.append(f"at step {report_step(report)}, the checkpoint is at {step}")
  if num_tail_patch > 0 and report["tail_patch_queries"] != asked:
    why.append(f"with {report['tail_patch_queries']} tail-patch queries, this "
               f"run asks {asked}")
  summed = report.get("sum_steps")
  if sum_steps and (quality.SUM_METHOD not in report["methods"] or (
      summed is not None and summed != [int(s) for s in sum_steps])):
    why.append(f"summed over {summed or 'no steps'}, this run asks "
               f"{[int(s) for s in sum_steps]} (--sum_steps)")
  settings = quality.settings(config.make(EncodeConfig),
                              config.make(PreconditionerConfig))
  if report.get("settings", settings) != settings:
    differ = [f"{c}.{f}" for c in settings for f in settings[c]
              if report["settings"].get(c, {}).get(f) != settings[c][f]]
    why.append(f"with other {', '.join(differ)}")
  return why


# The memorization table's methods and columns.
MEMORIZATION_METHODS = ("bm25", "+unit_norm", "+R_train", "trackstar")
MEMORIZATION_COLUMNS = ("mrr", "recall@10", "recall@10 b1", "tail_patch@10")


def memorization(by_step: dict[int, list[str]]) -> dict:
  """``{step: summarize(those sets' reports)}``, steps ascending."""
  return {int(step): summarize(dirs) for step, dirs in sorted(by_step.items())}


def format_memorization(by_step: dict) -> str:
  """Rows ``method @ step S`` (each method's rows together), ``mean ± std``
  cells across sets."""
  cells = {}
  for method in MEMORIZATION_METHODS:
    for step, summary in by_step.items():
      cols = summary["methods"].get(method)
      if cols is not None:
        cells[f"{method} @ step {step}"] = {
            c: stats.format_cell(cols[c]) for c in MEMORIZATION_COLUMNS if c in cols}
  return evaluate.format_table(cells, MEMORIZATION_COLUMNS, row_header="method @ step")


def summarize(set_dirs: list[str], k: int = 10) -> dict:
  """Per method: mean and std across sets of each metric, and the paired
  tail-patch@k difference of ``REFERENCE`` minus the method, pooled over all
  queries of all sets."""
  reports = [read_set_report(d) for d in set_dirs]
  # Methods every set has (trackstar_sum only where --sum_steps was given).
  methods = [m for m in reports[0]["methods"]
             if all(m in r["methods"] for r in reports)]
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
  return {"sets": [set_name(d) for d in set_dirs], "methods": summary,
          "influence_by_kind": pooled_kinds(reports, k),
          "score_tail_patch_rho": pooled_rho(reports)}


def pooled_rho(reports: list[dict]) -> dict | None:
  """``quality.influence_predictors`` over the family: each method's per-query
  rho pooled over every set's queries (None unless every set has them)."""
  key = "per_query_score_tail_patch_rho"
  if not all(key in r for r in reports):
    return None
  return {m: [v for r in reports for v in r[key][m]] for m in reports[0][key]
          if all(m in r[key] for r in reports)}


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
    if not all(method in p[f"share@{k}"] for p in parts):
      continue
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
        train_bindings=TRAIN_BINDINGS, steps=(), sum_steps=()) -> dict | None:
  listed = [int(s) for s in steps]
  repeated = sorted({s for s in listed if listed.count(s) > 1})
  if repeated:  # (its sets would count twice in the spread and paired test)
    raise InputError(f"--steps names step {repeated[0]} twice; expected each "
                     "step once")
  with gin.unlock_config():
    gin.parse_config(train_bindings)
  # Checked before any set is written or trains (before 2026-12-05 an
  # EncodeConfig out of range, or a step no set keeps, was found after).
  config.check_all()
  for flag, listed in (("steps", steps), ("sum_steps", sum_steps)):
    check_kept(flag, listed)
  names = set_names(styles, seeds)
  # Before any set trains or is scored (before 2026-12-07 a binding of
  # another d_model reused the sets' models and printed their old table).
  for name in names:
    check_trained(os.path.join(workdir, "sets", name))
  set_dirs, by_step = [], {}
  for name in names:
    style, seed = name.rsplit("-", 1)
    set_dir = os.path.join(workdir, "sets", name)
    corpus, queries = ensure_set(set_dir, style, int(seed), facts_per_bucket,
                                 distractor_docs)
    set_dirs.append(set_dir)
    if only_train:
      continue
    score_set(set_dir, corpus, queries, num_tail_patch, sum_steps=sum_steps)
    for step in steps:
      checkpoint = os.path.join(set_dir, "checkpoints", str(int(step)))
      if not os.path.isdir(checkpoint):
        raise InputError(f"--steps: {checkpoint} does not exist (the set's "
                         f"checkpoints: {sorted(os.listdir(os.path.dirname(checkpoint)))})")
      score_set(step_dir(set_dir, step), corpus, queries, num_tail_patch, checkpoint)
      by_step.setdefault(int(step), []).append(step_dir(set_dir, step))
  if only_train:
    return None
  summary = summarize(set_dirs)
  table = format_summary(summary)
  if summary["influence_by_kind"]:
    table += "\n\n" + quality.format_kinds(summary["influence_by_kind"], 10)
  if summary["score_tail_patch_rho"]:
    table += "\n\n" + quality.format_predictors(summary["score_tail_patch_rho"])
  if by_step:
    by_step[report_step(read_set_report(set_dirs[0]))] = set_dirs
    summary["memorization"] = memorization(by_step)
    table += "\n\n" + format_memorization(summary["memorization"])
  evaluate.write_text_atomic(os.path.join(workdir, "family.json"),
                             evaluate.json_text(summary, indent=2))
  evaluate.write_text_atomic(os.path.join(workdir, "family.md"), table + "\n")
  print(f"\n{len(set_dirs)} sets: {', '.join(summary['sets'])}\n\n{table}")
  return summary


def main(argv):
  del argv
  config.default_gin_file()
  config.parse_gin()
  config.use_compilation_cache()
  run(FLAGS.workdir or "family", FLAGS.styles, config.integers("seeds", FLAGS.seeds),
      FLAGS.set_facts_per_bucket,
      FLAGS.set_distractor_docs, FLAGS.only_train, FLAGS.tail_patch_queries,
      steps=config.integers("steps", FLAGS.steps),
      sum_steps=config.integers("sum_steps", FLAGS.sum_steps))


USES = ("workdir", "sum_steps")


if __name__ == "__main__":
  config.run(main, uses=USES, shows=("tail_patch_queries", "family"))
