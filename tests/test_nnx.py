"""Flax NNX models through tracer (``tracer.nnx``), checked against a linen twin.

The same small LM is written twice, in NNX and in linen, with the same
submodule names (so the same params paths, projection blocks and projection
matrices) and the same weights. Both are trained a few steps with Adam, the
NNX one through ``nnx.Optimizer``, the linen one through optax directly; the
NNX model's encodings must equal the linen model's, with and without the
optimizer correction, on one device and on a (4, 2) mesh, with either kernel.
"""

from __future__ import annotations

import warnings

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tracer
import tracer.nnx
from tracer import partitioning
from tracer import projection
from tracer import store

VOCAB, LENGTH, D, H = 16, 6, 8, 12
PROJECTION_DIM = 100     # s = 5: every matrix is projected on both sides
B2 = 0.99
EPS = 1e-6
# A fixed (non-trainable) positional table: non-param state the NNX loss keeps.
POS = np.asarray(np.random.default_rng(7).normal(size=(LENGTH, D)) * 0.1, np.float32)


class NnxLM(nnx.Module):
  """Tied embedding, RMSNorm, an MLP block (one bias): [L] tokens -> [L, V]."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.pos = nnx.Variable(jnp.asarray(POS))
    self.norm = nnx.RMSNorm(D, rngs=rngs)
    self.up = nnx.Linear(D, H, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(H, D, rngs=rngs)

  def __call__(self, tokens):
    h = self.embed(tokens) + self.pos[...]
    h = h + self.down(jax.nn.gelu(self.up(self.norm(h))))
    return self.embed.attend(h)


class LinenLM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(VOCAB, D, name="embed")
    pos = self.variable("consts", "pos", lambda: jnp.asarray(POS)).value
    h = embed(tokens) + pos
    mlp = nn.Dense(H, use_bias=False, name="up")(nn.RMSNorm(name="norm")(h))
    h = h + nn.Dense(D, name="down")(jax.nn.gelu(mlp))
    return embed.attend(h)


def cross_entropy(logits, example):
  """Weighted mean token cross-entropy per example: [..., L, V] -> [...]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  tokens = -jnp.take_along_axis(logp, example["targets"][..., None], axis=-1)[..., 0]
  weights = example["weights"]
  return jnp.sum(tokens * weights, -1) / jnp.maximum(jnp.sum(weights, -1), 1.0)


def nnx_loss(model, example):
  return cross_entropy(model(example["inputs"]), example)


def linen_loss(params, example):
  logits = LinenLM().apply({"params": params, "consts": {"pos": POS}},
                           example["inputs"])
  return cross_entropy(logits, example)


def lm_batch(n, seed):
  rng = np.random.default_rng(seed)
  targets = rng.integers(1, VOCAB, size=(n, LENGTH)).astype(np.int32)
  inputs = np.concatenate([np.zeros((n, 1), np.int32), targets[:, :-1]], axis=1)
  weights = np.ones((n, LENGTH), np.float32)
  weights[::2, LENGTH - 2:] = 0                 # some padding
  return {"inputs": inputs, "targets": targets, "weights": weights}


def linen_params_of(model: NnxLM) -> dict:
  """The NNX model's weights copied into the linen twin's params tree."""
  w = lambda v: jnp.array(v[...])
  return {"embed": {"embedding": w(model.embed.embedding)},
          "norm": {"scale": w(model.norm.scale)},
          "up": {"kernel": w(model.up.kernel)},
          "down": {"kernel": w(model.down.kernel), "bias": w(model.down.bias)}}


