"""Training engine: 1 vs 8 devices, vmapped seeds, no recompilation, checkpoints, resume."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import methods, models
from kdjax.train import (Checkpointer, DivergenceError, Distiller, EvalSet, Evaluation,
                         FitResult, count_compilations, fit, make_mesh, make_optimizer)


def _data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 40, 1)).astype(np.float32)
    y = (x[:, :10, 0].sum(1) > 0).astype(np.int32) + 2 * (x[:, 10:20, 0].sum(1) > 0)
    return {"x": x, "y": y.astype(np.int32)}


def _teacher_vars(teacher, x):
    return teacher.init(jax.random.PRNGKey(42), x[:2])


def _distiller(teacher=True, lr=1e-2):
    student = models.create("cnn1d", 4, channels=(8, 8))
    t = models.create("mlp", 4, hidden=(16,)) if teacher else None
    ms = [methods.build({"name": "ce", "weight": 0.5})]
    if teacher:
        ms.append(methods.build({"name": "kd", "weight": 0.5}))
    tx = make_optimizer({"name": "sgd", "learning_rate": lr, "schedule": "cosine"},
                        total_steps=100, steps_per_epoch=8)
    return Distiller(student, tuple(ms), tx, teacher=t)


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(a, np.float64))
                           for a in jax.tree_util.tree_leaves(tree)])


def test_eight_devices_equal_one_device(n_devices):
    d = _distiller()
    data = _data()
    tv = _teacher_vars(d.teacher, data["x"])
    out = {}
    for n in (1, 8):
        mesh = make_mesh(n)
        state = d.init(0, data["x"][:2], tv)
        res = fit(d, state, tv, data, epochs=3, batch_size=32, mesh=mesh,
                             evaluation=Evaluation({"val": EvalSet(x=data["x"][:64], y=data["y"][:64])}),
                             progress=False)
        state, hist = res.state, res.history
        out[n] = (_flat(state.params), [h["train"]["total"] for h in hist])
    np.testing.assert_allclose(out[8][0], out[1][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[8][1], out[1][1], rtol=1e-5)


def test_training_reduces_loss_and_teacher_is_not_updated():
    d = _distiller()
    data = _data()
    tv = _teacher_vars(d.teacher, data["x"])
    tv_before = _flat(tv)
    state = d.init(0, data["x"][:2], tv)
    res = fit(d, state, tv, data, epochs=6, batch_size=32,
              evaluation=Evaluation({"val": EvalSet(x=data["x"], y=data["y"])}), progress=False)
    state, hist = res.state, res.history
    assert hist[-1]["train"]["total"] < hist[0]["train"]["total"]
    np.testing.assert_array_equal(_flat(tv), tv_before)
    assert set(state.params) == {"student", "adapters"}


def test_vmapped_seeds_equal_sequential_runs():
    d = _distiller()
    data = _data()
    tv = _teacher_vars(d.teacher, data["x"])
    keys = jnp.stack([jax.random.PRNGKey(s) for s in (0, 1, 2)])
    states = jax.vmap(lambda k: d.init(k, data["x"][:2], tv))(keys)
    res = fit(d, states, tv, data, epochs=2, batch_size=32, progress=False)
    states = res.state
    assert isinstance(res, FitResult) and len(res.best) == 3
    for i, s in enumerate((0, 1, 2)):
        single = fit(d, d.init(s, data["x"][:2], tv), tv, data, epochs=2,
                     batch_size=32, progress=False).state
        vm = jax.tree_util.tree_map(lambda a: a[i], states.params)
        np.testing.assert_allclose(_flat(vm), _flat(single.params), rtol=2e-5, atol=1e-6)
    # and the seeds really differ
    assert not np.allclose(_flat(jax.tree_util.tree_map(lambda a: a[0], states.params)),
                           _flat(jax.tree_util.tree_map(lambda a: a[1], states.params)))


def test_no_recompilation_after_first_epoch():
    d = _distiller()
    data = _data()
    tv = _teacher_vars(d.teacher, data["x"])
    epoch = d.jit_epoch(32)
    state = d.init(0, data["x"][:2], tv)
    xs = jax.tree_util.tree_map(jnp.asarray, data)
    # counted through JAX's compile events (compiled or read from a persistent cache),
    # not the private jit cache size, which read 0 in a CI worker with the cache enabled
    with count_compilations() as first:
        state, _ = epoch(state, tv, xs)
    with count_compilations() as later:
        for _ in range(3):
            state, _ = epoch(state, tv, xs)
    assert first.events >= 1 and later.events == 0, (first, later)
    assert int(state.epoch) == 4 and int(state.step) == 4 * (256 // 32)


def test_loop_mode_does_not_recompile_after_first_epoch():
    """The loop epoch (the 'auto' choice for conv students on CPU) compiles one step
    program (the plan and the epoch bump live inside it); later epochs compile nothing."""
    from jax import monitoring

    d = _distiller()
    data = _data()
    tv = _teacher_vars(d.teacher, data["x"])
    epoch = d.epoch_runner(32, data["x"])
    assert epoch is d.loop_epoch(32)
    state = d.init(0, data["x"][:2], tv)
    xs = jax.tree_util.tree_map(jnp.asarray, data)
    with count_compilations() as first:
        state, _ = epoch(state, tv, xs)
    # at most one program: compiled, read from a persistent cache (a driver test earlier
    # in the same worker may have enabled one), or none when an earlier test of this
    # worker already built this distiller's runner (equal signatures share it)
    assert first.events <= 1
    compiles = []
    listener = lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None
    monitoring.register_event_duration_secs_listener(listener)
    try:
        for _ in range(3):
            state, _ = epoch(state, tv, xs)
    finally:
        monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    assert int(state.epoch) == 4 and int(state.step) == 4 * (256 // 32)


def test_same_seed_same_numbers_and_different_seed_differs():
    d = _distiller()
    data = _data()
    tv = _teacher_vars(d.teacher, data["x"])
    runs = [fit(d, d.init(s, data["x"][:2], tv), tv, data, epochs=2, batch_size=32,
                progress=False).state for s in (0, 0, 1)]
    np.testing.assert_array_equal(_flat(runs[0].params), _flat(runs[1].params))
    assert not np.array_equal(_flat(runs[0].params), _flat(runs[2].params))


def test_methods_needing_teacher_without_teacher_is_an_error():
    with pytest.raises(ValueError, match=r"methods \['kd'\] need a teacher"):
        Distiller(models.create("mlp", 3), (methods.build({"name": "kd"}),),
                  make_optimizer({"name": "adam", "learning_rate": 1e-3},
                                 total_steps=1, steps_per_epoch=1))


def test_checkpoint_round_trip_and_resume_equals_uninterrupted(tmp_path):
    d = _distiller()
    data = _data()
    tv = _teacher_vars(d.teacher, data["x"])
    ref = fit(d, d.init(0, data["x"][:2], tv), tv, data, epochs=4,
                           batch_size=32, progress=False,
                           evaluation=Evaluation({"val": EvalSet(x=data["x"][:64], y=data["y"][:64])}))
    ref, ref_hist = ref.state, ref.history
    ck = Checkpointer(str(tmp_path / "ck"))
    fit(d, d.init(0, data["x"][:2], tv), tv, data, epochs=2, batch_size=32, progress=False,
        checkpointer=ck, evaluation=Evaluation({"val": EvalSet(x=data["x"][:64], y=data["y"][:64])}))
    assert ck.steps()[-1] == 2
    # "restart": a fresh state template, the same checkpointer, the full epoch count
    ck2 = Checkpointer(str(tmp_path / "ck"))
    res = fit(d, d.init(0, data["x"][:2], tv), tv, data, epochs=4, batch_size=32,
                       progress=False, checkpointer=ck2,
                       evaluation=Evaluation({"val": EvalSet(x=data["x"][:64], y=data["y"][:64])}))
    res, hist = res.state, res.history
    np.testing.assert_array_equal(_flat(res.params), _flat(ref.params))
    np.testing.assert_array_equal(_flat(res.opt_state), _flat(ref.opt_state))
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert [h["val"]["accuracy"] for h in hist] == [h["val"]["accuracy"] for h in ref_hist]


def test_corrupted_latest_checkpoint_falls_back_with_warning(tmp_path):
    d = _distiller()
    data = _data()
    tv = _teacher_vars(d.teacher, data["x"])
    ck = Checkpointer(str(tmp_path / "ck"), max_to_keep=3)
    state = d.init(0, data["x"][:2], tv)
    fit(d, state, tv, data, epochs=2, batch_size=32, progress=False, checkpointer=ck)
    latest = tmp_path / "ck" / "2"
    # truncate every file of the newest step
    for root, _, files in os.walk(latest):
        for f in files:
            with open(os.path.join(root, f), "r+b") as fh:
                fh.truncate(0)
    template = {"state": d.init(0, data["x"][:2], tv),
                "best": [{"params": d.init(0, data["x"][:2], tv).params["student"],
                          "batch_stats": d.init(0, data["x"][:2], tv).batch_stats}]}
    with pytest.warns(UserWarning, match=r"checkpoint step 2 .* unreadable"):
        step, restored, _ = Checkpointer(str(tmp_path / "ck")).restore_latest(template)
    assert step == 1 and int(restored["state"].epoch) == 1


KILL_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    from test_engine import _distiller, _data, _teacher_vars
    from kdjax.train import Checkpointer, fit
    d = _distiller(); data = _data(); tv = _teacher_vars(d.teacher, data["x"])
    ck = Checkpointer({ckdir!r}, max_to_keep=2)
    state = fit(d, d.init(0, data["x"][:2], tv), tv, data, epochs={epochs},
                batch_size=32, progress=False, checkpointer=ck).state
    import numpy as np, jax
    flat = np.concatenate([np.ravel(np.asarray(a, np.float64))
                           for a in jax.tree_util.tree_leaves(state.params)])
    np.save({out!r}, flat)
""")


