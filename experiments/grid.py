"""Grid machinery for benchmarks and ablations: cells, resumable rows, aggregation, plots.

A *cell* is one point of a grid: the driver's config with some dotted keys overridden,
and one seed. :func:`expand` builds the cells (product of the override values x seeds);
:func:`run_grid` runs the cells whose rows are not in the results file yet and appends
one row per (cell, seed), atomically, as soon as the cell finishes, so a killed job
loses at most the cells in progress. A row carries the cell's key (a config hash of what
defines the result, plus the seed), the overrides, the full config, the seed and
:func:`kdjax.train.results.run_metadata`.

Drivers plug in with ``run_cell(config, seed) -> dict of metrics`` (one seed), or
``run_cells(config, seeds) -> [dict, ...]`` (all pending seeds of a cell at once, e.g.
as one vmapped program).

Aggregation: :func:`pivot` (mean, std, n and per-seed values per (row, column)),
:func:`ranks` (1 = best, ties share the mean rank), :func:`paired_differences`
(difference to a baseline row with a paired 95% t-interval over common seeds),
:func:`pivot_markdown`, :func:`plot_bars` and :func:`plot_scatter`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import itertools
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import ml_collections
import numpy as np

from kdjax.config import apply_overrides, config_hash
from kdjax.train import results as R

__all__ = ["Cell", "flat_keys", "parse_sweep", "validate_keys", "set_value", "expand",
           "run_grid", "pivot", "ranks", "paired_differences", "pivot_markdown",
           "plot_bars", "plot_scatter", "format_mean_std"]

# Keys that say where results go or how progress is shown, not what they are.
NOT_RESULT_KEYS = ("out_dir", "cache_dir", "progress", "data_dir")


# --------------------------------------------------------------------------- keys

def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All dotted keys of ``config`` (sub-configs and their leaves), sorted."""
    out = []
    for k in config.keys():
        key = prefix + k
        out.append(key)
        if isinstance(config[k], ml_collections.ConfigDict):
            out += flat_keys(config[k], key + ".")
    return sorted(out)


