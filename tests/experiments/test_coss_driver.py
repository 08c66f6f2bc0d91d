"""experiments/coss.py: label-free distillation data, neighbour plan, SimCLR pieces,
config validation, and (slow) a tiny end-to-end run with resume."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import coss as driver
from experiments.configs import coss as coss_config
from kdjax import methods, models
from kdjax.experiment.config import load_config
from kdjax.data.neighbors import knn_graph
from kdjax.recipes.simclr import SimCLR, nt_xent, view_augment
from kdjax.train import Distiller, make_optimizer


# --- the distillation batch cannot see labels ------------------------------------------

def test_distill_data_has_no_labels_by_construction():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 40, 1)).astype(np.float32)
    t = rng.normal(size=(64, 8)).astype(np.float32)
    data = driver.distill_data(x, t)
    leaves = jax.tree_util.tree_leaves_with_path(data)
    names = {jax.tree_util.keystr(p) for p, _ in leaves}
    assert names == {"['x']", "['teacher_logits']", "['teacher_features']['pooled']"}
    assert not any(np.issubdtype(np.asarray(v).dtype, np.integer) for _, v in leaves)
    np.testing.assert_array_equal(data["teacher_features"]["pooled"], t)
    with pytest.raises(ValueError, match="one row per input"):
        driver.distill_data(x, t[:10])


def test_distillation_step_runs_without_labels_and_ce_would_fail():
    """The engine trains CoSS on the label-free dict; a label-reading loss cannot."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 40, 1)).astype(np.float32)
    teacher = models.create("cnn1d", 10, channels=(4, 8))
    tvars = teacher.init(jax.random.PRNGKey(0), x[:2])
    t_feat = np.asarray(teacher.apply(tvars, x)[1]["pooled"])
    data = jax.tree_util.tree_map(jnp.asarray, driver.distill_data(x, t_feat))
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


# --- neighbour batch plan ---------------------------------------------------------------

def test_neighbor_plan_groups_and_equal_steps():
    x = jax.random.normal(jax.random.PRNGKey(0), (100, 6))
    nbrs, _ = knn_graph(x, k=7)
    fn = driver.neighbor_plan(nbrs, 16, num_sampled=3, num_candidates=7)
    plan = np.asarray(jax.jit(fn, static_argnums=1)(jax.random.PRNGKey(1), 100))
    assert plan.shape == (100 // 16, 16)           # same steps as a random-batch epoch
    nb = np.asarray(nbrs)
    for row in plan:
        for g in row.reshape(-1, 4):               # anchor + 3 of its 7 nearest
            assert set(g[1:]) <= set(nb[g[0]]) and len(set(g[1:])) == 3
    again = np.asarray(fn(jax.random.PRNGKey(1), 100))
    np.testing.assert_array_equal(plan, again)     # deterministic from the key


# --- SimCLR pieces (kdjax.recipes.simclr) ----------------------------------------------------------

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


def test_simclr_epoch_lowers_loss_and_vmapped_seeds_equal_single():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(64, 40, 1)).astype(np.float32))
    enc = models.create("cnn1d", 10, channels=(4, 8))
    tx = make_optimizer({"name": "adam", "learning_rate": 3e-3, "schedule": "constant"},
                        total_steps=40, steps_per_epoch=4)
    trainer = SimCLR(enc, tx, view_augment(2, 0.1, 0.05), temperature=0.5, proj_dim=8,
                     hidden_dim=16)
    single = [trainer.fit(trainer.init(s, x[:2]), x, epochs=3, batch_size=16)[0]
              for s in (0, 1)]
    keys = jnp.stack([jax.random.PRNGKey(s) for s in (0, 1)])
    both, losses = trainer.fit(jax.vmap(lambda k: trainer.init(k, x[:2]))(keys), x,
                               epochs=3, batch_size=16, num_seeds=2)
    for i in (0, 1):
        for a, b in zip(jax.tree_util.tree_leaves(single[i].params),
                        jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda v: v[i],
                                                                         both.params))):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses[-1])


