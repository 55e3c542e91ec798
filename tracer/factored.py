"""Projected per-example gradients without forming them: the factored kernel.

A weight used as ``y = x W`` (``x: [T, a]``, the rows of the layer's input;
``W: [a, b]``) gets from one example the gradient ``G = x^T delta`` with
``delta = dL/dy: [T, b]``. Its projection is

    P_L G P_R^T = (x P_L^T)^T (delta P_R^T)                      [k_a, k_b]

which costs ``O(T (a k_a + b k_b + k_a k_b))`` and never forms ``G``; the
backward pass then also skips every weight-gradient matmul.

``x`` and ``delta`` come from the model without editing it. Every call of a
flax linen ``Dense``, ``DenseGeneral``, ``Einsum`` or ``Embed`` (lookup, and
``attend``: tied unembedding, where ``G = delta^T x``) is intercepted
(``nn.intercept_methods``), and a zero perturbation that lives in the
projected space is added to its output: its gradient is the projection
itself (see "projections" below). A weight used by several calls (tied
embeddings) sums their ``x^T delta``. Calls are matched to parameters by
identity, or by name inside lifted transforms (``nn.remat``, ``nn.jit``,
``nn.scan``: ``_matcher``). A weight ``nn.scan`` stacks over layers is one
param and one block; each layer's call adds its part (see "A stacked
weight" below).

The optimizer correction ``G / (sqrt(V) + eps)`` is ``diag(u) G diag(w)`` when
``M = 1 / (sqrt(V) + eps)`` is rank one, ``M = u w^T``: it scales the features
of the two sides. That holds for no correction and for Adafactor (its V is
``v_row v_col^T / mean(v_row)`` per factored matrix, and Adafactor divides by
``sqrt(V)`` alone). A weight stacked by ``nn.scan`` needs M rank one per layer
only, ``M_l = u_l w_l^T``: each layer's scales ride into the scan with its E,
so a stacked Adafactor weight (V factored per layer, over a layer's rows and
columns: its two largest axes) is factored exactly. Adam's V is not rank one;
``correction_scales`` can then take the rank-one factorization of M (``u = M
1``, ``w = M^T 1 / 1^T M 1``, Adafactor's own rule, exact whenever M is rank
one; a stacked weight's per layer) as a documented approximation, or leave
the block to the materialized path. The same holds for a kernel of more than
two axes under Adafactor (an attention kernel ``[d, heads, head_dim]``: V
factored over d and head_dim, or kept whole): its M is not rank one in its
block's view.

Everything the kernel does not cover -- vectors (norm scales, biases), weights
used in other ways, weights whose correction is not rank one -- keeps the
materialized path (``jax.grad`` of those parameters only), block by block.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tracer import correction
from tracer import projection

# A correction matrix M counts as rank one when its rank-one factorization is
# this close (max over entries of |M - u w^T| / M): float32 rounding of
# Adafactor's V.
RANK_ONE_TOLERANCE = 1e-4

_LINEAR = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Embed)
_METHODS = ("__call__", "attend")


@dataclasses.dataclass(frozen=True)
class EinsumLayer:
  """How to read a call of another library's einsum layer (``y =
  einsum(spec, x, W)``, W one param of the module): ``weight(module)`` is the
  param's name, ``operands(args, kwargs)`` the call's ``(x, spec)``."""
  weight: Callable[[Any], str]
  operands: Callable[[tuple, dict], tuple[Any, str]]


# Einsum layers of other libraries, by module type (``register_einsum_layer``).
_EINSUM_LAYERS: dict[type, EinsumLayer] = {}


def register_einsum_layer(cls: type, weight: Callable[[Any], str],
                          operands: Callable[[tuple, dict], tuple[Any, str]]) -> None:
  """Lets the kernel take ``cls.__call__`` calls as einsums (a model family
  calls this for its library's layer, e.g. the gemma library's ``Einsum``)."""
  _EINSUM_LAYERS[cls] = EinsumLayer(weight, operands)


@dataclasses.dataclass(frozen=True)
class EmbeddingLayer:
  """Another library's embedding: method ``lookup(ids)`` is ``scale(module,
  W) * W[ids]`` (``scale`` a float), method ``attend(x)`` (optional) is
  ``x W^T``; ``weight(module)`` names W."""
  weight: Callable[[Any], str]
  lookup: str
  attend: str | None
  scale: Callable[[Any, Any], float]


_EMBEDDING_LAYERS: dict[type, EmbeddingLayer] = {}


def register_embedding_layer(cls: type, weight: Callable[[Any], str], lookup: str,
                             attend: str | None = None,
                             scale: Callable[[Any, Any], float] | None = None) -> None:
  """Lets the kernel take another library's embedding (e.g. the gemma
  library's ``Embedder``: ``encode`` scales by sqrt(width), ``decode``)."""
  _EMBEDDING_LAYERS[cls] = EmbeddingLayer(weight, lookup, attend,
                                          scale or (lambda module, w: 1.0))


