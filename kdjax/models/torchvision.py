"""ImageNet ResNets with torchvision's architecture (Flax linen), for pretrained weights.

``TorchvisionResNet(depth=18 | 34 | 50)`` is ``torchvision.models.resnet{18,34,50}``
layer for layer (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016,
Table 1), so that a torchvision state dict converts to its variables one to one
(:mod:`kdjax.models.convert`):

* stem: ``conv1`` 7x7 stride 2 padding 3 (no bias), ``bn1``, ReLU, max-pool 3x3 stride 2
  padding 1 (padded with -inf, as ``nn.MaxPool2d``);
* ``layer1..layer4`` with 64, 128, 256, 512 base channels and strides 1, 2, 2, 2;
  blocks ``BasicBlock`` (18: 2-2-2-2, 34: 3-4-6-3) or ``Bottleneck`` (50: 3-4-6-3,
  expansion 4, the stride on the 3x3 conv: torchvision's "ResNet v1.5");
* ``downsample`` = 1x1 conv (stride) + BN on the first block of a stage whenever the
  shape changes; global average pool; ``fc``.

Every convolution pads explicitly and symmetrically like PyTorch (``padding=k // 2``),
not ``"SAME"``, which pads stride-2 layers asymmetrically and would shift every feature
map by one pixel relative to the torch model.

BatchNorm: ``epsilon=1e-5`` and ``momentum=0.9`` (torch's ``momentum=0.1`` is the weight
of the *new* batch). Deliberate deviation: in train mode torch updates ``running_var``
with the *unbiased* batch variance (``n / (n - 1)`` times the biased one it normalises
with), Flax's ``nn.BatchNorm`` with the biased one; the forward outputs are identical
(both normalise with the biased variance) and the running variances differ by that
factor in the ``0.1``-weighted update term (``tests/models/test_torchvision.py``
checks both statements).

Inputs are channels-last ``[B, H, W, 3]``; torchvision's pretrained weights expect RGB in
[0, 1] normalised with ``IMAGENET_MEAN`` / ``IMAGENET_STD``. Features: ``"stem"`` (after
the max-pool), ``"stage1".."stage4"`` (outputs of ``layer1..layer4``) and ``"pooled"``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models._layers import batch_norm as _bn
from kdjax.models._layers import pooled_logits, residual_stages

__all__ = ["TorchvisionResNet", "TORCHVISION_DEPTHS", "IMAGENET_MEAN", "IMAGENET_STD"]

# depth -> (block kind, blocks per stage)
TORCHVISION_DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
                      50: ("bottleneck", (3, 4, 6, 3))}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _conv(features: int, kernel: int, stride: int, dtype, name: str) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), (stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype, name=name)


class _Basic(nn.Module):
    """torchvision ``BasicBlock``: ``3x3-BN-ReLU-3x3-BN`` + identity or downsample."""

    planes: int
    stride: int
    dtype: jnp.dtype = jnp.float32
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.relu(_bn(train, self.dtype, "bn1")(
            _conv(self.planes, 3, self.stride, self.dtype, "conv1")(x)))
        h = _bn(train, self.dtype, "bn2")(_conv(self.planes, 3, 1, self.dtype, "conv2")(h))
        return nn.relu(h + _shortcut(self, x, train))


class _Bottleneck(nn.Module):
    """torchvision ``Bottleneck`` (v1.5): ``1x1-BN-ReLU-3x3(stride)-BN-ReLU-1x1-BN``."""

    planes: int
    stride: int
    dtype: jnp.dtype = jnp.float32
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.relu(_bn(train, self.dtype, "bn1")(
            _conv(self.planes, 1, 1, self.dtype, "conv1")(x)))
        h = nn.relu(_bn(train, self.dtype, "bn2")(
            _conv(self.planes, 3, self.stride, self.dtype, "conv2")(h)))
        h = _bn(train, self.dtype, "bn3")(
            _conv(self.planes * 4, 1, 1, self.dtype, "conv3")(h))
        return nn.relu(h + _shortcut(self, x, train))


def _shortcut(block, x, train):
    out = block.planes * block.expansion
    if block.stride == 1 and x.shape[-1] == out:
        return x
    h = _conv(out, 1, block.stride, block.dtype, "downsample_conv")(x)
    return _bn(train, block.dtype, "downsample_bn")(h)


class TorchvisionResNet(nn.Module):
    """``torchvision.models.resnet{depth}`` in Flax; returns ``(logits, features)``.

    Module names follow the torch state dict (``conv1``, ``bn1``, ``layer{s}_{b}`` with
    ``conv1..3``/``bn1..3``/``downsample_conv``/``downsample_bn``, ``fc``), which is
    what :func:`kdjax.models.convert.torchvision_to_flax` maps.
    """

    num_classes: int = 1000
    depth: int = 18
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.depth not in TORCHVISION_DEPTHS:
            raise ValueError(f"depth must be one of {sorted(TORCHVISION_DEPTHS)}, "
                             f"got {self.depth!r}.")
        if x.ndim != 4:
            raise ValueError(f"x must be [B, H, W, C] images, got shape {x.shape}.")
        kind, counts = TORCHVISION_DEPTHS[self.depth]
        block = _Basic if kind == "basic" else _Bottleneck
        h = _conv(64, 7, 2, self.dtype, "conv1")(x.astype(self.dtype))
        h = nn.relu(_bn(train, self.dtype, "bn1")(h))
        stem = nn.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        h, stages = residual_stages(stem, train, block, list(zip((64, 128, 256, 512), counts)),
                                    self.dtype, "layer{s}_{b}")
        features = {"stem": stem, **stages}
        logits = pooled_logits(h, features, self.num_classes, self.dtype, "fc")
        return logits, features
