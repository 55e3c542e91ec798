"""The scan step's scores and threshold bits in one pass: a Pallas kernel.

On a GPU the XLA form of a bf16 scan step (``topk.exact_scores`` with three
bf16 query terms, then ``topk._select_both``'s bit words) moves far more
bytes than the rows: the three-term product writes ``f32[r, 3Q]`` and reads
it back to sum the terms, and the words are a further pass over the scores.
On one H200 that traffic, not the tensor cores, bound the resident scan
(WORKSPACE, "Resident scan"). This kernel reads each row tile once, sums the
three bf16 products into one fp32 accumulator, and in its epilogue writes the
scores once and the words (``u32[r / GROUP, 2Q]``, a 32nd of the scores).

Exactness is ``topk.exact_scores``'s: a bf16 x bf16 product is exact in fp32,
so each score is one fp32 sum of the 3d exact products ``x_i q_i^(t)``
(error <= 3d u sum_i |x_i q_i|, u = 2^-24, against d u for each of the XLA
form's three sums). Each row's sum runs over the same tiles in the same
order wherever the row sits, so a row's score does not depend on the chunk,
the mesh or the device it is scored on.

``interpret=True`` runs the same kernel through Pallas's interpreter (CPU
tests); ``lower_for_gpu`` checks that it lowers to Triton without a GPU.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

MAX_BLOCK_QUERIES = 64  # queries per program; more go to a second grid axis
GROUP = 16          # rows per bit word (``topk.GROUP`` is this one)


class Tiles(NamedTuple):
  """A program's tile and Triton's launch settings (``launch.benchmark_scan
  --fused_tiles`` times several). The contraction tile ``dim`` fixes the
  order of each score's fp32 sum: two settings with different ``dim`` may
  differ in a score's last bits."""
  rows: int = 128      # rows per program: a multiple of GROUP
  dim: int = 64        # contraction tile
  num_warps: int = 4
  num_stages: int = 3


DEFAULT_TILES = Tiles()


def valid_tiles(tiles: Tiles) -> bool:
  """Whether Triton can run ``tiles``: a tile's rows and contraction are
  powers of two, at least GROUP rows and a dot's 16 columns."""
  power_of_two = lambda n: n > 0 and n & (n - 1) == 0
  return (power_of_two(tiles.rows) and power_of_two(tiles.dim)
          and tiles.rows >= GROUP and tiles.dim >= 16
          and tiles.num_warps > 0 and tiles.num_stages > 0)


def supported(rows: int, dim: int, dtype, tiles: Tiles = DEFAULT_TILES) -> bool:
  """Whether ``scores_and_words`` takes ``[rows, dim]`` rows of ``dtype``."""
  return (jnp.dtype(dtype) == jnp.bfloat16 and valid_tiles(tiles) and rows > 0
          and rows % tiles.rows == 0 and dim >= tiles.dim)