@pytest.mark.slow
def test_sigkill_at_random_epoch_then_resume_gives_identical_params(tmp_path):
    epochs = 12
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tests = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "run.py"
    ckdir = str(tmp_path / "ck")
    out = str(tmp_path / "final.npy")
    script.write_text(KILL_SCRIPT.format(root=root, tests=tests, ckdir=ckdir, epochs=epochs,
                                         out=out))
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    kill_after = int(np.random.default_rng().integers(2, epochs - 2))
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        steps = [int(s) for s in os.listdir(ckdir) if s.isdigit()] if os.path.isdir(ckdir) else []
        if steps and max(steps) >= kill_after:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(out), "the run finished before it could be killed"
    # resume to completion
    subprocess.run([sys.executable, str(script)], env=env, check=True, timeout=300)
    resumed = np.load(out)
    # uninterrupted reference in a fresh directory
    ref_script = tmp_path / "ref.py"
    ref_out = str(tmp_path / "ref.npy")
    ref_script.write_text(KILL_SCRIPT.format(root=root, tests=tests, ckdir=str(tmp_path / "ck2"),
                                             epochs=epochs, out=ref_out))
    subprocess.run([sys.executable, str(ref_script)], env=env, check=True, timeout=300)
    np.testing.assert_array_equal(resumed, np.load(ref_out))


