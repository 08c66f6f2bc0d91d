"""The methods of kdjax/methods/shiftkd.py: registered, bound to the pure losses, ABF chain."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses, methods
from kdjax.models import adapters

K = jax.random.split(jax.random.key(0), 8)
S_OUT = (jax.random.normal(K[0], (8, 5)),
         {"stage1": jax.random.normal(K[1], (8, 8, 8, 4)),
          "stage2": jax.random.normal(K[2], (8, 4, 4, 6)), "pooled": jax.random.normal(K[3], (8, 6))})
T_OUT = (jax.random.normal(K[4], (8, 5)),
         {"stage1": jax.random.normal(K[5], (8, 8, 8, 8)),
          "stage2": jax.random.normal(K[6], (8, 2, 2, 12)), "pooled": jax.random.normal(K[7], (8, 12))})
W = jnp.linspace(0.5, 1.5, 8)
BATCH = {"x": None, "y": jnp.arange(8) % 5, "weights": W}


@pytest.mark.parametrize("name", ["mlkd", "reviewkd", "kd2m_gromov_wasserstein", "disco"])
def test_registered_and_differentiable(name):
    assert name in methods.names()
    m = methods.build({"name": name})
    params, state = m.init(jax.random.key(1), S_OUT, T_OUT)
    value, _ = m(params, state, S_OUT, T_OUT, BATCH, jax.random.key(2))
    assert np.isfinite(float(value))
    g = jax.grad(lambda out: m(params, state, out, T_OUT, BATCH, None)[0])(S_OUT)
    leaves = [np.asarray(v) for v in jax.tree_util.tree_leaves(g)]
    assert all(np.all(np.isfinite(v)) for v in leaves)
    assert sum(float(np.abs(v).sum()) for v in leaves) > 0


def test_mlkd_and_gw_methods_are_their_losses_with_batch_weights():
    v, _ = methods.build({"name": "mlkd"})({}, None, S_OUT, T_OUT, BATCH, None)
    np.testing.assert_allclose(float(v), float(losses.mlkd(S_OUT[0], T_OUT[0], weights=W)),
                               rtol=1e-6)
    v, _ = methods.build({"name": "kd2m_gromov_wasserstein"})({}, None, S_OUT, T_OUT, BATCH, None)
    ref = losses.gromov_wasserstein(S_OUT[1]["pooled"], T_OUT[1]["pooled"], W, W)
    np.testing.assert_allclose(float(v), float(ref), rtol=1e-5)


def test_reviewkd_is_hcl_over_the_abf_chain_deepest_first():
    m = methods.build({"name": "reviewkd", "mid_features": 8})
    params, _ = m.init(jax.random.key(3), S_OUT, T_OUT)
    assert sorted(params) == ["abf0", "abf1"] and "att_conv" not in params["abf1"]
    # by hand: the deepest level (stage2) has no fusion; stage1 fuses its residual
    deep = adapters.ABF(8, 12, fuse=False)
    out1, res = deep.apply({"params": params["abf1"]}, S_OUT[1]["stage2"], None, (2, 2))
    shallow = adapters.ABF(8, 8, fuse=True)
    out0, _ = shallow.apply({"params": params["abf0"]}, S_OUT[1]["stage1"], res, (8, 8))
    ref = losses.hcl([out0, out1], [T_OUT[1]["stage1"], T_OUT[1]["stage2"]], weights=W)
    v, _ = m(params, None, S_OUT, T_OUT, BATCH, None)
    np.testing.assert_allclose(float(v), float(ref), rtol=1e-6)
    assert out1.shape == T_OUT[1]["stage2"].shape and out0.shape == T_OUT[1]["stage1"].shape


def test_abf_attention_fusion_formula():
    x, y = jax.random.normal(K[0], (2, 4, 4, 3)), jax.random.normal(K[1], (2, 2, 2, 5))
    abf = adapters.ABF(5, 7, fuse=True)
    p = abf.init(jax.random.key(0), x, y, (4, 4))["params"]
    out, fused = abf.apply({"params": p}, x, y, (4, 4))
    xm = x @ p["conv1"]["kernel"][0, 0]
    yu = jnp.repeat(jnp.repeat(y, 2, 1), 2, 2)          # nearest 2x upsampling
    z = jax.nn.sigmoid(jnp.concatenate([xm, yu], -1) @ p["att_conv"]["kernel"][0, 0]
                       + p["att_conv"]["bias"])
    np.testing.assert_allclose(np.asarray(fused), np.asarray(xm * z[..., :1] + yu * z[..., 1:]),
                               rtol=1e-5, atol=1e-6)
    assert out.shape == (2, 4, 4, 7)
    with pytest.raises(ValueError, match="needs the residual"):
        abf.apply({"params": p}, x)
