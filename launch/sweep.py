r"""Sweeps settings: one metrics table over a grid, on one set or a family.

  tracer sweep --workdir=sweeps/dim_rank --base_workdir=demo \
      --grid="EncodeConfig.projection_dim=1024,4096,16384" \
      --grid="PreconditionerConfig.rank=10,60"

Every combination of the ``--grid`` values (``Binding=v1,v2,...``; repeat the
flag for more axes) runs ``launch.trace --streaming`` in its own process under
``WORKDIR/runs/NAME`` with the base workdir's checkpoint and fact corpus (and
``--gin_file``, ``--gin_bindings``, then the point's bindings), then
its retrieval metrics go to ``NAME/metrics.json``. A run with a metrics file is
skipped, so a rerun finishes only what is missing (every run scores the step
that is the base's latest as the sweep starts; runs of another are refused).
The table of all runs is written to ``WORKDIR/sweep.md`` and
``WORKDIR/sweep.json`` and printed.

With ``--family_dir=F`` (a ``tracer family`` workdir) the grid runs on every set
of the family, in memory: per set, checkpoint and projection dimension the
corpus and queries are projected once, then every preconditioner setting is
scored from those projections (TrackStar's score: corrected gradients, R in
R_train's eigenbasis, the task-specific mix, unit norm). Its axes, default
values first:

  checkpoint=600,200,400,sum     training steps; "sum" adds each query's
                                 scores over the listed checkpoints
                                 (TracIn-style),
  EncodeConfig.projection_dim=16384,4096,
  query_loss=target,prediction   the query gradient's loss: the target's
                                 tokens or the model's greedy prediction,
  PreconditionerConfig.kind=block,none,
  PreconditionerConfig.damping=0.1,0.01,1.0,
  PreconditionerConfig.lam=rule,0,0.1   ("rule": the lambda rule, with its
                                 cap, PreconditionerConfig.max_query_weight),
  EncodeConfig.store_dtype=bfloat16,int8,float32   the rows as a store of
                                 that dtype gives them back (int8: over
                                 R_train's column scales, tracer.store).

  tracer sweep --family_dir=family --workdir=family/sweep [--grid=...] \
      [--design=star]

``--query_set_size=n`` fits R per set of n queries (drawn at random, seed 0)
instead of from all of them: retrieval when queries come a few at a time, as
``tracer serve`` requests do (``--gin_bindings=PreconditionerConfig.
max_query_weight=...`` sets the lambda rule's cap, ``hessian.task_lambda``).
``--task_size=T`` scores each set of n under the R fitted from T other
queries instead (drawn at random for each set): requests of a few answered
under a task's R (``tracer serve --task_queries``).

``--design=star`` (the default) scores the first value of every axis and,
one axis at a time, each other value; ``grid`` every combination. An axis not
given takes its value from gin (checkpoint: the last; query loss: target).
Each set's table is written to WORKDIR/sets/NAME.json (a rerun skips sets
already done, and refuses tables scored with other settings: the flags and
``RECORDED``; sets still training are left out); WORKDIR/sweep.md holds, per
point, the mean and standard deviation across sets of MRR, recall@10 and
bucket-1 recall@10, best mean recall@10 first, and the model's greedy
accuracy per checkpoint.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import subprocess
import sys
import tempfile

from absl import app
from absl import flags
import numpy as np

from tracer.launch import common
from tracer.launch import config
from tracer.launch import quality
from tracer import checkpoint as ckpt_lib
from tracer import data as data_lib
from tracer import evaluate
from tracer import hessian
from tracer import pipeline
from tracer import projection
from tracer import stats
from tracer import storage
from tracer import store as store_lib
from tracer.config import EncodeConfig
from tracer.config import PreconditionerConfig
from tracer.errors import InputError

flags.DEFINE_multi_string("grid", [], "'Binding=v1,v2,...' (repeatable).")
flags.DEFINE_string("base_workdir", "demo", "Workdir with the checkpoint and the "
                    "fact corpus (as made by launch.demo).")
flags.DEFINE_string("family_dir", None, "A `tracer family` workdir: sweep on each "
                    "of its sets, in memory (see the module doc).")
flags.DEFINE_enum("design", "star", ["star", "grid"], "With --family_dir: every "
                  "combination of the axes (grid), or each axis varied alone "
                  "around the first values (star).")
flags.DEFINE_integer("query_set_size", 0, "With --family_dir: split each set's "
                     "queries at random into sets of this many, each scored under "
                     "the R fitted from its own queries (as `tracer serve` fits a "
                     "request's); 0: all queries one set.", lower_bound=0)
flags.DEFINE_integer("task_size", 0, "With --query_set_size: score each set "
                     "under the R fitted from this many other queries, drawn "
                     "at random (as `tracer serve --task_queries` scores "
                     "requests under a task's R); 0: the set's own.",
                     lower_bound=0)
FLAGS = config.FLAGS  # with the shared flags (--workdir, --gin_file) defined

COLUMNS = ("mrr", "recall@10", "precision@10")


def parse_grid(grid: list[str]) -> dict[str, list[str]]:
  """``["A=1,2", "B=x"]`` -> ``{"A": ["1", "2"], "B": ["x"]}``; UsageError
  for a spec without values, an axis given twice (the first was dropped, or
  two runs named by their values ran the same point), or a value twice."""
  axes = {}
  for spec in grid:
    if "=" not in spec:
      raise app.UsageError(f"--grid={spec!r}: expected 'Binding=v1,v2,...'")
    key, values = spec.split("=", 1)
    key, values = key.strip(), [v.strip() for v in values.split(",") if v.strip()]
    if not values:
      raise app.UsageError(f"--grid={spec!r}: no values; expected 'Binding=v1,v2,...'")
    if key in axes:
      raise app.UsageError(f"--grid={spec!r}: the axis {key} is given twice; "
                           "expected each axis once, with all its values")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
      raise app.UsageError(f"--grid={spec!r}: the value {repeated[0]} is given "
                           "twice; expected each value once")
    axes[key] = values
  return axes


def expand(grid: list[str]) -> list[list[str]]:
  """``["A=1,2", "B=x"]`` -> ``[["A=1", "B=x"], ["A=2", "B=x"]]``."""
  axes = [[f"{key}={v}" for v in values] for key, values in parse_grid(grid).items()]
  return [list(point) for point in itertools.product(*axes)]


def run_name(bindings: list[str]) -> str:
  """``["EncodeConfig.projection_dim=4096", "X.damping=0.1"]`` ->
  ``projection_dim=4096__damping=0.1``."""
  short = [f"{k.strip().rsplit('.', 1)[-1]}={v.strip()}"
           for k, v in (b.split("=", 1) for b in bindings)]
  return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "__".join(short)) or "base"


def run_one(run_dir: str, bindings: list[str], base_workdir: str,
            gin_files: list[str], gin_bindings: list[str] = (),
            step: int | None = None) -> dict:
  """Runs trace for one grid point, ``gin_bindings`` before its own, on step
  ``step`` of the base workdir's checkpoint (default: its latest, ``base_step``)
  unless done with the same bindings, gin files, base workdir and step
  (UsageError when done otherwise); returns its metrics."""
  step = base_step(base_workdir) if step is None else step
  metrics_path = storage.join(run_dir, "metrics.json")
  # The gin files' bytes too, with their includes': an edited file made
  # other runs under its path. The step too: a base that trained on would
  # mix two models' runs in one table.
  made_with = {"bindings": bindings, "gin_files": gin_files,
               "gin_sha256": [config.gin_sha256(g) for g in gin_files],
               "base_workdir": base_workdir, "gin_bindings": list(gin_bindings),
               "checkpoint_step": step}
  if storage.exists(metrics_path):
    # Runs from before 2026-12-07 got no --gin_bindings (they were dropped).
    metrics = {"gin_bindings": [], **storage.read_json(metrics_path)}
    # (Runs from before 2026-12-04 recorded only their bindings, from before
    # 2026-12-07 no step.)
    diffs = [f"{k} {metrics[k]}, this run {v}" for k, v in made_with.items()
             if k in metrics and metrics[k] != v]
    if diffs:
      raise app.UsageError(f"{metrics_path}: made with {'; '.join(diffs)}; use "
                           "another --workdir")
    return metrics
  storage.make_local_dirs(run_dir)
  corpus = storage.join(base_workdir, "facts", "corpus.jsonl")
  queries = storage.join(base_workdir, "facts", "queries.jsonl")
  results = storage.join(run_dir, "results.jsonl")
  cmd = [sys.executable, "-m", "tracer.launch.trace", f"--workdir={run_dir}",
         f"--checkpoint={storage.join(base_workdir, 'checkpoints', str(step))}",
         f"--corpus={corpus}", f"--queries={queries}", f"--output={results}",
         "--streaming", "--show=0"]
  if FLAGS.compilation_cache:
    cmd.append(f"--compilation_cache={FLAGS.compilation_cache}")
  cmd += [f"--gin_file={g}" for g in gin_files]
  cmd += [f"--gin_bindings={b}" for b in [*gin_bindings, *bindings]]
  log_path = storage.join(run_dir, "log.txt")
  code = _run_logged(cmd, log_path)
  if code:
    raise InputError(f"run {run_dir} failed (exit {code}); see {log_path}")
  metrics = evaluate.retrieval_metrics(data_lib.read_queries(queries),
                                       evaluate.read_results(results))
  metrics.update(made_with)
  evaluate.write_text_atomic(metrics_path, evaluate.json_text(metrics, indent=2))
  return metrics


def base_step(base_workdir: str) -> int:
  """The latest step of the base workdir's checkpoint."""
  directory = storage.join(base_workdir, "checkpoints")
  try:
    steps = ckpt_lib.saved_steps(directory)
    if not steps:
      raise InputError(f"{directory}: holds no checkpoint")
  except InputError as e:
    raise InputError(f"--base_workdir={base_workdir}: {e}; expected a workdir "
                     "with a trained model (tracer train, tracer demo)") from None
  return steps[-1]


