"""Trainable adapters of the classic KD methods (Flax linen).

Each adapter maps a (channels-last) feature to what its loss compares: ``[B, D]``
vectors use ``Dense``, ``[B, L, C]`` and ``[B, H, W, C]`` maps use 1-D/2-D convolutions.
Input sizes are inferred by Flax from the first call; output sizes are attributes.
Their parameters live next to the student's and are trained with it (see
:mod:`kdjax.methods.zoo`).

Deliberate deviation from RepDistiller: no BatchNorm inside adapters (RepDistiller's
``ConvReg``/AB connector/paraphraser use BN); adapters here are stateless, so a method's
parameters are one plain pytree and the losses stay pure. This changes the optimisation
path of the adapter, not the loss definitions.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "Pointwise",
    "Regressor",
    "VIDHead",
    "vid_log_scale_init",
    "Embed",
    "Paraphraser",
    "Translator",
    "ABConnector",
    "ABF",
]


def _check_feature(x, name):
    if x.ndim not in (2, 3, 4):
        raise ValueError(f"{name} must be [B, D], [B, L, C] or [B, H, W, C], got shape "
                         f"{x.shape}.")


def _layer(features: int, ndim: int, kernel: int = 1, name: str | None = None):
    """Dense for ``[B, D]``; a ``kernel``-sized 'SAME' convolution for 3-D/4-D maps."""
    if ndim == 2:
        return nn.Dense(features, name=name)
    return nn.Conv(features, (kernel,) * (ndim - 2), padding="SAME", name=name)


class Pointwise(nn.Module):
    """A 1x1 convolution (or ``Dense`` on vectors) to ``features`` channels."""

    features: int

    @nn.compact
    def __call__(self, x):
        _check_feature(x, "x")
        return _layer(self.features, x.ndim)(x)


class Regressor(nn.Module):
    """FitNet regressor ``r(f^S)``: 1x1 conv / dense to the teacher's channel count.

    RepDistiller's ``ConvReg`` is conv + BN + ReLU; kdjax uses the linear map (the paper's
    regressor is a conv layer; see the module note on BN).
    """

    features: int

    @nn.compact
    def __call__(self, x):
        _check_feature(x, "student feature")
        return _layer(self.features, x.ndim)(x.astype(jnp.float32))


def vid_log_scale_init(init_variance: float = 5.0, eps: float = 1e-5):
    """Initialiser setting ``softplus(a) + eps = init_variance`` (RepDistiller: 5.0)."""
    value = math.log(math.expm1(init_variance - eps))

    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.full(shape, value, dtype)

    return init


class VIDHead(nn.Module):
    """VID mean regressor (1x1 conv -> ReLU -> 1x1 conv -> ReLU -> 1x1 conv) + variances.

    Returns ``(mean, log_scale)`` with ``log_scale`` the ``[features]`` raw variance
    parameters for :func:`kdjax.losses.vid` (RepDistiller ``VIDLoss``: mid channels =
    teacher channels, initial variance 5).
    """

    features: int
    mid_features: int | None = None
    init_variance: float = 5.0
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        _check_feature(x, "student feature")
        mid = self.mid_features or self.features
        h = x.astype(jnp.float32)
        h = nn.relu(_layer(mid, x.ndim)(h))
        h = nn.relu(_layer(mid, x.ndim)(h))
        mean = _layer(self.features, x.ndim)(h)
        log_scale = self.param("log_scale", vid_log_scale_init(self.init_variance, self.eps),
                               (self.features,))
        return mean, log_scale


class Embed(nn.Module):
    """CRD/CC embedding head: flatten, linear to ``dim``, L2-normalise (RepDistiller)."""

    dim: int = 128

    @nn.compact
    def __call__(self, x):
        h = x.astype(jnp.float32).reshape(x.shape[0], -1)
        h = nn.Dense(self.dim)(h)
        sq = jnp.sum(h * h, axis=-1, keepdims=True)
        ok = sq > 1e-24
        return h / jnp.where(ok, jnp.sqrt(jnp.where(ok, sq, 1.0)), 1e-12)


def _conv_stack(x, channels: Sequence[int], negative_slope: float = 0.1):
    for c in channels:
        x = nn.leaky_relu(_layer(c, x.ndim, kernel=3)(x), negative_slope)
    return x


class Paraphraser(nn.Module):
    """FT paraphraser on teacher features: encoder -> factor, decoder -> reconstruction.

    Encoder: 3x3 convs ``C -> C -> kC -> kC`` with LeakyReLU(0.1); decoder mirrors it back
    to ``C`` (RepDistiller ``Paraphraser``, ``k = 0.5``, without BN; stride-1 'SAME'
    transposed convolutions are written as convolutions, which is the same family of
    maps). Returns ``(factor, reconstruction)``.
    """

    rate: float = 0.5

    @nn.compact
    def __call__(self, x):
        _check_feature(x, "teacher feature")
        c = x.shape[-1]
        k = max(1, int(round(c * self.rate)))
        x = x.astype(jnp.float32)
        factor = _conv_stack(x, (c, k, k))
        recon = _conv_stack(factor, (k, c, c))
        return factor, recon


class Translator(nn.Module):
    """FT translator on student features: 3x3 convs ``C_s -> C_s -> kC_t -> kC_t``."""

    teacher_channels: int
    rate: float = 0.5

    @nn.compact
    def __call__(self, x):
        _check_feature(x, "student feature")
        k = max(1, int(round(self.teacher_channels * self.rate)))
        return _conv_stack(x.astype(jnp.float32), (x.shape[-1], k, k))


class ABConnector(nn.Module):
    """AB connector: 1x1 conv / dense from student to teacher channels (pre-activation)."""

    features: int

    @nn.compact
    def __call__(self, x):
        _check_feature(x, "student feature")
        return _layer(self.features, x.ndim)(x.astype(jnp.float32))


def _resize_nearest(x, spatial):
    """Nearest-neighbour resize of channels-last ``x`` to ``spatial`` (``F.interpolate``)."""
    if tuple(x.shape[1:-1]) == tuple(spatial):
        return x
    return jax.image.resize(x, (x.shape[0], *spatial, x.shape[-1]), method="nearest")


class ABF(nn.Module):
    """ReviewKD's attention-based fusion (ABF, Chen et al. CVPR 2021, Fig. 3(b)).

    ``x`` (a student stage, ``[B, *S, C_in]``) goes through a 1x1 conv to
    ``mid_features``; with ``fuse`` the residual ``y`` coming from the deeper level
    (``[B, *S', mid]``, resized to ``S`` by nearest neighbour) is mixed in with two
    attention maps ``a = sigmoid(conv1x1([x, y]))`` (2 channels):
    ``x <- x * a_0 + y * a_1``. The result is resized (nearest) to ``out_spatial`` (the
    teacher stage's size) and a 3x3 conv maps it to ``out_features`` (the teacher's
    channels). Returns ``(out, x)``: the map compared with the teacher by
    :func:`kdjax.losses.hcl`, and the fused ``mid`` map passed to the next, shallower
    level. As the reference (``dvlab-research/ReviewKD``, ``ABF``), the convolutions
    have no bias, but without its BatchNorms (see the module docstring). Works on 1-D
    ``[B, L, C]`` and 2-D maps.
    """

    mid_features: int
    out_features: int
    fuse: bool

    @nn.compact
    def __call__(self, x, y=None, out_spatial=None):
        if x.ndim not in (3, 4):
            raise ValueError(f"x must be [B, L, C] or [B, H, W, C], got shape {x.shape}.")
        if self.fuse and y is None:
            raise ValueError("ABF(fuse=True) needs the residual y of the deeper level.")
        k = x.ndim - 2
        x = nn.Conv(self.mid_features, (1,) * k, use_bias=False, name="conv1")(x)
        if self.fuse:
            y = _resize_nearest(y, x.shape[1:-1])
            z = nn.sigmoid(nn.Conv(2, (1,) * k, name="att_conv")(
                jnp.concatenate([x, y], axis=-1)))
            x = x * z[..., :1] + y * z[..., 1:]
        if out_spatial is not None:
            x = _resize_nearest(x, out_spatial)
        out = nn.Conv(self.out_features, (3,) * k, padding="SAME", use_bias=False,
                      name="conv2")(x)
        return out, x
