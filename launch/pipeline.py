"""The stages of ``trace``, shared by the launch scripts.

checkpoint -> encoder -> preconditioner (corpus sample + queries) ->
corpus encodings (store, or streamed) -> query encodings -> top-k -> results.

Every stage takes plain config dataclasses (bound from gin in ``config``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Iterator, Sequence

import jax
import numpy as np

import tracer
from tracer import checkpoint as ckpt_lib
from tracer import data as data_lib
from tracer import evaluate
from tracer import hessian
from tracer import model as model_lib
from tracer import partitioning
from tracer import scan as scan_lib
from tracer import store as store_lib


@dataclasses.dataclass(frozen=True)
class EncodeConfig:
  """How examples become encodings."""
  projection_dim: int = 4096
  seed: int = 0
  correction: str = "optimizer"     # "optimizer" (the checkpoint's V) or "none"
  epsilon: float | None = None      # None: the checkpoint optimizer's eps
  microbatch_size: int = 8          # examples per data shard per step
  batch_size: int = 128             # examples per encode call
  model_axis: int = 1               # size of the mesh's model axis
  store_dtype: str = "bfloat16"
  chunk_rows: int = 512


@dataclasses.dataclass(frozen=True)
class PreconditionerConfig:
  """R: ``kind`` "block", "full" or "none"; ``task_specific`` mixes in R_eval."""
  kind: str = "block"
  task_specific: bool = True
  train_examples: int = 4096        # corpus rows sampled for R_train (0: all)
  rank: int | None = None           # lambda rule's k; None: 1.5% of d
  damping: float = 0.1              # times the mean eigenvalue
  lam: float | None = None          # fixed mix instead of the rule


class Progress:
  """Prints ``label: done/total items, items/s, time left`` at most every second."""

  def __init__(self, label: str, total: int, unit: str = "examples"):
    self.label, self.total, self.unit = label, total, unit
    self.done, self.start, self.last = 0, time.perf_counter(), 0.0

  def update(self, n: int) -> None:
    self.done += n
    now = time.perf_counter()
    if now - self.last >= 1.0 or self.done >= self.total:
      self.last = now
      rate = self.done / max(now - self.start, 1e-9)
      left = (self.total - self.done) / rate if rate > 0 else float("inf")
      end = "\n" if self.done >= self.total else ""
      if jax.process_index() == 0:
        sys.stdout.write(f"\r{self.label}: {self.done}/{self.total} {self.unit}, "
                         f"{rate:.1f}/s, {left:.0f}s left   {end}")
        sys.stdout.flush()


def latest_checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def load_checkpoint(workdir: str | None, checkpoint: str | None = None
                    ) -> ckpt_lib.Checkpoint:
  """``checkpoint`` (a CheckpointManager dir or one step dir) or the workdir's latest."""
  if checkpoint:
    base = os.path.basename(os.path.normpath(checkpoint))
    if base.isdigit():
      return ckpt_lib.restore(os.path.dirname(os.path.normpath(checkpoint)), int(base))
    return ckpt_lib.restore(checkpoint)
  return ckpt_lib.restore(latest_checkpoint_dir(workdir))


def make_mesh(cfg: EncodeConfig):
  return partitioning.make_mesh(model=cfg.model_axis)


def build_encoder(ckpt: ckpt_lib.Checkpoint, cfg: EncodeConfig, mesh=None
                  ) -> tuple[tracer.GradientEncoder, str, float]:
  """The encoder for a checkpoint; returns it with its correction kind and eps."""
  epsilon = ckpt.optimizer_config.eps if cfg.epsilon is None else cfg.epsilon
  if cfg.correction == "optimizer":
    b2 = ckpt.optimizer_config.b2 if ckpt.optimizer_config.name == "adamw" else None
    v = tracer.second_moment(ckpt.opt_state, ckpt.params, b2=b2)
    kind = ckpt.optimizer_config.name
  elif cfg.correction == "none":
    v, kind = None, "none"
  else:
    raise ValueError(f"EncodeConfig.correction={cfg.correction!r}: expected "
                     f"'optimizer' or 'none'")
  encoder = tracer.GradientEncoder(
      ckpt.loss_fn(), ckpt.params, second_moment=v, epsilon=epsilon,
      projection_dim=cfg.projection_dim, seed=cfg.seed,
      mesh=mesh if mesh is not None else make_mesh(cfg),
      microbatch_size=cfg.microbatch_size)
  return encoder, kind, epsilon


def vocabulary(ckpt: ckpt_lib.Checkpoint):
  d = ckpt.data_config
  return data_lib.DataConfig(d.get("tokenizer", "byte"), d.get("sentencepiece_model"),
                             d.get("overflow", "truncate")).vocabulary()


def read_inputs(ckpt: ckpt_lib.Checkpoint, corpus_source: str, queries_path: str
                ) -> tuple[data_lib.Corpus, list[dict], dict]:
  """The corpus row table, the query records and their stacked examples."""
  vocab = vocabulary(ckpt)
  max_len = ckpt.model_config.max_len
  corpus = data_lib.read_corpus(corpus_source, vocab, max_len,
                                ckpt.data_config.get("overflow", "truncate"))
  queries = data_lib.read_queries(queries_path)
  return corpus, queries, data_lib.query_examples(queries, vocab, max_len, queries_path)


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


