"""The fused scores-and-bits kernel (``tracer.fused_scores``), interpreted on
the CPU, against numpy; and its lowering to Triton for CUDA."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tracer import fused_scores, topk
from tests.test_scan import (MESHES, _hard_queries, assert_same, reference,
                             stepped_scan)


def _words(s, valid, pro, opp):
  """numpy's bit words of scores ``s [r, Q]``: ``[r / 16, 2Q]``."""
  bits = (np.uint64(1) << (np.arange(len(s)) % 16).astype(np.uint64))[:, None]
  side = lambda hit: ((valid[:, None] & hit) * bits).reshape(-1, 16, s.shape[1]).sum(1)
  return np.concatenate([side(s >= pro), side(s <= opp)], axis=1).astype(np.uint32)


@pytest.mark.parametrize("dim,num_queries,metric,tiles", [
    (200, 7, False, fused_scores.DEFAULT_TILES), (64, 70, True, fused_scores.DEFAULT_TILES),
    (200, 7, False, fused_scores.Tiles(rows=256, dim=128, num_warps=8, num_stages=4))])
def test_kernel_scores_within_bound_and_words_exact(dim, num_queries, metric, tiles):
  # Scores: the exact dot products of the bf16 rows with fp32 queries whose 24
  # significand bits all count, within one fp32 sum over the 3d products of
  # the three terms. Bits: exactly numpy's from those scores, with invalid
  # rows, a NaN row, a -0.0 against a threshold of 0.0, padded queries (7 and
  # 70 are no multiples of 16 or 64) and a last, partial contraction tile;
  # under the default tiles and larger ones (launch.benchmark_scan
  # --fused_tiles times them).
  rng = np.random.default_rng(0)
  rows = 256
  x = (rng.standard_normal((rows, dim)) * 2.0 ** rng.integers(-8, 9, (rows, dim))
       ).astype(ml_dtypes.bfloat16)
  x[5] = np.nan
  x[6] = 0.0
  q = _hard_queries(num_queries, dim, 1)
  q[0, 0] = -1.0  # row 6 scores -0.0 or 0.0 against every query
  valid = rng.random(rows) > 0.2
  exact = np.asarray(x, np.float64) @ np.asarray(q, np.float64).T
  bound = 3 * dim * 2.0 ** -24 * (np.abs(np.asarray(x, np.float64))
                                  @ np.abs(np.asarray(q, np.float64)).T)
  norms = None
  if metric:
    norms = (rng.random(rows) + 0.5).astype(np.float32)
    exact, bound = exact / norms[:, None], bound / norms[:, None]
  pro = np.nanquantile(exact, 0.9, axis=0).astype(np.float32)
  opp = np.nanquantile(exact, 0.1, axis=0).astype(np.float32)
  pro[1], opp[2] = 0.0, 0.0
  s, words = fused_scores.scores_and_words(
      jnp.asarray(x), topk.bf16_terms(jnp.asarray(q)), jnp.asarray(pro),
      jnp.asarray(opp), jnp.asarray(valid),
      None if norms is None else jnp.asarray(norms), interpret=True, tiles=tiles)
  s, words = np.asarray(s), np.asarray(words)
  ok = ~np.isnan(exact)
  assert np.isnan(s[5]).all() and ok[np.arange(rows) != 5].all()
  assert np.all(np.abs(s[ok] - exact[ok]) <= bound[ok])
  np.testing.assert_array_equal(words, _words(s, valid, pro, opp))
  assert words.any() and (words != np.uint32(0xFFFF)).any()


