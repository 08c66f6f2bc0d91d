"""Feature distillation losses: pure functions of intermediate feature maps.

Features are channels-last: ``[B, D]`` (vectors), ``[B, L, C]`` (1-D signals) or
``[B, H, W, C]`` (images). Trainable adapters (FitNet regressor, VID mean head, FT
paraphraser/translator, AB connector) live in :mod:`kdjax.models.adapters` and are
applied by the method wrapper (:mod:`kdjax.methods.zoo`); the losses here take the
arrays they produce. Where the reference code average-pools the larger of two feature
maps to the smaller spatial size (AT, FSP, NST, FT), :func:`match_spatial` does the same
for integer size ratios.

Per-example losses take ``weights``/``reduction`` (see
:func:`kdjax.losses._utils.reduce_per_example`); all math is float32.
"""

from __future__ import annotations

import math
from typing import Sequence

import chex
import jax
import jax.numpy as jnp

from kdjax._checks import (
    check_float_array,
    check_nonnegative,
    check_positive,
    check_same_leading,
    check_same_shape,
)
from kdjax.losses._utils import l2_normalize, reduce_per_example

__all__ = [
    "match_spatial",
    "fitnet",
    "attention_map",
    "attention_transfer",
    "nst",
    "fsp_matrix",
    "fsp",
    "activation_boundary",
    "factor_transfer",
    "vid",
    "hcl",
    "adaptive_avg_pool",
]


def _flat(x):
    return x.reshape(x.shape[0], -1)


def _per_example_mean(x):
    return jnp.mean(_flat(x), axis=-1)


