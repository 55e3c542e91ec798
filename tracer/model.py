"""A PaLM-style decoder-only Transformer LM and its per-example losses.

Pre-norm RMSNorm, SwiGLU MLP, rotary positions, no biases, input and output
embeddings shared. Everything else in tracer sees the model only through the
contract in ``WORKSPACE.md``: ``loss_fn(params, example) -> scalar``.

An example is a dict of arrays for ONE sequence of length L:
  ``inputs``  int32[L]  tokens fed to the model (targets shifted right, 0 first),
  ``targets`` int32[L]  next tokens,
  ``weights`` f32[L]    1 where the target counts in the loss, 0 elsewhere
                        (padding; the prompt of a query).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tracer.config import ModelConfig


class RMSNorm(nn.Module):
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * scale).astype(x.dtype)


def rotary(x, base: float, positions=None):
  """Applies rotary position embeddings to x[..., L, heads, head_dim] at
  int ``positions[..., L]`` (default ``0 .. L-1``)."""
  length, dim = x.shape[-3], x.shape[-1]
  if positions is None:
    positions = jnp.arange(length)
  freqs = base ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  angles = positions.astype(jnp.float32)[..., :, None] * freqs
  sin, cos = jnp.sin(angles)[..., :, None, :], jnp.cos(angles)[..., :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Block(nn.Module):
  """One pre-norm layer: ``x [..., L, d]`` at ``positions [..., L]`` (default
  ``0 .. L-1``).

  ``decode``: keys and values live in the "cache" collection, one slot per
  position: a call writes its positions' slots, then attends to every slot
  at or before each query's position. The first call (the prompt window,
  positions ``0 .. S-1``) makes the cache ``[B, S, heads, head_dim]``; later
  calls add one position per example (``x [B, 1, d]``).
  """
  config: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, positions=None):
    c = self.config
    dense = lambda feats, name: nn.DenseGeneral(
        feats, use_bias=False, dtype=c.dtype, name=name,
        kernel_init=nn.initializers.normal(c.d_model ** -0.5))
    h = RMSNorm(name="attn_norm")(x)
    q = dense((c.num_heads, c.head_dim), "query")(h)
    k = dense((c.num_heads, c.head_dim), "key")(h)
    v = dense((c.num_heads, c.head_dim), "value")(h)
    if positions is None:
      positions = jnp.arange(x.shape[-2])
    q, k = rotary(q, c.rope_base, positions), rotary(k, c.rope_base, positions)
    key_positions = positions
    if self.decode:
      cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
      cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
      rows = jnp.arange(k.shape[0])[:, None]
      cached_k.value = k = cached_k.value.at[rows, positions].set(k)
      cached_v.value = v = cached_v.value.at[rows, positions].set(v)
      key_positions = jnp.arange(k.shape[-3])
    causal = key_positions[..., None, :] <= positions[..., :, None]   # [..., q, k]
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k).astype(jnp.float32)
    logits = logits * c.head_dim ** -0.5
    logits = jnp.where(causal[..., None, :, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(c.dtype)
    attn = jnp.einsum("...hqk,...khd->...qhd", probs, v)
    x = x + nn.DenseGeneral(c.d_model, axis=(-2, -1), use_bias=False, dtype=c.dtype,
                            name="out",
                            kernel_init=nn.initializers.normal(c.d_model ** -0.5))(attn)
    h = RMSNorm(name="mlp_norm")(x)
    gate = dense(c.d_ff, "gate")(h)
    up = dense(c.d_ff, "up")(h)
    x = x + nn.Dense(c.d_model, use_bias=False, dtype=c.dtype, name="down",
                     kernel_init=nn.initializers.normal(c.d_ff ** -0.5))(
                         nn.silu(gate) * up)
    return x


class ScannedBlock(nn.Module):
  """A Block as the body of ``nn.scan``: ``(x, positions) -> (x, None)``."""
  config: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, positions):
    block = nn.remat(Block) if self.config.remat else Block
    return block(self.config, self.decode, name="block")(x, positions), None


class TransformerLM(nn.Module):
  """Maps int32[..., L] tokens (at ``positions``, default ``0 .. L-1``) to
  float32[..., L, vocab] next-token logits; ``decode``: see ``Block``."""
  config: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, tokens, positions=None):
    c = self.config
    embed = nn.Embed(c.vocab_size, c.d_model, name="embed",
                     embedding_init=nn.initializers.normal(1.0))
    x = embed(tokens).astype(c.dtype)
    if c.scan_layers:
      layers = nn.scan(ScannedBlock, variable_axes={"params": 0, "cache": 0},
                       split_rngs={"params": True}, in_axes=nn.broadcast,
                       length=c.num_layers)
      x, _ = layers(c, self.decode, name="layers")(x, positions)
    else:
      block = nn.remat(Block) if c.remat else Block
      for i in range(c.num_layers):
        x = block(c, self.decode, name=f"layer_{i}")(x, positions)
    x = RMSNorm(name="final_norm")(x)
    # Shared embeddings, scaled so initial logits have unit variance.
    return embed.attend(x.astype(jnp.float32)) * c.d_model ** -0.5


def init_params(config: ModelConfig, seed: int = 0) -> Any:
  """Fresh float32 params pytree for ``config``."""
  tokens = jnp.zeros((1, config.max_len), jnp.int32)
  return TransformerLM(config).init(jax.random.PRNGKey(seed), tokens)["params"]


def token_losses(config: ModelConfig, params: Any, example: dict) -> jax.Array:
  """Per-token cross-entropy float32[..., L] (unweighted)."""
  logits = TransformerLM(config).apply({"params": params}, example["inputs"])
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, example["targets"][..., None], axis=-1)[..., 0]


def example_loss(config: ModelConfig, params: Any, example: dict) -> jax.Array:
  """Mean cross-entropy over the weighted tokens of ONE example: a scalar.

  Corpus examples weight every real token (the full-sequence LM loss); queries
  weight only the target tokens (the target-only loss). Padding has weight 0.
  """
  weights = example["weights"].astype(jnp.float32)
  losses = weighted_losses(token_losses(config, params, example), weights)
  return jnp.sum(losses) / jnp.maximum(jnp.sum(weights), 1.0)


def weighted_losses(losses: jax.Array, weights: jax.Array) -> jax.Array:
  """``losses * weights``, 0 where the weight is 0 even if the loss is not
  finite there (a padding target outside the vocabulary: NaN times 0)."""
  return jnp.where(weights != 0, losses * weights, 0.0)


# One function per config: programs jitted over a loss (the encoder's) are
# then reused by every later encoder of the same model in the process.
@functools.lru_cache(maxsize=64)
def make_loss_fn(config: ModelConfig):
  """The model contract: ``loss_fn(params, example) -> scalar`` for one example."""
  return lambda params, example: example_loss(config, params, example)


def batch_loss(config: ModelConfig, params: Any, batch: dict) -> jax.Array:
  """Mean over the batch of per-example losses (the training objective)."""
  return jnp.mean(jax.vmap(lambda ex: example_loss(config, params, ex))(batch))


def target_logprob(config: ModelConfig, params: Any, example: dict) -> jax.Array:
  """Sum of log p(target tokens | prompt) for ONE query example: a scalar."""
  weights = example["weights"].astype(jnp.float32)
  return -jnp.sum(weighted_losses(token_losses(config, params, example), weights))


def param_count(params: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def greedy_decode(config: ModelConfig, params: Any, examples: dict,
                  num_tokens: int) -> jax.Array:
  """Greedy continuation of each query's prompt: int32[B, num_tokens].

  ``examples`` are query examples (``tracer.data.query_example``); the prompt
  is every position before the first weighted one. One forward pass over
  the prompt window fills the keys-and-values cache (``Block``'s decode);
  each further token is one position per example. A continuation that
  reaches the window's last position repeats that position's token.
  """
  inputs = examples["inputs"]
  if num_tokens == 0:
    return jnp.zeros((inputs.shape[0], 0), jnp.int32)
  length = inputs.shape[-1]
  prompt_len = jnp.argmax(examples["weights"] > 0, axis=-1)  # first target position
  rows = jnp.arange(inputs.shape[0])
  model = TransformerLM(config, decode=True)
  # Clear everything after the prompt so the target is never seen; those
  # slots of the cache are written again before any query reads them.
  positions = jnp.arange(length)
  inputs = jnp.where(positions[None, :] <= prompt_len[:, None], inputs, 0)
  logits, state = model.apply({"params": params}, inputs, mutable=["cache"])
  first = jnp.argmax(logits[rows, prompt_len], axis=-1).astype(jnp.int32)

  def body(i, carry):
    cache, token, out = carry
    # The token predicted at position p is the model input at p + 1.
    pos = prompt_len + i
    logits, state = model.apply({"params": params, **cache}, token[:, None],
                                jnp.minimum(pos, length - 1)[:, None],
                                mutable=["cache"])
    new = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
    token = jnp.where(pos <= length - 1, new, token)
    return state, token, out.at[:, i].set(token)

  out = jnp.zeros((inputs.shape[0], num_tokens), jnp.int32).at[:, 0].set(first)
  return jax.lax.fori_loop(1, num_tokens, body, (state, first, out))[2]
