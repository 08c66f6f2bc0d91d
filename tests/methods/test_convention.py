"""The method calling convention: ``loss(inputs, options)``, ``init(rng, student_out,
teacher_out, options)``; a custom method registered and built through the registry."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import methods
from kdjax.methods import Inputs, Method, stateless

S_OUT = (jnp.arange(12.0).reshape(4, 3) / 7.0, {"pooled": jnp.ones((4, 2))})
T_OUT = (jnp.cos(jnp.arange(12.0)).reshape(4, 3), {"pooled": jnp.zeros((4, 2))})
BATCH = {"x": jnp.zeros((4, 5)), "y": jnp.arange(4) % 3}


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so the custom methods do not outlive the test."""
    methods.names()   # load the families first
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    return methods


def _gap(inputs: Inputs, options):
    """``scale * mean((z_S - z_T)^2)``: reads one option, ignores the others."""
    return options["scale"] * jnp.mean((inputs.student[0] - inputs.teacher[0]) ** 2)


def _counting_init(rng, student_out, teacher_out, options):
    return {"bias": jnp.full((), options["bias"])}, {"calls": jnp.zeros((), jnp.int32)}


def _counting(inputs: Inputs, options):
    value = jnp.mean(inputs.student[0]) + inputs.params["bias"]
    assert inputs.models is None and inputs.weights is None   # not needs_models, no weights
    return value, {"calls": inputs.state["calls"] + 1}


def test_custom_method_reads_its_option_and_takes_a_traced_number(registry):
    registry.register(Method("test_gap", stateless(_gap),
                             options={"scale": 2.0, "unused": "ignored", "pairs": None},
                             traced_options=("scale",), default_weight=0.5))
    m = methods.build({"name": "test_gap", "scale": 3.0})
    assert m.weight == 0.5 and m.numbers == {"weight": np.float32(0.5), "scale": np.float32(3.0)}
    assert m.static_options == {"unused": "ignored", "pairs": None}
    assert m.init(jax.random.key(0), S_OUT, T_OUT) == ({}, None)   # no init: no params
    mse = float(jnp.mean((S_OUT[0] - T_OUT[0]) ** 2))
    value, state = m({}, "kept", S_OUT, T_OUT, BATCH, jax.random.key(1))
    assert state == "kept"   # stateless passes the state through
    np.testing.assert_allclose(float(value), 3.0 * mse, rtol=1e-6)
    # traced numbers replace the options of the same name (the engine's hparams)
    f = jax.jit(lambda numbers: m({}, None, S_OUT, T_OUT, BATCH, None, numbers=numbers)[0])
    np.testing.assert_allclose(float(f({"weight": 0.5, "scale": jnp.float32(5.0)})),
                               5.0 * mse, rtol=1e-6)
    np.testing.assert_allclose(float(f(m.numbers)), 3.0 * mse, rtol=1e-6)


def test_custom_stateful_method_init_and_state(registry):
    registry.register(Method("test_counting", _counting, init=_counting_init,
                             options={"bias": 0.25, "other": 1}))
    m = methods.build({"name": "test_counting", "bias": 1.5})
    params, state = m.init(jax.random.key(0), S_OUT, T_OUT)
    assert float(params["bias"]) == 1.5 and int(state["calls"]) == 0
    value, state = m(params, state, S_OUT, T_OUT, BATCH, None, models="not passed")
    np.testing.assert_allclose(float(value), float(jnp.mean(S_OUT[0])) + 1.5, rtol=1e-6)
    assert int(state["calls"]) == 1


def test_options_are_read_only_and_inputs_weights():
    m = methods.build({"name": "kd"})
    options = m.bound_options({"weight": 1.0, "temperature": 2.0})
    assert dict(options) == {"temperature": 2.0}
    with pytest.raises(TypeError):
        options["temperature"] = 1.0
    assert dict(m.options) == {"temperature": 4.0}   # the bound options are untouched
    w = jnp.ones(4)
    assert Inputs({}, None, S_OUT, T_OUT, {**BATCH, "weights": w}).weights is w
    assert Inputs({}, None, S_OUT, T_OUT, BATCH).weights is None
    assert Inputs({}, None, S_OUT, T_OUT, None).weights is None


def _positional(fn):
    params = list(inspect.signature(fn).parameters.values())
    assert not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL, p.KEYWORD_ONLY)
                   for p in params), f"{fn} takes *args / **kwargs / keyword-only options"
    return len(params)


@pytest.mark.parametrize("name", methods.names())
def test_every_method_takes_inputs_and_one_options_mapping(name):
    """The old convention (options splatted as keywords) must not come back."""
    meth = methods.get(name)
    assert _positional(meth.loss) == 2
    if meth.pretrain_loss is not None:
        assert _positional(meth.pretrain_loss) == 2
    if meth.init is not None:
        assert _positional(meth.init) == 4


def test_pretrain_needs_a_pretrain_loss():
    with pytest.raises(ValueError, match="has no pretrain_loss"):
        methods.build({"name": "kd"}).pretrain({}, None, S_OUT, T_OUT, BATCH, None)