# --- config -----------------------------------------------------------------------------

@pytest.mark.parametrize("override, match", [
    ("student.batch_size=100", "multiple of 1"),
    ("dataset.shift_config='nope'", "shift_config"),
    ("teacher.kind='dino'", "teacher.kind"),
    ("seeds=0", "seeds"),
    ("runs=[{'name': 'ce', 'kind': 'distill', 'sampler': 'random', "
     "'method': {'name': 'ce'}}]", "reads labels"),
    ("runs=[{'name': 'a', 'kind': 'distill', 'sampler': 'knn', "
     "'method': {'name': 'coss'}}]", "sampler"),
])
def test_validate_rejects_bad_configs(override, match):
    with pytest.raises(ValueError, match=match):
        load_config("experiments.configs.coss", [override])


def test_config_variants():
    assert load_config("experiments.configs.coss").dataset.name == "mnist1d"
    d = load_config("experiments.configs.coss", arg="digits")
    assert d.dataset.name == "digits" and d.student.model == "cnn2d"
    with pytest.raises(ValueError, match="variant"):
        coss_config.get_config("cifar")
    with pytest.raises(ValueError, match="unknown config key"):
        load_config("experiments.configs.coss", ["student.nope=1"])


# --- end to end -------------------------------------------------------------------------

TINY = [
    "dataset.max_train=256", "seeds=2", "teacher.epochs=1", "teacher.batch_size=64",
    "teacher.model_kwargs.channels=(4, 8)", "student.model_kwargs.channels=(4,)",
    "student.epochs=2", "student.batch_size=64", "distill.num_sampled=3", "distill.knn_k=7",
    "distill.hidden_dim=16", "ssl.hidden_dim=16", "ssl.proj_dim=8",
    "eval.probe_steps=20", "progress=False", "checkpoint_every=1",
    "runs=[{'name': 'simclr', 'kind': 'simclr'}, "
    "{'name': 'cosine', 'kind': 'distill', 'sampler': 'random', 'method': {'name': 'cosine'}}, "
    "{'name': 'coss', 'kind': 'distill', 'sampler': 'neighbors', "
    "'method': {'name': 'coss', 'l1': 1.0}}]",
]


@pytest.mark.slow
def test_driver_end_to_end_and_resume(tmp_path):
    from kdjax.experiment import results as R

    args = [f"--config.{o}" for o in TINY] + [f"--config.out_dir={tmp_path}/out",
                                              f"--config.cache_dir={tmp_path}/cache"]
    summary = driver.main(args)
    rows = R.read_jsonl(str(tmp_path / "out" / "results.jsonl"))
    runs = {r["run"] for r in rows}
    assert runs == {"teacher", "simclr", "cosine", "coss"}
    students = [r for r in rows if r["run"] != "teacher"]
    assert sorted((r["run"], r["seed"]) for r in students) == sorted(
        (n, s) for n in ("simclr", "cosine", "coss") for s in (0, 1))
    for r in rows:
        for m in driver.METRICS:
            assert 0.0 <= r[m] <= 1.0
        assert r["config_hash"] and r["git_revision"] and r["global_batch_size"] == 64
        assert r["config"]["dataset"]["max_train"] == 256
    coss_rows = [r for r in students if r["run"] == "coss"]
    assert all(r["sampler"] == "neighbors" and r["method"]["l1"] == 1.0 for r in coss_rows)
    assert all(r["steps"] == 2 * (256 // 64) for r in students)
    table = (tmp_path / "out" / "results.md").read_text()
    for name in ("| teacher |", "| simclr |", "| cosine |", "| coss |", "±"):
        assert name in table
    assert (tmp_path / "out" / "results.png").stat().st_size > 0
    assert {s["run"]: s["n"] for s in summary} == {"teacher": 1, "simclr": 2, "cosine": 2,
                                                   "coss": 2}
    # rerun: everything is done (rows keyed by config hash), the cached teacher is reused
    driver.main(args)
    again = R.read_jsonl(str(tmp_path / "out" / "results.jsonl"))
    assert len(again) == len(rows)
