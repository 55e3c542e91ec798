"""Tests of the two-sided per-block Gaussian projection and its layout."""

from __future__ import annotations

import json

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from tracer import projection


def _params():
  """Two matrices (one 3-D), two vectors and a scalar."""
  rng = np.random.default_rng(0)
  shapes = {"w": (8, 12), "t": (4, 3, 8), "bias": (12,), "scale": (8,), "s": ()}
  return {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}


def _sides(layout):
  return [b.shape for b in layout.blocks]


def _total(sides, s):
  return sum(min(a, s) * min(b, s) for a, b in sides)


def test_matrix_shape():
  assert projection.matrix_shape(()) == (1, 1)
  assert projection.matrix_shape((5,)) == (1, 5)
  assert projection.matrix_shape((6, 4)) == (6, 4)
  # 3-D: the most balanced split of the axes, as a row-major reshape.
  assert projection.matrix_shape((4, 3, 8)) == (12, 8)
  assert projection.matrix_shape((2, 3, 4)) == (6, 4)
  assert projection.matrix_shape((8, 2, 4)) == (8, 8)      # out kernel (h, hd, d)
  assert projection.matrix_shape((16, 2, 8)) == (16, 16)   # query kernel (d, h, hd)
  assert projection.matrix_shape((2, 2, 2, 2)) == (4, 4)
  # A tie between (2, 8) and (8, 2) goes to the larger fan-in.
  assert projection.matrix_shape((2, 4, 2)) == (8, 2)


def test_make_layout_sizes():
  params = _params()
  full = projection.make_layout(params, 10**6)
  assert [b.name for b in full.blocks] == ["t", "w", projection.VECTORS]
  assert _sides(full) == [(12, 8), (8, 12), (1, 21)]
  assert full.blocks[-1].paths == ("bias", "s", "scale")   # tree order
  # A budget above the model size projects nothing: every side is identity.
  assert full.dim == sum(int(np.size(x)) for x in jax.tree.leaves(params)) == 213
  for block in full.blocks:
    assert block.k == block.shape
    assert projection.block_matrices(full, block) == (None, None)

  sides = _sides(full)
  for budget in [3, 4, 10, 50, 78, 100, 136, 150, 212]:
    layout = projection.make_layout(params, budget)
    assert layout.dim <= budget
    s = max(max(b.k) for b in layout.blocks)
    # Every side is min(side, s) with the LARGEST s under the budget.
    assert [b.k for b in layout.blocks] == [(min(a, s), min(b, s)) for a, b in sides]
    assert layout.dim == _total(sides, s)
    assert _total(sides, s + 1) > budget
    offsets = np.cumsum([0] + [b.size for b in layout.blocks])
    assert [b.offset for b in layout.blocks] == offsets[:-1].tolist()

  # Sides with k == side are identity, the others are Gaussian k x side.
  layout = projection.make_layout(params, 100)       # s = 6
  assert [b.k for b in layout.blocks] == [(6, 6), (6, 6), (1, 6)]
  left, right = projection.block_matrices(layout, layout.blocks[-1])
  assert left is None and right.shape == (6, 21)
  layout = projection.make_layout(params, 150)       # s = 8: w's rows unprojected
  assert [b.k for b in layout.blocks] == [(8, 8), (8, 8), (1, 8)]
  t_left, t_right = projection.block_matrices(layout, layout.blocks[0])
  w_left, w_right = projection.block_matrices(layout, layout.blocks[1])
  assert t_left.shape == (8, 12) and t_right is None
  assert w_left is None and w_right.shape == (8, 12)


def test_make_layout_too_small():
  params = _params()
  assert projection.make_layout(params, 3).dim == 3    # one number per block
  with pytest.raises(ValueError, match="smaller than the 3 blocks"):
    projection.make_layout(params, 2)


def test_layout_json_round_trip():
  layout = projection.make_layout(_params(), 100, seed=7)
  text = json.dumps(layout.to_json())
  back = projection.Layout.from_json(json.loads(text))
  assert back == layout
  assert back.dim == layout.dim == json.loads(text)["dim"]
  for a, b in zip(layout.blocks, back.blocks):
    for x, y in zip(projection.block_matrices(layout, a),
                    projection.block_matrices(back, b)):
      np.testing.assert_array_equal(x, y)


def test_matrices_deterministic_per_seed_and_block():
  params = _params()
  a = projection.make_layout(params, 100, seed=3)
  b = projection.make_layout(params, 100, seed=3)
  c = projection.make_layout(params, 100, seed=4)
  for ba, bb, bc in zip(a.blocks, b.blocks, c.blocks):
    ma, mb, mc = (projection.block_matrices(l, blk)
                  for l, blk in [(a, ba), (b, bb), (c, bc)])
    for x, y, z in zip(ma, mb, mc):
      if x is None:
        continue
      np.testing.assert_array_equal(x, y)
      assert not np.allclose(x, z)
  # Blocks of the same shape still get different matrices (keyed by name).
  same = {"p": jnp.zeros((6, 6)), "q": jnp.zeros((6, 6))}
  layout = projection.make_layout(same, 32)
  p, q = (projection.block_matrices(layout, blk) for blk in layout.blocks)
  assert not np.allclose(p[0], q[0]) and not np.allclose(p[1], q[1])
  assert not np.allclose(p[0], p[1])                     # left != right


