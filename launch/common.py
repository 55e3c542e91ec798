"""What several launch scripts share: setting a run up, the
basis / store / query-metric steps with their printout, and the proponent
table. The stages themselves live in ``tracer.pipeline``."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple, Sequence

from absl import flags
import jax

from tracer.launch import cli
from tracer.launch import config
from tracer.launch.progress import Progress, say
from tracer import checkpoint as ckpt_lib
from tracer import claim as claim_lib
from tracer import corpus as corpus_lib
from tracer import data as data_lib
from tracer import hessian
from tracer import pipeline
from tracer import scan as scan_lib
from tracer import storage
from tracer import store as store_lib
from tracer.config import (ENCODING_SETTINGS, DataConfig, EncodeConfig, OptimizerConfig,
                           PreconditionerConfig)
from tracer.errors import InputError, QuarantineLimitError


class Run(NamedTuple):
  """What every stage script builds first, from flags and gin."""
  encode_config: EncodeConfig
  ckpt: Any
  corpus: Any
  encoder: Any
  correction: str
  epsilon: float


def start(workdir: str | None, checkpoint: str | None, corpus_source: str,
          store: str | None = None, opt_state: str = "second_moment") -> Run:
  """The mesh (``EncodeConfig.model_axis``), the checkpoint restored onto it,
  the corpus row table and the encoder; encoding as the store at ``store``
  was encoded, if there is one (``encode_config``). ``opt_state``: what of
  a tracer checkpoint's optimizer state to restore (``ckpt_lib.restore``;
  by default only what the encoder reads)."""
  ecfg = encode_config(store)
  mesh = pipeline.make_mesh(ecfg)
  if (config.FLAGS.family and checkpoint and not ckpt_lib.is_tracer_checkpoint(checkpoint)
      and (storage.exists(checkpoint) or storage.list_dir(checkpoint))):
    # (Nothing there: not another format, but the restore's "no checkpoint".)
    ckpt = released_checkpoint(checkpoint, mesh)   # (its configs are gin's)
    config.check_bound_fields(type(ckpt.model_config), ckpt.model_config, ckpt.path)
  else:
    check_released_flags(checkpoint or f"--workdir={workdir}'s checkpoint")
    ckpt = pipeline.load_checkpoint(workdir, checkpoint, mesh, opt_state)
    check_bound_configs(ckpt)
  corpus = pipeline.open_corpus(ckpt, tokenized_once(workdir, corpus_source, ckpt))
  # Queries and resumed chunks take the factored kernel's weights as the
  # store's rows were encoded, without verifying the kernel again.
  stored = stored_manifest(store)
  encoder, kind, eps = pipeline.build_encoder(
      ckpt, ecfg, mesh, factored_weights=stored.factored if stored else None)
  return Run(ecfg, ckpt, corpus, encoder, kind, eps)


def check_bound_configs(ckpt) -> None:
  """A tracer checkpoint's configs win over gin's: a binding naming another
  value would be ignored, so it is refused (InputError). Of the optimizer's,
  only what the correction reads (a schedule overridden for training is
  not). ``ckpt``: restored, or its configs alone (``ckpt_lib.saved_config``:
  ``tracer family`` checks a trained set's before reusing it)."""
  config.check_bound_fields(DataConfig, pipeline.data_config(ckpt), ckpt.path)
  config.check_bound_fields(OptimizerConfig, {
      name: getattr(ckpt.optimizer_config, name) for name in ("name", "b2", "eps")},
      ckpt.path)
  config.check_bound_fields(type(ckpt.model_config), ckpt.model_config, ckpt.path)


def stored_manifest(store: str | None) -> store_lib.Manifest | None:
  """The manifest of the store at ``store``, or None where there is none."""
  if not store or not storage.exists(storage.join(store, store_lib.MANIFEST)):
    return None
  return store_lib.read_manifest(store)


def corpus_source(location: str, given: str | None) -> str:
  """``--corpus``, else the store's own (its manifest): the tokenized corpus
  its rows were read from (row by row, as a pod host must), else its source."""
  if given:
    return given
  manifest = storage.join(location, store_lib.MANIFEST)
  if not storage.exists(manifest):
    raise InputError(f"{location}: no store to take the corpus from; pass "
                     "--corpus (tracer trace encodes it), or encode it first "
                     "(tracer encode)")
  m = store_lib.open_store(location).manifest
  if m.corpus_rows and corpus_lib.is_tokenized(m.corpus_rows):
    return m.corpus_rows
  if m.corpus_rows:
    say(f"the store's tokenized corpus {m.corpus_rows} is gone; reading "
        f"its source {m.corpus} whole instead")
  return m.corpus


def start_on_store(workdir: str | None, checkpoint: str | None,
                   corpus: str | None, location: str) -> tuple[Run, str]:
  """``start`` for a script with a store at ``location`` (trace, scan,
  serve): the corpus is ``--corpus``, else the store's own (``corpus_source``).
  Returns the run and the corpus source."""
  source = corpus_source(location, corpus)
  try:
    return start(workdir, checkpoint, source, location), source
  except InputError as e:
    if corpus or source not in str(e):
      raise
    raise InputError(f"{e} (the store's corpus, from its manifest; pass "
                     "--corpus)") from None


def encode_config(store: str | None = None) -> EncodeConfig:
  """``EncodeConfig`` from gin; where a store exists at ``store``, with the
  settings its rows were encoded with (its manifest's ``encode_config``) for
  every one gin does not bind, so that queries are encoded as its rows were
  (``tracer serve --workdir=W`` serves a store made with any gin file). A
  gin binding that differs from the store's is an error."""
  ecfg = config.make(EncodeConfig)
  manifest = stored_manifest(store)
  if manifest is None:
    return ecfg
  stored = {k: v for k, v in manifest.encode_config.items() if k in ENCODING_SETTINGS}
  try:
    config.check_bound_fields(EncodeConfig, stored, store, "a store encoded with",
                              "the gin files it was encoded with, or another --store")
  except InputError as e:
    raise store_lib.IncompatibleStoreError(str(e)) from None
  merged = dataclasses.replace(ecfg, **stored)
  try:  # gin's values were checked by make(): a failure is the manifest's
    config.check_fields(merged)
  except InputError as e:
    raise InputError(f"{storage.join(store, store_lib.MANIFEST)}: encode_config: "
                     f"{str(e).removeprefix('gin: ')} (a damaged manifest?)") from None
  taken = {k: v for k, v in stored.items() if getattr(ecfg, k) != v}
  if taken:
    say(f"store {store}: encoded with " + ", ".join(
        f"{k}={v!r}" for k, v in taken.items()) + "; encoding queries the same way")
  return merged


def tokenized_once(workdir: str | None, source: str, ckpt) -> str:
  """The corpus to open: on several processes, a source not yet tokenized is
  tokenized into ``WORKDIR/corpus`` first (``pipeline.tokenize_on_processes``:
  each process its share of the files), so that no host reads or holds the
  whole corpus; later runs reuse it. On one process, ``source`` as it is."""
  files, _ = data_lib.split_source(source)
  if (jax.process_count() == 1 or corpus_lib.is_tokenized(files)
      or (not storage.is_url(files) and os.path.isdir(files))):
    return source  # open_corpus reads it, or says what is wrong with it
  if not workdir:
    raise InputError(f"--corpus={source}: on {jax.process_count()} processes a "
                     "corpus is tokenized once for all of them, into "
                     "WORKDIR/corpus: pass --workdir (or tokenize it first: "
                     "tracer tokenize --output=DIR, then --corpus=DIR)")
  location = storage.join(workdir, "corpus")
  if corpus_lib.is_tokenized(location):
    made_from = corpus_lib.read_manifest(location).source
    if not data_lib.same_source(made_from, source):
      raise InputError(f"{location}: holds the tokenized corpus of {made_from}, "
                       f"not of --corpus={source}; pass --corpus={location} to use "
                       "it, or another --workdir")
  else:
    share = "files" if data_lib.is_file_source(source) else "seqio shards"
    say(f"tokenizing {source} into {location}, " + (
        f"each of {jax.process_count()} processes its share of the {share}"
        if data_lib.splits_among_processes(source) else "by process 0 (a seqio "
        "source; TASK#shards=N splits it among the processes)"))
  progress, written = Progress("tokenize", unit="rows"), [0]

  def report(rows: int) -> None:
    written[0] += rows
    progress(written[0])

  corpus = pipeline.tokenize_on_processes(
      source, location, pipeline.data_config(ckpt),
      ckpt.family.max_len(ckpt.model_config), report)
  progress.close()
  say(f"corpus {source}: {len(corpus):,} rows in {location} (later runs may pass "
      f"--corpus={location})")
  return location


def check_released_flags(checkpoint: str) -> None:
  """InputError for ``--tokenizer`` or ``--opt_state`` given with a tracer
  checkpoint, which has its own (they were ignored)."""
  for name in ("tokenizer", "opt_state"):
    if getattr(config.FLAGS, name):
      raise InputError(f"--{name}={getattr(config.FLAGS, name)}: only for released "
                       "weights (--family with a --checkpoint in the family's own "
                       f"format); {checkpoint} is a tracer checkpoint, which has "
                       f"its own {'tokenizer' if name == 'tokenizer' else 'optimizer state'}")


def released_checkpoint(location: str, mesh):
  """``--checkpoint`` in ``--family``'s own format (released weights), its
  model config and optimizer from gin, its tokenizer ``--tokenizer``."""
  family = config.model_family()
  data = config.make(DataConfig)
  if config.FLAGS.tokenizer:
    data = dataclasses.replace(data, tokenizer=family.name,
                               sentencepiece_model=config.FLAGS.tokenizer)
  ckpt = pipeline.load_released(
      family, config.make(config.model_config_class()), location, mesh,
      config.make(OptimizerConfig), data, config.FLAGS.opt_state)
  say(f"{location}: {family.name} weights in the library's own format"
      + ("" if ckpt.opt_state is not None else
         "; no optimizer state (--opt_state): no optimizer correction"))
  return ckpt


def fitted_basis(location: str, run: Run, pcfg: PreconditionerConfig,
                 params_fingerprint: str) -> hessian.Basis | None:
  """R_train's basis: the one saved at ``location`` if it was fitted the same
  way, else fitted now (each host its part of the sample) and saved there."""
  if pcfg.kind == "none":
    return None
  key = pipeline.basis_key(params_fingerprint, run.encoder, run.correction,
                           run.epsilon, run.corpus, pcfg)
  basis, reused = pipeline.load_or_fit_basis(location, key, lambda: (
      pipeline.fit_basis(run.encoder, run.corpus, pcfg, run.encode_config.batch_size,
                         Progress("fit R_train"), key)))
  say(f"R_train basis {'reused from' if reused else 'fitted, saved to'} "
      f"{location}: {basis.kind}, {basis.num_train} corpus examples, d={basis.dim}")
  return basis


flags.DEFINE_float("max_quarantined", pipeline.DEFAULT_MAX_QUARANTINED,
                   "Stop encoding when more than this fraction of the corpus rows "
                   "being encoded have a non-finite loss or gradient (they are "
                   "quarantined: stored as zeros, never returned).")
flags.DEFINE_float("claim_timeout_s", claim_lib.DEFAULT_STALE_AFTER_S,
                   "A store's writer claim without a heartbeat for this long is "
                   "taken over (its job is presumed dead).")
# (absl's bounds let NaN through: every comparison with it is False.)
flags.register_validator("max_quarantined", lambda v: 0 <= v <= 1,
                         "expected a fraction in [0, 1]")
flags.register_validator("claim_timeout_s", lambda v: 0 < v < float("inf"),
                         "expected finite seconds > 0")
flags.DEFINE_bool("verify_store", False, "Before resuming or reusing a store, "
                  "re-read its written chunks and rewrite those whose bytes do "
                  "not match their checksums (reads the whole store).")
flags.DEFINE_bool("check_chunks", True, "Check each store chunk a scan reads "
                  "against the checksum in its marker (costs CPU time in the "
                  "reading thread; see WORKSPACE.md).")
flags.DEFINE_enum(
    "shard_queries", "auto", ["auto", "always", "never"],
    "Split the queries and their top-k over the devices (blocks passed "
    "around a ring) instead of holding them whole on each: auto (where whole "
    "ones would need several passes over the store, or, streaming, would "
    "take more than a quarter of a device), always, never.")
FLAGS = flags.FLAGS

# --shard_queries as the scan's argument.
SHARD_QUERIES = {"auto": None, "always": True, "never": False}


def say_query_plan(plan) -> None:
  """Says how a scan takes its queries (``scan.QueryPlan``) where it is
  not the plain one pass of whole queries: several passes over the rows,
  or the queries split over the devices; and its step where that is staged
  through the host or prefetches fewer steps than asked (``StepPlan``)."""
  if plan.passes > 1 or plan.split or plan.sets > 1:
    say(plan.describe())
  if plan.step is not None and plan.step.notable:
    say(plan.step.describe())


def stored(location: str, run: Run, pcfg: PreconditionerConfig
           ) -> store_lib.EncodingStore:
  """The store at ``location`` made for this run's checkpoint, encoder,
  corpus and basis settings (``pipeline.existing_store``); an error when
  there is none."""
  expected = pipeline.manifest(run.ckpt, run.encoder, run.correction, run.epsilon,
                               None, run.corpus, run.encode_config)
  store = pipeline.existing_store(location, expected, pcfg)
  if store is None:
    raise InputError(f"{location}: no store; encode the corpus first "
                     "(tracer trace or tracer encode)")
  return store


def check_given_basis(basis_location: str | None) -> None:
  """A ``--basis`` a store is to be encoded in names a file, checked before
  any work (before 2026-12-07 a missing one was ignored: the store fitted
  its own, silently)."""
  if basis_location and not storage.exists(basis_location):
    raise InputError(f"--basis={basis_location}: no such file; expected a basis "
                     "saved by tracer fit-preconditioner (or a streaming run), "
                     "or no --basis for the store to fit its own")


def check_store_basis(store: store_lib.EncodingStore, basis_location: str
                      ) -> None:
  """A ``--basis`` beside an existing store names the basis its rows are in:
  the store's rows cannot be taken into another (before 2026-12-08 the
  store's own was used, silently)."""
  given = hessian.Basis.load(basis_location).fingerprint()
  have = store.manifest.basis_fingerprint
  if given != have:
    raise InputError(
        f"--basis={basis_location}: the store {store.path} exists, and its rows "
        f"are in {'another basis (fingerprint ' + have + ')' if have else 'no basis'}"
        f", not this one ({given}); expected no --basis (the store's own is "
        "used), or another --store to encode in this basis")


def encoded_store(location: str, run: Run, pcfg: PreconditionerConfig,
                  params_fingerprint: str, basis_location: str | None = None
                  ) -> tuple[store_lib.EncodingStore, hessian.Basis | None]:
  """The corpus store at ``location``, complete: reused as it is when it
  already is (no corpus gradient is computed), else resumed, else created
  (with the basis at ``basis_location``, or one fitted now) and encoded.
  Writing takes the store's claim first (one writer: ``tracer.claim``)."""
  expected = pipeline.manifest(run.ckpt, run.encoder, run.correction, run.epsilon,
                               None, run.corpus, run.encode_config,
                               params_fingerprint)
  store = pipeline.existing_store(location, expected, pcfg)
  if store is not None and basis_location:
    check_store_basis(store, basis_location)
  if (store is not None and not FLAGS.verify_store
      and not len(pipeline.agreed_pending_chunks(store))):
    say(f"store {location}: complete, reused as it is (no corpus gradient "
        "computed)")
    if jax.process_index() == 0:
      # A job killed after its last chunk left its claim behind. Reading a
      # complete store needs no claim: one that cannot be removed (a store
      # the job may only read) is said, not an error.
      try:
        claim_lib.clear_stale(location, FLAGS.claim_timeout_s)
      except InputError as e:
        say(f"store {location}: a dead job's claim is left in place: {e}")
    return store, pipeline.store_basis(store)
  key = pipeline.basis_key(params_fingerprint, run.encoder, run.correction,
                           run.epsilon, run.corpus, pcfg)
  given = None  # --basis for a new store, checked before anything is written
  if store is None and basis_location:
    given = pipeline.given_basis(basis_location, key)
  if store is None:  # a location that cannot be a store, before the basis fit
    store_lib.check_creatable(location, (pipeline.BASIS_FILE,))
  claim = pipeline.claim_store(location, FLAGS.claim_timeout_s)
  if claim is None:  # not process 0, which holds the job's claim
    return _encode_store(location, run, pcfg, key, basis_location, given,
                         expected, None)
  if claim.taken_over:
    owner, why = claim.taken_over
    say(f"store {location}: took over the claim of {claim_lib.describe(owner)} "
        f"({why})")
  # Released however this process ends, also when a signal or another
  # process's failure ends it without unwinding (launch.cli).
  with cli.undone_at_end(claim.release):
    return _encode_store(location, run, pcfg, key, basis_location, given,
                         expected, claim)


def _encode_store(location, run, pcfg, key, basis_location, given, expected,
                  claim):
  store = pipeline.existing_store(location, expected, pcfg)
  if store is not None:
    basis = pipeline.store_basis(store)
    if FLAGS.verify_store:
      bad = pipeline.verify_store(store, repair=True, progress=Progress(
          "verify store", "chunks")).bad
      say(f"store {location}: verified; {len(bad)} bad chunk(s) in process 0's "
          "share" + (f", rewriting them: {sorted(bad)[:10]}" if bad else ""))
    if not len(pipeline.agreed_pending_chunks(store)):
      say(f"store {location}: complete, reused as it is")
      return store, basis
    say(f"store {location}: resuming")
  else:
    if given is not None:
      basis = given
      say(f"R_train basis from {basis_location}")
    else:
      basis = pipeline.fit_basis(
          run.encoder, run.corpus, pcfg, run.encode_config.batch_size,
          Progress("fit R_train"), key)
    store = pipeline.open_store(location, dataclasses.replace(
        expected, basis_fingerprint=basis.fingerprint() if basis else None,
        factored=pipeline.planned_weights(run.encoder, run.corpus)), basis)
  encoded = pipeline.encode_corpus(run.encoder, basis, run.corpus, store,
                                   run.encode_config.batch_size,
                                   Progress("encode corpus"),
                                   max_quarantined=FLAGS.max_quarantined,
                                   claim=claim)
  say(f"store {location}: {store.num_rows} rows x d={store.dim} "
      f"({store.manifest.dtype}); process 0 encoded {encoded.rows} rows; "
      f"{encoded.quarantined} quarantined in this run (non-finite loss or "
      "gradient: stored as zeros, never returned)")
  return store, basis


def task_metric(run: Run, basis, path: str | None, pcfg: PreconditionerConfig
                ) -> hessian.QueryMetric | None:
  """``--task_queries``: R fitted once from that file's queries, projected
  with ``run``'s checkpoint in ``basis`` (``pipeline.task_metric``),
  reported; None without a path."""
  if not path:
    return None
  if basis is None or not pcfg.task_specific:
    raise InputError(f"--task_queries={path}: this R has no R_eval "
                     "(PreconditionerConfig.kind='none' or task_specific=False), "
                     "so the task's queries would change nothing")
  queries, examples = pipeline.read_queries(run.ckpt, path)
  ids = [q["id"] for q in queries]
  try:
    metric, skipped = pipeline.task_metric(run.encoder, basis, examples, pcfg,
                                           run.encode_config.batch_size, ids)
  except QuarantineLimitError as e:
    raise InputError(f"--task_queries={path}: {e}") from None
  left_out = ""
  if skipped:
    left_out = (f"; {len(skipped)} left out for a non-finite loss or gradient "
                f"(first: {ids[min(skipped)]!r})")
  say(f"task R from {path} (step {run.ckpt.step}): {metric.num_eval} of "
      f"{len(queries)} queries, lambda={metric.lam:.4g}{left_out}; every query "
      "set is scored under it")
  return metric


def query_metric(run: Run, basis, query_examples: dict, queries: Sequence[dict],
                 pcfg: PreconditionerConfig, task=None):
  """The query set's R^(-1) (``task``'s when given, ``task_metric``) and
  query vectors (``pipeline.query_metric``), reported."""
  ids = [q["id"] for q in queries]
  metric, vectors, skipped = pipeline.query_metric(
      run.encoder, basis, query_examples, pcfg, run.encode_config.batch_size, ids,
      task)
  cols = sum(c.shape[1] for c in metric.lowrank)
  capped = ""
  if metric.lam_rule is not None and metric.lam < metric.lam_rule:
    capped = (f" (the rule's {metric.lam_rule:.4g}, capped: each query adds at "
              f"most {pcfg.max_query_weight:g} of R_train's trace)")
  whose = (f"the task's ({metric.num_eval} queries)" if task is not None
           else f"fitted from these {len(queries)} queries" if pcfg.task_specific
           else "= R_train alone (task_specific=False)")
  say(f"R {whose}, applied at scan time: "
      f"{basis.kind if basis else 'none'}, lambda={metric.lam:.4g}{capped}, "
      f"damping={metric.damping:g}, {cols} low-rank columns")
  if skipped:
    first = min(skipped)
    say(f"warning: {len(skipped)} of {len(queries)} queries have a non-finite "
        f"loss or gradient and get no proponents (first: {ids[first]!r}, "
        f"{skipped[first]}); their results lines say so in 'error'")
  return metric, vectors, skipped


def summed_checkpoints(sum_steps: Sequence, ckpt, stores_at: str | None = None
                       ) -> list[str]:
  """The checkpoint directories of ``--sum_steps`` (steps of ``ckpt``'s run
  other than its own), checked before any gradient: each step must be
  there, and with ``stores_at`` (the main store's location) its store
  ``<stores_at>-step<N>`` too."""
  steps = []
  for step in sum_steps:
    if not (str(step).isascii() and str(step).isdigit()):  # int() refuses "²"
      raise InputError(f"--sum_steps: {step!r} is not a training step (a "
                       "non-negative integer)")
    steps.append(int(step))
  if ckpt.step in steps or len(set(steps)) != len(steps):
    raise InputError(f"--sum_steps: {steps} repeats a step (the traced "
                     f"checkpoint is step {ckpt.step} and always counts once)")
  parent = storage.split(ckpt.path)[0]
  if steps:
    try:
      ckpt_lib.check_steps(parent, steps)
    except InputError as e:
      raise InputError(f"--sum_steps: {e}") from None
  for step in steps if stores_at else ():
    where = f"{stores_at}-step{step}"
    if not storage.exists(storage.join(where, store_lib.MANIFEST)):
      raise InputError(f"{where}: no store for --sum_steps step {step}; encode "
                       f"it first (tracer trace --sum_steps={step})")
  return [storage.join(parent, str(step)) for step in steps]


def summed_runs(paths: Sequence[str], workdir: str, corpus_source: str,
                location: str, open_store):
  """For each checkpoint in ``paths`` (another step of a sum over
  checkpoints), loaded one at a time: ``(run, store, basis)``, its store at
  ``<location>-step<N>`` opened by ``open_store(location, run) -> (store,
  basis)``. A caller that drops ``run`` frees its params before the next."""
  for path in paths:
    other = start(workdir, path, corpus_source,
                  f"{location}-step{storage.split(path)[1]}")
    say(f"summed: checkpoint {other.ckpt.path} (step {other.ckpt.step})")
    store, basis = open_store(f"{location}-step{other.ckpt.step}", other)
    yield other, store, basis
    del other, store, basis


def summed_sets(paths: Sequence[str], workdir: str, corpus_source: str,
                location: str, open_store, sets, pcfg: PreconditionerConfig,
                task_path: str | None = None):
  """The other parts of a scan summed over checkpoints (``summed_runs``),
  each loaded once, with every query set's R (or the one ``task_path``'s
  queries give) and vectors in its store's basis. ``sets``:
  ``(query_examples, queries)`` each.

  Returns (stores, per set: (row metrics, query vectors, skipped queries))."""
  stores, per_set = [], [([], [], {}) for _ in sets]
  for other, store, basis in summed_runs(paths, workdir, corpus_source, location,
                                         open_store):
    task = task_metric(other, basis, task_path, pcfg)
    for (examples, queries), (metrics, vectors_list, skipped) in zip(sets, per_set):
      metric, vectors, more = query_metric(other, basis, examples, queries, pcfg,
                                           task)
      metrics.append(metric.row_metric())
      vectors_list.append(vectors)
      for query, why in more.items():  # the first part's reason stands
        skipped.setdefault(query, why)
    stores.append(store)
    del other  # its params leave the devices before the next checkpoint's
  return stores, per_set


def check_query_sets(sets: Sequence, streaming: bool = False) -> None:
  """InputError, before any work, for flags several query sets
  (``config.query_set_files``) cannot take."""
  if len(sets) == 1:
    return
  if streaming:
    raise InputError("--streaming scores one query set as the corpus is "
                     "encoded; expected one --queries file, or several without "
                     "--streaming (one pass over the store for them all)")


def scan_query_sets(run: Run, store, basis, read, others: Sequence[str],
                    workdir: str, corpus_source: str, location: str, open_store,
                    pcfg: PreconditionerConfig, task_path: str | None, top_k: int,
                    shard_queries: bool | None = None) -> list[tuple]:
  """Each query set's top-k from ``store`` (summed with the ``others``'
  stores, ``summed_sets``), every set with its own R (``task_path``'s for
  all where given): one set by ``scan.scan_stores``, several in one pass
  by ``scan.scan_sets``. ``read``: per set ``(queries, examples)``
  (``pipeline.read_queries``). Returns per set ``(TopK, skipped queries)``."""
  task = task_metric(run, basis, task_path, pcfg)
  own = [query_metric(run, basis, examples, queries, pcfg, task)
         for queries, examples in read]
  stores, parts = summed_sets(others, workdir, corpus_source, location, open_store,
                              [(examples, queries) for queries, examples in read],
                              pcfg, task_path)
  metrics = [[m.row_metric(), *ms] for (m, _, _), (ms, _, _) in zip(own, parts)]
  vectors = [[v, *vs] for (_, v, _), (_, vs, _) in zip(own, parts)]
  scanned = dict(mesh=run.encoder.mesh, verify=FLAGS.check_chunks,
                 progress=Progress("scan store", "rows"), on_plan=say_query_plan)
  if len(read) == 1:
    found = [scan_lib.scan_stores([store, *stores], vectors[0], top_k,
                                  metrics=metrics[0], shard_queries=shard_queries,
                                  **scanned)]
  else:
    found = scan_lib.scan_sets([store, *stores], vectors, top_k, metrics=metrics,
                               shard_queries=shard_queries, **scanned)
  return [(topk, {**more, **skipped})
          for topk, (_, _, skipped), (_, _, more) in zip(found, own, parts)]


def write_set(run: Run, queries, examples: dict, topk, skipped: dict,
              output: str) -> tuple[list[dict], list]:
  """A query set's results rows, written to ``output``; returns them and
  the model's predictions."""
  preds = pipeline.predictions(run.ckpt, examples, queries,
                               pipeline.data_config(run.ckpt).vocabulary(),
                               mesh=run.encoder.mesh)
  rows = pipeline.result_rows(queries, run.corpus, topk, skipped, preds)
  pipeline.write_results(output, rows)
  say(f"wrote {len(rows)} results to {output}")
  return rows, preds


def default_location(workdir: str, given: str | None, name: str) -> str:
  return given or storage.join(workdir, name)


def print_table(rows: Sequence[dict], preds: Sequence[str], num_queries: int,
                num_proponents: int = 3, width: int = 70) -> None:
  """A readable table: prompt, target, prediction, top proponents and scores.

  Ids and texts come from the corpus and queries, so they are untrusted: their
  control characters (terminal escape sequences) are shown escaped."""
  from tracer.launch.cli import printable  # pylint: disable=g-import-not-at-top
  for row, pred in list(zip(rows, preds))[:num_queries]:
    mark = "ok" if pred == row["target"] else "wrong"
    print(f"\n{printable(row['query_id'])}: {row['prompt']!r} -> target "
          f"{row['target']!r}, model says {pred!r} ({mark})")
    truth = set(row.get("fact_doc_ids", ()))
    print(f"  {'rank':>4}  {'score':>7}  {'id':<10}  text")
    for rank, (pid, score, text) in enumerate(zip(
        row["proponent_ids"], row["proponent_scores"], row["proponents"]), 1):
      if rank > num_proponents:
        break
      star = "*" if pid in truth else " "
      short = text if len(text) <= width else text[:width - 3] + "..."
      print(f"  {rank:>4}  {score:7.4f}  {printable(pid):<10}{star} "
            f"{printable(short)}")
  if any("fact_doc_ids" in r for r in rows):
    print("\n(* marks a document that states the queried fact)")
