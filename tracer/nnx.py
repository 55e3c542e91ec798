"""Flax NNX models through tracer's model contract.

An NNX module holds its own weights; tracer's core wants a pure
``loss_fn(params, example)`` and a params pytree. ``as_contract`` splits the
module into its graph (static), its ``nnx.Param`` state (the params) and every
other variable (batch statistics, RNG state, caches, constants), which the
loss keeps fixed at the values the module had when it was split::

  import tracer.nnx

  def loss(model, example):                 # ONE example, no batch axis
    logits = model(example["inputs"])
    ...
    return scalar

  enc = tracer.nnx.encoder(model, loss, optimizer=optimizer,  # nnx.Optimizer
                           projection_dim=65536, mesh=mesh)
  phi = enc.project(batch)                  # f32[B, enc.dim]

The params are the ``nnx.Param`` state as nested plain dicts
(``nnx.to_pure_dict``): block names are attribute paths (``embed/embedding``,
``layers/0/kernel``), the same as a linen model's with the same submodule
names, so the projections, the store fingerprint and the checkpoint's V line
up with a linen twin's.

The module's mode is frozen into the graph when it is split: put it in
evaluation mode first (``nnx.view(model, deterministic=True)`` or
``model.eval()``) if it has dropout.

Kernel: NNX layers (``nnx.Linear``, ``nnx.Embed``, ``nnx.Einsum``) are not
linen calls, so ``tracer.factored`` cannot intercept them: every NNX weight
takes the materialized path (per-example ``jax.grad``, then projected), which
is what ``kernel="exact"`` computes. ``encoder`` therefore defaults to
``kernel="exact"``; ``kernel="factored"`` gives the same encodings, with a
warning that no weight could be factored.
"""

from __future__ import annotations

from typing import Any, Callable

from flax import nnx
import jax

from tracer import correction
from tracer import encoder as encoder_lib


def _pure(tree: Any) -> Any:
  """``tree`` with every ``nnx.State`` a nested dict and every ``nnx.Variable``
  its value: what optax and tracer's pytree code expect."""
  def leaf(x):
    if isinstance(x, nnx.State):
      return nnx.to_pure_dict(x)
    if isinstance(x, nnx.Variable):
      return x.get_value()
    return x
  return jax.tree.map(leaf, tree,
                      is_leaf=lambda x: isinstance(x, (nnx.State, nnx.Variable)))


def params_of(module: nnx.Module) -> dict:
  """The module's ``nnx.Param`` state as nested dicts (the contract's params)."""
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def as_contract(module: nnx.Module, loss: Callable[[Any, Any], jax.Array]
                ) -> tuple[Callable[[Any, Any], jax.Array], dict]:
  """``(loss_fn, params)`` of the model contract for an NNX module.

  Args:
    module: the NNX model being explained (not modified).
    loss: ``loss(module, example) -> scalar`` for ONE example.

  Returns:
    ``loss_fn(params, example) -> scalar``, which merges the module's graph
    with ``params`` and its non-param state (fixed), and ``params``: the
    ``nnx.Param`` state as nested dicts (arrays shared with the module).
  """
  graphdef, state, rest = nnx.split(module, nnx.Param, ...)
  params = nnx.to_pure_dict(state)
  # Values, not the State: a State holds the module's own Variable objects,
  # which ``merge`` would reuse. Merged from values, every call gets fresh
  # Variables, and whatever the loss writes to them (RNG counts, batch
  # statistics) stays inside that call's trace.
  rest = nnx.to_pure_dict(rest)

  def loss_fn(params, example):
    return loss(nnx.merge(graphdef, params, rest), example)

  return loss_fn, params


def optax_state(optimizer: Any) -> Any:
  """The plain optax state of an ``nnx.Optimizer`` (or of its ``opt_state``):
  its params-shaped parts nested dicts matching ``as_contract``'s params, so
  ``tracer.second_moment(optax_state(optimizer), params)`` finds V."""
  if isinstance(optimizer, nnx.Optimizer):
    optimizer = optimizer.opt_state
  return _pure(optimizer)


def second_moment(optimizer: Any, module: Any, *, b2: float | None = None) -> dict:
  """V (``tracer.second_moment``) of an ``nnx.Optimizer`` that trained ``module``.

  Args:
    optimizer: an ``nnx.Optimizer`` built with ``wrt=nnx.Param`` over optax
      Adam(W) or Adafactor (any chain, ``inject_hyperparams``), or its
      ``opt_state``, or a plain optax state. A checkpoint restored as an
      ``nnx.State`` goes back into an optimizer first (``nnx.update``).
    module: the NNX module, or the params from ``as_contract``.
    b2: Adam's decay for the bias correction; default: the injected
      hyperparameter, else optax's 0.999.

  Returns:
    V as nested dicts shaped like the params.
  """
  params = params_of(module) if isinstance(module, nnx.Module) else _pure(module)
  return correction.second_moment(optax_state(optimizer), params, b2=b2)


_second_moment = second_moment   # encoder's argument of that name hides it


def encoder(module: nnx.Module, loss: Callable[[Any, Any], jax.Array], *,
            optimizer: Any | None = None, b2: float | None = None,
            second_moment: Any | None = None, param_shardings: Any | None = None,
            kernel: str = "exact", **kwargs) -> encoder_lib.GradientEncoder:
  """A ``GradientEncoder`` of an NNX module in one call.

  Args:
    module: the NNX model being explained.
    loss: ``loss(module, example) -> scalar`` for ONE example.
    optimizer: an ``nnx.Optimizer`` (or optax state) whose second moment
      corrects the gradients (``second_moment`` above, with ``b2``); None and
      no ``second_moment``: no correction.
    second_moment: V itself instead (nested dicts or an ``nnx.State``).
    param_shardings: as GradientEncoder's (nested dicts or an ``nnx.State``
      of ``PartitionSpec`` / ``NamedSharding``).
    kernel: "exact" (default: NNX weights are never factored, see the module
      docstring) or "factored".
    **kwargs: GradientEncoder's other arguments (``projection_dim``, ``seed``,
      ``mesh``, ``epsilon``, ``microbatch_size``, ...).
  """
  loss_fn, params = as_contract(module, loss)
  if optimizer is not None:
    if second_moment is not None:
      raise ValueError("pass optimizer or second_moment, not both")
    second_moment = _second_moment(optimizer, params, b2=b2)
  elif second_moment is not None:
    second_moment = _pure(second_moment)
  if param_shardings is not None:
    param_shardings = _pure(param_shardings)
  return encoder_lib.GradientEncoder(
      loss_fn, params, second_moment=second_moment,
      param_shardings=param_shardings, kernel=kernel, **kwargs)
