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


TINY = ["--config.dataset.num_train=700", "--config.dataset.num_test=200",
        "--config.dataset.val_size=200", "--config.teacher.epochs=2",
        "--config.student.epochs=2", "--config.student.evaluations=1",
        "--config.influence.curvature_examples=128", "--config.influence.maxiter=10",
        "--config.semi.labelled=100", "--config.semi.val_size=100",
        "--config.semi.teacher_epochs=2", "--config.teacher.model_kwargs.channels=(8, 8)",
        "--config.student.model_kwargs.channels=(4,)"]


def _cfg(tmp_path, extra=()):
    from kdjax.experiment.config import load_config, parse_cli

    overrides, rest = parse_cli([f"--config.out_dir={tmp_path}/out",
                                 f"--config.cache_dir={tmp_path}/cache",
                                 f"--config.dataset.data_dir={tmp_path}/data", *TINY, *extra])
    assert not rest
    return load_config("experiments.configs.kd_aif", overrides)


@pytest.mark.slow
def test_kd_aif_driver_mpl_teacher_update_end_to_end(tmp_path):
    import jax
    import jax.numpy as jnp
    import optax

    from experiments.distill import load_data
    from kdjax.recipes import kd_aif as lib
    from kdjax import models

    mpl = ["--config.settings=['semi']", "--config.runs=['uniform']", "--config.seeds=1",
           "--config.teacher_update=mpl", "--config.mpl.steps=4", "--config.mpl.batch_size=64",
           "--config.mpl.runs=['uniform', 'oneshot_exp']"]
    args = [f"--config.out_dir={tmp_path}/out", f"--config.cache_dir={tmp_path}/cache",
            f"--config.dataset.data_dir={tmp_path}/data", *TINY, *mpl]
    summary = kd_aif.main(args)
    assert [s["run"] for s in summary] == ["uniform", "mpl_uniform", "mpl_oneshot_exp"]
    rows = [json.loads(line) for line in open(tmp_path / "out" / "results.jsonl")]
    keys = {r["run"]: r["config_hash"] for r in rows}
    assert keys["mpl_uniform"] == keys["mpl_oneshot_exp"] != keys["uniform"]
    assert "MPL-updated teacher" in open(tmp_path / "out" / "results.md").read()

    # the stored MPL teacher is the semi teacher moved by the MPL updates
    cfg = _cfg(tmp_path, mpl)
    train, val, _ = load_data(cfg)
    teachers = kd_aif.load_teachers(cfg, train, val)      # cached: no retraining
    module, tvars = teachers["semi"]
    [path] = list((tmp_path / "out" / "ckpt" / keys["mpl_uniform"]).glob("teacher.msgpack"))
    _, new, log = kd_aif.mpl_teacher(cfg, teachers, train, {"val": None}, str(path))
    assert log is None                                    # loaded, not recomputed
    diff = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()),
                                  new["params"], tvars["params"])
    assert max(jax.tree_util.tree_leaves(diff)) > 0

    # the driver's MPL functions: one SGD teacher step (CE off) lowers the student's
    # validation loss after its look-ahead step (real conv teacher and BN student)
    student = models.create(cfg.student.model, train.num_classes,
                            **cfg.student.model_kwargs.to_dict())
    tfn, sfn, tp, sp = kd_aif.mpl_models(cfg, module, tvars, student, train.x)
    xu = jnp.asarray(train.x[:64])
    vd = {"x": jnp.asarray(val.x[:100]), "y": jnp.asarray(val.y[:100])}

    def lookahead(t):
        return float(lib.mpl_teacher_grad(tfn, sfn, t, sp, {"x": xu}, vd, student_lr=0.05,
                                          temperature=4.0)[1]["val_after"])

    t1, _, _ = lib.fit_mpl(tfn, sfn, tp, sp, xu, vd, key=jax.random.PRNGKey(0), steps=1,
                           batch_size=64, teacher_tx=optax.sgd(0.05),
                           student_tx=optax.sgd(0.05), student_lr=0.05, temperature=4.0,
                           teacher_ce_weight=0.0)
    assert lookahead(t1) < lookahead(tp)

    # rerun: nothing retrained; another mpl.steps re-keys only the MPL rows
    kd_aif.main(args)
    assert len(open(tmp_path / "out" / "results.jsonl").readlines()) == 3
    kd_aif.main(args[:-3] + ["--config.mpl.steps=2", "--config.mpl.batch_size=64",
                             "--config.mpl.runs=['uniform']"])
    rows = [json.loads(line) for line in open(tmp_path / "out" / "results.jsonl")]
    assert [r["run"] for r in rows] == ["uniform", "mpl_uniform", "mpl_oneshot_exp",
                                        "mpl_uniform"]


@pytest.mark.parametrize("extra,match", [
    (["--config.teacher_update=joint"],
     r"config.teacher_update must be one of \('none', 'mpl'\), got 'joint'"),
    (["--config.teacher_update=mpl", "--config.settings=['noisy']"],
     r"config.teacher_update='mpl' .* config.settings must contain 'semi', got \['noisy'\]"),
    (["--config.mpl.steps=0"], r"config.mpl.steps must be an integer >= 1, got 0"),
    (["--config.mpl.batch_size=0"], r"config.mpl.batch_size must be an integer >= 1"),
    (["--config.mpl.teacher_lr=0.0"], r"config.mpl.teacher_lr must be > 0, got 0.0"),
    (["--config.mpl.student_lr=-1.0"], r"config.mpl.student_lr must be > 0, got -1.0"),
    (["--config.mpl.teacher_ce_weight=-1.0"], r"config.mpl.teacher_ce_weight must be >= 0"),
    (["--config.mpl.runs=['mpl_uniform']"],
     r"config.mpl.runs must be a non-empty subset of .*got \['mpl_uniform'\]"),
])
def test_kd_aif_config_mpl_errors_name_the_key(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        _cfg(tmp_path, extra)
