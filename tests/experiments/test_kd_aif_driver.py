"""End to end: the KD-AIF driver on a tiny MNIST-1D config; rerun skips finished rows."""

import json
import math
import os

import pytest

from experiments import kd_aif


@pytest.mark.slow
def test_kd_aif_driver_end_to_end_and_resume(tmp_path):
    args = [f"--config.out_dir={tmp_path}/out", f"--config.cache_dir={tmp_path}/cache",
            f"--config.dataset.data_dir={tmp_path}/data", "--config.dataset.num_train=700",
            "--config.dataset.num_test=200", "--config.dataset.val_size=200",
            "--config.seeds=2", "--config.teacher.epochs=2", "--config.student.epochs=2",
            "--config.student.evaluations=2", "--config.influence.rescore_every=1",
            "--config.influence.curvature_examples=128", "--config.influence.maxiter=10",
            "--config.semi.labelled=100", "--config.semi.val_size=100",
            "--config.semi.teacher_epochs=2", "--config.settings=['noisy', 'semi']",
            "--config.runs=['uniform', 'oneshot_exp', 'periodic_sigmoid']",
            "--config.teacher.model_kwargs.channels=(8, 8)",
            "--config.student.model_kwargs.channels=(4,)"]
    summary = kd_aif.main(args)
    assert [(s["setting"], s["run"]) for s in summary] == [
        (st, r) for st in ("noisy", "semi") for r in ("uniform", "oneshot_exp",
                                                      "periodic_sigmoid")]
    assert all(s["n"] == 2 for s in summary)
    rows = [json.loads(line) for line in open(tmp_path / "out" / "results.jsonl")]
    assert len(rows) == 12
    for r in rows:
        for key in ("git_revision", "jax_version", "device_kind", "device_count",
                    "global_batch_size", "seed", "config", "config_hash", "auroc"):
            assert key in r, key
        assert 0.0 <= r["test_accuracy"] <= 1.0
        if r["run"] == "uniform":
            assert math.isnan(r["auroc"])
        else:
            assert 0.0 <= r["auroc"] <= 1.0
    noisy = [r for r in rows if r["setting"] == "noisy"]
    assert all(abs(r["bad_fraction"] - 0.3) < 0.01 for r in noisy)   # 30% corrupted
    table = open(tmp_path / "out" / "results.md").read()
    assert "| noisy | oneshot_exp |" in table and "+-" in table
    assert os.path.exists(tmp_path / "out" / "weights.png")
    # rerun: nothing retrained, no duplicated rows
    kd_aif.main(args)
    rows2 = [json.loads(line) for line in open(tmp_path / "out" / "results.jsonl")]
    assert len(rows2) == 12
