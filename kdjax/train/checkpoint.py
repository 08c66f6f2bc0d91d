"""Crash-safe checkpoints (orbax) with fallback past a corrupted latest step.

orbax writes each step into a temporary directory and renames it when complete, so a
run killed mid-save leaves the previous steps intact. If the newest step is still
unreadable (a truncated file, a disk error), :meth:`Checkpointer.restore_latest` warns
and falls back to the previous step. Saving is synchronous (``wait_until_finished``)
so a SIGKILL after ``save`` returns never loses that step.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "save_pytree", "load_pytree"]


class Checkpointer:
    """Keeps the ``max_to_keep`` newest ``(state, meta)`` checkpoints under ``directory``.

    ``state`` is any pytree of arrays (a TrainState); ``meta`` a JSON-able dict (history,
    config, best-so-far metrics).
    """

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=False),
            item_names=("state", "meta"),
        )

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
        (e.g. a freshly initialised state). Unreadable steps are skipped with a warning.
        """
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        for step in reversed(self.steps()):
            try:
                out = self._mngr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
                return step, out["state"], dict(out["meta"] or {})
            except Exception as e:  # noqa: BLE001 - any read failure means "corrupt"
                warnings.warn(f"checkpoint step {step} in {self.directory} is unreadable "
                              f"({type(e).__name__}: {e}); falling back to an earlier step.")
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
