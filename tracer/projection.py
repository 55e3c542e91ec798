"""Two-sided per-block Gaussian projection of gradients.

Every weight with two or more axes is a block, viewed as a (fan-in, fan-out)
matrix ``a x b`` (the split of its axes that makes the two sides most nearly
equal). All vectors (norm scales) share one block ``1 x V``. A block's gradient
``G`` becomes ``P_L G P_R^T`` with ``P_L: k_a x a`` and ``P_R: k_b x b``, entries
N(0, 1/rows), so ``E[<P_L G P_R^T, P_L H P_R^T>] = <G, H>``.

Sizes come from one number, ``projection_dim``: every side gets
``k = min(side, s)`` with the largest ``s`` that keeps the total at most
``projection_dim``. A side with ``k == side`` is left unprojected (the identity),
which is exact rather than random; a model smaller than ``projection_dim`` is
then not projected at all. The real ``dim`` is recorded in the layout.

The matrices are generated from ``(seed, parameter path)``, identically on
every device and host, and never stored. A program that projects takes them
as an argument (``matrices``) instead of generating them itself: each
``jax.random.normal`` in a program is ~0.1 s of XLA:CPU compile time (an
encoder step of a 16-block model compiled in 4.7-5.0 s with them, 1.4-1.7 s
without), whereas generated apart they cost one small program per distinct
``k x n`` (4 or 5 for an LM of any depth).
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tracer.errors import InputError

VECTORS = "<vectors>"

# How the projections' fp32 matmuls run. Both names give fp32-accurate
# products summed in fp32, so they encode into the same space:
# * "highest": fp32 arithmetic (on NVIDIA GPUs the CUDA cores, not the
#   tensor cores: ~67 TFLOP/s on an H100/H200 against ~990 for bf16).
# * "bf16_6x": each fp32 operand split into three bf16 parts and the six
#   largest of their nine products summed in fp32 on the bf16 units (XLA's
#   BF16_BF16_F32_X6); the three dropped products are below 2^-24 of the
#   result. XLA:CPU computes it as "highest".
PRECISIONS = {"highest": jax.lax.Precision.HIGHEST,
              "bf16_6x": jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6}


def matmul_precision(name: str):
  """The ``precision=`` argument of the projections' matmuls for ``name``."""
  if name not in PRECISIONS:
    raise InputError(f"projection_precision={name!r}: expected one of "
                     f"{sorted(PRECISIONS)}")
  return PRECISIONS[name]


@dataclasses.dataclass(frozen=True)
class Block:
  """One projected block: ``paths`` of params viewed as an ``a x b`` matrix."""
  name: str
  paths: tuple[str, ...]
  shape: tuple[int, int]     # (a, b)
  k: tuple[int, int]         # (k_a, k_b)
  offset: int                # where this block starts in the encoding

  @property
  def size(self) -> int:
    return self.k[0] * self.k[1]


@dataclasses.dataclass(frozen=True)
class Layout:
  blocks: tuple[Block, ...]
  seed: int

  @property
  def dim(self) -> int:
    return sum(b.size for b in self.blocks)

  def to_json(self) -> dict:
    return {"seed": self.seed, "dim": self.dim,
            "blocks": [dataclasses.asdict(b) for b in self.blocks]}

  @classmethod
  def from_json(cls, d: dict) -> "Layout":
    blocks = tuple(Block(b["name"], tuple(b["paths"]), tuple(b["shape"]),
                         tuple(b["k"]), b["offset"]) for b in d["blocks"])
    return cls(blocks, d["seed"])


def path_name(path) -> str:
  return "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
  """(fan-in, fan-out) view of a tensor: the most balanced split of its axes."""
  if len(shape) < 2:
    return (1, int(np.prod(shape, dtype=np.int64)))
  splits = [(int(np.prod(shape[:i])), int(np.prod(shape[i:])))
            for i in range(1, len(shape))]
  return min(splits, key=lambda ab: (abs(np.log(ab[0] / ab[1])), -ab[0]))


