"""Every configuration dataclass of tracer, in one place.

Plain frozen dataclasses: the library takes them as arguments, checkpoints
and manifests store them as dicts, and the launch scripts bind their fields
from gin by class name (``ModelConfig.d_model = 128``,
``EncodeConfig.projection_dim = 65536``; see ``launch/config.py``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

_T = TypeVar("_T")


def _from_dict(cls: type[_T], d: dict[str, Any], what: str, strict: bool = True) -> _T:
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown and strict:
    raise ValueError(f"{what} has unknown fields {unknown}")
  return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Sizes of the Transformer. Stored in every checkpoint as a plain dict."""
  vocab_size: int = 259          # seqio ByteVocabulary: 3 special ids + 256 bytes
  max_len: int = 128
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  d_ff: int = 512
  rope_base: float = 10_000.0
  dtype: str = "float32"         # activation dtype; params stay float32
  # Recompute each layer's activations in the backward pass (nn.remat)
  # instead of keeping them: the usual trade at long L and large models.
  remat: bool = False
  # One stacked param per weight for all layers, run by nn.scan (MaxText's
  # habit): params "layers/block/..." with a leading layer axis.
  scan_layers: bool = False

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "ModelConfig":
    return _from_dict(cls, d, "model config")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The training optimizer; stored in checkpoints so later stages rebuild it."""
  name: str = "adamw"            # "adamw" or "adafactor"
  learning_rate: float = 3e-3
  warmup_steps: int = 50
  total_steps: int = 1000
  final_lr_fraction: float = 0.1  # cosine decay ends at this fraction of the peak
  b1: float = 0.9
  b2: float = 0.99
  # Adam's eps; for Adafactor its eps too, optax's regularizer added to g^2
  # before its moments (optax's default 1e-30; its V, and so tracer's
  # correction, then holds it: entries of about 1e-8 at least).
  eps: float = 1e-8
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  adafactor_decay_rate: float = 0.8  # Adafactor's decay exponent (not Adam's b2)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "OptimizerConfig":
    return _from_dict(cls, d, "optimizer config")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """How texts become examples; stored in checkpoints and corpus manifests."""
  tokenizer: str = "byte"              # "byte", "sentencepiece" or "gemma"
  sentencepiece_model: str | None = None
  overflow: str = "truncate"           # "truncate" or "split" (tracer.data doc)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "DataConfig":
    """From a checkpoint's data dict, which also records the corpus it read."""
    return _from_dict(cls, d, "data config", strict=False)

  def vocabulary(self):
    from tracer import data  # pylint: disable=g-import-not-at-top
    return data.make_vocabulary(self.tokenizer, self.sentencepiece_model)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training loop (``launch.train``)."""
  batch_size: int = 32
  seed: int = 0
  log_every: int = 25
  checkpoint_every: int = 100
  keep_checkpoints: int = 2          # the latest steps kept (memorization studies keep more)


@dataclasses.dataclass(frozen=True)
class EncodeConfig:
  """How examples become encodings, and how they are stored."""
  projection_dim: int = 4096
  seed: int = 0
  correction: str = "optimizer"     # "optimizer" (the checkpoint's V) or "none"
  epsilon: float | None = None      # None: Adam's eps; 0 for Adafactor
  kernel: str = "factored"          # "factored" or "exact" (tracer.factored)
  # Factored kernel: Adam's correction by its rank-one factorization (measured
  # on the fact benchmark, 2 seeds: TrackStar MRR/recall/tail-patch unchanged
  # within a standard error; WORKSPACE.md). False: exact, materialized.
  rank_one_correction: bool = True
  # The projections' fp32 matmuls: "highest" (fp32 units) or "bf16_6x"
  # (fp32-accurate on bf16 tensor cores; tracer.projection.PRECISIONS).
  projection_precision: str = "highest"
  microbatch_size: int = 8          # examples per data shard per step
  batch_size: int = 128             # examples per encode call, over all hosts
  model_axis: int = 1               # size of the mesh's model axis
  store_dtype: str = "bfloat16"      # or "float32", "int8" (tracer.store.quantize)
  chunk_rows: int = 512


# The EncodeConfig fields that decide a store's rows (kept in its manifest,
# ``store.Manifest.encode_config``); the others (mesh and batch sizes) must
# not change them.
ENCODING_SETTINGS = ("projection_dim", "seed", "correction", "epsilon", "kernel",
                     "rank_one_correction", "projection_precision", "store_dtype",
                     "chunk_rows")


@dataclasses.dataclass(frozen=True)
class PreconditionerConfig:
  """R: ``kind`` "block", "full" or "none"; ``task_specific`` mixes in R_eval."""
  kind: str = "block"
  task_specific: bool = True
  train_examples: int = 4096        # corpus rows sampled for R_train (0: all)
  sample_seed: int = 0              # seed of that sample
  rank: int | None = None           # lambda rule's k; None: 1.5% of d
  damping: float = 0.1              # times the mean eigenvalue
  lam: float | None = None          # fixed mix instead of the rule
  # The rule's cap: one query's most weight in R, as a fraction of R_train's
  # trace (hessian.task_lambda, hessian.MAX_QUERY_WEIGHT); None: no cap.
  max_query_weight: float | None = 0.002

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def mix(self) -> dict[str, Any]:
    """The arguments ``hessian.fit`` and ``fit_metric`` take from here."""
    return {"rank": self.rank, "damping": self.damping, "lam": self.lam,
            "max_query_weight": self.max_query_weight}


ALL = (ModelConfig, OptimizerConfig, DataConfig, TrainConfig, EncodeConfig,
       PreconditionerConfig)


# Values a config may hold, beyond its fields' types: the choices of string
# fields, and the least value of numeric ones (``field_error``: what gin binds,
# before any work, and what a checkpoint's config item holds).
_CHOICES = {
    "ModelConfig.dtype": ("float32", "bfloat16", "float16"),
    "OptimizerConfig.name": ("adamw", "adafactor"),
    "DataConfig.tokenizer": ("byte", "sentencepiece", "gemma"),
    "DataConfig.overflow": ("truncate", "split"),
    "EncodeConfig.correction": ("optimizer", "none"),
    "EncodeConfig.kernel": ("factored", "exact"),
    "EncodeConfig.projection_precision": ("highest", "bf16_6x"),
    "EncodeConfig.store_dtype": ("bfloat16", "float32", "int8"),
    "PreconditionerConfig.kind": ("block", "full", "none"),
}
_AT_LEAST = {
    **{f"ModelConfig.{n}": 1 for n in ("vocab_size", "max_len", "d_model",
                                       "num_layers", "num_heads", "d_ff")},
    **{f"TrainConfig.{n}": 1 for n in ("batch_size", "log_every",
                                       "checkpoint_every", "keep_checkpoints")},
    **{f"EncodeConfig.{n}": 1 for n in ("projection_dim", "microbatch_size",
                                        "batch_size", "model_axis", "chunk_rows")},
    "OptimizerConfig.total_steps": 1, "OptimizerConfig.warmup_steps": 0,
    "PreconditionerConfig.train_examples": 0, "PreconditionerConfig.rank": 0,
    # numpy's generators take no negative seed (a traceback after the model
    # was loaded, before).
    "PreconditionerConfig.sample_seed": 0, "EncodeConfig.seed": 0,
    "TrainConfig.seed": 0,
    "PreconditionerConfig.max_query_weight": 0, "EncodeConfig.epsilon": 0,
}
# Fields with a range of another form: (test, what is expected).
_FRACTION = (lambda v: 0 <= v < 1, "a value in [0, 1) (a moment's decay per step)")
_WITHIN = {
    "ModelConfig.rope_base": (lambda v: v > 1, "a value > 1 (rotary "
                              "embeddings' wavelengths grow as its powers)"),
    "OptimizerConfig.learning_rate": (lambda v: v > 0, "a value > 0"),
    "OptimizerConfig.final_lr_fraction": (
        lambda v: 0 <= v <= 1, "a value in [0, 1] (the decay's end, as a "
        "fraction of the peak learning rate)"),
    "OptimizerConfig.b1": _FRACTION,
    "OptimizerConfig.b2": _FRACTION,
    "OptimizerConfig.eps": (lambda v: v > 0, "a value > 0 (at 0 a param whose "
                            "gradients are all 0 is updated by 0 / 0 = NaN)"),
    "OptimizerConfig.weight_decay": (lambda v: v >= 0, "a value >= 0"),
    "OptimizerConfig.clip_norm": (lambda v: v > 0, "a value > 0 (the gradient's "
                                  "largest global norm; at 0 nothing is learned)"),
    "OptimizerConfig.adafactor_decay_rate": (
        lambda v: 0 < v <= 1, "a value in (0, 1] (Adafactor's decay exponent)"),
    "PreconditionerConfig.damping": (
        lambda v: v > 0, "a value > 0 (R's floor is damping times its mean "
        "eigenvalue: at 0 a rank-deficient R has no inverse)"),
    "PreconditionerConfig.lam": (
        lambda v: 0 <= v <= 1, "a value in [0, 1] (R_eval's share of R)"),
}
# Relations between a config's fields: (test, what is expected), by class.
_RELATIONS = {
    "ModelConfig": [(
        lambda c: c.d_model % c.num_heads == 0 and c.d_model // c.num_heads % 2 == 0,
        lambda c: f"ModelConfig.d_model = {c.d_model}, ModelConfig.num_heads = "
                  f"{c.num_heads}: expected d_model a multiple of num_heads with an "
                  "even head size, d_model / num_heads (rotary embeddings rotate "
                  "its halves)")],
}
_INT_MAX = 2**31 - 1
# "None": an optional field (``int | None``) is checked as its other type
# (else 'ten' and 2.5 passed for PreconditionerConfig.rank, found only after
# a TypeError or the whole store's encoding).
_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
          "None": (type(None),)}

_FLOAT32_MAX = 3.4028234663852886e38


def field_error(obj) -> str | None:
  """``"<Class>.<field> = <value>: expected ..."`` for the first field of a
  config dataclass whose value has the wrong type, is not one of its
  choices, or is out of range, or the fields of a relation between them
  that does not hold; None if every field is fine."""
  name = type(obj).__name__
  for field in dataclasses.fields(obj):
    key, value = f"{name}.{field.name}", getattr(obj, field.name)
    kinds = [k.strip() for k in str(field.type).split("|")]
    if value is None and "None" in kinds:
      continue
    types = tuple(t for k in kinds for t in _TYPES.get(k, (object,)))
    if not isinstance(value, types) or (isinstance(value, bool)
                                        and bool not in types):
      return (f"{key} = {value!r}: expected {' or '.join(kinds)}, "
              f"got {type(value).__name__}")
    if key in _CHOICES and value not in _CHOICES[key]:
      return (f"{key} = {value!r}: expected one of "
              f"{', '.join(map(repr, _CHOICES[key]))}")
    if isinstance(value, float) and not math.isfinite(value):
      return f"{key} = {value!r}: expected a finite number"
    if isinstance(value, float) and abs(value) > _FLOAT32_MAX:
      # tracer computes in float32, where it is inf (epsilon = 1e300 made
      # every corrected gradient non-finite, blamed on the checkpoint).
      return (f"{key} = {value!r}: expected a value float32 holds "
              f"(at most {_FLOAT32_MAX:.4g} in size)")
    if isinstance(value, int) and not isinstance(value, bool) and value > _INT_MAX:
      # Sizes and seeds become int32 arrays and shapes: a larger one fails
      # deep inside numpy or tensorstore (OverflowError), or asks for 74 GiB.
      return f"{key} = {value!r}: expected a value < 2**31"
    if key in _AT_LEAST and not value >= _AT_LEAST[key]:
      return f"{key} = {value!r}: expected a value >= {_AT_LEAST[key]}"
    if key in _WITHIN and not _WITHIN[key][0](value):
      return f"{key} = {value!r}: expected {_WITHIN[key][1]}"
  for test, expected in _RELATIONS.get(name, ()):
    if not test(obj):
      return expected(obj)
  return None