def test_unsupported_shapes_and_tiles_are_refused():
  # Tiles Triton cannot lower, and zero rows, are not "supported"; the kernel
  # itself refuses what is not (it returned NaN scores and zero words for
  # rows no tile divides).
  Tiles = fused_scores.Tiles
  assert fused_scores.supported(256, 64, jnp.bfloat16)
  for rows, dim, dtype, tiles in [
      (0, 64, jnp.bfloat16, Tiles()), (200, 64, jnp.bfloat16, Tiles()),
      (256, 32, jnp.bfloat16, Tiles()), (256, 64, jnp.float32, Tiles()),
      (240, 64, jnp.bfloat16, Tiles(rows=48)), (256, 64, jnp.bfloat16, Tiles(dim=48)),
      (256, 64, jnp.bfloat16, Tiles(rows=0)), (256, 64, jnp.bfloat16, Tiles(dim=0)),
      (256, 64, jnp.bfloat16, Tiles(rows=8)), (256, 64, jnp.bfloat16, Tiles(dim=8))]:
    assert not fused_scores.supported(rows, dim, dtype, tiles), (rows, dim, dtype, tiles)
  x = jnp.zeros((200, 64), jnp.bfloat16)
  q = jnp.zeros((2, 64), jnp.float32)
  with pytest.raises(ValueError, match=r"\[200, 64\] bfloat16 rows with Tiles\(rows=128"):
    fused_scores.scores_and_words(x, topk.bf16_terms(q), jnp.zeros(2), jnp.zeros(2),
                                  jnp.ones(200, bool), interpret=True)


def _integer_data(rng, n: int, k: int, nan_rows):
  """bf16 rows ``[n, 64]`` and 5 queries of small integers (scores exact), NaN
  rows, and numpy's top-k, which skips them."""
  x = rng.integers(-20, 21, (n, 64)).astype(np.float32)
  q = rng.integers(-2, 3, (5, 64)).astype(np.float32)
  x[nan_rows] = np.nan
  ok = np.setdiff1d(np.arange(n), nan_rows)
  want = reference(x[ok], q, k)
  return x.astype(ml_dtypes.bfloat16), q, want._replace(
      proponent_rows=ok[want.proponent_rows], opponent_rows=ok[want.opponent_rows])


@pytest.mark.parametrize("mesh,step,k", [("1x1", 4096, 32), ("8x1", 16384, 16)])
def test_fused_step_gives_the_same_top_k(mesh, step, k):
  # The step with the kernel (interpreted here) against numpy: integer scores
  # with ties at the top, NaN rows, a partial last step (invalid rows) and
  # enough steps to reach the fast paths (compaction).
  rng = np.random.default_rng(7)
  n = 40_000
  x, q, want = _integer_data(rng, n, k, [3, 9_000])
  m = MESHES[mesh]()
  assert topk._block_size(step // m.size, k) is not None
  assert fused_scores.supported(step // m.size, 64, jnp.bfloat16)
  update = topk.step_fn(m, k, True, fused=True)
  assert_same(stepped_scan(update, m, x, q, k, step), want, atol=0)


def test_fused_step_with_a_row_metric_matches_the_plain_step():
  # Scan-time preconditioning: the kernel divides by the rows' norms before
  # setting the bits. Same rows as the XLA step, scores within the bound.
  rng = np.random.default_rng(3)
  n, d, k = 2048, 96, 10
  x = rng.standard_normal((n, d)).astype(ml_dtypes.bfloat16)
  q = rng.standard_normal((3, d)).astype(np.float32)
  diag = jnp.asarray(rng.random(d) + 1.0, jnp.float32)
  lowrank = (jnp.asarray(rng.standard_normal((64, 4)) * 0.1, jnp.float32),)
  segments = ((16, 80),)
  m = MESHES["1x1"]()
  results = []
  for fused in (False, True):
    update = topk.step_fn(m, k, True, segments, fused=fused)
    state = topk.init_topk(len(q), k, m)
    for lo in range(0, n, 1024):
      ids = np.arange(lo, lo + 1024, dtype=np.int32)
      state = update(state, jnp.asarray(x[lo:lo + 1024]), jnp.asarray(ids),
                     jnp.ones(1024, bool), jnp.asarray(q), diag, lowrank)
    results.append(topk.finish(state, n))
  assert_same(results[1], results[0], atol=1e-5)


@pytest.mark.parametrize("metric", [False, True])
def test_kernel_lowers_to_triton_for_cuda(metric):
  # Pallas accepts the kernel for a GPU (Triton IR inside the custom call),
  # checked without one: the shapes of a resident scan step and of a d that
  # is no multiple of the tile.
  for rows, dim, num_queries in [(262_144, 1024, 64), (1024, 65_406, 70)]:
    text = fused_scores.lower_for_gpu(rows, dim, num_queries, metric)
    assert "__gpu$xla.gpu.triton" in text
    assert "tracer_scores_and_words" in text
