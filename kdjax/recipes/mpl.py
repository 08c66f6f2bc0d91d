r"""Meta Pseudo Labels (Pham et al., CVPR 2021): the teacher learns from the student.

The pieces KD-AIF's joint loop (:func:`kdjax.recipes.kd_aif.fit_joint`) is made of:
:func:`mpl_teacher_grad`, the teacher gradient from the student's validation loss after
one look-ahead student step, and :func:`mpl_step`, one joint teacher-then-student
update. Both take optional per-example ``weights`` on the student's pseudo-label loss
(KD-AIF's influence weights enter there) and are pure and jittable.

Contract of ``student_loss(student_params, teacher_logits) -> scalar``: it equals
``kd_weight * (1/B) sum_i w_i tau^2 KL(p^tau_T,i || p^tau_S,i)`` plus terms that do not
depend on the teacher (e.g. a CE on labelled rows): only then is the first-order meta
gradient below exact for the look-ahead step. The default is the weighted KD term alone.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from kdjax import losses
from kdjax._checks import check_positive

__all__ = ["mpl_teacher_grad", "mpl_step"]


def _val_ce(student_fn, sp, val):
    return jnp.mean(losses.cross_entropy(student_fn(sp, val["x"]).astype(jnp.float32),
                                         val["y"], reduction="none"))


def _default_student_loss(student_fn, x, temperature, weights, kd_weight):
    def loss(sp, teacher_logits):
        return kd_weight * losses.kd(student_fn(sp, x), teacher_logits, temperature,
                                     weights=weights)
    return loss


def mpl_teacher_grad(teacher_fn: Callable, student_fn: Callable, teacher_params,
                     student_params, unlabelled: Mapping[str, Any],
                     val: Mapping[str, Any], *, student_lr: float,
                     temperature: float = 1.0, weights: jax.Array | None = None,
                     kd_weight: float = 1.0, student_loss: Callable | None = None):
    r"""Teacher gradient from the student's validation loss after one student step.

    Meta Pseudo Labels (Pham et al. 2021, sec. 3 and appendix A), as KD-AIF updates the
    teacher with the student. One SGD look-ahead step of the student on its
    pseudo-label loss ``L_S(theta_S; theta_T)`` (``student_loss``, see the module
    contract; weights ``w_i``, KD coefficient ``beta = kd_weight``),

    .. math::
        \theta_S' = \theta_S - \eta\, \nabla_{\theta_S} L_S(\theta_S;\theta_T),

    and the teacher minimises ``R(theta_T) = L_val(theta_S') = mean_j CE(y_j,
    S(x_j; theta_S'))``. With ``v = grad L_val(theta_S')`` and ``d_ic = d/dt log
    p^tau_S(x_i; theta_S + t v)_c`` (one JVP of the student at ``theta_S``),

    .. math::
        \nabla_{\theta_T} R = -\eta\, \Big(\frac{\partial \nabla_{\theta_S} L_S}
        {\partial\theta_T}\Big)^\top v
        = \nabla_{\theta_T}\Big[\eta\,\beta\,\tau^2\,\frac{1}{B}\sum_{i} w_i \sum_c
           p^\tau_T(x_i;\theta_T)_c\; \mathrm{sg}(d_{ic})\Big],

    because only the cross-entropy part ``-sum_c p_T log p_S`` of the KL depends on
    both. First-order MPL: the student's future is truncated to *one* plain-SGD step
    (its real optimiser is ignored) and no student Hessian is formed; for that step the
    gradient is exact (MPL's REINFORCE form ``h grad CE(y_hat, T)``, ``h = eta v^T
    grad_S CE(y_hat, S)``, is the hard-label, sampled version of the same quantity).
    ``d_ic > 0`` means a student step towards class ``c`` on ``x_i`` raises the
    validation loss, so the teacher step lowers ``p_T(c | x_i)`` there.

    Args:
      teacher_fn, student_fn: ``(params, x) -> logits``.
      teacher_params, student_params: pytrees.
      unlabelled: dict with ``x`` (the student's look-ahead batch).
      val: labelled dict with ``x``, ``y``.
      student_lr: ``eta > 0`` of the look-ahead step.
      temperature: ``tau`` of the KD loss.
      weights: optional ``[B]`` per-example weights ``w_i`` (default 1).
      kd_weight: ``beta``, the KD coefficient inside ``student_loss``.
      student_loss: ``(student_params, teacher_logits) -> scalar`` (default
        ``beta (1/B) sum_i w_i tau^2 KL_i``).

    Returns:
      ``(grad_teacher, info)`` with ``info = {"val_before", "val_after",
      "student_params_after"}``.
    """
    check_positive(student_lr, "student_lr")
    check_positive(temperature, "temperature")
    tau = temperature
    xu = unlabelled["x"]
    w = None if weights is None else jnp.asarray(weights, jnp.float32)
    if student_loss is None:
        student_loss = _default_student_loss(student_fn, xu, tau, w, kd_weight)
    t_logits = jax.lax.stop_gradient(teacher_fn(teacher_params, xu))
    g = jax.grad(student_loss)(student_params, t_logits)
    after = jax.tree_util.tree_map(lambda p, gi: p - student_lr * gi, student_params, g)
    v = jax.grad(lambda sp: _val_ce(student_fn, sp, val))(after)
    log_ps = lambda sp: jax.nn.log_softmax(student_fn(sp, xu).astype(jnp.float32) / tau)  # noqa: E731
    d = jax.lax.stop_gradient(jax.jvp(log_ps, (student_params,), (v,))[1])  # [B, C]

    def meta(tp):
        pt = jax.nn.softmax(teacher_fn(tp, xu).astype(jnp.float32) / tau)
        per = jnp.sum(pt * d, axis=-1)
        per = per if w is None else w * per
        return student_lr * kd_weight * tau ** 2 * jnp.mean(per)

    grad = jax.grad(meta)(teacher_params)
    return grad, {"val_before": _val_ce(student_fn, student_params, val),
                  "val_after": _val_ce(student_fn, after, val),
                  "student_params_after": after}


def mpl_step(teacher_fn: Callable, student_fn: Callable, teacher_params, student_params,
             teacher_opt_state, student_opt_state, teacher_tx: optax.GradientTransformation,
             student_tx: optax.GradientTransformation, unlabelled, val, *,
             student_lr: float, temperature: float = 1.0, teacher_ce_weight: float = 1.0,
             labelled: Mapping[str, Any] | None = None, weights: jax.Array | None = None,
             kd_weight: float = 1.0, student_loss: Callable | None = None):
    r"""One joint MPL step: teacher update (meta gradient + supervised CE), then student.

    .. math::
        \theta_T \leftarrow \mathrm{opt}_T\big(\nabla_{\theta_T} R +
            \gamma \nabla_{\theta_T} \overline{\mathrm{CE}}(y, T(x_l))\big),\qquad
        \theta_S \leftarrow \mathrm{opt}_S\big(\nabla_{\theta_S}
            L_S(\theta_S; \theta_T^{new})\big)

    with ``R`` from :func:`mpl_teacher_grad`, ``gamma = teacher_ce_weight`` and the
    teacher's CE on ``labelled`` (default ``val``; MPL keeps the teacher's supervised
    loss); the student then takes its optimiser step on its (weighted) pseudo-label
    loss to the *updated* teacher's logits of ``unlabelled`` (MPL's order). Returns
    ``(teacher_params, student_params, teacher_opt_state, student_opt_state, info)``.
    """
    w = None if weights is None else jnp.asarray(weights, jnp.float32)
    if student_loss is None:
        student_loss = _default_student_loss(student_fn, unlabelled["x"], temperature, w,
                                             kd_weight)
    g_meta, info = mpl_teacher_grad(teacher_fn, student_fn, teacher_params, student_params,
                                    unlabelled, val, student_lr=student_lr,
                                    temperature=temperature, weights=w,
                                    kd_weight=kd_weight, student_loss=student_loss)
    sup = val if labelled is None else labelled
    g_ce = jax.grad(lambda tp: _val_ce(teacher_fn, tp, sup))(teacher_params)
    g_t = jax.tree_util.tree_map(lambda a, b: a + teacher_ce_weight * b, g_meta, g_ce)
    upd, teacher_opt_state = teacher_tx.update(g_t, teacher_opt_state, teacher_params)
    teacher_params = optax.apply_updates(teacher_params, upd)
    t = jax.lax.stop_gradient(teacher_fn(teacher_params, unlabelled["x"]))
    g_s = jax.grad(student_loss)(student_params, t)
    upd, student_opt_state = student_tx.update(g_s, student_opt_state, student_params)
    student_params = optax.apply_updates(student_params, upd)
    return teacher_params, student_params, teacher_opt_state, student_opt_state, info
