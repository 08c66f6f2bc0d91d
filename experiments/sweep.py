"""Ablation sweeps over any driver: cells = product of swept config values x seeds.

    python -m experiments.sweep experiments.shift --sweep temperature=1,4,8 \\
        --sweep method.weight=0.1,1 --seeds 5 [--out DIR] [--config.key=value ...]

The driver module must expose ``run_cell(config, seed) -> dict of metrics`` (or
``run_cells(config, seeds) -> [dict, ...]`` to run the seeds of a cell together, which
is preferred when present). Its config module is the driver's ``CONFIG_MODULE``
attribute, else ``experiments.configs.<driver name>``. Sweep keys are dotted config keys
and are validated against that config (an unknown key lists the valid keys); each
cell's config is checked by the config module's ``validate``. Rows go to
``<out>/sweep.jsonl`` (resumable: finished (cell, seed) rows are skipped on rerun), the
table (mean ± std over seeds, rank per metric) to ``<out>/sweep.md`` and one bar chart
per metric to ``<out>/sweep_<metric>.png``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time
from typing import Any, Sequence

from experiments import grid
from kdjax.config import load_config, parse_cli
from kdjax.train import results as R

# Row fields that are bookkeeping, not metrics.
_NOT_METRICS = {"seed", "global_batch_size", "epochs", "best_epoch", "train_examples",
                "device_count", "process_count", "train_seconds"}


def load_driver(name: str):
    """``(module, config_module_name)``; errors say what the driver must provide."""
    try:
        mod = importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise ValueError(f"cannot import driver module {name!r} ({e}); give a module path "
                         f"such as experiments.shift.") from None
    if not hasattr(mod, "run_cell") and not hasattr(mod, "run_cells"):
        raise ValueError(f"driver {name!r} exposes neither run_cell(config, seed) nor "
                         f"run_cells(config, seeds); it cannot be swept.")
    cfg_mod = getattr(mod, "CONFIG_MODULE",
                      "experiments.configs." + name.rsplit(".", 1)[-1])
    return mod, cfg_mod


def parse_args(argv: Sequence[str]):
    overrides, rest = parse_cli(list(argv))
    p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("driver", help="driver module, e.g. experiments.shift")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="config key and its values (repeat for a product grid)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per cell")
    p.add_argument("--out", default="", help="output directory (default <out_dir>/sweep)")
    p.add_argument("--config-arg", default=None,
                   help="argument of the config's get_config (e.g. quick)")
    args = p.parse_args(rest)
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}.")
    try:
        args.sweeps = [grid.parse_sweep(s) for s in args.sweep]
    except ValueError as e:
        p.error(str(e))
    keys = [k for k, _ in args.sweeps]
    if len(set(keys)) != len(keys):
        p.error(f"a key is swept twice: {keys}.")
    args.overrides = overrides
    return args


def metric_names(rows: Sequence[dict], preferred: Sequence[str] = ()) -> list[str]:
    """The driver's ``METRICS`` when given, else every numeric field of the rows."""
    if preferred:
        return [m for m in preferred if any(_num(r.get(m)) for r in rows)]
    names = []
    for r in rows:
        for k, v in r.items():
            if k not in _NOT_METRICS and _num(v) and k not in names:
                names.append(k)
    return names


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not (
        isinstance(v, float) and math.isnan(v))


def summary_markdown(rows: Sequence[dict], keys: Sequence[str], metrics: Sequence[str]
                     ) -> tuple[str, dict]:
    """Table: one line per setting of the swept keys, ``mean ± std (rank)`` per metric
    (rank 1 = highest mean). Returns the text and the pivot tables."""
    label = {}
    for r in rows:
        label[r["cell_key"]] = ", ".join(f"{k}={r['overrides'].get(k)!r}" for k in keys) \
            or "base"
    for r in rows:
        r["_setting"] = label[r["cell_key"]]
        r["_all"] = "all"
    order = list(dict.fromkeys(r["_setting"] for r in rows))
    tables = {m: grid.pivot(rows, "_setting", "_all", m) for m in metrics}
    head = ["setting", *metrics, "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    rank = {m: dict(zip(order, grid.ranks([tables[m].get((s, "all"), {"mean": math.nan})
                                           ["mean"] for s in order])))
            for m in metrics}
    for s in order:
        cells = [s]
        n = 0
        for m in metrics:
            t = tables[m].get((s, "all"))
            if t is None:
                cells.append("-")
                continue
            n = max(n, t["n"])
            cells.append(f"{grid.format_mean_std(t['mean'], t['std'], 1.0, 4)} "
                         f"({rank[m][s]:g})")
        cells.append(str(n))
        lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        r.pop("_setting"), r.pop("_all")
    return "\n".join(lines), {"order": order, "tables": tables}


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    driver, cfg_mod = load_driver(args.driver)
    base = load_config(cfg_mod, args.overrides, arg=args.config_arg)
    cfg_module = importlib.import_module(cfg_mod)
    identity = getattr(driver, "cell_identity", grid.default_identity)
    cells = grid.expand(base, args.sweeps, range(args.seeds), identity=identity,
                        validate=getattr(cfg_module, "validate", None))
    out = args.out or os.path.join(base.get("out_dir", "runs"), "sweep")
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    print(f"sweep {args.driver}: {len(cells) // args.seeds} settings x {args.seeds} seeds "
          f"-> {out}", flush=True)
    kw = ({"run_cells": driver.run_cells} if hasattr(driver, "run_cells")
          else {"run_cell": driver.run_cell})
    rows = grid.run_grid(cells, os.path.join(out, "sweep.jsonl"), **kw)
    if not rows:
        raise SystemExit("no results (every cell was skipped).")
    metrics = metric_names(rows, getattr(driver, "METRICS", ()))
    keys = [k for k, _ in args.sweeps]
    table, piv = summary_markdown(rows, keys, metrics)
    header = (f"Sweep of {args.driver} over {keys or 'nothing'}; mean ± std over "
              f"{args.seeds} seeds, (rank) per metric, 1 = highest.\n\n")
    R.atomic_write_text(os.path.join(out, "sweep.md"), header + table + "\n")
    for m in metrics:
        grid.plot_bars(piv["tables"][m], piv["order"], ["all"],
                       os.path.join(out, f"sweep_{m}.png"), ylabel=m, scale=1.0)
    print("\n" + header + table)
    print(f"\nwrote {out}/sweep.jsonl, sweep.md in {time.time() - t0:.0f} s")
    return rows


if __name__ == "__main__":
    main()