def test_bf16_compute_keeps_float32_params_and_finite_loss():
    student = models.create("cnn1d", 4, channels=(8, 8), dtype=jnp.bfloat16)
    teacher = models.create("mlp", 4, hidden=(16,))
    tx = make_optimizer({"name": "adam", "learning_rate": 1e-3}, total_steps=10,
                        steps_per_epoch=8)
    d = Distiller(student, (methods.build({"name": "ce"}), methods.build({"name": "kd"})), tx,
                  teacher=teacher, compute_dtype=jnp.bfloat16)
    data = _data()
    tv = _teacher_vars(teacher, data["x"])
    state = d.init(0, data["x"][:2], tv)
    state, terms = jax.jit(d.train_step)(state, tv, {k: v[:32] for k, v in data.items()},
                                         jax.random.PRNGKey(0))
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(state.params))
    assert terms["total"].dtype == jnp.float32 and np.isfinite(float(terms["total"]))
    logits, feats = student.apply({"params": state.params["student"],
                                   "batch_stats": state.batch_stats}, data["x"][:4])
    assert logits.dtype == jnp.bfloat16


def test_precomputed_teacher_logits_equal_online_teacher():
    d_online = _distiller()
    d_pre = Distiller(d_online.student, d_online.methods, d_online.tx, teacher=d_online.teacher,
                      teacher_from_batch=True)
    data = _data()
    tv = _teacher_vars(d_online.teacher, data["x"])
    from kdjax.train import predict
    pre = dict(data, teacher_logits=predict(lambda x: d_online.teacher.apply(tv, x), data["x"]))
    a = fit(d_online, d_online.init(0, data["x"][:2], tv), tv, data, epochs=2,
            batch_size=32, progress=False).state
    b = fit(d_pre, d_pre.init(0, data["x"][:2], tv), None, pre, epochs=2, batch_size=32,
            progress=False).state
    np.testing.assert_allclose(_flat(a.params), _flat(b.params), rtol=1e-5, atol=1e-6)


