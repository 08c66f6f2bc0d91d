"""Small Flax (linen) networks that return ``(logits, features)``.

Every model here is called as ``model.apply(variables, x, train=bool)`` and returns
``(logits, features)`` where ``features`` is a dict of named, channels-last stage
outputs plus ``"pooled"``, the embedding that feeds the classifier. Models with
BatchNorm keep running statistics in the ``batch_stats`` collection and use them when
``train=False`` (teachers always run with ``train=False``).

Inputs are channels-last: ``(B, L, C)`` for 1-D signals (a ``(B, L)`` input is given a
channel axis), ``(B, H, W, C)`` for images; the MLP flattens whatever it gets.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models.mixstyle import MixStyle

__all__ = ["MLP", "CNN1D", "CNN2D"]


def _norm(use_bn: bool, train: bool, dtype):
    if use_bn:
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=dtype)
    return lambda x: x


def _mixstyle_after(stages: Sequence[int], num_stages: int, model: str) -> frozenset:
    """Checks ``mixstyle`` (stage indices, from 1, each followed by a :class:`MixStyle`
    layer in training; never after the last stage, whose output feeds the head)."""
    valid = list(range(1, num_stages))
    if any(not isinstance(s, int) or s not in valid for s in stages):
        raise ValueError(f"{model}: mixstyle must list stage indices in {valid} (a MixStyle "
                         f"layer after each; not after the last stage), got {list(stages)}.")
    return frozenset(stages)


def _conv_stages(net, h, kernel: tuple, train: bool):
    """The stages and head of :class:`CNN1D` / :class:`CNN2D` (called in ``net``'s
    compact ``__call__``, so the submodules are ``net``'s): per stage ``i``
    ``conv{i} -> [BN] -> ReLU`` (``features["stage{i}"]``), a MixStyle layer where
    ``net.mixstyle`` asks, average pooling by 2 except after the last; global average
    pooling (``"pooled"``) and the ``head``. Returns ``(logits, features)``."""
    features, n = {}, len(net.channels)
    mix = _mixstyle_after(net.mixstyle, n, type(net).__name__)
    for i, ch in enumerate(net.channels, start=1):
        h = nn.Conv(ch, kernel, padding="SAME", use_bias=not net.use_bn, dtype=net.dtype,
                    name=f"conv{i}")(h)
        h = nn.relu(_norm(net.use_bn, train, net.dtype)(h))
        features[f"stage{i}"] = h
        if i in mix:
            h = MixStyle(name=f"mixstyle{i}")(h, train)
        if i < n:
            h = nn.avg_pool(h, (2,) * len(kernel), strides=(2,) * len(kernel))
    features["pooled"] = jnp.mean(h, axis=tuple(range(1, h.ndim - 1)))
    logits = nn.Dense(net.num_classes, dtype=net.dtype, name="head")(features["pooled"])
    return logits, features


class MLP(nn.Module):
    """Multi-layer perceptron: ``Dense -> ReLU`` per hidden layer, then a classifier.

    Features: ``"layer{i}"`` (post-activation, ``i`` from 1) and ``"pooled"`` (the last
    hidden layer).
    """

    num_classes: int
    hidden: Sequence[int] = (256, 256)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = x.reshape((x.shape[0], -1)).astype(self.dtype)
        features = {}
        for i, width in enumerate(self.hidden, start=1):
            h = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"dense{i}")(h))
            features[f"layer{i}"] = h
        features["pooled"] = h
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(h)
        return logits, features


class CNN1D(nn.Module):
    """1-D CNN for MNIST-1D style signals ``(B, L)`` or ``(B, L, C)``.

    Each stage: ``Conv(k) -> [BN] -> ReLU`` then, except the last, ``avg_pool(2)``;
    ``mixstyle`` lists the stages followed by a :class:`~kdjax.models.mixstyle.MixStyle`
    layer in training (the features are the stage outputs before mixing).
    The embedding is global average pooling over positions. Features ``"stage{i}"``
    (``(B, L_i, C_i)``) and ``"pooled"`` (``(B, C_last)``).
    """

    num_classes: int
    channels: Sequence[int] = (32, 64, 128)
    kernel_size: int = 5
    use_bn: bool = True
    mixstyle: Sequence[int] = ()
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = x[..., None] if x.ndim == 2 else x
        return _conv_stages(self, h.astype(self.dtype), (self.kernel_size,), train)


class CNN2D(nn.Module):
    """Small 2-D CNN for digits/MNIST-size images ``(B, H, W, C)``.

    Each stage: ``Conv3x3 -> [BN] -> ReLU`` and, except the last, ``avg_pool(2x2)``
    (``mixstyle``: stages followed by a MixStyle layer in training, as in CNN1D);
    global average pooling gives ``"pooled"``. Features ``"stage{i}"`` ``(B, H_i, W_i,
    C_i)`` and ``"pooled"``.
    """

    num_classes: int
    channels: Sequence[int] = (32, 64)
    use_bn: bool = True
    mixstyle: Sequence[int] = ()
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        return _conv_stages(self, x.astype(self.dtype), (3, 3), train)