def _embedding_method(module, method: str) -> str | None:
  """"lookup" / "attend" for an embedding call, else None."""
  if isinstance(module, nn.Embed):
    return {"__call__": "lookup", "attend": "attend"}.get(method)
  layer = _EMBEDDING_LAYERS.get(type(module))
  if layer is None:
    return None
  return {layer.lookup: "lookup", layer.attend: "attend"}.get(method)


@dataclasses.dataclass(frozen=True)
class Site:
  """One intercepted use of a weight, in the order the model calls them.

  ``kind``: "dense" (``G = x^T delta``: the block's rows are x's features),
  "transposed" (``G = delta^T x``: ``Embed.attend``, or an einsum whose kernel
  lists its output axes first) or "lookup" (``Embed``: x holds token ids).
  Rows of x are ``x.transpose(x_perm).reshape(-1, x_features)``, rows of delta
  ``delta.transpose(y_perm).reshape(-1, y_features)``.
  """
  path: str
  kind: str
  out_shape: tuple[int, ...]
  x_perm: tuple[int, ...]
  y_perm: tuple[int, ...]
  x_features: int
  y_features: int
  factor: float = 1.0   # a lookup's scale: y = factor * W[ids]
  dtype: str = "float32"  # y's: the materialized gradient is rounded to it


