"""DG objectives against independent NumPy transcriptions of DomainBed's algorithms.

The references loop over environments exactly as ``domainbed/algorithms.py`` does for
one minibatch per environment (here: the members of each environment in the batch).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses import robust as R


def _batch(seed=0, b=24, p=3, d=4):
    rng = np.random.default_rng(seed)
    part = rng.integers(0, p, b)
    part[:p] = np.arange(p)  # every partition present
    return (rng.gamma(2.0, 0.5, b).astype(np.float32), part,
            rng.normal(size=(b, d)).astype(np.float32))


def _env_losses(l, part, p):
    return np.array([l[part == e].mean() for e in range(p)])


def test_groupdro_matches_domainbed():
    l, part, _ = _batch()
    q = np.array([0.2, 0.5, 0.3], np.float32)
    eta = 0.7
    # DomainBed GroupDRO.update: q[m] *= exp(eta * losses[m]); q /= q.sum(); dot(losses, q)
    losses = _env_losses(l, part, 3)
    q_ref = q * np.exp(eta * losses)
    q_ref /= q_ref.sum()
    loss, q_new = R.groupdro_loss(l, part, q, 3, eta)
    np.testing.assert_allclose(q_new, q_ref, rtol=1e-5)
    np.testing.assert_allclose(loss, losses @ q_ref, rtol=1e-5)
    # the weights are constants of the loss: d loss / d l_i = q_e / n_e
    g = jax.grad(lambda v: R.groupdro_loss(v, part, q, 3, eta)[0])(jnp.asarray(l))
    n = np.bincount(part, minlength=3)
    np.testing.assert_allclose(g, q_ref[part] / n[part], rtol=1e-5)


def test_groupdro_absent_partition_keeps_its_weight_ratio():
    l = np.array([1.0, 2.0, 3.0], np.float32)
    part = np.array([0, 0, 2])
    q = np.array([0.25, 0.5, 0.25], np.float32)
    loss, q_new = R.groupdro_loss(l, part, q, 3, 1.0)
    raw = q * np.exp([1.5, 0.0, 3.0])  # partition 1 absent: factor 1, loss 0
    np.testing.assert_allclose(q_new, raw / raw.sum(), rtol=1e-5)
    np.testing.assert_allclose(loss, (np.asarray(q_new) * [1.5, 0.0, 3.0]).sum(), rtol=1e-5)


def test_vrex_matches_domainbed():
    l, part, _ = _batch(1)
    losses = _env_losses(l, part, 3)
    mean = losses.mean()
    penalty = ((losses - mean) ** 2).mean()
    np.testing.assert_allclose(R.vrex_loss(l, part, 3, 10.0), mean + 10.0 * penalty,
                               rtol=1e-5)
    # an absent partition is left out of the mean and the variance
    part2 = np.where(part == 2, 1, part)
    ref = _env_losses(l, part2, 2)
    np.testing.assert_allclose(R.vrex_loss(l, part2, 3, 2.0),
                               ref.mean() + 2.0 * ref.var(), rtol=1e-5)


def _mmd_mean_cov(x, y):  # DomainBed AbstractMMD.mmd with kernel_type="mean_cov"
    mx, my = x.mean(0, keepdims=True), y.mean(0, keepdims=True)
    cx, cy = x - mx, y - my
    cova_x = cx.T @ cx / (len(x) - 1)
    cova_y = cy.T @ cy / (len(y) - 1)
    return ((mx - my) ** 2).mean() + ((cova_x - cova_y) ** 2).mean()


def test_coral_matches_domainbed():
    l, part, f = _batch(2, b=30, p=3, d=5)
    nmb = 3
    objective, penalty = 0.0, 0.0
    for i in range(nmb):
        objective += l[part == i].mean()
        for j in range(i + 1, nmb):
            penalty += _mmd_mean_cov(f[part == i].astype(np.float64),
                                     f[part == j].astype(np.float64))
    objective /= nmb
    penalty /= nmb * (nmb - 1) / 2
    np.testing.assert_allclose(R.coral_penalty(f, part, 3), penalty, rtol=1e-4)
    np.testing.assert_allclose(R.coral_loss(l, f, part, 3, 0.5), objective + 0.5 * penalty,
                               rtol=1e-4)


def test_coral_skips_partitions_with_fewer_than_two_members():
    _, part, f = _batch(3, b=20, p=2, d=3)
    part = part.copy()
    part[0] = 2  # partition 2 has one member: no pair with it
    part[1:] = np.where(part[1:] == 2, 0, part[1:])
    ref = _mmd_mean_cov(f[part == 0].astype(np.float64), f[part == 1].astype(np.float64))
    np.testing.assert_allclose(R.coral_penalty(f, part, 3), ref, rtol=1e-4)
    assert float(R.coral_penalty(f, np.zeros(20, int), 3)) == 0.0  # one partition


def test_identical_partitions_have_no_penalty():
    l = np.tile(np.array([0.5, 1.0, 2.0], np.float32), 4)
    f = np.tile(np.eye(3, dtype=np.float32), (4, 1))
    part = np.repeat([0, 1, 2, 3], 3)
    assert float(R.vrex_penalty(l, part, 4)[0]) == pytest.approx(0.0, abs=1e-7)
    assert float(R.coral_penalty(f, part, 4)) == pytest.approx(0.0, abs=1e-7)


def test_bad_inputs_name_the_argument():
    l, part, f = _batch()
    with pytest.raises(ValueError, match="partition must have shape"):
        R.vrex_loss(l, part[:-1], 3)
    with pytest.raises(ValueError, match="num_partitions must be a positive int"):
        R.partition_means(l, part, 0)
    with pytest.raises(ValueError, match=r"q must have shape \(3,\)"):
        R.groupdro_loss(l, part, np.ones(2), 3)
