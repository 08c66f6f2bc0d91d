"""Robust-teacher methods: registry wiring, method state, partitions from the batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import methods
from kdjax.losses import robust as R


def _outs(seed=0, b=16, c=4, d=3):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(b, c)), jnp.float32)
    feats = {"pooled": jnp.asarray(rng.normal(size=(b, d)), jnp.float32)}
    batch = {"x": jnp.zeros((b, 1)), "y": jnp.asarray(rng.integers(0, c, b)),
             "env": jnp.asarray(np.arange(b) % 2), "group": jnp.asarray(np.arange(b) % 4)}
    return (logits, feats), batch


def _ce(logits, y):
    return np.asarray(-jax.nn.log_softmax(logits)[np.arange(len(y)), y])


def test_groupdro_method_carries_q_and_uses_the_named_partition():
    out, batch = _outs()
    m = methods.build({"name": "groupdro", "partition": "group", "num_partitions": 4,
                       "eta": 0.1})
    params, state = m.init(jax.random.PRNGKey(0), out, None)
    np.testing.assert_allclose(state["q"], 0.25)
    loss, state2 = m(params, state, out, None, batch, jax.random.PRNGKey(1))
    ref_loss, ref_q = R.groupdro_loss(_ce(out[0], batch["y"]), batch["group"],
                                      np.full(4, 0.25), 4, 0.1)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(state2["q"], ref_q, rtol=1e-5)
    _, state3 = m(params, state2, out, None, batch, jax.random.PRNGKey(1))
    assert not np.allclose(state3["q"], state2["q"])  # weights keep moving


def test_vrex_anneals_its_penalty_weight():
    out, batch = _outs(1)
    m = methods.build({"name": "vrex", "num_partitions": 2, "penalty_weight": 100.0,
                       "anneal_steps": 1})
    params, state = m.init(jax.random.PRNGKey(0), out, None)
    l = _ce(out[0], batch["y"])
    first, state = m(params, state, out, None, batch, None)
    second, state = m(params, state, out, None, batch, None)
    np.testing.assert_allclose(first, R.vrex_loss(l, batch["env"], 2, 1.0), rtol=1e-5)
    np.testing.assert_allclose(second, R.vrex_loss(l, batch["env"], 2, 100.0), rtol=1e-5)
    assert int(state["step"]) == 2


def test_coral_method_reads_the_feature():
    out, batch = _outs(2)
    m = methods.build({"name": "coral", "num_partitions": 2, "gamma": 3.0})
    loss, _ = m({}, None, out, None, batch, None)
    ref = R.coral_loss(_ce(out[0], batch["y"]), out[1]["pooled"], batch["env"], 2, 3.0)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    bad = methods.build({"name": "coral", "num_partitions": 2, "features": "stage9"})
    with pytest.raises(ValueError, match="features='stage9' is not a feature"):
        bad({}, None, out, None, batch, None)


def test_missing_partition_array_or_count_is_an_error():
    out, batch = _outs()
    del batch["env"]
    m = methods.build({"name": "vrex", "num_partitions": 2})
    with pytest.raises(ValueError, match="the batch has no 'env' array"):
        m(*m.init(None, out, None), out, None, batch, None)
    m = methods.build({"name": "coral"})
    _, batch = _outs()
    with pytest.raises(ValueError, match="num_partitions must be a positive int"):
        m({}, None, out, None, batch, None)
