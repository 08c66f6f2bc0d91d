"""Tests of kdjax.faithful: metrics against numpy, the chain
sampled <= PGD <= certified (IBP, CROWN-IBP, CROWN) on random teacher/student pairs,
exactness for identical networks and at eps = 0, training pieces, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax import faithful as F
from kdjax.models import CNN1D, CNN2D, MLP

TOL = 1e-5


def _softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _net(module, x, seed, bn_scale=0.5):
    v = module.init(jax.random.key(seed), x[:1])
    if "batch_stats" in v:
        leaves, tree = jax.tree_util.tree_flatten(v["batch_stats"])
        ks = jax.random.split(jax.random.key(seed + 1), len(leaves))
        v = {**v, "batch_stats": jax.tree_util.tree_unflatten(
            tree, [a + bn_scale * jax.random.uniform(k, a.shape) for a, k in zip(leaves, ks)])}
    return lambda z: module.apply(v, z, train=False)[0]


# ----------------------------------------------------------------------- metrics


def test_metrics_match_numpy():
    rng = np.random.default_rng(0)
    zs = jnp.asarray(rng.normal(size=(200, 6)) * 2, jnp.float32)
    zt = jnp.asarray(rng.normal(size=(200, 6)) * 2, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 6, 200), jnp.int32)
    ps, pt = _softmax(zs), _softmax(zt)
    y = pt.argmax(-1)
    d = ps[np.arange(200), y] - pt[np.arange(200), y]
    np.testing.assert_allclose(F.confidence_gap(zs, zt), np.abs(d), atol=1e-6)
    np.testing.assert_allclose(F.confidence_gap(zs, zt, kind="over"), d, atol=1e-6)
    np.testing.assert_allclose(F.confidence_gap(zs, zt, kind="under"), -d, atol=1e-6)
    dis = (ps.argmax(-1) != y).astype(float)
    np.testing.assert_allclose(F.label_disagreement(zs, zt), dis)
    zn = np.asarray(zs, np.float64)
    marg = np.where(np.eye(6, dtype=bool)[y], -np.inf, zn).max(-1) - zn[np.arange(200), y]
    np.testing.assert_allclose(F.disagreement_margin(zs, jnp.asarray(y, jnp.int32)), marg,
                               rtol=1e-6, atol=1e-5)
    # relative ECE, independent loop over bins, on the teacher-correct points
    w = (y == np.asarray(labels)).astype(float)
    conf = ps.max(-1)
    bins = np.minimum((conf * 10).astype(int), 9)
    ece = sum(abs(((1 - dis) * w)[bins == b].sum() - (conf * w)[bins == b].sum())
              for b in range(10)) / w.sum()
    cal = F.relative_calibration(zs, zt, labels, num_bins=10)
    np.testing.assert_allclose(cal["relative_ece"], ece, atol=1e-5)
    np.testing.assert_allclose(cal["count"], w.sum())
    np.testing.assert_allclose(cal["gap"], (np.abs(d) * w).sum() / w.sum(), atol=1e-6)
    np.testing.assert_allclose(cal["over"], (np.maximum(d, 0) * w).sum() / w.sum(),
                               atol=1e-6)
    np.testing.assert_allclose(cal["student_confidence"],
                               (ps[np.arange(200), y] * w).sum() / w.sum(), atol=1e-6)
    np.testing.assert_allclose(cal["disagreement"], (dis * w).sum() / w.sum(), atol=1e-6)
    # a student equal to the teacher is perfectly relatively calibrated only if the
    # teacher's confidence matches agreement (1): ECE = mean(1 - conf)
    np.testing.assert_allclose(F.relative_ece(zt, zt), np.mean(1 - pt.max(-1)), atol=1e-5)


def test_probability_bounds_closed_form():
    lo = jnp.array([[0.0, 1.0, 2.0]])
    up = jnp.array([[0.0, 3.0, 4.0]])
    pl, pu = F.probability_bounds(lo, up)
    np.testing.assert_allclose(pl, 1 / (1 + np.exp(-1) + np.exp(-2)), rtol=1e-6)
    np.testing.assert_allclose(pu, 1 / (1 + np.exp(-3) + np.exp(-4)), rtol=1e-6)


# ---------------------------------------------------------- the chain of bounds

OBJECTIVES = ("gap", "over", "disagree")  # "under" is "over" with the sign flipped
PAIRS = {
    # teacher, student, input shape, batch
    "mlp": (lambda: MLP(5, hidden=(32, 32)), lambda: MLP(5, hidden=(16,)), (10,), 384),
    "cnn1d_bn": (lambda: CNN1D(4, channels=(6, 8), use_bn=True),
                 lambda: CNN1D(4, channels=(4,), use_bn=True), (16,), 128),
    "cnn2d": (lambda: CNN2D(4, channels=(4, 6), use_bn=True),
              lambda: CNN2D(4, channels=(4,), use_bn=False), (8, 8, 1), 128),
}


@pytest.fixture(scope="module", params=["mlp", "cnn2d",
                                        pytest.param("cnn1d_bn", marks=pytest.mark.slow)])
def chain(request):
    mt, ms, shape, batch = PAIRS[request.param]
    x = jax.random.uniform(jax.random.key(1), (batch,) + shape)
    tf, sf = _net(mt(), x, 10), _net(ms(), x, 20)
    clip = (0.0, 1.0)

    @jax.jit
    def run(x, eps):
        out = {}
        for obj in OBJECTIVES:
            out["samp_" + obj] = F.sampled_gap(tf, sf, x, eps=eps, num_samples=24,
                                               key=jax.random.key(3), clip=clip,
                                               objective=obj)[0]
            out["pgd_" + obj], out["adv_" + obj] = F.pgd_gap(
                tf, sf, x, eps=eps, steps=15, restarts=2, key=jax.random.key(4), clip=clip,
                objective=obj)
        for m in ("ibp", "crown-ibp", "crown"):
            mb = F.margin_bounds(tf, sf, x, eps=eps, method=m, clip=clip)
            out[m] = F.gap_upper_bound(mb)
            if m != "crown-ibp":
                out[m + "_cert"] = F.certify(tf, sf, x, eps=eps, delta=0.05, method=m,
                                             clip=clip)
        return out

    eps = 0.03
    return request.param, tf, sf, x, eps, run(x, eps), run(x, 0.0)


def test_sampled_le_pgd_le_certified(chain):
    name, _, _, x, _, out, _ = chain
    for obj in OBJECTIVES:
        assert bool(jnp.all(out["samp_" + obj] <= out["pgd_" + obj] + TOL)), (name, obj)
    for m in ("ibp", "crown-ibp", "crown"):
        for obj in ("gap", "over"):
            assert bool(jnp.all(out["pgd_" + obj] <= out[m][obj] + TOL)), (name, m, obj)
        assert bool(jnp.all(out[m]["gap"] >= 0))
    ratio = float(jnp.mean(out["crown"]["gap"])) / float(jnp.mean(out["ibp"]["gap"]))
    assert float(jnp.mean(out["crown"]["gap"])) <= float(jnp.mean(out["ibp"]["gap"])) + TOL
    print(f"{name}: mean gap PGD {float(out['pgd_gap'].mean()):.4f}, CROWN "
          f"{float(out['crown']['gap'].mean()):.4f}, IBP {float(out['ibp']['gap'].mean()):.4f}"
          f" (CROWN/IBP {ratio:.3f})")


def test_adversarial_points_are_in_the_ball_and_achieve_the_value(chain):
    _, tf, sf, x, eps, out, _ = chain
    y = F.teacher_labels(tf(x))
    for obj in ("gap", "disagree"):
        xa = out["adv_" + obj]
        assert float(jnp.max(jnp.abs(xa - x))) <= eps + 1e-6
        assert float(jnp.min(xa)) >= 0.0 and float(jnp.max(xa)) <= 1.0
        v = F.gap_objective(sf(xa), tf(xa), y, obj)
        np.testing.assert_allclose(v, out["pgd_" + obj], rtol=1e-4, atol=1e-5)


def test_certificates_are_consistent_with_attacks(chain):
    _, _, _, _, _, out, _ = chain
    for m in ("ibp", "crown"):
        c = out[m + "_cert"]
        # certified agreement: PGD cannot make the student's argmax differ from y
        assert bool(jnp.all(jnp.where(c["agree"], out["pgd_disagree"] <= TOL, True)))
        # certified faithful: PGD cannot find a gap above delta
        assert bool(jnp.all(jnp.where(c["faithful"], out["pgd_gap"] <= 0.05 + TOL, True)))
        np.testing.assert_allclose(c["gap_upper"], out[m]["gap"], rtol=1e-5, atol=1e-6)
    # full CROWN certifies at least as many points as IBP on these nets
    assert int(out["crown_cert"]["agree"].sum()) >= int(out["ibp_cert"]["agree"].sum())


def test_eps_zero_bounds_are_tight(chain):
    _, tf, sf, x, _, _, out0 = chain
    gap = F.confidence_gap(sf(x), tf(x))
    over = F.confidence_gap(sf(x), tf(x), kind="over")
    for m in ("ibp", "crown-ibp", "crown"):
        np.testing.assert_allclose(out0[m]["gap"], gap, atol=2e-5)
        np.testing.assert_allclose(out0[m]["over"], over, atol=2e-5)
    np.testing.assert_allclose(out0["pgd_gap"], gap, atol=1e-6)
    np.testing.assert_allclose(out0["samp_gap"], gap, atol=1e-6)


def test_identical_networks_have_zero_gap_and_zero_bounds():
    module = CNN1D(4, channels=(4, 6), use_bn=True)
    x = jax.random.uniform(jax.random.key(0), (64, 16))
    tf = _net(module, x, 5)
    v_student = _net(module, x, 5)  # same parameters, built again (equal values)

    @jax.jit
    def run(x):
        pgd = F.pgd_gap(tf, v_student, x, eps=0.1, steps=5, key=jax.random.key(1))[0]
        ub = {m: F.gap_upper_bound(F.margin_bounds(tf, v_student, x, eps=0.1, method=m))
              for m in ("ibp", "crown-ibp", "crown")}
        cert = F.certify(tf, v_student, x, eps=0.1, delta=0.0)
        pen = F.faithful_penalty(tf, v_student, x, eps=0.1, key=jax.random.key(2),
                                 certified_weight=1.0, steps=3)
        return pgd, ub, cert, pen

    pgd, ub, cert, pen = run(x)
    assert bool(jnp.all(pgd == 0.0))
    for m in ub:
        for k in ("gap", "over", "under"):
            assert bool(jnp.all(ub[m][k] == 0.0)), (m, k)
    assert bool(jnp.all(cert["faithful"]))
    assert float(pen) == 0.0


# ------------------------------------------------------------- training pieces


def test_faithful_penalty_values_and_gradients():
    x = jax.random.uniform(jax.random.key(0), (32, 6))
    mt, ms = MLP(3, hidden=(16,)), MLP(3, hidden=(8,))
    vt, vs = mt.init(jax.random.key(1), x), ms.init(jax.random.key(2), x)
    tf = lambda z: mt.apply(vt, z)[0]  # noqa: E731

    def pen(params, adv, cert, bound="ibp"):
        sf = lambda z: ms.apply(params, z)[0]  # noqa: E731
        return F.faithful_penalty(tf, sf, x, eps=0.05, key=jax.random.key(3),
                                  adversarial_weight=adv, certified_weight=cert,
                                  steps=5, bound=bound, reduction="none")

    pen_j = jax.jit(pen, static_argnums=(1, 2, 3))
    a, c = pen_j(vs, 1.0, 0.0), pen_j(vs, 0.0, 1.0)
    sf = lambda z: ms.apply(vs, z)[0]  # noqa: E731
    ref, _ = F.pgd_gap(tf, sf, x, eps=0.05, steps=5, key=jax.random.key(3))
    np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-6)
    assert bool(jnp.all(c >= a - TOL))  # the certified bound dominates the attack
    np.testing.assert_allclose(pen_j(vs, 2.0, 3.0), 2 * a + 3 * c, rtol=1e-5, atol=1e-6)
    for adv, bound in ((1.0, "ibp"), (0.0, "crown-ibp")):
        g = jax.jit(jax.grad(lambda p: jnp.mean(pen(p, adv, 1.0, bound))))(vs)
        leaves = jax.tree_util.tree_leaves(g)
        assert all(bool(jnp.all(jnp.isfinite(v))) for v in leaves)
        assert sum(float(jnp.sum(jnp.abs(v))) for v in leaves) > 0
    # directional derivative of the certified IBP term matches finite differences
    dirn = jax.tree_util.tree_map(lambda p: jax.random.normal(jax.random.key(9), p.shape), vs)
    f = jax.jit(lambda t: jnp.mean(pen(jax.tree_util.tree_map(  # noqa: E731
        lambda p, d: p + t * d, vs, dirn), 0.0, 1.0)))
    h = 1e-3
    fd = (f(h) - f(-h)) / (2 * h)
    np.testing.assert_allclose(jax.jit(jax.grad(f))(0.0), fd, rtol=2e-2, atol=1e-4)


def test_eps_ramp():
    s = F.eps_ramp(0.2, warmup_steps=5, ramp_steps=10)
    np.testing.assert_allclose([float(s(t)) for t in (0, 5, 10, 15, 100)],
                               [0.0, 0.0, 0.1, 0.2, 0.2], atol=1e-7)
    with pytest.raises(ValueError, match="ramp_steps"):
        F.eps_ramp(0.1, ramp_steps=0)


def test_adversarial_distillation_inputs_increase_kl():
    from kdjax.losses.logit import kl_to_teacher
    x = jax.random.uniform(jax.random.key(0), (64, 8))
    ms = MLP(4, hidden=(16,))
    vs = ms.init(jax.random.key(1), x)
    sf = lambda z: ms.apply(vs, z)[0]  # noqa: E731
    zt = jax.random.normal(jax.random.key(2), (64, 4))
    xa = jax.jit(lambda x: F.adversarial_distillation_inputs(
        zt, sf, x, eps=0.1, key=jax.random.key(3), steps=10, clip=(0.0, 1.0)))(x)
    assert float(jnp.max(jnp.abs(xa - x))) <= 0.1 + 1e-6
    assert float(jnp.min(xa)) >= 0.0 and float(jnp.max(xa)) <= 1.0
    kl_adv, kl_clean = kl_to_teacher(sf(xa), zt), kl_to_teacher(sf(x), zt)
    assert bool(jnp.all(kl_adv >= kl_clean - 1e-6))
    xr = jnp.clip(x + 0.1 * jax.random.uniform(jax.random.key(4), x.shape, minval=-1,
                                               maxval=1), 0, 1)
    assert float(jnp.mean(kl_adv)) > float(jnp.mean(kl_to_teacher(sf(xr), zt)))


# --------------------------------------------------------- jit, sharding, errors


def test_jit_equals_eager_and_sharded(n_devices):
    x = jax.random.uniform(jax.random.key(0), (16, 5))
    mt, ms = MLP(3, hidden=(8,)), MLP(3, hidden=(6,))
    tf = _net(mt, x, 1)
    sf = _net(ms, x, 2)

    def run(x):
        mb = F.margin_bounds(tf, sf, x, eps=0.05, method="crown-ibp")
        pgd = F.pgd_gap(tf, sf, x, eps=0.05, steps=4, key=jax.random.key(0))[0]
        return F.gap_upper_bound(mb)["gap"], pgd

    eager = run(x)
    jitted = jax.jit(run)
    mesh = jax.make_mesh((n_devices,), ("data",))
    sharded = jitted(jax.device_put(x, NamedSharding(mesh, P("data"))))
    for e, j, s in zip(eager, jitted(x), sharded):
        np.testing.assert_allclose(e, j, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(j, s, rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    x = jnp.ones((4, 3))
    f3 = lambda z: jnp.concatenate([z, -z[:, :1]], axis=1)  # noqa: E731  (K = 4)
    f2 = lambda z: z[:, :2]  # noqa: E731
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        F.pgd_gap(f3, f3, x, eps=-0.1, key=key)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        F.margin_bounds(f3, f3, x, eps=-1.0)
    with pytest.raises(ValueError, match=r"same shape.*\(4, 4\).*\(4, 2\)"):
        F.pgd_gap(f3, f2, x, eps=0.1, key=key)
    with pytest.raises(ValueError, match="objective must be one of"):
        F.pgd_gap(f3, f3, x, eps=0.1, key=key, objective="kl")
    with pytest.raises(ValueError, match="restarts must be an int >= 1"):
        F.pgd_gap(f3, f3, x, eps=0.1, key=key, restarts=0)
    with pytest.raises(ValueError, match="method must be one of"):
        F.margin_bounds(f3, f3, x, eps=0.1, method="lp")
    with pytest.raises(ValueError, match="labels must lie in"):
        F.certify(f3, f3, x, eps=0.1, delta=0.1, labels=jnp.array([0, 1, 2, 9]))
    with pytest.raises(ValueError, match="delta must be >= 0"):
        F.certify(f3, f3, x, eps=0.1, delta=-0.1)
    with pytest.raises(ValueError, match=r"student_logits and teacher_logits must have"):
        F.confidence_gap(jnp.ones((2, 3)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="key must be a PRNG key"):
        F.faithful_penalty(f3, f3, x, eps=0.1)
    with pytest.raises(ValueError, match="teacher_fn.*shape"):
        F.pgd_gap(lambda z: z[0], f3, x, eps=0.1, key=key)
    with pytest.raises(TypeError, match="bounds must be a MarginBounds"):
        F.gap_upper_bound((1, 2))
