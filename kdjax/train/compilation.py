"""Counting XLA compilations and the persistent compilation cache.

:func:`count_compilations` records, through :mod:`jax.monitoring`, every backend (XLA)
compilation and its duration while a block runs; a program loaded from the persistent
cache is a cache hit, not a compilation. :func:`enable_compilation_cache` turns on
JAX's persistent cache under a directory, for every program however short its compile
time, so that a second process running the same study compiles nothing it compiled
before (``tests/train/test_compile.py``; ``benchmarks/compile.py`` reports both).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import jax
from jax import monitoring

__all__ = ["Compilations", "count_compilations", "enable_compilation_cache"]

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
CACHE_HIT = "/jax/compilation_cache/cache_hits"


@dataclasses.dataclass
class Compilations:
    """What :func:`count_compilations` saw: ``count`` XLA compilations (programs not
    found in the persistent cache), ``cache_hits`` programs read from it, and
    ``seconds`` spent in both. JAX reports a cache read as a backend-compile event
    too (measured: 30 events for 30 hits on a warm cache), so ``count`` is the events
    minus the hits."""

    events: int = 0
    seconds: float = 0.0
    cache_hits: int = 0

    @property
    def count(self) -> int:
        return max(self.events - self.cache_hits, 0)


@contextlib.contextmanager
def count_compilations():
    """``with count_compilations() as c: ...`` then ``c.count``, ``c.seconds``,
    ``c.cache_hits``. Counts every thread's compilations while the block runs."""
    out = Compilations()

    def on_duration(name, secs, **_):
        if name == BACKEND_COMPILE:
            out.events += 1
            out.seconds += float(secs)

    def on_event(name, **_):
        if name == CACHE_HIT:
            out.cache_hits += 1

    monitoring.register_event_duration_secs_listener(on_duration)
    monitoring.register_event_listener(on_event)
    try:
        yield out
    finally:
        monitoring.unregister_event_duration_listener(on_duration)
        monitoring.unregister_event_listener(on_event)


def enable_compilation_cache(cache_dir: str) -> str:
    """Persistent XLA compilation cache under ``cache_dir`` (created), for all programs.

    Sets ``jax_compilation_cache_dir`` and makes every program eligible
    (``jax_persistent_cache_min_compile_time_secs = 0``,
    ``jax_persistent_cache_min_entry_size_bytes = 0``; JAX's defaults skip programs
    that compile in under a second, which are most of a small study's). Returns the
    absolute directory. Programs are keyed by their HLO, backend and JAX version, so a
    changed model, shape or option compiles anew and nothing stale is reused.
    """
    if not isinstance(cache_dir, (str, os.PathLike)) or not str(cache_dir):
        raise ValueError(f"cache_dir must be a non-empty path, got {cache_dir!r}.")
    path = os.path.abspath(os.fspath(cache_dir))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
