"""Relation losses (SP, CC, RKD, PKT, CRD) against numpy/torch references; batch semantics."""

import importlib.util
import itertools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
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


def huber(x):
    x = np.abs(x)
    return np.where(x < 1, 0.5 * x**2, x - 0.5)


# --- independent numpy formulas ---------------------------------------------------------

def np_sp(s, t):
    s, t = (np.asarray(a, np.float64).reshape(len(a), -1) for a in (s, t))
    g = lambda f: (f @ f.T) / np.linalg.norm(f @ f.T, axis=1, keepdims=True)  # noqa: E731
    return np.sum((g(s) - g(t)) ** 2) / len(s) ** 2


def np_cc_taylor(s, t, gamma=0.4, order=2):
    def psi(f):
        f = np.asarray(f, np.float64)
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        g = f @ f.T
        return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * g**p
                   for p in range(order + 1))
    return np.sum((psi(s) - psi(t)) ** 2) / len(s) ** 2


def np_rkd(s, t):
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    b = len(s)

    def dist(e):
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(b)] for i in range(b)])
        return d / d[~np.eye(b, dtype=bool)].mean()

    ld = np.mean(huber(dist(s) - dist(t)))

    def cos(e, i, j, k):
        u, v = e[j] - e[i], e[k] - e[i]
        nu, nv = np.linalg.norm(u), np.linalg.norm(v)
        if nu == 0 or nv == 0:
            return 0.0
        return u @ v / (nu * nv)

    la = np.mean([huber(cos(s, i, j, k) - cos(t, i, j, k))
                  for i, j, k in itertools.product(range(b), repeat=3)])
    return ld, la


def np_pkt(s, t, eps=1e-7):
    def probs(f):
        f = np.asarray(f, np.float64)
        f = f / (np.linalg.norm(f, axis=1, keepdims=True) + eps)
        k = (f @ f.T + 1) / 2
        return k / k.sum(1, keepdims=True)
    ps, pt = probs(s), probs(t)
    return np.mean(pt * np.log((pt + eps) / (ps + eps)))


def np_infonce(s, t, tau):
    s = s / np.linalg.norm(s, axis=1, keepdims=True)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    logits = np.asarray(s, np.float64) @ t.T / tau
    ce = lambda l: -np.diag(l) + np.log(np.exp(l).sum(1))  # noqa: E731
    return ce(logits), ce(logits.T)


# --- numpy cross-checks -----------------------------------------------------------------

def test_sp_matches_numpy_with_different_dims():
    s, t = rnd(0, 6, 2, 2, 3), rnd(1, 6, 11)
    np.testing.assert_allclose(losses.similarity_preserving(s, t), np_sp(s, t), rtol=1e-5)


def test_cc_taylor_and_repdistiller_match_numpy():
    s, t = rnd(2, 6, 5), rnd(3, 6, 8)
    np.testing.assert_allclose(losses.correlation_congruence(s, t), np_cc_taylor(s, t),
                               rtol=1e-5)
    np.testing.assert_allclose(losses.correlation_congruence(s, t, gamma=1.0, order=4),
                               np_cc_taylor(s, t, 1.0, 4), rtol=1e-5)
    t5 = t[:, :5]
    d = np.abs(s.astype(np.float64) - t5)
    np.testing.assert_allclose(losses.correlation_congruence(s, t5, "repdistiller"),
                               np.mean((d[:-1] * d[1:]).sum(1)), rtol=1e-5)


def test_cc_taylor_approximates_the_gaussian_kernel():
    """High-order Taylor series -> the exact RBF correlation of unit vectors."""
    s, t = rnd(4, 5, 3), rnd(5, 5, 3)

    def rbf(f, gamma=0.4):
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        d2 = ((f[:, None] - f[None]) ** 2).sum(-1)
        return np.exp(-gamma * d2)

    want = np.sum((rbf(s) - rbf(t)) ** 2) / 25
    np.testing.assert_allclose(losses.correlation_congruence(s, t, order=12), want, rtol=1e-4)


def test_rkd_matches_numpy_loops():
    s, t = rnd(6, 5, 3), rnd(7, 5, 4)
    ld, la = np_rkd(s, t)
    np.testing.assert_allclose(losses.rkd_distance(s, t), ld, rtol=1e-5)
    np.testing.assert_allclose(losses.rkd_angle(s, t), la, rtol=1e-5)
    np.testing.assert_allclose(losses.rkd(s, t), 25 * ld + 50 * la, rtol=1e-5)


def test_pkt_matches_numpy():
    s, t = rnd(8, 6, 5), rnd(9, 6, 3)
    np.testing.assert_allclose(losses.pkt(s, t), np_pkt(s, t), rtol=1e-5)


