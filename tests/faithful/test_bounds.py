"""Tests of kdjax.faithful.bounds: IBP and CROWN over L-inf balls, on random networks.

Soundness is checked against many random points of each ball (the bounds must contain
every output), tightness at eps = 0 against the forward pass, and exactness of the
joint bound of two identical networks.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax.faithful.bounds import crown_bounds, ibp_bounds, interval_box
from kdjax.models import CNN1D, CNN2D, MLP, ResNet

TOL = 1e-5


def _perturb_stats(variables, key, scale=0.5):
    """Random BatchNorm running statistics (var stays positive)."""
    if "batch_stats" not in variables:
        return variables
    leaves, tree = jax.tree_util.tree_flatten(variables["batch_stats"])
    keys = jax.random.split(key, len(leaves))
    new = [leaf + scale * jax.random.uniform(k, leaf.shape) for leaf, k in zip(leaves, keys)]
    return {**variables, "batch_stats": jax.tree_util.tree_unflatten(tree, new)}


def _model(module, shape, batch, seed):
    x = jax.random.uniform(jax.random.key(seed), (batch,) + shape)
    v = module.init(jax.random.key(seed + 1), x[:1])
    v = _perturb_stats(v, jax.random.key(seed + 2))
    return (lambda z: module.apply(v, z, train=False)[0]), x


def _samples(x, eps, n, key, clip=None):
    """``n`` random points of each ball: corners (where extremes of piecewise-linear nets
    tend to be) mixed with uniform points."""
    k1, k2, k3 = jax.random.split(key, 3)
    u = jax.random.uniform(k1, (n,) + x.shape, minval=-1.0, maxval=1.0)
    corner = jnp.sign(jax.random.uniform(k2, (n,) + x.shape, minval=-1.0, maxval=1.0))
    pick = jax.random.bernoulli(k3, 0.5, (n,) + (1,) * x.ndim)
    xs = x[None] + eps * jnp.where(pick, corner, u)
    if clip is not None:
        xs = jnp.clip(xs, *clip)
    return xs


class Tiny(nn.Module):
    """Max pooling, concatenation, abs/min/max with constants, residual add, mean."""

    @nn.compact
    def __call__(self, x, train=False):
        h = nn.Conv(3, (3, 3))(x)
        h = jnp.concatenate([nn.relu(h), jnp.abs(h)], axis=-1)
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
        h = h + jnp.minimum(h, 0.5) - jnp.maximum(h, -0.25)
        h = jnp.clip(nn.Dense(6)(h), -1.0, 2.0) + nn.avg_pool(h, (2, 2), (1, 1),
                                                                  "SAME").mean(-1, keepdims=True)
        return nn.Dense(4)(jnp.mean(h, axis=(1, 2))), {}


CASES = {
    "mlp": lambda: _model(MLP(5, hidden=(24, 24)), (12,), 256, 0),
    "cnn1d_bn": lambda: _model(CNN1D(4, channels=(4, 6), use_bn=True), (16,), 128, 10),
    "cnn2d_bn": lambda: _model(CNN2D(4, channels=(4, 6), use_bn=True), (8, 8, 1), 128, 20),
    "tiny_maxpool": lambda: _model(Tiny(), (6, 6, 2), 64, 30),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    fn, x = CASES[request.param]()
    eps = 0.03
    clip = (0.0, 1.0)

    @jax.jit
    def all_bounds(x, eps):  # eps traced: one compilation serves eps and eps = 0
        return {"ibp": ibp_bounds(fn, x, eps, clip=clip),
                "crown": crown_bounds(fn, x, eps, clip=clip),
                "crown-ibp": crown_bounds(fn, x, eps, clip=clip, intermediate="ibp"),
                "alpha-crown": crown_bounds(fn, x, eps, clip=clip, alpha_steps=20)}

    xs = _samples(x, eps, 48, jax.random.key(7), clip)
    ys = jax.jit(jax.vmap(fn))(xs)
    b = all_bounds(x, eps)
    b.update({k + "_eps0": v for k, v in all_bounds(x, 0.0).items()})
    return request.param, fn, x, eps, b, ys


def test_bounds_contain_random_points(case):
    name, fn, x, eps, b, ys = case
    for method in ("ibp", "crown", "crown-ibp", "alpha-crown"):
        lo, up = b[method]
        assert lo.shape == up.shape == ys.shape[1:]
        assert bool(jnp.all(lo <= up + TOL)), (name, method)
        assert bool(jnp.all(ys >= lo - TOL)), (name, method, float(jnp.min(ys - lo)))
        assert bool(jnp.all(ys <= up + TOL)), (name, method, float(jnp.max(ys - up)))


def test_crown_tighter_than_ibp_on_average(case):
    name, _, _, _, b, _ = case
    w = {m: float(jnp.mean(b[m][1] - b[m][0])) for m in ("ibp", "crown", "crown-ibp")}
    assert w["crown"] <= w["ibp"] + TOL, (name, w)
    # full CROWN intermediate bounds are intersected with IBP: never looser than CROWN-IBP
    # on average.
    assert w["crown"] <= w["crown-ibp"] + TOL, (name, w)
    print(f"{name}: width ratio CROWN/IBP = {w['crown'] / w['ibp']:.3f}")


def test_alpha_crown_never_looser_than_crown_and_tighter_on_average(case):
    name, _, _, _, b, _ = case
    (lc, uc), (la, ua) = b["crown"], b["alpha-crown"]
    assert bool(jnp.all(la >= lc)) and bool(jnp.all(ua <= uc)), name
    w_c, w_a = float(jnp.mean(uc - lc)), float(jnp.mean(ua - la))
    assert w_a < 0.995 * w_c, (name, w_a, w_c)  # the optimised slopes must help
    print(f"{name}: width ratio alpha-CROWN/CROWN = {w_a / w_c:.3f}")


def test_eps_zero_is_tight(case):
    _, fn, x, _, b, _ = case
    z = fn(x)
    for key in ("ibp_eps0", "crown_eps0", "crown-ibp_eps0", "alpha-crown_eps0"):
        lo, up = b[key]
        np.testing.assert_allclose(lo, z, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(up, z, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_resnet8_bounds_contain_random_points():
    fn, x = _model(ResNet(3, depth=8, widths=(4, 4, 8, 8)), (8, 8, 3), 64, 40)
    eps = 0.01
    lo_i, up_i = jax.jit(lambda x: ibp_bounds(fn, x, eps))(x)
    lo_c, up_c = jax.jit(lambda x: crown_bounds(fn, x, eps))(x)
    lo_ci, up_ci = jax.jit(lambda x: crown_bounds(fn, x, eps, intermediate="ibp"))(x)
    ys = jax.jit(jax.vmap(fn))(_samples(x, eps, 32, jax.random.key(1)))
    for lo, up in ((lo_i, up_i), (lo_c, up_c), (lo_ci, up_ci)):
        assert bool(jnp.all((ys >= lo - TOL) & (ys <= up + TOL)))
    assert float(jnp.mean(up_c - lo_c)) < float(jnp.mean(up_i - lo_i))


def test_resnet8_residual_ibp_and_eps0():
    """Residual additions and strided 1x1 shortcuts: IBP sound, eps = 0 exact (CROWN on
    the ResNet is in the slow test; CROWN through branch-and-merge graphs is covered by
    the ``tiny_maxpool`` case)."""
    fn, x = _model(ResNet(3, depth=8, widths=(2, 2, 4, 4)), (8, 8, 3), 16, 50)
    eps = 0.005
    f = jax.jit(lambda x, e: ibp_bounds(fn, x, e))
    lo, up = f(x, eps)
    ys = jax.jit(jax.vmap(fn))(_samples(x, eps, 64, jax.random.key(2)))
    assert bool(jnp.all((ys >= lo - TOL) & (ys <= up + TOL)))
    lo0, up0 = f(x, 0.0)
    np.testing.assert_allclose(lo0, fn(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(up0, fn(x), rtol=1e-5, atol=1e-5)


def test_specification_matches_bounds_of_linear_combination():
    fn, x = _model(MLP(3, hidden=(8,)), (4,), 64, 60)
    eps = 0.1
    C = jnp.array([[1.0, -1.0, 0.0], [0.0, 2.0, 1.0]])
    ys = jax.vmap(fn)(_samples(x, eps, 64, jax.random.key(3))) @ C.T
    for bound in (ibp_bounds, crown_bounds):
        lo, up = bound(fn, x, eps, C=C)
        assert lo.shape == (64, 2)
        assert bool(jnp.all((ys >= lo - TOL) & (ys <= up + TOL)))
        # folding the specification first is at least as tight as C times the IBP box
        # everywhere (the folded bound is intersected with the folded IBP bound, which
        # dominates C times the IBP box) ...
        box = lambda lb, ub: (jnp.maximum(C, 0) @ lb.T + jnp.minimum(C, 0) @ ub.T).T  # noqa: E731
        assert bool(jnp.all(lo >= box(*ibp_bounds(fn, x, eps)) - TOL))
        # ... and tighter on average than C times the method's own per-output box; not
        # everywhere for CROWN, whose per-output bounds are each intersected with IBP
        # (a box can mix CROWN's bound on one output with IBP's on another)
        assert float(jnp.mean(lo - box(*bound(fn, x, eps)))) >= 0.0
    # a per-example specification [B, S, K]
    Cb = jnp.broadcast_to(C, (64,) + C.shape)
    np.testing.assert_allclose(crown_bounds(fn, x, eps, C=Cb)[0],
                               crown_bounds(fn, x, eps, C=C)[0], rtol=1e-6, atol=1e-6)


def test_identical_networks_difference_is_exactly_zero():
    module = CNN1D(3, channels=(4,), use_bn=True)
    x = jax.random.normal(jax.random.key(0), (16, 8))
    v = _perturb_stats(module.init(jax.random.key(1), x), jax.random.key(2))
    v_copy = jax.tree_util.tree_map(lambda a: jnp.array(np.asarray(a)), v)  # equal values
    joint = lambda z: jnp.concatenate([module.apply(v, z)[0], module.apply(v_copy, z)[0]], -1)
    C = jnp.concatenate([jnp.eye(3), -jnp.eye(3)], axis=1)  # z^T - z^S
    for lo, up in (ibp_bounds(joint, x, 0.3, C=C), crown_bounds(joint, x, 0.3, C=C),
                   crown_bounds(joint, x, 0.3, C=C, intermediate="ibp")):
        assert bool(jnp.all(lo == 0.0)) and bool(jnp.all(up == 0.0))
    # stop_gradient on the parameters (a teacher held constant) keeps them identical
    sg = jax.lax.stop_gradient
    joint_sg = lambda z: jnp.concatenate([module.apply(sg(v), z)[0], module.apply(v, z)[0]],
                                         -1)
    for lo, up in (ibp_bounds(joint_sg, x, 0.3, C=C), crown_bounds(joint_sg, x, 0.3, C=C)):
        assert bool(jnp.all(lo == 0.0)) and bool(jnp.all(up == 0.0))
    # whereas a different student gives a non-trivial interval
    v2 = module.init(jax.random.key(9), x)
    joint2 = lambda z: jnp.concatenate([module.apply(v, z)[0], module.apply(v2, z)[0]], -1)
    lo, up = crown_bounds(joint2, x, 0.3, C=C)
    assert float(jnp.min(up - lo)) > 0


def test_jit_equals_eager_and_chunked():
    fn, x = _model(MLP(4, hidden=(8, 8)), (5,), 8, 70)
    eager = crown_bounds(fn, x, 0.1, clip=(0.0, 1.0))
    jitted = jax.jit(lambda x: crown_bounds(fn, x, 0.1, clip=(0.0, 1.0)))(x)
    chunked = crown_bounds(fn, x, 0.1, clip=(0.0, 1.0), batch_chunk=3)
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(eager, chunked):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    e, j = ibp_bounds(fn, x, 0.1), jax.jit(lambda x: ibp_bounds(fn, x, 0.1))(x)
    np.testing.assert_allclose(e[1], j[1], rtol=1e-5, atol=1e-6)


def test_sharded_batch_matches_single_device(n_devices):
    fn, x = _model(MLP(4, hidden=(8,)), (5,), 16, 80)
    f = jax.jit(lambda x: crown_bounds(fn, x, 0.05, intermediate="ibp"))
    mesh = jax.make_mesh((n_devices,), ("data",))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    x1 = jax.device_put(x, jax.devices()[0])
    for a, b in zip(f(xs), f(x1)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_clip_restricts_the_ball():
    fn = lambda z: 3.0 * z  # noqa: E731
    x = jnp.array([[0.0, 0.5, 1.0]])
    lo, up = ibp_bounds(fn, x, 0.2, clip=(0.0, 1.0))
    np.testing.assert_allclose(lo, [[0.0, 0.9, 2.4]], atol=1e-6)
    np.testing.assert_allclose(up, [[0.6, 2.1, 3.0]], atol=1e-6)
    xl, xu = interval_box(x, 0.2, (0.0, 1.0))
    np.testing.assert_allclose(xl, [[0.0, 0.3, 0.8]], atol=1e-6)


def test_relu_relaxation_closed_form():
    # one unstable ReLU on [-1, 3]: CROWN upper line 3/4 (a + 1), lower alpha = 1 (u > -l).
    # relu(a) - a/2 has the true range [0, 1.5]; IBP gives [0, 3] - [-0.5, 1.5]; CROWN
    # gives a/2 >= -0.5 below and 3/4 (a + 1) - a/2 <= 1.5 above (exact).
    fn = lambda z: jnp.maximum(z, 0.0) - 0.5 * z  # noqa: E731
    lo, up = crown_bounds(fn, jnp.array([[1.0]]), 2.0)
    np.testing.assert_allclose(up, [[1.5]], rtol=1e-6)
    np.testing.assert_allclose(lo, [[-0.5]], rtol=1e-6)
    lo, up = ibp_bounds(fn, jnp.array([[1.0]]), 2.0)
    np.testing.assert_allclose(lo, [[-1.5]], rtol=1e-6)
    # a single ReLU: CROWN's line a >= -1 is intersected with IBP's 0 (never looser)
    lo, up = crown_bounds(lambda z: jnp.maximum(z, 0.0), jnp.array([[1.0]]), 2.0)
    np.testing.assert_allclose(lo, [[0.0]])
    np.testing.assert_allclose(up, [[3.0]])


def test_alpha_crown_closed_form_and_errors():
    # relu(a) - 0.3 a on [-1, 2] has the range [0, 1.4]. CROWN-Ada's lower line of the
    # ReLU is a (u > -l): 0.7 a >= -0.7, intersected with IBP's -0.6; the best slope 0.3
    # gives 0 exactly, and projected Adam must come close to it (never below the truth).
    fn = lambda z: jnp.maximum(z, 0.0) - 0.3 * z  # noqa: E731
    x = jnp.array([[0.5]])
    lo, up = crown_bounds(fn, x, 1.5)
    np.testing.assert_allclose(lo, [[-0.6]], rtol=1e-6)
    la, ua = crown_bounds(fn, x, 1.5, alpha_steps=20)
    assert -0.1 <= float(la[0, 0]) <= 1e-6
    np.testing.assert_allclose(ua, up, rtol=1e-6)  # the upper line is already exact
    # zero steps is CROWN itself, bit for bit
    l0, u0 = crown_bounds(fn, x, 1.5, alpha_steps=0)
    np.testing.assert_array_equal(np.asarray(l0), np.asarray(lo))
    for bad, match in [({"alpha_steps": -1}, "alpha_steps must be an int >= 0, got -1"),
                       ({"alpha_steps": 2.0}, "alpha_steps must be an int >= 0, got 2.0"),
                       ({"alpha_lr": 0.0}, "alpha_lr must be a finite number > 0, got 0.0")]:
        with pytest.raises(ValueError, match=match):
            crown_bounds(fn, x, 1.5, **bad)


def test_alpha_crown_certifies_a_gap_no_attack_exceeds():
    """The faithfulness gap bound by alpha-CROWN lies between the PGD lower bound and
    CROWN's bound, on every point."""
    from kdjax.faithful import certify, gap_upper_bound, margin_bounds, pgd_gap
    t_fn, x = _model(MLP(4, hidden=(16, 16)), (6,), 32, 40)
    s_fn, _ = _model(MLP(4, hidden=(8,)), (6,), 32, 41)
    eps = 0.05
    g = {m: gap_upper_bound(margin_bounds(t_fn, s_fn, x, eps=eps, method=m))["gap"]
         for m in ("crown", "alpha-crown")}
    assert bool(jnp.all(g["alpha-crown"] <= g["crown"] + TOL))
    assert float(jnp.mean(g["alpha-crown"])) < float(jnp.mean(g["crown"]))
    lower, _ = pgd_gap(t_fn, s_fn, x, eps=eps, steps=20, key=jax.random.key(0))
    assert bool(jnp.all(lower <= g["alpha-crown"] + TOL))
    out = certify(t_fn, s_fn, x, eps=eps, delta=float(jnp.median(g["crown"])),
                  method="alpha-crown")
    assert int(out["faithful"].sum()) >= int(jnp.sum(g["crown"] <= jnp.median(g["crown"])))


