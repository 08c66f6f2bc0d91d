"""Tests for kdjax.recipes.mpl: the first-order MPL teacher gradient against finite
differences of the look-ahead validation loss (plain and weighted), the joint step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from kdjax.recipes import mpl

C, D = 3, 5


@pytest.mark.parametrize("weighted", [False, True])
def test_mpl_teacher_gradient_matches_finite_differences_and_lowers_val_loss(weighted):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        xu = jnp.asarray(rng.normal(size=(20, D)))
        xv = jnp.asarray(rng.normal(size=(12, D)))
        yv = jnp.asarray((np.asarray(xv)[:, 0] > 0).astype(np.int32))
        lin = lambda p, x: x @ p["w"] + p["b"]  # noqa: E731 convex (linear softmax) models
        tp = {"w": jnp.asarray(rng.normal(size=(D, C))), "b": jnp.zeros(C)}
        sp = {"w": jnp.asarray(0.1 * rng.normal(size=(D, C))), "b": jnp.zeros(C)}
        eta, tau = 0.5, 2.0
        unl, val = {"x": xu}, {"x": xv, "y": yv}
        w = jnp.asarray(rng.uniform(0.2, 2.0, 20)) if weighted else jnp.ones(20)
        beta = 0.7 if weighted else 1.0
        kw = dict(weights=w, kd_weight=beta) if weighted else {}
        grad, info = mpl.mpl_teacher_grad(lin, lin, tp, sp, unl, val, student_lr=eta,
                                          temperature=tau, **kw)

        def kd64(zs, zt):   # float64 KD (kdjax.losses.kd computes in float32)
            pt = jax.nn.softmax(zt / tau)
            return beta * tau ** 2 * jnp.mean(w * jnp.sum(pt * (
                jax.nn.log_softmax(zt / tau) - jax.nn.log_softmax(zs / tau)), -1))

        def val_after(tparams):   # L_val(theta_S - eta grad_S KD(T(theta_T), S))
            g = jax.grad(lambda s: kd64(lin(s, xu), lin(tparams, xu)))(sp)
            s2 = jax.tree_util.tree_map(lambda a, b: a - eta * b, sp, g)
            z = jax.nn.log_softmax(lin(s2, xv))          # float64 CE (val_losses is f32)
            return -jnp.mean(z[jnp.arange(len(yv)), yv])

        np.testing.assert_allclose(float(info["val_after"]), float(val_after(tp)), rtol=1e-6)
        flat, unravel = ravel_pytree(tp)
        g_flat = ravel_pytree(grad)[0]
        for k in range(3):
            u = jnp.asarray(rng.normal(size=flat.shape))
            eps = 1e-4
            fd = (val_after(unravel(flat + eps * u)) - val_after(unravel(flat - eps * u))) / (
                2 * eps)
            np.testing.assert_allclose(float(g_flat @ u), float(fd), rtol=1e-4, atol=1e-8)
        # a small teacher step against the gradient lowers the student's validation loss
        stepped = unravel(flat - 0.1 * g_flat / jnp.linalg.norm(g_flat))
        assert float(val_after(stepped)) < float(val_after(tp))


def test_mpl_step_updates_both_and_is_jittable():
    rng = np.random.default_rng(0)
    lin = lambda p, x: x @ p["w"]  # noqa: E731
    tp = {"w": jnp.asarray(rng.normal(size=(D, C)), jnp.float32)}
    sp = {"w": jnp.zeros((D, C), jnp.float32)}
    tx = optax.sgd(0.1)
    unl = {"x": jnp.asarray(rng.normal(size=(8, D)), jnp.float32)}
    val = {"x": unl["x"][:4], "y": jnp.array([0, 1, 2, 0])}
    step = jax.jit(functools.partial(mpl.mpl_step, lin, lin, teacher_tx=tx,
                                     student_tx=tx, student_lr=0.1))
    t2, s2, _, _, info = step(tp, sp, tx.init(tp), tx.init(sp), unlabelled=unl, val=val)
    assert not np.allclose(t2["w"], tp["w"]) and not np.allclose(s2["w"], sp["w"])
    with pytest.raises(ValueError, match="student_lr"):
        mpl.mpl_teacher_grad(lin, lin, tp, sp, unl, val, student_lr=0.0)
