"""Tests for kdjax.influence.scores: single-jvp scores vs per-example gradients, the
explicit influence formula, 8-device sharding, Koh & Liang leave-one-out validation on
logistic regression, KD-AIF weight mappings, label-noise detection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

from _influence_helpers import (ce_out, flat, make_batch, mlp_apply, mlp_init,  # noqa: E402
                                mlp_loss, rel_err)
from kdjax.influence import ggn_vp, influence_scores, influence_weights, per_example_jvp


# ----------------------------------------------------------------------- scores
def test_single_jvp_scores_equal_per_example_gradients(mlp_problem):
    params, _, v = mlp_problem
    data = make_batch(jax.random.key(5), 37)  # 37 = 4 chunks of 10 with 3 padded
    got = jax.jit(lambda d, t: per_example_jvp(mlp_loss, params, d, t, chunk_size=10))(data, v)
    grads = jax.jit(jax.vmap(lambda x, y: flat(jax.grad(
        lambda p: mlp_loss(p, {"x": x[None], "y": y[None]})[0])(params))))
    g_flat = grads(data["x"], data["y"])  # [N, P]
    np.testing.assert_allclose(got, g_flat @ flat(v), rtol=1e-5, atol=1e-6)


def test_influence_scores_match_explicit_formula(mlp_problem):
    params, _, _ = mlp_problem
    train = make_batch(jax.random.key(6), 30)
    val = make_batch(jax.random.key(7), 12)
    matvec = lambda v: ggn_vp(mlp_apply, ce_out, params, train, v)  # noqa: E731
    scores, info = jax.jit(lambda tr, va: influence_scores(
        mlp_loss, params, tr, va, matvec=matvec, method="direct", damping=0.05,
        chunk_size=7))(train, val)
    pf, unravel = ravel_pytree(params)
    gmat = np.asarray(jax.jit(jax.vmap(lambda e: flat(matvec(unravel(e)))))(
        jnp.eye(pf.size)), np.float64)
    g_val = np.asarray(jax.jit(jax.grad(lambda q: jnp.mean(mlp_loss(unravel(q), val))))(pf),
                       np.float64)
    s = np.linalg.solve(gmat + 0.05 * np.eye(pf.size), g_val)
    per_ex = np.asarray(jax.jit(jax.vmap(lambda x, y: jax.grad(lambda q: mlp_loss(
        unravel(q), {"x": x[None], "y": y[None]})[0])(pf)))(train["x"], train["y"]))
    np.testing.assert_allclose(scores, -per_ex @ s, rtol=1e-4, atol=1e-5 * np.abs(
        per_ex @ s).max())
    assert rel_err(flat(info["s"]), s) < 1e-4


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_sharded_equals_unsharded(n_devices, mlp_problem, axis_type):
    params, _, v = mlp_problem
    types = (getattr(jax.sharding.AxisType, axis_type),)
    mesh = jax.make_mesh((n_devices,), ("data",), axis_types=types)
    one = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1], axis_types=types)
    data = make_batch(jax.random.key(8), 96)
    sharded = jax.device_put(data, NamedSharding(mesh, P("data")))
    f = jax.jit(lambda d: per_example_jvp(mlp_loss, params, d, v, chunk_size=5, mesh=mesh))
    ref = jax.jit(lambda d: per_example_jvp(mlp_loss, params, d, v, chunk_size=5))(
        jax.device_put(data, jax.devices()[0]))
    got = f(sharded)
    assert got.sharding.spec == P("data")  # stays sharded: each device scored its shard
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    if axis_type == "Explicit":
        return  # (the MLP's backward pass below is not written for explicit sharding)
    # N not divisible by 8 * chunk: padding is dropped; one-device mesh path agrees too.
    odd = make_batch(jax.random.key(9), 101)
    got_odd = jax.jit(lambda d: per_example_jvp(mlp_loss, params, d, v, chunk_size=4,
                                                mesh=mesh))(odd)
    ref_odd = jax.jit(lambda d: per_example_jvp(mlp_loss, params, d, v, chunk_size=4,
                                                mesh=one))(odd)
    assert got_odd.shape == (101,)
    np.testing.assert_allclose(got_odd, ref_odd, rtol=1e-6, atol=1e-7)
    # influence_scores end to end (default Hessian curvature on the sharded training
    # data, CG; XLA inserts the collectives), sharded vs one device.
    val = make_batch(jax.random.key(10), 20)
    score = lambda m: jax.jit(lambda tr, va: influence_scores(  # noqa: E731
        mlp_loss, params, tr, va, damping=1.0, mesh=m, chunk_size=4)[0])
    s1 = score(mesh)(sharded, val)
    s0 = score(None)(jax.device_put(data, jax.devices()[0]), val)
    np.testing.assert_allclose(s1, s0, rtol=1e-4, atol=1e-5 * np.abs(s0).max())


# ------------------------------------------ Koh & Liang leave-one-out validation
def lr_loss(params, batch):
    logits = batch["x"] @ params["w"] + params["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def fit_logreg(train, l2, theta0, weights=None, newton_steps=15):
    """argmin_theta (1/n) sum_j w_j l_j + l2/2 ||theta||^2 by Newton's method with the
    closed-form multinomial-logistic Hessian; theta = [W; b] as a [d + 1, C] matrix.
    Returns ({"w", "b"}, gradient norm)."""
    n = train["y"].shape[0]
    weights = jnp.ones(n) if weights is None else weights
    xt = jnp.concatenate([train["x"], jnp.ones((n, 1), train["x"].dtype)], axis=1)
    onehot = jax.nn.one_hot(train["y"], theta0.shape[1], dtype=xt.dtype)

    def grad_hess(theta):
        p = jax.nn.softmax(xt @ theta)
        g = xt.T @ (weights[:, None] * (p - onehot)) / n + l2 * theta
        a = jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]  # [n, C, C]
        h = jnp.einsum("j,ja,jb,jcd->acbd", weights / n, xt, xt, a)
        dim = theta.size
        return g, h.reshape(dim, dim) + l2 * jnp.eye(dim, dtype=h.dtype)

    def newton(theta, _):
        g, h = grad_hess(theta)
        return theta - jnp.linalg.solve(h, g.reshape(-1)).reshape(theta.shape), None

    theta, _ = jax.lax.scan(newton, theta0, None, length=newton_steps)
    return {"w": theta[:-1], "b": theta[-1]}, jnp.linalg.norm(grad_hess(theta)[0])


def as_matrix(params):
    return jnp.concatenate([params["w"], params["b"][None]], axis=0)


@pytest.mark.slow  # ~15 s alone, up to a minute on the shared 2-core machine
def test_koh_liang_leave_one_out_correlation():
    """Koh & Liang 2017, fig. 2: predicted vs actual change of the validation loss when a
    training point is removed and the model retrained (to gradient norm < 1e-9)."""
    with jax.enable_x64(True):
        x, y = load_digits(return_X_y=True)
        rng = np.random.default_rng(0)
        perm = rng.permutation(len(y))
        x = x.reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(-1, 16) / 16.0  # 4x4 pooled
        tr, va = perm[:300], perm[300:700]
        train = {"x": jnp.asarray(x[tr]), "y": jnp.asarray(y[tr], jnp.int32)}
        val = {"x": jnp.asarray(x[va]), "y": jnp.asarray(y[va], jnp.int32)}
        l2, n = 1e-2, 300
        fit = jax.jit(fit_logreg, static_argnames=("newton_steps",))
        theta, gnorm = fit(train, l2, jnp.zeros((17, 10)), newton_steps=15)
        assert float(gnorm) < 1e-9
        scores, info = jax.jit(lambda th: influence_scores(
            lr_loss, th, train, val, method="cg", damping=l2, tol=1e-12, maxiter=2000))(theta)
        assert float(info["inverse_hvp"].relative_residual) < 1e-9
        predicted = -np.asarray(scores) / n  # removal: epsilon = -1/n
        top = np.argsort(-np.abs(predicted))[:20]
        rest = np.setdiff1d(np.arange(n), top)
        idx = np.concatenate([top, rng.choice(rest, 15, replace=False)])
        l_val = jax.jit(lambda p: jnp.mean(lr_loss(p, val)))
        base = float(l_val(theta))
        # All leave-one-out refits in one vmapped program, warm-started at the optimum.
        w = jnp.ones((len(idx), n)).at[np.arange(len(idx)), idx].set(0.0)
        th_loo, g_loo = jax.jit(jax.vmap(lambda wi: fit_logreg(
            train, l2, as_matrix(theta), wi, newton_steps=4)))(w)
        assert float(g_loo.max()) < 1e-9
        actual = np.asarray(jax.vmap(l_val)(th_loo)) - base
        r = np.corrcoef(predicted[idx], actual)[0, 1]
        print(f"Koh & Liang LOO: {len(idx)} points, Pearson r = {r:.4f}")
        assert r >= 0.95, f"Pearson r = {r:.4f}"
        # Same sign and scale, not just correlated.
        np.testing.assert_allclose(predicted[idx], actual, rtol=0.3,
                                   atol=0.1 * np.abs(actual).max())


# ----------------------------------------------------------------------- weights
@pytest.mark.parametrize("mapping", ["exp_minmax", "sigmoid"])
def test_weights_monotone_mean_one(mapping):
    scores = jax.random.normal(jax.random.key(0), (50,))
    w = np.asarray(influence_weights(scores, mapping))
    assert np.all(w > 0)
    np.testing.assert_allclose(w.mean(), 1.0, rtol=1e-6)
    order = np.argsort(np.asarray(scores))  # most helpful (lowest score) first
    assert np.all(np.diff(w[order]) <= 1e-7) and w[order[0]] > w[order[-1]]
    flipped = np.asarray(influence_weights(-scores, mapping, higher_is_helpful=True))
    np.testing.assert_allclose(flipped, w, rtol=1e-6)
    # A larger temperature flattens the weights.
    w_hot = np.asarray(influence_weights(scores, mapping, temperature=10.0))
    assert w_hot.std() < w.std()


def test_weights_exp_minmax_matches_authors_formula():
    scores = jnp.array([3.0, -1.0, 0.5, 2.0])
    h = -np.asarray(scores)
    u = 2 * (h - h.min()) / (h.max() - h.min()) - 1
    np.testing.assert_allclose(influence_weights(scores, normalize=False), np.exp(u),
                               rtol=1e-6)
    np.testing.assert_allclose(influence_weights(scores), np.exp(u) / np.exp(u).mean(),
                               rtol=1e-6)


@pytest.mark.parametrize("mapping", ["exp_minmax", "sigmoid"])
def test_weights_constant_scores_are_ones(mapping):
    w = jax.jit(lambda s: influence_weights(s, mapping))(jnp.full((7,), 2.5))
    np.testing.assert_array_equal(w, np.ones(7))


def test_weights_bad_inputs():
    s = jnp.zeros(4)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        influence_weights(s, temperature=0.0)
    with pytest.raises(ValueError, match=r"mapping must be one of \['exp_minmax', 'sigmoid'\]"):
        influence_weights(s, "softmax")
    with pytest.raises(ValueError, match="scores must have rank 1"):
        influence_weights(jnp.zeros((2, 2)))
    with pytest.raises(TypeError, match="scores must have a floating dtype"):
        influence_weights(jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match="scores must be finite"):
        influence_weights(jnp.array([0.0, jnp.nan]))


# ---------------------------------------------------------- usefulness: label noise
def test_weights_separate_flipped_labels():
    """30% flipped labels in logistic regression; clean validation set. Influence weights
    rank clean training points above flipped ones (AUROC well above chance)."""
    rng = np.random.default_rng(0)
    d, c, n, n_val = 10, 3, 300, 300
    centers = rng.normal(size=(c, d)) * 1.5
    y_all = rng.integers(0, c, n + n_val)
    x_all = centers[y_all] + rng.normal(size=(n + n_val, d))
    y_tr = y_all[:n].copy()
    flipped = rng.random(n) < 0.3
    y_tr[flipped] = (y_tr[flipped] + rng.integers(1, c, flipped.sum())) % c
    train = {"x": jnp.asarray(x_all[:n], jnp.float32), "y": jnp.asarray(y_tr, jnp.int32)}
    val = {"x": jnp.asarray(x_all[n:], jnp.float32), "y": jnp.asarray(y_all[n:], jnp.int32)}
    l2 = 1e-2
    theta, gnorm = jax.jit(fit_logreg)(train, l2, jnp.zeros((d + 1, c)))
    assert float(gnorm) < 1e-4
    scores, _ = jax.jit(lambda th: influence_scores(lr_loss, th, train, val, method="cg",
                                                    damping=l2))(theta)
    w = np.asarray(influence_weights(scores))
    auroc = roc_auc_score(~flipped, w)  # clean points should weigh more
    print(f"label noise: AUROC(clean vs flipped by weight) = {auroc:.3f}")
    assert auroc > 0.85, f"AUROC {auroc:.3f}"
    assert w[~flipped].mean() > w[flipped].mean()
