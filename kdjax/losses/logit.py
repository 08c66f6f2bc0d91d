"""Logit-based distillation losses (pure functions of ``[batch, classes]`` logits).

Conventions shared by every loss in :mod:`kdjax.losses`:

* inputs are arrays; shapes and dtypes are checked at trace time and a mismatch raises
  ``ValueError``/``TypeError`` naming the argument and both shapes;
* ``weights`` (``[B]``, optional) are per-example sample weights and ``reduction`` is
  ``"mean"`` (``(1/B) sum_i w_i l_i``), ``"sum"`` or ``"none"``; see
  :func:`kdjax.losses._utils.reduce_per_example`;
* the math is done in float32 whatever the input dtype (bf16 inputs give finite
  float32 losses).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax

from kdjax._checks import (
    check_float_array,
    check_labels,
    check_nonnegative,
    check_positive,
    check_same_shape,
)
from kdjax.losses._utils import multiplicities, reduce_per_example

__all__ = ["kd", "cross_entropy", "kl_to_teacher", "dkd", "dist", "standardize_logits",
           "mlkd", "MLKD_TEMPERATURES"]

MLKD_TEMPERATURES = (2.0, 3.0, 4.0, 5.0, 6.0)


def _check_logit_pair(student_logits, teacher_logits):
    check_float_array(student_logits, "student_logits", ndim=2)
    check_float_array(teacher_logits, "teacher_logits", ndim=2)
    check_same_shape(student_logits, teacher_logits, "student_logits", "teacher_logits")


def kl_to_teacher(student_logits: chex.Array, teacher_logits: chex.Array,
                  temperature: chex.Numeric = 1.0) -> chex.Array:
    """Per-example ``KL(p^T || p^S)`` with ``p = softmax(z / temperature)``; shape ``[B]``.

    Computed from log-softmaxes (stable for large logits); ``0 * log 0`` terms are 0.
    """
    _check_logit_pair(student_logits, teacher_logits)
    check_positive(temperature, "temperature")
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    p_t = jnp.exp(t)
    return jnp.sum(jnp.where(p_t > 0, p_t * (t - s), 0.0), axis=-1)


def kd(student_logits: chex.Array, teacher_logits: chex.Array,
       temperature: chex.Numeric = 4.0, *, weights: chex.Array | None = None,
       reduction: str = "mean", standardize: bool = False) -> chex.Array:
    r"""Hinton knowledge distillation loss.

    .. math::
        \mathcal{L}_{KD} = \tau^2 \, \frac{1}{B}\sum_i w_i\,
        \mathrm{KL}\big(p^T_i \,\|\, p^S_i\big),\qquad p_i = \mathrm{softmax}(z_i/\tau)

    The teacher's distribution is the target (``KL(p^T || p^S)``); the ``tau^2`` factor
    keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015, sec. 2).

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.losses import kd
      >>> z = jnp.array([[1.0, 2.0, 3.0]])
      >>> float(kd(z, z))
      0.0

    Args:
      student_logits: ``[batch, classes]`` floating logits of the student.
      teacher_logits: ``[batch, classes]`` logits of the teacher (wrap them in
        ``jax.lax.stop_gradient`` in a training step; this function does not).
      temperature: softmax temperature ``tau > 0``. Reference default 4 (RepDistiller,
        with loss weights CE 0.1 / KD 0.9).
      weights: optional ``[batch]`` per-example weights (e.g. KD-AIF).
      reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
      standardize: z-score each sample's logits first (Sun et al. 2024, see
        :func:`standardize_logits`); ``False`` (default) is plain Hinton KD.

    Returns:
      A float32 scalar (or ``[batch]`` for ``reduction="none"``).

    References:
      Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015,
      arXiv:1503.02531.
    """
    _check_logit_pair(student_logits, teacher_logits)
    check_positive(temperature, "temperature")
    if standardize:
        student_logits = standardize_logits(student_logits)
        teacher_logits = standardize_logits(teacher_logits)
    per_example = temperature**2 * kl_to_teacher(student_logits, teacher_logits, temperature)
    return reduce_per_example(per_example, weights, reduction)


def cross_entropy(logits: chex.Array, labels: chex.Array, *,
                  weights: chex.Array | None = None, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> chex.Array:
    r"""Softmax cross-entropy with integer labels, via ``optax``.

    ``l_i = -log softmax(z_i)[y_i]`` (with optional label smoothing, optax's
    ``smooth_labels``); reduced as in :func:`kd`.

    Args:
      logits: ``[batch, classes]`` floating logits.
      labels: ``[batch]`` integer labels in ``[0, classes)``.
      weights: optional ``[batch]`` per-example weights (a labelled-subset mask, KD-AIF
        weights, ...).
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      label_smoothing: in ``[0, 1)``.
    """
    check_float_array(logits, "logits", ndim=2)
    check_labels(labels, "labels", logits.shape[-1], batch=logits.shape[0])
    logits = logits.astype(jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
        per_example = optax.softmax_cross_entropy(logits, targets)
    else:
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return reduce_per_example(per_example, weights, reduction)


def standardize_logits(logits: chex.Array, eps: float = 1e-7) -> chex.Array:
    r"""Per-sample z-score of logits (Sun et al. 2024, logit standardisation).

    .. math::
        \mathcal{Z}(z_i) = \frac{z_i - \bar z_i}{\sigma_i + \epsilon},\qquad
        \sigma_i = \sqrt{\tfrac{1}{C-1}\sum_c (z_{ic} - \bar z_i)^2}

    The unbiased standard deviation and ``eps = 1e-7`` follow the authors' code
    (``logit.std(dim=-1)`` in ``sunshangquan/logit-standardization-KD``). Deliberate
    deviation: ``sigma`` is computed with a guarded square root, so a sample with constant
    logits maps to zeros with a finite (zero-through-sigma) gradient instead of NaN.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.losses import standardize_logits
      >>> standardize_logits(jnp.array([[1.0, 2.0, 3.0]])).round(4).tolist()
      [[-1.0, 0.0, 1.0]]

    Args:
      logits: ``[batch, classes]`` floating logits, ``classes >= 2``.
      eps: added to the standard deviation.

    Returns:
      float32 ``[batch, classes]`` standardised logits.

    References:
      Sun, Ren, Li, Wang, Cao, "Logit Standardization in Knowledge Distillation",
      CVPR 2024, arXiv:2403.06590, eq. (8)-(9).
    """
    check_float_array(logits, "logits", ndim=2)
    if logits.shape[-1] < 2:
        raise ValueError(
            f"logits must have at least 2 classes to standardise, got shape {logits.shape}.")
    z = logits.astype(jnp.float32)
    centred = z - jnp.mean(z, axis=-1, keepdims=True)
    var = jnp.sum(centred**2, axis=-1, keepdims=True) / (z.shape[-1] - 1)
    positive = var > 0
    std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)
    return centred / (std + eps)


def dkd(student_logits: chex.Array, teacher_logits: chex.Array, labels: chex.Array,
        alpha: chex.Numeric = 1.0, beta: chex.Numeric = 8.0,
        temperature: chex.Numeric = 4.0, *, weights: chex.Array | None = None,
        reduction: str = "mean", standardize: bool = False) -> chex.Array:
    r"""Decoupled knowledge distillation (DKD, Zhao et al. 2022).

    With ``p = softmax(z / tau)`` and ``y`` the label, the binary target/non-target
    distributions ``b = [p_y, 1 - p_y]`` and the distribution over the non-target classes
    ``q_c = softmax_{c != y}(z_c / tau)``:

    .. math::
        \mathcal{L}_{DKD} = \tau^2 \big(\alpha\,\mathrm{KL}(b^T \| b^S)
            + \beta\,\mathrm{KL}(q^T \| q^S)\big)

    i.e. ``alpha * TCKD + beta * NCKD`` (paper eq. (5)), per example, then reduced.
    Reference defaults (mdistiller, CIFAR-100): ``alpha = 1, beta = 8, tau = 4``, CE
    weight 1, and a linear warm-up of the DKD weight over the first 20 epochs (the
    warm-up is a schedule for the training loop, not part of this loss).

    Deliberate deviations from mdistiller: ``q`` is computed by masking the target logit
    with ``-inf`` (mdistiller subtracts 1000, which equals it to float precision for
    ordinary logits), and ``b`` from log-probabilities (``log(1 - p_y)`` via
    ``log1p(-p_y)`` clipped), so confident teachers give no ``log 0``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.losses import dkd
      >>> z = jnp.array([[1.0, 2.0, 3.0]])
      >>> float(dkd(z, z, jnp.array([2])))
      0.0

    Args:
      student_logits: ``[batch, classes]`` student logits.
      teacher_logits: ``[batch, classes]`` teacher logits (stop gradients yourself).
      labels: ``[batch]`` integer labels.
      alpha: TCKD weight. beta: NCKD weight. temperature: ``tau > 0``.
      weights: optional ``[batch]`` per-example weights.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      standardize: z-score the logits first (Sun et al. 2024).

    References:
      Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022,
      arXiv:2203.08679.
    """
    _check_logit_pair(student_logits, teacher_logits)
    num_classes = student_logits.shape[-1]
    if num_classes < 2:
        raise ValueError(f"student_logits must have >= 2 classes for DKD, got {num_classes}.")
    check_labels(labels, "labels", num_classes, batch=student_logits.shape[0])
    check_positive(temperature, "temperature")
    check_nonnegative(alpha, "alpha")
    check_nonnegative(beta, "beta")
    if standardize:
        student_logits = standardize_logits(student_logits)
        teacher_logits = standardize_logits(teacher_logits)
    zs = student_logits.astype(jnp.float32) / temperature
    zt = teacher_logits.astype(jnp.float32) / temperature
    target = jax.nn.one_hot(labels, num_classes, dtype=bool)

    def binary_logprobs(z):
        logp = jax.nn.log_softmax(z, axis=-1)
        log_py = jnp.sum(jnp.where(target, logp, 0.0), axis=-1)
        # log(1 - p_y) = logsumexp over the non-target classes of log p.
        log_rest = jax.nn.logsumexp(jnp.where(target, -jnp.inf, logp), axis=-1)
        return jnp.stack([log_py, log_rest], axis=-1)

    def kl(log_t, log_s):
        p_t = jnp.exp(log_t)
        # 0 log 0 = 0 for the masked (-inf) entries, without forming 0 * (-inf) = NaN
        pos = p_t > 0
        return jnp.sum(p_t * (jnp.where(pos, log_t, 0.0) - jnp.where(pos, log_s, 0.0)),
                       axis=-1)

    tckd = kl(binary_logprobs(zt), binary_logprobs(zs))
    masked_t = jax.nn.log_softmax(jnp.where(target, -jnp.inf, zt), axis=-1)
    masked_s = jax.nn.log_softmax(jnp.where(target, -jnp.inf, zs), axis=-1)
    nckd = kl(masked_t, masked_s)
    per_example = temperature**2 * (alpha * tckd + beta * nckd)
    return reduce_per_example(per_example, weights, reduction)


def _pearson_rows(a, b, eps, w=None):
    """Pearson correlation of the rows of ``a`` and ``b``, optionally with weights ``w``
    over the columns (weighted means and inner products)."""
    if w is None:
        w = jnp.ones((a.shape[-1],), jnp.float32)
    w = w / jnp.sum(w)
    a = a - (a @ w)[..., None]
    b = b - (b @ w)[..., None]
    sw = jnp.sqrt(w)
    # optax.safe_norm: ||.||_2 with a zero (not NaN) gradient at 0; scaled so that the
    # unweighted case is the reference's plain Pearson (the 1/C factors cancel but eps).
    c = a.shape[-1]
    na = optax.safe_norm(a * sw, 0.0, axis=-1) * jnp.sqrt(c)
    nb = optax.safe_norm(b * sw, 0.0, axis=-1) * jnp.sqrt(c)
    return c * ((a * b) @ w) / (na * nb + eps)


def dist(student_logits: chex.Array, teacher_logits: chex.Array,
         beta: chex.Numeric = 1.0, gamma: chex.Numeric = 1.0,
         temperature: chex.Numeric = 1.0, *, weights: chex.Array | None = None,
         eps: float = 1e-8) -> chex.Array:
    r"""DIST: relation (Pearson correlation) matching of predictions (Huang et al. 2022).

    With ``Y = softmax(Z / tau)`` (``[B, C]``) and ``rho`` the Pearson correlation:

    .. math::
        \mathcal{L}_{DIST} = \tau^2\Big(\beta\,\big(1 - \tfrac{1}{B}\sum_i
            \rho(Y^S_{i,:}, Y^T_{i,:})\big)
          + \gamma\,\big(1 - \tfrac{1}{C}\sum_c \rho(Y^S_{:,c}, Y^T_{:,c})\big)\Big)

    inter-class relation (rows, paper eq. (5)) plus intra-class relation (columns, eq.
    (6)); loss eq. (8). Reference defaults (``hunto/DIST_KD``): ``beta = gamma = 1``,
    ``tau = 1`` (ImageNet; the CIFAR configs use ``tau = 4``), CE weight 1 and DIST
    weight 1 (2 on CIFAR). ``rho`` uses ``eps = 1e-8`` added to the product of norms, as
    the reference does, so constant rows give ``rho = 0`` instead of NaN.

    The intra-class term couples the whole batch: under data parallelism plain ``jit``
    over sharded inputs gives the global-batch value (what the paper's single-process
    formula means), a ``shard_map`` the per-device one. ``weights`` are therefore
    example multiplicities (:func:`kdjax.losses._utils.multiplicities`): the
    inter-class mean becomes ``sum_i w_i rho_i / sum_i w_i`` and each intra-class
    correlation is the ``w``-weighted Pearson correlation over the batch (weighted
    means, covariances and variances), i.e. integer weights give the loss of the batch
    with row ``i`` repeated ``w_i`` times.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.losses import dist
      >>> z = jnp.array([[1.0, 2.0, 3.0], [0.0, 1.0, -1.0]])
      >>> round(float(dist(z, z)), 6)
      0.0

    Args:
      student_logits, teacher_logits: ``[batch, classes]``.
      beta: inter-class weight. gamma: intra-class weight. temperature: ``tau > 0``.
      weights: optional ``[batch]`` example multiplicities (see above).
      eps: added to the norm product in the correlation.

    References:
      Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher",
      NeurIPS 2022, arXiv:2205.10536.
    """
    _check_logit_pair(student_logits, teacher_logits)
    check_positive(temperature, "temperature")
    check_nonnegative(beta, "beta")
    check_nonnegative(gamma, "gamma")
    ys = jax.nn.softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    yt = jax.nn.softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    w = multiplicities(weights, ys.shape[0])
    inter = 1.0 - (w @ _pearson_rows(ys, yt, eps)) / jnp.sum(w)
    intra = 1.0 - jnp.mean(_pearson_rows(ys.T, yt.T, eps, w))
    return temperature**2 * (beta * inter + gamma * intra)


def mlkd(student_logits: chex.Array, teacher_logits: chex.Array,
         temperatures=MLKD_TEMPERATURES, *, instance_weight: chex.Numeric = 1.0,
         batch_weight: chex.Numeric = 1.0, class_weight: chex.Numeric = 1.0,
         weights: chex.Array | None = None) -> chex.Array:
    r"""Multi-level logit distillation (MLKD, Jin, Wang, Lin, CVPR 2023).

    Predictions are "augmented" by several temperatures; at each ``tau`` with
    ``P = softmax(Z / tau)`` (``[B, C]``) three alignments are summed:

    .. math::
        \mathcal L = \sum_{\tau} \Big[\lambda_I\,\tau^2\,\frac1B\sum_i
            \mathrm{KL}(P^T_i \| P^S_i)
          + \lambda_B\,\frac1B\,\big\|P^T P^{T\top} - P^S P^{S\top}\big\|_F^2
          + \lambda_C\,\frac1C\,\big\|P^{T\top} P^T - P^{S\top} P^S\big\|_F^2\Big]

    instance-level (KL per example, paper Eq. 2-3), batch-level (``B x B``
    sample-relation Gram matrices, Eq. 4-5) and class-level (``C x C`` class-relation
    Gram matrices, Eq. 6-7). Normalisations as the authors' code
    (``Jin-Ying/Multi-Level-Logit-Distillation``, ``kd_loss``/``bc_loss``/``cc_loss``):
    ``tau^2`` on the KL only, the batch term divided by ``B``, the class term by ``C``,
    temperatures ``{2, 3, 4, 5, 6}`` (their ``self.temperature = 4`` plus 2, 3, 5, 6),
    each term summed over temperatures with weight 1.

    What is included: the loss of one view. Not included (data pipeline, not loss): the
    reference trains on a weak and a strong augmentation of each image and sums this
    loss over both views, and masks each term by teacher confidence (rows/classes whose
    teacher confidence is below the batch median are dropped). Pass ``weights`` (e.g. a
    0/1 confidence mask) to reproduce the masking of the instance and batch terms.

    Weights (``[B]``, ``>= 0``) are example multiplicities (the batch and class terms
    couple the batch): the KL mean is ``sum_i w_i KL_i / sum_i w_i``, the batch term
    ``sum_ij w_i w_j (G^T_ij - G^S_ij)^2 / sum_i w_i``, and the class Gram matrices
    are ``sum_i w_i p_i p_i^T``; integer weights give the loss of the batch with row
    ``i`` repeated ``w_i`` times.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.losses import mlkd
      >>> z = jnp.array([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
      >>> float(mlkd(z, z))
      0.0

    Args:
      student_logits, teacher_logits: ``[batch, classes]``.
      temperatures: a non-empty sequence of positive temperatures.
      instance_weight, batch_weight, class_weight: ``lambda_I, lambda_B, lambda_C``
        (reference: 1, 1, 1).
      weights: optional ``[batch]`` example multiplicities.

    References:
      Jin, Wang, Lin, "Multi-Level Logit Distillation", CVPR 2023.
    """
    _check_logit_pair(student_logits, teacher_logits)
    temps = tuple(temperatures) if isinstance(temperatures, (list, tuple)) else None
    if not temps:
        raise ValueError(f"temperatures must be a non-empty list or tuple of positive "
                         f"floats, got {temperatures!r}.")
    for t in temps:
        check_positive(t, "temperatures")
    for v, n in ((instance_weight, "instance_weight"), (batch_weight, "batch_weight"),
                 (class_weight, "class_weight")):
        check_nonnegative(v, n)
    w = multiplicities(weights, student_logits.shape[0])
    total_w = jnp.sum(w)
    num_classes = student_logits.shape[-1]
    total = jnp.zeros((), jnp.float32)
    for tau in temps:
        kl = tau**2 * (w @ kl_to_teacher(student_logits, teacher_logits, tau)) / total_w
        ps = jax.nn.softmax(student_logits.astype(jnp.float32) / tau, axis=-1)
        pt = jax.nn.softmax(teacher_logits.astype(jnp.float32) / tau, axis=-1)
        batch_term = (w @ ((pt @ pt.T - ps @ ps.T) ** 2) @ w) / total_w
        class_gram = lambda p: (p * w[:, None]).T @ p  # noqa: E731
        class_term = jnp.sum((class_gram(pt) - class_gram(ps)) ** 2) / num_classes
        total = total + (instance_weight * kl + batch_weight * batch_term
                         + class_weight * class_term)
    return total
