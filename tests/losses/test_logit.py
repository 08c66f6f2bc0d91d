"""kd / cross_entropy against independent NumPy formulas, gradients, pmap == jit."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from jax.test_util import check_grads
from scipy.special import log_softmax as np_log_softmax

from kdjax.losses import cross_entropy, kd


def np_kd(s, t, tau, w=None):
    ls, lt = np_log_softmax(s / tau, axis=-1), np_log_softmax(t / tau, axis=-1)
    per = (np.exp(lt) * (lt - ls)).sum(-1) * tau**2
    w = np.ones(len(s)) if w is None else w
    return (w * per).mean()


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(16, 10)).astype(np.float32) * 3,
            rng.normal(size=(16, 10)).astype(np.float32) * 3)


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0, 8.0])
def test_kd_matches_numpy(logits, tau):
    s, t = logits
    np.testing.assert_allclose(kd(s, t, tau), np_kd(s.astype(np.float64), t, tau), rtol=1e-5)
    np.testing.assert_allclose(jax.jit(kd)(s, t, tau), np_kd(s, t, tau), rtol=1e-5)


def test_kd_direction_is_teacher_target(logits):
    s, t = logits
    # KL(p_T || p_S) != KL(p_S || p_T) for these inputs; the loss must be the former.
    assert not np.isclose(np_kd(s, t, 4.0), np_kd(t, s, 4.0), rtol=1e-3)
    np.testing.assert_allclose(kd(s, t), np_kd(s, t, 4.0), rtol=1e-5)


def test_kd_zero_at_equality_and_positive(logits):
    s, t = logits
    assert float(kd(s, s)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd(s, t)) > 0


def test_kd_weights_and_reductions(logits):
    s, t = logits
    w = np.random.default_rng(1).uniform(0, 2, size=16).astype(np.float32)
    np.testing.assert_allclose(kd(s, t, weights=w), np_kd(s, t, 4.0, w), rtol=1e-5)
    per = kd(s, t, reduction="none")
    assert per.shape == (16,)
    np.testing.assert_allclose(kd(s, t, reduction="sum"), per.sum(), rtol=1e-5)


def test_kd_grads(logits):
    s, t = logits
    check_grads(lambda a: kd(a, jnp.asarray(t[:4])), (jnp.asarray(s[:4]),), order=1,
                modes=["rev"], atol=1e-2, rtol=1e-2)
    # closed form: d kd / d z_s = tau * (p_S - p_T) / B
    tau = 4.0
    g = jax.grad(lambda a: kd(a, jnp.asarray(t), tau))(jnp.asarray(s))
    ps = np.exp(np_log_softmax(s / tau, -1))
    pt = np.exp(np_log_softmax(t / tau, -1))
    np.testing.assert_allclose(g, tau * (ps - pt) / len(s), rtol=1e-4, atol=1e-6)


def test_kd_bf16_finite(logits):
    s, t = logits
    v = kd(jnp.asarray(s * 100, jnp.bfloat16), jnp.asarray(t * 100, jnp.bfloat16))
    assert v.dtype == jnp.float32 and np.isfinite(float(v))


def test_kd_pmap_equals_jit(logits, n_devices):
    s, t = logits
    per_dev = jax.pmap(lambda a, b: jax.lax.pmean(kd(a, b), "i"), axis_name="i")(
        s.reshape(8, 2, 10), t.reshape(8, 2, 10))
    np.testing.assert_allclose(per_dev[0], jax.jit(kd)(s, t), rtol=1e-6)


def test_cross_entropy_matches_numpy(logits):
    s, _ = logits
    y = np.arange(16) % 10
    ref = -np_log_softmax(s.astype(np.float64), -1)[np.arange(16), y].mean()
    np.testing.assert_allclose(cross_entropy(s, jnp.asarray(y)), ref, rtol=1e-5)


@pytest.mark.parametrize("call, match", [
    (lambda s, t: kd(s, t[:3]), r"student_logits and teacher_logits must have the same shape"),
    (lambda s, t: kd(s[0], t[0]), r"student_logits must have rank 2"),
    (lambda s, t: kd(s, t, temperature=0.0), r"temperature must be > 0, got 0.0"),
    (lambda s, t: kd(s.astype(np.int32), t), r"student_logits must have a floating dtype"),
    (lambda s, t: kd(s, t, weights=np.ones(3, np.float32)), r"weights must have shape \(16,\)"),
    (lambda s, t: kd(s, t, reduction="avg"), r"reduction must be one of"),
    (lambda s, t: cross_entropy(s, jnp.full(16, 10)), r"labels must lie in \[0, 10\)"),
    (lambda s, t: cross_entropy(s, jnp.zeros(16, jnp.float32)), r"labels must have an integer"),
    (lambda s, t: kd(s[:0], t[:0]), r"non-empty batch"),
])
def test_bad_inputs(logits, call, match):
    s, t = logits
    with pytest.raises((ValueError, TypeError), match=match):
        call(s, t)
