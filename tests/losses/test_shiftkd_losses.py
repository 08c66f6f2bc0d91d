"""MLKD, ReviewKD's HCL (and adaptive pooling), DisCo and Gromov-Wasserstein against
independent reference formulas (numpy, torch's adaptive_avg_pool2d, POT)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses as L

R = np.random.default_rng(3)


def _softmax(z, tau):
    z = np.asarray(z, np.float64) / tau
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_mlkd_matches_reference_code_transcription():
    """The authors' kd_loss + bc_loss + cc_loss summed over temperatures (loops)."""
    zs, zt = R.normal(size=(5, 4)), R.normal(size=(5, 4)) * 2
    total = 0.0
    for tau in (2.0, 3.0, 4.0, 5.0, 6.0):
        ps, pt = _softmax(zs, tau), _softmax(zt, tau)
        kl = np.mean([sum(pt[i, c] * np.log(pt[i, c] / ps[i, c]) for c in range(4))
                      for i in range(5)]) * tau**2
        bc = sum((pt[i] @ pt[j] - ps[i] @ ps[j]) ** 2 for i in range(5) for j in range(5)) / 5
        cc = sum((pt[:, a] @ pt[:, b] - ps[:, a] @ ps[:, b]) ** 2
                 for a in range(4) for b in range(4)) / 4
        total += kl + bc + cc
    got = L.mlkd(jnp.asarray(zs, jnp.float32), jnp.asarray(zt, jnp.float32))
    np.testing.assert_allclose(float(got), total, rtol=1e-5)
    only_kl = L.mlkd(jnp.asarray(zs, jnp.float32), jnp.asarray(zt, jnp.float32), [4.0],
                     batch_weight=0.0, class_weight=0.0)
    np.testing.assert_allclose(float(only_kl), float(L.kd(zs, zt, 4.0)), rtol=1e-5)
    with pytest.raises(ValueError, match="temperatures must be a non-empty"):
        L.mlkd(zs, zt, [])


def test_adaptive_avg_pool_matches_torch():
    torch = pytest.importorskip("torch")
    x = R.normal(size=(2, 7, 5, 3)).astype(np.float32)
    for size in [(4, 4), (2, 3), (1, 1), (7, 5)]:
        ref = torch.nn.functional.adaptive_avg_pool2d(
            torch.from_numpy(x).permute(0, 3, 1, 2), size).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(np.asarray(L.adaptive_avg_pool(x, size)), ref,
                                   rtol=1e-5, atol=1e-6)


def _np_pool(x, l):
    n = x.shape[1]
    out = np.zeros((x.shape[0], l, l, x.shape[-1]))
    for i in range(l):
        for j in range(l):
            a0, a1 = (i * n) // l, -((-(i + 1) * n) // l)
            b0, b1 = (j * n) // l, -((-(j + 1) * n) // l)
            out[:, i, j] = x[:, a0:a1, b0:b1].mean((1, 2))
    return out


def test_hcl_matches_reference_formula():
    """ReviewKD's hcl(): MSE + sum over pooled levels (4, 2, 1) with weights 1/2, 1/4,
    1/8 (levels >= h skipped), divided by the total weight, summed over stages."""
    fs = [R.normal(size=(3, 8, 8, 4)), R.normal(size=(3, 4, 4, 6)), R.normal(size=(3, 1, 1, 6))]
    ft = [f + R.normal(size=f.shape) * 0.5 for f in fs]
    ref = 0.0
    for s, t in zip(fs, ft):
        loss, cnt, tot = np.mean((s - t) ** 2), 1.0, 1.0
        for lv in (4, 2, 1):
            if lv >= s.shape[1]:
                continue
            cnt /= 2.0
            loss += np.mean((_np_pool(s, lv) - _np_pool(t, lv)) ** 2) * cnt
            tot += cnt
        ref += loss / tot
    got = L.hcl([jnp.asarray(v, jnp.float32) for v in fs], [jnp.asarray(v, jnp.float32) for v in ft])
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)
    with pytest.raises(ValueError, match="same length"):
        L.hcl(fs, ft[:2])


def test_disco_matches_formula_and_code_variant():
    s, t = R.normal(size=(6, 5)), R.normal(size=(6, 5)) * 3
    un = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(float(L.disco(s, t)), np.mean((un(s) - un(t)) ** 2), rtol=1e-5)
    np.testing.assert_allclose(float(L.disco(s, t, normalize_teacher=False)),
                               np.mean((un(s) - t) ** 2), rtol=1e-5)
    cos = (un(s) * un(t)).sum(1)
    np.testing.assert_allclose(np.asarray(L.disco(s, t, reduction="none")), (2 - 2 * cos) / 5,
                               rtol=1e-5)


def _np_gw(cx, cy, plan):
    """sum_{ijkl} (Cx_ik - Cy_jl)^2 T_ij T_kl by brute force."""
    d = (cx[:, None, :, None] - cy[None, :, None, :]) ** 2   # [i, j, k, l]
    return np.einsum("ijkl,ij,kl->", d, plan, plan)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gromov_wasserstein_against_pot(seed):
    ot = pytest.importorskip("ot")
    r = np.random.default_rng(seed)
    x, y = r.normal(size=(9, 3)), r.normal(size=(7, 5)) * 1.3
    cx = ((x[:, None] - x[None]) ** 2).sum(-1)
    cy = ((y[:, None] - y[None]) ** 2).sum(-1)
    p, q = np.full(9, 1 / 9), np.full(7, 1 / 7)
    ref = ot.gromov.gromov_wasserstein2(cx, cy, p, q, loss_fun="square_loss")
    val, plan = L.gromov_wasserstein(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32),
                                     return_plan=True)
    plan = np.asarray(plan, np.float64)
    np.testing.assert_allclose(plan.sum(1), p, atol=2e-3)
    np.testing.assert_allclose(plan.sum(0), q, atol=2e-3)
    # the value is the GW objective at the returned plan (independent brute force) ...
    np.testing.assert_allclose(float(val), _np_gw(cx, cy, plan), rtol=1e-4)
    # ... and it reaches POT's conditional-gradient optimum on these small clouds
    np.testing.assert_allclose(float(val), ref, rtol=0.03)


def test_gromov_wasserstein_isometry_invariance_and_gradient():
    r = np.random.default_rng(5)
    x = r.normal(size=(8, 3)).astype(np.float32)
    rot = np.linalg.qr(r.normal(size=(3, 3)))[0].astype(np.float32)
    y = (x @ rot.T + 4.0)[::-1].copy()
    assert float(L.gromov_wasserstein(x, y)) < 1e-3 * float(np.mean(
        ((x[:, None] - x[None]) ** 2).sum(-1)) ** 2)
    g = jax.grad(lambda v: L.gromov_wasserstein(v, 2.0 * y))(jnp.asarray(x))
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).sum()) > 0
    # the envelope gradient is that of the objective at the fixed plan
    _, plan = L.gromov_wasserstein(x, 2.0 * y, return_plan=True)

    def at_plan(v):
        cx = jnp.sum((v[:, None] - v[None]) ** 2, -1)
        cy = jnp.sum((2.0 * y[:, None] - 2.0 * y[None]) ** 2, -1)
        p, q = plan.sum(1), plan.sum(0)
        return p @ (cx * cx) @ p + q @ (cy * cy) @ q - 2 * jnp.sum((cx @ plan @ cy) * plan)
    np.testing.assert_allclose(np.asarray(g), np.asarray(jax.grad(at_plan)(jnp.asarray(x))),
                               rtol=1e-3, atol=1e-3)
