"""Reduction shared by kdjax losses (per-example values -> scalar)."""

from __future__ import annotations

import jax.numpy as jnp

from kdjax._checks import check_choice, check_weights

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
