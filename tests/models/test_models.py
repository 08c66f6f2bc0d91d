"""Models: feature names/shapes, BN train/eval behaviour, capture by module path."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import models


@pytest.mark.parametrize("name, kwargs, shape, feats", [
    ("mlp", {"hidden": (32, 16)}, (3, 40, 1), {"layer1": (3, 32), "layer2": (3, 16), "pooled": (3, 16)}),
    ("cnn1d", {"channels": (8, 16)}, (3, 40, 1), {"stage1": (3, 40, 8), "stage2": (3, 20, 16), "pooled": (3, 16)}),
    ("cnn1d", {"channels": (8,)}, (3, 40), {"stage1": (3, 40, 8), "pooled": (3, 8)}),
    ("cnn2d", {"channels": (8, 16)}, (3, 8, 8, 1), {"stage1": (3, 8, 8, 8), "stage2": (3, 4, 4, 16), "pooled": (3, 16)}),
    ("resnet8", {}, (2, 16, 16, 3), {"stem": (2, 16, 16, 16), "stage1": (2, 16, 16, 16), "stage2": (2, 8, 8, 32), "stage3": (2, 4, 4, 64), "pooled": (2, 64)}),
    ("resnet8x4", {}, (2, 16, 16, 3), {"stage3": (2, 4, 4, 256), "pooled": (2, 256)}),
    ("wrn_10_2", {}, (2, 16, 16, 3), {"stage1": (2, 16, 16, 32), "stage3": (2, 4, 4, 128), "pooled": (2, 128)}),
])
def test_feature_names_and_shapes(name, kwargs, shape, feats):
    m = models.create(name, 7, **kwargs)
    v = m.init(jax.random.PRNGKey(0), jnp.zeros(shape))
    logits, f = m.apply(v, jnp.ones(shape))
    assert logits.shape == (shape[0], 7)
    for k, s in feats.items():
        assert f[k].shape == s, (k, f[k].shape)


def test_resnet32x4_and_resnet8x4_depths_differ():
    count = lambda name: sum(x.size for x in jax.tree_util.tree_leaves(
        models.create(name, 100).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]))
    assert count("resnet32x4") > 3 * count("resnet8x4")


def test_batchnorm_eval_uses_running_stats_and_train_updates_them():
    m = models.create("cnn1d", 3, channels=(4,))
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 40, 1)) * 3 + 5
    v = m.init(jax.random.PRNGKey(0), x)
    out_eval1 = m.apply(v, x, train=False)[0]
    out_eval2 = m.apply(v, x[:1], train=False)[0]
    np.testing.assert_allclose(out_eval1[:1], out_eval2, rtol=1e-5, atol=1e-6)  # per-example
    (_, _), upd = m.apply(v, x, train=True, mutable=["batch_stats"])
    old = jax.tree_util.tree_leaves(v["batch_stats"])
    new = jax.tree_util.tree_leaves(upd["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(old, new))


def test_with_features_captures_user_module_by_path():
    class User(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(5, name="body")(x))
            return nn.Dense(3, name="out")(h)

    u = User()
    x = jnp.ones((2, 4))
    v = u.init(jax.random.PRNGKey(0), x)
    apply = models.with_features(u, {"hidden": "body"}, pooled="body")
    logits, f = apply(v, x)
    ref = v["params"]["body"]
    np.testing.assert_allclose(f["hidden"], x @ ref["kernel"] + ref["bias"], rtol=1e-6)
    np.testing.assert_allclose(logits, u.apply(v, x))
    assert "body" in models.available_paths(u, v, x)
    with pytest.raises(ValueError, match=r"not found in User; available paths: \[.*'body'"):
        models.with_features(u, ["missing"])(v, x)


@pytest.mark.parametrize("name, match", [
    ("resnet9", r"ResNet depth must be 6n\+2"), ("wrn_15_2", r"depth must be 6n\+4"),
    ("vgg", r"unknown model 'vgg'; valid models"),
])
def test_bad_model_names(name, match):
    with pytest.raises(ValueError, match=match):
        models.create(name, 10)
