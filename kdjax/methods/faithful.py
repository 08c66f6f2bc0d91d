r"""Registry entries for faithful KD (METHODS.md section 5, after arXiv 2306.04431).

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

**Engine note.** With the current engine, ``teacher_fn`` wraps the teacher's *output* in
``stop_gradient``, which also zeroes the teacher's input gradient: the PGD search of
``faithful_pgd`` then ascends through the student only (``sign(p^S_y - p^T_y) grad
p^S_y``). That is still a valid search (the points are in the ball; the penalty is the
gap there), but weaker than the joint attack used for evaluation. A teacher function that
is constant in the teacher's parameters but transparent in ``x`` fixes it; the methods
need no change.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from kdjax import faithful as F
from kdjax import losses
from kdjax._checks import check_choice
from kdjax.methods import Method, register

__all__ = ["current_eps", "resolve_clip"]

_CLIP_CHOICES = ("batch", "none")


def _step_init(rng, student_out, teacher_out, **options):
    del rng, student_out, teacher_out, options
    return {}, {"step": jnp.zeros((), jnp.int32)}


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
    """``clip`` option -> ``None`` or ``(lo, hi)``: ``"batch"`` gives the batch's range
    ``(min x, max x)`` (constants: no gradient), ``"none"`` gives ``None``, a pair is used
    as is."""
    if isinstance(clip, str):
        check_choice(clip, "clip", _CLIP_CHOICES)
        if clip == "none":
            return None
        xs = jax.lax.stop_gradient(x.astype(jnp.float32))
        lo, hi = jnp.min(xs), jnp.max(xs)
        return lo, jnp.maximum(hi, lo + 1e-6)   # a constant batch still has lo < hi
    if isinstance(clip, (tuple, list)) and len(clip) == 2:
        lo, hi = float(clip[0]), float(clip[1])
        if not lo < hi:
            raise ValueError(f"clip must satisfy lo < hi, got {list(clip)!r}.")
        return lo, hi
    raise ValueError(f"clip must be 'batch', 'none' or a pair [lo, hi], got {clip!r}.")


def _models(name, models):
    if models is None or not isinstance(models, (tuple, list)) or len(models) != 2:
        raise ValueError(f"method {name!r} needs models=(student_fn, teacher_fn) from the "
                         f"engine (needs_models=True), got {models!r}.")
    student_fn, teacher_fn = models
    return (lambda x: student_fn(x)[0].astype(jnp.float32),
            lambda x: teacher_fn(x)[0].astype(jnp.float32))


def _weights(batch):
    return batch.get("weights") if isinstance(batch, Mapping) else None


def _penalty(name, state, batch, rng, models, eps, ramp_steps, warmup_steps, clip,
             **penalty_kw):
    _validate_schedule(name, eps, ramp_steps, warmup_steps)
    s_logits, t_logits = _models(name, models)
    x = batch["x"]
    step = state["step"]
    e = current_eps(step, eps=eps, ramp_steps=ramp_steps, warmup_steps=warmup_steps)
    value = F.faithful_penalty(t_logits, s_logits, x, eps=e, key=rng,
                               clip=resolve_clip(clip, x), weights=_weights(batch),
                               **penalty_kw)
    return value, {"step": step + 1}


def _faithful_pgd(params, state, student_out, teacher_out, batch, rng, *, models=None,
                  eps, ramp_steps, warmup_steps, clip, objective, steps, step_size,
                  restarts):
    """PGD confidence-gap penalty ``obj(x^adv)`` (see the module docstring)."""
    del params, student_out, teacher_out
    check_choice(objective, "objective", ("gap", "over", "under"))
    return _penalty("faithful_pgd", state, batch, rng, models, eps, ramp_steps,
                    warmup_steps, clip, adversarial_weight=1.0, certified_weight=0.0,
                    objective=objective, steps=steps, step_size=step_size,
                    restarts=restarts)


def _faithful_certified(params, state, student_out, teacher_out, batch, rng, *,
                        models=None, eps, ramp_steps, warmup_steps, clip, objective,
                        bound):
    """Certified confidence-gap bound penalty (see the module docstring)."""
    del params, student_out, teacher_out
    check_choice(objective, "objective", ("gap", "over", "under"))
    check_choice(bound, "bound", ("ibp", "crown-ibp"))
    return _penalty("faithful_certified", state, batch, rng, models, eps, ramp_steps,
                    warmup_steps, clip, adversarial_weight=0.0, certified_weight=1.0,
                    objective=objective, bound=bound)


def _adversarial_distillation(params, state, student_out, teacher_out, batch, rng, *,
                              models=None, eps, ramp_steps, warmup_steps, clip,
                              temperature, steps, step_size):
    """ARD: ``tau^2 KL(p^T(x) || p^S(x^adv))`` (see the module docstring)."""
    del params, student_out
    name = "adversarial_distillation"
    _validate_schedule(name, eps, ramp_steps, warmup_steps)
    s_logits, _ = _models(name, models)
    x = batch["x"]
    step = state["step"]
    e = current_eps(step, eps=eps, ramp_steps=ramp_steps, warmup_steps=warmup_steps)
    zt = jax.lax.stop_gradient(teacher_out[0].astype(jnp.float32))
    x_adv = F.adversarial_distillation_inputs(zt, s_logits, x, eps=e, key=rng, steps=steps,
                                              step_size=step_size, temperature=temperature,
                                              clip=resolve_clip(clip, x))
    value = losses.kd(s_logits(x_adv), zt, temperature, weights=_weights(batch))
    return value, {"step": step + 1}


_COMMON = {"eps": 0.1, "ramp_steps": 0, "warmup_steps": 0, "clip": "batch"}

register(Method(
    "faithful_pgd", _faithful_pgd, init=_step_init, needs_models=True,
    options={**_COMMON, "objective": "gap", "steps": 10, "step_size": None,
             "restarts": 1},
    default_weight=1.0,
    doc="faithful KD: lambda * PGD confidence gap |p^S_y - p^T_y| at x_adv in the eps-ball"))
register(Method(
    "faithful_certified", _faithful_certified, init=_step_init, needs_models=True,
    options={**_COMMON, "ramp_steps": 1000, "objective": "gap", "bound": "ibp"},
    default_weight=1.0,
    doc="faithful KD: mu * certified (IBP / CROWN-IBP) upper bound on the gap, eps ramp"))
register(Method(
    "adversarial_distillation", _adversarial_distillation, init=_step_init,
    needs_models=True,
    options={**_COMMON, "temperature": 4.0, "steps": 10, "step_size": None},
    default_weight=1.0,
    doc="ARD: tau^2 KL(p_T(x) || p_S(x_adv)), x_adv the student's own PGD inputs"))
