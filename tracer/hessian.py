"""The task-specific Hessian approximation R and its inverse square root.

R is the autocorrelation of corrected, projected gradients ``phi`` (the
Gauss-Newton / empirical-Fisher approximation): ``R_train = mean phi phi^T``
over corpus examples, ``R_eval`` likewise over the queries, mixed as
``R = lam * R_eval + (1 - lam) * R_train`` to down-weight directions every
query shares. ``lam`` follows the paper's rule: with both spectra sorted
descending and a rank k (default 1.5% of d),
``lam = s_train[k] / (s_eval[k] + s_train[k])``; capped so that one query
adds at most ``max_query_weight`` of R_train's trace (``task_lambda``): a few
queries cannot tell shared directions from their own, and the rule, whose
k-th eval eigenvalue is then 0 or noise, gives them lam near 1.

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
import zipfile

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from tracer import partitioning
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


def moment_bytes(layout: projection.Layout, kind: str) -> int:
  """Every segment's float32 moments (``init_moments``): a copy on each
  device of the mesh, and one on the host to fit."""
  return sum((hi - lo) ** 2 * 4 for lo, hi in segments(layout, kind))


def fit_bytes(layout: projection.Layout, kind: str) -> int:
  """A floor on the host memory fitting R takes: the moments, and
  ``fit_basis``'s float64 eigh of the largest segment (its input, vectors
  and workspace)."""
  largest = max(hi - lo for lo, hi in segments(layout, kind))
  return moment_bytes(layout, kind) + 3 * largest ** 2 * 8


def init_moments(layout: projection.Layout, kind: str) -> Moments:
  segs = segments(layout, kind)
  return Moments(segs, [jnp.zeros((hi - lo, hi - lo), jnp.float32) for lo, hi in segs])


@functools.partial(jax.jit, static_argnums=0)
def _add_grams(segments, sums, phi, weight):
  """``sums`` plus each segment's ``phi_s^T phi_s`` over the weighted rows.

  One program for all segments: a program per segment queued dozens of
  8-device programs per batch, and a long queue of them deadlocked XLA:CPU's
  collectives (a CI worker aborted here; WORKSPACE.md, CI)."""
  phi = phi * weight[..., None]
  return [s + jnp.einsum("...i,...j->ij", phi[..., lo:hi], phi[..., lo:hi],
                         precision="highest")
          for s, (lo, hi) in zip(sums, segments)]


def accumulate(moments: Moments, phi: jax.Array, valid=None) -> Moments:
  """Adds unnormalized encodings ``phi: f32[..., d]`` (rows where ``valid``).

  ``phi`` may be a global array split over hosts: the sum over its rows then
  includes an all-reduce, and every host gets the same moments.
  """
  valid = jnp.ones(phi.shape[:-1], bool) if valid is None else valid
  weight = valid.astype(jnp.float32)
  sums = _add_grams(moments.segments, moments.sums, phi, weight)
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


# One query may add at most this fraction of R_train's trace to R (the
# R_eval term's trace over the R_train term's, per query). Chosen on the
# benchmark family, queries fitted in sets of 1 to 160 (WORKSPACE.md, "Small
# query sets"): mean MRR 0.438 -> 0.604 for one query, 0.659 -> 0.656 for all
# 160 (it binds there too, lowering lam 2-3x).
MAX_QUERY_WEIGHT = 0.002


def task_lambda(eig_train: np.ndarray, eig_eval: np.ndarray, rank: int,
                num_eval: int, max_query_weight: float | None = MAX_QUERY_WEIGHT
                ) -> float:
  """``lambda_rule``, capped so that ``lam * tr(R_eval) <= max_query_weight *
  num_eval * (1 - lam) * tr(R_train)`` (None: the rule alone).

  With n queries R_eval has at most n nonzero eigenvalues per segment, so for
  small n the rule's ``s_eval[k]`` is 0 or the smallest, noisiest of them and
  lam goes to 1: R_train is dropped, and each query's own direction, not one
  the task shares, is what R down-weights (one query alone scored below
  R_train alone on each of the family's nine sets and the demo's). The cap lets R_eval's weight grow
  with the evidence, one query's worth at a time, and leaves the rule in
  charge once the set is large."""
  lam = lambda_rule(eig_train, eig_eval, rank)
  trace_train = float(np.sum(eig_train, dtype=np.float64))
  trace_eval = float(np.sum(eig_eval, dtype=np.float64))
  if trace_eval <= 0:
    return 0.0  # the queries have no gradient: R is R_train
  if max_query_weight is None or lam <= 0:
    return lam
  cap = max_query_weight * num_eval * trace_train / trace_eval  # lam / (1 - lam)
  return lam if lam < 1 and lam / (1 - lam) <= cap else float(cap / (1 + cap))


def _inv_sqrt(r: np.ndarray, damping: float) -> np.ndarray:
  w, u = np.linalg.eigh(r)
  w = np.maximum(w, 0.0)
  if not w.mean() > 0:
    # No example moved this block (a weight the loss never uses): it weighs
    # nothing. (Its floor would be damping * 2e-308, its inverse inf, and
    # 0 * inf NaN in every row.)
    return np.zeros_like(r)
  return (u * (w + damping * float(w.mean())) ** -0.5) @ u.T


def _placed(arrays, like, cache: dict) -> list:
  """``arrays`` (a segment's matrix each) replicated on the mesh ``like`` (an
  array) is on, placed once per mesh and kept in ``cache``: a corpus encode
  rotates every batch, and copying a basis from the host each time (up to
  1.7 GiB at d = 2^16 with layer-stacked blocks) costs more than the batch."""
  sharding = getattr(like, "sharding", None)
  mesh = sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None
  if mesh not in cache:
    cache[mesh] = [jnp.asarray(a) if mesh is None else partitioning.put_global(
        a, partitioning.replicated(mesh)) for a in arrays]
  return cache[mesh]


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
  _on_devices: dict = dataclasses.field(default_factory=dict, repr=False,
                                        compare=False)  # ``_placed``'s

  def apply(self, phi: jax.Array) -> jax.Array:
    """``phi @ R^(-1/2)`` for ``phi: f32[..., d]`` (R^(-1/2) is symmetric)."""
    return _apply(phi, tuple(self.segments),
                  _placed(self.inv_sqrt, phi, self._on_devices))

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
    _save_npz(location, self.metadata(), self.inv_sqrt)

  @classmethod
  def load(cls, location: str) -> "Preconditioner":
    meta, mats = _load_npz(location, cls)
    return cls(inv_sqrt=[jnp.asarray(m) for m in mats], **meta)


def _npz_bytes(metadata: dict, arrays) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, metadata=json.dumps(metadata),
           **{f"m{i}": np.asarray(m) for i, m in enumerate(arrays)})
  return buf.getvalue()


def _save_npz(location: str, metadata: dict, arrays) -> None:
  storage.write_bytes(location, _npz_bytes(metadata, arrays))


def _load_npz(location: str, cls, data: bytes | None = None
              ) -> tuple[dict, list[np.ndarray]]:
  """(metadata, arrays) of a file ``cls.save`` wrote; InputError naming the
  file when it is not one (another kind of npz, cut short, not an npz)."""
  what = cls.__name__.lower()
  data = storage.read_bytes(location) if data is None else data
  if data is None:
    raise InputError(f"{location}: {storage.missing(location, what + ' file')}")
  if not data.startswith(b"PK"):  # numpy would take it for a pickle, and say so
    raise InputError(f"{location}: not a {what} file (not an npz archive: it "
                     f"starts with {data[:8]!r})")
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
      meta = json.loads(str(f["metadata"]))
      arrays = [f[f"m{i}"] for i in range(sum(1 for k in f.files if k != "metadata"))]
  except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile,
          NotImplementedError) as e:  # (a damaged zip's version or compression)
    raise InputError(f"{location}: not a {what} file ({e})") from None
  # Every field but the arrays; fit_key is absent from older files.
  fields = {f.name for f in dataclasses.fields(cls)
            if not f.name.startswith("_")} - {"inv_sqrt", "vectors", "values"}
  if isinstance(meta, dict):
    meta.setdefault("fit_key", None)
  if not isinstance(meta, dict) or set(meta) != fields:
    have = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
    raise InputError(f"{location}: not a {what} file (its metadata has {have}; "
                     f"expected {sorted(fields)})")
  meta["segments"] = _checked_segments(location, what, meta)
  # A damaged archive can lose an array and still load; a missing segment
  # would be dropped from every encoding without an error.
  sizes = [hi - lo for lo, hi in meta["segments"]]
  want = ([(n, n) for n in sizes] if issubclass(cls, Preconditioner)
          else [shape for n in sizes for shape in ((n, n), (n,))])
  have = [a.shape for a in arrays]
  if have != want:
    raise InputError(f"{location}: not a whole {what} file (its arrays have "
                     f"shapes {have}; its segments {list(meta['segments'])} "
                     f"expect {want})")
  return meta, arrays


def _checked_segments(location: str, what: str, meta: dict
                      ) -> tuple[tuple[int, int], ...]:
  """The metadata's segments as pairs, InputError unless they tile
  ``[0, dim)`` in order."""
  segments, dim = meta["segments"], meta["dim"]
  ok = (isinstance(segments, list) and segments and isinstance(dim, int)
        and all(isinstance(s, list) and len(s) == 2
                and all(type(x) is int for x in s) for s in segments))
  if ok:
    ends = [x for s in segments for x in s]
    ok = (ends[0] == 0 and ends[-1] == dim
          and all(lo <= hi for lo, hi in segments)
          and all(a == b for a, b in zip(ends[1:-1:2], ends[2::2])))
  if not ok:
    raise InputError(f"{location}: not a {what} file (its segments {segments!r} "
                     f"do not tile its dim {dim!r}: expected [lo, hi] pairs "
                     "from 0 to dim, each starting where the last ended)")
  return tuple(tuple(s) for s in segments)


def _warn_rank_deficient(train: Moments, damping: float | None = None) -> None:
  largest = max(hi - lo for lo, hi in train.segments)
  if train.count < largest:
    how = f"the damping ({damping} x mean eigenvalue)" if damping is not None else (
        "the damping")
    warnings.warn(f"R is estimated from {train.count} examples in segments of up to "
                  f"{largest} dimensions: it is rank deficient, and {how} decides "
                  f"how much noise whitening amplifies")


def fit(train: Moments, eval_: Moments | None = None, *, kind: str, dim: int,
        layout_seed: int, rank: int | None = None, damping: float = 0.1,
        lam: float | None = None,
        max_query_weight: float | None = MAX_QUERY_WEIGHT) -> Preconditioner:
  """``R^(-1/2)`` from accumulated moments.

  Args:
    train: moments of corpus examples (R_train).
    eval_: moments of queries (R_eval); None gives the non-task-specific
      variant ``R = R_train``.
    rank: k of the lambda rule; default ``round(0.015 * dim)``.
    damping: added to every eigenvalue, as a fraction of their mean.
    lam: a fixed mix instead of the rule.
    max_query_weight: the rule's cap (``task_lambda``); None: no cap.
  """
  if train.count == 0:
    raise ValueError("R_train needs at least one example")
  r_train = [np.asarray(s, np.float64) / train.count for s in train.sums]
  _warn_rank_deficient(train, damping)
  rank = int(round(0.015 * dim)) if rank is None else rank
  if eval_ is None:
    mixed, lam = r_train, 0.0
  else:
    if eval_.count == 0:
      raise ValueError("R_eval needs at least one query")
    r_eval = [np.asarray(s, np.float64) / eval_.count for s in eval_.sums]
    if lam is None:
      lam = task_lambda(np.concatenate([np.linalg.eigvalsh(r) for r in r_train]),
                        np.concatenate([np.linalg.eigvalsh(r) for r in r_eval]), rank,
                        eval_.count, max_query_weight)
    mixed = [lam * e + (1 - lam) * t for e, t in zip(r_eval, r_train)]
  inv = [jnp.asarray(_inv_sqrt(r, damping), jnp.float32) for r in mixed]
  return Preconditioner(kind, train.segments, inv, float(lam), damping, rank,
                        train.count, 0 if eval_ is None else eval_.count, dim,
                        layout_seed)


# --- scan-time preconditioning ------------------------------------------------
#
# R = (1 - lam) R_train + f I + lam R_eval, f = damping * mean eigenvalue of the
# mix. In R_train's eigenbasis (per segment: R_train = V diag(s) V^T, rows
# stored as psi = V^T phi) the first two terms are diagonal, A = diag(1 / a)
# with a = 1 / ((1 - lam) s + f), and lam R_eval = G G^T with G = sqrt(lam /
# n_eval) Psi_eval^T of rank <= n_eval. Woodbury:
#   R^(-1) = D_a - D_a G (I + G^T D_a G)^(-1) G^T D_a = D_a - C C^T,
# C = D_a G L^(-T) with L L^T = I + G^T D_a G. So for any stored row psi,
#   psi^T R^(-1) psi = sum(a psi^2) - ||C^T psi||^2,   psi . R^(-1) q,
# which is TrackStar's unit(R^(-1/2) phi_m) . unit(R^(-1/2) phi_q) once both
# are divided by their norms: exact, from query-independent rows.


@dataclasses.dataclass
class Basis:
  """R_train's eigendecomposition per segment: the query-independent
  coordinates a store holds (``psi = rotate(phi)``; R_train is diagonal there,
  with ``values``)."""
  kind: str
  segments: tuple[tuple[int, int], ...]
  vectors: list                      # float32 [size, size] per segment (V)
  values: list                       # float64 [size] per segment (s >= 0)
  num_train: int
  dim: int
  layout_seed: int
  fit_key: dict | None = None
  _on_devices: dict = dataclasses.field(default_factory=dict, repr=False,
                                        compare=False)  # ``_placed``'s

  def rotate(self, phi: jax.Array) -> jax.Array:
    """``psi = phi @ V`` per segment, for ``phi: f32[..., d]``."""
    return _apply(phi, tuple(self.segments),
                  _placed(self.vectors, phi, self._on_devices))

  def column_scales(self, floor: float = 0.01) -> np.ndarray:
    """f32 ``[d]``: ``sqrt(s + floor * mean(s))`` per coordinate, ``s`` its
    segment's eigenvalues: the spread of the corpus along each coordinate,
    which an int8 store divides its rows by before quantizing
    (``tracer.store.create_or_open``). ``floor`` keeps a direction the
    sample never saw (s = 0) from making a row's other values round away."""
    out = np.ones(self.dim, np.float32)
    for (lo, hi), s in zip(self.segments, self.values):
      s = np.asarray(s, np.float64)
      if s.mean() > 0:
        out[lo:hi] = np.sqrt(s + floor * s.mean())
    return out

  def metadata(self) -> dict:
    return {"kind": self.kind, "segments": [list(s) for s in self.segments],
            "num_train": self.num_train, "dim": self.dim,
            "layout_seed": self.layout_seed, "fit_key": self.fit_key}

  def fingerprint(self) -> str:
    h = hashlib.sha256(json.dumps(self.metadata(), sort_keys=True).encode())
    for v, s in zip(self.vectors, self.values):
      h.update(np.asarray(v, np.float32).tobytes())
      h.update(np.asarray(s, np.float64).tobytes())
    return h.hexdigest()[:16]

  def to_bytes(self) -> bytes:
    """One npz: vectors, values, metadata."""
    return _npz_bytes(self.metadata(),
                      [a for v, s in zip(self.vectors, self.values) for a in (v, s)])

  def save(self, location: str) -> None:
    """``to_bytes``, in one atomic write."""
    storage.write_bytes(location, self.to_bytes())

  @classmethod
  def load(cls, location: str, data: bytes | None = None) -> "Basis":
    """From ``location`` (or from ``data``, which ``location`` then names)."""
    meta, arrays = _load_npz(location, cls, data)
    return cls(vectors=arrays[0::2], values=arrays[1::2], **meta)


