"""Data pruning scores and subsets (pruning before distillation, ShiftKD Sec. 5).

* :func:`el2n_scores`: EL2N (Paul et al. 2021, "Deep Learning on a Data Diet", Eq. 2):
  ``chi_i = E_w || softmax(f_w(x_i)) - onehot(y_i) ||_2``, the mean over the leading
  (model / seed) axis of the logits when there is one.
* :func:`grand_scores`: GraNd (ibid., Eq. 1): ``chi_i = E_w || grad_w l(f_w(x_i),
  y_i) ||_2`` with ``l`` the cross-entropy, per-example gradients by ``vmap(grad)``
  over chunks of examples, the mean over a list of parameter sets.
* :func:`random_scores`: i.i.d. uniform scores (the random-pruning baseline).
* :func:`keep_indices`: the ``keep`` fraction with the *highest* scores (the paper keeps
  the hardest examples), optionally per class (``labels``) so the class balance stays.

Reference-code defaults: the paper scores with networks after a few epochs of training
(EL2N at epoch 20 of 200, over 10 seeds); callers pass whatever models they have (the
shift study uses its trained teacher: a documented deviation).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax._checks import check_float_array, check_labels

__all__ = ["el2n_scores", "grand_scores", "random_scores", "keep_indices", "SCORES"]

SCORES = ("random", "el2n", "grand")


def el2n_scores(logits, labels) -> np.ndarray:
    """EL2N scores ``[N]`` from logits ``[N, C]`` or ``[S, N, C]`` (mean over S)."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim == 2:
        logits = logits[None]
    check_float_array(logits, "logits", ndim=3)
    labels = np.asarray(labels)
    check_labels(labels, "labels", logits.shape[-1], batch=logits.shape[1])
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    err = p - np.eye(logits.shape[-1])[labels][None]
    return np.linalg.norm(err, axis=-1).mean(0)


def grand_scores(apply_fn: Callable, params_list: Sequence, x, labels, *,
                 chunk: int = 256) -> np.ndarray:
    """GraNd scores ``[N]``: mean over ``params_list`` of the L2 norm of each example's
    cross-entropy gradient w.r.t. all parameters; ``apply_fn(params, x) -> logits``."""
    x, labels = np.asarray(x), np.asarray(labels)
    if len(x) != len(labels):
        raise ValueError(f"x and labels must have the same length, got {len(x)} and "
                         f"{len(labels)}.")
    if not len(params_list):
        raise ValueError("params_list must hold at least one parameter set.")

    def loss(p, xi, yi):
        logits = apply_fn(p, xi[None]).astype(jnp.float32)
        return -jax.nn.log_softmax(logits)[0, yi]

    def norms(p, xb, yb):
        g = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(p, xb, yb)
        sq = sum(jnp.sum(leaf.reshape(leaf.shape[0], -1) ** 2, -1)
                 for leaf in jax.tree_util.tree_leaves(g))
        return jnp.sqrt(sq)

    norms = jax.jit(norms)
    total = np.zeros(len(x))
    for p in params_list:
        for i in range(0, len(x), chunk):
            xb, yb = x[i:i + chunk], labels[i:i + chunk]
            pad = chunk - len(xb)  # fixed shapes: one compilation
            if pad:
                xb = np.concatenate([xb, np.repeat(xb[:1], pad, 0)])
                yb = np.concatenate([yb, np.repeat(yb[:1], pad, 0)])
            total[i:i + chunk - pad] += np.asarray(norms(p, xb, yb))[:chunk - pad]
    return total / len(params_list)


def random_scores(n: int, seed: int) -> np.ndarray:
    """``n`` i.i.d. uniform scores from ``seed`` (random pruning)."""
    return np.random.default_rng([int(seed), 17]).random(int(n))


def keep_indices(scores, keep: float, labels=None) -> np.ndarray:
    """Sorted indices of the ``ceil(keep * N)`` highest scores (per class with
    ``labels``: ``ceil(keep * N_c)`` in each class). Ties keep the lower index."""
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must have shape [N], got {scores.shape}.")
    if not 0.0 < float(keep) <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep!r}.")
    groups = [np.arange(len(scores))] if labels is None else \
        [np.flatnonzero(np.asarray(labels) == c) for c in np.unique(labels)]
    out = []
    for idx in groups:
        k = int(np.ceil(keep * len(idx)))
        order = np.lexsort((idx, -scores[idx]))  # by score desc, then index asc
        out.append(idx[order[:k]])
    return np.sort(np.concatenate(out))
