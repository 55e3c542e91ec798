"""Model families: what tracer needs from a model beyond ``loss_fn``.

tracer's core (encoder, hessian, store, scan) needs only the model contract,
``loss_fn(params, example) -> scalar``. Restoring a checkpoint, tail-patch,
predictions and training need a little more, and a ``Family`` gives it:

  name                                   the registry key; checkpoints record it
  config_from_dict(d) / config_to_dict(c)  the family's model config <-> JSON
  init_params(config, seed)              a fresh params pytree
  loss_fn(config)                        the contract: mean CE over the
                                         weighted tokens of ONE example
  target_logprob(config, params, ex)     sum log p(target | prompt), one query
  greedy_decode(config, params, exs, n)  int32[B, n]: each prompt's greedy
                                         continuation
  param_shardings(config, mesh, params)  NamedShardings for params on a
                                         (data, model) mesh
  max_len(config)                        the longest example, in tokens
  vocab_size(config)                     the token ids the model embeds

Examples are tracer's (``tracer.data``): ``{"inputs", "targets": int32[L],
"weights": f32[L]}`` for one sequence, inputs the targets shifted right.

A family is one module with one object registered under its name; optional
families (their library is an extra) are imported on first ``get``. Adding
one: write ``tracer/<name>_family.py`` with the object, add a line to
``_MODULES``.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol

import jax

from tracer import model as model_lib
from tracer import partitioning
from tracer.config import ModelConfig
from tracer.errors import InputError

DEFAULT = "tracer_lm"


class Family(Protocol):
  """The interface (module doc); ``LM`` below is the reference."""

  name: str

  def config_from_dict(self, d: dict) -> Any: ...

  def config_to_dict(self, config: Any) -> dict: ...

  def init_params(self, config: Any, seed: int = 0) -> Any: ...

  def loss_fn(self, config: Any) -> Callable[[Any, dict], jax.Array]: ...

  def target_logprob(self, config: Any, params: Any, example: dict) -> jax.Array: ...

  def greedy_decode(self, config: Any, params: Any, examples: dict,
                    num_tokens: int) -> jax.Array: ...

  def param_shardings(self, config: Any, mesh, params: Any) -> Any: ...

  def max_len(self, config: Any) -> int: ...

  def vocab_size(self, config: Any) -> int: ...


class _TracerLM:
  """tracer's own PaLM-style LM (``tracer.model``), configured by
  ``ModelConfig``; params split over ``model`` by shape."""

  name = DEFAULT

  def config_from_dict(self, d: dict) -> ModelConfig:
    return ModelConfig.from_dict(d)

  def config_to_dict(self, config: ModelConfig) -> dict:
    return config.to_dict()

  def init_params(self, config: ModelConfig, seed: int = 0) -> Any:
    return model_lib.init_params(config, seed)

  def loss_fn(self, config: ModelConfig):
    return model_lib.make_loss_fn(config)

  def target_logprob(self, config: ModelConfig, params: Any, example: dict):
    return model_lib.target_logprob(config, params, example)

  def greedy_decode(self, config: ModelConfig, params: Any, examples: dict,
                    num_tokens: int):
    return model_lib.greedy_decode(config, params, examples, num_tokens)

  def param_shardings(self, config: ModelConfig, mesh, params: Any) -> Any:
    del config
    return partitioning.param_shardings(mesh, params)

  def max_len(self, config: ModelConfig) -> int:
    return config.max_len

  def vocab_size(self, config: ModelConfig) -> int:
    return config.vocab_size


LM = _TracerLM()

_REGISTRY: dict[str, Family] = {LM.name: LM}
# Families whose module is imported on first use (their libraries are extras),
# and the names of their gin-bindable config classes (for a hint when gin
# meets one before the family was named).
_MODULES = {"gemma": "tracer.gemma_family"}
CONFIG_CLASSES = {"GemmaConfig": "gemma"}


def register(family: Family) -> Family:
  """Makes ``family`` known under ``family.name`` (its module calls this)."""
  _REGISTRY[family.name] = family
  return family


def names() -> list[str]:
  return sorted({*_REGISTRY, *_MODULES})


def get(name: str | None) -> Family:
  """The family registered as ``name`` (None: tracer's LM, as checkpoints
  written before families were recorded)."""
  name = DEFAULT if name is None else name
  if name not in _REGISTRY and name in _MODULES:
    try:
      importlib.import_module(_MODULES[name])
    except ImportError as e:
      raise InputError(f"model family {name!r} needs an optional library: {e}; "
                       f"install it with `pip install 'tracer[{name}]'`") from None
  if name not in _REGISTRY:
    raise InputError(f"model family {name!r}: expected one of {', '.join(names())}")
  return _REGISTRY[name]
