r"""Faithful KD: teacher-student discrepancy, its lower (PGD) and upper (IBP/CROWN) bounds.

kdjax's formalism of "faithful" distillation (METHODS.md section 5, after arXiv
2306.04431, whose body we could not read; the definitions below are kdjax's):

* ``y = argmax z^T(x)`` is the teacher's label at the clean point ``x``; ``p = softmax(z)``.
* Ball ``B(x) = {x' : ||x' - x||_inf <= eps} ∩ [lo, hi]`` (the data range, ``clip``).
* Confidence gap ``Delta(x) = max_{x' in B(x)} |p^S_y(x') - p^T_y(x')|``; signed versions
  ``over`` (``p^S_y - p^T_y``, student over-confident) and ``under`` (``p^T_y - p^S_y``).
  ``x`` is ``(eps, delta)``-faithful iff ``Delta(x) <= delta``.
* Label disagreement in the ball: some ``x'`` where ``argmax z^S(x') != y``; its margin
  ``max_{j != y} z^S_j(x') - z^S_y(x')`` (``> 0`` means disagreement).

Bounds (every input satisfies ``sampled <= PGD <= certified``; all are 0 when the student
is the teacher):

* lower: :func:`sampled_gap` (random points), :func:`pgd_gap` (PGD with restarts);
* upper: :func:`margin_bounds` (IBP or CROWN of the *joint* function
  ``x -> (z^T, z^S)`` with specifications on margins ``z_y - z_j`` within each network and
  on their cross-network difference), then :func:`gap_upper_bound` (softmax bounds) and
  :func:`certify`.

Training pieces: :func:`faithful_penalty` (PGD gap and/or certified bound),
:func:`eps_ramp`, :func:`adversarial_distillation_inputs`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax._checks import (
    check_choice,
    check_float_array,
    check_labels,
    check_nonnegative,
    check_positive,
    check_same_shape,
    check_weights,
    is_concrete,
)
from kdjax.faithful.bounds import crown_bounds, ibp_bounds
from kdjax.losses._utils import reduce_per_example
from kdjax.losses.logit import kl_to_teacher

__all__ = [
    "teacher_labels",
    "confidence_gap",
    "label_disagreement",
    "disagreement_margin",
    "relative_ece",
    "relative_calibration",
    "gap_objective",
    "sampled_gap",
    "pgd_gap",
    "MarginBounds",
    "margin_bounds",
    "probability_bounds",
    "gap_upper_bound",
    "certify",
    "faithful_penalty",
    "eps_ramp",
    "adversarial_distillation_inputs",
]

_OBJECTIVES = ("gap", "over", "under", "disagree")


# ------------------------------------------------------------------------- metrics


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
    check_choice(objective, "objective", _OBJECTIVES)
    if objective == "disagree":
        return disagreement_margin(student_logits, labels)
    kind = "abs" if objective == "gap" else objective
    return confidence_gap(student_logits, teacher_logits, kind=kind, labels=labels)


# --------------------------------------------------------------------- lower bounds


def _check_ball(x, eps, clip):
    check_float_array(x, "x", min_ndim=2)
    if np.ndim(eps) != 0:
        raise ValueError(f"eps must be a scalar, got shape {np.shape(eps)}.")
    check_nonnegative(eps, "eps")
    if clip is not None:
        if not isinstance(clip, (tuple, list)) or len(clip) != 2:
            raise ValueError(f"clip must be None or a pair (lo, hi), got {clip!r}.")
        if is_concrete(clip[0]) and is_concrete(clip[1]) and \
                np.any(np.asarray(clip[0]) >= np.asarray(clip[1])):
            raise ValueError(f"clip must satisfy lo < hi, got {clip!r}.")


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


def _project(xa, x, eps, clip):
    xa = jnp.clip(xa, x - eps, x + eps)
    if clip is not None:
        xa = jnp.clip(xa, clip[0], clip[1])
    return xa


def _random_in_ball(key, x, eps, clip):
    return _project(x + jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * eps,
                    x, eps, clip)


def sampled_gap(teacher_fn: Callable, student_fn: Callable, x: chex.Array, *,
                eps: chex.Numeric, num_samples: int, key: chex.PRNGKey, clip=None,
                objective: str = "gap", labels: chex.Array | None = None):
    """Max of :func:`gap_objective` over ``x`` and ``num_samples`` uniform points of the
    ball (a weak lower bound, the baseline PGD must beat); returns ``(value [B],
    argmax points [B, ...])``. ``labels`` default: the teacher's labels at ``x``."""
    _check_ball(x, eps, clip)
    _check_fns(teacher_fn, student_fn, x)
    check_choice(objective, "objective", _OBJECTIVES)
    y = labels if labels is not None else teacher_labels(teacher_fn(x))

    def val(xp):
        return gap_objective(student_fn(xp), teacher_fn(xp), y, objective)

    def body(carry, k):
        best, bx = carry
        xp = _random_in_ball(k, x, eps, clip)
        v = val(xp)
        better = v > best
        return (jnp.where(better, v, best), _where_b(better, xp, bx)), None

    init = (val(x), x)
    (best, bx), _ = jax.lax.scan(body, init, jax.random.split(key, num_samples))
    return best, bx