def fit_basis(train: Moments, *, dim: int, layout_seed: int,
              kind: str = "block") -> Basis:
  """R_train's eigenbasis from accumulated corpus moments (float64 eigh).
  Under ``jax.distributed`` every process returns process 0's, bit for bit:
  LAPACK's eigh may pick other eigenvectors (a sign; a rotation within a
  repeated eigenvalue) at another thread count or CPU, and rows a process
  rotated by its own V would be scored against queries rotated by process
  0's (the saved basis)."""
  if train.count == 0:
    raise ValueError("R_train needs at least one example")
  _warn_rank_deficient(train)
  vectors, values = [], []
  for s in train.sums:
    w, v = np.linalg.eigh(np.asarray(s, np.float64) / train.count)
    vectors.append(v.astype(np.float32))
    values.append(np.maximum(w, 0.0))
  if jax.process_count() > 1:
    vectors, values = _from_process_0(vectors), _from_process_0(values)
  return Basis(kind, train.segments, vectors, values, train.count, dim,
               layout_seed)


def _from_process_0(arrays: list) -> list:
  """Process 0's ``arrays`` on every process, bit for bit (sent as 32-bit
  words: jax would narrow float64 without x64; one collective of the saved
  basis's size)."""
  words = [np.ascontiguousarray(a).view(np.uint32) for a in arrays]
  got = multihost_utils.broadcast_one_to_all(words)
  return [np.asarray(w).view(a.dtype).reshape(a.shape) for w, a in zip(got, arrays)]


