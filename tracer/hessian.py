"""The task-specific Hessian approximation R and its inverse square root.

R is the autocorrelation of corrected, projected gradients ``phi`` (the
Gauss-Newton / empirical-Fisher approximation): ``R_train = mean phi phi^T``
over corpus examples, ``R_eval`` likewise over the queries, mixed as
``R = lam * R_eval + (1 - lam) * R_train`` to down-weight directions every
query shares. ``lam`` follows the paper's rule: with both spectra sorted
descending and a rank k (default 1.5% of d),
``lam = s_train[k] / (s_eval[k] + s_train[k])``.

``kind="block"`` keeps one matrix per projection block (cheap at any d);
``kind="full"`` keeps one d x d matrix (17 GB in fp32 at d = 2^16).
``R^(-1/2) = U diag((w + damping * mean(w))^(-1/2)) U^T`` from ``eigh``; the
damping, relative to the mean eigenvalue, keeps a rank-deficient R (fewer
samples than d) from amplifying noise.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from tracer import projection
from tracer import storage
from tracer.errors import InputError


@dataclasses.dataclass
class Moments:
  """Streaming sums of ``phi_s^T phi_s`` per segment, and the sample count."""
  segments: tuple[tuple[int, int], ...]
  sums: list
  count: int = 0


def segments(layout: projection.Layout, kind: str) -> tuple[tuple[int, int], ...]:
  if kind == "block":
    return tuple((b.offset, b.offset + b.size) for b in layout.blocks)
  if kind == "full":
    return ((0, layout.dim),)
  raise ValueError(f"preconditioner kind {kind!r}: expected 'block' or 'full'")


def init_moments(layout: projection.Layout, kind: str) -> Moments:
  segs = segments(layout, kind)
  return Moments(segs, [jnp.zeros((hi - lo, hi - lo), jnp.float32) for lo, hi in segs])


@jax.jit
def _gram(phi, weight):
  phi = phi * weight[..., None]
  return jnp.einsum("...i,...j->ij", phi, phi, precision="highest")


def accumulate(moments: Moments, phi: jax.Array, valid=None) -> Moments:
  """Adds unnormalized encodings ``phi: f32[..., d]`` (rows where ``valid``).

  ``phi`` may be a global array split over hosts: the sum over its rows then
  includes an all-reduce, and every host gets the same moments.
  """
  valid = jnp.ones(phi.shape[:-1], bool) if valid is None else valid
  weight = valid.astype(jnp.float32)
  sums = [s + _gram(phi[..., lo:hi], weight)
          for s, (lo, hi) in zip(moments.sums, moments.segments)]
  count = int(np.asarray(jnp.sum(valid).addressable_data(0))
              if isinstance(valid, jax.Array) else np.sum(valid))
  return Moments(moments.segments, sums, moments.count + count)


def lambda_rule(eig_train: np.ndarray, eig_eval: np.ndarray, rank: int) -> float:
  """``s_train[k] / (s_eval[k] + s_train[k])`` with spectra sorted descending."""
  t = np.sort(np.asarray(eig_train, np.float64))[::-1]
  e = np.sort(np.asarray(eig_eval, np.float64))[::-1]
  k = min(rank, len(t) - 1, len(e) - 1)
  denom = t[k] + e[k]
  return float(t[k] / denom) if denom > 0 else 0.0


def _inv_sqrt(r: np.ndarray, damping: float) -> np.ndarray:
  w, u = np.linalg.eigh(r)
  w = np.maximum(w, 0.0)
  floor = damping * max(float(w.mean()), np.finfo(np.float64).tiny)
  return (u * (w + floor) ** -0.5) @ u.T


@functools.partial(jax.jit, static_argnums=1)
def _apply(phi, segments, inv_sqrt):
  return jnp.concatenate(
      [jnp.dot(phi[..., lo:hi], m, precision="highest")
       for (lo, hi), m in zip(segments, inv_sqrt)], axis=-1)


@dataclasses.dataclass
class Preconditioner:
  """``R^(-1/2)``, per segment, with what is needed to check compatibility."""
  kind: str
  segments: tuple[tuple[int, int], ...]
  inv_sqrt: list                     # float32 [size, size] per segment
  lam: float
  damping: float
  rank: int | None
  num_train: int
  num_eval: int
  dim: int
  layout_seed: int
  # What the fit was made from (checkpoint, corpus, queries, settings), so a
  # rerun can tell whether a saved preconditioner is the one it would fit.
  fit_key: dict | None = None

  def apply(self, phi: jax.Array) -> jax.Array:
    """``phi @ R^(-1/2)`` for ``phi: f32[..., d]`` (R^(-1/2) is symmetric)."""
    return _apply(phi, tuple(self.segments), list(self.inv_sqrt))

  def metadata(self) -> dict:
    return {"kind": self.kind, "segments": [list(s) for s in self.segments],
            "lam": self.lam, "damping": self.damping, "rank": self.rank,
            "num_train": self.num_train, "num_eval": self.num_eval, "dim": self.dim,
            "layout_seed": self.layout_seed, "fit_key": self.fit_key}

  def fingerprint(self) -> str:
    h = hashlib.sha256(json.dumps(self.metadata(), sort_keys=True).encode())
    for m in self.inv_sqrt:
      h.update(np.asarray(m, np.float32).tobytes())
    return h.hexdigest()[:16]

  def save(self, location: str) -> None:
    """Writes an npz (the matrices + metadata) to a path or storage URL, in
    one atomic write."""
    buf = io.BytesIO()
    np.savez(buf, metadata=json.dumps(self.metadata()),
             **{f"m{i}": np.asarray(m) for i, m in enumerate(self.inv_sqrt)})
    storage.write_bytes(location, buf.getvalue())

  @classmethod
  def load(cls, location: str) -> "Preconditioner":
    data = storage.read_bytes(location)
    if data is None:
      raise InputError(f"{location}: no such preconditioner file")
    try:
      with np.load(io.BytesIO(data)) as f:
        meta = json.loads(str(f["metadata"]))
        mats = [jnp.asarray(f[f"m{i}"]) for i in range(len(meta["segments"]))]
    except (ValueError, KeyError, OSError) as e:
      raise InputError(f"{location}: not a preconditioner file ({e})") from None
    meta["segments"] = tuple(tuple(s) for s in meta["segments"])
    meta.setdefault("fit_key", None)
    return cls(inv_sqrt=mats, **meta)


def fit(train: Moments, eval_: Moments | None = None, *, kind: str, dim: int,
        layout_seed: int, rank: int | None = None, damping: float = 0.1,
        lam: float | None = None) -> Preconditioner:
  """``R^(-1/2)`` from accumulated moments.

  Args:
    train: moments of corpus examples (R_train).
    eval_: moments of queries (R_eval); None gives the non-task-specific
      variant ``R = R_train``.
    rank: k of the lambda rule; default ``round(0.015 * dim)``.
    damping: added to every eigenvalue, as a fraction of their mean.
    lam: a fixed mix instead of the rule.
  """
  if train.count == 0:
    raise ValueError("R_train needs at least one example")
  r_train = [np.asarray(s, np.float64) / train.count for s in train.sums]
  if train.count < max(hi - lo for lo, hi in train.segments):
    warnings.warn(f"R is estimated from {train.count} examples in segments of up to "
                  f"{max(hi - lo for lo, hi in train.segments)} dimensions: it is rank "
                  f"deficient, and the damping ({damping} x mean eigenvalue) decides "
                  f"how much noise whitening amplifies")
  rank = int(round(0.015 * dim)) if rank is None else rank
  if eval_ is None:
    mixed, lam = r_train, 0.0
  else:
    if eval_.count == 0:
      raise ValueError("R_eval needs at least one query")
    r_eval = [np.asarray(s, np.float64) / eval_.count for s in eval_.sums]
    if lam is None:
      lam = lambda_rule(np.concatenate([np.linalg.eigvalsh(r) for r in r_train]),
                        np.concatenate([np.linalg.eigvalsh(r) for r in r_eval]), rank)
    mixed = [lam * e + (1 - lam) * t for e, t in zip(r_eval, r_train)]
  inv = [jnp.asarray(_inv_sqrt(r, damping), jnp.float32) for r in mixed]
  return Preconditioner(kind, train.segments, inv, float(lam), damping, rank,
                        train.count, 0 if eval_ is None else eval_.count, dim,
                        layout_seed)
