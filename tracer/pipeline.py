"""The stages of tracing a corpus, as library functions.

checkpoint -> encoder -> R_train's basis (corpus sample) -> corpus rows in
that basis (store, or streamed) -> the query set's R^(-1) and query vectors
-> top-k -> results.

Each stage takes plain config dataclasses (``tracer.config``) and runs the
same way on one process or many. With P processes (``jax.distributed``):

* every process reads, encodes and writes only its own share of the corpus;
  no encoding is ever sent to another host (``encode_corpus``);
* the work list is decided once, by process 0, and broadcast, so processes
  cannot diverge and a rerun after any host died does only what is missing;
* R_train's moments are summed on each host over its own rows and
  all-reduced (``train_moments``); its eigenbasis is kept with the store (or
  saved and reused in streaming mode, ``load_or_fit_basis``).

The store is query-independent: rows are ``phi`` in R_train's eigenbasis.
A query set's task-specific R (lambda rule, damping, R_eval from the queries)
is applied at scan time, exactly (``query_metric``; the math is in
``tracer.hessian``), so a new query set never re-encodes the corpus.

Progress is reported through an optional ``progress(done, total)`` callback
(this process's items); nothing here prints.
"""

from __future__ import annotations

import functools
import json
import time
import warnings
from typing import Callable, Iterator, NamedTuple, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from tracer import checkpoint as ckpt_lib
from tracer import claim as claim_lib
from tracer import coordination
from tracer import corpus as corpus_lib
from tracer import crashpoints
from tracer import data as data_lib
from tracer import evaluate
from tracer import hessian
from tracer import memory
from tracer import partitioning
from tracer import projection
from tracer import scan as scan_lib
from tracer import storage
from tracer import store as store_lib
from tracer import train as train_lib
from tracer.config import (ENCODING_SETTINGS, DataConfig, EncodeConfig,
                           PreconditionerConfig)
from tracer.correction import second_moment, steps_taken
from tracer.encoder import (NONFINITE_REASONS, VERIFY_EXAMPLES, GradientEncoder,
                            nonfinite_rows)
from tracer.errors import (InputError, OtherProcessError, QuarantineLimitError,
                           StoreClaimedError)

# progress(done, total): items this process has done so far, out of its total.
ProgressFn = Callable[[int, int], None] | None


def _report(progress: ProgressFn, done: int, total: int) -> None:
  if progress is not None:
    progress(done, total)


# --- checkpoint, inputs, encoder ----------------------------------------------

def make_mesh(cfg: EncodeConfig):
  """The (data, model) mesh over every device; InputError naming
  ``EncodeConfig.model_axis`` when it does not divide the devices, or splits
  a process's devices over data rows it shares with another process."""
  count, local = jax.device_count(), jax.local_device_count()
  # Each process's devices fill whole data rows, or each row lies within
  # whole processes: else two processes share a row and each holds others
  # (hosts of 3 devices, model_axis=2: rows (0, 2) and (1, 3)), which the
  # encode refused only after R_train's fit (before 2026-12-07).
  sizes = [m for m in range(1, count + 1)
           if count % m == 0 and (local % m == 0 or m % local == 0)]
  if not isinstance(cfg.model_axis, int) or cfg.model_axis not in sizes:
    hosts = (f" that splits no process's {local} devices over data rows "
             "another process shares" if local < count else "")
    raise InputError(f"EncodeConfig.model_axis={cfg.model_axis!r}: expected a "
                     f"divisor of the device count {count}{hosts}: "
                     f"{', '.join(map(str, sizes))}")
  return partitioning.make_mesh(model=cfg.model_axis)


def load_checkpoint(workdir: str | None, checkpoint: str | None = None, mesh=None,
                    opt_state: str = "all") -> ckpt_lib.Checkpoint:
  """``checkpoint`` (a CheckpointManager dir or one step dir) or the workdir's
  latest, restored onto ``mesh`` (params split over its ``model`` axis);
  ``opt_state``: ``ckpt_lib.restore``'s ("second_moment" to encode only)."""
  if checkpoint:
    directory, step = ckpt_lib.step_of(checkpoint)
    return ckpt_lib.restore(directory, step, mesh=mesh, opt_state=opt_state)
  return ckpt_lib.restore(storage.join(workdir, "checkpoints"), mesh=mesh,
                          opt_state=opt_state)


def load_released(family, model_config, checkpoint: str, mesh,
                  optimizer_config, data: DataConfig,
                  opt_state: str | None = None) -> ckpt_lib.Checkpoint:
  """A model in its family's own checkpoint format (e.g. released Gemma
  weights: params only), restored onto ``mesh`` as a ``Checkpoint``.

  ``opt_state``: an optax state saved beside it (``family.save_opt_state``)
  for ``optimizer_config``'s optimizer, whose second moment then corrects the
  gradients; None leaves ``Checkpoint.opt_state`` None (no correction).
  """
  if not hasattr(family, "load_params"):
    raise InputError(f"{checkpoint}: not a tracer checkpoint, and model family "
                     f"{family.name!r} reads no other format")
  params = family.load_params(checkpoint, model_config, mesh=mesh)
  state = None
  if opt_state is not None:
    state = family.load_opt_state(opt_state, params,
                                  train_lib.make_optimizer(optimizer_config), mesh=mesh)
  return ckpt_lib.Checkpoint(checkpoint, 0, params, state, model_config,
                             optimizer_config, data.to_dict(), family)


def data_config(ckpt: ckpt_lib.Checkpoint) -> DataConfig:
  return DataConfig.from_dict(ckpt.data_config)


def open_corpus(ckpt: ckpt_lib.Checkpoint, source: str):
  """The corpus row table for this checkpoint's tokenizer and ``max_len``: a
  tokenized directory (``tracer.corpus``) or a source read into memory."""
  return corpus_lib.open_corpus(source, data_config(ckpt), ckpt.family.max_len(ckpt.model_config))


