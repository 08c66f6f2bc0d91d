"""Optimisers and learning-rate schedules from config (thin layer over optax).

Every setting is validated eagerly, before an optimiser is built (and therefore before
any training): :func:`validate_optimizer_config` rejects unknown names, schedules and
keys, and any float setting that is NaN, infinite or out of range, with a
``ValueError`` that names the config key, what was expected and what was received.
Drivers call it (through :func:`kdjax.train.teacher.validate_teacher_config` for the
teacher) before their first cell.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Mapping

import jax.numpy as jnp
import optax

from kdjax._checks import check_choice

__all__ = ["make_optimizer", "make_schedule", "validate_optimizer_config", "OPTIMIZERS",
           "SCHEDULES", "OPTIMIZER_KEYS"]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")
OPTIMIZER_KEYS = ("name", "learning_rate", "schedule", "warmup_epochs", "decay_epochs",
                  "decay_factor", "weight_decay", "grad_clip", "momentum", "nesterov")


def _number(cfg: Mapping[str, Any], field: str, key: str, *, low: float,
            low_open: bool = False, high: float = math.inf, high_open: bool = True):
    """``cfg[field]`` checked to be a real, finite number in the interval."""
    v = cfg[field]
    name = f"{key}.{field}"
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name} must be a number, got {v!r} ({type(v).__name__}).")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}.")
    ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        if high == math.inf:
            raise ValueError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {v}.")
        raise ValueError(f"{name} must be in {'(' if low_open else '['}{low:g}, {high:g}"
                         f"{')' if high_open else ']'}, got {v}.")
    return v


def validate_optimizer_config(cfg: Mapping[str, Any], key: str = "optimizer") -> None:
    """Checks an optimiser config (see :func:`make_optimizer`) without building it.

    ``key`` is the config path used in messages (e.g. ``"teacher.optimizer"``).
    """
    if not hasattr(cfg, "keys") or not hasattr(cfg, "get"):
        raise ValueError(f"{key} must be a dict with at least 'learning_rate', got "
                         f"{cfg!r}.")
    unknown = sorted(set(cfg.keys()) - set(OPTIMIZER_KEYS))
    if unknown:
        raise ValueError(f"{key} has unknown keys {unknown}; valid keys: "
                         f"{sorted(OPTIMIZER_KEYS)}.")
    if "learning_rate" not in cfg:
        raise ValueError(f"{key}.learning_rate is required (a finite number > 0), got no "
                         f"such key in {sorted(cfg.keys())}.")
    check_choice(cfg.get("name", "sgd"), f"{key}.name", OPTIMIZERS)
    check_choice(cfg.get("schedule", "cosine"), f"{key}.schedule", SCHEDULES)
    _number(cfg, "learning_rate", key, low=0.0, low_open=True)
    for field in ("weight_decay", "grad_clip", "warmup_epochs"):
        if field in cfg:
            _number(cfg, field, key, low=0.0)
    if "momentum" in cfg and cfg["momentum"] is not None:
        _number(cfg, "momentum", key, low=0.0, high=1.0)
    if "decay_factor" in cfg:
        _number(cfg, "decay_factor", key, low=0.0, low_open=True)
    if "nesterov" in cfg and not isinstance(cfg["nesterov"], bool):
        raise ValueError(f"{key}.nesterov must be a bool, got {cfg['nesterov']!r}.")
    epochs = cfg.get("decay_epochs", ())
    if isinstance(epochs, (str, bytes)) or not hasattr(epochs, "__iter__"):
        raise ValueError(f"{key}.decay_epochs must be a list of epochs >= 0, got "
                         f"{epochs!r}.")
    for i, _ in enumerate(epochs):
        _number({f"decay_epochs[{i}]": epochs[i]}, f"decay_epochs[{i}]", key, low=0.0)


def make_schedule(cfg: Mapping[str, Any], total_steps: int, steps_per_epoch: int):
    """``constant``, ``cosine`` (to 0 over training, optional linear warm-up) or ``step``
    (multiply by ``decay_factor`` at each epoch in ``decay_epochs``, RepDistiller's
    150/180/210 x 0.1)."""
    validate_optimizer_config(cfg)
    lr = float(cfg["learning_rate"])
    kind = cfg.get("schedule", "cosine")
    warmup = int(cfg.get("warmup_epochs", 0) * steps_per_epoch)
    if kind == "constant":
        sched = optax.constant_schedule(lr)
    elif kind == "cosine":
        sched = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1))
    else:
        bounds = {int(e * steps_per_epoch): cfg.get("decay_factor", 0.1)
                  for e in cfg.get("decay_epochs", ())}
        sched = optax.piecewise_constant_schedule(lr, bounds)
    if warmup:
        sched = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), sched], [warmup])
    return sched


def make_optimizer(cfg: Mapping[str, Any], *, total_steps: int, steps_per_epoch: int,
                   key: str = "optimizer") -> optax.GradientTransformationExtraArgs:
    """optax optimiser from ``cfg``: ``name`` in ``sgd`` (momentum, nesterov), ``adam``,
    ``adamw``; ``weight_decay`` (coupled L2 for sgd/adam as in the reference KD code,
    decoupled for adamw); ``grad_clip`` (global norm, 0 = off); ``learning_rate`` and
    the schedule keys of :func:`make_schedule`. Validated first
    (:func:`validate_optimizer_config`, messages prefixed with ``key``).

    The learning rate is a *traced* number: the step size at step ``t`` is
    ``learning_rate * s(t)`` with ``s`` the schedule at peak 1 (bit-identical to the
    schedule built at ``learning_rate`` for ``constant`` and ``cosine``; the ``step``
    schedule and the warm-up differ by float rounding), and ``learning_rate`` lives in
    the optimiser state (``optax.inject_hyperparams``: ``opt_state.hyperparams
    ["learning_rate"]``). Configs that differ only in ``learning_rate`` get optimisers
    with the same ``update`` function, so a distiller built on either reuses the other's
    compiled programs (:meth:`kdjax.train.Distiller.signature` keys on ``tx.update``);
    ``init`` writes each config's own rate into the state.
    """
    validate_optimizer_config(cfg, key)
    for name, v in (("total_steps", total_steps), ("steps_per_epoch", steps_per_epoch)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"make_optimizer {name} must be an int >= 1, got {v!r} (is "
                             f"the batch larger than the dataset?).")
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    lr = float(cfg.pop("learning_rate"))
    frozen = tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v)
                          for k, v in cfg.items()))
    shared = _unit_rate_optimizer(frozen, int(total_steps), int(steps_per_epoch))

    def init(params):
        state = shared.init(params)
        rate = state.hyperparams["learning_rate"]
        return state._replace(hyperparams={**state.hyperparams,
                                           "learning_rate": jnp.asarray(lr, rate.dtype)})

    return optax.GradientTransformationExtraArgs(init, shared.update)


@functools.lru_cache(maxsize=256)
def _unit_rate_optimizer(frozen_cfg: tuple, total_steps: int, steps_per_epoch: int):
    """The optimiser of a config without its learning rate (one object per config, so
    its ``update`` is shared); the rate is an injected hyperparameter."""
    cfg = dict(frozen_cfg)
    unit = make_schedule({**cfg, "learning_rate": 1.0}, total_steps, steps_per_epoch)
    name = cfg.get("name", "sgd")
    wd = cfg.get("weight_decay", 0.0)

    def build(learning_rate):
        sched = lambda count: learning_rate * unit(count)  # noqa: E731
        parts = []
        if cfg.get("grad_clip", 0.0):
            parts.append(optax.clip_by_global_norm(cfg["grad_clip"]))
        if name == "sgd":
            if wd:
                parts.append(optax.add_decayed_weights(wd))
            parts.append(optax.sgd(sched, momentum=cfg.get("momentum", 0.9) or None,
                                   nesterov=cfg.get("nesterov", False)))
        elif name == "adam":
            if wd:
                parts.append(optax.add_decayed_weights(wd))
            parts.append(optax.adam(sched))
        else:
            parts.append(optax.adamw(sched, weight_decay=wd))
        return optax.chain(*parts)

    return optax.inject_hyperparams(build)(learning_rate=1.0)
