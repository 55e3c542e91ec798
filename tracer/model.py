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


def rotary(x, base: float):
  """Applies rotary position embeddings to x[..., L, heads, head_dim]."""
  length, dim = x.shape[-3], x.shape[-1]
  freqs = base ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  angles = jnp.arange(length, dtype=jnp.float32)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(angles)[:, None, :], jnp.cos(angles)[:, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Block(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    dense = lambda feats, name: nn.DenseGeneral(
        feats, use_bias=False, dtype=c.dtype, name=name,
        kernel_init=nn.initializers.normal(c.d_model ** -0.5))
    h = RMSNorm(name="attn_norm")(x)
    q = dense((c.num_heads, c.head_dim), "query")(h)
    k = dense((c.num_heads, c.head_dim), "key")(h)
    v = dense((c.num_heads, c.head_dim), "value")(h)
    q, k = rotary(q, c.rope_base), rotary(k, c.rope_base)
    length = x.shape[-2]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k).astype(jnp.float32)
    logits = logits * c.head_dim ** -0.5
    logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
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
  """A Block as the body of ``nn.scan``: ``(x, None) -> (x, None)``."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, _):
    block = nn.remat(Block) if self.config.remat else Block
    return block(self.config, name="block")(x), None


class TransformerLM(nn.Module):
  """Maps int32[..., L] tokens to float32[..., L, vocab] next-token logits."""
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens):
    c = self.config
    embed = nn.Embed(c.vocab_size, c.d_model, name="embed",
                     embedding_init=nn.initializers.normal(1.0))
    x = embed(tokens).astype(c.dtype)
    if c.scan_layers:
      layers = nn.scan(ScannedBlock, variable_axes={"params": 0},
                       split_rngs={"params": True}, length=c.num_layers)
      x, _ = layers(c, name="layers")(x, None)
    else:
      block = nn.remat(Block) if c.remat else Block
      for i in range(c.num_layers):
        x = block(c, name=f"layer_{i}")(x)
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
  losses = token_losses(config, params, example)
  weights = example["weights"].astype(jnp.float32)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_loss_fn(config: ModelConfig):
  """The model contract: ``loss_fn(params, example) -> scalar`` for one example."""
  return lambda params, example: example_loss(config, params, example)


def batch_loss(config: ModelConfig, params: Any, batch: dict) -> jax.Array:
  """Mean over the batch of per-example losses (the training objective)."""
  return jnp.mean(jax.vmap(lambda ex: example_loss(config, params, ex))(batch))


def target_logprob(config: ModelConfig, params: Any, example: dict) -> jax.Array:
  """Sum of log p(target tokens | prompt) for ONE query example: a scalar."""
  return -jnp.sum(token_losses(config, params, example) * example["weights"])


def param_count(params: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def greedy_decode(config: ModelConfig, params: Any, examples: dict,
                  num_tokens: int) -> jax.Array:
  """Greedy continuation of each query's prompt: int32[B, num_tokens].

  ``examples`` are query examples (``tracer.data.query_example``); the prompt
  is every position before the first weighted one. Recomputes the full
  forward pass per token (no cache): meant for short targets on small models.
  """
  inputs = examples["inputs"]
  length = inputs.shape[-1]
  prompt_len = jnp.argmax(examples["weights"] > 0, axis=-1)  # first target position
  model = TransformerLM(config)
  positions = jnp.arange(length)

  def body(i, carry):
    inputs, out = carry
    logits = model.apply({"params": params}, inputs)
    pos = jnp.minimum(prompt_len + i, length - 1)
    token = jnp.argmax(jnp.take_along_axis(logits, pos[:, None, None], axis=1)[:, 0],
                       axis=-1).astype(jnp.int32)
    # The token predicted at position p is the model input at p + 1.
    inputs = jnp.where(positions[None, :] == (pos + 1)[:, None], token[:, None], inputs)
    return inputs, out.at[:, i].set(token)

  # Clear everything after the prompt so the target is never seen.
  inputs = jnp.where(positions[None, :] <= prompt_len[:, None], inputs, 0)
  out = jnp.zeros((inputs.shape[0], num_tokens), jnp.int32)
  return jax.lax.fori_loop(0, num_tokens, body, (inputs, out))[1]
