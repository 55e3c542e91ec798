"""tracer: which pretraining examples made the model say this? (TrackStar in JAX).

The names below load on first use, so ``import tracer.launch.plan`` and the
``tracer`` command's help do not import jax.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "GradientEncoder": "tracer.encoder",
    "InputError": "tracer.errors",
    "Preconditioner": "tracer.hessian",
    "fit_preconditioner": "tracer.encoder",
    "second_moment": "tracer.correction",
    "unit_normalize": "tracer.encoder",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'tracer' has no attribute {name!r}")
  value = getattr(importlib.import_module(_EXPORTS[name]), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(__all__)
