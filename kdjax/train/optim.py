"""Optimisers and learning-rate schedules from config (thin layer over optax)."""

from __future__ import annotations

from typing import Any, Mapping

import optax

from kdjax._checks import check_choice, check_nonnegative, check_positive

__all__ = ["make_optimizer", "OPTIMIZERS", "SCHEDULES"]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")


def make_schedule(cfg: Mapping[str, Any], total_steps: int, steps_per_epoch: int):
    """``constant``, ``cosine`` (to 0 over training, optional linear warm-up) or ``step``
    (multiply by ``decay_factor`` at each epoch in ``decay_epochs``, RepDistiller's
    150/180/210 x 0.1)."""
    lr = cfg["learning_rate"]
    check_positive(lr, "optimizer.learning_rate")
    kind = cfg.get("schedule", "cosine")
    check_choice(kind, "optimizer.schedule", SCHEDULES)
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


def make_optimizer(cfg: Mapping[str, Any], *, total_steps: int, steps_per_epoch: int):
    """optax optimiser from ``cfg``: ``name`` in ``sgd`` (momentum, nesterov), ``adam``,
    ``adamw``; ``weight_decay`` (coupled L2 for sgd/adam as in the reference KD code,
    decoupled for adamw); ``grad_clip`` (global norm, 0 = off)."""
    name = cfg.get("name", "sgd")
    check_choice(name, "optimizer.name", OPTIMIZERS)
    wd = cfg.get("weight_decay", 0.0)
    check_nonnegative(wd, "optimizer.weight_decay")
    sched = make_schedule(cfg, total_steps, steps_per_epoch)
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
