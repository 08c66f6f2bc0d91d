r"""Attacks: lower bounds on teacher-student gaps over an L-inf ball (random sampling and
PGD), and the adversarial inputs of adversarial distillation (ARD, RSLAD).

One projected-gradient loop, :func:`pgd_maximize`, serves every attack: it maximises a
per-example objective over ``B(x) = {x' : ||x' - x||_inf <= eps} ∩ [lo, hi]`` by
sign-gradient ascent with random restarts and keeps each example's best point.
"""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp

from kdjax._checks import check_choice, check_float_array, check_labels, check_nonnegative, \
    check_positive
from kdjax.faithful.bounds import check_ball
from kdjax.faithful.metrics import OBJECTIVES, _check_fns, gap_objective, teacher_labels
from kdjax.losses.logit import kl_to_teacher

__all__ = ["pgd_maximize", "sampled_gap", "pgd_gap", "adversarial_distillation_inputs"]


def _project(xa, x, eps, clip):
    xa = jnp.clip(xa, x - eps, x + eps)
    if clip is not None:
        xa = jnp.clip(xa, clip[0], clip[1])
    return xa


def _random_in_ball(key, x, eps, clip):
    return _project(x + jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * eps,
                    x, eps, clip)


def _where_b(mask, a, b):
    return jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)


def _check_steps(steps, restarts):
    for name, v, lo in (("steps", steps, 0), ("restarts", restarts, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}.")


def pgd_maximize(objective: Callable, x: chex.Array, *, eps: chex.Numeric,
                 key: chex.PRNGKey, steps: int = 10, step_size: chex.Numeric | None = None,
                 restarts: int = 1, clip=None):
    r"""L-inf PGD: ``max_{x' in B(x)} objective(x')`` per example, from below.

    Sign-gradient ascent (Madry et al. 2018, Eq. 2)
    ``x' <- Proj_B(x' + step_size * sign(grad sum_i objective(x')_i))`` from a uniform
    random point of the ball, ``restarts`` times; the best value over the clean point,
    every iterate and every restart is kept per example, so the result is a valid lower
    bound on the maximum and at least ``objective(x)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from kdjax.faithful import pgd_maximize
      >>> v, xa = pgd_maximize(lambda z: z.sum(-1), jnp.zeros((1, 2)), eps=0.1,
      ...                      key=jax.random.key(0))
      >>> round(float(v[0]), 4)
      0.2

    Args:
      objective: ``x' [B, ...] -> [B]`` float values, differentiable in ``x'``.
      x: ``[B, ...]`` clean inputs; eps: radius ``>= 0``; clip: data range.
      key: PRNG key of the random starts.
      steps: PGD steps per restart (static, ``>= 0``).
      step_size: default ``2.5 * eps / steps`` (Madry et al.).
      restarts: number of random restarts (static, ``>= 1``).

    Returns:
      ``(best_value [B], best_inputs [B, ...])``.
    """
    check_ball(x, eps, clip)
    _check_steps(steps, restarts)
    if step_size is None:
        step_size = 2.5 * eps / max(steps, 1)
    else:
        check_nonnegative(step_size, "step_size")

    def summed(xp):
        v = objective(xp)
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
        v = objective(xa)
        better = v > best
        return (jnp.where(better, v, best), _where_b(better, xa, bx)), None

    (best, bx), _ = jax.lax.scan(restart, (objective(x), x),
                                 jax.random.split(key, restarts))
    return best, bx


def sampled_gap(teacher_fn: Callable, student_fn: Callable, x: chex.Array, *,
                eps: chex.Numeric, num_samples: int, key: chex.PRNGKey, clip=None,
                objective: str = "gap", labels: chex.Array | None = None):
    """Max of :func:`gap_objective` over ``x`` and ``num_samples`` uniform points of the
    ball (a weak lower bound, the baseline PGD must beat); returns ``(value [B],
    argmax points [B, ...])``. ``labels`` default: the teacher's labels at ``x``."""
    check_ball(x, eps, clip)
    _check_fns(teacher_fn, student_fn, x)
    check_choice(objective, "objective", OBJECTIVES)
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
    check_ball(x, eps, clip)
    num_classes = _check_fns(teacher_fn, student_fn, x)
    check_choice(objective, "objective", OBJECTIVES)
    _check_steps(steps, restarts)
    y = labels if labels is not None else teacher_labels(teacher_fn(x))
    if labels is not None:
        check_labels(labels, "labels", num_classes, batch=x.shape[0])
    return pgd_maximize(lambda xp: gap_objective(student_fn(xp), teacher_fn(xp), y, objective),
                        x, eps=eps, key=key, steps=steps, step_size=step_size,
                        restarts=restarts, clip=clip)


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
    check_ball(x, eps, clip)
    check_float_array(teacher_logits, "teacher_logits", ndim=2)
    check_positive(temperature, "temperature")
    zs = jax.eval_shape(student_fn, x)
    if tuple(zs.shape) != tuple(teacher_logits.shape):
        raise ValueError(f"student_fn(x) and teacher_logits must have the same shape, got "
                         f"{tuple(zs.shape)} for student_fn(x) and {teacher_logits.shape} "
                         f"for teacher_logits.")
    zt = jax.lax.stop_gradient(teacher_logits)
    _, xa = pgd_maximize(lambda xp: kl_to_teacher(student_fn(xp), zt, temperature), x,
                         eps=eps, key=key, steps=steps, step_size=step_size, clip=clip)
    return jax.lax.stop_gradient(xa)
