"""MixStyle (Zhou et al. ICLR 2021): the map against a numpy transcription of the
reference code, its gradient, the module's draws and modes, and a CNN student trained
through the engine with MixStyle layers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import methods, models
from kdjax.models import MixStyle, mix_statistics
from kdjax.train import Distiller


def _reference(x, lam, perm, eps=1e-6):
    """The reference ``MixStyle.forward`` (mixstyle-release) in numpy, channels-last:
    ``x.var`` is torch's unbiased variance over the spatial axes."""
    axes = tuple(range(1, x.ndim - 1))
    x = x.astype(np.float64)
    mu = x.mean(axis=axes, keepdims=True)
    sig = np.sqrt(x.var(axis=axes, keepdims=True, ddof=1) + eps)
    lmda = lam.reshape((-1,) + (1,) * (x.ndim - 1))
    mu_mix = mu * lmda + mu[perm] * (1 - lmda)
    sig_mix = sig * lmda + sig[perm] * (1 - lmda)
    return (x - mu) / sig * sig_mix + mu_mix


@pytest.mark.parametrize("shape", [(6, 5, 4, 3), (5, 11, 7)])
def test_mix_statistics_equals_reference(shape):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=shape) * rng.uniform(0.5, 3, size=(shape[0], 1, shape[-1]))
         .reshape((shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],))
         + 2.0).astype(np.float32)
    lam = rng.beta(0.1, 0.1, size=shape[0])
    perm = rng.permutation(shape[0])
    out = mix_statistics(jnp.asarray(x), jnp.asarray(lam, jnp.float32), jnp.asarray(perm))
    np.testing.assert_allclose(np.asarray(out), _reference(x, lam, perm), rtol=1e-4,
                               atol=1e-4)
    # lambda = 1 (or the identity permutation) gives x back
    same = mix_statistics(jnp.asarray(x), jnp.ones(shape[0]), jnp.asarray(perm))
    np.testing.assert_allclose(np.asarray(same), x, rtol=1e-5, atol=1e-5)


