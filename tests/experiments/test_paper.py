"""experiments/paper.py end to end on SMALL data: a generated DomainBed folder (ShiftKD,
CoSS on an ImageNet-100-layout folder), mock TFDS catalog data (KD2M, DomainNet) and a
generated CelebA tree with OoD-Bench split files. Tiny images, random weights
(``pretrained=""``), one epoch: the pipeline runs, not the papers' numbers."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import paper
from kdjax.experiment.config import load_config

# zoo ResNet-8s keep compilation short; the ShiftKD test keeps a tv_resnet18 student
SMALL = ["--config.data.image_size=32", "--config.teacher.model=resnet8",
         "--config.student.model=resnet8", "--config.data.num_workers=0",
         "--config.teacher.pretrained=", "--config.student.pretrained=",
         "--config.teacher.epochs=1", "--config.student.epochs=1",
         "--config.teacher.batch_size=8", "--config.student.batch_size=8",
         "--config.eval_batch_size=16"]


def _run(setting, tmp_path, extra, variant=None):
    over = SMALL + [f"--config.out_dir={tmp_path / 'out'}",
                    f"--config.data.data_dir={tmp_path / 'tfds'}"] + extra
    c = load_config(paper.CONFIGS[setting], [o.removeprefix("--config.") for o in over],
                    variant)
    row = paper.main(c)
    with open(tmp_path / "out" / "results.json") as f:
        assert json.load(f)["setting"] == row["setting"]
    return row


def _folder(root, domains, n=4):
    from PIL import Image

    rng = np.random.default_rng(0)
    for d in domains:
        for c in ("a", "b"):
            os.makedirs(os.path.join(root, d, c))
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(
                    os.path.join(root, d, c, f"{i}.jpg"))


@pytest.mark.slow
def test_shiftkd_leave_one_domain_out_on_a_generated_folder(tmp_path):
    root = str(tmp_path / "PACS")
    _folder(root, ("art_painting", "cartoon", "photo"))
    row = _run("shiftkd", tmp_path, [f"--config.data.root={root}",
                                     "--config.data.target=photo",
                                     "--config.student.model=tv_resnet18"])
    assert set(k for k in row if k.startswith(("val_", "target_"))) == {
        "val_art_painting", "val_cartoon", "target_photo"}
    assert 0 <= row["target_photo"]["accuracy"] <= 1
    assert "agreement" in row["target_photo"]


@pytest.mark.slow
def test_shiftkd_domainnet_and_kd2m_on_mock_catalog_data(tmp_path):
    with tfds.testing.mock_data(num_examples=16):
        row = _run("shiftkd", tmp_path, ["--config.data.target=quickdraw"], "domainnet")
        assert "target_quickdraw" in row and "val_real" in row
        row = _run("kd2m", tmp_path / "kd2m", [])
        assert row["methods"] == ["ce", "kd2m_gaussian_w2"]
        assert np.isfinite(row["test"]["loss"])


@pytest.mark.slow
def test_coss_on_an_imagenet100_layout_folder(tmp_path):
    root = str(tmp_path / "imagenet100")
    _folder(root, ("train", "val"))
    row = _run("coss", tmp_path, [f"--config.data.root={root}"])
    assert "target_val" in row and row["methods"] == ["coss"]


def test_a_missing_pretrained_file_says_where_to_get_it(tmp_path):
    root = str(tmp_path / "PACS")
    _folder(root, ("art_painting", "photo"), n=1)
    c = load_config(paper.CONFIGS["shiftkd"], [
        f"data.root={root}", "data.target=photo", "data.num_workers=0",
        f"data.data_dir={tmp_path / 'tfds'}", "teacher.pretrained=/nowhere/r50.pth",
        "data.image_size=16"])
    with pytest.raises(FileNotFoundError, match=r"download\.pytorch\.org/models/"
                                                r"resnet50-0676ba61\.pth"):
        paper.main(c)
