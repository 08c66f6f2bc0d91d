"""kdjax.recipes.simclr: NT-Xent, views, the trainer and its vmapped seeds, building from
configs, the cached encoder (one cache, key = config hash), and label-free distillation
data with the CoSS neighbour plan."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import methods, models
from kdjax._io import config_hash
from kdjax.data.neighbors import knn_graph
from kdjax.recipes.simclr import (SimCLR, cached_encoder, label_free_data, make_simclr,
                                  neighbor_plan, nt_xent, view_augment)
from kdjax.train import Distiller, cache, make_optimizer

ADAM = {"name": "adam", "learning_rate": 3e-3, "schedule": "constant"}
SSL = {"temperature": 0.5, "proj_dim": 8, "hidden_dim": 16, "max_shift": 2, "scale": 0.1,
       "noise_std": 0.05}


def _x(n=64, seed=3):
    return np.random.default_rng(seed).normal(size=(n, 40, 1)).astype(np.float32)


def _leaves_close(a, b, **tol):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(u, v, **tol)


# --- NT-Xent and views ------------------------------------------------------------------

def _nt_xent_numpy(z1, z2, tau):
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    s = z @ z.T / tau
    n, b = len(z), len(z1)
    total = 0.0
    for i in range(n):
        j = (i + b) % n
        others = [k for k in range(n) if k != i]
        total += -s[i, j] + np.log(np.sum(np.exp(s[i, others])))
    return total / n


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_nt_xent_matches_numpy(tau):
    rng = np.random.default_rng(2)
    z1, z2 = rng.normal(size=(2, 6, 5)).astype(np.float32)
    np.testing.assert_allclose(float(nt_xent(z1, z2, tau)), _nt_xent_numpy(z1, z2, tau),
                               rtol=1e-4)
    np.testing.assert_allclose(float(jax.jit(nt_xent)(z1, z2, tau)),
                               _nt_xent_numpy(z1, z2, tau), rtol=1e-4)


def test_nt_xent_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        nt_xent(jnp.ones((4, 3)), jnp.ones((5, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        nt_xent(jnp.ones((1, 3)), jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(jnp.ones((4, 3)), jnp.ones((4, 3)), 0.0)


def test_view_augment_deterministic_and_label_preserving_shapes():
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 40, 1))
    fn = view_augment(max_shift=3, scale=0.2, noise_std=0.1)
    a, b = fn(jax.random.PRNGKey(1), x), fn(jax.random.PRNGKey(1), x)
    np.testing.assert_array_equal(a, b)
    assert a.shape == x.shape and not np.allclose(a, x)
    np.testing.assert_array_equal(view_augment(0, 0.0, 0.0)(jax.random.PRNGKey(1), x), x)
    # amplitude only: each example is a positive multiple within [1 - s, 1 + s]
    y = view_augment(0, 0.25, 0.0)(jax.random.PRNGKey(2), x)
    ratio = np.asarray(y / x).reshape(8, -1)
    np.testing.assert_allclose(ratio, ratio[:, :1] * np.ones_like(ratio), rtol=1e-5)
    assert np.all((ratio >= 0.75 - 1e-6) & (ratio <= 1.25 + 1e-6))
    img = view_augment(1)(jax.random.PRNGKey(0), jnp.ones((2, 8, 8, 1)))
    assert img.shape == (2, 8, 8, 1)
    with pytest.raises(ValueError, match="scale"):
        view_augment(scale=1.0)


# --- the trainer ------------------------------------------------------------------------

def test_simclr_epoch_lowers_loss_and_vmapped_seeds_equal_single():
    x = jnp.asarray(_x())
    enc = models.create("cnn1d", 10, channels=(4, 8))
    tx = make_optimizer(ADAM, total_steps=40, steps_per_epoch=4)
    trainer = SimCLR(enc, tx, view_augment(2, 0.1, 0.05), temperature=0.5, proj_dim=8,
                     hidden_dim=16)
    single = [trainer.fit(trainer.init(s, x[:2]), x, epochs=3, batch_size=16)[0]
              for s in (0, 1)]
    keys = jnp.stack([jax.random.PRNGKey(s) for s in (0, 1)])
    both, losses = trainer.fit(jax.vmap(lambda k: trainer.init(k, x[:2]))(keys), x,
                               epochs=3, batch_size=16, num_seeds=2)
    for i in (0, 1):
        _leaves_close(single[i].params, jax.tree_util.tree_map(lambda v: v[i], both.params),
                      rtol=2e-4, atol=2e-5)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses[-1])


def test_make_simclr_builds_the_trainer_of_an_ssl_config():
    enc = models.create("cnn1d", 10, channels=(4,))
    trainer = make_simclr(enc, ADAM, num_examples=64, batch_size=16, epochs=2, **SSL)
    assert (trainer.temperature, trainer.proj_dim, trainer.hidden_dim) == (0.5, 8, 16)
    x = jnp.asarray(_x(8))
    key = jax.random.PRNGKey(4)
    np.testing.assert_array_equal(trainer.augment(key, x), view_augment(2, 0.1, 0.05)(key, x))
    by_hand = SimCLR(enc, make_optimizer(ADAM, total_steps=8, steps_per_epoch=4),
                     view_augment(2, 0.1, 0.05), temperature=0.5, proj_dim=8, hidden_dim=16)
    a = trainer.fit(trainer.init(0, x[:2]), _x(), epochs=2, batch_size=16)[0]
    b = by_hand.fit(by_hand.init(0, x[:2]), _x(), epochs=2, batch_size=16)[0]
    _leaves_close(a.params, b.params, rtol=0, atol=0)
    with pytest.raises(TypeError, match="nope"):
        make_simclr(enc, ADAM, num_examples=64, batch_size=16, epochs=2, nope=1)


@pytest.mark.parametrize("vmap", [True, False])
def test_fit_seeds_one_encoder_per_seed_like_fit_and_checkpoint_layout(tmp_path, vmap):
    x = _x()
    trainer = make_simclr(models.create("cnn1d", 10, channels=(4,)), ADAM, num_examples=64,
                          batch_size=16, epochs=2, **SSL)
    out = trainer.fit_seeds(x, [0, 1], epochs=2, batch_size=16, vmap=vmap,
                            ckpt_dir=str(tmp_path), name="run", checkpoint_every=1)
    assert len(out) == 2
    for seed, (variables, losses) in zip((0, 1), out):
        state, ref = trainer.fit(trainer.init(seed, x[:2]), x, epochs=2, batch_size=16)
        _leaves_close(variables, trainer.encoder_variables(state), rtol=2e-4, atol=2e-5)
        assert len(losses) == 2
        np.testing.assert_allclose(losses, [v[0] for v in ref], rtol=1e-4)
        assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree_util.tree_leaves(variables))
    expected = {"run_0_1"} if vmap else {"run_0", "run_1"}
    assert set(os.listdir(tmp_path)) == expected
    # resume: every checkpoint is complete, so a rerun trains nothing and returns the same
    again = trainer.fit_seeds(x, [0, 1], epochs=2, batch_size=16, vmap=vmap,
                              ckpt_dir=str(tmp_path), name="run")
    for (a, la), (b, lb) in zip(out, again):
        _leaves_close(a, b, rtol=0, atol=0)
        assert la == lb


# --- the cached encoder -----------------------------------------------------------------

def test_cached_encoder_trains_once_per_config_hash(tmp_path):
    x = _x()
    enc = models.create("cnn1d", 10, channels=(4,))
    config = {"model": "cnn1d", "epochs": 2, "batch_size": 16, "seed": 0, "optimizer": ADAM}
    data = {"name": "random", "n": 64}
    kw = dict(config=config, ssl=SSL, data=data, cache_dir=str(tmp_path))
    variables, meta = cached_encoder(enc, x, **kw)
    key = config_hash("simclr", config, SSL, data)     # the key of earlier revisions
    assert not meta["cached"] and meta["key"] == key and meta["kind"] == "simclr"
    assert len(meta["losses"]) == 2 and meta["config"] == config and meta["ssl"] == SSL
    assert os.path.exists(cache.entry_paths(str(tmp_path), f"teacher_simclr_{key}")[1])
    assert not os.path.exists(cache.checkpoint_dir(str(tmp_path), f"teacher_simclr_{key}"))
    # the encoder of one SimCLR run from the config's seed
    trainer = make_simclr(enc, ADAM, num_examples=64, batch_size=16, epochs=2, **SSL)
    state, _ = trainer.fit(trainer.init(0, x[:2]), x, epochs=2, batch_size=16)
    _leaves_close(variables, trainer.encoder_variables(state), rtol=2e-4, atol=2e-5)
    hit, meta2 = cached_encoder(enc, x, **kw)
    assert meta2["cached"] and meta2["key"] == key
    _leaves_close(hit, variables, rtol=0, atol=0)
    _, other = cached_encoder(enc, x, **{**kw, "ssl": {**SSL, "temperature": 0.2}})
    assert not other["cached"] and other["key"] != key


# --- label-free distillation ------------------------------------------------------------

def test_label_free_data_has_no_labels_by_construction():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 40, 1)).astype(np.float32)
    t = rng.normal(size=(64, 8)).astype(np.float32)
    data = label_free_data(x, t)
    leaves = jax.tree_util.tree_leaves_with_path(data)
    names = {jax.tree_util.keystr(p) for p, _ in leaves}
    assert names == {"['x']", "['teacher_logits']", "['teacher_features']['pooled']"}
    assert not any(np.issubdtype(np.asarray(v).dtype, np.integer) for _, v in leaves)
    np.testing.assert_array_equal(data["teacher_features"]["pooled"], t)
    assert data["teacher_logits"].shape == (64, 0)
    assert set(label_free_data(x, t, feature="h")["teacher_features"]) == {"h"}
    with pytest.raises(ValueError, match="one row per input"):
        label_free_data(x, t[:10])


def test_distillation_step_runs_without_labels_and_ce_would_fail():
    """The engine trains CoSS on the label-free dict; a label-reading loss cannot."""
    x = _x(32, seed=1)
    teacher = models.create("cnn1d", 10, channels=(4, 8))
    tvars = teacher.init(jax.random.PRNGKey(0), x[:2])
    t_feat = np.asarray(teacher.apply(tvars, x)[1]["pooled"])
    data = jax.tree_util.tree_map(jnp.asarray, label_free_data(x, t_feat))
    student = models.create("cnn1d", 10, channels=(4,))
    tx = make_optimizer({"name": "adam", "learning_rate": 1e-2, "schedule": "constant"},
                        total_steps=4, steps_per_epoch=2)
    ok = Distiller(student, (methods.build({"name": "coss", "hidden_dim": 8}),), tx,
                   teacher=teacher, teacher_from_batch=True)
    state = ok.init(0, x[:2], tvars)
    state, terms = ok.jit_epoch(16)(state, tvars, data)
    assert np.isfinite(float(terms["total"])) and int(state.step) == 2
    ce = Distiller(student, (methods.build({"name": "ce"}),), tx, teacher=teacher,
                   teacher_from_batch=True)
    with pytest.raises(KeyError, match="y"):
        ce.jit_epoch(16)(ce.init(0, x[:2], tvars), tvars, data)


def test_neighbor_plan_groups_and_equal_steps():
    x = jax.random.normal(jax.random.PRNGKey(0), (100, 6))
    nbrs, _ = knn_graph(x, k=7)
    fn = neighbor_plan(nbrs, 16, num_sampled=3, num_candidates=7)
    plan = np.asarray(jax.jit(fn, static_argnums=1)(jax.random.PRNGKey(1), 100))
    assert plan.shape == (100 // 16, 16)           # same steps as a random-batch epoch
    nb = np.asarray(nbrs)
    for row in plan:
        for g in row.reshape(-1, 4):               # anchor + 3 of its 7 nearest
            assert set(g[1:]) <= set(nb[g[0]]) and len(set(g[1:])) == 3
    again = np.asarray(fn(jax.random.PRNGKey(1), 100))
    np.testing.assert_array_equal(plan, again)     # deterministic from the key
