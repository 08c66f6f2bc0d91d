"""Tests for the coss / cosine / seed registry entries (kdjax.methods.coss)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses, methods
from kdjax.models.projector import Projector


def _outs(b=8, ds=6, dt=10, seed=0):
    rng = np.random.default_rng(seed)
    s = jnp.asarray(rng.normal(size=(b, ds)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(b, dt)), jnp.float32)
    logits = jnp.zeros((b, 3))
    return (logits, {"pooled": s, "stage1": s[:, None]}), (logits, {"pooled": t})


def test_registered_and_unsupervised():
    for name in ("coss", "cosine", "seed"):
        assert name in methods.names()
        assert methods.get(name).needs_labels is False
    assert methods.get("coss").options["tau_t"] == 0.07
    assert methods.get("coss").options["hidden_dim"] == 2048


def test_coss_projector_when_dims_differ():
    s_out, t_out = _outs()
    m = methods.build({"name": "coss", "hidden_dim": 16})
    params, state = m.init(jax.random.PRNGKey(0), s_out, t_out)
    assert params["hidden"]["kernel"].shape == (6, 16)
    assert params["out"]["kernel"].shape == (16, 10)
    assert state is None
    batch = {"x": jnp.zeros((8, 2))}  # no labels
    value, new_state = m(params, state, s_out, t_out, batch, jax.random.PRNGKey(1))
    projected = Projector(10, 16).apply({"params": params}, s_out[1]["pooled"])
    np.testing.assert_allclose(value, losses.coss(projected, t_out[1]["pooled"]), rtol=1e-6)
    assert new_state is None

    def f(p, s, t):
        so = (s_out[0], {"pooled": s})
        to = (t_out[0], {"pooled": t})
        return m(p, state, so, to, batch, jax.random.PRNGKey(1))[0]

    gp, gs, gt = jax.grad(f, argnums=(0, 1, 2))(params, s_out[1]["pooled"],
                                                t_out[1]["pooled"])
    for leaf in jax.tree_util.tree_leaves((gp, gs)):
        assert np.isfinite(np.asarray(leaf)).all()
    assert float(jnp.abs(gs).sum()) > 0
    np.testing.assert_array_equal(gt, 0.0)  # teacher gradient stopped


def test_coss_equal_dims_no_projector_and_groups():
    s_out, t_out = _outs(b=8, ds=10, dt=10)
    m = methods.build({"name": "coss", "num_groups": 2, "l1": 3.0})
    params, state = m.init(jax.random.PRNGKey(0), s_out, t_out)
    assert params == {}
    value, _ = jax.jit(lambda p, so, to: m(p, state, so, to, {}, jax.random.PRNGKey(0)))(
        params, s_out, t_out)
    s, t = s_out[1]["pooled"], t_out[1]["pooled"]
    want = np.mean([float(losses.coss(s[i:i + 4], t[i:i + 4], l1=3.0)) for i in (0, 4)])
    np.testing.assert_allclose(value, want, rtol=1e-5)
    # projector="always" adds a head even with equal dims.
    params, _ = methods.build({"name": "coss", "projector": "always", "hidden_dim": 4}).init(
        jax.random.PRNGKey(0), s_out, t_out)
    assert params["out"]["kernel"].shape == (4, 10)


def test_cosine_honours_weights_and_bn_state():
    s_out, t_out = _outs()
    m = methods.build({"name": "cosine", "hidden_dim": 8, "use_bn": True, "tau_t": 1.0,
                       "tau_s": 1.0})
    params, state = m.init(jax.random.PRNGKey(0), s_out, t_out)
    assert set(state) == {"batch_stats"}
    w = jnp.linspace(0.0, 1.0, 8)
    value, new_state = m(params, state, s_out, t_out, {"weights": w}, jax.random.PRNGKey(0))
    projected, _ = Projector(10, 8, use_bn=True).apply(
        {"params": params, **state}, s_out[1]["pooled"], train=True, mutable=["batch_stats"])
    want = losses.cosine_distillation(projected, t_out[1]["pooled"], 1.0, 1.0, weights=w)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()),
                                   state, new_state)
    assert max(jax.tree_util.tree_leaves(moved)) > 0  # running stats updated


def test_seed_queue_state():
    s_out, t_out = _outs(b=4, ds=10, dt=10)
    m = methods.build({"name": "seed", "queue_size": 6, "tau_t": 0.1})
    params, state = m.init(jax.random.PRNGKey(0), s_out, t_out)
    assert params == {} and state["queue"].shape == (6, 10) and int(state["ptr"]) == 0
    step = jax.jit(lambda p, st, so, to: m(p, st, so, to, {}, jax.random.PRNGKey(0)))
    value, new_state = step(params, state, s_out, t_out)
    s, t = s_out[1]["pooled"], t_out[1]["pooled"]
    np.testing.assert_allclose(value, losses.seed(s, t, state["queue"], 0.1, 0.2),
                               rtol=1e-5)
    unit_t = t / jnp.linalg.norm(t, axis=1, keepdims=True)
    np.testing.assert_allclose(new_state["queue"][:4], unit_t, rtol=1e-5)
    np.testing.assert_array_equal(new_state["queue"][4:], state["queue"][4:])
    assert int(new_state["ptr"]) == 4
    _, st2 = step(params, new_state, s_out, t_out)
    assert int(st2["ptr"]) == 2  # wrapped around: rows 4, 5, 0, 1
    g = jax.grad(lambda so: step(params, state, so, t_out)[0])(s_out)
    assert np.isfinite(np.asarray(g[1]["pooled"])).all()


def test_bad_configs():
    s_out, t_out = _outs()
    with pytest.raises(ValueError, match="unknown student feature 'emb'"):
        methods.build({"name": "coss", "student_feature": "emb"}).init(
            jax.random.PRNGKey(0), s_out, t_out)
    with pytest.raises(ValueError, match="projector='never' needs equal embedding dims"):
        methods.build({"name": "coss", "projector": "never"}).init(
            jax.random.PRNGKey(0), s_out, t_out)
    with pytest.raises(ValueError, match="projector must be one of"):
        methods.build({"name": "seed", "projector": "maybe"}).init(
            jax.random.PRNGKey(0), s_out, t_out)
    with pytest.raises(ValueError, match="must be an embedding \\(batch, dim\\)"):
        methods.build({"name": "cosine", "student_feature": "stage1"}).init(
            jax.random.PRNGKey(0), s_out, t_out)
    with pytest.raises(ValueError, match="unknown option"):
        methods.build({"name": "coss", "temperature": 4.0})


@pytest.mark.slow
def test_coss_distillation_transfers_teacher_neighbourhoods():
    """End to end, no labels: a linear student distilled with CoSS on neighbour batches
    inherits the teacher's class structure (k-NN accuracy far above its random init)."""
    import optax

    from kdjax.data.neighbors import knn_graph, neighbor_batches
    from kdjax.evaluation.probes import knn_accuracy

    rng = np.random.default_rng(0)
    n, d_in, c = 1200, 20, 4
    y = rng.integers(0, c, size=n)
    means = rng.normal(size=(c, 3)) * 3.0
    latent = means[y] + rng.normal(size=(n, 3))
    x = np.concatenate([latent, 3.0 * rng.normal(size=(n, d_in - 3))], 1).astype(np.float32)
    teacher = np.concatenate([latent, 0.1 * rng.normal(size=(n, 13))], 1).astype(np.float32)

    m = methods.build({"name": "coss", "hidden_dim": 32})
    w0 = jnp.asarray(rng.normal(size=(d_in, 8)) / np.sqrt(d_in), jnp.float32)
    out = lambda w, xb: (jnp.zeros((xb.shape[0], 1)), {"pooled": xb @ w})
    t_out = lambda ib: (jnp.zeros((ib.shape[0], 1)), {"pooled": jnp.asarray(teacher)[ib]})
    params, state = m.init(jax.random.PRNGKey(0), out(w0, x[:4]), t_out(jnp.arange(4)))
    theta = {"w": w0, "head": params}
    tx = optax.adam(1e-3)
    opt = tx.init(theta)

    @jax.jit
    def step(theta, opt, ib):
        def loss(th):
            return m(th["head"], state, out(th["w"], jnp.asarray(x)[ib]), t_out(ib), {},
                     jax.random.PRNGKey(0))[0]
        val, g = jax.value_and_grad(loss)(theta)
        upd, opt = tx.update(g, opt, theta)
        return optax.apply_updates(theta, upd), opt, val

    nbrs, _ = knn_graph(teacher, 7)
    before = knn_accuracy(x[:1000] @ w0, y[:1000], x[1000:] @ w0, y[1000:])
    first = last = None
    for epoch in range(15):
        for ib in neighbor_batches(epoch, nbrs, 64, num_sampled=3, num_candidates=7):
            theta, opt, val = step(theta, opt, ib)
            first = float(val) if first is None else first
            last = float(val)
    f = x @ np.asarray(theta["w"])
    after = knn_accuracy(f[:1000], y[:1000], f[1000:], y[1000:])
    print(f"coss e2e: loss {first:.1f} -> {last:.1f}, k-NN acc {before:.3f} -> {after:.3f}")
    assert last < first
    assert after > 0.85 and after > before + 0.2, (before, after)
