"""One run of a study: CLI entry, checks before training, resumable cells, the report.

:meth:`Run.from_cli` parses ``[variant] [--quick] [--stale RULE] [--no-xla-cache]
[--config.key=value ...]`` (:func:`parse_config`; ``--help`` prints the driver's
docstring), loads and validates the config (:func:`~kdjax.experiment.config.load_config`:
unknown keys list the valid ones, NaN/inf floats are refused, then the config module's
``validate``), checks that the output and cache directories are writable and not full --
all before anything trains -- and turns on the persistent XLA compilation cache
(:func:`kdjax.train.enable_compilation_cache`) under ``<cache_dir>/xla``.

:meth:`Run.execute` runs the cells (:mod:`kdjax.experiment.grid`) whose rows are not in
the store yet (:class:`~kdjax.experiment.store.Store`, ``<out_dir>/results.jsonl``),
the pending seeds of a cell group in one call, and appends their rows as soon as the
call returns; a killed run loses at most the cells in progress. Every row records the
cell (``cell_key``, ``group_key``, ``seed``, ``overrides``, the cell's fields), the
config, and :func:`kdjax._io.run_metadata` (``git_revision``, ``code_state``, versions,
devices).

**Revision rule.** A row counts as done for a cell only if its ``code_state`` (the
revision plus a hash of uncommitted changes under ``kdjax/`` and ``experiments/``)
equals the current one. Rows of a cell from other code (another revision, or the same
revision with other uncommitted changes, or pre-layer rows of a ``+dirty`` tree) are
*stale*; what happens to them is the ``stale`` rule (``--stale``):

- ``refuse`` (default): stop before training, saying how many cells are stale and from
  which revisions;
- ``rerun``: train those cells again with the current code; the new rows are appended
  (the old ones stay in the file) and tables use the new ones;
- ``reuse``: count stale rows as done; the report header lists the revisions it mixes.

:func:`cli` wraps a driver's ``main``: Ctrl-C prints one line and exits 130; a full
disk, a read-only or unwritable path prints one line naming it and exits 1; a config
error prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import sys
import time
from typing import Any, Callable, Mapping, NoReturn, Sequence

from kdjax._io import atomic_write_text, code_state, run_metadata
from kdjax.experiment.config import ConfigError, load_config, parse_cli
from kdjax.experiment.grid import Cell
from kdjax.experiment.store import Store
from kdjax.experiment.tables import seeds_found

__all__ = ["Run", "RunError", "StaleRowsError", "STALE_RULES", "cli", "check_writable",
           "parse_config"]

STALE_RULES = ("refuse", "rerun", "reuse")
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
MIN_FREE_BYTES = 1 << 20


class RunError(RuntimeError):
    """A run cannot go on (printed by :func:`cli` without a traceback, exit 1)."""


class StaleRowsError(ConfigError):
    """Rows of the grid come from other code and the stale rule is ``refuse``."""


def check_writable(path: str, what: str = "output directory") -> None:
    """Creates ``path`` and writes/removes a probe file there; raises :class:`RunError`
    naming the path when it is read-only, not writable or (almost) full."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".kdjax_write_probe_{os.getpid()}")
        atomic_write_text(probe, "ok\n")
        os.remove(probe)
        free = shutil.disk_usage(path).free
    except OSError as e:
        raise RunError(f"cannot write to the {what} {path!r}: {e.strerror or e}.") from None
    if free < MIN_FREE_BYTES:
        raise RunError(f"the {what} {path!r} has {free} bytes free (disk full?).")


def _resolve(config, variant):
    if callable(config):
        return config(variant)
    return config, variant


