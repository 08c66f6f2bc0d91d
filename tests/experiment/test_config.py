"""Config overrides: parsing, type checks, errors that list valid keys; driver validation."""

import ml_collections
import pytest

from kdjax.experiment.config import apply_overrides, config_hash, load_config, parse_cli


def _cfg():
    return ml_collections.ConfigDict({"lr": 0.1, "seeds": 3, "quick": True, "name": "mnist1d",
                                      "model": {"hidden": (64,), "kind": "mlp"}})


def test_overrides_parse_and_coerce():
    c = apply_overrides(_cfg(), ["lr=1", "seeds=5", "quick=false", "model.hidden=(32, 16)",
                                 "name=digits", "model.kind=cnn1d"])
    assert c.lr == 1.0 and isinstance(c.lr, float)
    assert c.seeds == 5 and c.quick is False and c.model.hidden == (32, 16)
    assert c.name == "digits" and c.model.kind == "cnn1d"


@pytest.mark.parametrize("override, match", [
    ("lrr=1", r"unknown config key 'lrr'.*valid keys there: \['lr', 'model', 'name', 'quick', 'seeds'\]"),
    ("model.hiden=1", r"unknown config key 'model.hiden'.*valid keys there: \['hidden', 'kind'\]"),
    ("seeds=abc", r"config key 'seeds' expects int, got 'abc'"),
    ("quick=maybe", r"config key 'quick' expects a bool"),
    ("lr", r"override 'lr' must look like key=value"),
    ("lr.x=1", r"unknown config key 'lr.x'"),
])
def test_bad_overrides(override, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(_cfg(), [override])


def test_parse_cli_and_hash():
    ov, rest = parse_cli(["--config.lr=0.5", "--quick", "--config.model.kind=x"])
    assert ov == ["lr=0.5", "model.kind=x"] and rest == ["--quick"]
    assert config_hash(_cfg()) == config_hash(_cfg())
    assert config_hash(_cfg()) != config_hash(apply_overrides(_cfg(), ["lr=0.2"]))


@pytest.mark.parametrize("override, match", [
    ("seeds=0", r"config.seeds must be >= 1, got 0"),
    ("labelled=-1", r"config.labelled must be >= 0"),
    ("student.epochs=0", r"config.student.epochs must be >= 1"),
    ("dataset.num_train=100", None),
    ("teacher.batch_size=0", r"config.teacher.batch_size must be >= 1"),
])
def test_distill_config_validation(override, match):
    if match is None:
        load_config("experiments.configs.distill", [override])
        with pytest.raises(ValueError, match=r"only apply to mnist1d"):
            load_config("experiments.configs.distill", [override, "dataset.name=digits"])
        return
    with pytest.raises(ValueError, match=match):
        load_config("experiments.configs.distill", [override])
