"""NaN/Inf policy and numerical traps (see docs/RELIABILITY.md).

* Concrete NaN inputs to functions that validate values raise eagerly.
* Under jit, ``kdjax.checked`` (checkify) reports NaN inputs, and a checked trace never
  leaks into (or borrows from) the plain jit cache of the same function.
* Known traps stay finite in value and gradient: tiny Sinkhorn epsilon, empty classes in
  conditional losses, rank-deficient covariances, zero norms, huge logits, bf16 inputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax import influence
from kdjax import losses as L


def _f(*shape, seed=0, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _assert_finite_value_and_grad(fn, *args, argnums=(0,)):
    value, grads = jax.value_and_grad(fn, argnums=argnums)(*args)
    assert np.isfinite(np.asarray(value, np.float64)), value
    for g in grads:
        g = np.asarray(g, np.float64)
        assert np.isfinite(g).all(), f"{(~np.isfinite(g)).sum()} non-finite gradient entries"
    return value, grads


LAB8 = jnp.array([0, 1, 2, 0, 1, 2, 0, 1], jnp.int32)

# Pairwise losses over (student, teacher) batches [8, 6] (logits: [8, 3]).
PAIR_LOSSES = {
    "kd": (L.kd, (8, 3)),
    "dkd": (lambda s, t: L.dkd(s, t, LAB8), (8, 3)),
    "dist": (L.dist, (8, 3)),
    "fitnet": (L.fitnet, (8, 6)),
    "attention_transfer": (L.attention_transfer, (8, 4, 4, 2)),
    "nst": (L.nst, (8, 4, 4, 2)),
    "similarity_preserving": (L.similarity_preserving, (8, 6)),
    "correlation_congruence": (L.correlation_congruence, (8, 6)),
    "rkd": (L.rkd, (8, 6)),
    "pkt": (L.pkt, (8, 6)),
    "crd": (L.crd, (8, 6)),
    "space_similarity": (L.space_similarity, (8, 6)),
    "cosine_distillation": (L.cosine_distillation, (8, 6)),
    "coss": (L.coss, (8, 6)),
    "mmd": (L.mmd, (8, 6)),
    "mmd_rbf": (functools.partial(L.mmd, kernel="rbf"), (8, 6)),
    "gaussian_w2": (L.gaussian_w2, (8, 6)),
    "gaussian_kl": (L.gaussian_kl, (8, 6)),
    "sinkhorn": (L.sinkhorn, (8, 6)),
    "sinkhorn_divergence": (L.sinkhorn_divergence, (8, 6)),
    "sliced_wasserstein": (functools.partial(L.sliced_wasserstein,
                                             key=jax.random.PRNGKey(0)), (8, 6)),
    "exact_ot": (L.exact_ot, (8, 6)),
}


# ---- checkify path ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["kd", "dkd", "fitnet", "similarity_preserving", "rkd",
                                  "coss", "mmd", "gaussian_w2",
                                  pytest.param("sinkhorn_divergence", marks=pytest.mark.slow)])
def test_checked_jit_reports_nan_inputs(name):
    fn, shape = PAIR_LOSSES[name]
    s, t = _f(*shape, seed=1), _f(*shape, seed=2)
    bad = s.at[(0,) * len(shape)].set(jnp.nan)
    run = kdjax.checked(jax.jit(fn))
    err, _ = run(s, t)
    assert err.get() is None, err.get()   # no false positive on clean inputs
    err, _ = run(bad, t)
    msg = err.get()
    assert msg is not None and ("nan" in msg.lower()), msg
    with pytest.raises(Exception, match=r"(?i)nan"):
        err.throw()


def test_checked_dkd_has_no_false_positive_on_clean_inputs():
    # dkd masks the target class with -inf; 0 log 0 is taken as 0 without ever forming
    # 0 * (-inf), so checkify's nan_checks see no NaN on clean inputs
    fn, shape = PAIR_LOSSES["dkd"]
    err, _ = kdjax.checked(jax.jit(fn))(_f(*shape, seed=1), _f(*shape, seed=2))
    assert err.get() is None, err.get()


def test_distribution_losses_name_the_nan_argument_under_checked_jit():
    # distribution losses check their inputs explicitly (check_finite -> checkify.check)
    x, y = _f(8, 6, seed=1), _f(8, 6, seed=2)
    err, _ = kdjax.checked(jax.jit(L.mmd))(x, y.at[3, 1].set(jnp.inf))
    assert "y must be finite" in err.get()


def test_concrete_nan_inputs_raise_eagerly_where_values_are_checked():
    x, y = _f(8, 6, seed=1), _f(8, 6, seed=2)
    with pytest.raises(ValueError, match=r"x must be finite, got 2 NaN/Inf entries"):
        L.mmd(x.at[0, 0].set(jnp.nan).at[1, 1].set(jnp.inf), y)
    with pytest.raises(ValueError, match=r"scores must be finite"):
        influence.influence_weights(jnp.array([0.1, jnp.nan, 0.3]))


def test_checked_trace_does_not_poison_the_plain_jit_cache():
    # Regression: checked(jax.jit(f)) used to leave a trace with checkify.check in f's
    # jit cache, so a later plain jax.jit(f) with the same shapes raised.
    x, y = _f(5, 3, seed=3), _f(5, 3, seed=4)
    fn = functools.partial(L.mmd, kernel="rbf", bandwidth=1.5)  # fresh cache key
    err, out_checked = kdjax.checked(jax.jit(fn))(x, y)
    assert err.get() is None
    out_plain = jax.jit(fn)(x, y)
    np.testing.assert_allclose(float(out_plain), float(out_checked), rtol=1e-6)
    # and the other order: a plain trace first must not drop the value checks
    fn2 = functools.partial(L.gaussian_w2, eig_floor=2e-6)
    jax.jit(fn2)(x, y)
    err, _ = kdjax.checked(jax.jit(fn2))(x.at[0, 0].set(jnp.nan), y)
    assert err.get() is not None and "x must be finite" in err.get()


# ---- traps --------------------------------------------------------------------------
@pytest.mark.parametrize("fn,epsilon", [
    (L.sinkhorn, 1e-4),
    pytest.param(L.sinkhorn, 1e-3, marks=pytest.mark.slow),
    pytest.param(L.sinkhorn_divergence, 1e-4, marks=pytest.mark.slow)],
    ids=["ot-1e-4", "ot-1e-3", "div-1e-4"])
def test_tiny_sinkhorn_epsilon_stays_finite(fn, epsilon):
    x, y = _f(16, 4, seed=1), _f(16, 4, seed=2, scale=3.0) + 2.0
    value, _ = _assert_finite_value_and_grad(
        lambda a, b: fn(a, b, epsilon=epsilon, max_iterations=200), x, y, argnums=(0, 1))
    assert float(value) >= -1e-4


@pytest.mark.parametrize("distance", [
    pytest.param(L.gaussian_w2, marks=pytest.mark.slow), L.gaussian_kl, L.mmd, L.exact_ot,
    pytest.param(L.sinkhorn_divergence, marks=pytest.mark.slow),
    pytest.param(functools.partial(L.sliced_wasserstein, key=jax.random.PRNGKey(0)),
                 marks=pytest.mark.slow)],
    ids=["gaussian_w2", "gaussian_kl", "mmd", "exact_ot", "sinkhorn_divergence", "sliced"])
def test_conditional_with_empty_classes_stays_finite(distance):
    x, y = _f(8, 3, seed=1), _f(8, 3, seed=2)
    # classes 2..5 absent from both sides
    lx = jnp.array([0, 0, 0, 0, 0, 0, 1, 1], jnp.int32)
    ly = jnp.array([0, 0, 0, 0, 1, 1, 1, 1], jnp.int32)
    value, _ = _assert_finite_value_and_grad(
        lambda a: L.conditional(distance, a, y, lx, ly, num_classes=6), x)
    # absent classes contribute exactly 0: adding classes to num_classes changes nothing
    ref = L.conditional(distance, x, y, lx, ly, num_classes=2)
    np.testing.assert_allclose(float(value), float(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("distance", [
    L.gaussian_w2,   # its d x d path: zero class covariance, repeated eigenvalues
    L.gaussian_kl, L.mmd], ids=["gaussian_w2", "gaussian_kl", "mmd"])
def test_conditional_with_a_singleton_class_has_finite_gradients(distance):
    x, y = _f(8, 3, seed=1), _f(8, 3, seed=2)
    lx = jnp.array([0, 0, 0, 0, 0, 0, 0, 1], jnp.int32)   # class 1: one point in x
    ly = jnp.array([0, 0, 0, 0, 1, 1, 1, 1], jnp.int32)
    _assert_finite_value_and_grad(
        lambda a: L.conditional(distance, a, y, lx, ly, num_classes=3), x)


@pytest.mark.parametrize("fn", [pytest.param(L.gaussian_w2, marks=pytest.mark.slow),
                                functools.partial(L.gaussian_w2, diagonal=True),
                                L.gaussian_kl], ids=["w2", "w2_diag", "kl"])
def test_rank_deficient_covariances_stay_finite(fn):
    # n < d and duplicated/constant columns: singular covariances on both sides
    x = _f(4, 10, seed=1).at[:, 5:].set(0.0)
    y = jnp.concatenate([_f(4, 5, seed=2)] * 2, axis=1)
    _assert_finite_value_and_grad(fn, x, y, argnums=(0, 1))
    # identical degenerate clouds: (near) zero, and finite gradients
    v, _ = _assert_finite_value_and_grad(fn, x, x + 0.0, argnums=(0,))
    assert abs(float(v)) < 1e-3


@pytest.mark.parametrize("name", ["similarity_preserving", "correlation_congruence", "rkd",
                                  "pkt", "crd", "space_similarity", "cosine_distillation",
                                  "coss", "attention_transfer", "nst", "dist"])
def test_zero_norms_stay_finite(name):
    fn, shape = PAIR_LOSSES[name]
    s = _f(*shape, seed=1).at[0].set(0.0).at[1].set(0.0)   # zero rows (duplicates too)
    t = _f(*shape, seed=2).at[2].set(0.0)
    _assert_finite_value_and_grad(fn, s, t, argnums=(0,))
    _assert_finite_value_and_grad(fn, jnp.zeros(shape), jnp.zeros(shape), argnums=(0,))


@pytest.mark.parametrize("name", ["kd", "dkd", "dist"])
@pytest.mark.parametrize("scale", [1e3, 1e5])
def test_huge_logits_stay_finite(name, scale):
    fn, shape = PAIR_LOSSES[name]
    s, t = _f(*shape, seed=1, scale=scale), _f(*shape, seed=2, scale=scale)
    value, _ = _assert_finite_value_and_grad(fn, s, t, argnums=(0,))
    assert float(value) >= 0
    # and identical huge logits give ~0
    v0 = fn(s, s)
    assert abs(float(v0)) < 1e-3


def test_kd_with_saturated_teacher_has_finite_gradient_and_correct_limit():
    # teacher one-hot to float precision: KD -> tau^2 * CE(student, argmax teacher)
    s = _f(4, 5, seed=1)
    t = jnp.zeros((4, 5)).at[jnp.arange(4), jnp.array([0, 1, 2, 3])].set(1e6)
    v, _ = _assert_finite_value_and_grad(lambda a: L.kd(a, t, 1.0), s)
    ce = L.cross_entropy(s, jnp.array([0, 1, 2, 3]))
    np.testing.assert_allclose(float(v), float(ce), rtol=1e-5)


BF16 = ["kd", "dkd", "dist", "fitnet", "attention_transfer", "nst", "similarity_preserving",
        "correlation_congruence", "rkd", "pkt", "crd", "space_similarity", "coss", "mmd",
        pytest.param("gaussian_w2", marks=pytest.mark.slow),
        pytest.param("sinkhorn_divergence", marks=pytest.mark.slow),
        pytest.param("sliced_wasserstein", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", BF16)
def test_bf16_inputs_give_finite_float32_loss_and_finite_gradients(name):
    fn, shape = PAIR_LOSSES[name]
    s32, t32 = _f(*shape, seed=1), _f(*shape, seed=2)
    s, t = s32.astype(jnp.bfloat16), t32.astype(jnp.bfloat16)
    value, (gs,) = _assert_finite_value_and_grad(fn, s, t, argnums=(0,))
    assert value.dtype == jnp.float32
    assert gs.dtype == jnp.bfloat16
    # the bf16 loss is the float32 loss of the rounded inputs (computed in float32)
    ref = fn(s.astype(jnp.float32), t.astype(jnp.float32))
    np.testing.assert_allclose(float(value), float(ref), rtol=2e-2, atol=1e-3)


# ------------------------------------------------------------------ influence solvers
@pytest.mark.parametrize("method,opts", [("cg", {}), ("lissa", {"scale": 2.0}),
                                         ("arnoldi", {"rank": 6}), ("direct", {})])
def test_inverse_hvp_degenerate_systems_stay_finite(method, opts):
    """A zero right-hand side gives x = 0 and a zero residual (no 0/0); the all-zero
    curvature (a dead network) gives x = b / damping exactly, every Krylov step a
    breakdown for Arnoldi, and no NaN anywhere in the diagnostics."""
    zero_h = lambda v: jnp.zeros_like(v)  # noqa: E731
    b = _f(6, seed=3)
    x0, d0 = influence.inverse_hvp(lambda v: 2.0 * v, jnp.zeros(6), method, 0.5, **opts)
    np.testing.assert_array_equal(np.asarray(x0), 0.0)
    assert float(d0.relative_residual) == 0.0 and bool(d0.converged)
    x, d = influence.inverse_hvp(zero_h, b, method, 0.5, **opts)
    tol = 1e-3 if method == "lissa" else 1e-6
    np.testing.assert_allclose(np.asarray(x), np.asarray(b) / 0.5, rtol=tol, atol=tol)
    for leaf in jax.tree_util.tree_leaves(d):
        assert np.isfinite(np.asarray(leaf, np.float64)).all(), (method, d)
    if method == "arnoldi":
        assert int(d.breakdowns) == 6