@dataclasses.dataclass
class QueryMetric:
  """One query set's ``R^(-1) = diag(diag) - sum_b C_b C_b^T`` in a basis'
  coordinates (module notes above), up to a positive factor (``fit_metric``
  scales it to ``max(diag) = 1``: the scores do not see it), and how it was
  chosen."""
  segments: tuple[tuple[int, int], ...]
  diag: np.ndarray                   # float64 [d]: a / max(a)
  lowrank: list                      # float64 [size_b, r_b] per segment: C_b / sqrt(max(a))
  lam: float
  damping: float
  rank: int
  num_eval: int
  lam_rule: float | None = None      # the rule's lam before its cap (task_lambda)

  def inverse(self, psi: np.ndarray) -> np.ndarray:
    """``R^(-1) psi`` for rows ``psi [n, d]`` (float64)."""
    psi = np.asarray(psi, np.float64)
    out = psi * self.diag
    for (lo, hi), c in zip(self.segments, self.lowrank):
      out[:, lo:hi] -= (psi[:, lo:hi] @ c) @ c.T
    return out

  def norms(self, psi: np.ndarray) -> np.ndarray:
    """``sqrt(psi^T R^(-1) psi)`` of each row (float64)."""
    psi = np.asarray(psi, np.float64)
    return np.sqrt(np.maximum(np.sum(psi * self.inverse(psi), axis=1), 0.0))

  def query_vectors(self, psi: np.ndarray) -> np.ndarray:
    """The scan's queries ``R^(-1) q / ||q||_R`` (float32 ``[Q, d]``)."""
    z = self.inverse(psi)
    norm = np.sqrt(np.maximum(np.sum(np.asarray(psi, np.float64) * z, axis=1), 0.0))
    return (z / np.maximum(norm, np.finfo(np.float32).tiny)[:, None]).astype(np.float32)

  def row_metric(self):
    """The ``tracer.topk.RowMetric`` a scan divides row scores with."""
    from tracer import topk  # pylint: disable=g-import-not-at-top
    return topk.RowMetric(self.diag.astype(np.float32),
                          tuple(c.astype(np.float32) for c in self.lowrank),
                          tuple(self.segments))


