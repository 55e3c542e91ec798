"""What several launch scripts share: progress lines, the R^(-1/2) step with
its printout, and the proponent table. The stages themselves live in
``tracer.pipeline``."""

from __future__ import annotations

import sys
import time
from typing import Any, NamedTuple, Sequence

import jax

from launch import config
from tracer import hessian
from tracer import pipeline
from tracer import storage
from tracer.config import EncodeConfig, PreconditionerConfig


class Progress:
  """Prints ``label: done/total items, items/s, time left`` at most every second
  (process 0 only, for its own share). Call it as ``progress(done, total)``."""

  def __init__(self, label: str, unit: str = "examples"):
    self.label, self.unit = label, unit
    self.done, self.total, self.start, self.last = 0, 0, time.perf_counter(), 0.0

  def __call__(self, done: int, total: int | None = None) -> None:
    """``total`` None: not known in advance (no time left shown)."""
    self.done, self.total = done, total
    now = time.perf_counter()
    finished = total is not None and done >= total
    if now - self.last >= 1.0 or finished:
      self.last = now
      rate = done / max(now - self.start, 1e-9)
      if total is None:
        line = f"{self.label}: {done} {self.unit}, {rate:.1f}/s"
      else:
        left = (total - done) / rate if rate > 0 else float("inf")
        line = (f"{self.label}: {done}/{total} {self.unit}, {rate:.1f}/s, "
                f"{left:.0f}s left")
      if jax.process_index() == 0:
        sys.stdout.write(f"\r{line}   " + ("\n" if finished else ""))
        sys.stdout.flush()


class Run(NamedTuple):
  """What every stage script builds first, from flags and gin."""
  encode_config: EncodeConfig
  ckpt: Any
  corpus: Any
  encoder: Any
  correction: str
  epsilon: float


def start(workdir: str | None, checkpoint: str | None, corpus_source: str) -> Run:
  """The mesh (``EncodeConfig.model_axis``), the checkpoint restored onto it,
  the corpus row table and the encoder."""
  ecfg = config.make(EncodeConfig)
  mesh = pipeline.make_mesh(ecfg)
  ckpt = pipeline.load_checkpoint(workdir, checkpoint, mesh)
  corpus = pipeline.open_corpus(ckpt, corpus_source)
  encoder, kind, eps = pipeline.build_encoder(ckpt, ecfg, mesh)
  return Run(ecfg, ckpt, corpus, encoder, kind, eps)


def say(*args) -> None:
  """print, on process 0 only."""
  if jax.process_index() == 0:
    print(*args, flush=True)


def preconditioner(location: str, encoder, corpus, query_examples: dict,
                   pcfg: PreconditionerConfig, batch_size: int, key: dict
                   ) -> hessian.Preconditioner | None:
  """R^(-1/2): the one saved at ``location`` if it was fitted with ``key``,
  else fitted now and saved there."""
  if pcfg.kind == "none":
    return None
  pre, reused = pipeline.load_or_fit_preconditioner(location, key, lambda: (
      pipeline.fit_preconditioner(encoder, corpus, query_examples, pcfg, batch_size,
                                  Progress("fit R_train"), key)))
  say(f"R^(-1/2) {'reused from' if reused else 'fitted, saved to'} {location}: "
      f"{pre.kind}, lambda={pre.lam:.4g}, {pre.num_train} corpus examples, "
      f"{pre.num_eval} queries, d={pre.dim}")
  return pre


def load_preconditioner(location: str | None, dim: int
                        ) -> hessian.Preconditioner | None:
  """A saved R^(-1/2) (``--preconditioner``), checked against the encoder's d."""
  if not location:
    return None
  pre = hessian.Preconditioner.load(location)
  if pre.dim != dim:
    raise ValueError(f"{location}: preconditioner has d={pre.dim}, encoder d={dim}")
  return pre


def default_location(workdir: str, given: str | None, name: str) -> str:
  return given or storage.join(workdir, name)


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
