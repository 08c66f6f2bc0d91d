"""Transitional: the API of the former ``kdjax.train.results`` for drivers not yet on
:class:`kdjax.experiment.Run` (``experiments/shift.py``, ``kd_aif.py``, ``faithful.py``).

Same names and call signatures, on the new machinery: :func:`read_jsonl` skips bad
lines with a warning naming file and line (it no longer crashes on non-UTF-8 bytes),
:func:`append_jsonl` appends under the store's lock (it no longer rewrites the file, so
no line is ever dropped from disk), and :func:`markdown_table` keeps the old format
(its ``+-`` format is kept until those drivers move to the one formatter). Delete this module once every driver
uses :class:`~kdjax.experiment.Run`.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from kdjax._io import atomic_write_text, run_metadata
from kdjax.experiment.plots import save_figure
from kdjax.experiment.store import Store
from kdjax.experiment.tables import mean_std, paired_ci95, summarize

__all__ = ["run_metadata", "atomic_write_text", "append_jsonl", "read_jsonl",
           "summarize", "markdown_table", "mean_std", "paired_ci95", "save_figure"]


def read_jsonl(path: str) -> list[dict]:
    """Rows of a JSON-lines file ([] if missing); bad lines skipped with a warning."""
    return Store(path)._parse(report=True)


def append_jsonl(path: str, rows: Iterable[Mapping[str, Any]]) -> None:
    """Appends rows under the store's lock (rows with a ``cell_key`` already present are
    not written twice)."""
    Store(path).append(rows)


def markdown_table(summary: Sequence[Mapping[str, Any]], keys: Sequence[str],
                   metrics: Sequence[str], *, percent: bool = True) -> str:
    """``| key... | metric (mean +- std) ... | n |`` from :func:`summarize` output: the
    old format, kept (with its ``+-``) only until the remaining drivers move to
    :func:`kdjax.experiment.markdown_table`."""
    head = "| " + " | ".join([*keys, *metrics, "n"]) + " |"
    sep = "|" + "|".join(["---"] * (len(keys) + len(metrics) + 1)) + "|"
    scale = 100.0 if percent else 1.0
    lines = [head, sep]
    for s in summary:
        cells = [str(s[k]) for k in keys]
        cells += [f"{scale * s[m]:.2f} +- {scale * s[m + '_std']:.2f}" for m in metrics]
        lines.append("| " + " | ".join(cells + [str(s["n"])]) + " |")
    return "\n".join(lines)
