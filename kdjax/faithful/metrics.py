r"""Faithful KD metrics at points: teacher-student confidence gaps, label disagreement,
relative calibration.

kdjax's formalism of "faithful" distillation (docs/METHODS.md section 5, after arXiv
2306.04431; the definitions are kdjax's): ``y = argmax z^T(x)`` is the teacher's label at
the clean point, ``p = softmax(z)``, the confidence gap is ``|p^S_y - p^T_y|`` (signed:
``over`` = ``p^S_y - p^T_y``, ``under`` = ``p^T_y - p^S_y``) and the disagreement margin
``max_{j != y} z^S_j - z^S_y``. Over a ball, :mod:`kdjax.faithful.attacks` gives lower
bounds on their maxima and :mod:`kdjax.faithful.certify` upper bounds.
"""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp

from kdjax._checks import check_choice, check_float_array, check_labels, check_same_shape, \
    check_weights

__all__ = [
    "teacher_labels",
    "confidence_gap",
    "label_disagreement",
    "disagreement_margin",
    "relative_ece",
    "relative_calibration",
    "gap_objective",
]

OBJECTIVES = ("gap", "over", "under", "disagree")



def _check_pair(student_logits, teacher_logits):
    check_float_array(student_logits, "student_logits", ndim=2)
    check_float_array(teacher_logits, "teacher_logits", ndim=2)
    check_same_shape(student_logits, teacher_logits, "student_logits", "teacher_logits")
    if student_logits.shape[-1] < 2:
        raise ValueError(f"logits must have >= 2 classes, got shape {student_logits.shape}.")


def teacher_labels(teacher_logits: chex.Array) -> chex.Array:
    """The teacher's label ``y = argmax_j z^T_j``, ``[B]`` int32."""
    check_float_array(teacher_logits, "teacher_logits", ndim=2)
    return jnp.argmax(teacher_logits, axis=-1).astype(jnp.int32)


def _labels_or_teacher(labels, teacher_logits):
    if labels is None:
        return teacher_labels(teacher_logits)
    check_labels(labels, "labels", teacher_logits.shape[-1], batch=teacher_logits.shape[0])
    return labels


def confidence_gap(student_logits: chex.Array, teacher_logits: chex.Array, *,
                   kind: str = "abs", labels: chex.Array | None = None) -> chex.Array:
    r"""Per-example confidence gap at a point, ``[B]`` float32.

    ``abs``: ``|p^S_y - p^T_y|``; ``over``: ``p^S_y - p^T_y``; ``under``:
    ``p^T_y - p^S_y``; ``p = softmax(z)``, ``y`` = ``labels`` or the teacher's argmax.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.faithful import confidence_gap
      >>> z = jnp.array([[2.0, 0.0]])
      >>> float(confidence_gap(z, z)[0])
      0.0

    Args:
      student_logits, teacher_logits: ``[B, K]`` logits.
      kind: ``"abs"`` (default), ``"over"`` or ``"under"``.
      labels: optional ``[B]`` class indices (default: the teacher's labels at these
        logits; pass the clean-point labels when evaluating inside a ball).
    """
    _check_pair(student_logits, teacher_logits)
    check_choice(kind, "kind", ("abs", "over", "under"))
    y = _labels_or_teacher(labels, teacher_logits)
    ps = jnp.take_along_axis(jax.nn.softmax(student_logits.astype(jnp.float32)),
                             y[:, None], axis=1)[:, 0]
    pt = jnp.take_along_axis(jax.nn.softmax(teacher_logits.astype(jnp.float32)),
                             y[:, None], axis=1)[:, 0]
    d = ps - pt
    return {"abs": jnp.abs(d), "over": d, "under": -d}[kind]


def label_disagreement(student_logits: chex.Array, teacher_logits: chex.Array) -> chex.Array:
    """``1[argmax z^S != argmax z^T]`` per example, ``[B]`` float32."""
    _check_pair(student_logits, teacher_logits)
    return (jnp.argmax(student_logits, -1) != jnp.argmax(teacher_logits, -1)).astype(
        jnp.float32)


def disagreement_margin(student_logits: chex.Array, labels: chex.Array) -> chex.Array:
    r"""``max_{j != y} z^S_j - z^S_y`` per example (``> 0``: the student's argmax is not
    ``y``), ``[B]`` float32."""
    check_float_array(student_logits, "student_logits", ndim=2)
    check_labels(labels, "labels", student_logits.shape[-1], batch=student_logits.shape[0])
    z = student_logits.astype(jnp.float32)
    zy = jnp.take_along_axis(z, labels[:, None], axis=1)[:, 0]
    others = jnp.where(jax.nn.one_hot(labels, z.shape[-1], dtype=bool), -jnp.inf, z)
    return jnp.max(others, axis=-1) - zy