def _avg_pool_to(x, spatial):
    """Average-pools channels-last ``x`` ``[B, *S, C]`` to spatial shape ``spatial``."""
    cur = x.shape[1:-1]
    if tuple(cur) == tuple(spatial):
        return x
    window = []
    for have, want in zip(cur, spatial):
        if have % want:
            raise ValueError(
                f"cannot pool spatial shape {tuple(cur)} to {tuple(spatial)}: sizes must "
                f"be integer multiples.")
        window.append(have // want)
    dims = (1, *window, 1)
    summed = jax.lax.reduce_window(x.astype(jnp.float32), 0.0, jax.lax.add, dims, dims,
                                   "VALID")
    return summed / float(math.prod(window))


def match_spatial(a: chex.Array, b: chex.Array) -> tuple[chex.Array, chex.Array]:
    """Average-pools the larger of two channels-last maps to the other's spatial size.

    RepDistiller's AT/FSP/NST/FT use ``adaptive_avg_pool2d`` the same way; kdjax requires
    integer size ratios (then both coincide exactly). ``[B, D]`` inputs pass through.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.losses import match_spatial
      >>> a, b = match_spatial(jnp.ones((2, 8, 8, 3)), jnp.ones((2, 4, 4, 5)))
      >>> a.shape, b.shape
      ((2, 4, 4, 3), (2, 4, 4, 5))
    """
    if a.ndim != b.ndim:
        raise ValueError(f"features must have the same rank to match spatial sizes, got "
                         f"shapes {a.shape} and {b.shape}.")
    if a.ndim <= 2:
        return a, b
    sa, sb = a.shape[1:-1], b.shape[1:-1]
    if sa == sb:
        return a, b
    if all(x >= y for x, y in zip(sa, sb)):
        return _avg_pool_to(a, sb), b
    if all(x <= y for x, y in zip(sa, sb)):
        return a, _avg_pool_to(b, sa)
    raise ValueError(f"spatial shapes {tuple(sa)} and {tuple(sb)} are not ordered; cannot "
                     f"pool one to the other.")


def _check_pair(student, teacher, names=("student", "teacher"), ndim=(2, 3, 4)):
    check_float_array(student, names[0], ndim=ndim)
    check_float_array(teacher, names[1], ndim=ndim)
    check_same_leading(student, teacher, *names)


def fitnet(student_regressed: chex.Array, teacher: chex.Array, *,
           weights: chex.Array | None = None, reduction: str = "mean") -> chex.Array:
    r"""FitNet hint loss: mean squared error between regressed student and teacher features.

    .. math:: \ell_i = \frac{1}{D}\,\| r(f^S_i) - f^T_i \|_2^2

    averaged over the batch: ``torch.nn.MSELoss()`` of RepDistiller's ``HintLoss`` when
    unweighted. The regressor ``r`` (1x1 conv / dense, :class:`kdjax.models.adapters.
    Regressor`) is applied by the caller. Reference weight 100 (RepDistiller), hint on the
    penultimate stage.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.losses import fitnet
      >>> float(fitnet(jnp.zeros((2, 4)), jnp.ones((2, 4))))
      1.0

    Args:
      student_regressed: ``r(f^S)``, same shape as ``teacher`` (any rank >= 2).
      teacher: teacher feature ``f^T``.
      weights, reduction: per-example weights and reduction.

    References:
      Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015, arXiv:1412.6550.
    """
    check_float_array(student_regressed, "student_regressed", min_ndim=2)
    check_float_array(teacher, "teacher", min_ndim=2)
    check_same_shape(student_regressed, teacher, "student_regressed", "teacher")
    diff = student_regressed.astype(jnp.float32) - teacher.astype(jnp.float32)
    return reduce_per_example(_per_example_mean(diff * diff), weights, reduction)


def attention_map(feature: chex.Array, p: float = 2.0) -> chex.Array:
    r"""Spatial attention map ``a = normalize(vec(mean_c |f_c|^p))``, shape ``[B, positions]``.

    RepDistiller's ``Attention.at`` (``f.pow(p).mean(1)``; kdjax takes ``|f|^p`` so odd
    ``p`` is defined for negative activations; identical for even ``p``).
    """
    check_float_array(feature, "feature", ndim=(3, 4))
    check_positive(p, "p")
    f = feature.astype(jnp.float32)
    a = jnp.mean(jnp.abs(f) ** p, axis=-1)
    return l2_normalize(_flat(a))


def attention_transfer(student: chex.Array, teacher: chex.Array, p: float = 2.0, *,
                       weights: chex.Array | None = None,
                       reduction: str = "mean") -> chex.Array:
    r"""Attention transfer (AT, Zagoruyko & Komodakis 2017), RepDistiller normalisation.

    .. math::
        a(f) = \frac{\mathrm{vec}(\frac{1}{C}\sum_c |f_c|^p)}
                    {\|\mathrm{vec}(\frac{1}{C}\sum_c |f_c|^p)\|_2},\qquad
        \ell_i = \frac{1}{N}\sum_{n=1}^{N} \big(a(f^S_i)_n - a(f^T_i)_n\big)^2

    (paper eq. (2) with ``p = 2``). The mean over batch x ``N`` positions is
    RepDistiller's ``(at(s) - at(t)).pow(2).mean()``; reference weight 1000, summed over
    the chosen layer pairs (the paper uses ``beta/2 * ||.||_2`` per layer instead: a
    different scale, not used here). Channel counts may differ; spatial sizes are
    matched by :func:`match_spatial`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.losses import attention_transfer
      >>> f = jnp.arange(24.0).reshape(1, 2, 3, 4)
      >>> float(attention_transfer(f, 2 * f))
      0.0

    Args:
      student, teacher: ``[B, H, W, C]`` or ``[B, L, C]`` features.
      p: power of the activations (2 in the reference).

    References:
      Zagoruyko, Komodakis, "Paying More Attention to Attention", ICLR 2017,
      arXiv:1612.03928.
    """
    _check_pair(student, teacher, ndim=(3, 4))
    check_positive(p, "p")
    student, teacher = match_spatial(student, teacher)
    diff = attention_map(student, p) - attention_map(teacher, p)
    return reduce_per_example(jnp.mean(diff * diff, axis=-1), weights, reduction)


def _channel_vectors(f):
    """``[B, *S, C]`` -> ``[B, C, positions]`` with each channel L2-normalised."""
    f = f.astype(jnp.float32)
    f = f.reshape(f.shape[0], -1, f.shape[-1])
    return l2_normalize(jnp.swapaxes(f, 1, 2), axis=-1)


def nst(student: chex.Array, teacher: chex.Array, *, weights: chex.Array | None = None,
        reduction: str = "mean") -> chex.Array:
    r"""Neuron selectivity transfer (NST, Huang & Wang 2017), polynomial kernel MMD.

    Each channel's activation map is a sample ``s_c = vec(f_c) / ||vec(f_c)||``; with the
    degree-2 polynomial kernel ``k(x, y) = (x^T y)^2`` (``c = 0``):

    .. math::
        \ell_i = \overline{k(s^T, s^T)} + \overline{k(s^S, s^S)} - 2\,\overline{k(s^S, s^T)}

    where bars are means over all channel pairs (paper eq. (5)-(8), squared MMD with
    means as RepDistiller's ``NSTLoss``). Reference weight 50. Student and teacher channel
    counts may differ; spatial sizes are matched by :func:`match_spatial`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.losses import nst
      >>> f = jnp.arange(1.0, 25.0).reshape(1, 2, 3, 4)
      >>> round(float(nst(f, 3 * f)), 6)
      0.0

    References:
      Huang, Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity
      Transfer", arXiv:1707.01219.
    """
    _check_pair(student, teacher, ndim=(3, 4))
    student, teacher = match_spatial(student, teacher)
    s, t = _channel_vectors(student), _channel_vectors(teacher)

    def k(a, b):
        return jnp.mean(jnp.einsum("bip,bjp->bij", a, b) ** 2, axis=(1, 2))

    per_example = k(t, t) + k(s, s) - 2.0 * k(s, t)
    return reduce_per_example(per_example, weights, reduction)


def fsp_matrix(first: chex.Array, second: chex.Array) -> chex.Array:
    r"""Flow of solution procedure matrix ``G = F_1^T F_2 / N`` of shape ``[B, C_1, C_2]``.

    ``F_k`` is ``[positions, C_k]`` (paper eq. (1)); the larger map is pooled to the
    smaller spatial size first (RepDistiller).
    """
    check_float_array(first, "first", ndim=(3, 4))
    check_float_array(second, "second", ndim=(3, 4))
    check_same_leading(first, second, "first", "second")
    first, second = match_spatial(first, second)
    a = first.astype(jnp.float32).reshape(first.shape[0], -1, first.shape[-1])
    b = second.astype(jnp.float32).reshape(second.shape[0], -1, second.shape[-1])
    return jnp.einsum("bpi,bpj->bij", a, b) / a.shape[1]


def fsp(student_first: chex.Array, student_second: chex.Array, teacher_first: chex.Array,
        teacher_second: chex.Array, *, weights: chex.Array | None = None,
        reduction: str = "mean") -> chex.Array:
    r"""FSP loss (Yim et al. 2017): squared distance of the two networks' FSP matrices.

    .. math:: \ell_i = \frac{1}{C_1 C_2}\,\| G^S_i - G^T_i \|_F^2

    with :func:`fsp_matrix` between two layers of each network (mean as RepDistiller's
    ``FSP``; the paper sums). Channel counts of student and teacher must agree layer by
    layer. In RepDistiller FSP is an initialisation stage (weight 50) before KD training.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.losses import fsp
      >>> a, b = jnp.ones((2, 4, 4, 3)), jnp.ones((2, 2, 2, 5))
      >>> float(fsp(a, b, a, b))
      0.0

    References:
      Yim, Joo, Bae, Kim, "A Gift from Knowledge Distillation", CVPR 2017.
    """
    gs = fsp_matrix(student_first, student_second)
    gt = fsp_matrix(teacher_first, teacher_second)
    if gs.shape != gt.shape:
        raise ValueError(
            f"student and teacher FSP matrices must have the same shape (channel counts "
            f"must match layer by layer), got {gs.shape} for the student and {gt.shape} "
            f"for the teacher.")
    check_same_leading(gs, student_first, "fsp", "student_first")
    diff = gs - gt
    return reduce_per_example(_per_example_mean(diff * diff), weights, reduction)


def activation_boundary(student_pre: chex.Array, teacher_pre: chex.Array,
                        margin: chex.Numeric = 1.0, *, weights: chex.Array | None = None,
                        reduction: str = "mean") -> chex.Array:
    r"""Activation-boundary loss (AB, Heo et al. 2019): hinge on neuron activation signs.

    With ``s`` the connector's student pre-activation and ``t`` the teacher
    pre-activation (before ReLU), summed over all elements of one example:

    .. math::
        \ell_i = \sum_n (s_n + m)^2\,[s_n > -m \wedge t_n \le 0]
                      + (s_n - m)^2\,[s_n \le m \wedge t_n > 0]

    (paper eq. (6), alternative squared hinge; RepDistiller's
    ``criterion_alternative_L2``, whose ``sum / batch`` equals the ``mean`` reduction
    here). RepDistiller further scales layer ``i`` of ``n`` by ``2^{i-n+1} * 3 / 1000``
    and uses AB as an initialisation stage; those factors are applied by the method
    wrapper. ``margin = 1`` in the reference.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.losses import activation_boundary
      >>> t = jnp.array([[-1.0, 2.0]])
      >>> float(activation_boundary(jnp.array([[-3.0, 3.0]]), t))
      0.0

    References:
      Heo, Lee, Yun, Choi, "Knowledge Transfer via Distillation of Activation Boundaries
      Formed by Hidden Neurons", AAAI 2019, arXiv:1811.03233.
    """
    _check_pair(student_pre, teacher_pre, ("student_pre", "teacher_pre"), ndim=(2, 3, 4))
    check_same_shape(student_pre, teacher_pre, "student_pre", "teacher_pre")
    check_nonnegative(margin, "margin")
    s = student_pre.astype(jnp.float32)
    t = teacher_pre.astype(jnp.float32)
    off = (s > -margin) & (t <= 0)
    on = (s <= margin) & (t > 0)
    elem = jnp.where(off, (s + margin) ** 2, 0.0) + jnp.where(on, (s - margin) ** 2, 0.0)
    return reduce_per_example(jnp.sum(_flat(elem), axis=-1), weights, reduction)


def factor_transfer(student_factor: chex.Array, teacher_factor: chex.Array,
                    p: int = 1, *, weights: chex.Array | None = None,
                    reduction: str = "mean") -> chex.Array:
    r"""Factor transfer (FT, Kim et al. 2018): distance between normalised factors.

    .. math::
        \ell_i = \frac{1}{D}\Big\| \frac{F^S_i}{\|F^S_i\|_2} - \frac{F^T_i}{\|F^T_i\|_2}
        \Big\|_p^p

    with ``F^T`` the teacher's paraphraser factor and ``F^S`` the student translator's
    output, flattened (paper eq. (3), ``p = 1``); the mean over ``D`` entries is
    RepDistiller's ``(factor(s) - factor(t)).abs().mean()``. Reference weight 200.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.losses import factor_transfer
      >>> f = jnp.ones((2, 2, 2, 3))
      >>> round(float(factor_transfer(f, 5 * f)), 6)
      0.0

    References:
      Kim, Park, Kwak, "Paraphrasing Complex Network: Network Compression via Factor
      Transfer", NeurIPS 2018, arXiv:1802.04977.
    """
    _check_pair(student_factor, teacher_factor, ("student_factor", "teacher_factor"))
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}.")
    student_factor, teacher_factor = match_spatial(student_factor, teacher_factor)
    check_same_shape(student_factor, teacher_factor, "student_factor", "teacher_factor")
    fs = l2_normalize(_flat(student_factor.astype(jnp.float32)))
    ft = l2_normalize(_flat(teacher_factor.astype(jnp.float32)))
    diff = jnp.abs(fs - ft) if p == 1 else (fs - ft) ** 2
    return reduce_per_example(jnp.mean(diff, axis=-1), weights, reduction)