@dataclasses.dataclass(frozen=True)
class Stack:
  """A weight stacked over layers (``nn.scan``): its param has one more axis,
  ``axis``, of ``length`` layers, which each call does not see. The block's
  matrix view puts that axis on ``side`` 0 (its rows) or 1 (its columns);
  ``features`` is that side's size for one layer, and the side's axes are
  the param's ``[:split]`` or ``[split:]``."""
  axis: int
  length: int
  side: int
  features: int
  split: int


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which weights the factored kernel projects, and from which calls.

  ``sites`` are the calls of the ``factored`` weights, in call order; every
  other parameter takes the materialized path. ``stacks`` names the factored
  weights stacked over layers.
  """
  sites: tuple[Site, ...]
  factored: frozenset[str]
  stacks: tuple[tuple[str, Stack], ...] = ()

  def without(self, paths) -> "Plan":
    paths = set(paths)
    return Plan(tuple(s for s in self.sites if s.path not in paths),
                self.factored - paths,
                tuple((p, st) for p, st in self.stacks if p not in paths))


def _weight_name(module) -> str:
  layer = _EINSUM_LAYERS.get(type(module)) or _EMBEDDING_LAYERS.get(type(module))
  if layer is not None:
    return layer.weight(module)
  return "embedding" if isinstance(module, nn.Embed) else "kernel"


def _without_ellipsis(spec: str, x_ndim: int) -> str:
  """``spec`` with ``...`` spelled out (as the axes x has beyond its named
  ones); unchanged when it has none or they cannot be spelled out."""
  if "..." not in spec or "->" not in spec or spec.count(",") != 1:
    return spec
  (lhs, rhs), out = spec.split("->")[0].split(","), spec.split("->")[1]
  if "..." in rhs or "..." not in lhs:
    return spec
  n = x_ndim - len(lhs.replace("...", ""))
  free = [c for c in "abcdefghijklmnopqrstuvwxyz" if c not in spec][:max(n, 0)]
  if n < 0 or len(free) < n:
    return spec
  fill = "".join(free)
  return f"{lhs.replace('...', fill)},{rhs}->{out.replace('...', fill)}"


def _einsum_site(spec: str, x_ndim: int, kernel_ndim: int
                 ) -> tuple[str, tuple, tuple, int] | None:
  """(kind, x_perm, y_perm, number of kernel axes on x's side) of an einsum
  ``x,kernel->y``, or None when it is not a plain (tokens x in) @ (in x out)
  contraction with the kernel's axes split into an input and an output part."""
  if "." in spec or "->" not in spec or spec.count(",") != 1:
    return None
  operands, out = spec.split("->")
  lhs, rhs = operands.split(",")
  if (len(lhs) != x_ndim or len(rhs) != kernel_ndim
      or any(len(set(s)) != len(s) for s in (lhs, rhs, out))):
    return None
  ins = [c for c in rhs if c in lhs and c not in out]
  outs = [c for c in rhs if c in out and c not in lhs]
  tokens = [c for c in lhs if c not in rhs]
  if (len(ins) + len(outs) != len(rhs) or set(tokens) - set(out)
      or set(out) != set(tokens) | set(outs) or not ins or not outs):
    return None
  x_perm = tuple(lhs.index(c) for c in tokens + ins)
  y_perm = tuple(out.index(c) for c in tokens + outs)
  if rhs == "".join(ins + outs):
    return "dense", x_perm, y_perm, len(ins)
  if rhs == "".join(outs + ins):
    return "transposed", x_perm, y_perm, len(ins)
  return None


def _call_input(module, args, kwargs):
  """The input of an intercepted call (``inputs`` / ``query`` by keyword)."""
  layer = _EINSUM_LAYERS.get(type(module))
  if layer is not None:
    return layer.operands(args, kwargs)[0]
  return args[0] if args else kwargs.get("inputs", kwargs.get("query"))


def _describe(module, method: str, path: str, args, kwargs, y, weight
              ) -> Site | None:
  """The site of one intercepted call, or None when the kernel cannot take it."""
  site = _shape_site(module, method, path, args, kwargs, y, weight)
  return None if site is None else dataclasses.replace(site, dtype=str(y.dtype))


def _shape_site(module, method: str, path: str, args, kwargs, y, weight
                ) -> Site | None:
  """``_describe`` less the output's dtype."""
  x = _call_input(module, args, kwargs)
  if x is None or not hasattr(y, "shape"):
    return None
  x_shape, y_shape = tuple(np.shape(x)), tuple(np.shape(y))
  w_shape = tuple(np.shape(weight))
  ident = lambda n: tuple(range(n))
  feats = lambda shape, perm, n: int(np.prod([shape[i] for i in perm[len(perm) - n:]]))
  embedding = _embedding_method(module, method)
  if embedding == "lookup":
    layer = _EMBEDDING_LAYERS.get(type(module))
    factor = 1.0 if layer is None else float(layer.scale(module, weight))
    return Site(path, "lookup", y_shape, ident(len(x_shape)), ident(len(y_shape)),
                1, w_shape[1], factor)
  if embedding == "attend":
    # y = x E^T, so G_E = delta^T x (vocab rows).
    return Site(path, "transposed", y_shape, ident(len(x_shape)), ident(len(y_shape)),
                w_shape[1], w_shape[0])
  if isinstance(module, nn.Embed) or type(module) in _EMBEDDING_LAYERS:
    return None
  if method != "__call__":
    return None
  if isinstance(module, (nn.Dense, nn.DenseGeneral)):
    if (getattr(module, "dot_general", None) is not None
        or getattr(module, "dot_general_cls", None) is not None):
      return None
  if isinstance(module, nn.Dense):
    n = len(x_shape)
    return Site(path, "dense", y_shape, ident(n), ident(len(y_shape)),
                x_shape[-1], w_shape[-1])
  if isinstance(module, nn.DenseGeneral):
    if module.batch_dims not in ((), None):
      return None
    axes = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    axes = tuple(a % len(x_shape) for a in axes)
    x_perm = tuple(i for i in range(len(x_shape)) if i not in axes) + axes
    n_feat = len(w_shape) - len(axes)
    return Site(path, "dense", y_shape, x_perm, ident(len(y_shape)),
                feats(x_shape, x_perm, len(axes)), feats(y_shape, ident(len(y_shape)), n_feat))
  # nn.Einsum, or a registered einsum layer
  layer = _EINSUM_LAYERS.get(type(module))
  if layer is not None:
    spec = layer.operands(args, kwargs)[1]
  else:
    spec = (kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None)
            or module.einsum_str)
  spec = _without_ellipsis(str(spec).replace(" ", ""), len(x_shape))
  found = _einsum_site(spec, len(x_shape), len(w_shape))
  if found is None:
    return None
  kind, x_perm, y_perm, n_in = found
  n_out = len(w_shape) - n_in
  return Site(path, kind, y_shape, x_perm, y_perm,
              feats(x_shape, x_perm, n_in), feats(y_shape, y_perm, n_out))


