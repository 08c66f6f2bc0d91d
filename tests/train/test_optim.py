"""make_optimizer: the learning rate is a traced number of the optimiser state, with the
numbers of the plain optax optimisers, and cells that differ only in it share programs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import methods, models
from kdjax.train import Distiller, count_compilations, fit, make_optimizer

PARAMS = {"w": jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3), "b": jnp.ones(3)}


def _reference(cfg, total):
    lr = cfg["learning_rate"]
    if cfg.get("schedule", "cosine") == "cosine":
        sched = optax.cosine_decay_schedule(lr, total)
    else:
        sched = optax.constant_schedule(lr)
    wd = cfg.get("weight_decay", 0.0)
    if cfg["name"] == "sgd":
        parts = [optax.add_decayed_weights(wd)] if wd else []
        return optax.chain(*parts, optax.sgd(sched, momentum=cfg.get("momentum", 0.9),
                                             nesterov=cfg.get("nesterov", False)))
    if cfg["name"] == "adamw":
        return optax.adamw(sched, weight_decay=wd)
    clip = [optax.clip_by_global_norm(cfg["grad_clip"])] if cfg.get("grad_clip") else []
    return optax.chain(*clip, optax.adam(sched))


@pytest.mark.parametrize("cfg", [
    {"name": "sgd", "learning_rate": 0.05, "schedule": "cosine", "weight_decay": 5e-4},
    {"name": "sgd", "learning_rate": 0.1, "schedule": "constant", "nesterov": True},
    {"name": "adamw", "learning_rate": 3e-3, "weight_decay": 1e-2},
    {"name": "adam", "learning_rate": 1e-3, "schedule": "constant", "grad_clip": 1.0},
])
def test_same_numbers_as_the_plain_optax_optimiser(cfg):
    """Bit-identical trajectories (constant and cosine schedules): lr * s(t) with s at
    peak 1 rounds exactly like the schedule built at lr."""
    total = 20
    tx, ref = make_optimizer(cfg, total_steps=total, steps_per_epoch=5), _reference(cfg, total)
    s1, s2, p1, p2 = tx.init(PARAMS), ref.init(PARAMS), PARAMS, PARAMS
    for t in range(12):
        g = jax.tree.map(lambda p: jnp.sin(p * (t + 1)), p1)
        u1, s1 = jax.jit(tx.update)(g, s1, p1)
        u2, s2 = jax.jit(ref.update)(g, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_step_schedule_and_warmup_match_up_to_rounding():
    cfg = {"name": "sgd", "learning_rate": 0.2, "schedule": "step", "decay_epochs": [2, 3],
           "decay_factor": 0.1, "warmup_epochs": 1}
    tx = make_optimizer(cfg, total_steps=20, steps_per_epoch=4)
    sched = optax.join_schedules(
        [optax.linear_schedule(0.0, 0.2, 4),
         optax.piecewise_constant_schedule(0.2, {8: 0.1, 12: 0.1})], [4])
    ref = optax.sgd(sched, momentum=0.9)
    s1, s2, p1, p2 = tx.init(PARAMS), ref.init(PARAMS), PARAMS, PARAMS
    for t in range(16):
        g = jax.tree.map(lambda p: jnp.cos(p + t), p1)
        u1, s1 = tx.update(g, s1, p1)
        u2, s2 = ref.update(g, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_learning_rate_is_state_and_update_is_shared():
    a = make_optimizer({"name": "sgd", "learning_rate": 0.1}, total_steps=10, steps_per_epoch=2)
    b = make_optimizer({"name": "sgd", "learning_rate": 0.4}, total_steps=10, steps_per_epoch=2)
    c = make_optimizer({"name": "sgd", "learning_rate": 0.1, "momentum": 0.5},
                       total_steps=10, steps_per_epoch=2)
    d = make_optimizer({"name": "sgd", "learning_rate": 0.1}, total_steps=12, steps_per_epoch=2)
    assert a.update is b.update
    assert a.update is not c.update and a.update is not d.update
    assert float(a.init(PARAMS).hyperparams["learning_rate"]) == np.float32(0.1)
    assert float(b.init(PARAMS).hyperparams["learning_rate"]) == np.float32(0.4)
    # the shared update really reads the rate from the state: b's step is 4x a's
    g = jax.tree.map(jnp.ones_like, PARAMS)
    ua, _ = a.update(g, a.init(PARAMS), PARAMS)
    ub, _ = b.update(g, b.init(PARAMS), PARAMS)
    np.testing.assert_allclose(np.asarray(ub["w"]), 4 * np.asarray(ua["w"]), rtol=1e-6)


def _cell(lr, tx=None):
    r = np.random.default_rng(0)
    x = r.normal(size=(96, 12)).astype(np.float32)
    data = {"x": x, "y": (x[:, 0] > 0).astype(np.int32)}
    student = models.create("mlp", 2, hidden=(16,))
    tx = tx or make_optimizer({"name": "sgd", "learning_rate": lr, "schedule": "cosine"},
                              total_steps=6, steps_per_epoch=3)
    d = Distiller(student, (methods.build({"name": "ce"}),), tx)
    with count_compilations() as c:
        state = d.init_seeds([0, 1], x[:2])
        res = fit(d, state, None, data, epochs=2, batch_size=32, progress=False)
    return c, res


def test_cells_differing_only_in_learning_rate_share_every_program():
    first, a = _cell(0.05)
    assert first.count >= 2
    again, b = _cell(0.2)
    assert again.count == 0
    # the rate reached both the compiled init and the compiled epoch
    np.testing.assert_allclose(np.asarray(b.state.opt_state.hyperparams["learning_rate"]),
                               [0.2, 0.2])
    fa = np.concatenate([np.ravel(v) for v in jax.tree.leaves(a.state.params)])
    fb = np.concatenate([np.ravel(v) for v in jax.tree.leaves(b.state.params)])
    assert not np.allclose(fa, fb)
    # and the reused program gives the numbers of plain optax at 0.2 (its own program)
    _, fresh = _cell(None, optax.sgd(optax.cosine_decay_schedule(0.2, 6), momentum=0.9))
    for x, y in zip(jax.tree.leaves(fresh.state.params), jax.tree.leaves(b.state.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
