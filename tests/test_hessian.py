"""Tests of R (moments, the lambda rule, damping) and the Preconditioner file."""

from __future__ import annotations

import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

from tracer import hessian
from tracer import projection
from tracer.config import PreconditionerConfig


def _moments(*blocks, count):
  """Moments whose R (sum / count) is block-diagonal with the given blocks."""
  segs, lo, sums = [], 0, []
  for r in blocks:
    r = np.asarray(r, np.float64)
    segs.append((lo, lo + len(r)))
    lo += len(r)
    sums.append(jnp.asarray(r * count, jnp.float32))
  return hessian.Moments(tuple(segs), sums, count)


def test_lambda_rule_hand_computed():
  # Sorted descending: train [4, 3, 2, 1], eval [8, 6, 2, 1]; 0-based ranks.
  train, eval_ = [1.0, 4.0, 2.0, 3.0], [6.0, 1.0, 8.0, 2.0]
  assert hessian.lambda_rule(train, eval_, 0) == pytest.approx(4 / 12)
  assert hessian.lambda_rule(train, eval_, 1) == pytest.approx(3 / 9)
  assert hessian.lambda_rule(train, eval_, 2) == pytest.approx(2 / 4)
  assert hessian.lambda_rule(train, eval_, 3) == pytest.approx(1 / 2)
  # A rank past the end uses the last (smallest) values.
  assert hessian.lambda_rule(train, eval_, 100) == pytest.approx(1 / 2)
  # Spectra of different lengths: clamped to the shorter one.
  assert hessian.lambda_rule([5.0, 1.0, 1.0], [3.0, 1.0], 2) == pytest.approx(1 / 2)
  # Eval spectrum that vanishes at k: lambda = 1 (trust the queries fully).
  assert hessian.lambda_rule([2.0, 1.0], [5.0, 0.0], 1) == pytest.approx(1.0)
  # Train spectrum that vanishes at k: lambda = 0.
  assert hessian.lambda_rule([2.0, 0.0], [5.0, 1.0], 1) == pytest.approx(0.0)
  assert hessian.lambda_rule([0.0, 0.0], [0.0, 0.0], 1) == 0.0


def test_task_lambda_caps_the_rule_by_the_number_of_queries():
  train, eval_ = [1.0, 4.0, 2.0, 3.0], [6.0, 1.0, 8.0, 2.0]  # traces 10, 17
  # Rank 2: the rule's 1/2, odds 1. The cap on the odds is w * n * 10 / 17.
  assert hessian.task_lambda(train, eval_, 2, 1, None) == pytest.approx(1 / 2)
  assert hessian.task_lambda(train, eval_, 2, 17, 0.1) == pytest.approx(1 / 2)  # cap 1
  assert hessian.task_lambda(train, eval_, 2, 34, 0.1) == pytest.approx(1 / 2)  # cap 2
  cap = 0.1 * 5 * 10 / 17
  assert hessian.task_lambda(train, eval_, 2, 5, 0.1) == pytest.approx(cap / (1 + cap))
  # Fewer queries than the rank: the rule's 1 (R_train dropped) becomes the cap.
  few = [5.0, 0.0, 0.0]
  assert hessian.lambda_rule(train, few, 2) == 1.0
  cap = hessian.MAX_QUERY_WEIGHT * 1 * 10 / 5
  assert hessian.task_lambda(train, few, 2, 1) == pytest.approx(cap / (1 + cap))
  # The cap grows with the queries, one query's worth at a time.
  lams = [hessian.task_lambda(train, few, 2, n) for n in (1, 2, 4, 8)]
  assert lams == sorted(lams) and lams[0] < lams[-1] < 1
  # Nothing to cap: a rule of 0, no train energy; no eval energy: R_train.
  assert hessian.task_lambda([2.0, 0.0], [5.0, 1.0], 1, 1) == 0.0
  assert hessian.task_lambda(train, [0.0, 0.0], 1, 3, None) == 0.0
  assert hessian.task_lambda([0.0, 0.0], [0.0, 0.0], 1, 1) == 0.0


def test_config_default_is_the_library_default():
  assert PreconditionerConfig().max_query_weight == hessian.MAX_QUERY_WEIGHT > 0
  assert PreconditionerConfig().mix()["max_query_weight"] == hessian.MAX_QUERY_WEIGHT


