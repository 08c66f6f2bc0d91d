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


# ----------------------------------------------------- streamed catalog datasets
def test_domainnet_domains_stream_as_a_leave_one_domain_out_shift(mock):
    from kdjax.data.core import DOMAINNET_DOMAINS
    from kdjax.data.stream import concatenate, domainnet_streams, image_transform

    assert len(DOMAINNET_DOMAINS) == 6
    parts = domainnet_streams("sketch", image_transform(16, train=True),
                              image_transform(16), data_dir=mock)
    assert sorted(parts["train"]) == sorted(set(DOMAINNET_DOMAINS) - {"sketch"})
    assert parts["test_target"].name == "domainnet/sketch"
    assert parts["test_target"].num_classes == 345
    train = concatenate(parts["train"].values())
    assert len(train) == 5 * 40
    batches = list(train.batches(50, seed=0))
    assert len(batches) == 4
    envs = np.concatenate([b["env"] for b in batches])
    assert np.bincount(envs).tolist() == [40] * 5           # every domain, every example
    assert batches[0]["x"].shape == (50, 16, 16, 3)
    assert np.all(np.concatenate([b["y"] for b in batches]) < 345)
    with pytest.raises(ValueError, match="target must be one of"):
        domainnet_streams("photo", None, None)


def test_celeb_a_stream_gives_the_sagawa_blond_task(mock):
    from kdjax.data.stream import catalog_stream, image_transform

    stream = catalog_stream("celeb_a", "train", image_transform(
        8, extras=("spurious", "group")), data_dir=mock)
    mem = load("celeb_a", "train", data_dir=mock, normalize=False)
    b = next(iter(stream.batches(40, shuffle=False, drop_remainder=False)))
    np.testing.assert_array_equal(b["y"], mem.y)
    np.testing.assert_array_equal(b["group"], mem.extras["group"])
    assert b["x"].shape == (40, 8, 8, 3)


def _celeba_tree(root, envs, attrs_format):
    """img_align_celeba/ with tiny JPEGs and blond_split/ files; returns the labels."""
    import os
    import pickle

    from PIL import Image

    from kdjax.data.domainbed import CELEBA_ATTRIBUTES

    os.makedirs(os.path.join(root, "img_align_celeba"))
    os.makedirs(os.path.join(root, "blond_split"))
    rng = np.random.default_rng(0)
    truth, table = {}, {}
    for e, n in envs.items():
        names = [f"{e}_{i:03d}.jpg" for i in range(n)]
        attrs = rng.integers(0, 2, (n, 40))
        for name, a in zip(names, attrs):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(
                os.path.join(root, "img_align_celeba", name))
            table[name] = a
        truth[e] = (names, attrs)
        if attrs_format == "pickle":
            import pandas as pd
            df = pd.DataFrame({"labels": list(attrs)}, index=names)
            with open(os.path.join(root, "blond_split", f"{e}_df.pickle"), "wb") as f:
                pickle.dump(df, f)
        else:
            with open(os.path.join(root, "blond_split", f"{e}.txt"), "w") as f:
                f.write("\n".join(names) + "\n")
    if attrs_format == "txt":
        with open(os.path.join(root, "list_attr_celeba.txt"), "w") as f:
            f.write(f"{len(table)}\n" + " ".join(CELEBA_ATTRIBUTES) + "\n")
            for name, a in table.items():
                f.write(name + " " + " ".join(str(2 * v - 1) for v in a) + "\n")
    return truth


@pytest.mark.parametrize("fmt", ["pickle", "txt"])
def test_celeba_oodbench_split_files_become_three_environments(tmp_path, fmt):
    if fmt == "pickle":
        pytest.importorskip("pandas")
    from kdjax.data.domainbed import celeba_oodbench_builder

    root = str(tmp_path / "celeba")
    truth = _celeba_tree(root, {"tr_env1": 6, "tr_env2": 5, "te_env": 4}, fmt)
    b = celeba_oodbench_builder(root, data_dir=str(tmp_path / "tfds"))
    b.download_and_prepare()
    for env_index, (env, (names, attrs)) in enumerate(truth.items()):
        src = b.as_data_source(env)
        recs = sorted((dict(src[i]) for i in range(len(src))), key=lambda r: r["index"])
        assert [r["filename"].decode() for r in recs] == names
        np.testing.assert_array_equal([r["label"] for r in recs], attrs[:, 9])  # Blond
        np.testing.assert_array_equal([r["spurious"] for r in recs], attrs[:, 20])  # Male
        np.testing.assert_array_equal([r["group"] for r in recs],
                                      2 * attrs[:, 9] + attrs[:, 20])
        assert {r["env"] for r in recs} == {env_index}


def test_celeba_oodbench_missing_split_file_says_what_is_expected(tmp_path):
    import os

    from kdjax.data.domainbed import celeba_oodbench_builder

    os.makedirs(tmp_path / "img_align_celeba")
    with pytest.raises(FileNotFoundError, match=r"tr_env1_df\.pickle"):
        celeba_oodbench_builder(str(tmp_path))
