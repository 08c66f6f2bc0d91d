"""Crash-safe checkpoints (orbax) that step past corrupted steps.

orbax writes each step into a temporary directory and renames it when complete, so a
run killed mid-save leaves the previous steps intact. A step can still be unreadable
afterwards (a truncated file, a disk error, a copy that was cut short).
:meth:`Checkpointer.restore_latest` then *moves that step aside* -- renames
``<dir>/<step>`` to ``<dir>/<step>.corrupt-<n>`` with the first unused ``n`` (never a
name that exists, so earlier set-asides are kept for inspection) -- warns naming both
paths, and tries the next older step. The run continues from the newest readable step,
and since the bad step's name is free again, a later ``save`` of that step number
succeeds (before: ``StepAlreadyExistsError`` on every rerun). When no step is readable
the run starts from scratch.

Saving is synchronous (``wait_until_finished``), so a SIGKILL after ``save`` returns
never loses that step. A directory that cannot be written fails at construction
(:func:`ensure_writable`, :class:`NotWritableError` naming the path) rather than after
the first epoch, where orbax would stall for minutes. :func:`move_aside` is the one helper for setting a damaged file
or directory aside; :mod:`kdjax.train.cache` uses it for cache entries.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "NotWritableError", "ensure_writable", "load_pytree",
           "move_aside", "save_pytree"]


class NotWritableError(OSError):
    """A cache or output directory cannot be written (read-only, not a directory, full)."""


def ensure_writable(directory: str, need_bytes: int = 0) -> str:
    """Creates ``directory`` if needed and proves it writable; returns its absolute path.

    Checks ``os.access(W_OK | X_OK)`` and then writes, fsyncs and removes a probe file
    (``os.access`` alone says yes for root on a read-only directory, and nothing about a
    read-only file system). With ``need_bytes > 0`` the file system must have that much
    free space. Raises :class:`NotWritableError` naming the path otherwise.
    """
    path = os.path.abspath(os.fspath(directory))
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotWritableError(f"{path!r} exists and is not a directory.")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise NotWritableError(e.errno, f"directory {path!r} cannot be created "
                               f"({e.strerror or e}); choose a writable location", path
                               ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise NotWritableError(f"directory {path!r} is not writable (permissions); "
                               f"choose a writable location.")
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write_probe_")
        try:
            os.write(fd, b"kdjax")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        raise NotWritableError(e.errno, f"directory {path!r} is not writable "
                               f"({e.strerror or e}); choose a writable location", path
                               ) from None
    if need_bytes > 0:
        free = shutil.disk_usage(path).free
        if free < need_bytes:
            raise NotWritableError(f"directory {path!r} has {free} bytes free, "
                                   f"{need_bytes} needed; free some space.")
    return path


def move_aside(path: str, suffix: str = "corrupt") -> str:
    """Renames ``path`` to ``<path>.<suffix>-<n>`` (smallest ``n >= 1`` not taken) and
    returns the new path. Never overwrites: an existing set-aside keeps its name."""
    n = 1
    while os.path.lexists(f"{path}.{suffix}-{n}"):
        n += 1
    new = f"{path}.{suffix}-{n}"
    os.rename(path, new)
    return new


class Checkpointer:
    """Keeps the ``max_to_keep`` newest ``(state, meta)`` checkpoints under ``directory``.

    ``state`` is any pytree of arrays (a TrainState); ``meta`` a JSON-able dict (history,
    config, best-so-far metrics). Steps are the directories ``<directory>/<step>``;
    set-aside steps (``<step>.corrupt-<n>``) are not steps and are never deleted.
    """

    def __init__(self, directory: str, max_to_keep: int = 2):
        # fail fast: orbax stalls ~300 s (a barrier timeout) before failing a save into
        # a directory it cannot write
        self.directory = ensure_writable(directory)
        self.max_to_keep = max_to_keep
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=False),
            item_names=("state", "meta"),
        )

    def subdirectory(self, name: str) -> "Checkpointer":
        """A checkpointer in ``<directory>/<name>`` (same ``max_to_keep``), e.g. one per
        seed of a run whose seeds train in turn. ``name`` must not be a step number."""
        if not isinstance(name, str) or not name or name.isdigit() or os.sep in name:
            raise ValueError(f"subdirectory name must be a non-empty, non-numeric name "
                             f"without {os.sep!r}, got {name!r}.")
        return Checkpointer(os.path.join(self.directory, name), self.max_to_keep)

    def save(self, step: int, state: Any, meta: dict | None = None) -> None:
        self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta or {})),
            force=True)
        self._mngr.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def restore_latest(self, template: Any):
        """Returns ``(step, state, meta)`` of the newest readable step, or ``None``.

        ``template`` is a pytree with the target structure, shapes, dtypes and shardings
        (e.g. a freshly initialised state). Each unreadable step is moved aside
        (:func:`move_aside`) with a warning naming the old and new path, then the next
        older step is tried. A step whose arrays do not fit ``template`` (the code or
        config changed under the same directory) is set aside the same way: nothing is
        deleted, and the run restarts rather than crash.
        """
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        for step in reversed(self.steps()):
            try:
                out = self._mngr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
                return step, out["state"], dict(out["meta"] or {})
            except Exception as e:  # noqa: BLE001 - any read failure means "corrupt"
                old = os.path.join(self.directory, str(step))
                new = move_aside(old)
                self._mngr.reload()
                warnings.warn(f"checkpoint step {step} in {self.directory} is unreadable "
                              f"({type(e).__name__}: {str(e)[:300]}); moved {old} aside "
                              f"to {new} and falling back to an earlier step.")
        return None

    def close(self) -> None:
        self._mngr.close()


def save_pytree(path: str, tree: Any) -> None:
    """Saves one pytree (e.g. trained teacher variables) at ``path`` (atomic)."""
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(path), tree, force=True)
    ckptr.wait_until_finished()


def load_pytree(path: str, template: Any | None = None) -> Any:
    """Loads a pytree saved by :func:`save_pytree` (structure from ``template``)."""
    ckptr = ocp.StandardCheckpointer()
    if template is None:
        return ckptr.restore(os.path.abspath(path))
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    return ckptr.restore(os.path.abspath(path), abstract)
