"""Jittable batch augmentations with an explicit PRNG key.

Every function takes ``key`` first and a batch ``x`` (channels-last: ``[B, H, W, C]``
images or ``[B, L, C]`` signals), keeps static shapes (masks and ``jnp.where`` instead
of data-dependent slicing), and works under ``jit`` and ``vmap``. Randomness is drawn
per example from ``key`` only, so the same key gives the same output.

* :func:`random_crop` (pad + crop) and :func:`random_flip` for images: the standard
  CIFAR augmentation (He et al. 2016, ResNet, Sec. 4.2).
* :func:`random_shift` (zero-padded translation) for 1-D signals, :func:`gaussian_noise`.
* :func:`mixup` (Zhang et al. 2018) and :func:`cutmix` (Yun et al. 2019): return the
  mixed inputs and ``(y_a, y_b, lam)``; the loss is ``lam * l(y_a) + (1 - lam) * l(y_b)``.
* :func:`domain_mix`: mixup whose partners come from other source domains
  (``batch["domain"]``).
* :func:`rand_augment`: a RandAugment-lite policy (Cubuk et al. 2020): ``num_ops``
  operations, each chosen uniformly per example among a few shape-agnostic ops, with one
  global ``magnitude``.
* :func:`get_augmentation`: a name -> ``fn(key, batch_dict) -> batch_dict``.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable

import jax
import jax.numpy as jnp

from kdjax._checks import check_choice, check_float_array, check_in_range, check_positive

__all__ = [
    "flip_horizontal",
    "random_flip",
    "random_crop",
    "random_shift",
    "gaussian_noise",
    "mixup",
    "cutmix",
    "domain_mix",
    "rand_augment",
    "get_augmentation",
    "AUGMENTATIONS",
]


def _check_images(x, name="x"):
    check_float_array(x, name, ndim=4)


def _check_key(key):
    if not hasattr(key, "dtype") or not (
            jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
            or (key.dtype == jnp.uint32 and key.shape[-1:] == (2,))):
        raise TypeError("key must be a JAX PRNG key (jax.random.key or PRNGKey), got "
                        f"{getattr(key, 'dtype', type(key).__name__)}.")


def _check_same_batch(x, y):
    """Raises ``ValueError`` unless the labels ``y`` have the batch size of ``x``."""
    if y.shape[:1] != x.shape[:1]:
        raise ValueError(f"x and y must have the same batch size, got {x.shape} and "
                         f"{y.shape}.")


def _check_int(value, name, low=0):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")


def flip_horizontal(x: jax.Array) -> jax.Array:
    """Mirrors images ``[B, H, W, C]`` along the width axis (an involution)."""
    _check_images(x)
    return x[:, :, ::-1, :]


def random_flip(key: jax.Array, x: jax.Array, p: float = 0.5) -> jax.Array:
    """Flips each image horizontally with probability ``p``."""
    _check_key(key)
    _check_images(x)
    check_in_range(p, "p", 0.0, 1.0)
    flip = jax.random.bernoulli(key, p, (x.shape[0], 1, 1, 1))
    return jnp.where(flip, x[:, :, ::-1, :], x)


@functools.partial(jax.jit, static_argnums=(2,))
def _pad_and_crop(key, x, pads: tuple[int, ...]):
    """Zero-pads each spatial axis i by pads[i] on both sides, crops a random window."""
    spatial = x.shape[1:-1]
    padded = jnp.pad(x, [(0, 0)] + [(p, p) for p in pads] + [(0, 0)])
    offsets = jnp.stack([jax.random.randint(k, (x.shape[0],), 0, 2 * p + 1)
                         for k, p in zip(jax.random.split(key, len(pads)), pads)], axis=1)

    def crop_one(img, off):
        start = tuple(off) + (jnp.zeros((), off.dtype),)
        return jax.lax.dynamic_slice(img, start, spatial + x.shape[-1:])

    return jax.vmap(crop_one)(padded, offsets)


def random_crop(key: jax.Array, x: jax.Array, padding: int = 4) -> jax.Array:
    """Pads images ``[B, H, W, C]`` with ``padding`` zeros per side, crops ``H x W``.

    The CIFAR recipe (He et al. 2016) with ``padding=4``; zero is the mean of a
    normalised image.
    """
    _check_key(key)
    _check_images(x)
    _check_int(padding, "padding")
    return _pad_and_crop(key, x, (padding, padding))


def random_shift(key: jax.Array, x: jax.Array, max_shift: int = 4) -> jax.Array:
    """Translates each signal ``[B, L, C]`` by an integer in ``[-max_shift, max_shift]``.

    Zero-filled (pad + crop along the length axis), not circular.
    """
    _check_key(key)
    check_float_array(x, "x", ndim=3)
    _check_int(max_shift, "max_shift")
    return _pad_and_crop(key, x, (max_shift,))


def gaussian_noise(key: jax.Array, x: jax.Array, std: float = 0.1) -> jax.Array:
    """Adds i.i.d. ``N(0, std^2)`` noise to every entry (any shape)."""
    _check_key(key)
    check_float_array(x, "x", min_ndim=1)
    check_positive(std, "std")
    return x + std * jax.random.normal(key, x.shape, x.dtype)


def mixup(key: jax.Array, x: jax.Array, y: jax.Array, alpha: float = 0.2):
    """mixup (Zhang et al. 2018, "mixup: Beyond empirical risk minimization").

    ``lam ~ Beta(alpha, alpha)`` (one per batch, as in the reference code), a random
    permutation ``pi`` of the batch, ``x_mix = lam * x + (1 - lam) * x[pi]``.

    Returns:
      ``(x_mix, (y_a, y_b, lam))`` with ``y_a = y``, ``y_b = y[pi]`` and a scalar
      ``lam`` in [0, 1]; train with ``lam * l(y_a) + (1 - lam) * l(y_b)``.
    """
    _check_key(key)
    check_float_array(x, "x", min_ndim=2)
    _check_same_batch(x, y)
    check_positive(alpha, "alpha")
    return _mixup(key, x, y, jnp.asarray(alpha, jnp.float32))


@jax.jit
def _mixup(key, x, y, alpha):
    k_lam, k_perm = jax.random.split(key)
    lam = jax.random.beta(k_lam, alpha, alpha).astype(x.dtype)
    perm = jax.random.permutation(k_perm, x.shape[0])
    return lam * x + (1 - lam) * x[perm], (y, y[perm], lam)


def cutmix(key: jax.Array, x: jax.Array, y: jax.Array, alpha: float = 1.0):
    """CutMix (Yun et al. 2019): paste a random box from a shuffled batch.

    ``lam ~ Beta(alpha, alpha)``; a box of side ``(H sqrt(1 - lam), W sqrt(1 - lam))``
    centred uniformly at random (clipped to the image) is copied from ``x[pi]``; ``lam``
    is then corrected to the kept area fraction, as in the reference code. One box per
    batch. Images ``[B, H, W, C]`` only.

    Returns:
      ``(x_mix, (y_a, y_b, lam))`` as :func:`mixup`.
    """
    _check_key(key)
    _check_images(x)
    _check_same_batch(x, y)
    check_positive(alpha, "alpha")
    return _cutmix(key, x, y, jnp.asarray(alpha, jnp.float32))


@jax.jit
def _cutmix(key, x, y, alpha):
    k_lam, k_perm, k_cy, k_cx = jax.random.split(key, 4)
    _, h, w, _ = x.shape
    lam = jax.random.beta(k_lam, alpha, alpha)
    cut = jnp.sqrt(1.0 - lam)
    cy = jax.random.uniform(k_cy) * h
    cx = jax.random.uniform(k_cx) * w
    y0, y1 = jnp.clip(cy - cut * h / 2, 0, h), jnp.clip(cy + cut * h / 2, 0, h)
    x0, x1 = jnp.clip(cx - cut * w / 2, 0, w), jnp.clip(cx + cut * w / 2, 0, w)
    y0, y1, x0, x1 = (jnp.round(v).astype(jnp.int32) for v in (y0, y1, x0, x1))
    rows = jnp.arange(h)[:, None]
    cols = jnp.arange(w)[None, :]
    box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    perm = jax.random.permutation(k_perm, x.shape[0])
    x_mix = jnp.where(box[None, :, :, None], x[perm], x)
    lam_adj = 1.0 - box.sum() / (h * w)
    return x_mix, (y, y[perm], lam_adj.astype(x.dtype))


def domain_mix(key: jax.Array, x: jax.Array, y: jax.Array, domain: jax.Array,
               alpha: float = 0.2):
    """DomainMix: mixup across source domains (mixup with the partner of each example
    drawn from *another* domain of the batch; Wang et al. 2020, "Heterogeneous Domain
    Generalization via Domain Mixup"; ShiftKD's DomainMix data manipulation).

    ``lam ~ Beta(alpha, alpha)`` (one per batch); the partner ``pi(i)`` is uniform over
    the batch rows ``j`` with ``domain[j] != domain[i]`` (when every row shares ``i``'s
    domain: uniform over the batch); ``x_mix = lam x + (1 - lam) x[pi]``.

    Returns:
      ``(x_mix, (y, y[pi], lam))`` as :func:`mixup`.
    """
    _check_key(key)
    check_float_array(x, "x", min_ndim=2)
    if y.shape[:1] != x.shape[:1] or domain.shape != x.shape[:1]:
        raise ValueError(f"y and domain must have shape ({x.shape[0]},), got "
                         f"{y.shape} and {domain.shape}.")
    check_positive(alpha, "alpha")
    return _domain_mix(key, x, y, domain, jnp.asarray(alpha, jnp.float32))


@jax.jit
def _domain_mix(key, x, y, domain, alpha):
    k_lam, k_pick = jax.random.split(key)
    lam = jax.random.beta(k_lam, alpha, alpha).astype(x.dtype)
    u = jax.random.uniform(k_pick, (x.shape[0], x.shape[0]))
    other = domain[:, None] != domain[None, :]
    has = other.any(1, keepdims=True)
    perm = jnp.argmax(jnp.where(other | ~has, u, -1.0), axis=1)
    return lam * x + (1 - lam) * x[perm], (y, y[perm], lam)


# ------------------------------------------------------------------ RandAugment-lite


def _translate_one(key, xi, magnitude):
    """Zero-filled translation of one example by up to magnitude * size / 4 per axis."""
    spatial = xi.shape[:-1]
    out = xi
    for axis, (k, size) in enumerate(zip(jax.random.split(key, len(spatial)), spatial)):
        m = max(1, int(round(magnitude * size / 4)))
        s = jax.random.randint(k, (), -m, m + 1)
        rolled = jnp.roll(out, s, axis=axis)
        pos = jnp.arange(size) - s
        valid = (pos >= 0) & (pos < size)
        shape = [1] * xi.ndim
        shape[axis] = size
        out = jnp.where(valid.reshape(shape), rolled, 0.0)
    return out


def _window(spatial, key, magnitude):
    """Boolean mask of a random window of side ceil(magnitude * size / 2) per axis."""
    window = jnp.ones(spatial, bool)
    for axis, (k, size) in enumerate(zip(jax.random.split(key, len(spatial)), spatial)):
        side = max(1, math.ceil(magnitude * size / 2))
        start = jax.random.randint(k, (), 0, size - side + 1)
        idx = jnp.arange(size)
        shape = [1] * len(spatial)
        shape[axis] = size
        window = window & ((idx >= start) & (idx < start + side)).reshape(shape)
    return window


def _rand_augment_ops(rank: int, magnitude: float):
    """Per-example ops ``op(key, xi) -> xi`` of the RandAugment-lite policy."""
    ops = [
        lambda k, xi: xi,                                                 # identity
        lambda k, xi: _translate_one(k, xi, magnitude),                   # translate
        lambda k, xi: xi.mean() + (1 + magnitude * jax.random.uniform(
            k, (), minval=-1, maxval=1)) * (xi - xi.mean()),              # contrast
        lambda k, xi: xi + magnitude * jax.random.uniform(
            k, (), minval=-1, maxval=1),                                  # brightness
        lambda k, xi: xi + 0.3 * magnitude * jax.random.normal(
            k, xi.shape, xi.dtype),                                       # noise
        lambda k, xi: jnp.where(_window(xi.shape[:-1], k, magnitude)[..., None],
                                0.0, xi),                                 # cutout
    ]
    if rank == 4:
        ops.append(lambda k, xi: xi[:, ::-1, :])                          # h-flip
    return ops


RAND_AUGMENT_OPS = ("identity", "translate", "contrast", "brightness", "noise", "cutout",
                    "flip (images only)")


def rand_augment(key: jax.Array, x: jax.Array, num_ops: int = 2,
                 magnitude: float = 0.5) -> jax.Array:
    """RandAugment-lite (after Cubuk et al. 2020): ``num_ops`` random ops per example.

    Each op is drawn uniformly per example from identity, zero-filled translation (up to
    ``magnitude * size / 4``), contrast and brightness changes (factor / offset in
    ``1 +- magnitude`` / ``+- magnitude``), Gaussian noise (std ``0.3 magnitude``),
    cutout (side ``magnitude * size / 2``) and, for images, a horizontal flip. The
    selection uses ``lax.switch`` under ``vmap``, so shapes are static.
    Deviation: RandAugment's PIL colour ops (posterize, solarize, ...) are left out;
    these ops also apply to 1-D signals and to normalised inputs.
    """
    _check_key(key)
    check_float_array(x, "x", ndim=(3, 4))
    _check_int(num_ops, "num_ops")
    check_in_range(magnitude, "magnitude", 0.0, 1.0)
    return _rand_augment(key, x, num_ops, float(magnitude))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _rand_augment(key, x, num_ops, magnitude):
    ops = _rand_augment_ops(x.ndim, magnitude)

    def one(k, xi):
        for k_op in jax.random.split(k, num_ops):
            k_choice, k_apply = jax.random.split(k_op)
            choice = jax.random.randint(k_choice, (), 0, len(ops))
            xi = jax.lax.switch(choice, ops, k_apply, xi).astype(xi.dtype)
        return xi

    return jax.vmap(one)(jax.random.split(key, x.shape[0]), x)


# ------------------------------------------------------------------------- by name


def _x_only(fn, **kwargs):
    def apply(key, batch):
        return {**batch, "x": fn(key, batch["x"], **kwargs)}
    return apply


def _crop_flip(padding=4):
    def fn(key, x):
        k1, k2 = jax.random.split(key)
        return random_flip(k2, random_crop(k1, x, padding))
    return fn


def _shift_noise(max_shift=4, std=0.1):
    def fn(key, x):
        k1, k2 = jax.random.split(key)
        return gaussian_noise(k2, random_shift(k1, x, max_shift), std)
    return fn


def _mixing(fn, **kwargs):
    def apply(key, batch):
        x, (y_a, y_b, lam) = fn(key, batch["x"], batch["y"], **kwargs)
        return {**batch, "x": x, "y": y_a, "y_b": y_b, "lam": lam}
    return apply


def _domain_mixing(**kwargs):
    def apply(key, batch):
        if "domain" not in batch:
            raise ValueError("augmentation 'domainmix' needs batch['domain'] (the source "
                             f"domain of each row); batch keys: {sorted(batch)}.")
        x, (y_a, y_b, lam) = domain_mix(key, batch["x"], batch["y"], batch["domain"],
                                        **kwargs)
        return {**batch, "x": x, "y": y_a, "y_b": y_b, "lam": lam}
    return apply


AUGMENTATIONS = {
    "none": lambda: (lambda key, batch: batch),
    "flip": lambda **kw: _x_only(random_flip, **kw),
    "crop": lambda **kw: _x_only(random_crop, **kw),
    "crop_flip": lambda **kw: _x_only(_crop_flip(**kw)),
    "shift": lambda **kw: _x_only(random_shift, **kw),
    "gaussian_noise": lambda **kw: _x_only(gaussian_noise, **kw),
    "shift_noise": lambda **kw: _x_only(_shift_noise(**kw)),
    "randaugment": lambda **kw: _x_only(rand_augment, **kw),
    "mixup": lambda **kw: _mixing(mixup, **kw),
    "cutmix": lambda **kw: _mixing(cutmix, **kw),
    "domainmix": lambda **kw: _domain_mixing(**kw),
}


def _options(fn, skip=("key", "x", "y")):
    return tuple(p for p in inspect.signature(fn).parameters if p not in skip)


_OPTIONS = {
    "none": (), "flip": _options(random_flip), "crop": _options(random_crop),
    "crop_flip": ("padding",), "shift": _options(random_shift),
    "gaussian_noise": _options(gaussian_noise), "shift_noise": ("max_shift", "std"),
    "randaugment": _options(rand_augment), "mixup": _options(mixup),
    "cutmix": _options(cutmix), "domainmix": ("alpha",),
}


def get_augmentation(name: str, **kwargs) -> Callable[[jax.Array, dict], dict]:
    """The augmentation ``name`` as ``fn(key, batch) -> batch`` on batch dicts.

    ``batch`` is a dict from :func:`kdjax.data.batches` (``"x"``, ``"y"``, ``"mask"``,
    ...); the result is a new dict with ``"x"`` replaced. ``"mixup"`` and ``"cutmix"``
    also add ``"y_b"`` and a scalar ``"lam"`` (``"y"`` stays ``y_a``): the loss is
    ``lam * l(y) + (1 - lam) * l(y_b)``. Mixing uses every row, so use it on batches
    without padding (``drop_remainder=True``). ``kwargs`` go to the function (e.g.
    ``padding=4``, ``std=0.1``, ``alpha=0.2``, ``num_ops=2, magnitude=0.5``).

    Names: ``none``, ``flip``, ``crop``, ``crop_flip`` (images); ``shift``,
    ``shift_noise`` (1-D signals); ``gaussian_noise``, ``randaugment``, ``mixup``,
    ``domainmix`` (any; needs ``batch["domain"]``); ``cutmix`` (images).
    """
    check_choice(name, "name", AUGMENTATIONS)
    valid = set(_OPTIONS[name])
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise TypeError(f"invalid options {unknown} for augmentation {name!r}; valid "
                        f"options are {sorted(valid)}.")
    return AUGMENTATIONS[name](**kwargs)
