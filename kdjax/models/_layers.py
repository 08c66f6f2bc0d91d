"""Pieces shared by the ResNet families of :mod:`kdjax.models` (private).

Called inside a parent's ``@nn.compact`` method, so the submodules they create belong
to that parent under the names given: the parameter trees are those of the callers.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp


def batch_norm(train: bool, dtype, name: str) -> nn.BatchNorm:
    """``nn.BatchNorm`` with torch's defaults (``momentum=0.9`` in Flax's convention,
    ``epsilon=1e-5``); running averages unless ``train``."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        dtype=dtype, name=name)


def residual_stages(h, train: bool, block: Callable[..., nn.Module],
                    plan: Sequence[tuple[int, int]], dtype, name: str):
    """Runs the residual stages of a ResNet; returns ``(h, {"stage1": ..., ...})``.

    ``plan`` lists ``(channels, blocks)`` per stage; stage ``s`` (from 1) is ``blocks``
    modules ``block(channels, stride, dtype, name=name.format(s=s, b=b))`` applied as
    ``(h, train)``, the first of every stage after the first with stride 2 (He et al.
    2016). ``features["stage{s}"]`` is the output of stage ``s``.
    """
    features = {}
    for s, (channels, n) in enumerate(plan, start=1):
        for b in range(n):
            stride = 2 if (s > 1 and b == 0) else 1
            h = block(channels, stride, dtype, name=name.format(s=s, b=b))(h, train)
        features[f"stage{s}"] = h
    return h, features


def pooled_logits(h, features: dict, num_classes: int, dtype, name: str):
    """Global average pool of ``h`` ``[B, H, W, C]`` (stored as ``features["pooled"]``)
    followed by the ``nn.Dense`` head ``name``; returns the logits."""
    pooled = jnp.mean(h, axis=(1, 2))
    features["pooled"] = pooled
    return nn.Dense(num_classes, dtype=dtype, name=name)(pooled)
