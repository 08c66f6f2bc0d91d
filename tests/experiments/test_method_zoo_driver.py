"""Method-zoo driver: configs and loss terms, a tiny end-to-end run with resume (slow),
and one training step of the RepDistiller CIFAR-100 config on mock data (slow)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import method_zoo
from experiments.configs import method_zoo as zoo_config
from kdjax import methods, models
from kdjax.experiment.config import load_config
from kdjax.methods import zoo
from kdjax.train import Distiller, make_optimizer
from kdjax.train.pretrain import pretrain


def test_default_config_covers_every_zoo_method_with_repdistiller_weights():
    cfg = method_zoo.load([])
    assert set(cfg.methods) == {"ce", "kd", *zoo.NAMES}
    assert list(cfg.setting_names) == ["mnist1d", "digits"]
    for name in cfg.methods:
        terms = method_zoo.method_configs(cfg, name, steps_per_epoch=10)
        built = [methods.build(t) for t in terms]
        assert built[0].name == "ce"
        if name == "kd":
            assert [(b.name, b.weight) for b in built] == [("ce", 0.1), ("kd", 0.9)]
        elif name != "ce":
            assert built[-1].name == name
            assert built[-1].weight == methods.get(name).default_weight
            assert built[0].weight == (0.1 if name == "kd_ls" else 1.0)
            assert len(built) == 2          # kd_weight = 0: no KD term (RepDistiller -a 0)
    dkd = method_zoo.method_configs(cfg, "dkd", steps_per_epoch=10)[-1]
    assert dkd["warmup_steps"] == cfg.dkd_warmup_epochs * 10
    ab = method_zoo.method_configs(cfg, "ab", steps_per_epoch=10)[-1]
    assert ab["pretrain_epochs"] == cfg.pretrain_epochs
    with_kd = load_config("experiments.configs.method_zoo", ["kd_weight=0.9"])
    assert [t["name"] for t in method_zoo.method_configs(with_kd, "at", 10)] == \
        ["ce", "kd", "at"]


def test_repdistiller_config_is_the_reference_protocol():
    cfg = method_zoo.load(["repdistiller"])
    pairs = {n: (cfg.settings[n].teacher.model, cfg.settings[n].student.model)
             for n in cfg.setting_names}
    assert pairs == {"resnet32x4-resnet8x4": ("resnet32x4", "resnet8x4"),
                     "wrn_40_2-wrn_16_2": ("wrn_40_2", "wrn_16_2")}
    for n in cfg.setting_names:
        st = cfg.settings[n].student
        assert st.epochs == 240 and st.batch_size == 64 and st.augment == "crop_flip"
        assert cfg.settings[n].teacher.augment == "crop_flip"   # RepDistiller's teachers too
        assert st.optimizer.to_dict() == {
            "name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
            "schedule": "step", "decay_epochs": (150, 180, 210), "decay_factor": 0.1}
        assert cfg.settings[n].dataset.name == "cifar100"
    assert cfg.pretrain_epochs == 30 and cfg.dkd_warmup_epochs == 20
    assert (cfg.ce_weight, cfg.kd_weight) == (1.0, 0.0)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"config.methods: unknown method\(s\) \['atx'\]"):
        load_config("experiments.configs.method_zoo", ["methods=['ce', 'atx']"])
    with pytest.raises(ValueError, match="config.setting_names: unknown setting 'cifar'"):
        load_config("experiments.configs.method_zoo", ["setting_names=['cifar']"])
    with pytest.raises(ValueError, match="config.settings.digits.student.epochs must be"):
        load_config("experiments.configs.method_zoo", ["settings.digits.student.epochs=0"])
    with pytest.raises(ValueError, match="config.pretrain_epochs must be >= 0"):
        load_config("experiments.configs.method_zoo", ["pretrain_epochs=-1"])
    with pytest.raises(ValueError, match="unknown variant 'cifar'"):
        method_zoo.load(["cifar"])
    assert zoo_config.RUN_METHODS[:2] == ("ce", "kd")


@pytest.mark.slow
def test_method_zoo_driver_end_to_end_and_resume(tmp_path):
    names = ["ce", "kd", "dkd", "at", "ft"]
    args = [f"--config.out_dir={tmp_path}/out", f"--config.cache_dir={tmp_path}/cache",
            f"--config.settings.mnist1d.dataset.data_dir={tmp_path}/data",
            "--config.settings.mnist1d.dataset.num_train=600",
            "--config.settings.mnist1d.dataset.num_test=200",
            "--config.settings.mnist1d.dataset.val_size=100",
            "--config.settings.mnist1d.teacher.epochs=2",
            "--config.settings.mnist1d.teacher.model_kwargs.channels=(8, 16)",
            "--config.settings.mnist1d.student.model_kwargs.channels=(8,)",
            "--config.settings.mnist1d.student.epochs=2",
            "--config.settings.mnist1d.student.evaluations=1",
            "--config.setting_names=['mnist1d']", "--config.seeds=2",
            "--config.pretrain_epochs=1", "--config.dkd_warmup_epochs=1",
            f"--config.methods={names}"]
    summaries = method_zoo.main(args)
    assert {m for (_, m) in summaries} == set(names)
    assert all(e["n"] == 2 for e in summaries.values())
    rows = [json.loads(line) for line in open(tmp_path / "out" / "results.jsonl")]
    assert len(rows) == 10
    for r in rows:
        for key in ("git_revision", "jax_version", "device_kind", "device_count",
                    "global_batch_size", "seed", "config", "config_hash", "methods"):
            assert key in r, key
        assert 0.0 <= r["test_accuracy"] <= 1.0 and 0.0 <= r["test_agreement"] <= 1.0
    by = {(r["method"], r["seed"]): r for r in rows}
    assert by[("ft", 0)]["pretrain_loss_first_last"] is not None
    assert by[("at", 0)]["pretrain_loss_first_last"] is None
    assert by[("dkd", 1)]["methods"][-1]["warmup_steps"] == 500 // 128
    assert by[("ce", 0)]["test_accuracy"] != by[("ce", 1)]["test_accuracy"] or \
        by[("ce", 0)]["val_accuracy"] != by[("ce", 1)]["val_accuracy"]
    text = open(tmp_path / "out" / "results.md").read()
    assert "| ft |" in text and "| teacher |" in text and "±" in text
    assert os.path.exists(tmp_path / "out" / "results.png")
    method_zoo.main(args)   # rerun: every row done, nothing retrained or duplicated
    assert len(open(tmp_path / "out" / "results.jsonl").readlines()) == 10


@pytest.mark.slow
@pytest.mark.heavy   # RepDistiller CIFAR-100 ResNets on mock data
def test_repdistiller_config_one_step_on_mock_cifar100(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    cfg = method_zoo.load(["repdistiller"])
    s = cfg.settings["resnet32x4-resnet8x4"]
    s.dataset.data_dir = str(tmp_path)
    s.dataset.val_size = 8
    with tfds.testing.mock_data(num_examples=24, data_dir=None):
        train, val, test = method_zoo.load_splits(s.dataset)
    assert train.x.shape[1:] == (32, 32, 3) and train.num_classes == 100 and len(val) == 8
    teacher = models.create(s.teacher.model, 100)
    student = models.create(s.student.model, 100)
    x, y = jnp.asarray(train.x[:8]), jnp.asarray(train.y[:8])
    tvars = teacher.init(jax.random.PRNGKey(0), x, train=False)
    terms = method_zoo.method_configs(cfg, "ab", steps_per_epoch=1)
    built = tuple(methods.build(t) for t in terms)
    assert [(b.name, b.weight) for b in built] == [("ce", 1.0), ("ab", 1.0)]
    from kdjax.data import get_augmentation
    tx = make_optimizer(s.student.optimizer, total_steps=240, steps_per_epoch=1)
    d = Distiller(student, built, tx, teacher=teacher,
                  augment=get_augmentation(s.student.augment))
    state = d.init(0, x[:2], tvars)
    state = pretrain(d, state, tvars, {"x": x, "y": y}, batch_size=8, epochs=1)
    new, out = jax.jit(d.train_step)(state, tvars, {"x": x, "y": y}, jax.random.PRNGKey(1))
    assert int(new.step) == 1
    assert all(np.isfinite(float(v)) for v in out.values())
    np.testing.assert_allclose(float(out["total"]), float(out["ce"]) + float(out["ab"]),
                               rtol=1e-5)
