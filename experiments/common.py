"""Pieces shared by the drivers: data splits, labelled subsets, the cached teacher and
its logits, seed training, test metrics of a best student. Not a driver: drivers import
this module, never each other."""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import data as kdata
from kdjax.train import Checkpointer, fit, predict
from kdjax.train.engine import evaluate
from kdjax.train.teacher import get_teacher, teacher_apply


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


def teacher_and_logits(teacher_cfg, dataset_cfg, train, val, test, *, cache_dir: str,
                       mesh=None, progress: bool = True):
    """The cached teacher of a run and its logits on ``train``/``val``/``test``.

    The teacher is trained once per (teacher config, dataset config) by
    :func:`kdjax.train.teacher.get_teacher`; its logits are computed once here so
    logit-only methods never run the teacher inside the training step.
    Returns ``(module, variables, meta, {"train": ..., "val": ..., "test": ...})``.
    """
    module, variables, meta = get_teacher(
        teacher_cfg, {"dataset": dataset_cfg.to_dict()}, {"x": train.x, "y": train.y},
        {"x": val.x, "y": val.y}, train.num_classes, cache_dir=cache_dir, mesh=mesh,
        progress=progress)
    apply = teacher_apply(module, variables)
    logits = {k: predict(apply, d.x, 512, mesh)
              for k, d in (("train", train), ("val", val), ("test", test))}
    return module, variables, meta, logits


def fit_seeds(distiller, teacher_vars, data, seeds: Sequence[int], *, vmap: bool,
              ckpt_dir: str, name: str, example_x, **fit_kwargs):
    """Trains one student per seed: as one vmapped program when ``vmap`` and there are
    several seeds (checkpoint ``<name>_<s1>_<s2>...``), else one after the other
    (checkpoints ``<name>_<s>``). Seed ``s`` initialises from ``PRNGKey(s)`` either way.
    ``fit_kwargs`` go to :func:`kdjax.train.fit`. Returns ``(bests, history)``: one best
    record per seed, and the evaluation rows with their ``seed_index``."""
    if vmap and len(seeds) > 1:
        keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
        state = jax.vmap(lambda k: distiller.init(k, example_x, teacher_vars))(keys)
        ckpt = Checkpointer(os.path.join(ckpt_dir, name + "_" + "_".join(map(str, seeds))))
        res = fit(distiller, state, teacher_vars, data, checkpointer=ckpt, **fit_kwargs)
        return res.best, res.history
    bests, history = [], []
    for s in seeds:
        ckpt = Checkpointer(os.path.join(ckpt_dir, f"{name}_{s}"))
        state = distiller.init(s, example_x, teacher_vars)
        res = fit(distiller, state, teacher_vars, data, checkpointer=ckpt, **fit_kwargs)
        history += [dict(r, seed_index=len(bests)) for r in res.history]
        bests += res.best
    return bests, history


def labelled_subset(y: np.ndarray, n: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """Boolean mask of ``n`` labelled examples, stratified by class (all when ``n`` is 0
    or at least ``len(y)``): ``n // num_classes`` per class, drawn from ``seed + 1``."""
    if n == 0 or n >= len(y):
        return np.ones(len(y), bool)
    rng = np.random.default_rng(seed + 1)
    mask = np.zeros(len(y), bool)
    per_class = max(n // num_classes, 1)
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)
        mask[rng.choice(idx, min(per_class, len(idx)), replace=False)] = True
    return mask


def load_data(cfg):
    """``load_splits(cfg.dataset)`` (kept for drivers that take the whole config)."""
    return load_splits(cfg.dataset)


def best_variables(best) -> dict:
    """The Flax variables of a best record of :func:`kdjax.train.fit`."""
    variables = {"params": best["params"]}
    if best.get("batch_stats"):
        variables["batch_stats"] = best["batch_stats"]
    return variables


def evaluate_student(student, best, test, teacher_test_logits, mesh) -> dict:
    """Accuracy, teacher agreement, ECE and KL to the teacher of a best student on
    ``test`` (:func:`kdjax.train.engine.evaluate`)."""
    logits = predict(teacher_apply(student, best_variables(best)), test.x, 512, mesh)
    return evaluate(logits, test.y, teacher_test_logits)
