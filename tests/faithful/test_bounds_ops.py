"""Sound or refuse: every operation kdjax.faithful.bounds accepts is checked by dense
sampling and by PGD (both directions, every output) on random networks for IBP, CROWN-IBP
and full CROWN; every relaxation line is checked on a dense grid of its interval; the
operations it cannot bound raise errors that name the op (or the activation) and the
Flax module path.
"""

import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.faithful import bounds as B
from kdjax.faithful import pgd_maximize
from kdjax.faithful.bounds import crown_bounds, ibp_bounds

METHODS = {"ibp": lambda f, x, e: ibp_bounds(f, x, e),
           "crown-ibp": lambda f, x, e: crown_bounds(f, x, e, intermediate="ibp"),
           "crown": lambda f, x, e: crown_bounds(f, x, e)}

OPS = {
    "relu": nn.relu, "relu6": nn.relu6, "hard_sigmoid": nn.hard_sigmoid,
    "gelu": nn.gelu, "gelu_erf": lambda h: nn.gelu(h, approximate=False),
    "silu": nn.silu, "softplus": nn.softplus, "elu": nn.elu,
    "elu_0.5": lambda h: jax.nn.elu(h, 0.5), "celu_2": lambda h: jax.nn.celu(h, 2.0),
    "selu": nn.selu, "leaky_relu": nn.leaky_relu,
    "leaky_relu_0.2": lambda h: jax.nn.leaky_relu(h, 0.2),
    "leaky_relu_neg": lambda h: jax.nn.leaky_relu(h, -0.3),
    "hard_tanh": nn.hard_tanh, "hard_silu": jax.nn.hard_silu, "mish": jax.nn.mish,
    "tanh": jnp.tanh, "sigmoid": nn.sigmoid, "erf": jax.lax.erf, "erfc": jax.lax.erfc,
    "exp": lambda h: jnp.exp(0.5 * h), "expm1": jnp.expm1,
    "log": lambda h: jnp.log(h * h + 0.5), "log1p": lambda h: jnp.log1p(jnp.abs(h)),
    "sqrt": lambda h: jnp.sqrt(jnp.abs(h) + 0.1),
    "rsqrt": lambda h: jax.lax.rsqrt(h * h + 0.2), "square": jnp.square,
    "cube": lambda h: h ** 3, "reciprocal": lambda h: 1.0 / (jnp.abs(h) + 0.5),
    "div": lambda h: h / (jnp.abs(h[..., ::-1]) + 1.0),
    "product": lambda h: h * h[..., ::-1], "abs_min_max": lambda h: jnp.clip(
        jnp.abs(h) - jnp.minimum(h, 0.3), -0.5, 1.0),
    "layernorm": None, "reduce_max": lambda h: jnp.max(h.reshape(h.shape[0], 3, 2), -1),
    "maxpool": None,
}


class Net(nn.Module):
    op: str

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6)(x)
        if self.op == "layernorm":
            h = nn.LayerNorm()(h)
        elif self.op == "maxpool":
            h = nn.max_pool(h.reshape(h.shape[0], 6, 1), (2,), strides=(2,)).reshape(
                h.shape[0], -1)
            h = nn.max_pool(h.reshape(h.shape[0], 3, 1), (2,), strides=(1,)).reshape(
                h.shape[0], -1)  # overlapping windows
        else:
            h = OPS[self.op](h)
        return nn.Dense(3)(h)


def _pgd_extremes(fn, x, eps, key):
    """Per output, the largest and smallest values PGD (kdjax.faithful.pgd_maximize, 25
    steps, 2 restarts) finds in the ball, over all 2K directions at once."""
    k = jax.eval_shape(fn, x).shape[-1]
    dirs = jnp.concatenate([jnp.eye(k), -jnp.eye(k)])

    def run(d, key):
        return pgd_maximize(lambda z: fn(z) @ d, x, eps=eps, key=key, steps=25,
                            step_size=0.25 * eps, restarts=2)[0]

    best = jax.vmap(run)(dirs, jax.random.split(key, 2 * k))  # [2K, B]
    return -best[k:].T, best[:k].T


def _dense_samples(fn, x, eps, key, n=512):
    k1, k2, k3 = jax.random.split(key, 3)
    u = jax.random.uniform(k1, (n,) + x.shape, minval=-1.0, maxval=1.0)
    corner = jnp.sign(jax.random.uniform(k2, (n,) + x.shape, minval=-1.0, maxval=1.0))
    pick = jax.random.bernoulli(k3, 0.5, (n,) + (1,) * x.ndim)
    ys = jax.vmap(fn)(x[None] + eps * jnp.where(pick, corner, u))
    return ys.min(0), ys.max(0)


FAST_OPS = ("relu", "gelu", "elu", "tanh", "layernorm", "maxpool", "product")


