"""A grid of cells: what one result is, and its key.

A *cell* is one (setting, seed) of a study: a config, the ``identity`` that defines its
result (what it hashes; never output locations), the row ``fields`` that name it in a
table (e.g. ``{"run": "kd"}``) and a seed. Its keys:

- ``group = config_hash(identity)``: the cell without its seed (the seeds of a group can
  train together, e.g. as one vmapped program);
- ``key = config_hash(identity, seed)``: the row key (rows are keyed by ``(key, seed)``).

Two ways to make cells:

- :func:`expand` -- a config x sweeps (product of dotted-key values) x seeds; the
  identity is the cell's config minus :data:`NOT_RESULT_KEYS` (the ablation grid of
  ``python -m experiments.sweep``);
- :func:`study_cells` -- one study config x named entries (``{"kd": {...}}``) x seeds;
  the identity is ``{"study": study_key, **fields}`` where ``study_key`` is the driver's
  config hash of the study (so rows written before this layer, which carry
  ``config_hash`` = study key and the fields, are recognised: see ``Cell.legacy``).

Duplicate entries (``run_methods=['kd', 'kd']``, a value swept twice, a seed twice)
are a :class:`~kdjax.experiment.config.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Any, Callable, Iterable, Mapping, Sequence

import ml_collections

from kdjax._io import config_hash
from kdjax.experiment.config import ConfigError, parse_value, set_value, validate_keys

__all__ = ["Cell", "NOT_RESULT_KEYS", "default_identity", "study_key", "parse_sweep",
           "expand", "study_cells", "check_unique", "check_seeds"]

# Keys that say where results go or how progress is shown, not what they are.
NOT_RESULT_KEYS = ("out_dir", "cache_dir", "progress", "data_dir")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One grid point: ``config``, ``seed``, its ``key`` and ``group`` (see module doc).

    ``fields`` are written into the cell's rows (and name it in tables); ``overrides``
    are the swept ``(key, value)`` pairs; ``legacy`` is ``(study_key, fields)`` for
    cells made by :func:`study_cells` (rows without a ``cell_key`` whose
    ``config_hash`` and fields match belong to this cell).
    """

    seed: int
    key: str
    group: str
    config: ml_collections.ConfigDict = dataclasses.field(compare=False, repr=False)
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)
    overrides: tuple[tuple[str, Any], ...] = ()
    legacy: tuple[str, Mapping[str, Any]] | None = dataclasses.field(
        default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        """``"run=kd"`` / ``"temperature=4, method.weight=0.1"`` / ``"base"``."""
        items = self.fields.items() if self.fields else self.overrides
        return ", ".join(f"{k}={v}" for k, v in items) or "base"


def default_identity(config: ml_collections.ConfigDict) -> dict:
    """What defines a result: the config minus :data:`NOT_RESULT_KEYS`."""
    return {k: v for k, v in config.to_dict().items() if k not in NOT_RESULT_KEYS}


def study_key(config: ml_collections.ConfigDict, *extra: Any) -> str:
    """``config_hash(default_identity(config), *extra)``: the key of a study's results
    and checkpoints (the hash the drivers used before this layer)."""
    return config_hash(default_identity(config), *extra)


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


def parse_sweep(spec: str) -> tuple[str, list[Any]]:
    """``"method.weight=0.1,1"`` -> ``("method.weight", [0.1, 1])``.

    Values are Python literals (:func:`~kdjax.experiment.config.parse_value`); commas
    inside brackets or quotes do not split. A value given twice is an error.
    """
    if not isinstance(spec, str) or "=" not in spec:
        raise ConfigError(f"a sweep must look like key=value1,value2,... (e.g. "
                          f"temperature=1,4,8), got {spec!r}.")
    key, text = spec.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"sweep {spec!r} has an empty key.")
    values = _split_top_level(text)
    if any(v == "" for v in values):
        raise ConfigError(f"sweep {spec!r} has an empty value; give comma-separated "
                          f"values, e.g. {key}=1,4,8.")
    values = [parse_value(v) for v in values]
    check_unique(f"sweep {key}", values)
    return key, values


def check_unique(what: str, values: Iterable[Any]) -> None:
    """Raises :class:`ConfigError` when ``values`` has an entry twice (compared by
    their JSON form, so ``[1, 2]`` and ``(1, 2)`` are the same entry)."""
    seen, dup = set(), []
    for v in values:
        k = json.dumps(v, sort_keys=True, default=str)
        if k in seen and v not in dup:
            dup.append(v)
        seen.add(k)
    if dup:
        raise ConfigError(f"{what} has duplicate entries {dup}; each entry must appear "
                          f"once (a duplicate would train and rank it twice).")


def check_seeds(seeds: Iterable[int]) -> list[int]:
    """Distinct non-negative ints, else :class:`ConfigError`."""
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or int(s) != s or s < 0 for s in seeds):
        raise ConfigError(f"seeds must be non-negative ints, at least one, got {seeds}.")
    check_unique("seeds", seeds)
    return [int(s) for s in seeds]


def expand(base: ml_collections.ConfigDict, sweeps: Sequence[tuple[str, Sequence[Any]]],
           seeds: Iterable[int], *,
           identity: Callable[[ml_collections.ConfigDict], Any] = default_identity,
           validate: Callable[[ml_collections.ConfigDict], None] | None = None
           ) -> list[Cell]:
    """Cells of the product of the sweep values x seeds (in that order).

    ``sweeps``: ``[(dotted_key, values), ...]``; keys are validated against ``base``
    and must be distinct, values must be distinct. ``identity(config)`` gives what the
    cell key hashes; ``validate(config)`` checks each cell's config (all before any cell
    runs).
    """
    validate_keys(base, [k for k, _ in sweeps])
    check_unique("the swept keys", [k for k, _ in sweeps])
    for k, vs in sweeps:
        if not len(vs):
            raise ConfigError(f"sweep key {k!r} has no values.")
        check_unique(f"sweep {k}", vs)
    seeds = check_seeds(seeds)
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
            cells.append(Cell(s, config_hash(ident, s), group, cfg, overrides=overrides))
    return cells


def study_cells(config: ml_collections.ConfigDict, study_key: str,
                entries: Mapping[str, Mapping[str, Any]] | Sequence[tuple[str, Mapping]],
                seeds: Iterable[int]) -> list[Cell]:
    """Cells of one study: each entry (``name -> fields``) x seeds.

    ``entries``: e.g. ``{"kd": {"run": "kd"}}`` or a sequence of ``(name, fields)`` pairs
    (a name twice is an error). The identity of a cell is ``{"study": study_key,
    **fields}``; every cell shares ``config``.
    """
    items = list(entries.items()) if isinstance(entries, Mapping) else list(entries)
    check_unique("the study's entries", [n for n, _ in items])
    seeds = check_seeds(seeds)
    cells = []
    for _, fields in items:
        fields = dict(fields)
        ident = {"study": study_key, **fields}
        group = config_hash(ident)
        for s in seeds:
            cells.append(Cell(s, config_hash(ident, s), group, config, fields,
                              legacy=(study_key, fields)))
    return cells