def identity_metric(dim: int) -> QueryMetric:
  """No R (``kind="none"``): the score is the projections' cosine."""
  return QueryMetric(((0, dim),), np.ones(dim), [np.zeros((dim, 0))], 0.0, 0.0, 0, 0)


def _eigvals_of_gram(e: np.ndarray) -> np.ndarray:
  """Eigenvalues of ``e^T e / n`` (``e [n, size]``), through the smaller Gram."""
  n, size = e.shape
  if size <= n:
    return np.linalg.eigvalsh(e.T @ e / n)
  return np.concatenate([np.linalg.eigvalsh(e @ e.T / n), np.zeros(size - n)])


def fit_metric(basis: Basis, eval_psi: np.ndarray | None = None, *,
               rank: int | None = None, damping: float = 0.1,
               lam: float | None = None,
               max_query_weight: float | None = MAX_QUERY_WEIGHT) -> QueryMetric:
  """A query set's scan-time R^(-1) (module notes), equal to ``fit``'s R.

  Args:
    basis: R_train's eigenbasis (the store's coordinates).
    eval_psi: the query examples' projections in that basis, ``[n_eval, d]``
      (R_eval); None gives the non-task-specific ``R = R_train``.
    rank, damping, lam, max_query_weight: as in ``fit``.
  """
  rank = int(round(0.015 * basis.dim)) if rank is None else rank
  segments = basis.segments
  evals, lam_rule = None, None
  if eval_psi is not None:
    eval_psi = np.asarray(eval_psi, np.float64)
    if not len(eval_psi):
      raise ValueError("R_eval needs at least one query")
    evals = [eval_psi[:, lo:hi] for lo, hi in segments]
    if lam is None:
      spectra = (np.concatenate(basis.values),
                 np.concatenate([_eigvals_of_gram(e) for e in evals]))
      lam_rule = lambda_rule(*spectra, rank)
      lam = task_lambda(*spectra, rank, len(eval_psi), max_query_weight)
  else:
    lam = 0.0
  diag, lowrank = [], []
  for b, (lo, hi) in enumerate(segments):
    s = basis.values[b]
    trace = (1 - lam) * s.sum()
    if evals is not None:
      trace += lam * np.sum(evals[b] ** 2) / len(eval_psi)
    if not trace > 0:  # a block no example moved weighs nothing (_inv_sqrt)
      diag.append(np.zeros(hi - lo))
      lowrank.append(np.zeros((hi - lo, 0)))
      continue
    floor = damping * trace / (hi - lo)
    a = 1.0 / ((1 - lam) * s + floor)
    diag.append(a)
    lowrank.append(_lowrank(a, evals[b] if evals is not None and lam > 0 else None,
                            lam, len(eval_psi) if evals is not None else 1))
  # The scores are R^(-1)'s cosines, the same for any positive multiple of it:
  # scaled to a largest diagonal entry of 1, the scan's float32 products stay
  # in range for every damping (at damping = 1e38, a ~ 1e-38 / trace: its
  # products underflowed and a row's norm fell to the floor, scores ~1e19).
  diag = np.concatenate(diag)
  peak = float(diag.max()) if diag.size else 0.0
  if peak > 0:
    diag = diag / peak
    lowrank = [c / np.sqrt(peak) for c in lowrank]
  return QueryMetric(segments, diag, lowrank, float(lam),
                     float(damping), rank, 0 if eval_psi is None else len(eval_psi),
                     lam_rule)


def _lowrank(a: np.ndarray, e: np.ndarray | None, lam: float, n_eval: int
             ) -> np.ndarray:
  """C with ``C C^T = D_a - (D_a^(-1) + G G^T)^(-1)``, G = sqrt(lam/n) e^T."""
  size = len(a)
  if e is None:
    return np.zeros((size, 0))
  g = np.sqrt(lam / n_eval) * e.T                      # [size, n_eval]
  if n_eval < size:
    # Woodbury: n_eval columns.
    ag = a[:, None] * g
    chol = np.linalg.cholesky(np.eye(n_eval) + g.T @ ag)
    return np.linalg.solve(chol, ag.T).T
  # At most size columns: factor the difference directly.
  r_inv = np.linalg.inv(np.diag(1.0 / a) + g @ g.T)
  w, u = np.linalg.eigh(np.diag(a) - r_inv)
  keep = w > 0
  return u[:, keep] * np.sqrt(w[keep])
