"""Tests of kdjax.losses.distribution against independent references (POT, scipy, numpy)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

from kdjax import losses as L
from kdjax.losses import distribution as D

ot = pytest.importorskip("ot")


def _rand(seed, n, d, shift=0.0, scale=1.0):
    r = np.random.default_rng(seed)
    return jnp.asarray(shift + scale * r.normal(size=(n, d)), jnp.float32)


def _sqdist_np(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)


X = _rand(0, 12, 5)
Y = _rand(1, 12, 5, shift=0.7)


# --- exact OT -------------------------------------------------------------------------------

def test_exact_ot_matches_pot_and_bruteforce():
    x, y = _rand(2, 5, 3), _rand(3, 5, 3, shift=0.5)
    c = _sqdist_np(x, y)
    brute = min(np.mean(c[np.arange(5), list(p)]) for p in itertools.permutations(range(5)))
    val = float(D.exact_ot(x, y))
    np.testing.assert_allclose(val, brute, rtol=1e-5)
    np.testing.assert_allclose(val, ot.emd2(np.ones(5) / 5, np.ones(5) / 5, c), rtol=1e-5)


def test_exact_ot_weighted_unequal_sizes_matches_pot():
    x, y = _rand(4, 7, 3), _rand(5, 4, 3, shift=1.0)
    r = np.random.default_rng(6)
    a, b = r.uniform(0.1, 1, 7), r.uniform(0.1, 1, 4)
    val, plan = D.exact_ot(x, y, jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                           return_plan=True)
    a, b = a / a.sum(), b / b.sum()
    np.testing.assert_allclose(float(val), ot.emd2(a, b, _sqdist_np(x, y)), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(plan).sum(1), a, atol=1e-6)
    np.testing.assert_allclose(np.asarray(plan).sum(0), b, atol=1e-6)


def test_exact_ot_jit_vmap_and_gradient():
    xs = jnp.stack([_rand(10 + i, 6, 3) for i in range(3)])
    ys = jnp.stack([_rand(20 + i, 6, 3, shift=0.3) for i in range(3)])
    batched = jax.jit(jax.vmap(D.exact_ot))(xs, ys)
    single = [float(D.exact_ot(xs[i], ys[i])) for i in range(3)]
    np.testing.assert_allclose(np.asarray(batched), single, rtol=1e-5)
    # Envelope theorem: for a unique optimal plan the gradient is that of <P*, C>.
    check_grads(lambda x, y: D.exact_ot(x, y), (xs[0], ys[0]), order=1, modes=["rev"],
                eps=1e-3, atol=2e-2, rtol=2e-2)



def test_exact_ot_under_a_sharded_jit_and_vmap(n_devices):
    """Exact OT's host solver (jax.pure_callback, public API) inside an 8-device sharded
    jit gives the unsharded value and gradient (global-batch semantics), and a vmapped
    call with shared weights equals the loop."""
    mesh = jax.make_mesh((n_devices,), ("data",))
    x, y = _rand(30, 8 * n_devices, 3), _rand(31, 8 * n_devices, 3, shift=0.4)
    xs, ys = (jax.device_put(v, NamedSharding(mesh, P("data"))) for v in (x, y))
    value, grad = jax.block_until_ready(jax.jit(jax.value_and_grad(D.exact_ot))(xs, ys))
    # same value and gradient as the unsharded eager call (global-batch semantics)
    ref, ref_grad = jax.value_and_grad(D.exact_ot)(x, y)
    np.testing.assert_allclose(float(value), float(ref), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-5, atol=1e-7)
    # vmapped over a batch of problems with shared (unmapped) weights
    xb = jnp.stack([x, 2.0 * x])
    w = jnp.linspace(0.5, 1.5, x.shape[0])
    batched = jax.jit(jax.vmap(D.exact_ot, in_axes=(0, None, None, None)))(xb, y, w, w)
    np.testing.assert_allclose(np.asarray(batched),
                               [float(D.exact_ot(v, y, w, w)) for v in xb], rtol=1e-6)


# --- Sinkhorn ---------------------------------------------------------------------------------

def _pot_reg_cost(x, y, eps, a=None, b=None):
    c = _sqdist_np(x, y)
    a = np.full(len(c), 1 / len(c)) if a is None else a
    b = np.full(c.shape[1], 1 / c.shape[1]) if b is None else b
    plan = ot.sinkhorn(a, b, c, reg=eps, method="sinkhorn_log", numItermax=5000,
                       stopThr=1e-9)
    kl = np.sum(np.where(plan > 0, plan * np.log(plan / np.outer(a, b) + 1e-300), 0.0))
    return np.sum(plan * c) + eps * kl


@pytest.mark.parametrize("epsilon,relative_to", [
    (0.1, "std"), (0.1, "mean"), pytest.param(0.01, "std", marks=pytest.mark.slow),
    pytest.param(0.01, "mean", marks=pytest.mark.slow)])
def test_sinkhorn_matches_pot(epsilon, relative_to):
    # float32 marginal errors floor near 1e-5 at small epsilon
    val, diag = D.sinkhorn(X, Y, epsilon=epsilon, threshold=1e-5 if epsilon > 0.05 else 1e-4,
                           max_iterations=5000, relative_to=relative_to,
                           return_diagnostics=True)
    assert bool(diag["converged"])
    eps = float(diag["epsilon"])
    c = _sqdist_np(X, Y)
    np.testing.assert_allclose(eps, epsilon * getattr(c, relative_to)(), rtol=1e-4)
    np.testing.assert_allclose(float(val), _pot_reg_cost(X, Y, eps), rtol=2e-3)


def test_epsilon_scale_is_weighted_and_floored():
    a = np.random.default_rng(5).uniform(0.1, 1.0, 12)
    b = np.r_[np.zeros(3), np.random.default_rng(6).uniform(0.1, 1.0, 9)]
    an, bn = a / a.sum(), b / b.sum()
    c = _sqdist_np(X, Y)
    mean = an @ c @ bn
    std = np.sqrt(an @ (c - mean) ** 2 @ bn)
    for rel, ref in (("std", std), ("mean", mean)):
        _, diag = D.sinkhorn(X, Y, a, b, epsilon=0.2, relative_to=rel, return_diagnostics=True)
        np.testing.assert_allclose(float(diag["epsilon"]), 0.2 * ref, rtol=1e-4, err_msg=rel)
    # one point each: all costs equal, std = 0 -> floor 1e-3 x mean; value = the cost
    v, diag = D.sinkhorn(X[:1], Y[:1], return_diagnostics=True)
    np.testing.assert_allclose(float(diag["epsilon"]), 0.05 * 1e-3 * c[0, 0], rtol=1e-4)
    np.testing.assert_allclose(float(v), c[0, 0], rtol=1e-4)


def _separated_clouds(n=64, d=512, k=8, sep=0.5):
    """k clusters in 512-d, centres ~sep*sqrt(d) apart, unit-variance noise per point:
    the costs share a large common part (mean ~ 630) and spread little (std ~ 60)."""
    r = np.random.default_rng(0)
    centres = r.normal(size=(k, d)) * sep / np.sqrt(2)
    lab = np.arange(n) % k
    x = centres[lab] + r.normal(size=(n, d)) / np.sqrt(2)
    y = centres[lab] + r.normal(size=(n, d)) / np.sqrt(2)
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def test_default_epsilon_gives_an_informative_plan():
    # At the default epsilon (0.05 x std of the costs) the plan is far from the
    # independent coupling a b^T (entropy log(n m)) and OT_eps is within 5 % of exact
    # OT; 0.05 x mean (the old scale) blurs the plan over the clusters.
    x, y = _separated_clouds()
    n = x.shape[0]
    w = float(D.exact_ot(x, y))
    val, diag = D.sinkhorn(x, y, return_diagnostics=True)
    assert bool(diag["converged"])
    plan = ot.sinkhorn(np.full(n, 1 / n), np.full(n, 1 / n), _sqdist_np(x, y),
                       reg=float(diag["epsilon"]), method="sinkhorn_log", numItermax=20000,
                       stopThr=1e-9)
    entropy = -np.sum(np.where(plan > 0, plan * np.log(plan), 0.0))
    assert entropy < np.log(n * n) - 3.0, entropy
    assert w <= float(val) <= 1.05 * w, (float(val), w)
    blurred = float(D.sinkhorn(x, y, relative_to="mean"))
    assert blurred > 1.10 * w, (blurred, w)


def test_sinkhorn_divergence_matches_pot_zero_at_equal_positive_otherwise():
    val, diag = D.sinkhorn_divergence(X, Y, epsilon=0.1, threshold=1e-5,
                                      return_diagnostics=True)
    eps = float(diag["epsilon"])
    ref = _pot_reg_cost(X, Y, eps) - 0.5 * (_pot_reg_cost(X, X, eps) + _pot_reg_cost(Y, Y, eps))
    np.testing.assert_allclose(float(val), ref, rtol=5e-3)
    assert bool(diag["converged"]) and float(val) > 0.1
    assert abs(float(D.sinkhorn_divergence(X, X, epsilon=0.1, threshold=1e-5))) < 1e-4


@pytest.mark.slow
def test_sinkhorn_divergence_static_b_same_gradient():
    # static_b: value shifted by OT(y, y)/2, gradient in x unchanged.
    g1 = jax.grad(lambda x: D.sinkhorn_divergence(x, Y, threshold=1e-5))(X)
    g2 = jax.grad(lambda x: D.sinkhorn_divergence(x, Y, threshold=1e-5, static_b=True))(X)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), atol=1e-4)


def test_sinkhorn_unconverged_is_detectable():
    _, diag = D.sinkhorn(X, Y, epsilon=1e-3, max_iterations=10, return_diagnostics=True)
    assert not bool(diag["converged"]) and float(diag["error"]) > 1e-3


@pytest.mark.slow
def test_sinkhorn_unroll_matches_implicit():
    gi = jax.grad(lambda x: D.sinkhorn(x, Y, epsilon=0.2, threshold=1e-6))(X)
    gu = jax.grad(lambda x: D.sinkhorn(x, Y, epsilon=0.2, threshold=1e-6,
                                       differentiation="unroll"))(X)
    np.testing.assert_allclose(np.asarray(gi), np.asarray(gu), atol=2e-3, rtol=2e-3)


# --- sliced ----------------------------------------------

def test_sliced_wasserstein_matches_numpy_projection_reference():
    key = jax.random.key(3)
    val = D.sliced_wasserstein(X, Y, key=key, num_projections=16)
    theta = np.asarray(jax.random.normal(key, (16, X.shape[1])), np.float64)
    theta /= np.linalg.norm(theta, axis=1, keepdims=True)
    px, py = np.sort(np.asarray(X) @ theta.T, 0), np.sort(np.asarray(Y) @ theta.T, 0)
    np.testing.assert_allclose(float(val), np.mean((px - py) ** 2), rtol=1e-4)
    # different key -> different estimate; same key -> deterministic
    assert float(val) == float(D.sliced_wasserstein(X, Y, key=key, num_projections=16))
    assert float(val) != float(D.sliced_wasserstein(X, Y, key=jax.random.key(4),
                                                    num_projections=16))


# --- Gaussian ---------------------------------------------------------------------------------

def _bures_np(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    sx, sy = np.cov(x.T, bias=True), np.cov(y.T, bias=True)
    r = scipy.linalg.sqrtm(sx)
    cross = np.trace(scipy.linalg.sqrtm(r @ sy @ r)).real
    return np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(sx) + np.trace(sy) - 2 * cross


@pytest.mark.parametrize("n,d", [(40, 4), (6, 10)])  # d x d path and rank-deficient path
def test_gaussian_w2_matches_sqrtm_closed_form(n, d):
    x, y = _rand(7, n, d), _rand(8, n, d, shift=0.5, scale=1.5)
    np.testing.assert_allclose(float(D.gaussian_w2(x, y)), _bures_np(x, y), rtol=2e-4, atol=2e-4)
    g = jax.grad(D.gaussian_w2, (0, 1))(x, y)
    assert all(bool(jnp.all(jnp.isfinite(t))) for t in g)


def test_gaussian_w2_diagonal_and_gradcheck():
    x, y = _rand(9, 30, 4), _rand(10, 30, 4, shift=1.0, scale=2.0)
    xn, yn = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ref = np.sum((xn.mean(0) - yn.mean(0)) ** 2) + np.sum((xn.std(0) - yn.std(0)) ** 2)
    np.testing.assert_allclose(float(D.gaussian_w2(x, y, diagonal=True)), ref, rtol=1e-5)
    check_grads(lambda a, b: D.gaussian_w2(a, b), (x, y), order=1, modes=["rev"],
                eps=1e-2, atol=1e-2, rtol=1e-2)


def test_gaussian_kl_matches_closed_form_direction_student_teacher():
    x, y = _rand(11, 50, 3, scale=0.5), _rand(12, 50, 3, shift=0.2, scale=2.0)
    xn, yn = np.asarray(x, np.float64), np.asarray(y, np.float64)
    vx, vy = xn.var(0), yn.var(0)
    fl = 1e-6 * 0.5 * np.mean(vx + vy)
    vx, vy = vx + fl, vy + fl
    ref = 0.5 * np.sum(vx / vy + (xn.mean(0) - yn.mean(0)) ** 2 / vy - 1 + np.log(vy / vx))
    np.testing.assert_allclose(float(D.gaussian_kl(x, y)), ref, rtol=1e-5)
    assert float(D.gaussian_kl(x, y)) != pytest.approx(float(D.gaussian_kl(y, x)), rel=1e-2)
    check_grads(lambda a: D.gaussian_kl(a, y), (x,), order=1, modes=["rev"], eps=1e-2,
                atol=1e-2, rtol=1e-2)


# --- MMD --------------------------------------------------------------------------------------

def _mmd_np(x, y, sigmas):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    tot = 0.0
    for s in sigmas:
        k = lambda u, v: np.exp(-np.sum((u - v) ** 2) / (2 * s * s))  # noqa: E731
        kxx = np.mean([[k(u, v) for v in x] for u in x])
        kyy = np.mean([[k(u, v) for v in y] for u in y])
        kxy = np.mean([[k(u, v) for v in y] for u in x])
        tot += kxx + kyy - 2 * kxy
    return tot


def test_mmd_matches_numpy_double_loop():
    xn, yn = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    dist = np.concatenate([np.sqrt(_sqdist_np(a, b)).ravel()
                           for a, b in ((xn, xn), (yn, yn), (xn, yn))])
    np.testing.assert_allclose(float(D.mmd(X, Y, kernel="rbf")), _mmd_np(X, Y, [dist.mean()]),
                               rtol=1e-4)
    np.testing.assert_allclose(float(D.mmd(X, Y, kernel="rbf", bandwidth="median")),
                               _mmd_np(X, Y, [np.median(dist)]), rtol=1e-4)
    np.testing.assert_allclose(float(D.mmd(X, Y, kernel="rbf", bandwidth=[0.5, 2.0])),
                               _mmd_np(X, Y, [0.5, 2.0]), rtol=1e-4)
    np.testing.assert_allclose(float(D.mmd(X, Y)), np.sum((xn.mean(0) - yn.mean(0)) ** 2),
                               rtol=1e-5)
    check_grads(lambda a: D.mmd(a, Y, kernel="rbf", bandwidth=1.5), (X,), order=1,
                modes=["rev"], eps=1e-2, atol=1e-3, rtol=1e-2)


# --- invariances ----------------------------------------------

CHEAP = {
    "exact_ot": D.exact_ot,
    "gaussian_w2": D.gaussian_w2,
    "gaussian_w2_diag": lambda x, y, a=None, b=None: D.gaussian_w2(x, y, a, b, diagonal=True),
    "gaussian_kl": D.gaussian_kl,
    "mmd_rbf": lambda x, y, a=None, b=None: D.mmd(x, y, a, b, kernel="rbf"),
    "sinkhorn_divergence": D.sinkhorn_divergence,
    "sliced": lambda x, y, a=None, b=None: D.sliced_wasserstein(x, y, a, b,
                                                                  key=jax.random.key(0)),
}


def test_permutation_invariance_and_zero_at_equal():
    perm = np.random.default_rng(0).permutation(X.shape[0])
    for name, fn in CHEAP.items():
        fn = jax.jit(fn)
        v = float(fn(X, Y))
        np.testing.assert_allclose(float(fn(X[perm], Y)), v, rtol=1e-4, err_msg=name)
        assert v > 1e-3, name
        assert abs(float(fn(X, X))) < 1e-3 * v + 1e-5, name


# --- robustness ----------------------------------------------

def _all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(t))) for t in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("case", ["large_norm", pytest.param("bf16", marks=pytest.mark.slow),
                                  pytest.param("n_lt_d", marks=pytest.mark.slow),
                                  pytest.param("dead_dims", marks=pytest.mark.slow)])
def test_values_and_grads_finite(case):
    if case == "large_norm":  # norms ~1e3, differences O(1)
        x, y = _rand(30, 16, 8, shift=300.0), _rand(31, 16, 8, shift=300.5)
    elif case == "n_lt_d":
        x, y = _rand(30, 6, 32), _rand(31, 6, 32, shift=0.3)
    elif case == "bf16":
        x, y = _rand(30, 16, 8).astype(jnp.bfloat16), _rand(31, 16, 8, 0.3).astype(jnp.bfloat16)
    else:
        x, y = _rand(30, 16, 8), _rand(31, 16, 8, shift=0.3)
        x, y = x.at[:, :3].set(0.0), y.at[:, 2:4].set(1.0)
    fns = dict(CHEAP, sinkhorn_small_eps=lambda x, y: D.sinkhorn(x, y, epsilon=1e-3,
                                                                max_iterations=200),
               sinkhorn_small_eps_mean=lambda x, y: D.sinkhorn(
                   x, y, epsilon=1e-3, relative_to="mean", max_iterations=200),
               sinkhorn_divergence_small_eps=lambda x, y: D.sinkhorn_divergence(
                   x, y, epsilon=1e-3, max_iterations=200))
    for name, fn in fns.items():
        v, g = jax.jit(jax.value_and_grad(lambda a, b: fn(a, b), (0, 1)))(x, y)
        assert v.dtype == jnp.float32 and _all_finite((v, g)), (case, name)
    if case == "large_norm":  # centring keeps the values right
        xs, ys = x - 300.0, y - 300.0
        for name in ("exact_ot", "gaussian_w2", "mmd_rbf"):
            np.testing.assert_allclose(float(CHEAP[name](x, y)), float(CHEAP[name](xs, ys)),
                                       rtol=2e-2, err_msg=name)


# --- conditional ----------------------------------------------

LABELS = jnp.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 0])


@pytest.mark.parametrize("name", ["exact_ot", "gaussian_w2", "mmd_rbf"])
def test_conditional_equals_sum_over_class_subsets(name):
    fn = CHEAP[name]
    val = D.conditional(fn, X, Y, LABELS, num_classes=5)
    lab = np.asarray(LABELS)
    per = {c: float(fn(X[lab == c], Y[lab == c])) for c in range(3)}
    np.testing.assert_allclose(float(val), sum(per.values()), rtol=1e-4)
    freq = D.conditional(fn, X, Y, LABELS, num_classes=5, weighting="frequency")
    np.testing.assert_allclose(float(freq), sum(np.mean(lab == c) * v for c, v in per.items()),
                               rtol=1e-4)


@pytest.mark.parametrize("names", [("exact_ot", "gaussian_w2", "mmd_rbf"), pytest.param(
    ("gaussian_w2_diag", "gaussian_kl", "sinkhorn_divergence", "sliced"),
    marks=pytest.mark.slow)])
def test_conditional_one_class_present(names):
    one = jnp.zeros(12, jnp.int32)
    for name in names:
        fn = CHEAP[name]
        v, g = jax.jit(jax.value_and_grad(
            lambda a: D.conditional(fn, a, Y, one, num_classes=10)))(X)
        np.testing.assert_allclose(float(v), float(fn(X, Y)), rtol=2e-3, err_msg=name)
        assert _all_finite(g), name


def test_conditional_sinkhorn_diagnostics():
    val, diag = D.conditional(D.sinkhorn, X, Y, LABELS, num_classes=4,
                              return_diagnostics=True)
    assert diag["present"].tolist() == [True, True, True, False]
    assert bool(jnp.all(diag["converged"])) and np.isfinite(float(val))


# --- joint OT --------------------------------------------------------------------------------------

def test_joint_ot_matches_pot_on_joint_cost():
    zx, zy = _rand(40, 12, 3), _rand(41, 12, 3)
    cx = _sqdist_np(X, Y)
    for beta, label_cost in ((0.5, "sqeuclidean"), (1.0, "kl")):
        if label_cost == "sqeuclidean":
            cl = _sqdist_np(zx, zy)
        else:
            lp = np.asarray(jax.nn.log_softmax(zx), np.float64)
            lq = np.asarray(jax.nn.log_softmax(zy), np.float64)
            cl = (np.exp(lp)[:, None, :] * (lp[:, None, :] - lq[None, :, :])).sum(-1)
        c = cx / cx.max() + beta * cl
        ref = ot.emd2(np.ones(12) / 12, np.ones(12) / 12, c)
        val = D.joint_ot(X, Y, zx, zy, beta=beta, label_cost=label_cost)
        np.testing.assert_allclose(float(val), ref, rtol=1e-4)
    g = jax.grad(lambda x, z: D.joint_ot(x, Y, z, zy), (0, 1))(X, zx)
    assert _all_finite(g) and float(jnp.abs(g[0]).max()) > 0  # feature part is trained


# --- batch semantics on 8 devices ----------------------------------------------

@pytest.mark.parametrize("axis_type", [AxisType.Explicit,
                                       pytest.param(AxisType.Auto, marks=pytest.mark.slow)])
def test_global_and_per_device_semantics(n_devices, axis_type):
    mesh = jax.make_mesh((n_devices,), ("data",), axis_types=(axis_type,))
    x, y = _rand(50, 16, 4), _rand(51, 16, 4, shift=0.5)
    xs, ys = (jax.device_put(v, NamedSharding(mesh, P("data"))) for v in (x, y))
    rbf = CHEAP["mmd_rbf"]
    for fn in (D.exact_ot, rbf):
        np.testing.assert_allclose(float(jax.jit(fn)(xs, ys)), float(fn(x, y)), rtol=1e-5)
        per = float(L.per_device(fn, mesh)(xs, ys))
        shards = np.mean([float(fn(x[2 * i:2 * i + 2], y[2 * i:2 * i + 2]))
                          for i in range(n_devices)])
        np.testing.assert_allclose(per, shards, rtol=1e-5)
    # the exact-OT shard reference in numpy (assignment of 2 points)
    xn, yn = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ref = np.mean([ot.emd2(np.ones(2) / 2, np.ones(2) / 2, _sqdist_np(xn[2 * i:2 * i + 2],
                                                                      yn[2 * i:2 * i + 2]))
                   for i in range(n_devices)])
    np.testing.assert_allclose(float(L.per_device(D.exact_ot, mesh)(xs, ys)), ref, rtol=1e-5)
    # gradients: eagerly (no mesh context, where an Explicit mesh once failed to seed the
    # cotangent) and inside a jitted step under jax.set_mesh, equal to the shard loop's
    g_ref = jax.grad(lambda v: jnp.mean(jnp.stack(
        [rbf(v[2 * i:2 * i + 2], y[2 * i:2 * i + 2]) for i in range(n_devices)])))(x)
    g_eager = jax.grad(lambda v: L.per_device(rbf, mesh)(v, ys))(xs)
    with jax.set_mesh(mesh):
        g_ctx = jax.jit(jax.grad(lambda v: L.per_device(rbf, mesh)(v, ys)))(xs)
    np.testing.assert_allclose(g_eager, g_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g_ctx, g_ref, rtol=1e-4, atol=1e-5)


# --- errors ----------------------------------------------

def test_bad_inputs_raise_with_names():
    with pytest.raises(ValueError, match="feature dimension.*5 for x.*4 for y"):
        D.exact_ot(X, Y[:, :4])
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        D.sinkhorn(X, Y, epsilon=0.0)
    with pytest.raises(ValueError, match=r"kernel must be one of \['linear', 'rbf'\]"):
        D.mmd(X, Y, kernel="laplace")
    with pytest.raises(ValueError, match=r"labels_x must lie in \[0, 2\)"):
        D.conditional(D.mmd, X, Y, LABELS, num_classes=2)
    with pytest.raises(ValueError, match="differentiation must be one of"):
        D.sinkhorn(X, Y, differentiation="auto")
    with pytest.raises(ValueError,
                       match=r"relative_to must be one of \['mean', 'std'\], got 'max'"):
        D.sinkhorn_divergence(X, Y, relative_to="max")
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        D.gaussian_w2(jnp.ones((4, 2), jnp.int32), Y[:4, :2])
    with pytest.raises(ValueError, match="a must be >= 0"):
        D.exact_ot(X, Y, a=-jnp.ones(12))
    with pytest.raises(ValueError, match="x must be finite"):
        D.mmd(X.at[0, 0].set(jnp.nan), Y)
    with pytest.raises(ValueError, match="weighting must be one of"):
        D.conditional(D.mmd, X, Y, LABELS, num_classes=3, weighting="mean")
