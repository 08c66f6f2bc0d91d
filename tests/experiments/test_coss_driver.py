"""experiments/coss.py: config validation and (slow) a tiny end-to-end run with resume.
The library pieces it runs (SimCLR, label-free data, the neighbour plan, the frozen-encoder
evaluation) are tested in tests/recipes/test_simclr.py and
tests/evaluation/test_representations.py."""

import pytest

from experiments import coss as driver
from experiments.configs import coss as coss_config
from kdjax import experiment as kx
from kdjax.experiment.config import load_config


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
    args = [f"--config.{o}" for o in TINY] + [f"--config.out_dir={tmp_path}/out",
                                              f"--config.cache_dir={tmp_path}/cache"]
    summary = driver.main(args)
    rows = kx.Store(str(tmp_path / "out" / "results.jsonl")).read()
    runs = {r["run"] for r in rows}
    assert runs == {"teacher", "simclr", "cosine", "coss"}
    students = [r for r in rows if r["run"] != "teacher"]
    assert sorted((r["run"], r["seed"]) for r in students) == sorted(
        (n, s) for n in ("simclr", "cosine", "coss") for s in (0, 1))
    manifold = {"cka_test", "knn_overlap_test"}   # of a student vs the teacher
    for r in rows:
        for m in driver.METRICS:
            if r["run"] != "teacher" or m not in manifold:
                assert 0.0 <= r[m] <= 1.0
        assert manifold.isdisjoint(r) == (r["run"] == "teacher")
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
    again = kx.Store(str(tmp_path / "out" / "results.jsonl")).read()
    assert len(again) == len(rows)