def test_crd_in_batch_matches_numpy():
    s, t = rnd(10, 6, 4), rnd(11, 6, 4)
    a, b = np_infonce(s, t, 0.07)
    np.testing.assert_allclose(losses.crd(s, t, reduction="none"), a + b, rtol=1e-5)
    np.testing.assert_allclose(losses.crd(s, t, 0.5, symmetric=False), np.mean(
        np_infonce(s, t, 0.5)[0]), rtol=1e-5)


def test_crd_queue_matches_numpy_and_updates_fifo():
    s, t = rnd(12, 4, 3), rnd(13, 4, 3)
    q = losses.init_crd_queue(jax.random.key(0), size=10, dim=3)
    loss, q2 = losses.crd_queue(s, t, q, 0.1, reduction="none")
    n = lambda a: np.asarray(a, np.float64) / np.linalg.norm(a, axis=1, keepdims=True)  # noqa
    sn, tn = n(s), n(t)
    pos = np.sum(sn * tn, 1) / 0.1

    def term(anchor, neg):
        logits = np.concatenate([pos[:, None], anchor @ np.asarray(neg, np.float64).T / 0.1], 1)
        return -pos + np.log(np.exp(logits).sum(1))

    np.testing.assert_allclose(loss, term(sn, q["teacher"]) + term(tn, q["student"]),
                               rtol=1e-5)
    np.testing.assert_allclose(q2["teacher"][:4], tn, rtol=1e-6)
    np.testing.assert_allclose(q2["teacher"][4:], q["teacher"][:6])
    np.testing.assert_allclose(q2["student"][:4], sn, rtol=1e-6)
    g = jax.grad(lambda a: losses.crd_queue(a, t, q)[0])(s)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0


# --- torch references -----------------------------------------------------------------

@pytest.mark.parametrize("key,fn", [
    ("similarity_preserving", lambda x: losses.similarity_preserving(x["s_map"], x["t_map"])),
    ("cc_repdistiller", lambda x: losses.correlation_congruence(x["s_vec9"], x["t_vec"],
                                                                "repdistiller")),
    ("rkd_distance", lambda x: losses.rkd_distance(x["s_vec"], x["t_vec"])),
    ("rkd_angle", lambda x: losses.rkd_angle(x["s_vec"], x["t_vec"])),
    ("rkd", lambda x: losses.rkd(x["s_vec"], x["t_vec"])),
    ("pkt", lambda x: losses.pkt(x["s_vec"], x["t_vec"])),
])
def test_matches_torch_reference(key, fn):
    np.testing.assert_allclose(float(fn(X)), REF[key], rtol=1e-5)


# --- invariants -------------------------------------------------------------------------

BATCH_LOSSES = {
    "sp": losses.similarity_preserving,
    "cc": losses.correlation_congruence,
    "rkd": losses.rkd,
    "pkt": losses.pkt,
    "crd": lambda s, t: losses.crd(s, t[:, :5]),
}


@pytest.mark.parametrize("name", sorted(BATCH_LOSSES))
def test_batch_permutation_invariance(name):
    s, t = rnd(14, 8, 5), rnd(15, 8, 6)
    perm = np.random.default_rng(1).permutation(8)
    fn = BATCH_LOSSES[name]
    np.testing.assert_allclose(fn(s[perm], t[perm]), fn(s, t), rtol=1e-5, atol=1e-7)


def test_zero_at_student_equals_teacher_and_scale_invariance():
    f = rnd(16, 6, 4)
    for fn in (losses.similarity_preserving, losses.correlation_congruence, losses.rkd,
               losses.pkt):
        assert abs(float(fn(f, f))) < 1e-6
        assert abs(float(fn(f, 3.0 * f))) < 1e-5  # all four are scale invariant
    assert float(losses.rkd(f, rnd(17, 6, 4))) > 0.1


def test_rkd_duplicate_samples_have_finite_gradients():
    e = jnp.asarray(rnd(18, 4, 3)).at[1].set(rnd(18, 4, 3)[0])  # rows 0 and 1 coincide
    t = jnp.asarray(rnd(19, 4, 3))
    for fn in (losses.rkd, losses.pkt, losses.similarity_preserving,
               losses.correlation_congruence):
        g = jax.jit(jax.grad(lambda a: fn(a, t)))(e)
        assert bool(jnp.all(jnp.isfinite(g))), fn.__name__
    g = jax.jit(jax.grad(lambda a: losses.rkd(a, t)))(jnp.zeros((4, 3)))  # all distances 0
    assert bool(jnp.all(jnp.isfinite(g)))