def test_fit_and_fit_metric_cap_a_single_query():
  train = _moments(np.diag([4.0, 3.0, 2.0, 1.0]), count=8)
  eval_ = _moments(np.diag([9.0, 0.0, 0.0, 0.0]), count=1)  # one query
  pre = hessian.fit(train, eval_, kind="full", dim=4, layout_seed=0, rank=2,
                    max_query_weight=None)
  assert pre.lam == 1.0                   # the rule: R_train dropped
  cap = hessian.MAX_QUERY_WEIGHT * 1 * 10 / 9
  pre = hessian.fit(train, eval_, kind="full", dim=4, layout_seed=0, rank=2)
  assert pre.lam == pytest.approx(cap / (1 + cap))
  basis = hessian.fit_basis(train, dim=4, layout_seed=0, kind="full")
  psi = np.asarray(basis.rotate(jnp.asarray([[3.0, 0.0, 0.0, 0.0]], jnp.float32)))
  metric = hessian.fit_metric(basis, psi, rank=2)
  assert metric.lam == pytest.approx(pre.lam, rel=1e-6)
  assert hessian.fit_metric(basis, psi, rank=2, max_query_weight=None).lam == 1.0


def test_accumulate_matches_numpy():
  layout = projection.make_layout({"w": jnp.zeros((5, 4)), "v": jnp.zeros(3)}, 100)
  rng = np.random.default_rng(0)
  batches = [rng.normal(size=(n, layout.dim)).astype(np.float32) for n in (3, 5)]
  phi = np.concatenate(batches).astype(np.float64)
  for kind in ["block", "full"]:
    m = hessian.init_moments(layout, kind)
    for b in batches:
      m = hessian.accumulate(m, jnp.asarray(b))
    assert m.count == 8
    assert m.segments == hessian.segments(layout, kind)
    for (lo, hi), s in zip(m.segments, m.sums):
      np.testing.assert_allclose(s, phi[:, lo:hi].T @ phi[:, lo:hi], rtol=1e-5,
                                 atol=1e-5)
  assert hessian.segments(layout, "block") == ((0, 20), (20, 23))
  assert hessian.segments(layout, "full") == ((0, 23),)
  with pytest.raises(ValueError, match="kind"):
    hessian.segments(layout, "diag")


def test_fit_without_eval_is_r_train():
  train = _moments(np.diag([4.0, 1.0]), count=2)
  pre = hessian.fit(train, None, kind="full", dim=2, layout_seed=0, damping=0.1)
  assert pre.lam == 0.0 and pre.num_eval == 0 and pre.num_train == 2
  # eigenvalues 4, 1; floor 0.1 * mean = 0.25.
  np.testing.assert_allclose(pre.inv_sqrt[0], np.diag([4.25 ** -0.5, 1.25 ** -0.5]),
                             rtol=1e-6)
  # A rotated R: R^(-1/2) = U diag(...) U^T.
  theta = 0.3
  u = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  train = _moments(u @ np.diag([4.0, 1.0]) @ u.T, count=3)
  pre = hessian.fit(train, None, kind="full", dim=2, layout_seed=0, damping=0.1)
  np.testing.assert_allclose(pre.inv_sqrt[0],
                             u @ np.diag([4.25 ** -0.5, 1.25 ** -0.5]) @ u.T,
                             rtol=1e-5, atol=1e-6)


