"""kdjax.models.wrap: the train flag by signature, outputs, variables, equality."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import methods, models
from kdjax.train import Distiller


class Flagged(nn.Module):
    """Returns ``(logits, {"mode": flag})`` so the test sees what the module received."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Dense(3, name="body")(x)
        return nn.Dense(2)(h), {"mode": jnp.full((x.shape[0],), float(train))}


class Det(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        return nn.Dense(2)(x) * (1.0 if deterministic else -1.0)


class Plain(nn.Module):
    @nn.compact
    def __call__(self, x, eval_mode: bool = True):
        h = nn.Dense(3, name="body")(x)
        self.sow("intermediates", "energy", (h ** 2).sum(-1))
        return nn.Dense(2)(h) * (1.0 if eval_mode else -1.0)


X = jnp.arange(8.0).reshape(2, 4) / 8


def _apply(m, v, train):
    return m.apply(v, X, train=train)


def test_train_flag_by_signature():
    w = models.wrap(Flagged())
    v = w.init(jax.random.PRNGKey(0), X)
    assert (w.train_arg, w.invert) == ("train", False)
    assert float(_apply(w, v, True)[1]["mode"][0]) == 1.0
    assert float(_apply(w, v, False)[1]["mode"][0]) == 0.0

    d = models.wrap(Det())
    vd = d.init(jax.random.PRNGKey(0), X)
    assert (d.train_arg, d.invert) == ("deterministic", True)
    np.testing.assert_allclose(_apply(d, vd, True)[0], -_apply(d, vd, False)[0])

    p = models.wrap(Plain(), train_arg="eval_mode", invert=True)
    vp = p.init(jax.random.PRNGKey(0), X)
    np.testing.assert_allclose(_apply(p, vp, True)[0], -_apply(p, vp, False)[0])
    assert models.wrap(Plain()).train_arg is None      # no known flag: one mode
    with pytest.raises(ValueError, match=r"train_arg='training', but Plain.__call__ takes "
                                         r"\['x', 'eval_mode'\]"):
        models.wrap(Plain(), train_arg="training")


def test_features_by_path_and_sown_values_merge_with_own_features():
    w = models.wrap(Flagged(), {"h": "body"}, pooled="body")
    v = w.init(jax.random.PRNGKey(0), X)
    logits, f = _apply(w, v, False)
    k = v["params"]["module"]["body"]
    np.testing.assert_allclose(f["h"], X @ k["kernel"] + k["bias"], rtol=1e-6)
    np.testing.assert_allclose(f["pooled"], f["h"])
    assert sorted(f) == ["h", "mode", "pooled"]
    p = models.wrap(Plain(), ["energy"])
    vp = p.init(jax.random.PRNGKey(0), X)
    _, fp = _apply(p, vp, False)
    kb = vp["params"]["module"]["body"]
    np.testing.assert_allclose(fp["energy"], ((X @ kb["kernel"] + kb["bias"]) ** 2).sum(-1),
                               rtol=1e-5)
    with pytest.raises(ValueError, match=r"returns features \['mode'\]"):
        models.wrap(Flagged(), {"mode": "body"}).init(jax.random.PRNGKey(0), X)


def test_wrap_variables_nest_the_inner_tree_and_give_the_inner_numbers():
    inner = Plain()
    v = inner.init(jax.random.PRNGKey(1), X)
    w = models.wrap(inner)
    wv = models.wrap_variables(v)
    assert jax.tree_util.tree_structure(wv) == jax.tree_util.tree_structure(
        w.init(jax.random.PRNGKey(0), X))
    np.testing.assert_allclose(w.apply(wv, X, train=False)[0], inner.apply(v, X))


def test_wrapped_modules_compare_by_value_so_programs_are_shared():
    tx = optax.sgd(0.1)

    def distiller():
        return Distiller(models.wrap(Plain(), {"h": "body"}), (methods.build({"name": "ce"}),),
                         tx)
    a, b = distiller(), distiller()
    assert a.student == b.student and hash(a.student) == hash(b.student)
    assert a.signature() == b.signature()
    assert models.wrap(Plain(), ["body"]) != models.wrap(Plain(), ["energy"])