def tokenize_on_processes(source: str, output: str, config: DataConfig,
                          max_len: int,
                          progress: Callable[[int], None] | None = None,
                          poll_s: float = 10.0) -> corpus_lib.TokenizedCorpus:
  """``source`` tokenized into ``output`` once for all processes, with
  ``config``'s tokenizer into rows of ``max_len`` (``tracer.corpus.tokenize``;
  a checkpoint's: ``data_config(ckpt)``, ``ckpt.family.max_len``): corpus
  files, or a seqio source's shards (``TASK#shards=N``), split among the
  processes, each tokenizing its share; another seqio source by process 0.
  Returns the whole corpus on every process once it is written (an earlier
  run's is reused as it is).

  Processes wait for the others by reading the corpus's manifest (every
  ``poll_s`` seconds at most), not in a collective: hosts' shares may take
  hours apart, past collective timeouts. Process 0 joins the parts if the
  last two finished together and neither saw the other's.

  A process that fails (a bad line in its share, ids repeated across parts)
  says so before it raises (``tracer.coordination``); the others raise an
  OtherProcessError with its message at their next poll.

  The whole corpus's source files (``corpus.check_source_files``: changed
  since, gone, a glob matching another) are checked once the corpus is
  there, reused or just joined: each process its share of them (one stat
  per file in all, where each statting every file cost 1,024 shards x 64
  hosts = 65k metadata requests), the last one the glob's listing; all
  then raise the same InputError, the first failing share's
  (``coordination.agree``: P key-value sets and P directory reads). On one
  process, ``corpus.tokenize`` checks them all, as it always did.
  """
  shards, index = jax.process_count(), jax.process_index()
  together = coordination.client() is not None
  if not data_lib.splits_among_processes(source):
    # corpus.tokenize reads a seqio source in one process unless it names
    # its shards (TASK#shards=N).
    shards, index = 1, (0 if index == 0 else None)
  tokenize = functools.partial(corpus_lib.tokenize, source, output, config, max_len,
                               num_shards=shards, check_sources=not together)
  try:
    if index is not None:
      tokenize(progress=progress, shard_index=index)
    wait = 0.1
    while True:
      if index == 0 and shards > 1 and not corpus_lib.is_tokenized(output):
        # Joins the parts once every one is written. (Not tokenize again: it
        # re-checked part 0's source files every poll, for C4 on 64 hosts 16
        # metadata requests every 10 s for as long as the others took.)
        corpus_lib.join_parts(output, source, shards)
      if corpus_lib.is_tokenized(output):
        corpus = corpus_lib.TokenizedCorpus(output)
        break
      for failure in coordination.failures():
        raise failure.error()
      time.sleep(wait)
      wait = min(2 * wait, poll_s)
    verdict = ""
    if together:
      try:
        corpus_lib.check_source_files(
            output, corpus.manifest, data_lib.absolute_source(source),
            jax.process_index(), jax.process_count())
      except InputError as e:
        verdict = str(e)
  except OtherProcessError:
    raise
  except Exception as e:
    coordination.tell_failure(e)
    raise
  # Outside the try: every process raises it alike, none need be told.
  failed = coordination.agree("source_files", verdict) if together else None
  if failed is not None:
    raise InputError(failed[1])
  return corpus


def read_queries(ckpt: ckpt_lib.Checkpoint, path: str) -> tuple[list[dict], dict]:
  """The query records and their stacked target-only examples."""
  queries = data_lib.read_queries(path)
  vocab = data_config(ckpt).vocabulary()
  return queries, data_lib.query_examples(queries, vocab, ckpt.family.max_len(ckpt.model_config),
                                          path)


def optimizer_second_moment(ckpt: ckpt_lib.Checkpoint):
  """The params-shaped V of the checkpoint's optimizer state (``second_moment``)."""
  if steps_taken(ckpt.opt_state) == 0:
    # V is 0: it would divide every gradient by eps (Adafactor's: by 0).
    raise InputError(f"{ckpt.path}: the optimizer state has taken no step "
                     "(count 0), so its second moment is 0 and corrects "
                     "nothing; expected a checkpoint after training, or "
                     "EncodeConfig.correction='none'")
  b2 = ckpt.optimizer_config.b2 if ckpt.optimizer_config.name == "adamw" else None
  return second_moment(ckpt.opt_state, ckpt.params, b2=b2)


def build_encoder(ckpt: ckpt_lib.Checkpoint, cfg: EncodeConfig, mesh=None,
                  v=None, factored_weights: Sequence[str] | None = None
                  ) -> tuple[GradientEncoder, str, float]:
  """The encoder for a checkpoint; returns it with its correction kind and eps.

  The default eps is Adam's own; Adafactor adds its eps to g^2 inside V and
  divides by sqrt(V) alone, so its default is 0 (which also keeps its
  correction exactly rank one for the factored kernel). ``v``: divide by
  ``sqrt(v) + eps`` instead of the optimizer's V (an analysis's own).
  ``factored_weights``: the factored kernel's verified weights, from the
  manifest of a store encoded with this checkpoint (``GradientEncoder``).
  """
  if cfg.epsilon is not None:
    epsilon = cfg.epsilon
  elif ckpt.optimizer_config.name == "adafactor" and cfg.correction == "optimizer":
    epsilon = 0.0
  else:
    epsilon = ckpt.optimizer_config.eps
  if cfg.correction == "optimizer" and ckpt.opt_state is None:
    warnings.warn(f"{ckpt.path}: no optimizer state (released weights?): encoding "
                  "without the optimizer correction; give the optax state saved "
                  "beside it (--opt_state) to correct")
    v, kind = None, "none"
  elif cfg.correction == "optimizer":
    v = optimizer_second_moment(ckpt) if v is None else v
    kind = ckpt.optimizer_config.name
  elif cfg.correction == "none":
    v, kind = None, "none"
  else:
    raise ValueError(f"EncodeConfig.correction={cfg.correction!r}: expected "
                     f"'optimizer' or 'none'")
  mesh = mesh if mesh is not None else make_mesh(cfg)
  encoder = GradientEncoder(
      ckpt.loss_fn(), ckpt.params, second_moment=v, epsilon=epsilon,
      projection_dim=cfg.projection_dim, seed=cfg.seed, mesh=mesh,
      param_shardings=ckpt.family.param_shardings(ckpt.model_config, mesh,
                                                  ckpt.params),
      microbatch_size=cfg.microbatch_size, kernel=cfg.kernel,
      rank_one_correction=cfg.rank_one_correction,
      projection_precision=cfg.projection_precision,
      factored_weights=factored_weights)
  return encoder, kind, epsilon


def sample_rows(num_rows: int, count: int, seed: int = 0) -> np.ndarray:
  """A sorted, seeded sample of ``count`` rows (all rows when count is 0)."""
  if count <= 0 or count >= num_rows:
    return np.arange(num_rows)
  return np.sort(np.random.default_rng(seed).choice(num_rows, count, replace=False))


def example_slices(examples: dict, batch_size: int) -> Iterator[dict]:
  """Consecutive batches of ``batch_size`` from stacked examples."""
  n = len(examples["inputs"])
  for lo in range(0, n, batch_size):
    yield {k: v[lo:lo + batch_size] for k, v in examples.items()}


def read_padded(corpus, rows: np.ndarray, size: int) -> tuple[dict, np.ndarray]:
  """Examples of ``rows`` (this process's), padded to ``size`` by repeating the
  last one (row 0 if there is none), and the mask of real ones."""
  rows = np.asarray(rows, np.int64)
  n = len(rows)
  examples = corpus.examples(rows if n else np.zeros(1, np.int64))
  take = np.minimum(np.arange(size), max(n, 1) - 1)
  return {k: v[take] for k, v in examples.items()}, np.arange(size) < n


# --- R: the store's basis, and each query set's metric ----------------------

def recorded_source(corpus) -> str:
  """The source a store or a basis records for ``corpus``: a local path made
  absolute (``data.absolute_source``), so that it names the same files from
  any directory. A tokenized corpus's as it recorded it (absolute since
  2026-12; relative to that run before)."""
  if isinstance(corpus, corpus_lib.TokenizedCorpus):
    return corpus.source
  return data_lib.absolute_source(corpus.source)


def basis_key(params_fingerprint: str, encoder: GradientEncoder,
              correction_kind: str, epsilon: float, corpus,
              cfg: PreconditionerConfig) -> dict:
  """Everything R_train's basis depends on (no query set does); equal keys
  mean an equal fit. ``EncodeConfig.projection_precision`` is left out: its
  choices are all fp32-accurate (they differ in the last bits), as the mesh
  and batch sizes, also left out, do."""
  key = {"params_fingerprint": params_fingerprint, "correction": correction_kind,
         "epsilon": float(epsilon), "dim": encoder.dim,
         "kernel": encoder.approximation,
         "projection_seed": encoder.layout.seed, "corpus": recorded_source(corpus),
         "num_rows": len(corpus), "kind": cfg.kind,
         "train_examples": cfg.train_examples, "sample_seed": cfg.sample_seed}
  return json.loads(json.dumps(key))


