"""Domain-generalisation training objectives (DomainBed definitions) as pure functions.

The robust teachers of ShiftKD's question "does distillation carry a teacher's
robustness over to the student?" are trained with these objectives. Each takes
per-example losses (and features) of one batch with an integer partition label per
example (``partition``: the environment, or a group such as label x spurious attribute)
and returns a scalar. DomainBed (Gulrajani & Lopez-Paz 2021,
``domainbed/algorithms.py``) feeds one minibatch per environment; here a batch is
drawn from the pooled training set and the per-partition quantities are masked means
over the members present in the batch (a partition absent from the batch is left out:
its loss counts 0 and, in Group DRO, its weight is not updated). That is the one
deliberate deviation from DomainBed, forced by a single shuffled batch.

* :func:`partition_means`: ``R_e = sum_{i in e} l_i / n_e`` and the counts ``n_e``.
* :func:`groupdro_loss`: Group DRO (Sagawa et al. 2020, Alg. 1; DomainBed ``GroupDRO``):
  ``q_e <- q_e exp(eta R_e)``, ``q <- q / sum q``, loss ``sum_e q_e R_e``
  (DomainBed ``groupdro_eta`` 1e-2).
* :func:`vrex_loss`: V-REx (Krueger et al. 2021, Eq. 8; DomainBed ``VREx``):
  ``mean_e R_e + lambda Var_e(R_e)`` with the population variance over the present
  environments; DomainBed ``vrex_lambda`` 10 after ``vrex_penalty_anneal_iters`` 500
  steps, 1 before (the schedule lives in :mod:`kdjax.methods.robust`).
* :func:`coral_penalty` / :func:`coral_loss`: Deep CORAL (Sun & Saenko 2016; DomainBed
  ``CORAL``, ``mmd`` with ``kernel_type="mean_cov"``): for each pair of partitions
  ``mean((mu_i - mu_j)^2) + mean((C_i - C_j)^2)`` with unbiased covariances
  ``C = X_c^T X_c / (n - 1)``, averaged over pairs; loss ``mean_e R_e + gamma
  penalty`` (DomainBed ``mmd_gamma`` 1). Pairs where a partition has fewer than 2
  members in the batch are left out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax._checks import check_float_array

__all__ = ["partition_means", "groupdro_update", "groupdro_loss", "vrex_penalty",
           "vrex_loss", "coral_penalty", "coral_loss"]


def _check(values, partition, num_partitions: int):
    values = jnp.asarray(values)
    partition = jnp.asarray(partition)
    if values.ndim != 1:
        raise ValueError(f"per_example must have shape [B], got {values.shape}.")
    if partition.shape != values.shape:
        raise ValueError(f"partition must have shape {values.shape} (one label per "
                         f"example), got {partition.shape}.")
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) or \
            num_partitions < 1:
        raise ValueError(f"num_partitions must be a positive int, got {num_partitions!r}.")
    return values.astype(jnp.float32), partition.astype(jnp.int32)


def partition_means(per_example, partition, num_partitions: int):
    """``(R [P], n [P])``: mean of ``per_example`` over each partition's members in the
    batch (0 where none) and the member counts."""
    values, partition = _check(per_example, partition, num_partitions)
    onehot = jax.nn.one_hot(partition, num_partitions, dtype=jnp.float32)  # [B, P]
    counts = onehot.sum(0)
    sums = onehot.T @ values
    return sums / jnp.maximum(counts, 1.0), counts


def groupdro_update(q, partition_losses, counts, eta: float):
    """Exponentiated-gradient step of Group DRO: ``q_e exp(eta R_e [n_e > 0])``,
    normalised to sum 1 (the weights are a constant of the loss: no gradient)."""
    q = jnp.asarray(q, jnp.float32)
    step = jnp.where(counts > 0, eta * jax.lax.stop_gradient(partition_losses), 0.0)
    # in log space: q may hold very small weights after many steps
    logq = jnp.log(jnp.maximum(q, 1e-30)) + step
    return jax.nn.softmax(logq)


def groupdro_loss(per_example, partition, q, num_partitions: int, eta: float = 1e-2):
    """Group DRO (Sagawa et al. 2020; DomainBed ``GroupDRO``): ``(sum_e q'_e R_e, q')``
    with ``q' = groupdro_update(q, R, n, eta)`` (``q`` is carried between steps, start
    ``1 / P``)."""
    q = jnp.asarray(q)
    if q.shape != (num_partitions,):
        raise ValueError(f"q must have shape ({num_partitions},), got {q.shape}.")
    r, n = partition_means(per_example, partition, num_partitions)
    q_new = groupdro_update(q, r, n, eta)
    return jnp.dot(q_new, r), q_new


def vrex_penalty(per_example, partition, num_partitions: int):
    """``(Var_e R_e, mean_e R_e)`` over the partitions present in the batch (population
    variance, DomainBed ``((losses - mean) ** 2).mean()``)."""
    r, n = partition_means(per_example, partition, num_partitions)
    present = (n > 0).astype(jnp.float32)
    k = jnp.maximum(present.sum(), 1.0)
    mean = (r * present).sum() / k
    return (present * (r - mean) ** 2).sum() / k, mean


def vrex_loss(per_example, partition, num_partitions: int, penalty_weight: float = 10.0):
    """V-REx (Krueger et al. 2021, Eq. 8): ``mean_e R_e + penalty_weight Var_e R_e``."""
    var, mean = vrex_penalty(per_example, partition, num_partitions)
    return mean + penalty_weight * var


def coral_penalty(features, partition, num_partitions: int):
    """Mean over pairs ``i < j`` of partitions (both with >= 2 members in the batch) of
    ``mean_d (mu_i - mu_j)_d^2 + mean_{d,d'} (C_i - C_j)_{dd'}^2``; 0 when no pair."""
    features = jnp.asarray(features)
    check_float_array(features, "features", ndim=2)
    _, partition = _check(jnp.zeros(features.shape[0]), partition, num_partitions)
    f = features.astype(jnp.float32)
    onehot = jax.nn.one_hot(partition, num_partitions, dtype=jnp.float32)  # [B, P]
    n = onehot.sum(0)
    mu = (onehot.T @ f) / jnp.maximum(n, 1.0)[:, None]                    # [P, D]
    centred = f[None, :, :] - mu[:, None, :]                              # [P, B, D]
    masked = centred * onehot.T[:, :, None]
    cov = jnp.einsum("pbd,pbe->pde", masked, masked) / jnp.maximum(n - 1.0, 1.0)[:, None,
                                                                                  None]
    ok = (n >= 2).astype(jnp.float32)
    pair = jnp.triu(ok[:, None] * ok[None, :], k=1)                       # i < j
    mean_diff = ((mu[:, None, :] - mu[None, :, :]) ** 2).mean(-1)
    cov_diff = ((cov[:, None] - cov[None, :]) ** 2).mean((-1, -2))
    total = (pair * (mean_diff + cov_diff)).sum()
    return total / jnp.maximum(pair.sum(), 1.0)


def coral_loss(per_example, features, partition, num_partitions: int,
               gamma: float = 1.0):
    """Deep CORAL (DomainBed ``CORAL``): ``mean_e R_e + gamma coral_penalty``."""
    r, n = partition_means(per_example, partition, num_partitions)
    present = (n > 0).astype(jnp.float32)
    objective = (r * present).sum() / jnp.maximum(present.sum(), 1.0)
    return objective + gamma * coral_penalty(features, partition, num_partitions)
