"""Training: the optimizer, a data-parallel step, and a deterministic batch order.

The optimizer is described by a plain ``OptimizerConfig`` that is stored in the
checkpoint, so later stages (the optimizer-state correction, tail-patch) rebuild
exactly the optimizer that produced the state.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tracer import partitioning
from tracer.config import OptimizerConfig


def learning_rate_schedule(c: OptimizerConfig) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=c.learning_rate, warmup_steps=c.warmup_steps,
      decay_steps=max(c.total_steps, c.warmup_steps + 1),
      end_value=c.learning_rate * c.final_lr_fraction)


def make_optimizer(c: OptimizerConfig, learning_rate: Any = None
                   ) -> optax.GradientTransformation:
  """The training optimizer; ``learning_rate`` overrides the schedule."""
  lr = learning_rate_schedule(c) if learning_rate is None else learning_rate
  if c.name == "adamw":
    opt = optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
  elif c.name == "adafactor":
    opt = optax.adafactor(lr, decay_rate=c.adafactor_decay_rate, eps=c.eps,
                          weight_decay_rate=c.weight_decay or None,
                          multiply_by_parameter_scale=False)
  else:
    raise ValueError(f"optimizer name {c.name!r}: expected 'adamw' or 'adafactor'")
  return optax.chain(optax.clip_by_global_norm(c.clip_norm), opt)


def make_train_step(loss_fn: Callable, optimizer, mesh, params) -> Callable:
  """A jitted ``step(params, opt_state, batch) -> (params, opt_state, loss)``
  minimizing the batch mean of ``loss_fn(params, example)`` (the model
  contract: one example; e.g. ``family.loss_fn(config)``).

  Data parallel: the batch is split over every device of the mesh, params and
  optimizer state are replicated.
  """
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(
        lambda p: jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(p, batch)))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rep = partitioning.replicated(mesh)
  return jax.jit(step, in_shardings=(rep, rep, partitioning.all_devices_batch(mesh)),
                 out_shardings=(rep, rep, rep), donate_argnums=(0, 1))


def batch_rows(step: int, batch_size: int, num_rows: int, seed: int) -> np.ndarray:
  """Rows of the batch for ``step``: epochs of seeded permutations, in order.

  A function of the step alone, so a resumed run sees the same batches.
  """
  positions = np.arange(step * batch_size, (step + 1) * batch_size)
  epochs, offsets = np.divmod(positions, num_rows)
  out = np.empty(batch_size, np.int64)
  for epoch in np.unique(epochs):
    out[epochs == epoch] = _permutation(seed, int(epoch), num_rows)[
        offsets[epochs == epoch]]
  return out


@functools.lru_cache(maxsize=2)  # this epoch's and the next: a step spans both
def _permutation(seed: int, epoch: int, num_rows: int) -> np.ndarray:
  """The epoch's order of the rows, made once per epoch, not once per step
  (at 78M rows: 5 s and 595 MiB each)."""
  perm = np.random.default_rng([seed, epoch]).permutation(num_rows)
  perm.flags.writeable = False
  return perm