def check_fit_memory(layout: projection.Layout, kind: str, have: int | None = None,
                     device_have: int | None = None) -> None:
  """InputError, before any gradient, where fitting R of ``kind`` over
  ``layout`` would take more than ``have`` bytes of the host's memory
  (default ``memory.host_budget``: what the process may use less what it
  holds; ``hessian.fit_bytes``), or its moments more
  than ``device_have`` bytes of a device's (default ``memory.device_memory_bytes``;
  each device keeps a copy). A block left unprojected by a projection_dim
  past the model's size is a whole weight matrix (65,536 dims for
  tiny.gin's, 17 GB of moments and a 34 GB eigh), and ``kind="full"``
  squares all of d."""
  if kind == "none":
    return
  need = hessian.fit_bytes(layout, kind)
  have, host = memory.host_budget(have)
  moments = hessian.moment_bytes(layout, kind)
  device_have = memory.device_memory_bytes() if device_have is None else device_have
  if need <= have and (device_have is None or moments <= device_have):
    return
  largest = max(hessian.segments(layout, kind), key=lambda s: s[1] - s[0])
  block = next((b for b in layout.blocks if (b.offset, b.offset + b.size) == largest),
               None)
  where = (f"block {block.name!r}, {block.size:,} dims" if block and kind == "block"
           else f"{largest[1] - largest[0]:,} dims")
  what = (f"fitting R takes at least {memory.size_text(need)} (its largest segment: "
          f"{where}), more than {host}" if need > have
          else f"R's float32 moments take {memory.size_text(moments)} on each device "
          f"(its largest segment: {where}), more than a device's "
          f"{memory.size_text(device_have)}")
  raise InputError(
      f"PreconditionerConfig.kind={kind!r}: {what}; expected a smaller "
      "EncodeConfig.projection_dim (each block projected to fewer dims), "
      + ("kind='block', " if kind == "full" else "") + "or kind='none'")


def train_moments(encoder: GradientEncoder, corpus, cfg: PreconditionerConfig,
                  batch_size: int, progress: ProgressFn = None) -> hessian.Moments:
  """R_train's moments over a seeded corpus sample (``cfg.train_examples``).

  The sample is cut into global batches of ``batch_size``; each process reads
  only the rows of its own positions, and the sums over rows are all-reduced
  on the mesh.
  """
  check_fit_memory(encoder.layout, cfg.kind)
  rows = sample_rows(len(corpus), cfg.train_examples, cfg.sample_seed)
  train = hessian.init_moments(encoder.layout, cfg.kind)
  for lo in range(0, len(rows), batch_size):
    batch_rows = rows[lo:lo + batch_size]
    positions = encoder.local_positions(len(batch_rows))
    mine = batch_rows[positions[positions < len(batch_rows)]]
    examples, valid = read_padded(corpus, mine, len(positions))
    previous = train
    train = encoder.accumulate(train, encoder.project_local(examples, valid))
    # At most two batches in flight, as in launch/train.py: a long queue of
    # dispatched 8-device programs deadlocked XLA:CPU's collectives (a CI run
    # aborted in this loop after a device thread missed an all-reduce for
    # 900 s).
    jax.block_until_ready(previous)
    crashpoints.point("fit.batch")
    _report(progress, lo + len(batch_rows), len(rows))
  return train


def fit_basis(encoder: GradientEncoder, corpus, cfg: PreconditionerConfig,
              batch_size: int, progress: ProgressFn = None, key: dict | None = None
              ) -> hessian.Basis | None:
  """R_train's eigenbasis (None for ``kind="none"``): the coordinates of a
  query-independent store."""
  if cfg.kind == "none":
    return None
  moments = train_moments(encoder, corpus, cfg, batch_size, progress)
  if int(moments.count) == 0:
    sampled = len(sample_rows(len(corpus), cfg.train_examples, cfg.sample_seed))
    raise QuarantineLimitError(
        f"{recorded_source(corpus)}: every one of the {sampled} rows sampled "
        "for R_train has a non-finite loss or gradient; expected a checkpoint "
        "whose loss is finite on the corpus (are its weights finite?)")
  basis = hessian.fit_basis(moments, dim=encoder.dim,
                            layout_seed=encoder.layout.seed, kind=cfg.kind)
  basis.fit_key = key
  return basis


def load_or_fit_basis(location: str, key: dict,
                      fit: Callable[[], hessian.Basis | None]
                      ) -> tuple[hessian.Basis | None, bool]:
  """The basis saved at ``location`` if it was fitted with ``key``, else
  ``fit()``, saved there (by process 0). Returns it and whether it was reused."""
  if storage.exists(location):
    saved = hessian.Basis.load(location)
    recorded = _fit_settings(saved.fit_key or {})
    # A basis saved before sources were recorded absolute holds the path as
    # given: the same files, from the directory it is resolved in.
    if _fit_settings(key) in (recorded, {**recorded, "corpus": data_lib.absolute_source(
        recorded.get("corpus", ""))}):
      return saved, True
    parent = storage.split(location)[0]
    if storage.exists(storage.join(parent, store_lib.MANIFEST)):
      # (before 2026-12-07 refitted and saved over it: the store's rows were
      # then in no basis its manifest knew, and every scan of it refused)
      raise InputError(f"{location}: the basis of the store {parent}, whose "
                       "rows are in it, fitted with other settings than this "
                       "run's; expected another --basis to save this run's in")
  basis = fit()
  if basis is not None and jax.process_index() == 0:
    basis.save(location)
  return basis, False


# The key's fields a given basis may differ in: R_train fitted on another
# sample of the training data (a held-out shard, an earlier tokenization) is a
# choice; another checkpoint, correction or projection makes it a wrong R.
_OTHER_SAMPLE_FIELDS = ("corpus", "num_rows")


def _fit_settings(key: dict) -> dict:
  """``key`` (``basis_key``) as the fit sees it: a sample of every row
  (``train_examples`` 0, or N or more) is the same whatever its seed."""
  count, rows = key.get("train_examples"), key.get("num_rows")
  if isinstance(count, int) and isinstance(rows, int) and (
      count <= 0 or count >= rows):
    return {k: v for k, v in key.items() if k != "sample_seed"}
  return key


def given_basis(location: str, key: dict) -> hessian.Basis:
  """The basis saved at ``location`` (``--basis``) for a new store, checked
  against ``key`` (``basis_key``: what this run would fit it from), all but
  the corpus it was sampled from. InputError naming the file and each
  setting that differs."""
  basis = hessian.Basis.load(location)
  have = {**_fit_settings(basis.fit_key or {}), "dim": basis.dim,
          "projection_seed": basis.layout_seed, "kind": basis.kind}
  diffs = [f"{k}: the basis has {have[k]!r}, this run has {v!r}"
           for k, v in key.items()
           if k in have and k not in _OTHER_SAMPLE_FIELDS and have[k] != v]
  if diffs:
    raise InputError(
        f"{location}: a basis fitted for another checkpoint or settings than "
        f"this run's ({'; '.join(diffs)}); expected one that tracer "
        "fit-preconditioner fitted with this run's checkpoint, gin files and "
        "PreconditionerConfig, or leave out --basis to fit one")
  return basis