def _run_logged(cmd: list[str], log_path: str) -> int:
  """Runs ``cmd`` with its output in ``log_path``; its exit status. A local
  log grows as the run goes; one at a URL is written whole at the end
  (object storage has no append)."""
  if not storage.is_url(log_path):
    with open(log_path, "wb") as log:
      return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
  with tempfile.TemporaryFile() as log:
    code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    log.seek(0)
    storage.write_bytes(log_path, log.read())
  return code


def check_points(points: list[list[str]], gin_files: list[str],
                 gin_bindings: list[str] = ()) -> None:
  """UsageError naming the first grid point whose gin (``gin_bindings``, then
  its own) would not parse or gives a config out of range
  (``config.check_gin``): found before any point runs, not after the points
  before it."""
  for bindings in points:
    try:
      config.check_gin(gin_files, [*gin_bindings, *bindings])
    except InputError as e:
      raise app.UsageError(f"--grid: the run {run_name(bindings)!r}: {e}") from None


def sweep(workdir: str, grid: list[str], base_workdir: str,
          gin_files: list[str], gin_bindings: list[str] = ()) -> dict:
  table = {}
  points = expand(grid)
  names = {}
  for bindings in points:
    other = names.setdefault(run_name(bindings), bindings)
    if other != bindings:
      raise app.UsageError(f"--grid: {other} and {bindings} both name the run "
                           f"{run_name(bindings)!r}; give values that differ in "
                           "letters or digits, or axes of other field names")
  check_points(points, gin_files, gin_bindings)
  # Every run scores this step, even if the base trains on meanwhile.
  step = base_step(base_workdir)
  for i, bindings in enumerate(points, 1):
    name = run_name(bindings)
    print(f"[{i}/{len(points)}] {name}", flush=True)
    table[name] = run_one(storage.join(workdir, "runs", name), bindings,
                          base_workdir, gin_files, gin_bindings, step)
  text = evaluate.format_table(table, COLUMNS, row_header="run")
  evaluate.write_text_atomic(storage.join(workdir, "sweep.md"), text + "\n")
  evaluate.write_text_atomic(storage.join(workdir, "sweep.json"),
                             evaluate.json_text(table, indent=2))
  print(text)
  return table


