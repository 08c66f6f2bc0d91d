"""Feature losses (FitNet, AT, NST, FSP, AB, FT, VID) against numpy and torch references."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
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


X, REF = _reference()


def rnd(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --- independent numpy formulas (float64, channels-last, explicit loops) ----------------

def np_pool(x, out_hw):
    b, h, w, c = x.shape
    fh, fw = h // out_hw[0], w // out_hw[1]
    return x.reshape(b, out_hw[0], fh, out_hw[1], fw, c).mean(axis=(2, 4))


def np_at(s, t):
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    if s.shape[1] > t.shape[1]:
        s = np_pool(s, t.shape[1:3])
    out = []
    for i in range(len(s)):
        a = (s[i] ** 2).mean(-1).ravel()
        b = (t[i] ** 2).mean(-1).ravel()
        out.append(np.mean((a / np.linalg.norm(a) - b / np.linalg.norm(b)) ** 2))
    return np.mean(out)


def np_nst(s, t):
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    if s.shape[1] > t.shape[1]:
        s = np_pool(s, t.shape[1:3])
    if t.shape[1] > s.shape[1]:
        t = np_pool(t, s.shape[1:3])
    out = []
    for i in range(len(s)):
        a = s[i].reshape(-1, s.shape[-1]).T
        b = t[i].reshape(-1, t.shape[-1]).T
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        k = lambda u, v: np.mean((u @ v.T) ** 2)  # noqa: E731
        out.append(k(b, b) + k(a, a) - 2 * k(a, b))
    return np.mean(out)


def np_fsp_matrix(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape[1] > b.shape[1]:
        a = np_pool(a, b.shape[1:3])
    n = a.shape[1] * a.shape[2]
    return np.stack([a[i].reshape(n, -1).T @ b[i].reshape(n, -1) / n for i in range(len(a))])


def np_ab(s, t, m=1.0):
    s, t = np.asarray(s, np.float64).ravel(), np.asarray(t, np.float64).ravel()
    total = 0.0
    for sv, tv in zip(s, t):
        if tv <= 0 and sv > -m:
            total += (sv + m) ** 2
        if tv > 0 and sv <= m:
            total += (sv - m) ** 2
    return total


def np_vid(mu, t, a, eps=1e-5):
    var = np.log1p(np.exp(np.asarray(a, np.float64))) + eps
    d = np.asarray(t, np.float64) - mu
    return np.mean(0.5 * (d**2 / var + np.log(var)))


# --- numpy cross-checks -----------------------------------------------------------------

def test_fitnet_matches_numpy_with_weights():
    s, t = rnd(0, 4, 3, 3, 5), rnd(1, 4, 3, 3, 5)
    w = np.array([1.0, 0.0, 2.0, 0.5], np.float32)
    per = ((s.astype(np.float64) - t) ** 2).reshape(4, -1).mean(1)
    np.testing.assert_allclose(losses.fitnet(s, t), per.mean(), rtol=1e-5)
    np.testing.assert_allclose(losses.fitnet(s, t, weights=w), np.mean(w * per), rtol=1e-5)
    np.testing.assert_allclose(losses.fitnet(s, t, reduction="none"), per, rtol=1e-5)


@pytest.mark.parametrize("shapes", [((3, 4, 4, 5), (3, 4, 4, 2)), ((3, 8, 6, 2), (3, 4, 3, 7))])
def test_at_matches_numpy(shapes):
    s, t = rnd(2, *shapes[0]), rnd(3, *shapes[1])
    np.testing.assert_allclose(losses.attention_transfer(s, t), np_at(s, t), rtol=1e-5)


def test_at_1d_features():
    s, t = rnd(4, 3, 12, 5), rnd(5, 3, 12, 2)
    np.testing.assert_allclose(losses.attention_transfer(s, t),
                               np_at(s[:, :, None], t[:, :, None]), rtol=1e-5)


def test_nst_matches_numpy():
    s, t = rnd(6, 3, 4, 4, 5), rnd(7, 3, 2, 2, 3)
    np.testing.assert_allclose(losses.nst(s, t), np_nst(s, t), rtol=1e-5)
    np.testing.assert_allclose(losses.nst(t, s), np_nst(t, s), rtol=1e-5)


def test_fsp_matches_numpy():
    s1, s2, t1, t2 = rnd(8, 2, 4, 4, 3), rnd(9, 2, 2, 2, 5), rnd(10, 2, 4, 4, 3), rnd(11, 2, 2, 2, 5)
    want = np.mean((np_fsp_matrix(s1, s2) - np_fsp_matrix(t1, t2)) ** 2)
    np.testing.assert_allclose(losses.fsp(s1, s2, t1, t2), want, rtol=1e-5)
    np.testing.assert_allclose(losses.fsp_matrix(s1, s2), np_fsp_matrix(s1, s2), rtol=1e-5,
                               atol=1e-6)


def test_ab_matches_numpy_loop():
    s, t = 2 * rnd(12, 3, 2, 2, 4), rnd(13, 3, 2, 2, 4)
    per = np.array([np_ab(s[i], t[i], 0.5) for i in range(3)])
    np.testing.assert_allclose(losses.activation_boundary(s, t, 0.5, reduction="none"), per,
                               rtol=1e-5)


def test_ft_matches_numpy():
    s, t = rnd(14, 3, 2, 2, 4), rnd(15, 3, 2, 2, 4)
    n = lambda a: a.reshape(3, -1) / np.linalg.norm(a.reshape(3, -1), axis=1, keepdims=True)  # noqa: E731,E501
    np.testing.assert_allclose(losses.factor_transfer(s, t), np.mean(np.abs(n(s) - n(t))),
                               rtol=1e-5)
    np.testing.assert_allclose(losses.factor_transfer(s, t, p=2), np.mean((n(s) - n(t)) ** 2),
                               rtol=1e-5)


def test_vid_matches_numpy():
    mu, t, a = rnd(16, 3, 2, 2, 4), rnd(17, 3, 2, 2, 4), rnd(18, 4)
    np.testing.assert_allclose(losses.vid(mu, t, a), np_vid(mu, t, a), rtol=1e-5)


def test_vid_minimiser_is_the_empirical_variance():
    """At mu fixed, the NLL over sigma^2 is minimised at the per-channel mean square."""
    mu, t = np.zeros((64, 3), np.float32), rnd(19, 64, 3) * np.array([0.5, 1.0, 2.0], np.float32)
    target_var = (t.astype(np.float64) ** 2).mean(0)
    a = jnp.log(jnp.expm1(jnp.asarray(target_var, jnp.float32)))
    g = jax.grad(lambda a: losses.vid(mu, t, a, eps=0.0))(a)
    np.testing.assert_allclose(g, 0.0, atol=1e-5)


def test_match_spatial_pools_like_numpy():
    a, b = rnd(20, 2, 8, 4, 3), rnd(21, 2, 2, 2, 5)
    pa, pb = losses.match_spatial(a, b)
    np.testing.assert_allclose(pa, np_pool(a, (2, 2)), rtol=1e-6, atol=1e-7)
    assert pb.shape == b.shape
    with pytest.raises(ValueError, match="integer multiples"):
        losses.match_spatial(rnd(0, 1, 5, 5, 1), rnd(0, 1, 2, 2, 1))


# --- torch references -----------------------------------------------------------------

@pytest.mark.parametrize("key,fn", [
    ("fitnet", lambda x: losses.fitnet(x["s_same"], x["t_same"])),
    ("attention_transfer", lambda x: losses.attention_transfer(x["s_map"], x["t_map"])),
    ("nst", lambda x: losses.nst(x["s_map"], x["t_map"])),
    ("fsp", lambda x: losses.fsp(x["s_map1"], x["s_map2"], x["t_map1"], x["t_map2"])),
    ("activation_boundary", lambda x: losses.activation_boundary(x["s_same"], x["t_same"])),
    ("factor_transfer", lambda x: losses.factor_transfer(x["s_same"], x["t_same"])),
    ("vid", lambda x: losses.vid(x["s_same"], x["t_same"], x["log_scale"])),
])
def test_matches_torch_reference(key, fn):
    np.testing.assert_allclose(float(fn(X)), REF[key], rtol=1e-5)


# --- invariants and transformations ----------------------------------------------------

def test_zero_at_student_equals_teacher():
    f = rnd(22, 3, 4, 4, 5)
    for v in (losses.fitnet(f, f), losses.attention_transfer(f, f), losses.nst(f, f),
              losses.fsp(f, f[:, ::2, ::2], f, f[:, ::2, ::2]), losses.factor_transfer(f, f)):
        assert abs(float(v)) < 1e-6
    # AB is zero once the student is on the right side of the teacher's boundary by m.
    assert float(losses.activation_boundary(jnp.sign(f) * 2.0, f)) == 0.0
    assert float(losses.activation_boundary(-jnp.sign(f) * 2.0, f)) > 0.0


def test_gradients():
    s, t = rnd(23, 2, 2, 2, 3), rnd(24, 2, 2, 2, 3)
    kw = dict(order=1, modes=("rev",), atol=3e-2, rtol=3e-2, eps=1e-3)
    check_grads(jax.jit(lambda a: losses.attention_transfer(a, t)), (s,), **kw)
    check_grads(jax.jit(lambda a: losses.nst(a, t)), (s,), **kw)
    check_grads(jax.jit(lambda a: losses.fsp(a, a, t, t)), (s,), **kw)
    check_grads(jax.jit(lambda a: losses.factor_transfer(a, t, p=2)), (s,), **kw)
    check_grads(jax.jit(lambda a, b: losses.vid(a, t, b)), (s, rnd(25, 3)), **kw)


def test_zero_features_have_finite_gradients():
    z = jnp.zeros((2, 2, 2, 3))
    t = jnp.asarray(rnd(26, 2, 2, 2, 3))
    for fn in (lambda a: losses.attention_transfer(a, t), lambda a: losses.nst(a, t),
               lambda a: losses.factor_transfer(a, t)):
        assert bool(jnp.all(jnp.isfinite(jax.jit(jax.grad(fn))(z))))


def test_jit_vmap_and_bf16():
    s, t = rnd(27, 3, 4, 4, 2), rnd(28, 3, 4, 4, 2)
    np.testing.assert_allclose(jax.jit(losses.nst)(s, t), losses.nst(s, t), rtol=1e-6)
    stack = np.stack([s, t])
    got = jax.vmap(losses.attention_transfer)(stack, stack[::-1])
    np.testing.assert_allclose(got, [losses.attention_transfer(s, t),
                                     losses.attention_transfer(t, s)], rtol=1e-5)
    sb, tb = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
    for v in (losses.fitnet(sb, tb), losses.attention_transfer(sb, tb), losses.nst(sb, tb),
              losses.activation_boundary(sb, tb), losses.factor_transfer(sb, tb),
              losses.vid(sb, tb, jnp.zeros(2, jnp.bfloat16)), losses.fsp(sb, sb, tb, tb)):
        assert v.dtype == jnp.float32 and bool(jnp.isfinite(v))


def test_per_device_shard_map_mean_equals_global_jit(n_devices):
    """Per-example losses: the mean of per-device means over equal shards is the global mean."""
    mesh = jax.make_mesh((n_devices,), ("data",))
    s, t = rnd(29, 16, 2, 2, 3), rnd(30, 16, 2, 2, 3)
    sharding = jax.sharding.NamedSharding(mesh, P("data"))
    ss, ts = jax.device_put(s, sharding), jax.device_put(t, sharding)

    def per_device(a, b):
        return jax.lax.pmean(losses.attention_transfer(a, b), "data")

    got = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P("data")),
                                out_specs=P()))(ss, ts)
    np.testing.assert_allclose(got, losses.attention_transfer(s, t), rtol=1e-5)


def test_bad_inputs():
    f = rnd(31, 2, 4, 4, 3)
    with pytest.raises(ValueError, match="same shape"):
        losses.fitnet(f, f[..., :2])
    with pytest.raises(ValueError, match="rank 3 or 4"):
        losses.attention_transfer(f[:, 0, 0], f[:, 0, 0])
    with pytest.raises(ValueError, match="same batch size"):
        losses.nst(f, f[:1])
    with pytest.raises(ValueError, match="channel counts"):
        losses.fsp(f, f, f[..., :2], f)
    with pytest.raises(ValueError, match=r"log_scale must have shape \(3,\)"):
        losses.vid(f, f, jnp.zeros(4))
    with pytest.raises(ValueError, match="margin must be >= 0"):
        losses.activation_boundary(f, f, -1.0)
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        losses.factor_transfer(f, f, p=3)
    with pytest.raises(TypeError, match="floating dtype"):
        losses.fitnet(np.ones((2, 3), np.int32), np.ones((2, 3), np.int32))
    with pytest.raises(ValueError, match="weights must have shape"):
        losses.fitnet(f, f, weights=jnp.ones(3))
