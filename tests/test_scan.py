"""Tests for tracer.scan: exact sharded top-k against numpy.

Run as a script (``python tests/test_scan.py worker ...``) this file is also
the worker of the two-process ``jax.distributed`` test.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tracer import memory
from tracer import partitioning
from tracer import scan
from tracer.errors import CorruptStoreError
from tracer import topk
from tracer import store as store_lib
from tracer.errors import InputError

import multiprocess  # tests/ is on sys.path (pytest rootdir, or the script's dir)

K = 5


def reference(x, q, k):
  """Numpy top-k: full score matrix, ties to the lower row (stable sort)."""
  s = (np.asarray(x, np.float64) @ np.asarray(q, np.float64).T).T  # [Q, N]
  rows = np.arange(s.shape[1])
  pro = np.stack([np.lexsort((rows, -si))[:k] for si in s])
  opp = np.stack([np.lexsort((rows, si))[:k] for si in s])
  return scan.TopK(pro, np.take_along_axis(s, pro, 1),
                   opp, np.take_along_axis(s, opp, 1))


def assert_same(got: scan.TopK, want: scan.TopK, atol=1e-5):
  np.testing.assert_array_equal(got.proponent_rows, want.proponent_rows)
  np.testing.assert_array_equal(got.opponent_rows, want.opponent_rows)
  np.testing.assert_allclose(got.proponent_scores, want.proponent_scores,
                             atol=atol, rtol=0)
  np.testing.assert_allclose(got.opponent_scores, want.opponent_scores,
                             atol=atol, rtol=0)
  assert got.proponent_rows.dtype == np.int64
  assert got.proponent_scores.dtype == np.float32


def _data(n, d=16, q=3, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((n, d)).astype(np.float32),
          rng.standard_normal((q, d)).astype(np.float32))


def _tied(n, d=8, q=4, seed=0):
  """Small integers: every sum is exact in fp32, so equal rows tie exactly."""
  rng = np.random.default_rng(seed)
  base = rng.integers(-2, 3, (max(1, n // 6), d))
  x = base[rng.integers(0, len(base), n)].astype(np.float32)
  return x, rng.integers(-2, 3, (q, d)).astype(np.float32)


MESHES = {
    "8x1": lambda: partitioning.make_mesh(8, 1),
    "4x2": lambda: partitioning.make_mesh(4, 2),
    "1x1": lambda: partitioning.make_mesh(1, 1, devices=jax.devices()[:1]),
}


def test_a_process_past_half_its_map_limit_drops_its_programs(monkeypatch):
  """Scans of ever new shapes in one process (a long ``tracer serve``, a
  ``tracer family`` of many sets): each compiled step keeps memory maps
  (75-190 on 8 CPU devices) while jit caches it, and a process at Linux's
  limit crashes. Past half the limit a scan first drops every program."""
  if memory.memory_maps() is None:
    pytest.skip("no /proc/self/maps")
  start, held = memory.memory_maps(), []
  for d in range(20, 20 + 8 * 12, 8):  # 12 shapes (d = 20: no other test's)
    x, q = _data(300, d=d, q=2, seed=d)
    assert_same(scan.scan_arrays(x, q, K), reference(x, q, K), atol=1e-4)
    held.append(memory.memory_maps())
    if len(held) == 1:  # half the limit 3 scans' maps from here
      one = held[0] - start
      limit = 2 * (held[0] + 3 * one)
      monkeypatch.setattr(memory, "map_limit", lambda: limit, raising=False)
  # (the scan that crossed the half keeps its own step; kept, the 12 would
  # take 11 scans' past the first)
  assert one > 0 and max(held) <= limit // 2 + 2 * one, (one, limit, held)
  assert any(b < a for a, b in zip(held, held[1:])), held


@pytest.mark.parametrize("mesh", sorted(MESHES))
@pytest.mark.parametrize("n", [1, 7, 1001])
def test_arrays_match_numpy(mesh, n):
  x, q = _data(n)
  got = scan.scan_arrays(x, q, K, mesh=MESHES[mesh](), chunk_rows=96)
  assert got.proponent_rows.shape == (3, min(n, K))
  assert_same(got, reference(x, q, K))


@pytest.mark.parametrize("mesh", ["8x1", "1x1"])
def test_large_chunk_two_stage_selection(mesh):
  # Big per-device chunks take _select_rows' two-stage selection.
  x, q = _data(8192, d=8, q=2, seed=1)
  assert topk._block_size(8192 // MESHES[mesh]().size, 4) is not None
  got = scan.scan_arrays(x, q, 4, mesh=MESHES[mesh](), chunk_rows=8192)
  assert_same(got, reference(x, q, 4))


@pytest.mark.parametrize("rows,k", [(37, 3), (1000, 4), (4096, 7), (4096, 50),
                                    (16384, 100)])
def test_select_rows_equals_top_k_with_ties(rows, k):
  v = np.random.default_rng(rows).integers(-3, 4, (rows, 5)).astype(np.float32)
  v[:, 0] = -np.inf  # all tied at the bottom
  rid = jnp.arange(rows, dtype=jnp.int32) + 7
  got_v, got_r = jax.jit(topk._select_rows, static_argnums=3)(
      jnp.asarray(v), rid, jnp.full((5,), -jnp.inf), k)
  want_v, want_i = jax.lax.top_k(jnp.asarray(v.T), k)
  np.testing.assert_array_equal(got_v, want_v)
  np.testing.assert_array_equal(got_r, np.asarray(want_i) + 7)


def _by_rank(v, r):
  """Each query's (value, row) pairs ordered by value descending, ties to
  the lower row, as numpy arrays."""
  v, r = np.asarray(v), np.asarray(r)
  o = np.stack([np.lexsort((ri, -vi)) for vi, ri in zip(v, r)])
  return np.take_along_axis(v, o, 1), np.take_along_axis(r, o, 1)


def _assert_candidates(v, r, vals, rid0, threshold):
  """``(v, r) [Q, k]`` from ``_select_rows(vals [n, Q], rid0 + arange(n),
  threshold)``: every element >= the threshold, or the top k of them (and
  no pair twice); the other slots real (value, row) pairs or padding."""
  v, r = np.asarray(v), np.asarray(r)
  for qi in range(v.shape[0]):
    above = np.nonzero(vals[:, qi] >= threshold[qi])[0]
    above = above[np.lexsort((above, -vals[above, qi]))][:v.shape[1]]
    want = set(above + rid0)
    real = r[qi] != topk.INVALID_ROW
    assert len(set(r[qi][real])) == real.sum()
    assert want <= set(r[qi][real])
    np.testing.assert_array_equal(v[qi][real], vals[r[qi][real] - rid0, qi])
    assert np.all(v[qi][~real] == -np.inf)


@pytest.mark.parametrize("above,clustered", [(5, False), (12, False),
                                             (20, False), (40, False),
                                             (100, False), (150, False),
                                             (300, False), (60, True),
                                             (230, True), (300, True)])
def test_select_rows_fast_path(above, clustered):
  rows, q, k = 16384, 5, 100
  rng = np.random.default_rng(above)
  vals = np.stack([rng.permutation(rows) for _ in range(q)], 1).astype(
      np.float32)
  if clustered:  # the top values sit in a few adjacent blocks
    vals[vals >= rows - above] = -1
    vals[1000:1000 + above] = np.arange(rows - above, rows)[::-1, None]
  assert topk._block_size(rows, k) is not None
  rid = jnp.arange(rows, dtype=jnp.int32) + 1000
  want_v, want_i = jax.lax.top_k(jnp.asarray(vals.T), k)
  # `above` elements per query reach the threshold: compacted (16 to k of
  # them, in position order; up to 2k, then a top-k), one top-k of the few
  # groups that hold them (230 or 300 adjacent), or the slow path (300).
  threshold = np.asarray(rows - above, np.float32).repeat(q)
  v, r = jax.jit(topk._select_rows, static_argnums=3)(
      jnp.asarray(vals), rid, jnp.asarray(threshold), k)
  n = min(above, k)
  got_v, got_r = _by_rank(v, r)
  np.testing.assert_array_equal(got_v[:, :n], want_v[:, :n])
  np.testing.assert_array_equal(got_r[:, :n], np.asarray(want_i)[:, :n] + 1000)
  _assert_candidates(v, r, vals, 1000, threshold)


@pytest.mark.parametrize("threes,clustered", [(5, False), (12, False),
                                             (30, False), (60, False),
                                             (150, False), (200, True),
                                             (300, True), (None, False)])
def test_select_rows_fast_paths_with_ties(threes, clustered):
  # Up to `threes` elements per query equal the threshold (3.0), all tied;
  # -inf marks excluded rows (NaN scores). Every path (compaction levels,
  # one top-k of the 19 groups that hold 300 adjacent 3s) keeps each
  # element >= the threshold, or the first k by row; at a threshold of -inf
  # (None) the result is top_k itself.
  rows, q, k = 16384, 6, 100
  rng = np.random.default_rng(threes or 0)
  vals = rng.integers(-3, 3, (rows, q)).astype(np.float32)
  vals[rng.random((rows, q)) < 0.1] = -np.inf
  for j in range(q):
    n = (threes or 30) if j == 0 else rng.integers(1, (threes or 30) + 1)
    at = (rng.integers(0, rows - n) + np.arange(n) if clustered else
          rng.choice(rows, n, replace=False))
    vals[at, j] = 3.0
  threshold = np.full(q, 3.0 if threes else -np.inf, np.float32)
  rid = jnp.arange(rows, dtype=jnp.int32) + 5
  v, r = jax.jit(topk._select_rows, static_argnums=3)(
      jnp.asarray(vals), rid, jnp.asarray(threshold), k)
  _assert_candidates(v, r, vals, 5, threshold)
  if threes is None:
    want_v, want_i = jax.lax.top_k(jnp.asarray(vals.T), k)
    np.testing.assert_array_equal(v, want_v)
    np.testing.assert_array_equal(r, np.asarray(want_i) + 5)


@pytest.mark.parametrize("density", [0.0, 0.001, 0.01, 0.2, 1.0])
def test_compaction_finds_the_first_set_bits(density):
  # _compact (words of GROUP bits), _count_at_most and _select_bit against
  # numpy.
  rng = np.random.default_rng(int(density * 1000))
  group = topk.GROUP
  bits = rng.random((7, 1000, group)) < density
  bits[3] = False  # a query with none
  bits[4] = False
  bits[4, -1, -1] = True  # only the very last position
  words = (bits * (np.uint64(1) << np.arange(group, dtype=np.uint64))).sum(
      2).astype(np.uint32)
  for c in (1, 8, 64, 200):
    got = np.asarray(jax.jit(topk._compact, static_argnums=1)(
        jnp.asarray(words.T), c))  # [G, Q]
    for qi in range(7):
      want = np.nonzero(bits[qi].reshape(-1))[0][:c]
      np.testing.assert_array_equal(got[qi, :len(want)], want)
      assert np.all(got[qi, len(want):] == 1000 * group)
  for size in (5, 32, 64, 100, 2048):  # counts in sorted lists, by segments
    ends = np.sort(rng.integers(0, 300, (3, size)), axis=1).astype(np.int32)
    got = np.asarray(topk._count_at_most(jnp.asarray(ends), 310))
    want = (ends[:, None, :] <= np.arange(310)[:, None]).sum(2)
    np.testing.assert_array_equal(got, want)
  r = rng.integers(0, 32, 1000)
  words = rng.integers(0, 2**32, 1000, dtype=np.uint64)
  words |= np.uint64(1) << r.astype(np.uint64)  # at least r + 1 bits set...
  words = np.where([bin(w).count("1") > ri for w, ri in zip(words, r)], words,
                   np.uint64(2**32 - 1)).astype(np.uint32)  # ...or all 32
  got = np.asarray(topk._select_bit(jnp.asarray(words),
                                    jnp.asarray(r, jnp.int32)))
  want = [np.nonzero([(w >> i) & 1 for i in range(32)])[0][ri]
          for w, ri in zip(words, r)]
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("rank", [3, 20, 50, 90, 150, 300, None])
def test_select_both_keeps_every_element_that_reaches_the_threshold(rank):
  # Scores with ties, NaNs, -0.0 and invalid rows; thresholds that `rank`
  # or more elements reach (ties): the compaction levels, the slow path,
  # or none (-inf / +inf: exactly top_k).
  rows, q, k = 16384, 8, 100
  rng = np.random.default_rng(rank or 0)
  s = np.round(rng.standard_normal((rows, q)) * 64) / 64
  s[:, 0] = -np.abs(s[:, 0]) - 1
  s[rng.choice(rows, 3, replace=False), 0] = 0.0  # query 0: a threshold
  s[rng.choice(rows, 3, replace=False), 0] = -0.0  # of 0.0 ties with -0.0
  s[rng.random((rows, q)) < 0.01] = np.nan
  s = s.astype(np.float32)
  valid = rng.random(rows) < 0.9
  rid = np.where(valid, np.arange(rows) + 3, topk.INVALID_ROW).astype(np.int32)
  ok = valid[:, None] & ~np.isnan(s)
  pro_keys = np.where(ok, s + 0.0, -np.inf).astype(np.float32)  # -0.0 -> 0.0
  opp_keys = np.where(ok, -s + 0.0, -np.inf).astype(np.float32)
  if rank is None:
    pro_kth, opp_kth = np.full(q, -np.inf), np.full(q, np.inf)
  else:
    pro_kth = -np.sort(-pro_keys, axis=0)[rank - 1]
    opp_kth = np.sort(-opp_keys, axis=0)[rank - 1]
    pro_kth[0] = 0.0
  pv, pr, ov, orow = jax.jit(topk._select_both, static_argnums=5)(
      jnp.asarray(s), jnp.asarray(valid), jnp.asarray(rid),
      jnp.asarray(pro_kth, jnp.float32), jnp.asarray(opp_kth, jnp.float32), k)
  for got in (pv, ov):  # -0.0 and 0.0 tie: only 0.0 is reported
    assert not np.any(np.signbit(got) & (np.asarray(got) == 0))
  for v, r, keys, t in ((pv, pr, pro_keys, pro_kth),
                        (-np.asarray(ov), orow, opp_keys, -opp_kth)):
    if rank is None:
      want_v, want_i = jax.lax.top_k(jnp.asarray(keys.T), k)
      np.testing.assert_array_equal(v, want_v)
      np.testing.assert_array_equal(r, rid[np.asarray(want_i)])
    else:  # invalid rows are never candidates
      _assert_candidates(v, r, np.where(valid[:, None], keys, -np.inf), 3, t)


@pytest.mark.parametrize("mesh", ["8x1", "1x1"])
def test_many_chunks_take_the_fast_levels(mesh):
  # k = 64 > 2 * 32: later chunks qualify for the top-8 and top-32 levels.
  x, q = _tied(20000, seed=4)
  x += np.random.default_rng(4).standard_normal(x.shape).astype(np.float32) * (
      np.arange(20000)[:, None] % 3 == 0)
  got = scan.scan_arrays(x, q, 64, mesh=MESHES[mesh](), chunk_rows=512)
  assert_same(got, reference(x, q, 64))


def _integers_with_nan_rows(rng, n: int, k: int, nan_rows):
  """Rows ``[n, 8]`` and 4 queries of small integers (scores exact in fp32,
  ties at the top), NaN at ``nan_rows``, and numpy's top-k, which skips them."""
  x = rng.integers(-50, 51, (n, 8)).astype(np.float32)
  q = rng.integers(-3, 4, (4, 8)).astype(np.float32)
  x[nan_rows] = np.nan
  ok = np.setdiff1d(np.arange(n), nan_rows)
  want = reference(x[ok], q, k)
  return x, q, want._replace(proponent_rows=ok[want.proponent_rows],
                             opponent_rows=ok[want.opponent_rows])