def _matcher(params: Any) -> Callable[[Any, Any], str | None]:
  """``match(module, weight) -> path`` of the param a call's weight is, or None.

  By identity first: the module's variable is the very array in ``params``.
  Inside a lifted transform (``nn.remat``, ``nn.jit``) each variable is a new
  tracer, so then by name: the module's scope path and weight name, as the
  whole param path or its tail (a loss that nests the model's params), when
  exactly one param of that shape has it, or of that shape stacked over
  layers (``nn.scan``: ``_stacked_axes``). A weight the loss changes before
  use still matches by name; the encoder's one-example check
  (``GradientEncoder(verify=True)``) catches that and sends it to the
  materialized path."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  by_id = {id(x): projection.path_name(p) for p, x in flat}
  shapes = {projection.path_name(p): tuple(np.shape(x)) for p, x in flat}

  def match(module, weight) -> str | None:
    path = by_id.get(id(weight))
    if path is not None or weight is None or module.scope is None:
      return path
    name = "/".join(map(str, (*module.scope.path, _weight_name(module))))
    shape = tuple(np.shape(weight))
    found = [p for p, s in shapes.items()
             if (p == name or p.endswith("/" + name))
             and (s == shape or _stacked_axes(s, shape))]
    return found[0] if len(found) == 1 else None
  return match


def _stacked_axes(param_shape: tuple[int, ...], weight_shape: tuple[int, ...]
                  ) -> list[int]:
  """The axes of ``param_shape`` whose removal leaves ``weight_shape``: where
  the layer axis of an ``nn.scan``-stacked param may be (several when the
  axes next to it have the same length)."""
  if len(param_shape) != len(weight_shape) + 1:
    return []
  return [i for i in range(len(param_shape))
          if param_shape[:i] + param_shape[i + 1:] == weight_shape]


def _layer_axes(candidates: dict[str, list[int]]) -> dict[str, int]:
  """The layer axis of each stacked param, from its candidate axes: the one
  candidate, or else the axis of the nearest param (longest common path
  prefix) that has one candidate, if it is among its own. ``nn.scan``
  stacks every param of a module on the same axis; a param not resolved is
  left out."""
  known = {p: c[0] for p, c in candidates.items() if len(c) == 1}
  common = lambda a, b: len(os.path.commonprefix([a.split("/"), b.split("/")]))
  out = dict(known)
  for path, axes in candidates.items():
    if len(axes) > 1 and known:
      nearest = max(known, key=lambda q: common(path, q))
      if common(path, nearest) > 0 and known[nearest] in axes:
        out[path] = known[nearest]
  return out


def _stack(block: projection.Block, param_shape: tuple[int, ...], axis: int) -> Stack:
  """How a layer's weight sits in its stacked param's block."""
  split = next(j for j in range(len(param_shape) + 1)
               if int(np.prod(param_shape[:j])) == block.shape[0])
  side = 0 if axis < split else 1
  length = param_shape[axis]
  return Stack(axis, length, side, block.shape[side] // length, split)


def _intercepting(params: Any, on_call: Callable):
  """An interceptor that hands ``on_call(module, method, path, args, kwargs, y,
  weight)`` every linear call whose weight is one of ``params`` (``_matcher``);
  its return value replaces the call's output."""
  match = _matcher(params)

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    method = context.method_name
    if not ((type(module) in _LINEAR and method in _METHODS)
            or (type(module) in _EINSUM_LAYERS and method == "__call__")
            or (type(module) in _EMBEDDING_LAYERS
                and _embedding_method(module, method) is not None)):
      return next_fun(*args, **kwargs)
    try:
      weight = module.get_variable("params", _weight_name(module))
    except Exception:  # pylint: disable=broad-except
      weight = None
    path = match(module, weight)
    if path is None:
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    return on_call(module, context.method_name, path, args, kwargs, y, weight)
  return intercept


