"""Scan-time preconditioning equals TrackStar's re-encode path.

The re-encode path (``hessian.fit``: R^(-1/2) of the mixed R, applied to both
sides, unit norm) against the store's path (rows in R_train's eigenbasis,
``hessian.fit_metric``'s R^(-1) applied at scan time): the same scores to 1e-4
and the same top-k, for block and full R, with and without the task-specific
mix, on 1 and 8 devices.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from tracer import hessian
from tracer import partitioning
from tracer import projection
from tracer import scan
from tracer.encoder import unit_normalize
from tracer.errors import InputError

pytestmark = pytest.mark.filterwarnings("ignore:R is estimated")

K = 7
PARAMS = {"attn": np.zeros((24, 20), np.float32), "mlp": np.zeros((16, 10), np.float32),
          "norm": np.zeros(9, np.float32)}


@pytest.fixture(scope="module")
def data():
  """Projections with a heavy-tailed spectrum; queries share a common
  direction (what the task-specific mix down-weights)."""
  layout = projection.make_layout(PARAMS, 400, 0)
  rng = np.random.default_rng(0)
  d = layout.dim
  scale = np.exp(rng.normal(size=d) * 1.5)
  corpus = (rng.normal(size=(500, d)) * scale).astype(np.float32)
  common = rng.normal(size=d) * scale * 5
  queries = (rng.normal(size=(30, d)) * scale + common).astype(np.float32)
  return layout, corpus, queries


def _moments(layout, x, kind):
  return hessian.accumulate(hessian.init_moments(layout, kind), x)


CASES = [(kind, task, n_train) for kind in ("block", "full")
         for task in (False, True) for n_train in (80, 400)]


@pytest.mark.parametrize("kind,task_specific,n_train", CASES)
def test_scan_time_scores_equal_the_re_encode_path(data, kind, task_specific,
                                                   n_train):
  layout, corpus, queries = data
  train = _moments(layout, corpus[:n_train], kind)
  eval_ = _moments(layout, queries, kind) if task_specific else None
  # The rule uncapped: a real mix of R_eval and R_train (the cap is tested
  # in test_hessian.py).
  pre = hessian.fit(train, eval_, kind=kind, dim=layout.dim, layout_seed=0,
                    rank=4, damping=0.1, max_query_weight=None)
  enc_c = np.asarray(unit_normalize(pre.apply(corpus)), np.float64)
  enc_q = np.asarray(unit_normalize(pre.apply(queries)), np.float64)
  want = enc_q @ enc_c.T

  basis = hessian.fit_basis(train, dim=layout.dim, layout_seed=0, kind=kind)
  psi_c = np.asarray(basis.rotate(corpus))
  psi_q = np.asarray(basis.rotate(queries))
  metric = hessian.fit_metric(basis, psi_q if task_specific else None, rank=4,
                              damping=0.1, max_query_weight=None)
  assert metric.lam == pytest.approx(pre.lam, rel=1e-4, abs=1e-12)
  if task_specific:
    assert 0 < metric.lam < 1
  vectors = metric.query_vectors(psi_q)
  got = vectors.astype(np.float64) @ psi_c.T / metric.norms(psi_c)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  # A meaningful comparison: R changes the scores.
  plain = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
      corpus / np.linalg.norm(corpus, axis=1, keepdims=True)).T
  assert np.abs(plain - want).max() > 1e-2

  for devices in (1, 8):
    mesh = partitioning.make_mesh(devices=jax.devices()[:devices])
    old = scan.scan_arrays(enc_c.astype(np.float32), enc_q.astype(np.float32), K,
                           mesh=mesh, chunk_rows=96)
    new = scan.scan_arrays(psi_c, vectors, K, mesh=mesh, chunk_rows=96,
                           metric=metric.row_metric())
    np.testing.assert_array_equal(new.proponent_rows, old.proponent_rows)
    np.testing.assert_array_equal(new.opponent_rows, old.opponent_rows)
    np.testing.assert_allclose(new.proponent_scores, old.proponent_scores,
                               atol=1e-4)
    np.testing.assert_allclose(new.opponent_scores, old.opponent_scores,
                               atol=1e-4)


def _in_basis(data):
  """R_train's basis from 200 corpus rows, the corpus in it, and the
  queries' task-specific metric and scan vectors."""
  layout, corpus, queries = data
  basis = hessian.fit_basis(_moments(layout, corpus[:200], "block"),
                            dim=layout.dim, layout_seed=0)
  psi_c = np.asarray(basis.rotate(corpus))
  metric = hessian.fit_metric(basis, np.asarray(basis.rotate(queries)), rank=4)
  return basis, psi_c, metric, metric.query_vectors(np.asarray(basis.rotate(queries)))