@pytest.mark.parametrize("mesh,chunk_rows", [("1x1", 8192), ("8x1", 65536)])
def test_large_scan_takes_the_fast_paths(mesh, chunk_rows):
  # 8192 rows per device and step: the two-stage selection, and from the
  # second step on a threshold few rows reach (compaction, narrow merges).
  # Integer scores are exact in fp32, with ties at the top; NaN rows never
  # enter. Unsorted batches (device arrays) and the last, partial chunk
  # (invalid rows) too.
  rng = np.random.default_rng(11)
  n, k = 100_000, 64
  x, q, want = _integers_with_nan_rows(rng, n, k, [7, 50_000])
  assert topk._block_size(8192, k) is not None
  m = MESHES[mesh]()
  assert_same(scan.scan_arrays(x, q, k, mesh=m, chunk_rows=chunk_rows), want,
              atol=0)
  scanner = scan.StreamingScanner(q, k, mesh=m)
  order = rng.permutation(n)
  for batch in np.array_split(order, -(-n // chunk_rows)):
    scanner.add(jnp.asarray(x[batch]), jnp.asarray(batch))
  assert_same(scanner.result(), want, atol=0)


@pytest.mark.parametrize("mesh", ["1x1", "8x1"])
def test_branch_free_step_gives_the_same_top_k(mesh):
  # The accelerators' candidate (fixed shapes, no lax.switch): the two-stage
  # selection and a sorted merge at every step. Integer scores (ties at the
  # top), NaN rows and a partial last step (invalid rows), against numpy.
  n, k, step = 40_000, 64, 8192
  x, q, want = _integers_with_nan_rows(np.random.default_rng(5), n, k, [3, 30_000])
  m = MESHES[mesh]()
  update = topk.step_fn(m, k, True, branch_free=True)
  assert_same(stepped_scan(update, m, x, q, k, step), want, atol=0)


def stepped_scan(update, m, x, q, k: int, step: int) -> scan.TopK:
  """``x`` folded in by ``update`` (a ``topk.step_fn``) ``step`` rows at a
  time on mesh ``m``; the last step padded with invalid rows (NaN rows stay
  valid: the selection drops them)."""
  n = len(x)
  rows, ids = partitioning.rows_sharding(m), partitioning.rows_sharding(m, ndim=1)
  queries = partitioning.put_global(q, partitioning.replicated(m))
  state = topk.init_topk(len(q), k, m)
  for lo in range(0, n, step):
    chunk = np.zeros((step, x.shape[1]), x.dtype)
    chunk[:min(step, n - lo)] = x[lo:lo + step]
    row_ids = np.arange(lo, lo + step, dtype=np.int32)
    state = update(state, jax.device_put(chunk, rows), jax.device_put(row_ids, ids),
                   jax.device_put(row_ids < n, ids), queries)
    # One step in flight, as tracer.scan keeps it: a queue of dispatched
    # steps with collectives can deadlock XLA:CPU's simulated devices.
    jax.block_until_ready(state)
  return topk.finish(state, n)


@pytest.mark.parametrize("mesh", ["8x1", "4x2"])
@pytest.mark.parametrize("chunk_rows,k", [(40, 10), (4096, 10), (256, 300)])
def test_ties_go_to_lower_row(mesh, chunk_rows, k):
  x, q = _tied(997)
  want = reference(x, q, k)
  # The test data really has ties inside and at the top-k boundary.
  s = q @ x.T
  assert len(np.unique(s[0])) < 30
  got = scan.scan_arrays(x, q, k, mesh=MESHES[mesh](), chunk_rows=chunk_rows)
  assert_same(got, want, atol=0)


def test_bf16_arrays_use_bf16_values_exactly():
  x, q = _data(501, d=64, q=5)
  xb = x.astype(ml_dtypes.bfloat16)
  got = scan.scan_arrays(xb, q, K, chunk_rows=128)
  assert_same(got, reference(xb.astype(np.float32), q, K))


def _hard_queries(q: int, d: int, seed: int) -> np.ndarray:
  """fp32 queries with all 24 significand bits in use and magnitudes spread
  over 2^-20..2^20: any rounding of a query to bf16 (8 bits) would show."""
  rng = np.random.default_rng(seed)
  mant = rng.integers(1 << 23, 1 << 24, (q, d)).astype(np.float64) / (1 << 23)
  signs = rng.choice([-1.0, 1.0], (q, d))
  return (signs * mant * 2.0 ** rng.integers(-20, 21, (q, d))).astype(np.float32)


def _stored_rows(dtype: str, n: int, d: int, seed: int) -> np.ndarray:
  """Rows as a store holds them: int8 values, or bf16 over 17 binades."""
  rng = np.random.default_rng(seed)
  if dtype == "int8":
    return rng.integers(-127, 128, (n, d)).astype(np.int8)
  return (rng.standard_normal((n, d)) * 2.0 ** rng.integers(-8, 9, (n, d))
          ).astype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("widen", [True, False])
def test_scores_are_fp32_dot_products_of_the_stored_values(dtype, widen):
  # Both ways of scoring bf16 rows (widened on CPU; three bf16 products on
  # GPU/TPU) give the exact dot products of the bf16 values with the fp32
  # queries, up to fp32 accumulation: within d * 2^-24 * sum|x_i q_i|.
  # int8 rows (an int8 store's) take the same two paths, converted exactly;
  # a scan of them is the scan of their values.
  d = 256
  x = _stored_rows(dtype, 300, d, 0)
  q = _hard_queries(7, d, 1)
  exact = np.asarray(x, np.float64) @ np.asarray(q, np.float64).T
  bound = d * 2.0 ** -24 * (np.abs(np.asarray(x, np.float64))
                            @ np.abs(np.asarray(q, np.float64)).T)
  fn = topk.jit_step(lambda x, q: topk.exact_scores(x, q, widen),
                     partitioning.make_mesh())
  got = np.asarray(fn(jnp.asarray(x), jnp.asarray(q)), np.float64)
  assert np.all(np.abs(got - exact) <= bound)
  # The queries are hard: rounding them to bf16 breaks the bound.
  rounded = np.asarray(x, np.float64) @ np.asarray(
      q.astype(ml_dtypes.bfloat16), np.float64).T
  assert np.any(np.abs(rounded - exact) > bound)
  tol = d * 2.0 ** -24 * np.max(np.abs(exact))
  assert_same(scan.scan_arrays(x, q, K, chunk_rows=64),
              reference(x.astype(np.float32), q, K), atol=tol)


@pytest.mark.parametrize("mesh", sorted(MESHES))
@pytest.mark.parametrize("chunk_rows", [64, 1000])
def test_bf16_scan_equals_the_scan_of_its_widened_rows(mesh, chunk_rows):
  # Rows, order and scores do not depend on the storage dtype, the mesh or
  # the chunk size; where bf16 rows are widened (CPU) the scores are the f32
  # scan's bit for bit.
  x, _ = _data(1001, d=64, q=1, seed=3)
  q = _hard_queries(4, 64, 2)
  xb = x.astype(ml_dtypes.bfloat16)
  want = reference(xb.astype(np.float32), q, 20)
  m = MESHES[mesh]()
  got = scan.scan_arrays(xb, q, 20, mesh=m, chunk_rows=chunk_rows)
  wide = scan.scan_arrays(xb.astype(np.float32), q, 20, mesh=m,
                          chunk_rows=chunk_rows)
  tol = 64 * 2.0 ** -24 * np.max(np.abs(want.proponent_scores))
  assert_same(got, want, atol=tol)
  assert_same(wide, want, atol=tol)
  if topk.widens_bf16(m):
    np.testing.assert_array_equal(got.proponent_scores, wide.proponent_scores)
    np.testing.assert_array_equal(got.opponent_scores, wide.opponent_scores)


def test_widening_is_exact_for_every_bf16_value():
  # The tiles' widening shifts bf16 bits into the top of an f32: every one of
  # the 65,536 bf16 values, NaNs, infinities and subnormals included, is the
  # f32 whose top half it is.
  bits = np.arange(1 << 16, dtype=np.uint16)
  got = jax.jit(topk._widened)(jnp.asarray(bits.view(ml_dtypes.bfloat16)))
  np.testing.assert_array_equal(np.asarray(got).view(np.uint32),
                                bits.astype(np.uint32) << 16)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8", "float32"])
def test_tiles_give_each_row_the_whole_chunks_score(dtype):
  # Where a CPU step widens bf16 (and int8) rows tile by tile
  # (``topk.cpu_widening``), bf16 rows may arrive as their bits; a resident
  # index (``tracer.serving``) holds f32 rows as bits too. Every row's
  # score is the one the whole chunk's f32 matmul of its widened values
  # gives, bit for bit: any tile size, a partial last tile, fewer rows than
  # a tile.
  d = 96
  x = _stored_rows("bfloat16" if dtype == "float32" else dtype, 300, d, 4)
  x = x.astype(np.float32) * 1.0001 if dtype == "float32" else x  # all 24 bits
  q = jnp.asarray(_hard_queries(5, d, 3))
  whole = np.asarray(jax.jit(lambda a: topk.exact_scores(a, q, True))(
      jnp.asarray(x.astype(np.float32))))
  held = {"bfloat16": [x, x.view(np.uint16)], "int8": [x],
          "float32": [x.view(np.uint32)]}[dtype]
  for tile_rows in (8, 64, 128, 1000):
    for rows in held:
      got = jax.jit(lambda a, t=tile_rows: topk.exact_scores(a, q, True, t))(
          jnp.asarray(rows))
      np.testing.assert_array_equal(np.asarray(got), whole, err_msg=(
          f"tile_rows={tile_rows}, rows as {rows.dtype}"))


@pytest.fixture
def cpu_widening(monkeypatch):
  """Sets how CPU steps widen bf16 rows (``topk.cpu_widening``) for a test;
  steps built meanwhile are dropped after it."""
  def use(mode):
    monkeypatch.setattr(topk, "cpu_widening", lambda: mode)
    topk.step_fn.cache_clear()
    topk.summed_step_fn.cache_clear()
  yield use
  topk.step_fn.cache_clear()
  topk.summed_step_fn.cache_clear()


@pytest.mark.parametrize("mode", ["tiles", "matmul"])
def test_bf16_scans_widen_in_tiles_or_whole_alike(tmp_path, cpu_widening, mode):
  # Both CPU forms (tiles, rows sent as bits; the whole chunk inside the
  # matmul) give the f32 scan of the widened rows bit for bit: from arrays
  # and from a store whose chunks are a step's pieces, plain and summed over
  # two parts, on one device and eight.
  cpu_widening(mode)
  x, _ = _data(700, d=48, q=1, seed=5)
  q = _hard_queries(3, 48, 6)
  xb = x.astype(ml_dtypes.bfloat16)
  s = _store(tmp_path, xb, "bfloat16")
  for m in (MESHES["1x1"](), MESHES["8x1"]()):
    assert topk.tiles_bf16(m) == (mode == "tiles")
    want = scan.scan_arrays(xb.astype(np.float32), q, 20, mesh=m)
    for got in (scan.scan_arrays(xb, q, 20, mesh=m),
                scan.scan_store(s, q, 20, mesh=m),
                scan.scan_store(s, q, 20, mesh=m, chunk_rows=128)):
      for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    summed = scan.scan_stores([s, s], [q, q], 20, mesh=m)
    np.testing.assert_array_equal(summed.proponent_rows, want.proponent_rows)
    np.testing.assert_array_equal(summed.proponent_scores,
                                  want.proponent_scores * 2)


def test_a_summed_step_shares_its_bytes_among_the_stores(tmp_path, monkeypatch):
  """A step of a sum over S stores reads every store's rows: by default
  they take a step's bytes together, S times fewer rows of each (before
  2026-12-06 evening each store took a whole step's bytes, so on a 16 GB
  TPU v5e a sum over 8 checkpoints' stores, 2 GiB steps each, did not fit)."""
  monkeypatch.setattr(scan, "DEFAULT_DEVICE_CHUNK_BYTES", 64 << 10)
  x, q = _data(4096, d=64, q=3, seed=9)
  s = _store(tmp_path, x, "float32")  # 256 B a row; chunks of 64 rows
  steps, run = [], scan._scan_run
  monkeypatch.setattr(scan, "_scan_run", lambda sources, qs, *a: (
      steps.append(a[2].step), run(sources, qs, *a))[1])
  mesh = MESHES["8x1"]()
  one = scan.scan_stores([s], [q], K, mesh=mesh)
  four = scan.scan_stores([s] * 4, [q] * 4, K, mesh=mesh)
  assert steps == [8 * 256, 8 * 64], steps  # 64 KiB a device, in all
  np.testing.assert_array_equal(four.proponent_rows, one.proponent_rows)
  np.testing.assert_array_equal(four.proponent_scores, 4 * one.proponent_scores)


def test_compiler_options_only_on_cpu():
  assert topk.compiler_options("gpu") is None
  assert topk.compiler_options("tpu") is None
  opts = topk.compiler_options("cpu")
  assert opts is None or set(opts) == {"xla_cpu_experimental_ynn_fusion_type"}
  assert topk.cpu_widening() in ("tiles", "matmul")


def test_many_candidates_merge_on_several_cpu_devices():
  """Before 2026-12-05 these failed in XLA:CPU at run time ("Instruction
  with unsupported layout in YNN fusion"): the elementwise fusion of the
  gathered candidates' negation (``topk._negated``). Each equals one
  device's answer."""
  for n, k, num_queries, devices in ((5000, 128, 64, 2), (20000, 256, 32, 2),
                                     (4096, 4096, 8, 8)):
    x, q = _data(n, d=64, q=num_queries, seed=n)
    mesh = partitioning.make_mesh(devices, 1, devices=jax.devices()[:devices])
    got = scan.scan_arrays(x, q, k, mesh=mesh)
    want = scan.scan_arrays(x, q, k, mesh=MESHES["1x1"]())
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a, b)


def _ranked(s, r, largest):
  """Positions of (score, row) pairs in the running top-k's order: scores
  descending (``largest``) or ascending, ties to the lower row."""
  return np.stack([np.lexsort((ri, -si if largest else si)) for si, ri in zip(s, r)])


def _sorted_lists(rng, q, n, ties, largest):
  if ties:  # few distinct scores and rows: equal pairs too
    s = rng.integers(-3, 4, (q, n)).astype(np.float32)
    r = rng.integers(0, 3 * n, (q, n)).astype(np.int32)
  else:
    s = rng.standard_normal((q, n)).astype(np.float32)
    r = rng.permutation(10 * n)[:q * n].reshape(q, n).astype(np.int32)
  o = _ranked(s, r, largest)
  return np.take_along_axis(s, o, 1), np.take_along_axis(r, o, 1)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("case", ["random", "ties", "padding", "unsorted",
                                  "narrow", "devices", "state"])
def test_merge_equals_a_sort(largest, case):
  rng = np.random.default_rng(len(case))
  k, q = 12, 5
  n = {"narrow": 7, "devices": 3 * k}.get(case, k)
  a_s, a_r = _sorted_lists(rng, q, k, case == "ties", largest)
  b_s, b_r = _sorted_lists(rng, q, n, case == "ties", largest)
  if case == "padding":  # empty slots on both sides, as early in a scan
    empty = -np.inf if largest else np.inf
    a_s[:, 8:], a_r[:, 8:] = empty, topk.INVALID_ROW
    b_s[:, 5:], b_r[:, 5:] = empty, topk.INVALID_ROW
  if case == "unsorted":  # candidates in any order are ranked among themselves
    b_s, b_r = b_s[:, ::-1].copy(), b_r[:, ::-1].copy()
  if case == "state":  # a running top-k out of order (a caller's): a sort
    a_s, a_r = a_s[:, ::-1].copy(), a_r[:, ::-1].copy()
  _check_merge(a_s, a_r, b_s, b_r, k, largest)


def _check_merge(a_s, a_r, b_s, b_r, k, largest):
  """``topk._merge`` of a running list and candidates equals a sort."""
  got_s, got_r = jax.jit(topk._merge, static_argnums=(4, 5))(
      a_s, a_r, b_s, b_r, k, largest)
  s, r = np.concatenate([a_s, b_s], 1), np.concatenate([a_r, b_r], 1)
  o = _ranked(s, r, largest)[:, :k]
  np.testing.assert_array_equal(got_s, np.take_along_axis(s, o, 1))
  np.testing.assert_array_equal(got_r, np.take_along_axis(r, o, 1))


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("entering", [0, 3, 8, 13, 20, 40, 64, 90])
def test_merge_ranks_the_few_candidates_that_can_enter(largest, entering):
  # As a fast selection returns them: up to `entering` candidates before the
  # running k-th in the first columns, in any order (ties, equal pairs),
  # then padding or candidates that cannot enter. Each width of the merge
  # (8, 16, 32, 64 or all k) against a sort.
  rng = np.random.default_rng(entering)
  k, q = 100, 6
  sign = -1 if largest else 1  # keys ascending
  a_s, a_r = _sorted_lists(rng, q, k, True, largest)
  kth = a_s[:, -1:] * sign
  b_s = np.full((q, k), -np.inf if largest else np.inf, np.float32)
  b_r = np.full((q, k), topk.INVALID_ROW, np.int32)
  for j in range(q):
    n = entering if j == 0 else rng.integers(0, entering + 1)
    keys = rng.integers(-3, 4, n).astype(np.float32)
    keys = np.minimum(keys, kth[j])  # at or before the k-th's key
    b_s[j, :n] = keys * sign
    b_r[j, :n] = rng.integers(0, 3 * k, n)  # equal pairs too
    if j % 2:  # after them, candidates that come after the k-th
      b_s[j, n:] = (kth[j] + 1 + rng.integers(0, 3, k - n)) * sign
      b_r[j, n:] = rng.integers(0, 3 * k, k - n)
  _check_merge(a_s, a_r, b_s, b_r, k, largest)


def test_n_smaller_than_k_returns_n():
  x, q = _data(3)
  got = scan.scan_arrays(x, q, 10)
  assert got.proponent_rows.shape == (3, 3)
  assert_same(got, reference(x, q, 10))
  empty = scan.scan_arrays(np.zeros((0, 16), np.float32), q, 10)
  assert empty.proponent_rows.shape == (3, 0)


def test_k_past_the_rows_is_cut_to_them(tmp_path, monkeypatch):
  """The running top-k is sized by min(k, N): 100 rows with k = 10**9 were
  once refused as too large for the memory (a [Q, 10**9] top-k), though
  the answer is the 100 rows."""
  x, q = _data(100)
  sizes = []
  init = scan.init_topk
  monkeypatch.setattr(scan, "init_topk", lambda n, k, *a: (
      sizes.append(k), init(n, k, *a))[1])
  want = reference(x, q, 100)
  assert_same(scan.scan_arrays(x, q, 10**9), want)
  assert_same(scan.scan_store(_store(tmp_path, x, "float32"), q, 10**6), want)
  assert sizes == [100, 100]


def test_nan_rows_are_never_ranked():
  # k reaches past the finite rows: the NaN rows' slots list no row, as
  # padding's do (they once listed rows 3 and 20 at -inf, written to results
  # files as -Infinity, which strict JSON parsers refuse).
  x, q = _data(50)
  x[[3, 20]] = np.nan
  got = scan.scan_arrays(x, q, 50, chunk_rows=16)
  for rows in (got.proponent_rows, got.opponent_rows):
    assert np.all(rows[:, -2:] == scan.INVALID_ROW)
    assert not np.isin(rows, [3, 20]).any()
  assert np.all(got.proponent_scores[:, -2:] == -np.inf)
  assert np.all(got.opponent_scores[:, -2:] == np.inf)
  ok = np.setdiff1d(np.arange(50), [3, 20])
  want = reference(x[ok], q, 48)
  np.testing.assert_array_equal(got.proponent_rows[:, :48],
                                ok[want.proponent_rows])


@pytest.mark.parametrize("mesh", ["8x1", "4x2"])
def test_streaming_equals_arrays(mesh):
  x, q = _tied(300, seed=3)
  x += np.random.default_rng(0).standard_normal(x.shape).astype(np.float32) * (
      np.arange(300)[:, None] % 2)  # half the rows tie, half are random
  m = MESHES[mesh]()
  want = scan.scan_arrays(x, q, 8, mesh=m, chunk_rows=64)
  assert_same(want, reference(x, q, 8))
  scanner = scan.StreamingScanner(q, 8, mesh=m)
  order = np.random.default_rng(1).permutation(300)
  for batch in np.array_split(order, [50, 51]):  # unsorted, uneven sizes
    scanner.add(x[batch], batch)
  assert_same(scanner.result(), want)
  # A row added again, or twice in one batch, would be listed twice: refused
  # (before 2026-12-08 listed twice).
  for again, row in (([400, 401, 8], 8), ([302, 301, 302], 302)):
    with pytest.raises(InputError, match=rf"row_ids: row {row} is added twice"):
      scanner.add(x[:3], np.asarray(again))
  scanner.add(x[:2], np.asarray([301, 302]))  # (a refused batch adds none)
  # Device arrays go through the on-device sort.
  device = scan.StreamingScanner(q, 8, mesh=m)
  for batch in np.array_split(order, 2):
    device.add(jnp.asarray(x[batch]), jnp.asarray(batch))
  assert_same(device.result(), want)
  # Row ids past the range, or not integers, on either path (before
  # 2026-12-08 device ids were not checked: -4 came back as a row; 2.9 was
  # row 2). Lists are arrays.
  for ids, message in ((jnp.asarray([3, -4]), r"must lie in \[0, 2147483647\), got \[-4, 3\]"),
                       (np.asarray([0.5, 1.7]), "expected integers, got float64"),
                       (jnp.asarray([0.5, 1.7]), "expected integers, got float32")):
    with pytest.raises(InputError, match=f"row_ids: {message}"):
      device.add(jnp.asarray(x[:2]), ids)
  listed = scan.StreamingScanner(q, 8, mesh=m)
  listed.add(x[:3].tolist(), [0, 1, 2])
  assert_same(listed.result(), scan.scan_arrays(x[:3], q, 8, mesh=m))


@pytest.mark.parametrize("mesh", ["8x1", "4x2"])
def test_streamed_queries_split_over_the_devices(mesh, monkeypatch):
  """``StreamingScanner(shard_queries=True)``: the whole queries' results
  bit for bit at 512 queries (host batches, sorted in place, and device
  arrays, sorted on the devices), numpy's rows at 100 (padded to 512); by
  default split only where whole queries and their top-k would take more
  than a quarter of a device's share of the host."""
  from tracer import memory  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(4)
  x = rng.standard_normal((600, 256), dtype=np.float32)
  q = rng.standard_normal((512, 256), dtype=np.float32)
  m = MESHES[mesh]()
  order = rng.permutation(600)

  def streamed(queries, split, device=False):
    scanner = scan.StreamingScanner(queries, K, mesh=m, shard_queries=split)
    for batch in np.array_split(order, [250, 251]):
      if device:
        scanner.add(jnp.asarray(x[batch]), jnp.asarray(batch))
      else:
        scanner.add(x[batch], batch)
    assert scanner.plan == scan.QueryPlan(len(queries), 1, ring_queries(
        len(queries)) if scanner.split else len(queries), scanner.split, 8)
    return scanner.split, scanner.result()

  ring_queries = lambda n: -(-n // 512) * 512  # (64 a device)
  for device in (False, True):
    (split, got), (whole, want) = streamed(q, True, device), streamed(q, False, device)
    assert split and not whole
    _bit_equal(got, want)
  split, got = streamed(q[:100], True)
  assert split and got.proponent_rows.shape == (100, K)
  assert_same(got, reference(x, q[:100], K), atol=1e-4)
  # Default: 100 queries of d = 256 and their top-k take 110,400 bytes
  # (d x 4 + 16 k each), a quarter of a device's eighth of the host.
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: 8 * 4 * 110_400)
  assert not streamed(q[:100], None)[0]
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: 8 * 4 * 110_400 - 32)
  split, got = streamed(q[:100], None)
  assert split
  assert_same(got, reference(x, q[:100], K), atol=1e-4)