def test_fit_mixes_with_lambda_rule():
  train = _moments(np.diag([4.0, 1.0]), count=4)
  eval_ = _moments(np.diag([0.0, 2.0]), count=2)
  pre = hessian.fit(train, eval_, kind="full", dim=2, layout_seed=0, rank=0,
                    damping=0.1, max_query_weight=None)
  # Sorted: train [4, 1], eval [2, 0]; rank 0: lambda = 4 / (2 + 4).
  assert pre.lam == pytest.approx(2 / 3)
  assert (pre.num_train, pre.num_eval, pre.rank) == (4, 2, 0)
  # R = 2/3 diag(0, 2) + 1/3 diag(4, 1) = diag(4/3, 5/3); floor 0.1 * 1.5.
  np.testing.assert_allclose(
      pre.inv_sqrt[0], np.diag([(4 / 3 + 0.15) ** -0.5, (5 / 3 + 0.15) ** -0.5]),
      rtol=1e-6)
  # A fixed lam overrides the rule.
  pre = hessian.fit(train, eval_, kind="full", dim=2, layout_seed=0, lam=0.5,
                    damping=0.0)
  assert pre.lam == 0.5
  np.testing.assert_allclose(pre.inv_sqrt[0], np.diag([2.0 ** -0.5, 1.5 ** -0.5]),
                             rtol=1e-6)
  # Block kind: the rule ranks the spectra of all blocks together.
  train = _moments(np.diag([4.0, 1.0]), np.diag([3.0]), count=2)
  eval_ = _moments(np.diag([1.0, 1.0]), np.diag([6.0]), count=2)
  pre = hessian.fit(train, eval_, kind="block", dim=3, layout_seed=0, rank=1,
                    damping=0.0, max_query_weight=None)
  # Sorted: train [4, 3, 1], eval [6, 1, 1]; rank 1: 3 / (1 + 3).
  assert pre.lam == pytest.approx(0.75)
  np.testing.assert_allclose(pre.inv_sqrt[0], np.diag([1.75 ** -0.5, 1.0]), rtol=1e-6)
  np.testing.assert_allclose(pre.inv_sqrt[1], [[5.25 ** -0.5]], rtol=1e-6)
  # The default rank is 1.5% of d.
  pre = hessian.fit(train, eval_, kind="block", dim=200, layout_seed=0)
  assert pre.rank == 3


def test_damping_floor():
  # Rank-deficient R: eigenvalues 4 and 0; floor 0.1 * mean(4, 0) = 0.2.
  pre = hessian.fit(_moments(np.diag([4.0, 0.0]), count=2), kind="full", dim=2,
                    layout_seed=0, damping=0.1)
  np.testing.assert_allclose(pre.inv_sqrt[0], np.diag([4.2 ** -0.5, 0.2 ** -0.5]),
                             rtol=1e-6)
  assert np.all(np.isfinite(pre.inv_sqrt[0]))
  # Round-off below zero is clipped to 0 before the floor is added.
  pre = hessian.fit(_moments(np.diag([4.0, -1e-3]), count=2), kind="full", dim=2,
                    layout_seed=0, damping=0.1)
  np.testing.assert_allclose(pre.inv_sqrt[0], np.diag([4.2 ** -0.5, 0.2 ** -0.5]),
                             rtol=1e-6)
  # The floor scales with R: R -> cR gives R^(-1/2) -> R^(-1/2) / sqrt(c).
  a = hessian.fit(_moments(np.diag([3.0, 1.0, 0.0]), count=3), kind="full", dim=3,
                  layout_seed=0, damping=0.5)
  b = hessian.fit(_moments(np.diag([300.0, 100.0, 0.0]), count=3), kind="full",
                  dim=3, layout_seed=0, damping=0.5)
  np.testing.assert_allclose(np.asarray(b.inv_sqrt[0]) * 10, a.inv_sqrt[0], rtol=1e-6)


def test_fit_errors_and_warning():
  empty = hessian.Moments(((0, 2),), [jnp.zeros((2, 2))], 0)
  with pytest.raises(ValueError, match="at least one example"):
    hessian.fit(empty, kind="full", dim=2, layout_seed=0)
  train = _moments(np.eye(2), count=4)
  with pytest.raises(ValueError, match="at least one query"):
    hessian.fit(train, empty, kind="full", dim=2, layout_seed=0)
  with pytest.warns(UserWarning, match="rank"):
    hessian.fit(_moments(np.eye(3), count=2), kind="full", dim=3, layout_seed=0)


def test_apply_is_block_diagonal_product():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(3, 3)), rng.normal(size=(2, 2))
  train = _moments(a @ a.T, b @ b.T, count=3)
  pre = hessian.fit(train, kind="block", dim=5, layout_seed=0)
  full = np.zeros((5, 5))
  full[:3, :3], full[3:, 3:] = pre.inv_sqrt
  phi = rng.normal(size=(4, 5)).astype(np.float32)
  np.testing.assert_allclose(pre.apply(jnp.asarray(phi)), phi @ full, rtol=1e-5,
                             atol=1e-6)


