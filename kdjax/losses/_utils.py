"""Helpers shared by kdjax losses: reduction (per-example values -> scalar), weights as
multiplicities, L2 normalisation."""

from __future__ import annotations

import jax.numpy as jnp

from kdjax._checks import check_choice, check_weights

__all__ = ["REDUCTIONS", "reduce_per_example", "multiplicities", "l2_normalize"]

REDUCTIONS = ("mean", "sum", "none")


def reduce_per_example(values: jnp.ndarray, weights=None, reduction: str = "mean"):
    """Reduces per-example loss values ``[B]`` with optional sample weights ``[B]``.

    ``mean``: ``(1/B) * sum_i w_i * l_i`` (``w_i = 1`` when ``weights`` is None). This is
    KD-AIF's weighted loss (arXiv 2501.02705), so influence weights normalised to mean 1
    leave the loss scale unchanged. It is deliberately *not* ``sum(w l) / sum(w)``:
    renormalising per batch would undo down-weighting of a batch of bad points.
    ``sum``: ``sum_i w_i l_i``. ``none``: the vector ``w_i l_i``.
    The result is returned in float32 (losses are accumulated in float32 for bf16 inputs).
    """
    check_choice(reduction, "reduction", REDUCTIONS)
    values = values.astype(jnp.float32)
    if weights is not None:
        check_weights(weights, "weights", values.shape[0])
        values = values * weights.astype(jnp.float32)
    if reduction == "mean":
        return jnp.mean(values)
    if reduction == "sum":
        return jnp.sum(values)
    return values


def multiplicities(weights, batch: int, name: str = "weights") -> jnp.ndarray:
    """Weights of a batch-coupled loss as example multiplicities, float32 ``[batch]``.

    ``None`` gives ones (the unweighted loss). Batch-coupled losses (relation and
    similarity losses, DIST) define their weighted value as the loss of the batch in
    which example ``i`` appears ``w_i`` times (exact for integer ``w``, extended to real
    ``w >= 0``): every sum over examples ``sum_i`` becomes ``sum_i w_i``, every pair sum
    ``sum_ij`` becomes ``sum_ij w_i w_j``, and the batch size ``B`` becomes
    ``sum_i w_i``. Weights normalised to mean 1 (KD-AIF's) keep the batch size ``B``,
    and then per-example means agree with :func:`reduce_per_example`.
    """
    if weights is None:
        return jnp.ones((batch,), jnp.float32)
    check_weights(weights, name, batch)
    return jnp.asarray(weights).astype(jnp.float32)


def l2_normalize(x: jnp.ndarray, axis: int = -1, eps: float = 1e-12) -> jnp.ndarray:
    """``x / max(||x||, eps)`` along ``axis`` (torch ``F.normalize``, whose default eps
    the reference codes use); finite gradient at ``x = 0``."""
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    ok = sq > eps * eps
    norm = jnp.where(ok, jnp.sqrt(jnp.where(ok, sq, 1.0)), eps)
    return x / norm
