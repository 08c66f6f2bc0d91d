"""Train a teacher once per (teacher config, data config); later runs load it.

The cache key is :func:`kdjax._io.config_hash` of the teacher config and the data
config; the variables are saved with orbax under ``<cache_dir>/teacher_<hash>/`` with a
``meta.json`` (config, metrics, run metadata). Cross-entropy training with
``fit``; model selection on the validation split.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from kdjax import methods, models
from kdjax.experiment.config import config_hash
from kdjax.data import get_augmentation
from kdjax.train.checkpoint import load_pytree, save_pytree
from kdjax.train.engine import Distiller
from kdjax.train.loop import EvalSet, Evaluation, fit
from kdjax.train.optim import make_optimizer
from kdjax._io import atomic_write_text, run_metadata

__all__ = ["get_teacher", "teacher_apply"]


def teacher_apply(module, variables):
    """``x -> (logits, features)`` of a teacher in eval mode."""
    return lambda x: module.apply(variables, x, train=False)


def get_teacher(teacher_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any],
                train: Mapping[str, np.ndarray], val: Mapping[str, np.ndarray],
                num_classes: int, *, cache_dir: str, mesh=None, progress: bool = True):
    """Returns ``(module, variables, meta)``, training and caching on a miss.

    ``teacher_cfg``: ``model`` (name), ``model_kwargs``, ``epochs``, ``batch_size``,
    ``optimizer`` (see :func:`kdjax.train.make_optimizer`), ``seed``, and optionally
    ``augment`` (a :func:`kdjax.data.get_augmentation` name, e.g. ``"crop_flip"`` for
    CIFAR teachers; absent, ``""`` or ``"none"``: no augmentation) with
    ``augment_kwargs``. The cache key hashes the whole config, so a teacher trained
    with augmentation is cached apart from one trained without.
    ``train``/``val``: dicts with ``x`` and ``y``.
    """
    tc = teacher_cfg.to_dict() if hasattr(teacher_cfg, "to_dict") else dict(teacher_cfg)
    dc = data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg)
    module = models.create(tc["model"], num_classes, **dict(tc.get("model_kwargs", {})))
    aug_name = tc.get("augment") or "none"
    try:   # validated before any training or cache lookup
        augment = get_augmentation(aug_name, **dict(tc.get("augment_kwargs") or {}))
    except (ValueError, TypeError) as e:
        raise ValueError(f"teacher config 'augment'/'augment_kwargs': {e}") from None
    augment = None if aug_name == "none" else augment
    key = config_hash(tc, dc, num_classes)
    path = os.path.join(os.path.abspath(cache_dir), f"teacher_{key}")
    meta_path = os.path.join(path + "_meta.json")
    template = module.init(jax.random.PRNGKey(0), np.asarray(train["x"][:2]), train=False)
    if os.path.exists(meta_path) and os.path.isdir(path):
        variables = load_pytree(path, template)
        with open(meta_path) as f:
            meta = json.load(f)
        meta["cached"] = True
        return module, variables, meta

    steps = len(train["x"]) // tc["batch_size"]
    tx = make_optimizer(tc["optimizer"], total_steps=steps * tc["epochs"],
                        steps_per_epoch=steps)
    distiller = Distiller(module, (methods.build({"name": "ce"}),), tx, augment=augment)
    state = distiller.init(int(tc.get("seed", 0)), train["x"][:2])
    (best,) = fit(distiller, state, None, {"x": train["x"], "y": train["y"]},
                  epochs=tc["epochs"], batch_size=tc["batch_size"], mesh=mesh,
                  evaluation=Evaluation({"val": EvalSet(x=val["x"], y=val["y"])},
                                        select_on="val"),
                  progress=progress, desc="teacher").best
    variables = {"params": best["params"]}
    if best["batch_stats"]:
        variables["batch_stats"] = best["batch_stats"]
    save_pytree(path, variables)
    meta = {"config": tc, "data": dc, "key": key, "best_epoch": best["epoch"],
            "val": best["metrics"]["val"], **run_metadata()}
    atomic_write_text(meta_path, json.dumps(meta, indent=2, default=str))
    meta["cached"] = False
    return module, variables, meta
