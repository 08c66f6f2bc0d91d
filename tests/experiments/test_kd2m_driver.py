"""KD2M driver: configs (default, digits, paper), a tiny end-to-end run (slow), and one
training step of the paper config on mock CIFAR-10 (slow)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import kd2m
from experiments.configs import kd2m as kd2m_config
from experiments.configs import kd2m_paper
from kdjax import methods, models
from kdjax.experiment.config import load_config
from kdjax.train import Distiller, make_optimizer


def test_configs_build_and_validate():
    cfg = kd2m.load([])
    assert cfg.dataset.name == "mnist1d" and cfg.kd2m_weight == "auto"
    runs = kd2m_config.make_runs(cfg.run_names, cfg.kd2m_weight)
    assert [r["name"] for r in runs] == list(cfg.run_names)
    for r in runs:   # every run is CE (weight 1) plus at most one extra term
        assert r["methods"][0] == {"name": "ce", "weight": 1.0} and len(r["methods"]) <= 2
        for m in r["methods"][1:]:
            methods.build({k: v for k, v in m.items() if k != "weight"})
    assert kd2m.load(["digits"]).dataset.name == "digits"
    for ds in kd2m_paper.DATASETS:
        p = kd2m.load([f"paper:{ds}"])
        assert (p.teacher.model, p.student.model) == ("resnet32x4", "resnet8x4")
        assert float(p.kd2m_weight) == 1e-4 and p.student.epochs == 15
        assert p.student.optimizer.to_dict() == {"name": "sgd", "momentum": 0.9,
                                                 "schedule": "cosine", "learning_rate": 1e-2,
                                                 "weight_decay": 0.0}
        assert p.student.batch_size == 128 and p.dataset.name == ds
        w = kd2m_config.make_runs(p.run_names, float(p.kd2m_weight))
        assert all(m["weight"] == 1e-4 for r in w for m in r["methods"][1:]
                   if m["name"].startswith("kd2m"))


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="config.run_names: unknown run 'w3'"):
        load_config("experiments.configs.kd2m", ["run_names=['ce', 'w3']"])
    with pytest.raises(ValueError, match="config.kd2m_weight must be 'auto' or a positive"):
        load_config("experiments.configs.kd2m", ["kd2m_weight=-1"])
    with pytest.raises(ValueError, match="dataset must be one of"):
        kd2m_paper.get_config("imagenet")
    with pytest.raises(ValueError, match="unknown variant 'cifar'"):
        kd2m.load(["cifar"])


def test_heldout_distances_zero_for_identical_features_and_ordered():
    t = np.random.default_rng(0).normal(size=(40, 6)).astype(np.float32)
    d0 = kd2m.heldout_distances(t, t)
    assert abs(d0["heldout_w2"]) < 1e-4 and abs(d0["heldout_gaussian_w2"]) < 1e-3
    near = kd2m.heldout_distances(t + 0.1, t)
    far = kd2m.heldout_distances(t + 1.0, t)
    # pure shift by s in 6 dims: W2^2 = 6 s^2 (both metrics)
    np.testing.assert_allclose(far["heldout_w2"], 6.0, rtol=1e-4)
    np.testing.assert_allclose(far["heldout_gaussian_w2"], 6.0, rtol=1e-3)
    assert near["heldout_w2_rel"] < far["heldout_w2_rel"]


@pytest.mark.slow
def test_kd2m_driver_end_to_end_and_resume(tmp_path):
    names = ["ce", "kd2m_exact_ot", "kd2m_gaussian_w2_cond"]
    args = [f"--config.out_dir={tmp_path}/out", f"--config.cache_dir={tmp_path}/cache",
            f"--config.dataset.data_dir={tmp_path}/data", "--config.dataset.num_train=900",
            "--config.dataset.num_test=200", "--config.dataset.val_size=200",
            "--config.seeds=2", "--config.teacher.epochs=2", "--config.student.epochs=2",
            "--config.student.evaluations=1", "--config.progress=False",
            "--config.teacher.model_kwargs.channels=(8, 16)",
            "--config.student.model_kwargs.channels=(16,)", f"--config.run_names={names}"]
    summary = kd2m.main(args)
    assert [s["run"] for s in summary] == names and all(s["n"] == 2 for s in summary)
    rows = [json.loads(line) for line in open(tmp_path / "out" / "results.jsonl")]
    assert len(rows) == 6
    for r in rows:
        for key in ("git_revision", "jax_version", "device_kind", "device_count",
                    "global_batch_size", "seed", "config", "config_hash", "methods"):
            assert key in r, key
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert r["heldout_examples"] == 200
        for key in kd2m.DISTANCES:
            assert np.isfinite(r[key]) and r[key] > 0, (r["run"], key)
    by = {(r["run"], r["seed"]): r for r in rows}
    # "auto" lambda: ratio * log(C) / D_0, the same for both seeds (training data only)
    cal = by[("kd2m_exact_ot", 0)]["lambda_calibration"]["kd2m_exact_ot"]
    np.testing.assert_allclose(cal["weight"] * cal["d0"], np.log(10), rtol=1e-6)
    assert by[("kd2m_exact_ot", 1)]["methods"] == by[("kd2m_exact_ot", 0)]["methods"]
    assert by[("ce", 0)]["lambda_calibration"] == {}
    table = open(tmp_path / "out" / "results.md").read()
    assert "| kd2m_exact_ot |" in table and "heldout_w2" in table and "±" in table
    assert os.path.exists(tmp_path / "out" / "results.png")
    kd2m.main(args)   # rerun: all rows done, nothing retrained or duplicated
    assert len(open(tmp_path / "out" / "results.jsonl").readlines()) == 6


@pytest.mark.slow
@pytest.mark.heavy   # the paper config (CIFAR-10 ResNets) on mock data: about 1 min
def test_paper_config_one_training_step_on_mock_cifar10(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    cfg = kd2m.load(["paper:cifar10", f"--config.dataset.data_dir={tmp_path}",
                     "--config.dataset.val_size=8"])
    with tfds.testing.mock_data(num_examples=24, data_dir=None):
        train, val, test = kd2m.load_data(cfg)
    assert train.x.shape[1:] == (32, 32, 3) and len(val) == 8 and train.num_classes == 10
    teacher = models.create(cfg.teacher.model, 10, **cfg.teacher.model_kwargs.to_dict())
    student = models.create(cfg.student.model, 10, **cfg.student.model_kwargs.to_dict())
    x = jnp.asarray(train.x[:8])
    tvars = teacher.init(jax.random.PRNGKey(0), x, train=False)
    run = kd2m_config.make_runs(["kd2m_exact_ot"], float(cfg.kd2m_weight))[0]
    built = tuple(methods.build(m) for m in run["methods"])
    assert [m.weight for m in built] == [1.0, 1e-4]
    assert cfg.teacher.augment == "crop_flip"   # get_teacher trains it with crop+flip
    tx = make_optimizer(cfg.student.optimizer, total_steps=15, steps_per_epoch=1)
    from kdjax.data import get_augmentation
    distiller = Distiller(student, built, tx, teacher=teacher,
                          augment=get_augmentation(cfg.student.augment))
    state = distiller.init(0, x[:2], tvars)
    batch = {"x": x, "y": jnp.asarray(train.y[:8])}
    new, terms = jax.jit(distiller.train_step)(state, tvars, batch, jax.random.PRNGKey(1))
    assert int(new.step) == 1
    assert all(np.isfinite(float(v)) for v in terms.values())
    assert float(terms["kd2m_exact_ot"]) > 0
    np.testing.assert_allclose(float(terms["total"]),
                               float(terms["ce"]) + 1e-4 * float(terms["kd2m_exact_ot"]),
                               rtol=1e-5)
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)),
                                     state.params["student"], new.params["student"])
    assert any(jax.tree_util.tree_leaves(changed))


def test_digits_variant_reads_images_as_signals(tmp_path):
    cfg = kd2m.load(["digits", f"--config.dataset.data_dir={tmp_path}"])
    train, val, test = kd2m.load_data(cfg)
    assert train.x.shape[1:] == val.x.shape[1:] == test.x.shape[1:] == (64, 1)
    student = models.create(cfg.student.model, 10, **cfg.student.model_kwargs.to_dict())
    variables = student.init(jax.random.PRNGKey(0), jnp.asarray(train.x[:2]), train=False)
    logits, feats = student.apply(variables, jnp.asarray(train.x[:3]), train=False)
    assert logits.shape == (3, 10) and feats["pooled"].shape == (3, 128)
