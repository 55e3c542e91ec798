"""Tail-patch: the influence of one training example on one query.

For a query (prompt, target) and a training example z, tail-patch takes ONE
optimizer step on z alone from the final checkpoint and measures the change in
``log p(target | prompt)``:

  params' = params + optimizer.update(grad example_loss(params, z), opt_state)
  delta   = target_logprob(params', query) - target_logprob(params, query)

The checkpoint's optimizer state is the starting state of every step and is
never changed, so each pair is an independent one-step "patch". Higher means
the example promotes the target more (the paper's influence metric, averaged
over each query's top-k proponents by ``tail_patch_at_k``).

Typical use, evaluating several methods' top-k lists at once::

  pairs, inverse = pairs_for_topk(rows)            # rows: int[M, Q, K], -1 missing
  opt = tail_patch_optimizer(ckpt.optimizer_config, ckpt.step)
  d = tail_patch_deltas(ckpt.model_config, ckpt.params, ckpt.opt_state, opt,
                        corpus.examples(range(len(corpus))), queries, pairs,
                        family=ckpt.family)
  scores = [tail_patch_at_k(x) for x in deltas_for_topk(d, inverse)]
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tracer import family as family_lib
from tracer import partitioning
from tracer import train as train_lib
from tracer.errors import InputError


def tail_patch_optimizer(optimizer_config: train_lib.OptimizerConfig, step: int, *,
                         sgd_learning_rate: float | None = None
                         ) -> optax.GradientTransformation:
  """The optimizer of the tail-patch step.

  Default: the checkpoint's own optimizer (``train.make_optimizer`` with the
  same config, gradient clipping and weight decay included) with its learning
  rate fixed at ``learning_rate_schedule(config)(step)``, the rate the next
  training step after a checkpoint at ``step`` would use. The rate is passed
  as a constant schedule, so the optax state has the training structure and
  the checkpoint's ``opt_state`` is used as is (Adam's moments and count).

  With ``sgd_learning_rate``: plain ``optax.sgd(sgd_learning_rate)``, with no
  clipping and no checkpoint state (pass ``optimizer.init(params)``).

  Raises:
    InputError: the schedule's rate at ``step`` is 0 (without
      ``sgd_learning_rate``).
  """
  if sgd_learning_rate is not None:
    if not sgd_learning_rate > 0:  # 0 would patch nothing: every delta 0
      raise ValueError(f"sgd_learning_rate={sgd_learning_rate}: expected > 0")
    return optax.sgd(float(sgd_learning_rate))
  lr = final_learning_rate(optimizer_config, step)
  if not lr > 0:  # e.g. warmup's step 0, or a schedule ending at 0
    c = optimizer_config
    raise InputError(
        f"the checkpoint's learning rate at step {step} is {lr} (OptimizerConfig"
        f".warmup_steps={c.warmup_steps}, total_steps={c.total_steps}, "
        f"final_lr_fraction={c.final_lr_fraction}): a tail-patch step at it "
        "would patch nothing (every delta 0, up to rounding); expected "
        "--sgd_learning_rate=<a rate > 0>, or a checkpoint of another step")
  return train_lib.make_optimizer(optimizer_config,
                                  learning_rate=optax.constant_schedule(lr))


def final_learning_rate(optimizer_config: train_lib.OptimizerConfig,
                        step: int) -> float:
  """The training schedule's learning rate at ``step``."""
  return float(train_lib.learning_rate_schedule(optimizer_config)(int(step)))