def test_a_basis_and_preconditioner_are_placed_on_the_mesh_once(monkeypatch):
  """A corpus encode rotates every batch: after the first call the matrices
  stay on the mesh (no copy from the host, implicit or placed), and the
  product is the same."""
  import jax  # pylint: disable=g-import-not-at-top
  from tracer import partitioning  # pylint: disable=g-import-not-at-top
  placed = []
  put_global = partitioning.put_global
  monkeypatch.setattr(partitioning, "put_global",
                      lambda x, sharding: placed.append(1) or put_global(x, sharding))
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=(3, 3)), rng.normal(size=(2, 2))
  train = _moments(a @ a.T, b @ b.T, count=3)
  basis = hessian.fit_basis(train, dim=5, layout_seed=0)
  pre = hessian.fit(train, kind="block", dim=5, layout_seed=0)
  mesh = partitioning.make_mesh(model=2)
  phi = rng.normal(size=(8, 5)).astype(np.float32)
  on_mesh = put_global(phi, partitioning.rows_sharding(mesh))
  for matrices, fn in ((basis.vectors, basis.rotate), (pre.inv_sqrt, pre.apply)):
    want = np.concatenate([phi[:, :3] @ np.asarray(matrices[0]),
                           phi[:, 3:] @ np.asarray(matrices[1])], axis=1)
    np.testing.assert_allclose(fn(on_mesh), want, rtol=1e-5, atol=1e-6)
    placed.clear()
    with jax.transfer_guard("disallow"):
      again = fn(on_mesh)
    assert not placed
    np.testing.assert_allclose(again, want, rtol=1e-5, atol=1e-6)


