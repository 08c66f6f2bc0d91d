"""The one table formatter: ``mean ± std (rank)`` over seeds, paired CIs vs a baseline.

Statistics (all over the seeds present; a seed counted once):

- ``mean ± std``: sample standard deviation (ddof=1; 0 for one seed);
- rank: 1 = best within a column, ties share their mean rank (``scipy.stats.rankdata``);
- paired difference to a baseline row: mean of ``row - baseline`` over the seeds both
  have, with the 95% t-interval ``mean ± t_{0.975, n-1} sd / sqrt(n)`` (n >= 2).

:func:`markdown_table` is the entry for rows (dicts from a :class:`Store`);
:func:`pivot` and :func:`pivot_markdown` are the same formatter on pivoted tables.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["Metric", "mean_std", "paired_ci95", "ranks", "pivot", "paired_differences",
           "format_mean_std", "pivot_markdown", "markdown_table", "seeds_found",
           "summarize"]


@dataclasses.dataclass(frozen=True)
class Metric:
    """How a metric is shown: ``scale`` (100 for fractions shown in %), ``digits``,
    ``higher_is_better`` (for ranks) and a column ``label`` (default: the name)."""

    name: str
    label: str = ""
    scale: float = 100.0
    digits: int = 2
    higher_is_better: bool = True

    @property
    def title(self) -> str:
        return self.label or self.name


def _metric(m: str | Metric) -> Metric:
    return m if isinstance(m, Metric) else Metric(str(m))


def _ok(v: Any) -> bool:
    return (isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
            and math.isfinite(float(v)))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value); missing and
    non-finite values are left out (NaN, NaN when none is left)."""
    v = np.asarray([float(x) for x in values if _ok(x)], float)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def paired_ci95(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired seeds and its 95% t-interval ``(mean, lo, hi)``
    (``lo``/``hi`` NaN for fewer than two pairs)."""
    from scipy import stats

    d = np.asarray(a, float) - np.asarray(b, float)
    if d.size < 2:
        return float(d.mean()) if d.size else float("nan"), float("nan"), float("nan")
    half = stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def ranks(values: Sequence[float], higher_is_better: bool = True) -> list[float]:
    """Rank of each value (1 = best); ties share their mean rank; NaN gets NaN."""
    v = np.asarray(values, float)
    out = np.full(v.shape, np.nan)
    ok = ~np.isnan(v)
    if ok.any():
        from scipy.stats import rankdata
        out[ok] = rankdata(-v[ok] if higher_is_better else v[ok], method="average")
    return out.tolist()


def pivot(rows: Sequence[Mapping[str, Any]], row_key: str, col_key: str | None, metric: str
          ) -> dict[tuple[Any, Any], dict[str, Any]]:
    """``{(row, col): {"mean", "std", "n", "values": {seed: value}}}`` of ``metric``
    (``col`` is ``None`` without ``col_key``). Rows without a finite value are left
    out; a seed counts once per cell."""
    vals: dict[tuple, dict[Any, float]] = {}
    for r in rows:
        v = r.get(metric)
        if not _ok(v):
            continue
        k = (_hashable(r.get(row_key)), _hashable(r.get(col_key)) if col_key else None)
        vals.setdefault(k, {})[r.get("seed")] = float(v)
    out = {}
    for k, by_seed in vals.items():
        mu, sd = mean_std(list(by_seed.values()))
        out[k] = {"mean": mu, "std": sd, "n": len(by_seed), "values": by_seed}
    return out


def _hashable(v: Any) -> Any:
    return tuple(_hashable(x) for x in v) if isinstance(v, list) else v


def paired_differences(table: Mapping[tuple[Any, Any], Mapping[str, Any]], baseline: Any
                       ) -> dict[tuple[Any, Any], tuple[float, float, float, int]]:
    """``{(row, col): (mean, lo, hi, n)}`` of ``row - baseline`` over common seeds, with
    the paired 95% t-interval (:func:`paired_ci95`)."""
    out = {}
    for (row, col), cell in table.items():
        base = table.get((baseline, col))
        if base is None:
            continue
        common = sorted(set(cell["values"]) & set(base["values"]), key=_order)
        if not common:
            continue
        a = [cell["values"][s] for s in common]
        b = [base["values"][s] for s in common]
        out[(row, col)] = (*paired_ci95(a, b), len(common))
    return out


def format_mean_std(mean: float, std: float, scale: float = 100.0, digits: int = 1) -> str:
    """``"52.3 ± 0.4"`` (``"-"`` for a missing mean)."""
    if mean is None or math.isnan(mean):
        return "-"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def _render(columns: Sequence[tuple[str, Mapping[Any, Mapping[str, Any]], Metric]],
            row_order: Sequence, *, row_title: str, with_rank: bool, mean_rank: bool,
            with_n: bool, baseline: Any) -> str:
    rank_of: dict[tuple[int, Any], float] = {}
    for j, (_, col, m) in enumerate(columns):
        present = [r for r in row_order if r in col]
        rs = ranks([col[r]["mean"] for r in present], m.higher_is_better)
        rank_of.update({(j, r): k for r, k in zip(present, rs)})
    head = [row_title, *[t for t, _, _ in columns]]
    head += (["mean rank"] if with_rank and mean_rank else []) + (["n"] if with_n else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in row_order:
        cells, rk, n = [str(r)], [], 0
        for j, (_, col, m) in enumerate(columns):
            t = col.get(r)
            if t is None:
                cells.append("-")
                continue
            n = max(n, t["n"])
            text = format_mean_std(t["mean"], t["std"], m.scale, m.digits)
            k = rank_of.get((j, r), math.nan)
            if with_rank and not math.isnan(k):
                text += f" ({k:g})"
                rk.append(k)
            cells.append(text)
        if with_rank and mean_rank:
            cells.append(f"{np.mean(rk):.2f}" if rk else "-")
        if with_n:
            cells.append(str(n))
        lines.append("| " + " | ".join(cells) + " |")
    if baseline is None:
        return "\n".join(lines)
    lines += ["", f"Difference to {baseline} (mean [95% CI], paired over seeds):", "",
              "| " + " | ".join([row_title, *[t for t, _, _ in columns]]) + " |",
              "|" + "|".join(["---"] * (len(columns) + 1)) + "|"]
    diffs = [paired_differences({(r, 0): v for r, v in col.items()}, baseline)
             for _, col, _ in columns]
    for r in row_order:
        if r == baseline:
            continue
        cells = [str(r)]
        for (_, _, m), d in zip(columns, diffs):
            d = d.get((r, 0))
            s, q = m.scale, m.digits
            if d is None:
                cells.append("-")
            elif math.isnan(d[1]):
                cells.append(f"{s * d[0]:+.{q}f} (n={d[3]})")
            else:
                cells.append(f"{s * d[0]:+.{q}f} [{s * d[1]:+.{q}f}, {s * d[2]:+.{q}f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pivot_markdown(table: Mapping[tuple[Any, Any], Mapping[str, Any]], row_order: Sequence,
                   col_order: Sequence, *, row_title: str = "method", scale: float = 100.0,
                   digits: int = 1, with_rank: bool = True, higher_is_better: bool = True,
                   baseline: Any = None) -> str:
    """Markdown table rows x columns of one :func:`pivot` table, ``mean ± std (rank)``,
    a mean rank column; with ``baseline``, a second block of paired differences."""
    m = Metric("", scale=scale, digits=digits, higher_is_better=higher_is_better)
    columns = [(str(c), {r: v for (r, cc), v in table.items() if cc == c}, m)
               for c in col_order]
    return _render(columns, row_order, row_title=row_title, with_rank=with_rank,
                   mean_rank=with_rank, with_n=False, baseline=baseline)


def markdown_table(rows: Sequence[Mapping[str, Any]], *, row: str,
                   metrics: Sequence[str | Metric], col: str | None = None,
                   row_order: Sequence | None = None, col_order: Sequence | None = None,
                   row_title: str | None = None, with_rank: bool = True,
                   mean_rank: bool = False, with_n: bool = True, baseline: Any = None) -> str:
    """Markdown table of result rows: one line per value of ``row``; a column per metric
    (per (``col`` value, metric) with ``col``); cells ``mean ± std (rank)`` over seeds;
    an ``n`` column (seeds found); with ``baseline`` (a value of ``row``), a block of
    paired differences with 95% CIs. Orders default to first appearance."""
    ms = [_metric(m) for m in metrics]
    if row_order is None:
        row_order = list(dict.fromkeys(_hashable(r.get(row)) for r in rows))
    if col is not None and col_order is None:
        col_order = list(dict.fromkeys(_hashable(r.get(col)) for r in rows))
    columns = []
    for c in (col_order if col is not None else [None]):
        for m in ms:
            t = pivot(rows, row, col, m.name)
            title = m.title if c is None else (str(c) if len(ms) == 1 else f"{c} {m.title}")
            columns.append((title, {r: v for (r, cc), v in t.items() if cc == c}, m))
    return _render(columns, row_order, row_title=row_title or row, with_rank=with_rank,
                   mean_rank=mean_rank, with_n=with_n, baseline=baseline)


def seeds_found(rows: Sequence[Mapping[str, Any]]) -> list:
    """The distinct seeds of ``rows``, sorted (what a report header should print)."""
    return sorted({r.get("seed") for r in rows if r.get("seed") is not None}, key=_order)


def _order(v: Any) -> tuple:
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


def summarize(rows: Sequence[Mapping[str, Any]], group_by: Sequence[str],
              metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Groups rows and gives ``mean``/``std``/``n`` (seeds) of each metric per group."""
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault(tuple(_hashable(r.get(k)) for k in group_by), []).append(r)
    out = []
    for key, rs in groups.items():
        entry = dict(zip(group_by, key))
        entry["n"] = len({r.get("seed") for r in rs})
        for m in metrics:
            by_seed = {r.get("seed"): r.get(m) for r in rs}
            entry[m], entry[m + "_std"] = mean_std(list(by_seed.values()))
        out.append(entry)
    return out