def test_streamed_queries_past_a_device_are_refused(monkeypatch):
  """A streamed scan cannot take its queries in runs: where they and their
  top-k, whole or split, take more than a device's memory, it is refused
  when the scanner is made, naming the counts (before 2026-12-06 evening it
  ran on into the device's out-of-memory error)."""
  from tracer import memory  # pylint: disable=g-import-not-at-top
  q = np.random.default_rng(0).standard_normal((100, 256), dtype=np.float32)
  per_query = 256 * 4 + 16 * K
  one = MESHES["1x1"]()
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: 100 * per_query)
  assert not scan.StreamingScanner(q, K, mesh=one).split  # (exactly fits)
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: 100 * per_query - 1)
  with pytest.raises(InputError, match=(
      r"^queries: 100 queries of d=256 with k=5 take 107.8 KiB on each device "
      r"\(whole on each device\), more than a device's 107.8 KiB; expected "
      r"fewer queries per streamed scan, or a scan of a store \(tracer trace "
      r"without --streaming\), which takes them in several passes$")):
    scan.StreamingScanner(q, K, mesh=one)
  # Split over 8 devices: 64 a device (the padding), twice while sent.
  eight = MESHES["8x1"]()
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: 8 * 128 * per_query)
  assert scan.StreamingScanner(q, K, mesh=eight).split
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: 8 * 128 * per_query - 8)
  with pytest.raises(InputError, match=(
      r"^queries: 100 queries of d=256 with k=5 take 138.0 KiB on each device "
      r"\(split over the 8 devices, 64 a device, and as many arriving\)")):
    scan.StreamingScanner(q, K, mesh=eight)


def test_streaming_keeps_two_steps_in_flight():
  """A long queue of dispatched 8-device steps deadlocks XLA:CPU's
  collectives (one device never reaches an all-reduce; XLA aborts after its
  rendezvous timeout): once ``add`` returns, the state before its step is
  computed."""
  x, q = _data(400)
  scanner = scan.StreamingScanner(q, K, mesh=MESHES["8x1"]())
  for lo in range(0, 400, 40):
    before = scanner.state()
    scanner.add(x[lo:lo + 40], np.arange(lo, lo + 40))
    assert all(leaf.is_ready() for leaf in jax.tree.leaves(before))
  assert_same(scanner.result(), reference(x, q, K))


def test_functional_core():
  x, q = _data(40)
  mesh = partitioning.make_mesh()
  state = scan.init_topk(3, K, mesh)
  qs = partitioning.put_global(q, partitioning.replicated(mesh))
  for lo in (0, 16, 32):
    rows = np.arange(lo, min(lo + 16, 40))
    valid = rows < 37  # the last three rows are excluded
    state = scan.update_topk(state, jnp.asarray(x[rows]), jnp.asarray(rows),
                             qs, jnp.asarray(valid), mesh=mesh)
  assert state.proponent_scores.sharding.is_fully_replicated
  assert_same(scan.finish(state, 37), reference(x[:37], q, K))


def _store(tmp_path, x, dtype, chunk_rows=64, column_scales=None):
  m = store_lib.Manifest(
      checkpoint="c", step=1, params_fingerprint="p", correction="adam",
      epsilon=1e-8, projection_seed=0, layout=None, dim=x.shape[1],
      basis_fingerprint=None, dtype=dtype, num_rows=len(x),
      chunk_rows=chunk_rows)
  s = store_lib.create_or_open(tmp_path / dtype, m, column_scales=column_scales)
  for c in s.pending_chunks():
    lo, hi = s.chunk_bounds(c)
    s.write_chunk(c, x[lo:hi])
  return s


def _row_metric(rng, segments, widths) -> topk.RowMetric:
  """A random R^(-1) = diag(a) - sum_b C_b C_b^T, positive definite."""
  lowrank = tuple((0.3 * rng.standard_normal((hi - lo, w)) / np.sqrt(hi - lo))
                  .astype(np.float32) for (lo, hi), w in zip(segments, widths))
  return topk.RowMetric(rng.uniform(1, 2, segments[-1][1]).astype(np.float32),
                        lowrank, segments)


@pytest.mark.parametrize("mesh", ["8x1", "4x2"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "int8"])
@pytest.mark.parametrize("runs", [1, 5])
def test_query_sets_in_one_pass_equal_a_scan_per_set(tmp_path, monkeypatch,
                                                     mesh, dtype, runs):
  """Three tasks' query sets (5, 1 and 9 queries), each under its own
  metric (low-rank widths 2+3, 0+1, 4+4 over two segments), scored in one
  pass over the store: each set's top-k is its own scan's (an int8 store's
  column scales folded into every metric). ``runs``: 5 when a run may take
  2 queries of each set. No set is padded to the largest: a pass scores
  15 queries (5 in runs: 2 + 1 + 2), not 27 (3 x 9; 6 in runs)."""
  rng = np.random.default_rng(3)
  segments = ((0, 16), (16, 48))
  x = rng.standard_normal((1001, 48)).astype(np.float32)
  s = _store(tmp_path, x, dtype, column_scales=rng.uniform(
      0.5, 2, 48).astype(np.float32) if dtype == "int8" else None)
  sets = [rng.standard_normal((n, 48)).astype(np.float32) for n in (5, 1, 9)]
  metrics = [_row_metric(rng, segments, w) for w in ((2, 3), (0, 1), (4, 4))]
  m = MESHES[mesh]()
  want = [scan.scan_store(s, q, K, metric=r, mesh=m) for q, r in zip(sets, metrics)]
  plans = []
  if runs > 1:
    monkeypatch.setattr(scan, "query_batch", lambda n, count, have: min(n, 2))
  got = scan.scan_sets([s], [[q] for q in sets], K,
                       metrics=[[r] for r in metrics], mesh=m,
                       on_plan=plans.append)
  assert [(p.passes, p.queries, p.sets, p.per_pass) for p in plans] == [
      (runs, 15, 3, 15 if runs == 1 else 5)]
  assert not plans[0].split
  assert len(got) == 3
  # (The scores' last bits differ from a scan per set, as documented: 1.2e-6
  # at 2.45, 5 units in the last place, on an AVX2-only AMD EPYC; within
  # 1e-6 on the machines before it.)
  for g, w in zip(got, want):
    assert_same(g, w, atol=1e-5)


@pytest.mark.parametrize("mesh", ["8x1", "4x2"])
def test_query_sets_split_over_the_devices_equal_a_scan_per_set(tmp_path,
                                                                monkeypatch, mesh):
  """Three sets (70, 3 and 130 queries) under their own metrics, split over
  the 8 devices (512 with the padding, blocks of 64: a block holds queries
  of several sets, and each set spans blocks): each set's top-k is its own
  scan's, asked (``shard_queries=True``), chosen where whole sets would
  take more passes, and summed over two stores. Before stop 80 several
  sets were never split. (Scores within 1e-5: a block's queries are
  scored in other batches than their own scan's, so the last bits can
  differ.)"""
  rng = np.random.default_rng(5)
  segments = ((0, 16), (16, 48))
  x, x2 = (rng.standard_normal((1001, 48)).astype(np.float32) for _ in range(2))
  s, s2 = _store(tmp_path, x, "bfloat16"), _store(tmp_path / "b", x2, "bfloat16")
  sizes = (70, 3, 130)
  sets = [[rng.standard_normal((n, 48)).astype(np.float32) for _ in range(2)]
          for n in sizes]
  metrics = [[_row_metric(rng, segments, w) for _ in range(2)]
             for w in ((2, 3), (0, 1), (4, 4))]
  m = MESHES[mesh]()
  want = [scan.scan_store(s, q[0], K, metric=r[0], mesh=m)
          for q, r in zip(sets, metrics)]
  plans = []
  got = scan.scan_sets([s], [q[:1] for q in sets], K,
                       metrics=[r[:1] for r in metrics], mesh=m,
                       on_plan=plans.append, shard_queries=True)
  for g, w in zip(got, want):
    assert_same(g, w, atol=1e-5)
  # Whole sets would take 3 passes (64 of each a run); split, one.
  asked = []
  monkeypatch.setattr(scan, "query_batch", lambda n, count, have: (
      asked.append(n) or (min(n, 64) if len(asked) == 1 else n)))
  got = scan.scan_sets([s], [q[:1] for q in sets], K,
                       metrics=[r[:1] for r in metrics], mesh=m,
                       on_plan=plans.append)
  for g, w in zip(got, want):
    assert_same(g, w, atol=1e-5)
  summed = scan.scan_sets([s, s2], sets, K, metrics=metrics, mesh=m,
                          on_plan=plans.append, shard_queries=True)
  for g, q, r in zip(summed, sets, metrics):
    assert_same(g, scan.scan_stores([s, s2], q, K, metrics=r, mesh=m), atol=1e-5)
  assert [(p.passes, p.queries, p.sets, p.per_pass, p.split) for p in plans] == [
      (1, 203, 3, 512, True)] * 3


