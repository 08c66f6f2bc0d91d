"""Flax models that return ``(logits, features)``; :func:`create` builds one by name.

Named architectures (``create(name, num_classes=...)``):

=================  ==========================================================
``mlp``            :class:`MLP` (``hidden`` option)
``cnn1d``          :class:`CNN1D` (``channels``, ``kernel_size``, ``use_bn``, ``mixstyle``)
``cnn2d``          :class:`CNN2D` (``channels``, ``use_bn``, ``mixstyle``)
``resnet{d}``      CIFAR ResNet, depth ``d`` in 8, 14, 20, 32, 44, 56, 110
``resnet{d}x4``    RepDistiller's 4x-wide variants (``resnet8x4``, ``resnet32x4``)
``wrn_{d}_{k}``    Wide ResNet (``wrn_40_2``, ``wrn_16_2``, ...)
``tv_resnet{d}``   torchvision's ImageNet ResNet, ``d`` in 18, 34, 50
                   (:mod:`kdjax.models.torchvision`; weights: :mod:`kdjax.models.convert`)
=================  ==========================================================
"""

from __future__ import annotations

import re

from kdjax.models.capture import available_paths, with_features
from kdjax.models.mixstyle import MixStyle, mix_statistics
from kdjax.models.nets import CNN1D, CNN2D, MLP
from kdjax.models.resnet import ResNet, WideResNet
from kdjax.models.torchvision import TorchvisionResNet
from kdjax.models.wrap import FromNNX, Wrapped, from_nnx, wrap, wrap_variables

__all__ = ["MLP", "CNN1D", "CNN2D", "ResNet", "WideResNet", "TorchvisionResNet", "create",
           "check_name", "names", "with_features", "available_paths", "wrap", "from_nnx",
           "wrap_variables", "Wrapped", "FromNNX", "MixStyle", "mix_statistics"]

_SIMPLE = {"mlp": MLP, "cnn1d": CNN1D, "cnn2d": CNN2D}


def names() -> list[str]:
    """Valid architecture names (patterns for the ResNet families)."""
    return sorted(_SIMPLE) + ["resnet{6n+2}", "resnet{6n+2}x4", "wrn_{6n+4}_{k}",
                           "tv_resnet18", "tv_resnet34", "tv_resnet50"]


def check_name(name: str, key: str = "model") -> None:
    """Raises ``ValueError`` naming the config ``key``, the valid names and ``name``
    unless ``name`` is a valid architecture name; builds nothing, so drivers call it on
    every model of a config before any training (``resnet999`` fails at once)."""
    if not isinstance(name, str):
        raise ValueError(f"{key} must be a model name (str), one of {names()}; got "
                         f"{name!r} ({type(name).__name__}).")
    if name in _SIMPLE or re.fullmatch(r"tv_resnet(18|34|50)", name):
        return
    m = re.fullmatch(r"resnet(\d+)(x4)?", name)
    if m:
        depth = int(m.group(1))
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"{key}: ResNet depth must be 6n+2 >= 8 (8, 14, 20, 32, ...), "
                             f"got {depth} in {name!r}.")
        return
    m = re.fullmatch(r"wrn_(\d+)_(\d+)", name)
    if m:
        depth = int(m.group(1))
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"{key}: WideResNet depth must be 6n+4 >= 10 (10, 16, 28, 40, "
                             f"...), got {depth} in {name!r}.")
        if int(m.group(2)) < 1:
            raise ValueError(f"{key}: WideResNet widen factor must be >= 1, got "
                             f"{m.group(2)} in {name!r}.")
        return
    raise ValueError(f"{key}: unknown model {name!r}; valid models: {names()}.")


def create(name: str, num_classes: int, **kwargs):
    """Builds a model by name; unknown names or options raise ``ValueError``."""
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}.")
    check_name(name)
    try:
        if name in _SIMPLE:
            return _SIMPLE[name](num_classes=num_classes, **kwargs)
        m = re.fullmatch(r"resnet(\d+)(x4)?", name)
        if m:
            widths = (32, 64, 128, 256) if m.group(2) else (16, 16, 32, 64)
            return ResNet(num_classes=num_classes, depth=int(m.group(1)),
                          widths=kwargs.pop("widths", widths), **kwargs)
        m = re.fullmatch(r"tv_resnet(18|34|50)", name)
        if m:
            return TorchvisionResNet(num_classes=num_classes, depth=int(m.group(1)), **kwargs)
        m = re.fullmatch(r"wrn_(\d+)_(\d+)", name)
        if m:
            return WideResNet(num_classes=num_classes, depth=int(m.group(1)),
                              widen=int(m.group(2)), **kwargs)
    except TypeError as e:
        raise ValueError(f"bad option for model {name!r}: {e}") from None
    raise AssertionError(f"check_name accepted {name!r} but create cannot build it")