@functools.lru_cache(maxsize=8)
def _compiled(family: family_lib.Family, model_config: Any, optimizer, mesh):
  """(base_fn, delta_fn), jitted for ``mesh``; compiled once per batch shape.
  Pairs are split over ``data``; params, optimizer state and each pair's
  gradient and patched params lie as the params do (split over ``model``)."""
  rows = partitioning.data_batch(mesh)
  loss_fn = family.loss_fn(model_config)

  def take(examples, idx):
    return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), examples)

  def base(params, queries, query_idx):
    """f32[B]: log p(target | prompt) of ``queries[query_idx]``."""
    return jax.vmap(lambda q: family.target_logprob(model_config, params, q))(
        take(queries, query_idx))

  def one(params, opt_state, example, query, base_logprob):
    grads = jax.grad(lambda p: loss_fn(p, example))(params)
    updates, _ = optimizer.update(grads, opt_state, params)
    patched = optax.apply_updates(params, updates)
    return family.target_logprob(model_config, patched, query) - base_logprob

  def delta(params, opt_state, train, queries, base_logprobs, train_idx, query_idx):
    """f32[B]: the tail-patch delta of pairs (query_idx[i], train_idx[i])."""
    return jax.vmap(one, in_axes=(None, None, 0, 0, 0))(
        params, opt_state, take(train, train_idx), take(queries, query_idx),
        jnp.take(base_logprobs, query_idx))

  # Inputs keep the shardings they are placed on (``tail_patch_deltas``).
  return (jax.jit(base, out_shardings=rows), jax.jit(delta, out_shardings=rows))


def _to_f32(tree: Any) -> Any:
  return jax.tree.map(
      lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
      tree)


def _batched(fn, indices: Sequence[np.ndarray], batch: int, mesh,
             progress=None) -> np.ndarray:
  """Runs ``fn(*index_batches)`` over rows of ``indices`` in padded batches;
  ``progress(done, total)`` after each."""
  n = len(indices[0])
  sharding = partitioning.data_batch(mesh)
  out = []
  for lo in range(0, n, batch):
    chunk = [np.asarray(ix[lo:lo + batch], np.int32) for ix in indices]
    size = len(chunk[0])
    # Pad with row 0 (a valid index) and drop those results.
    chunk = [np.pad(c, (0, batch - size)) for c in chunk]
    result = fn(*(partitioning.put_global(c, sharding) for c in chunk))
    out.append(partitioning.fetch(result)[:size])
    if progress is not None:
      progress(lo + size, n)
  return np.concatenate(out).astype(np.float32)


def _pad_pow2(rows: np.ndarray) -> np.ndarray:
  size = 1 << int(np.ceil(np.log2(len(rows))))
  return np.pad(rows, (0, size - len(rows)), mode="edge")


