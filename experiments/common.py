"""Pieces shared by the drivers (data splits)."""

from __future__ import annotations

import numpy as np

from kdjax import data as kdata


def load_splits(d, seed: int = 0):
    """``(train, val, test)`` ArrayDatasets for a dataset config ``d``.

    ``d`` has ``name``, ``data_dir`` and ``val_size`` and optionally ``config``,
    ``num_train``/``num_test`` (MNIST-1D sizes) and ``max_examples`` (catalog datasets);
    empty/zero values mean "default". Validation is a random held-out part of the
    training split (never the test split), drawn from ``seed``.
    """
    kw = {"data_dir": d.data_dir or None}
    if d.get("config"):
        kw["config"] = d.config
    for k in ("num_train", "num_test", "max_examples"):
        if d.get(k):
            kw[k] = d[k]
    full = kdata.load(d.name, "train", **kw)
    test = kdata.load(d.name, "test", **kw)
    if not 0 < d.val_size < len(full):
        raise ValueError(f"dataset.val_size={d.val_size} must be in [1, {len(full)}) (the "
                         f"training examples of {d.name!r}).")
    perm = np.random.default_rng(seed).permutation(len(full))
    return (full.subset(perm[d.val_size:], split="train"),
            full.subset(perm[:d.val_size], split="val"), test)