def _where_b(mask, a, b):
    return jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)


def pgd_gap(teacher_fn: Callable, student_fn: Callable, x: chex.Array, *,
            eps: chex.Numeric, steps: int = 20, step_size: chex.Numeric | None = None,
            restarts: int = 1, key: chex.PRNGKey, clip=None, objective: str = "gap",
            labels: chex.Array | None = None):
    r"""L-inf PGD lower bound on the teacher-student gap over the ball (per example).

    Maximises ``obj(x') =`` :func:`gap_objective` (``|p^S_y - p^T_y|``, ``p^S_y - p^T_y``,
    ``p^T_y - p^S_y`` or the disagreement margin ``max_{j != y} z^S_j - z^S_y``) with
    ``y`` the teacher's label at the clean ``x``, by sign-gradient ascent (Madry et al.
    2018, Eq. 2): ``x' <- Proj_B(x' + step_size * sign(grad obj(x')))``, projecting onto
    the ball intersected with ``clip``. Each restart starts at a uniform random point of
    the ball; the best value over the clean point, every iterate and every restart is kept
    per example, so the result is a valid *lower* bound on ``max_{x' in B} obj(x')``
    and at least the value at ``x``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from kdjax.faithful import pgd_gap
      >>> f = lambda x: jnp.concatenate([x, -x], axis=1)
      >>> v, _ = pgd_gap(f, f, jnp.zeros((2, 1)), eps=0.1, steps=3, key=jax.random.key(0))
      >>> v.tolist()
      [0.0, 0.0]

    Args:
      teacher_fn, student_fn: ``x -> logits [B, K]`` (e.g.
        ``lambda x: model.apply(variables, x, train=False)[0]``).
      x: ``[B, ...]`` clean inputs.
      eps: L-inf radius ``>= 0``.
      steps: PGD steps per restart (static).
      step_size: default ``2.5 * eps / steps`` (Madry et al.).
      restarts: number of random restarts (static, ``>= 1``).
      key: PRNG key for the random starts.
      clip: optional data range ``(lo, hi)``.
      objective: ``"gap"``, ``"over"``, ``"under"`` or ``"disagree"``.
      labels: optional ``[B]`` labels replacing the teacher's labels at ``x``.

    Returns:
      ``(best_value [B] float32, best_inputs [B, ...])``.
    """
    _check_ball(x, eps, clip)
    num_classes = _check_fns(teacher_fn, student_fn, x)
    check_choice(objective, "objective", _OBJECTIVES)
    for name, v in (("steps", steps), ("restarts", restarts)):
        if not isinstance(v, int) or v < (0 if name == "steps" else 1):
            raise ValueError(f"{name} must be an int >= {0 if name == 'steps' else 1}, "
                             f"got {v!r}.")
    if step_size is None:
        step_size = 2.5 * eps / max(steps, 1)
    else:
        check_nonnegative(step_size, "step_size")
    y = labels if labels is not None else teacher_labels(teacher_fn(x))
    if labels is not None:
        check_labels(labels, "labels", num_classes, batch=x.shape[0])

    def obj(xp):
        return gap_objective(student_fn(xp), teacher_fn(xp), y, objective)

    def summed(xp):
        v = obj(xp)
        return jnp.sum(v), v

    grad_fn = jax.grad(summed, has_aux=True)

    def step(carry, _):
        xa, best, bx = carry
        g, v = grad_fn(xa)
        better = v > best
        best, bx = jnp.where(better, v, best), _where_b(better, xa, bx)
        xa = _project(xa + step_size * jnp.sign(g), x, eps, clip)
        return (xa, best, bx), None

    def restart(carry, k):
        best, bx = carry
        xa = _random_in_ball(k, x, eps, clip)
        (xa, best, bx), _ = jax.lax.scan(step, (xa, best, bx), None, length=steps)
        v = obj(xa)
        better = v > best
        return (jnp.where(better, v, best), _where_b(better, xa, bx)), None

    (best, bx), _ = jax.lax.scan(restart, (obj(x), x), jax.random.split(key, restarts))
    return best, bx