def rotate(basis: hessian.Basis | None, phi: jax.Array) -> jax.Array:
  """Projections in the basis' coordinates (as they are without a basis)."""
  return phi if basis is None else basis.rotate(phi)


def project_query_set(encoder: GradientEncoder, basis: hessian.Basis | None,
                      examples: dict, batch_size: int
                      ) -> tuple[np.ndarray, dict[int, str]]:
  """Query examples' projections in the basis' coordinates, float32
  ``[Q, d]``, and ``{index: reason}`` of those whose loss or gradient is
  not finite (their rows are zero) or whose gradient is zero
  (``unusable_queries``)."""
  pieces, skipped = [], {}
  for lo, batch in zip(range(0, len(examples["inputs"]), batch_size),
                       example_slices(examples, batch_size)):
    size = len(batch["inputs"])
    projected = encoder.project_global(batch)
    pieces.append(partitioning.fetch(rotate(basis, projected.phi)).reshape(
        -1, encoder.dim)[:size])
    skipped.update({lo + i: why for i, why in
                    nonfinite_rows(projected, size).items()})
  psi = np.concatenate(pieces)
  return psi, unusable_queries(psi, skipped)


ZERO_GRADIENT = ("zero gradient (the target's loss moves with no weight: its "
                 "probability may round to 1)")


def unusable_queries(psi: np.ndarray, nonfinite: dict[int, str]) -> dict[int, str]:
  """``{index: reason}``: the queries of ``nonfinite`` (a non-finite loss or
  gradient) and those whose projection ``psi [Q, d]`` is all zero, which
  would score every row 0 and list arbitrary rows as proponents (before
  2026-12-08, without a word)."""
  zero = np.flatnonzero(~np.asarray(psi).any(axis=1))
  return {**{int(i): ZERO_GRADIENT for i in zero}, **nonfinite}


def task_metric(encoder: GradientEncoder, basis: hessian.Basis | None,
                examples: dict, cfg: PreconditionerConfig, batch_size: int,
                ids: Sequence[str] | None = None
                ) -> tuple[hessian.QueryMetric, dict[int, str]]:
  """A task's scan-time R^(-1), fitted once from its queries (R_eval when
  ``cfg.task_specific``), for scoring other query sets of the task
  (``query_metric``'s ``metric``): a few queries, even one, then get the
  task's R, not one fitted from themselves alone. Also ``{index: reason}``
  of the task's queries left out for a non-finite loss or gradient."""
  psi, skipped = project_query_set(encoder, basis, examples, batch_size)
  metric, _ = fit_query_metric(basis, psi, skipped, cfg, ids)
  return metric, skipped


def query_metric(encoder: GradientEncoder, basis: hessian.Basis | None,
                 query_examples: dict, cfg: PreconditionerConfig,
                 batch_size: int, ids: Sequence[str] | None = None,
                 metric: hessian.QueryMetric | None = None
                 ) -> tuple[hessian.QueryMetric, np.ndarray, dict[int, str]]:
  """A query set's scan-time R^(-1) and the scan's query vectors.

  Projects the queries (never a corpus row), puts them in the basis'
  coordinates, fits R from the basis and (``cfg.task_specific``) the queries
  themselves as the eval set, or takes ``metric`` (a task's,
  ``task_metric``). Returns the metric, ``R^(-1) q / ||q||_R``,
  float32 ``[Q, d]`` (a scan with ``metric.row_metric()`` then gives exactly
  TrackStar's ``unit(R^(-1/2) phi_m) . unit(R^(-1/2) phi_q)``), and
  ``{query index: reason}`` of the queries whose loss or gradient is not
  finite: their vectors are zero, they are left out of R_eval, and
  ``result_rows`` reports them without proponents.
  """
  psi, skipped = project_query_set(encoder, basis, query_examples, batch_size)
  metric, vectors = fit_query_metric(basis, psi, skipped, cfg, ids, metric)
  return metric, vectors, skipped


def fit_query_metric(basis: hessian.Basis | None, psi: np.ndarray,
                     skipped: dict[int, str], cfg: PreconditionerConfig,
                     ids: Sequence[str] | None = None,
                     metric: hessian.QueryMetric | None = None
                     ) -> tuple[hessian.QueryMetric, np.ndarray]:
  """A query set's scan-time R^(-1) from its projections ``psi [Q, d]`` in the
  basis' coordinates (the set itself is R_eval when ``cfg.task_specific``),
  or ``metric`` when given, and its query vectors ``[Q, d]``: zero for the
  queries in ``skipped``."""
  ok = np.ones(len(psi), bool)
  ok[list(skipped)] = False
  if not ok.any():
    raise QuarantineLimitError(
        f"every one of the {len(psi)} queries has a non-finite loss or gradient, "
        f"or a zero gradient (first: {_name(ids, 0)}: {skipped[0]})")
  if metric is None and basis is None:
    metric = hessian.identity_metric(psi.shape[1])
  elif metric is None:
    metric = hessian.fit_metric(basis, psi[ok] if cfg.task_specific else None,
                                **cfg.mix())
  vectors = np.zeros_like(psi)
  vectors[ok] = metric.query_vectors(psi[ok])
  return metric, vectors


def _name(ids: Sequence[str] | None, i: int) -> str:
  return repr(ids[i]) if ids is not None else f"query {i}"


# --- the store ------------------------------------------------------------------

BASIS_FILE = "basis.npz"


def manifest(ckpt: ckpt_lib.Checkpoint, encoder: GradientEncoder,
             correction_kind: str, epsilon: float,
             basis: hessian.Basis | None, corpus, cfg: EncodeConfig,
             params_fingerprint: str | None = None) -> store_lib.Manifest:
  return store_lib.Manifest(
      checkpoint=storage.normalize(ckpt.path), step=ckpt.step,
      params_fingerprint=params_fingerprint or store_lib.fingerprint(ckpt.params),
      correction=correction_kind, epsilon=float(epsilon),
      projection_seed=encoder.layout.seed, layout=encoder.layout.to_json(),
      dim=encoder.dim, basis_fingerprint=basis.fingerprint() if basis else None,
      kernel=encoder.approximation, dtype=cfg.store_dtype,
      corpus=recorded_source(corpus),
      num_rows=len(corpus), corpus_fingerprint=corpus.fingerprint,
      chunk_rows=cfg.chunk_rows,
      corpus_rows=corpus.location if isinstance(corpus, corpus_lib.TokenizedCorpus)
      else "",
      encode_config={f: getattr(cfg, f) for f in ENCODING_SETTINGS})


def planned_weights(encoder: GradientEncoder, corpus) -> list[str] | None:
  """The weights the encoder's factored kernel projects, for a new store's
  manifest (``GradientEncoder.factored_weights``): if no batch has been
  encoded yet, planned and verified on the corpus's first rows
  (``VERIFY_EXAMPLES`` of them, over as many steps as they take, so that the
  plan does not depend on the step size; every process takes part).
  None with the exact kernel."""
  if encoder.kernel != "factored":
    return None
  if encoder.factored_weights is None:
    size = min(VERIFY_EXAMPLES, len(corpus))
    positions = encoder.local_positions(size)
    encoder.project_local(*read_padded(corpus, positions[positions < size],
                                       len(positions)))
  return encoder.factored_weights


