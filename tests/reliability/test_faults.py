"""Faults a run survives, and garbage it refuses before training (issue 20).

Each test reproduces a failure of rev 492b993 with real damage -- truncated or garbled
files, a SIGKILLed subprocess, an unwritable directory, bad config values -- and checks
what a user sees now: the run continues from what is intact (and equals an
uninterrupted run), or stops at once with an error naming the path or config key.
"""

import glob
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import jax
import numpy as np
import pytest

from kdjax import methods, models
from kdjax._io import config_hash
from kdjax.train import Checkpointer, Distiller, fit, make_optimizer
from kdjax.train import cache as kcache
from kdjax.train import teacher as kteacher
from kdjax.train.teacher import get_teacher, validate_teacher_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _data(n=128, seed=0):
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, 8)).astype(np.float32)
    y = (x[:, :4].sum(1) > x[:, 4:].sum(1)).astype(np.int32)
    return {"x": x, "y": y}


def _cfg(**over):
    cfg = {"model": "mlp", "model_kwargs": {"hidden": (16,)}, "epochs": 3, "batch_size": 32,
           "seed": 0, "optimizer": {"name": "sgd", "learning_rate": 0.1,
                                    "schedule": "constant"}}
    for k, v in over.items():
        if k.startswith("optimizer."):
            cfg["optimizer"] = {**cfg["optimizer"], k.split(".", 1)[1]: v}
        else:
            cfg[k] = v
    return cfg


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(a, np.float64))
                           for a in jax.tree_util.tree_leaves(tree)])


def _teacher(cache_dir, cfg=None, **kw):
    return get_teacher(cfg or _cfg(), {"dataset": "toy"}, _data(), _data(64, seed=1), 2,
                       cache_dir=str(cache_dir), progress=False, **kw)


@pytest.fixture
def no_training(monkeypatch):
    """Makes any teacher training an error: what must fail, fails before it."""
    def trained(*a, **k):
        raise AssertionError("training started")
    monkeypatch.setattr(kteacher, "fit", trained)


# --- 1. corrupt checkpoints: resume from the newest readable step, save again ----------

def _student():
    tx = make_optimizer({"name": "sgd", "learning_rate": 0.05, "schedule": "cosine"},
                        total_steps=24, steps_per_epoch=4)
    return Distiller(models.create("mlp", 2, hidden=(8,)), (methods.build({"name": "ce"}),),
                     tx)


def _truncate_tree(path):
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "r+b") as fh:
                fh.truncate(0)


def test_fit_resumes_past_corrupt_steps_and_saves_them_again(tmp_path):
    d, data = _student(), _data()
    ref = fit(d, d.init(0, data["x"][:2]), None, data, epochs=6, batch_size=32,
              progress=False).state
    ck = str(tmp_path / "ck")
    fit(d, d.init(0, data["x"][:2]), None, data, epochs=4, batch_size=32, progress=False,
        checkpointer=Checkpointer(ck, max_to_keep=2))
    _truncate_tree(os.path.join(ck, "4"))        # kill + damaged newest step
    with pytest.warns(UserWarning, match=r"step 4 .* unreadable.*4\.corrupt-1"):
        res = fit(d, d.init(0, data["x"][:2]), None, data, epochs=6, batch_size=32,
                  progress=False, checkpointer=Checkpointer(ck, max_to_keep=2)).state
    np.testing.assert_array_equal(_flat(res.params), _flat(ref.params))
    assert Checkpointer(ck).steps() == [5, 6]
    # every step corrupt (it crashed at step 2 before): retrain from scratch, same result
    for s in (5, 6):
        _truncate_tree(os.path.join(ck, str(s)))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = fit(d, d.init(0, data["x"][:2]), None, data, epochs=6, batch_size=32,
                  progress=False, checkpointer=Checkpointer(ck, max_to_keep=2)).state
    assert sum("unreadable" in str(x.message) for x in w) == 2
    np.testing.assert_array_equal(_flat(res.params), _flat(ref.params))
    assert sorted(os.listdir(ck)) == ["4.corrupt-1", "5", "5.corrupt-1", "6", "6.corrupt-1"]


# --- 2./3. teacher cache: corrupt entries retrained, diverged teachers never cached -----

