"""The experiment layer: a study is a grid of cells, a resumable rows store, one table.

Pieces (each its own module):

- :mod:`~kdjax.experiment.config` -- ``get_config(variant)`` + ``--config.key=value``
  overrides (unknown keys list the valid ones), :func:`load_config` (the validation
  hook: overrides, no NaN/inf floats, the config module's ``validate``);
- :mod:`~kdjax.experiment.grid` -- :class:`Cell` (config, identity, seed; ``key`` =
  config hash of the identity and the seed, ``group`` = without the seed),
  :func:`study_cells` (one study x named entries x seeds), :func:`expand` (a config x
  sweeps x seeds, for ablations); duplicate entries are an error;
- :mod:`~kdjax.experiment.store` -- :class:`Store`: JSON lines keyed by (cell key,
  seed), appended under a file lock (two processes never interleave or duplicate rows);
  reading skips and reports torn, garbled and non-UTF-8 lines and counts duplicated rows
  once, and never rewrites the file;
- :mod:`~kdjax.experiment.run` -- :class:`Run`: the CLI entry (``--help``, variant /
  ``--quick``, ``--stale``, ``--config.k=v``), fail-fast checks of the output and cache
  directories, :meth:`Run.execute` (train the pending cells, append their rows with the
  code revision), the revision rule (rows of other code: refuse / rerun / reuse), and
  :meth:`Run.report` (results.md with the seeds actually found); :func:`cli` (Ctrl-C ->
  one line, exit 130; full disk / read-only -> one line naming the path, exit 1);
- :mod:`~kdjax.experiment.tables` -- the one formatter :func:`markdown_table`
  (``mean ± std (rank)``, ``n`` = seeds found, paired 95% CIs against a baseline row),
  :func:`pivot`, :func:`ranks`, :func:`paired_differences`, :func:`summarize`;
- :mod:`~kdjax.experiment.plots` -- :func:`save_figure` (atomic PNG), bar/scatter plots.

How to write a driver (``experiments/<study>.py``; see ``experiments/distill.py``)::

    from kdjax import experiment as kx

    METRICS = (kx.Metric("test_accuracy"), kx.Metric("test_ece", higher_is_better=False))

    def train_students(cfg, run, seeds, ...):          # the study: one cell group
        ...                                            # train all `seeds` of `run`
        return [{"test_accuracy": ..., "test_ece": ...} for s in seeds]   # one per seed

    def main(argv=None):
        run = kx.Run.from_cli(argv, name="mystudy", doc=__doc__, variants=["quick"],
                              config="experiments.configs.mystudy")   # parsed + checked
        cfg = run.config
        study = kx.study_key(cfg)            # config hash without out_dir/cache_dir/...
        cells = kx.study_cells(cfg, study, {r.name: {"run": r.name} for r in cfg.runs},
                               range(cfg.seeds))                    # duplicates: error
        run.plan(cells)                      # stale-row rule applied before training
        ...                                  # data, teacher (cached)
        rows = run.execute(cells, lambda cell, seeds: train_students(
            cfg, cell.fields["run"], seeds, ..., ckpt_dir=run.path("ckpt", study)))
        run.report("Header of the table.", kx.markdown_table(
            rows, row="run", metrics=METRICS, baseline="ce"), rows)
        return rows

    if __name__ == "__main__":
        kx.cli(main)

``fn(cell, seeds)`` of :meth:`Run.execute` gets the first cell of a group and all its
pending seeds (``batch_seeds=False``: one seed at a time) and returns one metrics dict
per seed (or ``None`` to write nothing for it). Rows get the cell's fields, keys, seed,
config and :func:`kdjax._io.run_metadata`. For ablations over any config key use
:func:`expand` (``python -m experiments.sweep`` does, with the same :class:`Run`).
"""

from kdjax.experiment.config import (ConfigError, apply_overrides, check_finite,
                                     flat_keys, load_config, parse_cli, parse_value,
                                     set_value, validate_keys)
from kdjax.experiment.grid import (NOT_RESULT_KEYS, Cell, check_seeds, check_unique,
                                   default_identity, expand, parse_sweep, study_cells,
                                   study_key)
from kdjax.experiment.plots import plot_bars, plot_scatter, pyplot, save_figure
from kdjax.experiment.run import (STALE_RULES, Run, RunError, StaleRowsError,
                                  check_writable, cli, parse_config)
from kdjax.experiment.store import ResultsWarning, Store
from kdjax.experiment.tables import (Metric, format_mean_std, markdown_table, mean_std,
                                     paired_ci95, paired_differences, pivot,
                                     pivot_markdown, ranks, seeds_found, summarize)
from kdjax._io import config_hash

__all__ = [
    # config
    "ConfigError", "apply_overrides", "check_finite", "flat_keys", "load_config",
    "parse_cli", "parse_value", "set_value", "validate_keys", "config_hash",
    # grid
    "NOT_RESULT_KEYS", "Cell", "check_seeds", "check_unique", "default_identity",
    "expand", "parse_sweep", "study_cells", "study_key",
    # store and run
    "ResultsWarning", "Store", "STALE_RULES", "Run", "RunError", "StaleRowsError",
    "check_writable", "cli", "parse_config",
    # tables and plots
    "Metric", "format_mean_std", "markdown_table", "mean_std", "paired_ci95",
    "paired_differences", "pivot", "pivot_markdown", "ranks", "seeds_found", "summarize",
    "plot_bars", "plot_scatter", "pyplot", "save_figure",
]
