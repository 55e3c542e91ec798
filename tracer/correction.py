"""The optimizer-state correction: the second moment V found in optax states.

The corrected gradient is ``g / (sqrt(V) + epsilon)``, element-wise. V comes
from the checkpoint's optimizer state:
  * Adam / AdamW (``ScaleByAdamState``): ``nu / (1 - b2**count)``.
  * Adafactor (``FactoredState``): for a factored matrix
    ``V_ij = v_row_i * v_col_j / mean(v_row)`` (what Adafactor divides by), for
    other leaves the full ``v``. Adafactor's decay schedule needs no bias
    correction.
The state is searched wherever it sits in the optax tree (``chain``,
``inject_hyperparams``, ``masked``, ...).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Adam's default decay; used when the state does not say (no inject_hyperparams).
DEFAULT_ADAM_B2 = 0.999


def _find(state: Any, kind: type | tuple[type, ...]) -> list:
  found = []

  def visit(node):
    if isinstance(node, kind):
      found.append(node)
      return
    if isinstance(node, optax.MaskedState):
      visit(node.inner_state)
      return
    if isinstance(node, (tuple, list)):
      for child in node:
        visit(child)
    elif isinstance(node, dict):
      for child in node.values():
        visit(child)
    elif hasattr(node, "inner_state"):
      visit(node.inner_state)

  visit(state)
  return found


# ``optax.inject_hyperparams`` builds an InjectStatefulHyperparamsState (a class
# of its own, not a subclass of InjectHyperparamsState): look for both.
_INJECTED_STATES = tuple(
    getattr(optax, name) for name in
    ("InjectHyperparamsState", "InjectStatefulHyperparamsState")
    if hasattr(optax, name))


def _injected_b2(state: Any) -> float | None:
  for s in _find(state, _INJECTED_STATES):
    if "b2" in s.hyperparams:
      return float(s.hyperparams["b2"])
  return None


def _check_structure(tree: Any, params: Any, what: str, shapes: bool = True) -> None:
  if jax.tree.structure(tree) != jax.tree.structure(params):
    raise ValueError(f"{what} does not match the params tree: "
                     f"{jax.tree.structure(tree)} vs {jax.tree.structure(params)}")
  if not shapes:
    return
  for (path, x), p in zip(jax.tree_util.tree_flatten_with_path(tree)[0],
                          jax.tree.leaves(params)):
    if np.shape(x) != np.shape(p):
      raise ValueError(f"{what} at {jax.tree_util.keystr(path)} has shape "
                       f"{np.shape(x)}, params have {np.shape(p)}")


def _factored_v(v_row, v_col, v, param):
  if np.shape(v) == np.shape(param) and np.shape(v_row) == (1,):
    return v                                  # unfactored leaf: the full v
  shape = np.shape(param)
  d1, d0 = (int(i) for i in np.argsort(shape)[-2:])   # optax's factored dims
  reduced_d1 = d1 - 1 if d1 > d0 else d1

  def outer(v_row, v_col):
    row_mean = jnp.mean(v_row, axis=reduced_d1, keepdims=True)
    # A state before its first update has v_row = 0: V = 0, not 0/0 = NaN.
    row_mean = jnp.where(row_mean > 0, row_mean, 1.0)
    return jnp.expand_dims(v_row / row_mean, d0) * jnp.expand_dims(v_col, d1)

  # The factors are small and replicated; their product is as large as the
  # param (38.6 GB in f32 for an 8B model): made split as the param is, each
  # device computes only its own part.
  sharding = getattr(param, "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.jit(outer, out_shardings=sharding)(v_row, v_col)
  return outer(v_row, v_col)


def second_moment(opt_state: Any, params: Any, *, b2: float | None = None) -> Any:
  """The params-shaped pytree V of the optimizer's second-moment estimate.

  Args:
    opt_state: an optax state holding an Adam(W) or Adafactor sub-state.
    params: the params pytree the state belongs to.
    b2: Adam's decay, for the bias correction. Default: the injected
      hyperparameter if the state has one, else optax's default 0.999.

  Raises:
    ValueError: the state holds no second moment, or it does not match params.
  """
  adam = _find(opt_state, optax.ScaleByAdamState)
  factored = _find(opt_state, optax._src.factorized.FactoredState)
  if len(adam) + len(factored) == 0:
    raise ValueError("the optimizer state holds no second moment (no Adam "
                     "ScaleByAdamState and no Adafactor FactoredState found)")
  if len(adam) + len(factored) > 1:
    raise ValueError("the optimizer state holds several second moments; pass the "
                     "sub-state that preconditions the updates")
  if adam:
    state = adam[0]
    _check_structure(state.nu, params, "the optimizer state's nu")
    if b2 is None:
      b2 = _injected_b2(opt_state)
    if b2 is None:
      b2 = DEFAULT_ADAM_B2
    count = jnp.asarray(state.count, jnp.float32)
    correction = 1.0 - jnp.power(jnp.float32(b2), jnp.maximum(count, 1.0))
    return jax.tree.map(lambda nu: nu.astype(jnp.float32) / correction, state.nu)
  state = factored[0]
  _check_structure(state.v, params, "the Adafactor state", shapes=False)
  return jax.tree.map(_factored_v, state.v_row, state.v_col, state.v, params)


def steps_taken(opt_state: Any) -> int | None:
  """The update count of the state's Adam or Adafactor sub-state (concrete
  arrays only), or None where it has none to read."""
  states = _find(opt_state, (optax.ScaleByAdamState,
                             optax._src.factorized.FactoredState))
  count = getattr(states[0], "count", None) if len(states) == 1 else None
  if count is None or isinstance(count, jax.core.Tracer):
    return None
  return int(np.asarray(jax.device_get(count)))


def without_first_moments(opt_state: Any, fill: Any) -> Any:
  """``opt_state`` with every leaf of its first moments (Adam's ``mu``, a
  momentum ``trace``) replaced by ``fill``: ``second_moment`` reads none of
  them, and a checkpoint restore given ``fill`` (Orbax's placeholder) skips
  them, half of Adam's state."""
  firsts = (optax.ScaleByAdamState, optax.TraceState)

  def strip(node):
    if isinstance(node, optax.ScaleByAdamState):
      return node._replace(mu=jax.tree.map(lambda _: fill, node.mu))
    if isinstance(node, optax.TraceState):
      return node._replace(trace=jax.tree.map(lambda _: fill, node.trace))
    return node
  return jax.tree.map(strip, opt_state, is_leaf=lambda x: isinstance(x, firsts))


def correct(grads: Any, v: Any | None, epsilon: float) -> Any:
  """``g / (sqrt(V) + epsilon)``; ``v=None`` leaves gradients uncorrected."""
  if v is None:
    return grads
  return jax.tree.map(lambda g, vv: g / (jnp.sqrt(vv) + epsilon), grads, v)