def test_save_load_round_trip(tmp_path):
  rng = np.random.default_rng(2)
  a, b = rng.normal(size=(3, 3)), rng.normal(size=(2, 2))
  train = _moments(a @ a.T, b @ b.T, count=7)
  eval_ = _moments(np.eye(3), np.eye(2), count=5)
  pre = hessian.fit(train, eval_, kind="block", dim=5, layout_seed=11, rank=1,
                    damping=0.2)
  path = os.path.join(tmp_path, "precond.npz")
  pre.save(path)
  assert os.listdir(tmp_path) == ["precond.npz"]        # no temp file left
  back = hessian.Preconditioner.load(path)
  assert back.metadata() == pre.metadata()
  assert back.segments == pre.segments == ((0, 3), (3, 5))
  assert (back.kind, back.lam, back.damping, back.rank, back.num_train,
          back.num_eval, back.dim, back.layout_seed) == (
              "block", pre.lam, 0.2, 1, 7, 5, 5, 11)
  for x, y in zip(back.inv_sqrt, pre.inv_sqrt):
    np.testing.assert_array_equal(x, y)
  fp = pre.fingerprint()
  assert fp == pre.fingerprint() == back.fingerprint()
  assert len(fp) == 16 and int(fp, 16) >= 0
  # A path without the .npz suffix works too.
  other = os.path.join(tmp_path, "precond")
  back.save(other)
  assert hessian.Preconditioner.load(other).fingerprint() == fp
  # Files of the other kind, cut short or without a field are one line each
  # (before 2026-12-04: TypeError, BadZipFile, KeyError tracebacks).
  from tracer.errors import InputError  # pylint: disable=g-import-not-at-top
  basis = hessian.fit_basis(train, dim=5, layout_seed=11)
  basis.save(os.path.join(tmp_path, "basis.npz"))
  with open(path, "rb") as f:
    whole = f.read()
  text = os.path.join(tmp_path, "notes.npz")
  with open(text, "w") as f:
    f.write("# notes\n")
  cut = os.path.join(tmp_path, "cut.npz")
  with open(cut, "wb") as f:
    f.write(whole[:len(whole) // 2])
  for load, where, message in [
      (hessian.Basis.load, path, "not a basis file (its metadata has ['damping'"),
      (hessian.Preconditioner.load, os.path.join(tmp_path, "basis.npz"),
       "not a preconditioner file (its metadata has ['dim'"),
      (hessian.Preconditioner.load, cut, "not a preconditioner file ("),
      # Not a zip (before 2026-12-05 numpy's advice on allow_pickle).
      (hessian.Basis.load, text, "not a basis file (not an npz archive: it starts "
       "with b'# notes\\n'")]:
    with pytest.raises(InputError, match=re.escape(f"{where}: {message}")):
      load(where)
  # The fingerprint changes with the matrices and with the metadata.
  changed = hessian.fit(train, eval_, kind="block", dim=5, layout_seed=11, rank=1,
                        damping=0.3)
  assert changed.fingerprint() != fp
  changed = hessian.fit(train, eval_, kind="block", dim=5, layout_seed=12, rank=1,
                        damping=0.2)
  assert changed.fingerprint() != fp


def test_a_damaged_file_is_refused_naming_what_it_lacks(tmp_path):
  """A file that lost an array still loaded (before 2026-12-06: a basis of 2
  segments with 0 arrays, a preconditioner whose apply() dropped a segment),
  and an unknown compression method was a NotImplementedError traceback."""
  from tracer.errors import InputError  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(3, 3)), rng.normal(size=(2, 2))
  train = _moments(a @ a.T, b @ b.T, count=7)
  pre = hessian.fit(train, None, kind="block", dim=5, layout_seed=0)
  basis = hessian.fit_basis(train, dim=5, layout_seed=0)
  wide = dict(basis.metadata(), dim=6)
  gap = dict(basis.metadata(), segments=[[0, 3], [2, 5]])
  unsupported = bytearray(basis.to_bytes())
  at = unsupported.find(b"PK\x01\x02")         # the first central directory entry
  unsupported[at + 10:at + 12] = (99).to_bytes(2, "little")
  for load, data, message in [
      (hessian.Preconditioner.load, hessian._npz_bytes(pre.metadata(), pre.inv_sqrt[:1]),
       "not a whole preconditioner file (its arrays have shapes [(3, 3)]; its "
       "segments [(0, 3), (3, 5)] expect [(3, 3), (2, 2)])"),
      (hessian.Basis.load, hessian._npz_bytes(basis.metadata(), []),
       "not a whole basis file (its arrays have shapes []; its segments "
       "[(0, 3), (3, 5)] expect [(3, 3), (3,), (2, 2), (2,)])"),
      (hessian.Basis.load, hessian._npz_bytes(basis.metadata(), [
          basis.vectors[0], basis.values[0], basis.vectors[0], basis.values[1]]),
       "not a whole basis file (its arrays have shapes [(3, 3), (3,), (3, 3), (2,)]"),
      (hessian.Basis.load, hessian._npz_bytes(wide, []),
       "not a basis file (its segments [[0, 3], [3, 5]] do not tile its dim 6"),
      (hessian.Basis.load, hessian._npz_bytes(gap, []),
       "not a basis file (its segments [[0, 3], [2, 5]] do not tile its dim 5"),
      (hessian.Basis.load, bytes(unsupported), "not a basis file (")]:
    where = os.path.join(tmp_path, "damaged.npz")
    with open(where, "wb") as f:
      f.write(data)
    with pytest.raises(InputError, match=re.escape(f"{where}: {message}")):
      load(where)


def test_a_block_no_example_moved_weighs_nothing():
  """Before 2026-12-04 an all-zero block (an unused weight) got the floor
  damping * 2e-308, whose inverse is inf: every row and norm became NaN."""
  layout = projection.make_layout({"a": np.zeros((4, 4)), "b": np.zeros((3, 3))}, 1000)
  rng = np.random.default_rng(0)
  phi = rng.normal(size=(50, layout.dim)).astype(np.float32)
  phi[:, 16:] = 0.0                                 # block b: never moved
  moments = hessian.accumulate(hessian.init_moments(layout, "block"), jnp.asarray(phi))
  pre = hessian.fit(moments, kind="block", dim=layout.dim, layout_seed=0)
  np.testing.assert_array_equal(pre.inv_sqrt[1], 0.0)
  out = np.asarray(pre.apply(jnp.asarray(phi[:2])))
  assert np.isfinite(out).all() and np.abs(out[:, :16]).max() > 0
  basis = hessian.fit_basis(moments, dim=layout.dim, layout_seed=0)
  psi = np.asarray(basis.rotate(jnp.asarray(phi)))
  for queries in (None, psi[:5]):
    metric = hessian.fit_metric(basis, queries)
    np.testing.assert_array_equal(metric.diag[16:], 0.0)
    assert np.isfinite(metric.norms(psi[:3])).all()
    assert np.isfinite(metric.query_vectors(psi[:2])).all()


def test_gin_refuses_damping_0_and_lam_outside_0_1():
  from tracer.launch import config  # pylint: disable=g-import-not-at-top
  from tracer.errors import InputError  # pylint: disable=g-import-not-at-top
  for fields, message in [
      ({"damping": 0.0}, "PreconditionerConfig.damping = 0.0: expected a value > 0"),
      ({"damping": float("nan")}, "PreconditionerConfig.damping = nan: expected"),
      ({"lam": 1.5}, "PreconditionerConfig.lam = 1.5: expected a value in [0, 1]"),
      ({"lam": -0.5}, "PreconditionerConfig.lam = -0.5: expected a value in [0, 1]")]:
    with pytest.raises(InputError, match=re.escape(message)):
      config.check_fields(PreconditionerConfig(**fields))
  config.check_fields(PreconditionerConfig(damping=1e-3, lam=1.0))


def test_gin_checks_the_type_of_optional_fields():
  # Before 2026-12-07 an `int | None` field took any type: rank = 'ten' was
  # a TypeError, rank = 2.5 failed after the whole store was encoded.
  from tracer.launch import config  # pylint: disable=g-import-not-at-top
  from tracer.errors import InputError  # pylint: disable=g-import-not-at-top
  for fields, message in [
      ({"rank": "ten"}, "PreconditionerConfig.rank = 'ten': expected int or None, got str"),
      ({"rank": 2.5}, "PreconditionerConfig.rank = 2.5: expected int or None, got float"),
      ({"lam": "half"}, "PreconditionerConfig.lam = 'half': expected float or None, got str")]:
    with pytest.raises(InputError, match=re.escape(message)):
      config.check_fields(PreconditionerConfig(**fields))
  config.check_fields(PreconditionerConfig(rank=None, lam=None, max_query_weight=2))


def test_fitting_r_past_the_hosts_memory_is_refused_before_any_gradient():
  """Before 2026-12-05 ``EncodeConfig.projection_dim=2147483647`` on tiny.gin
  left its 128 x 512 matrices unprojected, and R's moments of 65,536 dims a
  block (17 GB, and a float64 eigh of 34 GB) were OOM-killed (exit 137)."""
  from tracer import memory  # pylint: disable=g-import-not-at-top
  from tracer import pipeline  # pylint: disable=g-import-not-at-top
  from tracer import projection  # pylint: disable=g-import-not-at-top
  from tracer.errors import InputError  # pylint: disable=g-import-not-at-top
  params = {"w": np.zeros((128, 512)), "b": np.zeros(512)}
  host = 24 * 2**30
  exact = projection.make_layout(params, 2**31 - 1)
  assert exact.dim == 128 * 512 + 512
  with pytest.raises(InputError, match=re.escape(
      "PreconditionerConfig.kind='block': fitting R takes at least 112.0 GiB (its "
      "largest segment: block 'w', 65,536 dims), more than this host's 24.0 GiB; "
      "expected a smaller EncodeConfig.projection_dim (each block projected to "
      "fewer dims), or kind='none'")):
    pipeline.check_fit_memory(exact, "block", have=host)
  with pytest.raises(InputError, match=re.escape(
      "kind='full': fitting R takes at least 113.8 GiB (its largest segment: "
      "66,048 dims), more than this host's 24.0 GiB; expected a smaller "
      "EncodeConfig.projection_dim (each block projected to fewer dims), "
      "kind='block', or kind='none'")):
    pipeline.check_fit_memory(exact, "full", have=host)
  projected = projection.make_layout(params, 16384)
  pipeline.check_fit_memory(projected, "block", have=host)
  pipeline.check_fit_memory(projected, "full", have=host)
  pipeline.check_fit_memory(exact, "none", have=host)  # no R to fit
  # R's moments sit on every device (replicated by the all-reduce): on an
  # accelerator they must fit one device's memory too.
  assert hessian.moment_bytes(projected, "full") == projected.dim**2 * 4
  with pytest.raises(InputError, match=re.escape(
      "kind='full': R's float32 moments take 1.0 GiB on each device (its largest "
      "segment: 16,256 dims), more than a device's 1.0 MiB; expected a smaller")):
    pipeline.check_fit_memory(projected, "full", have=host, device_have=2**20)
  pipeline.check_fit_memory(projected, "block", have=host, device_have=2**30)
  assert memory.device_memory_bytes() is None  # CPU devices share the host's
  assert hessian.fit_bytes(projected, "full") == projected.dim**2 * (4 + 3 * 8)