def test_gradients():
    s, t = rnd(20, 4, 3), rnd(21, 4, 5)
    kw = dict(order=1, modes=("rev",), atol=3e-2, rtol=3e-2, eps=1e-3)
    check_grads(jax.jit(lambda a: losses.similarity_preserving(a, t)), (s,), **kw)
    check_grads(jax.jit(lambda a: losses.correlation_congruence(a, t)), (s,), **kw)
    check_grads(jax.jit(lambda a: losses.rkd(a, t)), (s,), **kw)
    check_grads(jax.jit(lambda a: losses.pkt(a, t)), (s,), **kw)
    check_grads(jax.jit(lambda a: losses.crd(a, t[:, :3], 0.5)), (s,), **kw)


def test_jit_vmap_bf16():
    s, t = rnd(22, 6, 4), rnd(23, 6, 4)
    np.testing.assert_allclose(jax.jit(losses.rkd)(s, t), losses.rkd(s, t), rtol=1e-5)
    stack = np.stack([s, t])
    np.testing.assert_allclose(jax.vmap(losses.rkd)(stack, stack[::-1]),
                               [losses.rkd(s, t), losses.rkd(t, s)], rtol=1e-5)
    np.testing.assert_allclose(jax.vmap(losses.pkt)(stack, stack[::-1]),
                               [losses.pkt(s, t), losses.pkt(t, s)], rtol=1e-5)
    sb, tb = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
    for fn in BATCH_LOSSES.values():
        v = fn(sb, tb)
        assert v.dtype == jnp.float32 and bool(jnp.isfinite(v))


# --- data-parallel semantics ----------------------------------------------------------

@pytest.mark.parametrize("name", ["sp", "pkt", pytest.param("rkd", marks=pytest.mark.slow),
                                  pytest.param("cc", marks=pytest.mark.slow),
                                  pytest.param("crd", marks=pytest.mark.slow)])
def test_sharded_jit_is_global_batch_and_shard_map_is_per_device(name, n_devices):
    mesh = jax.make_mesh((n_devices,), ("data",))  # Explicit axis (jax default)
    sharding = NamedSharding(mesh, P("data"))
    s, t = rnd(24, 32, 5), rnd(25, 32, 6)
    ss, ts = jax.device_put(s, sharding), jax.device_put(t, sharding)
    per = 32 // n_devices
    fn = BATCH_LOSSES[name]
    one = fn(jax.device_put(s, jax.devices()[0]), jax.device_put(t, jax.devices()[0]))
    # Global-batch semantics: jit over sharded inputs equals the 1-device value.
    np.testing.assert_allclose(jax.jit(fn)(ss, ts), one, rtol=1e-5, err_msg=name)
    # Per-device semantics: shard_map computes the loss within each shard.
    per_dev = jax.jit(jax.shard_map(lambda a, b: jax.lax.pmean(fn(a, b), "data"),
                                    mesh=mesh, in_specs=(P("data"), P("data")),
                                    out_specs=P()))(ss, ts)
    shards = np.mean([fn(s[per * i:per * (i + 1)], t[per * i:per * (i + 1)])
                      for i in range(n_devices)])
    np.testing.assert_allclose(per_dev, shards, rtol=1e-5, err_msg=name)
    assert abs(float(per_dev) - float(one)) > 1e-6  # the two semantics differ


def test_crd_queue_sharded_equals_unsharded(n_devices):
    mesh = jax.make_mesh((n_devices,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    q = losses.init_crd_queue(jax.random.key(1), size=64, dim=8)
    s, t = rnd(26, 16, 8), rnd(27, 16, 8)
    want_loss, want_q = losses.crd_queue(s, t, q)
    qs = jax.device_put(q, sharding)
    got_loss, got_q = jax.jit(losses.crd_queue)(jax.device_put(s, sharding),
                                                jax.device_put(t, sharding), qs)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(got_q["teacher"], want_q["teacher"], rtol=1e-6)
    assert got_q["teacher"].shape == (64, 8)
    assert got_q["teacher"].sharding.is_equivalent_to(qs["teacher"].sharding, 2)


def test_bad_inputs():
    f = rnd(28, 4, 3)
    with pytest.raises(ValueError, match="same batch size"):
        losses.similarity_preserving(f, f[:3])
    with pytest.raises(ValueError, match="variant must be one of"):
        losses.correlation_congruence(f, f, "exact")
    with pytest.raises(ValueError, match="same shape"):
        losses.correlation_congruence(f, rnd(0, 4, 5), "repdistiller")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        losses.crd(f, f, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        losses.crd(f, rnd(0, 4, 5))
    with pytest.raises(ValueError, match="columns"):
        losses.crd_queue(f, f, losses.init_crd_queue(jax.random.key(0), 8, 5))
    with pytest.raises(ValueError, match="keys"):
        losses.crd_queue(f, f, {"teacher": jnp.zeros((8, 3))})
    with pytest.raises(ValueError, match="angle_weight must be >= 0"):
        losses.rkd(f, f, angle_weight=-1.0)
    with pytest.raises(TypeError, match="floating dtype"):
        losses.pkt(np.ones((3, 2), np.int32), f[:3, :2])
