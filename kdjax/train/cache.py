"""One on-disk cache of pytrees keyed by a config hash (teachers, SimCLR encoders, ...).

Layout of an entry ``name`` (e.g. ``teacher_<config_hash>``) under ``cache_dir`` -- the
layout of the teacher cache of earlier revisions, so entries cached before stay valid::

    <cache_dir>/<name>/            orbax checkpoint of the pytree (StandardCheckpointer)
    <cache_dir>/<name>_meta.json   JSON metadata, written last (atomically): its presence
                                   is what commits the entry
    <cache_dir>/<name>.ckpt/       training checkpoints of the run that builds the entry
                                   (:func:`checkpoint_dir`; removed once it is cached)

API (everything a driver needs; :func:`kdjax.train.teacher.get_teacher` is built on it):

``get_or_build(cache_dir, name, template, build, *, what)``
    The entry if it is cached and readable, else ``build(ckpt_dir) -> (tree, meta)``,
    saved, then returned. Returns ``(tree, meta)`` with ``meta["cached"]`` telling which.
    ``build`` should resume from ``ckpt_dir`` (pass ``Checkpointer(ckpt_dir)`` to
    :func:`kdjax.train.fit`), so a killed build continues where it stopped. The cache
    directory is checked for writability before ``build`` runs.
``load(cache_dir, name, template)``
    ``(tree, meta)`` or ``None`` on a miss. A *corrupt* entry -- unreadable or truncated
    meta JSON, an orbax directory that does not restore (truncated ``_METADATA``, garbled
    OCDBT data, arrays that do not fit ``template``), or non-finite arrays -- is moved
    aside (``<path>.corrupt-<n>``, :func:`kdjax.train.checkpoint.move_aside`) with a
    :class:`CacheWarning` naming the paths, and counts as a miss (the caller retrains).
``save(cache_dir, name, tree, meta, *, what)``
    Writes an entry. A tree with NaN/Inf entries is never cached: :class:`NonFiniteError`
    naming ``what`` (the config) and the offending leaves.
``ensure_writable(directory, need_bytes=0)``
    Fails fast with :class:`NotWritableError` (an ``OSError``) naming the path when the
    directory cannot be created, is not writable (``os.access`` and a probe file), or
    has less than ``need_bytes`` free. orbax itself stalls for minutes (a 300 s barrier
    timeout) before failing a save into such a directory.
``nonfinite_leaves(tree)``
    ``[(leaf path, number of NaN/Inf entries)]`` of a pytree, ``[]`` when all finite.

Example (as :func:`kdjax.recipes.simclr.cached_encoder` caches a SimCLR teacher)::

    from kdjax.train import cache
    def build(ckpt_dir):
        state = trainer.fit(..., checkpointer=Checkpointer(ckpt_dir))
        return encoder_variables(state), {"config": tc, "losses": losses}
    variables, meta = cache.get_or_build(cfg.cache_dir, f"teacher_simclr_{key}",
                                         template, build, what=f"SimCLR teacher {key}")
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from typing import Any, Callable

import jax
import numpy as np

from kdjax._io import atomic_write_text, run_metadata
from kdjax.train.checkpoint import (NotWritableError, ensure_writable, load_pytree,
                                    move_aside, save_pytree)

__all__ = ["CacheWarning", "NonFiniteError", "NotWritableError", "checkpoint_dir",
           "ensure_writable", "entry_paths", "get_or_build", "load", "nonfinite_leaves",
           "save"]


class CacheWarning(UserWarning):
    """A cache entry was unreadable and has been set aside."""


class NonFiniteError(ValueError):
    """A result with NaN/Inf entries was about to be cached (a diverged run)."""


def entry_paths(cache_dir: str, name: str) -> tuple[str, str]:
    """``(tree directory, meta json path)`` of the entry ``name``."""
    tree_path = os.path.join(os.path.abspath(cache_dir), name)
    return tree_path, tree_path + "_meta.json"


def checkpoint_dir(cache_dir: str, name: str) -> str:
    """Where the run that builds entry ``name`` keeps its resumable checkpoints."""
    return os.path.join(os.path.abspath(cache_dir), name + ".ckpt")


def nonfinite_leaves(tree: Any) -> list[tuple[str, int]]:
    """``[(keystr path, NaN/Inf count)]`` over the floating leaves of ``tree``."""
    bad = []
    for kp, leaf in jax.tree_util.tree_leaves_with_path(tree):
        a = np.asarray(leaf)
        if np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.complexfloating):
            n = int(a.size - np.isfinite(a).sum())
            if n:
                bad.append((jax.tree_util.keystr(kp), n))
    return bad


def _shape_mismatch(tree: Any, template: Any) -> str:
    """'' when ``tree`` has the structure and leaf shapes of ``template``."""
    if template is None:
        return ""
    if jax.tree_util.tree_structure(tree) != jax.tree_util.tree_structure(template):
        return "a different tree structure"
    for (kp, a), b in zip(jax.tree_util.tree_leaves_with_path(tree),
                          jax.tree_util.tree_leaves(template)):
        if np.shape(a) != np.shape(b):
            return (f"{jax.tree_util.keystr(kp)} has shape {np.shape(a)}, expected "
                    f"{np.shape(b)}")
    return ""


def _set_aside(tree_path: str, meta_path: str, reason: str) -> None:
    moved = [f"{p} -> {move_aside(p)}" for p in (meta_path, tree_path)
             if os.path.lexists(p)]
    warnings.warn(f"cache entry {tree_path} is unreadable ({reason}); set aside "
                  f"({'; '.join(moved)}) and rebuilding it.", CacheWarning, stacklevel=3)


def load(cache_dir: str, name: str, template: Any | None = None):
    """``(tree, meta)`` of a cached entry, or ``None`` (miss, or corrupt: set aside)."""
    tree_path, meta_path = entry_paths(cache_dir, name)
    if not os.path.exists(meta_path):
        return None           # never committed (or killed before the meta was written)
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
    except (OSError, ValueError) as e:       # JSONDecodeError and UnicodeDecodeError
        _set_aside(tree_path, meta_path, f"{meta_path}: {type(e).__name__}: {e}")
        return None
    if not os.path.isdir(tree_path):
        _set_aside(tree_path, meta_path, f"{tree_path} is missing")
        return None
    try:
        tree = load_pytree(tree_path, template)
    except Exception as e:  # noqa: BLE001 - any orbax read failure means "corrupt"
        _set_aside(tree_path, meta_path, f"{type(e).__name__}: {str(e)[:300]}")
        return None
    mismatch = _shape_mismatch(tree, template)
    if mismatch:      # orbax restores the stored shapes, whatever the template says
        _set_aside(tree_path, meta_path, f"does not fit the template: {mismatch}")
        return None
    bad = nonfinite_leaves(tree)
    if bad:
        _set_aside(tree_path, meta_path, f"non-finite arrays {bad[:3]}")
        return None
    return tree, meta


def save(cache_dir: str, name: str, tree: Any, meta: dict, *, what: str) -> None:
    """Writes the entry ``name``: the tree (orbax, atomic rename), then ``meta`` (atomic).

    Raises :class:`NonFiniteError` (nothing written) when ``tree`` has NaN/Inf entries,
    and :class:`NotWritableError` when ``cache_dir`` cannot be written.
    """
    bad = nonfinite_leaves(tree)
    if bad:
        raise NonFiniteError(f"{what}: refusing to cache a non-finite result (NaN/Inf in "
                             f"{len(bad)} arrays, e.g. {bad[:3]}); the run diverged: lower "
                             f"the learning rate or check the inputs.")
    ensure_writable(cache_dir)
    tree_path, meta_path = entry_paths(cache_dir, name)
    save_pytree(tree_path, tree)
    atomic_write_text(meta_path, json.dumps(meta, indent=2, default=str))


def get_or_build(cache_dir: str, name: str, template: Any,
                 build: Callable[[str], tuple[Any, dict]], *, what: str,
                 need_bytes: int = 0):
    """The cached entry ``name``, or ``build(checkpoint_dir)``'s result, saved.

    Returns ``(tree, meta)``; ``meta["cached"]`` is True for a hit. On a build the
    run metadata (:func:`kdjax._io.run_metadata`) is added to the saved meta, and the
    build's checkpoint directory is removed once the entry is committed.
    """
    hit = load(cache_dir, name, template)
    if hit is not None:
        return hit[0], {**hit[1], "cached": True}
    ensure_writable(cache_dir, need_bytes)
    ckpt = checkpoint_dir(cache_dir, name)
    tree, meta = build(ckpt)
    tree = jax.device_get(tree)
    meta = {**meta, **run_metadata()}
    save(cache_dir, name, tree, meta, what=what)
    shutil.rmtree(ckpt, ignore_errors=True)
    return tree, {**meta, "cached": False}
