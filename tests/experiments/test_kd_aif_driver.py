"""End to end: the KD-AIF driver on a tiny MNIST-1D config (rerun skips finished rows),
the WRN configs on TFDS mock data, config errors naming the key."""

import json
import math

import numpy as np
import pytest

from experiments import kd_aif

TINY = ["--config.dataset.num_train=700", "--config.dataset.num_test=200",
        "--config.dataset.val_size=200", "--config.teacher.epochs=2",
        "--config.student.epochs=2", "--config.student.evaluations=2",
        "--config.influence.rescore_every=1", "--config.influence.curvature_examples=128",
        "--config.influence.maxiter=10", "--config.semi.labelled=100",
        "--config.semi.val_size=100", "--config.semi.teacher_epochs=2",
        "--config.teacher.model_kwargs.channels=(8, 8)",
        "--config.student.model_kwargs.channels=(4,)"]


def _paths(tmp_path):
    return [f"--config.out_dir={tmp_path}/out", f"--config.cache_dir={tmp_path}/cache",
            f"--config.dataset.data_dir={tmp_path}/data"]


@pytest.mark.slow
def test_kd_aif_driver_end_to_end_and_resume(tmp_path):
    args = _paths(tmp_path) + TINY + [
        "--config.seeds=2", "--config.settings=['noisy', 'semi']",
        "--config.runs=['uniform', 'oneshot_exp', 'periodic_sigmoid']",
        "--config.semi.runs=['uniform', 'mpl', 'joint_exp']"]
    summary = kd_aif.main(args)
    assert [(s["setting"], s["run"]) for s in summary] == [
        ("noisy", r) for r in ("uniform", "oneshot_exp", "periodic_sigmoid")] + [
        ("semi", r) for r in ("uniform", "mpl", "joint_exp")]
    assert all(s["n"] == 2 for s in summary)
    rows = [json.loads(line) for line in open(tmp_path / "out" / "results.jsonl")]
    assert len(rows) == 12
    for r in rows:
        for key in ("git_revision", "jax_version", "device_kind", "device_count", "seed",
                    "config", "cell_key", "auroc", "labelled_examples"):
            assert key in r, key
        assert 0.0 <= r["test_accuracy"] <= 1.0
        if r["run"] in ("uniform", "mpl"):
            assert r["auroc"] is None or math.isnan(r["auroc"])
        else:
            assert 0.0 <= r["auroc"] <= 1.0
    noisy = [r for r in rows if r["setting"] == "noisy"]
    assert all(abs(r["bad_fraction"] - 0.3) < 0.01 for r in noisy)   # 30% corrupted
    semi = [r for r in rows if r["setting"] == "semi"]
    assert {r["labelled_examples"] for r in semi} == {100}           # from the config
    joint = [r for r in semi if r["run"] == "joint_exp"]
    assert all(r["rescore_s"] > 0 and r["epoch_s"] > 0 for r in joint)
    table = open(tmp_path / "out" / "results.md").read()
    assert "### noisy (kdjax stress test" in table and "| joint_exp |" in table
    assert "Difference to uniform" in table
    kd_aif.main(args)   # rerun: nothing retrained, no duplicated rows
    assert len(open(tmp_path / "out" / "results.jsonl").readlines()) == 12


@pytest.mark.slow
@pytest.mark.heavy   # paper-scale configs (WRN-28-2): 1-2.5 min each on 2 cores
@pytest.mark.parametrize("variant,labels", [("cifar10_4k", 4000), ("svhn_1k", 1000)])
def test_wrn_semi_configs_run_end_to_end_on_mock_data(tmp_path, variant, labels):
    """The accelerator configs (WRN-28-2, 4,000 / 1,000 labels) run the whole driver on
    TFDS mock data, shrunk only in sizes and lengths."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from kdjax.experiment.config import load_config
    assert load_config("experiments.configs.kd_aif", {}, variant).semi.labelled == labels
    args = [variant] + _paths(tmp_path) + [
        "--config.seeds=1", "--config.dataset.val_size=8", "--config.semi.labelled=10",
        "--config.semi.val_size=8", "--config.teacher.epochs=1", "--config.student.epochs=2",
        "--config.semi.teacher_epochs=1", "--config.teacher.batch_size=8",
        "--config.student.batch_size=8", "--config.student.evaluations=1",
        "--config.influence.rescore_every=1", "--config.influence.curvature_examples=8",
        "--config.settings=['semi']", "--config.semi.runs=['uniform', 'joint_exp']"]
    with tfds.testing.mock_data(num_examples=32, data_dir=None):
        summary = kd_aif.main(args)
    assert [s["run"] for s in summary] == ["uniform", "joint_exp"]
    rows = [json.loads(line) for line in open(tmp_path / "out" / "results.jsonl")]
    assert all(np.isfinite(r["test_accuracy"]) for r in rows)
    assert rows[0]["config"]["student"]["model"] == "wrn_28_2"


def _cfg(tmp_path, extra=()):
    from kdjax.experiment.config import load_config, parse_cli

    overrides, rest = parse_cli(_paths(tmp_path) + TINY + list(extra))
    assert not rest
    return load_config("experiments.configs.kd_aif", overrides)


@pytest.mark.parametrize("extra,match", [
    (["--config.settings=['noise']"], r"config.settings must be a non-empty subset of "),
    (["--config.runs=['mpl']"], r"config.runs must be a non-empty subset of .*got \['mpl'\]"),
    (["--config.semi.runs=['joint_softmax']"], r"config.semi.runs must be a non-empty"),
    (["--config.mpl.teacher_lr=0.0"], r"config.mpl.teacher_lr must be > 0, got 0.0"),
    (["--config.mpl.student_lr=-1.0"], r"config.mpl.student_lr must be > 0, got -1.0"),
    (["--config.mpl.teacher_ce_weight=-1.0"], r"config.mpl.teacher_ce_weight must be >= 0"),
    (["--config.noise.fraction=1.5"], r"config.noise.fraction must be in \(0, 1\)"),
    (["--config.semi.labelled=0"], r"config.semi.labelled must be >= 1, got 0"),
])
def test_kd_aif_config_errors_name_the_key(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        _cfg(tmp_path, extra)
