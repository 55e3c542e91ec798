"""Gradient encodings: TrackStar's per-example vectors.

    encoding = normalize(R^(-1/2) . P . (grad L(example) / (sqrt(V) + eps)))

Per-example gradients are taken under ``jax.jit`` on a (data, model) mesh:
examples split over ``data``, params split over ``model`` as training splits
them (``tracer.partitioning``). A batch runs as a sequence of microbatches of
``data_size * microbatch_size`` examples, so at most ``microbatch_size`` full
gradients are live per data shard.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tracer import correction
from tracer import hessian
from tracer import partitioning
from tracer import projection


class GradientEncoder:
  """Encodes examples of any JAX model given ``loss_fn(params, example)``.

  Args:
    loss_fn: scalar loss of ONE example (a pytree of arrays without batch axis).
    params: the params pytree of the checkpoint being explained.
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
    self.params = jax.device_put(params, param_sharding)
    if second_moment is not None:
      correction._check_structure(second_moment, params, "second_moment")
      second_moment = jax.device_put(
          jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), second_moment),
          param_sharding)
    self.second_moment = second_moment
    self._step_size = self.mesh.shape[partitioning.DATA] * self.microbatch_size
    layout, eps = self.layout, self.epsilon

    def project_all(params, v, batch):
      def one(microbatch):
        losses, grads = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0))(
            params, microbatch)
        phi = projection.project(layout, correction.correct(grads, v, eps))
        return phi, losses.astype(jnp.float32)
      return jax.lax.map(one, batch)

    stepped = partitioning.stepped_batch(self.mesh)
    self._project = jax.jit(project_all, out_shardings=(stepped, stepped))

  @property
  def dim(self) -> int:
    return self.layout.dim

  def project(self, batch: Any, ids: Sequence[Any] | None = None) -> jax.Array:
    """Unnormalized ``P (g / (sqrt(V) + eps))``: float32 ``[B, dim]`` on the mesh.

    ``batch`` has a leading axis of any size B. ``ids`` name the examples in
    the error raised when a loss or gradient is not finite.
    """
    size = len(jax.tree.leaves(batch)[0])
    steps = -(-size // self._step_size)
    padded = steps * self._step_size
    sharding = partitioning.stepped_batch(self.mesh)

    def prepare(x):
      x = np.asarray(x)
      # Pad by repeating the last example: a real input keeps any loss finite.
      x = np.concatenate([x, np.repeat(x[-1:], padded - size, axis=0)])
      return partitioning.put_global(
          x.reshape(steps, self._step_size, *x.shape[1:]), sharding)

    phi, losses = self._project(self.params, self.second_moment,
                                jax.tree.map(prepare, batch))
    phi = phi.reshape(padded, self.dim)[:size]
    losses = partitioning.fetch(losses).reshape(padded)[:size]
    finite = np.isfinite(losses) & partitioning.fetch(_rows_finite(phi))
    if not finite.all():
      bad = [ids[i] if ids is not None else int(i) for i in np.flatnonzero(~finite)]
      raise FloatingPointError(
          f"non-finite loss or gradient for example(s) {bad[:10]} "
          f"(losses {losses[~finite][:10].tolist()}); no encodings were returned")
    return phi

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
    """``encode`` without the copy to host (for streaming into a scan)."""
    if preconditioner is not None and preconditioner.dim != self.dim:
      raise ValueError(f"preconditioner has d={preconditioner.dim}, encoder d={self.dim}")
    if preconditioner is not None and preconditioner.layout_seed != self.layout.seed:
      raise ValueError(f"preconditioner was fitted for projection seed "
                       f"{preconditioner.layout_seed}, encoder uses {self.layout.seed}")
    phi = self.project(batch, ids)
    if preconditioner is not None:
      phi = preconditioner.apply(phi)
    return unit_normalize(phi) if normalize else phi


@jax.jit
def _rows_finite(phi):
  return jnp.all(jnp.isfinite(phi), axis=-1)


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
      m = hessian.accumulate(m, encoder.project(batch))
    return m

  train = moments(train_batches)
  eval_ = None if eval_batches is None else moments(eval_batches)
  return hessian.fit(train, eval_, kind=kind, dim=encoder.dim,
                     layout_seed=encoder.layout.seed, rank=rank, damping=damping,
                     lam=lam)
