"""End to end: the distill driver on a tiny MNIST-1D config; rerun skips finished rows."""

import json
import os

import pytest

from experiments import distill


@pytest.mark.slow
def test_distill_driver_end_to_end_and_resume(tmp_path):
    args = [f"--config.out_dir={tmp_path}/out", f"--config.cache_dir={tmp_path}/cache",
            f"--config.dataset.data_dir={tmp_path}/data", "--config.dataset.num_train=1200",
            "--config.dataset.num_test=300", "--config.dataset.val_size=200",
            "--config.labelled=200", "--config.seeds=2", "--config.teacher.epochs=3",
            "--config.student.epochs=2", "--config.progress=False",
            "--config.teacher.model_kwargs.channels=(8, 8)",
            "--config.student.model_kwargs.channels=(4,)"]
    summary = distill.main(args)
    assert [s["run"] for s in summary] == ["ce", "kd"]
    assert all(s["n"] == 2 for s in summary)
    rows = [json.loads(l) for l in open(tmp_path / "out" / "results.jsonl")]
    assert len(rows) == 4
    for r in rows:
        for key in ("git_revision", "jax_version", "device_kind", "device_count",
                    "global_batch_size", "seed", "config", "config_hash"):
            assert key in r, key
        assert 0.0 <= r["test_accuracy"] <= 1.0
    # CE-only students see the labelled subset only; KD students all training inputs
    by_run = {r["run"]: r for r in rows}
    assert by_run["ce"]["train_examples"] < by_run["kd"]["train_examples"]
    table = open(tmp_path / "out" / "results.md").read()
    assert "| ce |" in table and "| kd |" in table and "±" in table
    assert "Seeds found: [0, 1]" in table
    assert os.path.exists(tmp_path / "out" / "curves.png")
    # rerun: everything is done, nothing is retrained, the rows are not duplicated
    distill.main(args)
    rows2 = [json.loads(l) for l in open(tmp_path / "out" / "results.jsonl")]
    assert len(rows2) == 4


def test_student_batch_larger_than_a_runs_data_is_a_config_error(tmp_path, monkeypatch):
    """Found by the fault campaign: a bare ZeroDivisionError before; now a ConfigError
    naming the key, raised before the teacher trains."""
    from kdjax import experiment as kx

    monkeypatch.setattr(distill, "study_teacher", lambda *a, **k: pytest.fail("trained"))
    args = [f"--config.out_dir={tmp_path}/out", f"--config.cache_dir={tmp_path}/cache",
            f"--config.dataset.data_dir={tmp_path}/data", "--config.dataset.num_train=600",
            "--config.dataset.num_test=100", "--config.dataset.val_size=100",
            "--config.labelled=100", "--config.student.batch_size=128",
            "--config.progress=False", "--no-xla-cache"]
    with pytest.raises(kx.ConfigError, match=r"student.batch_size=128 .* \(100 examples\)"):
        distill.main(args)