@pytest.mark.parametrize("damping", [1e30, 1e38])
def test_any_damping_gives_the_scores_of_its_metric(data, damping):
  # The scores are R^(-1)'s cosines. Before 2026-12-07 the metric was R^(-1)
  # itself: at damping = 1e38 its float32 products underflowed and the top
  # scores were ~6.6e19, not cosines (at 1e30 they were right).
  layout, corpus, queries = data
  basis = hessian.fit_basis(_moments(layout, corpus[:400], "block"),
                            dim=layout.dim, layout_seed=0, kind="block")
  psi_c = np.asarray(basis.rotate(corpus))
  psi_q = np.asarray(basis.rotate(queries))
  metric = hessian.fit_metric(basis, psi_q, rank=4, damping=damping,
                              max_query_weight=None)
  r_q = metric.inverse(psi_q)
  want = (r_q @ psi_c.T / np.sqrt(np.sum(psi_q * r_q, 1))[:, None]
          / metric.norms(psi_c)[None])
  got = scan.scan_arrays(psi_c, metric.query_vectors(psi_q), 5,
                         metric=metric.row_metric())
  np.testing.assert_allclose(
      got.proponent_scores,
      np.take_along_axis(want, np.asarray(got.proponent_rows), 1), atol=1e-5)
  np.testing.assert_array_equal(got.proponent_rows[:, 0], np.argmax(want, 1))


def test_streaming_and_store_scans_take_the_metric(data, tmp_path):
  _, psi_c, metric, vectors = _in_basis(data)
  want = scan.scan_arrays(psi_c, vectors, K, metric=metric.row_metric())
  streaming = scan.StreamingScanner(vectors, K, metric=metric.row_metric())
  for lo in range(0, len(psi_c), 170):
    streaming.add(psi_c[lo:lo + 170], np.arange(lo, min(lo + 170, len(psi_c))))
  got = streaming.result()
  for field in ("proponent_rows", "opponent_rows"):
    np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
  np.testing.assert_allclose(got.proponent_scores, want.proponent_scores, atol=1e-6)


def test_zero_rows_score_zero_and_shapes_are_checked(data):
  layout, corpus, queries = data
  basis = hessian.fit_basis(_moments(layout, corpus[:200], "block"),
                            dim=layout.dim, layout_seed=0)
  psi_q = np.asarray(basis.rotate(queries))
  metric = hessian.fit_metric(basis, psi_q, rank=4)
  rows = np.asarray(basis.rotate(corpus[:20])).copy()
  rows[5] = 0
  top = scan.scan_arrays(rows, metric.query_vectors(psi_q), 20,
                         metric=metric.row_metric())
  zero = top.proponent_scores[top.proponent_rows == 5]
  np.testing.assert_array_equal(zero, 0)
  with pytest.raises(ValueError, match="metric: built for d"):
    scan.scan_arrays(rows[:, :-1], metric.query_vectors(psi_q)[:, :-1], 3,
                     metric=metric.row_metric())
  # Segments past d and low-rank blocks of other shapes: each named (before
  # 2026-12-08 a self-contradicting "built for d=(8,), ... d=8", or jax's
  # and numpy's tracebacks).
  m = metric.row_metric()
  d, (lo, hi) = rows.shape[1], m.segments[0]
  c0 = np.asarray(m.lowrank[0])
  for bad, message in (
      (m._replace(segments=((lo, d + 4),) + tuple(m.segments[1:])),
       f"metric: segment 0 is columns [{lo}, {d + 4}); expected segments in "
       f"order, within the encodings' d={d}"),
      (m._replace(lowrank=(c0[:3],) + tuple(m.lowrank[1:])),
       f"metric: low-rank block 0 has shape {(3, c0.shape[1])}; expected "
       f"[{hi - lo}, rank] for segment [{lo}, {hi})"),
      (m._replace(lowrank=(c0[:, 0],) + tuple(m.lowrank[1:])),
       f"metric: low-rank block 0 has shape {(hi - lo,)}; expected"),
      (m._replace(lowrank=tuple(m.lowrank[1:])), "low-rank blocks; expected one each")):
    with pytest.raises(InputError, match=re.escape(message)):
      scan.scan_arrays(rows, metric.query_vectors(psi_q), 3, metric=bad)


