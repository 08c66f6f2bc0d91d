r"""Registry entries for faithful KD (docs/METHODS.md section 5, after arXiv 2306.04431).

Three loss terms that evaluate the networks away from the training inputs, so they are
registered with ``needs_models=True`` and read ``models=(student_fn, teacher_fn)`` from
the engine (``x -> (logits, features)``; the student with the parameters being
differentiated and BatchNorm in eval mode, the teacher in eval mode). Combine them with
``ce``/``kd`` terms in a run; the method ``weight`` is the penalty weight.

``B_eps(x) = {x' : ||x' - x||_inf <= eps} ∩ [lo, hi]`` and ``y = argmax z^T(x)`` (the
teacher's label at the clean point):

* ``faithful_pgd`` (weight ``lambda``): :math:`\lambda\, \mathrm{obj}(x^{adv})`,
  ``x^adv = argmax_{x' in B} obj(x')`` found by PGD (:func:`kdjax.faithful.pgd_gap`)
  with the *current* student, then held constant (``stop_gradient``): the gap
  ``|p^S_y(x^adv) - p^T_y(x^adv)|`` is differentiated at the found inputs only
  (Danskin: the gradient of the max at its maximiser). ``obj`` = ``objective``
  (``"gap"``, ``"over"``, ``"under"``).
* ``faithful_certified`` (weight ``mu``): :math:`\mu\, \overline{\mathrm{obj}}(x)`, the
  certified upper bound of ``obj`` over the ball from IBP or CROWN-IBP margin bounds of
  the joint teacher-student function (:func:`kdjax.faithful.margin_bounds`,
  :func:`~kdjax.faithful.gap_upper_bound`), differentiable in the student.
* ``adversarial_distillation`` (Goldblum et al. 2020, "Adversarially Robust
  Distillation", Eq. 2 without its clean CE term):
  :math:`\tau^2\, \mathrm{KL}(p^T_\tau(x) \,\|\, p^S_\tau(x^{adv}))` with
  ``x^adv = argmax_{x' in B} KL(p^T_tau(x) || p^S_tau(x'))`` found by PGD on the student
  (:func:`kdjax.faithful.adversarial_distillation_inputs`). Only the student's
  input gradient is needed. ARD's reference defaults (CIFAR-10: ``tau = 30``,
  ``eps = 8/255``, 10 steps) differ; kdjax uses ``tau = 4`` like ``kd``.

**eps ramp.** All three read the radius from a schedule of the training step,
``eps_t =`` :func:`kdjax.faithful.eps_ramp` ``(eps, warmup_steps, ramp_steps)(t)``:
0 for ``warmup_steps`` steps, then linear up to ``eps`` over ``ramp_steps`` steps, then
``eps`` (``ramp_steps = 0``: constant ``eps``). The engine does not pass its step to a
method, so each method carries its own counter in its state: ``state = {"step": t}``,
``t`` the number of optimiser steps taken with this term (``int32``, incremented by every
call of the loss, saved and restored with the train state, so resumed runs continue the
ramp). ``faithful_certified`` ramps by default (certified training collapses when the
bound is loose from the start: Gowal et al. 2018, sec. 4).

**Clipping** (``clip`` option): ``"batch"`` (default) clips the ball to the batch's data
range ``[min(x), max(x)]`` (scalars over the whole batch), ``"none"`` does not clip,
``[lo, hi]`` a fixed range (``[0, 1]`` for un-normalised images).

**Attacks through both networks.** The engine's ``teacher_fn`` stops gradients at the
teacher's *parameters*, not its output, so the teacher is transparent in ``x``: the PGD
search of ``faithful_pgd`` ascends the joint gap ``|p^S_y - p^T_y|`` (the attack of the
evaluation), while the teacher stays frozen.

**Robust teachers** (teacher objectives, ``needs_teacher=False``; pass one as
``algorithm`` to :func:`kdjax.train.get_teacher`):

* ``pgd_at`` (Madry et al. 2018, Eq. 2.1): ``(1 - w) CE(z(x^adv), y) + w CE(z(x), y)``
  with ``x^adv = argmax_{x' in B} CE(z(x'), y)`` by PGD from a random start (reference
  code: 7-10 steps, step ``2.5 eps / steps``, ``w = 0``: adversarial loss only).
* ``certified_training`` (IBP, Gowal et al. 2018, Eq. 7; CROWN-IBP bounds, Zhang et al.
  2020, Eq. 7 with ``beta = 1``): ``kappa CE(z(x), y) + (1 - kappa) CE(z_hat(x), y)``,
  ``z_hat_j = -lower(z_y - z_j)`` the worst-case logits over the ball
  (:func:`kdjax.faithful.worst_case_logits`). ``kappa`` ramps from 1 to ``kappa`` with
  ``eps`` (reference: ``kappa`` 1 -> 0.5, eps ramped over most of training).

**RSLAD** (Zi et al. 2021, "Revisiting Adversarial Robustness Distillation: Robust Soft
Labels Make Student Better", Eq. 6): ``(1 - a) KL(p^T(x) || p^S(x)) + a KL(p^T(x) ||
p^S(x^adv))`` with the teacher's *clean* soft labels at temperature 1, ``a = 5/6`` (the
reference code's ``5/6`` and ``1/6``), and ``x^adv = argmax_{x' in B}
KL(p^T(x) || p^S(x'))`` by PGD on the student (reference: 10 steps, step ``2/255``,
``eps = 8/255`` on CIFAR; kdjax's step default is ``2.5 eps / steps``).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from kdjax import faithful as F
from kdjax import losses
from kdjax._checks import check_choice
from kdjax.losses._utils import reduce_per_example
from kdjax.methods import Method, register
from kdjax.methods.common import step_init

__all__ = ["current_eps", "resolve_clip"]

_CLIP_CHOICES = ("batch", "none")


def _validate_schedule(name, eps, ramp_steps, warmup_steps):
    for key, v, lo in (("ramp_steps", ramp_steps, 0), ("warmup_steps", warmup_steps, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"method {name!r}: option {key} must be an int >= {lo}, "
                             f"got {v!r}.")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"method {name!r}: option eps must be a number >= 0, got {eps!r}.")


def current_eps(step: jax.Array, *, eps: float, ramp_steps: int = 0,
                warmup_steps: int = 0) -> jax.Array:
    r"""Radius at training step ``step``: ``eps_t = eps * clip((t - warmup) / ramp, 0, 1)``
    (:func:`kdjax.faithful.eps_ramp`); ``ramp_steps = 0`` gives ``eps`` from step
    ``warmup_steps`` on (0 before). float32 scalar, jit-safe."""
    _validate_schedule("current_eps", eps, ramp_steps, warmup_steps)
    step = jnp.asarray(step)
    if ramp_steps == 0:
        return jnp.where(step >= warmup_steps, jnp.float32(eps), jnp.float32(0.0))
    sched = F.eps_ramp(float(eps), ramp_steps=ramp_steps, warmup_steps=warmup_steps)
    return jnp.asarray(sched(step), jnp.float32)


def resolve_clip(clip: Any, x: jax.Array):
    """The one reading of a ``clip`` setting (methods and drivers): ``"batch"`` gives the
    range ``(min x, max x)`` of the array it is given (a batch, or a whole training set
    in a driver; constants, no gradient), ``"none"`` gives ``None``, a pair ``[lo, hi]``
    is used as is (validated by :func:`kdjax.faithful.check_ball`)."""
    if isinstance(clip, str):
        check_choice(clip, "clip", _CLIP_CHOICES)
        if clip == "none":
            return None
        xs = jax.lax.stop_gradient(x.astype(jnp.float32))
        lo, hi = jnp.min(xs), jnp.max(xs)
        return lo, jnp.maximum(hi, lo + 1e-6)   # a constant batch still has lo < hi
    if isinstance(clip, (tuple, list)) and len(clip) == 2:
        pair = (float(clip[0]), float(clip[1]))
        F.check_ball(jnp.zeros((1, 1)), 0.0, pair)
        return pair
    raise ValueError(f"clip must be 'batch', 'none' or a pair [lo, hi], got {clip!r}.")


def _models(name, models):
    if models is None or not isinstance(models, (tuple, list)) or len(models) != 2:
        raise ValueError(f"method {name!r} needs models=(student_fn, teacher_fn) from the "
                         f"engine (needs_models=True), got {models!r}.")
    student_fn, teacher_fn = models
    return (lambda x: student_fn(x)[0].astype(jnp.float32),
            lambda x: teacher_fn(x)[0].astype(jnp.float32))


def _ramped(name, inputs, options):
    """The radius ``eps_t`` at the method's own step ``inputs.state["step"]`` (the
    schedule options ``eps``, ``ramp_steps``, ``warmup_steps`` validated)."""
    eps, ramp_steps, warmup_steps = (options["eps"], options["ramp_steps"],
                                     options["warmup_steps"])
    _validate_schedule(name, eps, ramp_steps, warmup_steps)
    return current_eps(inputs.state["step"], eps=eps, ramp_steps=ramp_steps,
                       warmup_steps=warmup_steps)


def _next_state(inputs):
    return {"step": inputs.state["step"] + 1}


def _penalty(name, inputs, options, **penalty_kw):
    e = _ramped(name, inputs, options)
    s_logits, t_logits = _models(name, inputs.models)
    x = inputs.batch["x"]
    value = F.faithful_penalty(t_logits, s_logits, x, eps=e, key=inputs.rng,
                               clip=resolve_clip(options["clip"], x), weights=inputs.weights,
                               **penalty_kw)
    return value, _next_state(inputs)


def _faithful_pgd(inputs, options):
    """PGD confidence-gap penalty ``obj(x^adv)`` (see the module docstring)."""
    objective = options["objective"]
    check_choice(objective, "objective", ("gap", "over", "under"))
    return _penalty("faithful_pgd", inputs, options, adversarial_weight=1.0,
                    certified_weight=0.0, objective=objective, steps=options["steps"],
                    step_size=options["step_size"], restarts=options["restarts"])


def _faithful_certified(inputs, options):
    """Certified confidence-gap bound penalty (see the module docstring)."""
    objective, bound = options["objective"], options["bound"]
    check_choice(objective, "objective", ("gap", "over", "under"))
    check_choice(bound, "bound", ("ibp", "crown-ibp"))
    return _penalty("faithful_certified", inputs, options, adversarial_weight=0.0,
                    certified_weight=1.0, objective=objective, bound=bound)


def _kl_attack(inputs, options, s_logits, e, temperature):
    """``(z^T(x), x^adv)``: the teacher's clean logits (no gradient) and the student's
    PGD inputs ``argmax_{x' in B_e(x)} KL(p^T_tau(x) || p^S_tau(x'))`` (ARD, RSLAD)."""
    x = inputs.batch["x"]
    zt = jax.lax.stop_gradient(inputs.teacher[0].astype(jnp.float32))
    x_adv = F.adversarial_distillation_inputs(zt, s_logits, x, eps=e, key=inputs.rng,
                                              steps=options["steps"],
                                              step_size=options["step_size"],
                                              temperature=temperature,
                                              clip=resolve_clip(options["clip"], x))
    return zt, x_adv


def _adversarial_distillation(inputs, options):
    """ARD: ``tau^2 KL(p^T(x) || p^S(x^adv))`` (see the module docstring)."""
    name = "adversarial_distillation"
    e = _ramped(name, inputs, options)
    s_logits, _ = _models(name, inputs.models)
    temperature = options["temperature"]
    zt, x_adv = _kl_attack(inputs, options, s_logits, e, temperature)
    value = losses.kd(s_logits(x_adv), zt, temperature, weights=inputs.weights)
    return value, _next_state(inputs)


_COMMON = {"eps": 0.1, "ramp_steps": 0, "warmup_steps": 0, "clip": "batch"}

register(Method(
    "faithful_pgd", _faithful_pgd, init=step_init, needs_models=True,
    options={**_COMMON, "objective": "gap", "steps": 10, "step_size": None,
             "restarts": 1},
    default_weight=1.0,
    doc="faithful KD: lambda * PGD confidence gap |p^S_y - p^T_y| at x_adv in the eps-ball"))
register(Method(
    "faithful_certified", _faithful_certified, init=step_init, needs_models=True,
    options={**_COMMON, "ramp_steps": 1000, "objective": "gap", "bound": "ibp"},
    default_weight=1.0,
    doc="faithful KD: mu * certified (IBP / CROWN-IBP) upper bound on the gap, eps ramp"))
register(Method(
    "adversarial_distillation", _adversarial_distillation, init=step_init,
    needs_models=True,
    options={**_COMMON, "temperature": 4.0, "steps": 10, "step_size": None},
    default_weight=1.0,
    doc="ARD: tau^2 KL(p_T(x) || p_S(x_adv)), x_adv the student's own PGD inputs"))


# ------------------------------------------------------------- robust teachers, RSLAD


def _labels(name, batch):
    if not isinstance(batch, Mapping) or "y" not in batch:
        raise ValueError(f"method {name!r} needs labels batch['y'], got keys "
                         f"{sorted(batch) if isinstance(batch, Mapping) else batch!r}.")
    return batch["y"]


def _pgd_at(inputs, options):
    """Madry PGD adversarial training (see the module docstring)."""
    name = "pgd_at"
    s_logits, _ = _models(name, inputs.models)
    x, y = inputs.batch["x"], _labels(name, inputs.batch)
    e = _ramped(name, inputs, options)
    clean_weight = options["clean_weight"]
    ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, y)  # noqa: E731
    _, x_adv = F.pgd_maximize(lambda xp: ce(s_logits(xp)), x, eps=e, key=inputs.rng,
                              steps=options["steps"], step_size=options["step_size"],
                              restarts=options["restarts"],
                              clip=resolve_clip(options["clip"], x))
    per = (1.0 - clean_weight) * ce(s_logits(jax.lax.stop_gradient(x_adv)))
    per = per + clean_weight * ce(inputs.student[0].astype(jnp.float32))
    return reduce_per_example(per, inputs.weights, "mean"), _next_state(inputs)


def _certified_training(inputs, options):
    """IBP / CROWN-IBP certified training (see the module docstring)."""
    name = "certified_training"
    bound, kappa, eps = options["bound"], options["kappa"], options["eps"]
    check_choice(bound, "bound", ("ibp", "crown-ibp"))
    if not 0.0 <= float(kappa) <= 1.0:
        raise ValueError(f"method {name!r}: option kappa must be in [0, 1], got {kappa!r}.")
    s_logits, _ = _models(name, inputs.models)
    x, y = inputs.batch["x"], _labels(name, inputs.batch)
    e = _ramped(name, inputs, options)
    frac = e / eps if eps > 0 else jnp.float32(1.0)
    k = 1.0 - (1.0 - kappa) * frac          # kappa ramps 1 -> kappa with eps
    z_hat = F.worst_case_logits(s_logits, x, y, eps=e, method=bound,
                                clip=resolve_clip(options["clip"], x))
    ce = optax.softmax_cross_entropy_with_integer_labels
    per = k * ce(inputs.student[0].astype(jnp.float32), y) + (1.0 - k) * ce(z_hat, y)
    return reduce_per_example(per, inputs.weights, "mean"), _next_state(inputs)


def _rslad(inputs, options):
    """RSLAD (see the module docstring)."""
    name = "rslad"
    adv_weight = options["adv_weight"]
    if not 0.0 <= float(adv_weight) <= 1.0:
        raise ValueError(f"method {name!r}: option adv_weight must be in [0, 1], got "
                         f"{adv_weight!r}.")
    s_logits, _ = _models(name, inputs.models)
    e = _ramped(name, inputs, options)
    zt, x_adv = _kl_attack(inputs, options, s_logits, e, 1.0)
    w = inputs.weights
    value = ((1.0 - adv_weight) * losses.kd(inputs.student[0].astype(jnp.float32), zt, 1.0,
                                            weights=w)
             + adv_weight * losses.kd(s_logits(x_adv), zt, 1.0, weights=w))
    return value, _next_state(inputs)


register(Method(
    "pgd_at", _pgd_at, init=step_init, needs_models=True, needs_labels=True,
    needs_teacher=False,
    options={**_COMMON, "steps": 7, "step_size": None, "restarts": 1, "clean_weight": 0.0},
    default_weight=1.0,
    doc="robust teacher: Madry PGD adversarial training, CE at x_adv = argmax CE"))
register(Method(
    "certified_training", _certified_training, init=step_init, needs_models=True,
    needs_labels=True, needs_teacher=False,
    options={**_COMMON, "ramp_steps": 1000, "bound": "ibp", "kappa": 0.5},
    default_weight=1.0,
    doc="robust teacher: IBP / CROWN-IBP certified training, kappa CE + (1-kappa) CE_worst"))
register(Method(
    "rslad", _rslad, init=step_init, needs_models=True,
    options={**_COMMON, "steps": 10, "step_size": None, "adv_weight": 5.0 / 6.0},
    default_weight=1.0,
    doc="RSLAD: (1-a) KL(p_T(x)||p_S(x)) + a KL(p_T(x)||p_S(x_adv)), a = 5/6, T = 1"))