def test_second_fit_and_its_evaluations_compile_nothing():
    """fit's epoch and evaluation programs are built once per distiller: a second fit
    (another seed, with evaluation every epoch) compiles nothing."""
    d = _distiller()
    data = _data()
    tv = _teacher_vars(d.teacher, data["x"])
    ev = Evaluation({"val": EvalSet(x=data["x"][:100], y=data["y"][:100])})
    fit(d, d.init(0, data["x"][:2], tv), tv, data, epochs=2, batch_size=32, progress=False,
        evaluation=ev)
    state = d.init(1, data["x"][:2], tv)
    with count_compilations() as c:
        res = fit(d, state, tv, data, epochs=3, batch_size=32, progress=False, evaluation=ev)
    assert c.count == 0 and len(res.history) == 3
    from kdjax.train import predict
    st = d.init(0, data["x"][:2], tv)
    ref = predict(d.student_apply(st), data["x"][:100], 64)
    np.testing.assert_allclose(d.predict(st, data["x"][:100], 64), ref, rtol=1e-6)


@pytest.mark.parametrize("num_seeds", [0, 2])
def test_loop_epoch_mode_equals_scan_mode(num_seeds):
    d = _distiller()
    loop = Distiller(d.student, d.methods, d.tx, teacher=d.teacher, epoch_mode="loop")
    data = _data()
    tv = _teacher_vars(d.teacher, data["x"])

    def init(dist):
        if not num_seeds:
            return dist.init(0, data["x"][:2], tv)
        keys = jnp.stack([jax.random.PRNGKey(s) for s in range(num_seeds)])
        return jax.vmap(lambda k: dist.init(k, data["x"][:2], tv))(keys)

    ra = fit(d, init(d), tv, data, epochs=2, batch_size=32,
                   progress=False, evaluation=Evaluation({"val": EvalSet(x=data["x"][:64], y=data["y"][:64])}))
    rb = fit(loop, init(loop), tv, data, epochs=2, batch_size=32,
                   progress=False, evaluation=Evaluation({"val": EvalSet(x=data["x"][:64], y=data["y"][:64])}))
    (a, ha), (b, hb) = (ra.state, ra.history), (rb.state, rb.history)
    np.testing.assert_allclose(_flat(b.params), _flat(a.params), rtol=1e-5, atol=1e-6)
    assert int(np.asarray(b.epoch).reshape(-1)[0]) == 2
    np.testing.assert_allclose([h["train"]["total"] for h in hb],
                               [h["train"]["total"] for h in ha], rtol=1e-5)
    with pytest.raises(ValueError,
                       match=r"epoch_mode must be one of \['auto', 'loop', 'scan'\], got 'unrolled'"):
        Distiller(d.student, d.methods, d.tx, teacher=d.teacher, epoch_mode="unrolled")


def test_auto_epoch_mode_picks_loop_for_convolutions_on_cpu():
    """'auto' = loop when the student convolves (XLA:CPU runs scanned backward
    convolutions through a slow kernel), scan for dense students."""
    x = jnp.zeros((4, 40), jnp.float32)
    tx = optax.sgd(0.1)
    ce = (methods.build({"name": "ce"}),)
    kd = (methods.build({"name": "kd"}),)
    cnn, mlp = models.create("cnn1d", 10, channels=(4,)), models.create("mlp", 10, hidden=(8,))
    assert Distiller(cnn, ce, tx).resolve_epoch_mode(x) == "loop"
    assert Distiller(mlp, ce, tx).resolve_epoch_mode(x) == "scan"
    # only the differentiated network counts: a conv teacher's forward scans fine
    assert Distiller(mlp, kd, tx, teacher=cnn).resolve_epoch_mode(x) == "scan"
    assert Distiller(mlp, kd, tx, teacher_from_batch=True).resolve_epoch_mode(x) == "scan"
    assert Distiller(cnn, ce, tx, epoch_mode="scan").resolve_epoch_mode(x) == "scan"
    assert Distiller(mlp, ce, tx, epoch_mode="loop").resolve_epoch_mode(x) == "loop"
    d = Distiller(cnn, ce, tx)
    assert d.epoch_runner(2, x) is d.loop_epoch(2)
    assert Distiller(mlp, ce, tx).epoch_runner(2, x) is not None


@pytest.mark.parametrize("num_seeds", [0, 2])
def test_divergence_stops_fit_naming_desc_seed_and_epoch(num_seeds, tmp_path):
    """A learning rate of 1e30 makes the parameters non-finite in the first epoch: fit
    raises naming the run, the seed index and the epoch, and checkpoints nothing."""
    d = _distiller(lr=1e30)
    data = _data()
    tv = _teacher_vars(d.teacher, data["x"])
    if num_seeds:
        keys = jnp.stack([jax.random.PRNGKey(s) for s in range(num_seeds)])
        state = jax.vmap(lambda k: d.init(k, data["x"][:2], tv))(keys)
    else:
        state = d.init(0, data["x"][:2], tv)
    ck = Checkpointer(str(tmp_path / "ck"))
    with pytest.raises(DivergenceError,
                       match=r"cell-a: training diverged at epoch 1 \(seed index 0\): "
                             r"non-finite .*parameters"):
        fit(d, state, tv, data, epochs=3, batch_size=32, progress=False, desc="cell-a",
            checkpointer=ck, evaluation=Evaluation({"val": EvalSet(x=data["x"][:64],
                                                                   y=data["y"][:64])},
                                                   select_on="val"))
    assert ck.steps() == []