def fit_preconditioner(encoder: tracer.GradientEncoder, corpus: data_lib.Corpus,
                       query_examples: dict, cfg: PreconditionerConfig,
                       batch_size: int) -> hessian.Preconditioner | None:
  """R^(-1/2) from a corpus sample (and the queries when task-specific)."""
  if cfg.kind == "none":
    return None
  rows = sample_rows(len(corpus), cfg.train_examples)
  progress = Progress("fit R_train", len(rows))

  def train_batches():
    for lo in range(0, len(rows), batch_size):
      batch_rows = rows[lo:lo + batch_size]
      yield corpus.examples(batch_rows)
      progress.update(len(batch_rows))

  eval_batches = example_slices(query_examples, batch_size) if cfg.task_specific else None
  return tracer.fit_preconditioner(
      encoder, train_batches(), eval_batches, kind=cfg.kind, rank=cfg.rank,
      damping=cfg.damping, lam=cfg.lam)


def manifest(ckpt: ckpt_lib.Checkpoint, encoder: tracer.GradientEncoder,
             correction_kind: str, epsilon: float,
             pre: hessian.Preconditioner | None, corpus: data_lib.Corpus,
             cfg: EncodeConfig) -> store_lib.Manifest:
  return store_lib.Manifest(
      checkpoint=os.path.abspath(ckpt.path), step=ckpt.step,
      params_fingerprint=store_lib.fingerprint(ckpt.params),
      correction=correction_kind, epsilon=float(epsilon),
      projection_seed=encoder.layout.seed, layout=encoder.layout.to_json(),
      dim=encoder.dim, preconditioner_fingerprint=pre.fingerprint() if pre else None,
      dtype=cfg.store_dtype, corpus=corpus.source, num_rows=len(corpus),
      chunk_rows=cfg.chunk_rows)


def encode_corpus(encoder: tracer.GradientEncoder, pre, corpus: data_lib.Corpus,
                  store: store_lib.EncodingStore, batch_size: int) -> None:
  """Encodes every chunk not yet marked done; a rerun resumes.

  All hosts encode each chunk together (its examples split over all devices);
  chunk c is written by host ``c % process_count`` (stores live on a shared
  filesystem on multi-host runs). Returns on every host only once every chunk
  is on disk, so the store can be scanned right away.
  """
  pending = store.pending_chunks()
  progress = Progress("encode corpus", sum(
      np.subtract(*store.chunk_bounds(c)[::-1]) for c in pending))
  for chunk in pending:
    start, stop = store.chunk_bounds(chunk)
    pieces = []
    for rows in data_lib.batches(stop, batch_size, start):
      pieces.append(encoder.encode(corpus.examples(rows), pre,
                                   ids=[corpus.ids[r] for r in rows]))
      progress.update(len(rows))
    if chunk % jax.process_count() == jax.process_index():
      store.write_chunk(chunk, np.concatenate(pieces))
  if jax.process_count() > 1:
    # The last chunks' writers may still be writing when the other hosts
    # finish encoding: wait for them, or a scan would find the store incomplete.
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("tracer-encode-corpus-done")


def stream_corpus(encoder: tracer.GradientEncoder, pre, corpus: data_lib.Corpus,
                  query_encodings: np.ndarray, k: int, batch_size: int
                  ) -> scan_lib.TopK:
  """Streaming mode: each corpus batch is scored as it is encoded, no store."""
  scanner = scan_lib.StreamingScanner(query_encodings, k, encoder.mesh)
  progress = Progress("encode + score corpus", len(corpus))
  for rows in data_lib.batches(len(corpus), batch_size):
    scanner.add(encoder.encode_on_device(corpus.examples(rows), pre,
                                         ids=[corpus.ids[r] for r in rows]), rows)
    progress.update(len(rows))
  return scanner.result()


def result_rows(queries: Sequence[dict], corpus: data_lib.Corpus,
                topk: scan_lib.TopK) -> list[dict]:
  """One results line per query (the TrackStar retrieval-file fields)."""
  out = []
  for i, q in enumerate(queries):
    prop, opp = topk.proponent_rows[i], topk.opponent_rows[i]
    out.append(evaluate.make_result_row(
        q, [corpus.ids[r] for r in prop], topk.proponent_scores[i],
        [corpus.texts[r] for r in prop], [corpus.ids[r] for r in opp],
        topk.opponent_scores[i], [corpus.texts[r] for r in opp]))
  return out


def predictions(ckpt: ckpt_lib.Checkpoint, query_examples: dict,
                queries: Sequence[dict], vocab) -> list[str]:
  """The model's greedy completion of each prompt, as long as its target."""
  steps = max(len(vocab.encode(q["target"])) for q in queries)
  tokens = jax.device_get(jax.jit(model_lib.greedy_decode, static_argnums=(0, 3))(
      ckpt.model_config, ckpt.params, query_examples, steps))
  return [vocab.decode([int(t) for t in row[:len(vocab.encode(q["target"]))]])
          for row, q in zip(tokens, queries)]


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


def print_table(rows: Sequence[dict], preds: Sequence[str], num_queries: int,
                num_proponents: int = 3, width: int = 70) -> None:
  """A readable table: prompt, target, prediction, top proponents and scores."""
  for row, pred in list(zip(rows, preds))[:num_queries]:
    mark = "ok" if pred == row["target"] else "wrong"
    print(f"\n{row['query_id']}: {row['prompt']!r} -> target {row['target']!r}, "
          f"model says {pred!r} ({mark})")
    truth = set(row.get("fact_doc_ids", ()))
    print(f"  {'rank':>4}  {'score':>7}  {'id':<10}  text")
    for rank, (pid, score, text) in enumerate(zip(
        row["proponent_ids"], row["proponent_scores"], row["proponents"]), 1):
      if rank > num_proponents:
        break
      star = "*" if pid in truth else " "
      short = text if len(text) <= width else text[:width - 3] + "..."
      print(f"  {rank:>4}  {score:7.4f}  {pid:<10}{star} {short}")
  if any("fact_doc_ids" in r for r in rows):
    print("\n(* marks a document that states the queried fact)")