def test_query_sets_summed_over_stores_and_plain(tmp_path, monkeypatch):
  """A sum over two stores (e.g. two checkpoints), each set with its own
  queries and metric in each; one metric for both sets (equal, not the
  same objects: one norm a row, no group); and plain scores (no metric)."""
  rng = np.random.default_rng(4)
  segments = ((0, 24), (24, 40))
  x1, x2 = (rng.standard_normal((300, 40)).astype(np.float32) for _ in range(2))
  s1, s2 = _store(tmp_path / "a", x1, "float32"), _store(tmp_path / "b", x2, "float32")
  sets = [[rng.standard_normal((n, 40)).astype(np.float32) for _ in range(2)]
          for n in (3, 4)]
  metrics = [[_row_metric(rng, segments, w) for _ in range(2)] for w in ((1, 2), (3, 0))]
  got = scan.scan_sets([s1, s2], sets, K, metrics=metrics)
  for g, q, r in zip(got, sets, metrics):
    assert_same(g, scan.scan_stores([s1, s2], q, K, metrics=r), atol=1e-6)
  copy = [topk.RowMetric(m.diag.copy(), tuple(c.copy() for c in m.lowrank),
                         m.segments) for m in metrics[0]]
  with monkeypatch.context() as patched:
    patched.setattr(scan, "grouped_metric", lambda ms: pytest.fail("grouped"))
    got = scan.scan_sets([s1, s2], sets, K, metrics=[metrics[0], copy])
  for g, q in zip(got, sets):
    assert_same(g, scan.scan_stores([s1, s2], q, K, metrics=metrics[0]),
                atol=1e-6)
  plain = scan.scan_sets([s1], [[q[0]] for q in sets], K)
  for g, q in zip(plain, sets):
    assert_same(g, reference(x1, q[0], K), atol=1e-4)
  with pytest.raises(InputError, match="same segments"):
    scan.scan_sets([s1], [[sets[0][0]], [sets[1][0]]], K, metrics=[
        [metrics[0][0]], [_row_metric(rng, ((0, 40),), (1,))]])
  with pytest.raises(InputError, match="one array per store"):
    scan.scan_sets([s1, s2], [[sets[0][0]]], K)


def test_query_sets_of_other_counts_in_each_store_are_refused(tmp_path):
  """A set's queries are the same in every store of a sum: set 0 of 2 and
  3 queries, set 1 of 3 and 2, was once accepted (the totals agree) and
  summed queries of other sets."""
  rng = np.random.default_rng(5)
  x1, x2 = (rng.standard_normal((40, 8)).astype(np.float32) for _ in range(2))
  s1, s2 = _store(tmp_path / "a", x1, "float32"), _store(tmp_path / "b", x2, "float32")
  q = lambda n: rng.standard_normal((n, 8)).astype(np.float32)
  with pytest.raises(InputError, match=r"query set 0 holds 3 queries for "
                     r".*b.* and 2 for .*a"):
    scan.scan_sets([s1, s2], [[q(2), q(3)], [q(3), q(2)]], K)


