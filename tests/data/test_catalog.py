"""TFDS catalog path, exercised only with ``tfds.testing.mock_data`` (no network)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from kdjax.data import load, make_shift, shift_domains
from kdjax.data.core import celeba_arrays
from kdjax.data.shifts import group_balanced_indices


@pytest.fixture()
def mock(tmp_path):
    with tfds.testing.mock_data(num_examples=40, data_dir=None):
        yield str(tmp_path)


def test_mock_mnist_gives_28x28x1(mock):
    raw = load("mnist", "train", data_dir=mock, normalize=False)
    assert raw.x.shape == (40, 28, 28, 1) and raw.x.dtype == np.float32
    assert 0.0 <= raw.x.min() and raw.x.max() <= 1.0 and raw.num_classes == 10
    test = load("mnist", "test", data_dir=mock)
    np.testing.assert_allclose(test.info["mean"], [raw.x.mean()], rtol=1e-5)
    assert load("mnist", "train", data_dir=mock, max_examples=7).x.shape[0] == 7
    assert load("cifar10", "test", data_dir=mock, normalize=False).x.shape[1:] == (32, 32, 3)


def test_config_is_for_embedded_only(mock):
    with pytest.raises(ValueError, match="config is only used by the embedded"):
        load("mnist", data_dir=mock, config="default")


def test_celeb_a_blond_grouping_on_fake_records():
    records = [{"attributes": {"Blond_Hair": b, "Male": m}}
               for b, m in [(0, 0), (0, 1), (1, 0), (1, 1), (True, False)]]
    arrays = celeba_arrays(records)
    np.testing.assert_array_equal(arrays["y"], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(arrays["spurious"], [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(arrays["group"], [0, 1, 2, 3, 2])
    idx = group_balanced_indices(np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 3]), seed=0)
    np.testing.assert_array_equal(np.bincount(np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])[idx]),
                                  [2, 2, 2, 2])
    with pytest.raises(ValueError, match="every one of the 4 groups"):
        group_balanced_indices(np.array([0, 1, 2]), seed=0)


def test_celeb_a_blond_shift_on_mock(mock):
    s = make_shift("celeb_a_blond", data_dir=mock, image_size=(16, 16))
    assert s["train"].x.shape[1:] == (16, 16, 3)
    for split in ("train", "val", "test_in", "test_target"):
        d = s[split]
        np.testing.assert_array_equal(d.extras["group"], 2 * d.y + d.extras["spurious"])
    counts = np.bincount(s["test_target"].extras["group"], minlength=4)
    assert counts.min() == counts.max() > 0


def test_tfds_mnist_shifts_on_mock(mock):
    col = make_shift("coloured_mnist", data_dir=mock)
    assert col["train"].x.shape[1:] == (28, 28, 2)
    rot = make_shift("rotated_mnist", data_dir=mock, target="30")
    assert set(rot["test_target"].extras["angle"]) == {30.0}
    assert rot["train"].x.shape[1:] == (28, 28, 1)


def test_corrupted_domains_resolve_to_tfds_configs():
    mnist_c = {c.name for c in tfds.builder_cls("mnist_corrupted").BUILDER_CONFIGS}
    cifar_c = {c.name for c in tfds.builder_cls("cifar10_corrupted").BUILDER_CONFIGS}
    assert set(shift_domains("mnist_corrupted")) == mnist_c
    for dom in shift_domains("cifar10_corrupted"):
        assert {f"{dom}_{s}" for s in range(1, 6)} <= cifar_c
    assert "fog" in shift_domains("cifar10_corrupted")


def test_corrupted_shifts_on_mock(mock):
    s = make_shift("mnist_corrupted", data_dir=mock, domains=["identity", "fog", "stripe"],
                   target="fog")
    assert s["train"].info["train_domains"] == ["identity", "stripe"]
    assert s["train"].x.shape[1:] == (28, 28, 1)
    c = make_shift("cifar10_corrupted", data_dir=mock, domains=["fog", "contrast"],
                   target="contrast", severity=2)
    assert c["test_target"].info["params"]["tfds_names"]["fog"] == "cifar10_corrupted/fog_2"
    # one partition of the shared base images: target test rows never train rows
    assert not set(c["train"].extras["base_index"]) & set(
        c["test_target"].extras["base_index"])
    with pytest.raises(ValueError, match="domains entry must be one of"):
        make_shift("cifar10_corrupted", data_dir=mock, domains=["fog", "rain"])