def make_plan(loss_fn: Callable, params: Any, example: Any,
              layout: projection.Layout, allowed: set[str]) -> Plan:
  """Traces ``loss_fn`` once (shapes only) and finds every weight the factored
  kernel can project: all its uses are supported calls, its block is the
  weight alone with the call's (in, out) split, and it is in ``allowed``.

  ``example`` is one example (arrays or ShapeDtypeStructs, no batch axis).
  """
  sites, unsupported, weight_shapes = [], set(), {}

  def record(module, method, path, args, kwargs, y, weight):
    site = _describe(module, method, path, args, kwargs, y, weight)
    if site is None:
      unsupported.add(path)
    else:
      sites.append(site)
      weight_shapes.setdefault(path, set()).add(tuple(np.shape(weight)))
    return y

  def trace(params, example):
    with nn.intercept_methods(_intercepting(params, record)):
      return loss_fn(params, example)

  jax.eval_shape(trace, params, example)
  blocks = {b.paths[0]: b for b in layout.blocks if len(b.paths) == 1}
  param_shapes = {projection.path_name(p): tuple(np.shape(x))
                  for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  bad, candidates = set(unsupported), {}
  for path, shapes in weight_shapes.items():
    if blocks.get(path) is None or len(shapes) != 1:
      bad.add(path)
    elif next(iter(shapes)) != param_shapes[path]:
      candidates[path] = _stacked_axes(param_shapes[path], next(iter(shapes)))
  axes = _layer_axes(candidates)
  stacks = {p: _stack(blocks[p], param_shapes[p], a) for p, a in axes.items()}
  bad |= {p for p in candidates if p not in axes or not _can_insert(params, p)}
  for site in sites:
    if site.path in bad:
      continue
    block, stack = blocks[site.path], stacks.get(site.path)
    if site.kind == "transposed":
      gradient_shape = (site.y_features, site.x_features)
    elif site.kind == "lookup":
      gradient_shape = (block.shape[0], site.y_features)
    else:
      gradient_shape = (site.x_features, site.y_features)
    if stack is not None:   # one layer's rows (side 0) or columns (side 1)
      if site.kind == "lookup":
        bad.add(site.path)
        continue
      gradient_shape = tuple(stack.length * n if i == stack.side else n
                             for i, n in enumerate(gradient_shape))
    if block.shape != gradient_shape:
      bad.add(site.path)
  factored = frozenset(s.path for s in sites) - bad
  factored &= frozenset(allowed)
  return Plan(tuple(s for s in sites if s.path in factored), factored,
              tuple((p, st) for p, st in sorted(stacks.items()) if p in factored))


def _can_insert(params: Any, path: str) -> bool:
  """Whether ``_with_layer_inputs`` can add siblings to ``path``'s param:
  every container on its way is a mapping."""
  node = params
  for key in path.split("/")[:-1]:
    if not isinstance(node, Mapping) or key not in node:
      return False
    node = node[key]
  return isinstance(node, Mapping)


# --- the optimizer correction as feature scales --------------------------------

def correction_scales(layout: projection.Layout, v: Any | None, epsilon: float,
                      stacks: Mapping[str, Stack] | None = None
                      ) -> dict[str, tuple[tuple[jax.Array, jax.Array], float]]:
  """Per matrix block: ``((u [a], w [b]), error)``, the rank-one factorization
  ``M ~ u w^T`` of ``M = 1 / (sqrt(V) + epsilon)`` and its largest error
  relative to each entry (inf where not finite). Given ``stacks`` (path ->
  ``Stack``), the blocks of those weights only, each fitted per layer: ``u
  [length, a']``, ``w [length, b']`` (``M_l ~ u_l w_l^T``, a layer's sides
  as ``_layer_sides`` orders them), the error the largest over the layers.
  Empty when ``v`` is None (no correction: u = w = 1)."""
  if v is None:
    return {}
  by_path = {projection.path_name(p): x
             for p, x in jax.tree_util.tree_flatten_with_path(v)[0]}
  out = {}
  for block in layout.blocks:
    path = block.paths[0]
    if (len(block.paths) != 1 or block.name == projection.VECTORS
        or (stacks is not None and path not in stacks)):
      continue
    view = (jnp.reshape(by_path[path], block.shape) if stacks is None
            else _layers(by_path[path], stacks[path], block.shape))
    u, w, err = _rank_one(view, jnp.float32(epsilon))
    out[block.name] = ((u, w), float(err))
  return out


def _layers(x: jax.Array, stack: Stack, shape: tuple[int, int]) -> jax.Array:
  """A stacked param ``x`` as its layers' matrices ``[length, a', b']`` (its
  block ``shape`` less the layer axis on ``stack.side``)."""
  layer = [stack.features if i == stack.side else n for i, n in enumerate(shape)]
  return jnp.moveaxis(x, stack.axis, 0).reshape(stack.length, *layer)


@jax.jit
def _rank_one(v: jax.Array, epsilon: jax.Array):
  """``(u [..., a], w [..., b], error)`` of ``v [..., a, b]``, per matrix."""
  m = 1.0 / (jnp.sqrt(v.astype(jnp.float32)) + epsilon)
  u = jnp.sum(m, axis=-1)
  w = jnp.sum(m, axis=-2) / jnp.sum(u, axis=-1, keepdims=True)
  # Per entry: relative to max M, Adam's untrained rows (nu = 0, M = 1/eps)
  # hid a 17% error in the trained ones (the audit's embedding, 2026-12-04).
  err = jnp.max(jnp.abs(m - u[..., :, None] * w[..., None, :]) / m)
  return u, w, jnp.where(jnp.isnan(err), jnp.inf, err)


# --- projections ---------------------------------------------------------------
#
# Each factored weight W gets a zero perturbation E ``[k_a, k_b]`` that lives
# in its projected space: every call of W adds ``rows^-1((x P_L^T) E (P_R))``
# to its output. The gradient of the loss w.r.t. E is then
# ``sum over calls (x P_L^T)^T (delta P_R^T)``, W's projected gradient (tied
# calls summed, as they should be). Nothing leaves the model but gradients,
# so the kernel works inside lifted transforms (``nn.remat``, ``nn.jit``),
# and each call keeps only ``T x k_a`` (its input side, projected in the
# forward pass) until the backward pass turns it into ``k_a x k_b``. W itself
# is not differentiated, so the backward pass skips its weight-gradient
# matmul and keeps no copy of x for it. E is always zero, so the forward
# value of the perturbation costs nothing (``_projected_bump``).

def _rows(x: jax.Array, perm: tuple[int, ...], features: int) -> jax.Array:
  return jnp.transpose(x, perm).reshape(-1, features).astype(jnp.float32)


def _unrows(rows: jax.Array, perm: tuple[int, ...], shape: tuple[int, ...]
            ) -> jax.Array:
  """The inverse of ``_rows``: ``[T, features]`` back to ``shape``."""
  permuted = rows.reshape([shape[i] for i in perm])
  return jnp.transpose(permuted, tuple(np.argsort(perm)))


def _side(rows, scale, matrix, precision: str):
  """``(rows * scale) @ matrix^T``; None means no scale / the identity.
  ``precision``: ``projection.PRECISIONS``' name."""
  if scale is not None:
    rows = rows * scale[None, :]
  if matrix is not None:
    rows = jnp.einsum("tb,kb->tk", rows, matrix,
                      precision=projection.matmul_precision(precision),
                      preferred_element_type=jnp.float32)
  return rows


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _projected_bump(known, e, scale, matrix, features, known_left, precision):
  """Zeros ``[T, features]``: the value of ``known E (matrix * scale)`` (or
  ``known E^T ...`` when ``known_left`` is False) at ``E == 0``.

  ``known [T, k]`` is the call's input side (already projected); the output
  side is ``_side(delta, scale, matrix)``. The gradient w.r.t. ``e`` is
  ``known^T side`` (``known_left``: E's rows are the input side) or
  ``side^T known``; ``known`` gets none (at E = 0 the bump does not depend
  on it, and the caller stops its gradient anyway)."""
  del e, scale, matrix, known_left, precision
  return jnp.zeros((known.shape[0], features), jnp.float32)


def _projected_bump_fwd(known, e, scale, matrix, features, known_left, precision):
  out = _projected_bump(known, e, scale, matrix, features, known_left, precision)
  return out, (known, e, scale, matrix)


def _projected_bump_bwd(features, known_left, precision, saved, g):
  del features
  known, e, scale, matrix = saved
  side = _side(g, scale, matrix, precision)
  pair = (known, side) if known_left else (side, known)
  grad_e = jnp.einsum("tk,tl->kl", *pair,
                      precision=projection.matmul_precision(precision),
                      preferred_element_type=jnp.float32).astype(e.dtype)
  zero = lambda x: None if x is None else jnp.zeros_like(x)
  return zero(known), grad_e, zero(scale), zero(matrix)


_projected_bump.defvjp(_projected_bump_fwd, _projected_bump_bwd)


def _lookup_side(tokens, size, scale, matrix):
  """The side of an embedding lookup: row ``t`` is ``P_L[:, token_t]`` (times
  ``scale[token_t]``), i.e. the one-hot rows projected."""
  table = jnp.eye(size, dtype=jnp.float32) if matrix is None else matrix.T
  if scale is not None:
    table = table * scale[:, None]
  return jnp.take(table, tokens.reshape(-1), axis=0)


# A stacked weight's layers are called inside ``nn.scan``, which slices every
# param along the layer axis. Its E, the layer's part of the stacked side
# (P's columns) and the layer's correction scales u and w (``M_l = u_l
# w_l^T``: Adafactor's V is rank one per layer, not over the stacked block)
# travel the same way: as siblings of the weight in the params tree, stacked
# along that axis.
_LAYER_INPUTS = ("@tracer_e", "@tracer_side", "@tracer_u", "@tracer_w")


def _at_axis(x: jax.Array, axis: int) -> jax.Array:
  """``x [length, ...]`` with ``axis`` unit axes in front: ``nn.scan`` slices
  the layer axis at ``axis`` and leaves ``x[i]``'s elements."""
  return x.reshape((1,) * axis + x.shape)


def _layer_sides(stack: Stack, param_shape: tuple[int, ...], matrix, k: int
                 ) -> jax.Array:
  """The stacked side's matrix ``[k, features]`` (identity when None) of each
  layer, stacked: ``[length, k, features]``."""
  axes = param_shape[:stack.split] if stack.side == 0 else param_shape[stack.split:]
  at = stack.axis - (0 if stack.side == 0 else stack.split)
  total = int(np.prod(axes))
  matrix = jnp.eye(total, dtype=jnp.float32) if matrix is None else matrix
  layers = jnp.moveaxis(matrix.reshape(k, *axes), 1 + at, 0)
  return layers.reshape(stack.length, k, stack.features)


def _with_layer_inputs(params: Any, inputs: dict[str, tuple]) -> Any:
  """``params`` with ``inputs[path]`` (arrays, None skipped) beside each
  ``path``'s param, named by ``_LAYER_INPUTS``."""
  def insert(node, keys, arrays):
    node = dict(node)
    if len(keys) == 1:
      for suffix, x in zip(_LAYER_INPUTS, arrays):
        if x is not None:
          node[keys[0] + suffix] = x
    else:
      node[keys[0]] = insert(node[keys[0]], keys[1:], arrays)
    return node
  for path, arrays in inputs.items():
    params = insert(params, path.split("/"), arrays)
  return params


def project_examples(plan: Plan, layout: projection.Layout, loss_fn: Callable,
                     params: Any, v: Any | None, epsilon: float,
                     scales: dict | None, examples: Any,
                     precision: str = "highest",
                     sides: dict[str, projection.Sides] | None = None
                     ) -> tuple[jax.Array, jax.Array]:
  """``(P (g / (sqrt(V) + eps)) [n, dim], losses [n])`` for a batch of examples
  (leading axis n on every leaf), the factored weights from their calls and
  everything else materialized. ``scales`` (``correction_scales``, block name
  -> (u, w); a stacked weight's per layer, fitted with its ``plan.stacks``
  entry) correct the factored blocks; None applies no correction there.
  ``precision``: the projections' matmuls (``projection.PRECISIONS``);
  ``sides``: ``projection.matrices(layout)`` (generated here when None)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [projection.path_name(p) for p, _ in flat]
  fixed = {p: x for p, (_, x) in zip(paths, flat) if p in plan.factored}
  free = {p: x for p, (_, x) in zip(paths, flat) if p not in plan.factored}
  v_free = None
  if v is not None:
    v_by_path = {projection.path_name(p): x
                 for p, x in jax.tree_util.tree_flatten_with_path(v)[0]}
    v_free = {p: v_by_path[p] for p in free}
  blocks = {b.paths[0]: b for b in layout.blocks if b.paths[0] in plan.factored}
  sides = projection.matrices(layout) if sides is None else sides
  matrices = {p: sides[b.name] for p, b in blocks.items()}
  scale = {p: (None, None) if scales is None else scales[b.name]
           for p, b in blocks.items()}
  planned = set(plan.sites)
  stacks = dict(plan.stacks)
  if any(np.ndim(scale[p][0]) not in (0, 2) for p in stacks):   # (0: None)
    raise ValueError("a stacked weight's correction scales are per layer: "
                     "correction_scales with the plan's stacks")
  layer_sides = {p: _layer_sides(st, np.shape(fixed[p]), matrices[p][st.side],
                                 blocks[p].k[st.side])
                 for p, st in stacks.items()}

  def loss_fn_perturbed(free, perturbations, example):
    params = jax.tree_util.tree_unflatten(
        treedef, [free[p] if p in free else fixed[p] for p in paths])
    params = _with_layer_inputs(params, {
        p: tuple(None if x is None else _at_axis(x, st.axis)
                 for x in (perturbations[p], layer_sides[p], *scale[p]))
        for p, st in stacks.items()})

    def perturb(module, method, path, args, kwargs, y, weight):
      if path not in plan.factored:
        return y
      site = _describe(module, method, path, args, kwargs, y, weight)
      if site not in planned:
        raise RuntimeError(f"the model called {path} as {site}, which its first "
                           f"trace did not: its calls must not depend on the "
                           f"values of its inputs")
      x = jax.lax.stop_gradient(_call_input(module, args, kwargs))
      (left, right), (u, w) = matrices[path], scale[path]
      e = perturbations[path]
      stack = stacks.get(path)
      if stack is not None:   # this layer's E, side and scales, sliced by nn.scan
        read = lambda i: module.get_variable("params", _weight_name(module)
                                             + _LAYER_INPUTS[i])
        k = blocks[path].k
        e = read(0).reshape(k)
        side = read(1).reshape(k[stack.side], stack.features)
        if stack.side == 0:
          left = side
        else:
          right = side
        if u is not None:
          u, w = read(2).reshape(-1), read(3).reshape(-1)
      if site.kind == "lookup":
        known = _lookup_side(x, blocks[path].shape[0], u, left) * site.factor
      elif site.kind == "dense":
        known = _side(_rows(x, site.x_perm, site.x_features), u, left, precision)
      else:    # transposed: E's rows come from the output side
        known = _side(_rows(x, site.x_perm, site.x_features), w, right, precision)
      out_scale, out_matrix = (u, left) if site.kind == "transposed" else (w, right)
      bump = _projected_bump(known, e, out_scale, out_matrix,
                             site.y_features, site.kind != "transposed", precision)
      return y + _unrows(bump, site.y_perm, y.shape).astype(y.dtype)

    with nn.intercept_methods(_intercepting(params, perturb)):
      return loss_fn(params, example)

  def one(example):
    zeros = {p: jnp.zeros((stacks[p].length, *b.k) if p in stacks else b.k, jnp.float32)
             for p, b in blocks.items()}
    loss, (g_free, g_factored) = jax.value_and_grad(
        loss_fn_perturbed, argnums=(0, 1))(free, zeros, example)
    g_free = correction.correct(g_free, v_free, epsilon)
    g_free = {p: g[None] for p, g in g_free.items()}
    pieces = []
    for block in layout.blocks:
      if block.paths[0] in plan.factored:
        g = g_factored[block.paths[0]]      # a stacked weight's: per layer
        pieces.append((g.sum(0) if block.paths[0] in stacks else g).reshape(-1))
      else:
        pieces.append(projection.project_block(
            layout, block, projection.block_gradient(block, g_free), precision,
            sides[block.name])[0])
    return jnp.concatenate(pieces), loss.astype(jnp.float32)

  return jax.vmap(one)(examples)


def block_errors(layout: projection.Layout, plan: Plan, factored: jax.Array,
                 exact: jax.Array) -> jax.Array:
  """``||f - e|| / ||e||`` per block of one encoding pair ``[dim]`` (0 for
  blocks the plan does not factor)."""
  out = []
  for block in layout.blocks:
    if block.paths[0] not in plan.factored:
      out.append(jnp.float32(0))
      continue
    f = factored[block.offset:block.offset + block.size]
    e = exact[block.offset:block.offset + block.size]
    out.append(jnp.linalg.norm(f - e) / jnp.maximum(jnp.linalg.norm(e), 1e-30))
  return jnp.stack(out)