def test_stores_of_other_corpora_are_not_summed(tmp_path):
  """A sum over checkpoints adds row i's score in each store: two stores of
  the same shape encoded from other corpora (or from a corpus edited in
  place) were once summed, row i of one with row i of the other."""
  rng = np.random.default_rng(6)
  x = rng.standard_normal((40, 8)).astype(np.float32)

  def store(name, corpus, fingerprint):
    m = store_lib.Manifest(
        checkpoint="c", step=1, params_fingerprint="p", correction="adam",
        epsilon=1e-8, projection_seed=0, layout=None, dim=8,
        basis_fingerprint=None, dtype="float32", num_rows=len(x),
        chunk_rows=16, corpus=corpus, corpus_fingerprint=fingerprint)
    s = store_lib.create_or_open(tmp_path / name, m)
    for c in s.pending_chunks():
      lo, hi = s.chunk_bounds(c)
      s.write_chunk(c, x[lo:hi])
    return s

  a = store("a", "/data/a.jsonl", "f1")
  q = [rng.standard_normal((2, 8)).astype(np.float32)] * 2
  for other, field in ((store("b", "/data/b.jsonl", ""), "corpus"),
                       (store("c", "/data/a.jsonl", "f2"), "corpus_fingerprint")):
    for summed in (lambda: scan.scan_stores([a, other], q, K),
                   lambda: scan.scan_sets([a, other], [q], K)):
      with pytest.raises(InputError, match=rf"{other.path}.*field '{field}'"):
        summed()
  # The same rows moved elsewhere (equal fingerprints) are the same corpus.
  moved = store("d", "/elsewhere/a.jsonl", "f1")
  assert_same(scan.scan_stores([a, moved], q, K), reference(2 * x, q[0], K),
              atol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("chunk_rows", [None, 100])
def test_store_scan_matches_numpy(tmp_path, dtype, chunk_rows):
  x, q = _data(1001)
  s = _store(tmp_path, x, dtype)
  want = reference(s.read_rows(0, 1001), q, K)  # bf16-rounded values
  got = scan.scan_store(s, q, K, mesh=MESHES["4x2"](), chunk_rows=chunk_rows)
  assert_same(got, want)
  got = scan.scan_store(s, q, K, prefetch=0, chunk_rows=chunk_rows)
  assert_same(got, want)


@pytest.mark.parametrize("mesh", sorted(MESHES))
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_store_scan_maps_whole_chunks_in_place(tmp_path, monkeypatch, mesh, dtype):
  x, q = _data(1001)
  x[320:384] = 0  # chunk 5 is all zeros: tensorstore stores no file for it
  s = _store(tmp_path, x, dtype)
  assert s.local and not os.path.exists(s.chunk_file(5))
  mapped = []
  view = store_lib.EncodingStore.chunk_view
  monkeypatch.setattr(store_lib.EncodingStore, "chunk_view",
                      lambda self, c: mapped.append(c) or view(self, c))
  want = reference(s.read_rows(0, 1001), q, K)
  got = scan.scan_store(s, q, K, mesh=MESHES[mesh]())
  assert sorted(set(mapped)) == list(range(s.num_chunks))
  assert_same(got, want)
  # More chunks per step than MAX_PIECES: read (copied) into one buffer.
  mapped.clear()
  monkeypatch.setattr(scan, "MAX_PIECES", 1)
  assert_same(scan.scan_store(s, q, K, mesh=MESHES[mesh](), read_ahead=2), want)
  assert not mapped


def test_pooled_buffers_fit_the_host_budget(tmp_path, monkeypatch):
  """Rows copied into pooled buffers (an unaligned matrix; a local store
  whose chunks are read, not mapped) take steps small enough that the pool
  stays within ``HOST_BUFFER_BYTES``; the top-k is unchanged."""
  x, q = _data(5000)
  unaligned = np.empty(x.size + 1, np.float32)[1:].reshape(x.shape)
  unaligned[...] = x
  made = []
  real = scan.aligned_empty
  monkeypatch.setattr(scan, "aligned_empty", lambda shape, dtype, align=64: (
      made.append(int(np.prod(shape)) * np.dtype(dtype).itemsize)
      or real(shape, dtype, align)))
  mesh = MESHES["8x1"]()
  row_bytes, sets = 16 * 4, 6  # prefetch 2, depth 2, read-ahead 0, 2 more
  budget = sets * 8 * 40 * row_bytes  # 40 rows per device and step
  monkeypatch.setattr(scan, "HOST_BUFFER_BYTES", budget)
  assert scan.buffered_step(8 * 10**6, mesh, row_bytes, sets) == 8 * 40
  assert_same(scan.scan_arrays(unaligned, q, K, mesh=mesh), reference(x, q, K))
  assert 0 < sum(made) <= budget
  # Without the budget a step would hold all 5,000 rows (625 per device).
  made.clear()
  monkeypatch.setattr(scan, "HOST_BUFFER_BYTES", 8 << 30)
  scan.scan_arrays(unaligned, q, K, mesh=mesh)
  assert sum(made) == 5000 * row_bytes
  # A local store read into buffers: whole chunks (64 rows) per device.
  monkeypatch.setattr(scan, "MAX_PIECES", 0)  # (no chunk mapped)
  monkeypatch.setattr(scan, "HOST_BUFFER_BYTES", sets * 8 * 100 * row_bytes)
  s = _store(tmp_path, x, "float32")
  made.clear()
  assert_same(scan.scan_store(s, q, K, mesh=mesh), reference(x, q, K))
  assert 0 < sum(made) <= sets * 8 * 64 * row_bytes
  # Where even one chunk per device in every set would pass the budget (as
  # d = 2^16 on 8 GPUs), fewer steps are read ahead, then prefetched: 10
  # sets (read-ahead 4) become 7 (read-ahead 1), then 5 (prefetch 1).
  pools = []
  pool = scan._BufferPool
  monkeypatch.setattr(scan, "_BufferPool", lambda shapes, dtype, size: (
      pools.append((sum(a * b for a, b in shapes), size))
      or pool(shapes, dtype, size)))
  for fit, want in ((7, 7), (6, 5), (3, 5)):
    monkeypatch.setattr(scan, "HOST_BUFFER_BYTES", fit * 8 * 64 * row_bytes)
    assert_same(scan.scan_store(s, q, K, mesh=mesh, read_ahead=4), reference(x, q, K))
    assert pools[-1] == (8 * 64 * 16, want)  # 64 rows of 16 per device


def test_devices_of_their_own_memory_take_steps_of_several_pooled_reads(
    tmp_path, monkeypatch):
  """Where a device has memory of its own (GPU, TPU; here a CPU mesh with a
  device memory patched in), copied rows are staged: read a piece at a
  time into a pool of ``staged_sets`` sets, each piece copied to its device
  and its set reused, so the pool bounds a piece and the step keeps its
  device size. Before 2026-12-06 (stop 75) the pool bounded the step: 40
  rows a device here; at d = 2^16 on a v5e host reading object storage,
  1,536 rows a chip, and split queries went around the ring once a step,
  about 10x a local store's traffic. The top-k is unchanged: bit for bit,
  whole and split over the devices; from a store on object storage."""
  from tracer import memory  # pylint: disable=g-import-not-at-top
  x, q = _data(5000)
  unaligned = np.empty(x.size + 1, np.float32)[1:].reshape(x.shape)
  unaligned[...] = x
  mesh = MESHES["8x1"]()
  # (split queries score in blocks of 64: their bits are such a batch's)
  plain = {split: scan.scan_arrays(x, q, K, mesh=mesh, chunk_rows=5000,
                                   shard_queries=split) for split in (False, True)}
  assert_same(plain[False], reference(x, q, K))
  monkeypatch.setattr(memory, "device_memory_bytes", lambda: 1 << 30)
  row_bytes = 16 * 4
  monkeypatch.setattr(scan, "HOST_BUFFER_BYTES", 2 * 8 * 40 * row_bytes)
  layouts, made = [], []
  real_run, real_empty = scan._scan_run, scan.aligned_empty
  monkeypatch.setattr(scan, "_scan_run", lambda sources, qs, *a: (
      layouts.append((a[2], a[5])) or real_run(sources, qs, *a)))
  monkeypatch.setattr(scan, "aligned_empty", lambda shape, dtype, align=64: (
      made.append(int(np.prod(shape)) * np.dtype(dtype).itemsize)
      or real_empty(shape, dtype, align)))
  for split in (False, True):
    layouts.clear(), made.clear()
    got = scan.scan_arrays(unaligned, q, K, mesh=mesh, shard_queries=split)
    for field in got._fields:
      np.testing.assert_array_equal(getattr(got, field),
                                    getattr(plain[split], field))
    (layout, sets), = layouts
    # One step of all 625 rows a device, in 25 pieces of 25 rows (the most
    # rows within 40-row pieces and MAX_PIECES), through 2 pooled sets.
    assert (layout.step, layout.num_pieces, layout.piece_rows, sets) == (
        5000, 25, 25, 2)
    assert 0 < sum(made) <= 2 * 8 * 25 * row_bytes
  # A store on object storage (read ahead 4: 6 sets), bf16, with a metric.
  xb = x.astype(ml_dtypes.bfloat16)
  m = store_lib.Manifest(
      checkpoint="c", step=1, params_fingerprint="p", correction="adam",
      epsilon=1e-8, projection_seed=0, layout=None, dim=16,
      basis_fingerprint=None, dtype="bfloat16", num_rows=5000, chunk_rows=64)
  remote = store_lib.create_or_open(f"memory://{tmp_path.name}/staged", m)
  for c in remote.pending_chunks():
    lo, hi = remote.chunk_bounds(c)
    remote.write_chunk(c, xb[lo:hi])
  metric = topk.RowMetric(np.linspace(0.5, 2.0, 16).astype(np.float32),
                          (np.full((16, 1), 0.1, np.float32),), ((0, 16),))
  want = scan.scan_arrays(np.asarray(xb), q, K, mesh=mesh, chunk_rows=5000,
                          metric=metric)
  monkeypatch.setattr(scan, "HOST_BUFFER_BYTES", 6 * 8 * 128 * 16 * 2)
  layouts.clear()
  got = scan.scan_store(remote, q, K, mesh=mesh, metric=metric)
  # (rows' norms in pieces of 128 rows, not one of 625: the last bit may
  # differ, as a local store's mapped chunks' do)
  assert_same(got, want)
  (layout, sets), = layouts
  # Pieces of two chunks (128 rows) a device; steps of 640 rows a device
  # (5,000 rows padded to whole chunks on 8 devices: 5,120).
  assert (layout.step, layout.piece_rows, sets) == (5120, 128, 6)


def test_a_device_holds_the_other_steps_rows_within_the_half_a_run_leaves(
    monkeypatch):
  """A device holds the rows of up to ``device_steps(prefetch)`` steps at
  once (prefetched, being read, in flight): on devices of their own memory
  the other steps' rows are held to the half of it that ``query_batch``
  leaves a run's step. Before stop 75 nothing counted them: on a 16 GB v5e,
  five more steps of 2 GiB beside a step of half the chip would pass it.
  Here a device of 1 MiB and 64-byte rows: 5 other steps of at most 512 KiB
  together, 1,638 rows a device a step (the old code: all 2,500)."""
  from tracer import memory  # pylint: disable=g-import-not-at-top
  x, q = _data(20_000)
  mesh = MESHES["8x1"]()
  monkeypatch.setattr(memory, "device_memory_bytes", lambda: 1 << 20)
  steps, real = [], scan._scan_run
  monkeypatch.setattr(scan, "_scan_run", lambda sources, qs, *a: (
      steps.append(a[2].step) or real(sources, qs, *a)))
  assert scan.device_steps(2) == 6 and scan.device_steps(0) == 2
  assert_same(scan.scan_arrays(x, q, K, mesh=mesh), reference(x, q, K))
  assert steps == [8 * ((1 << 19) // (5 * 64))] == [8 * 1_638]
  # Without prefetching, 1 other step: the corpus's 2,500 rows a device fit.
  steps.clear()
  assert_same(scan.scan_arrays(x, q, K, mesh=mesh, prefetch=0), reference(x, q, K))
  assert steps == [20_000]


@pytest.mark.parametrize("chunk_rows,prefetch", [(1024, 2), (2048, 1), (4096, 0)])
def test_chunks_too_large_for_the_other_steps_cut_the_prefetch(
    tmp_path, monkeypatch, chunk_rows, prefetch):
  """A step is at least a store chunk a device, so where even a chunk in
  each of the other steps a device holds passes the half a run leaves
  them, fewer steps are prefetched (``held_prefetch``) rather than the
  bound broken. Until stop 76 prefetch stayed 2: 2 GiB chunks on a 16 GB
  v5e held 5 other steps, 10.7 GB against 8 GB. Here a device of 1 MiB and
  64-byte rows: 5 chunks of 1,024 rows fit its 512 KiB; 5 of 2,048 do not,
  3 do (prefetch 1); only 1 of 4,096 (prefetch 0). Both the scan and
  ``tracer plan`` take that prefetch."""
  from launch import plan  # pylint: disable=g-import-not-at-top
  from tracer import memory  # pylint: disable=g-import-not-at-top
  x, q = _data(8 * 4096 - 100)
  s = _store(tmp_path, x, "float32", chunk_rows=chunk_rows)
  monkeypatch.setattr(memory, "device_memory_bytes", lambda: 1 << 20)
  runs, plans, real = [], [], scan._scan_run
  monkeypatch.setattr(scan, "_scan_run", lambda sources, qs, *a: (
      runs.append((a[2].step // 8, a[3])) or real(sources, qs, *a)))
  assert_same(scan.scan_store(s, q, K, mesh=MESHES["8x1"](), on_plan=plans.append),
              reference(x, q, K))
  assert runs == [(chunk_rows, prefetch)]
  assert (plans[0].step.rows, plans[0].step.prefetch) == runs[0]
  assert plan.other_steps(16, 4, 1, chunk_rows, 1 << 20) == (
      scan.device_steps(prefetch) - 1)


def test_a_staged_or_cut_step_is_said(tmp_path, capsys, monkeypatch):
  """``tracer scan`` and ``tracer trace`` say the scan's step where it is
  not the plain one (``StepPlan.describe``, ``common.say_query_plan``):
  staged through the host's pool a piece at a time (a device of 1 GiB, a
  host of 2 MiB: 2,500 rows a device in 10 pieces of 250), or fewer steps
  prefetched than the 2 asked (4,096-row chunks on 1 MiB devices: 0). A
  plain step says nothing. Until stop 77 only passes and split queries
  were said."""
  from tracer import memory  # pylint: disable=g-import-not-at-top
  from tracer.launch import common  # pylint: disable=g-import-not-at-top
  plans = []
  monkeypatch.setattr(memory, "device_memory_bytes", lambda: 1 << 30)
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: 2 << 20)
  x, q = _data(20_000, d=32, q=4)
  unaligned = np.empty(x.size + 1, np.float32)[1:].reshape(x.shape)  # (copied)
  unaligned[:] = x
  assert_same(scan.scan_arrays(unaligned, q, 5, mesh=MESHES["8x1"](),
                               on_plan=plans.append), reference(x, q, 5))
  x, q = _data(8 * 4096 - 100)
  s = _store(tmp_path, x, "float32", chunk_rows=4096)
  monkeypatch.setattr(memory, "device_memory_bytes", lambda: 1 << 20)
  assert_same(scan.scan_store(s, q, K, mesh=MESHES["8x1"](), on_plan=plans.append),
              reference(x, q, K))
  monkeypatch.undo()
  assert_same(scan.scan_arrays(x, q, K, mesh=MESHES["8x1"](), on_plan=plans.append),
              reference(x, q, K))
  capsys.readouterr()
  for p in plans:
    common.say_query_plan(p)
  assert capsys.readouterr().out.splitlines() == [
      "scan step: 2,500 rows a device, staged through the host's pooled "
      "buffers in 10 pieces of 250 rows (2 in flight), 2 steps prefetched",
      "scan step: 4,096 rows a device, 0 steps prefetched of the 2 asked (the "
      "other steps' rows a device would hold, or the host's pool, would not "
      "fit more)"]
  assert [p.step.notable for p in plans] == [True, True, False]


def test_without_prefetching_a_device_holds_one_other_step(monkeypatch):
  """Without a prefetch thread (``prefetch=0``) the step being read is the
  next one dispatched: beside it a device holds only the one in flight, so
  ``device_steps(0)`` is 2. Until then it counted 3 (a step being read and
  another dispatched): the step held to half the room. Here a device of 1
  MiB and 64-byte rows: all 4,500 rows a device in one step (4,096 before)."""
  from tracer import memory  # pylint: disable=g-import-not-at-top
  x, q = _data(36_000)
  monkeypatch.setattr(memory, "device_memory_bytes", lambda: 1 << 20)
  steps, real = [], scan._scan_run
  monkeypatch.setattr(scan, "_scan_run", lambda sources, qs, *a: (
      steps.append(a[2].step) or real(sources, qs, *a)))
  assert_same(scan.scan_arrays(x, q, K, mesh=MESHES["8x1"](), prefetch=0),
              reference(x, q, K))
  assert steps == [36_000]


def test_a_local_store_maps_a_step_held_to_whole_chunks(tmp_path, monkeypatch):
  """Whether a step's rows are copied is judged on the step the scan takes:
  on devices of their own memory, the one held for the other steps' rows.
  A local store whose held step is whole chunks (at most ``MAX_PIECES``)
  maps them, as the plan says. Until then it was judged on the 2 GiB step:
  on a 16 GB v5e at d = 2^16 with 384-row chunks, 43 chunks a chip, so the
  held step of 11,904 rows (31 chunks) was staged through the pool. Here
  64-byte rows in 16-row chunks on devices of 330,000 bytes: 512 rows a
  device (32 chunks), mapped, not one staged piece of 512 rows."""
  from tracer import memory  # pylint: disable=g-import-not-at-top
  x, q = _data(5000)
  s = _store(tmp_path, x, "float32", chunk_rows=16)
  monkeypatch.setattr(memory, "device_memory_bytes", lambda: 330_000)
  layouts, real = [], scan._scan_run
  monkeypatch.setattr(scan, "_scan_run", lambda sources, qs, *a: (
      layouts.append(a[2]) or real(sources, qs, *a)))
  assert_same(scan.scan_store(s, q, K, mesh=MESHES["8x1"]()), reference(x, q, K))
  (layout,) = layouts
  assert (layout.step, layout.staged, layout.whole, layout.num_pieces) == (
      8 * 512, False, True, 32)


def test_a_local_store_maps_at_most_max_pieces_chunks_a_step(tmp_path, monkeypatch):
  """On devices of their own memory a local store's step is at most
  ``MAX_PIECES`` chunks a device, mapped in place, not a longer step staged
  through the pool (a copy on the host). Until stop 75 such a store's
  default step (e.g. d = 2^14 bf16, 512-row chunks: 2 GiB is 128 chunks on
  an H100) was shrunk to the pool's sets, then mapped (10 chunks); for an
  hour in stop 75 it was staged at 2 GiB. Here 40 chunks of 64 rows a
  device in the default step: 32 of them, mapped, none read."""
  from tracer import memory  # pylint: disable=g-import-not-at-top
  x, q = _data(8 * 40 * 64)
  s = _store(tmp_path, x, "float32")  # chunks of 64 rows of 16 float32
  monkeypatch.setattr(memory, "device_memory_bytes", lambda: 1 << 30)
  layouts, read = [], []
  real_run, real_read = scan._scan_run, scan._StoreSource.read_into
  monkeypatch.setattr(scan, "_scan_run", lambda sources, qs, *a: (
      layouts.append(a[2]) or real_run(sources, qs, *a)))
  monkeypatch.setattr(scan._StoreSource, "read_into", lambda self, lo, hi, out: (
      read.append((lo, hi)) or real_read(self, lo, hi, out)))
  assert_same(scan.scan_store(s, q, K, mesh=MESHES["8x1"]()), reference(x, q, K))
  (layout,) = layouts
  assert (layout.step, layout.staged, layout.whole, layout.num_pieces) == (
      8 * 32 * 64, False, True, 32)
  assert read == []


def test_a_step_of_one_chunk_per_device_maps_it(tmp_path, monkeypatch):
  """A local store whose default step is one chunk per device uses the
  chunk files in place, as steps of several chunks do: none is read into a
  pooled buffer (before 2026-12-06 it was read into the pool, at least 4 sets of a chunk
  per device: 8 GiB for 256 MiB chunks on 8 devices, whatever the host's
  memory); the top-k is an explicit step's, bit for bit."""
  x, q = _data(5000)
  s = _store(tmp_path, x, "float32")  # chunks of 64 rows of 16 float32
  mesh = MESHES["8x1"]()
  want = scan.scan_store(s, q, K, mesh=mesh, chunk_rows=5000)
  monkeypatch.setattr(scan, "DEFAULT_DEVICE_CHUNK_BYTES", 64 * 16 * 4)
  read, made = [], []
  real = scan._StoreSource.read_into
  monkeypatch.setattr(scan._StoreSource, "read_into", lambda self, lo, hi, out: (
      read.append((lo, hi)) or real(self, lo, hi, out)))
  empty = scan.aligned_empty
  monkeypatch.setattr(scan, "aligned_empty", lambda shape, dtype, align=64: (
      made.append(shape) or empty(shape, dtype, align)))
  got = scan.scan_store(s, q, K, mesh=mesh)
  assert read == []  # every chunk mapped
  # The last step's device wholly past the corpus (rows 5,056-5,119) gets
  # the store's zero chunk, not a pooled set of 8 buffers.
  assert made == [(64, 16)]
  for field in got._fields:
    np.testing.assert_array_equal(getattr(got, field), getattr(want, field))


def test_default_steps_fit_a_quarter_of_the_host(tmp_path, monkeypatch):
  """A default step's pooled buffers take at most a quarter of the host's
  memory (before 2026-12-06 only ``HOST_BUFFER_BYTES``, 8 GiB, bounded
  them: a host of 8 or 16 GiB could plan all of it); the top-k is an
  explicit step's, bit for bit. An explicit step is left as asked."""
  from tracer import memory  # pylint: disable=g-import-not-at-top
  x, q = _data(5000)
  s = _store(tmp_path, x, "float32")  # chunks of 64 rows of 16 float32
  mesh = MESHES["8x1"]()
  monkeypatch.setattr(scan, "MAX_PIECES", 0)  # every step read into the pool
  want = scan.scan_store(s, q, K, mesh=mesh, chunk_rows=5000)
  steps, pools = [], []
  layout, pool = scan._Layout, scan._BufferPool
  monkeypatch.setattr(scan, "_Layout", lambda mesh, step, *a, **kw: (
      steps.append(step), layout(mesh, step, *a, **kw))[1])
  monkeypatch.setattr(scan, "_BufferPool", lambda shapes, dtype, size: (
      pools.append(size * sum(a * b for a, b in shapes) * np.dtype(dtype).itemsize)
      or pool(shapes, dtype, size)))
  row_bytes, sets = 16 * 4, 6  # prefetch 2, depth 2, read-ahead 0, 2 more
  host = 4 * sets * 8 * 128 * row_bytes  # a quarter: 2 chunks per device
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: host)
  got = scan.scan_store(s, q, K, mesh=mesh)
  # Not the whole corpus (10 chunks per device, 5,120 rows) in one step.
  assert set(steps) == {8 * 128} and pools == [host // 4]
  for field in got._fields:  # (each row's score is one dot product, whatever the step)
    np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
  scan.scan_store(s, q, K, mesh=mesh, chunk_rows=5000)
  assert steps[-1] == 5000  # (an explicit step: as asked)
  assert scan.host_buffer_bytes() == host // 4
  # A host whose quarter passes HOST_BUFFER_BYTES: that is the bound.
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: 64 << 30)
  assert scan.host_buffer_bytes() == scan.HOST_BUFFER_BYTES


def test_store_scan_from_object_storage(object_store):
  """On an S3 server and a GCS emulator, reads in flight or not."""
  x, q = _data(1001, seed=7)
  m = store_lib.Manifest(
      checkpoint="c", step=1, params_fingerprint="p", correction="adam",
      epsilon=1e-8, projection_seed=0, layout=None, dim=x.shape[1],
      basis_fingerprint=None, dtype="bfloat16", num_rows=len(x), chunk_rows=64)
  s = store_lib.create_or_open(f"{object_store('tracer-scan')}/store", m)
  for c in s.pending_chunks():
    lo, hi = s.chunk_bounds(c)
    s.write_chunk(c, x[lo:hi])
  assert not s.local
  want = reference(x.astype(ml_dtypes.bfloat16).astype(np.float32), q, K)
  for read_ahead in (None, 0, 3):  # None: scan.REMOTE_READ_AHEAD
    assert_same(scan.scan_store(s, q, K, mesh=MESHES["4x2"](),
                                read_ahead=read_ahead), want)
  assert_same(scan.scan_store(s, q, K, chunk_rows=100, prefetch=0), want)


def test_row_ids_near_the_int32_limit_do_not_wrap():
  """The last step of N = INVALID_ROW - 1 rows (accepted) is padded past
  2**31 - 1: its padding rows' ids were an int32 arange, which overflowed
  (or wrapped to negative ids that ``i < N`` marked valid)."""
  n = scan.INVALID_ROW - 1

  class Ones(scan._Source):  # N rows without holding them
    num_rows, dim, dtype = n, 4, np.dtype(np.float32)

    def read_into(self, start, stop, out):
      out[...] = 1
      return []

  mesh = partitioning.make_mesh()
  layout = scan._Layout(mesh, 125 * mesh.size, 4, np.dtype(np.float32))
  base = n // layout.step * layout.step
  assert base + layout.step > 2**31  # padding ids past the int32 range
  pool = scan._BufferPool(layout.shapes(), np.dtype(np.float32), 1)
  (_, ids, valid), _ = layout.finish(layout.start(Ones(), base, pool))
  ids, valid = np.asarray(ids), np.asarray(valid)
  real = n - base
  assert 0 < real < layout.step
  np.testing.assert_array_equal(ids[:real], np.arange(base, n))
  assert valid[:real].all() and not valid[real:].any()
  assert ids.dtype == np.int32 and (ids >= 0).all()


def test_incomplete_store_refuses_to_scan(tmp_path):
  x, q = _data(100)
  s = _store(tmp_path, x, "float32")
  os.remove(s._marker(1))
  with pytest.raises(InputError, match="incomplete: 1 of 2 chunks.*\\[1\\]"):
    scan.scan_store(s, q, K)


def test_bad_inputs():
  x, q = _data(10)
  with pytest.raises(InputError, match="queries: dimension 15"):
    scan.scan_arrays(x, q[:, :15], K)
  with pytest.raises(InputError, match="k: must be a positive"):
    scan.scan_arrays(x, q, 0)
  # Before 2026-12-07 True was k = 1 and 2.5 chunk rows 2.
  for k in (True, 2.5, np.bool_(True)):
    with pytest.raises(InputError, match=f"k: must be a positive integer, got {k!r}"):
      scan.scan_arrays(x, q, k)
  with pytest.raises(InputError, match="chunk_rows: must be an integer >= 1, got 2.5"):
    scan.scan_arrays(x, q, K, chunk_rows=2.5)
  assert scan.scan_arrays(x, q, np.int64(K)).proponent_rows.shape[1] == K
  with pytest.raises(InputError, match="encodings: expected"):
    scan.scan_arrays(x[0], q, K)
  with pytest.raises(InputError, match="row_ids"):
    scan.StreamingScanner(q, K).add(x, np.arange(9))
  # Complex and object arrays (before 2026-12-08: the imaginary part dropped
  # with a warning; None read as NaN).
  for name, bad in (("encodings", x.astype(np.complex64)),
                    ("encodings", x.astype(object)),
                    ("queries", q.astype(np.complex64))):
    with pytest.raises(InputError, match=f"{name}: expected real numbers, got dtype"):
      scan.scan_arrays(bad if name == "encodings" else x,
                       bad if name == "queries" else q, K)
  assert_same(scan.scan_arrays(x.astype(ml_dtypes.bfloat16), q, K),
              scan.scan_arrays(x.astype(ml_dtypes.bfloat16).astype(np.float32), q, K))


def test_read_errors_propagate_from_prefetch_thread():
  x, q = _data(100)

  class Failing(scan._ArraySource):

    def view(self, start, stop):
      return None  # force read_into

    def read_into(self, start, stop, out):
      if start >= 64:
        raise OSError("disk on fire")
      return super().read_into(start, stop, out)

  with pytest.raises(OSError, match="disk on fire"):
    scan._scan(Failing(x), q, K, None, 32, prefetch=2)


# --------------------------------------------------------------------------
# Two processes, one global mesh (jax.distributed over gloo).


def _worker(port: int, process_id: int, workdir: str) -> None:
  multiprocess.init_worker(port, process_id)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  x, q = _data(1001, seed=5)
  mesh = partitioning.make_mesh(4, 2)
  manifest = store_lib.Manifest(
      checkpoint="c", step=1, params_fingerprint="p", correction="adam",
      epsilon=1e-8, projection_seed=0, layout=None, dim=16,
      basis_fingerprint=None, dtype="bfloat16", num_rows=1001,
      chunk_rows=64)
  x2, q2 = _data(1001, seed=6)
  stores = []
  for name, rows in (("store", x), ("store2", x2)):
    path = os.path.join(workdir, name)
    if process_id == 0:
      store_lib.create_or_open(path, manifest)
    multihost_utils.sync_global_devices(f"created {name}")
    s = store_lib.create_or_open(path, manifest)
    for c in range(s.num_chunks)[process_id::2]:
      lo, hi = s.chunk_bounds(c)
      s.write_chunk(c, rows[lo:hi])
    stores.append(s)
  multihost_utils.sync_global_devices("written")
  s = stores[0]
  results = {
      "arrays": scan.scan_arrays(x, q, K, mesh=mesh, chunk_rows=96),
      "store": scan.scan_store(s, q, K, mesh=mesh),
      # Each process reads only its rows of both stores.
      "summed": scan.scan_stores(stores, [q, q2], K, mesh=mesh),
      # The queries split over the devices of both processes: blocks cross
      # hosts (``ppermute``).
      "store split": scan.scan_store(s, q, K, mesh=mesh, shard_queries=True),
      "summed split": scan.scan_stores(stores, [q, q2], K, mesh=mesh,
                                       shard_queries=True),
  }
  # Two query sets (3 queries and 1) in one pass over both stores.
  results["sets 0"], results["sets 1"] = scan.scan_sets(
      stores, [[q, q2], [q2[:1], q[1:2]]], K, mesh=mesh)
  streaming = scan.StreamingScanner(q, K, mesh=mesh)
  for lo in range(0, 1001, 300):
    streaming.add(x[lo:lo + 300], np.arange(lo, min(lo + 300, 1001)))
  results["streaming"] = streaming.result()
  streaming = scan.StreamingScanner(q, K, mesh=mesh, shard_queries=True)
  for lo in range(0, 1001, 300):
    streaming.add(x[lo:lo + 300], np.arange(lo, min(lo + 300, 1001)))
  results["streaming split"] = streaming.result()
  np.savez(os.path.join(workdir, f"out{process_id}.npz"),
           **{f"{name}.{field}": value for name, r in results.items()
              for field, value in r._asdict().items()})
  jax.distributed.shutdown()


def test_two_processes(tmp_path):
  """Slow-ish (two jax processes, ~10 s); set TRACER_SKIP_MULTIPROCESS=1 to skip."""
  if os.environ.get("TRACER_SKIP_MULTIPROCESS"):
    pytest.skip("TRACER_SKIP_MULTIPROCESS is set")
  port = multiprocess.free_port()
  procs, logs = multiprocess.start(
      [[sys.executable, os.path.abspath(__file__), "worker", str(port), str(i),
        str(tmp_path)] for i in range(2)], tmp_path, multiprocess.env())
  multiprocess.wait(procs, logs, time.monotonic() + 150)
  x, q = _data(1001, seed=5)
  bf16 = lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32)
  x2, q2 = _data(1001, seed=6)
  want = {"arrays": reference(x, q, K), "streaming": reference(x, q, K),
          "store": reference(bf16(x), q, K),
          "summed": reference(np.concatenate([bf16(x), bf16(x2)], 1),
                              np.concatenate([q, q2], 1), K)}
  want["store split"], want["summed split"] = want["store"], want["summed"]
  want["streaming split"] = want["streaming"]
  want["sets 0"] = want["summed"]
  want["sets 1"] = reference(np.concatenate([bf16(x), bf16(x2)], 1),
                             np.concatenate([q2[:1], q[1:2]], 1), K)
  for i in range(2):
    with np.load(tmp_path / f"out{i}.npz", allow_pickle=False) as f:
      for name, w in want.items():
        assert_same(scan.TopK(*(f[f"{name}.{field}"] for field in
                                scan.TopK._fields)), w)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
  _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])


def _flip_a_bit(path):
  """Corrupts a chunk file in place, keeping its size."""
  raw = bytearray(open(path, "rb").read())
  raw[100] ^= 0x01
  open(path, "wb").write(bytes(raw))


def test_scan_refuses_a_corrupt_chunk_and_names_it(tmp_path):
  x, q = _data(300)
  s = _store(tmp_path, x, "bfloat16")
  path = s.chunk_file(3)
  _flip_a_bit(path)
  with pytest.raises(CorruptStoreError, match=r"c/3/0: chunk 3 \(rows 192..256\).*"
                     "checksum mismatch"):
    scan.scan_store(s, q, K)
  got = scan.scan_store(s, q, K, verify=False)  # the flag that skips the check
  assert got.proponent_rows.shape == (len(q), K)
  with open(path, "r+b") as f:
    f.truncate(50)
  with pytest.raises(CorruptStoreError, match=r"chunk 3 .*cannot be read"):
    scan.scan_store(s, q, K, verify=False)


def test_a_failed_scan_leaves_no_step_running(tmp_path, monkeypatch):
  # A corrupt chunk stops the scan after earlier steps were dispatched; the
  # call must not return while any of them still reads the host buffers or
  # mapped chunk files (a caller may rewrite a chunk file next). Each step
  # here ends in a callback that takes 0.2 s and notes that it finished.
  x, q = _data(1001)
  s = _store(tmp_path, x, "float32")
  _flip_a_bit(s.chunk_file(9))
  dispatched, finished = [], []

  def note(scores):
    time.sleep(0.2)
    finished.append(1)
    return scores

  def slow_step_fn(*args, **kwargs):
    update = topk.step_fn(*args, **kwargs)

    def slow(*a, **k):
      state = update(*a, **k)
      dispatched.append(1)
      return state._replace(proponent_scores=jax.pure_callback(
          note, jax.ShapeDtypeStruct(state.proponent_scores.shape, jnp.float32),
          state.proponent_scores))
    slow.lower = update.lower  # (the first step's memory check lowers it)
    return slow

  monkeypatch.setattr(scan, "step_fn", slow_step_fn)
  with pytest.raises(CorruptStoreError, match="chunk 9"):
    scan.scan_store(s, q, K, mesh=MESHES["1x1"](), chunk_rows=64, prefetch=3)
  assert len(dispatched) >= 4 and len(finished) == len(dispatched)


def test_quarantined_rows_are_never_returned(tmp_path):
  x, q = _data(300)
  m = store_lib.Manifest(
      checkpoint="c", step=1, params_fingerprint="p", correction="adam",
      epsilon=1e-8, projection_seed=0, layout=None, dim=x.shape[1],
      basis_fingerprint=None, dtype="float32", num_rows=len(x), chunk_rows=64)
  s = store_lib.create_or_open(tmp_path / "q", m)
  # With k = every other row, a scan that let the zero rows in would return
  # some of them on both sides.
  bad = {5: "non-finite loss", 70: "non-finite gradient", 299: "non-finite loss"}
  for c in s.pending_chunks():
    lo, hi = s.chunk_bounds(c)
    s.write_chunk(c, x[lo:hi], {r: w for r, w in bad.items() if lo <= r < hi})
  k = len(x) - len(bad)  # every other row: the quarantined ones must still miss
  got = scan.scan_store(s, q, k, mesh=MESHES["4x2"]())
  for rows in (got.proponent_rows, got.opponent_rows):
    assert not np.isin(rows, list(bad)).any()
    assert (np.sort(rows, axis=1) == np.setdiff1d(np.arange(len(x)), list(bad))).all()
  want = x.copy()
  want[list(bad)] = 0
  ref = reference(np.delete(want, list(bad), axis=0), q, 10)
  keep = np.setdiff1d(np.arange(len(x)), list(bad))
  top = scan.scan_store(s, q, 10)
  np.testing.assert_array_equal(top.proponent_rows, keep[ref.proponent_rows])
  np.testing.assert_allclose(top.proponent_scores, ref.proponent_scores, rtol=1e-6)


def test_scan_benchmark_runs(tmp_path):
  # The CPU command in WORKSPACE.md (every row of the roofline table), small.
  # The function checks the scans' top-k against numpy (and faiss, if there).
  from tracer.launch import benchmark_scan  # pylint: disable=g-import-not-at-top
  table = benchmark_scan.run_scan_benchmark(
      rows=3000, dim=64, queries=4, k=5, chunk_rows=512, store_chunk_rows=256,
      repeats=1, workdir=str(tmp_path), mesh=MESHES["1x1"](), eval_examples=6,
      block=32, probe_repeats=1)
  methods = [row["method"] for row in table]
  for name in ("tracer scan_arrays bf16, 64B-aligned",
               "XLA matmul alone, f32 64B-aligned", "tracer scan_store float32",
               "tracer scan_store bfloat16, checksums not verified",
               "tracer scan_store bfloat16 + scan-time R",
               "tracer scan_arrays int8 + scan-time R",
               "tracer scan_store int8 + scan-time R",
               "numpy matmul+argpartition f32"):
    assert name in methods, methods
  assert table[0]["method"] == "machine" and table[0]["GFLOP_per_s"] > 0
  for row in table[1:]:
    if row["seconds"] is not None:
      assert row["seconds"] > 0 and row["rows_per_s"] > 0, row
      # 4 significant digits: a tiny scan's roofline is not rounded to 0.
      assert row["roofline_s"] > 0 and row["fraction_of_roofline"] > 0, row
      assert row["GB_per_s"] > 0 and row["GFLOP_per_s"] > 0, row  # not rounded to 0
  matmul = next(r for r in table if r["method"].startswith("XLA matmul alone"))
  assert "6 steps of 512 rows" in matmul["note"], matmul["note"]
  assert "| tracer scan_store float32 |" in benchmark_scan.to_markdown(table)


def test_scan_benchmark_rows_past_the_memory_are_refused():
  # ``tracer benchmark-scan --rows=100000000000`` was numpy's "Unable to
  # allocate 373 TiB" traceback; now refused before any array, in the
  # host's memory (the scan, --serve_pass) or a device's (the resident
  # modes, each device holding its share).
  from tracer.launch import benchmark_scan  # pylint: disable=g-import-not-at-top
  check = benchmark_scan.check_memory
  check(1000, 100, "scan", host_bytes=14 * 1000 * 100)  # fits exactly
  with pytest.raises(InputError, match=r"^--rows=1001 --dim=100: the scan benchmark "
                     r"holds about 14 bytes per element of its rows x dim encodings, "
                     r"1,401,400 bytes, more than this host's 1,400,000 bytes; "
                     r"expected at most 1,000 rows at --dim=100$"):
    check(1001, 100, "scan", host_bytes=14 * 1000 * 100)
  with pytest.raises(InputError, match="--serve_pass holds about 10 bytes"):
    check(1001, 100, "serve_pass", host_bytes=10 * 1000 * 100)
  # On a CPU (no device figure) the resident rows are the host's.
  check(1000, 100, "resident", host_bytes=4 * 1000 * 100, device_bytes=None, devices=8)
  with pytest.raises(InputError, match="more than this host's"):
    check(1001, 100, "resident", host_bytes=4 * 1000 * 100, devices=8)
  check(8000, 100, "resident", host_bytes=1, device_bytes=4 * 1000 * 100, devices=8)
  with pytest.raises(InputError, match=r"320,050 bytes on each of 8 devices, more "
                     r"than a device's 320,000 bytes of memory; expected at most "
                     r"6,400 rows"):
    check(6401, 100, "resident", device_bytes=320_000, devices=8)
  with pytest.raises(InputError, match="--fused_tiles holds about 2 bytes"):
    check(1001, 100, "fused_tiles", device_bytes=2 * 1000 * 100)
  # --staged_pool_mb: beside its bf16 rows, a block of f32 noise (of 2^20
  # rows at most: 4 GiB at d = 1,024) and the pool as the scan takes it (at
  # most a quarter of the host). Before, 2 bytes an element alone.
  beside = benchmark_scan.staged_beside_bytes
  assert beside(4_000_000, 1024, 768, host=64 << 30) == (4 << 30) + (768 << 20)
  assert beside(1000, 100, 768, host=1 << 30) == 1000 * 100 * 4 + (256 << 20)
  check(1000, 100, "staged", host_bytes=2 * 1000 * 100 + 5000, beside=5000)
  with pytest.raises(InputError, match=r"^--rows=1001 --dim=100: --staged_pool_mb "
                     r"holds about 2 bytes per element of its rows x dim encodings "
                     r"and 5,000 bytes beside them, 205,200 bytes, more than this "
                     r"host's 205,000 bytes; expected at most "
                     r"1,000 rows at --dim=100$"):
    check(1001, 100, "staged", host_bytes=2 * 1000 * 100 + 5000, beside=5000)


def test_serve_pass_benchmark_runs(tmp_path):
  # ``tracer benchmark-scan --serve_pass``: on the CPU the bf16 store's pass
  # answers bit for bit as the f32 store's of the same values.
  from tracer.launch import benchmark_scan  # pylint: disable=g-import-not-at-top
  table = benchmark_scan.run_serve_pass_benchmark(
      rows=300, dim=64, queries=4, k=5, store_chunk_rows=64, repeats=1,
      block=32, workdir=str(tmp_path), mesh=MESHES["1x1"](), task=6, requests=3)
  streamed = "serve streamed bfloat16, {} of 8 queries: {}"
  assert [r["method"] for r in table] == [
      f"serve pass {dtype}, {n}" for n in ("1 query", "4 queries")
      for dtype in ("float32", "bfloat16")] + [
          f"serve pass bfloat16, 1 query, task R of 6: norms {how}"
          for how in ("in the pass", "held")] + [
          streamed.format(j, how) for j, one in (
              ("1 request", "one scan_stores"), ("2 requests", "one pass of windows"),
              ("3 requests", "one pass of windows"))
          for how in (one, "a scan_stores per request")]
  assert all(r["seconds"] > 0 for r in table)
  assert [r["agrees"] for r in table[:6]] == [None, 1.0, None, 1.0, None, 1.0]
  assert [r["error"] for r in table[:4]] == [None, 0.0, None, 0.0]
  # Norms held (one program) and computed in the pass (another) round apart:
  # 7.6e-8 here since 2026-12-05, when metric counts were padded to 2 so
  # that a request alone and batched score alike (test_serve.py).
  assert table[4]["error"] is None and table[5]["error"] < 1e-6
  # The streamed batch against a scan per request: the same rows here (a
  # near tie could swap two), scores to float32 rounding.
  assert [r["agrees"] for r in table[6:]] == [1.0, None] * 3
  assert all(r["error"] < 1e-5 for r in table[6::2])


def test_default_steps_shrink_with_the_queries(monkeypatch):
  """A step's scores grow with Q: default steps get fewer rows past
  ``SCORE_STEPS`` x the rows' bytes (at 60,000 queries the old step asked
  ~13 GiB per CPU device and aborted the process), and give the top-k of an
  explicit step."""
  mesh = MESHES["8x1"]()
  budget = scan.SCORE_STEPS * scan.DEFAULT_DEVICE_CHUNK_BYTES
  assert scan.query_capped_step(8 * 65536, 64, mesh) == 8 * 65536  # (unchanged)
  rows = budget // (scan.PAIR_BYTES * 20000)
  assert scan.query_capped_step(8 * 65536, 20000, mesh) == 8 * rows
  assert scan.query_capped_step(8 * 65536, 20000, mesh, 1024) == 8 * (rows // 1024 * 1024)
  assert scan.query_capped_step(8 * 65536, 10**7, mesh, 16) == 8 * 16  # (one multiple)
  steps = []
  layout = scan._Layout
  monkeypatch.setattr(scan, "_Layout", lambda mesh, step, *a, **kw: (
      steps.append(step), layout(mesh, step, *a, **kw))[1])
  monkeypatch.setattr(scan, "DEFAULT_DEVICE_CHUNK_BYTES", 1 << 20)  # (small rows)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((6000, 64), dtype=np.float32)
  q = rng.standard_normal((300, 64), dtype=np.float32)
  got = scan.scan_arrays(x, q, 5, mesh=mesh)
  # 4 MiB of scores at 8 bytes a pair: 1,747 rows per device, not the
  # 750 of the rows (1 MiB at 256 bytes is 4,096, then the corpus's 6,000).
  assert set(steps) == {8 * min(4 * (1 << 20) // (8 * 300), 750)}
  q = rng.standard_normal((3000, 64), dtype=np.float32)
  got = scan.scan_arrays(x, q, 5, mesh=mesh)
  assert steps[-1] == 8 * (4 * (1 << 20) // (8 * 3000))  # 174 rows per device
  want = scan.scan_arrays(x, q, 5, mesh=mesh, chunk_rows=6000)
  for field in got._fields:  # (each row's score is one dot product, whatever the step)
    np.testing.assert_array_equal(getattr(got, field), getattr(want, field))


def _many_queries(tmp_path, monkeypatch, record):
  """800 stored f32 rows of d = 256 and 20,000 queries, on a host of
  ``MANY_QUERIES_HOST``: each run's ``record(qs, args)`` (of ``_scan_run``)
  and every count of a step (``memory.program_bytes``) are kept. Returns
  the rows, queries, store, runs, counts, and the unpatched ``_scan_run``
  and count."""
  from tracer import memory  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = rng.standard_normal((800, 256), dtype=np.float32)
  q = rng.standard_normal((20000, 256), dtype=np.float32)
  runs, counts = [], []
  run, count = scan._scan_run, memory.program_bytes
  monkeypatch.setattr(scan, "_scan_run", lambda sources, qs, *a: (
      runs.append(record(qs, a)), run(sources, qs, *a))[1])
  monkeypatch.setattr(memory, "program_bytes",
                      lambda *a: counts.append(count(*a)) or counts[-1])
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: MANY_QUERIES_HOST)
  return x, q, _store(tmp_path, x, "float32"), runs, counts, run, count


MANY_QUERIES_HOST = 64 << 20


def test_queries_past_the_memory_are_scanned_in_runs(tmp_path, monkeypatch):
  """Queries whose step would take more than half a device's share of the
  host (the queries and their top-k sit whole on every device) are scanned
  in equal runs of fewer, each a pass over the store, the last padded with
  zero queries: each run's results are a scan of its queries alone, bit for
  bit, and ``progress`` counts every run's rows. Before 2026-12-06 (stop 71)
  such a scan was refused ("split the queries into several runs")."""
  from tracer import memory  # pylint: disable=g-import-not-at-top
  x, q, s, runs, counts, run, count = _many_queries(
      tmp_path, monkeypatch, lambda qs, _: qs[0].copy())
  mesh = MESHES["8x1"]()
  host = MANY_QUERIES_HOST
  seen, plans = [], []
  got = scan.scan_store(s, q, K, mesh=mesh, shard_queries=False,
                        progress=lambda n, t: seen.append((n, t)),
                        on_plan=plans.append)
  batch = len(runs[0])
  assert len(runs) == -(-20000 // batch) > 1, len(runs)
  assert [p._replace(step=None) for p in plans] == [
      scan.QueryPlan(20000, len(runs), batch, False, 8)]
  assert scan.QueryPlan(3, 1, 64, True, 1).describe() == (
      "scan: 3 queries split over the 1 device (64 with the padding, 64 a "
      "device), one pass over the rows")
  with pytest.raises(InputError, match=r"^num_queries: 100 split over the "
                     r"mesh's 8 devices; expected a multiple of 8"):
    topk.init_topk(100, 5, MESHES["8x1"](), split=True)
  assert scan.QueryPlan(512, 1, 512, True, 8).describe() == (
      "scan: 512 queries split over the 8 devices (512, 64 a device), one "
      "pass over the rows")
  assert scan.QueryPlan(48, 1, 48, False, 1, sets=2).describe() == (
      "scan: 48 queries in 2 sets, each under its own metric, whole on the "
      "one device, one pass over the rows")
  assert plans[0].describe() == (
      f"scan: 20,000 queries in {len(runs)} passes over the rows, {batch:,} a "
      "pass (all at once, their step would not fit half of a device's memory)")
  assert {len(r) for r in runs} == {batch}
  np.testing.assert_array_equal(np.concatenate(runs)[:20000], q)
  assert not np.any(np.concatenate(runs)[20000:])  # (the padding)
  # The run's step fits half of a device's eighth of the host; twice the
  # queries' would not.
  assert max(counts[-2:]) <= host // 8 // 2 < count(*_first_step_args(mesh, s, 2 * batch))
  assert seen[-1] == (len(runs) * 800, len(runs) * 800)
  assert [n for n, _ in seen] == sorted(n for n, _ in seen)
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: 64 << 30)
  monkeypatch.setattr(scan, "_scan_run", run)
  want = [scan.scan_store(s, r, K, mesh=mesh) for r in runs]
  for field in got._fields:
    np.testing.assert_array_equal(
        getattr(got, field), np.concatenate([getattr(w, field) for w in want])[:20000])
  # Numpy's top-k of the same queries (float64 scores; rows agree where no
  # two scores lie within float32's rounding).
  ref = reference(x, q[:50], K)
  np.testing.assert_array_equal(got.proponent_rows[:50], ref.proponent_rows)
  np.testing.assert_allclose(got.proponent_scores[:50], ref.proponent_scores,
                             atol=1e-4, rtol=0)


def _first_step_args(mesh, store, num_queries):
  """Arguments shaped as a default ``scan_store`` step's with
  ``num_queries`` queries (for ``memory.program_bytes``)."""
  layout = scan._Layout(mesh, 8 * store.chunk_rows, store.dim, np.dtype(np.float32),
                        piece_rows=store.chunk_rows)
  rep = partitioning.replicated(mesh)
  state = topk.TopKState(*(jax.ShapeDtypeStruct((num_queries, K), t, sharding=rep)
                           for t in (jnp.float32, jnp.int32) * 2))
  return (topk.step_fn(mesh, K, True, None), state, *layout.specs(),
          jax.ShapeDtypeStruct((num_queries, store.dim), jnp.float32, sharding=rep))


def _bit_equal(got: scan.TopK, want: scan.TopK):
  for field in got._fields:
    np.testing.assert_array_equal(getattr(got, field), getattr(want, field),
                                  err_msg=field)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_queries_split_over_the_devices_score_as_whole_ones(tmp_path, dtype):
  """``shard_queries=True`` (``topk.ring_step_fn``: each device holds a
  block of the queries and its top-k, and the blocks go around the
  devices) gives the whole queries' results bit for bit where both are
  whole multiples of 64 queries (512: blocks of 64 on 8 devices, of 128 on
  4x2), with and without a row metric, from stored chunks (several pieces
  a device) and summed over two stores; padded (100 queries), numpy's."""
  rng = np.random.default_rng(3)
  x = rng.standard_normal((1000, 256), dtype=np.float32)
  x2 = rng.standard_normal((1000, 256), dtype=np.float32)
  q = rng.standard_normal((512, 256), dtype=np.float32)
  q2 = rng.standard_normal((512, 256), dtype=np.float32)
  s = _store(tmp_path, x, dtype)
  s2 = _store(tmp_path / "second", x2, dtype)
  metric = topk.RowMetric(
      np.abs(rng.standard_normal(256)).astype(np.float32),
      tuple(0.1 * rng.standard_normal((128, 4), dtype=np.float32) for _ in range(2)),
      ((0, 128), (128, 256)))
  for name in ("8x1", "4x2"):
    mesh = MESHES[name]()
    for kind, run in (
        ("plain", lambda split: scan.scan_store(s, q, K, mesh=mesh,
                                                shard_queries=split)),
        ("metric", lambda split: scan.scan_store(s, q, K, mesh=mesh, metric=metric,
                                                 shard_queries=split)),
        ("summed", lambda split: scan.scan_stores(
            [s, s2], [q, q2], K, mesh=mesh, metrics=[None, metric],
            shard_queries=split))):
      split, whole = run(True), run(False)
      assert split.proponent_rows.shape == (512, K), (name, kind)
      _bit_equal(split, whole)
  stored = s.read_rows(0, 1000)  # (bf16-rounded values)
  got = scan.scan_store(s, q[:100], K, mesh=MESHES["4x2"](), shard_queries=True)
  assert_same(got, reference(stored, q[:100], K), atol=1e-4)
  # In memory too: f32 rows mapped in place, and one device (a ring of one).
  for name in ("8x1", "1x1"):
    got = scan.scan_arrays(stored, q[:100], K, mesh=MESHES[name](),
                           shard_queries=True)
    assert_same(got, reference(stored, q[:100], K), atol=1e-4)


def test_queries_past_the_memory_are_split_over_the_devices(tmp_path, monkeypatch):
  """Where whole queries would need several passes over the rows (20,000
  queries, a 64 MiB host, 8 devices: 15 runs), the default scan splits
  them over the devices instead: fewer passes (each device holds an eighth
  of them), every run's step within half a device's share, rows equal to
  numpy's and bits equal to a split scan that fits in one pass."""
  from tracer import memory  # pylint: disable=g-import-not-at-top
  x, q, s, runs, counts, run, _ = _many_queries(
      tmp_path, monkeypatch, lambda qs, args: (len(qs[0]), args[-1]))
  mesh = MESHES["8x1"]()
  host = MANY_QUERIES_HOST
  whole = scan.scan_store(s, q, K, mesh=mesh, shard_queries=False)
  whole_runs = len(runs)
  assert whole_runs > 1 and not any(split for _, split in runs), runs
  runs.clear()
  seen, plans = [], []
  got = scan.scan_store(s, q, K, mesh=mesh,
                        progress=lambda n, t: seen.append((n, t)),
                        on_plan=plans.append)
  assert runs and all(split for _, split in runs), runs
  assert [p._replace(step=None) for p in plans] == [
      scan.QueryPlan(20000, len(runs), runs[0][0], True, 8)]
  assert plans[0].describe() == (
      f"scan: 20,000 queries split over the 8 devices in {len(runs)} passes "
      f"over the rows ({runs[0][0]:,} a pass with the padding, "
      f"{runs[0][0] // 8:,} a device)")
  assert len(runs) < whole_runs, (runs, whole_runs)
  assert {n for n, _ in runs} == {runs[0][0]} and runs[0][0] % (8 * 64) == 0
  assert max(counts[-2:]) <= host // 8 // 2
  assert seen[-1] == (len(runs) * 800, len(runs) * 800)
  ref = reference(x, q[:50], K)
  np.testing.assert_array_equal(got.proponent_rows[:50], ref.proponent_rows)
  np.testing.assert_allclose(got.proponent_scores[:50], ref.proponent_scores,
                             atol=1e-4, rtol=0)
  np.testing.assert_allclose(got.proponent_scores, whole.proponent_scores,
                             atol=1e-4, rtol=0)
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: 64 << 30)
  monkeypatch.setattr(scan, "_scan_run", run)
  _bit_equal(got, scan.scan_store(s, q, K, mesh=mesh, shard_queries=True))


def test_query_runs_are_the_fewest_that_fit():
  """``query_batch``: every query where the count allows, else the fewest
  equal runs whose count is at most 1 / QUERY_MEMORY_FRACTION of the
  memory, at least one query a run."""
  count = lambda n: 1000 + 10 * n
  assert scan.query_batch(100, count, 2 * 2000) == 100
  assert scan.query_batch(100, count, 2 * 1999) == 50  # 2 runs of 50
  assert scan.query_batch(100, count, 2 * 1330) == 25  # 33 fit: 4 runs of 25
  assert scan.query_batch(101, count, 2 * 1500) == 34  # 50 fit: 3 runs of 34
  # One query's step past half: the fewest runs within all of the memory
  # (not 100 runs of one).
  assert scan.query_batch(100, count, 2000) == 100
  assert scan.query_batch(100, count, 1500) == 50
  assert scan.query_batch(100, count, 500) == 1  # (refused when it runs)
  assert scan.query_batch(100, lambda n: None, 1) == 100  # (not counted)
  tries = []
  scan.query_batch(10**6, lambda n: tries.append(n) or 10**6 + 10**3 * n, 10**8)
  assert len(tries) <= 4, tries  # (Q, 1, then 1-2 guesses)


def test_a_query_past_the_memory_is_refused_before_the_scan(monkeypatch):
  """What one query's step cannot fit is refused before any step runs,
  naming the user's queries, the runs they were cut into, the step's rows
  and k (the query runs cannot shrink it). Split queries are named with
  their padding, and shard_queries=False is offered where the user asked
  for the split (before 2026-12-06 evening, 3 queries split were named as
  the 512 of their padding, with "fewer queries per scan" as the fix)."""
  from tracer import memory  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: 1 << 20)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((8000, 256), dtype=np.float32)
  q = rng.standard_normal((20, 256), dtype=np.float32)
  mesh = MESHES["8x1"]()
  with pytest.raises(InputError, match=r"^queries: 20 queries of d=256 with "
                     r"k=5, in 20 runs of 1: a scan step of 1,000 rows per "
                     r"device takes [\d.]+ \w+ "
                     r"on each of this host's 8 devices, [\d.]+ \w+ in all "
                     r"\(XLA's count after compiling\), more than this host's "
                     r"1.0 MiB; expected fewer rows per step \(chunk_rows\) or a "
                     r"smaller k$"):
    scan.scan_arrays(x, q, 5, mesh=mesh, chunk_rows=8000)
  with pytest.raises(InputError, match=r"^queries: 1 query of d=256 with "
                     r"k=5: a scan step of 1,000 rows per device"):
    scan.scan_arrays(x, q[:1], 5, mesh=mesh, chunk_rows=8000)
  with pytest.raises(InputError, match=r"^queries: 3 queries of d=256 with "
                     r"k=5, split over the 8 devices \(512 with the padding, 64 "
                     r"a device\): a scan step of 1,000 rows per device takes .*; "
                     r"expected fewer rows per step \(chunk_rows\) or a smaller "
                     r"k or shard_queries=False \(--shard_queries=never\)$"):
    scan.scan_arrays(x, q[:3], 5, mesh=mesh, chunk_rows=8000, shard_queries=True)


def test_the_default_splits_only_where_the_split_step_fits(monkeypatch):
  """Where whole queries need two runs and split ones (padded to 64 a
  device, one run) would not fit at all, the default scans the whole
  queries in runs rather than refusing the split."""
  from tracer import memory  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = rng.standard_normal((8000, 256), dtype=np.float32)
  q = rng.standard_normal((20, 256), dtype=np.float32)
  mesh = MESHES["8x1"]()
  count, run = memory.program_bytes, scan._scan_run

  def first_count(n, split):
    counts = []
    monkeypatch.setattr(memory, "program_bytes",
                        lambda *a: counts.append(count(*a)) or counts[-1])
    scan.scan_arrays(x, q[:n], 5, mesh=mesh, chunk_rows=8000, shard_queries=split)
    return counts[-1]

  whole10, whole20, split20 = (first_count(10, False), first_count(20, False),
                               first_count(20, True))
  assert whole10 < whole20 < split20  # (the premise)
  have = (whole10 + whole20) // 2  # a device's: 10 whole queries fit, not 20
  monkeypatch.setattr(memory, "program_bytes", count)
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: 8 * have)
  runs = []
  monkeypatch.setattr(scan, "_scan_run", lambda sources, qs, *a: (
      runs.append((len(qs[0]), a[-1])), run(sources, qs, *a))[1])
  got = scan.scan_arrays(x, q, 5, mesh=mesh, chunk_rows=8000)
  assert runs == [(10, False), (10, False)], runs
  ref = reference(x, q, 5)
  np.testing.assert_array_equal(got.proponent_rows, ref.proponent_rows)


def test_every_scan_is_held_to_xla_s_count(monkeypatch):
  """int8 rows under a row metric take ~37x a rough count of rows, queries
  and scores (the rows widened to f32, the metric's tiles): before
  2026-12-06 such a count chose which scans XLA's count checked, and this
  one, 37 MB on 8 devices, ran against a host of 16 MB."""
  from tracer import memory  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: 16 << 20)
  rng = np.random.default_rng(0)
  x = rng.integers(-100, 100, (1000, 1024), dtype=np.int8)
  q = rng.standard_normal((1, 1024), dtype=np.float32)
  metric = topk.RowMetric(np.ones(1024, np.float32),
                          (0.01 * rng.standard_normal((1024, 8), dtype=np.float32),),
                          ((0, 1024),))
  with pytest.raises(InputError, match=r"^queries: 1 query of d=1,024 with k=5: "
                     r"a scan step of [\d,]+ rows per device takes [\d.]+ MiB on each "
                     r"of this host's 8 devices"):
    scan.scan_arrays(x, q, 5, mesh=MESHES["8x1"](), metric=metric)
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: 64 << 20)
  assert scan.scan_arrays(x, q, 5, mesh=MESHES["8x1"](), metric=metric).proponent_rows.shape == (1, 5)


