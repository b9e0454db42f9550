"""PNG plots written into a run's workdir (matplotlib, Agg backend, no display needed)."""

import collections
import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METRICS_PLOT = "metrics.png"


def line_plot(path: str, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
              title: str = "", xlabel: str = "", ylabel: str = "", logx: bool = False,
              logy: bool = False, markers: bool = False) -> str:
  """One panel of named `(x, y)` series; returns `path`."""
  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  for label, (x, y) in series.items():
    ax.plot(x, y, marker="o" if markers else None, label=label)
  ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
  if logx:
    ax.set_xscale("log")
  if logy:
    ax.set_yscale("log")
  if len(series) > 1:
    ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


MAX_LEGEND_ENTRIES = 8


def plot_metrics(rows: Sequence[Mapping], path: str, *, max_panels: int = 6) -> str | None:
  """Plots every numeric metric of a `metrics.jsonl` history against the step.

  Metrics are grouped by their last path component (`mf/eval/recall@20` and
  `ultragcn/eval/recall@20` share the `recall@20` panel), so a method and its baseline
  trained in one run are drawn on the same axes. Returns `path`, or `None` when no metric
  has two or more points.
  """
  panels = collections.defaultdict(dict)
  for row in rows:
    for key, value in row.items():
      if key == "step" or not isinstance(value, (int, float)):
        continue
      label = key.rsplit("/", 1)
      name = label[-1]
      group = "eval" if "/eval/" in f"/{key}" else "train"
      series = panels[f"{group}: {name}"].setdefault(key, ([], []))
      series[0].append(row["step"])
      series[1].append(value)
  # A metric logged once (a measurement, not a curve) is left to the summary.
  panels = {name: series for name, series in panels.items()
            if any(len(x) > 1 for x, _ in series.values())}
  if not panels:
    return None
  names = sorted(panels, key=lambda n: (not n.startswith("eval"), n))[:max_panels]
  cols = min(3, len(names))
  rows_n = (len(names) + cols - 1) // cols
  fig, axes = plt.subplots(rows_n, cols, figsize=(4.5 * cols, 3.2 * rows_n), dpi=100,
                           squeeze=False)
  for ax, name in zip(axes.flat, names):
    for label, (x, y) in panels[name].items():
      ax.plot(x, y, label=label)
    ax.set(title=name, xlabel="step")
    ax.grid(alpha=0.3)
    # A legend with more entries than this would hide the curves (sweeps log many runs).
    if 1 < len(panels[name]) <= MAX_LEGEND_ENTRIES:
      ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path
