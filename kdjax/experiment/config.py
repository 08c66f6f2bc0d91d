"""Config overrides for ``ml_collections`` configs, with errors that list valid keys.

Drivers take ``--config.<dotted.key>=<value>`` arguments. Values are parsed with
:func:`parse_value` (``ast.literal_eval``: numbers, booleans, lists, tuples, quoted
strings; anything else is kept as a string) and must match the type of the existing
field; an unknown key is a :class:`ConfigError` (a ``ValueError``) that lists the valid
keys at that level and the closest matches. ``ml_collections``' ``config_flags`` does the
same parsing but reports an unknown key as an ``AttributeError`` deep in a traceback,
without the valid keys.

:func:`load_config` is the validation hook: ``get_config(variant)``, the overrides,
:func:`check_finite` (no NaN/inf in any float setting), then the config module's
``validate(config)``, all before anything trains.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import math
from typing import Any, Iterable

import ml_collections

from kdjax._io import config_hash

__all__ = ["ConfigError", "parse_value", "apply_overrides", "parse_cli", "load_config",
           "config_hash", "flat_keys", "validate_keys", "set_value", "check_finite"]


class ConfigError(ValueError):
    """A bad config key or value (the CLI prints it without a traceback, exit 2)."""


def parse_value(text: str) -> Any:
    """A Python literal (``"4"`` -> 4, ``"[1, 2]"`` -> [1, 2]), else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _coerce(key: str, old: Any, new: Any) -> Any:
    if old is None or isinstance(old, ml_collections.ConfigDict):
        return new
    if isinstance(old, bool):
        if isinstance(new, bool):
            return new
        if isinstance(new, str) and new.lower() in ("true", "false"):
            return new.lower() == "true"
        raise ConfigError(f"config key {key!r} expects a bool, got {new!r}.")
    if isinstance(old, int) and isinstance(new, int) and not isinstance(new, bool):
        return new
    if isinstance(old, float) and isinstance(new, (int, float)) and not isinstance(new, bool):
        return float(new)
    if isinstance(old, (list, tuple)):
        if isinstance(new, (list, tuple)):
            return type(old)(new)
        return type(old)([new])
    if isinstance(old, str):
        return str(new)
    if type(old) is not type(new):
        raise ConfigError(f"config key {key!r} expects {type(old).__name__}, got "
                          f"{new!r} ({type(new).__name__}).")
    return new


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All dotted keys of ``config`` (sub-configs and their leaves), sorted."""
    out = []
    for k in config.keys():
        key = prefix + k
        out.append(key)
        if isinstance(config[k], ml_collections.ConfigDict):
            out += flat_keys(config[k], key + ".")
    return sorted(out)


def validate_keys(config: ml_collections.ConfigDict, keys: Iterable[str]) -> None:
    """Raises :class:`ConfigError` for a dotted key that is not in ``config``, listing
    the valid keys (and the closest matches)."""
    valid = flat_keys(config)
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise ConfigError(f"unknown sweep key {key!r}.{hint} Valid keys: {valid}.")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]):
    """Applies ``["a.b=1", "c=[1, 2]"]`` to ``config`` in place and returns it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value.")
        key, text = item.split("=", 1)
        parts = key.split(".")
        node = config
        for i, part in enumerate(parts):
            valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(parts[:i]) or "<root>"
                close = difflib.get_close_matches(part, valid, n=3)
                hint = f" Did you mean {close}?" if close else ""
                raise ConfigError(f"unknown config key {key!r}: {part!r} is not in "
                                  f"{where}; valid keys there: {valid}.{hint}")
            if i < len(parts) - 1:
                node = node[part]
        with node.unlocked():
            node[parts[-1]] = _coerce(key, node[parts[-1]], parse_value(text))
    return config


def set_value(config: ml_collections.ConfigDict, key: str, value: Any):
    """Sets dotted ``key`` to ``value`` with :func:`apply_overrides`' checks."""
    return apply_overrides(config, [f"{key}={value!r}"])


def check_finite(config, prefix: str = "config") -> None:
    """Raises :class:`ConfigError` naming the key of any NaN or infinite float (in
    sub-configs, dicts and lists too): no setting is legitimately non-finite."""
    if isinstance(config, ml_collections.ConfigDict):
        config = config.to_dict()
    if isinstance(config, dict):
        for k, v in config.items():
            check_finite(v, f"{prefix}.{k}")
    elif isinstance(config, (list, tuple)):
        for i, v in enumerate(config):
            check_finite(v, f"{prefix}[{i}]")
    elif isinstance(config, float) and not math.isfinite(config):
        raise ConfigError(f"{prefix} must be a finite number, got {config}.")


def load_config(module: str, overrides: Iterable[str] = (), arg: str | None = None):
    """``module.get_config(arg)`` with overrides applied, then :func:`check_finite` and
    ``module.validate`` (the validation hook: every value is checked before any cell
    runs)."""
    mod = importlib.import_module(module)
    config = mod.get_config(arg) if arg is not None else mod.get_config()
    apply_overrides(config, overrides)
    check_finite(config)
    if hasattr(mod, "validate"):
        mod.validate(config)
    return config


def parse_cli(argv: list[str]) -> tuple[list[str], list[str]]:
    """Splits ``argv`` into config overrides (``--config.k=v``) and other arguments."""
    overrides, rest = [], []
    for a in argv:
        if a.startswith("--config."):
            overrides.append(a[len("--config."):])
        else:
            rest.append(a)
    return overrides, rest