def test_a_scan_on_some_devices_is_held_to_theirs(monkeypatch):
  """A mesh of one of this process's 8 CPU devices: its step is counted
  once against the host, not 8 times (before 2026-12-06 this scan, its
  step a quarter of the host, was refused)."""
  from tracer import memory  # pylint: disable=g-import-not-at-top
  counted = []
  count = memory.program_bytes
  monkeypatch.setattr(memory, "program_bytes",
                      lambda *a: counted.append(count(*a)) or counted[-1])
  rng = np.random.default_rng(0)
  # (Aligned, so used in place: an unaligned copy's pool, within a quarter
  # of the host, would shrink the steps until runs of fewer queries fit.)
  x = scan.aligned_empty((2000, 256), np.float32)
  x[...] = rng.standard_normal((2000, 256), dtype=np.float32)
  q = rng.standard_normal((300, 256), dtype=np.float32)
  want = scan.scan_arrays(x, q, K, mesh=MESHES["1x1"]())
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: 4 * counted[0])
  got = scan.scan_arrays(x, q, K, mesh=MESHES["1x1"]())
  for field in got._fields:
    np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: q.nbytes // 2)
  with pytest.raises(InputError, match=r"^queries: 300 queries of d=256 with "
                     r"k=5, in 300 runs of 1: a scan step of 2,000 rows per "
                     r"device takes [\d.]+ MiB \(XLA's count"):
    scan.scan_arrays(x, q, K, mesh=MESHES["1x1"]())


