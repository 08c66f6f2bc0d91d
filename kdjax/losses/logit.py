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
    check_positive,
    check_same_shape,
)
from kdjax.losses._utils import reduce_per_example

__all__ = ["kd", "cross_entropy", "kl_to_teacher"]


def _check_logit_pair(student_logits, teacher_logits):
    check_float_array(student_logits, "student_logits", ndim=2)
    check_float_array(teacher_logits, "teacher_logits", ndim=2)
    check_same_shape(student_logits, teacher_logits, "student_logits", "teacher_logits")


def kl_to_teacher(student_logits: chex.Array, teacher_logits: chex.Array,
                  temperature: chex.Numeric = 1.0) -> chex.Array:
    """Per-example ``KL(p^T || p^S)`` with ``p = softmax(z / temperature)``; shape ``[B]``.

    Computed from log-softmaxes (stable for large logits); ``0 * log 0`` terms are 0.
    """
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    p_t = jnp.exp(t)
    return jnp.sum(jnp.where(p_t > 0, p_t * (t - s), 0.0), axis=-1)


def kd(student_logits: chex.Array, teacher_logits: chex.Array,
       temperature: chex.Numeric = 4.0, *, weights: chex.Array | None = None,
       reduction: str = "mean") -> chex.Array:
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

    Returns:
      A float32 scalar (or ``[batch]`` for ``reduction="none"``).

    References:
      Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015,
      arXiv:1503.02531.
    """
    _check_logit_pair(student_logits, teacher_logits)
    check_positive(temperature, "temperature")
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