# --- on a family, in memory --------------------------------------------------

# The first value of each axis is the star design's centre (tiny.gin's).
FAMILY_GRID = ("checkpoint=600,200,400,sum",
               "EncodeConfig.projection_dim=16384,4096",
               "query_loss=target,prediction",
               "PreconditionerConfig.kind=block,none",
               "PreconditionerConfig.damping=0.1,0.01,1.0",
               "PreconditionerConfig.lam=rule,0,0.1",
               "EncodeConfig.store_dtype=bfloat16,int8,float32")
FAMILY_AXES = tuple(spec.split("=", 1)[0] for spec in FAMILY_GRID)
FAMILY_COLUMNS = ("mrr", "recall@10", "recall@10 b1")


def family_axes(grid: list[str], ecfg, pcfg) -> dict[str, list[str]]:
  """Each family axis's values: from ``--grid``, else one value from gin."""
  axes = {"checkpoint": ["last"], "EncodeConfig.projection_dim": [str(ecfg.projection_dim)],
          "query_loss": ["target"], "PreconditionerConfig.kind": [pcfg.kind],
          "PreconditionerConfig.damping": [str(pcfg.damping)],
          "PreconditionerConfig.lam": ["rule" if pcfg.lam is None else str(pcfg.lam)],
          "EncodeConfig.store_dtype": [ecfg.store_dtype]}
  unknown = [spec for spec in grid if spec.split("=", 1)[0].strip() not in FAMILY_AXES]
  if unknown:
    raise app.UsageError(f"--grid={unknown[0]!r}: with --family_dir the axes are "
                         f"{', '.join(FAMILY_AXES)}")
  axes.update(parse_grid(grid))
  # Every value is checked here, not after the projections it follows.
  for key, ok, want in (
      ("checkpoint", lambda v: re.fullmatch("[0-9]+", v) or v in ("last", "sum"),
       "a training step, last or sum"),
      ("EncodeConfig.projection_dim", lambda v: v.isdigit() and int(v) > 0,
       "a positive integer"),
      ("PreconditionerConfig.damping", _is_number, "a number"),
      ("PreconditionerConfig.lam", lambda v: v == "rule" or _is_number(v),
       "rule or a number")):
    wrong = [v for v in axes[key] if not ok(v)]
    if wrong:
      raise app.UsageError(f"--grid: {key}={','.join(wrong)}: expected {want}")
  # Step directories are named without leading zeros: checkpoint=600,0600
  # would score step 600 twice, 0600 alone no step (tracer.checkpoint.step_of).
  padded = [v for v in axes["checkpoint"] if v[0] == "0" and v != "0"]
  if padded:
    raise app.UsageError(f"--grid: checkpoint={padded[0]}: a step with leading "
                         f"zeros; expected {int(padded[0])} (step directories "
                         "are named without them)")
  # And against the ranges gin's own bindings are held to (config.check_fields).
  for key, cfg, cast in (("EncodeConfig.projection_dim", ecfg, int),
                         ("PreconditionerConfig.damping", pcfg, float),
                         ("PreconditionerConfig.lam", pcfg, float)):
    for v in axes[key]:
      if v != "rule":
        try:
          config.check_fields(dataclasses.replace(cfg, **{key.split(".")[1]: cast(v)}))
        except InputError as e:
          raise app.UsageError(f"--grid: {key}={v}: "
                               f"{re.sub(r'^gin: [^ ]+ = [^ ]+: ', '', str(e))}") from None
  if axes["checkpoint"] == ["sum"]:
    raise app.UsageError("--grid=checkpoint=sum: the sum adds the scores of "
                         "the other checkpoints listed, and none is; expected "
                         "some, e.g. checkpoint=50,100,sum")
  bad = [v for v in axes["query_loss"] if v not in ("target", "prediction")]
  bad += [v for v in axes["PreconditionerConfig.kind"] if v not in ("block", "none")]
  bad += [v for v in axes["EncodeConfig.store_dtype"] if v not in store_lib.DTYPES]
  if bad:
    raise app.UsageError(f"--grid: unknown value(s) {bad}; query_loss is target "
                         "or prediction, kind block or none (full R is too slow "
                         f"to sweep), store_dtype one of {sorted(store_lib.DTYPES)}")
  return axes


