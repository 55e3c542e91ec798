"""Tests of the Transformer LM, its per-example losses and greedy decoding."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tracer import data as data_lib
from tracer import model as model_lib

TINY = model_lib.ModelConfig(vocab_size=259, max_len=32, d_model=32, num_layers=1,
                             num_heads=2, d_ff=64)


@pytest.fixture(scope="module")
def params():
  return model_lib.init_params(TINY, seed=0)


def _logits(config, params, inputs):
  return np.asarray(model_lib.TransformerLM(config).apply({"params": params}, inputs))


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_param_count_and_shapes(params):
  v, d, f, n = TINY.vocab_size, TINY.d_model, TINY.d_ff, TINY.num_layers
  # Embedding (shared with the output), per layer 4 attention matrices, 3 MLP
  # matrices and 2 norm scales, then the final norm scale. No biases.
  expected = v * d + n * (4 * d * d + 3 * d * f + 2 * d) + d
  assert model_lib.param_count(params) == expected == 18_624
  assert params["layer_0"]["query"]["kernel"].shape == (d, 2, d // 2)
  assert params["layer_0"]["out"]["kernel"].shape == (2, d // 2, d)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  two = model_lib.init_params(
      model_lib.ModelConfig(**{**TINY.to_dict(), "num_layers": 2}))
  assert model_lib.param_count(two) == expected + 4 * d * d + 3 * d * f + 2 * d
  # Same seed, same params; other seed, other params.
  again = model_lib.init_params(TINY, seed=0)
  other = model_lib.init_params(TINY, seed=1)
  assert all(np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(params), jax.tree.leaves(again)))
  assert not np.array_equal(params["embed"]["embedding"],
                            other["embed"]["embedding"])


def test_config_dict_round_trip():
  assert model_lib.ModelConfig.from_dict(TINY.to_dict()) == TINY
  with pytest.raises(ValueError, match="unknown fields"):
    model_lib.ModelConfig.from_dict({**TINY.to_dict(), "n_layer": 3})


def test_causal_output_ignores_later_tokens(params):
  rng = np.random.default_rng(0)
  a = rng.integers(3, 259, size=(1, TINY.max_len)).astype(np.int32)
  la = _logits(TINY, params, a)
  assert la.shape == (1, TINY.max_len, TINY.vocab_size)
  for t in (0, 5, TINY.max_len - 2):
    b = a.copy()
    b[:, t + 1:] = rng.integers(3, 259, size=(1, TINY.max_len - t - 1))
    lb = _logits(TINY, params, b)
    np.testing.assert_array_equal(la[:, :t + 1], lb[:, :t + 1])
    assert not np.allclose(la[:, t + 1:], lb[:, t + 1:])
  # A shorter sequence gives the same logits as the prefix of a longer one.
  np.testing.assert_allclose(_logits(TINY, params, a[:, :10]), la[:, :10],
                             rtol=1e-5, atol=1e-5)


def test_rotary_is_relative():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(16, 1, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(16, 1, 8)), jnp.float32)
  # Same vector at every position, so the score depends on positions only.
  q = jnp.broadcast_to(q[:1], q.shape)
  k = jnp.broadcast_to(k[:1], k.shape)
  rq, rk = model_lib.rotary(q, 10_000.0), model_lib.rotary(k, 10_000.0)
  np.testing.assert_allclose(jnp.linalg.norm(rq, axis=-1),
                             jnp.linalg.norm(q, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(rq[0], q[0], rtol=1e-6)  # position 0: identity
  scores = np.asarray(jnp.einsum("qhd,khd->qk", rq, rk))
  for offset in (0, 1, 5):
    diag = np.diagonal(scores, offset=offset)
    np.testing.assert_allclose(diag, diag[0], rtol=1e-4, atol=1e-4)


def test_query_loss_is_mean_ce_over_target_positions(params):
  prompt, target = [10, 20, 30, 40, 50], [60, 70, 80]
  ex = data_lib.query_example(prompt, target, TINY.max_len)
  n = len(prompt) + len(target)
  np.testing.assert_array_equal(ex["inputs"][:n], [0] + prompt + target[:-1])
  np.testing.assert_array_equal(ex["targets"][:n], prompt + target)
  np.testing.assert_array_equal(np.nonzero(ex["weights"])[0], [5, 6, 7])
  assert not ex["inputs"][n:].any() and not ex["targets"][n:].any()

  logp = _log_softmax(_logits(TINY, params, ex["inputs"][None])[0])
  by_hand = -np.mean([logp[p, ex["targets"][p]] for p in (5, 6, 7)])
  loss = model_lib.make_loss_fn(TINY)(params, ex)
  assert loss.shape == ()
  np.testing.assert_allclose(loss, by_hand, rtol=1e-5)
  np.testing.assert_allclose(model_lib.target_logprob(TINY, params, ex),
                             -3 * by_hand, rtol=1e-5)

  # Padding never counts: garbage targets under weight 0 change nothing, and
  # nor does a longer max_len (more padding at the end).
  garbage = dict(ex, targets=ex["targets"].copy())
  garbage["targets"][:5] = 7
  garbage["targets"][n:] = 99
  assert model_lib.example_loss(TINY, params, garbage) == loss
  longer = data_lib.query_example(prompt, target, 2 * TINY.max_len)
  np.testing.assert_allclose(model_lib.example_loss(TINY, params, longer), loss,
                             rtol=1e-5)


def test_query_loss_gradient_is_zero_on_prompt_and_padding(params):
  prompt, target = [11, 22, 33, 44], [55, 66]
  ex = data_lib.query_example(prompt, target, TINY.max_len)

  def loss_given_logit_shift(delta):
    # Adds ``delta`` to the model's logits: d loss / d delta = d loss / d logits.
    def shift(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if (isinstance(context.module, model_lib.TransformerLM)
          and context.method_name == "__call__"):
        out = out + delta
      return out
    with nn.intercept_methods(shift):
      return model_lib.example_loss(TINY, params, ex)

  zeros = jnp.zeros((TINY.max_len, TINY.vocab_size), jnp.float32)
  grad = np.asarray(jax.grad(loss_given_logit_shift)(zeros))
  target_pos = [4, 5]
  others = np.setdiff1d(np.arange(TINY.max_len), target_pos)
  assert not grad[others].any()
  # On target positions it is (softmax - one_hot) / number of targets.
  probs = np.exp(_log_softmax(_logits(TINY, params, ex["inputs"][None])[0]))
  for p in target_pos:
    expected = probs[p].copy()
    expected[ex["targets"][p]] -= 1
    np.testing.assert_allclose(grad[p], expected / 2, atol=1e-6)


def test_a_masked_target_outside_the_vocabulary_changes_nothing(params):
  """A weight-0 position's target is never read: one outside the vocabulary
  (its log-probability NaN) leaves the loss, its gradient and the target's
  log-probability as they were."""
  ex = data_lib.query_example([11, 22, 33, 44], [55, 66], TINY.max_len)
  bad = {**ex, "targets": ex["targets"].copy()}
  bad["targets"][0] = TINY.vocab_size + 1      # weight 0: a prompt position
  assert ex["weights"][0] == 0
  for fn in (model_lib.example_loss, model_lib.target_logprob):
    value, grad = jax.value_and_grad(lambda p, e: fn(TINY, p, e))(params, ex)
    value_bad, grad_bad = jax.value_and_grad(lambda p, e: fn(TINY, p, e))(params, bad)
    assert np.isfinite(value_bad) and value_bad == value
    jax.tree.map(np.testing.assert_array_equal, grad_bad, grad)


def test_gin_refuses_heads_that_do_not_split_d_model():
  from tracer.launch import config  # pylint: disable=g-import-not-at-top
  from tracer.errors import InputError  # pylint: disable=g-import-not-at-top
  for d_model, heads in [(10, 4), (12, 4), (16, 32)]:
    with pytest.raises(InputError, match=(
        f"ModelConfig.d_model = {d_model}, ModelConfig.num_heads = {heads}: expected "
        "d_model a multiple of num_heads with an even head size")):
      config.check_fields(dataclasses.replace(TINY, d_model=d_model, num_heads=heads))
  config.check_fields(dataclasses.replace(TINY, d_model=16, num_heads=8))


def test_corpus_loss_weights_every_real_token(params):
  tokens = np.asarray([40, 41, 42, 43, data_lib.EOS_ID], np.int32)
  ex = data_lib.corpus_example(tokens, TINY.max_len)
  np.testing.assert_array_equal(ex["weights"][:6], [1, 1, 1, 1, 1, 0])
  logp = _log_softmax(_logits(TINY, params, ex["inputs"][None])[0])
  by_hand = -np.mean([logp[p, tokens[p]] for p in range(5)])
  np.testing.assert_allclose(model_lib.example_loss(TINY, params, ex), by_hand,
                             rtol=1e-5)
  # The batch loss is the mean of the per-example losses.
  other = data_lib.corpus_example(tokens[:2], TINY.max_len)
  batch = data_lib.stack_examples([ex, other])
  np.testing.assert_allclose(
      model_lib.batch_loss(TINY, params, batch),
      (model_lib.example_loss(TINY, params, ex)
       + model_lib.example_loss(TINY, params, other)) / 2, rtol=1e-6)


def test_query_example_truncates_prompt_start():
  ex = data_lib.query_example(list(range(3, 13)), [100, 101], 8)
  np.testing.assert_array_equal(ex["targets"], [7, 8, 9, 10, 11, 12, 100, 101])
  np.testing.assert_array_equal(ex["weights"], [0, 0, 0, 0, 0, 0, 1, 1])
  with pytest.raises(data_lib.InputError, match="does not fit"):
    data_lib.query_example([3], list(range(3, 11)), 8)


def _argmax_by_hand(config, params, prompt, num_tokens):
  tokens = list(prompt)
  for _ in range(num_tokens):
    inputs = np.zeros((1, config.max_len), np.int32)
    inputs[0, 1:len(tokens) + 1] = tokens
    tokens.append(int(np.argmax(_logits(config, params, inputs)[0, len(tokens)])))
  return tokens[len(prompt):]


def test_greedy_decode_matches_step_by_step_argmax(params):
  prompts = [[5, 6, 7], list(range(30, 50))]
  examples = data_lib.stack_examples(
      [data_lib.query_example(p, [3, 3, 3, 3], TINY.max_len) for p in prompts])
  out = np.asarray(model_lib.greedy_decode(TINY, params, examples, 4))
  assert out.shape == (2, 4) and out.dtype == np.int32
  for row, prompt in zip(out, prompts):
    assert row.tolist() == _argmax_by_hand(TINY, params, prompt, 4)


@pytest.mark.parametrize("layers", ["unrolled", "scanned, remat"])
def test_cached_decode_matches_full_forward_passes(layers):
  # The cache against a full forward pass per token (the oracle), on two
  # layers, prompts of several lengths, one running into the window's end:
  # its tokens past the last position repeat that position's token.
  config = dataclasses.replace(TINY, num_layers=2, scan_layers=layers != "unrolled",
                               remat=layers != "unrolled")
  params = model_lib.init_params(config, seed=3)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 259, n).tolist() for n in (1, 7, 20, 29)]
  examples = data_lib.stack_examples(
      [data_lib.query_example(p, [3] * 6, config.max_len) for p in prompts])
  out = np.asarray(jax.jit(model_lib.greedy_decode, static_argnums=(0, 3))(
      config, params, examples, 6))
  for row, prompt in zip(out[:3], prompts):
    assert row.tolist() == _argmax_by_hand(config, params, prompt, 6)
  fits = config.max_len - len(prompts[3])                  # 3 positions left
  want = _argmax_by_hand(config, params, prompts[3], fits)
  assert out[3].tolist() == want + [want[-1]] * (6 - fits)


def test_greedy_decode_reproduces_memorized_continuation():
  texts = [b"Ada was born in London.", b"Kurt was born in Brno."]
  seqs = [np.asarray([b + 3 for b in t] + [data_lib.EOS_ID],
                     np.int32) for t in texts]
  batch = data_lib.stack_examples(
      [data_lib.corpus_example(s, TINY.max_len) for s in seqs])
  params = model_lib.init_params(TINY, seed=0)
  opt = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(
        lambda p: model_lib.batch_loss(TINY, p, batch))(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = opt.init(params)
  for _ in range(150):
    params, opt_state, loss = step(params, opt_state)
  assert loss < 0.05, loss

  split = [len(b"Ada was born in"), len(b"Kurt was born in")]
  queries = data_lib.stack_examples([
      data_lib.query_example(s[:k], s[k:-1], TINY.max_len)
      for s, k in zip(seqs, split)])
  out = np.asarray(model_lib.greedy_decode(TINY, params, queries, 9))
  assert bytes(int(t) - 3 for t in out[0][:8]) == b" London."
  assert bytes(int(t) - 3 for t in out[1][:6]) == b" Brno."
  # The memorized end of text: EOS right after the full stop.
  assert out[0][8] == out[1][6] == data_lib.EOS_ID