# --------------------------------------------------------------------- upper bounds


class MarginBounds(NamedTuple):
    """Bounds on logit margins over the ball, each ``[B, K]`` (column ``y`` is 0).

    ``teacher_*``: ``z^T_y - z^T_j``; ``student_*``: ``z^S_y - z^S_j``; ``cross_*``:
    ``(z^S_y - z^S_j) - (z^T_y - z^T_j)`` (joint bound; ``None`` if not available).
    """
    labels: chex.Array
    teacher_lower: chex.Array
    teacher_upper: chex.Array
    student_lower: chex.Array
    student_upper: chex.Array
    cross_lower: chex.Array | None = None
    cross_upper: chex.Array | None = None


def _margin_specs(labels, k):
    """``[B, 3K, 2K]`` specs on the joint output ``(z^T, z^S)``: teacher margins,
    student margins and their difference (student minus teacher)."""
    e_y = jax.nn.one_hot(labels, k, dtype=jnp.float32)[:, None, :]      # [B, 1, K]
    diff = e_y - jnp.eye(k, dtype=jnp.float32)[None]                      # [B, K, K]
    zero = jnp.zeros_like(diff)
    teacher = jnp.concatenate([diff, zero], axis=-1)
    student = jnp.concatenate([zero, diff], axis=-1)
    return jnp.concatenate([teacher, student, student - teacher], axis=1)


