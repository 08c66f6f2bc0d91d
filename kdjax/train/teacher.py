"""Train a teacher once per (teacher config, data config); later runs load it.

The cache key is :func:`kdjax._io.config_hash` of the teacher config, the data config
and the number of classes (plus the teacher's training objective when it is not plain
cross-entropy, see ``algorithm`` below; keys of cross-entropy teachers are those of
earlier revisions, so their cached teachers stay valid). Entries live in
:mod:`kdjax.train.cache` (``<cache_dir>/teacher_<key>/`` + ``teacher_<key>_meta.json``):
a corrupt entry is set aside with a warning and retrained, a diverged teacher is never
cached.

Training is ``fit`` with model selection on the validation split, checkpointed every
``checkpoint_every`` epochs under ``<cache_dir>/teacher_<key>.ckpt/``: a run killed at
epoch 7 of 10 resumes at epoch 7 and ends with the parameters of an uninterrupted run
(the checkpoints are removed once the teacher is cached).

Everything is validated before any training (:func:`validate_teacher_config`, which
drivers can also call before their first cell), and the cache directory is checked for
writability first (:func:`kdjax.train.cache.ensure_writable`).
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping

import jax
import numpy as np

from kdjax import methods, models
from kdjax._io import config_hash
from kdjax.data import get_augmentation
from kdjax.train import cache
from kdjax.train.checkpoint import Checkpointer
from kdjax.train.engine import Distiller
from kdjax.train.loop import EvalSet, Evaluation, fit
from kdjax.train.optim import make_optimizer, validate_optimizer_config

__all__ = ["get_teacher", "teacher_apply", "validate_teacher_config", "DEFAULT_ALGORITHM"]

# The teacher objective when ``algorithm`` is not given: plain cross-entropy.
DEFAULT_ALGORITHM = {"name": "ce"}
_REQUIRED = ("model", "epochs", "batch_size", "optimizer")


def teacher_apply(module, variables):
    """``x -> (logits, features)`` of a teacher in eval mode."""
    return lambda x: module.apply(variables, x, train=False)


def _plain(cfg) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def _positive_int(value, name: str, high: int | None = None, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high} ({what}), got {value}.")
    return int(value)


def _build_algorithm(algorithm, key: str):
    """``(BuiltMethod, canonical dict or None when it is the default objective)``."""
    spec = _plain(algorithm if algorithm is not None else DEFAULT_ALGORITHM)
    try:
        built = methods.build(spec)
    except ValueError as e:
        raise ValueError(f"{key}.algorithm: {e}") from None
    canonical = {"name": built.name, "weight": built.weight, **dict(built.options)}
    ce = methods.build(DEFAULT_ALGORITHM)
    default = {"name": ce.name, "weight": ce.weight, **dict(ce.options)}
    return built, (None if canonical == default else canonical)


def validate_teacher_config(cfg: Mapping[str, Any], num_train: int, *,
                            num_classes: int | None = None, algorithm=None,
                            key: str = "teacher") -> None:
    """Checks a teacher config before any training; ``ValueError`` naming the key.

    Checks: the required keys (``model``, ``epochs``, ``batch_size``, ``optimizer``);
    ``model`` a valid architecture (:func:`kdjax.models.check_name`) and
    ``model_kwargs`` accepted by it; ``epochs`` an int >= 1; ``batch_size`` an int in
    ``[1, num_train]`` (``num_train``: training examples the teacher sees); ``seed`` an
    int; every optimiser setting (:func:`kdjax.train.optim.validate_optimizer_config`:
    names, schedules, finite positive learning rate, finite float settings);
    ``augment``/``augment_kwargs``; the optional ``algorithm`` method config.
    """
    if not hasattr(cfg, "keys"):
        raise ValueError(f"{key} config must be a dict, got {cfg!r}.")
    tc = _plain(cfg)
    missing = [k for k in _REQUIRED if k not in tc]
    if missing:
        raise ValueError(f"{key} config is missing {missing}; required keys: "
                         f"{list(_REQUIRED)}, got {sorted(tc)}.")
    models.check_name(tc["model"], f"{key}.model")
    try:
        models.create(tc["model"], num_classes or 2, **dict(tc.get("model_kwargs") or {}))
    except ValueError as e:
        raise ValueError(f"{key}.model_kwargs: {e}") from None
    _positive_int(tc["epochs"], f"{key}.epochs")
    _positive_int(num_train, "num_train")
    _positive_int(tc["batch_size"], f"{key}.batch_size", num_train,
                  f"the {num_train} training examples; one step per epoch needs a full "
                  f"batch")
    seed = tc.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"{key}.seed must be an int, got {seed!r}.")
    validate_optimizer_config(tc["optimizer"], f"{key}.optimizer")
    _augmentation(tc, key)
    _build_algorithm(algorithm, key)


def _augmentation(tc: dict, key: str):
    aug_name = tc.get("augment") or "none"
    try:
        augment = get_augmentation(aug_name, **dict(tc.get("augment_kwargs") or {}))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{key} config 'augment'/'augment_kwargs': {e}") from None
    return None if aug_name == "none" else augment


def _check_train_arrays(train: Mapping[str, Any], val: Mapping[str, Any]) -> int:
    for name, d in (("train", train), ("val", val)):
        if "x" not in d or "y" not in d:
            raise ValueError(f"{name} must be a dict with 'x' and 'y', got keys "
                             f"{sorted(d)}.")
    n = len(train["x"])
    for k, v in train.items():
        if np.shape(v)[:1] != (n,):
            raise ValueError(f"train[{k!r}] must have {n} rows like train['x'], got shape "
                             f"{np.shape(v)}.")
    if len(val["x"]) < 1 or len(val["y"]) != len(val["x"]):
        raise ValueError(f"val must have >= 1 row and as many labels as inputs, got "
                         f"{len(val['x'])} inputs and {len(val['y'])} labels.")
    return n


def _first_divergence(history, best) -> str:
    for row in history:
        bad = {k: v for k, v in row.get("train", {}).items() if not np.isfinite(v)}
        if bad:
            return f"epoch {row['epoch']} (train loss terms {bad})"
    if cache.nonfinite_leaves((best["params"], best["batch_stats"])):
        return f"the selected epoch {best['epoch']} (non-finite parameters)"
    return ""


def get_teacher(teacher_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any],
                train: Mapping[str, np.ndarray], val: Mapping[str, np.ndarray],
                num_classes: int, *, cache_dir: str, mesh=None, progress: bool = True,
                algorithm: Mapping[str, Any] | None = None, checkpoint_every: int = 1):
    """Returns ``(module, variables, meta)``, training and caching on a miss.

    Args:
      teacher_cfg: ``model`` (name), ``model_kwargs``, ``epochs``, ``batch_size``,
        ``optimizer`` (see :func:`kdjax.train.make_optimizer`), ``seed``, and optionally
        ``augment`` (a :func:`kdjax.data.get_augmentation` name, e.g. ``"crop_flip"``
        for CIFAR teachers; absent, ``""`` or ``"none"``: no augmentation) with
        ``augment_kwargs``. The cache key hashes the whole config, so a teacher trained
        with augmentation is cached apart from one trained without.
      data_cfg: what identifies the data (part of the cache key).
      train, val: dicts with ``x`` and ``y``. Further arrays of ``train`` with one row
        per example (e.g. ``"env"``/``"groups"`` for a domain-generalisation objective)
        are passed through to every batch. ``val`` may carry ``groups``/``num_groups``
        (worst-group metrics in the history; selection stays on accuracy).
      num_classes: classes of the teacher's head.
      cache_dir: the cache (checked for writability before training).
      algorithm: the teacher's training objective, a method config
        (:func:`kdjax.methods.build`, e.g. ``{"name": "groupdro", "eta": 0.01}``);
        ``None`` means ``{"name": "ce"}``. It is part of the cache key only when it is
        not plain cross-entropy with its default options, so keys of cross-entropy
        teachers are unchanged. The method must not need a teacher.
      checkpoint_every: epochs between training checkpoints (resume after a kill).

    Returns:
      ``(module, variables, meta)``; ``meta`` has ``config``, ``data``, ``key``,
      ``best_epoch``, ``val``, the run metadata, ``algorithm`` (for a non-default
      objective) and ``cached`` (True when loaded).

    Raises:
      ValueError: a bad config or bad arrays (before any training);
        :class:`kdjax.train.cache.NonFiniteError` when training diverged (naming the
        config and the first non-finite epoch; nothing is cached).
      kdjax.train.cache.NotWritableError: ``cache_dir`` cannot be written.
    """
    tc, dc = _plain(teacher_cfg), _plain(data_cfg)
    n = _check_train_arrays(train, val)
    validate_teacher_config(tc, n, num_classes=num_classes, algorithm=algorithm)
    method, algo_key = _build_algorithm(algorithm, "teacher")
    part = method.options.get("partition")
    if isinstance(part, str) and part not in train:
        raise ValueError(f"teacher.algorithm {method.name!r} reads batch[{part!r}] "
                         f"(option partition={part!r}), but train has only "
                         f"{sorted(train)}; pass the {part!r} array with the training data.")
    module = models.create(tc["model"], num_classes, **dict(tc.get("model_kwargs") or {}))
    augment = _augmentation(tc, "teacher")
    key = (config_hash(tc, dc, num_classes) if algo_key is None else
           config_hash(tc, dc, num_classes, {"algorithm": algo_key}))
    steps = n // tc["batch_size"]
    tx = make_optimizer(tc["optimizer"], total_steps=steps * tc["epochs"],
                        steps_per_epoch=steps, key="teacher.optimizer")
    distiller = Distiller(module, (method,), tx, augment=augment)   # checks the method
    template = module.init(jax.random.PRNGKey(0), np.asarray(train["x"][:2]), train=False)
    nbytes = sum(np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(template))
    what = (f"teacher {key} (model={tc['model']!r}, optimizer={tc['optimizer']}, "
            f"epochs={tc['epochs']}{'' if algo_key is None else f', algorithm={algo_key}'})")

    def build(ckpt_dir):
        state = distiller.init(int(tc.get("seed", 0)), train["x"][:2])
        extra = {k: val[k] for k in ("groups", "num_groups") if k in val}
        try:
            result = fit(distiller, state, None, dict(train), epochs=tc["epochs"],
                         batch_size=tc["batch_size"], mesh=mesh,
                         evaluation=Evaluation({"val": EvalSet(x=val["x"], y=val["y"],
                                                               **extra)}, select_on="val"),
                         checkpointer=Checkpointer(ckpt_dir),
                         checkpoint_every=checkpoint_every, progress=progress,
                         desc="teacher")
        except FloatingPointError as e:   # fit's divergence guard: name the config too
            raise type(e)(f"{what} diverged ({e}); nothing was cached.") from e
        (best,) = result.best
        diverged = _first_divergence(result.history, best)
        if diverged:
            raise cache.NonFiniteError(
                f"{what} diverged: non-finite values first at {diverged}; nothing was "
                f"cached. Lower teacher.optimizer.learning_rate or check the inputs "
                f"(delete {ckpt_dir} to retrain from scratch).")
        variables = {"params": best["params"]}
        if best["batch_stats"]:
            variables["batch_stats"] = best["batch_stats"]
        meta = {"config": tc, "data": dc, "key": key, "best_epoch": best["epoch"],
                "val": best["metrics"]["val"]}
        if algo_key is not None:
            meta["algorithm"] = algo_key
        return variables, meta

    variables, meta = cache.get_or_build(cache_dir, f"teacher_{key}", template, build,
                                         what=what, need_bytes=10 * nbytes)
    return module, variables, meta
