"""Every configuration dataclass of tracer, in one place.

Plain frozen dataclasses: the library takes them as arguments, checkpoints
and manifests store them as dicts, and the launch scripts bind their fields
from gin by class name (``ModelConfig.d_model = 128``,
``EncodeConfig.projection_dim = 65536``; see ``launch/config.py``).
"""

from __future__ import annotations

import dataclasses
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