def make_layout(params: Any, projection_dim: int, seed: int = 0) -> Layout:
  """Derives the block layout for ``params`` from a total ``projection_dim``."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  weights = [(path_name(p), matrix_shape(np.shape(x)))
             for p, x in leaves if np.ndim(x) >= 2]
  vector_paths = tuple(path_name(p) for p, x in leaves if np.ndim(x) < 2)
  vector_size = sum(int(np.size(x)) for _, x in leaves if np.ndim(x) < 2)
  sides = [shape for _, shape in weights]
  if vector_paths:
    sides.append((1, vector_size))

  def total(s):
    return sum(min(a, s) * min(b, s) for a, b in sides)

  if projection_dim < len(sides):
    raise InputError(f"EncodeConfig.projection_dim={projection_dim} is smaller than "
                     f"the {len(sides)} blocks of the model (one per weight matrix, "
                     f"one for all vectors); expected at least {len(sides)}")
  lo, hi = 1, max(max(ab) for ab in sides)
  while lo < hi:                      # largest s with total(s) <= projection_dim
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if total(mid) <= projection_dim else (lo, mid - 1)
  blocks, offset = [], 0
  named = [(name, (name,), shape) for name, shape in weights]
  if vector_paths:
    named.append((VECTORS, vector_paths, (1, vector_size)))
  for name, paths, (a, b) in named:
    block = Block(name, paths, (a, b), (min(a, lo), min(b, lo)), offset)
    blocks.append(block)
    offset += block.size
  return Layout(tuple(blocks), seed)


# The matrices are a function of (seed, block name) alone: JAX's global
# random settings would otherwise change them under a store without a word
# (`jax_threefry_partitionable`, whose default flipped in JAX 0.5, changes
# the bits; `jax_default_prng_impl`, 'rbg' on many TPU setups, the
# generator). Both are pinned to JAX 0.5+'s defaults, so stores encoded
# before keep their matrices.
_PRNG_IMPL = "threefry2x32"


@functools.partial(jax.jit, static_argnums=(1, 2))
def _gaussian(key, k: int, n: int) -> jax.Array:
  return jax.random.normal(key, (k, n), jnp.float32) * (1.0 / np.sqrt(k))


def _side(key, k: int, n: int) -> jax.Array | None:
  """A ``k x n`` Gaussian with N(0, 1/k) entries, or None for the identity."""
  return None if k == n else _gaussian(key, k, n)


Sides = tuple[Any, Any]   # (P_L, P_R) of a block; None is the identity


def block_matrices(layout: Layout, block: Block) -> Sides:
  """(P_L, P_R) of one block, from (seed, block name); None means identity."""
  with jax.threefry_partitionable(True):  # (fold_in and split read it too)
    key = jax.random.fold_in(jax.random.key(layout.seed, impl=_PRNG_IMPL),
                             zlib.crc32(block.name.encode()) & 0x7FFFFFFF)
    left, right = jax.random.split(key)
    return (_side(left, block.k[0], block.shape[0]),
            _side(right, block.k[1], block.shape[1]))


def matrices(layout: Layout) -> dict[str, Sides]:
  """Every block's ``(P_L, P_R)`` by block name: what ``project`` takes.

  Held whole by every device that projects: ``sum k_a a + k_b b`` floats. At
  d = 2^16: 74 MiB for a 1.1B-parameter LM (142 blocks, k = 21), 145 MiB with
  its layers stacked (11 blocks, k up to 87), 209 MiB at 8.3B (226 blocks).
  """
  return {block.name: block_matrices(layout, block) for block in layout.blocks}


def block_gradient(block: Block, by_path: dict[str, jax.Array]) -> jax.Array:
  """Per-example gradients of one block as ``[n, a, b]`` matrices.

  ``by_path`` maps the block's parameter paths to gradients with a leading
  example axis.
  """
  parts = [by_path[p].reshape(by_path[p].shape[0], -1) for p in block.paths]
  flat = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
  return flat.reshape(flat.shape[0], *block.shape)


def project_block(layout: Layout, block: Block, g: jax.Array,
                  precision: str = "highest", sides: Sides | None = None
                  ) -> jax.Array:
  """``P_L g P_R^T`` of ``g: [n, a, b]``, flattened to float32 ``[n, k_a * k_b]``.
  ``precision``: a name in ``PRECISIONS``; ``sides``: the block's
  ``(P_L, P_R)`` (``matrices``), generated here when None."""
  left, right = block_matrices(layout, block) if sides is None else sides
  g = g.astype(jnp.float32)
  how = matmul_precision(precision)
  if left is not None:
    g = jnp.einsum("ka,nab->nkb", left, g, precision=how,
                   preferred_element_type=jnp.float32)
  if right is not None:
    g = jnp.einsum("nkb,lb->nkl", g, right, precision=how,
                   preferred_element_type=jnp.float32)
  return g.reshape(g.shape[0], -1)


def project(layout: Layout, grads: Any, precision: str = "highest",
            sides: dict[str, Sides] | None = None) -> jax.Array:
  """Projects per-example gradients (leading axis n) to float32 ``[n, dim]``.
  ``sides``: ``matrices(layout)``, passed in from outside a jitted caller."""
  by_path = {path_name(p): g for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
  sides = matrices(layout) if sides is None else sides
  return jnp.concatenate([
      project_block(layout, b, block_gradient(b, by_path), precision, sides[b.name])
      for b in layout.blocks], axis=1)


def dense_matrix(layout: Layout, params: Any) -> np.ndarray:
  """The whole projection as one ``[dim, |theta|]`` matrix (tests and oracles).

  Columns follow ``jax.flatten_util.ravel_pytree(params)`` order.
  """
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  starts, pos = {}, 0
  for p, x in leaves:
    starts[path_name(p)] = (pos, int(np.size(x)))
    pos += int(np.size(x))
  out = np.zeros((layout.dim, pos), np.float64)
  for block in layout.blocks:
    left, right = block_matrices(layout, block)
    a, b = block.shape
    left = np.eye(a) if left is None else np.asarray(left, np.float64)
    right = np.eye(b) if right is None else np.asarray(right, np.float64)
    cols = np.concatenate([np.arange(s, s + n) for s, n in
                           (starts[p] for p in block.paths)])
    # vec(P_L G P_R^T) = (P_L kron P_R) vec(G) for row-major vec.
    out[block.offset:block.offset + block.size, cols] = np.kron(left, right)
  return out
