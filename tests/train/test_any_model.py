"""The engine trains any Flax model: Dropout students, logits-only modules, modules
without ``train``, features by path (:func:`kdjax.models.wrap`) and ``flax.nnx``
models (:func:`kdjax.models.from_nnx`)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kdjax import methods, models
from kdjax.train import Distiller, EvalSet, Evaluation, fit


def _data(n=128, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int32) + 2 * (x[:, 2] > 0)
    return {"x": x, "y": y.astype(np.int32)}


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(a, np.float64))
                           for a in jax.tree_util.tree_leaves(tree)])


def _fit(d, state, tv, data, epochs=4):
    ev = Evaluation({"val": EvalSet(x=data["x"], y=data["y"])})
    return fit(d, state, tv, data, epochs=epochs, batch_size=32, evaluation=ev,
               progress=False)


CE = methods.build({"name": "ce"})


class DropoutNet(nn.Module):
    """kdjax's contract (``train``, ``(logits, features)``) with a Dropout."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.relu(nn.Dense(32)(x))
        h = nn.Dropout(0.5)(h, deterministic=not train)
        return nn.Dense(4)(h), {"pooled": h}


class Logits(nn.Module):
    """An ordinary linen classifier: logits only, Dropout under ``deterministic``."""

    width: int = 16

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        h = nn.relu(nn.Dense(self.width)(x))
        h = nn.Dropout(0.2)(h, deterministic=deterministic)
        return nn.Dense(4)(h)