def _block_queries(num_queries: int) -> tuple[int, int]:
  """(queries per program, padded query count): Triton's blocks are powers
  of two, and its dots at least 16 wide."""
  block = min(MAX_BLOCK_QUERIES, max(16, 1 << (num_queries - 1).bit_length()))
  return block, -(-num_queries // block) * block


def _kernel(x_ref, terms_ref, pro_ref, opp_ref, valid_ref, norm_ref, s_ref,
            words_ref, *, dim: int, tiles: Tiles):
  """One ``[tiles.rows, block_q]`` tile: see ``scores_and_words``."""
  block_q = terms_ref.shape[2]
  tile_rows, tile_dim = tiles.rows, tiles.dim

  def add_tile(start, acc, x):
    for t in range(3):  # one accumulator: the terms' products summed in fp32
      acc += jnp.dot(x, terms_ref[t, pl.ds(start, tile_dim), :],
                     preferred_element_type=jnp.float32)
    return acc

  full = dim // tile_dim
  acc = lax.fori_loop(
      0, full,
      lambda i, acc: add_tile(i * tile_dim, acc,
                              x_ref[:, pl.ds(i * tile_dim, tile_dim)]),
      jnp.zeros((tile_rows, block_q), jnp.float32))
  if dim % tile_dim:
    # The last tile ends at ``dim`` and overlaps the full tiles: its columns
    # already summed are zeroed (no read past the row, in either mode).
    start = dim - tile_dim
    x = x_ref[:, pl.ds(start, tile_dim)]
    column = start + lax.broadcasted_iota(jnp.int32, (tile_rows, tile_dim), 1)
    acc = add_tile(start, acc, jnp.where(column >= full * tile_dim, x,
                                         jnp.zeros_like(x)))
  if norm_ref is not None:
    acc = acc / norm_ref[...][:, None]
  s_ref[...] = acc
  # Bit p of a word: row p of its group of GROUP. The bits are distinct, so
  # their sum is their OR (Triton lowers sums, not OR-reductions).
  ok = (valid_ref[...] != 0)[:, None]
  bit = jnp.uint32(1) << (
      lax.broadcasted_iota(jnp.uint32, (tile_rows, block_q), 0) % GROUP)
  zero = jnp.uint32(0)

  def words(hit):
    return jnp.sum(jnp.where(ok & hit, bit, zero).reshape(
        tile_rows // GROUP, GROUP, block_q), axis=1)

  words_ref[0] = words(acc >= pro_ref[...][None, :])
  words_ref[1] = words(acc <= opp_ref[...][None, :])


@functools.partial(jax.jit, static_argnames=("interpret", "tiles"))
def scores_and_words(x: jax.Array, terms: jax.Array, pro_kth: jax.Array,
                     opp_kth: jax.Array, valid: jax.Array,
                     norms: jax.Array | None = None, *,
                     interpret: bool = False, tiles: Tiles = DEFAULT_TILES
                     ) -> tuple[jax.Array, jax.Array]:
  """Scores of bf16 rows and the bits of those reaching the thresholds.

  Args:
    x: bf16 ``[r, d]``, ``supported(r, d, x.dtype, tiles)``.
    terms: bf16 ``[3, Q, d]``, ``topk.bf16_terms`` of the fp32 queries.
    pro_kth, opp_kth: f32 ``[Q]``, the running k-th best scores.
    valid: bool ``[r]``; an invalid row sets no bit (its score is still
      written).
    norms: optional f32 ``[r]``; scores are divided by them (``RowMetric``).
    interpret: run in Pallas's interpreter (any backend).
    tiles: the program's tile and launch settings.

  Returns:
    ``s f32[r, Q]`` and ``words u32[r / GROUP, 2Q]``: bit ``p`` of
    ``words[g, q]`` is set iff row ``g * GROUP + p`` is valid and
    ``s[row, q] >= pro_kth[q]``; of ``words[g, Q + q]``, iff it is valid and
    ``s[row, q] <= opp_kth[q]`` (NaN sets neither), as ``topk._select_both``.
  """
  rows, dim = x.shape
  if not supported(rows, dim, x.dtype, tiles):
    raise ValueError(f"scores_and_words: [{rows}, {dim}] {x.dtype} rows with "
                     f"{tiles} are not supported (fused_scores.supported)")
  num_queries = terms.shape[1]
  block_q, padded = _block_queries(num_queries)
  pad = padded - num_queries
  terms = jnp.pad(terms, ((0, 0), (0, pad), (0, 0))).transpose(0, 2, 1)
  # Padded queries never set a bit: no score is >= NaN or <= NaN.
  pro_kth = jnp.pad(pro_kth.astype(jnp.float32), (0, pad), constant_values=jnp.nan)
  opp_kth = jnp.pad(opp_kth.astype(jnp.float32), (0, pad), constant_values=jnp.nan)
  queries_spec = pl.BlockSpec((block_q,), lambda i, j: (j,))
  block_rows = tiles.rows
  rows_spec = pl.BlockSpec((block_rows,), lambda i, j: (i,))
  inputs = [x, terms, pro_kth, opp_kth, valid.astype(jnp.int32)]
  in_specs = [pl.BlockSpec((block_rows, dim), lambda i, j: (i, 0)),
              pl.BlockSpec((3, dim, block_q), lambda i, j: (0, 0, j)),
              queries_spec, queries_spec, rows_spec]
  if norms is not None:
    inputs.append(norms.astype(jnp.float32))
    in_specs.append(rows_spec)
    kernel = functools.partial(_kernel, dim=dim, tiles=tiles)
  else:
    kernel = lambda x, t, p, o, v, *out: _kernel(x, t, p, o, v, None, *out, dim=dim,
                                                 tiles=tiles)
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
    compiler_params = plgpu.CompilerParams(num_warps=tiles.num_warps,
                                           num_stages=tiles.num_stages)
  s, words = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((rows, padded), jnp.float32),
                 jax.ShapeDtypeStruct((2, rows // GROUP, padded), jnp.uint32)),
      grid=(rows // block_rows, padded // block_q),
      in_specs=in_specs,
      out_specs=(pl.BlockSpec((block_rows, block_q), lambda i, j: (i, j)),
                 pl.BlockSpec((2, block_rows // GROUP, block_q),
                              lambda i, j: (0, i, j))),
      compiler_params=compiler_params,
      interpret=interpret,
      name="tracer_scores_and_words",
  )(*inputs)
  words = words[:, :, :num_queries]
  return (s[:, :num_queries],
          jnp.concatenate([words[0], words[1]], axis=1))


def lower_for_gpu(rows: int, dim: int, num_queries: int, metric: bool = False,
                  tiles: Tiles = DEFAULT_TILES) -> str:
  """The kernel lowered for CUDA (StableHLO text holding the Triton IR), on
  any machine: a check that Pallas accepts it, short of compiling it."""
  shape = jax.ShapeDtypeStruct
  args = [shape((rows, dim), jnp.bfloat16), shape((3, num_queries, dim), jnp.bfloat16),
          shape((num_queries,), jnp.float32), shape((num_queries,), jnp.float32),
          shape((rows,), jnp.bool_)]
  if metric:
    args.append(shape((rows,), jnp.float32))
  return scores_and_words.trace(*args, tiles=tiles).lower(
      lowering_platforms=("cuda",)).as_text()
