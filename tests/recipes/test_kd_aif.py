"""KD-AIF procedures: weighted loss, periodic re-scoring, semi-supervised data, MPL."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from kdjax import methods, models
from kdjax.recipes import kd_aif
from kdjax.influence import influence_weights
from kdjax.train import Distiller

C, D = 3, 5
CE_W, KD_W, TAU = 0.3, 0.7, 2.0


def log_softmax_np(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def make_distiller(epochs=4, steps=4):
    built = (methods.build({"name": "ce", "weight": CE_W}),
             methods.build({"name": "kd", "weight": KD_W, "temperature": TAU}))
    tx = optax.adam(1e-2)
    return Distiller(models.create("mlp", C, hidden=(8,)), built, tx, teacher_from_batch=True)


def make_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5).astype(np.int32)
    t = (3.0 * np.eye(C)[y] + rng.normal(size=(n, C))).astype(np.float32)
    return {"x": x, "y": y, "teacher_logits": t}


# --------------------------------------------------------------------- weighted loss
@pytest.mark.parametrize("masked", [False, True])
def test_weights_enter_engine_loss_as_mean_of_w_times_l(masked):
    d = make_distiller()
    data = make_data(16)
    rng = np.random.default_rng(1)
    w = rng.uniform(0.2, 2.0, 16).astype(np.float32)
    batch = {**{k: jnp.asarray(v) for k, v in data.items()}, "weights": jnp.asarray(w)}
    mask = np.ones(16, np.float32)
    if masked:
        mask[::3] = 0.0
        batch["label_mask"] = jnp.asarray(mask)
    state = d.init(0, data["x"][:2])
    total, _ = d.loss_fn(state.params, state, None, batch, jax.random.PRNGKey(0))
    # independent numpy computation of the engine's objective
    z = np.asarray(d.student.apply({"params": state.params["student"]}, data["x"])[0],
                   np.float64)
    y, t = data["y"], data["teacher_logits"].astype(np.float64)
    ce = -log_softmax_np(z)[np.arange(16), y]
    pt = np.exp(log_softmax_np(t / TAU))
    kl = TAU ** 2 * (pt * (log_softmax_np(t / TAU) - log_softmax_np(z / TAU))).sum(-1)
    ce_term = (w * mask * ce).sum() / mask.sum()       # CE over the labelled rows
    manual = CE_W * ce_term + KD_W * (w * kl).mean()     # (1/B) sum_i w_i l_i
    np.testing.assert_allclose(float(total), manual, rtol=1e-5)
    # kd_aif.distill_losses is the same objective per example (ce_scale = 1/labelled frac)
    per = kd_aif.distill_losses(jnp.asarray(z, jnp.float32), batch, ce_weight=CE_W,
                                kd_weight=KD_W, temperature=TAU,
                                ce_scale=1.0 / mask.mean())
    np.testing.assert_allclose(float(jnp.mean(jnp.asarray(w) * per)), manual, rtol=1e-5)


def test_with_weights_replaces_and_checks_shape():
    data = make_data(8)
    out = kd_aif.with_weights({**data, "weights": np.zeros(8)}, np.full(8, 2.0))
    np.testing.assert_array_equal(np.asarray(out["weights"]), 2.0)
    assert "weights" not in kd_aif.with_weights(out, None)
    with pytest.raises(ValueError, match=r"weights must have shape \(8,\)"):
        kd_aif.with_weights(data, np.ones(7))


# ------------------------------------------------------------------------- scores
def test_student_scores_match_explicit_formula_and_last_layer():
    data = make_data(24)
    val = {k: v[:10] for k, v in make_data(10, seed=3).items()}
    obj = functools.partial(kd_aif.distill_losses, ce_weight=CE_W, kd_weight=KD_W,
                            temperature=TAU)
    key = jax.random.PRNGKey(0)
    head = {"kernel": 0.3 * jax.random.normal(key, (D, C)), "bias": jnp.zeros(C)}
    params = {"head": head}
    model = lambda p, b: b["x"] @ p["head"]["kernel"] + p["head"]["bias"]  # noqa: E731
    lam = 0.05
    s_ggn, _ = kd_aif.student_scores(model, params, data, val, objective=obj,
                                     damping=lam, tol=1e-7, maxiter=500)
    s_ll, _ = kd_aif.student_scores(model, params, data, val, objective=obj,
                                    curvature="last_layer", damping=lam,
                                    features_fn=lambda p, b: b["x"])
    # explicit: -grad l_i^T (H + lam I)^{-1} grad L_val with a dense Hessian
    flat, unravel = ravel_pytree(params)
    f_tr = lambda th, b: obj(model(unravel(th), b), b)  # noqa: E731
    h = jax.hessian(lambda th: jnp.mean(f_tr(th, data)))(flat)
    g = jax.grad(lambda th: jnp.mean(kd_aif.val_losses(model(unravel(th), val), val)))(flat)
    jac = jax.jacobian(lambda th: f_tr(th, data))(flat)
    expected = -jac @ np.linalg.solve(h + lam * np.eye(h.shape[0]), g)
    np.testing.assert_allclose(s_ggn, expected, rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(s_ll, expected, rtol=2e-3, atol=1e-5)


def test_last_layer_needs_features_fn():
    data = make_data(8)
    with pytest.raises(ValueError, match="features_fn"):
        kd_aif.student_scores(lambda p, b: b["x"] @ p["head"]["kernel"],
                              {"head": {"kernel": jnp.zeros((D, C)), "bias": jnp.zeros(C)}},
                              data, data, objective=kd_aif.val_losses,
                              curvature="last_layer")


# ------------------------------------------------------------------------ periodic
def _periodic(tmp_dir=None, scorer=None, epochs=5, every=2):
    d = make_distiller()
    data = make_data(64)
    real = kd_aif.make_scorer(d, data, make_data(16, seed=5), objective=functools.partial(
        kd_aif.distill_losses, ce_weight=CE_W, kd_weight=KD_W, temperature=TAU),
        curvature_examples=32)
    calls = []

    def recording(state, weights=None):
        calls.append((int(state.epoch), None if weights is None else np.asarray(weights)))
        return (scorer or real)(state, weights)

    state, best, hist, log = kd_aif.fit_periodic(
        d, d.init(0, data["x"][:2]), None, data, recording, epochs=epochs,
        rescore_every=every, batch_size=16, progress=False, checkpoint_dir=tmp_dir)
    return state, log, calls, real


def test_periodic_rescoring_epochs_and_determinism():
    state, log, calls, real = _periodic()
    assert int(state.epoch) == 5
    assert [e for e, _ in log] == [0, 2, 4]
    assert log[0][1] is None                               # uniform first chunk
    assert [e for e, _ in calls] == [2, 4]                 # scored with the current student
    assert calls[0][1] is None and np.allclose(calls[1][1], np.asarray(log[1][1]))
    for _, w in log[1:]:
        np.testing.assert_allclose(float(jnp.mean(w)), 1.0, rtol=1e-5)
    assert not np.allclose(np.asarray(log[1][1]), np.asarray(log[2][1]))  # re-scored
    state2, log2, _, _ = _periodic()
    for (_, a), (_, b) in zip(log[1:], log2[1:]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree_util.tree_leaves(state.params),
                    jax.tree_util.tree_leaves(state2.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # orbax checkpoints of every chunk
def test_periodic_resume_after_kill_equals_uninterrupted(tmp_path):
    state, log, _, real = _periodic()

    class Killed(Exception):
        pass

    n = {"calls": 0}

    def dies_on_second(state, weights=None):
        n["calls"] += 1
        if n["calls"] == 2:
            raise Killed
        return real(state, weights)

    with pytest.raises(Killed):
        _periodic(str(tmp_path), scorer=dies_on_second)
    state2, log2, calls2, _ = _periodic(str(tmp_path))
    assert [e for e, _ in calls2] == [4]     # chunk 1's weights were reloaded, not recomputed
    for (_, a), (_, b) in zip(log[1:], log2[1:]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(state.params),
                    jax.tree_util.tree_leaves(state2.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_periodic_bad_arguments():
    d = make_distiller()
    data = make_data(16)
    with pytest.raises(ValueError, match="rescore_every"):
        kd_aif.fit_periodic(d, d.init(0, data["x"][:2]), None, data, None, epochs=2,
                            rescore_every=0, batch_size=8)
    with pytest.raises(ValueError, match="mapping"):
        kd_aif.fit_periodic(d, d.init(0, data["x"][:2]), None, data, None, epochs=2,
                            rescore_every=1, mapping="softmax", batch_size=8)


def test_one_shot_uses_fixed_weights_from_uniform_student():
    d = make_distiller()
    data = make_data(64)
    scorer = kd_aif.make_scorer(d, data, make_data(16, seed=5), objective=functools.partial(
        kd_aif.distill_losses, ce_weight=CE_W, kd_weight=KD_W, temperature=TAU),
        curvature="last_layer")
    init = d.init(0, data["x"][:2])
    state, best, hist, w, scores = kd_aif.one_shot(d, init, None, data, scorer,
                                                   mapping="sigmoid", epochs=2,
                                                   batch_size=16, progress=False)
    np.testing.assert_allclose(w, influence_weights(scores, "sigmoid"), rtol=1e-6)
    assert int(state.epoch) == 2 and np.isfinite(np.asarray(scores)).all()
    # the weighted run differs from the uniform one (same init, same batches)
    from kdjax.train import fit
    uni = fit(d, d.init(0, data["x"][:2]), None, data, epochs=2, batch_size=16,
              progress=False).state
    assert not np.allclose(ravel_pytree(uni.params)[0], ravel_pytree(state.params)[0])


# --------------------------------------------------------------------- semi-supervised
def test_semi_supervised_never_uses_labels_of_unlabelled_points():
    data = make_data(32)
    labelled = np.zeros(32, bool)
    labelled[:8] = True
    t = data["teacher_logits"].copy()
    t[10] = np.roll(t[10], 1)                       # the teacher is wrong on a point
    semi = kd_aif.semi_supervised_data(data["x"], data["y"], labelled, t)
    np.testing.assert_array_equal(semi["y"][:8], data["y"][:8])
    np.testing.assert_array_equal(semi["y"][8:], t[8:].argmax(-1))   # pseudo-labels only
    assert semi["y"][10] != data["y"][10]
    np.testing.assert_array_equal(semi["label_mask"], labelled.astype(np.float32))
    # the engine's loss and gradient do not depend on y of unlabelled rows
    d = make_distiller()
    state = d.init(0, data["x"][:2])
    other = dict(semi, y=np.where(labelled, semi["y"], (semi["y"] + 1) % C))

    def grads(b):
        b = {k: jnp.asarray(v) for k, v in b.items()}
        return jax.grad(lambda p: d.loss_fn(p, state, None, b, jax.random.PRNGKey(0))[0])(
            state.params)

    for a, b in zip(jax.tree_util.tree_leaves(grads(semi)),
                    jax.tree_util.tree_leaves(grads(other))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    z = jnp.asarray(np.random.default_rng(0).normal(size=(32, C)), jnp.float32)
    np.testing.assert_array_equal(kd_aif.distill_losses(z, semi), kd_aif.distill_losses(
        z, other))


def test_semi_supervised_shape_errors():
    data = make_data(8)
    with pytest.raises(ValueError, match="leading dimension"):
        kd_aif.semi_supervised_data(data["x"], data["y"], np.ones(7, bool),
                                    data["teacher_logits"])


def test_noise_helpers():
    y = np.arange(100) % 10
    noisy, mask = kd_aif.flip_labels(y, 0.3, 10, seed=0)
    assert mask.sum() == 30
    assert (noisy[mask] != y[mask]).all() and (noisy[~mask] == y[~mask]).all()
    logits = np.eye(10, dtype=np.float32)[y] * 5
    bad, m2 = kd_aif.corrupt_teacher_logits(logits, 0.3, seed=1)
    assert m2.sum() == 30
    assert (bad[m2].argmax(-1) != y[m2]).all() and (bad[~m2] == logits[~m2]).all()
    np.testing.assert_allclose(np.sort(bad, -1), np.sort(logits, -1))  # a permutation


# --------------------------------------------------------------------------- MPL
def test_mpl_teacher_gradient_matches_finite_differences_and_lowers_val_loss():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        xu = jnp.asarray(rng.normal(size=(20, D)))
        xv = jnp.asarray(rng.normal(size=(12, D)))
        yv = jnp.asarray((np.asarray(xv)[:, 0] > 0).astype(np.int32))
        lin = lambda p, x: x @ p["w"] + p["b"]  # noqa: E731 convex (linear softmax) models
        tp = {"w": jnp.asarray(rng.normal(size=(D, C))), "b": jnp.zeros(C)}
        sp = {"w": jnp.asarray(0.1 * rng.normal(size=(D, C))), "b": jnp.zeros(C)}
        eta, tau = 0.5, 2.0
        unl, val = {"x": xu}, {"x": xv, "y": yv}
        grad, info = kd_aif.mpl_teacher_grad(lin, lin, tp, sp, unl, val, student_lr=eta,
                                             temperature=tau)

        def kd64(zs, zt):   # float64 KD (kdjax.losses.kd computes in float32)
            pt = jax.nn.softmax(zt / tau)
            return tau ** 2 * jnp.mean(jnp.sum(pt * (jax.nn.log_softmax(zt / tau)
                                                     - jax.nn.log_softmax(zs / tau)), -1))

        def val_after(tparams):   # L_val(theta_S - eta grad_S KD(T(theta_T), S))
            g = jax.grad(lambda s: kd64(lin(s, xu), lin(tparams, xu)))(sp)
            s2 = jax.tree_util.tree_map(lambda a, b: a - eta * b, sp, g)
            z = jax.nn.log_softmax(lin(s2, xv))          # float64 CE (val_losses is f32)
            return -jnp.mean(z[jnp.arange(len(yv)), yv])

        np.testing.assert_allclose(float(info["val_after"]), float(val_after(tp)), rtol=1e-6)
        flat, unravel = ravel_pytree(tp)
        g_flat = ravel_pytree(grad)[0]
        for k in range(3):
            u = jnp.asarray(rng.normal(size=flat.shape))
            eps = 1e-4
            fd = (val_after(unravel(flat + eps * u)) - val_after(unravel(flat - eps * u))) / (
                2 * eps)
            np.testing.assert_allclose(float(g_flat @ u), float(fd), rtol=1e-4, atol=1e-8)
        # a small teacher step against the gradient lowers the student's validation loss
        stepped = unravel(flat - 0.1 * g_flat / jnp.linalg.norm(g_flat))
        assert float(val_after(stepped)) < float(val_after(tp))


def test_mpl_step_updates_both_and_is_jittable():
    rng = np.random.default_rng(0)
    lin = lambda p, x: x @ p["w"]  # noqa: E731
    tp = {"w": jnp.asarray(rng.normal(size=(D, C)), jnp.float32)}
    sp = {"w": jnp.zeros((D, C), jnp.float32)}
    tx = optax.sgd(0.1)
    unl = {"x": jnp.asarray(rng.normal(size=(8, D)), jnp.float32)}
    val = {"x": unl["x"][:4], "y": jnp.array([0, 1, 2, 0])}
    step = jax.jit(functools.partial(kd_aif.mpl_step, lin, lin, teacher_tx=tx,
                                     student_tx=tx, student_lr=0.1))
    t2, s2, _, _, info = step(tp, sp, tx.init(tp), tx.init(sp), unlabelled=unl, val=val)
    assert not np.allclose(t2["w"], tp["w"]) and not np.allclose(s2["w"], sp["w"])
    with pytest.raises(ValueError, match="student_lr"):
        kd_aif.mpl_teacher_grad(lin, lin, tp, sp, unl, val, student_lr=0.0)


def test_fit_mpl_teacher_step_lowers_lookahead_val_loss_and_is_deterministic():
    """One MPL step (teacher CE off, SGD) moves the teacher against the meta gradient, so
    the student's validation loss after its look-ahead step on the new teacher's
    pseudo-labels is lower than on the old teacher's (same student, same batch)."""
    rng = np.random.default_rng(1)
    lin = lambda p, x: x @ p["w"] + p["b"]  # noqa: E731
    n = 16
    xu = jnp.asarray(rng.normal(size=(n, D)), jnp.float32)
    xv = jnp.asarray(rng.normal(size=(12, D)), jnp.float32)
    val = {"x": xv, "y": jnp.asarray((np.asarray(xv)[:, 0] > 0).astype(np.int32))}
    tp = {"w": jnp.asarray(rng.normal(size=(D, C)), jnp.float32), "b": jnp.zeros(C)}
    sp = {"w": jnp.asarray(0.1 * rng.normal(size=(D, C)), jnp.float32), "b": jnp.zeros(C)}
    kw = dict(key=jax.random.PRNGKey(3), batch_size=n, teacher_tx=optax.sgd(0.5),
              student_tx=optax.sgd(0.5), student_lr=0.5, temperature=2.0,
              teacher_ce_weight=0.0)
    t1, s1, log = kd_aif.fit_mpl(lin, lin, tp, sp, xu, val, steps=1, **kw)

    def lookahead(t):   # batch_size = n: the step's batch is a permutation of xu
        return float(kd_aif.mpl_teacher_grad(lin, lin, t, sp, {"x": xu}, val, student_lr=0.5,
                                             temperature=2.0)[1]["val_after"])

    assert not np.allclose(t1["w"], tp["w"])
    np.testing.assert_allclose(log["val_after"][0], lookahead(tp), rtol=1e-5)
    assert lookahead(t1) < lookahead(tp) - 1e-4
    # deterministic given the key; several steps with a smaller batch run and differ
    a = kd_aif.fit_mpl(lin, lin, tp, sp, xu, val, steps=3, **{**kw, "batch_size": 8})
    b = kd_aif.fit_mpl(lin, lin, tp, sp, xu, val, steps=3, **{**kw, "batch_size": 8})
    np.testing.assert_array_equal(a[0]["w"], b[0]["w"])
    assert a[2]["val_before"].shape == (3,)
    # the teacher's supervised CE is on `labelled` (default: val)
    kw_ce = {**kw, "teacher_ce_weight": 1.0}
    c1 = kd_aif.fit_mpl(lin, lin, tp, sp, xu, val, steps=1, **kw_ce)[0]
    c2 = kd_aif.fit_mpl(lin, lin, tp, sp, xu, val, steps=1, labelled=val, **kw_ce)[0]
    c3 = kd_aif.fit_mpl(lin, lin, tp, sp, xu, val, steps=1,
                        labelled={"x": xu[:4], "y": jnp.array([0, 1, 2, 0])}, **kw_ce)[0]
    np.testing.assert_allclose(c1["w"], c2["w"], rtol=1e-6)
    assert not np.allclose(c1["w"], c3["w"])


@pytest.mark.parametrize("override,match", [
    ({"steps": 0}, r"steps must be an integer >= 1, got 0"),
    ({"batch_size": 17}, r"batch_size must be <= the number of unlabelled examples \(16\), "
                         r"got 17"),
    ({"student_lr": 0.0}, r"student_lr"),
])
def test_fit_mpl_bad_arguments(override, match):
    lin = lambda p, x: x @ p  # noqa: E731
    x = jnp.ones((16, D))
    val = {"x": x[:2], "y": jnp.array([0, 1])}
    kw = dict(key=jax.random.PRNGKey(0), steps=1, batch_size=4, teacher_tx=optax.sgd(0.1),
              student_tx=optax.sgd(0.1), student_lr=0.1)
    with pytest.raises(ValueError, match=match):
        kd_aif.fit_mpl(lin, lin, jnp.zeros((D, C)), jnp.zeros((D, C)), x, val,
                       **{**kw, **override})
