"""Input checks shared by :mod:`kdjax.influence` (private)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kdjax._checks import check_array


def _check_params(params: Any, name: str = "params") -> None:
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError(f"{name} must be a non-empty pytree of arrays, got {params!r}.")
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(
                f"{name}{jax.tree_util.keystr(path)} must be a floating array, got "
                f"{getattr(leaf, 'dtype', type(leaf).__name__)}.")


def _check_like(tree: Any, ref: Any, name: str, ref_name: str = "params") -> None:
    """``tree`` must have ``ref``'s pytree structure and leaf shapes, floating dtype."""
    ts, rs = jax.tree_util.tree_structure(tree), jax.tree_util.tree_structure(ref)
    if ts != rs:
        raise ValueError(
            f"{name} must have the same pytree structure as {ref_name}, got {ts} for "
            f"{name} and {rs} for {ref_name}.")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree),
                            jax.tree_util.tree_leaves(ref)):
        if np.shape(a) != np.shape(b):
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} must have shape {np.shape(b)} like "
                f"{ref_name}, got {np.shape(a)}.")
        if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
            raise TypeError(
                f"{name}{jax.tree_util.keystr(path)} must be floating, got "
                f"{jnp.result_type(a)}.")


def _batch_size(batch: Any, name: str = "batch") -> int:
    leaves = jax.tree_util.tree_leaves_with_path(batch)
    if not leaves:
        raise ValueError(f"{name} must be a non-empty pytree of arrays, got {batch!r}.")
    sizes = {}
    for path, leaf in leaves:
        check_array(leaf, f"{name}{jax.tree_util.keystr(path)}", min_ndim=1)
        sizes[jax.tree_util.keystr(path)] = np.shape(leaf)[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(
            f"every leaf of {name} must have the same leading (example) dimension, got "
            f"{sizes}.")
    return next(iter(sizes.values()))


def _check_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _float_dtype(dtype):
    """At least float32 (bf16 inputs give float32 losses, float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)