@pytest.fixture(scope="module")
def trained():
  """Both twins after 3 Adam steps from the same weights on the same batches."""
  tx = optax.adam(3e-2, b2=B2)
  model = NnxLM(nnx.Rngs(0))
  params = linen_params_of(model)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  opt_state = tx.init(params)

  @nnx.jit
  def nnx_step(model, optimizer, batch):
    grads = nnx.grad(lambda m: jnp.mean(nnx_loss(m, batch)))(model)
    optimizer.update(model, grads)

  @jax.jit
  def linen_step(params, opt_state, batch):
    grads = jax.grad(lambda p: jnp.mean(linen_loss(p, batch)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for seed in range(3):
    batch = lm_batch(8, 100 + seed)
    nnx_step(model, optimizer, batch)
    params, opt_state = linen_step(params, opt_state, batch)
  return dict(model=model, optimizer=optimizer, params=params, opt_state=opt_state)


def assert_rows_close(got, want, rtol=1e-5):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  err = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
  assert err.max() < rtol, err


# The contract's pieces --------------------------------------------------------

def test_contract_matches_linen(trained):
  model, params = trained["model"], trained["params"]
  loss_fn, nnx_params = tracer.nnx.as_contract(model, nnx_loss)
  # Same tree, same path names, same weights (within 3 training steps' rounding).
  assert jax.tree.structure(nnx_params) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(nnx_params), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert "pos" not in nnx_params          # non-param state stays in the module
  want = projection.make_layout(params, PROJECTION_DIM)
  assert projection.make_layout(nnx_params, PROJECTION_DIM) == want
  assert {b.name for b in want.blocks} == {
      "embed/embedding", "up/kernel", "down/kernel", projection.VECTORS}
  # The store fingerprint sees the same tree too.
  copied = linen_params_of(model)
  assert store.fingerprint(nnx_params) == store.fingerprint(copied)

  example = jax.tree.map(lambda x: x[1], lm_batch(2, 5))
  np.testing.assert_allclose(jax.jit(loss_fn)(nnx_params, example),
                             jax.jit(linen_loss)(copied, example), rtol=1e-6)
  g = jax.jit(jax.grad(loss_fn))(nnx_params, example)
  g_linen = jax.jit(jax.grad(linen_loss))(copied, example)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_linen)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_second_moment_from_nnx_optimizer(trained):
  want = tracer.second_moment(trained["opt_state"], trained["params"], b2=B2)
  _, nnx_params = tracer.nnx.as_contract(trained["model"], nnx_loss)
  for got in (tracer.nnx.second_moment(trained["optimizer"], trained["model"], b2=B2),
              tracer.nnx.second_moment(trained["optimizer"].opt_state, nnx_params,
                                       b2=B2),
              tracer.second_moment(tracer.nnx.optax_state(trained["optimizer"]),
                                   nnx_params, b2=B2)):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-4)


@pytest.mark.parametrize("tx", [
    optax.chain(optax.clip_by_global_norm(1.0),
                optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, b2=0.9)),
    optax.adafactor(1e-2, min_dim_size_to_factor=4)],
    ids=["injected_adamw", "adafactor"])
def test_second_moment_any_optax_state(tx):
  model = NnxLM(nnx.Rngs(1))
  params = linen_params_of(model)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  opt_state = tx.init(params)
  rng = np.random.default_rng(3)
  grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype),
                       nnx.state(model, nnx.Param))       # an nnx.State of Params
  optimizer.update(model, grads)
  _, opt_state = tx.update(nnx.to_pure_dict(grads), opt_state, params)
  got = tracer.nnx.second_moment(optimizer, model)      # b2 found, or Adafactor's
  want = tracer.second_moment(opt_state, params)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-12)


def test_loss_writes_stay_inside_the_trace():
  """A loss that writes to the module (here a call counter) leaves the
  user's module as it was."""
  model = NnxLM(nnx.Rngs(2))
  model.calls = nnx.Variable(jnp.zeros((), jnp.int32))

  def counting_loss(m, example):
    m.calls[...] += 1
    return nnx_loss(m, example)

  # What the encoder does with the contract: jit, vmap over examples, grad.
  loss_fn, params = tracer.nnx.as_contract(model, counting_loss)
  grads = jax.jit(jax.vmap(jax.grad(loss_fn), in_axes=(None, 0)))(
      params, lm_batch(2, 9))
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  assert int(model.calls[...]) == 0


# Encodings: NNX == linen ------------------------------------------------------

MESHES = {"1": lambda: partitioning.make_mesh(devices=jax.devices()[:1]),
          "4x2": lambda: partitioning.make_mesh(model=2)}


# Mesh x kernel x correction, each pair of values once (a strength-2 covering
# of the 8 combinations: every compile is seconds on a loaded 2-core CPU).
CASES = [("1", "exact", False), ("1", "factored", True),
         ("4x2", "exact", True), ("4x2", "factored", False)]


@pytest.mark.parametrize("mesh,kernel,corrected", CASES,
                         ids=[f"{m}-{k}-{'adam' if c else 'plain'}" for m, k, c in CASES])
def test_encodings_match_linen(trained, mesh, kernel, corrected):
  mesh = MESHES[mesh]()
  common = dict(projection_dim=PROJECTION_DIM, seed=4, mesh=mesh, epsilon=EPS,
                microbatch_size=2, kernel=kernel)
  params = trained["params"]
  v = tracer.second_moment(trained["opt_state"], params, b2=B2) if corrected else None
  linen = tracer.GradientEncoder(linen_loss, params, second_moment=v, **common)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ours = tracer.nnx.encoder(trained["model"], nnx_loss,
                              optimizer=trained["optimizer"] if corrected else None,
                              b2=B2, **common)
    batch = lm_batch(6, 11)
    got = ours.project(batch)
  # NNX weights are not linen calls: the factored kernel takes none of them.
  if kernel == "factored" and not corrected:
    assert any("cannot take 3 of 3 weights" in str(w.message) for w in caught)
  assert ours.layout == linen.layout
  want = linen.project(batch)
  assert got.shape == (6, ours.dim)
  assert_rows_close(partitioning.fetch(got), partitioning.fetch(want))
  np.testing.assert_allclose(ours.encode(batch), linen.encode(batch), atol=1e-5)
