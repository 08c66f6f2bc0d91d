"""Plots of result tables, written atomically (:func:`save_figure`).

matplotlib is imported lazily (the Agg backend): kdjax itself does not need it.
"""

from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

import numpy as np

from kdjax._io import atomic_write_bytes

__all__ = ["pyplot", "save_figure", "plot_bars", "plot_scatter"]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str, dpi: int = 120) -> None:
    """Lays out ``fig``, renders it to PNG in memory and writes it to ``path`` with the
    one atomic writer (unique temp name, no leftover on failure, umask permissions);
    the figure is closed either way."""
    plt = pyplot()
    try:
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, dpi=dpi, format="png")
        atomic_write_bytes(path, buf.getvalue())
    finally:
        plt.close(fig)


def plot_bars(table: Mapping[tuple[Any, Any], Mapping[str, Any]], row_order: Sequence,
              col_order: Sequence, path: str, *, ylabel: str, scale: float = 100.0,
              title: str = "") -> None:
    """Grouped bars of a :func:`~kdjax.experiment.tables.pivot` table: one group per
    column, one bar per row, error bars = std."""
    plt = pyplot()
    n = max(len(row_order), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(col_order) * max(1, n / 4)), 4))
    xs = np.arange(len(col_order))
    for i, r in enumerate(row_order):
        mu = [scale * table[(r, c)]["mean"] if (r, c) in table else np.nan for c in col_order]
        sd = [scale * table[(r, c)]["std"] if (r, c) in table else 0.0 for c in col_order]
        ax.bar(xs + (i - (n - 1) / 2) * width, mu, width, yerr=sd, capsize=2, label=str(r))
    ax.set_xticks(xs)
    ax.set_xticklabels([str(c) for c in col_order], rotation=15)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=max(1, n // 8), loc="lower right")
    save_figure(fig, path)


def plot_scatter(x_table, y_table, row_order: Sequence, col_order: Sequence, path: str, *,
                 xlabel: str, ylabel: str, scale: float = 100.0, title: str = "",
                 x_scale: float | None = None, log_x: bool = False,
                 diagonal: bool = True) -> None:
    """One point per (row, column) at (x mean, y mean) with std error bars; colour =
    column, marker = row. ``x_scale`` (default ``scale``) scales x alone; ``log_x``: a
    log x axis; ``diagonal``: the line y = x (for two metrics of one unit)."""
    xs = scale if x_scale is None else x_scale
    plt = pyplot()
    markers = "osD^v<>pPX*hH8d"
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for j, c in enumerate(col_order):
        for i, r in enumerate(row_order):
            if (r, c) not in x_table or (r, c) not in y_table:
                continue
            x, y = x_table[(r, c)], y_table[(r, c)]
            ax.errorbar(xs * x["mean"], scale * y["mean"], xerr=xs * x["std"],
                        yerr=scale * y["std"], fmt=markers[i % len(markers)],
                        color=colours[j % len(colours)], ms=5, capsize=2, alpha=0.85)
    for j, c in enumerate(col_order):
        ax.plot([], [], "s", color=colours[j % len(colours)], label=str(c))
    for i, r in enumerate(row_order):
        ax.plot([], [], markers[i % len(markers)], color="gray", label=str(r))
    if diagonal:
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], ":", color="gray", lw=1)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="best")
    save_figure(fig, path)
