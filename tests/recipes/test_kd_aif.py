"""KD-AIF procedures: weighted loss, periodic re-scoring, semi-supervised data, MPL."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from kdjax import models
from kdjax.recipes import kd_aif
from kdjax.influence import influence_weights

C, D = 3, 5
CE_W, KD_W, TAU = 0.3, 0.7, 2.0


def log_softmax_np(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def make_distiller(epochs=4, steps=4):
    """kd_aif.make_distiller (ce + kd from batch logits; its loss is checked against numpy
    in test_weights_enter_engine_loss_as_mean_of_w_times_l)."""
    return kd_aif.make_distiller(models.create("mlp", C, hidden=(8,)), optax.adam(1e-2),
                                 ce_weight=CE_W, kd_weight=KD_W, temperature=TAU)


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


# ------------------------------------------------------------------ joint loop
def _softmax(z):
    return np.exp(log_softmax_np(z))


def test_joint_step_matches_hand_computed_update():
    """One KD-AIF joint step on linear teacher/student (logits x W), SGD for both,
    against the explicit formulas in float64 numpy:

    student loss L_S = (1/B) sum_i w_i [beta tau^2 KL(p_T,i || p_S,i) + alpha c m_i CE_i]
      dL_S/dz_i = (w_i / B) [beta tau (p^tau_S,i - p^tau_T,i) + alpha c m_i (p_S,i - e_y)]
    look-ahead Ws' = Ws - eta x^T dL_S/dz;  v = xv^T (softmax(xv Ws') - e_yv) / M
    d_i = u_i - <p^tau_S,i, u_i>, u_i = x_i v / tau
    meta grad Wt = x^T [eta beta tau^2 (w_i / B) (1/tau) p_T,i * (d_i - <p_T,i, d_i>)]
    teacher CE grad = xl^T (softmax(xl Wt) - e_yl) / L
    Wt' = Wt - lr_t (meta + gamma CE);  Ws_new = Ws - lr_s grad L_S(Ws; Wt')."""
    rng = np.random.default_rng(0)
    B, M, L = 8, 6, 4
    alpha, beta, tau, c, eta, gamma, lr_t, lr_s = 0.3, 0.7, 2.0, 2.0, 0.5, 0.8, 0.2, 0.3
    x = rng.normal(size=(B, D))
    y = rng.integers(0, C, B)
    m = (np.arange(B) % 2).astype(float)
    w = rng.uniform(0.3, 2.0, B)
    xv, yv = rng.normal(size=(M, D)), rng.integers(0, C, M)
    xl, yl = rng.normal(size=(L, D)), rng.integers(0, C, L)
    wt, ws = rng.normal(size=(D, C)), 0.3 * rng.normal(size=(D, C))
    eye = np.eye(C)

    def grad_student(ws, wt):
        pt, ps_tau, ps = _softmax(x @ wt / tau), _softmax(x @ ws / tau), _softmax(x @ ws)
        dz = (w / B)[:, None] * (beta * tau * (ps_tau - pt)
                                 + alpha * c * m[:, None] * (ps - eye[y]))
        return x.T @ dz

    def val_ce(ws):
        return -np.mean(log_softmax_np(xv @ ws)[np.arange(M), yv])

    ws_after = ws - eta * grad_student(ws, wt)
    v = xv.T @ (_softmax(xv @ ws_after) - eye[yv]) / M
    u = x @ v / tau
    ps_tau = _softmax(x @ ws / tau)
    d = u - (ps_tau * u).sum(-1, keepdims=True)
    pt = _softmax(x @ wt / tau)
    g_meta = x.T @ ((eta * beta * tau ** 2 * w / B)[:, None] / tau
                    * pt * (d - (pt * d).sum(-1, keepdims=True)))
    g_ce = xl.T @ (_softmax(xl @ wt) - eye[yl]) / L
    wt_new = wt - lr_t * (g_meta + gamma * g_ce)
    ws_new = ws - lr_s * grad_student(ws, wt_new)

    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    lin = lambda p, x: x @ p  # noqa: E731
    t_tx, s_tx = optax.sgd(lr_t), optax.sgd(lr_s)
    batch = {"x": f32(x), "y": jnp.asarray(y), "label_mask": f32(m), "weights": f32(w)}
    step = jax.jit(lambda tp, sp: kd_aif.joint_step(
        lin, lin, tp, sp, t_tx.init(tp), s_tx.init(sp), t_tx, s_tx, batch,
        {"x": f32(xv), "y": jnp.asarray(yv)}, {"x": f32(xl), "y": jnp.asarray(yl)},
        objective={"ce_weight": alpha, "kd_weight": beta, "temperature": tau,
                   "ce_scale": c}, student_lr=eta, teacher_ce_weight=gamma))
    tp2, sp2, _, _, info = step(f32(wt), f32(ws))
    np.testing.assert_allclose(np.asarray(tp2) - wt, wt_new - wt, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sp2) - ws, ws_new - ws, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(float(info["val_before"]), val_ce(ws), rtol=1e-5)
    np.testing.assert_allclose(float(info["val_after"]), val_ce(ws_after), rtol=1e-5)
    # The weights matter for both networks (the check can fail).
    tp_u, sp_u, *_ = jax.jit(lambda tp, sp: kd_aif.joint_step(
        lin, lin, tp, sp, t_tx.init(tp), s_tx.init(sp), t_tx, s_tx,
        {**batch, "weights": jnp.ones(B)}, {"x": f32(xv), "y": jnp.asarray(yv)},
        {"x": f32(xl), "y": jnp.asarray(yl)},
        objective={"ce_weight": alpha, "kd_weight": beta, "temperature": tau,
                   "ce_scale": c}, student_lr=eta, teacher_ce_weight=gamma))(f32(wt), f32(ws))
    assert not np.allclose(tp_u, tp2, atol=1e-6) and not np.allclose(sp_u, sp2, atol=1e-6)


OBJ = {"ce_weight": CE_W, "kd_weight": KD_W, "temperature": TAU}


def _joint_setup(n=48):
    data = make_data(n)
    val = {k: v for k, v in make_data(16, seed=5).items() if k in ("x", "y")}
    teacher = models.create("mlp", C, hidden=(8,))
    student = models.create("cnn1d", C, channels=(4,))   # BatchNorm: running statistics
    x = data["x"]
    tv = teacher.init(jax.random.PRNGKey(1), x[:2])
    sv = student.init(jax.random.PRNGKey(2), x[:2])
    return data, val, (teacher, tv), (student, sv)


def _fit_joint(scorer=None, epochs=3, **kw):
    data, val, teacher, student = _joint_setup()
    return kd_aif.fit_joint(teacher, student, {"x": data["x"], "y": data["y"]}, val,
                            key=jax.random.PRNGKey(7), epochs=epochs, batch_size=16,
                            teacher_tx=optax.sgd(0.05), student_tx=optax.adam(1e-2),
                            student_lr=0.1, objective=OBJ, scorer=scorer, **kw)


def test_fit_joint_epoch_equals_joint_steps_over_the_plan():
    """With uniform weights, one epoch of fit_joint is joint_step applied over the
    epoch's permutation (the loop adds nothing but the plan and the BN statistics)."""
    res = _fit_joint(epochs=1)
    data, val, (tm, tv), (sm, sv) = _joint_setup()
    tfn = lambda p, x: tm.apply({"params": p}, x, train=False)[0]  # noqa: E731
    rest = {"batch_stats": sv["batch_stats"]}
    tp, sp = tv["params"], sv["params"]
    t_tx, s_tx = optax.sgd(0.05), optax.adam(1e-2)
    ts, ss = t_tx.init(tp), s_tx.init(sp)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(7), 0), 0)
    perm = np.asarray(jax.random.permutation(key, 48))
    for rows in perm.reshape(3, 16):
        def sfn(p, x, rest=rest):
            return sm.apply({"params": p, **rest}, x, train=True, mutable=["batch_stats"])[0][0]
        batch = {"x": jnp.asarray(data["x"][rows]), "y": jnp.asarray(data["y"][rows]),
                 "weights": jnp.ones(16)}
        new_rest = sm.apply({"params": sp, **rest}, batch["x"], train=True,
                            mutable=["batch_stats"])[1]
        tp, sp, ts, ss, _ = kd_aif.joint_step(tfn, sfn, tp, sp, ts, ss, t_tx, s_tx, batch,
                                              val, None, objective=OBJ, student_lr=0.1)
        rest = dict(new_rest)
    for a, b in zip(jax.tree_util.tree_leaves((tp, sp, rest)),
                    jax.tree_util.tree_leaves((res.teacher_vars["params"],
                                               res.student_vars["params"],
                                               {"batch_stats": res.student_vars["batch_stats"]}))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(jax.tree_util.tree_leaves(rest)[0]),
                           np.asarray(jax.tree_util.tree_leaves(sv["batch_stats"])[0]))


