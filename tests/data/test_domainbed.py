"""The DomainBed-layout folder builder on a small generated tree of JPEGs."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from kdjax.data import Stream, image_transform
from kdjax.data.domainbed import (domainbed_builder, holdout_split, list_classes,
                                  list_domains)

CLASSES = ("dog", "elephant", "giraffe")


def make_tree(root, domains=("art_painting", "photo"), per_class=3, seed=0):
    """``<root>/<domain>/<class>/<i>.jpg`` with random images of varying sizes (one PNG
    per domain); returns {relative path: (domain, class)}."""
    rng = np.random.default_rng(seed)
    made = {}
    for d in domains:
        for c in CLASSES:
            os.makedirs(os.path.join(root, d, c), exist_ok=True)
            for i in range(per_class):
                img = rng.integers(0, 256, (20 + 2 * i, 24 + i, 3), dtype=np.uint8)
                ext = "png" if (c == "dog" and i == 0) else "jpg"
                rel = os.path.join(d, c, f"{i}.{ext}")
                Image.fromarray(img).save(os.path.join(root, rel))
                made[rel] = (d, c)
    with open(os.path.join(root, domains[0], "dog", "notes.txt"), "w") as f:
        f.write("not an image")   # ignored
    return made


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("PACS"))
    return root, make_tree(root)


def test_domains_and_classes_are_the_sorted_directories(tree):
    root, _ = tree
    assert list_domains(root) == ["art_painting", "photo"]
    assert list_classes(root) == list(CLASSES)


def test_builder_records_match_the_files(tree, tmp_path):
    root, made = tree
    b = domainbed_builder(root, "photo", data_dir=tmp_path, dataset="PACS")
    b.download_and_prepare()
    src = b.as_data_source("train")
    assert len(src) == 9
    records = [dict(src[i]) for i in range(len(src))]
    for r in records:   # TFDS Text features come back as bytes
        r["filename"] = r["filename"].decode()
    assert sorted(r["filename"] for r in records) == sorted(
        k for k, v in made.items() if v[0] == "photo")
    for r in records:
        d, c = made[r["filename"]]
        assert r["label"] == CLASSES.index(c) and r["domain"] == 1
        path = os.path.join(root, r["filename"])
        if path.endswith(".jpg"):   # stored as the file's bytes: decodes to the same pixels
            np.testing.assert_array_equal(r["image"], np.asarray(Image.open(path)))
        else:                       # a PNG is re-encoded as JPEG (quality 95)
            buf = io.BytesIO()
            Image.open(path).convert("RGB").save(buf, format="JPEG", quality=95)
            np.testing.assert_array_equal(r["image"], np.asarray(Image.open(buf)))
    assert sorted(r["index"] for r in records) == list(range(9))
    info = b.info.features["label"]
    assert list(info.names) == list(CLASSES)


def test_each_domain_is_its_own_config_and_streams(tree, tmp_path):
    root, _ = tree
    a = domainbed_builder(root, "art_painting", data_dir=tmp_path)
    p = domainbed_builder(root, "photo", data_dir=tmp_path)
    assert a.builder_config.name != p.builder_config.name
    a.download_and_prepare()
    stream = Stream(a.as_data_source("train"), 3, image_transform(size=16, train=True,
                                                                  extras=("domain",)))
    (batch,) = list(stream.batches(8, seed=0))
    assert batch["x"].shape == (8, 16, 16, 3) and batch["domain"].tolist() == [0] * 8
    assert np.isfinite(batch["x"]).all()


def test_bad_root_or_domain_is_a_clear_error(tree, tmp_path):
    root, _ = tree
    with pytest.raises(ValueError, match=r"domain must be one of \['art_painting', "
                                         r"'photo'\]"):
        domainbed_builder(root, "sketch", data_dir=tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        domainbed_builder(os.path.join(root, "nope"), "photo")


def test_holdout_split_is_a_seeded_partition():
    a_in, a_out = holdout_split(50, 0.2, seed=3)
    b_in, b_out = holdout_split(50, 0.2, seed=3)
    np.testing.assert_array_equal(a_out, b_out)
    assert len(a_out) == 10 and len(a_in) == 40
    assert sorted(np.concatenate([a_in, a_out]).tolist()) == list(range(50))
    assert not np.array_equal(holdout_split(50, 0.2, seed=4)[1], a_out)
