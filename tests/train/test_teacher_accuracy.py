"""Acceptance: CNN teachers reach >= 90% on MNIST-1D and >= 95% on digits (test split);
a second call loads the cached teacher instead of training."""

import numpy as np
import pytest

from kdjax import data as kdata
from kdjax.train import predict
from kdjax.train.engine import evaluate
from kdjax.train.teacher import get_teacher, teacher_apply


def _split(ds, n_val, seed=0):
    perm = np.random.default_rng(seed).permutation(len(ds))
    return ds.subset(perm[n_val:]), ds.subset(perm[:n_val])


@pytest.mark.slow
@pytest.mark.parametrize("name, model, kwargs, epochs, threshold", [
    ("mnist1d", "cnn1d", {"channels": (32, 64, 128)}, 15, 0.90),
    ("digits", "cnn2d", {"channels": (32, 64)}, 30, 0.95),
])
def test_teacher_accuracy_and_cache(tmp_path, name, model, kwargs, epochs, threshold):
    train, val = _split(kdata.load(name, "train", data_dir=str(tmp_path / "data")), 300)
    test = kdata.load(name, "test", data_dir=str(tmp_path / "data"))
    cfg = {"model": model, "model_kwargs": kwargs, "epochs": epochs, "batch_size": 64,
           "seed": 0, "optimizer": {"name": "adamw", "learning_rate": 3e-3,
                                    "weight_decay": 1e-4, "schedule": "cosine"}}
    args = (cfg, {"dataset": name}, {"x": train.x, "y": train.y}, {"x": val.x, "y": val.y},
            train.num_classes)
    module, variables, meta = get_teacher(*args, cache_dir=str(tmp_path / "cache"),
                                          progress=False)
    assert meta["cached"] is False
    acc = evaluate(predict(teacher_apply(module, variables), test.x), test.y)["accuracy"]
    assert acc >= threshold, f"{name} teacher test accuracy {acc:.3f} < {threshold}"
    _, variables2, meta2 = get_teacher(*args, cache_dir=str(tmp_path / "cache"), progress=False)
    assert meta2["cached"] is True
    acc2 = evaluate(predict(teacher_apply(module, variables2), test.x), test.y)["accuracy"]
    assert acc2 == acc