def _check_op(op):
    m = Net(op)
    x = jax.random.normal(jax.random.key(0), (6, 4))
    v = m.init(jax.random.key(1), x)
    fn = lambda z: m.apply(v, z)  # noqa: E731
    eps = 0.15

    @jax.jit
    def everything(x):  # one compiled program per op
        seen_lo, seen_hi = _dense_samples(fn, x, eps, jax.random.key(2))
        p_lo, p_hi = _pgd_extremes(fn, x, eps, jax.random.key(3))
        return (jnp.minimum(seen_lo, p_lo), jnp.maximum(seen_hi, p_hi),
                {name: method(fn, x, eps) for name, method in METHODS.items()})

    lo_seen, hi_seen, bounds = everything(x)
    tol = 1e-5 * (1.0 + jnp.abs(lo_seen) + jnp.abs(hi_seen))
    widths = {}
    for name, (lo, up) in bounds.items():
        assert bool(jnp.all(jnp.isfinite(lo) & jnp.isfinite(up))), (op, name)
        assert bool(jnp.all(lo <= lo_seen + tol)), (op, name, float(jnp.max(lo - lo_seen)))
        assert bool(jnp.all(up >= hi_seen - tol)), (op, name, float(jnp.max(hi_seen - up)))
        widths[name] = float(jnp.mean(up - lo))
    # CROWN's final bounds are intersected with IBP: never looser
    assert widths["crown"] <= widths["ibp"] + 1e-5, widths
    assert widths["crown-ibp"] <= widths["ibp"] + 1e-5, widths
    print(f"{op}: mean width ibp {widths['ibp']:.4g} crown-ibp {widths['crown-ibp']:.4g} "
          f"crown {widths['crown']:.4g}")


@pytest.mark.parametrize("op", FAST_OPS)
def test_accepted_ops_are_sound_under_sampling_and_pgd(op):
    _check_op(op)


@pytest.mark.slow
@pytest.mark.parametrize("op", sorted(set(OPS) - set(FAST_OPS)))
def test_every_other_accepted_op_is_sound_under_sampling_and_pgd(op):
    _check_op(op)


def _intervals(key, n=64):
    k1, k2 = jax.random.split(key)
    c = 3.0 * jax.random.normal(k1, (n,))
    w = jnp.exp(jax.random.uniform(k2, (n,), minval=-6.0, maxval=1.5))
    return c - w, c + w