def test_finite_run_history_has_no_divergence_flag():
    d = _distiller()
    data = _data()
    tv = _teacher_vars(d.teacher, data["x"])
    res = fit(d, d.init(0, data["x"][:2], tv), tv, data, epochs=1, batch_size=32,
              progress=False, evaluation=Evaluation({"val": EvalSet(x=data["x"][:64],
                                                                    y=data["y"][:64])}))
    assert set(res.history[0]["train"]) == {"ce", "kd", "total"}


# --- seeds: vmapped or in turn (Distiller.seed_mode) -----------------------------------

def _seed_distiller(student, seed_mode):
    tx = make_optimizer({"name": "sgd", "learning_rate": 5e-2, "schedule": "cosine"},
                        total_steps=24, steps_per_epoch=8)
    return Distiller(student, (methods.build({"name": "ce"}),), tx, seed_mode=seed_mode)


def test_seed_mode_rule_and_validation():
    mlp, cnn1d = models.create("mlp", 4, hidden=(16,)), models.create("cnn1d", 4, channels=(8,))
    cnn2d = models.create("cnn2d", 4, channels=(8,))
    x1, x2 = np.zeros((2, 40, 1), np.float32), np.zeros((2, 8, 8, 1), np.float32)
    auto = lambda m: _seed_distiller(m, "auto")  # noqa: E731
    assert auto(mlp).resolve_seed_mode(x1, 3) == "vmap"
    assert auto(mlp).resolve_seed_mode(x1, 8) == "sequential"     # CPU, dense, > 4 seeds
    assert auto(cnn1d).resolve_seed_mode(x1, 8) == "vmap"
    assert auto(cnn2d).resolve_seed_mode(x2, 2) == "sequential"   # 2-D convolution
    assert _seed_distiller(cnn2d, "vmap").resolve_seed_mode(x2, 2) == "vmap"
    with pytest.raises(ValueError, match="seed_mode must be one of .* got 'parallel'"):
        _seed_distiller(mlp, "parallel")


def test_seeds_in_turn_equal_vmapped_seeds_and_resume(tmp_path):
    data = _data(n=256)
    student = models.create("mlp", 4, hidden=(16,))
    ev = Evaluation({"val": EvalSet(x=data["x"][:64], y=data["y"][:64])}, select_on="val")
    out = {}
    for mode in ("vmap", "sequential"):
        d = _seed_distiller(student, mode)
        state = d.init_seeds([0, 1, 2], data["x"][:2])
        out[mode] = fit(d, state, None, data, epochs=3, batch_size=32, evaluation=ev,
                        progress=False)
    a, b = out["vmap"], out["sequential"]
    np.testing.assert_allclose(_flat(a.state.params), _flat(b.state.params), rtol=1e-5,
                               atol=1e-6)
    assert [r["epoch"] for r in a.best] == [r["epoch"] for r in b.best]
    assert [(h["epoch"], h["seed_index"]) for h in a.history] == \
        [(h["epoch"], h["seed_index"]) for h in b.history]
    assert a.state.epoch.shape == b.state.epoch.shape == (3,)
    # in turn with checkpoints: one directory per seed, and a resumed run (2 epochs, then
    # to 3) ends with the uninterrupted run's parameters
    d = _seed_distiller(student, "sequential")
    ck = Checkpointer(str(tmp_path / "ck"))
    fit(d, d.init_seeds([0, 1, 2], data["x"][:2]), None, data, epochs=2, batch_size=32,
        evaluation=ev, checkpointer=ck, progress=False)
    assert sorted(os.listdir(tmp_path / "ck")) == ["seed0", "seed1", "seed2"]
    resumed = fit(d, d.init_seeds([0, 1, 2], data["x"][:2]), None, data, epochs=3,
                  batch_size=32, evaluation=ev, checkpointer=ck, progress=False)
    np.testing.assert_array_equal(_flat(resumed.state.params), _flat(b.state.params))
    assert [r["epoch"] for r in resumed.best] == [r["epoch"] for r in b.best]
    with pytest.raises(ValueError, match="subdirectory name must be"):
        ck.subdirectory("3")
