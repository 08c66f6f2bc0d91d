"""Per-example weights of every loss: numpy references of the weighted definitions and
the repeated-rows identity (integer weights == the unweighted loss on the batch with
row i repeated w_i times) wherever the docstring claims it."""

import inspect

import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses as L

R = np.random.default_rng(0)
B = 6
COUNTS = np.array([1, 3, 0, 2, 1, 2], np.float32)   # integer weights, one zero


def _rep(x, counts=COUNTS):
    return np.repeat(np.asarray(x), counts.astype(int), axis=0)


S, T = R.normal(size=(B, 5)).astype(np.float32), R.normal(size=(B, 4)).astype(np.float32)
ZS, ZT = R.normal(size=(B, 7)).astype(np.float32), R.normal(size=(B, 7)).astype(np.float32)
E1, E2 = R.normal(size=(B, 4)).astype(np.float32), R.normal(size=(B, 4)).astype(np.float32)
W = R.uniform(0.2, 2.0, size=B).astype(np.float32)


def _softmax(z, tau=1.0):
    z = np.asarray(z, np.float64) / tau
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _unit(x, axis=-1):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


# --- independent numpy formulas of the weighted definitions -------------------------------

def np_sp(s, t, w):
    def g(f):
        a = f @ f.T
        return a / np.sqrt((a * a) @ w)[:, None]
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    return sum(w[i] * w[j] * (g(s)[i, j] - g(t)[i, j]) ** 2
               for i in range(len(w)) for j in range(len(w))) / w.sum() ** 2


def np_pkt(s, t, w, eps=1e-7):
    def p(f):
        f = np.asarray(f, np.float64)
        f = f / (np.linalg.norm(f, axis=1, keepdims=True) + eps)
        k = (f @ f.T + 1) / 2
        return k / (k @ w)[:, None]
    ps, pt = p(s), p(t)
    return np.sum(np.outer(w, w) * pt * np.log((pt + eps) / (ps + eps))) / w.sum() ** 2


def np_cc(s, t, w, gamma=0.4, order=2):
    import math

    def psi(f):
        g = _unit(f) @ _unit(f).T
        return np.exp(-2 * gamma) * sum((2 * gamma) ** p / math.factorial(p) * g**p
                                        for p in range(order + 1))
    return np.sum(np.outer(w, w) * (psi(t) - psi(s)) ** 2) / w.sum() ** 2


def np_rkd_distance(s, t, w):
    def psi(f):
        f = np.asarray(f, np.float64)
        d = np.sqrt(np.maximum(((f[:, None] - f[None]) ** 2).sum(-1), 1e-12))
        np.fill_diagonal(d, 0.0)
        ww = np.outer(w, w) * (d > 0)
        return d / (np.sum(ww * d) / np.sum(ww))
    diff = np.abs(psi(s) - psi(t))
    hub = np.where(diff < 1, 0.5 * diff**2, diff - 0.5)
    return np.sum(np.outer(w, w) * hub) / w.sum() ** 2


def np_dist(zs, zt, w, tau=1.0, eps=1e-8):
    ys, yt = _softmax(zs, tau), _softmax(zt, tau)

    def pearson(a, b, v):
        v = v / v.sum()
        a, b = a - a @ v, b - b @ v
        return (v * a * b).sum() / (np.sqrt((v * a * a).sum() * (v * b * b).sum()) + 0.0)

    inter = sum(w[i] * pearson(ys[i], yt[i], np.ones(ys.shape[1]))
                for i in range(len(w))) / w.sum()
    intra = np.mean([pearson(ys[:, c], yt[:, c], w) for c in range(ys.shape[1])])
    return tau**2 * ((1 - inter) + (1 - intra))


def np_coss(s, t, w, tau_t=0.07, tau_s=0.1):
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    co = -(w * (_unit(s) * _unit(t)).sum(1)).sum() / w.sum()
    col = [(w * s[:, j] * t[:, j]).sum() / np.sqrt((w * s[:, j] ** 2).sum()
                                                  * (w * t[:, j] ** 2).sum())
           for j in range(s.shape[1])]
    return (co - np.mean(col)) / (tau_t * tau_s)


def np_mlkd(zs, zt, w, temps=(2.0, 3.0, 4.0, 5.0, 6.0)):
    total = 0.0
    for tau in temps:
        ps, pt = _softmax(zs, tau), _softmax(zt, tau)
        kl = (pt * (np.log(pt) - np.log(ps))).sum(1)
        total += tau**2 * (w * kl).sum() / w.sum()
        total += np.sum(np.outer(w, w) * (pt @ pt.T - ps @ ps.T) ** 2) / w.sum()
        total += np.sum(((pt * w[:, None]).T @ pt - (ps * w[:, None]).T @ ps) ** 2) / zs.shape[1]
    return total


BATCH_COUPLED = {
    # name: (kdjax call with weights, numpy formula, repeated-rows identity holds)
    "similarity_preserving": (lambda w: L.similarity_preserving(S, T, weights=w),
                              lambda w: np_sp(S, T, w), True),
    "pkt": (lambda w: L.pkt(S, T, weights=w), lambda w: np_pkt(S, T, w), True),
    "correlation_congruence": (lambda w: L.correlation_congruence(
        S, T, variant="taylor", weights=w), lambda w: np_cc(S, T, w), True),
    "rkd_distance": (lambda w: L.rkd_distance(S, T, weights=w),
                     lambda w: np_rkd_distance(S, T, w), False),
    "dist": (lambda w: L.dist(ZS, ZT, weights=w), lambda w: np_dist(ZS, ZT, w), True),
    "coss": (lambda w: L.coss(E1, E2, weights=w), lambda w: np_coss(E1, E2, w), True),
    "mlkd": (lambda w: L.mlkd(ZS, ZT, weights=w), lambda w: np_mlkd(ZS, ZT, w), True),
}