def _is_number(text: str) -> bool:
  try:
    return np.isfinite(float(text))
  except ValueError:
    return False


def _top_ids(scores: np.ndarray, ids: list[str], k: int) -> list[list[str]]:
  """Each query's k best rows' ids; ``scores`` is [N, Q]."""
  top = np.argsort(-scores, axis=0, kind="stable")[:k]
  return [[ids[r] for r in top[:, q]] for q in range(scores.shape[1])]


def _point_metrics(queries, ids, scores, k=10) -> dict:
  results = {q["id"]: {"proponent_ids": p}
             for q, p in zip(queries, _top_ids(scores, ids, k))}
  m = evaluate.retrieval_metrics(queries, results, k=k)
  return {"mrr": m["mrr"], f"recall@{k}": m[f"recall@{k}"],
          f"recall@{k} b1": m["buckets"].get("1", {}).get(f"recall@{k}")}


def _scores(metric, psi_c, psi_q) -> np.ndarray:
  """TrackStar's scores [N, Q]: ``(psi_c R^-1 psi_q) / (|psi_c|_R |psi_q|_R)``."""
  rows = psi_c / np.maximum(metric.norms(psi_c), 1e-30)[:, None]
  return (rows @ metric.query_vectors(psi_q).T.astype(np.float64)).astype(np.float32)


