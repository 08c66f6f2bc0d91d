"""Pieces shared by the drivers: data splits, labelled subsets, the cached teacher and
its logits, seed training, test metrics of a best student. Not a driver: drivers import
this module, never each other."""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import data as kdata
from kdjax.train import (Checkpointer, Distiller, EvalSet, Evaluation, fit, make_optimizer,
                         predict)
from kdjax.train.engine import evaluate
from kdjax.train.teacher import get_teacher, teacher_apply


def load_splits(d, seed: int = 0, *, as_signals: bool = False):
    """``(train, val, test)`` ArrayDatasets for a dataset config ``d``.

    ``d`` has ``name``, ``data_dir`` and ``val_size`` and optionally ``config``,
    ``num_train``/``num_test`` (MNIST-1D sizes) and ``max_examples`` (catalog datasets);
    empty/zero values mean "default". Validation is a random held-out part of the
    training split (never the test split), drawn from ``seed``. ``as_signals``: images
    ``[N, H, W, C]`` are read as signals ``[N, H * W, C]`` (row-major pixels), e.g. for
    1-D conv networks.
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
    splits = (full.subset(perm[d.val_size:], split="train"),
              full.subset(perm[:d.val_size], split="val"), test)
    if as_signals and full.x.ndim == 4:
        splits = tuple(dataclasses.replace(s, x=s.x.reshape(len(s), -1, s.x.shape[-1]))
                       for s in splits)
    return splits


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
              ckpt_dir: str, name: str, example_x, before_fit=None, **fit_kwargs):
    """Trains one student per seed: as one vmapped program when ``vmap`` and there are
    several seeds (checkpoint ``<name>_<s1>_<s2>...``), else one after the other
    (checkpoints ``<name>_<s>``). Seed ``s`` initialises from ``PRNGKey(s)`` either way.
    ``before_fit(distiller, state, seeds)``, when given, runs on a fresh state (not on a resumed
    one) before training, e.g. an initialisation stage. ``fit_kwargs`` go to
    :func:`kdjax.train.fit`. Returns ``(bests, history)``: one best record per seed, and
    the evaluation rows with their ``seed_index``."""
    if vmap and len(seeds) > 1:
        keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
        state = jax.vmap(lambda k: distiller.init(k, example_x, teacher_vars))(keys)
        ckpt = Checkpointer(os.path.join(ckpt_dir, name + "_" + "_".join(map(str, seeds))))
        if before_fit is not None and not ckpt.steps():
            state = before_fit(distiller, state, list(seeds))
        res = fit(distiller, state, teacher_vars, data, checkpointer=ckpt, **fit_kwargs)
        return res.best, res.history
    bests, history = [], []
    for s in seeds:
        ckpt = Checkpointer(os.path.join(ckpt_dir, f"{name}_{s}"))
        state = distiller.init(s, example_x, teacher_vars)
        if before_fit is not None and not ckpt.steps():
            state = before_fit(distiller, state, [s])
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


def fit_students(student, built, data, splits, logits, teacher, seeds, *, epochs: int,
                 batch_size: int, optimizer, evaluations: int, mesh, ckpt_dir: str,
                 name: str, vmap: bool = True, progress: bool = True, augment=None,
                 teacher_from_batch: bool = False, compute_dtype=None, before_fit=None):
    """The students of one run: ``Distiller(student, built, optimizer)`` trained on
    ``data`` for ``epochs`` epochs of ``batch_size`` (all ``seeds`` via
    :func:`fit_seeds`), evaluated and checkpointed ``evaluations`` times on the
    validation split, the best validation epoch kept, then tested.

    ``splits``: ``(train, val, test)``; ``logits``: the teacher's logits on them;
    ``teacher``: ``(module, variables)`` or ``None`` (CE-only students). Returns
    ``(bests, history, rows)``; each row holds the test accuracy, agreement, ECE and KL
    to the teacher, the validation accuracy, best epoch, epochs, global batch size and
    training examples of one seed."""
    train, val, test = splits
    steps = len(data["x"]) // batch_size
    tx = make_optimizer(optimizer, total_steps=epochs * steps, steps_per_epoch=steps)
    kw = {} if compute_dtype is None else {"compute_dtype": compute_dtype}
    distiller = Distiller(student, built, tx, teacher=teacher and teacher[0],
                          augment=augment, teacher_from_batch=teacher_from_batch, **kw)
    every = max(1, epochs // evaluations)   # evaluate + checkpoint this often
    val_set = {"val": EvalSet(x=val.x, y=val.y, teacher_logits=logits["val"])}
    bests, history = fit_seeds(
        distiller, teacher and teacher[1], data, seeds, vmap=vmap, ckpt_dir=ckpt_dir,
        name=name, example_x=train.x[:2], before_fit=before_fit, epochs=epochs,
        batch_size=batch_size, mesh=mesh, checkpoint_every=every, progress=progress,
        evaluation=Evaluation(val_set, every=every, select_on="val"), desc=name)
    rows = []
    for best in bests:
        m = evaluate_student(student, best, test, logits["test"], mesh)
        rows.append({"test_accuracy": m["accuracy"], "test_agreement": m["agreement"],
                     "test_ece": m["ece"], "test_kl_to_teacher": m["kl_to_teacher"],
                     "val_accuracy": best["metrics"]["val"]["accuracy"],
                     "best_epoch": best["epoch"], "epochs": epochs,
                     "global_batch_size": batch_size, "train_examples": len(data["x"])})
    return bests, history, rows


def study_teacher(cfg, splits, mesh, log=print, setting=None):
    """The cached teacher of a study config (``teacher`` and ``dataset`` of ``setting``
    or else of ``cfg``; ``cfg.cache_dir``, ``cfg.progress``) on ``splits``: ``(module,
    variables, logits, test accuracy)``, with one log line saying whether it was cached
    or trained."""
    src = cfg if setting is None else setting
    module, variables, meta, logits = teacher_and_logits(
        src.teacher, src.dataset, *splits, cache_dir=cfg.cache_dir, mesh=mesh,
        progress=cfg.progress)
    acc = evaluate(logits["test"], splits[2].y)["accuracy"]
    log(f"teacher {src.teacher.model}: test accuracy {100 * acc:.2f}% "
        f"({'cached' if meta['cached'] else 'trained'})")
    return module, variables, logits, acc