@pytest.mark.parametrize("fn", sorted(B._FNS))
def test_relaxation_lines_hold_on_a_dense_grid(fn):
    params = {"elu": {"alpha": 0.7}, "celu": {"alpha": 1.5},
              "leaky_relu": {"negative_slope": -0.2}, "pow": {"y": 4.0}}.get(fn, {})
    node = B._Node("unary", None, {"fn": fn, **params}, (1,), (64,), jnp.float32)
    l, u = _intervals(jax.random.key(zlib.crc32(fn.encode()) % 1000))
    spec = B._FNS[fn]
    if spec.domain is not None or fn == "reciprocal":
        l, u = jnp.abs(l) + 0.05, jnp.abs(l) + 0.05 + (u - l)
    t = l[:, None] + (u - l)[:, None] * jnp.linspace(0.0, 1.0, 4001)
    special = jnp.asarray((*spec.kinks(params), spec.x0(params)), jnp.float32)
    t = jnp.concatenate([t, jnp.clip(special[None], l[:, None], u[:, None])], axis=1)
    ft = spec.f(t, params)
    lo, hi = B._unary_ibp(node, l, u)
    assert bool(jnp.all(lo[:, None] <= ft + 1e-5 * (1 + jnp.abs(ft)))), fn
    assert bool(jnp.all(hi[:, None] >= ft - 1e-5 * (1 + jnp.abs(ft)))), fn
    # IBP of an elementwise function is its exact range
    np.testing.assert_allclose(lo, ft.min(1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(hi, ft.max(1), rtol=1e-4, atol=1e-4)
    lines = B._unary_lines(node, l, u)
    if lines is None:
        return
    kl, bl, ku, bu = (np.asarray(v)[:, None] for v in lines)
    tol = 1e-5 * (1 + np.abs(np.asarray(ft)))
    assert np.all(kl * np.asarray(t) + bl <= np.asarray(ft) + tol), fn
    assert np.all(ku * np.asarray(t) + bu >= np.asarray(ft) - tol), fn


def test_mccormick_planes_hold():
    k = jax.random.split(jax.random.key(5), 4)
    lx, ly = jax.random.normal(k[0], (50,)), jax.random.normal(k[1], (50,))
    ux, uy = lx + jax.random.uniform(k[2], (50,)), ly + jax.random.uniform(k[3], (50,))
    axl, ayl, cl, axu, ayu, cu = B._mul_planes(lx, ux, ly, uy)
    a = jnp.linspace(0, 1, 41)
    X = lx[:, None, None] + (ux - lx)[:, None, None] * a[None, :, None]
    Y = ly[:, None, None] + (uy - ly)[:, None, None] * a[None, None, :]
    z = X * Y
    e = lambda v: v[:, None, None]  # noqa: E731
    assert bool(jnp.all(e(axl) * X + e(ayl) * Y + e(cl) <= z + 1e-6))
    assert bool(jnp.all(e(axu) * X + e(ayu) * Y + e(cu) >= z - 1e-6))


def test_activation_ibp_is_the_exact_range():
    """Recognised activations are bounded as one function (not as x * g(x))."""
    x = jnp.linspace(-3.0, 2.0, 11)[:, None]
    for f in (jax.nn.gelu, lambda h: jax.nn.gelu(h, approximate=False), jax.nn.silu,
              jax.nn.mish, jax.nn.elu, jax.nn.softplus):
        lo, up = ibp_bounds(f, x, 0.6)
        t = x + 0.6 * jnp.linspace(-1.0, 1.0, 20001)[None]
        np.testing.assert_allclose(lo[:, 0], f(t).min(1), atol=2e-5)
        np.testing.assert_allclose(up[:, 0], f(t).max(1), atol=2e-5)


@pytest.mark.parametrize("act", ["tanh", "sigmoid"])
def test_crown_relaxes_tanh_and_sigmoid_tighter_than_intervals(act):
    f = {"tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid}[act]
    k = jax.random.split(jax.random.key(3), 3)
    w1, w2 = jax.random.normal(k[0], (8, 16)), jax.random.normal(k[1], (16, 4)) / 4
    fn = lambda z: f(z @ w1) @ w2  # noqa: E731
    x = jax.random.normal(k[2], (16, 8))
    li, ui = ibp_bounds(fn, x, 0.1)
    lc, uc = crown_bounds(fn, x, 0.1)
    assert float(jnp.mean(uc - lc)) < 0.8 * float(jnp.mean(ui - li))


def test_maxpool_dominant_window_is_exact():
    # window (a, b) with a in [4.9, 5.1] dominating b in [-1.1, -0.9]: max = a exactly,
    # so CROWN of max - a is 0 (interval arithmetic gives [-0.2, 0.2]).
    fn = lambda z: jnp.max(z, axis=-1, keepdims=True) - z[:, :1]  # noqa: E731
    x = jnp.array([[5.0, -1.0]])
    lo, up = crown_bounds(fn, x, 0.1)
    np.testing.assert_allclose(lo, 0.0, atol=1e-6)
    np.testing.assert_allclose(up, 0.0, atol=1e-6)
    lo, up = ibp_bounds(fn, x, 0.1)
    np.testing.assert_allclose(up - lo, 0.4, atol=1e-6)


def test_domain_violation_gives_no_claim_not_nan():
    lo, up = crown_bounds(lambda z: jnp.log(z), jnp.array([[0.05], [1.0]]), 0.1)
    assert float(lo[0, 0]) == -np.inf and float(up[0, 0]) == np.inf
    assert np.isfinite(float(lo[1, 0])) and float(lo[1, 0]) <= np.log(0.9) + 1e-6


# ------------------------------------------------------------------------ refusals


def _quantised(x):
    return 2.0 * (3.0 * x).astype(jnp.int8).astype(jnp.float32)


class QuantNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4, name="encoder")(x)
        h = QuantAct(name="fake_quant")(h)
        return nn.Dense(2)(h)


class QuantAct(nn.Module):
    @nn.compact
    def __call__(self, h):
        return jnp.round(h * 8.0) / 8.0


def test_quantised_function_is_refused_not_mis_bounded():
    # the example: true outputs {0, 2, 4}; IBP used to say [2, 2], CROWN [0, 0]
    x = jnp.array([[0.5]])
    for method in METHODS.values():
        with pytest.raises(NotImplementedError, match=r"convert_element_type.*integer"):
            method(_quantised, x, 0.2)


def test_refusals_name_the_layer_and_the_op():
    m = QuantNet()
    x = jnp.ones((2, 3))
    v = m.init(jax.random.key(0), x)
    with pytest.raises(NotImplementedError, match=r"'round'.*QuantNet/fake_quant"):
        crown_bounds(lambda z: m.apply(v, z), x, 0.1)
    # an activation whose constant is traced is inlined, and its comparison is refused
    # naming the activation, not only the low-level primitive
    alpha = jnp.float32(0.5)
    with pytest.raises(NotImplementedError, match=r"activation 'elu' \(primitive 'gt'\)"):
        jax.jit(lambda a: ibp_bounds(lambda z: jax.nn.elu(z, a), x, 0.1))(alpha)


@pytest.mark.parametrize("name,fn", [
    ("floor", jnp.floor), ("round", jnp.round), ("sign", jnp.sign), ("sin", jnp.sin),
    ("gt", lambda z: jnp.where(z > 0, z, 0.0)),
    ("gather", lambda z: z[:, jnp.array([0, 2])]),
    ("argmax", lambda z: z[:, :1] * jnp.argmax(z, -1, keepdims=True)),
    ("cond", lambda z: jax.lax.cond(jnp.sum(jnp.zeros(3)) > 0, jnp.tanh, jnp.exp, z)),
    ("scan", lambda z: jax.lax.scan(lambda c, _: (c * 0.5 + 1.0, None), z, None, 3)[0]),
    ("product of two input-dependent", lambda z: z @ z.T),
])
def test_unsupported_operations_raise(name, fn):
    x = jnp.ones((2, 3))
    for method in ("ibp", "crown"):
        with pytest.raises(NotImplementedError, match=name):
            METHODS[method](fn, x, 0.1)
