"""The faithful-KD driver: configs, one step of every run on mock TFDS data, tiny e2e
(rows, tables and resume through :mod:`kdjax.experiment`)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import faithful
from experiments.configs import faithful as faithful_config
from kdjax import experiment as kx
from kdjax import models
from kdjax.train import Distiller, make_optimizer


@pytest.mark.parametrize("variant", faithful_config.VARIANTS)
def test_configs_build_and_validate(variant):
    cfg = faithful.load([variant] if variant != "digits" else [])
    assert cfg.dataset.name == variant
    assert [r["name"] for r in cfg.runs] == ["kd", "ard", "faithful_pgd",
                                             "faithful_certified"]
    for run in cfg.runs:
        built = faithful.build_methods(run, (0.0, 1.0))
        for m in built:
            if m.method.needs_models:
                assert m.options["clip"] == [0.0, 1.0]
    with pytest.raises(ValueError, match="crown_method"):
        faithful.load(["--config.eval.crown_method=ibp"])
    with pytest.raises(ValueError, match="report_eps"):
        faithful.load(["--config.eval.report_eps=0.3"])
    with pytest.raises(ValueError, match="unknown variant"):
        faithful.load(["cifar10"])


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["mnist", "fashion_mnist"])
def test_tfds_configs_one_step_of_every_run_on_mock_data(tmp_path, variant):
    tfds = pytest.importorskip("tensorflow_datasets")
    cfg = faithful.load([variant, f"--config.dataset.data_dir={tmp_path}",
                         "--config.dataset.val_size=8"])
    with tfds.testing.mock_data(num_examples=24, data_dir=None):
        train, val, test = faithful.load_data(cfg)
    assert train.x.shape[1:] == (28, 28, 1) and len(val) == 8 and train.num_classes == 10
    assert float(train.x.min()) >= 0.0 and float(train.x.max()) <= 1.0  # pixels, no norm
    clip = faithful.resolve_clip(cfg, train.x)
    teacher = models.create(cfg.teacher.model, 10, **cfg.teacher.model_kwargs.to_dict())
    x = jnp.asarray(train.x[:8])
    tvars = teacher.init(jax.random.PRNGKey(0), x, train=False)
    batch = {"x": x, "y": jnp.asarray(train.y[:8])}
    # each run's student as the driver builds it (experiments.common.fit_students)
    student = models.create(cfg.student.model, 10, **cfg.student.model_kwargs.to_dict())
    tx = make_optimizer(cfg.student.optimizer, total_steps=1, steps_per_epoch=1)
    for run in cfg.runs:
        d = Distiller(student, faithful.build_methods(run, clip), tx, teacher=teacher)
        state = d.init(0, x[:2], tvars)
        new, terms = jax.jit(d.train_step)(state, tvars, batch, jax.random.PRNGKey(1))
        assert int(new.step) == 1, run["name"]
        assert all(np.isfinite(float(v)) for v in terms.values()), (run["name"], terms)
    # the evaluator certifies and attacks the CNN teacher / MLP student pair
    with cfg.unlocked():
        cfg.eval.crown_points = 2
    ev = faithful.make_evaluator(cfg, student, teacher, tvars, clip)
    out = ev({"params": new.params["student"]}, x[:4],
             jnp.float32(0.01), jax.random.PRNGKey(0))
    assert np.all(np.asarray(out["pgd"]) <= np.asarray(out["ibp"]) + 1e-5)
    assert np.all(np.asarray(out["pgd"])[:2] <= np.asarray(out["crown"]) + 1e-5)


@pytest.mark.slow
def test_faithful_driver_end_to_end_and_resume(tmp_path):
    args = [f"--config.out_dir={tmp_path}/out", f"--config.cache_dir={tmp_path}/cache",
            f"--config.dataset.data_dir={tmp_path}/data", "--config.seeds=2",
            "--config.teacher.epochs=2", "--config.student.epochs=1",
            "--config.progress=False", "--config.eval.num_points=12",
            "--config.eval.crown_points=4", "--config.eval.pgd_steps=3",
            "--config.teacher.model_kwargs.hidden=(32,)",
            "--config.student.model_kwargs.hidden=(8,)"]
    summary = faithful.main(args)
    assert [s["run"] for s in summary] == ["kd", "ard", "faithful_pgd", "faithful_certified"]
    assert all(s["n"] == 2 for s in summary)
    rows = [json.loads(line) for line in open(tmp_path / "out" / "results.jsonl")]
    assert len(rows) == 8
    for r in rows:
        for key in ("git_revision", "jax_version", "device_kind", "global_batch_size", "seed",
                    "config", "config_hash", "clip", "cell_key", "code_state"):
            assert key in r, key
        # rows written before the experiment layer stay valid: the study hash is the
        # former driver's (the config without out_dir, cache_dir and progress)
        assert r["config_hash"] == kx.config_hash({k: v for k, v in r["config"].items() if k
                                                   not in ("out_dir", "cache_dir", "progress")})
        f = r["faithfulness"]
        assert f["bound_violations"] == 0
        for eps, m in f["eps"].items():
            # lower <= upper, and the combined certificate is the tighter one
            assert m["pgd_gap_crown_points"] <= m["certified_gap"] + 1e-6
            assert m["certified_gap"] <= m["ibp_gap_crown_points"] + 1e-6
            assert m["pgd_gap"] <= m["ibp_gap"] + 1e-6
            assert m["pgd_gap_crown_points"] <= m["crown_gap"] + 1e-6
            assert all(0.0 <= v <= 1.0 for v in m["certified_faithful"].values())
        # IBP is inclusion-monotone: its bound grows with the radius
        pg = [f["eps"][str(e)]["ibp_gap"] for e in r["config"]["eval"]["eps"]]
        assert all(a <= b + 1e-6 for a, b in zip(pg, pg[1:]))
    table = open(tmp_path / "out" / "results.md").read()
    assert "| faithful_certified |" in table and "eps=0.1, delta=0.2" in table
    assert " ± " in table and "+-" not in table       # the one formatter
    assert "Seeds found: [0, 1]; 8 rows" in table
    assert "PGD above a certified bound (must be 0): 0 point(s)." in table
    assert os.path.exists(tmp_path / "out" / "gaps.png")
    faithful.main(args)   # rerun: every row is done, nothing retrained or duplicated
    assert len(open(tmp_path / "out" / "results.jsonl").readlines()) == 8
