"""Plots of a results summary (``tracer.viewer.summary``) with matplotlib.

Figures are ``matplotlib.figure.Figure`` objects made directly, without
pyplot: no global backend or figure state, nothing shown on a screen. Output
is deterministic (fixed SVG id salt, no date or software stamp), so the same
summary gives the same bytes.

Each method keeps its colour (``C0``, ``C1``, ... in the summary's method
order) in every figure.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
from matplotlib.figure import Figure

from tracer import evaluate
from tracer import storage

Summary = Mapping[str, Mapping[str, Mapping[str, Any]]]

_RETRIEVAL = (("mrr", "MRR"), ("recall@10", "recall@10"))
# Bar groups in the retrieval figure, "all" included: 1,000 buckets took 12 s
# and a 1.6 MB SVG for bars too thin to read.
MAX_PLOT_BUCKETS = 25


def printable(text: str) -> str:
  """``text`` with lone surrogates (JSON allows "\\ud800") as U+FFFD: they
  cannot be written as UTF-8, nor drawn."""
  return re.sub("[\ud800-\udfff]", "\ufffd", str(text))


def _label(text: str) -> str:
  """``text`` as matplotlib shows it literally: "$...$" would be mathtext
  (and an error when it does not parse)."""
  return printable(text).replace("$", r"\$")


def _colors(stats: Summary) -> dict[str, str]:
  return {m: f"C{i % 10}" for i, m in enumerate(stats)}


def _buckets(stats: Summary) -> list[str]:
  """"all", then every method's buckets in ``evaluate.bucket_sort_key`` order."""
  found = {b for per in stats.values() for b in per if b != "all"}
  return ["all", *sorted(found, key=evaluate.bucket_sort_key)]


def _tail_patch_ks(stats: Summary) -> list[int]:
  ks = {int(m.group(1)) for per in stats.values() for key in per.get("all", {})
        if (m := re.fullmatch(r"tail_patch@(\d+)", key))}
  return sorted(ks)


def _grouped_bars(ax, xs: Sequence[Any], methods: Sequence[str],
                  value, colors: Mapping[str, str], error=None) -> list:
  """One group of bars per x, one bar per method; a missing value is no bar.
  Returns the legend handles."""
  width = 0.8 / len(methods)
  handles = []
  for j, method in enumerate(methods):
    pos, ys, errs = [], [], []
    for i, x in enumerate(xs):
      v = value(method, x)
      if v is None:
        continue
      pos.append(i - 0.4 + width * (j + 0.5))
      ys.append(v)
      e = error(method, x) if error else None
      errs.append(float("nan") if e is None else e)
    bars = ax.bar(pos, ys, width, color=colors[method],
                  yerr=errs if error and pos else None,
                  error_kw={"ecolor": "#333", "capsize": 3, "elinewidth": 1})
    handles.append(bars)
  ax.set_xticks(range(len(xs)), [_label(x) for x in xs])
  ax.grid(axis="y", color="#ddd", linewidth=0.6)
  ax.set_axisbelow(True)
  for side in ("top", "right"):
    ax.spines[side].set_visible(False)
  return handles


def retrieval_figure(stats: Summary) -> Figure | None:
  """MRR and recall@10 for "all" and each bucket (the first
  ``MAX_PLOT_BUCKETS - 1``), grouped bars per method; None when no method
  has ground truth to score."""
  methods = [m for m, per in stats.items()
             if any(v.get("mrr") is not None for v in per.values())]
  if not methods:
    return None
  colors, buckets = _colors(stats), _buckets(stats)
  xlabel = "bucket"
  if len(buckets) > MAX_PLOT_BUCKETS:  # past this the bars are unreadable
    xlabel = (f"bucket (the first {MAX_PLOT_BUCKETS - 1} of "
              f"{len(buckets) - 1}, in order)")
    buckets = buckets[:MAX_PLOT_BUCKETS]
  width = min(14.0, 2.5 + 0.35 * len(buckets) * (1 + len(methods)))
  fig = Figure(figsize=(width, 3.2), layout="constrained")
  axes = fig.subplots(1, 2, sharey=True)
  for ax, (key, title) in zip(axes, _RETRIEVAL):
    handles = _grouped_bars(
        ax, buckets, methods,
        lambda m, b, key=key: stats[m].get(b, {}).get(key), colors)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylim(0, 1.02)
  # Outside the axes: inside, it would cover the bars of some bucket.
  fig.legend(handles, [_label(m) for m in methods], loc="outside right upper",
             fontsize="small", frameon=False)
  return fig


def tail_patch_figure(stats: Summary) -> Figure | None:
  """Tail-patch@k over all queries, bars per method with +-1 standard error;
  None when no method has tail-patch data."""
  ks = _tail_patch_ks(stats)
  methods = [m for m, per in stats.items()
             if any(per.get("all", {}).get(f"tail_patch@{k}") is not None
                    for k in ks)]
  if not methods:
    return None
  colors = _colors(stats)
  fig = Figure(figsize=(min(10.0, 2.5 + 0.5 * len(ks) * (1 + len(methods))), 3.2),
               layout="constrained")
  ax = fig.subplots()
  handles = _grouped_bars(
      ax, ks, methods,
      lambda m, k: stats[m]["all"].get(f"tail_patch@{k}"), colors,
      error=lambda m, k: stats[m]["all"].get(f"tail_patch@{k}_se"))
  ax.axhline(0, color="#444", linewidth=0.8)
  ax.set_xticks(range(len(ks)), [str(k) for k in ks])
  ax.set_xlabel("k (top-k proponents)")
  ax.set_ylabel("mean change in log p(target)")
  ax.set_title("tail-patch@k (\u00b1 1 standard error)")
  fig.legend(handles, [_label(m) for m in methods], loc="outside right upper",
             fontsize="small", frameon=False)
  return fig


def to_svg(fig: Figure, salt: str = "tracer") -> str:
  """The figure as an ``<svg>`` element for inlining in HTML: no XML prolog,
  DOCTYPE or metadata; text drawn as paths (no font needed). ``salt`` seeds
  the element ids: give each figure of a page its own."""
  buf = io.StringIO()
  with matplotlib.rc_context({"svg.hashsalt": salt, "svg.fonttype": "path"}):
    fig.savefig(buf, format="svg", metadata={"Date": None})
  text = buf.getvalue()
  text = text[text.index("<svg"):]
  return re.sub(r"\s*<metadata>.*?</metadata>", "", text, flags=re.S).strip()


def to_png(fig: Figure, dpi: int = 120) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
  return buf.getvalue()


def write_pngs(stats: Summary, directory: str) -> list[str]:
  """Writes ``retrieval.png`` and ``tail_patch.png`` into ``directory`` (a
  path or URL), each only when there is data for it; returns their paths."""
  storage.make_local_dirs(directory)
  paths = []
  for name, fig in (("retrieval.png", retrieval_figure(stats)),
                    ("tail_patch.png", tail_patch_figure(stats))):
    if fig is None:
      continue
    path = storage.join(directory, name)
    storage.write_bytes(path, to_png(fig))
    paths.append(path)
  return paths
