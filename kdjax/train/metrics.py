"""Evaluation metrics as masked sufficient statistics (so batches can be padded).

Each ``*_stats`` function returns sums over a (possibly padded) batch; :func:`finalize`
turns accumulated sums into metrics. Masked rows contribute nothing, so a padded last
batch is never mis-weighted.

Metrics: accuracy, cross-entropy, teacher-student top-1 agreement, ``KL(p^T || p^S)``
at temperature 1, and expected calibration error (ECE, Guo et al. 2017, equal-width
confidence bins, default 15): ``sum_b (n_b / N) |acc_b - conf_b|``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax.losses.logit import kl_to_teacher

__all__ = ["batch_stats", "finalize", "ece_from_arrays"]


def batch_stats(logits, labels, mask, teacher_logits=None, num_bins: int = 15,
                group=None, num_groups: int = 0):
    """Masked sums for one batch. ``mask`` is 1 for real rows, 0 for padding."""
    logits = logits.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    conf = probs.max(-1)
    pred = probs.argmax(-1)
    correct = (pred == labels).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    bins = jnp.clip((conf * num_bins).astype(jnp.int32), 0, num_bins - 1)
    onehot = jax.nn.one_hot(bins, num_bins) * mask[:, None]
    out = {
        "count": mask.sum(),
        "correct": (correct * mask).sum(),
        "ce": (ce * mask).sum(),
        "bin_count": onehot.sum(0),
        "bin_conf": (onehot * conf[:, None]).sum(0),
        "bin_correct": (onehot * correct[:, None]).sum(0),
    }
    if teacher_logits is not None:
        t_pred = teacher_logits.argmax(-1)
        out["agree"] = ((pred == t_pred).astype(jnp.float32) * mask).sum()
        out["kl"] = (kl_to_teacher(logits, teacher_logits, 1.0) * mask).sum()
    if group is not None and num_groups:
        g = jax.nn.one_hot(group, num_groups) * mask[:, None]
        out["group_count"] = g.sum(0)
        out["group_correct"] = (g * correct[:, None]).sum(0)
    return out


def finalize(stats) -> dict[str, float]:
    """Accumulated sums -> metrics (floats). Worst-group accuracy when groups given."""
    s = {k: np.asarray(v, dtype=np.float64) for k, v in stats.items()}
    n = max(float(s["count"]), 1.0)
    out = {"accuracy": float(s["correct"]) / n, "loss": float(s["ce"]) / n}
    bc = s["bin_count"]
    gaps = np.abs(s["bin_correct"] - s["bin_conf"])  # n_b * |acc_b - conf_b|
    out["ece"] = float(gaps[bc > 0].sum() / n)
    if "agree" in s:
        out["agreement"] = float(s["agree"]) / n
        out["kl_to_teacher"] = float(s["kl"]) / n
    if "group_count" in s:
        gc = s["group_count"]
        accs = s["group_correct"][gc > 0] / gc[gc > 0]
        out["worst_group_accuracy"] = float(accs.min()) if accs.size else float("nan")
        out["average_group_accuracy"] = float(accs.mean()) if accs.size else float("nan")
    return out


def ece_from_arrays(probs: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> float:
    """Reference ECE in NumPy (used by tests and for host-side checks)."""
    conf = probs.max(-1)
    correct = probs.argmax(-1) == labels
    bins = np.clip((conf * num_bins).astype(int), 0, num_bins - 1)
    total = 0.0
    for b in range(num_bins):
        sel = bins == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)
