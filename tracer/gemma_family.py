"""The Gemma family: Gemma 2 / Gemma 3 text models from DeepMind's ``gemma``
library (``from gemma import gm``), behind ``tracer.family.Family``.

Install the library with ``pip install 'tracer[gemma]'`` (gemma 3.3.0,
kauldron 1.4.2 and protobuf >= 7 with jax 0.10.2 / flax 0.12.8; see
``_kauldron_compat``). Importing this module registers the family as
``"gemma"``; ``tracer.family.get("gemma")`` imports it on demand. Importing
the library imports TensorFlow (``kauldron.typing`` does): ~10 s.

Config (``GemmaConfig``, JSON-able): either a released size,
``{"preset": "gemma3_270m", "max_len": 256}`` (``PRESETS``: the ``gm.nn``
class; text only), or an explicit architecture (``preset`` None: the
``gm.nn.config.TransformerConfig`` fields below, Gemma 3's conventions as
defaults). ``TINY`` is the 2-layer test model.

Conventions, and how tracer's examples meet them:
  * Ids: pad 0, EOS 1, BOS 2 (every Gemma tokenizer), the same pad and EOS as
    ``tracer.data`` (which appends ``EOS_ID = 1`` to every text).
  * The library builds its attention mask and positions from the tokens:
    every token equal to 0 is padding, never attended to. tracer's inputs
    start with 0 (the targets shifted right), so as given, position 0 is a
    masked key for every query, and its own query row is empty: softmax over
    nothing but the mask value gives it uniform weights over the WHOLE
    sequence, so the first prediction would see the future. Released Gemma
    models also expect BOS there. ``model_tokens`` therefore puts ``bos_id``
    at position 0 whenever it holds pad, inside the family: tracer's data
    pipeline stays family-agnostic.
  * The forward pass is the library's own (``Transformer.__call__``: logits
    ``[..., L, vocab]``, final soft-cap included; called without its
    ``nn.jit`` wrapper, see ``_forward``); losses are tracer's (``loss_fn``:
    mean cross-entropy over the weighted tokens of one example).
  * The factored kernel (``tracer.factored``) knows flax's own Dense /
    DenseGeneral / Einsum / Embed; this module registers the library's
    ``gm.nn.Einsum`` and ``Embedder`` with it (``_register_factored``), so
    the embedding, ``attn_vec_einsum``, ``gating_einsum`` and ``linear`` are
    factored. ``q_einsum`` and ``kv_einsum`` stay materialized (their output
    axes N, or C and K, fall on the input side of the projection's block
    split; the encoder warns and names them): 17.7M of Gemma 3 270M's 268M
    params.

Checkpoints are the library's format (``gm.ckpts.save_params`` /
``load_params``: an Orbax ``StandardCheckpointer`` directory of the params
tree), so released weights load as they are. A released model has no
optimizer state: run without the correction (``second_moment=None``), or
load an optax state saved beside it (``save_opt_state`` / ``load_opt_state``)
and pass ``tracer.second_moment(state, params)``.

Tokenizers: ``GemmaVocabulary(path)`` wraps ``gm.text.Gemma3Tokenizer(path)``
(a sentencepiece model file; nothing is downloaded) with tracer.data's
vocabulary interface.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tracer import data as data_lib

# The library imports TensorFlow (kauldron.typing does): quietly.
kd = data_lib.quiet_import("kauldron.kd")


def _kauldron_compat() -> None:
  """Makes ``gm.ckpts`` (and the presets, which import it) importable.

  gemma 3.3.0 (and 3.2.1) subclass ``kd.ckpts.AbstractPartialLoader``, the
  name kauldron 1.3 gave the abstract class kauldron 1.4 renamed
  ``InitTransform`` (kauldron 1.3's source: "TODO(epot): rename to
  `InitTransform`"; the bodies are the same). kauldron 1.3 does not import
  under jax 0.10 and no kauldron 1.4.x keeps the old name, so the old name is
  aliased to the new one. (kauldron 1.4.2 is needed: 1.4.1's
  ``kauldron.random`` patches ``jax._src.random._check_prng_key``, gone in jax
  0.10, and ``gm.ckpts`` imports it.)
  """
  ckpts = kd.ckpts
  if not hasattr(ckpts, "AbstractPartialLoader") and hasattr(ckpts, "InitTransform"):
    ckpts.AbstractPartialLoader = ckpts.InitTransform


_kauldron_compat()

# ``gm``'s submodules load lazily: import the ones used here now, quietly
# (and after the shim above, which gm.ckpts needs).
for _name in ("gemma.gm", "gemma.gm.nn", "gemma.gm.ckpts", "gemma.gm.text"):
  data_lib.quiet_import(_name)
from gemma import gm  # pylint: disable=g-import-not-at-top,wrong-import-position

from tracer import family as family_lib
from tracer.model import weighted_losses
from tracer import partitioning
from tracer import storage
from tracer.errors import InputError, quiet_failed_loads, unread_array

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2

# Released sizes: preset name -> (gm.nn class name, tokenizer version).
PRESETS = {
    "gemma2_2b": ("Gemma2_2B", 2),
    "gemma2_9b": ("Gemma2_9B", 2),
    "gemma2_27b": ("Gemma2_27B", 2),
    "gemma3_270m": ("Gemma3_270M", 3),
    "gemma3_1b": ("Gemma3_1B", 3),
    "gemma3_4b": ("Gemma3_4B", 3),
    "gemma3_12b": ("Gemma3_12B", 3),
    "gemma3_27b": ("Gemma3_27B", 3),
}

_ATTENTION = {"local": "LOCAL_SLIDING", "global": "GLOBAL"}
_DTYPES = ("float32", "bfloat16")
# gm.nn.config.QueryPreAttentionNormalisation's members.
_QUERY_NORMS = ("BY_ONE_OVER_SQRT_HEAD_DIM", "BY_EMBED_DIM_DIV_NUM_HEADS",
                "BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS")
_INT, _FLOAT_OR_NONE = ((int,), "an integer"), ((int, float, type(None)), "a number or None")
_FIELD_TYPES = {
    "preset": ((str, type(None)), "a preset name or None"),
    "dtype": ((str,), "a string"), "query_pre_attn_norm": ((str,), "a string"),
    "attention_pattern": ((tuple, list), "a list of 'local' / 'global'"),
    **{n: _INT for n in ("max_len", "bos_id", "vocab_size", "num_layers",
                         "embed_dim", "hidden_dim", "num_heads", "head_dim",
                         "num_kv_heads", "sliding_window_size")},
    **{n: ((int, float), "a number") for n in ("local_base_frequency",
                                               "global_base_frequency")},
    **{n: ((bool,), "true or false") for n in (
        "use_qk_norm", "use_post_attn_norm", "use_post_ffw_norm",
        "transpose_gating_einsum")},
    "final_logit_softcap": _FLOAT_OR_NONE, "attn_logits_soft_cap": _FLOAT_OR_NONE,
}


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  """A Gemma model for tracer. With ``preset`` set, the preset's own
  architecture is used: only ``max_len``, ``dtype`` and ``bos_id`` may be
  set beside it (an architecture field off its default is refused)."""
  preset: str | None = None
  max_len: int = 128                 # tracer's example length, in tokens
  dtype: str = "float32"             # params (and so activations) dtype
  bos_id: int = BOS_ID               # what position 0 holds (module doc)
  # The architecture (preset None): gm.nn.config.TransformerConfig's fields,
  # defaults as Gemma 3 270M / 1B.
  vocab_size: int = 262_144          # TransformerConfig.num_embed
  num_layers: int = 2
  embed_dim: int = 640
  hidden_dim: int = 2048
  num_heads: int = 4
  head_dim: int = 256
  num_kv_heads: int = 1
  # Repeated (and cut) to num_layers: Gemma 3's 5 local layers then 1 global.
  attention_pattern: tuple[str, ...] = ("local",) * 5 + ("global",)
  sliding_window_size: int = 512
  use_qk_norm: bool = True
  use_post_attn_norm: bool = True
  use_post_ffw_norm: bool = True
  transpose_gating_einsum: bool = True
  local_base_frequency: int = 10_000
  global_base_frequency: int = 1_000_000
  final_logit_softcap: float | None = None
  attn_logits_soft_cap: float | None = None
  query_pre_attn_norm: str = "BY_ONE_OVER_SQRT_HEAD_DIM"

  def __post_init__(self):
    # Types first: a gin binding of the wrong type would fail later, deep in
    # the library, as a traceback.
    for f in dataclasses.fields(self):
      value, want = getattr(self, f.name), _FIELD_TYPES.get(f.name)
      if want and (not isinstance(value, want[0]) or (
          isinstance(value, bool) and bool not in want[0])):
        raise InputError(f"GemmaConfig.{f.name}={value!r}: expected {want[1]}")
    if not all(isinstance(a, str) for a in self.attention_pattern):
      raise InputError(f"GemmaConfig.attention_pattern={self.attention_pattern!r}: "
                       "expected a list of 'local' / 'global'")
    # Hashable (the model and compiled programs are cached on the config).
    object.__setattr__(self, "attention_pattern", tuple(self.attention_pattern))
    if self.preset is not None and self.preset not in PRESETS:
      raise InputError(f"gemma preset {self.preset!r}: expected one of "
                       f"{', '.join(PRESETS)} (or none, with explicit sizes)")
    if self.preset is not None:
      ignored = [f.name for f in dataclasses.fields(self)
                 if f.name not in ("preset", "max_len", "dtype", "bos_id")
                 and getattr(self, f.name) != f.default]
      if ignored:
        raise InputError(f"GemmaConfig.{ignored[0]}={getattr(self, ignored[0])!r} "
                         f"with preset {self.preset!r}: a preset brings its own "
                         "architecture; expected only max_len, dtype and bos_id "
                         "beside it")
    if self.dtype not in _DTYPES:
      raise InputError(f"gemma dtype {self.dtype!r}: expected one of {_DTYPES}")
    bad = [a for a in self.attention_pattern if a not in _ATTENTION]
    if bad or not self.attention_pattern:
      raise InputError(f"gemma attention_pattern {list(self.attention_pattern)}: "
                       "expected a non-empty list of 'local' / 'global'")
    if self.max_len < 2:
      raise InputError(f"gemma max_len {self.max_len}: expected at least 2")
    sizes = ("vocab_size", "num_layers", "embed_dim", "hidden_dim", "num_heads",
             "head_dim", "num_kv_heads", "sliding_window_size")
    small = [f"{n}={getattr(self, n)}" for n in sizes if getattr(self, n) < 1]
    if small:
      raise InputError(f"GemmaConfig.{small[0]}: expected at least 1")
    if self.num_heads % self.num_kv_heads:
      raise InputError(f"GemmaConfig.num_kv_heads={self.num_kv_heads}: expected "
                       f"a divisor of num_heads={self.num_heads}")
    if self.query_pre_attn_norm not in _QUERY_NORMS:
      raise InputError(f"GemmaConfig.query_pre_attn_norm="
                       f"{self.query_pre_attn_norm!r}: expected one of "
                       f"{', '.join(_QUERY_NORMS)}")
    # Position 0 holds bos_id; PAD there lets the first prediction see the
    # future (module doc). Past the vocabulary, the embedding lookup clamps.
    if self.bos_id == PAD_ID or not 0 <= self.bos_id < self.num_embed:
      raise InputError(f"GemmaConfig.bos_id={self.bos_id}: expected an id other "
                       f"than PAD ({PAD_ID}), below vocab_size "
                       f"({self.num_embed})")

  @property
  def num_embed(self) -> int:
    """The embedding's rows: the preset's own (Gemma 2 256,128, Gemma 3
    262,144), else ``vocab_size``."""
    if self.preset is None:
      return self.vocab_size
    return int(getattr(gm.nn, PRESETS[self.preset][0]).config.num_embed)

  @property
  def tokenizer_version(self) -> int:
    return PRESETS[self.preset][1] if self.preset else 3

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["attention_pattern"] = list(self.attention_pattern)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "GemmaConfig":
    if not isinstance(d, dict):
      raise InputError(f"gemma model config: expected an object, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise InputError(f"gemma model config has unknown fields {unknown}; "
                       f"expected some of {sorted(names)}")
    return cls(**d)


# The 2-layer test model (a local and a global layer, multi-query attention
# like 270M/1B): init and a forward pass take seconds on a CPU.
TINY = GemmaConfig(vocab_size=259, max_len=64, num_layers=2, embed_dim=64,
                   hidden_dim=128, num_heads=4, head_dim=16, num_kv_heads=1,
                   attention_pattern=("local", "global"), sliding_window_size=16)


def transformer_config(config: GemmaConfig) -> Any:
  """The library's ``TransformerConfig`` for an explicit architecture."""
  c = config
  kinds = tuple(getattr(gm.nn.AttentionType, _ATTENTION[a]) for a in c.attention_pattern)
  return gm.nn.config.TransformerConfig(
      num_embed=c.vocab_size, embed_dim=c.embed_dim, hidden_dim=c.hidden_dim,
      num_heads=c.num_heads, head_dim=c.head_dim, num_kv_heads=c.num_kv_heads,
      final_logit_softcap=c.final_logit_softcap,
      use_post_attn_norm=c.use_post_attn_norm, use_post_ffw_norm=c.use_post_ffw_norm,
      attention_types=gm.nn.config.make_attention_layers_types(
          kinds, num_layers=c.num_layers),
      query_pre_attn_norm=getattr(gm.nn.config.QueryPreAttentionNormalisation,
                                  c.query_pre_attn_norm),
      attn_logits_soft_cap=c.attn_logits_soft_cap,
      sliding_window_size=c.sliding_window_size,
      transpose_gating_einsum=c.transpose_gating_einsum, use_qk_norm=c.use_qk_norm,
      local_base_frequency=c.local_base_frequency,
      global_base_frequency=c.global_base_frequency, vision_encoder=None)


@functools.lru_cache(maxsize=16)
def make_model(config: GemmaConfig):
  """The library's model (a flax linen ``gm.nn.Transformer``), text only."""
  dtype = jnp.dtype(config.dtype)
  if config.preset is not None:
    cls = getattr(gm.nn, PRESETS[config.preset][0])
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {"text_only": True} if "text_only" in fields else {}
    return cls(dtype=dtype, **kwargs)
  return gm.nn.Transformer(config=transformer_config(config), dtype=dtype)


def model_tokens(config: GemmaConfig, inputs: jax.Array) -> jax.Array:
  """tracer's ``inputs`` as the library's tokens: BOS at position 0 when it
  holds pad (module doc)."""
  inputs = jnp.asarray(inputs, jnp.int32)
  first = inputs[..., :1]
  first = jnp.where(first == PAD_ID, jnp.int32(config.bos_id), first)
  return jnp.concatenate([first, inputs[..., 1:]], axis=-1)


def _forward(model, tokens, **kwargs):
  """The library's forward pass, ``Transformer.__call__`` (``kwargs``: its
  ``positions``, ``cache``, ...), without the ``nn.jit`` it is wrapped in
  (there "so that Colab does not crash"; every tracer caller jits anyway).
  Unwrapped, ``tracer.factored`` matches each layer's weight to its param by
  identity rather than by name (same logits, up to float rounding)."""
  call = type(model).__call__
  return getattr(call, "__wrapped__", call)(model, tokens, **kwargs)


def logits(config: GemmaConfig, params: Any, inputs: jax.Array) -> jax.Array:
  """float32 ``[..., L, vocab]``: the library's forward pass on tracer inputs."""
  out = make_model(config).apply({"params": params}, model_tokens(config, inputs),
                                 method=_forward)
  return out.logits.astype(jnp.float32)


def token_losses(config: GemmaConfig, params: Any, example: dict) -> jax.Array:
  """Per-token cross-entropy float32 ``[..., L]`` (unweighted)."""
  logp = jax.nn.log_softmax(logits(config, params, example["inputs"]), axis=-1)
  return -jnp.take_along_axis(logp, example["targets"][..., None], axis=-1)[..., 0]


# One function per config, as ``model.make_loss_fn``: the encoder's jitted
# programs are reused by every later encoder of the same model.
@functools.lru_cache(maxsize=64)
def _loss_fn(config: GemmaConfig):
  return functools.partial(example_loss, config)


def example_loss(config: GemmaConfig, params: Any, example: dict) -> jax.Array:
  """Mean cross-entropy over the weighted tokens of ONE example: a scalar."""
  weights = example["weights"].astype(jnp.float32)
  return (jnp.sum(weighted_losses(token_losses(config, params, example), weights))
          / jnp.maximum(jnp.sum(weights), 1.0))


def greedy_decode(config: GemmaConfig, params: Any, examples: dict,
                  num_tokens: int) -> jax.Array:
  """Greedy continuation int32 ``[B, num_tokens]`` of each query's prompt
  (every position before the first weighted one, p of them), as
  ``tracer.model.greedy_decode``, with the library's keys-and-values cache.

  The cache has ``L + num_tokens`` slots: one forward pass over the window
  ``[B, L]`` (cleared from p on, logits of the last position only: no
  ``[B, L, vocab]``) fills slots ``[0, L)``; step i feeds the token at
  position p + i (step 0: the prompt's last token) into slot L + i and reads
  one position's logits. The library writes every row's step into the same
  slot (its ``end_index`` is shared), so rows of different prompt lengths
  meet through the attention mask: slots before p, and the steps so far.
  The library's positions give RoPE and the sliding window per row. A
  continuation that reaches the window's last position repeats that
  position's token. A generated pad id (0) is attended like any token
  (without a cache it would read as padding).
  """
  inputs = jnp.asarray(examples["inputs"], jnp.int32)
  batch, length = inputs.shape
  if num_tokens == 0:
    return jnp.zeros((batch, 0), jnp.int32)
  model = make_model(config)
  prompt_len = jnp.argmax(examples["weights"] > 0, axis=-1)    # p per row
  rows, slots = jnp.arange(batch), jnp.arange(length + num_tokens)
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  # The target is never seen: everything from p on is pad.
  prefill = jnp.where(positions < prompt_len[:, None], inputs, PAD_ID)
  causal = (slots[None, :] <= jnp.arange(length)[:, None])      # [L, slots]
  cache = model.config.init_cache(batch, jnp.dtype(config.dtype),
                                  cache_length=length + num_tokens)
  cache = model.apply({"params": params}, model_tokens(config, prefill),
                      method=_forward, positions=positions, cache=cache,
                      attention_mask=jnp.broadcast_to(causal, (batch, *causal.shape)),
                      return_last_only=True).cache
  seen = slots[None, :] < prompt_len[:, None]                    # [B, slots]
  last = model_tokens(config, inputs)[rows, prompt_len]          # position p

  def step(i, carry):
    cache, token, out = carry
    pos = prompt_len + i
    mask = seen | ((slots >= length) & (slots <= length + i))[None, :]
    result = model.apply({"params": params}, token[:, None], method=_forward,
                         positions=pos[:, None], cache=cache,
                         attention_mask=mask[:, None, :])
    new = jnp.argmax(result.logits[:, 0], axis=-1).astype(jnp.int32)
    # Past the window the position's inputs cannot change: nor its token.
    new = jnp.where(pos <= length - 1, new, out[:, i - 1])
    return result.cache, new, out.at[:, i].set(new)

  out = jnp.zeros((batch, num_tokens), jnp.int32)
  return jax.lax.fori_loop(0, num_tokens, step, (cache, last, out))[2]


# --- the family ---------------------------------------------------------------

class GemmaFamily:
  """``tracer.family.Family`` for the gemma library's Gemma 2/3 models."""

  name = "gemma"
  config_class = GemmaConfig  # what gin binds for `tracer train --family=gemma`

  def config_from_dict(self, d: dict) -> GemmaConfig:
    return GemmaConfig.from_dict(d)

  def config_to_dict(self, config: GemmaConfig) -> dict:
    return config.to_dict()

  def init_params(self, config: GemmaConfig, seed: int = 0) -> Any:
    """Fresh params (the library's initializers) in ``config.dtype``."""
    tokens = jnp.full((1, config.max_len), config.bos_id, jnp.int32)
    return make_model(config).init(jax.random.PRNGKey(seed), tokens)["params"]

  def loss_fn(self, config: GemmaConfig):
    return _loss_fn(config)

  def target_logprob(self, config: GemmaConfig, params: Any, example: dict):
    """Sum of log p(target tokens | prompt) for ONE query example."""
    return -jnp.sum(weighted_losses(token_losses(config, params, example),
                                    example["weights"].astype(jnp.float32)))

  def greedy_decode(self, config: GemmaConfig, params: Any, examples: dict,
                    num_tokens: int):
    return greedy_decode(config, params, examples, num_tokens)

  def param_shardings(self, config: GemmaConfig, mesh, params: Any) -> Any:
    """By shape (``partitioning.param_shardings``): the gemma library has no
    sharding rules of its own (``gm.sharding`` is empty in 3.3.0)."""
    del config
    return partitioning.param_shardings(mesh, params)

  def max_len(self, config: GemmaConfig) -> int:
    return config.max_len

  def vocab_size(self, config: GemmaConfig) -> int:
    return config.num_embed

  # Released weights (``tracer.pipeline.load_released``): the library's format.
  def load_params(self, path: str, config: GemmaConfig, *, mesh=None) -> Any:
    return load_params(path, config, mesh=mesh)

  def load_opt_state(self, path: str, params: Any, optimizer=None, *, mesh=None):
    return load_opt_state(path, params, optimizer, mesh=mesh)

  def vocabulary(self, config: GemmaConfig, path: str) -> "GemmaVocabulary":
    return GemmaVocabulary(path, version=config.tokenizer_version)


FAMILY = family_lib.register(GemmaFamily())


# --- checkpoints (the library's format) ----------------------------------------

def _local(path: str) -> str:
  """A URL as it is, a local path made absolute (Orbax wants absolute paths)."""
  return storage.normalize(path)


def _abstract_params(config: GemmaConfig) -> Any:
  return jax.eval_shape(lambda: FAMILY.init_params(config))


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {jax.tree_util.keystr(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _first_mismatch(got: dict, want: dict, keys=None) -> str | None:
  """The first of ``keys`` (default: every key of either) whose shape
  differs, as ``key: stored S, config gives T``."""
  for key in sorted(set(got) | set(want) if keys is None else keys):
    if got.get(key) != want.get(key):
      return (f"{key}: stored {got.get(key, 'missing')}, config gives "
              f"{want.get(key, 'missing')}")
  return None


def _stored_mismatch(path: str, expected: Any) -> str | None:
  """The first param missing, extra or of another shape in the checkpoint's
  metadata than in ``expected`` (the vision encoder's aside: it is not
  loaded); None where the metadata cannot say (unreadable, or a layout the
  library converts on load, whose keys are none of ours)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  try:
    with quiet_failed_loads(), ocp.PyTreeCheckpointer() as ckpt:
      stored = _shapes(ckpt.metadata(path).item_metadata.tree)
  except Exception:  # pylint: disable=broad-except
    return None
  stored = {k: v for k, v in stored.items()
            if not k.startswith("['vision_encoder']")}
  want = _shapes(expected)
  if not set(want) & set(stored):
    return None
  return _first_mismatch(stored, want)


def save_params(params: Any, path: str) -> None:
  """Writes ``params`` as the gemma library does (``gm.ckpts.save_params``:
  an Orbax ``StandardCheckpointer`` directory; ``path`` must not exist)."""
  gm.ckpts.save_params(params, _local(path), wait_until_finished=True)


def load_params(path: str, config: GemmaConfig | None = None, *, mesh=None,
                shardings: Any | None = None) -> Any:
  """Params from a gemma-library checkpoint (released weights or
  ``save_params``), text params only.

  With ``config``: checked against its shapes (InputError naming the first
  param that differs) and cast to ``config.dtype``; with ``mesh`` too, read
  straight onto the family's shardings (or ``shardings``, a params-shaped
  tree of ``NamedSharding``).
  """
  path = _local(path)
  if not storage.is_url(path) and not os.path.isdir(path):
    raise InputError(f"{path}: no gemma checkpoint directory")
  expected = _abstract_params(config) if config is not None else None
  if shardings is None and mesh is not None:
    if expected is None:
      raise ValueError("load_params: mesh= needs config= (the params' shapes)")
    shardings = FAMILY.param_shardings(config, mesh, expected)
  target = None
  if shardings is not None:
    # The restore target as abstract arrays on their shardings: the library's
    # own sharding= path fails in gemma 3.3.0 (it constrains its internal
    # _CheckpointTree wrapper instead of the tree it holds).
    if expected is None:
      raise ValueError("load_params: shardings= needs config= (the params' shapes)")
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        expected, shardings)
  if expected is not None:
    # Checked before the restore: Orbax's error for a tree or shape it cannot
    # fit names no param (cut to 400 characters), its failed reads print
    # tracebacks at exit, and without a mesh everything would be read first.
    bad = _stored_mismatch(path, expected)
    if bad:
      raise _mismatch_error(path, config, bad)
  try:
    with quiet_failed_loads():
      params = gm.ckpts.load_params(path, params=target, donate=False,
                                    text_only=target is None)
  except Exception as e:  # pylint: disable=broad-except
    unread = unread_array(e)
    if unread is not None or "No item metadata found" in str(e):
      # An array's data, or the index of all of them, is gone or cut.
      raise InputError(f"{path}: a file of this checkpoint is missing or damaged "
                       f"({str(unread or e)[:400]}); expected a checkpoint copied "
                       "whole") from None
    if not isinstance(e, (ValueError, KeyError, TypeError, FileNotFoundError)):
      raise
    raise InputError(f"{path}: not a gemma params checkpoint, or not one for "
                     f"this config: {str(e)[:400]}") from None
  if expected is not None:
    bad = _first_mismatch(_shapes(params), _shapes(expected))
    if bad:
      raise _mismatch_error(path, config, bad)
    dtype = jnp.dtype(config.dtype)
    params = jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        params)
  return params


def _mismatch_error(path: str, config: GemmaConfig, bad: str) -> InputError:
  return InputError(f"{path}: params do not match the gemma config "
                    f"({config.preset or 'explicit sizes'}): {bad}")


def save_opt_state(opt_state: Any, path: str) -> None:
  """Writes an optax state (e.g. Adam's, for the correction of a model saved
  with ``save_params``) as an Orbax ``StandardCheckpointer`` directory."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(_local(path), opt_state)
    ckpt.wait_until_finished()


def load_opt_state(path: str, params: Any, optimizer=None, *, mesh=None) -> Any:
  """An optax state written by ``save_opt_state``, for ``tracer.second_moment``.

  With ``optimizer`` (the optax transformation that made it): restored into
  its exact structure (``optimizer.init(params)``'s), on ``mesh`` by shape if
  given. Without: restored as stored, and every ``{count, mu, nu}`` node
  becomes an ``optax.ScaleByAdamState``, so ``tracer.second_moment`` finds
  Adam's ν (Adafactor's state needs ``optimizer``).
  """
  import optax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = _local(path)
  if not storage.is_url(path) and not os.path.isdir(path):
    raise InputError(f"{path}: no optimizer state directory")
  with ocp.StandardCheckpointer() as ckpt, quiet_failed_loads():
    try:
      if optimizer is not None:
        target = jax.eval_shape(optimizer.init, params)
        if mesh is not None:
          target = jax.tree.map(
              lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
              target, partitioning.param_shardings(mesh, target))
        return ckpt.restore(path, target)
      raw = ckpt.restore(path)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
      raise InputError(f"{path}: not an optax state for these params: "
                       f"{str(e)[:400]}") from None

  def adam(node):
    if isinstance(node, dict):
      if set(node) == {"count", "mu", "nu"}:
        return optax.ScaleByAdamState(count=node["count"], mu=node["mu"],
                                      nu=node["nu"])
      return {k: adam(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
      return type(node)(adam(v) for v in node)
    return node

  return adam(raw)


# --- tokenizer -----------------------------------------------------------------

def _check_not_replaced_by_cache(path: str) -> None:
  """InputError when the library would read another file than ``path``: a
  file of its name in its cache directory, with other bytes."""
  from gemma.gm.utils import _file_cache  # pylint: disable=g-import-not-at-top
  read = str(_file_cache.maybe_get_from_cache(remote_file_path=path,
                                              cache_subdir="tokenizer"))
  if read == path or storage.read_bytes(read) == storage.read_bytes(path):
    return
  raise InputError(
      f"{path}: the gemma library would read {read} instead (a file of the "
      "same name in its cache, $GEMMA_CACHE_DIR/tokenizer, default "
      "~/.gemma/tokenizer), and its bytes differ; expected that file removed "
      "or GEMMA_CACHE_DIR naming a directory without it, or the tokenizer "
      "under another file name")


class GemmaVocabulary:
  """A Gemma sentencepiece model file (``gm.text.Gemma3Tokenizer(path)``, or
  Gemma 2's) with tracer.data's vocabulary interface: ``encode`` (no BOS, no
  EOS: tracer.data appends EOS, the family puts BOS at position 0),
  ``decode`` (up to the first EOS; pad and BOS dropped), ``vocab_size``,
  ``pad_id``, ``eos_id``, ``bos_id``, ``unk_id``.

  The library reads ``$GEMMA_CACHE_DIR/tokenizer/<file name>`` (default
  ``~/.gemma``) instead of ``path`` when such a file exists: InputError
  when its bytes are not ``path``'s.
  """

  pad_id, eos_id, bos_id, unk_id = PAD_ID, EOS_ID, BOS_ID, 3

  def __init__(self, path: str, version: int = 3):
    if not storage.is_url(path) and not os.path.isfile(path):
      raise InputError(f"{path}: tokenizer model file not found")
    cls = {2: gm.text.Gemma2Tokenizer, 3: gm.text.Gemma3Tokenizer}.get(version)
    if cls is None:
      raise InputError(f"gemma tokenizer version {version!r}: expected 2 or 3")
    self.path, self.version = str(path), version
    _check_not_replaced_by_cache(str(path))
    self.tokenizer = cls(path=str(path))
    try:
      # Loaded now (the library loads it at the first encode), so a damaged
      # file fails here, named.
      processor = self.tokenizer._sp  # pylint: disable=protected-access
    except Exception as e:  # pylint: disable=broad-except
      # (sentencepiece's RuntimeError, protobuf's DecodeError, an OSError)
      raise InputError(f"{path}: not a sentencepiece model file "
                       f"({type(e).__name__}: {' '.join(str(e).split())[:200]})"
                       ) from None
    # tracer.data, the family and the decoder take these ids as Gemma's; a
    # tokenizer trained with others would mislabel pad, EOS and BOS.
    got = (processor.pad_id(), processor.eos_id(), processor.bos_id(),
           processor.unk_id())
    if got != (self.pad_id, self.eos_id, self.bos_id, self.unk_id):
      raise InputError(
          f"{path}: special ids (pad, eos, bos, unk) are {got}; expected "
          f"Gemma's {(self.pad_id, self.eos_id, self.bos_id, self.unk_id)} "
          "(sentencepiece's --pad_id=0 --eos_id=1 --bos_id=2 --unk_id=3)")

  @property
  def vocab_size(self) -> int:
    return int(self.tokenizer.vocab_size)

  def encode(self, s: str | bytes) -> list[int]:
    s = s.decode() if isinstance(s, bytes) else s
    return list(self.tokenizer.encode(s))

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return self.tokenizer.decode([i for i in ids if i not in (self.pad_id, self.bos_id)])

  def __eq__(self, other) -> bool:
    return (isinstance(other, GemmaVocabulary) and other.path == self.path
            and other.version == self.version)

  def __hash__(self) -> int:
    return hash((GemmaVocabulary, self.path, self.version))


# --- the factored kernel ---------------------------------------------------------

def _einsum_operands(args, kwargs):
  """(x, spec) of a ``gm.nn.Einsum`` call, ``layer(eqn, x)``."""
  eqn = args[0] if args else kwargs["eqn"]
  x = args[1] if len(args) > 1 else kwargs["x"]
  return x, eqn


def _register_factored() -> None:
  """Tells ``tracer.factored`` how to read the library's layers, where it
  can be told: ``gm.nn.Einsum`` (``layer(eqn, x)``, weight ``w`` or its
  ``weight_name``) and ``gm.nn.Embedder`` (``encode(ids) = table[ids] *
  sqrt(embed_dim)`` in the table's dtype, ``decode(x) = x @ table.T``)."""
  from tracer import factored  # pylint: disable=g-import-not-at-top
  factored.register_einsum_layer(gm.nn.Einsum, lambda m: m.weight_name,
                                 _einsum_operands)
  factored.register_embedding_layer(
      gm.nn.Embedder, lambda m: "input_embedding", lookup="encode",
      attend="decode",
      scale=lambda m, w: float(np.float32(np.sqrt(m.embed_dim)).astype(w.dtype)))


_register_factored()
