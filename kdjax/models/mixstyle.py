"""MixStyle: mixing instance-level feature statistics between training examples.

Zhou, Yang, Qiao and Xiang, "Domain Generalization with MixStyle", ICLR 2021, Eq. (4)-(5);
reference code ``KaiyangZhou/mixstyle-release`` (``MixStyle``, ``mix="random"``). For a
feature map ``x`` ``[B, *spatial, C]`` with per-example, per-channel statistics over the
spatial axes

    mu_i = mean(x_i),   sigma_i = sqrt(var(x_i) + eps)        (var unbiased, as torch)

and a batch permutation ``perm`` with ``lambda_i ~ Beta(alpha, alpha)``:

    gamma_mix = lambda_i sigma_i + (1 - lambda_i) sigma_perm(i)
    beta_mix  = lambda_i mu_i    + (1 - lambda_i) mu_perm(i)
    MixStyle(x)_i = gamma_mix * (x_i - mu_i) / sigma_i + beta_mix.

``mu`` and ``sigma`` are held constant for the gradient (the reference ``detach``es
them). The module acts in training only and then, with probability ``p``, on the whole
batch (one coin per call, as the reference); otherwise it is the identity. Reference
defaults: ``p = 0.5``, ``alpha = 0.1``, ``eps = 1e-6``, placed after the first two of
ResNet's four stages. Deviation: only the ``"random"`` mixing (a permutation of the
whole batch) is implemented; the reference's ``"crossdomain"`` variant needs the batch
split by domain, which a module does not see.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["MixStyle", "mix_statistics"]


def mix_statistics(x, lam, perm, eps: float = 1e-6):
    """MixStyle's map for given draws: ``x`` ``[B, *spatial, C]``, ``lam`` ``[B]`` in
    [0, 1], ``perm`` ``[B]`` a permutation of the batch (formula in the module doc)."""
    if x.ndim < 3:
        raise ValueError(f"mix_statistics: x must be [B, *spatial, C] with at least one "
                         f"spatial axis, got shape {x.shape}.")
    axes = tuple(range(1, x.ndim - 1))
    n = math.prod(x.shape[a] for a in axes)
    for name, v in (("lam", lam), ("perm", perm)):
        if jnp.shape(v) != x.shape[:1]:
            raise ValueError(f"mix_statistics: {name} must have shape ({x.shape[0]},) (one "
                             f"per example of x {x.shape}), got {jnp.shape(v)}.")
    if n < 2:
        raise ValueError(f"mix_statistics: the spatial axes of x must hold at least 2 "
                         f"positions for a variance, got shape {x.shape}.")
    mu = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.sum(jnp.square(x - mu), axis=axes, keepdims=True) / (n - 1)
    sig = jnp.sqrt(var + eps)
    mu, sig = jax.lax.stop_gradient(mu), jax.lax.stop_gradient(sig)
    lam = jnp.reshape(lam, (-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
    mu_mix = lam * mu + (1 - lam) * mu[perm]
    sig_mix = lam * sig + (1 - lam) * sig[perm]
    return (x - mu) / sig * sig_mix + mu_mix


class MixStyle(nn.Module):
    """MixStyle layer (module doc); ``__call__(x, train)``. Draws from the rng stream
    ``rng_collection`` (default ``"dropout"``, the stream the kdjax engine passes to a
    student in training, like ``flax.linen.Dropout``)."""

    p: float = 0.5
    alpha: float = 0.1
    eps: float = 1e-6
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, x, train: bool = False):
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"MixStyle: p must be in [0, 1], got {self.p!r}.")
        if not self.alpha > 0:
            raise ValueError(f"MixStyle: alpha must be > 0, got {self.alpha!r}.")
        if not train or self.p == 0.0:
            return x
        k_apply, k_lam, k_perm = jax.random.split(self.make_rng(self.rng_collection), 3)
        b = x.shape[0]
        lam = jax.random.beta(k_lam, self.alpha, self.alpha, (b,))
        perm = jax.random.permutation(k_perm, b)
        mixed = mix_statistics(x, lam, perm, self.eps)
        return jnp.where(jax.random.uniform(k_apply) < self.p, mixed, x)
