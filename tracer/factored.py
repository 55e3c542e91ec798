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
(``nn.intercept_methods``): the call's input, projected at once, is returned
as an auxiliary output, and a zero perturbation is added to its output, whose
gradient is ``delta``, projected (see "projections" below).
A weight used by several calls (tied embeddings) sums their ``x^T delta``: the
calls' rows are concatenated. Calls are matched to parameters by identity (the
module's variable is the very array passed in ``params``), so a loss that
casts or slices a weight before use simply leaves it uncovered.

The optimizer correction ``G / (sqrt(V) + eps)`` is ``diag(u) G diag(w)`` when
``M = 1 / (sqrt(V) + eps)`` is rank one, ``M = u w^T``: it scales the features
of the two sides. That holds for no correction and for Adafactor (its V is
``v_row v_col^T / mean(v_row)`` per factored matrix, and Adafactor divides by
``sqrt(V)`` alone). Adam's V is not rank one; ``correction_scales`` can then
take the rank-one factorization of M (``u = M 1``, ``w = M^T 1 / 1^T M 1``,
Adafactor's own rule, exact whenever M is rank one) as a documented
approximation, or leave the block to the materialized path.

Everything the kernel does not cover -- vectors (norm scales, biases), weights
used in other ways, weights whose correction is not rank one -- keeps the
materialized path (``jax.grad`` of those parameters only), block by block.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tracer import correction
from tracer import projection

# A correction matrix M counts as rank one when its rank-one factorization is
# this close (max abs error over max M): float32 rounding of Adafactor's V.
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


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which weights the factored kernel projects, and from which calls.

  ``sites`` are the calls of the ``factored`` weights, in call order; every
  other parameter takes the materialized path.
  """
  sites: tuple[Site, ...]
  factored: frozenset[str]

  def without(self, paths) -> "Plan":
    paths = set(paths)
    return Plan(tuple(s for s in self.sites if s.path not in paths),
                self.factored - paths)


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


def _intercepting(params_by_id: dict[int, str], on_call: Callable):
  """An interceptor that hands ``on_call(module, method, path, args, kwargs, y,
  weight)`` every linear call whose weight is one of ``params``; its return
  value replaces the call's output."""
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
    path = params_by_id.get(id(weight))
    if path is None:
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    return on_call(module, context.method_name, path, args, kwargs, y, weight)
  return intercept


def _by_id(params: Any) -> dict[int, str]:
  return {id(x): projection.path_name(p)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def make_plan(loss_fn: Callable, params: Any, example: Any,
              layout: projection.Layout, allowed: set[str]) -> Plan:
  """Traces ``loss_fn`` once (shapes only) and finds every weight the factored
  kernel can project: all its uses are supported calls, its block is the
  weight alone with the call's (in, out) split, and it is in ``allowed``.

  ``example`` is one example (arrays or ShapeDtypeStructs, no batch axis).
  """
  sites, unsupported = [], set()

  def record(module, method, path, args, kwargs, y, weight):
    site = _describe(module, method, path, args, kwargs, y, weight)
    if site is None:
      unsupported.add(path)
    else:
      sites.append(site)
    return y

  def trace(params, example):
    with nn.intercept_methods(_intercepting(_by_id(params), record)):
      return loss_fn(params, example)

  jax.eval_shape(trace, params, example)
  blocks = {b.paths[0]: b for b in layout.blocks if len(b.paths) == 1}
  fits = set()
  for site in sites:
    block = blocks.get(site.path)
    if block is None:
      continue
    if site.kind == "transposed":
      gradient_shape = (site.y_features, site.x_features)
    elif site.kind == "lookup":
      gradient_shape = (block.shape[0], site.y_features)
    else:
      gradient_shape = (site.x_features, site.y_features)
    if block.shape == gradient_shape:
      fits.add(site.path)
  bad = {s.path for s in sites if s.path not in fits} | unsupported
  factored = frozenset(s.path for s in sites) - bad
  factored &= frozenset(allowed)
  return Plan(tuple(s for s in sites if s.path in factored), factored)


# --- the optimizer correction as feature scales --------------------------------

def correction_scales(layout: projection.Layout, v: Any | None, epsilon: float
                      ) -> dict[str, tuple[tuple[jax.Array, jax.Array], float]]:
  """Per matrix block: ``((u [a], w [b]), error)``, the rank-one factorization
  ``M ~ u w^T`` of ``M = 1 / (sqrt(V) + epsilon)`` and its max abs error
  relative to max M. Empty when ``v`` is None (no correction: u = w = 1)."""
  if v is None:
    return {}
  by_path = {projection.path_name(p): x
             for p, x in jax.tree_util.tree_flatten_with_path(v)[0]}
  out = {}
  for block in layout.blocks:
    if len(block.paths) != 1 or block.name == projection.VECTORS:
      continue
    vv = by_path[block.paths[0]]
    u, w, err = _rank_one(jnp.reshape(vv, block.shape), jnp.float32(epsilon))
    out[block.name] = ((u, w), float(err))
  return out


@jax.jit
def _rank_one(v: jax.Array, epsilon: jax.Array):
  m = 1.0 / (jnp.sqrt(v.astype(jnp.float32)) + epsilon)
  u = jnp.sum(m, axis=1)
  w = jnp.sum(m, axis=0) / jnp.sum(u)
  err = jnp.max(jnp.abs(m - u[:, None] * w[None, :])) / jnp.max(m)
  return u, w, err


# --- projections ---------------------------------------------------------------
#
# Both sides of a weight's ``(x P_L^T)^T (delta P_R^T)`` are projected as soon
# as they exist, so an example never holds more than ``T x k`` per call: the
# input side in the forward pass, inside the intercepted call; the output
# side by differentiating a perturbation that lives in the projected space,
# ``y + unrows(z P_R)`` with ``z: [T, k_b]`` zeros, whose gradient is
# ``delta P_R^T``. (The weight is not differentiated, so autodiff keeps no
# copy of x for it either.) The perturbation is always zero, so its forward
# value costs nothing (``_zero_bump``).

def _rows(x: jax.Array, perm: tuple[int, ...], features: int) -> jax.Array:
  return jnp.transpose(x, perm).reshape(-1, features).astype(jnp.float32)


def _unrows(rows: jax.Array, perm: tuple[int, ...], shape: tuple[int, ...]
            ) -> jax.Array:
  """The inverse of ``_rows``: ``[T, features]`` back to ``shape``."""
  permuted = rows.reshape([shape[i] for i in perm])
  return jnp.transpose(permuted, tuple(np.argsort(perm)))


def _side(rows, scale, matrix):
  """``(rows * scale) @ matrix^T``; None means no scale / the identity."""
  if scale is not None:
    rows = rows * scale[None, :]
  if matrix is not None:
    rows = jnp.einsum("tb,kb->tk", rows, matrix, precision="highest")
  return rows


@jax.custom_vjp
def _zero_bump(z, scale, matrix):
  """``(z @ matrix) * scale`` for ``z == 0``: zeros ``[T, b]``, computed for free.

  ``z`` is only ever the zero perturbation; what matters is the gradient
  w.r.t. it, ``_side`` of the gradient w.r.t. the result (None: no scale /
  the identity)."""
  return jnp.zeros((z.shape[0], z.shape[1] if matrix is None else matrix.shape[1]),
                   jnp.float32)


def _zero_bump_fwd(z, scale, matrix):
  return _zero_bump(z, scale, matrix), (scale, matrix)


def _zero_bump_bwd(saved, g):
  scale, matrix = saved
  zero = lambda x: None if x is None else jnp.zeros_like(x)
  return _side(g, scale, matrix), zero(scale), zero(matrix)


_zero_bump.defvjp(_zero_bump_fwd, _zero_bump_bwd)


def _lookup_side(tokens, size, scale, matrix):
  """The side of an embedding lookup: row ``t`` is ``P_L[:, token_t]`` (times
  ``scale[token_t]``), i.e. the one-hot rows projected."""
  table = jnp.eye(size, dtype=jnp.float32) if matrix is None else matrix.T
  if scale is not None:
    table = table * scale[:, None]
  return jnp.take(table, tokens.reshape(-1), axis=0)


def project_examples(plan: Plan, layout: projection.Layout, loss_fn: Callable,
                     params: Any, v: Any | None, epsilon: float,
                     scales: dict | None, examples: Any
                     ) -> tuple[jax.Array, jax.Array]:
  """``(P (g / (sqrt(V) + eps)) [n, dim], losses [n])`` for a batch of examples
  (leading axis n on every leaf), the factored weights from their calls and
  everything else materialized. ``scales`` (``correction_scales``, block name
  -> (u, w)) correct the factored blocks; None applies no correction there."""
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
  matrices = {p: projection.block_matrices(layout, b) for p, b in blocks.items()}
  scale = {p: (None, None) if scales is None else scales[b.name]
           for p, b in blocks.items()}

  def out_side(site):
    """(k, scale, matrix) of the side a site's output gradient gives."""
    block, (left, right), (u, w) = blocks[site.path], matrices[site.path], scale[site.path]
    if site.kind == "transposed":
      return block.k[0], u, left
    return block.k[1], w, right

  def loss_and_sides(free, perturbations, example):
    params = jax.tree_util.tree_unflatten(
        treedef, [free[p] if p in free else fixed[p] for p in paths])
    known, calls = [], iter(range(len(plan.sites)))

    def capture(module, method, path, args, kwargs, y, weight):
      del method, weight
      if path not in plan.factored:
        return y
      x = _call_input(module, args, kwargs)
      i = next(calls)
      site = plan.sites[i]
      if site.path != path:
        raise RuntimeError(f"the model called {path} where its first trace "
                           f"called {site.path}: its calls must not depend on "
                           f"the values of its inputs")
      (left, right), (u, w) = matrices[path], scale[path]
      if site.kind == "lookup":
        side = _lookup_side(x, blocks[path].shape[0], u, left)
        known.append(side if site.factor == 1.0 else side * site.factor)
      elif site.kind == "dense":
        known.append(_side(_rows(x, site.x_perm, site.x_features), u, left))
      else:
        known.append(_side(_rows(x, site.x_perm, site.x_features), w, right))
      _, s, m = out_side(site)
      bump = _unrows(_zero_bump(perturbations[i], s, m), site.y_perm, y.shape)
      return y + bump.astype(y.dtype)

    with nn.intercept_methods(_intercepting(_by_id(params), capture)):
      loss = loss_fn(params, example)
    return loss, known

  def one(example):
    zeros = [jnp.zeros((int(np.prod(s.out_shape)) // s.y_features, out_side(s)[0]),
                       jnp.float32) for s in plan.sites]
    (loss, known), (g_free, found) = jax.value_and_grad(
        loss_and_sides, argnums=(0, 1), has_aux=True)(free, zeros, example)
    g_free = correction.correct(g_free, v_free, epsilon)
    g_free = {p: g[None] for p, g in g_free.items()}
    pieces = []
    for block in layout.blocks:
      if block.paths[0] not in plan.factored:
        pieces.append(projection.project_block(
            layout, block, projection.block_gradient(block, g_free))[0])
        continue
      lefts, rights = [], []
      for site, k, f in zip(plan.sites, known, found):
        if site.path == block.paths[0]:
          lefts.append(f if site.kind == "transposed" else k)
          rights.append(k if site.kind == "transposed" else f)
      pieces.append(jnp.einsum("tk,tl->kl", jnp.concatenate(lefts),
                               jnp.concatenate(rights), precision="highest").reshape(-1))
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
