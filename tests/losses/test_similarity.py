"""Tests for kdjax.losses.similarity (CoSS, per-sample cosine, SEED) against numpy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

from kdjax import losses as L
from kdjax.losses import similarity as sim


# --- independent numpy references (float64) ---------------------------------------------

def _np_unit(x, axis):
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def np_l_co(s, t):
    return -np.mean(np.sum(_np_unit(s, 1) * _np_unit(t, 1), axis=1))


def np_l_ss(s, t):
    return -np.mean(np.sum(_np_unit(s, 0) * _np_unit(t, 0), axis=0))


def np_coss(s, t, l0=1.0, l1=1.0, tau_t=0.07, tau_s=0.1):
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    return (l0 * np_l_co(s, t) + l1 * np_l_ss(s, t)) / (tau_t * tau_s)


def np_seed(s, t, queue, tau_t, tau_s):
    s, t = _np_unit(np.asarray(s, np.float64), 1), _np_unit(np.asarray(t, np.float64), 1)
    q = np.asarray(queue, np.float64)
    out = []
    for i in range(s.shape[0]):
        u = np.concatenate([[s[i] @ t[i]], q @ s[i]]) / tau_s
        v = np.concatenate([[t[i] @ t[i]], q @ t[i]]) / tau_t
        p = np.exp(v - v.max())
        p /= p.sum()
        log_q = u - u.max() - np.log(np.sum(np.exp(u - u.max())))
        out.append(-np.sum(p * log_q))
    return np.array(out)


def _pair(seed, b=16, d=6):
    rng = np.random.default_rng(seed)
    t = rng.normal(size=(b, d)).astype(np.float32)
    s = (0.7 * t + rng.normal(size=(b, d))).astype(np.float32)
    return s, t


# --- CoSS ---------------------------------------------------------------------------------

@pytest.mark.parametrize("l0,l1,tau_t,tau_s", [(1.0, 1.0, 0.07, 0.1), (0.3, 2.0, 1.0, 0.5),
                                               (1.0, 0.0, 0.2, 0.2), (0.0, 1.0, 1.0, 1.0)])
def test_coss_matches_numpy(l0, l1, tau_t, tau_s):
    s, t = _pair(0, b=12, d=5)
    got = sim.coss(s, t, l0, l1, tau_t, tau_s)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_coss(s, t, l0, l1, tau_t, tau_s), rtol=1e-5)


def test_coss_terms_and_cosine_distillation():
    s, t = _pair(1)
    np.testing.assert_allclose(sim.space_similarity(s, t), np_l_ss(s, t), rtol=1e-5)
    # coss with l1 = 0 is the per-sample term alone.
    np.testing.assert_allclose(sim.cosine_distillation(s, t),
                               sim.coss(s, t, 1.0, 0.0), rtol=1e-5)
    per = sim.cosine_distillation(s, t, 0.5, 0.5, reduction="none")
    want = -np.sum(_np_unit(s, 1) * _np_unit(t, 1), 1) / 0.25
    np.testing.assert_allclose(per, want, rtol=1e-5)
    w = np.linspace(0.0, 2.0, s.shape[0]).astype(np.float32)
    np.testing.assert_allclose(sim.cosine_distillation(s, t, 0.5, 0.5, weights=w),
                               np.mean(w * want), rtol=1e-5)
    np.testing.assert_allclose(sim.cosine_distillation(s, t, 0.5, 0.5, reduction="sum"),
                               np.sum(want), rtol=1e-5)


def test_coss_is_minimal_for_identical_embeddings():
    s, _ = _pair(2)
    np.testing.assert_allclose(sim.coss(s, 3.0 * s), -2.0 / (0.07 * 0.1), rtol=1e-5)


def test_column_scaling_leaves_l_ss_but_not_l_co():
    s, t = _pair(3)
    c = np.array([0.1, 5.0, 1.0, 30.0, 2.0, 0.5], np.float32)
    d = np.array([3.0, 0.2, 7.0, 1.0, 0.01, 9.0], np.float32)
    np.testing.assert_allclose(sim.space_similarity(s * c, t * d),
                               sim.space_similarity(s, t), rtol=1e-5)
    l_co = sim.coss(s, t, 1.0, 0.0)
    assert abs(float(sim.coss(s * c, t * d, 1.0, 0.0) - l_co)) > 1e-2 * abs(float(l_co))


def test_row_scaling_leaves_l_co_but_not_l_ss():
    s, t = _pair(4)
    r = np.geomspace(0.01, 100.0, s.shape[0]).astype(np.float32)[:, None]
    np.testing.assert_allclose(sim.coss(s * r, t * r[::-1], 1.0, 0.0),
                               sim.coss(s, t, 1.0, 0.0), rtol=1e-5)
    l_ss = sim.space_similarity(s, t)
    assert abs(float(sim.space_similarity(s * r, t * r[::-1]) - l_ss)) > 1e-2


def test_zero_rows_and_columns_are_finite():
    s, t = _pair(5, b=8, d=5)
    s[2] = 0.0
    s[:, 3] = 0.0
    t[5] = 0.0
    t[:, 1] = 0.0
    val = sim.coss(s, t)
    np.testing.assert_allclose(val, np_coss(s, t), rtol=1e-5)
    for argnum in (0, 1):
        g = jax.grad(sim.coss, argnums=argnum)(jnp.asarray(s), jnp.asarray(t))
        assert np.isfinite(np.asarray(g)).all()
    g = jax.grad(lambda a: sim.seed(a, t, jnp.eye(5), 0.1, 0.2))(jnp.asarray(s))
    assert np.isfinite(np.asarray(g)).all()


def test_check_grads():
    s, t = _pair(6, b=6, d=4)
    f = functools.partial(sim.coss, tau_t=1.0, tau_s=1.0)
    check_grads(jax.jit(lambda a: f(a, t)), (jnp.asarray(s),), order=2, modes=["rev"],
                atol=1e-2, rtol=1e-2)
    q = _np_unit(np.random.default_rng(0).normal(size=(5, 4)), 1).astype(np.float32)
    check_grads(jax.jit(lambda a: sim.seed(a, t, q, 0.5, 0.5)), (jnp.asarray(s),), order=1,
                modes=["rev"], atol=1e-2, rtol=1e-2)


def test_bf16_jit_vmap():
    s, t = _pair(7)
    got = jax.jit(sim.coss)(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16))
    assert got.dtype == jnp.float32 and np.isfinite(got)
    np.testing.assert_allclose(got, np_coss(s, t), rtol=3e-2)
    ss = np.stack([s, s[::-1], 2 * s])
    tt = np.stack([t, t, t])
    got = jax.vmap(sim.coss)(ss, tt)
    np.testing.assert_allclose(got, [np_coss(a, b) for a, b in zip(ss, tt)], rtol=1e-5)


# --- batch semantics on 8 devices ---------------------------------------------------------

def test_per_device_vs_global_on_8_devices(n_devices):
    mesh = jax.make_mesh((n_devices,), ("data",))
    s, t = _pair(8, b=32, d=6)
    shards = zip(np.split(s, n_devices), np.split(t, n_devices))
    want_local = np.mean([np_coss(a, b) for a, b in shards])
    want_global = np_coss(s, t)
    assert abs(want_local - want_global) > 0.1  # the semantics differ on this batch

    local = L.per_device(sim.coss, mesh)(s, t)
    np.testing.assert_allclose(local, want_local, rtol=1e-5)
    np.testing.assert_allclose(L.per_group(sim.coss, n_devices)(s, t), want_local,
                               rtol=1e-5)
    # Global: plain jit on arrays sharded over the batch.
    sharding = NamedSharding(mesh, P("data"))
    s_sh, t_sh = jax.device_put(s, sharding), jax.device_put(t, sharding)
    assert len(s_sh.addressable_shards) == n_devices
    np.testing.assert_allclose(jax.jit(sim.coss)(s_sh, t_sh), want_global, rtol=1e-5)
    # Per-device with kwargs, on an auto-axes mesh, and gradients through shard_map.
    auto = jax.make_mesh((n_devices,), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    shards = zip(np.split(s, n_devices), np.split(t, n_devices))
    want = np.mean([np_coss(a, b, 0.5, 2.0, 1.0, 1.0) for a, b in shards])
    f = L.per_device(sim.coss, auto)
    np.testing.assert_allclose(f(s, t, l0=0.5, l1=2.0, tau_t=1.0, tau_s=1.0), want,
                               rtol=1e-5)
    g_dev = jax.grad(lambda a: f(a, t, tau_t=1.0, tau_s=1.0))(jnp.asarray(s))
    g_grp = jax.grad(lambda a: L.per_group(sim.coss, n_devices)(
        a, t, tau_t=1.0, tau_s=1.0))(jnp.asarray(s))
    np.testing.assert_allclose(g_dev, g_grp, rtol=1e-4, atol=1e-6)


def test_axis_name_under_pmap(n_devices):
    s, t = _pair(9, b=16, d=4)
    shape = (n_devices, 16 // n_devices, 4)
    out = jax.pmap(functools.partial(sim.coss, axis_name="i"), axis_name="i")(
        s.reshape(shape), t.reshape(shape))
    want = np.mean([np_coss(a, b) for a, b in zip(s.reshape(shape), t.reshape(shape))])
    np.testing.assert_allclose(out, np.full(n_devices, want), rtol=1e-5)


# --- SEED ----------------------------------------------------------------------------------

def test_seed_matches_numpy():
    s, t = _pair(10, b=6, d=4)
    queue, ptr = sim.seed_queue_init(jax.random.PRNGKey(0), 10, 4)
    np.testing.assert_allclose(np.linalg.norm(queue, axis=1), 1.0, rtol=1e-5)
    assert int(ptr) == 0
    for tau_t, tau_s in [(1e-4, 0.2), (0.5, 0.1)]:
        want = np_seed(s, t, queue, tau_t, tau_s)
        np.testing.assert_allclose(sim.seed(s, t, queue, tau_t, tau_s, reduction="none"),
                                   want, rtol=1e-4)
        np.testing.assert_allclose(sim.seed(s, t, queue, tau_t, tau_s), want.mean(),
                                   rtol=1e-4)
    w = np.arange(6, dtype=np.float32)
    np.testing.assert_allclose(sim.seed(s, t, queue, 0.5, 0.1, weights=w),
                               np.mean(w * np_seed(s, t, queue, 0.5, 0.1)), rtol=1e-4)


def test_seed_queue_update_is_a_ring_buffer():
    rng = np.random.default_rng(0)
    queue = jnp.zeros((5, 3))
    ptr = jnp.int32(0)
    seen = []
    for step in range(4):
        keys = rng.normal(size=(2, 3)).astype(np.float32) * (step + 1)
        old = np.asarray(queue)
        queue, ptr = sim.seed_queue_update(queue, ptr, keys)
        seen.extend(_np_unit(keys, 1))
        rows = [(2 * step + j) % 5 for j in range(2)]
        np.testing.assert_allclose(np.asarray(queue)[rows], _np_unit(keys, 1), rtol=1e-6)
        untouched = [r for r in range(5) if r not in rows]
        np.testing.assert_array_equal(np.asarray(queue)[untouched], old[untouched])
        assert int(ptr) == (2 * (step + 1)) % 5
    # After 8 writes into 5 slots the queue holds the last 5 keys (slot = write index % 5).
    for i, key in enumerate(seen[-5:], start=3):
        np.testing.assert_allclose(np.asarray(queue)[i % 5], key, rtol=1e-6)
    # Pure and jittable; no gradient flows into the queue.
    q2, p2 = jax.jit(sim.seed_queue_update)(queue, ptr, jnp.ones((2, 3)))
    assert int(p2) == (int(ptr) + 2) % 5 and q2.shape == (5, 3)
    g = jax.grad(lambda k: jnp.sum(sim.seed_queue_update(queue, ptr, k)[0]))(jnp.ones((2, 3)))
    np.testing.assert_array_equal(g, 0.0)


# --- errors ----------------------------------------------------------------------------------

def test_bad_inputs():
    s, t = _pair(11, b=8, d=4)
    with pytest.raises(ValueError, match="student_emb and teacher_emb"):
        sim.coss(s, t[:, :3])
    with pytest.raises(ValueError, match="student_emb must have rank 2"):
        sim.coss(s[0], t[0])
    with pytest.raises(TypeError, match="teacher_emb must have a floating dtype"):
        sim.cosine_distillation(s, t.astype(np.int32))
    with pytest.raises(ValueError, match="tau_t must be > 0"):
        sim.coss(s, t, tau_t=0.0)
    with pytest.raises(ValueError, match="l1 must be >= 0"):
        sim.coss(s, t, l1=-1.0)
    with pytest.raises(ValueError, match="weights must have shape"):
        sim.cosine_distillation(s, t, weights=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="reduction must be one of"):
        sim.cosine_distillation(s, t, reduction="max")
    with pytest.raises(ValueError, match="queue must have shape"):
        sim.seed(s, t, np.ones((5, 3), np.float32))
    with pytest.raises(ValueError, match="must be <= the queue size"):
        sim.seed_queue_update(jnp.zeros((4, 4)), jnp.int32(0), t)
    with pytest.raises(TypeError, match="ptr must have an integer dtype"):
        sim.seed_queue_update(jnp.zeros((9, 4)), jnp.float32(0), t)
    with pytest.raises(ValueError, match="num_groups must be a positive int"):
        L.per_group(sim.coss, 0)
    with pytest.raises(ValueError, match="divisible by num_groups=3"):
        L.per_group(sim.coss, 3)(s, t)
    mesh = jax.make_mesh((8,), ("data",))
    with pytest.raises(ValueError, match="axis_name must be one of the mesh axes"):
        L.per_device(sim.coss, mesh, axis_name="batch")
    with pytest.raises(ValueError, match="divisible by the 8 devices"):
        L.per_device(sim.coss, mesh)(s[:4], t[:4])
    with pytest.raises(ValueError, match="size must be a positive int"):
        sim.seed_queue_init(jax.random.PRNGKey(0), 0, 4)


def test_seed_global_batch_on_8_devices(n_devices):
    # Under jit over a batch sharded on 8 devices, SEED's loss and queue update see the
    # global batch (SEED's concat_all_gather), exactly as on one device.
    s, t = _pair(12, b=16, d=4)
    queue, ptr = sim.seed_queue_init(jax.random.PRNGKey(1), 24, 4)

    def step(a, b, q, p):
        return sim.seed(a, b, q, 0.1, 0.2), sim.seed_queue_update(q, p, b)

    auto = jax.make_mesh((n_devices,), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    explicit = jax.make_mesh((n_devices,), ("data",))
    for mesh in (auto, explicit):
        with jax.set_mesh(mesh):
            sharding = NamedSharding(mesh, P("data"))
            loss8, (q8, p8) = jax.jit(step)(jax.device_put(s, sharding),
                                            jax.device_put(t, sharding), queue, ptr)
        np.testing.assert_allclose(loss8, np_seed(s, t, queue, 0.1, 0.2).mean(), rtol=1e-4)
        np.testing.assert_allclose(q8[:16], _np_unit(t, 1), rtol=1e-5)
        np.testing.assert_array_equal(q8[16:], queue[16:])
        assert int(p8) == 16