def margin_bounds(teacher_fn: Callable, student_fn: Callable, x: chex.Array, *,
                  eps: chex.Numeric, method: str = "crown", clip=None,
                  labels: chex.Array | None = None,
                  batch_chunk: int | None = None) -> MarginBounds:
    r"""Certified bounds on the logit margins of both networks over the ball.

    Bounds the joint function ``x -> (z^T(x), z^S(x))`` with a specification of ``3K``
    rows per example: ``z^T_y - z^T_j``, ``z^S_y - z^S_j`` and their difference
    ``(z^S_y - z^S_j) - (z^T_y - z^T_j)`` (the cross-network bound is what makes the gap
    bound 0 for identical networks; CROWN tightens it further by relaxing both networks
    in one backward pass). ``method``: ``"ibp"`` (:func:`kdjax.faithful.bounds.ibp_bounds` with the
    affine tail folded into the specification), ``"crown-ibp"`` or ``"crown"``
    (:func:`kdjax.faithful.bounds.crown_bounds` with IBP or CROWN intermediate bounds).

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.faithful import margin_bounds
      >>> f = lambda x: jnp.concatenate([x, -x], axis=1)
      >>> mb = margin_bounds(f, f, jnp.ones((1, 1)), eps=0.5, method="ibp")
      >>> mb.teacher_lower.tolist(), mb.cross_upper.tolist()
      ([[0.0, 1.0]], [[0.0, 0.0]])

    Args:
      teacher_fn, student_fn: ``x -> logits [B, K]`` made of operations supported by
        :mod:`kdjax.faithful.bounds`.
      x: ``[B, ...]`` clean inputs; eps: radius ``>= 0``; clip: data range.
      method: ``"crown"`` (default), ``"crown-ibp"`` or ``"ibp"``.
      labels: optional ``[B]`` labels (default: the teacher's labels at ``x``).
      batch_chunk: see :func:`kdjax.faithful.bounds.ibp_bounds`.

    Returns:
      :class:`MarginBounds`.
    """
    _check_ball(x, eps, clip)
    k = _check_fns(teacher_fn, student_fn, x)
    check_choice(method, "method", ("ibp", "crown-ibp", "crown"))
    y = labels if labels is not None else teacher_labels(teacher_fn(x))
    if labels is not None:
        check_labels(labels, "labels", k, batch=x.shape[0])
    joint = lambda xp: jnp.concatenate([teacher_fn(xp), student_fn(xp)], axis=-1)  # noqa
    spec = _margin_specs(y, k)
    if method == "ibp":
        lo, up = ibp_bounds(joint, x, eps, clip=clip, C=spec, batch_chunk=batch_chunk)
    else:
        lo, up = crown_bounds(joint, x, eps, clip=clip, C=spec, batch_chunk=batch_chunk,
                              intermediate="crown" if method == "crown" else "ibp")
    ymask = jax.nn.one_hot(y, k, dtype=bool)
    fix = lambda v: jnp.where(ymask, 0.0, v)  # noqa: E731  (exact zeros at j = y)
    return MarginBounds(y, fix(lo[:, :k]), fix(up[:, :k]), fix(lo[:, k:2 * k]),
                        fix(up[:, k:2 * k]), fix(lo[:, 2 * k:]), fix(up[:, 2 * k:]))


def probability_bounds(margin_lower: chex.Array, margin_upper: chex.Array):
    r"""Bounds on ``p_y`` from margin bounds ``l_j <= z_y - z_j <= u_j`` (``[B, K]``,
    column ``y`` equal to 0):

    .. math::
        \frac{1}{1 + \sum_{j\ne y} e^{-l_j}} \le p_y \le \frac{1}{1 + \sum_{j\ne y} e^{-u_j}}

    (``p_y`` is increasing in every margin), computed as ``exp(-logsumexp(-l))``.
    Returns ``(p_lower, p_upper)``, ``[B]`` float32.
    """
    check_float_array(margin_lower, "margin_lower", ndim=2)
    check_float_array(margin_upper, "margin_upper", ndim=2)
    check_same_shape(margin_lower, margin_upper, "margin_lower", "margin_upper")
    f = lambda m: jnp.exp(-jax.nn.logsumexp(-m.astype(jnp.float32), axis=-1))  # noqa
    return f(margin_lower), f(margin_upper)