def store_basis(store: store_lib.EncodingStore) -> hessian.Basis | None:
  """The basis a store's rows are in (checked against its manifest)."""
  data = store.attachment(BASIS_FILE)
  where = storage.join(store.path, BASIS_FILE)
  if data is None and store.manifest.basis_fingerprint is not None:
    raise store_lib.CorruptStoreError(
        f"{where}: {storage.missing(where, 'basis file')}; the store's rows are "
        "in R_train's eigenbasis it holds (the manifest's basis_fingerprint "
        f"{store.manifest.basis_fingerprint}), and queries cannot be projected "
        "without it: restore the file, or encode into a new store")
  basis = None if data is None else hessian.Basis.load(where, data)
  if (basis.fingerprint() if basis else None) != store.manifest.basis_fingerprint:
    raise store_lib.IncompatibleStoreError(
        f"{store.path}: {BASIS_FILE} does not match the manifest's "
        "basis_fingerprint")
  return basis


def existing_store(location: str, expected: store_lib.Manifest,
                   cfg: PreconditionerConfig | None = None
                   ) -> store_lib.EncodingStore | None:
  """The store at ``location`` if there is one, checked against what this run
  would write (every field but the basis, which the store brings) and, given
  ``cfg``, against its basis settings; None if there is none."""
  if not storage.exists(storage.join(location, store_lib.MANIFEST)):
    return None
  store = store_lib.open_store(location)
  fields = [f for f in store_lib.ENCODING_FIELDS + store_lib.STORAGE_FIELDS
            if f != "basis_fingerprint"]
  try:
    store.manifest.check_compatible(expected, fields, where=location, other="this run")
  except store_lib.IncompatibleStoreError as e:
    if store.manifest.encode_config:
      raise
    # A store from before manifests kept their EncodeConfig: say where the
    # settings come from.
    raise store_lib.IncompatibleStoreError(
        f"{e} (d, layout, projection_seed, correction, epsilon, kernel, dtype "
        "and chunk_rows follow EncodeConfig: pass the gin files the store was "
        "encoded with, or another --store)") from None
  basis = store_basis(store)
  if cfg is None:
    return store
  have = {"kind": basis.kind if basis else "none",
          **{k: (basis.fit_key or {}).get(k) for k in ("train_examples", "sample_seed")
             if basis}}
  want = {"kind": cfg.kind, "train_examples": cfg.train_examples,
          "sample_seed": cfg.sample_seed}
  diffs = [f"{k}: store has {v!r}, this run has {want[k]!r}"
           for k, v in have.items() if v != want[k]]
  if diffs:
    raise store_lib.IncompatibleStoreError(
        f"{location}: its basis was fitted with other PreconditionerConfig "
        f"settings ({'; '.join(diffs)})")
  return store


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


# What an encode holds in host memory, for the checks that refuse settings
# past it (``open_store``, ``_run_local_batches``). Measured 2026-12-06 by
# ``tracer benchmark-data --encode_memory=examples,encodings,chunk,chunk_float32``
# (WORKSPACE.md, "An encode's host memory"): the slope of peak RSS over
# EncodeConfig's batch_size and chunk_rows, each size in a fresh process, on
# the 2-core CPU VM with 1 device, where the device's copies are host memory
# too (a GPU's or TPU's are not: there these count more than the host holds).
#
# Per chunk element: 8.00 bytes, bf16 and float32 stores alike (a float32
# buffer the chunk is encoded into, and as much again as it is written), +
# 33 MB. The factor before the measurement was 8 (a buffer, its stored
# copy, a scan's read): kept, with nothing to spare.
CHUNK_BYTES_PER_ELEMENT = 8
# Per example of this process's batch: 4.60 copies of the example's bytes
# and 4.00 of its float32 encoding (by the code: batches read ahead, each
# padded, the one on the device; the step's output and its quarantined copy,
# this process's part, the last batch's kept while the next is encoded), solved
# from two sweeps: 17,420 bytes an example at L = 256, d = 205 (5.7 x its
# 3,072 bytes), 1,053,584 at tiny.gin's sizes and d = 65,406 (686 x its
# 1,536); rounded up. The count before (4 copies of the example, none of its
# encoding) was 6,144 bytes of the second's 1,053,584.
BATCH_EXAMPLE_COPIES = 5
BATCH_ENCODING_COPIES = 4.5


def open_store(location: str, manifest_: store_lib.Manifest,
               basis: hessian.Basis | None = None) -> store_lib.EncodingStore:
  """Creates or resumes the store, with its basis (and, for int8 rows, the
  basis' ``column_scales``); process 0 creates it before the others open it."""
  if jax.process_count() > 1 and str(location).startswith("memory://"):
    # Each process would write its share into its own memory, and every
    # process would then find the store incomplete.
    raise InputError(f"{location}: a memory:// store lives in one process; "
                     f"this run has {jax.process_count()}: expected a path or "
                     "an object-storage URL every process reaches")
  # A chunk is encoded into one float32 buffer and written from a copy
  # (CHUNK_BYTES_PER_ELEMENT, measured): at pod scale a chunk_rows of 10^8
  # would be terabytes, found only as the first chunk filled.
  rows = min(manifest_.chunk_rows, manifest_.num_rows)
  need = CHUNK_BYTES_PER_ELEMENT * rows * manifest_.dim
  have, host = memory.host_budget()
  if need > have:
    raise InputError(
        f"EncodeConfig.chunk_rows={manifest_.chunk_rows}: a chunk of {rows:,} rows x "
        f"d={manifest_.dim:,} takes about {memory.size_text(need)} of memory as it "
        f"is encoded and written, more than {host}; expected a smaller "
        "EncodeConfig.chunk_rows")
  attachments = {BASIS_FILE: basis.to_bytes()} if basis is not None else None
  scales = (basis.column_scales() if basis is not None and manifest_.dtype == "int8"
            else None)
  create = lambda: store_lib.create_or_open(
      location, manifest_, attachments, scales, other_attachments=(BASIS_FILE,))
  if jax.process_count() > 1:
    if jax.process_index() == 0:
      create()
    _barrier("tracer-store-created")
  return create()


def agreed_done_chunks(store: store_lib.EncodingStore) -> np.ndarray:
  """The chunks marked done, as process 0 sees them, on every process
  (sorted). All processes call it together.

  Listings of a shared store can differ between hosts (object-store listings
  are eventually consistent, a slow host may list before a fast one has
  written, or after another has unmarked a chunk); hosts that acted on
  different lists would run different collectives and hang, or split the
  chunks between them so that some are never checked.
  """
  done = np.zeros(store.num_chunks, np.uint8)
  if jax.process_index() == 0:
    done[[c for c in store.done_chunks() if c < store.num_chunks]] = 1
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    done = np.asarray(multihost_utils.broadcast_one_to_all(done))
  return np.flatnonzero(done)


def agreed_pending_chunks(store: store_lib.EncodingStore) -> np.ndarray:
  """The chunks still to write, as process 0 sees them, on every process
  (``agreed_done_chunks``)."""
  return np.setdiff1d(np.arange(store.num_chunks), agreed_done_chunks(store))