def vid(student_mean: chex.Array, teacher: chex.Array, log_scale: chex.Array,
        eps: float = 1e-5, *, weights: chex.Array | None = None,
        reduction: str = "mean") -> chex.Array:
    r"""Variational information distillation (VID, Ahn et al. 2019): Gaussian NLL.

    With the student regression ``mu = r(f^S)`` and a learned per-channel variance
    ``sigma_c^2 = softplus(a_c) + eps``:

    .. math::
        \ell_i = \frac{1}{N C}\sum_{n, c} \frac{1}{2}\Big(
            \frac{(f^T_{nc} - \mu_{nc})^2}{\sigma_c^2} + \log \sigma_c^2\Big)

    (paper eq. (2)/(4), the constant ``log 2 pi / 2`` dropped), averaged over positions
    and channels as RepDistiller's ``VIDLoss``; reference weight 1, ``eps = 1e-5``,
    ``a`` initialised so that ``sigma^2 = 5`` (see :class:`kdjax.models.adapters.
    VIDHead`). Note: softplus parameterises the *variance* as in RepDistiller (the design
    note writes it on ``sigma``; this is the reference code's choice).

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.losses import vid
      >>> a = jnp.log(jnp.expm1(jnp.ones(3)))  # softplus(a) = 1
      >>> round(float(vid(jnp.zeros((2, 3)), jnp.zeros((2, 3)), a, eps=0.0)), 6)
      0.0

    Args:
      student_mean: ``mu``, same shape as ``teacher`` (channels last).
      teacher: ``f^T``.
      log_scale: ``[C]`` raw variance parameters ``a``.
      eps: variance floor.

    References:
      Ahn, Hu, Damianou, Lawrence, Dai, "Variational Information Distillation for
      Knowledge Transfer", CVPR 2019, arXiv:1904.05835.
    """
    check_float_array(student_mean, "student_mean", ndim=(2, 3, 4))
    check_float_array(teacher, "teacher", ndim=(2, 3, 4))
    check_same_shape(student_mean, teacher, "student_mean", "teacher")
    check_float_array(log_scale, "log_scale", ndim=1)
    if log_scale.shape[0] != teacher.shape[-1]:
        raise ValueError(f"log_scale must have shape ({teacher.shape[-1]},) (one per teacher "
                         f"channel), got {log_scale.shape}.")
    check_nonnegative(eps, "eps")
    var = jax.nn.softplus(log_scale.astype(jnp.float32)) + eps
    diff = teacher.astype(jnp.float32) - student_mean.astype(jnp.float32)
    nll = 0.5 * (diff * diff / var + jnp.log(var))
    return reduce_per_example(_per_example_mean(nll), weights, reduction)