class WithSin(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="head")(jnp.sin(nn.Dense(3, name="encoder")(x)))


def test_unsupported_primitive_names_it_and_the_layer():
    m = WithSin()
    x = jnp.ones((2, 3))
    v = m.init(jax.random.key(0), x)
    for bound in (ibp_bounds, crown_bounds):
        with pytest.raises(NotImplementedError, match=r"'sin'.*layer 'WithSin'"):
            bound(lambda z: m.apply(v, z), x, 0.1)
    with pytest.raises(NotImplementedError, match="product of two input-dependent"):
        ibp_bounds(lambda z: z @ z.T, x, 0.1)


def test_bad_inputs_raise_clear_errors():
    fn = lambda z: 2.0 * z  # noqa: E731
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        ibp_bounds(fn, x, -0.1)
    with pytest.raises(ValueError, match="eps must be a scalar"):
        crown_bounds(fn, x, jnp.ones(2))
    with pytest.raises(ValueError, match="x must have rank >= 2"):
        ibp_bounds(fn, jnp.ones(3), 0.1)
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        ibp_bounds(fn, jnp.ones((2, 3), jnp.int32), 0.1)
    with pytest.raises(ValueError, match=r"C must have last dimension 3.*\(2, 4\)"):
        crown_bounds(fn, x, 0.1, C=jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="C must have shape"):
        crown_bounds(fn, x, 0.1, C=jnp.ones((5, 1, 3)))
    with pytest.raises(ValueError, match="lo < hi"):
        ibp_bounds(fn, x, 0.1, clip=(1.0, 0.0))
    with pytest.raises(ValueError, match="batch size 2"):
        ibp_bounds(lambda z: z.sum(0), x, 0.1)
    with pytest.raises(ValueError, match="intermediate must be one of"):
        crown_bounds(fn, x, 0.1, intermediate="alpha")
    with pytest.raises(TypeError, match="fn must be a callable"):
        ibp_bounds(None, x, 0.1)