def test_corrupt_teacher_cache_is_set_aside_and_retrained(tmp_path):
    _, v0, m0 = _teacher(tmp_path)
    path, meta_path = kcache.entry_paths(str(tmp_path), f"teacher_{m0['key']}")
    md = os.path.join(path, "_METADATA")
    with open(md, "r+b") as f:                       # a truncated _METADATA JSON
        f.truncate(os.path.getsize(md) // 2)
    with pytest.warns(kcache.CacheWarning, match=rf"teacher_{m0['key']} is unreadable"):
        _, v1, m1 = _teacher(tmp_path)
    assert m1["cached"] is False and os.path.isdir(path + ".corrupt-1")
    np.testing.assert_array_equal(_flat(v1), _flat(v0))   # deterministic retrain
    with open(meta_path, "r+b") as f:                # then a truncated meta json
        f.truncate(10)
    with pytest.warns(kcache.CacheWarning, match=r"_meta\.json: JSONDecodeError"):
        _, v2, m2 = _teacher(tmp_path)
    assert not m2["cached"] and os.path.exists(meta_path + ".corrupt-2")
    assert _teacher(tmp_path)[2]["cached"]


def test_diverged_teacher_is_not_cached(tmp_path):
    cfg = _cfg(**{"optimizer.learning_rate": 1e6})
    key = config_hash(cfg, {"dataset": "toy"}, 2)
    for _ in range(2):        # the rerun refuses again; nothing was cached in between
        with pytest.raises(Exception, match=rf"(?s)teacher {key} \(model='mlp', "
                                            rf"optimizer=.*diverged.*epoch \d") as e:
            _teacher(tmp_path, cfg)
        assert isinstance(e.value, (ValueError, ArithmeticError, RuntimeError))
        assert not os.path.exists(kcache.entry_paths(str(tmp_path), f"teacher_{key}")[1])


# --- 4. teacher training is checkpointed and resumes after a SIGKILL --------------------

KILL_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import numpy as np, jax
    from kdjax.train import checkpoint
    orig = checkpoint.Checkpointer.save
    def save(self, step, *a, **k):
        orig(self, step, *a, **k)
        with open({log!r}, "a") as f:
            f.write(f"{{step}}\\n")
    checkpoint.Checkpointer.save = save
    from kdjax.train.teacher import get_teacher
    r = np.random.default_rng(0)
    x = r.normal(size=(256, 8)).astype(np.float32)
    y = (x[:, :4].sum(1) > x[:, 4:].sum(1)).astype(np.int32)
    cfg = {{"model": "mlp", "model_kwargs": {{"hidden": (16,)}}, "epochs": {epochs},
           "batch_size": 32, "seed": 0,
           "optimizer": {{"name": "sgd", "learning_rate": 0.1, "schedule": "cosine"}}}}
    _, v, meta = get_teacher(cfg, {{"dataset": "toy"}}, {{"x": x, "y": y}},
                             {{"x": x[:64], "y": y[:64]}}, 2, cache_dir={cache!r},
                             progress=False)
    np.save({out!r}, np.concatenate([np.ravel(np.asarray(a, np.float64))
                                     for a in jax.tree_util.tree_leaves(v)]))
""")


def _script(tmp_path, tag, epochs):
    paths = {k: str(tmp_path / f"{tag}_{k}") for k in ("cache", "log")}
    paths["out"] = str(tmp_path / f"{tag}_out.npy")
    p = tmp_path / f"{tag}.py"
    p.write_text(KILL_SCRIPT.format(root=ROOT, epochs=epochs, **paths))
    return str(p), paths


@pytest.mark.slow
def test_teacher_sigkill_at_epoch_7_of_10_resumes_at_7(tmp_path):
    epochs, kill_at = 10, 7
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    script, p = _script(tmp_path, "run", epochs)
    proc = subprocess.Popen([sys.executable, script], env=env)
    deadline = time.time() + 300

    def steps():
        return [int(os.path.basename(s)) for s in glob.glob(
            os.path.join(p["cache"], "teacher_*.ckpt", "*")) if os.path.basename(s).isdigit()]

    while time.time() < deadline and proc.poll() is None:
        if max(steps(), default=0) >= kill_at:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(p["out"]), "the teacher finished before it could be killed"
    killed_at = max(steps())          # read after the kill: a save may have completed
    assert kill_at <= killed_at < epochs
    with open(p["log"]) as f:
        first_run = [int(s) for s in f.read().split()]
    os.remove(p["log"])
    subprocess.run([sys.executable, script], env=env, check=True, timeout=300)
    with open(p["log"]) as f:
        resumed = [int(s) for s in f.read().split()]
    # the rerun trained only the epochs after the last checkpoint
    assert resumed == list(range(killed_at + 1, epochs + 1)), (first_run, resumed)
    assert not glob.glob(os.path.join(p["cache"], "teacher_*.ckpt"))   # cleaned up
    # the uninterrupted teacher (in this process) has exactly the resumed parameters
    r = np.random.default_rng(0)
    x = r.normal(size=(256, 8)).astype(np.float32)
    y = (x[:, :4].sum(1) > x[:, 4:].sum(1)).astype(np.int32)
    cfg = _cfg(epochs=epochs, **{"optimizer.schedule": "cosine"})
    _, ref, _ = get_teacher(cfg, {"dataset": "toy"}, {"x": x, "y": y},
                            {"x": x[:64], "y": y[:64]}, 2, cache_dir=str(tmp_path / "ref"),
                            progress=False)
    np.testing.assert_array_equal(np.load(p["out"]), _flat(ref))


# --- 5. unwritable cache directory: fails before training, naming the path -------------

def test_unwritable_cache_fails_before_training(tmp_path, no_training):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(kcache.NotWritableError, match=r"file/cache.*cannot be created"):
        _teacher(blocker / "cache")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_cache_fails_before_training(tmp_path, no_training):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(kcache.NotWritableError, match=r"ro.*not writable"):
            _teacher(ro)
    finally:
        ro.chmod(0o755)


# --- 8. late validation: every bad value fails before any training ---------------------

BAD = [
    ({"optimizer.name": "lion"}, r"teacher\.optimizer\.name must be one of \['adam', "
                                 r"'adamw', 'sgd'\], got 'lion'"),
    ({"optimizer.schedule": "linear"}, r"teacher\.optimizer\.schedule must be one of "
                                       r"\['constant', 'cosine', 'step'\], got 'linear'"),
    ({"optimizer.learning_rate": -0.1}, r"teacher\.optimizer\.learning_rate must be > 0, "
                                        r"got -0\.1"),
    ({"optimizer.learning_rate": float("inf")}, r"learning_rate must be finite, got inf"),
    ({"optimizer.learning_rate": float("nan")}, r"learning_rate must be finite, got nan"),
    ({"optimizer.learning_rate": "0.1"}, r"learning_rate must be a number, got '0\.1'"),
    ({"optimizer.weight_decay": float("inf")}, r"weight_decay must be finite, got inf"),
    ({"optimizer.momentum": 1.5}, r"momentum must be in \[0, 1\), got 1\.5"),
    ({"optimizer.grad_clip": float("nan")}, r"grad_clip must be finite, got nan"),
    ({"optimizer.lr": 0.1}, r"teacher\.optimizer has unknown keys \['lr'\]; valid keys"),
    ({"batch_size": 4096}, r"teacher\.batch_size must be <= 128 \(the 128 training "
                           r"examples.*got 4096"),
    ({"epochs": 0}, r"teacher\.epochs must be an int >= 1, got 0"),
    ({"model": "resnet999"}, r"teacher\.model: ResNet depth must be 6n\+2 .*got 999 in "
                             r"'resnet999'"),
    ({"model": "vgg11"}, r"teacher\.model: unknown model 'vgg11'; valid models: \["),
    ({"model_kwargs": {"width": 3}}, r"teacher\.model_kwargs: bad option for model 'mlp'"),
    ({"seed": 0.5}, r"teacher\.seed must be an int, got 0\.5"),
    ({"augment": "rotate"}, r"teacher config 'augment'"),
]


@pytest.mark.parametrize("over, match", BAD, ids=[str(o) for o, _ in BAD])
def test_bad_teacher_config_fails_before_training(tmp_path, no_training, over, match):
    with pytest.raises(ValueError, match=match):
        _teacher(tmp_path, _cfg(**over))
    with pytest.raises(ValueError, match=match):     # what drivers call before any cell
        validate_teacher_config(_cfg(**over), 128)
    assert not os.listdir(tmp_path)                   # nothing written


def test_validate_teacher_config_accepts_the_shipped_configs():
    import importlib
    checked = 0
    for name in ("distill", "kd2m", "faithful", "shift", "coss", "kd_aif"):
        cfg = importlib.import_module(f"experiments.configs.{name}").get_config()
        tc = cfg.teacher.to_dict()
        if not {"model", "epochs", "batch_size", "optimizer"} <= set(tc):
            continue
        validate_teacher_config(tc, max(tc["batch_size"], 1), num_classes=10)
        checked += 1
    assert checked >= 3


def test_bad_algorithm_fails_before_training(tmp_path, no_training):
    with pytest.raises(ValueError, match=r"teacher\.algorithm: unknown option\(s\) "
                                         r"\['temperature'\] for method 'ce'"):
        _teacher(tmp_path, algorithm={"name": "ce", "temperature": 4.0})
    with pytest.raises(ValueError, match=r"methods \['kd'\] need a teacher"):
        _teacher(tmp_path, algorithm={"name": "kd"})
