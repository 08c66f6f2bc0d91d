"""Forward passes of trained networks for evaluation: one network, or many seeds at once.

:func:`embed` gives the frozen ``features[feature]`` of one network (batched, optionally
sharded over a mesh). :func:`predict_seeds` / :func:`embed_seeds` run the networks of
``S`` seeds -- their variables stacked on a leading axis (:func:`stack_variables`, or the
state of a vmapped ``fit``) -- as one ``vmap``-ped program, over padded chunks of a fixed
size, so one compilation serves any number of examples.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.train import predict

__all__ = ["embed", "stack_variables", "predict_seeds", "embed_seeds"]


def _check_x(x, name: str = "x") -> np.ndarray:
    x = np.asarray(x)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch [N, ...], got shape {x.shape}.")
    return x


def _check_chunk(chunk) -> None:
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}.")


def embed(module, variables, x, *, feature: str = "pooled", batch_size: int = 512,
          mesh=None) -> np.ndarray:
    """``features[feature]`` of ``module`` in eval mode (``train=False``) on ``x``,
    ``[N, D]`` float32 numpy; batched (and sharded over ``mesh``) like
    :func:`kdjax.train.predict`."""
    x = _check_x(x)

    def apply(xb):
        feats = module.apply(variables, xb, train=False)[1]
        if feature not in feats:
            raise ValueError(f"feature {feature!r} is not an output of the network; "
                             f"valid: {sorted(feats)}.")
        return (feats[feature].astype(jnp.float32),)
    return predict(apply, x, batch_size, mesh)


def stack_variables(trees: Sequence[Any]) -> Any:
    """Stacks the variables of ``S`` networks (same structure) on a new leading axis."""
    trees = list(trees)
    if not trees:
        raise ValueError("stack_variables needs at least one tree.")
    return jax.tree_util.tree_map(lambda *a: np.stack([np.asarray(v) for v in a]), *trees)


@functools.partial(jax.jit, static_argnames=("module", "feature"))
def _apply_seeds(module, variables, xb, feature):
    def one(v):
        logits, feats = module.apply(v, xb, train=False)
        return (logits if feature is None else feats[feature]).astype(jnp.float32)
    return jax.vmap(one)(variables)


def _run_seeds(module, variables, x, feature, chunk):
    x = _check_x(x)
    _check_chunk(chunk)
    leaves = jax.tree_util.tree_leaves(variables)
    if not leaves or any(np.ndim(v) < 1 for v in leaves) or len(
            {np.shape(v)[0] for v in leaves}) != 1:
        raise ValueError("variables must be stacked on one leading seed axis "
                         "(see stack_variables).")
    if feature is not None:
        shapes = jax.eval_shape(lambda v: module.apply(v, x[:1], train=False)[1],
                                jax.tree_util.tree_map(lambda a: a[0], variables))
        if feature not in shapes:
            raise ValueError(f"feature {feature!r} is not an output of the network; "
                             f"valid: {sorted(shapes)}.")
    outs = []
    for i in range(0, len(x), chunk):
        xb = x[i:i + chunk]
        pad = chunk - len(xb)
        if pad:     # a fixed chunk shape: one compilation for any N
            xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
        outs.append(np.asarray(_apply_seeds(module, variables, xb, feature))[:, :chunk - pad])
    return np.concatenate(outs, axis=1)


def predict_seeds(module, variables, x, *, chunk: int = 1024) -> np.ndarray:
    """Logits ``[S, N, C]`` (float32) of ``S`` seeds' networks, ``variables`` stacked on
    a leading axis, in eval mode; one vmapped program over padded chunks of ``chunk``."""
    return _run_seeds(module, variables, x, None, chunk)


def embed_seeds(module, variables, x, *, feature: str = "pooled", chunk: int = 1024
                ) -> np.ndarray:
    """``features[feature]`` ``[S, N, ...]`` (float32) of ``S`` seeds' networks, like
    :func:`predict_seeds`."""
    return _run_seeds(module, variables, x, feature, chunk)