Point = tuple[str, str, str, str, str, str, str]  # a value per axis, FAMILY_AXES order


def family_points(axes: dict[str, list[str]], design: str) -> list[Point]:
  """The grid points: every combination (``grid``), or the first value of each
  axis and, one axis at a time, each of its other values (``star``)."""
  values = [axes[a] for a in FAMILY_AXES]
  if design == "grid":
    points = list(itertools.product(*values))
  else:
    base = tuple(v[0] for v in values)
    # Damping and lambda vary about an R that has them: with a centre of no
    # R, about the first kind that is one (else their values were dropped).
    kinds = [k for k in values[3] if k != "none"]
    with_r = base[:3] + (kinds[0],) + base[4:] if kinds else base
    points = [base] + [(with_r if i in (4, 5) else base)[:i] + (v,)
                       + (with_r if i in (4, 5) else base)[i + 1:]
                       for i, vs in enumerate(values) for v in vs[1:]]
  # With no R, damping and lambda mean nothing: one point stands for them all.
  return list(dict.fromkeys(p[:4] + (("-", "-") if p[3] == "none" else p[4:6])
                            + p[6:] for p in points))


def _set_scores(fit, stored, psi_q, size: int, seed: int = 0,
                task_size: int = 0) -> np.ndarray:
  """``_scores`` [N, Q] with the queries split at random into sets of ``size``
  (0: one set), each under the metric ``fit`` makes from its own rows, or
  with ``task_size`` from that many other queries' (drawn at random for
  each set)."""
  if not size or size >= len(psi_q):
    if task_size:  # (its R was the set's own, recorded as a task's)
      raise InputError(f"--task_size={task_size} with query sets of {size or 'all'} "
                       f"of {len(psi_q)} queries: no other queries to fit a "
                       "task's R from; expected --query_set_size below the "
                       "queries' count")
    return _scores(fit(psi_q), stored, psi_q)
  out = np.zeros((len(stored), len(psi_q)), np.float32)
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(psi_q))
  for lo in range(0, len(order), size):
    part = order[lo:lo + size]
    if task_size:
      rest = np.setdiff1d(order, part)
      fitted = fit(psi_q[rng.choice(rest, min(task_size, len(rest)), replace=False)])
    else:
      fitted = fit(psi_q[part])
    out[:, part] = _scores(fitted, stored, psi_q[part])
  return out


