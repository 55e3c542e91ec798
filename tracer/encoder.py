"""Gradient encodings: TrackStar's per-example vectors.

    encoding = normalize(R^(-1/2) . P . (grad L(example) / (sqrt(V) + eps)))

Per-example gradients are taken under ``jax.jit`` on a (data, model) mesh:
examples split over ``data``, params split over ``model`` as training splits
them (``tracer.partitioning``). A batch runs as a sequence of microbatches of
``data_size * microbatch_size`` examples, so at most ``microbatch_size`` full
gradients are live per data shard.

Two ways to feed a batch, one computation:
  * global (``project``, ``encode``): every process passes the whole batch;
    results come back whole (queries, tests, small corpora).
  * process-local (``project_local``): every process passes only the
    examples of its own positions (``local_positions``); the projections stay
    where they were computed (``partitioning.local_part`` brings a process its
    own rows), and nothing crosses hosts but the model's own collectives. This
    is how a corpus is encoded on a pod (``tracer.pipeline.encode_corpus``).
A batch of B examples is laid out as ``[steps, step_size]`` positions (B
padded up); step ``s``'s positions are split over the ``data`` axis, so a
process holds a fixed block of each step.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tracer import correction
from tracer import hessian
from tracer import partitioning
from tracer import projection


class Projected(NamedTuple):
  """Unnormalized projections of a batch, as global arrays on the mesh."""
  phi: jax.Array     # f32[steps, step_size, d]
  valid: jax.Array   # bool[steps, step_size]: False at padding positions


class GradientEncoder:
  """Encodes examples of any JAX model given ``loss_fn(params, example)``.

  Args:
    loss_fn: scalar loss of ONE example (a pytree of arrays without batch axis).
    params: the params pytree of the checkpoint being explained (host arrays,
      or arrays already on the mesh, e.g. from a sharded restore).
    second_moment: params-shaped pytree V (``tracer.second_moment``), or None
      for no optimizer correction.
    epsilon: added to sqrt(V); default 1e-8, Adam's own default. Launch scripts
      take it from the checkpoint's optimizer config.
    projection_dim: the total projection budget; ``encoder.dim`` is the real d.
    seed: seed of the projection matrices.
    mesh: a (data, model) mesh; None means every device on the data axis.
    microbatch_size: examples per data shard per step.
  """

  def __init__(self, loss_fn: Callable[[Any, Any], jax.Array], params: Any, *,
               second_moment: Any | None = None, epsilon: float = 1e-8,
               projection_dim: int = 4096, seed: int = 0, mesh=None,
               microbatch_size: int = 8):
    self.mesh = partitioning.make_mesh() if mesh is None else mesh
    self.layout = projection.make_layout(params, projection_dim, seed)
    self.epsilon = float(epsilon)
    self.microbatch_size = int(microbatch_size)
    param_sharding = partitioning.param_shardings(self.mesh, params)
    self.params = partitioning.place(params, param_sharding)
    if second_moment is not None:
      correction._check_structure(second_moment, params, "second_moment")
      second_moment = partitioning.place(
          jax.tree.map(lambda v: v.astype(jnp.float32) if isinstance(v, jax.Array)
                       else np.asarray(v, np.float32), second_moment),
          param_sharding)
    self.second_moment = second_moment
    self.step_size = self.mesh.shape[partitioning.DATA] * self.microbatch_size
    lo, hi = partitioning.data_block(self.mesh)
    self._local = (lo * self.microbatch_size, hi * self.microbatch_size)
    self._sharding = partitioning.stepped_batch(self.mesh)
    layout, eps = self.layout, self.epsilon

    def project_all(params, v, batch):
      def one(microbatch):
        losses, grads = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0))(
            params, microbatch)
        phi = projection.project(layout, correction.correct(grads, v, eps))
        return phi, losses.astype(jnp.float32)
      return jax.lax.map(one, batch)

    self._project = jax.jit(project_all,
                            out_shardings=(self._sharding, self._sharding))

  @property
  def dim(self) -> int:
    return self.layout.dim

  # --- process-local batches ------------------------------------------------

  def local_positions(self, size: int) -> np.ndarray:
    """Positions of a ``size``-example batch this process supplies, in order.

    The batch is padded to ``steps * step_size`` positions; positions
    ``>= size`` are padding. Every process of a data group gets the same.
    """
    steps = max(1, -(-size // self.step_size))
    lo, hi = self._local
    return (np.arange(steps)[:, None] * self.step_size
            + np.arange(lo, hi)[None, :]).ravel()

  def local_batch_size(self, size: int) -> int:
    return len(self.local_positions(size))

  def put_local(self, local: np.ndarray) -> jax.Array:
    """A global ``[steps, step_size, ...]`` array from this process's values
    for its ``local_positions`` (``[steps * block, ...]``, in that order)."""
    local = np.asarray(local)
    block = self._local[1] - self._local[0]
    steps = len(local) // block
    if steps * block != len(local) or steps == 0:
      raise ValueError(f"a process-local batch has a multiple of {block} "
                       f"examples (local_batch_size), got {len(local)}")
    return partitioning.from_local(
        local.reshape(steps, block, *local.shape[1:]), self._sharding,
        (steps, self.step_size, *local.shape[1:]), axis=1, start=self._local[0])

  def project_local(self, local_batch: Any, local_valid: np.ndarray,
                    ids: Sequence[Any] | None = None) -> Projected:
    """Unnormalized ``P (g / (sqrt(V) + eps))`` of a process-local batch.

    Every process calls this together, each with the examples of its own
    positions (``local_batch_size(size)`` of them, all processes agreeing on
    ``size``) and ``local_valid`` marking which are real. Padding positions
    must still hold real examples (repeat one): their losses must be finite.
    ``ids[i]`` names local example ``i`` in the error raised when a real
    example's loss or gradient is not finite (raised on every process).
    """
    local_valid = np.asarray(local_valid, bool)
    batch = jax.tree.map(self.put_local, local_batch)
    valid = self.put_local(local_valid)
    phi, losses = self._project(self.params, self.second_moment, batch)
    ok, finite = _check_finite(phi, losses, valid)
    if not bool(ok.addressable_data(0)):
      local_ok = partitioning.local_part(finite, axis=1).reshape(-1)
      bad = np.flatnonzero(~local_ok & local_valid)
      names = [ids[i] if ids is not None else int(i) for i in bad[:10]]
      raise FloatingPointError(
          f"non-finite loss or gradient for example(s) {names} on process "
          f"{jax.process_index()} (or on another process: see its log); no "
          f"encodings were returned")
    return Projected(phi, valid)

  def _check(self, preconditioner) -> None:
    if preconditioner is not None and preconditioner.dim != self.dim:
      raise ValueError(f"preconditioner has d={preconditioner.dim}, encoder d={self.dim}")
    if preconditioner is not None and preconditioner.layout_seed != self.layout.seed:
      raise ValueError(f"preconditioner was fitted for projection seed "
                       f"{preconditioner.layout_seed}, encoder uses {self.layout.seed}")

  # --- global batches ---------------------------------------------------------

  def _from_global(self, batch: Any) -> tuple[Any, np.ndarray]:
    """This process's share of a batch every process holds whole."""
    size = len(jax.tree.leaves(batch)[0])
    positions = self.local_positions(size)
    # Padding repeats the last example: a real input keeps any loss finite.
    take = np.minimum(positions, size - 1)
    return jax.tree.map(lambda x: np.asarray(x)[take], batch), positions < size

  def project_global(self, batch: Any, ids: Sequence[Any] | None = None
                     ) -> Projected:
    """``project_local`` for a batch every process holds whole."""
    local, valid = self._from_global(batch)
    positions = self.local_positions(len(valid))
    local_ids = None if ids is None else [ids[p] for p in positions[valid]] + [
        None] * int((~valid).sum())
    return self.project_local(local, valid, local_ids)

  def project(self, batch: Any, ids: Sequence[Any] | None = None) -> jax.Array:
    """Unnormalized ``P (g / (sqrt(V) + eps))``: float32 ``[B, dim]`` on the mesh.

    ``batch`` has a leading axis of any size B and is held whole by every
    process. ``ids`` name the examples in the error raised when a loss or
    gradient is not finite.
    """
    size = len(jax.tree.leaves(batch)[0])
    phi = self.project_global(batch, ids).phi
    return phi.reshape(-1, self.dim)[:size]

  def encode(self, batch: Any, preconditioner: hessian.Preconditioner | None = None,
             *, normalize: bool = True, ids: Sequence[Any] | None = None
             ) -> np.ndarray:
    """Encodings float32 ``[B, dim]``: unit-norm rows unless ``normalize=False``."""
    return partitioning.fetch(self.encode_on_device(
        batch, preconditioner, normalize=normalize, ids=ids))

  def encode_on_device(self, batch: Any,
                       preconditioner: hessian.Preconditioner | None = None, *,
                       normalize: bool = True, ids: Sequence[Any] | None = None
                       ) -> jax.Array:
    """``encode`` without the copy to host: ``[B, dim]`` on the mesh."""
    self._check(preconditioner)
    phi = self.project(batch, ids)
    if preconditioner is not None:
      phi = preconditioner.apply(phi)
    return unit_normalize(phi) if normalize else phi

  def accumulate(self, moments: hessian.Moments, projected: Projected
                 ) -> hessian.Moments:
    """Adds a batch's real rows to R's moments (an all-reduce over hosts)."""
    return hessian.accumulate(moments, projected.phi, projected.valid)


