"""Figures for the HTML report and the sweep, drawn with matplotlib (Agg: no display needed)."""

from __future__ import annotations

import io
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

METRIC_NAMES = {"accuracy": "accuracy", "top1_agreement": "top-1 agreement", "cosine": "output cosine"}


def figure_png(figure: Figure) -> bytes:
    """The figure as PNG bytes (and the figure closed)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def sweep_figure(points: Sequence, metric: str) -> Figure:
    """Quality against sparsity, one line per method, the original as a dashed line; beside it
    quality against the measured onnxruntime speed-up when the points have one."""
    timed = [p for p in points if getattr(p, "speedup", None) is not None]
    figure, panels = plt.subplots(1, 2 if timed else 1, figsize=(11.0 if timed else 6.4, 4.0), squeeze=False)
    for axes, x, label, chosen in (
        (panels[0][0], "target_sparsity", "sparsity of the pruned tensors", points),
        *([(panels[0][1], "speedup", "measured onnxruntime speed-up (x)", timed)] if timed else []),
    ):
        for method in dict.fromkeys(p.method for p in chosen):
            mine = sorted((p for p in chosen if p.method == method), key=lambda p: p.target_sparsity)
            axes.plot([getattr(p, x) for p in mine], [p.after for p in mine], marker="o", label=method)
        if chosen:
            axes.axhline(chosen[0].before, color="grey", linestyle="--", linewidth=1, label="original")
        axes.set_xlabel(label)
        axes.set_ylabel(METRIC_NAMES.get(metric, metric))
        axes.grid(alpha=0.3)
        axes.legend()
    return figure


def sparsity_figure(names: Sequence[str], sparsities: Sequence[float], target: float) -> Figure:
    """Per-tensor sparsity as horizontal bars, with the target as a line."""
    height = max(2.0, 0.28 * len(names) + 1.0)
    figure, axes = plt.subplots(figsize=(7.0, min(height, 30.0)))
    positions = range(len(names))
    axes.barh(list(positions), list(sparsities), color="#4c72b0")
    axes.set_yticks(list(positions), [_short(n) for n in names], fontsize=7 if len(names) > 30 else 9)
    axes.invert_yaxis()
    axes.axvline(target, color="#c44e52", linestyle="--", linewidth=1, label=f"target {target:.2f}")
    axes.set_xlim(0, 1)
    axes.set_xlabel("sparsity (zeros / entries, as written)")
    axes.legend(loc="lower right")
    return figure


def curve_figure(series: dict[str, Sequence[float]], xlabel: str, ylabel: str, symlog: bool = False) -> Figure:
    """One or more loss curves against their step index."""
    figure, axes = plt.subplots(figsize=(6.4, 3.6))
    for label, values in series.items():
        axes.plot(range(len(values)), list(values), label=label)
    if symlog:
        axes.set_yscale("symlog")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if len(series) > 1:
        axes.legend()
    return figure


def histogram_figure(edges: Sequence[float], counts: Sequence[int], xlabel: str) -> Figure:
    """A histogram given by its bin edges and counts (log-spaced edges get a log axis)."""
    figure, axes = plt.subplots(figsize=(6.4, 3.6))
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    axes.bar(list(edges[:-1]), list(counts), width=widths, align="edge", color="#55a868", edgecolor="white")
    if len(edges) > 2 and edges[0] > 0 and edges[-1] / edges[0] > 100:
        axes.set_xscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("samples")
    axes.grid(alpha=0.3)
    return figure


def _short(name: str, limit: int = 40) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]
