"""The faithful study's report: the table of certified fractions and the bounds plot.

Over result rows that hold a :func:`kdjax.faithful.faithfulness_report` (under
``key``): :func:`certification_table` is the table of the fraction certified
``(eps, delta)``-faithful per radius and tolerance (the one formatter,
:func:`kdjax.experiment.markdown_table`), :func:`plot_gap_bounds` the PGD lower and the
certified upper bound against the radius.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from kdjax.experiment.plots import pyplot, save_figure
from kdjax.experiment.tables import Metric, markdown_table, pivot
from kdjax.faithful import flatten_report

__all__ = ["certification_table", "plot_gap_bounds"]


def _flat_rows(rows, key):
    """The rows with their reports' flat columns (:func:`flatten_report`)."""
    return [{**r, **flatten_report(r[key])} for r in rows]


def certification_table(rows: Sequence[Mapping[str, Any]], eps: Sequence[float],
                        delta: Sequence[float], *, row: str = "run",
                        row_order: Sequence | None = None, key: str = "faithfulness",
                        digits: int = 1) -> str:
    """Markdown table of the fraction certified ``(eps, delta)``-faithful and
    label-consistent (``certified_faithful``, in %): one line per value of ``row``, one
    column ``eps=<e>, delta=<d>`` per pair, ``mean ± std (rank)`` over seeds and ``n``.
    ``rows[i][key]`` is a :func:`faithfulness_report`."""
    metrics = [Metric(f"certified_faithful@eps={e}, delta={d}", f"eps={e}, delta={d}",
                      digits=digits) for e in eps for d in delta]
    return markdown_table(_flat_rows(rows, key), row=row, metrics=metrics,
                          row_order=row_order)


def plot_gap_bounds(rows: Sequence[Mapping[str, Any]], eps: Sequence[float], path: str, *,
                    row: str = "run", crown: bool = True,
                    key: str = "faithfulness") -> None:
    """Mean PGD gap (lower bound, solid) and certified bound (upper, dashed) against
    ``eps``, one colour per value of ``row``, on the same points: the CROWN points with
    ``crown`` (``pgd_gap_crown_points``), else all (``pgd_gap``); a log y axis;
    written to ``path`` (PNG, atomically)."""
    flat = _flat_rows(rows, key)
    names = list(dict.fromkeys(r[row] for r in flat))
    fig, ax = pyplot().subplots(figsize=(6, 4))
    lower = "pgd_gap_crown_points" if crown else "pgd_gap"
    for k, style, what in ((lower, "-o", "PGD (lower)"),
                           ("certified_gap", "--s", "certified (upper)")):
        curves = [pivot(flat, row, None, f"{k}@eps={e}") for e in eps]
        for i, name in enumerate(names):
            ax.plot(list(eps), [c.get((name, None), {}).get("mean", np.nan) for c in curves],
                    style, color=f"C{i}", label=f"{name} {what}")
    ax.set(xlabel="eps (L-inf radius)", ylabel="mean confidence gap |p^S_y - p^T_y|",
           yscale="log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