def relative_ece(student_logits: chex.Array, teacher_logits: chex.Array, *,
                 num_bins: int = 15, weights: chex.Array | None = None) -> chex.Array:
    r"""Expected calibration error of the student measured against the teacher.

    The student's confidence ``c_i = max_j p^S_j(x_i)`` is binned into ``num_bins`` equal
    bins of ``[0, 1]``; in each bin the student's mean confidence is compared with its
    rate of *agreement with the teacher's label* (instead of accuracy):

    .. math::
        \mathrm{ECE}_{rel} = \sum_b \frac{W_b}{W}\,
        \Big|\overline{1[\hat y^S_i = \hat y^T_i]}_b - \overline{c}_b\Big|

    (``W_b`` the weight in bin ``b``; weights default to 1). 0 when the student's
    confidence equals its probability of agreeing with the teacher. Defined by kdjax
    (Guo et al. 2017's ECE with the teacher's labels as ground truth).

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.faithful import relative_ece
      >>> z = jnp.array([[10.0, -10.0], [-10.0, 10.0]])
      >>> round(float(relative_ece(z, z)), 4)
      0.0

    Args:
      student_logits, teacher_logits: ``[B, K]`` logits.
      num_bins: number of equal-width confidence bins.
      weights: optional ``[B]`` non-negative weights (a mask, e.g. the teacher-correct
        points).

    Returns:
      A float32 scalar in ``[0, 1]`` (0 when the total weight is 0).
    """
    _check_pair(student_logits, teacher_logits)
    if not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive int, got {num_bins!r}.")
    b = student_logits.shape[0]
    check_weights(weights, "weights", b)
    w = jnp.ones((b,), jnp.float32) if weights is None else weights.astype(jnp.float32)
    ps = jax.nn.softmax(student_logits.astype(jnp.float32), axis=-1)
    conf = jnp.max(ps, axis=-1)
    agree = 1.0 - label_disagreement(student_logits, teacher_logits)
    idx = jnp.clip(jnp.floor(conf * num_bins).astype(jnp.int32), 0, num_bins - 1)
    wb = jax.ops.segment_sum(w, idx, num_bins)
    conf_b = jax.ops.segment_sum(w * conf, idx, num_bins)
    agree_b = jax.ops.segment_sum(w * agree, idx, num_bins)
    return jnp.sum(jnp.abs(agree_b - conf_b)) / jnp.maximum(jnp.sum(wb), 1e-12)


def relative_calibration(student_logits: chex.Array, teacher_logits: chex.Array,
                         labels: chex.Array | None = None, *,
                         num_bins: int = 15) -> dict[str, chex.Array]:
    r"""Relative-calibration summary of a student against its teacher, at the points.

    With ground-truth ``labels`` the statistics are over the points the teacher classifies
    correctly (as in the faithfulness definition); otherwise over all points. Keys:
    ``student_confidence``/``teacher_confidence`` (mean ``p^S_y``/``p^T_y``, ``y`` the
    teacher's label), ``gap`` (mean ``|p^S_y - p^T_y|``), ``over``/``under`` (mean
    positive parts of the signed gaps), ``overconfident_rate`` (fraction with
    ``p^S_y > p^T_y``), ``disagreement`` (label disagreement rate), ``relative_ece``
    (:func:`relative_ece`), ``count`` (number of points used).

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.faithful import relative_calibration
      >>> z = jnp.array([[2.0, 0.0], [0.0, 1.0]])
      >>> float(relative_calibration(z, z)["gap"])
      0.0
    """
    _check_pair(student_logits, teacher_logits)
    if labels is None:
        w = jnp.ones((student_logits.shape[0],), jnp.float32)
    else:
        check_labels(labels, "labels", teacher_logits.shape[-1],
                     batch=teacher_logits.shape[0])
        w = (teacher_labels(teacher_logits) == labels).astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1e-12)
    mean = lambda v: jnp.sum(w * v) / n  # noqa: E731
    y = teacher_labels(teacher_logits)
    ps = jnp.take_along_axis(jax.nn.softmax(student_logits.astype(jnp.float32)),
                             y[:, None], 1)[:, 0]
    pt = jnp.take_along_axis(jax.nn.softmax(teacher_logits.astype(jnp.float32)),
                             y[:, None], 1)[:, 0]
    d = ps - pt
    return {
        "student_confidence": mean(ps),
        "teacher_confidence": mean(pt),
        "gap": mean(jnp.abs(d)),
        "over": mean(jnp.maximum(d, 0.0)),
        "under": mean(jnp.maximum(-d, 0.0)),
        "overconfident_rate": mean((d > 0).astype(jnp.float32)),
        "disagreement": mean(label_disagreement(student_logits, teacher_logits)),
        "relative_ece": relative_ece(student_logits, teacher_logits, num_bins=num_bins,
                                     weights=w),
        "count": jnp.sum(w),
    }


def gap_objective(student_logits: chex.Array, teacher_logits: chex.Array,
                  labels: chex.Array, objective: str = "gap") -> chex.Array:
    """Per-example value that :func:`pgd_gap` maximises: ``"gap"``, ``"over"``,
    ``"under"`` (see :func:`confidence_gap`) or ``"disagree"``
    (:func:`disagreement_margin` of the student w.r.t. ``labels``); ``[B]`` float32."""
    check_choice(objective, "objective", OBJECTIVES)
    if objective == "disagree":
        return disagreement_margin(student_logits, labels)
    kind = "abs" if objective == "gap" else objective
    return confidence_gap(student_logits, teacher_logits, kind=kind, labels=labels)


def _check_fns(teacher_fn, student_fn, x):
    for name, fn in (("teacher_fn", teacher_fn), ("student_fn", student_fn)):
        if not callable(fn):
            raise TypeError(f"{name} must be a callable x -> logits, got {type(fn).__name__}.")
    zt = jax.eval_shape(teacher_fn, x)
    zs = jax.eval_shape(student_fn, x)
    for name, z in (("teacher_fn(x)", zt), ("student_fn(x)", zs)):
        if not hasattr(z, "shape") or len(z.shape) != 2 or z.shape[0] != x.shape[0]:
            raise ValueError(f"{name} must return logits of shape [{x.shape[0]}, K], got "
                             f"{getattr(z, 'shape', type(z).__name__)}.")
    if zt.shape != zs.shape:
        raise ValueError(f"teacher_fn(x) and student_fn(x) must have the same shape, got "
                         f"{zt.shape} for teacher_fn(x) and {zs.shape} for student_fn(x).")
    return zt.shape[-1]