def gap_upper_bound(bounds: MarginBounds) -> dict[str, chex.Array]:
    r"""Certified upper bounds on the confidence gaps over the ball, from margin bounds.

    With ``[L^T, U^T]``, ``[L^S, U^S]`` the bounds on ``p^T_y``, ``p^S_y``
    (:func:`probability_bounds`), the separate-network bound of METHODS.md is
    ``sup (p^S_y - p^T_y) <= U^S - L^T`` and ``sup (p^T_y - p^S_y) <= U^T - L^S``.
    kdjax adds a joint bound from the cross-margin bounds
    ``dl_j <= (z^S_y - z^S_j) - (z^T_y - z^T_j) <= du_j``: along the segment from the
    teacher's margins ``m^T`` to the student's ``m^S = m^T + d``,
    ``d p_y / d t = sum_j p_y p_j d_j <= p_y (1 - p_y) max_j d_j^+``, so

    .. math::
        p^S_y - p^T_y \le \kappa \max_j (du_j)^+,\qquad
        p^T_y - p^S_y \le \kappa \max_j (-dl_j)^+,

    with ``kappa = max p (1 - p)`` over ``p in [g(min(l^T, l^S)), g(max(u^T, u^S))]``
    (``g`` the softmax of margins; the segment stays in that box). Each signed bound is the
    minimum of the two; the gap bound is their maximum, so it is 0 when the cross bounds
    are 0 (identical networks). A kdjax extension of the paper's formalism.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.faithful import MarginBounds, gap_upper_bound
      >>> z = jnp.array([[0.0, 1.0]])
      >>> mb = MarginBounds(jnp.array([0]), z, z, z, z, 0 * z, 0 * z)
      >>> float(gap_upper_bound(mb)["gap"][0])
      0.0

    Returns:
      dict of ``[B]`` float32: ``over`` (bound on ``max p^S_y - p^T_y``; negative means the
      student is certainly less confident), ``under``, ``gap`` (``max(over, under)``,
      bounds ``Delta``), and the probability bounds ``p_teacher_lower``,
      ``p_teacher_upper``, ``p_student_lower``, ``p_student_upper``.
    """
    if not isinstance(bounds, MarginBounds):
        raise TypeError(f"bounds must be a MarginBounds, got {type(bounds).__name__}.")
    lt, ut = probability_bounds(bounds.teacher_lower, bounds.teacher_upper)
    ls, us = probability_bounds(bounds.student_lower, bounds.student_upper)
    over, under = us - lt, ut - ls
    if bounds.cross_lower is not None and bounds.cross_upper is not None:
        check_same_shape(bounds.cross_lower, bounds.teacher_lower, "cross_lower",
                         "teacher_lower")
        a, _ = probability_bounds(jnp.minimum(bounds.teacher_lower, bounds.student_lower),
                                  jnp.minimum(bounds.teacher_lower, bounds.student_lower))
        _, b = probability_bounds(jnp.maximum(bounds.teacher_upper, bounds.student_upper),
                                  jnp.maximum(bounds.teacher_upper, bounds.student_upper))
        kappa = jnp.where((a <= 0.5) & (b >= 0.5), 0.25,
                          jnp.maximum(a * (1 - a), b * (1 - b)))
        du = jnp.maximum(jnp.max(bounds.cross_upper, axis=-1), 0.0)
        dl = jnp.maximum(jnp.max(-bounds.cross_lower, axis=-1), 0.0)
        over, under = jnp.minimum(over, kappa * du), jnp.minimum(under, kappa * dl)
    return {"gap": jnp.maximum(over, under), "over": over, "under": under,
            "p_teacher_lower": lt, "p_teacher_upper": ut,
            "p_student_lower": ls, "p_student_upper": us}


def certify(teacher_fn: Callable, student_fn: Callable, x: chex.Array, *,
            eps: chex.Numeric, delta: chex.Numeric, method: str = "crown", clip=None,
            labels: chex.Array | None = None,
            batch_chunk: int | None = None) -> dict[str, chex.Array]:
    r"""Which points are certified ``(eps, delta)``-faithful and label-consistent.

    ``faithful``: the certified bound on ``Delta(x)`` (:func:`gap_upper_bound`) is
    ``<= delta``. ``agree``: the teacher's label ``y`` at ``x`` is the student's argmax
    over the whole ball, certified by ``min_{j != y} lower(z^S_y - z^S_j) > 0``.
    With ground-truth ``labels``, ``teacher_correct`` marks the points the teacher gets
    right (the points the faithfulness report is about).

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.faithful import certify
      >>> f = lambda x: jnp.concatenate([x, -x], axis=1)
      >>> out = certify(f, f, jnp.ones((1, 1)), eps=0.5, delta=0.0, method="ibp")
      >>> bool(out["faithful"][0]), bool(out["agree"][0])
      (True, True)

    Returns:
      dict of ``[B]`` arrays: ``faithful``, ``agree`` (bool), ``gap_upper``,
      ``over_upper``, ``under_upper`` (float32), ``teacher_labels`` and, with ``labels``,
      ``teacher_correct``.
    """
    check_nonnegative(delta, "delta")
    mb = margin_bounds(teacher_fn, student_fn, x, eps=eps, method=method, clip=clip,
                       batch_chunk=batch_chunk)
    ub = gap_upper_bound(mb)
    k = mb.student_lower.shape[-1]
    ymask = jax.nn.one_hot(mb.labels, k, dtype=bool)
    min_margin = jnp.min(jnp.where(ymask, jnp.inf, mb.student_lower), axis=-1)
    out = {"faithful": ub["gap"] <= delta, "agree": min_margin > 0,
           "gap_upper": ub["gap"], "over_upper": ub["over"], "under_upper": ub["under"],
           "teacher_labels": mb.labels}
    if labels is not None:
        check_labels(labels, "labels", k, batch=x.shape[0])
        out["teacher_correct"] = mb.labels == labels
    return out