def test_block_matrices_statistics():
  """Entries N(0, 1/rows): E[P^T P] = I, so projections preserve inner products."""
  layout = projection.make_layout({"w": jnp.zeros((400, 300))}, 50 * 50)
  left, right = (np.asarray(m, np.float64)
                 for m in projection.block_matrices(layout, layout.blocks[0]))
  assert left.shape == (50, 400) and right.shape == (50, 300)
  for m in (left, right):
    assert abs(m.mean()) < 4 * (1 / np.sqrt(50)) / np.sqrt(m.size)
    var = m.var()
    assert abs(var - 1 / 50) < 4 * (np.sqrt(2) / 50) / np.sqrt(m.size)
    # Column norms^2 are chi^2_50 / 50: mean 1.
    norms = (m * m).sum(0)
    assert abs(norms.mean() - 1) < 4 * np.sqrt(2 / 50) / np.sqrt(len(norms))


def test_project_matches_hand_written_blocks():
  """project() equals P_L G P_R^T per block, reshaping tensors row-major."""
  params = _params()
  rng = np.random.default_rng(1)
  n = 3
  grads = jax.tree.map(lambda x: rng.normal(size=(n, *x.shape)).astype(np.float32),
                       params)
  for budget in [10, 100, 150, 1000]:
    layout = projection.make_layout(params, budget, seed=5)
    got = np.asarray(projection.project(layout, grads))
    assert got.shape == (n, layout.dim) and got.dtype == np.float32
    pieces = []
    for block in layout.blocks:
      a, b = block.shape
      g = np.concatenate([grads[p].reshape(n, -1) for p in block.paths], axis=1)
      g = g.reshape(n, a, b).astype(np.float64)
      left, right = projection.block_matrices(layout, block)
      left = np.eye(a) if left is None else np.asarray(left, np.float64)
      right = np.eye(b) if right is None else np.asarray(right, np.float64)
      pieces.append(np.einsum("ka,nab,lb->nkl", left, g, right).reshape(n, -1))
    np.testing.assert_allclose(got, np.concatenate(pieces, axis=1), rtol=1e-5,
                               atol=1e-5)


def test_dense_matrix_against_kron_and_einsum():
  params = _params()
  layout = projection.make_layout(params, 150, seed=2)   # mixes identity/projected
  dense = projection.dense_matrix(layout, params)
  size = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  assert dense.shape == (layout.dim, size)

  # One block by hand: vec(P_L G P_R^T) = (P_L kron P_R) vec(G), row-major.
  rng = np.random.default_rng(3)
  big = projection.make_layout({"m": jnp.zeros((7, 9))}, 4 * 5 + 1)
  block = big.blocks[0]
  assert block.k == (4, 4)
  left, right = (np.asarray(m, np.float64) for m in projection.block_matrices(big, block))
  g = rng.normal(size=(7, 9))
  by_einsum = np.einsum("ka,ab,lb->kl", left, g, right).reshape(-1)
  kron = np.kron(left, right)
  np.testing.assert_allclose(kron @ g.reshape(-1), by_einsum, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(
      projection.dense_matrix(big, {"m": jnp.zeros((7, 9))}) @ g.reshape(-1),
      by_einsum, rtol=1e-12, atol=1e-12)

  # The whole matrix against project() on random gradients, in ravel order.
  grads = jax.tree.map(lambda x: rng.normal(size=(2, *x.shape)).astype(np.float32),
                       params)
  flat = np.stack([np.asarray(jax.flatten_util.ravel_pytree(
      jax.tree.map(lambda x: x[i], grads))[0], np.float64) for i in range(2)])
  np.testing.assert_allclose(flat @ dense.T, projection.project(layout, grads),
                             rtol=1e-5, atol=1e-5)
  # Identity blocks copy their entries: the unprojected layout is a permutation.
  full = projection.make_layout(params, 10**6)
  perm = projection.dense_matrix(full, params)
  np.testing.assert_array_equal(perm.sum(0), 1)
  np.testing.assert_array_equal(perm.sum(1), 1)
  np.testing.assert_array_equal(np.sort(flat @ perm.T, axis=1), np.sort(flat, axis=1))


def test_matrices_do_not_depend_on_jax_random_settings(tmp_path):
  """Before 2026-12-04 `jax_threefry_partitionable=False` (the default before
  JAX 0.5) gave other matrices for the same seed, and `jax_default_prng_impl
  ='rbg'` another generator: a store queried so scored against other
  projections without a word."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  params = {"w": np.zeros((32, 24)), "e": np.zeros((40, 16))}
  layout = projection.make_layout(params, 256, seed=3)
  here = [np.asarray(x) for s in projection.matrices(layout).values() for x in s
          if x is not None]
  out = tmp_path / "there.npz"
  code = (
      "import jax, numpy as np\n"
      "jax.config.update('jax_threefry_partitionable', False)\n"
      "jax.config.update('jax_default_prng_impl', 'rbg')\n"
      "from tracer import projection\n"
      "layout = projection.make_layout({'w': np.zeros((32, 24)), "
      "'e': np.zeros((40, 16))}, 256, seed=3)\n"
      "np.savez(%r, *[np.asarray(x) for s in projection.matrices(layout).values() "
      "for x in s if x is not None])\n" % str(out))
  subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
  with np.load(out) as there:
    assert len(there.files) == len(here) > 0
    for i, x in enumerate(here):
      np.testing.assert_array_equal(there[f"arr_{i}"], x)
