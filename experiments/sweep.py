"""Ablation sweeps over any driver: cells = product of swept config values x seeds.

    python -m experiments.sweep experiments.shift --sweep temperature=1,4,8 \\
        --sweep method.weight=0.1,1 --seeds 5 [--out DIR] [--config.key=value ...]

The driver module must expose ``run_cell(config, seed) -> dict of metrics`` (or
``run_cells(config, seeds) -> [dict, ...]`` to run the seeds of a cell together, which
is preferred when present). Its config module is the driver's ``CONFIG_MODULE``
attribute, else ``experiments.configs.<driver name>``. Sweep keys are dotted config keys
and are validated against that config (an unknown key lists the valid keys); each
cell's config is checked by the config module's ``validate``. Rows go to
``<out>/sweep.jsonl`` (resumable: finished (cell, seed) rows are skipped on rerun; rows of
other code follow ``--stale``, see :mod:`kdjax.experiment.run`), the table (mean ± std
over seeds, rank per metric) to ``<out>/sweep.md`` and one bar chart per metric to
``<out>/sweep_<metric>.png``. The same machinery as every driver: :mod:`kdjax.experiment`.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from typing import Any, Sequence

from kdjax import experiment as kx

# Row fields that are bookkeeping, not metrics.
_NOT_METRICS = {"seed", "global_batch_size", "epochs", "best_epoch", "train_examples",
                "device_count", "process_count", "train_seconds"}


def load_driver(name: str):
    """``(module, config_module_name)``; errors say what the driver must provide."""
    try:
        mod = importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise kx.ConfigError(f"cannot import driver module {name!r} ({e}); give a module "
                             f"path such as experiments.shift.") from None
    if not hasattr(mod, "run_cell") and not hasattr(mod, "run_cells"):
        raise kx.ConfigError(f"driver {name!r} exposes neither run_cell(config, seed) nor "
                             f"run_cells(config, seeds); it cannot be swept.")
    cfg_mod = getattr(mod, "CONFIG_MODULE",
                      "experiments.configs." + name.rsplit(".", 1)[-1])
    return mod, cfg_mod


def parse_args(argv: Sequence[str]):
    overrides, rest = kx.parse_cli(list(argv))
    p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("driver", help="driver module, e.g. experiments.shift")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="config key and its values (repeat for a product grid)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per cell")
    p.add_argument("--out", default="", help="output directory (default <out_dir>/sweep)")
    p.add_argument("--config-arg", default=None,
                   help="argument of the config's get_config (e.g. quick)")
    p.add_argument("--stale", choices=kx.STALE_RULES, default="refuse",
                   help="rows of other code: refuse (default), rerun or reuse them")
    args = p.parse_args(rest)
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}.")
    try:
        args.sweeps = [kx.parse_sweep(s) for s in args.sweep]
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


def setting(row: dict, keys: Sequence[str]) -> str:
    """``"temperature=4, method.weight=0.1"`` (``"base"`` without swept keys)."""
    return ", ".join(f"{k}={row['overrides'].get(k)!r}" for k in keys) or "base"


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    driver, cfg_mod = load_driver(args.driver)
    base = kx.load_config(cfg_mod, args.overrides, arg=args.config_arg)
    cfg_module = importlib.import_module(cfg_mod)
    cells = kx.expand(base, args.sweeps, range(args.seeds),
                      identity=getattr(driver, "cell_identity", kx.default_identity),
                      validate=getattr(cfg_module, "validate", None))
    out = args.out or os.path.join(base.get("out_dir", "runs"), "sweep")
    run = kx.Run(base, name="sweep", out_dir=out, results="sweep.jsonl", stale=args.stale)
    run.check_paths()
    run.log(f"sweep {args.driver}: {len(cells) // args.seeds} settings x {args.seeds} "
            f"seeds -> {out}")
    if hasattr(driver, "run_cells"):
        rows = run.execute(cells, lambda c, seeds: driver.run_cells(c.config, seeds))
    else:
        rows = run.execute(cells, lambda c, seeds: [driver.run_cell(c.config, seeds[0])],
                           batch_seeds=False)
    if not rows:
        raise kx.RunError("no results (every cell was skipped).")
    metrics = metric_names(rows, getattr(driver, "METRICS", ()))
    keys = [k for k, _ in args.sweeps]
    labelled = [dict(r, _setting=setting(r, keys)) for r in rows]
    table = kx.markdown_table(labelled, row="_setting", row_title="setting",
                              metrics=[kx.Metric(m, scale=1.0, digits=4) for m in metrics])
    header = (f"Sweep of {args.driver} over {keys or 'nothing'}; mean ± std over seeds, "
              "(rank) per metric, 1 = highest.")
    run.report(header, table, rows, name="sweep.md")
    order = list(dict.fromkeys(r["_setting"] for r in labelled))
    for m in metrics:
        kx.plot_bars(kx.pivot(labelled, "_setting", None, m), order, [None],
                     os.path.join(out, f"sweep_{m}.png"), ylabel=m, scale=1.0)
    return rows


if __name__ == "__main__":
    kx.cli(main)
