"""CIFAR-style ResNets and Wide ResNets with width/depth knobs (Flax linen).

The family used by the KD reference tables (RepDistiller, CRD paper):

* ``ResNet(depth=6n+2, widths=(w0, w1, w2, w3))``: stem ``Conv3x3(w0)``, then three
  stages of ``n`` basic blocks with ``w1, w2, w3`` channels and strides 1, 2, 2
  (He et al. 2016, CIFAR variant). ``resnet8..resnet110`` use widths
  ``(16, 16, 32, 64)``; ``resnet8x4``/``resnet32x4`` use ``(32, 64, 128, 256)``, as
  RepDistiller's ``resnet8x4``/``resnet32x4``.
* ``WideResNet(depth=6n+4, widen=k)``: pre-activation blocks with widths
  ``(16, 16k, 32k, 64k)`` (Zagoruyko & Komodakis 2016); ``wrn_40_2``, ``wrn_16_2``.

Features: ``"stem"``, ``"stage1".."stage3"`` (block outputs, post-ReLU for ResNet and
pre-activation outputs for WRN, as RepDistiller's ``is_feat`` hooks return), and
``"pooled"``. ``train=False`` uses BatchNorm running averages.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models._layers import batch_norm as _bn
from kdjax.models._layers import pooled_logits, residual_stages

__all__ = ["ResNet", "WideResNet"]


def _conv(channels: int, kernel: int, stride: int, dtype, name: str) -> nn.Conv:
    """Bias-free ``kernel x kernel`` convolution with ``"SAME"`` padding."""
    return nn.Conv(channels, (kernel, kernel), (stride, stride), padding="SAME",
                   use_bias=False, dtype=dtype, name=name)


class BasicBlock(nn.Module):
    """``conv3x3-BN-ReLU-conv3x3-BN`` + shortcut (1x1 conv + BN when shapes change)."""

    channels: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        c, s, dt = self.channels, self.stride, self.dtype
        h = nn.relu(_bn(train, dt, "bn1")(_conv(c, 3, s, dt, "conv1")(x)))
        h = _bn(train, dt, "bn2")(_conv(c, 3, 1, dt, "conv2")(h))
        if s != 1 or x.shape[-1] != c:
            x = _bn(train, dt, "bn_sc")(_conv(c, 1, s, dt, "conv_sc")(x))
        return nn.relu(h + x)


class ResNet(nn.Module):
    """CIFAR ResNet of depth ``6n + 2`` (basic blocks)."""

    num_classes: int
    depth: int = 20
    widths: Sequence[int] = (16, 16, 32, 64)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if (self.depth - 2) % 6 != 0 or self.depth < 8:
            raise ValueError(f"ResNet depth must be 6n+2 >= 8, got {self.depth}.")
        if len(self.widths) != 4:
            raise ValueError(f"ResNet widths must have 4 entries (stem + 3 stages), "
                             f"got {tuple(self.widths)}.")
        n = (self.depth - 2) // 6
        h = _conv(self.widths[0], 3, 1, self.dtype, "stem_conv")(x.astype(self.dtype))
        stem = nn.relu(_bn(train, self.dtype, "stem_bn")(h))
        h, stages = residual_stages(stem, train, BasicBlock,
                                    [(w, n) for w in self.widths[1:]], self.dtype,
                                    "stage{s}_block{b}")
        features = {"stem": stem, **stages}
        logits = pooled_logits(h, features, self.num_classes, self.dtype, "head")
        return logits, features


class WideBlock(nn.Module):
    """Pre-activation wide block: ``BN-ReLU-conv3x3-BN-ReLU-conv3x3`` + shortcut."""

    channels: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        c, s, dt = self.channels, self.stride, self.dtype
        o = nn.relu(_bn(train, dt, "bn1")(x))
        h = _conv(c, 3, s, dt, "conv1")(o)
        h = _conv(c, 3, 1, dt, "conv2")(nn.relu(_bn(train, dt, "bn2")(h)))
        if s != 1 or x.shape[-1] != c:
            x = _conv(c, 1, s, dt, "conv_sc")(o)
        return h + x


class WideResNet(nn.Module):
    """Wide ResNet WRN-``depth``-``widen`` (``depth = 6n + 4``)."""

    num_classes: int
    depth: int = 16
    widen: int = 2
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if (self.depth - 4) % 6 != 0 or self.depth < 10:
            raise ValueError(f"WideResNet depth must be 6n+4 >= 10, got {self.depth}.")
        n = (self.depth - 4) // 6
        widths = (16, 16 * self.widen, 32 * self.widen, 64 * self.widen)
        stem = _conv(widths[0], 3, 1, self.dtype, "stem_conv")(x.astype(self.dtype))
        h, stages = residual_stages(stem, train, WideBlock, [(w, n) for w in widths[1:]],
                                    self.dtype, "stage{s}_block{b}")
        features = {"stem": stem, **stages}
        h = nn.relu(_bn(train, self.dtype, "final_bn")(h))
        logits = pooled_logits(h, features, self.num_classes, self.dtype, "head")
        return logits, features