def tail_patch_deltas(model_config: Any, params: Any, opt_state: Any,
                      optimizer: optax.GradientTransformation, train_examples: dict,
                      query_examples: dict, pairs: np.ndarray, *,
                      mesh: jax.sharding.Mesh | None = None,
                      batch_size: int = 64, progress=None,
                      family: family_lib.Family = family_lib.LM) -> np.ndarray:
  """Tail-patch deltas f32[P] for ``pairs`` int[P, 2] of (query_index, train_index).

  Args:
    model_config: the model (``family``'s config, hashable: the compiled
      programs are cached on it); run in float32 whatever its ``dtype``.
    params: the checkpoint's params.
    opt_state: ``optimizer``'s state (the checkpoint's for the default
      ``tail_patch_optimizer``, ``optimizer.init(params)`` for SGD); the same
      state starts every pair's step, and it is not modified.
    optimizer: see ``tail_patch_optimizer``.
    train_examples: stacked corpus examples (arrays [N, L]), e.g.
      ``Corpus.examples(rows)``; ``pairs[:, 1]`` indexes them.
    query_examples: stacked query examples (arrays [Q, L]); ``pairs[:, 0]``
      indexes them.
    pairs: int[P, 2] of (query_index, train_index).
    mesh: pairs are split over its ``data`` axis, and each pair's step over
      its ``model`` axis as the params are (``family.param_shardings``; the
      optimizer state by shape), so params never sit whole on one device.
      Default: all devices on ``data``.
    batch_size: pairs per jitted call, rounded up to a multiple of the
      ``data`` axis size (the last batch is padded). A device holds its
      share of each of its pairs' gradient and patched params:
      ``batch_size / data`` x |params| / ``model`` floats each.
    progress: called as ``progress(pairs_done, num_pairs)`` after each call.
    family: the model family (``tracer.family``; ``ckpt.family``): its loss
      and target log-prob.

  Returns:
    f32[P]: ``target_logprob(params') - target_logprob(params)`` per pair,
    where ``params'`` is one ``optimizer`` step on the train example alone.
    The base log-prob is computed once per query.
  """
  mesh = partitioning.make_mesh() if mesh is None else mesh
  # A delta is the difference of two nearly equal log-probs: computed at a
  # bf16 model's own precision it is noise (the audit of 2026-12-04: signs
  # flipped, the ranking of 4 pairs changed). Params and activations in f32.
  if dataclasses.is_dataclass(model_config) and hasattr(model_config, "dtype"):
    model_config = dataclasses.replace(model_config, dtype="float32")
  pairs = np.asarray(pairs)
  if pairs.size and (pairs.ndim != 2 or pairs.shape[1] != 2):
    raise ValueError(f"pairs: expected int[P, 2], got shape {pairs.shape}")
  pairs = pairs.astype(np.int64).reshape(-1, 2)
  num_train = len(next(iter(train_examples.values())))
  num_queries = len(next(iter(query_examples.values())))
  if pairs.size and (pairs.min() < 0 or pairs[:, 0].max() >= num_queries
                     or pairs[:, 1].max() >= num_train):
    raise ValueError(f"pairs index out of range: {num_queries} queries, "
                     f"{num_train} train examples")
  if not len(pairs):
    return np.zeros(0, np.float32)

  # Only the rows the pairs use travel to the devices (replicated once), padded
  # to a power of two so that calls with similar counts share one compilation.
  query_rows, query_idx = np.unique(pairs[:, 0], return_inverse=True)
  train_rows, train_idx = np.unique(pairs[:, 1], return_inverse=True)
  query_rows, train_rows = _pad_pow2(query_rows), _pad_pow2(train_rows)
  rep = partitioning.replicated(mesh)
  put = lambda tree: jax.tree.map(
      lambda x: partitioning.put_global(np.asarray(x), rep), tree)
  queries = put({k: np.asarray(v)[query_rows] for k, v in query_examples.items()})
  train = put({k: np.asarray(v)[train_rows] for k, v in train_examples.items()})
  # Never whole on one device: params as the family splits them over
  # ``model``, the optimizer state by shape.
  params = partitioning.place(_to_f32(params), family.param_shardings(
      model_config, mesh, params))
  opt_state = partitioning.place(opt_state,
                                 partitioning.param_shardings(mesh, opt_state))

  data = mesh.shape[partitioning.DATA]
  batch = partitioning.padded_size(max(1, min(batch_size, len(pairs))), data)
  base_fn, delta_fn = _compiled(family, model_config, optimizer, mesh)
  base = _batched(lambda q: base_fn(params, queries, q),
                  [np.arange(len(query_rows))], batch, mesh)
  base = partitioning.put_global(base, rep)
  return _batched(
      lambda t, q: delta_fn(params, opt_state, train, queries, base, t, q),
      [train_idx.reshape(-1), query_idx.reshape(-1)], batch, mesh, progress)


