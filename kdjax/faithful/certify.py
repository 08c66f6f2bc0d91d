r"""Certified (upper) bounds on teacher-student gaps over an L-inf ball, certification,
and the faithful-distillation training pieces.

``B(x) = {x' : ||x' - x||_inf <= eps} ∩ [lo, hi]``. :func:`margin_bounds` bounds the logit
margins of both networks by IBP or CROWN of the *joint* function ``x -> (z^T, z^S)``
(:mod:`kdjax.faithful.bounds`), :func:`gap_upper_bound` turns them into bounds on the
confidence gaps, :func:`certify` decides ``(eps, delta)``-faithfulness; every input
satisfies ``sampled <= PGD <= certified`` (:mod:`kdjax.faithful.attacks` for the lower
bounds). :func:`faithful_penalty` and :func:`eps_ramp` are the training pieces.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from kdjax._checks import check_choice, check_float_array, check_labels, check_nonnegative, \
    check_same_shape, check_weights, is_concrete
from kdjax.faithful.attacks import pgd_gap
from kdjax.faithful.bounds import check_ball, crown_bounds, ibp_bounds
from kdjax.faithful.metrics import _check_fns, gap_objective, teacher_labels
from kdjax.losses._utils import reduce_per_example

__all__ = [
    "BOUND_METHODS",
    "CROWN_METHODS",
    "bounds_by_method",
    "MarginBounds",
    "margin_bounds",
    "probability_bounds",
    "gap_upper_bound",
    "certified_agreement",
    "certify",
    "worst_case_logits",
    "faithful_penalty",
    "eps_ramp",
]



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


#: The bound methods of :func:`bounds_by_method` (and of margin_bounds, certify, ...).
BOUND_METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
#: The linear-relaxation methods among them (everything but IBP).
CROWN_METHODS = BOUND_METHODS[1:]
#: alpha-CROWN's optimisation steps here (auto_LiRPA's default iteration count).
ALPHA_STEPS = 20


def bounds_by_method(fn: Callable, x: chex.Array, eps: chex.Numeric, method: str, *,
                     clip=None, C=None, batch_chunk: int | None = None):
    """``(lower, upper)`` of ``C fn(x')`` over the ball by ``method``: ``"ibp"``
    (:func:`~kdjax.faithful.bounds.ibp_bounds`, the affine tail folded into ``C``),
    ``"crown-ibp"`` / ``"crown"`` (:func:`~kdjax.faithful.bounds.crown_bounds` with IBP or
    CROWN intermediate bounds) or ``"alpha-crown"`` (CROWN with the ReLU slopes of the
    final pass optimised, :data:`ALPHA_STEPS` steps; never looser than ``"crown"``)."""
    check_choice(method, "method", BOUND_METHODS)
    if method == "ibp":
        return ibp_bounds(fn, x, eps, clip=clip, C=C, batch_chunk=batch_chunk)
    return crown_bounds(fn, x, eps, clip=clip, C=C, batch_chunk=batch_chunk,
                        intermediate="ibp" if method == "crown-ibp" else "crown",
                        alpha_steps=ALPHA_STEPS if method == "alpha-crown" else 0)


def margin_bounds(teacher_fn: Callable, student_fn: Callable, x: chex.Array, *,
                  eps: chex.Numeric, method: str = "crown", clip=None,
                  labels: chex.Array | None = None,
                  batch_chunk: int | None = None) -> MarginBounds:
    r"""Certified bounds on the logit margins of both networks over the ball.

    Bounds the joint function ``x -> (z^T(x), z^S(x))`` with a specification of ``3K``
    rows per example: ``z^T_y - z^T_j``, ``z^S_y - z^S_j`` and their difference
    ``(z^S_y - z^S_j) - (z^T_y - z^T_j)`` (the cross-network bound is what makes the gap
    bound 0 for identical networks; CROWN tightens it further by relaxing both networks
    in one backward pass). ``method``: one of :data:`BOUND_METHODS`
    (:func:`bounds_by_method`).

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
      method: ``"crown"`` (default), ``"alpha-crown"``, ``"crown-ibp"`` or ``"ibp"``.
      labels: optional ``[B]`` labels (default: the teacher's labels at ``x``).
      batch_chunk: see :func:`kdjax.faithful.bounds.ibp_bounds`.

    Returns:
      :class:`MarginBounds`.
    """
    check_ball(x, eps, clip)
    k = _check_fns(teacher_fn, student_fn, x)
    check_choice(method, "method", BOUND_METHODS)
    y = labels if labels is not None else teacher_labels(teacher_fn(x))
    if labels is not None:
        check_labels(labels, "labels", k, batch=x.shape[0])
    joint = lambda xp: jnp.concatenate([teacher_fn(xp), student_fn(xp)], axis=-1)  # noqa
    spec = _margin_specs(y, k)
    lo, up = bounds_by_method(joint, x, eps, method, clip=clip, C=spec,
                              batch_chunk=batch_chunk)
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
    (:func:`probability_bounds`), the separate-network bound of docs/METHODS.md is
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


def certified_agreement(bounds: MarginBounds) -> chex.Array:
    r"""``[B]`` bool: the label ``y`` of the bounds is the student's argmax over the whole
    ball, certified by ``min_{j != y} lower(z^S_y - z^S_j) > 0``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.faithful import MarginBounds, certified_agreement
      >>> lo = jnp.array([[0.0, 0.5], [0.0, -0.1]])
      >>> certified_agreement(MarginBounds(jnp.array([0, 0]), lo, lo, lo, lo)).tolist()
      [True, False]
    """
    if not isinstance(bounds, MarginBounds):
        raise TypeError(f"bounds must be a MarginBounds, got {type(bounds).__name__}.")
    k = bounds.student_lower.shape[-1]
    ymask = jax.nn.one_hot(bounds.labels, k, dtype=bool)
    return jnp.min(jnp.where(ymask, jnp.inf, bounds.student_lower), axis=-1) > 0


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
    out = {"faithful": ub["gap"] <= delta, "agree": certified_agreement(mb),
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
    faithful distillation (docs/METHODS.md section 5).

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
    check_ball(x, eps, clip)
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




def worst_case_logits(fn: Callable, x: chex.Array, labels: chex.Array, *,
                      eps: chex.Numeric, method: str = "ibp", clip=None,
                      batch_chunk: int | None = None) -> chex.Array:
    r"""Worst-case logits over the ball for certified training (Gowal et al. 2018, Eq. 7):
    ``z_hat_j = -lower(z_y - z_j)`` for ``j != y`` and ``z_hat_y = 0``, from bounds on the
    margins ``z_y - z_j`` (IBP with the specification folded in, CROWN-IBP or CROWN).
    ``CE(z_hat, y)`` upper-bounds the cross-entropy at every point of the ball.
    Differentiable in ``fn``'s parameters.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.faithful import worst_case_logits
      >>> f = lambda x: jnp.concatenate([x, -x], axis=1)
      >>> worst_case_logits(f, jnp.ones((1, 1)), jnp.array([0]), eps=0.5).tolist()
      [[0.0, -1.0]]

    Returns:
      ``[B, K]`` float32.
    """
    check_ball(x, eps, clip)
    check_choice(method, "method", BOUND_METHODS)
    z = jax.eval_shape(fn, x)
    if len(z.shape) != 2 or z.shape[0] != x.shape[0]:
        raise ValueError(f"fn(x) must return logits of shape [{x.shape[0]}, K], got "
                         f"{z.shape}.")
    k = z.shape[-1]
    check_labels(labels, "labels", k, batch=x.shape[0])
    spec = jax.nn.one_hot(labels, k, dtype=jnp.float32)[:, None, :] - \
        jnp.eye(k, dtype=jnp.float32)[None]
    lo, _ = bounds_by_method(fn, x, eps, method, clip=clip, C=spec, batch_chunk=batch_chunk)
    return jnp.where(jax.nn.one_hot(labels, k, dtype=bool), 0.0, -lo)