def sweep_set(set_dir: str, points: list[Point], ecfg, pcfg,
              query_set_size: int = 0, task_size: int = 0) -> dict:
  """Every point's metrics on one family set (module doc)."""
  corpus_path = storage.join(set_dir, "facts", "corpus.jsonl")
  queries_path = storage.join(set_dir, "facts", "queries.jsonl")
  ckpt_dir = storage.join(set_dir, "checkpoints")
  saved = ckpt_lib.saved_steps(ckpt_dir)
  step_of = lambda s: str(saved[-1]) if s == "last" else s
  summed_steps = sorted({step_of(p[0]) for p in points if p[0] != "sum"}, key=int)
  # A "sum" point adds the same settings' scores over every listed checkpoint.
  wanted = [p for p in points if p[0] != "sum"] + [
      (step,) + p[1:] for p in points if p[0] == "sum" for step in summed_steps]
  wanted = list(dict.fromkeys((step_of(p[0]),) + p[1:] for p in wanted))
  mesh = pipeline.make_mesh(ecfg)
  scores, accuracy = {}, {}
  for step in sorted({p[0] for p in wanted}, key=int):
    ckpt = pipeline.load_checkpoint(None, storage.join(ckpt_dir, step), mesh,
                                    "second_moment")
    # R's memory at each of the grid's dims, before any gradient: the params'
    # shapes alone give a dim's blocks (an unprojected block is a whole matrix).
    for dim, kind in sorted({(p[1], p[3]) for p in wanted}):
      pipeline.check_fit_memory(
          projection.make_layout(ckpt.params, int(dim), ecfg.seed), kind)
    corpus = pipeline.open_corpus(ckpt, corpus_path)
    ids = corpus.ids_of(np.arange(len(corpus)))
    queries, target_examples = pipeline.read_queries(ckpt, queries_path)
    vocab = pipeline.data_config(ckpt).vocabulary()
    preds = pipeline.predictions(ckpt, target_examples, queries, vocab, mesh=mesh)
    accuracy[step] = pipeline.completion_accuracy(queries, preds)
    # An empty prediction (EOS first) keeps the target: no tokens, no loss.
    asked = [{**q, "target": p if p.strip() else q["target"]}
             for q, p in zip(queries, preds)]
    examples = {"target": target_examples, "prediction": lambda: data_lib.query_examples(
        asked, vocab, ckpt.family.max_len(ckpt.model_config), queries_path)}
    for dim in sorted({p[1] for p in wanted if p[0] == step}, key=int):
      encoder = pipeline.build_encoder(
          ckpt, dataclasses.replace(ecfg, projection_dim=int(dim)), mesh)[0]
      rows = quality.project_corpus(encoder, corpus, ecfg.batch_size)
      cache = {}

      def basis_of(kind):
        if kind not in cache:
          sample = pipeline.sample_rows(len(rows), pcfg.train_examples, pcfg.sample_seed)
          basis = hessian.fit_basis(
              quality.moments(encoder, rows[sample], kind), dim=encoder.dim,
              layout_seed=encoder.layout.seed, kind=kind)
          cache[kind] = (basis, np.asarray(basis.rotate(rows), np.float64))
        return cache[kind]

      for loss in sorted({p[2] for p in wanted if p[:2] == (step, dim)}):
        ex = examples[loss]() if callable(examples[loss]) else examples[loss]
        q_rows = quality.project_examples(encoder, ex, ecfg.batch_size)
        for point in [p for p in wanted if p[:3] == (step, dim, loss)]:
          kind, damping, lam, dtype = point[3:]
          if kind == "none":
            pc, pq, columns = rows, q_rows, None
            fit = lambda _, d=rows.shape[1]: hessian.identity_metric(d)
          else:
            basis, pc = basis_of(kind)
            pq = np.asarray(basis.rotate(q_rows), np.float64)
            mix = {**pcfg.mix(), "damping": float(damping),
                   "lam": None if lam == "rule" else float(lam)}
            # task_specific=False: R_train alone, whatever the queries (before
            # 2026-12-07 ignored here: every point mixed in R_eval).
            fit = lambda q, b=basis, m=mix: hessian.fit_metric(
                b, q if pcfg.task_specific else None, **m)
            columns = basis.column_scales()
          scores[point] = _set_scores(fit, _stored(pc, dtype, columns), pq,
                                      query_set_size, task_size=task_size)
  out = {}
  for point in points:
    if point[0] == "sum":
      total = sum(scores[(step,) + point[1:]] for step in summed_steps)
      out[_point_name(*point)] = _point_metrics(queries, ids, total)
    else:
      out[_point_name(*point)] = _point_metrics(
          queries, ids, scores[(step_of(point[0]),) + point[1:]])
  return {"points": out, "accuracy": accuracy, "query_set_size": query_set_size,
          "task_size": task_size if query_set_size else 0,
          "max_query_weight": pcfg.max_query_weight,
          "settings": run_settings(ecfg, pcfg, query_set_size, task_size)}


def _stored(rows: np.ndarray, dtype: str, columns: np.ndarray | None) -> np.ndarray:
  """``rows`` (the encoder's f32) as a store of ``dtype`` (int8: over
  ``columns``) gives them back."""
  columns = columns if dtype == "int8" else None
  return store_lib.stored_values(*store_lib.stored_rows(
      np.asarray(rows, np.float32), dtype, columns), columns)


def _point_name(step, dim, loss, kind, damping, lam, dtype) -> str:
  tail = "" if kind == "none" else f" damping={damping} lam={lam}"
  return f"ckpt={step} d={dim} loss={loss} R={kind}{tail} store={dtype}"


