"""The jitted core of the exact top-k scan: scores, selection, merge.

A step folds one chunk of rows into a running top-k. The chunk is split over
every device of the mesh (``partitioning.rows_sharding``); each device scores
its rows against all queries in fp32, keeps its local top-k, and the
per-device candidates (``k`` per device and query) are gathered and merged
into a running top-k held replicated on every device. Memory is bounded by the
chunk size, never by N x Q. ``ring_step_fn`` splits the queries and their
top-k over the devices instead, for query sets too large to sit whole on
each: the blocks go around the devices, each device's rows scored against
one block at a time.

Ordering is exact and deterministic: proponents by score descending,
opponents by score ascending, ties broken by the lower row id. Scores are
fp32 dot products; bf16 chunks are never rounded further (see ``exact_scores``).
NaN scores (from non-finite encodings) are never ranked: they are kept
as -inf (proponents) or +inf (opponents), the keys of unfilled slots, and
``finish`` reports such a slot as row ``INVALID_ROW``, whatever row it held.

Scan-time preconditioning (``RowMetric``): rows may be stored in the
coordinates of a query-independent basis; a query set's metric R^(-1) is then
``diag(a) - sum_b C_b C_b^T`` (block b's low-rank part), each query arrives
as ``R^(-1) q / ||q||_R``, and each row's score is divided by its own norm
``sqrt(x^T R^(-1) x)``, computed in the same step from the same rows: extra
matmul columns (the ``C_b``) and a weighted sum of squares.

Cost: per step, one matmul (the roofline) plus a selection that is cheap once
the running k-th best is high: a device only ranks the row blocks whose
maximum reaches it (``_select_rows``). The host side (buffers, sources,
prefetch) is ``tracer.scan``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from tracer import fused_scores, partitioning
from tracer.errors import InputError

INVALID_ROW = np.iinfo(np.int32).max  # row id of padding; loses every tie


class TopKState(NamedTuple):
  """Running top-k, replicated on every device.

  Proponent scores are sorted descending, opponent scores ascending; slots not
  yet filled hold -inf / +inf and row ``INVALID_ROW``.
  """
  proponent_scores: jax.Array  # f32[Q, k]
  proponent_rows: jax.Array  # i32[Q, k]
  opponent_scores: jax.Array  # f32[Q, k]
  opponent_rows: jax.Array  # i32[Q, k]


class TopK(NamedTuple):
  """Final result on the host; ``n = min(k, rows scanned)`` columns."""
  proponent_rows: np.ndarray  # int64[Q, n]
  proponent_scores: np.ndarray  # f32[Q, n], descending
  opponent_rows: np.ndarray  # int64[Q, n]
  opponent_scores: np.ndarray  # f32[Q, n], ascending


class RowMetric(NamedTuple):
  """A query set's metric R^(-1) = diag(diag) - sum_b C_b C_b^T, where C_b
  (``lowrank[b]``, ``[hi - lo, r_b]``) acts on columns ``segments[b]``.

  Built by ``tracer.hessian.QueryMetric.row_metric``; rows' scores are divided
  by their norm ``sqrt(x^T R^(-1) x)``.

  Grouped (``grouped_metric``): G query sets' metrics, ``diag [G, d]`` and
  ``lowrank[b] [G, hi - lo, r_b]``, for queries laid out as G sets one
  after the other (their sizes static: ``step_fn(sets=)``), set g scored
  under metric g: several tasks in one pass over the rows.
  """
  diag: jax.Array                  # f32[d], or f32[G, d] grouped
  lowrank: tuple[jax.Array, ...]   # f32[hi - lo, r_b] per segment ([G, ...])
  segments: tuple[tuple[int, int], ...]


def grouped_metric(metrics) -> RowMetric:
  """One ``RowMetric`` of G metrics of the same segments (one basis), for
  a pass that scores G query sets, each under its own (``RowMetric``'s
  grouped form). Each segment's low-rank columns are padded with zero
  columns to the most any metric has: a zero column adds nothing to a norm."""
  metrics = list(metrics)
  segments = tuple(tuple(s) for s in metrics[0].segments)
  if any(tuple(tuple(s) for s in m.segments) != segments for m in metrics):
    raise InputError("metrics: every query set's metric needs the same "
                     "segments (the same basis) to share a pass")
  lowrank = []
  for b in range(len(segments)):
    width = max(np.shape(m.lowrank[b])[1] for m in metrics)
    lowrank.append(np.stack([
        np.pad(np.asarray(m.lowrank[b], np.float32),
               ((0, 0), (0, width - np.shape(m.lowrank[b])[1])))
        for m in metrics]))
  return RowMetric(np.stack([np.asarray(m.diag, np.float32) for m in metrics]),
                   tuple(lowrank), segments)


def _mesh(mesh: Mesh | None) -> Mesh:
  return partitioning.make_mesh() if mesh is None else mesh


def _bf16_head(x: jax.Array) -> jax.Array:
  """``x`` (f32) truncated to its top 8 significand bits: exact in bf16."""
  bits = lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFF0000)
  return lax.bitcast_convert_type(bits, jnp.float32)


def bf16_terms(queries: jax.Array) -> jax.Array:
  """``bf16[3, Q, d]`` terms that sum exactly to ``queries f32[Q, d]`` (8 + 8 +
  8 significand bits; see ``exact_scores``)."""
  # Bit masks, not f32 -> bf16 -> f32 round trips, which XLA may drop as
  # "excess precision" (it does on GPU).
  q1 = _bf16_head(queries)
  rest = queries - q1
  q2 = _bf16_head(rest)
  q3 = rest - q2  # <= 8 significant bits left: exact in bf16
  return jnp.stack([q1, q2, q3]).astype(jnp.bfloat16)


def exact_scores(x: jax.Array, queries: jax.Array, widen: bool = False,
                 tile_rows: int | None = None) -> jax.Array:
  """fp32 scores ``[r, Q]`` of rows ``x [r, d]`` against ``queries f32[Q, d]``.

  ``x`` may hold rows as their bits (``ROW_BITS``, ``row_values``: a CPU
  step's bf16 pieces, a resident index's rows).

  Exactness of bf16 rows: the stored bf16 values are scored against the fp32
  queries with no rounding beyond the stored bf16 and fp32 accumulation.

  * ``widen`` (CPU): each row is widened to f32 (exact: bf16 is the top half
    of an f32) and scored by an fp32 matmul, as f32 rows are. With
    ``tile_rows`` the chunk is widened and scored ``tile_rows`` rows at a
    time (``row_tiles``), so its f32 copy is one tile, in cache; without,
    XLA widens the whole chunk inside its matmul (``compiler_options``),
    which costs what an f32 chunk does only where YNNPACK widens tile by
    tile itself (``cpu_widening``). f32 rows held as bits are scored in
    tiles too: viewing a whole chunk's bits as values is a copy of it
    (``ROW_BITS``; a resident pass over f32 rows took 1.2x as long).
  * otherwise (GPU/TPU, bf16 matmul units): each fp32 query is split into
    three bf16 terms that sum to it exactly (8 + 8 + 8 significand bits:
    ``q1`` = q truncated to 8 bits, ``q2`` = the rest truncated, ``q3`` =
    what is left, <= 8 bits). A bf16 x bf16 product is exact in fp32 (8 x 8
    bits), so the three bf16 matmuls with fp32 accumulation compute the
    exact products x_i q_i as three fp32 sums, each with the rounding error
    bound of an fp32 dot product over d terms (<= d u sum_i |x_i q_i|,
    u = 2^-24; NVIDIA tensor cores truncate while accumulating, which at
    most doubles u). Where the hardware flushes subnormals, a term or
    product below 2^-126 in magnitude may become 0 (an absolute error below
    2^-126 each).

  int8 rows (an int8 store's, ``tracer.store.quantize``) are exact in both
  f32 and bf16 (|v| <= 127 needs 7 significand bits, bf16 has 8), so they
  take the same paths, converted first: their scores carry no rounding
  beyond the fp32 accumulation.

  Rows stay the leading axis: it is the faster matmul output on CPU, and the
  selection below reduces over row blocks without a transpose.
  """
  if widen and tile_rows and x.dtype != jnp.float32:
    # Fewer rows than a tile are one tile, not padded: a row's fp32 dot
    # product does not depend on the rows around it (tests/test_scan.py).
    return row_tiles(lambda t: exact_scores(_widened(t), queries), x,
                     min(tile_rows, x.shape[0]))
  contract = (((1,), (1,)), ((), ()))
  x = _int8_as_bf16(row_values(x), widen)
  if x.dtype == jnp.bfloat16 and not widen:
    num_queries = queries.shape[0]
    terms = bf16_terms(queries).reshape(3 * num_queries, -1)
    s = lax.dot_general(x, terms, contract, preferred_element_type=jnp.float32)
    return (s[:, :num_queries] + s[:, num_queries:2 * num_queries]
            + s[:, 2 * num_queries:])
  # HIGHEST: GPUs would otherwise use TF32 and TPUs one bf16 pass.
  return lax.dot_general(x.astype(jnp.float32), queries, contract,
                         precision=lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32)


# Rows held as their bits: uint16 for bf16, uint32 for f32, uint8 for int8.
# XLA:CPU widens a bf16 array that is sliced (dynamic_slice, also inside a
# loop) or updated in place to f32 first, all of it, and a bitcast inside
# the program is a copy; an array that arrives as bits is sliced as it is and
# each slice viewed as values (``row_values``, free in the program).
ROW_BITS = {np.dtype(jnp.bfloat16): np.dtype(np.uint16),
            np.dtype(np.float32): np.dtype(np.uint32),
            np.dtype(np.int8): np.dtype(np.uint8)}
_ROW_VALUES = {bits: values for values, bits in ROW_BITS.items()}


def values_dtype(dtype) -> np.dtype:
  """The dtype of the values of rows held as ``dtype`` (``ROW_BITS``)."""
  return _ROW_VALUES.get(np.dtype(dtype), np.dtype(dtype))


def row_values(x: jax.Array) -> jax.Array:
  """Rows' values: ``x`` itself, or the values of rows held as bits
  (``ROW_BITS``)."""
  values = values_dtype(x.dtype)
  return x if values == x.dtype else lax.bitcast_convert_type(x, values)


# f32 bytes of a tile of scores on the CPU (``exact_scores(tile_rows=)``,
# ``score_tile_rows``): 2,048 rows at d = 1,024, at least 128. A whole step
# (64 MiB of bf16 rows, 64 queries, k = 100) against the f32 step of the same
# rows, 2-core AMD EPYC (Zen 3, AVX2), best of 14: d = 1,024 in tiles of
# 512 / 1,024 / 2,048 / 4,096 rows x1.20 / 1.13 / 1.13 / 1.28; d = 16,384 in
# tiles of 64 / 128 / 256 / 512 x2.98 / 1.31 / 1.34 / 1.65; d = 65,536 in
# tiles of 64 / 128 / 256 x2.78 / 1.68 / 2.01 (whole: x2.2-3.1).
SCORE_TILE_BYTES = 8 << 20
SCORE_TILE_MIN_ROWS = 128


def score_tile_rows(dim: int) -> int:
  """Rows per tile of a CPU step's widened scores (``SCORE_TILE_BYTES``)."""
  return max(SCORE_TILE_MIN_ROWS, SCORE_TILE_BYTES // (4 * dim) // 8 * 8)


def _widened(x: jax.Array) -> jax.Array:
  """bf16 or int8 rows ``x`` as f32 (exact). bf16 by a shift of its bits, not
  a convert, which XLA:CPU would move into YNNPACK's matmul fusion (it then
  writes the f32 copy itself, slower)."""
  if x.dtype != jnp.bfloat16:
    return x.astype(jnp.float32)
  bits = lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32) << 16
  return lax.bitcast_convert_type(bits, jnp.float32)


def _int8_as_bf16(x: jax.Array, widen: bool) -> jax.Array:
  """int8 rows as bf16 (exact) where bf16 rows take the bf16 matmul units."""
  return x.astype(jnp.bfloat16) if x.dtype == jnp.int8 and not widen else x


def lowrank_products(x: jax.Array, c: jax.Array, widen: bool = False) -> jax.Array:
  """``x [r, b] @ c f32[b, R]`` in fp32: a row metric's low-rank term.

  bf16 and int8 rows (unless ``widen``) take ``exact_scores``'s three bf16
  matmuls (``c``'s columns split like queries): the same fp32 bound as an
  fp32 matmul on the row values, on the bf16 units. At HIGHEST precision an f32
  matmul runs on a GPU's fp32 cores (~1/15 of its bf16 rate on an H200) and
  takes six bf16 passes on a TPU; these columns (about as many per block as
  the query set has queries) are as many as the queries themselves.
  """
  if x.dtype in (jnp.bfloat16, jnp.int8) and not widen:
    return exact_scores(x, c.T)
  return jnp.dot(x.astype(jnp.float32), c, precision=lax.Precision.HIGHEST)


# f32 bytes of a tile of the row norms on the CPU (``row_tiles``): 1,024
# rows at d = 1,024 (the fastest of 256 to 4,096), 64 at d = 16,368 (within
# 20% of the fastest of 16 to 1,024 for 1 and 64 low-rank columns), 2-core
# Xeon.
NORM_TILE_BYTES = 4 << 20


def row_tiles(fn, x: jax.Array, tile_rows: int | None = None) -> jax.Array:
  """``fn(x)`` for a ``fn`` that maps each row of ``x [r, d]`` to its own
  output row (``[r, ...]``), applied ``tile_rows`` rows at a time (default:
  ``NORM_TILE_BYTES`` of f32 rows, 8 to 1,024 of them). ``x`` may hold rows
  as their bits (``ROW_BITS``); ``fn`` gets their values.

  Why (XLA:CPU): a column slice ``x[:, lo:up]`` is copied out before its
  matmul, so a row metric's segments wrote and read the whole chunk again
  (16 MB per segment for 16,384 rows of d = 1,024); a tile's slices stay in
  cache. Every row goes through the same ``[tile_rows, d]`` program (the
  last tile ends at row ``r``, overlapping the one before it; fewer rows
  than a tile are padded with zeros), so its result does not depend on
  ``r`` or on where the row sits: XLA:CPU sums a row reduction of a short
  array in another order than of a long one.
  """
  if tile_rows is None:
    tile_rows = min(1024, max(8, NORM_TILE_BYTES // (4 * x.shape[1]) // 8 * 8))
  r = x.shape[0]
  if r < tile_rows:
    x = jnp.pad(x, ((0, tile_rows - r),) + ((0, 0),) * (x.ndim - 1))
  n = x.shape[0]
  # bf16 rows are sliced as their bits (``ROW_BITS``): XLA:CPU widens a bf16
  # array that a loop slices to f32 before the loop, all of it (64 MB for
  # 16,384 rows). Rows that arrive as bits save the bitcast's copy.
  if x.dtype == jnp.bfloat16:
    x = lax.bitcast_convert_type(x, ROW_BITS[np.dtype(x.dtype)])

  def tile(start):
    return fn(row_values(lax.dynamic_slice_in_dim(x, start, tile_rows)))

  # No loop carry (lax.map): inside shard_map it would need the mesh's axes.
  tiles = -(-n // tile_rows)
  out = lax.map(tile, jnp.minimum(jnp.arange(tiles) * tile_rows, n - tile_rows))
  last = out[-1][tiles * tile_rows - n:]  # the rows the tile before did not cover
  return jnp.concatenate([out[:-1].reshape((-1,) + out.shape[2:]), last])[:r]


def _row_norms(x: jax.Array, diag: jax.Array, lowrank, segments,
               widen: bool = False, tiled: bool | None = None) -> jax.Array:
  """``sqrt(x^T R^(-1) x)`` of each row of ``x [r, d]`` (``RowMetric``), in fp32.

  A zero row gets the smallest normal float, so its scores stay 0, as unit
  normalization leaves a zero row zero. ``widen``: as the scores
  (``exact_scores``; ``lowrank_products``). ``tiled`` (the CPU; default
  ``widen``): tile by tile (``row_tiles``). A grouped metric (``diag [G,
  d]``) gives ``[r, G]``: each row's norm under each.
  """
  groups = diag.shape[0] if diag.ndim == 2 else None

  def squared(x):
    xf = x.astype(jnp.float32)
    # A weighted sum, not a matrix-vector product: XLA:CPU wrote x * x out
    # for the product (and a TPU would take six bf16 passes at HIGHEST).
    if groups is None:
      n2 = jnp.sum(xf * xf * diag, axis=1)
    else:
      n2 = jnp.stack([jnp.sum(xf * xf * diag[g], axis=1) for g in range(groups)],
                     axis=1)
    for (lo, up), c in zip(segments, lowrank):
      if c.shape[-1]:
        if groups is None:
          t = lowrank_products(x[:, lo:up], c, widen)
          n2 = n2 - jnp.sum(t * t, axis=1)
        else:  # every group's columns in one product: [r, G, r_b]
          cols = jnp.moveaxis(c, 0, 1).reshape(c.shape[1], -1)
          t = lowrank_products(x[:, lo:up], cols, widen).reshape(
              x.shape[0], groups, c.shape[-1])
          n2 = n2 - jnp.sum(t * t, axis=2)
    return n2

  return norms_of(squared, x, widen if tiled is None else tiled)


def norms_of(squared, x: jax.Array, tiled: bool) -> jax.Array:
  """``sqrt(squared(x))``, ``squared`` giving each row's ``x^T R^(-1) x``
  (``[r]``, or ``[r, J]`` for J metrics), tile by tile where ``tiled`` (the
  CPU: ``row_tiles``). A zero row gets the smallest normal float."""
  n2 = row_tiles(squared, x) if tiled else squared(row_values(x))
  return jnp.maximum(jnp.sqrt(jnp.maximum(n2, 0.0)), jnp.finfo(jnp.float32).tiny)


# Fast paths of _select_rows, for when the threshold (the running k-th best) is
# high, as in most chunks of a large corpus. They start from one bit per
# element, set where its key reaches the threshold, GROUP rows to a u32 word.
# Where every query has at most c such elements, c in FAST_LEVELS or k or 2k
# (up to MAX_COMPACT; past k, then a top-k), they are compacted
# (``_compact``), with no TopK: XLA's CPU TopK costs ~3-5 ns per element,
# more as k grows. Where more reach it but within at most L groups, L in
# FAST_GROUPS, one top-k of those groups' elements. In a scan of 400k random
# rows in steps of 16k (k = 100, 64 queries) the most elements any query has
# reaching its threshold is ~130 at the 2nd step, ~50 at the 4th, ~30 at
# the 6th and ~15 from the 13th. Each level is a branch of its own, compiled
# (that step compiles in ~2.5 s on 2 cores, ~0.9 s without the levels); a
# level of 8 saved nothing measurable there.
FAST_LEVELS = (16, 32, 64)
MAX_COMPACT = 256
FAST_GROUPS = (16, 32)
# Rows per bit word: both sides' bits fit one u32 (_select_both).
GROUP = fused_scores.GROUP


def _block_size(rows: int, k: int) -> int | None:
  """Block for the two-stage top-k, or None where one top_k is cheaper."""
  # ~sqrt(rows / k) balances the two top_k sizes; XLA's CPU TopK costs about
  # as much per element as a gather below 16.
  block = 1 << max(4, int(round(np.log2(max(1.0, np.sqrt(rows / k))))))
  nb = -(-rows // block)
  return block if nb + k * block <= rows // 4 else None


def _or_bits(mask: jax.Array, axis: int) -> jax.Array:
  """``mask`` (at most 32 long along ``axis``) as u32 words: bit ``p`` set
  where element ``p`` along ``axis`` is True."""
  shape = [1] * mask.ndim
  shape[axis] = mask.shape[axis]
  bits = (jnp.uint32(1) << jnp.arange(mask.shape[axis], dtype=jnp.uint32))
  return lax.reduce(jnp.where(mask, bits.reshape(shape), jnp.uint32(0)),
                    jnp.uint32(0), lax.bitwise_or, (axis,))


def _select_bit(words: jax.Array, r: jax.Array) -> jax.Array:
  """The position of the ``r``-th set bit (from 0, low bits first) of each
  of ``words`` (u32), elementwise; ``r < popcount(words)``."""
  pos = jnp.zeros(r.shape, jnp.int32)
  for step in (16, 8, 4, 2, 1):  # the last position with <= r set bits below
    below = lax.population_count(
        words & ((jnp.uint32(1) << (pos + step).astype(jnp.uint32)) - 1))
    pos = jnp.where(below.astype(jnp.int32) <= r, pos + step, pos)
  return pos


def _count_at_most(ends: jax.Array, n: int) -> jax.Array:
  """``#{g : ends[q, g] <= j}`` for ``j < n``: ``[Q, n]``, of ``ends [Q, G]``
  nondecreasing along G. By comparisons: all at once up to 32 (XLA:CPU
  fuses a sum of up to 32 terms with what it sums), else the segments of 32
  first, then within the one that holds ``j``."""
  j = jnp.arange(n, dtype=jnp.int32)[:, None]
  num_queries, size = ends.shape
  if size <= 32:
    return jnp.sum(ends[:, None, :] <= j, axis=2, dtype=jnp.int32)
  big = jnp.iinfo(jnp.int32).max
  seg = jnp.pad(ends, ((0, 0), (0, -size % 32)), constant_values=big).reshape(
      num_queries, -1, 32)
  below = _count_at_most(seg[:, :, -1], n)  # whole segments at or below j
  within = jnp.take_along_axis(
      seg, jnp.minimum(below, seg.shape[1] - 1)[:, :, None], axis=1)
  return below * 32 + jnp.where(below < seg.shape[1], jnp.sum(
      within <= j, axis=2, dtype=jnp.int32), 0)


def _nth_set(words: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """Where the first ``n`` set bits of each row of ``words u32[Q, G]`` lie
  (a row is one bit string, word by word, low bits first): ``(word, bit)``,
  both ``[Q, n]``; ``word`` is ``G`` past the last set bit (``bit`` is then
  meaningless). O(Q n min(G, 64)) compares, no sort."""
  count = lax.population_count(words).astype(jnp.int32)
  ends = jnp.cumsum(count, axis=1)  # set bits up to each word's end
  word = _count_at_most(ends, n)
  at = jnp.minimum(word, words.shape[1] - 1)
  r = jnp.arange(n) - jnp.take_along_axis(ends - count, at, axis=1)  # in word
  return word, _select_bit(jnp.take_along_axis(words, at, axis=1), r)


def _gather_elements(flat: jax.Array, pos: jax.Array) -> jax.Array:
  """``flat[pos[q, j], q]`` of ``flat [r, Q]``: ``[Q, c]``."""
  return flat[pos, jnp.arange(pos.shape[0])[:, None]]


def _live_groups(words: jax.Array, n: int) -> jax.Array:
  """The first ``n`` words with a bit set in ``words u32[G, Q]``, for each
  query, in position order: ``[Q, n]``, ``G`` or more past the last."""
  live = words != 0
  pad = -live.shape[0] % 32
  packed = _or_bits(jnp.pad(live, ((0, pad), (0, 0))).reshape(
      -1, 32, live.shape[1]), axis=1)  # [G / 32, Q]: bit p of word w: 32w + p
  word, bit = _nth_set(packed.T, n)
  return word * 32 + bit


def _compact(words: jax.Array, c: int) -> jax.Array:
  """Positions of the first ``c`` set bits of ``words u32[G, Q]`` (bit ``p``
  of ``words[g, q]`` stands for position ``g * GROUP + p``), for each query,
  in position order: ``[Q, c]``, ``G * GROUP`` past the last."""
  num_words = words.shape[0]
  kept = _live_groups(words, c)  # a set bit's word is among the first c
  has = kept < num_words
  kept = jnp.minimum(kept, num_words - 1)
  slot, bit = _nth_set(
      jnp.where(has, _gather_elements(words, kept), jnp.uint32(0)), c)
  pos = jnp.take_along_axis(kept, jnp.minimum(slot, c - 1), axis=1)
  pos = pos * GROUP + bit
  return jnp.where(slot < c, pos, num_words * GROUP)


def _pick(words: jax.Array, block_max, keys_at, rid: jax.Array,
          threshold: jax.Array, k: int, block: int,
          branch_free: bool = False) -> tuple[jax.Array, jax.Array]:
  """``_select_rows``' selection of ``k`` of ``r`` positions, given:

  * ``words u32[r / GROUP, Q]``: bit ``p`` of ``words[g, q]`` is set iff the
    key of position ``g * GROUP + p`` reaches ``threshold[q]`` (unused where
    that is -inf);
  * ``block_max() -> [Q, r / block]``: the blocks' key maxima (computed on
    the slow path only);
  * ``keys_at(pos [Q, c]) -> [Q, c]``: the keys at positions ``pos``;
  * ``rid [r]``: the positions' row ids.

  ``branch_free``: always the two-stage path (fixed shapes, no ``lax.switch``:
  an accelerator then never reads a predicate back to the host).
  """
  groups, num_queries = words.shape
  end = groups * GROUP  # a position past the last: row INVALID_ROW
  rid = jnp.append(rid, INVALID_ROW)

  def top(g, pos, c):
    v, j = lax.top_k(g, c)
    r = rid[jnp.take_along_axis(pos, j, axis=1)]
    pad = ((0, 0), (0, k - c))
    return (jnp.pad(v, pad, constant_values=-jnp.inf),
            jnp.pad(r, pad, constant_values=INVALID_ROW))

  def gather(kept, size):  # kept [Q, L] in position order
    pos = (kept[:, :, None] * size + jnp.arange(size)).reshape(
        num_queries, kept.shape[1] * size)
    return keys_at(pos), pos

  def slow():
    _, kept = lax.top_k(block_max(), k)
    return top(*gather(jnp.sort(kept, axis=-1), block), k)

  def few_groups(num_groups):
    # Every group with an element reaching the threshold, and the elements
    # of the chunk's top-k: with more than k reaching it, they all do.
    kept = _live_groups(words, num_groups)
    g, pos = gather(jnp.minimum(kept, groups - 1), GROUP)
    past = jnp.repeat(kept >= groups, GROUP, axis=1)  # slots past the last
    return top(jnp.where(past, -jnp.inf, g), jnp.where(past, end, pos),
               min(k, num_groups * GROUP))

  def compact(c):
    # Every element reaching the threshold, in position order (not sorted:
    # _merge ranks them); past k, the top k of them.
    pos = _compact(words, c)
    v = jnp.where(pos < end, keys_at(jnp.minimum(pos, end - 1)), -jnp.inf)
    if c > k:
      return top(v, pos, k)
    pad = ((0, 0), (0, k - c))
    return (jnp.pad(v, pad, constant_values=-jnp.inf),
            jnp.pad(rid[pos], pad, constant_values=INVALID_ROW))

  if branch_free:
    return slow()
  levels = ([c for c in FAST_LEVELS if c < k]
            + [c for c in (k, 2 * k) if c <= MAX_COMPACT])
  tiers = sorted({min(n, k // 2) for n in FAST_GROUPS
                  if 8 <= min(n, k // 2) <= groups})

  # A threshold of -inf (fewer than k rows so far): every key reaches it,
  # NaNs' too, which the bits leave out: the slow path.
  unbounded = jnp.any(threshold == -jnp.inf)

  def crowded():  # more elements reach the threshold than any level holds
    live = jnp.max(_column_sum(words != 0))  # the most groups holding them
    index = jnp.sum(jnp.asarray(tiers, jnp.int32) < live)
    return lax.switch(jnp.where(unbounded, len(tiers), index),
                      [functools.partial(few_groups, n) for n in tiers]
                      + [slow])

  above = jnp.max(_column_sum(lax.population_count(words)))
  index = jnp.sum(jnp.asarray(levels, jnp.int32) < above)  # len(levels): none
  return lax.switch(jnp.where(unbounded, len(levels), index),
                    [functools.partial(compact, c) for c in levels] + [crowded])


def _column_sum(x: jax.Array) -> jax.Array:
  """``x.sum(axis=0)`` of ``x [n, Q]`` in int32, 16 rows at a time first:
  XLA:CPU then computes ``x`` inside the reduction instead of writing it
  out first (2-3x faster)."""
  pad = -x.shape[0] % 16
  if pad:
    x = jnp.pad(x, ((0, pad), (0, 0)))
  # (u32, then int32: XLA would merge two sums of one type into one.)
  partial = jnp.sum(x.reshape(-1, 16, x.shape[1]), axis=1, dtype=jnp.uint32)
  return jnp.sum(partial.astype(jnp.int32), axis=0)


def _select_rows(vals: jax.Array, rid: jax.Array, threshold: jax.Array,
                 k: int, branch_free: bool = False) -> tuple[jax.Array, jax.Array]:
  """Top-k candidates among the rows of ``vals [r, Q]``, for each query.

  Returns ``(values, row ids)``, both ``[Q, k]``. With ``threshold = -inf``
  they are exactly ``lax.top_k(vals.T, k)`` (ties to the lower position).
  ``threshold [Q]`` is the running k-th best: only elements ``>= threshold``
  can still enter the top-k, and only those are guaranteed; other slots may
  hold any element or padding (``-inf``, ``INVALID_ROW``), and on the
  fast paths the elements are in position order, not sorted.

  XLA's CPU TopK costs about 4 ns per element plus k log k per row, so:
  1. Two stages: keep the k blocks with the largest maxima, then top-k
     inside them. Every top-k element lies in a kept block (each block ranked
     above an element's block holds a distinct element ranked above it), and
     kept blocks stay in position order, so ties still go to the lower
     position.
  2. Fast paths, once the threshold is high (most chunks of a large corpus),
     from one bit per element, set where it reaches the threshold: if every
     query has at most c (in FAST_LEVELS) such elements, they are compacted
     (``_compact``); else if they lie in at most L (in FAST_GROUPS) groups
     of GROUP rows, a top-k of those groups' elements holds every one that
     matters.
  """
  rows, num_queries = vals.shape
  block = _block_size(rows, k)
  if block is None:
    v, pos = lax.top_k(vals.T, k)
    return v, rid[pos]
  nb = -(-rows // block)
  if nb * block != rows:
    vals = jnp.pad(vals, ((0, nb * block - rows), (0, 0)),
                   constant_values=-jnp.inf)
    rid = jnp.pad(rid, (0, nb * block - rows), constant_values=INVALID_ROW)
  words = _or_bits(vals.reshape(-1, GROUP, num_queries) >= threshold, axis=1)
  return _pick(words, lambda: vals.reshape(nb, block, num_queries).max(1).T,
               functools.partial(_gather_elements, vals), rid, threshold, k,
               block, branch_free)


def _no_negative_zero(x: jax.Array) -> jax.Array:
  return jnp.where(x == 0, 0.0, x)  # -0.0 and 0.0 must tie, as in numpy


def _select_both(s: jax.Array, valid: jax.Array, rid: jax.Array,
                 pro_kth: jax.Array, opp_kth: jax.Array, k: int,
                 branch_free: bool = False, words: jax.Array | None = None):
  """Proponent and opponent candidates of scores ``s [r, Q]``: ``_select_rows``
  of ``where(ok, s, -inf)`` and of ``where(ok, -s, -inf)`` (``ok``: a valid
  row and a score that is not NaN), returned as ``(pro values, pro rows, opp
  values, opp rows)``, opponents' values as scores (ascending).

  Same results, less memory traffic: the masked keys are never written out.
  One pass over ``s`` sets both sides' bits (a reduction fused with the
  masking); the masking is applied again only to the few elements
  gathered, and block maxima are taken on the slow path only. Both sides
  are selected as one problem of ``2Q`` queries (``_pick``): XLA:CPU's
  cost per op, not per element, dominates at these sizes.

  ``words``: those bits, when the scores' kernel set them already
  (``fused_scores``), ``u32[r / GROUP, 2Q]``.
  """
  rows, num_queries = s.shape
  block = _block_size(rows, k)
  if block is None:
    ok = valid[:, None] & ~jnp.isnan(s)
    s = _no_negative_zero(s)
    pv, pr = _select_rows(jnp.where(ok, s, -jnp.inf), rid, pro_kth, k, branch_free)
    ov, orow = _select_rows(jnp.where(ok, -s, -jnp.inf), rid, -opp_kth, k,
                            branch_free)
    return pv, pr, _no_negative_zero(-ov), orow
  nb = -(-rows // block)
  if nb * block != rows:
    pad = nb * block - rows
    s = jnp.pad(s, ((0, pad), (0, 0)))
    valid = jnp.pad(valid, (0, pad))
    rid = jnp.pad(rid, (0, pad), constant_values=INVALID_ROW)
    if words is not None:  # padding rows set no bit
      words = jnp.pad(words, ((0, pad // GROUP), (0, 0)))
  if words is None:
    # One bit per element: set where a valid row's score reaches the
    # threshold (never a NaN's: its key -inf reaches only a threshold of
    # -inf, which _pick leaves to its slow path). Both sides' bits in one
    # u32 per GROUP rows and query, proponents' low: one reduction of one
    # output (two outputs take ~2x as long).
    groups = s.reshape(-1, GROUP, num_queries)
    valid_groups = valid.reshape(-1, GROUP)[:, :, None]
    bits = (jnp.uint32(1) << jnp.arange(GROUP, dtype=jnp.uint32))[:, None]
    zero = jnp.uint32(0)
    words = lax.reduce(
        jnp.where(valid_groups & (groups >= pro_kth), bits, zero)
        | jnp.where(valid_groups & (groups <= opp_kth), bits << GROUP, zero),
        zero, lax.bitwise_or, (1,))
    # Queries 0..Q-1: proponents (keys s); Q..2Q-1: opponents (keys -s).
    words = ((words[:, None, :] >> jnp.uint32([0, GROUP])[:, None])
             & jnp.uint32((1 << GROUP) - 1)).reshape(-1, 2 * num_queries)
  sign = jnp.repeat(jnp.asarray([1.0, -1.0], jnp.float32), num_queries)

  def block_max():
    blocks = s.reshape(nb, block, num_queries)
    ok = valid.reshape(nb, block)[:, :, None] & ~jnp.isnan(blocks)
    hi, lo = lax.reduce(
        (jnp.where(ok, blocks, -jnp.inf), jnp.where(ok, blocks, jnp.inf)),
        (-jnp.inf, jnp.inf),
        lambda a, b: (jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])), (1,))
    return _no_negative_zero(jnp.concatenate([hi, -lo], axis=1).T)

  def keys_at(pos):  # [2Q, c]
    g = s[pos, jnp.arange(2 * num_queries)[:, None] % num_queries]
    ok = valid[pos] & ~jnp.isnan(g)
    return _no_negative_zero(jnp.where(ok, sign[:, None] * g, -jnp.inf))

  v, r = _pick(words, block_max, keys_at, rid,
               jnp.concatenate([pro_kth, -opp_kth]), k, block, branch_free)
  return (v[:num_queries], r[:num_queries],
          _no_negative_zero(-v[num_queries:]), r[num_queries:])


def _norms(pieces, diag, lowrank, segments, widen: bool, tiled: bool
           ) -> list[jax.Array] | None:
  """Each piece's rows' norms under a ``RowMetric`` (None: no metric)."""
  if segments is None:
    return None
  return [_row_norms(p, diag, lowrank, segments, widen, tiled) for p in pieces]


def _scores(pieces, queries, norms, widen: bool, score_tiles: bool,
            sets: tuple[int, ...] | None = None, owner=None) -> jax.Array:
  """``exact_scores`` of consecutive row pieces, ``[r, Q]``, divided by the
  rows' ``norms`` when given; widened tile by tile where ``score_tiles``.
  Grouped norms (``[r, G]``): the queries are G sets of ``sets[g]`` each,
  one after the other, set g divided by norm g; or, where the layout is
  not static (a ring's block), query q divided by norm ``owner[q]``."""
  s = jnp.concatenate([
      exact_scores(p, queries, widen,
                   score_tile_rows(p.shape[1]) if score_tiles else None)
      for p in pieces])
  if norms is None:
    return s
  norms = jnp.concatenate(norms)
  if norms.ndim == 1:
    return s / norms[:, None]
  if owner is not None:
    return s / jnp.take(norms, owner, axis=1)
  # Static sizes: each set's column broadcast over its queries, which XLA
  # fuses into the division (no gather, no index array a step).
  if sets is None or len(sets) != norms.shape[1] or sum(sets) != s.shape[1]:
    raise ValueError(f"grouped norms {norms.shape} need the sizes of their "
                     f"query sets summing to {s.shape[1]}, got {sets}")
  return s / jnp.concatenate([jnp.broadcast_to(norms[:, g:g + 1], (len(s), n))
                              for g, n in enumerate(sets)], axis=1)


def _fused_candidates(pieces, valid, queries, pro_kth, opp_kth, norms,
                      interpret: bool, tiles: fused_scores.Tiles):
  """Scores ``[r, Q]`` and bit words of bf16 ``pieces`` from the
  ``fused_scores`` kernel, one call per piece."""
  terms = bf16_terms(queries)
  out, lo = [], 0
  for i, p in enumerate(pieces):
    hi = lo + p.shape[0]
    out.append(fused_scores.scores_and_words(
        p, terms, pro_kth, opp_kth, valid[lo:hi],
        None if norms is None else norms[i], interpret=interpret, tiles=tiles))
    lo = hi
  return (jnp.concatenate([s for s, _ in out]),
          jnp.concatenate([w for _, w in out]))


def _local_candidates(x, row_ids, valid, queries, pro_kth, opp_kth, diag=None,
                      lowrank=(), *, k: int, rows_sorted: bool, segments=None,
                      widen: bool = False, score_tiles: bool = False,
                      tile_norms: bool = False,
                      branch_free: bool = False, fused: str | None = None,
                      tiles: fused_scores.Tiles = fused_scores.DEFAULT_TILES,
                      sets: tuple[int, ...] | None = None):
  """One device's top-k candidates of its rows: 4 arrays ``[Q, min(k, r)]``.

  ``pro_kth`` / ``opp_kth`` ``[Q]``: the running k-th best scores. With
  ``segments`` (a ``RowMetric``), scores are divided by the rows' norms.
  ``widen``, ``score_tiles``: see ``exact_scores``, ``tiles_bf16``;
  ``tile_norms`` (the CPU): ``row_tiles``. ``x`` may be a tuple of
  consecutive pieces of the rows (scored one by one: the rows need not be
  one buffer).
  ``fused``: "gpu" or "interpret" to score bf16 rows with the
  ``fused_scores`` kernel where it takes them (sorted rows), else None;
  ``tiles``: its tile settings. ``sets``: the query sets' sizes under a
  grouped metric (``_scores``).
  """
  pieces = x if isinstance(x, tuple) else (x,)
  norms = _norms(pieces, diag, lowrank, segments, widen, tile_norms)
  words = None
  if fused and rows_sorted and not widen and (
      norms is None or norms[0].ndim == 1) and all(
      fused_scores.supported(*p.shape, p.dtype, tiles) for p in pieces):
    s, words = _fused_candidates(pieces, valid, queries, pro_kth, opp_kth,
                                 norms, fused == "interpret", tiles)
  else:
    s = _scores(pieces, queries, norms, widen, score_tiles, sets)
  return _candidates(s, row_ids, valid, pro_kth, opp_kth, k=k,
                     rows_sorted=rows_sorted, branch_free=branch_free,
                     words=words)


def _local_summed_candidates(xs, row_ids, valid, queries, pro_kth, opp_kth,
                             diags, lowranks, *, k: int, rows_sorted: bool,
                             segments, widen: bool = False,
                             score_tiles: bool = False,
                             tile_norms: bool = False, branch_free: bool = False,
                             sets: tuple[int, ...] | None = None):
  """``_local_candidates`` of scores summed over parts: part ``p``'s rows
  ``xs[p]`` (one array or pieces) scored against its own ``queries[p]``,
  divided by their norms under its own metric where ``segments[p]`` is not
  None, and the parts' scores summed in fp32 in order."""
  total = None
  for x, q, diag, lowrank, seg in zip(xs, queries, diags, lowranks, segments):
    pieces = x if isinstance(x, tuple) else (x,)
    s = _scores(pieces, q, _norms(pieces, diag, lowrank, seg, widen, tile_norms),
                widen, score_tiles, sets)
    total = s if total is None else total + s
  return _candidates(total, row_ids, valid, pro_kth, opp_kth, k=k,
                     rows_sorted=rows_sorted, branch_free=branch_free)


def _candidates(s, row_ids, valid, pro_kth, opp_kth, *, k: int,
                rows_sorted: bool, branch_free: bool, words=None):
  """The selection of one device's scores ``s [r, Q]`` (``_select_both``)."""
  rid = jnp.where(valid, row_ids.astype(jnp.int32), INVALID_ROW)
  if not rows_sorted:
    # top_k breaks ties by position; put positions in row-id order first.
    order = jnp.argsort(rid, stable=True)
    rid, s, valid = rid[order], s[order], valid[order]
  return _select_both(s, valid, rid, pro_kth, opp_kth, min(k, s.shape[0]),
                      branch_free, words)


def fold_block(state: TopKState, s: jax.Array, row_ids: jax.Array,
               valid: jax.Array, k: int) -> TopKState:
  """``state`` with a block's scores ``s [r, Q]`` folded in: rows
  ``row_ids [r]`` in ascending order, ``valid [r]`` (False: padding or a
  quarantined row, never returned). What a scan step does on one device,
  for callers that loop over blocks themselves (``tracer.serving``)."""
  rid = jnp.where(valid, row_ids.astype(jnp.int32), INVALID_ROW)
  cand = _select_both(s, valid, rid, state.proponent_scores[:, -1],
                      state.opponent_scores[:, -1], min(k, s.shape[0]))
  return merge_candidates(state, *cand, k)


def _precedes(ka, ra, kb, rb):
  """``a`` ranks strictly before ``b``: a lower key, or the same key and a
  lower row."""
  return (ka < kb) | ((ka == kb) & (ra < rb))


def _is_sorted(key, rows):
  return ~jnp.any(_precedes(key[:, 1:], rows[:, 1:], key[:, :-1], rows[:, :-1]))


# The most k for which _merge ranks instead of sorting: at k = 100 (64
# queries) a scan step's CPU time drops 3% with it; at k = 300 a merge costs
# ~4x a sort, at 1,000 ~10x. Below 256: _rank_merge counts in uint8.
RANK_MERGE_MAX_K = 128


def _count(pred: jax.Array, axis: int) -> jax.Array:
  """How many of ``pred`` hold along ``axis`` (at most 255), as int32.

  Summed in uint8: XLA:CPU writes the comparisons out before summing them
  along a non-minor axis, or one longer than 32, and 1 byte each costs less
  than 4 (a rank merge's step time -0.07 ms at k = 100, Q = 64)."""
  return jnp.sum(pred.astype(jnp.uint8), axis=axis, dtype=jnp.uint8).astype(
      jnp.int32)


def _rank_merge(ka, ra, kb, rb, k: int, b_sorted: bool = True):
  """The first ``k`` of two lists ``[Q, m]``, ``[Q, n]`` (m, n < 256),
  merged: ``a`` sorted by (key, row) ascending, ``b`` too if ``b_sorted``,
  else in any order. Each element's place is its place in its own list plus
  how many of the other list go before it (ties to ``a``), and the places
  below ``k`` are scattered. O(m n) comparisons (plus O(n^2) for an unsorted
  ``b``), no sort."""
  before = _precedes(kb[:, None, :], rb[:, None, :], ka[:, :, None],
                     ra[:, :, None])  # [Q, i, j]: b_j strictly before a_i
  pos_a = jnp.arange(ka.shape[1]) + _count(before, axis=2)
  if b_sorted:
    own = jnp.arange(kb.shape[1])
  else:  # [Q, j, l]: b_l goes before b_j, or is equal and listed first
    j = jnp.arange(kb.shape[1])
    b_j, b_row = kb[:, :, None], rb[:, :, None]
    own = _count(_precedes(kb[:, None, :], rb[:, None, :], b_j, b_row)
                 | ((kb[:, None, :] == b_j) & (rb[:, None, :] == b_row)
                    & (j < j[:, None])), axis=2)
  pos_b = own + ka.shape[1] - _count(before, axis=1)
  q = jnp.arange(ka.shape[0])[:, None]
  pos = jnp.minimum(jnp.concatenate([pos_a, pos_b], axis=1), k)  # k: dropped

  def place(a, b, fill):
    out = jnp.full((ka.shape[0], k + 1), fill, a.dtype)
    return out.at[q, pos].set(jnp.concatenate([a, b], axis=1))[:, :k]

  return place(ka, kb, jnp.inf), place(ra, rb, INVALID_ROW)


def _merge_keys(ka, ra, kb, rb, k: int, branch_free: bool = False):
  """The running top-k ``(ka, ra) [Q, k]``, sorted by (key, row) ascending,
  and candidates ``(kb, rb) [Q, n]`` in any order merged: the first ``k``.
  ``branch_free``: by one sort (see ``_pick``)."""

  def by_sort():
    key, r = lax.sort((jnp.concatenate([ka, kb], axis=1),
                       jnp.concatenate([ra, rb], axis=1)),
                      dimension=1, num_keys=2)
    return key[:, :k], r[:, :k]

  n = kb.shape[1]
  if branch_free or n > ka.shape[1] or k > RANK_MERGE_MAX_K:
    # Several devices' candidates: k per device; and the rank merge's k^2
    # comparisons outgrow a sort of 2k.
    return by_sort()
  # Only candidates before the running k-th can enter. After a fast
  # selection they are the first few columns, in position order: rank only
  # the least width in FAST_LEVELS that holds them. All n are ranked as a
  # sorted list where they are one (a top_k's; checked), else as any order.
  enters = _precedes(kb, rb, ka[:, -1:], ra[:, -1:])
  last = jnp.max(jnp.where(enters, jnp.arange(1, n + 1), 0))
  widths = [w for w in FAST_LEVELS if w < n]

  def narrow(w):
    return _rank_merge(ka, ra, kb[:, :w], rb[:, :w], k, False)

  def full():
    return lax.cond(_is_sorted(kb, rb),
                    functools.partial(_rank_merge, ka, ra, kb, rb, k),
                    functools.partial(_rank_merge, ka, ra, kb, rb, k, False))

  # The running top-k is sorted unless a caller passed a state of its own.
  index = jnp.where(_is_sorted(ka, ra),
                    jnp.sum(jnp.asarray(widths, jnp.int32) < last),
                    len(widths) + 1)
  return lax.switch(index, [functools.partial(narrow, w) for w in widths]
                    + [full, by_sort])


def _negated(x):
  """``-x`` for f32 ``x``, bit for bit, as a flip of the sign bit. XLA:CPU
  fused a plain negation of the devices' gathered candidates into a YNNPACK
  elementwise fusion (``compiler_options``) that failed at run time on
  their layout: "Instruction with unsupported layout in YNN fusion: ...
  f32[64,64]{0,1}" (jax 0.10.2; e.g. 64 queries, k = 128 on 2 devices; an
  audit, 2026-12-05). An integer xor is not fused."""
  bits = lax.bitcast_convert_type(x, jnp.uint32)
  return lax.bitcast_convert_type(bits ^ jnp.uint32(0x80000000), jnp.float32)


def _merge(scores, rows, cand_scores, cand_rows, k: int, largest: bool):
  """The running top-k ``[Q, k]`` (sorted) and candidates (any order)
  merged: the first ``k`` by score (descending if ``largest``), ties to the
  lower row."""
  key, r = _merge_keys(_negated(scores) if largest else scores, rows,
                       _negated(cand_scores) if largest else cand_scores,
                       cand_rows, k)
  return (_negated(key) if largest else key), r


def merge_candidates(state: TopKState, pro_scores, pro_rows, opp_scores, opp_rows,
                     k: int, branch_free: bool = False) -> TopKState:
  """``state`` and both sides' candidates merged (``_merge``), as one
  problem of ``2Q`` queries: keys are proponents' scores negated, then
  opponents' scores."""
  num_queries = pro_scores.shape[0]
  key, r = _merge_keys(
      jnp.concatenate([_negated(state.proponent_scores), state.opponent_scores]),
      jnp.concatenate([state.proponent_rows, state.opponent_rows]),
      jnp.concatenate([_negated(pro_scores), opp_scores]),
      jnp.concatenate([pro_rows, opp_rows]), k, branch_free)
  return TopKState(_negated(key[:num_queries]), r[:num_queries], key[num_queries:],
                   r[num_queries:])


def empty_state(num_queries: int, k: int) -> TopKState:
  """A running top-k with nothing in it (to build inside a jitted program)."""
  no_row = jnp.full((num_queries, k), INVALID_ROW, jnp.int32)
  return TopKState(jnp.full((num_queries, k), -jnp.inf, jnp.float32), no_row,
                   jnp.full((num_queries, k), jnp.inf, jnp.float32), no_row)


@functools.lru_cache(maxsize=None)
def _init_fn(mesh: Mesh, num_queries: int, k: int, split: bool):
  return jax.jit(functools.partial(empty_state, num_queries, k),
                 out_shardings=partitioning.rows_sharding(mesh) if split
                 else partitioning.replicated(mesh))


# XLA:CPU's library (YNNPACK) fusions for the scan step: matmuls with the
# elementwise ops that feed them (a bf16 chunk widened whole is then widened
# inside the matmul, ``cpu_widening``), and not reductions, which XLA fuses
# with their masking instead (``_select_both``). The default is matmuls and
# reductions, whose sums then depend on the program around them: a row
# metric's scores differed in the last bit between 1 and 8 pieces a step.
_CPU_FUSIONS = {"xla_cpu_experimental_ynn_fusion_type":
                "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE"}


@functools.lru_cache(maxsize=None)
def _xla_cpu_takes_fusions() -> bool:
  """Whether this XLA:CPU takes ``_CPU_FUSIONS`` (another XLA may not)."""
  try:
    cpu = jax.local_devices(backend="cpu")[0]
    jax.jit(lambda a: a + 1, compiler_options=_CPU_FUSIONS).lower(
        jax.device_put(np.zeros(8, np.float32), cpu)).compile()
  except Exception:  # pylint: disable=broad-except
    return False
  return True


def compiler_options(platform: str) -> dict[str, str] | None:
  """XLA options for jitting scan steps on ``platform`` ("cpu", "gpu", ...);
  None where there are none, or where this XLA does not know them."""
  if platform != "cpu" or not _xla_cpu_takes_fusions():
    return None
  return dict(_CPU_FUSIONS)


@functools.lru_cache(maxsize=None)
def cpu_widening() -> str:
  """How this machine's CPU steps widen bf16 rows to f32 (``exact_scores``):
  "matmul" (the whole chunk, inside YNNPACK's matmul, ``compiler_options``)
  on CPUs with AVX512-BF16 where XLA takes the options, "tiles"
  (``score_tile_rows`` rows at a time) elsewhere.

  Why by that flag: the whole-chunk form cost 1.04-1.08x the f32 matmul of
  the same rows on the two such CPUs measured (AMD Zen 4, Intel Emerald
  Rapids; whole Zen 4 scans 1.08-1.11x the f32 scan, scans in tiles
  1.13-1.42x), but 2.2-3.1x on an AVX2-only AMD Zen 3, where YNNPACK writes the
  widened chunk out first (64-128 MB a step, its pages faulted in afresh
  each time); whole scans in tiles cost 1.13x there at d = 1,024 and 1.47x
  at d = 16,368 (``SCORE_TILE_BYTES``). Without
  the options the whole chunk is widened before the matmul (2.5x).
  """
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      flags = next((line.split(":", 1)[1].split() for line in f
                    if line.startswith("flags")), [])
  except OSError:
    flags = []
  if "avx512_bf16" in flags and compiler_options("cpu"):
    return "matmul"
  return "tiles"


def jit_step(fn, mesh: Mesh, **kwargs):
  """``jax.jit(fn, **kwargs)`` with ``compiler_options`` for ``mesh``'s platform."""
  options = compiler_options(mesh.devices.flat[0].platform)
  return jax.jit(fn, compiler_options=options, **kwargs) if options else jax.jit(
      fn, **kwargs)


def widens_bf16(mesh: Mesh) -> bool:
  """Whether steps on ``mesh`` score bf16 rows widened to f32 (``exact_scores``):
  on CPUs, which have no bf16 matmul units to spare."""
  return _on_cpu(mesh)


def tiles_bf16(mesh: Mesh) -> bool:
  """Whether steps on ``mesh`` widen bf16 rows tile by tile; they then take
  bf16 rows as their bits (``ROW_BITS``: no copy of the chunk to slice it)."""
  return _on_cpu(mesh) and cpu_widening() == "tiles"


def _on_cpu(mesh: Mesh) -> bool:
  """Whether ``mesh``'s devices are CPUs (row norms go tile by tile there)."""
  return mesh.devices.flat[0].platform == "cpu"


def _fused_mode(mesh: Mesh) -> str:
  platform = mesh.devices.flat[0].platform
  if platform == "gpu":
    return "gpu"
  if platform == "cpu":
    return "interpret"  # the same kernel, interpreted: for tests
  raise InputError(f"the fused scores kernel is written for GPUs (Triton); "
                   f"this mesh's devices are {platform}")


@functools.lru_cache(maxsize=None)
def step_fn(mesh: Mesh, k: int, rows_sorted: bool, segments=None,
            branch_free: bool = False, fused: bool = False,
            tiles: fused_scores.Tiles = fused_scores.DEFAULT_TILES,
            sets: tuple[int, ...] | None = None):
  """The jitted ``update(state, x, row_ids, valid, queries, diag, lowrank)``:
  ``update_topk`` without its checks and padding (rows a multiple of the
  mesh size). ``x``: ``[rows, d]``, or a tuple of pieces ``[rows / P, d]``
  whose shards are consecutive parts of each device's rows. ``segments``:
  the ``RowMetric``'s, or None for plain scores (``diag`` and ``lowrank``
  are then ignored). ``branch_free``: see ``_pick`` (same results).
  ``fused``: bf16 rows are scored, and their threshold bits set, by the
  ``fused_scores`` kernel (GPU; interpreted on CPU): the same rows and
  order, scores within the same bound (one fp32 sum over the three terms),
  with the kernel's ``tiles``. ``sets``: under a grouped metric
  (``grouped_metric``), the sizes of the query sets laid out one after the
  other in ``queries``, set g scored under metric g."""
  local = _sharded_candidates(
      functools.partial(_local_candidates, k=k, rows_sorted=rows_sorted,
                        segments=segments,
                        widen=widens_bf16(mesh) and not fused,
                        score_tiles=tiles_bf16(mesh) and not fused,
                        tile_norms=_on_cpu(mesh), branch_free=branch_free,
                        fused=_fused_mode(mesh) if fused else None,
                        tiles=tiles, sets=sets),
      mesh, check_vma=not fused)  # pallas_call's outputs carry no vma type

  def update(state: TopKState, x, row_ids, valid, queries, diag=None,
             lowrank=()) -> TopKState:
    if diag is None:
      diag = jnp.zeros((), jnp.float32)
    # Candidates are [Q, devices * k]: the merge all-gathers them, k per
    # device and query, never the scores.
    ps, pr, os_, or_ = local(x, row_ids, valid, queries,
                             state.proponent_scores[:, -1],
                             state.opponent_scores[:, -1], diag, tuple(lowrank))
    return merge_candidates(state, ps, pr, os_, or_, k, branch_free)

  return jit_step(update, mesh, out_shardings=partitioning.replicated(mesh))


def _sharded_candidates(local_fn, mesh: Mesh, check_vma: bool = True):
  """``local_fn(x, row_ids, valid, queries, pro_kth, opp_kth, diag,
  lowrank)`` over ``mesh``: rows (every leaf of ``x``) split over all
  devices, the rest replicated, candidates ``[Q, devices * k]``."""
  rows = partitioning.rows_sharding(mesh).spec
  ids = partitioning.rows_sharding(mesh, ndim=1).spec
  rep = partitioning.replicated(mesh).spec
  candidates = partitioning.every_device_spec(2, axis=1)
  return jax.shard_map(local_fn, mesh=mesh, in_specs=(rows, ids, ids) + (rep,) * 5,
                       out_specs=(candidates,) * 4, check_vma=check_vma)


# A ring's blocks hold a multiple of this many queries: on XLA:CPU a
# query's f32 scores were the same bits in batches of 64, 128 and 256 (and in
# 64-query blocks of 256) but other bits at 2-16 and 65 (d = 1,024, 4,096
# rows, 2026-12-06), so blocks padded to it score as a scan of 64 does.
RING_BLOCK_QUERIES = 64


def ring_queries(num_queries: int, mesh: Mesh) -> int:
  """The queries a ``ring_step_fn`` on ``mesh`` scans for ``num_queries``:
  whole blocks of ``RING_BLOCK_QUERIES`` per device (zero queries pad)."""
  return partitioning.padded_size(num_queries, mesh.size * RING_BLOCK_QUERIES)


@functools.lru_cache(maxsize=None)
def ring_step_fn(mesh: Mesh, k: int, rows_sorted: bool, segments=None,
                 summed: bool = False, sets: tuple[int, ...] | None = None):
  """``step_fn`` (``summed_step_fn`` if ``summed``) with the queries, and
  their running top-k, split over the devices (``partitioning.rows_sharding``:
  block ``i`` of ``Q / P`` on device ``i``) instead of whole on each, and
  the same arguments. Each block visits every device's rows in ``P`` hops
  around a ring (``ppermute``), carrying its top-k, and is home again at
  the end: a device holds ``Q / P`` queries (of each part) and scores
  ``[rows / P, Q / P]`` at a time, and each step moves every block once
  around. Rows, ids and order are a replicated step's; a score is the same
  bits where the blocks score as the replicated batch does
  (``RING_BLOCK_QUERIES``). ``sets``: under a grouped metric, the sizes of
  the query sets laid out one after the other (then zero queries to the
  padded count, scored under set 0 and dropped); a block's queries are
  divided by their own sets' norms, found from where the block started."""
  axes = tuple(mesh.axis_names)
  size = mesh.size
  ring = [(i, (i + 1) % size) for i in range(size)]
  widen, score_tiles = widens_bf16(mesh), tiles_bf16(mesh)
  segments = segments if summed else (segments,)

  def local(state, xs, row_ids, valid, queries, diags, lowranks):
    pieces = [x if isinstance(x, tuple) else (x,) for x in xs]
    # A row's norms are the same for every block: computed once a step.
    norms = [_norms(p, diag, lowrank, seg, widen, _on_cpu(mesh))
             for p, diag, lowrank, seg in zip(pieces, diags, lowranks, segments)]
    owners = None
    if sets is not None:  # each query's set, by the block it is in
      table = np.zeros(size * queries[0].shape[0], np.int32)
      table[:sum(sets)] = np.repeat(np.arange(len(sets)), sets)
      owners = jnp.asarray(table.reshape(size, -1))

    def scored(block, qs, h):  # the block's top-k, with this device's rows in
      # At hop h a device holds the block that started h devices back.
      owner = (None if owners is None
               else owners[(jax.lax.axis_index(axes) - h) % size])
      s = functools.reduce(jnp.add, [  # fp32, in the parts' order
          _scores(p, q, n, widen, score_tiles, owner=owner)
          for p, q, n in zip(pieces, qs, norms)])
      candidates = _candidates(s, row_ids, valid, block.proponent_scores[:, -1],
                               block.opponent_scores[:, -1], k=k,
                               rows_sorted=rows_sorted, branch_free=False)
      return jax.lax.ppermute(merge_candidates(block, *candidates, k), axes, ring)

    def hop(h, carry):
      block, qs = carry
      # Sent before the products, which do not need it: the transfer may
      # overlap them.
      moved = jax.lax.ppermute(qs, axes, ring)
      return scored(block, qs, h), moved

    # P - 1 hops move the queries; the top-k moves P times, home again.
    block, qs = jax.lax.fori_loop(0, size - 1, hop, (state, queries))
    return scored(block, qs, size - 1)

  split = partitioning.rows_sharding(mesh)
  ids = partitioning.rows_sharding(mesh, ndim=1).spec
  rep = partitioning.replicated(mesh).spec
  states = TopKState(*(split.spec,) * 4)
  sharded = jax.shard_map(local, mesh=mesh, out_specs=states, in_specs=(
      states, split.spec, ids, ids, split.spec, rep, rep))
  zero = lambda d: jnp.zeros((), jnp.float32) if d is None else d

  def update(state: TopKState, x, row_ids, valid, queries, diag=None,
             lowrank=()) -> TopKState:
    if summed:  # (xs, row_ids, valids, queries, diags, lowranks): per part
      return sharded(state, tuple(x), row_ids, functools.reduce(
          jnp.logical_and, valid), tuple(queries), tuple(map(zero, diag)),
                     tuple(tuple(l) for l in lowrank))
    return sharded(state, (x,), row_ids, valid, (queries,), (zero(diag),),
                   (tuple(lowrank),))

  return jit_step(update, mesh, out_shardings=TopKState(*(split,) * 4))


@functools.lru_cache(maxsize=None)
def summed_step_fn(mesh: Mesh, k: int, rows_sorted: bool, segments: tuple,
                   sets: tuple[int, ...] | None = None):
  """``step_fn`` for a sum of scores over parts (e.g. one store per
  checkpoint): the jitted ``update(state, xs, row_ids, valids, queries,
  diags, lowranks)``, each a tuple with one entry per part, part ``p``'s
  rows ``xs[p]`` scored against ``queries[p]`` and divided by their norms
  under its own ``RowMetric`` (``segments[p]``, ``diags[p]``,
  ``lowranks[p]``; None: plain scores, its diag and lowrank ignored). A row
  is valid only where it is in every part. ``sets``: as ``step_fn``'s."""
  local = _sharded_candidates(
      functools.partial(_local_summed_candidates, k=k, rows_sorted=rows_sorted,
                        segments=segments, widen=widens_bf16(mesh),
                        score_tiles=tiles_bf16(mesh),
                        tile_norms=_on_cpu(mesh), sets=sets), mesh)

  def update(state: TopKState, xs, row_ids, valids, queries, diags,
             lowranks) -> TopKState:
    valid = functools.reduce(jnp.logical_and, valids)
    diags = tuple(jnp.zeros((), jnp.float32) if d is None else d for d in diags)
    ps, pr, os_, or_ = local(tuple(xs), row_ids, valid, tuple(queries),
                             state.proponent_scores[:, -1],
                             state.opponent_scores[:, -1], diags,
                             tuple(tuple(l) for l in lowranks))
    return merge_candidates(state, ps, pr, os_, or_, k)

  return jit_step(update, mesh, out_shardings=partitioning.replicated(mesh))


def init_topk(num_queries: int, k: int, mesh: Mesh | None = None,
              split: bool = False) -> TopKState:
  """An empty running top-k for ``num_queries`` queries, replicated on
  ``mesh`` (``split``: split over its devices, for ``ring_step_fn``)."""
  if k < 1 or num_queries < 1:
    raise InputError(f"k and num_queries must be >= 1, got k={k}, "
                     f"num_queries={num_queries}")
  mesh = _mesh(mesh)
  if split and num_queries % mesh.size:
    raise InputError(f"num_queries: {num_queries} split over the mesh's "
                     f"{mesh.size} devices; expected a multiple of "
                     f"{mesh.size} (topk.ring_queries pads to one)")
  return _init_fn(mesh, int(num_queries), int(k), bool(split))()


def update_topk(state: TopKState, chunk_encodings, chunk_row_ids, queries,
                valid_mask=None, *, mesh: Mesh | None = None,
                rows_sorted: bool = False,
                metric: RowMetric | None = None,
                split: bool = False) -> TopKState:
  """Folds one chunk into the running top-k.

  Args:
    state: from ``init_topk`` or a previous ``update_topk``.
    chunk_encodings: ``[rows, d]`` bf16, int8 or f32; rows are split over every
      device of ``mesh`` (padded here if not divisible).
    chunk_row_ids: int ``[rows]`` global row ids (< 2**31 - 1, unique).
    queries: f32 ``[Q, d]``, replicated.
    valid_mask: bool ``[rows]``; False rows never enter the top-k.
    mesh: default ``partitioning.make_mesh()``.
    rows_sorted: promise that row ids increase along the chunk with invalid
      rows last, which skips a per-device sort.
    metric: scan-time preconditioning (``RowMetric``); ``queries`` are then
      ``R^(-1) q / ||q||_R`` in the rows' coordinates.
    split: ``state`` (``init_topk(split=True)``) and ``queries`` (on
      ``partitioning.rows_sharding``, Q a multiple of the devices) are split
      over the devices (``ring_step_fn``).

  Under ``jax.distributed`` pass global ``jax.Array``s (e.g. from
  ``jax.make_array_from_process_local_data``).

  Returns:
    The new state (inputs are not donated).
  """
  mesh = _mesh(mesh)
  rows = chunk_encodings.shape[0]
  if valid_mask is None:
    valid_mask = jnp.ones((rows,), bool)
  pad = partitioning.padded_size(rows, mesh.size) - rows
  if pad:
    chunk_encodings = jnp.pad(chunk_encodings, ((0, pad), (0, 0)))
    chunk_row_ids = jnp.pad(chunk_row_ids, (0, pad))
    valid_mask = jnp.pad(valid_mask, (0, pad))
  if chunk_encodings.dtype not in (jnp.bfloat16, jnp.int8, jnp.float32):
    chunk_encodings = jnp.asarray(chunk_encodings, jnp.float32)
  k = state.proponent_scores.shape[1]
  step = ring_step_fn if split else step_fn
  if metric is None:
    return step(mesh, k, rows_sorted)(
        state, chunk_encodings, chunk_row_ids, valid_mask, queries)
  return step(mesh, k, rows_sorted, metric.segments)(
      state, chunk_encodings, chunk_row_ids, valid_mask, queries, metric.diag,
      metric.lowrank)


def finish(state: TopKState, rows_seen: int) -> TopK:
  """Host copy of the running top-k, ``min(k, rows_seen)`` columns; a slot
  with no row (padding, a NaN score) holds ``INVALID_ROW``."""
  n = min(state.proponent_scores.shape[1], rows_seen)

  def host(a):
    if not a.sharding.is_fully_replicated:  # split over devices: gathered
      return partitioning.fetch(a)[:, :n]
    # Replicated: one addressable shard is the whole array, on every process.
    return np.asarray(a.addressable_data(0))[:, :n]

  pro_scores, opp_scores = host(state.proponent_scores), host(state.opponent_scores)
  # A slot holding an unfilled side's key (a NaN score's, or a score of that
  # infinity) lists no row, so a NaN row is never ranked however large k is.
  return TopK(np.where(pro_scores == -np.inf, INVALID_ROW,
                       host(state.proponent_rows)).astype(np.int64),
              pro_scores,
              np.where(opp_scores == np.inf, INVALID_ROW,
                       host(state.opponent_rows)).astype(np.int64),
              opp_scores)


@jax.jit
def flatten_stepped(x, row_ids, valid):
  # [steps, step] -> [step * steps] keeps each device's positions together
  # (step is the axis split over devices), so no row changes device.
  flat = lambda a: jnp.swapaxes(a, 0, 1).reshape(-1, *a.shape[2:])
  return flat(x), flat(row_ids), flat(valid), jnp.sum(valid)