def _unweighted_on(name, counts):
    """The unweighted loss on the batch with rows repeated ``counts`` times."""
    f = {"similarity_preserving": lambda: L.similarity_preserving(_rep(S, counts), _rep(T, counts)),
         "pkt": lambda: L.pkt(_rep(S, counts), _rep(T, counts)),
         "correlation_congruence": lambda: L.correlation_congruence(
             _rep(S, counts), _rep(T, counts), variant="taylor"),
         "rkd_distance": lambda: L.rkd_distance(_rep(S, counts), _rep(T, counts)),
         "dist": lambda: L.dist(_rep(ZS, counts), _rep(ZT, counts)),
         "coss": lambda: L.coss(_rep(E1, counts), _rep(E2, counts)),
         "mlkd": lambda: L.mlkd(_rep(ZS, counts), _rep(ZT, counts))}[name]
    return float(f())


@pytest.mark.parametrize("name", sorted(BATCH_COUPLED))
def test_batch_coupled_weights_match_numpy_and_repeated_rows(name):
    call, ref, identity = BATCH_COUPLED[name]
    ones = np.ones(B, np.float32)
    np.testing.assert_allclose(float(call(None)), float(call(jnp.asarray(ones))), rtol=1e-6)
    np.testing.assert_allclose(float(call(jnp.asarray(ones))), ref(ones.astype(np.float64)),
                               rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(float(call(jnp.asarray(W))), ref(W.astype(np.float64)),
                               rtol=2e-4, atol=1e-6)
    if identity:
        np.testing.assert_allclose(float(call(jnp.asarray(COUNTS))),
                                   _unweighted_on(name, COUNTS), rtol=2e-4, atol=1e-6)


def test_rkd_angle_and_space_similarity_repeated_rows():
    c = COUNTS
    np.testing.assert_allclose(float(L.rkd_angle(S, T, weights=jnp.asarray(c))),
                               float(L.rkd_angle(_rep(S), _rep(T))), rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(float(L.space_similarity(E1, E2, weights=jnp.asarray(c))),
                               float(L.space_similarity(_rep(E1), _rep(E2))), rtol=1e-5)
    # rkd = 25 distance + 50 angle with the same weights
    w = jnp.asarray(W)
    np.testing.assert_allclose(
        float(L.rkd(S, T, weights=w)),
        25 * float(L.rkd_distance(S, T, weights=w)) + 50 * float(L.rkd_angle(S, T, weights=w)),
        rtol=1e-5)


def test_repdistiller_cc_weights_are_consecutive_pair_weights():
    d = np.abs(S - S[:, ::-1][:, :5])  # same-shape pair for the RepDistiller variant
    s, t = S, S[:, ::-1]
    w = W.astype(np.float64)
    delta = np.abs(s.astype(np.float64) - t)
    ww = w[:-1] * w[1:]
    ref = (ww * (delta[:-1] * delta[1:]).sum(1)).sum() / ww.sum()
    got = L.correlation_congruence(s, t.copy(), variant="repdistiller", weights=jnp.asarray(W))
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)
    del d


PER_EXAMPLE = {
    "kd": lambda s, t, **k: L.kd(s, t, **k),
    "dkd": lambda s, t, **k: L.dkd(s, t, jnp.argmax(t, 1), **k),
    "cross_entropy": lambda s, t, **k: L.cross_entropy(s, jnp.argmax(t, 1), **k),
    "cosine_distillation": lambda s, t, **k: L.cosine_distillation(s, t, **k),
    "disco": lambda s, t, **k: L.disco(s, t, **k),
    "crd": lambda s, t, **k: L.crd(s, t, **k),
    "fitnet": lambda s, t, **k: L.fitnet(s, t, **k),
    "hcl": lambda s, t, **k: L.hcl([s], [t], **k),
}


@pytest.mark.parametrize("name", sorted(PER_EXAMPLE))
def test_per_example_weights_sum_equals_repeated_rows(name):
    f = PER_EXAMPLE[name]
    got = float(f(ZS, ZT, weights=jnp.asarray(COUNTS), reduction="sum"))
    if name == "crd":   # in-batch negatives: the batch itself changes when rows repeat
        per = np.asarray(f(ZS, ZT, reduction="none"))
        np.testing.assert_allclose(got, float((COUNTS * per).sum()), rtol=1e-5)
        return
    np.testing.assert_allclose(got, float(f(_rep(ZS), _rep(ZT), reduction="sum")),
                               rtol=1e-5, atol=1e-6)
    # mean: (1/B) sum_i w_i l_i (KD-AIF's convention)
    per = np.asarray(f(ZS, ZT, reduction="none"))
    np.testing.assert_allclose(float(f(ZS, ZT, weights=jnp.asarray(W))),
                               float((W * per).mean()), rtol=1e-5)


def test_every_loss_takes_weights_or_marginals():
    import tests.losses.test_transforms as T_
    for name in T_.CASES:
        base = name.split("(")[0]
        params = inspect.signature(getattr(L, base)).parameters
        assert "weights" in params or {"a", "b"} <= set(params), base