# What a set's table depends on beyond its grid point, recorded in it: a rerun
# into the same --workdir must match (kernel, batch and mesh settings do not
# change the scores).
RECORDED = ("EncodeConfig.seed", "EncodeConfig.correction", "EncodeConfig.epsilon",
            "EncodeConfig.rank_one_correction", "EncodeConfig.projection_precision",
            "PreconditionerConfig.train_examples", "PreconditionerConfig.sample_seed",
            "PreconditionerConfig.rank", "PreconditionerConfig.max_query_weight",
            "PreconditionerConfig.task_specific")


def run_settings(ecfg, pcfg, query_set_size: int, task_size: int) -> dict:
  """The settings a set's table records (``RECORDED``, and the flags)."""
  configs = {"EncodeConfig": ecfg, "PreconditionerConfig": pcfg}
  return {"--query_set_size": query_set_size,
          "--task_size": task_size if query_set_size else 0,
          **{name: getattr(configs[name.split(".")[0]], name.split(".")[1])
             for name in RECORDED}}


def table_settings(table: dict) -> dict:
  """The settings a set's table was scored with. Tables from before a setting
  was recorded were made without it (0: all queries one set, no task; None:
  the rule uncapped; task-specific R, before 2026-12-07 the only one);
  ``RECORDED`` beyond these, from before 2026-12-04, are unknown and not
  compared."""
  return {"--query_set_size": table.get("query_set_size", 0),
          "--task_size": table.get("task_size", 0),
          "PreconditionerConfig.max_query_weight": table.get("max_query_weight"),
          "PreconditionerConfig.task_specific": True,
          **table.get("settings", {})}


def trained(set_dir: str) -> bool:
  """Whether the set's training run reached its last step (read from its
  latest checkpoint's config, not its arrays)."""
  return ckpt_lib.finished(storage.join(set_dir, "checkpoints"))