def test_identity_metric_is_the_cosine(data):
  _, corpus, queries = data
  metric = hessian.identity_metric(corpus.shape[1])
  got = metric.query_vectors(queries).astype(np.float64) @ corpus.T / metric.norms(
      corpus)
  want = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
      corpus / np.linalg.norm(corpus, axis=1, keepdims=True)).T
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_basis_round_trips(data, tmp_path):
  layout, corpus, _ = data
  basis = hessian.fit_basis(_moments(layout, corpus[:100], "block"),
                            dim=layout.dim, layout_seed=0)
  basis.fit_key = {"kind": "block", "n": 100}
  basis.save(str(tmp_path / "b.npz"))
  back = hessian.Basis.load(str(tmp_path / "b.npz"))
  assert back.fingerprint() == basis.fingerprint()
  assert back.fit_key == basis.fit_key and back.segments == basis.segments
  np.testing.assert_array_equal(np.asarray(back.rotate(corpus[:3])),
                                np.asarray(basis.rotate(corpus[:3])))


def test_summed_store_scan_is_the_sum_of_the_parts_scores(data, tmp_path):
  # TrackStar summed over checkpoints: one store per checkpoint, each part
  # scored against its own queries under its own metric (or none), the
  # scores summed. Against numpy's top-k of the summed scores, and against
  # the scan of the parts side by side (each row divided by its norm first,
  # as ``tracer quality``'s trackstar_sum does). A row quarantined in one
  # store is never returned.
  from tracer import store as store_lib  # pylint: disable=g-import-not-at-top
  _, corpus, queries = data
  rng = np.random.default_rng(1)
  _, psi_c, metric, vectors = _in_basis(data)
  other = (corpus + rng.normal(size=corpus.shape) * corpus.std()).astype(np.float32)
  other_q = rng.normal(size=queries.shape).astype(np.float32)
  other_q /= np.linalg.norm(other_q, axis=1, keepdims=True)
  bad = 123

  def store(name, x, quarantined):
    m = store_lib.Manifest(
        checkpoint=name, step=1, params_fingerprint="p", correction="adam",
        epsilon=1e-8, projection_seed=0, layout=None, dim=x.shape[1],
        basis_fingerprint=None, dtype="float32", num_rows=len(x), chunk_rows=64)
    s = store_lib.create_or_open(tmp_path / name, m)
    for c in s.pending_chunks():
      lo, hi = s.chunk_bounds(c)
      s.write_chunk(c, x[lo:hi], {r: "non-finite loss" for r in quarantined
                                  if lo <= r < hi})
    return s

  stores = [store("a", psi_c, []), store("b", other, [bad])]
  summed = (vectors.astype(np.float64) @ psi_c.T / metric.norms(psi_c)
            + other_q.astype(np.float64) @ other.T)
  keep = np.setdiff1d(np.arange(len(corpus)), [bad])
  k = 7
  order = lambda s: np.argsort(-s[:, keep], axis=1, kind="stable")[:, :k]
  for devices, chunk_rows in ((1, None), (8, 100)):
    mesh = partitioning.make_mesh(devices=jax.devices()[:devices])
    got = scan.scan_stores(stores, [vectors, other_q], k, mesh=mesh,
                           chunk_rows=chunk_rows, metrics=[metric.row_metric(), None])
    np.testing.assert_array_equal(got.proponent_rows, keep[order(summed)])
    np.testing.assert_array_equal(got.opponent_rows, keep[order(-summed)])
    np.testing.assert_allclose(
        got.proponent_scores, np.take_along_axis(summed[:, keep], order(summed), 1),
        atol=1e-4)
  side_by_side = np.concatenate([psi_c / metric.norms(psi_c)[:, None], other], 1)
  side_by_side[bad] = np.nan  # never returned
  want = scan.scan_arrays(side_by_side.astype(np.float32),
                          np.concatenate([vectors, other_q], 1), k)
  np.testing.assert_array_equal(got.proponent_rows, want.proponent_rows)
  np.testing.assert_allclose(got.proponent_scores, want.proponent_scores, atol=1e-5)
  with pytest.raises(ValueError, match="same rows"):
    scan.scan_stores([stores[0], store("c", psi_c[:300], [])], [vectors] * 2, k)