class NoTrain(nn.Module):
    """A teacher whose ``__call__`` has no mode argument at all."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(24, name="enc")(x)
        return nn.Dense(4, name="out")(jnp.tanh(h))


def test_dropout_student_trains_with_rng_streams():
    data = _data()
    d = Distiller(DropoutNet(), (CE,), optax.adam(1e-2), epoch_mode="scan")
    runs = [_fit(d, d.init(s, data["x"][:2]), None, data) for s in (0, 0, 1)]
    losses = [r["train"]["total"] for r in runs[0].history]
    assert losses[-1] < 0.8 * losses[0]
    np.testing.assert_array_equal(_flat(runs[0].state.params), _flat(runs[1].state.params))
    assert not np.allclose(_flat(runs[0].state.params), _flat(runs[2].state.params))
    # dropout is live in train mode: the step's key changes the loss; eval mode does not
    state = runs[0].state
    batch = {k: v[:32] for k, v in data.items()}
    l1, l2, l1b = (d.loss_fn(state.params, state, None, batch, jax.random.PRNGKey(k))[0]
                   for k in (1, 2, 1))
    assert float(l1) == float(l1b) and abs(float(l1) - float(l2)) > 1e-6
    p1, p2 = d.predict(state, data["x"]), d.predict(state, data["x"])
    np.testing.assert_array_equal(p1, p2)
    ref = DropoutNet().apply({"params": state.params["student"]}, data["x"], train=False)[0]
    np.testing.assert_allclose(p1, ref, rtol=1e-5, atol=1e-6)
    # without the stream, linen's Dropout has no rng: the field is what makes it train
    bare = Distiller(DropoutNet(), (CE,), optax.adam(1e-2), epoch_mode="scan", rng_streams=())
    s0 = bare.init(0, data["x"][:2])
    with pytest.raises(Exception, match="dropout"):
        bare.loss_fn(s0.params, s0, None, batch, jax.random.PRNGKey(0))


def test_rng_streams_do_not_change_a_model_without_dropout():
    data = _data()
    mlp = models.create("mlp", 4, hidden=(16,))
    out = []
    for streams in ((), ("dropout",), ("dropout", "noise")):
        d = Distiller(mlp, (CE,), optax.sgd(0.1), epoch_mode="scan", rng_streams=streams)
        out.append(_flat(_fit(d, d.init(0, data["x"][:2]), None, data, epochs=2).state.params))
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])


def test_logits_only_student_and_no_train_teacher_distil_features_by_path():
    data = _data()
    teacher_inner = NoTrain()
    tv_inner = teacher_inner.init(jax.random.PRNGKey(3), data["x"][:2])
    teacher = models.wrap(teacher_inner, {"hidden": "enc"})
    assert teacher.train_arg is None
    student = models.wrap(Logits(), {"hidden": "Dense_0"})
    assert (student.train_arg, student.invert) == ("deterministic", True)
    ms = (CE, methods.build({"name": "kd"}),
          methods.build({"name": "fitnet", "weight": 1.0, "pairs": [["hidden", "hidden"]]}))
    d = Distiller(student, ms, optax.adam(1e-2), teacher=teacher, epoch_mode="scan")
    tv = models.wrap_variables(tv_inner)
    state = d.init(0, data["x"][:2], tv)
    # the inner tree nested under one name
    assert set(state.params["student"]) == {"module"}
    assert set(state.params["student"]["module"]) == {"Dense_0", "Dense_1"}
    res = _fit(d, state, tv, data, epochs=5)
    first, last = res.history[0]["train"], res.history[-1]["train"]
    assert last["fitnet"] < 0.7 * first["fitnet"] and last["total"] < first["total"]
    # the teacher's logits and features are those of the plain module
    t_logits, t_feats = d._teacher_out(tv, jnp.asarray(data["x"]))
    np.testing.assert_allclose(t_logits, teacher_inner.apply(tv_inner, data["x"]), rtol=1e-6)
    k = tv_inner["params"]["enc"]
    np.testing.assert_allclose(t_feats["hidden"], data["x"] @ k["kernel"] + k["bias"],
                               rtol=1e-5, atol=1e-6)
    # the student's eval-mode predictions are the inner module's
    p = res.state.params["student"]
    np.testing.assert_allclose(d.predict(res.state, data["x"]),
                               Logits().apply({"params": p["module"]}, data["x"]),
                               rtol=1e-5, atol=1e-6)


def test_unwrapped_modules_get_a_clear_error():
    data = _data()
    x = data["x"][:2]
    with pytest.raises(ValueError, match=r"student NoTrain.__call__ takes no `train`.*"
                                         r"kdjax.models.wrap"):
        Distiller(NoTrain(), (CE,), optax.sgd(0.1)).init(0, x)

    class LogitsTrain(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(4)(x)

    with pytest.raises(ValueError, match=r"student returned an array of shape \(2, 4\).*"
                                         r"kdjax.models.wrap"):
        Distiller(LogitsTrain(), (CE,), optax.sgd(0.1)).init(0, x)
    t = NoTrain()
    d = Distiller(models.wrap(LogitsTrain()), (CE, methods.build({"name": "kd"})),
                  optax.sgd(0.1), teacher=t)
    with pytest.raises(ValueError, match="teacher NoTrain"):
        d.init(0, x, t.init(jax.random.PRNGKey(0), x))


class Triple(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.Dense(4)(x)
        return y, y, 3


def test_bad_outputs_name_what_was_received():
    x = _data()["x"][:2]
    d = Distiller(models.wrap(Triple()), (CE,), optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"Triple returned a tuple of 3 \(an array of shape "
                                         r"\(2, 4\), an array of shape \(2, 4\), a value of "
                                         r"type int\)"):
        d.init(0, x)


# --- flax.nnx ----------------------------------------------------------------------------

class NNXStudent(nnx.Module):
    def __init__(self, din, *, rngs: nnx.Rngs):
        self.body = nnx.Linear(din, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.head = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        h = self.drop(nnx.relu(self.bn(self.body(x))))
        return self.head(h)


class NNXTeacher(nnx.Module):
    def __init__(self, din, width, *, rngs: nnx.Rngs):
        self.enc = nnx.Linear(din, width, rngs=rngs)
        self.out = nnx.Linear(width, 4, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.enc(x))
        self.sow(nnx.Intermediate, "act", h)
        return self.out(h)


def test_nnx_student_and_teacher_train_through_fit():
    data = _data()
    trained = NNXTeacher(8, 16, rngs=nnx.Rngs(5))   # a model built (trained) in NNX
    teacher = models.from_nnx(NNXTeacher, 8, 16, features={"hidden": "enc", "act": "act"})
    assert teacher == models.from_nnx(NNXTeacher, 8, 16,
                                      features={"hidden": "enc", "act": "act"})
    tv = models.wrap_variables(trained)
    student = models.from_nnx(NNXStudent, 8, features={"hidden": "body"})
    ms = (CE, methods.build({"name": "kd"}),
          methods.build({"name": "fitnet", "pairs": [["hidden", "hidden"]]}))
    d = Distiller(student, ms, optax.adam(1e-2), teacher=teacher, epoch_mode="scan")
    state = d.init(0, data["x"][:2], tv)
    assert set(state.params["student"]["module"]) == {"body", "bn", "head"}
    assert set(state.batch_stats["module"]["bn"]) == {"mean", "var"}
    t_logits, t_feats = d._teacher_out(tv, jnp.asarray(data["x"]))
    np.testing.assert_allclose(t_logits, trained(jnp.asarray(data["x"])), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(t_feats["act"], jnp.tanh(t_feats["hidden"]), rtol=1e-6)
    runs = [_fit(d, d.init(s, data["x"][:2], tv), tv, data) for s in (0, 0, 1)]
    first, last = runs[0].history[0]["train"], runs[0].history[-1]["train"]
    assert last["fitnet"] < 0.7 * first["fitnet"] and last["total"] < first["total"]
    np.testing.assert_array_equal(_flat(runs[0].state.params), _flat(runs[1].state.params))
    assert not np.allclose(_flat(runs[0].state.params), _flat(runs[2].state.params))
    # BatchNorm statistics moved; Dropout is live in train mode only
    s = runs[0].state
    assert not np.allclose(_flat(s.batch_stats), _flat(state.batch_stats))
    batch = {k: v[:32] for k, v in data.items()}
    l1, l2 = (d.loss_fn(s.params, s, tv, batch, jax.random.PRNGKey(k))[0] for k in (1, 2))
    assert abs(float(l1) - float(l2)) > 1e-6
    np.testing.assert_array_equal(d.predict(s, data["x"]), d.predict(s, data["x"]))


def test_nnx_bad_path_and_instance_errors():
    x = _data()["x"][:2]
    m = models.from_nnx(NNXTeacher, 8, 4, features=["nope"])
    with pytest.raises(ValueError, match=r"\['nope'\] not found in NNXTeacher; available "
                                         r"paths: \[.*'enc'"):
        m.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"an instance: pass type\(model\)"):
        models.from_nnx(NNXTeacher(8, 4, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="from_nnx"):
        models.wrap(NNXTeacher(8, 4, rngs=nnx.Rngs(0)))