def sweep_family(workdir: str, family_dir: str, grid: list[str],
                 design: str = "star", query_set_size: int = 0,
                 task_size: int = 0) -> dict:
  ecfg, pcfg = config.make(EncodeConfig), config.make(PreconditionerConfig)
  if task_size and query_set_size and not pcfg.task_specific:
    raise app.UsageError(f"--task_size={task_size} with PreconditionerConfig."
                         "task_specific=False: R_train alone takes no task's "
                         "queries; expected task_specific=True or no --task_size")
  axes = family_axes(grid, ecfg, pcfg)
  points = family_points(axes, design)
  sets_dir = storage.join(family_dir, "sets")
  # Keys NAME/checkpoints/... (a listing of every key: object storage has no
  # folders to ask for).
  names = sorted({key.split("/")[0] for key in storage.list_dir(sets_dir)
                  if key.split("/")[1:2] == ["checkpoints"]})
  if not names:
    raise app.UsageError(f"--family_dir={family_dir}: no sets/NAME/checkpoints; "
                         "make them with `tracer family --only_train`")
  # Every step asked is one each set to score saved: checked here, not after
  # the steps and sets before it are projected (before 2026-12-07).
  steps = [int(v) for v in axes["checkpoint"] if v.isdigit()]
  for name in names:
    if (not storage.exists(storage.join(workdir, "sets", f"{name}.json"))
        and trained(storage.join(sets_dir, name))):
      # A gin binding naming another model, data or optimizer than the set
      # was trained with would be ignored (the checkpoint's configs win):
      # refused, as tracer quality refuses it (before 2026-12-08 ignored).
      common.check_bound_configs(ckpt_lib.saved_config(
          storage.join(sets_dir, name, "checkpoints")))
    if (steps and not storage.exists(storage.join(workdir, "sets", f"{name}.json"))
        and trained(storage.join(sets_dir, name))):
      try:
        ckpt_lib.check_steps(storage.join(sets_dir, name, "checkpoints"), steps)
      except InputError as e:
        raise app.UsageError(f"--grid: checkpoint: {e}; expected steps every "
                             "set saved") from None
  per_set = {}
  want = run_settings(ecfg, pcfg, query_set_size, task_size)
  wanted_points = [_point_name(*p) for p in points]
  for i, name in enumerate(names, 1):
    out = storage.join(workdir, "sets", f"{name}.json")
    if storage.exists(out):
      per_set[name] = storage.read_json(out)
      have = table_settings(per_set[name])
      diffs = [f"{k}={have[k]}, this run {want[k]}" for k in have if have[k] != want[k]]
      missing = sorted(set(wanted_points) - set(per_set[name]["points"]))
      if missing:
        diffs.append(f"other grid points (not {missing[0]}"
                     f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''})")
      if diffs:
        raise app.UsageError(f"{out}: scored with {'; '.join(diffs)}; use "
                             "another --workdir")
      continue
    if not trained(storage.join(sets_dir, name)):
      print(f"[{i}/{len(names)}] {name}: still training, left out", flush=True)
      continue
    print(f"[{i}/{len(names)}] {name}", flush=True)
    per_set[name] = sweep_set(storage.join(sets_dir, name), points, ecfg, pcfg,
                              query_set_size, task_size)
    evaluate.write_text_atomic(out, evaluate.json_text(per_set[name], indent=1))
  if not per_set:
    raise app.UsageError(f"--family_dir={family_dir}: no set has finished training")
  names = sorted(per_set)
  table = {}
  for point in wanted_points:
    table[point] = {}
    for c in FAMILY_COLUMNS:  # (None: a set without bucket 1, or no queries)
      values = [s["points"][point][c] for s in per_set.values()
                if s["points"][point][c] is not None]
      table[point][c] = stats.mean_std(values) if values else None
  order = sorted(table, key=lambda p: -(table[p]["recall@10"] or {"mean": 0})["mean"])
  cells = {p: {c: "–" if table[p][c] is None else stats.format_cell(table[p][c])
               for c in FAMILY_COLUMNS} for p in order}
  text = evaluate.format_table(cells, FAMILY_COLUMNS, row_header="grid point")
  accuracy = {n: {step: a["all"]["accuracy"] for step, a in s["accuracy"].items()}
              for n, s in per_set.items()}
  acc_cells = {n: {f"step {step}": f"{v:.3f}" for step, v in a.items()}
               for n, a in accuracy.items()}
  acc_text = evaluate.format_table(acc_cells, list(next(iter(acc_cells.values()))),
                                   row_header="set: greedy accuracy")
  summary = {"sets": names, "axes": axes, "design": design, "points": table,
             "accuracy": accuracy, "query_set_size": query_set_size,
             "task_size": task_size if query_set_size else 0,
             "max_query_weight": pcfg.max_query_weight, "settings": want}
  whose = f"the R of {task_size} other queries" if task_size else "its own R"
  sizes = (f"; queries in sets of {query_set_size}, each under {whose} "
           f"(max_query_weight={pcfg.max_query_weight})" if query_set_size else "")
  evaluate.write_text_atomic(storage.join(workdir, "sweep.json"),
                             evaluate.json_text(summary, indent=1))
  settings = "; ".join(f"{k.split('.')[-1]}={v}" for k, v in want.items()
                       if k in RECORDED)
  evaluate.write_text_atomic(storage.join(workdir, "sweep.md"),
                             f"{len(names)} sets{sizes}\n\nsettings: {settings}\n\n"
                             f"{text}\n\n{acc_text}\n")
  print(f"{len(names)} sets: {', '.join(names)}{sizes}\n\n{text}\n\n{acc_text}")
  return summary


def main(argv):
  del argv
  config.use_compilation_cache()  # sweep_family compiles here; run_one passes the flag on
  if FLAGS.family_dir:
    config.default_gin_file()
    config.parse_gin()
    sweep_family(FLAGS.workdir or storage.join(FLAGS.family_dir, "sweep"),
                 FLAGS.family_dir, FLAGS.grid or list(FAMILY_GRID), FLAGS.design,
                 FLAGS.query_set_size, FLAGS.task_size)
    return
  only_family = [f"--{n}" for n in ("design", "query_set_size", "task_size")
                 if FLAGS[n].present]
  if only_family:
    it = "it" if len(only_family) == 1 else "them"
    raise app.UsageError(f"{', '.join(only_family)}: only with --family_dir; "
                         f"a sweep of --base_workdir's runs would ignore {it}")
  if not FLAGS.workdir or not FLAGS.grid:
    raise app.UsageError("--workdir and at least one --grid are required")
  gin_files = FLAGS.gin_file or ["configs/tiny.gin"]
  # (Before 2026-12-07 --gin_bindings reached no run, silently.)
  sweep(FLAGS.workdir, FLAGS.grid, FLAGS.base_workdir, gin_files, FLAGS.gin_bindings)


USES = ("workdir",)


if __name__ == "__main__":
  config.run(main, uses=USES)