def _int8_store(path, rows, column_scales=None):
  from tracer import store as store_lib  # pylint: disable=g-import-not-at-top
  m = store_lib.Manifest(
      checkpoint="c", step=1, params_fingerprint="p", correction="adam",
      epsilon=1e-8, projection_seed=0, layout=None, dim=rows.shape[1],
      basis_fingerprint=None, dtype="int8", num_rows=len(rows), chunk_rows=64)
  s = store_lib.create_or_open(path, m, column_scales=column_scales)
  for c in s.pending_chunks():
    lo, hi = s.chunk_bounds(c)
    s.write_chunk(c, rows[lo:hi])
  return s


def _assert_same_up_to_near_ties(got: scan.TopK, want: scan.TopK, atol: float):
  """Scores within ``atol``; where the rows differ, ``got``'s row is one
  ``want`` ranks within ``atol`` of that place's score (or, past ``want``'s
  list, within ``atol`` of its last score)."""
  for rows, scores, want_rows, want_scores in (
      (got.proponent_rows, got.proponent_scores, want.proponent_rows,
       want.proponent_scores),
      (got.opponent_rows, got.opponent_scores, want.opponent_rows,
       want.opponent_scores)):
    np.testing.assert_allclose(scores, want_scores, atol=atol, rtol=0)
    for q, j in zip(*np.nonzero(rows != want_rows)):
      at = np.nonzero(want_rows[q] == rows[q, j])[0]
      near = want_scores[q, at[0]] if len(at) else want_scores[q, -1]
      assert abs(near - want_scores[q, j]) <= atol, (q, j, rows[q], want_rows[q])


def test_int8_store_scan_is_the_scan_of_its_dequantized_rows(data, tmp_path):
  # Rows in R_train's basis stored as int8 over the basis' column scales:
  # the scan scores the int8 values against the queries times the column
  # scales, under the metric in the stored units, and gets the top-k of the
  # dequantized rows. It keeps nearly all of the f32 rows' top-k; without
  # column scales it loses several times more (the small-variance
  # directions the metric whitens are rounded away).
  basis, psi_c, metric, vectors = _in_basis(data)
  s = _int8_store(tmp_path / "int8", psi_c, basis.column_scales())
  k = 20
  want = scan.scan_arrays(s.read_rows(0, s.num_rows), vectors, k,
                          metric=metric.row_metric())
  runs = []
  for devices, chunk_rows in ((1, None), (8, None), (8, 100)):
    mesh = partitioning.make_mesh(devices=jax.devices()[:devices])
    runs.append(scan.scan_store(s, vectors, k, mesh=mesh, chunk_rows=chunk_rows,
                                metric=metric.row_metric()))
  got = runs[0]
  for other in runs[1:]:  # the same computation: the same bits on any mesh
    for a, b in zip(other, got):
      np.testing.assert_array_equal(a, b)
  # The dequantized rows' f32 scan rounds otherwise (int8 values times
  # scaled queries against dequantized values times queries; the CPU's
  # matmul kernels differ too): the same top-k up to near ties.
  _assert_same_up_to_near_ties(got, want, atol=1e-5)
  f32 = scan.scan_arrays(psi_c, vectors, k, metric=metric.row_metric())
  plain = scan.scan_store(_int8_store(tmp_path / "plain", psi_c), vectors, k,
                          metric=metric.row_metric())
  kept = lambda t: np.mean([len(set(a) & set(b)) / k for a, b in zip(
      t.proponent_rows, f32.proponent_rows)])
  # Measured: 0.992 of the top-20 kept with column scales, 0.972 without.
  assert kept(got) >= 0.98 and 1 - kept(plain) > 2 * (1 - kept(got)), (
      kept(got), kept(plain))
  with pytest.raises(ValueError, match="int8 store.*pass a metric"):
    scan.scan_store(s, vectors, k)
  with pytest.raises(ValueError, match="int8 store.*pass a metric"):
    scan.scan_stores([s, s], [vectors, vectors], k,
                     metrics=[metric.row_metric(), None])