def test_fit_joint_rescores_the_current_student_and_is_deterministic():
    data, val, (tm, _), (sm, _) = _joint_setup()
    real = kd_aif.make_joint_scorer(tm, sm, {"x": data["x"], "y": data["y"]}, val,
                                    objective=OBJ, curvature_examples=32, maxiter=20)
    calls = []

    def recording(tv, sv, weights):
        calls.append((jax.tree_util.tree_map(np.asarray, sv), np.asarray(weights)))
        return real(tv, sv, weights)

    res = _fit_joint(scorer=recording, epochs=5, rescore_every=2,
                     select_fn=lambda sv: 0.0)
    assert [e for e, _ in res.weights_log] == [0, 2, 4] and res.weights_log[0][1] is None
    assert len(calls) == 2 and np.all(calls[0][1] == 1.0)        # uniform, then re-scored
    np.testing.assert_allclose(calls[1][1], res.weights_log[1][1], rtol=1e-6)
    for _, w in res.weights_log[1:]:
        np.testing.assert_allclose(w.mean(), 1.0, rtol=1e-5)
        assert w.std() > 0
    assert len(res.timing["rescore_s"]) == 2 and len(res.timing["epoch_s"]) == 5
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4, 5]
    # the scored student is the loop's student at that epoch (not a fresh one)
    assert not np.allclose(ravel_pytree(calls[0][0]["params"])[0],
                           ravel_pytree(calls[1][0]["params"])[0])
    again = _fit_joint(scorer=real, epochs=5, rescore_every=2)
    for a, b in zip(jax.tree_util.tree_leaves(res.student_vars),
                    jax.tree_util.tree_leaves(again.student_vars)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # weighted run differs from the uniform (plain MPL) one
    uni = _fit_joint(epochs=5)
    assert not np.allclose(ravel_pytree(uni.student_vars["params"])[0],
                           ravel_pytree(res.student_vars["params"])[0])


@pytest.mark.parametrize("override,match", [
    ({"epochs": 0}, r"epochs must be an integer >= 1, got 0"),
    ({"batch_size": 49}, r"batch_size must be <= the number of training examples \(48\), "
                         r"got 49"),
    ({"student_lr": 0.0}, r"student_lr"),
    ({"mapping": "softmax"}, r"mapping must be one of"),
    ({"objective": {"ce_weight": 0.1}}, r"objective must have keys .* missing "
                                        r"\['kd_weight', 'temperature'\]"),
])
def test_fit_joint_bad_arguments(override, match):
    data, val, teacher, student = _joint_setup()
    kw = dict(key=jax.random.PRNGKey(0), epochs=1, batch_size=16,
              teacher_tx=optax.sgd(0.1), student_tx=optax.sgd(0.1), student_lr=0.1,
              objective=OBJ)
    with pytest.raises(ValueError, match=match):
        kd_aif.fit_joint(teacher, student, data, val, **{**kw, **override})