def _local_batches(ranges: Iterator[tuple[int, int]], size: int
                   ) -> Iterator[np.ndarray]:
  """Consecutive batches of ``size`` rows from a stream of ``[start, stop)``
  ranges (the last may be short)."""
  pending: list[np.ndarray] = []
  count = 0
  for start, stop in ranges:
    lo = start
    while lo < stop:
      take = min(stop - lo, size - count)
      pending.append(np.arange(lo, lo + take))
      count += take
      lo += take
      if count == size:
        yield np.concatenate(pending)
        pending, count = [], 0
  if count:
    yield np.concatenate(pending)


def _run_local_batches(encoder: GradientEncoder, corpus,
                       ranges: Iterator[tuple[int, int]], steps_rows: int,
                       batch_size: int, chunk_bytes: int = 0
                       ) -> Iterator[tuple[np.ndarray, dict, np.ndarray]]:
  """(rows, padded examples, valid) of every step of this process.

  ``ranges`` are this process's row ranges; ``steps_rows`` the most rows any
  process has, so every process runs the same number of steps (a process out
  of rows feeds padding). Reads run one batch ahead in a background thread.
  ``chunk_bytes``: what the caller holds beside the batches (a store chunk
  filling), counted with them in the memory check.
  """
  # A batch past the rows only pads (a demo's EncodeConfig.batch_size=10^8
  # padded its 1,719 rows to 10^8 examples: numpy's "Unable to allocate
  # 47.7 GiB"); steps_rows is every process's, so all cap alike.
  groups = partitioning.data_groups(encoder.mesh)[0]
  local = encoder.local_batch_size(min(batch_size, max(steps_rows, 1) * groups))
  # An example's bytes from a row of zeros: no corpus row is read here (a
  # process reads only its share, and tests count the rows it reads).
  example = data_lib.examples_from_tokens(np.zeros((1, corpus.max_len), np.int32),
                                          np.zeros(1, np.int32))
  # Batches are read ahead while one is encoded, each padded, and each
  # example's encoding is copied as it comes back (BATCH_*_COPIES, measured).
  need = int(local * (BATCH_EXAMPLE_COPIES * sum(v.nbytes for v in example.values())
                      + BATCH_ENCODING_COPIES * 4 * encoder.dim))
  have, host = memory.host_budget()
  if need + chunk_bytes > have:
    chunk = (f", beside a store chunk's {memory.size_text(chunk_bytes)}"
             if chunk_bytes else "")
    raise InputError(
        f"EncodeConfig.batch_size={batch_size}: this process's batches of "
        f"{local:,} examples take about {memory.size_text(need)} of host memory "
        f"(two at once, padded, with their encodings){chunk}, more than {host}; "
        "expected a smaller EncodeConfig.batch_size"
        + (" or EncodeConfig.chunk_rows" if chunk_bytes else ""))
  batches = _local_batches(ranges, local)

  def items():
    for _ in range(-(-steps_rows // local)):
      rows = next(batches, np.zeros(0, np.int64))
      examples, valid = read_padded(corpus, rows, local)
      yield rows, examples, valid

  return data_lib.prefetch(items(), depth=1)


class Encoded(NamedTuple):
  """What ``encode_corpus`` did: rows this process encoded, and rows
  quarantined in this run over all processes."""
  rows: int
  quarantined: int


DEFAULT_MAX_QUARANTINED = 1e-3


def encode_corpus(encoder: GradientEncoder, basis: hessian.Basis | None, corpus,
                  store: store_lib.EncodingStore, batch_size: int,
                  progress: ProgressFn = None, *,
                  max_quarantined: float = DEFAULT_MAX_QUARANTINED,
                  claim: claim_lib.Claim | None = None) -> Encoded:
  """Encodes every chunk not yet marked done; a rerun resumes.

  Rows are the projections ``phi`` in ``basis``' coordinates, unnormalized:
  no query set enters them (``query_metric`` supplies R at scan time).

  The pending chunks (``agreed_pending_chunks``) are dealt round-robin to the
  mesh's data groups (``partitioning.data_groups``: one per process unless
  the model axis spans hosts). A process reads only its group's rows, encodes
  them in process-local batches of the ``batch_size`` global batch, and its
  group's writer writes each chunk once its rows are done. Returns on every
  process once every chunk is written, so the store can be scanned at once.

  A row whose loss or gradient is not finite is quarantined: stored as zeros,
  recorded with its reason in its chunk's marker, never returned by a scan.
  If this run quarantines more than ``max_quarantined`` of the store's rows,
  every process raises QuarantineLimitError (the count is global, so all
  stop at the same step). The limit is the store's, not this run's share:
  a rerun finishing a few chunks is judged as the whole run was (rows
  quarantined by earlier runs are not counted again: that would read every
  chunk's marker). ``claim``: this job's claim on the store (process 0's),
  checked before each chunk is written.
  """
  pending = agreed_pending_chunks(store)
  groups, group, writer = partitioning.data_groups(encoder.mesh)
  sizes = np.minimum(store.chunk_rows, store.num_rows - pending * store.chunk_rows)
  group_rows = [int(sizes[g::groups].sum()) for g in range(groups)]
  mine = [int(c) for c in pending[group::groups]]
  total = group_rows[group]
  # Rows arrive in the order of ``mine``: fill one chunk after the other.
  buf, filled, encoded, quarantined, bad = None, 0, 0, 0, {}
  ranges = (store.chunk_bounds(c) for c in list(mine))
  # A chunk fills while the batches run (the open_store check counted it
  # alone).
  chunk_bytes = CHUNK_BYTES_PER_ELEMENT * encoder.dim * int(
      max(sizes[group::groups], default=0))
  for rows, examples, valid in _run_local_batches(encoder, corpus, ranges,
                                                  max(group_rows), batch_size,
                                                  chunk_bytes):
    projected = encoder.project_local(examples, valid)
    quarantined += projected.count
    _check_quarantined(corpus, rows, projected, quarantined, max_quarantined,
                       store.num_rows, "the store holds")
    enc = partitioning.local_part(rotate(basis, projected.phi), axis=1).reshape(
        -1, encoder.dim)[:len(rows)]
    flags = partitioning.local_part(projected.nonfinite, axis=1).reshape(-1)
    for i in np.flatnonzero(flags[:len(rows)]):
      bad[int(rows[i])] = NONFINITE_REASONS[int(flags[i])]
    lo = 0
    while lo < len(rows):
      start, stop = store.chunk_bounds(mine[0])
      if buf is None:
        buf, filled = np.empty((stop - start, encoder.dim), np.float32), 0
      take = min(len(rows) - lo, len(buf) - filled)
      buf[filled:filled + take] = enc[lo:lo + take]
      filled, lo = filled + take, lo + take
      if filled == len(buf):
        if writer:
          if claim is not None:
            claim.check()
          store.write_chunk(mine[0], buf, {r: bad.pop(r) for r in list(bad)
                                          if start <= r < stop})
        mine.pop(0)
        buf = None
    encoded += len(rows)
    crashpoints.point("encode.batch")
    _report(progress, encoded, total)
  assert not mine, f"chunks left unwritten: {mine[:5]}"
  # The last chunks' writers may still be writing when the other hosts
  # finish: wait for them, or a scan would find the store incomplete.
  _barrier("tracer-encode-corpus-done")
  return Encoded(encoded, quarantined)


def _check_quarantined(corpus, rows: np.ndarray, projected, quarantined: int,
                       max_quarantined: float, total: int,
                       whose: str = "this run encodes") -> None:
  """QuarantineLimitError if ``quarantined`` (global, so every process stops
  at the same step) is more than ``max_quarantined`` of ``total`` rows (the
  rows ``whose``); ``rows``, ``projected``: this batch's."""
  if quarantined > int(max_quarantined * total):
    raise QuarantineLimitError(
        f"{corpus.source}: {quarantined} corpus rows had a non-finite loss or "
        f"gradient, more than --max_quarantined={max_quarantined:g} of the "
        f"{total} rows {whose} (first on this process: "
        f"{_first_quarantined(corpus, rows, projected)}); the checkpoint or "
        "the data may be broken")


def _first_quarantined(corpus, rows: np.ndarray, projected) -> str:
  flags = partitioning.local_part(projected.nonfinite, axis=1).reshape(-1)[:len(rows)]
  hits = np.flatnonzero(flags)
  if not len(hits):
    return "none"
  i = int(hits[0])
  return (f"row {int(rows[i])}, id {corpus.ids_of(rows[i:i + 1])[0]!r}: "
          f"{NONFINITE_REASONS[int(flags[i])]}")


def claim_store(location: str, stale_after_s: float = claim_lib.DEFAULT_STALE_AFTER_S
                ) -> claim_lib.Claim | None:
  """Process 0 takes this job's claim on the store at ``location`` (the
  other processes follow: they get None, or the same StoreClaimedError)."""
  claim, error = None, None
  if jax.process_index() == 0:
    try:
      claim = claim_lib.Claim(location, stale_after_s).acquire()
    except StoreClaimedError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    failed = int(np.asarray(multihost_utils.broadcast_one_to_all(
        np.int32(error is not None))))
    if failed and error is None:
      raise StoreClaimedError(f"{location}: process 0 could not claim the store "
                              "(another job is writing it; see process 0's error)")
  if error is not None:
    raise error
  return claim


def written_share(store: store_lib.EncodingStore) -> list[int]:
  """This process's equal share of the chunks marked done (chunk ``c`` of
  ``agreed_done_chunks`` on process ``c % P``): what it checks or
  summarizes. All processes call it together."""
  done = agreed_done_chunks(store)
  return [int(c) for c in done[jax.process_index()::jax.process_count()]]


class Verified(NamedTuple):
  bad: dict[int, str]   # {chunk: why} of this process's share
  unchecked: int        # good chunks of it whose marker records no checksum


def verify_store(store: store_lib.EncodingStore, repair: bool = False,
                 progress: ProgressFn = None, share: Sequence[int] | None = None
                 ) -> Verified:
  """Re-reads every chunk marked done and checks it against its marker.

  Each process checks its ``share`` of the chunks (default ``written_share``)
  and returns the bad ones of it, and how many had no checksum to check
  (markers of an earlier format); ``repair`` removes the bad ones' markers,
  so the next encode rewrites exactly them. Chunks never written are not
  reported here (``pending_chunks``).
  """
  share = written_share(store) if share is None else share
  bad, unchecked = {}, 0
  for i, chunk in enumerate(share):
    why, checked = store.check_chunk(chunk)
    if why:
      bad[chunk] = why
      if repair:
        store.unmark(chunk)
    unchecked += not checked
    _report(progress, i + 1, len(share))
  _barrier("tracer-verify-store-done")
  return Verified(bad, unchecked)


class Streamed(NamedTuple):
  topk: scan_lib.TopK
  quarantined: int   # rows left out for a non-finite loss or gradient


def stream_corpus(encoder: GradientEncoder, basis: hessian.Basis | None, corpus,
                  query_vectors: np.ndarray, metric: hessian.QueryMetric, k: int,
                  batch_size: int, progress: ProgressFn = None,
                  max_quarantined: float = DEFAULT_MAX_QUARANTINED,
                  shard_queries: bool | None = None, on_plan=None) -> Streamed:
  """Streaming mode: each corpus batch is scored as it is encoded, no store
  (``query_vectors`` and ``metric`` from ``query_metric``).

  Rows are split into one contiguous range per data group; each process reads
  and encodes its own, and only top-k candidates cross hosts. Rows with a
  non-finite loss or gradient are left out, as a store scan leaves them, and
  counted: more than ``max_quarantined`` of the corpus is an error
  (``encode_corpus``'s). ``shard_queries``: ``scan.StreamingScanner``'s;
  ``on_plan``: called with its ``plan`` before the first batch.
  """
  groups, group, _ = partitioning.data_groups(encoder.mesh)
  n = len(corpus)
  bounds = [(g * n // groups, (g + 1) * n // groups) for g in range(groups)]
  scanner = scan_lib.StreamingScanner(query_vectors, k, encoder.mesh,
                                      metric=metric.row_metric(),
                                      shard_queries=shard_queries)
  if on_plan is not None:
    on_plan(scanner.plan)
  done = quarantined = 0
  for rows, examples, valid in _run_local_batches(
      encoder, corpus, iter(bounds[group:group + 1]),
      max(b - a for a, b in bounds), batch_size):
    projected = encoder.project_local(examples, valid)
    quarantined += projected.count
    _check_quarantined(corpus, rows, projected, quarantined, max_quarantined, n)
    ids = np.zeros(len(valid), np.int32)
    ids[:len(rows)] = rows
    scanner.add_stepped(rotate(basis, projected.phi), encoder.put_local(ids),
                        projected.usable)
    done += len(rows)
    _report(progress, done, bounds[group][1] - bounds[group][0])
  return Streamed(scanner.result(), quarantined)


# --- results ------------------------------------------------------------------

def result_rows(queries: Sequence[dict], corpus, topk: scan_lib.TopK,
                skipped: dict[int, str] | None = None,
                predictions: Sequence[str] | None = None) -> list[dict]:
  """One results line per query (the TrackStar retrieval-file fields); reads
  only the ids and texts of the rows retrieved. A query in ``skipped``
  (``query_metric``'s) gets no proponents or opponents and its reason in
  ``error``. ``predictions``: the model's completion of each query
  (``predictions()``), written as ``prediction``, with its probabilities when
  they are ``Prediction``s (``tracer.evaluate.make_result_row``)."""
  skipped = skipped or {}
  preds = [None] * len(queries) if predictions is None else list(predictions)
  keep = [i for i in range(len(queries)) if i not in skipped]
  rows = np.unique(np.concatenate([topk.proponent_rows[keep].ravel(),
                                   topk.opponent_rows[keep].ravel()]))
  rows = rows[rows != scan_lib.INVALID_ROW]
  ids = dict(zip(rows.tolist(), corpus.ids_of(rows)))
  texts = dict(zip(rows.tolist(), corpus.texts_of(rows)))
  out = []
  for i, q in enumerate(queries):
    if i in skipped:
      row = evaluate.make_result_row(q, [], [], [], **_prediction_args(preds[i]))
      row["error"] = f"{skipped[i]}: no proponents computed"
      out.append(row)
      continue
    # Fewer rows than k outside quarantine: the scan fills the rest with
    # INVALID_ROW, which no record lists. Nor a score that is not finite
    # (an inf encoding, only through scan_arrays): JSON has no such number.
    real_p = ((topk.proponent_rows[i] != scan_lib.INVALID_ROW)
              & np.isfinite(topk.proponent_scores[i]))
    real_o = ((topk.opponent_rows[i] != scan_lib.INVALID_ROW)
              & np.isfinite(topk.opponent_scores[i]))
    prop = topk.proponent_rows[i][real_p].tolist()
    opp = topk.opponent_rows[i][real_o].tolist()
    out.append(evaluate.make_result_row(
        q, [ids[r] for r in prop], topk.proponent_scores[i][real_p],
        [texts[r] for r in prop], [ids[r] for r in opp],
        topk.opponent_scores[i][real_o], [texts[r] for r in opp],
        **_prediction_args(preds[i])))
  return out


def _prediction_args(pred: str | None) -> dict:
  """``make_result_row``'s prediction arguments; the probabilities when
  ``pred`` is a ``Prediction``."""
  return {"prediction": pred,
          "prediction_probability": getattr(pred, "probability", None),
          "target_probability": getattr(pred, "target_probability", None)}


def write_results(location: str, rows: Sequence[dict]) -> None:
  """Writes the results file once, complete, from process 0."""
  if jax.process_index() == 0:
    evaluate.write_results(location, rows)
  _barrier("tracer-results-written")


class Prediction(str):
  """A greedy completion: the text (a ``str``, so it prints, compares and
  serializes as one), and ``probability`` = p(completion | prompt),
  ``target_probability`` = p(target | prompt), both under the model."""

  probability: float | None
  target_probability: float | None

  def __new__(cls, text: str, probability: float | None = None,
              target_probability: float | None = None):
    self = super().__new__(cls, text)
    self.probability, self.target_probability = probability, target_probability
    return self


def predictions(ckpt: ckpt_lib.Checkpoint, query_examples: dict,
                queries: Sequence[dict], vocab, batch_size: int = 256,
                mesh: Mesh | None = None) -> list[Prediction]:
  """The model's greedy completion of each prompt, as long as its target
  (``batch_size`` queries per decode call: memory stays bounded for large
  query sets; every call but the last has the same shape), with its
  probability and the target's (``Prediction``).

  With ``mesh`` (the one ``ckpt``'s params are on), each call's queries are
  split over its ``data`` axis; without it every device decodes them all.
  """
  target_tokens = [vocab.encode(q["target"]) for q in queries]
  steps = max(map(len, target_tokens))
  # Causal models: positions past the last one read cannot change its
  # logits, so the decode and both probabilities (their weighted positions
  # end before ``length``) run on the prompts' ends only.
  length = decode_length(query_examples["weights"], steps)
  cut = lambda examples: {k: v[:, :length] for k, v in examples.items()}
  tokens = np.concatenate([
      _split_over_data(_greedy_decode, ckpt, cut(batch), mesh, steps)
      for batch in example_slices(query_examples, batch_size)])
  completions = [[int(t) for t in row[:len(tt)]]
                 for row, tt in zip(tokens, target_tokens)]
  # The completion scored as a target, after the same (possibly cut) prompt.
  max_len = query_examples["inputs"].shape[1]
  completion_examples = data_lib.stack_examples([
      data_lib.query_example(vocab.encode(q["prompt"]), c, max_len)
      for q, c in zip(queries, completions)])
  p_completion = _probabilities(ckpt, cut(completion_examples), batch_size, mesh)
  p_target = _probabilities(ckpt, cut(query_examples), batch_size, mesh)
  return [Prediction(vocab.decode(c), float(pc), float(pt))
          for c, pc, pt in zip(completions, p_completion, p_target)]


def decode_length(weights: np.ndarray, steps: int) -> int:
  """Positions a greedy decode of ``steps`` tokens reads from query examples
  with ``weights [B, L]``: through the longest prompt (the positions before
  the first weighted one) plus ``steps``, rounded up to a power of two (few
  shapes to compile), at most L."""
  prompt = int(np.argmax(np.asarray(weights) > 0, axis=1).max(initial=0))
  return min(weights.shape[1], 1 << (prompt + steps).bit_length())


# Jitted once per (family, config, steps): jitting ``family.greedy_decode`` at
# each call would compile again every time (a bound method is a new object).
@functools.partial(jax.jit, static_argnums=(0, 1, 4))
def _greedy_decode(family, model_config, params, examples: dict, steps: int
                   ) -> jax.Array:
  """i32[B, steps]: the greedy continuation of each prompt."""
  return family.greedy_decode(model_config, params, examples, steps)


def _split_over_data(fn, ckpt: ckpt_lib.Checkpoint, examples: dict,
                     mesh: Mesh | None, *static) -> np.ndarray:
  """``fn(family, model_config, params, examples, *static)`` on the host, its
  leading axis one per example. With ``mesh`` the examples are split over its
  ``data`` axis (padded to a multiple of it by repeating the last; every
  process holds them all and places only its devices' part)."""
  n = len(examples["inputs"])
  if mesh is None:
    return np.asarray(jax.device_get(
        fn(ckpt.family, ckpt.model_config, ckpt.params, examples, *static)))
  sharding = partitioning.data_batch(mesh)
  size = partitioning.padded_size(n, mesh.shape[partitioning.DATA])
  placed = jax.tree.map(lambda x: partitioning.put_global(x, sharding),
                        repeat_last(examples, size))
  out = fn(ckpt.family, ckpt.model_config, ckpt.params, placed, *static)
  return partitioning.fetch(out)[:n]


def repeat_last(examples: dict, size: int) -> dict:
  """``examples`` padded to ``size`` rows by repeating the last (a real
  example keeps every loss finite)."""
  n = len(examples["inputs"])
  take = np.minimum(np.arange(size), n - 1)
  return {key: np.asarray(value)[take] for key, value in examples.items()}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _target_logprobs(family, model_config, params, examples: dict) -> jax.Array:
  """f32[B]: sum log p(target | prompt) of each query example."""
  return jax.vmap(lambda ex: family.target_logprob(model_config, params, ex))(examples)


def _probabilities(ckpt: ckpt_lib.Checkpoint, examples: dict, batch_size: int,
                   mesh: Mesh | None) -> np.ndarray:
  """f64[B]: p(target | prompt) of each query example, ``batch_size`` at a time."""
  logprobs = np.concatenate([
      _split_over_data(_target_logprobs, ckpt, batch, mesh)
      for batch in example_slices(examples, batch_size)])
  return np.exp(logprobs.astype(np.float64))


def completion_accuracy(queries: Sequence[dict], preds: Sequence[str]) -> dict:
  """Fraction of targets the model completes exactly, overall and per bucket."""
  groups: dict[str, list[bool]] = {"all": []}
  for q, pred in zip(queries, preds):
    hit = pred == q["target"]
    groups["all"].append(hit)
    if "bucket" in q:
      groups.setdefault(q["bucket"], []).append(hit)
  order = sorted(groups, key=lambda b: (b != "all", evaluate.bucket_sort_key(b)
                                        if b != "all" else 0))
  return {b: {"accuracy": float(np.mean(groups[b])), "num_queries": len(groups[b])}
          for b in order}
