"""Statistics for benchmark tables: spread across sets, paired differences.

Two methods scored on the same queries are compared by the per-query
difference (paired): the query-to-query variance both share cancels, so a
difference far smaller than either method's own standard error is resolved.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def mean_std(values: Sequence[float]) -> dict[str, float]:
  """``{"mean", "std", "n"}`` of values (std with ddof=1; 0 for one value)."""
  x = np.asarray(values, np.float64)
  return {"mean": float(np.mean(x)),
          "std": float(np.std(x, ddof=1)) if len(x) > 1 else 0.0,
          "n": int(len(x))}


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
  """The mean per-query difference ``a - b`` and its standard error.

  Args:
    a, b: f[Q], two methods' values on the same Q queries, in the same order;
      a query whose difference is not finite is left out: either value NaN
      (no value), or infinite (inf - inf is NaN, inf - 1 no mean can hold).

  Returns:
    ``{"mean", "se", "z" (mean / se), "win" (fraction of queries with a > b),
    "n"}`` over the queries with a finite difference.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"paired: need two f[Q] of one shape, got {a.shape}, {b.shape}")
  with np.errstate(invalid="ignore"):  # inf - inf: left out below
    d = a - b
  d = d[np.isfinite(d)]
  se = float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
  mean = float(np.mean(d)) if len(d) else float("nan")
  # Every query the same non-zero difference: as sure as a z can be.
  z = (mean / se if se > 0 else float(np.sign(mean)) * np.inf
       if se == 0 and mean != 0 else float("nan"))
  return {"mean": mean, "se": se, "z": z,
          "win": float(np.mean(d > 0)) if len(d) else float("nan"), "n": int(len(d))}


def ranks(x: Sequence[float]) -> np.ndarray:
  """Ranks 0..n-1 of ``x`` ascending, ties given their average rank."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="stable")
  r = np.empty(len(x), np.float64)
  r[order] = np.arange(len(x))
  _, tie, counts = np.unique(x, return_inverse=True, return_counts=True)
  return (np.bincount(tie, r) / counts)[tie]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
  """Spearman's rank correlation of two f[n] (NaN where either is constant
  or holds a NaN)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"spearman: need two f[n] of one shape, got {a.shape}, {b.shape}")
  if np.isnan(a).any() or np.isnan(b).any():  # (ranks() would rank it largest)
    return float("nan")
  ra, rb = ranks(a) - (len(a) - 1) / 2, ranks(b) - (len(b) - 1) / 2
  denom = np.sqrt(np.sum(ra * ra) * np.sum(rb * rb))
  return float(np.sum(ra * rb) / denom) if denom > 0 else float("nan")


def mean_se(values: Sequence[float]) -> dict[str, float]:
  """``{"mean", "se", "z", "n"}`` of the values that are finite."""
  x = np.asarray(values, np.float64)
  return paired(x, np.zeros_like(x))


def format_cell(value: Mapping[str, float] | float) -> str:
  """``mean ± std`` for a spread, ``+d ± se (z)`` for a paired difference."""
  if not isinstance(value, Mapping):
    return f"{value:.4f}"
  if "se" in value:
    return f"{value['mean']:+.4f} ± {value['se']:.4f} (z {value['z']:+.1f})"
  return f"{value['mean']:.4f} ± {value['std']:.4f}"
