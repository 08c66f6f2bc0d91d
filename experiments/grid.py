"""Transitional: the former grid module, now :mod:`kdjax.experiment` (cells, rows store,
tables, plots). ``run_grid`` runs the cells through :class:`kdjax.experiment.Run`.
Delete this module once ``experiments/shift.py`` uses :mod:`kdjax.experiment` directly.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

from kdjax.experiment import (NOT_RESULT_KEYS, Cell, Run, default_identity, expand,
                              flat_keys, format_mean_std, paired_differences, parse_sweep,
                              pivot, pivot_markdown, plot_bars, plot_scatter, ranks,
                              set_value, validate_keys)

__all__ = ["Cell", "NOT_RESULT_KEYS", "default_identity", "flat_keys", "parse_sweep",
           "validate_keys", "set_value", "expand", "run_grid", "pivot", "ranks",
           "paired_differences", "pivot_markdown", "plot_bars", "plot_scatter",
           "format_mean_std"]


def run_grid(cells: Sequence[Cell], results_path: str, *,
             run_cell: Callable[[Any, int], Mapping[str, Any]] | None = None,
             run_cells: Callable[[Any, list[int]], Sequence[Mapping[str, Any]]] | None = None,
             metadata: Mapping[str, Any] | None = None, log: Callable[[str], None] = print,
             stale: str = "refuse") -> list[dict]:
    """Runs the cells without a row in ``results_path`` (``run_cells(config, seeds)``
    per group, or ``run_cell(config, seed)`` per seed); returns the rows of all cells."""
    if (run_cell is None) == (run_cells is None):
        raise ValueError("pass exactly one of run_cell and run_cells.")
    if run_cells is not None:
        fn, batch = (lambda c, seeds: run_cells(c.config, seeds)), True
    else:
        fn, batch = (lambda c, seeds: [run_cell(c.config, seeds[0])]), False
    run = Run(cells[0].config if cells else None, name="grid",
              out_dir=os.path.dirname(os.path.abspath(results_path)),
              results=os.path.basename(results_path), metadata=metadata, log=log,
              stale=stale)
    return run.execute(cells, fn, batch_seeds=batch)
