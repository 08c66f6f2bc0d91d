"""Config overrides for ``ml_collections`` configs, with errors that list valid keys.

Drivers take ``--config.<dotted.key>=<value>`` arguments. Values are parsed with
``ast.literal_eval`` (numbers, booleans, lists, tuples, quoted strings; anything else is
kept as a string) and must match the type of the existing field; an unknown key is a
``ValueError`` that lists the valid keys at that level. ``ml_collections``'
``config_flags`` does the same parsing but reports an unknown key as an
``AttributeError`` deep in a traceback, without the valid keys.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import json
from typing import Any, Iterable

import ml_collections

__all__ = ["apply_overrides", "parse_cli", "load_config", "config_hash"]


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _coerce(key: str, old: Any, new: Any) -> Any:
    if old is None or isinstance(old, ml_collections.ConfigDict):
        return new
    if isinstance(old, bool):
        if isinstance(new, bool):
            return new
        if isinstance(new, str) and new.lower() in ("true", "false"):
            return new.lower() == "true"
        raise ValueError(f"config key {key!r} expects a bool, got {new!r}.")
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
        raise ValueError(f"config key {key!r} expects {type(old).__name__}, got "
                         f"{new!r} ({type(new).__name__}).")
    return new


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]):
    """Applies ``["a.b=1", "c=[1, 2]"]`` to ``config`` in place and returns it."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value.")
        key, text = item.split("=", 1)
        parts = key.split(".")
        node = config
        for i, part in enumerate(parts):
            valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(parts[:i]) or "<root>"
                raise ValueError(f"unknown config key {key!r}: {part!r} is not in {where}; "
                                 f"valid keys there: {valid}.")
            if i < len(parts) - 1:
                node = node[part]
        with node.unlocked():
            node[parts[-1]] = _coerce(key, node[parts[-1]], _parse_value(text))
    return config


def load_config(module: str, overrides: Iterable[str] = (), arg: str | None = None):
    """``module.get_config(arg)`` with overrides applied, then ``module.validate``."""
    mod = importlib.import_module(module)
    config = mod.get_config(arg) if arg is not None else mod.get_config()
    apply_overrides(config, overrides)
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


def config_hash(*configs: Any, length: int = 16) -> str:
    """Stable hash of configs (dicts / ConfigDicts), e.g. to key a cached teacher."""
    def plain(c):
        return c.to_dict() if isinstance(c, ml_collections.ConfigDict) else c
    blob = json.dumps([plain(c) for c in configs], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
