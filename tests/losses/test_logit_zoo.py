"""DKD, DIST, logit standardisation and KD's ``standardize`` against numpy/torch references."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kdjax import losses

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")


def _reference():
    spec = importlib.util.spec_from_file_location(
        "make_reference_values", os.path.join(FIXTURES, "make_reference_values.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with open(os.path.join(FIXTURES, "zoo_reference_values.json")) as f:
        return mod.make_inputs(), json.load(f)["values"]


INPUTS, REF = _reference()


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_zscore(z):
    z = np.asarray(z, np.float64)
    return (z - z.mean(-1, keepdims=True)) / (z.std(-1, ddof=1, keepdims=True) + 1e-7)


def np_dkd(zs, zt, y, alpha=1.0, beta=8.0, tau=4.0):
    """Per-example DKD from the definitions (explicit target / non-target split)."""
    zs, zt = np.asarray(zs, np.float64) / tau, np.asarray(zt, np.float64) / tau
    out = []
    for i in range(len(y)):
        ps, pt = np.exp(np_log_softmax(zs[i])), np.exp(np_log_softmax(zt[i]))
        bs = np.array([ps[y[i]], 1 - ps[y[i]]])
        bt = np.array([pt[y[i]], 1 - pt[y[i]]])
        tckd = np.sum(bt * np.log(bt / bs))
        keep = np.arange(len(ps)) != y[i]
        qs, qt = ps[keep] / ps[keep].sum(), pt[keep] / pt[keep].sum()
        nckd = np.sum(qt * np.log(qt / qs))
        out.append(tau**2 * (alpha * tckd + beta * nckd))
    return np.array(out)


def np_pearson(a, b):
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def np_dist(zs, zt, beta=1.0, gamma=1.0, tau=1.0):
    ys = np.exp(np_log_softmax(np.asarray(zs, np.float64) / tau))
    yt = np.exp(np_log_softmax(np.asarray(zt, np.float64) / tau))
    return tau**2 * (beta * (1 - np_pearson(ys, yt).mean())
                     + gamma * (1 - np_pearson(ys.T, yt.T).mean()))


def _logits(seed, b=5, c=7, scale=3.0):
    r = np.random.default_rng(seed)
    return (scale * r.standard_normal((b, c))).astype(np.float32)


# --- numpy references -------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("alpha,beta,tau", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_matches_numpy(seed, alpha, beta, tau):
    zs, zt = _logits(seed), _logits(seed + 10)
    y = np.random.default_rng(seed).integers(0, 7, 5)
    got = losses.dkd(zs, zt, y, alpha, beta, tau, reduction="none")
    np.testing.assert_allclose(got, np_dkd(zs, zt, y, alpha, beta, tau), rtol=2e-5,
                               atol=1e-6)


def test_dkd_equals_kd_split_identity():
    """With alpha = beta = 1 and a two-class problem, NCKD is 0 and DKD = KD."""
    zs, zt = _logits(3, c=2), _logits(4, c=2)
    y = np.array([0, 1, 0, 1, 1])
    np.testing.assert_allclose(losses.dkd(zs, zt, y, 1.0, 1.0, 4.0),
                               losses.kd(zs, zt, 4.0), rtol=1e-5)


def test_dkd_weights_and_reductions():
    zs, zt, y = _logits(5), _logits(6), np.array([0, 1, 2, 3, 4])
    w = np.array([0.0, 1.0, 2.0, 0.5, 1.5], np.float32)
    per = np_dkd(zs, zt, y)
    np.testing.assert_allclose(losses.dkd(zs, zt, y, weights=w), np.mean(w * per),
                               rtol=2e-5)
    np.testing.assert_allclose(losses.dkd(zs, zt, y, reduction="sum"), per.sum(), rtol=2e-5)


def test_dist_matches_numpy():
    zs, zt = _logits(7, b=6, c=5), _logits(8, b=6, c=5)
    np.testing.assert_allclose(losses.dist(zs, zt), np_dist(zs, zt), rtol=1e-5)
    np.testing.assert_allclose(losses.dist(zs, zt, 0.5, 2.0, 4.0),
                               np_dist(zs, zt, 0.5, 2.0, 4.0), rtol=1e-5)


def test_standardize_logits_matches_numpy_and_invariances():
    z = _logits(9)
    np.testing.assert_allclose(losses.standardize_logits(z), np_zscore(z), rtol=1e-5,
                               atol=1e-6)
    # Invariant to per-sample shift and positive scale.
    z2 = 3.0 * z + np.arange(5, dtype=np.float32)[:, None]
    np.testing.assert_allclose(losses.standardize_logits(z2), losses.standardize_logits(z),
                               atol=1e-5)
    zt = _logits(10)
    np.testing.assert_allclose(losses.kd(z2, zt, standardize=True),
                               losses.kd(z, zt, standardize=True), rtol=1e-5)


def test_kd_standardize_matches_numpy_and_default_unchanged():
    zs, zt = _logits(11), _logits(12)
    ls, lt = np_log_softmax(np_zscore(zs) / 4), np_log_softmax(np_zscore(zt) / 4)
    want = 16 * np.mean(np.sum(np.exp(lt) * (lt - ls), -1))
    np.testing.assert_allclose(losses.kd(zs, zt, 4.0, standardize=True), want, rtol=1e-5)
    ls, lt = np_log_softmax(zs / 4.0), np_log_softmax(zt / 4.0)
    want = 16 * np.mean(np.sum(np.exp(lt) * (lt - ls), -1))
    np.testing.assert_allclose(losses.kd(zs, zt), want, rtol=1e-5)  # backward compatible


# --- the PyTorch references (fixtures) --------------------------------------------------

@pytest.mark.parametrize("key,fn", [
    ("kd", lambda x: losses.kd(x["zs"], x["zt"], 4.0)),
    ("kd_standardized", lambda x: losses.kd(x["zs"], x["zt"], 4.0, standardize=True)),
    ("dkd", lambda x: losses.dkd(x["zs"], x["zt"], x["labels"])),
    ("dkd_standardized", lambda x: losses.dkd(x["zs"], x["zt"], x["labels"],
                                              standardize=True)),
    ("dist", lambda x: losses.dist(x["zs"], x["zt"])),
    ("dist_tau4", lambda x: losses.dist(x["zs"], x["zt"], 1.0, 2.0, 4.0)),
])
def test_matches_torch_reference(key, fn):
    np.testing.assert_allclose(float(fn(INPUTS)), REF[key], rtol=1e-5)


# --- invariants, transformations, numerics ----------------------------------------------

def test_zero_when_student_equals_teacher():
    z, y = _logits(13), np.array([1, 2, 3, 4, 0])
    assert abs(float(losses.dkd(z, z, y))) < 1e-6
    assert abs(float(losses.dkd(z, z, y, standardize=True))) < 1e-6
    assert abs(float(losses.dist(z, z))) < 2e-5  # 1 - rho in float32
    assert float(losses.dist(z, -z)) > 0.5


def test_dist_permutation_invariance():
    zs, zt = _logits(14, b=6), _logits(15, b=6)
    pb, pc = np.random.default_rng(0).permutation(6), np.random.default_rng(1).permutation(7)
    base = losses.dist(zs, zt, 1.0, 1.0, 2.0)
    np.testing.assert_allclose(losses.dist(zs[pb], zt[pb], 1.0, 1.0, 2.0), base, rtol=1e-5)
    np.testing.assert_allclose(losses.dist(zs[:, pc], zt[:, pc], 1.0, 1.0, 2.0), base,
                               rtol=1e-5)


def test_gradients():
    zs, zt = _logits(16, b=3, c=4, scale=1.0), _logits(17, b=3, c=4, scale=1.0)
    y = jnp.array([0, 3, 1])
    kw = dict(order=1, modes=("rev",), atol=5e-2, rtol=5e-2, eps=1e-2)
    check_grads(jax.jit(lambda a: losses.dkd(a, zt, y, standardize=True)), (zs,), **kw)
    check_grads(jax.jit(lambda a: losses.dist(a, zt, 1.0, 1.0, 2.0)), (zs,), **kw)
    check_grads(jax.jit(lambda a: losses.kd(a, zt, standardize=True)), (zs,), **kw)


def test_constant_logits_have_finite_gradients():
    c = jnp.ones((2, 4))
    zt = jnp.asarray(_logits(18, b=2, c=4))
    for fn in (lambda a: losses.kd(a, zt, standardize=True),
               lambda a: losses.dkd(a, zt, jnp.array([0, 1]), standardize=True),
               lambda a: losses.dist(a, zt)):
        g = jax.jit(jax.grad(fn))(c)
        assert bool(jnp.all(jnp.isfinite(g)))


def test_jit_equals_eager_and_vmap():
    zs, zt, y = _logits(19), _logits(20), jnp.array([0, 1, 2, 3, 4])
    f = lambda a, b: losses.dkd(a, b, y, standardize=True)  # noqa: E731
    np.testing.assert_allclose(jax.jit(f)(zs, zt), f(zs, zt), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(losses.dist)(zs, zt), losses.dist(zs, zt), rtol=1e-6)
    stack_s, stack_t = np.stack([zs, zt, zs]), np.stack([zt, zs, zs])
    got = jax.vmap(losses.dist)(stack_s, stack_t)
    want = [losses.dist(a, b) for a, b in zip(stack_s, stack_t)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    got = jax.vmap(f)(stack_s, stack_t)
    np.testing.assert_allclose(got, [f(a, b) for a, b in zip(stack_s, stack_t)], rtol=1e-5,
                               atol=1e-7)


def test_bf16_inputs_are_finite_float32():
    zs = jnp.asarray(_logits(21, scale=30.0), jnp.bfloat16)
    zt = jnp.asarray(_logits(22, scale=30.0), jnp.bfloat16)
    y = jnp.array([0, 1, 2, 3, 4])
    for v in (losses.dkd(zs, zt, y), losses.dkd(zs, zt, y, standardize=True),
              losses.dist(zs, zt), losses.kd(zs, zt, standardize=True)):
        assert v.dtype == jnp.float32 and bool(jnp.isfinite(v))


def test_confident_teacher_is_finite():
    zt = jnp.array([[1000.0, 0.0, 0.0], [0.0, -1000.0, 0.0]])
    zs = jnp.zeros((2, 3))
    v, g = jax.jit(jax.value_and_grad(lambda a: losses.dkd(a, zt, jnp.array([0, 1]))))(zs)
    assert bool(jnp.isfinite(v)) and bool(jnp.all(jnp.isfinite(g)))


def test_bad_inputs():
    z = _logits(23)
    with pytest.raises(ValueError, match="labels must lie in"):
        losses.dkd(z, z, np.array([0, 1, 2, 3, 7]))
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        losses.dkd(z, z, np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="same shape"):
        losses.dist(z, z[:, :3])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        losses.dkd(z, z, np.zeros(5, np.int32), temperature=0.0)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        losses.dist(z, z, beta=-1.0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        losses.standardize_logits(z[:, :1])
    with pytest.raises(ValueError, match="reduction must be one of"):
        losses.dkd(z, z, np.zeros(5, np.int32), reduction="avg")
    with pytest.raises(TypeError, match="floating dtype"):
        losses.dist(np.ones((2, 3), np.int32), np.ones((2, 3), np.int32))
