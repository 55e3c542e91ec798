r"""The quality table: every method on the generated facts with the tiny model.

  tracer quality --workdir=quality

Generates the fact corpus and trains the tiny model when the workdir has no
checkpoint (as the demo does), then scores every method over the whole corpus:

  bm25, random,
  grad_dot          projected gradients, dot product (no correction, R, norm),
  grad_cosine       the same, unit-normalized,
  trak              projected gradients with R_train^-1, no correction, no norm,
  ablations adding TrackStar's components one at a time:
  +opt_correction   grad_dot with the optimizer second-moment correction,
  +unit_norm        ... and unit norm,
  +R_train          ... and R_train^(-1/2),
  trackstar         ... and the task-specific mix of R_eval (full TrackStar).

Writes WORKDIR/quality/{METHOD}.jsonl (results, with each tail-patched
proponent's delta in ``proponent_tail_patch``), quality.json (metrics incl.
tail-patch@k, each query's tail-patch@10 per method, TrackStar's paired
difference against each method, and tail-patch by what the proponents are:
the fact's own documents, others naming its object or its subject, or
neither), quality.md (those tables), the plots (retrieval.png,
tail_patch.png) and quality.html (every method side by side: ``tracer view``;
not report.html, the demo's page in a shared workdir), and prints the tables. ``--checkpoint`` scores one step of the run instead
of its last. ``--sum_steps=200,400`` adds ``trackstar_sum``: TrackStar's
scores summed over those checkpoints of the same run and the scored one
(TracIn-style; each step's rows and queries encoded, R fitted and normalized
at that step), tail-patched on the scored checkpoint like every method.
``tracer family`` runs this on every set of a benchmark family.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from tracer.launch import common
from tracer.launch import config
from tracer.launch import demo
from tracer import bm25
from tracer import data as data_lib
from tracer import evaluate
from tracer import hessian
from tracer import partitioning
from tracer import pipeline
from tracer import plots
from tracer import scan as scan_lib
from tracer import stats
from tracer import storage
from tracer import tailpatch
from tracer import unit_normalize
from tracer import viewer
from tracer.config import ENCODING_SETTINGS
from tracer.config import PreconditionerConfig
from tracer.errors import InputError

flags.DEFINE_integer("tail_patch_queries", 0, "Queries used for tail-patch, "
                     "evenly over the buckets (0: all).", lower_bound=0)
flags.DEFINE_float("sgd_learning_rate", None, "Tail-patch with plain SGD at this "
                   "rate instead of the checkpoint's optimizer at its final rate.")
FLAGS = flags.FLAGS

SUM_METHOD = "trackstar_sum"
METHODS = ("bm25", "random", "grad_dot", "grad_cosine", "trak", "+opt_correction",
           "+unit_norm", "+R_train", "trackstar")
TABLE_K = 10  # the cut-off of the table's recall, precision and last tail-patch
COLUMNS = ("mrr", "recall@10", "precision@10", "tail_patch@1", "tail_patch@3",
           "tail_patch@5", "tail_patch@10", "tail_patch@10_se")


def project_corpus(encoder, corpus, batch_size) -> np.ndarray:
  """Unnormalized projected gradients of every corpus row: f32[N, d]."""
  progress = common.Progress("project corpus")
  pieces = []
  for rows in data_lib.batches(len(corpus), batch_size):
    pieces.append(partitioning.fetch(encoder.project(corpus.examples(rows))))
    progress(int(rows[-1]) + 1, len(corpus))
  return np.concatenate(pieces)


def project_examples(encoder, examples, batch_size) -> np.ndarray:
  """Unnormalized projected gradients of stacked examples: f32[Q, d]."""
  return np.concatenate([partitioning.fetch(encoder.project(b)) for b in
                         pipeline.example_slices(examples, batch_size)])


def projected(encoder, corpus, query_examples, batch_size):
  """Unnormalized projected gradients of every corpus row and every query."""
  return (project_corpus(encoder, corpus, batch_size),
          project_examples(encoder, query_examples, batch_size))


def moments(encoder, x, kind, batch_size=512):
  pipeline.check_fit_memory(encoder.layout, kind)
  m = hessian.init_moments(encoder.layout, kind)
  for lo in range(0, len(x), batch_size):
    m = hessian.accumulate(m, x[lo:lo + batch_size])
  return m


def in_train_basis(corrected, encoder, pcfg):
  """R_train's basis fitted on the corpus sample, and the corrected rows and
  queries ``(f32[N, d], f32[Q, d])`` rotated into it (the store's path)."""
  cor_c, cor_q = corrected
  rows = pipeline.sample_rows(len(cor_c), pcfg.train_examples, pcfg.sample_seed)
  basis = hessian.fit_basis(moments(encoder, cor_c[rows], pcfg.kind),
                            dim=encoder.dim, layout_seed=encoder.layout.seed,
                            kind=pcfg.kind)
  return basis, np.asarray(basis.rotate(cor_c)), np.asarray(basis.rotate(cor_q))


def method_encodings(raw, corrected, encoder, pcfg):
  """(corpus rows, queries, query metric or None) per gradient-based method.

  +R_train and trackstar go through the store's path: rows in R_train's
  eigenbasis, the query set's R applied at scan time (``tracer.hessian``).
  """
  (raw_c, raw_q), (cor_c, cor_q) = raw, corrected
  norm = lambda x: np.asarray(unit_normalize(x))
  rows = pipeline.sample_rows(len(cor_c), pcfg.train_examples, pcfg.sample_seed)
  basis, psi_c, psi_q = in_train_basis(corrected, encoder, pcfg)
  # TRAK: phi_m^T R^-1 phi_q = (R^-1/2 phi_m) . (R^-1/2 phi_q), unnormalized.
  r_raw = hessian.fit(moments(encoder, raw_c[rows], pcfg.kind), kind=pcfg.kind,
                      dim=encoder.dim, layout_seed=encoder.layout.seed,
                      **pcfg.mix())
  r_train = hessian.fit_metric(basis, None, **pcfg.mix())
  r_mix = hessian.fit_metric(basis, psi_q, **pcfg.mix())
  print(f"lambda (task-specific mix) = {r_mix.lam:.4g}; R from "
        f"{basis.num_train} corpus rows, {r_mix.num_eval} queries, d={encoder.dim}")
  apply = lambda pre, x: np.asarray(pre.apply(x))
  return {
      "grad_dot": (raw_c, raw_q, None),
      "grad_cosine": (norm(raw_c), norm(raw_q), None),
      "trak": (apply(r_raw, raw_c), apply(r_raw, raw_q), None),
      "+opt_correction": (cor_c, cor_q, None),
      "+unit_norm": (norm(cor_c), norm(cor_q), None),
      "+R_train": (psi_c, r_train.query_vectors(psi_q), r_train),
      "trackstar": (psi_c, r_mix.query_vectors(psi_q), r_mix),
  }, r_mix.lam


def trackstar_at(corrected, encoder, pcfg) -> tuple[np.ndarray, np.ndarray]:
  """TrackStar's rows and queries at one checkpoint, both normalized, so that
  their dot product is its score: (f32[N, d], f32[Q, d])."""
  basis, psi_c, psi_q = in_train_basis(corrected, encoder, pcfg)
  metric = hessian.fit_metric(basis, psi_q, **pcfg.mix())
  return normalized(psi_c, metric.query_vectors(psi_q), metric)


def normalized(rows, queries, metric):
  """Rows divided by their norm under ``metric`` (as the scan divides their
  scores), and the queries as they are."""
  norms = np.maximum(metric.norms(rows), np.finfo(np.float32).tiny)
  return (rows / norms[:, None]).astype(np.float32), queries


def summed_encodings(ckpt, ecfg, encoder, corpus, query_examples, trackstar,
                     steps, pcfg):
  """``SUM_METHOD``'s rows and queries: TrackStar at ``ckpt`` (``trackstar``,
  its ``method_encodings`` entry) and at each of ``steps`` (checkpoints of the
  same run), side by side, so that one dot product is the sum of the steps'
  scores: (f32[N, S d], f32[Q, S d])."""
  parent = storage.split(ckpt.path)[0]
  parts = [normalized(*trackstar)]
  for step in steps:
    other = pipeline.load_checkpoint(None, storage.join(parent, str(int(step))),
                                     encoder.mesh, "second_moment")
    other_encoder, _, _ = pipeline.build_encoder(other, ecfg, encoder.mesh)
    parts.append(trackstar_at(projected(other_encoder, corpus, query_examples,
                                        ecfg.batch_size), other_encoder, pcfg))
  return (np.concatenate([c for c, _ in parts], axis=1),
          np.concatenate([q for _, q in parts], axis=1))


STEP_PREDICTOR = "first-order tail-patch step"


def step_predictor(ckpt, ecfg, encoder, corpus, query_examples, raw,
                   sgd_learning_rate: float | None):
  """What one tail-patch step on a row does to log p(target | query), to
  first order and up to the terms every row shares (momentum, weight decay):
  ``g_q . V^(-1/2) clip(g_x)`` for the checkpoint's Adam(W) (clipped to the
  optimizer's global norm, V frozen), ``g_q . g_x`` for plain SGD. As rows and
  queries whose dot product is that score (projected: ``V^(-1/4) g`` on both
  sides, the row scaled by its clip factor, from the raw projection's norm),
  with no metric; None for other optimizers."""
  raw_c, raw_q = raw
  if sgd_learning_rate is not None:
    return raw_c, raw_q, None
  config = ckpt.optimizer_config
  if config.name != "adamw" or ckpt.opt_state is None:
    return None
  v = jax.tree.map(jnp.sqrt, pipeline.optimizer_second_moment(ckpt))
  quarter, _, _ = pipeline.build_encoder(
      ckpt, dataclasses.replace(ecfg, correction="optimizer",
                                epsilon=float(np.sqrt(config.eps))),
      mesh=encoder.mesh, v=v)
  rows, queries = projected(quarter, corpus, query_examples, ecfg.batch_size)
  clip = np.minimum(1.0, config.clip_norm / np.maximum(
      np.linalg.norm(raw_c, axis=1), np.finfo(np.float32).tiny))
  return (rows * clip[:, None]).astype(np.float32), queries, None


def random_topk(num_rows, num_queries, k, seed=0) -> scan_lib.TopK:
  """k random proponents and k random opponents a query (k <= num_rows):
  apart where 2k rows allow, else the opponents are the last k of the
  permutation (before, only num_rows - k of them, and the results' rows
  failed after every method was scored)."""
  rng = np.random.default_rng(seed)
  rows = np.stack([rng.permutation(num_rows) for _ in range(num_queries)])
  scores = np.zeros((num_queries, k), np.float32)
  first = min(k, num_rows - k)
  return scan_lib.TopK(rows[:, :k], scores, rows[:, first:first + k], scores)


def bm25_topk(corpus, queries, k) -> scan_lib.TopK:
  index = bm25.BM25Index(corpus.texts_of(np.arange(len(corpus))))
  texts = [bm25.query_text(q) for q in queries]
  prop_rows, prop_scores = index.search(texts, k)
  opp_rows, opp_scores = index.search(texts, k, lowest=True)
  # Past a query's matching documents: the scan's padding.
  missing = prop_rows < 0
  prop_rows = np.where(missing, scan_lib.INVALID_ROW, prop_rows)
  prop_scores = np.where(missing, -np.inf, prop_scores).astype(np.float32)
  return scan_lib.TopK(prop_rows, prop_scores, opp_rows, opp_scores)


def settings(ecfg, pcfg) -> dict:
  """The settings a report's scores depend on, as its JSON holds them: the
  encoding's (``ENCODING_SETTINGS``; not batch sizes or the mesh) and R's."""
  return json.loads(json.dumps({
      "EncodeConfig": {k: getattr(ecfg, k) for k in ENCODING_SETTINGS},
      "PreconditionerConfig": dataclasses.asdict(pcfg)}))


def tail_patch_queries(queries, count) -> np.ndarray:
  """Indices of ``count`` queries spread evenly over the buckets (0: all):
  a query of each bucket in turn (``evaluate.bucket_sort_key`` order), each
  bucket's first ones first, a bucket out of queries skipped. Before, the
  buckets were taken in string order ("11+" before "2-3") and the last cut
  off, and a small bucket's shortfall was not made up."""
  if count <= 0 or count >= len(queries):
    return np.arange(len(queries))
  by_bucket: dict[str, list[int]] = {}
  for i, q in enumerate(queries):
    by_bucket.setdefault(q.get("bucket", ""), []).append(i)
  lists = [by_bucket[b] for b in sorted(by_bucket, key=evaluate.bucket_sort_key)]
  turns = [b[r] for r in range(max(map(len, lists))) for b in lists if r < len(b)]
  return np.sort(np.asarray(turns[:count]))


def paired_tail_patch(per_method: np.ndarray, k: int,
                      methods=METHODS) -> tuple[dict, dict]:
  """Each method's per-query tail-patch@k (lists, NaN where a query has no
  proponent) and TrackStar's paired difference against every other method.

  Args:
    per_method: f32[M, C, K], the deltas of each method's proponents
      (``methods`` order) for the C tail-patched queries.
  """
  with warnings.catch_warnings():  # a query with no proponent: NaN, no warning
    warnings.simplefilter("ignore", RuntimeWarning)
    per_query = np.nanmean(tailpatch.finite_or_nan(per_method[:, :, :k]), axis=2)  # [M, C]
  ref = per_query[list(methods).index("trackstar")]
  paired = {name: stats.paired(ref, values)
            for name, values in zip(methods, per_query) if name != "trackstar"}
  paired = {name: p for name, p in paired.items() if p["n"] > 1}
  lists = {name: [None if np.isnan(v) else float(v) for v in values]
           for name, values in zip(methods, per_query)}
  return lists, paired


# What a proponent is to its query: a row stating the query's fact, else one
# naming its object, else one naming its subject, else neither.
KINDS = ("fact", "same object", "same subject", "other")


def pair_kinds(queries, corpus, pairs: np.ndarray) -> np.ndarray | None:
  """Each (query index, row) pair's index in ``KINDS``: i32[P]; None when the
  queries do not name their ``subject`` and ``object`` (not fact queries)."""
  if not all("subject" in q and "object" in q for q in queries):
    return None
  rows = np.unique(pairs[:, 1])
  ids = dict(zip(rows.tolist(), corpus.ids_of(rows)))
  words = {r: set(re.findall(r"[A-Za-z]+", t))
           for r, t in zip(rows.tolist(), corpus.texts_of(rows))}
  kinds = np.empty(len(pairs), np.int32)
  for i, (qi, row) in enumerate(pairs.tolist()):
    q = queries[qi]
    kinds[i] = (0 if ids[row] in set(q.get("fact_doc_ids", ())) else
                1 if q["object"] in words[row] else
                2 if set(q["subject"].split()) <= words[row] else 3)
  return kinds


def influence_by_kind(kinds: np.ndarray, deltas: np.ndarray, inverse: np.ndarray,
                      k: int, methods=METHODS) -> dict:
  """Tail-patch explained by what proponents are (``KINDS``).

  Args:
    kinds, deltas: i32[P], f32[P] per distinct (query, row) pair.
    inverse: i64[M, C, K], each method's proponent's pair index for the C
      tail-patched queries, -1 where it has fewer than K proponents (shares
      count its proponents only).

  Returns:
    ``{"mean_delta": {kind: mean over pairs}, "pairs": {kind: count},
    "share@k": {method: {kind: fraction of its top-k proponents}}}``: a
    method's tail-patch@k is about the sum over kinds of share x mean delta.
  """
  ok = ~np.isnan(deltas)
  out = {"mean_delta": {}, "pairs": {}, f"share@{k}": {}}
  for i, kind in enumerate(KINDS):
    sel = ok & (kinds == i)
    out["pairs"][kind] = int(sel.sum())
    out["mean_delta"][kind] = float(deltas[sel].mean()) if sel.any() else None
  per_method = np.where(inverse >= 0, kinds[np.maximum(inverse, 0)], -1)[:, :, :k]
  for name, m in zip(methods, per_method):
    listed = max(int(np.sum(m >= 0)), 1)
    out[f"share@{k}"][name] = {kind: float(np.sum(m == i) / listed)
                               for i, kind in enumerate(KINDS)}
  return out


def pair_scores(encodings: dict, pairs: np.ndarray, batch: int = 256) -> dict:
  """Each gradient method's score of each (query index, row) pair: f64[P]
  (``method_encodings``; rows under a query metric divided by their norm,
  as the scan does)."""
  out = {}
  for name, (c, q, metric) in encodings.items():
    parts = []
    for lo in range(0, len(pairs), batch):
      qi, rows = pairs[lo:lo + batch, 0], pairs[lo:lo + batch, 1]
      x = np.asarray(c[rows], np.float64)
      s = np.einsum("pd,pd->p", x, np.asarray(q[qi], np.float64))
      if metric is not None:
        s = s / np.maximum(metric.norms(x), np.finfo(np.float32).tiny)
      parts.append(s)
    out[name] = np.concatenate(parts) if parts else np.zeros(0)
  return out


def influence_predictors(scores: dict, pairs: np.ndarray, deltas: np.ndarray,
                         min_pairs: int = 5) -> dict:
  """How well each method's score orders influence: per tail-patched query,
  Spearman's rho between the scores and the tail-patch deltas of its pairs
  (every method's proponents of that query together), as lists over queries
  (NaN where a query has fewer than ``min_pairs`` measured pairs)."""
  out = {name: [] for name in scores}
  ok = ~np.isnan(deltas)
  for qi in np.unique(pairs[:, 0]):
    sel = ok & (pairs[:, 0] == qi)
    for name, s in scores.items():
      out[name].append(stats.spearman(s[sel], deltas[sel])
                       if sel.sum() >= min_pairs else float("nan"))
  return out


def format_predictors(rho: dict) -> str:
  """Each method's mean rho (± se over queries) and TrackStar's paired
  difference in rho against it."""
  ref = rho.get("trackstar")
  cells = {}
  for name, values in rho.items():
    cells[name] = {"rho(score, tail-patch)": stats.format_cell(stats.mean_se(values))}
    if ref is not None and name != "trackstar":
      cells[name]["trackstar - this"] = stats.format_cell(stats.paired(ref, values))
  return evaluate.format_table(cells, ("rho(score, tail-patch)", "trackstar - this"),
                               row_header="score that orders each query's pairs")


def format_kinds(by_kind: dict, k: int) -> str:
  """The share of each kind among each method's top-k, and its mean delta."""
  cells = {name: {kind: f"{share[kind]:.3f}" for kind in KINDS}
           for name, share in by_kind[f"share@{k}"].items()}
  cells["mean delta (nats)"] = {
      kind: "–" if v is None else f"{v:+.4f}" for kind, v in by_kind["mean_delta"].items()}
  return evaluate.format_table(cells, KINDS, row_header=f"top-{k} proponents")


def run(workdir: str, k: int = 10, num_tail_patch: int = 0,
        sgd_learning_rate: float | None = None, corpus_path: str | None = None,
        queries_path: str | None = None, checkpoint: str | None = None,
        sum_steps=()) -> dict:
  """Scores every method; writes and returns the report.

  Without ``corpus_path``/``queries_path`` the demo's fact corpus is written
  and the model trained unless the workdir has a checkpoint. ``checkpoint``:
  a checkpoint directory or one step of it (default: the workdir's latest).
  ``sum_steps``: also score ``SUM_METHOD`` over those steps and this one.
  """
  if corpus_path is None or queries_path is None:
    corpus_path, queries_path = demo.ensure_model(workdir)
  pcfg = config.make(PreconditionerConfig)
  ecfg, ckpt, corpus, encoder, _, _ = common.start(workdir, checkpoint, corpus_path,
                                                   opt_state="all")  # tail-patch
  config.check_top_k(k, len(corpus))  # before any gradient
  # Each summed step there, none repeated nor the scored one (before
  # 2026-12-08 counted twice in trackstar_sum; a missing one refused after
  # every projection, naming no flag).
  common.summed_checkpoints(sum_steps, ckpt)
  optimizer = tailpatch.tail_patch_optimizer(ckpt.optimizer_config, ckpt.step,
                                             sgd_learning_rate=sgd_learning_rate)
  if k < TABLE_K:
    raise InputError(f"--top_k={k}: the quality table's columns are recall@"
                     f"{TABLE_K}, precision@{TABLE_K} and tail_patch@{TABLE_K}; "
                     f"expected --top_k >= {TABLE_K}")
  pipeline.check_fit_memory(encoder.layout, pcfg.kind)
  queries, query_examples = pipeline.read_queries(ckpt, queries_path)
  out_dir = storage.join(workdir, "quality")  # a path or URL
  storage.make_local_dirs(out_dir)

  raw_encoder, _, _ = pipeline.build_encoder(
      ckpt, dataclasses.replace(ecfg, correction="none"), mesh=encoder.mesh)
  raw = projected(raw_encoder, corpus, query_examples, ecfg.batch_size)
  corrected = projected(encoder, corpus, query_examples, ecfg.batch_size)
  encodings, lam = method_encodings(raw, corrected, encoder, pcfg)
  methods = METHODS
  if sum_steps:
    encodings[SUM_METHOD] = summed_encodings(
        ckpt, ecfg, encoder, corpus, query_examples, encodings["trackstar"],
        sum_steps, pcfg) + (None,)
    methods = METHODS + (SUM_METHOD,)

  topks = {"bm25": bm25_topk(corpus, queries, k),
           "random": random_topk(len(corpus), len(queries), k)}
  for name, (c, q, metric) in encodings.items():
    topks[name] = scan_lib.scan_arrays(
        c, q, k, mesh=encoder.mesh,
        metric=None if metric is None else metric.row_metric())

  preds = pipeline.predictions(ckpt, query_examples, queries,
                               pipeline.data_config(ckpt).vocabulary(),
                               mesh=encoder.mesh)
  results, metrics = {}, {}
  for name in methods:
    results[name] = pipeline.result_rows(queries, corpus, topks[name],
                                         predictions=preds)
    # At the table's cut-off (its columns, TrackStar's recall@10), not the
    # lists' length: --top_k=20 left the recall and precision columns blank.
    metrics[name] = evaluate.retrieval_metrics(
        queries, {r["query_id"]: r for r in results[name]}, k=TABLE_K)

  # Tail-patch: the union of every method's (query, proponent) pairs, once.
  chosen = tail_patch_queries(queries, num_tail_patch)
  stacked = np.stack([topks[m].proponent_rows[chosen] for m in methods])  # [M, C, K]
  # Padding (fewer rows than k: BM25's few matches, quarantined rows) is -1.
  stacked = np.where(stacked == scan_lib.INVALID_ROW, -1, stacked)
  pairs, inverse = tailpatch.pairs_for_topk(stacked)
  pairs[:, 0] = chosen[pairs[:, 0]]
  print(f"tail-patch: {len(pairs)} distinct (query, proponent) pairs over "
        f"{len(chosen)} queries")
  # Plain SGD starts from its own (empty) state, not the checkpoint's.
  opt_state = (optimizer.init(ckpt.params) if sgd_learning_rate is not None
               else ckpt.opt_state)
  # Only the rows the pairs name are read (a corpus may be far larger).
  train_rows, train_index = np.unique(pairs[:, 1], return_inverse=True)
  deltas = tailpatch.tail_patch_deltas(
      ckpt.model_config, ckpt.params, opt_state, optimizer,
      corpus.examples(train_rows), query_examples,
      np.stack([pairs[:, 0], train_index.reshape(-1)], 1),
      mesh=encoder.mesh, progress=common.Progress("tail-patch", "pairs"),
      family=ckpt.family)
  per_method = tailpatch.deltas_for_topk(deltas, inverse)
  nonfinite = tailpatch.nonfinite_listed(per_method, inverse)
  # The report of the files about to be replaced goes first (it is written
  # again last): a crash between would leave it describing a mix of this
  # run's files and the last one's, which a family rerun took as scored
  # (before 2026-12-08).
  storage.delete(storage.join(workdir, "quality.json"))
  for i, name in enumerate(methods):
    metrics[name].update(tailpatch.tail_patch_at_k(per_method[i], (1, 3, 5, 10),
                                                   stderr=True))
    metrics[name]["tail_patch_nonfinite"] = int(nonfinite[i])
    if nonfinite[i]:
      print(f"warning: {name}: {nonfinite[i]} proponent(s) made the loss "
            "non-finite in their tail-patch step; left out of its averages "
            "(tail_patch_nonfinite)")
    for j, query in enumerate(chosen):
      results[name][query]["proponent_tail_patch"] = [
          None if np.isnan(d) else float(d) for d in per_method[i, j]]
    evaluate.write_results(storage.join(out_dir, f"{name}.jsonl"), results[name])

  per_query, paired = paired_tail_patch(per_method, TABLE_K, methods)
  kinds = pair_kinds(queries, corpus, pairs)
  by_kind = None if kinds is None else influence_by_kind(
      kinds, deltas, inverse, TABLE_K, methods)
  table = evaluate.format_table(metrics, COLUMNS)
  paired_table = evaluate.format_table(
      {f"trackstar - {m}": {f"tail_patch@{TABLE_K}": stats.format_cell(v),
                            "queries where trackstar is higher": f"{v['win']:.3f}"}
       for m, v in paired.items()},
      (f"tail_patch@{TABLE_K}", "queries where trackstar is higher"), row_header="paired")
  if by_kind is not None:
    paired_table += "\n\n" + format_kinds(by_kind, TABLE_K)
  predictors = dict(encodings)
  step = step_predictor(ckpt, ecfg, encoder, corpus, query_examples, raw,
                        sgd_learning_rate)
  if step is not None:
    predictors[STEP_PREDICTOR] = step
  rho = influence_predictors(pair_scores(predictors, pairs), pairs, deltas)
  paired_table += "\n\n" + format_predictors(rho)
  report = {"methods": metrics, "paired_tail_patch": paired,
            "influence_by_kind": by_kind,
            "per_query_score_tail_patch_rho": {
                name: [None if np.isnan(v) else v for v in values]
                for name, values in rho.items()},
            f"per_query_tail_patch@{TABLE_K}": per_query,
            "tail_patch_query_ids": [queries[i]["id"] for i in chosen],
            "lambda": lam, "projection_dim": encoder.dim,
            "corpus_rows": len(corpus), "queries": len(queries),
            "tail_patch_queries": int(len(chosen)),
            "tail_patch_optimizer": ("sgd" if sgd_learning_rate is not None else
                                     ckpt.optimizer_config.name),
            "checkpoint": ckpt.path, "step": int(ckpt.step),
            "sum_steps": [int(s) for s in sum_steps],
            "settings": settings(ecfg, pcfg)}
  evaluate.write_text_atomic(storage.join(workdir, "quality.md"),
                             table + "\n\n" + paired_table + "\n")
  pngs = plots.write_pngs(viewer.summary(results), workdir)
  page = viewer.write_report(storage.join(workdir, "quality.html"), results,
                             title=f"tracer quality: {len(methods)} methods, "
                             f"{len(queries)} fact queries")
  # Last: a family rerun reuses a set whose quality.json is there (before
  # 2026-12-07 written first, so a crash before the page left a set reused
  # without it).
  evaluate.write_text_atomic(storage.join(workdir, "quality.json"),
                             evaluate.json_text(report, indent=2))
  print("\n" + table + "\n\n" + paired_table)
  print(f"\nplots: {', '.join(pngs)}\npage (every method side by side): {page}")
  return report


def main(argv):
  del argv
  if FLAGS.sgd_learning_rate is not None and not FLAGS.sgd_learning_rate > 0:
    raise app.UsageError(f"--sgd_learning_rate={FLAGS.sgd_learning_rate}: "
                         "expected a rate > 0 (leave it out for the "
                         "checkpoint's own optimizer)")
  config.default_gin_file()
  config.parse_gin()
  config.use_compilation_cache()
  run(FLAGS.workdir or "quality", FLAGS.top_k, FLAGS.tail_patch_queries,
      FLAGS.sgd_learning_rate, checkpoint=FLAGS.checkpoint,
      sum_steps=config.integers("sum_steps", FLAGS.sum_steps))


USES = ("workdir", "checkpoint", "top_k", "sum_steps", "tokenizer", "opt_state")


if __name__ == "__main__":
  config.run(main, uses=USES)