# ------------------------------------------------------------------------- training


def eps_ramp(eps: float, *, ramp_steps: int, warmup_steps: int = 0) -> optax.Schedule:
    r"""Radius schedule for certified training: 0 for ``warmup_steps``, then linear up to
    ``eps`` over ``ramp_steps``, then constant (Gowal et al. 2018, sec. 4; Zhang et al.
    2020, sec. 4). An :func:`optax.linear_schedule`; call it with the step (jit-safe).

    Examples:
      >>> from kdjax.faithful import eps_ramp
      >>> s = eps_ramp(0.1, warmup_steps=10, ramp_steps=10)
      >>> [round(float(s(t)), 3) for t in (0, 10, 15, 20, 99)]
      [0.0, 0.0, 0.05, 0.1, 0.1]
    """
    check_nonnegative(eps, "eps")
    if not isinstance(ramp_steps, int) or ramp_steps < 1:
        raise ValueError(f"ramp_steps must be an int >= 1, got {ramp_steps!r}.")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}.")
    return optax.linear_schedule(0.0, eps, ramp_steps, transition_begin=warmup_steps)


def faithful_penalty(teacher_fn: Callable, student_fn: Callable, x: chex.Array, *,
                     eps: chex.Numeric, key: chex.PRNGKey | None = None,
                     adversarial_weight: chex.Numeric = 1.0,
                     certified_weight: chex.Numeric = 0.0, objective: str = "gap",
                     steps: int = 10, step_size: chex.Numeric | None = None,
                     restarts: int = 1, bound: str = "ibp", clip=None,
                     weights: chex.Array | None = None,
                     reduction: str = "mean") -> chex.Array:
    r"""Faithful-distillation regulariser, to add to a KD loss; differentiable in the
    student's parameters (closed over by ``student_fn``).

    .. math::
        R(x) = \lambda\, \mathrm{obj}(x^{adv}) + \mu\, \overline{\mathrm{obj}}(x),

    ``obj`` the ``objective`` (``"gap"`` ``|p^S_y - p^T_y|``, ``"over"``, ``"under"``;
    ``y`` the teacher's label at ``x``), ``x^{adv}`` the :func:`pgd_gap` maximiser
    (treated as a constant: ``stop_gradient``), ``\overline{obj}`` its certified upper
    bound (:func:`gap_upper_bound` of :func:`margin_bounds` with ``bound = "ibp"`` or
    ``"crown-ibp"``, differentiable), ``lambda = adversarial_weight``,
    ``mu = certified_weight``. The teacher is wrapped in ``stop_gradient``. Ramp ``eps``
    with :func:`eps_ramp` for the certified term. kdjax's formulation of the paper's
    faithful distillation (METHODS.md section 5).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from kdjax.faithful import faithful_penalty
      >>> f = lambda x: jnp.concatenate([x, -x], axis=1)
      >>> float(faithful_penalty(f, f, jnp.ones((2, 1)), eps=0.1, key=jax.random.key(0),
      ...                        certified_weight=1.0))
      0.0

    Returns:
      float32 scalar (``[B]`` for ``reduction="none"``), reduced as
      :func:`kdjax.losses.kd`.
    """
    check_choice(objective, "objective", ("gap", "over", "under"))
    check_choice(bound, "bound", ("ibp", "crown-ibp", "crown"))
    _check_ball(x, eps, clip)
    _check_fns(teacher_fn, student_fn, x)
    check_nonnegative(adversarial_weight, "adversarial_weight")
    check_nonnegative(certified_weight, "certified_weight")
    check_weights(weights, "weights", x.shape[0])
    t_fn = lambda xp: jax.lax.stop_gradient(teacher_fn(xp))  # noqa: E731
    y = teacher_labels(t_fn(x))
    total = jnp.zeros((x.shape[0],), jnp.float32)
    use_adv = not (is_concrete(adversarial_weight) and float(adversarial_weight) == 0.0)
    use_cert = not (is_concrete(certified_weight) and float(certified_weight) == 0.0)
    if use_adv:
        if key is None:
            raise ValueError("key must be a PRNG key when adversarial_weight != 0, got None.")
        # the attack needs the teacher's input gradient: no stop_gradient there
        _, x_adv = pgd_gap(teacher_fn, student_fn, x, eps=eps, steps=steps,
                           step_size=step_size,
                           restarts=restarts, key=key, clip=clip, objective=objective,
                           labels=y)
        x_adv = jax.lax.stop_gradient(x_adv)
        total = total + adversarial_weight * gap_objective(student_fn(x_adv), t_fn(x_adv),
                                                           y, objective)
    if use_cert:
        mb = margin_bounds(t_fn, student_fn, x, eps=eps, method=bound, clip=clip, labels=y)
        total = total + certified_weight * gap_upper_bound(mb)[objective]
    return reduce_per_example(total, weights, reduction)


