"""Tests for kdjax.influence.curvature: per-example losses, H v and G v against dense
matrices (jax.hessian / jacobian), PSD-ness of the GGN, argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from _influence_helpers import ce_out, flat, make_batch, mlp_apply, mlp_init, mlp_loss  # noqa: E402
from kdjax.influence import ggn_vp, hvp, per_example_losses


# ----------------------------------------------------------- curvature products
def test_per_example_losses_shape_convention(mlp_problem):
    params, batch, _ = mlp_problem
    out = per_example_losses(mlp_loss, params, batch)
    assert out.shape == (16,) and out.dtype == jnp.float32
    with pytest.raises(ValueError, match=r"per-example losses of shape \(16,\)"):
        per_example_losses(lambda p, b: jnp.mean(mlp_loss(p, b)), params, batch)
    with pytest.raises(ValueError, match="same leading"):
        per_example_losses(mlp_loss, params, {"x": batch["x"], "y": batch["y"][:3]})


def test_hvp_matches_dense_hessian(mlp_problem):
    params, batch, v = mlp_problem
    pf, unravel = ravel_pytree(params)
    dense = jax.jit(jax.hessian(lambda q: jnp.mean(mlp_loss(unravel(q), batch))))(pf)
    got = flat(jax.jit(hvp, static_argnums=0)(mlp_loss, params, batch, v))
    np.testing.assert_allclose(got, dense @ flat(v), rtol=1e-4, atol=1e-6)
    # The MLP Hessian is indefinite here (why GGN is the default for networks).
    assert np.linalg.eigvalsh(np.asarray(dense, np.float64)).min() < 0


def test_ggn_matches_dense_and_is_psd(mlp_problem):
    params, batch, v = mlp_problem
    pf, unravel = ravel_pytree(params)
    out = mlp_apply(params, batch)

    @jax.jit
    def dense_ggn(pf):
        jac = jax.jacobian(lambda q: mlp_apply(unravel(q), batch).reshape(-1))(pf)  # [BC, P]
        h_out = jax.hessian(lambda o: jnp.mean(ce_out(o.reshape(out.shape), batch)))(
            out.reshape(-1))
        return jac.T @ h_out @ jac

    g_dense = dense_ggn(pf)
    gvp = jax.jit(lambda t: flat(ggn_vp(mlp_apply, ce_out, params, batch, unravel(t))))
    got = gvp(flat(v))
    np.testing.assert_allclose(got, g_dense @ flat(v), rtol=1e-4, atol=1e-6)
    # PSD: the matrix assembled from ggn_vp has no negative eigenvalue (up to rounding).
    mat = jax.jit(jax.vmap(gvp))(jnp.eye(pf.size))
    ev = np.linalg.eigvalsh(0.5 * (np.asarray(mat, np.float64) + np.asarray(mat).T))
    assert ev.min() >= -1e-6 * ev.max()
    assert ev.max() > 1e-3


def test_ggn_equals_hessian_for_linear_model():
    w = {"w": jax.random.normal(jax.random.key(0), (4, 3)), "b": jnp.zeros(3)}
    batch = make_batch(jax.random.key(1), 10)
    lin = lambda p, b: b["x"] @ p["w"] + p["b"]  # noqa: E731
    v = jax.tree_util.tree_map(jnp.ones_like, w)
    g = jax.jit(lambda v: ggn_vp(lin, ce_out, w, batch, v))(v)
    h = jax.jit(lambda v: hvp(lambda p, b: ce_out(lin(p, b), b), w, batch, v))(v)
    np.testing.assert_allclose(flat(g), flat(h), rtol=1e-5, atol=1e-6)



def test_hvp_bad_tangent(mlp_problem):
    params, batch, v = mlp_problem
    with pytest.raises(ValueError, match="v must have the same pytree structure"):
        hvp(mlp_loss, params, batch, {"w1": v["w1"]})
    bad = dict(v, w1=v["w1"][:2])
    with pytest.raises(ValueError, match=r"v\['w1'\] must have shape \(4, 5\)"):
        ggn_vp(mlp_apply, ce_out, params, batch, bad)
    with pytest.raises(TypeError, match="must be floating"):
        hvp(mlp_loss, params, batch, dict(v, b2=jnp.zeros(3, jnp.int32)))