def test_gradient_holds_the_statistics_constant():
    """mu and sigma are detached: d<w, out>/dx = w * sigma_mix / sigma elementwise."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 6, 2)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 6, 2)), jnp.float32)
    lam, perm = jnp.asarray([0.2, 0.9, 0.5, 0.0]), jnp.asarray([2, 0, 3, 1])
    g = jax.grad(lambda x: jnp.sum(w * mix_statistics(x, lam, perm)))(x)
    xn = np.asarray(x, np.float64)
    sig = np.sqrt(xn.var(axis=1, keepdims=True, ddof=1) + 1e-6)
    l3 = np.asarray(lam).reshape(-1, 1, 1)
    sig_mix = l3 * sig + (1 - l3) * sig[np.asarray(perm)]
    np.testing.assert_allclose(np.asarray(g), np.asarray(w) * sig_mix / sig, rtol=1e-5)


def test_module_modes_draws_and_statistics():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(16, 8, 3)) * rng.uniform(0.5, 3, size=(16, 1, 3))
                    + rng.normal(size=(16, 1, 3)) * 4, jnp.float32)
    m = MixStyle(p=1.0)
    key = {"dropout": jax.random.PRNGKey(0)}
    assert m.init(key, x) == {}  # no parameters
    np.testing.assert_array_equal(np.asarray(m.apply({}, x, train=False)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(MixStyle(p=0.0).apply({}, x, train=True)),
                                  np.asarray(x))
    out = np.asarray(m.apply({}, x, train=True, rngs=key))
    np.testing.assert_array_equal(out, np.asarray(m.apply({}, x, train=True, rngs=key)))
    assert not np.allclose(out, np.asarray(m.apply({}, x, train=True, rngs={
        "dropout": jax.random.PRNGKey(1)})))
    # every output example has the statistics lam*own + (1-lam)*partner's for one
    # partner j and one lam shared by mean and std of all channels; partners permute
    xn = np.asarray(x, np.float64)
    mu, sd = xn.mean(1), np.sqrt(xn.var(1, ddof=1) + 1e-6)
    mo, so = out.mean(1), out.std(1, ddof=1)
    partners = []
    for i in range(16):
        fits = []
        for j in range(16):
            a = np.concatenate([mu[i] - mu[j], sd[i] - sd[j]])
            b = np.concatenate([mo[i] - mu[j], so[i] - sd[j]])
            lam = a @ b / max(a @ a, 1e-12)
            if np.allclose(lam * a, b, atol=2e-3) and -1e-3 <= lam <= 1 + 1e-3:
                fits.append(j)
        assert fits, f"example {i}: statistics are no mixture of two examples'"
        partners.append(fits)
    assert len({p[0] for p in partners if len(p) == 1}) == sum(len(p) == 1 for p in partners)
    # with p = 0.5, about half of many calls mix
    mixed = [not np.allclose(np.asarray(MixStyle(p=0.5).apply(
        {}, x, train=True, rngs={"dropout": jax.random.PRNGKey(k)})), np.asarray(x))
        for k in range(40)]
    assert 10 <= sum(mixed) <= 30
    # alpha = 0.1 puts Beta draws near 0 and 1: outputs stay finite
    for k in range(20):
        assert np.isfinite(np.asarray(m.apply({}, x, train=True, rngs={
            "dropout": jax.random.PRNGKey(100 + k)}))).all()


@pytest.mark.parametrize("bad,match", [
    ({"p": 1.5}, r"p must be in \[0, 1\], got 1.5"),
    ({"alpha": 0.0}, r"alpha must be > 0, got 0.0"),
])
def test_module_rejects_bad_options(bad, match):
    with pytest.raises(ValueError, match=match):
        MixStyle(**bad).apply({}, jnp.ones((2, 3, 1)), train=True,
                              rngs={"dropout": jax.random.PRNGKey(0)})
    with pytest.raises(ValueError, match=r"at least one spatial axis, got shape \(2, 3\)"):
        mix_statistics(jnp.ones((2, 3)), jnp.ones(2), jnp.arange(2))
    with pytest.raises(ValueError, match=r"lam must have shape \(2,\).*got \(3,\)"):
        mix_statistics(jnp.ones((2, 3, 1)), jnp.ones(3), jnp.arange(2))
    with pytest.raises(ValueError, match=r"perm must have shape \(2,\).*got \(2, 1\)"):
        mix_statistics(jnp.ones((2, 3, 1)), jnp.ones(2), jnp.zeros((2, 1), int))


def test_cnn_mixstyle_option_and_engine_training():
    with pytest.raises(ValueError, match=r"CNN2D: mixstyle must list stage indices in \[1\]"
                                         r".*got \[2\]"):
        models.create("cnn2d", 3, channels=(4, 8), mixstyle=(2,)).init(
            jax.random.PRNGKey(0), jnp.ones((2, 8, 8, 1)))
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 40)).astype(np.float32)
    y = (x[:, :20].mean(1) > 0).astype(np.int32) + (x[:, 20:].mean(1) > 0)
    plain = models.create("cnn1d", 3, channels=(8, 8))
    mixed = models.create("cnn1d", 3, channels=(8, 8), mixstyle=(1,))
    ce = (methods.build({"name": "ce"}),)
    states = {}
    for name, net in [("plain", plain), ("mixed", mixed)]:
        d = Distiller(net, ce, optax.adam(1e-2))
        s = d.init(jax.random.PRNGKey(0), x[:2])
        states[name] = (d, s)
    # no parameters are added, eval mode is the plain network, train mode is not
    dp, sp = states["plain"]
    dm, sm = states["mixed"]
    assert jax.tree_util.tree_structure(sp.params) == jax.tree_util.tree_structure(sm.params)
    batch = {"x": x[:32], "y": y[:32]}
    ev = [d._student_out(s.params, s.batch_stats, batch["x"], False)[0][0]
          for d, s in ((dp, sp), (dm, sm))]
    np.testing.assert_allclose(np.asarray(ev[0]), np.asarray(ev[1]), rtol=1e-6)
    losses = {k: float(dm.loss_fn(sm.params, sm, None, batch, jax.random.PRNGKey(k))[0])
              for k in range(8)}
    assert len(set(round(v, 6) for v in losses.values())) > 1
    assert all(np.isfinite(v) for v in losses.values())