def adversarial_distillation_inputs(teacher_logits: chex.Array, student_fn: Callable,
                                    x: chex.Array, *, eps: chex.Numeric,
                                    key: chex.PRNGKey, steps: int = 10,
                                    step_size: chex.Numeric | None = None,
                                    temperature: chex.Numeric = 1.0, clip=None) -> chex.Array:
    r"""The student's own adversarial inputs for adversarial distillation.

    ``x^{adv} = argmax_{x' in B(x)} KL(p^T(x) || p^S(x'))`` (teacher at the *clean*
    input, ``p = softmax(z / temperature)``) by L-inf PGD from a random start, keeping
    each example's best iterate (Goldblum et al. 2020, "Adversarially Robust
    Distillation", Eq. 2). Train the student to match ``p^T(x)`` at ``x^{adv}``
    (e.g. ``kd(student(x_adv), teacher_logits)``). Returned under ``stop_gradient``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from kdjax.faithful import adversarial_distillation_inputs
      >>> x = jnp.zeros((1, 2))
      >>> xa = adversarial_distillation_inputs(jnp.zeros((1, 2)), lambda v: 3 * v, x,
      ...                                      eps=0.1, key=jax.random.key(0))
      >>> bool(jnp.all(jnp.abs(xa - x) <= 0.1 + 1e-7))
      True
    """
    _check_ball(x, eps, clip)
    check_float_array(teacher_logits, "teacher_logits", ndim=2)
    check_positive(temperature, "temperature")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}.")
    zs = jax.eval_shape(student_fn, x)
    if tuple(zs.shape) != tuple(teacher_logits.shape):
        raise ValueError(f"student_fn(x) and teacher_logits must have the same shape, got "
                         f"{tuple(zs.shape)} for student_fn(x) and {teacher_logits.shape} "
                         f"for teacher_logits.")
    zt = jax.lax.stop_gradient(teacher_logits)
    if step_size is None:
        step_size = 2.5 * eps / max(steps, 1)

    def kl(xp):
        v = kl_to_teacher(student_fn(xp), zt, temperature)
        return jnp.sum(v), v

    grad_fn = jax.grad(kl, has_aux=True)

    def step(carry, _):
        xa, best, bx = carry
        g, v = grad_fn(xa)
        better = v > best
        best, bx = jnp.where(better, v, best), _where_b(better, xa, bx)
        return (_project(xa + step_size * jnp.sign(g), x, eps, clip), best, bx), None

    xa = _random_in_ball(key, x, eps, clip)
    (xa, best, bx), _ = jax.lax.scan(step, (xa, kl(x)[1], x), None, length=steps)
    v = kl(xa)[1]
    return jax.lax.stop_gradient(_where_b(v > best, xa, bx))
