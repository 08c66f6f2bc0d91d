"""Registry entries of the KD2M family: build from config, finite values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses, methods

NAMES = ["kd2m_exact_ot", "kd2m_sinkhorn", "kd2m_sinkhorn_divergence", "kd2m_sliced",
         "kd2m_gaussian_w2", "kd2m_gaussian_kl", "kd2m_mmd", "kd2m_joint_ot", "kd2m_feature_mse"]
B, D, C = 8, 6, 4


def _outputs(seed):
    k = jax.random.split(jax.random.key(seed), 3)
    logits = jax.random.normal(k[0], (B, C))
    feats = {"pooled": jax.random.normal(k[1], (B, D)),
             "stage1": jax.random.normal(k[2], (B, 2, 2, 3))}
    return logits, feats


S_OUT, T_OUT = _outputs(0), _outputs(1)
BATCH = {"x": jnp.zeros((B, 1)), "y": jnp.array([0, 1, 2, 0, 1, 2, 0, 3])}


def test_registered_with_reference_weight():
    for name in NAMES:
        assert name in methods.names()
        assert methods.get(name).default_weight == 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_value_and_grad_finite(name):
    m = methods.build({"name": name})
    params, state = m.init(jax.random.key(0), S_OUT, T_OUT)

    def f(s_feat, t_feat):
        s = (S_OUT[0], {**S_OUT[1], "pooled": s_feat})
        t = (T_OUT[0], {**T_OUT[1], "pooled": t_feat})
        return m(params, state, s, t, BATCH, jax.random.key(1))[0]

    v, (gs, gt) = jax.value_and_grad(f, (0, 1))(S_OUT[1]["pooled"], T_OUT[1]["pooled"])
    assert np.isfinite(float(v)) and float(v) > 0
    assert bool(jnp.all(jnp.isfinite(gs))) and float(jnp.abs(gs).max()) > 0
    assert float(jnp.abs(gt).max()) == 0.0  # teacher is detached


def test_options_reach_the_loss():
    x, y = S_OUT[1]["pooled"], T_OUT[1]["pooled"]
    m = methods.build({"name": "kd2m_mmd", "kernel": "rbf", "bandwidth": "median"})
    v, _ = m({}, None, S_OUT, T_OUT, BATCH, None)
    np.testing.assert_allclose(float(v), float(losses.mmd(x, y, kernel="rbf",
                                                          bandwidth="median")), rtol=1e-6)
    m = methods.build({"name": "kd2m_gaussian_w2", "conditional": True})
    v, _ = m({}, None, S_OUT, T_OUT, BATCH, None)
    ref = losses.conditional(losses.gaussian_w2, x, y, BATCH["y"], num_classes=C,
                             diagonal=True)
    np.testing.assert_allclose(float(v), float(ref), rtol=1e-6)
    m = methods.build({"name": "kd2m_exact_ot", "features": ["stage1", "stage1"]})
    v, _ = m({}, None, S_OUT, T_OUT, BATCH, None)
    np.testing.assert_allclose(float(v), float(losses.exact_ot(
        S_OUT[1]["stage1"].reshape(B, -1), T_OUT[1]["stage1"].reshape(B, -1))), rtol=1e-6)


def test_unknown_and_bad_options_error():
    with pytest.raises(ValueError, match="unknown option.*valid options"):
        methods.build({"name": "kd2m_sinkhorn", "eps": 0.1})
    m = methods.build({"name": "kd2m_mmd", "kernel": "laplace"})
    with pytest.raises(ValueError, match="kernel must be one of"):
        m({}, None, S_OUT, T_OUT, BATCH, None)
    m = methods.build({"name": "kd2m_mmd", "features": ["pooled", "nope"]})
    with pytest.raises(ValueError, match="teacher feature 'nope' not found"):
        m({}, None, S_OUT, T_OUT, BATCH, None)
    m = methods.build({"name": "kd2m_mmd", "conditional": True})
    with pytest.raises(ValueError, match=r"batch\['y'\]"):
        m({}, None, S_OUT, T_OUT, {"x": BATCH["x"]}, None)


def test_sinkhorn_default_scale_and_option():
    x, y = S_OUT[1]["pooled"], T_OUT[1]["pooled"]
    assert methods.get("kd2m_sinkhorn").options["relative_to"] == "std"
    for rel in ("std", "mean"):
        m = methods.build({"name": "kd2m_sinkhorn", "relative_to": rel})
        v, _ = m({}, None, S_OUT, T_OUT, BATCH, None)
        np.testing.assert_allclose(float(v), float(losses.sinkhorn(x, y, relative_to=rel)),
                                   rtol=1e-5)


def test_feature_mse_is_identity_coupling_and_bounds_exact_ot():
    x, y = S_OUT[1]["pooled"], T_OUT[1]["pooled"]
    v, _ = methods.build({"name": "kd2m_feature_mse"})({}, None, S_OUT, T_OUT, BATCH, None)
    ref = np.mean(np.sum((np.asarray(x) - np.asarray(y)) ** 2, -1))
    np.testing.assert_allclose(float(v), ref, rtol=1e-5)
    assert float(v) >= float(losses.exact_ot(x, y)) - 1e-5  # W2^2 <= identity coupling
    w = jnp.arange(1.0, B + 1.0)
    v, _ = methods.build({"name": "kd2m_feature_mse"})(
        {}, None, S_OUT, T_OUT, {**BATCH, "weights": w}, None)
    ref = np.sum(np.asarray(w) * np.sum((np.asarray(x) - np.asarray(y)) ** 2, -1)) / w.sum()
    np.testing.assert_allclose(float(v), float(ref), rtol=1e-5)


@pytest.mark.parametrize("epoch_mode", ["loop", pytest.param("scan", marks=pytest.mark.slow)])
def test_exact_ot_fit_on_8_devices_equals_one_device(n_devices, epoch_mode):
    """Regression: exact OT's host callback inside a multi-device ``fit`` (global batch
    sharded over the 8-device ``("data",)`` mesh, seeds vmapped, eager index gathers of
    the loop epoch in flight) used to abort the process; it must also give the
    1-device numbers."""
    from kdjax import models
    from kdjax.train import Distiller, fit, make_mesh, make_optimizer

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 24, 1)).astype(np.float32)
    y = rng.integers(0, 4, 256).astype(np.int32)
    teacher = models.create("cnn1d", 4, channels=(8, 16))
    student = models.create("cnn1d", 4, channels=(16,))
    tvars = teacher.init(jax.random.PRNGKey(0), jnp.asarray(x[:2]), train=False)
    built = tuple(methods.build(m) for m in [{"name": "ce", "weight": 1.0},
                                             {"name": "kd2m_exact_ot", "weight": 0.5}])
    out = {}
    for n in (1, n_devices):
        tx = make_optimizer({"name": "adamw", "learning_rate": 3e-3}, total_steps=8,
                            steps_per_epoch=4)
        d = Distiller(student, built, tx, teacher=teacher, epoch_mode=epoch_mode)
        keys = jnp.stack([jax.random.PRNGKey(s) for s in range(2)])
        state = jax.vmap(lambda k: d.init(k, x[:2], tvars))(keys)
        init = jax.device_get(state.params["student"])
        state = fit(d, state, tvars, {"x": x, "y": y}, epochs=2, batch_size=64,
                    mesh=make_mesh(n), progress=False).state
        out[n] = jax.device_get(state.params["student"])
    p1, p8 = jax.tree_util.tree_leaves(out[1]), jax.tree_util.tree_leaves(out[n_devices])
    assert max(float(np.max(np.abs(a - b)))
               for a, b in zip(p1, jax.tree_util.tree_leaves(init))) > 1e-3   # it trained
    for a, b in zip(p1, p8):   # same plans, same steps: only reduction order differs
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