def pairs_for_topk(proponent_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Deduplicated (query, train row) pairs of top-k lists.

  Args:
    proponent_rows: int[..., Q, K], the train rows of each query's proponents
      in rank order; axis -2 is the query index, a negative row is a missing
      proponent. Leading axes (e.g. methods) share the pairs.

  Returns:
    (pairs int64[P, 2] of unique (query_index, train_row), inverse int64[..., Q, K]
    with ``pairs[inverse]`` the pair of each entry and -1 where missing).
  """
  rows = np.asarray(proponent_rows, np.int64)
  if rows.ndim < 2:
    raise ValueError(f"proponent_rows must be [..., Q, K], got shape {rows.shape}")
  queries = np.broadcast_to(np.arange(rows.shape[-2])[:, None], rows.shape)
  valid = rows >= 0
  flat = np.stack([queries[valid], rows[valid]], axis=1)
  pairs, inv = np.unique(flat.reshape(-1, 2), axis=0, return_inverse=True)
  inverse = np.full(rows.shape, -1, np.int64)
  inverse[valid] = inv.reshape(-1)
  return pairs.reshape(-1, 2), inverse


def deltas_for_topk(deltas: np.ndarray, inverse: np.ndarray) -> np.ndarray:
  """f32[..., Q, K]: ``deltas[inverse]``, NaN where ``inverse`` is -1."""
  deltas = np.asarray(deltas, np.float32)
  inverse = np.asarray(inverse)
  out = np.full(inverse.shape, np.nan, np.float32)
  out[inverse >= 0] = deltas[inverse[inverse >= 0]]
  return out


def nonfinite_listed(deltas_topk: np.ndarray, inverse: np.ndarray) -> np.ndarray:
  """int[...]: per leading index (e.g. method), how many listed proponents'
  deltas are not finite (a step on them made the loss NaN). Like a missing
  proponent they are NaN to ``tail_patch_at_k`` (``finite_or_nan``), which leaves them out:
  report this count beside it."""
  listed = np.asarray(inverse) >= 0
  bad = listed & ~np.isfinite(np.asarray(deltas_topk))
  return bad.reshape(*bad.shape[:-2], -1).sum(-1)


def finite_or_nan(deltas: np.ndarray) -> np.ndarray:
  """``deltas`` with every value that is not finite NaN: a delta of +-inf
  (a step that overflowed the loss) is left out as a NaN one is, as
  ``nonfinite_listed`` reports (before, one -inf made a method's mean
  -inf and its standard error NaN)."""
  deltas = np.asarray(deltas, np.float64)
  return np.where(np.isfinite(deltas), deltas, np.nan)


def _as_array(deltas: np.ndarray | Mapping[Any, Sequence[float]]) -> np.ndarray:
  """f64[Q, K] with NaN for missing proponents and deltas that are not
  finite, from an array or a mapping."""
  if isinstance(deltas, Mapping):
    lists = [np.asarray(v, np.float32).reshape(-1) for v in deltas.values()]
    width = max([len(v) for v in lists] + [0])
    array = np.full((len(lists), width), np.nan, np.float32)
    for i, v in enumerate(lists):
      array[i, :len(v)] = v
    deltas = array
  deltas = finite_or_nan(deltas)
  if deltas.ndim != 2:
    raise ValueError(f"deltas must be [Q, K], got shape {deltas.shape}")
  return deltas


def per_query_tail_patch(deltas: np.ndarray | Mapping[Any, Sequence[float]],
                         k: int) -> np.ndarray:
  """Each query's mean delta over its first k proponents: f64[Q'].

  A query with fewer than k proponents averages those it has; a query with
  none is left out.
  """
  top = _as_array(deltas)[:, :int(k)]
  counts = np.sum(~np.isnan(top), axis=1)
  has = counts > 0
  return np.nansum(top, axis=1)[has] / counts[has]


def tail_patch_at_k(deltas: np.ndarray | Mapping[Any, Sequence[float]],
                    ks: Sequence[int] = (1, 3, 5, 10), *,
                    stderr: bool = False) -> dict[str, float]:
  """Mean tail-patch delta over each query's top-k proponents, then over queries.

  Args:
    deltas: f32[Q, K], the delta of each query's proponents in rank order with
      NaN for a missing proponent; or a mapping query -> deltas in rank order.
    ks: cutoffs.
    stderr: also return ``tail_patch@k_se``, the standard error of the mean
      over queries.

  Returns:
    ``{"tail_patch@k": float}`` (see ``per_query_tail_patch``); NaN when no
    query has any proponent.
  """
  out = {}
  for k in ks:
    values = per_query_tail_patch(deltas, k)
    out[f"tail_patch@{k}"] = float(np.mean(values)) if len(values) else float("nan")
    if stderr:
      out[f"tail_patch@{k}_se"] = (float(np.std(values, ddof=1) / np.sqrt(len(values)))
                                   if len(values) > 1 else float("nan"))
  return out