def parse_config(argv: Sequence[str] | None, *, name: str, config, doc: str = "",
                 variants: Sequence[str] | None = None):
    """``(config, options)`` from ``[variant] [--quick] [--stale RULE] [--no-xla-cache]
    [--config.key=value ...]``; ``--help`` prints ``doc``. Nothing is created on disk.

    ``config``: the config module (``get_config(variant)`` when a variant is given) or
    ``variant -> (module, arg)``. ``variants``: accepted variant names, a name ending in
    ``:`` accepts any suffix (``paper:cifar10``); ``None``: any; ``()``: no variant.
    ``--quick`` means variant ``quick``. Config problems raise :class:`ConfigError`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = parse_cli(argv)
    p = argparse.ArgumentParser(prog=f"python -m experiments.{name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="--config.<dotted.key>=<value> overrides any config "
                                "value (an unknown key lists the valid keys).")
    if variants != ():
        p.add_argument("variant", nargs="?", default=None,
                       help="config variant" + (f": one of {list(variants)}"
                                                if variants else ""))
        p.add_argument("--quick", action="store_true", help="the quick variant")
    p.add_argument("--stale", choices=STALE_RULES, default="refuse",
                   help="rows of other code: refuse (default), rerun or reuse them")
    p.add_argument("--no-xla-cache", dest="xla_cache", action="store_false",
                   help="no persistent XLA compilation cache (default: <cache_dir>/xla)")
    opts = p.parse_args(rest)
    variant = getattr(opts, "variant", None)
    if getattr(opts, "quick", False):
        if variant not in (None, "quick"):
            raise ConfigError(f"--quick and variant {variant!r} both given.")
        variant = "quick"
    if variant is not None and variants and not any(
            variant == v or (v.endswith(":") and variant.startswith(v)) for v in variants):
        raise ConfigError(f"unknown variant {variant!r}; valid: {list(variants)}.")
    opts.variant = variant
    try:
        module, arg = _resolve(config, variant)
        cfg = load_config(module, overrides, arg)
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(str(e)) from e
    return cfg, opts


class Run:
    """One invocation of a driver (see the module docstring).

    Args:
      config: the validated config (an ``ml_collections.ConfigDict``).
      name: the study's name (banner, CLI program name).
      out_dir: where rows, tables and plots go (default ``config.out_dir``).
      results: the rows file inside ``out_dir``.
      stale: the revision rule, one of :data:`STALE_RULES`.
      metadata: recorded in every row (default :func:`kdjax._io.run_metadata`).
      log: where progress lines go.
    """

    def __init__(self, config, *, name: str, out_dir: str | None = None,
                 results: str = "results.jsonl", stale: str = "refuse",
                 metadata: Mapping[str, Any] | None = None,
                 log: Callable[[str], None] = print):
        if stale not in STALE_RULES:
            raise ConfigError(f"stale must be one of {list(STALE_RULES)}, got {stale!r}.")
        self.config, self.name, self.stale, self.log = config, name, stale, log
        self.out_dir = out_dir if out_dir is not None else config.out_dir
        self.meta = dict(run_metadata() if metadata is None else metadata)
        self.meta.setdefault("code_state", code_state())
        self.code_state = self.meta["code_state"]
        self.store = Store(os.path.join(self.out_dir, results))
        self.variant: str | None = None
        self.t0 = time.time()

    # ------------------------------------------------------------------ entry

    @classmethod
    def from_cli(cls, argv: Sequence[str] | None, *, name: str, config, doc: str = "",
                 variants: Sequence[str] | None = None, **kwargs) -> "Run":
        """Parses the command line (:func:`parse_config`) and returns a checked
        :class:`Run`: output and cache directories writable, and the persistent XLA
        compilation cache on under ``<cache_dir>/xla`` (``--no-xla-cache``: off)."""
        cfg, opts = parse_config(argv, name=name, config=config, doc=doc, variants=variants)
        run = cls(cfg, name=name, stale=opts.stale, **kwargs)
        run.variant = opts.variant
        run.check_paths()
        if opts.xla_cache:
            from kdjax.train import enable_compilation_cache

            cache_dir = cfg.get("cache_dir") or run.out_dir
            run.meta["xla_cache"] = enable_compilation_cache(os.path.join(cache_dir, "xla"))
        return run

    def check_paths(self) -> None:
        """Fails fast (:class:`RunError`) on an unwritable or full output/cache dir."""
        check_writable(self.out_dir)
        cache = self.config.get("cache_dir") if hasattr(self.config, "get") else None
        if cache:
            check_writable(cache, "cache directory")

    def banner(self, what: str) -> None:
        """``kdjax <name>: <what>, <devices>, jax <version>, rev <revision>``."""
        m = self.meta
        self.log(f"kdjax {self.name}: {what}, {m.get('device_count')} "
                 f"{m.get('device_kind')} device(s), jax {m.get('jax_version')}, rev "
                 f"{m.get('git_revision')}")

    def path(self, *parts: str) -> str:
        return os.path.join(self.out_dir, *parts)

    # ------------------------------------------------------------------ rows

    def _stored(self, cells: Sequence[Cell], report: bool = True) -> dict[tuple, list[dict]]:
        """``{(cell_key, seed): [rows...]}`` of the given cells (file order); rows
        written before this layer are matched through ``Cell.legacy``."""
        legacy, names = {}, set()
        for c in cells:
            if c.legacy is not None:
                study, fields = c.legacy
                names.add(tuple(sorted(fields)))
                legacy[(study, _freeze(fields), c.seed)] = c.key
        by_key = {(c.key, c.seed) for c in cells}
        out: dict[tuple, list[dict]] = {}
        for r in self.store.read(report=report):
            key = r.get("cell_key")
            if key is None and "config_hash" in r:
                for fs in names:
                    k = legacy.get((r["config_hash"], _freeze({f: r.get(f) for f in fs}),
                                    r.get("seed")))
                    if k is not None:
                        key, r = k, {**r, "cell_key": k}
                        break
            if (key, r.get("seed")) in by_key:
                out.setdefault((key, r.get("seed")), []).append(r)
        return out

    def _row_state(self, r: Mapping[str, Any]) -> str:
        if "code_state" in r:
            return r["code_state"]
        rev = str(r.get("git_revision", "unknown"))
        return rev if not rev.endswith("+dirty") else rev + "(unknown changes)"

    def plan(self, cells: Sequence[Cell]) -> list[Cell]:
        """The cells still to run, by the stale rule; raises :class:`StaleRowsError`
        (rule ``refuse``) before anything trains. Duplicate cells are an error."""
        keys = [c.key for c in cells]
        if len(set(keys)) != len(keys):
            dup = sorted({c.name + f" seed {c.seed}" for c in cells if keys.count(c.key) > 1})
            raise ConfigError(f"the grid has duplicate cells {dup}.")
        stored = self._stored(cells)
        pending, stale = [], {}
        for c in cells:
            rows = stored.get((c.key, c.seed), [])
            states = [self._row_state(r) for r in rows]
            if not rows:
                pending.append(c)
            elif self.code_state not in states:
                stale[c.key] = states
        if stale:
            found = sorted({s for ss in stale.values() for s in ss})
            msg = (f"{len(stale)} of {len(cells)} cells in {self.store.path} were computed "
                   f"by other code (code states {found}; now {self.code_state}).")
            if self.stale == "refuse":
                raise StaleRowsError(msg + " Pass --stale=rerun to train them again with "
                                     "this code, or --stale=reuse to keep the old rows "
                                     "(the report then lists the revisions).")
            self.log(msg + (" Training them again (--stale=rerun)." if self.stale == "rerun"
                            else " Reusing them (--stale=reuse)."))
            if self.stale == "rerun":
                pending += [c for c in cells if c.key in stale]
        done = len(cells) - len(pending)
        if done:
            self.log(f"{done} of {len(cells)} cells already in {self.store.path}, skipped.")
        order = {c.key: i for i, c in enumerate(cells)}
        return sorted(pending, key=lambda c: order[c.key])

    def execute(self, cells: Sequence[Cell],
                fn: Callable[[Cell, list[int]], Sequence[Mapping[str, Any] | None] | None],
                *, batch_seeds: bool = True) -> list[dict]:
        """Runs the pending cells and returns the rows of all ``cells`` (:meth:`rows`).

        ``fn(cell, seeds)`` trains the given seeds of the cell's group (all pending seeds
        at once with ``batch_seeds``, else one at a time) and returns one metrics dict
        per seed (``None`` for a seed it skips; nothing is written for it)."""
        pending = self.plan(cells)
        groups: dict[str, list[Cell]] = {}
        for c in pending:
            groups.setdefault(c.group, []).append(c)
        for group in groups.values():
            batches = [group] if batch_seeds else [[c] for c in group]
            for batch in batches:
                seeds = [c.seed for c in batch]
                out = fn(batch[0], seeds)
                out = [None] * len(batch) if out is None else list(out)
                if len(out) != len(batch):
                    raise ValueError(f"{getattr(fn, '__name__', 'fn')} returned {len(out)} "
                                     f"rows for {len(batch)} seeds {seeds}.")
                self.store.append([self.row(c, m) for c, m in zip(batch, out)
                                   if m is not None])
        return self.rows(cells)

    def row(self, cell: Cell, metrics: Mapping[str, Any]) -> dict:
        """The stored row of ``cell``: metrics, cell fields, keys, config, metadata."""
        row = {**dict(metrics), **dict(cell.fields), "cell_key": cell.key,
               "group_key": cell.group, "seed": cell.seed,
               "overrides": dict(cell.overrides), "config": cell.config.to_dict()}
        if cell.legacy is not None:
            row["config_hash"] = cell.legacy[0]
        return {**row, **self.meta}

    def rows(self, cells: Sequence[Cell]) -> list[dict]:
        """One row per (cell, seed) found, in cell order: the current code's row, else
        (stale rule ``reuse``) the newest stale one."""
        stored = self._stored(cells, report=False)
        out = []
        for c in cells:
            rows = stored.get((c.key, c.seed), [])
            cur = [r for r in rows if self._row_state(r) == self.code_state]
            if cur:
                out.append(cur[-1])
            elif rows and self.stale == "reuse":
                out.append(rows[-1])
        return out

    # ------------------------------------------------------------------ report

    def provenance(self, rows: Sequence[Mapping[str, Any]]) -> str:
        """``Seeds found: [...]; N rows; code <state>`` (or the mix of code states) and
        any problems met reading the store."""
        states: dict[str, int] = {}
        for r in rows:
            s = self._row_state(r)
            states[s] = states.get(s, 0) + 1
        code = (f"code {next(iter(states))}" if len(states) == 1 else
                "MIXED code states " + ", ".join(f"{s} ({n} rows)" for s, n in states.items())
                if states else "no rows")
        text = f"Seeds found: {seeds_found(rows)}; {len(rows)} rows; {code}."
        if self.store.problems:
            text += " Skipped in the results file: " + " ".join(self.store.problems)
        return text

    def report(self, header: str, table: str, rows: Sequence[Mapping[str, Any]], *,
               name: str = "results.md") -> str:
        """Writes ``header`` + provenance + ``table`` to ``<out_dir>/<name>`` atomically,
        prints it, and returns the text."""
        text = f"{header.rstrip()}\n{self.provenance(rows)}\n\n{table}\n"
        atomic_write_text(self.path(name), text)
        self.log("\n" + text)
        self.log(f"wrote {self.out_dir}/{name} in {time.time() - self.t0:.0f} s")
        return text


def _freeze(fields: Mapping[str, Any]) -> str:
    return json.dumps(dict(fields), sort_keys=True, default=str)


def _disk_error(e: BaseException) -> OSError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
            return e
        e = e.__cause__ or e.__context__
    return None


def _quit(msg: str, code: int) -> NoReturn:
    print(msg, file=sys.stderr, flush=True)
    sys.stdout.flush()
    # no interpreter shutdown: worker threads (checkpoint writers) would print long
    # tracebacks; finished rows are already fsync-ed.
    os._exit(code)


def _divergence_errors():
    from kdjax.train.cache import NonFiniteError
    from kdjax.train.loop import DivergenceError

    return DivergenceError, NonFiniteError


def cli(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> NoReturn:
    """Runs ``main(argv)`` as a command: exit 0, or one line and exit 130 (Ctrl-C),
    2 (config error), 1 (full disk, read-only/unwritable path, :class:`RunError`)."""
    try:
        main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        _quit("\ninterrupted (Ctrl-C); finished rows are saved; run the same command "
              "again to resume.", 130)
    except ConfigError as e:
        _quit(f"error: {e}", 2)
    except RunError as e:
        _quit(f"error: {e}", 1)
    except _divergence_errors() as e:
        _quit(f"error: {e}; nothing non-finite was written or cached.", 1)
    except SystemExit:
        raise
    except BaseException as e:
        disk = _disk_error(e)
        if disk is None:
            raise
        where = f" ({disk.filename})" if disk.filename else ""
        _quit(f"error: {disk.strerror or disk}{where}; finished rows are saved.", 1)
    sys.stdout.flush()
    sys.exit(0)
