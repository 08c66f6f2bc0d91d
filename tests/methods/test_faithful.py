"""Faithful-KD methods (kdjax.methods.faithful): build, values, gradients, eps ramp, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import faithful as F
from kdjax import methods, models
from kdjax.methods.faithful import current_eps, resolve_clip
from kdjax.train import Distiller

NAMES = ("faithful_pgd", "faithful_certified", "adversarial_distillation", "rslad")


def _nets(same=False):
    net = models.create("mlp", 3, hidden=(8,))
    x = jax.random.uniform(jax.random.key(0), (6, 5))
    ps = net.init(jax.random.key(1), x)["params"]
    pt = ps if same else net.init(jax.random.key(2), x)["params"]
    return net, ps, pt, x


def _call(m, ps, pt, net, x, state, rng=jax.random.key(3)):
    student_fn = lambda v: net.apply({"params": ps}, v)  # noqa: E731
    # teacher: constant in its parameters, transparent in x (what the attack needs)
    teacher_fn = lambda v: net.apply({"params": jax.lax.stop_gradient(pt)}, v)  # noqa
    s_out, t_out = student_fn(x), teacher_fn(x)
    return m({}, state, s_out, t_out, {"x": x}, rng, models=(student_fn, teacher_fn))


def _state(step=0):
    return {"step": jnp.asarray(step, jnp.int32)}


def test_registered_and_built_from_config():
    for name in NAMES:
        assert name in methods.names()
        m = methods.build({"name": name, "weight": 0.5, "eps": 0.2})
        assert m.method.needs_models and m.weight == 0.5 and m.options["eps"] == 0.2
        p, st = m.init(jax.random.key(0), None, None)
        assert p == {} and int(st["step"]) == 0
    with pytest.raises(ValueError, match="valid options"):
        methods.build({"name": "faithful_pgd", "epsilon": 0.1})


def test_bad_options_and_missing_models_raise_clear_errors():
    net, ps, pt, x = _nets()
    m = methods.build({"name": "faithful_pgd", "clip": "data"})
    with pytest.raises(ValueError, match="clip"):
        _call(m, ps, pt, net, x, _state())
    m = methods.build({"name": "faithful_certified", "ramp_steps": -1})
    with pytest.raises(ValueError, match="ramp_steps"):
        _call(m, ps, pt, net, x, _state())
    m = methods.build({"name": "faithful_certified", "bound": "crown"})
    with pytest.raises(ValueError, match="bound"):
        _call(m, ps, pt, net, x, _state())
    m = methods.build({"name": "adversarial_distillation"})
    with pytest.raises(ValueError, match="models"):
        m({}, _state(), None, (x[:, :3], {}), {"x": x}, jax.random.key(0), models=None)


@pytest.mark.parametrize("name", NAMES)
def test_finite_value_and_gradients_under_jit(name):
    net, ps, pt, x = _nets()
    m = methods.build({"name": name, "eps": 0.3, "ramp_steps": 0, "clip": "none"})

    def loss(p, state):
        return _call(m, p, pt, net, x, state)

    (v, st) = loss(ps, _state(7))
    v_j, st_j = jax.jit(loss)(ps, _state(7))
    assert np.isfinite(float(v)) and float(v) > 0.0
    np.testing.assert_allclose(float(v_j), float(v), rtol=1e-5, atol=1e-7)
    assert int(st["step"]) == int(st_j["step"]) == 8
    g = jax.jit(jax.grad(lambda p: loss(p, _state(0))[0]))(ps)
    leaves = jax.tree_util.tree_leaves(g)
    assert all(np.all(np.isfinite(np.asarray(a))) for a in leaves)
    assert sum(float(jnp.sum(jnp.abs(a))) for a in leaves) > 0.0


@pytest.mark.parametrize("name", ["faithful_pgd", "faithful_certified"])
def test_zero_penalty_when_student_is_teacher(name):
    net, ps, pt, x = _nets(same=True)
    m = methods.build({"name": name, "eps": 0.3, "ramp_steps": 0})
    v, _ = _call(m, ps, pt, net, x, _state())
    assert float(v) == 0.0
    v_j, _ = jax.jit(lambda p: _call(m, p, p, net, x, _state()))(ps)
    assert float(v_j) == 0.0


def test_adversarial_distillation_zero_at_eps_zero_and_positive_inside_ball():
    net, ps, pt, x = _nets(same=True)
    m0 = methods.build({"name": "adversarial_distillation", "eps": 0.0})
    assert abs(float(_call(m0, ps, pt, net, x, _state())[0])) < 1e-6
    m = methods.build({"name": "adversarial_distillation", "eps": 0.3, "clip": "none"})
    assert float(_call(m, ps, pt, net, x, _state())[0]) > 1e-6


def test_faithful_pgd_is_the_gap_at_a_point_of_the_ball():
    # the penalty is the gap at a point of the ball: between the clean gap and the
    # certified bound
    net, ps, pt, x = _nets()
    s = lambda v: net.apply({"params": ps}, v)[0]  # noqa: E731
    t = lambda v: net.apply({"params": pt}, v)[0]  # noqa: E731
    clean = float(jnp.mean(F.confidence_gap(s(x), t(x))))
    m = methods.build({"name": "faithful_pgd", "eps": 0.2, "clip": "none", "steps": 10})
    v = float(_call(m, ps, pt, net, x, _state())[0])
    ub = F.gap_upper_bound(F.margin_bounds(t, s, x, eps=0.2, method="ibp"))["gap"]
    assert clean - 1e-6 <= v <= float(jnp.mean(ub)) + 1e-6
    assert v > clean  # PGD found larger gaps than at the clean points


def test_current_eps_schedule():
    kw = dict(eps=0.4, ramp_steps=10, warmup_steps=5)
    vals = [float(current_eps(t, **kw)) for t in (0, 5, 10, 15, 100)]
    np.testing.assert_allclose(vals, [0.0, 0.0, 0.2, 0.4, 0.4], atol=1e-7)
    assert float(jax.jit(lambda t: current_eps(t, **kw))(10)) == pytest.approx(0.2)
    assert [float(current_eps(t, eps=0.4, warmup_steps=3)) for t in (2, 3)] == [0.0,
                                                                             pytest.approx(0.4)]


def test_certified_penalty_follows_the_eps_ramp_of_its_step_counter():
    net, ps, pt, x = _nets()
    s = lambda v: net.apply({"params": ps}, v)[0]  # noqa: E731
    t = lambda v: net.apply({"params": pt}, v)[0]  # noqa: E731
    m = methods.build({"name": "faithful_certified", "eps": 0.2, "warmup_steps": 2,
                       "ramp_steps": 4, "clip": "none"})

    def expected(e):
        return float(jnp.mean(F.gap_upper_bound(F.margin_bounds(t, s, x, eps=e,
                                                                method="ibp"))["gap"]))

    state, got = _state(0), []
    for _ in range(7):
        v, state = _call(m, ps, pt, net, x, state)
        got.append(float(v))
    assert int(state["step"]) == 7
    want = [expected(e) for e in (0.0, 0.0, 0.0, 0.05, 0.1, 0.15, 0.2)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert got[0] == pytest.approx(float(jnp.mean(F.confidence_gap(s(x), t(x)))), abs=1e-5)
    assert got[-1] > got[3] > got[0]


def test_resolve_clip_batch_range_keeps_attacks_in_range():
    x = jnp.array([[0.0, 0.5], [1.0, 0.25]])
    lo, hi = resolve_clip("batch", x)
    assert (float(lo), float(hi)) == (0.0, 1.0)
    assert resolve_clip("none", x) is None and resolve_clip([0, 1], x) == (0.0, 1.0)
    net, ps, pt, _ = _nets()
    xb = jax.random.uniform(jax.random.key(5), (6, 5))
    student_fn = lambda v: net.apply({"params": ps}, v)  # noqa: E731
    xa = F.adversarial_distillation_inputs(student_fn(xb)[0] * 0, lambda v: student_fn(v)[0],
                                           xb, eps=0.5, key=jax.random.key(0),
                                           clip=resolve_clip("batch", xb))
    assert float(xa.min()) >= float(xb.min()) and float(xa.max()) <= float(xb.max())


def test_engine_step_with_all_faithful_terms():
    net = models.create("mlp", 3, hidden=(8,))
    teacher = models.create("mlp", 3, hidden=(16,))
    x = jax.random.uniform(jax.random.key(0), (8, 5))
    tvars = teacher.init(jax.random.key(1), x)
    built = tuple(methods.build(c) for c in (
        {"name": "kd"}, {"name": "faithful_pgd", "eps": 0.1, "steps": 2},
        {"name": "faithful_certified", "eps": 0.1, "ramp_steps": 4},
        {"name": "adversarial_distillation", "eps": 0.1, "steps": 2}))
    d = Distiller(net, built, optax.sgd(0.1), teacher=teacher)
    state = d.init(0, x, tvars)
    step = jax.jit(d.train_step)
    for i in range(2):
        state, terms = step(state, tvars, {"x": x}, jax.random.key(i))
    assert all(np.isfinite(float(v)) for v in terms.values())
    assert {int(state.method_state[k]["step"]) for k in d.keys[1:]} == {2}


# ------------------------------------------------------------- robust teachers, RSLAD


def test_rslad_matches_its_formula():
    net, ps, pt, x = _nets()
    m = methods.build({"name": "rslad", "eps": 0.2, "clip": "none", "steps": 5})
    rng = jax.random.key(11)
    v, st = _call(m, ps, pt, net, x, _state(), rng=rng)
    s = lambda z: net.apply({"params": ps}, z)[0]  # noqa: E731
    zt = net.apply({"params": pt}, x)[0]
    x_adv = F.adversarial_distillation_inputs(zt, s, x, eps=0.2, key=rng, steps=5,
                                              temperature=1.0)
    pt_, ps_clean, ps_adv = (np.asarray(jax.nn.softmax(z)) for z in (zt, s(x), s(x_adv)))
    kl = lambda p, q: np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1))  # noqa: E731
    want = kl(pt_, ps_clean) / 6.0 + 5.0 * kl(pt_, ps_adv) / 6.0
    np.testing.assert_allclose(float(v), want, rtol=1e-5)
    assert int(st["step"]) == 1


def _toy_classification(key, n=128, d=16):
    """One robust feature (class mean +-1, noise 0.4) and ``d`` weak ones (mean +-0.2):
    together the weak features predict the class, but an L-inf step of 0.3 reverses
    every one of them (Tsipras et al. 2019's construction). Plain training leans on
    them; adversarial and certified training must not."""
    k1, k2, k3 = jax.random.split(key, 3)
    y = jax.random.bernoulli(k1, 0.5, (n,)).astype(jnp.int32)
    s = (2.0 * y - 1.0)[:, None]
    robust = s + 0.4 * jax.random.normal(k2, (n, 1))
    weak = 0.2 * s + 0.4 * jax.random.normal(k3, (n, d))
    return jnp.concatenate([robust, weak], 1), y


def _train_teacher(config, x, y, steps=150):
    net = models.create("mlp", 2, hidden=(32,))
    params = net.init(jax.random.key(0), x)["params"]
    ce = methods.build({"name": "ce"})
    term = None if config is None else methods.build(config)
    tx = optax.adam(1e-2)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, state, rng):
        def loss(p):
            fn = lambda v: net.apply({"params": p}, v)  # noqa: E731
            out = fn(x)
            batch = {"x": x, "y": y}
            if term is None:
                return ce({}, None, out, None, batch, rng)[0], state
            return term({}, state, out, None, batch, rng, models=(fn, None))
        (v, state), g = jax.value_and_grad(loss, has_aux=True)(params)
        upd, opt = tx.update(g, opt)
        return optax.apply_updates(params, upd), opt, state

    state = {"step": jnp.zeros((), jnp.int32)}
    for i in range(steps):
        params, opt, state = step(params, opt, state, jax.random.key(i))
    return lambda v: net.apply({"params": params}, v)[0]


def _confidence_drop(fn, x, eps):
    """PGD lower bound on the teacher's own gap: max over the ball of p_y(x) - p_y(x')."""
    y = F.teacher_labels(fn(x))
    py = jnp.take_along_axis(jax.nn.softmax(fn(x)), y[:, None], 1)[:, 0]
    obj = lambda z: py - jnp.take_along_axis(jax.nn.softmax(fn(z)), y[:, None], 1)[:, 0]  # noqa
    return float(jnp.mean(F.pgd_maximize(obj, x, eps=eps, key=jax.random.key(9), steps=20,
                                         restarts=2)[0]))


@pytest.mark.parametrize("config", [
    {"name": "pgd_at", "eps": 0.3, "clip": "none"},
    {"name": "certified_training", "eps": 0.3, "clip": "none", "ramp_steps": 50}])
def test_robust_teacher_training_lowers_the_teachers_pgd_gap(config):
    # measured: PGD confidence drop 0.46 (plain) vs 0.023 (pgd_at) and 0.032 (IBP)
    x, y = _toy_classification(jax.random.key(1))
    plain = _train_teacher(None, x, y)
    robust = _train_teacher(config, x, y)
    gap_plain, gap_robust = _confidence_drop(plain, x, 0.3), _confidence_drop(robust, x, 0.3)
    assert gap_plain > 0.3 and gap_robust < 0.25 * gap_plain, (gap_plain, gap_robust)
    acc = float(jnp.mean(jnp.argmax(robust(x), -1) == y))
    assert acc > 0.9


def test_worst_case_logits_bound_the_cross_entropy_in_the_ball():
    net, ps, _, x = _nets()
    fn = lambda v: net.apply({"params": ps}, v)[0]  # noqa: E731
    y = jnp.array([0, 1, 2, 0, 1, 2])
    ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, y)  # noqa: E731
    worst = ce(F.worst_case_logits(fn, x, y, eps=0.2, method="crown-ibp"))
    attacked, _ = F.pgd_maximize(lambda z: ce(fn(z)), x, eps=0.2, key=jax.random.key(0),
                                 steps=20, restarts=2)
    assert bool(jnp.all(worst >= attacked - 1e-5))
    assert bool(jnp.all(attacked >= ce(fn(x)) - 1e-6))


def test_two_network_attack_reaches_the_student_only_gap():
    """The training attack of faithful_pgd sees the teacher's input gradient (engine's
    teacher_fn: parameters frozen, transparent in x); it finds gaps at least as large as
    an attack whose teacher output is cut from the gradient (the old behaviour)."""
    net, ps, pt, _ = _nets()
    x = jax.random.uniform(jax.random.key(4), (64, 5))
    s = lambda v: net.apply({"params": ps}, v)[0]  # noqa: E731
    t = lambda v: net.apply({"params": jax.lax.stop_gradient(pt)}, v)[0]  # noqa: E731
    t_cut = lambda v: jax.lax.stop_gradient(t(v))  # noqa: E731
    kw = dict(eps=0.3, steps=20, restarts=2, key=jax.random.key(2))
    joint, _ = F.pgd_gap(t, s, x, **kw)
    student_only, x_so = F.pgd_gap(t_cut, s, x, **kw)
    # the student-only search's points, scored on the true gap, are what it reaches
    y = F.teacher_labels(t(x))
    reached = F.confidence_gap(s(x_so), t(x_so), labels=y)
    assert float(jnp.mean(joint)) >= float(jnp.mean(reached)) - 1e-6
    assert bool(jnp.any(jax.grad(lambda v: jnp.sum(t(v)))(x) != 0))