def _split_top_level(text: str) -> list[str]:
    """Splits on commas outside brackets and quotes (``[1,2],3`` -> ``[1,2]``, ``3``)."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_sweep(spec: str) -> tuple[str, list[Any]]:
    """``"method.weight=0.1,1"`` -> ``("method.weight", [0.1, 1])``.

    Values are Python literals (numbers, booleans, quoted strings, lists), anything else
    is a string; commas inside brackets or quotes do not split.
    """
    if not isinstance(spec, str) or "=" not in spec:
        raise ValueError(f"a sweep must look like key=value1,value2,... (e.g. "
                         f"temperature=1,4,8), got {spec!r}.")
    key, text = spec.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"sweep {spec!r} has an empty key.")
    values = _split_top_level(text)
    if any(v == "" for v in values):
        raise ValueError(f"sweep {spec!r} has an empty value; give comma-separated "
                         f"values, e.g. {key}=1,4,8.")
    return key, [_literal(v) for v in values]


def validate_keys(config: ml_collections.ConfigDict, keys: Iterable[str]) -> None:
    """Raises ``ValueError`` for a dotted key that is not in ``config``, listing the
    valid keys (and the closest matches)."""
    valid = flat_keys(config)
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise ValueError(f"unknown sweep key {key!r}.{hint} Valid keys: {valid}.")


def set_value(config: ml_collections.ConfigDict, key: str, value: Any):
    """Sets dotted ``key`` to ``value`` with :func:`kdjax.config.apply_overrides`'
    checks (unknown keys, type coercion)."""
    return apply_overrides(config, [f"{key}={value!r}"])


# -------------------------------------------------------------------------- cells

@dataclasses.dataclass(frozen=True)
class Cell:
    """One grid point: ``config`` (overrides applied), ``seed`` and its keys.

    ``key`` identifies the (config, seed) result; ``group`` the config without the seed
    (the seeds of a group can run together).
    """

    overrides: tuple[tuple[str, Any], ...]
    seed: int
    config: ml_collections.ConfigDict = dataclasses.field(compare=False, repr=False)
    key: str = ""
    group: str = ""


def default_identity(config: ml_collections.ConfigDict) -> dict:
    """What defines a result: the config minus :data:`NOT_RESULT_KEYS`."""
    return {k: v for k, v in config.to_dict().items() if k not in NOT_RESULT_KEYS}


def expand(base: ml_collections.ConfigDict, sweeps: Sequence[tuple[str, Sequence[Any]]],
           seeds: Sequence[int], *,
           identity: Callable[[ml_collections.ConfigDict], Any] = default_identity,
           validate: Callable[[ml_collections.ConfigDict], None] | None = None
           ) -> list[Cell]:
    """Cells of the product of the sweep values x seeds (in that order).

    ``sweeps``: ``[(dotted_key, values), ...]``; keys are validated against ``base``.
    ``identity(config)`` gives what the cell key hashes (default: the config minus
    output locations); ``validate(config)`` checks each cell's config.
    """
    validate_keys(base, [k for k, _ in sweeps])
    for k, vs in sweeps:
        if not len(vs):
            raise ValueError(f"sweep key {k!r} has no values.")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"seeds must be distinct non-negative ints, got {seeds}.")
    cells = []
    for combo in itertools.product(*[vs for _, vs in sweeps]):
        cfg = ml_collections.ConfigDict(base.to_dict())
        overrides = tuple((k, v) for (k, _), v in zip(sweeps, combo))
        for k, v in overrides:
            set_value(cfg, k, v)
        if validate is not None:
            validate(cfg)
        ident = identity(cfg)
        group = config_hash(ident)
        for s in seeds:
            cells.append(Cell(overrides, s, cfg, config_hash(ident, s), group))
    return cells


def run_grid(cells: Sequence[Cell], results_path: str, *,
             run_cell: Callable[[Any, int], Mapping[str, Any]] | None = None,
             run_cells: Callable[[Any, list[int]], Sequence[Mapping[str, Any]]] | None = None,
             metadata: Mapping[str, Any] | None = None, log: Callable[[str], None] = print
             ) -> list[dict]:
    """Runs the cells that have no row in ``results_path``; returns the rows of all cells.

    With ``run_cells`` the pending seeds of each config group run in one call (one row
    per seed, in order); otherwise ``run_cell`` runs one seed at a time. Rows are
    appended atomically after each call. A call may return ``None`` (or a ``None`` row)
    for a cell it skips; nothing is written for it.
    """
    if (run_cell is None) == (run_cells is None):
        raise ValueError("pass exactly one of run_cell and run_cells.")
    meta = dict(R.run_metadata() if metadata is None else metadata)
    done = {r.get("cell_key") for r in R.read_jsonl(results_path)}
    groups: dict[str, list[Cell]] = {}
    for c in cells:
        groups.setdefault(c.group, []).append(c)
    skipped = sum(c.key in done for c in cells)
    if skipped:
        log(f"grid: {skipped} of {len(cells)} cells already in {results_path}, skipped.")
    for cs in groups.values():
        pending = [c for c in cs if c.key not in done]
        if not pending:
            continue
        if run_cells is not None:
            batches = [pending]
        else:
            batches = [[c] for c in pending]
        for batch in batches:
            seeds = [c.seed for c in batch]
            if run_cells is not None:
                out = run_cells(batch[0].config, seeds)
                out = [None] * len(batch) if out is None else list(out)
            else:
                out = [run_cell(batch[0].config, seeds[0])]
            if len(out) != len(batch):
                raise ValueError(f"run_cells returned {len(out)} rows for {len(batch)} "
                                 f"seeds {seeds}.")
            rows = []
            for c, metrics in zip(batch, out):
                if metrics is None:
                    continue
                rows.append({**dict(metrics), "cell_key": c.key, "group_key": c.group,
                             "seed": c.seed, "overrides": dict(c.overrides),
                             "config": c.config.to_dict(), **meta})
            R.append_jsonl(results_path, rows)
            done.update(r["cell_key"] for r in rows)
    keys = {c.key for c in cells}
    return [r for r in R.read_jsonl(results_path) if r.get("cell_key") in keys]


# -------------------------------------------------------------------- aggregation

def pivot(rows: Sequence[Mapping[str, Any]], row_key: str, col_key: str, metric: str
          ) -> dict[tuple[Any, Any], dict[str, Any]]:
    """``{(row, col): {"mean", "std", "n", "values": {seed: value}}}`` of ``metric``.

    ``std`` is the sample standard deviation (ddof=1, 0 for one seed). Rows without the
    metric, or with ``None``/NaN, are left out.
    """
    vals: dict[tuple, dict[int, float]] = {}
    for r in rows:
        v = r.get(metric)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        vals.setdefault((r[row_key], r[col_key]), {})[r.get("seed")] = float(v)
    out = {}
    for k, by_seed in vals.items():
        mu, sd = R.mean_std(list(by_seed.values()))
        out[k] = {"mean": mu, "std": sd, "n": len(by_seed), "values": by_seed}
    return out


def ranks(values: Sequence[float], higher_is_better: bool = True) -> list[float]:
    """Rank of each value (1 = best); ties share their mean rank; NaN gets NaN."""
    v = np.asarray(values, float)
    out = np.full(v.shape, np.nan)
    ok = ~np.isnan(v)
    if ok.any():
        from scipy.stats import rankdata
        out[ok] = rankdata(-v[ok] if higher_is_better else v[ok], method="average")
    return out.tolist()


def paired_differences(table: Mapping[tuple[Any, Any], Mapping[str, Any]], baseline: Any
                       ) -> dict[tuple[Any, Any], tuple[float, float, float, int]]:
    """``{(row, col): (mean, lo, hi, n)}`` of ``row - baseline`` over common seeds, with
    the paired 95% t-interval (:func:`kdjax.train.results.paired_ci95`)."""
    out = {}
    for (row, col), cell in table.items():
        base = table.get((baseline, col))
        if base is None:
            continue
        common = sorted(set(cell["values"]) & set(base["values"]))
        if not common:
            continue
        a = [cell["values"][s] for s in common]
        b = [base["values"][s] for s in common]
        out[(row, col)] = (*R.paired_ci95(a, b), len(common))
    return out


def format_mean_std(mean: float, std: float, scale: float = 100.0, digits: int = 1) -> str:
    if mean is None or math.isnan(mean):
        return "-"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def pivot_markdown(table: Mapping[tuple[Any, Any], Mapping[str, Any]], row_order: Sequence,
                   col_order: Sequence, *, row_title: str = "method", scale: float = 100.0,
                   with_rank: bool = True, higher_is_better: bool = True,
                   baseline: Any = None) -> str:
    """Markdown table rows x columns of ``mean ± std`` (rank in the column), plus a mean
    rank column; with ``baseline``, a second block of differences to the baseline row
    with their paired 95% CI."""
    rank_of: dict[tuple, float] = {}
    for col in col_order:
        present = [r for r in row_order if (r, col) in table]
        rs = ranks([table[(r, col)]["mean"] for r in present], higher_is_better)
        rank_of.update({(r, col): k for r, k in zip(present, rs)})
    head = [row_title, *map(str, col_order)] + (["mean rank"] if with_rank else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in row_order:
        cells, rk = [str(r)], []
        for col in col_order:
            t = table.get((r, col))
            if t is None:
                cells.append("-")
                continue
            text = format_mean_std(t["mean"], t["std"], scale)
            if with_rank and not math.isnan(rank_of[(r, col)]):
                text += f" ({rank_of[(r, col)]:g})"
                rk.append(rank_of[(r, col)])
            cells.append(text)
        if with_rank:
            cells.append(f"{np.mean(rk):.2f}" if rk else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if baseline is None:
        return "\n".join(lines)
    diffs = paired_differences(table, baseline)
    lines += ["", f"Difference to {baseline} (mean [95% CI], paired over seeds):", "",
              "| " + " | ".join([row_title, *map(str, col_order)]) + " |",
              "|" + "|".join(["---"] * (len(col_order) + 1)) + "|"]
    for r in row_order:
        if r == baseline:
            continue
        cells = [str(r)]
        for col in col_order:
            d = diffs.get((r, col))
            if d is None:
                cells.append("-")
            elif math.isnan(d[1]):
                cells.append(f"{scale * d[0]:+.1f} (n={d[3]})")
            else:
                cells.append(f"{scale * d[0]:+.1f} [{scale * d[1]:+.1f}, {scale * d[2]:+.1f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -------------------------------------------------------------------------- plots

def plot_bars(table: Mapping[tuple[Any, Any], Mapping[str, Any]], row_order: Sequence,
              col_order: Sequence, path: str, *, ylabel: str, scale: float = 100.0,
              title: str = "") -> None:
    """Grouped bars: one group per column, one bar per row, error bars = std."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    R.save_figure(fig, path)


def plot_scatter(x_table, y_table, row_order: Sequence, col_order: Sequence, path: str, *,
                 xlabel: str, ylabel: str, scale: float = 100.0, title: str = "") -> None:
    """One point per (row, column) at (x mean, y mean) with std error bars; colour =
    column, marker = row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = "osD^v<>pPX*hH8d"
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for j, c in enumerate(col_order):
        for i, r in enumerate(row_order):
            if (r, c) not in x_table or (r, c) not in y_table:
                continue
            x, y = x_table[(r, c)], y_table[(r, c)]
            ax.errorbar(scale * x["mean"], scale * y["mean"], xerr=scale * x["std"],
                        yerr=scale * y["std"], fmt=markers[i % len(markers)],
                        color=colours[j % len(colours)], ms=5, capsize=2, alpha=0.85)
    for j, c in enumerate(col_order):
        ax.plot([], [], "s", color=colours[j % len(colours)], label=str(c))
    for i, r in enumerate(row_order):
        ax.plot([], [], markers[i % len(markers)], color="gray", label=str(r))
    lo, hi = ax.get_xlim()
    ax.plot([lo, hi], [lo, hi], ":", color="gray", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="best")
    R.save_figure(fig, path)