def test_query_sets_benchmark_runs(tmp_path):
  # ``tracer benchmark-scan --query_sets`` (WORKSPACE.md), small.
  from tracer.launch import benchmark_scan  # pylint: disable=g-import-not-at-top
  table = benchmark_scan.run_query_sets_benchmark(
      sets=3, rows=2000, dim=64, queries=4, k=5, store_chunk_rows=256,
      repeats=1, workdir=str(tmp_path), eval_examples=16, block=32,
      sizes=["4", "1", "2"])
  assert [r["method"] for r in table] == [
      "scan_store per set (3 passes)", "scan_sets (one pass)",
      "scan_sets split over 8 devices (one pass)"]
  assert "sets of 4+1+2 queries" in table[0]["note"], table[0]
  assert "rows the same: 1.0000" in table[2]["note"], table[2]
  assert all(r["seconds"] > 0 for r in table)
  assert "rows the same: 1.0000" in table[1]["note"], table[1]


def test_query_sets_benchmark_holds_what_its_check_counts(tmp_path):
  """``--query_sets``'s peak host bytes (numpy's, by tracemalloc) within the
  ``HOST_BYTES_PER_ELEMENT`` its memory check counts. Until an audit on
  2026-12-08 its rows were drawn in f64 and narrowed: 12 bytes an element
  against the 6 counted (8 once drawn in f32 but normed through a
  temporary as large)."""
  import tracemalloc  # pylint: disable=g-import-not-at-top
  from tracer.launch import benchmark_scan  # pylint: disable=g-import-not-at-top
  rows, dim = 20_000, 256
  tracemalloc.start()
  try:
    benchmark_scan.run_query_sets_benchmark(
        sets=2, rows=rows, dim=dim, queries=2, k=5, store_chunk_rows=4096,
        repeats=1, workdir=str(tmp_path), eval_examples=8, block=128)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  per = benchmark_scan.HOST_BYTES_PER_ELEMENT["query_sets"]
  assert peak <= per * rows * dim, peak / (rows * dim)


