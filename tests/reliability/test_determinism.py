"""Determinism: same seed -> identical metrics; 1 vs 8 devices agree step by step."""

import jax
import numpy as np

from kdjax import methods, models
from kdjax.train import (Distiller, EvalSet, Evaluation, fit, make_mesh, make_optimizer,
                         replicate, shard_batch)


def _data(n=192, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 12)).astype(np.float32)
    y = ((x[:, :4].sum(1) > 0).astype(np.int32) + 2 * (x[:, 4:8].sum(1) > 0)).astype(np.int32)
    return {"x": x, "y": y}


def _distiller(steps_per_epoch=8, total_steps=64):
    ms = (methods.build({"name": "ce", "weight": 0.3}),
          methods.build({"name": "kd", "weight": 0.7}),
          methods.build({"name": "sp", "weight": 10.0}))   # a batch-level (relation) loss
    tx = make_optimizer({"name": "sgd", "learning_rate": 0.05, "schedule": "cosine"},
                        total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    return Distiller(models.create("mlp", 4, hidden=(32,)), ms, tx,
                     teacher=models.create("mlp", 4, hidden=(16,)))


def test_same_seed_gives_identical_metrics_with_eval():
    d, data = _distiller(), _data()
    tv = d.teacher.init(jax.random.PRNGKey(1), data["x"][:2])
    evals = {"val": EvalSet(x=data["x"][:64], y=data["y"][:64]),
             "test": EvalSet(x=data["x"][64:128], y=data["y"][64:128])}
    runs = []
    for seed in (3, 3, 4):
        res = fit(d, d.init(seed, data["x"][:2], tv), tv, data, epochs=2, batch_size=32,
                  evaluation=Evaluation(evals, select_on="val"), progress=False)
        (best,), hist = res.best, res.history
        runs.append((hist, best["metrics"], best["epoch"]))
    assert runs[0] == runs[1]          # every metric of every epoch, bit for bit
    assert len(runs[0][0]) == 2 and {"val", "test", "train"} <= set(runs[0][0][-1])
    assert runs[0][0] != runs[2][0]    # a different seed is a different run


def _loss_trajectory(d, state, tv, data, mesh, steps, batch_size):
    state, tv = replicate(state, mesh), replicate(tv, mesh)
    step = jax.jit(d.train_step, donate_argnums=(0,))
    n = data["x"].shape[0]
    losses = []
    for i in range(steps):
        rows = np.random.default_rng([5, i]).choice(n, batch_size, replace=False)
        batch = shard_batch({k: v[rows] for k, v in data.items()}, mesh)
        state, terms = step(state, tv, batch, jax.random.fold_in(jax.random.PRNGKey(9), i))
        losses.append(float(terms["total"]))
    return np.asarray(losses)


def test_one_vs_eight_devices_agree_on_the_first_50_step_losses(n_devices):
    d, data = _distiller(steps_per_epoch=50, total_steps=50), _data()
    tv = d.teacher.init(jax.random.PRNGKey(1), data["x"][:2])
    init = jax.device_get(d.init(0, data["x"][:2], tv))
    one = _loss_trajectory(d, init, tv, data, make_mesh(1), 50, 32)
    eight = _loss_trajectory(d, init, tv, data, make_mesh(n_devices), 50, 32)
    assert one.shape == (50,) and np.isfinite(one).all()
    np.testing.assert_allclose(eight, one, rtol=1e-4)
    assert one[-5:].mean() < one[:5].mean()   # it trained (not 50 copies of one number)
