"""Tests of the optimizer-state correction V (Adam, AdamW, Adafactor)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tracer import correction


def _params():
  rng = np.random.default_rng(0)
  shapes = {"m": (6, 5), "t": (4, 3, 5), "small": (2, 3), "v": (5,)}
  return {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}


def _grads(step):
  """A different, uneven gradient at every step (scales differ per entry)."""
  rng = np.random.default_rng(100 + step)
  return jax.tree.map(
      lambda x: jnp.asarray(rng.normal(size=x.shape) * rng.uniform(0.1, 3.0, x.shape),
                            jnp.float32), _params())


def _run(opt, steps=3):
  """Runs ``opt``; returns params, the last grads, update and state."""
  params = _params()
  state = opt.init(params)
  for step in range(steps):
    grads = _grads(step)
    updates, state = opt.update(grads, state, params)
    if step < steps - 1:
      params = optax.apply_updates(params, updates)
  return params, grads, updates, state


def _np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


# Adafactor ----------------------------------------------------------------------

def _adafactor(**kw):
  return optax.adafactor(learning_rate=0.1, min_dim_size_to_factor=3, **kw)


def test_adafactor_factored_v_by_hand():
  params, _, _, state = _run(_adafactor())
  fs = correction._find(state, optax._src.factorized.FactoredState)
  assert len(fs) == 1
  fs = _np(fs[0])
  v = _np(correction.second_moment(state, params))
  assert jax.tree.map(np.shape, v) == jax.tree.map(np.shape, params)

  # m: (6, 5). optax factors d0 = axis 0 (largest), d1 = axis 1: v_row is the
  # mean over axis 0 (indexed by columns), v_col the mean over axis 1 (rows).
  v_row, v_col = fs.v_row["m"], fs.v_col["m"]
  assert v_row.shape == (5,) and v_col.shape == (6,)
  want = np.empty((6, 5))
  for i in range(6):
    for j in range(5):
      want[i, j] = v_col[i] * v_row[j] / v_row.mean()
  np.testing.assert_allclose(v["m"], want, rtol=1e-5)

  # t: (4, 3, 5), 3-D. d0 = axis 2 (size 5), d1 = axis 0 (size 4); axis 1 is
  # carried by both factors. v_row: (4, 3), v_col: (3, 5).
  v_row, v_col = fs.v_row["t"], fs.v_col["t"]
  assert v_row.shape == (4, 3) and v_col.shape == (3, 5)
  want = np.empty((4, 3, 5))
  for a in range(4):
    for b in range(3):
      for c in range(5):
        want[a, b, c] = v_row[a, b] * v_col[b, c] / v_row[:, b].mean()
  np.testing.assert_allclose(v["t"], want, rtol=1e-5)

  # Unfactored leaves (a vector; a matrix with a side below the minimum) get v.
  np.testing.assert_array_equal(v["v"], fs.v["v"])
  np.testing.assert_array_equal(v["small"], fs.v["small"])
  assert fs.v["m"].shape == (1,) and fs.v_row["v"].shape == (1,)


def test_adafactor_v_is_split_as_its_param():
  """A factored V is made on the param's sharding (never whole on a device),
  with the same values."""
  from tracer import partitioning  # pylint: disable=g-import-not-at-top
  params, _, _, state = _run(_adafactor())
  mesh = partitioning.make_mesh(model=2)
  shardings = partitioning.given_shardings(mesh, params, None)
  placed = partitioning.place(params, shardings)
  v = correction.second_moment(state, placed)
  want = _np(correction.second_moment(state, params))
  assert v["m"].sharding.spec != jax.sharding.PartitionSpec()  # split over model
  for name in params:
    if name in ("m", "t"):  # factored (the others are the state's own v)
      assert v[name].sharding.is_equivalent_to(placed[name].sharding,
                                               v[name].ndim), name
    np.testing.assert_allclose(np.asarray(v[name]), want[name], rtol=1e-6)


def test_adafactor_v_reproduces_its_update():
  # Without clipping, parameter scaling or momentum the update is -lr g / sqrt(V).
  params, grads, updates, state = _run(
      _adafactor(clipping_threshold=None, multiply_by_parameter_scale=False))
  v = correction.second_moment(state, params)
  want = jax.tree.map(lambda g, vv: -0.1 * g / jnp.sqrt(vv), grads, v)
  for k in params:
    np.testing.assert_allclose(updates[k], want[k], rtol=2e-5, atol=1e-7)
  # correct() with Adafactor's epsilon (added to g^2, 1e-30): the same direction.
  corrected = correction.correct(grads, v, 0.0)
  for k in params:
    np.testing.assert_allclose(-0.1 * np.asarray(corrected[k]), updates[k], rtol=2e-5,
                               atol=1e-7)

  # Default Adafactor (block-RMS clipping, parameter scale): per leaf, still a
  # positive multiple of g / sqrt(V).
  params, grads, updates, state = _run(_adafactor())
  corrected = correction.correct(grads, correction.second_moment(state, params), 0.0)
  for k in params:
    ratio = np.asarray(updates[k], np.float64) / np.asarray(corrected[k], np.float64)
    assert np.all(ratio < 0)
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=5e-5)


# Adam ---------------------------------------------------------------------------

def _adam_state(state):
  found = correction._find(state, optax.ScaleByAdamState)
  assert len(found) == 1
  return found[0]


@pytest.mark.parametrize("steps", [1, 3])
def test_adam_bias_correction_explicit_b2(steps):
  params, grads, updates, state = _run(optax.adam(0.1, b1=0.0, b2=0.95), steps)
  adam = _adam_state(state)
  assert int(adam.count) == steps
  v = correction.second_moment(state, params, b2=0.95)
  for k in params:
    np.testing.assert_allclose(v[k], np.asarray(adam.nu[k], np.float64) /
                               (1 - 0.95 ** steps), rtol=1e-5)
  # With b1 = 0 Adam's update is -lr g / (sqrt(V) + eps): V is what Adam divides by.
  corrected = correction.correct(grads, v, 1e-8)
  for k in params:
    np.testing.assert_allclose(-0.1 * np.asarray(corrected[k]), updates[k], rtol=1e-5,
                               atol=1e-7)
  # The default b2 (0.999) is a different correction.
  default = correction.second_moment(state, params)
  assert not np.allclose(default["m"], v["m"])
  np.testing.assert_allclose(default["m"], np.asarray(adam.nu["m"], np.float64) /
                             (1 - 0.999 ** steps), rtol=1e-4)


def _check_adamw_v(opt, b2, steps=2):
  params, grads, _, state = _run(opt, steps)
  nu = _adam_state(state).nu
  v = correction.second_moment(state, params)
  for k in params:
    np.testing.assert_allclose(v[k], np.asarray(nu[k], np.float64) / (1 - b2 ** steps),
                               rtol=1e-4)
  return params, state, v


def test_adam_b2_from_inject_hyperparams():
  opt = optax.inject_hyperparams(optax.adamw)(learning_rate=0.1, b2=0.9,
                                              weight_decay=0.01)
  params, state, v = _check_adamw_v(opt, 0.9)
  # An explicit b2 wins over the injected one.
  explicit = correction.second_moment(state, params, b2=0.99)
  nu = _adam_state(state).nu
  np.testing.assert_allclose(explicit["m"], np.asarray(nu["m"]) / (1 - 0.99 ** 2),
                             rtol=1e-4)


def test_adam_state_found_inside_wrappers():
  adamw = lambda: optax.adamw(0.1, b2=0.999, weight_decay=0.01)
  # chain(clip, adamw)
  _check_adamw_v(optax.chain(optax.clip_by_global_norm(1.0), adamw()), 0.999)
  # chain(clip, inject_hyperparams(adamw)) with an injected b2
  _check_adamw_v(optax.chain(
      optax.clip(1.0),
      optax.inject_hyperparams(optax.adamw)(learning_rate=0.1, b2=0.8)), 0.8)
  # masked(adamw) covering every parameter
  mask = jax.tree.map(lambda _: True, _params())
  _check_adamw_v(optax.masked(adamw(), mask), 0.999)
  # inject_hyperparams(chain(clip, adamw)) inside masked inside a chain
  inner = optax.inject_hyperparams(
      lambda learning_rate, b2: optax.chain(optax.clip(1.0),
                                            optax.adamw(learning_rate, b2=b2)))(
                                                learning_rate=0.1, b2=0.7)
  _check_adamw_v(optax.chain(optax.masked(inner, mask), optax.scale(1.0)), 0.7)


# Errors -------------------------------------------------------------------------

def test_errors():
  params, _, _, state = _run(optax.adam(0.1), 1)
  extra = dict(params, extra=jnp.zeros(3))
  with pytest.raises(ValueError, match="does not match the params tree"):
    correction.second_moment(state, extra)
  reshaped = dict(params, m=jnp.zeros((5, 6)))
  with pytest.raises(ValueError, match=r"\['m'\] has shape \(6, 5\)"):
    correction.second_moment(state, reshaped)
  _, _, _, fstate = _run(_adafactor(), 1)
  with pytest.raises(ValueError, match="does not match the params tree"):
    correction.second_moment(fstate, extra)
  # No second moment at all.
  for opt in [optax.sgd(0.1), optax.sgd(0.1, momentum=0.9), optax.lion(0.1)]:
    _, _, _, s = _run(opt, 1)
    with pytest.raises(ValueError, match="holds no second moment"):
      correction.second_moment(s, params)
  # Two second moments: ambiguous.
  _, _, _, s = _run(optax.chain(optax.adam(0.1), optax.adam(0.1)), 1)
  with pytest.raises(ValueError, match="several second moments"):
    correction.second_moment(s, params)
  # A mask that leaves some parameters out: those have no second moment.
  mask = dict(jax.tree.map(lambda _: True, params), v=False)
  _, _, _, s = _run(optax.masked(optax.adam(0.1), mask), 1)
  with pytest.raises(ValueError, match="does not match the params tree"):
    correction.second_moment(s, params)


def test_correct():
  g = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([[3.0]])}
  v = {"a": jnp.array([4.0, 0.0]), "b": jnp.array([[9.0]])}
  out = correction.correct(g, v, 0.5)
  np.testing.assert_allclose(out["a"], [1 / 2.5, -2 / 0.5])
  np.testing.assert_allclose(out["b"], [[3 / 3.5]])
  assert correction.correct(g, None, 0.5) is g


def test_adafactor_state_before_its_first_update_gives_v_0():
  """Its v_row is 0: V was 0/0 = NaN for every factored weight."""
  params = {"w": jnp.ones((256, 128)), "b": jnp.ones((128,))}
  v = correction.second_moment(optax.adafactor(1e-3).init(params), params)
  for x in jax.tree.leaves(v):
    np.testing.assert_array_equal(np.asarray(x), 0.0)


def test_steps_taken():
  params = {"w": jnp.ones((256, 128)), "b": jnp.ones((128,))}
  opt = optax.adamw(1e-3)
  state = opt.init(params)
  assert correction.steps_taken(state) == 0
  assert correction.steps_taken(optax.adafactor(1e-3).init(params)) == 0
  _, state = opt.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert correction.steps_taken(state) == 1
  assert correction.steps_taken(optax.sgd(1e-3).init(params)) is None