def test_query_step_benchmark_runs(monkeypatch):
  # ``tracer benchmark-scan --query_steps`` (WORKSPACE.md), small.
  from tracer.launch import benchmark_scan  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(scan, "DEFAULT_DEVICE_CHUNK_BYTES", 1 << 20)  # (small rows)
  table = benchmark_scan.run_query_step_benchmark(rows=4000, dim=64,
                                                  queries=3000, k=5, repeats=1)
  assert [r["method"] for r in table] == [
      "machine", "steps that ignore Q (before 2026-12-06)",
      "default steps, capped by Q",
      "default steps, in runs (memory fits 750 whole queries' step)",
      "default steps, queries split over 8 devices (memory fits 750 whole "
      "queries' step)",
      "default steps, queries split over 8 devices (shard_queries=True, this "
      "machine's memory)"]
  before, now, runs, split, always = table[1:]
  assert always["note"].startswith("1 run of 3,072 queries, x")
  assert runs["note"].startswith("4 runs of 750 queries, x") and runs["seconds"] > 0
  # Split, an eighth of the queries a device: one pass, of 3,072 (8 blocks
  # of 6 x 64).
  assert split["note"].startswith("1 run of 3,072 queries, x") and split["seconds"] > 0
  assert 0 < split["step_GiB"] and 0 < runs["step_GiB"]
  assert before["seconds"] > 0 and now["seconds"] > 0
  assert now["step_rows_per_device"] < before["step_rows_per_device"]
  assert 0 < now["step_GiB"] < before["step_GiB"]
  assert now["note"].startswith(f"x{now['step_GiB'] / before['step_GiB']:.2f} the memory")


def test_resident_benchmark_runs():
  # The GPU command in WORKSPACE.md (``--resident``), on a CPU device.
  from tracer.launch import benchmark_scan  # pylint: disable=g-import-not-at-top
  table = benchmark_scan.run_resident_benchmark(
      rows=3000, dim=64, queries=4, k=5, step_rows=1024, repeats=1,
      mesh=MESHES["1x1"](), matmul_size=256, fused=True)
  assert [r["method"] for r in table] == [
      "machine", "resident scan bfloat16", "resident scan float32",
      "resident scan int8"]
  for row in table[1:]:
    assert row["seconds"] > 0 and 0 < row["fraction_of_bandwidth"]
    assert row["scores_only_seconds"] > 0 and row["xla_top_k_seconds"] > 0
    assert row["branch_free_seconds"] > 0
  assert table[1]["one_dot_scores_seconds"] > 0
  assert table[2]["one_dot_scores_seconds"] is None
  # The fused kernel (interpreted on the CPU), bf16 rows only.
  assert table[1]["fused_error"] is None
  assert table[1]["fused_seconds"] > 0 and table[1]["fused_scores_seconds"] > 0
  assert table[1]["fused_branch_free_seconds"] > 0
  assert min(table[1][key] for key in (
      "metric_seconds", "norms_seconds", "norms_highest_seconds")) > 0
  assert table[2]["metric_seconds"] is None
  assert table[2]["fused_seconds"] is None
  assert table[3]["metric_seconds"] > 0 and table[3]["fused_seconds"] is None
  assert "| resident scan bfloat16 |" in benchmark_scan.to_markdown(table)


def test_fused_tiles_benchmark_runs():
  # ``--fused_tiles`` (the GPU's tile sweep in WORKSPACE.md), interpreted on
  # the CPU: each setting's step agrees with the default step; a setting the
  # kernel does not take is reported, not raised; bad flags are named.
  from tracer.launch import benchmark_scan  # pylint: disable=g-import-not-at-top
  tiles = [benchmark_scan.parse_tiles(t) for t in ("64:32:4:3", "2048:32:4:3")]
  table = benchmark_scan.run_fused_tiles_benchmark(
      tiles, rows=2048, dim=64, queries=4, k=5, step_rows=1024, repeats=1)
  assert [r["method"] for r in table] == [
      "machine", "default step (XLA)", "fused 64:32:4:3", "fused 2048:32:4:3"]
  assert table[1]["step_seconds"] > 0 and table[1]["scores_seconds"] > 0
  assert table[2]["agrees"] is True and table[2]["step_seconds"] > 0
  assert "unsupported" in table[3]["error"]  # 2048 rows per program: more than a step
  assert "| fused 64:32:4:3 |" in benchmark_scan.to_markdown(table)
  with pytest.raises(ValueError, match="--fused_tiles: '64:32' is not"):
    benchmark_scan.parse_tiles("64:32")
  with pytest.raises(ValueError, match="--fused_tiles: '48:32:4:3': expected ROWS "
                     "and DIM powers of two"):  # (Triton cannot lower it)
    benchmark_scan.parse_tiles("48:32:4:3")


def test_staged_benchmark_runs(monkeypatch):
  """``--staged_pool_mb`` (the GPU's staged steps against the pooled ones):
  on the CPU the default is the pooled steps; with a device memory patched
  in (as a GPU's), staged steps of the device's size, the pool restored."""
  from tracer import memory  # pylint: disable=g-import-not-at-top
  from tracer.launch import benchmark_scan  # pylint: disable=g-import-not-at-top
  kwargs = dict(rows=20_000, dim=64, queries=4, k=5, pool_mb=1, repeats=1)
  table = benchmark_scan.run_staged_benchmark(**kwargs)
  assert [r["method"] for r in table] == [
      "machine", "steps the pool bounds (before stop 75)", "default steps"]
  assert table[1]["step_rows_per_device"] == table[2]["step_rows_per_device"]
  assert "the pooled steps" in table[2]["note"]
  monkeypatch.setattr(memory, "device_memory_bytes", lambda: 1 << 30)
  table = benchmark_scan.run_staged_benchmark(**kwargs)
  # 1 MiB over 8 devices, 6 sets of 128-byte rows: 170 rows a device a step;
  # staged in pieces of at most 512 (2 sets): all 2,500 rows a device.
  assert table[1]["step_rows_per_device"] == 170
  assert table[2]["step_rows_per_device"] == 2_500
  assert table[2]["seconds"] > 0 and "staged: 5 pieces of 500 rows" in table[2]["note"]
  assert scan.HOST_BUFFER_BYTES == 8 << 30


def test_staged_benchmark_reports_the_pool_the_scan_took(monkeypatch):
  """Where a quarter of the host is less than ``--staged_pool_mb`` (1 MiB
  asked of a 2 MiB host: 512 KiB taken), the pooled steps are bounded by
  the pool taken and the staged note is the scan's own plan: 10 pieces of
  250 rows a device, as its steps ran. Before, both were figured from the
  pool asked: 170 rows a device a pooled step, "5 pieces of 500 rows"."""
  from tracer import memory  # pylint: disable=g-import-not-at-top
  from tracer.launch import benchmark_scan  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(memory, "device_memory_bytes", lambda: 1 << 30)
  monkeypatch.setattr(memory, "host_memory_bytes", lambda: 2 << 20)
  ran, run = [], scan._scan_run
  monkeypatch.setattr(scan, "_scan_run", lambda sources, qs, k, mesh, layout, *a: (
      ran.append((layout.step // mesh.size, layout.num_pieces, layout.staged, a[2])),
      run(sources, qs, k, mesh, layout, *a))[1])
  table = benchmark_scan.run_staged_benchmark(rows=20_000, dim=64, queries=4, k=5,
                                              pool_mb=1, repeats=1)
  # 64 KiB a device: 6 sets of 85 128-byte rows; staged, 2 sets of 256 at most.
  assert [(r["step_rows_per_device"], r["note"].split("; x")[0])
          for r in table[1:]] == [
              (85, "6 sets of a step"),
              (2_500, "staged: 10 pieces of 250 rows a device, 2 sets of a piece")]
  assert set(ran) == {(85, 1, False, 6), (2_500, 10, True, 2)}, set(ran)
  assert "a pool of 1 MiB asked, 0.5 MiB taken" in table[0]["note"]


def test_scan_memory_benchmark_fits_its_sweeps(tmp_path, capsys, monkeypatch):
  """``tracer benchmark-data --scan_memory`` small, its phases in this
  process (8 devices): each run reports the pool as planned and the sets
  made, each sweep its slopes; the store is written once and kept."""
  from tracer.launch import benchmark_data  # pylint: disable=g-import-not-at-top
  envs = []

  def in_process(phase, *flags_, env=None):
    assert not flags_
    envs.append(env)
    what, *args = benchmark_data.parse_phase(phase.removeprefix("--phase="))
    assert what == "scan_memory"
    return benchmark_data.phase_scan_memory(*args)

  monkeypatch.setattr(benchmark_data, "run_phase", in_process)
  pool = scan._BufferPool
  sweeps = {name: {"dtype": dtype, "devices": 8, "dim": 64, "store_chunk_rows": 128,
                   "rows": 4 * 512, "sizes": (256, 512), "queries": 2}
            for name, dtype in (("bf16", "bfloat16"), ("f32", "float32"))}
  out = benchmark_data.scan_memory_table(list(sweeps), str(tmp_path), sweeps)
  assert scan._BufferPool is pool  # (the phase's counting pool undone)
  assert [(r["sweep"], r["devices"], r["step_rows"], r["step_bytes"], r["pool_sets"],
           r["pool_bytes"]) for r in out["runs"]] == [
               ("bf16", 8, 256, 256 * 64 * 2, 6, 6 * 256 * 64 * 2),
               ("bf16", 8, 512, 512 * 64 * 2, 6, 6 * 512 * 64 * 2),
               ("f32", 8, 256, 256 * 64 * 4, 6, 6 * 256 * 64 * 4),
               ("f32", 8, 512, 512 * 64 * 4, 6, 6 * 512 * 64 * 4)]
  assert all(1 <= r["pool_made"] <= 6 for r in out["runs"])
  # (Runs this small move RSS by less than its counters' lag: no order.)
  assert all(r["peak_mb"] > 0 and r["baseline_mb"] > 0 for r in out["runs"])
  assert envs[0]["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
  assert envs[0]["MALLOC_MMAP_THRESHOLD_"] == str(1 << 20)
  assert set(out["fits"]) == {"bf16", "f32"}
  assert out["fits"]["f32"]["pool_bytes"] == 6 * 4  # planned bytes per element
  printed = capsys.readouterr().out
  assert "| bf16 | 8 | bfloat16 | 2 | 256 |" in printed
  assert "bytes per step element" in printed
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "scan-bfloat16-2048-64-128", "scan-float32-2048-64-128"]