def test_bf16_rows_low_rank_products_on_the_bf16_units_keep_the_fp32_bound():
  # A row metric's low-rank term x_b C_b for bf16 rows: off the CPU it takes
  # three bf16 matmuls (C's columns split as queries are), not an f32 matmul
  # at HIGHEST (fp32 cores on GPUs, six passes on TPUs). Both stay within
  # the bound of an fp32 sum over the exact products; one bf16 term does not.
  import jax.numpy as jnp
  import ml_dtypes
  from tracer import topk
  rng = np.random.default_rng(11)
  r, b, cols = 300, 200, 37
  x = rng.standard_normal((r, b)).astype(ml_dtypes.bfloat16)
  c = rng.standard_normal((b, cols)).astype(np.float32)  # 24 significant bits
  exact = x.astype(np.float64) @ c.astype(np.float64)
  bound = 3 * b * 2.0**-24 * (np.abs(x.astype(np.float64)) @ np.abs(c.astype(np.float64)))
  three = np.asarray(topk.lowrank_products(jnp.asarray(x), jnp.asarray(c)))
  widened = np.asarray(topk.lowrank_products(jnp.asarray(x), jnp.asarray(c), widen=True))
  assert (np.abs(three - exact) <= bound).all()
  assert (np.abs(widened - exact) <= bound).all()
  one = x.astype(np.float32) @ c.astype(ml_dtypes.bfloat16).astype(np.float32)
  assert (np.abs(one - exact) > bound).any()
  # The program: bf16 dots only for the low-rank term.
  text = jax.jit(topk.lowrank_products).lower(
      jnp.asarray(x), jnp.asarray(c)).as_text()
  assert "bf16" in text and "HIGHEST" not in text
  # Whole norms: the two ways agree to fp32 rounding.
  diag = jnp.asarray(rng.random(b) + 1.0, jnp.float32)
  lowrank = (jnp.asarray(c[:64, :5] * 0.05), jnp.asarray(c[64:, :3] * 0.05))
  segments = ((0, 64), (64, b))
  on_units = topk._row_norms(jnp.asarray(x), diag, lowrank, segments)
  on_cpu = topk._row_norms(jnp.asarray(x), diag, lowrank, segments, widen=True)
  np.testing.assert_allclose(on_units, on_cpu, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_row_tiles_give_each_row_what_the_whole_array_gives(dtype):
  # fn maps each row to its own output row, exactly (small integers): any
  # tile count, a last tile overlapping the one before, fewer rows than a
  # tile, outputs of more than one column.
  import jax.numpy as jnp
  from tracer import topk
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.integers(-100, 100, (203, 24)), dtype)
  fn = lambda t: jnp.stack([t.astype(jnp.float32).sum(1), t[:, 3].astype(jnp.float32)], 1)
  want = np.asarray(fn(x))
  for rows in (1, 15, 16, 17, 64, 203):
    for tile_rows in (8, 16, 64, 256):
      got = jax.jit(lambda a: topk.row_tiles(fn, a, tile_rows))(x[:rows])
      np.testing.assert_array_equal(got, want[:rows], err_msg=f"{rows} rows, tiles of {tile_rows}")
  assert topk.row_tiles(fn, x).shape == (203, 2)


@pytest.mark.parametrize("widen", [True, False], ids=["widened", "bf16-products"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_row_norms_on_the_cpu_do_not_depend_on_where_a_row_is(dtype, widen):
  # A row's norm under a RowMetric is the same bits whichever rows share its
  # chunk (a scan's result must not depend on the mesh or the chunk size):
  # XLA:CPU sums a short array's rows in another order than a long one's, so
  # every row goes through one tile program (``topk.row_tiles``), also where
  # an XLA without the library fusions scores bf16 rows by three bf16
  # products (not widened). And it is the float64 norm to fp32 rounding.
  import jax.numpy as jnp
  import ml_dtypes
  from tracer import topk
  rng = np.random.default_rng(4)
  d, segments = 300, ((0, 37), (37, 300))
  values = rng.standard_normal((2500, d)) * (40 if dtype == "int8" else 1)
  x = values.clip(-127, 127).astype({"bfloat16": ml_dtypes.bfloat16}.get(dtype, dtype))
  diag = rng.random(d).astype(np.float32) + 1.0
  lowrank = tuple((rng.standard_normal((hi - lo, r)) * 0.05).astype(np.float32)
                  for (lo, hi), r in zip(segments, (5, 40)))
  norms = jax.jit(lambda a: topk._row_norms(a, jnp.asarray(diag), lowrank, segments,
                                            widen=widen, tiled=True))
  whole = np.asarray(norms(jnp.asarray(x)))
  for lo, hi in ((0, 1), (5, 12), (3, 1100), (1024, 2048), (17, 2500), (2499, 2500)):
    np.testing.assert_array_equal(norms(jnp.asarray(x[lo:hi])), whole[lo:hi],
                                  err_msg=f"rows {lo}:{hi}")
  x64 = x.astype(np.float64)
  n2 = (x64 ** 2) @ diag - sum(((x64[:, lo:hi] @ c) ** 2).sum(1)
                               for (lo, hi), c in zip(segments, lowrank))
  np.testing.assert_allclose(whole, np.sqrt(n2), rtol=2e-6)