def adaptive_avg_pool(x: chex.Array, size: int | tuple[int, ...]) -> chex.Array:
    """``torch.nn.functional.adaptive_avg_pool{1,2}d`` for channels-last ``[B, *S, C]``.

    Output bin ``o`` of an axis of length ``n`` averages input positions
    ``floor(o n / k) .. ceil((o + 1) n / k) - 1`` (bins overlap when ``k`` does not
    divide ``n``), as torch does; computed as one averaging matrix per spatial axis.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.losses import adaptive_avg_pool
      >>> adaptive_avg_pool(jnp.arange(3.0).reshape(1, 3, 1), 2)[0, :, 0].tolist()
      [0.5, 1.5]
    """
    check_float_array(x, "x", ndim=(3, 4))
    spatial = x.shape[1:-1]
    size = (size,) * len(spatial) if isinstance(size, int) else tuple(size)
    if len(size) != len(spatial) or any(not isinstance(k, int) or k < 1 for k in size):
        raise ValueError(f"size must be a positive int or {len(spatial)} positive ints, "
                         f"got {size!r}.")
    out = x.astype(jnp.float32)
    for axis, (n, k) in enumerate(zip(spatial, size), start=1):
        o = jnp.arange(k)
        start = (o * n) // k
        stop = -((-(o + 1) * n) // k)
        pos = jnp.arange(n)
        m = ((pos[None, :] >= start[:, None]) & (pos[None, :] < stop[:, None]))
        m = m / jnp.sum(m, axis=1, keepdims=True)
        out = jnp.moveaxis(jnp.tensordot(m, jnp.moveaxis(out, axis, 0), axes=1), 0, axis)
    return out


def hcl(student: Sequence[chex.Array], teacher: Sequence[chex.Array],
        levels: Sequence[int] = (4, 2, 1), *, weights: chex.Array | None = None,
        reduction: str = "mean") -> chex.Array:
    r"""ReviewKD's hierarchical context loss (HCL, Chen et al. CVPR 2021).

    For each pair of (ABF-fused) student and teacher feature maps ``F^S_k, F^T_k``
    (channels-last, same shape):

    .. math::
        \mathcal L = \sum_k \frac{\mathrm{MSE}(F^S_k, F^T_k) + \sum_{l} 2^{-j(l)}\,
            \mathrm{MSE}(\mathrm{pool}_l F^S_k, \mathrm{pool}_l F^T_k)}
            {1 + \sum_l 2^{-j(l)}}

    where ``pool_l`` is adaptive average pooling to ``l x l`` for each ``l`` in
    ``levels`` smaller than the map (``(4, 2, 1)`` in the reference), ``j(l) = 1, 2,
    ...`` counts the levels used, and MSE is the mean over all elements (paper Sec. 3.3;
    ``hcl`` in ``dvlab-research/ReviewKD``, reference weight 1.0 on CIFAR/ImageNet).
    Levels are skipped when ``l >= `` the first spatial size, as the reference. Vectors
    ``[B, D]`` take the plain MSE. Works for 1-D ``[B, L, C]`` maps too.

    Per example: every MSE is a mean over examples of per-example means, so
    ``l_i`` is the same expression on example ``i`` and ``weights``/``reduction``
    follow :func:`kdjax.losses._utils.reduce_per_example`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.losses import hcl
      >>> f = jnp.ones((2, 8, 8, 3))
      >>> float(hcl([f], [f]))
      0.0

    Args:
      student: a sequence of student maps (outputs of the ABF fusion, see
        :class:`kdjax.models.adapters.ABF` and the ``reviewkd`` method).
      teacher: the matching teacher maps (stop their gradient in a step).
      levels: pooled sizes of the context hierarchy.
      weights, reduction: per-example weights and reduction.

    References:
      Chen, Liu, Zhao, Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021,
      arXiv:2104.09044.
    """
    if isinstance(student, jnp.ndarray) or not isinstance(student, (list, tuple)):
        raise ValueError(f"student must be a list or tuple of feature maps, got "
                         f"{type(student).__name__}.")
    if not isinstance(teacher, (list, tuple)) or len(teacher) != len(student) or not student:
        raise ValueError(f"teacher must be a non-empty list of the same length as student "
                         f"({len(student)}), got {teacher!r:.80}.")
    if not levels or any(not isinstance(v, int) or v < 1 for v in levels):
        raise ValueError(f"levels must be positive ints, got {levels!r}.")
    total = 0.0
    for k, (fs, ft) in enumerate(zip(student, teacher)):
        _check_pair(fs, ft, names=(f"student[{k}]", f"teacher[{k}]"))
        check_same_shape(fs, ft, f"student[{k}]", f"teacher[{k}]")
        fs, ft = fs.astype(jnp.float32), ft.astype(jnp.float32)
        loss = _per_example_mean((fs - ft) ** 2)
        cnt, tot = 1.0, 1.0
        if fs.ndim > 2:
            for lv in levels:
                if lv >= fs.shape[1]:
                    continue
                cnt /= 2.0
                ps, pt = adaptive_avg_pool(fs, lv), adaptive_avg_pool(ft, lv)
                loss = loss + cnt * _per_example_mean((ps - pt) ** 2)
                tot += cnt
        total = total + loss / tot
    return reduce_per_example(total, weights, reduction)
