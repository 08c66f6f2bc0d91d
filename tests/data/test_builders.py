"""Embedded TFDS builders (MNIST-1D, digits) and :func:`kdjax.data.load`."""

import random

import numpy as np
import pytest

from kdjax.data import ArrayDataset, load
from kdjax.data.builders import (MNIST1D_DOMAINS, Mnist1dConfig, generate_mnist1d,
                                 resolve_config)

SMALL = dict(num_train=500, num_test=100)


@pytest.fixture(scope="session")
def mnist1d_small(data_dir):
    return {s: load("mnist1d", s, data_dir=data_dir, normalize=False, **SMALL)
            for s in ("train", "test")}


@pytest.fixture(scope="session")
def digits(data_dir):
    return {s: load("digits", s, data_dir=data_dir, normalize=False)
            for s in ("train", "test")}


def test_mnist1d_shapes_sizes_dtypes(mnist1d_small):
    tr, te = mnist1d_small["train"], mnist1d_small["test"]
    assert tr.x.shape == (500, 40, 1) and te.x.shape == (100, 40, 1)
    assert tr.x.dtype == np.float32 and tr.y.dtype == np.int32
    assert tr.num_classes == 10 and set(np.unique(tr.y)) == set(range(10))
    assert tr.info["params"]["num_train"] == 500
    # generation order restored from the stored index
    np.testing.assert_array_equal(tr.extras["index"], np.arange(500))


def test_mnist1d_train_test_from_one_generation_and_disjoint(mnist1d_small):
    cfg = resolve_config("mnist1d", None, **SMALL)
    raw = generate_mnist1d(cfg)
    np.testing.assert_array_equal(mnist1d_small["train"].x[..., 0], raw["x"])
    np.testing.assert_array_equal(mnist1d_small["test"].y, raw["y_test"])
    tr = {r.tobytes() for r in mnist1d_small["train"].x}
    assert not any(r.tobytes() in tr for r in mnist1d_small["test"].x)


def test_mnist1d_same_config_twice_identical(data_dir, tmp_path, mnist1d_small):
    again = load("mnist1d", "train", data_dir=str(tmp_path), normalize=False, **SMALL)
    np.testing.assert_array_equal(again.x, mnist1d_small["train"].x)
    np.testing.assert_array_equal(again.y, mnist1d_small["train"].y)


def test_mnist1d_leaves_global_rng_untouched(tmp_path):
    np.random.seed(1234)
    random.seed(99)
    expected_np = np.random.random(3)
    expected_py = random.random()
    np.random.seed(1234)
    random.seed(99)
    load("mnist1d", "test", data_dir=str(tmp_path), num_train=100, num_test=20)
    np.testing.assert_array_equal(np.random.random(3), expected_np)
    assert random.random() == expected_py


def test_mnist1d_domains_differ_in_parameters_and_data():
    configs = {d: resolve_config("mnist1d", d) for d in MNIST1D_DOMAINS}
    assert len(configs) >= 4
    params = {d: c.params() for d, c in configs.items()}
    names = list(params)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert params[a] != params[b], (a, b)
    small = {d: generate_mnist1d(resolve_config("mnist1d", d, num_train=200, num_test=10))
             for d in ("clean", "iid_noise")}
    rough = {d: np.abs(np.diff(v["x"], axis=1)).mean() for d, v in small.items()}
    assert rough["iid_noise"] > 1.5 * rough["clean"]


def test_named_and_dict_configs():
    cfg = resolve_config("mnist1d", {"base": "shear", "num_train": 100, "num_test": 10})
    assert cfg.shear_scale == MNIST1D_DOMAINS["shear"]["shear_scale"]
    assert cfg.num_train == 100 and cfg.name.startswith("shear_")
    # equal overrides resolve to the named config (one prepared directory)
    assert resolve_config("mnist1d", "default", num_train=10_000).name == "default"
    assert isinstance(resolve_config("mnist1d", Mnist1dConfig(name="x")), Mnist1dConfig)


@pytest.mark.parametrize("kwargs, match", [
    (dict(config="nope"), "must be one of"),
    (dict(config={"bogus": 1}), "unknown mnist1d config parameters"),
    (dict(num_train=101, num_test=10), "multiple of 10"),
    (dict(iid_noise_scale=-1.0), "iid_noise_scale must be >= 0"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resolve_config("mnist1d", kwargs.pop("config", None), **kwargs)


def test_unknown_dataset_name_lists_embedded():
    with pytest.raises(ValueError, match=r"mnist1d.*digits.*TFDS catalog"):
        load("definitely_not_a_dataset", data_dir="/nonexistent")


def test_bad_split_and_types(data_dir):
    with pytest.raises(ValueError, match="split must be one of"):
        load("digits", "validation", data_dir=data_dir)
    with pytest.raises(TypeError, match="name must be a str"):
        load(3)
    with pytest.raises(TypeError, match="config must be"):
        load("digits", data_dir=data_dir, config=3)


def test_digits_split_is_stratified_and_disjoint(digits):
    tr, te = digits["train"], digits["test"]
    assert tr.x.shape == (1437, 8, 8, 1) and te.x.shape == (360, 8, 8, 1)
    assert 0.0 <= tr.x.min() and tr.x.max() <= 1.0
    idx_tr, idx_te = set(tr.extras["index"]), set(te.extras["index"])
    assert not idx_tr & idx_te and len(idx_tr | idx_te) == 1797
    from sklearn.datasets import load_digits
    full = np.bincount(load_digits().target)
    np.testing.assert_allclose(np.bincount(te.y) / full, 0.2, atol=1.5 / full.min())
    np.testing.assert_array_equal(tr.x[..., 0] * 16, load_digits().images[
        tr.extras["index"]])


def test_normalisation_uses_train_stats(data_dir, digits):
    tr = load("digits", "train", data_dir=data_dir)
    te = load("digits", "test", data_dir=data_dir)
    np.testing.assert_allclose(tr.x.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(tr.x.std(), 1.0, atol=1e-4)
    mean, std = digits["train"].x.mean(), digits["train"].x.std()
    np.testing.assert_allclose(te.info["mean"], [mean], rtol=1e-5)
    np.testing.assert_allclose(te.x, (digits["test"].x - mean) / std, atol=1e-5)


def test_array_dataset_validates_and_subsets():
    ds = ArrayDataset(x=np.zeros((4, 3, 1), np.float32), y=np.arange(4), num_classes=4,
                      name="t", split="train", extras={"env": np.arange(4)})
    sub = ds.subset([3, 1])
    np.testing.assert_array_equal(sub.y, [3, 1])
    np.testing.assert_array_equal(sub.extras["env"], [3, 1])
    assert len(ds.subset(np.array([True, False, True, False]))) == 2
    with pytest.raises(ValueError, match="y must have shape"):
        ArrayDataset(np.zeros((4, 2)), np.arange(3), 4, "t", "train")
    with pytest.raises(ValueError, match=r"y must lie in \[0, 2\)"):
        ArrayDataset(np.zeros((4, 2)), np.arange(4), 2, "t", "train")
    with pytest.raises(ValueError, match="extras\\['env'\\]"):
        ArrayDataset(np.zeros((4, 2)), np.arange(4), 4, "t", "train",
                     extras={"env": np.arange(3)})