@jax.jit
def _check_finite(phi, losses, valid):
  finite = jnp.isfinite(losses) & jnp.all(jnp.isfinite(phi), axis=-1)
  return jnp.all(finite | ~valid), finite


@jax.jit
def unit_normalize(x: jax.Array) -> jax.Array:
  """Rows scaled to unit L2 norm (a zero row stays zero)."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny)


def fit_preconditioner(encoder: GradientEncoder, train_batches: Iterable[Any],
                       eval_batches: Iterable[Any] | None = None, *,
                       kind: str = "block", rank: int | None = None,
                       damping: float = 0.1, lam: float | None = None
                       ) -> hessian.Preconditioner:
  """Fits ``R^(-1/2)`` for ``encoder.encode(..., preconditioner=...)``.

  Args:
    encoder: the encoder whose projected gradients R describes.
    train_batches: example batches from the corpus (R_train); a sample of a
      few thousand examples is typical.
    eval_batches: query batches (R_eval). None gives the non-task-specific
      variant R = R_train.
    kind: "block" (one matrix per projection block) or "full" (d x d).
    rank: k of the lambda rule (default 1.5% of d).
    damping: added to every eigenvalue, as a fraction of their mean.
    lam: a fixed mix instead of the lambda rule.
  """
  def moments(batches):
    m = hessian.init_moments(encoder.layout, kind)
    for batch in batches:
      m = encoder.accumulate(m, encoder.project_global(batch))
    return m

  train = moments(train_batches)
  eval_ = None if eval_batches is None else moments(eval_batches)
  return hessian.fit(train, eval_, kind=kind, dim=encoder.dim,
                     layout_seed=encoder.layout.seed, rank=rank, damping=damping,
                     lam=lam)
