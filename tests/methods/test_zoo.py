"""Registry entries of the classic KD zoo: build, init, loss, gradients, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses, methods
from kdjax.methods import zoo

ZOO = ["ab", "at", "cc", "crd", "dist", "dkd", "fitnet", "fsp", "ft", "kd_ls", "nst", "pkt",
       "rkd", "sp", "vid"]


def outputs(seed, width, b=8, classes=10):
    k = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(k[0], (b, classes)),
            {"stage1": jax.random.normal(k[1], (b, 8, 8, width)),
             "stage2": jax.random.normal(k[2], (b, 4, 4, 2 * width)),
             "pooled": jax.random.normal(k[3], (b, 2 * width))})


S_OUT, T_OUT = outputs(1, 4), outputs(2, 6)
S_SAME, T_SAME = outputs(3, 4), outputs(4, 4)  # same widths (FSP needs them)
BATCH = {"x": None, "y": jnp.arange(8) % 10}


def test_every_zoo_method_is_registered():
    assert set(ZOO) <= set(methods.names())


HEAVY = {"ab", "ft", "vid", "nst", "fsp", "cc"}  # conv adapters / several stages: compile


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY
                                  else n for n in ZOO])
def test_builds_inits_and_gives_finite_loss_and_grads(name):
    s_out, t_out = (S_SAME, T_SAME) if name == "fsp" else (S_OUT, T_OUT)
    m = methods.build({"name": name})
    assert m.weight == methods.get(name).default_weight
    params, state = m.init(jax.random.key(0), s_out, t_out)

    @jax.jit
    def f(params, s_out):
        loss, new_state = m(params, state, s_out, t_out, BATCH, jax.random.key(1))
        return loss, new_state

    (loss, new_state), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
        params, s_out)
    assert loss.shape == () and bool(jnp.isfinite(loss))
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    # The loss depends on the student (and on the adapters where there are some).
    assert float(sum(jnp.abs(g).sum() for g in jax.tree_util.tree_leaves(grads[1]))) > 0
    if jax.tree_util.tree_leaves(params):
        assert float(sum(jnp.abs(g).sum() for g in jax.tree_util.tree_leaves(grads[0]))) > 0
    # No gradient flows into the teacher.
    tg = jax.jit(jax.grad(lambda t: m(params, state, s_out, t, BATCH, jax.random.key(1))[0]))(
        t_out)
    assert all(float(jnp.abs(g).sum()) == 0 for g in jax.tree_util.tree_leaves(tg))


def test_defaults_are_the_reference_ones():
    want = {"fitnet": 100.0, "at": 1000.0, "sp": 3000.0, "cc": 0.02, "vid": 1.0, "rkd": 1.0,
            "pkt": 30000.0, "ab": 1.0, "ft": 200.0, "fsp": 50.0, "nst": 50.0, "crd": 0.8,
            "dkd": 1.0}
    assert {k: methods.get(k).default_weight for k in want} == want
    assert methods.get("dkd").options == {"alpha": 1.0, "beta": 8.0, "temperature": 4.0,
                                         "standardize": False, "warmup_steps": 0}
    assert methods.get("crd").options["temperature"] == 0.07
    assert methods.get("crd").options["queue_size"] == 16384
    assert methods.get("rkd").options["distance_weight"] == 25.0
    for name, trains_student in (("ab", True), ("ft", False), ("fsp", True)):
        assert methods.get(name).pretrain_loss is not None
        assert methods.get(name).options["pretrain_epochs"] == 30
        assert methods.get(name).options["pretrain_student"] is trains_student
    assert set(zoo.NAMES) == set(ZOO)


def test_dkd_linear_warmup_scales_by_its_own_step_counter():
    plain = float(losses.dkd(S_OUT[0], T_OUT[0], BATCH["y"]))
    m0 = methods.build({"name": "dkd"})
    assert m0.init(jax.random.key(0), S_OUT, T_OUT) == ({}, None)   # no warm-up: no state
    np.testing.assert_allclose(m0({}, None, S_OUT, T_OUT, BATCH, None)[0], plain, rtol=1e-6)
    m = methods.build({"name": "dkd", "warmup_steps": 4})
    params, state = m.init(jax.random.key(0), S_OUT, T_OUT)
    step = jax.jit(lambda st: m(params, st, S_OUT, T_OUT, BATCH, None))
    got = []
    for _ in range(6):
        loss, state = step(state)
        got.append(float(loss))
    # mdistiller: min(epoch / warmup, 1) with epochs from 1; here per step
    np.testing.assert_allclose(got, [plain * f for f in (0.25, 0.5, 0.75, 1, 1, 1)],
                               rtol=1e-5)
    assert int(state["step"]) == 6
    with pytest.raises(ValueError, match="needs the step-counter state"):
        m(params, None, S_OUT, T_OUT, BATCH, None)
    with pytest.raises(ValueError, match="dkd: warmup_steps must be an int >= 0"):
        methods.build({"name": "dkd", "warmup_steps": -1}).init(None, S_OUT, T_OUT)


def test_method_values_equal_the_losses():
    m = methods.build({"name": "dkd", "beta": 2.0})
    got, _ = m({}, None, S_OUT, T_OUT, BATCH, None)
    np.testing.assert_allclose(got, losses.dkd(S_OUT[0], T_OUT[0], BATCH["y"], beta=2.0),
                               rtol=1e-6)
    m = methods.build({"name": "rkd", "pairs": [["stage2", "stage2"]]})
    got, _ = m({}, None, S_OUT, T_OUT, BATCH, None)
    np.testing.assert_allclose(got, losses.rkd(S_OUT[1]["stage2"], T_OUT[1]["stage2"]),
                               rtol=1e-6)
    # "all" default: AT sums over every common spatial stage.
    m = methods.build({"name": "at"})
    got, _ = m({}, None, S_OUT, T_OUT, BATCH, None)
    want = sum(losses.attention_transfer(S_OUT[1][k], T_OUT[1][k]) for k in ("stage1", "stage2"))
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_batch_weights_are_honoured():
    m = methods.build({"name": "fitnet"})
    params, _ = m.init(jax.random.key(0), S_OUT, T_OUT)
    w = jnp.zeros(8).at[0].set(8.0)
    full, _ = m(params, None, S_OUT, T_OUT, BATCH, None)
    weighted, _ = m(params, None, S_OUT, T_OUT, {**BATCH, "weights": w}, None)
    only0, _ = m(params, None, jax.tree_util.tree_map(lambda a: a[:1], S_OUT),
                 jax.tree_util.tree_map(lambda a: a[:1], T_OUT), BATCH, None)
    np.testing.assert_allclose(weighted, only0, rtol=1e-5)
    assert abs(float(full) - float(weighted)) > 1e-4


def test_fitnet_identity_regressor_gives_zero():
    m = methods.build({"name": "fitnet", "pairs": [["stage2", "stage2"]]})
    params, _ = m.init(jax.random.key(0), S_SAME, S_SAME)
    c = S_SAME[1]["stage2"].shape[-1]
    params = jax.tree_util.tree_map(jnp.zeros_like, params)
    params["pair0"]["Conv_0"]["kernel"] = jnp.eye(c).reshape(1, 1, c, c)
    loss, _ = m(params, None, S_SAME, S_SAME, BATCH, None)
    assert abs(float(loss)) < 1e-10


def test_crd_queue_state_is_updated_and_in_batch_variant():
    m = methods.build({"name": "crd", "queue_size": 32, "dim": 16})
    params, state = m.init(jax.random.key(0), S_OUT, T_OUT)
    assert state["pair0"]["teacher"].shape == (32, 16)
    _, new_state = m(params, state, S_OUT, T_OUT, BATCH, None)
    assert not np.allclose(new_state["pair0"]["teacher"][:8], state["pair0"]["teacher"][:8])
    np.testing.assert_allclose(new_state["pair0"]["teacher"][8:], state["pair0"]["teacher"][:24])
    m0 = methods.build({"name": "crd", "queue_size": 0, "dim": 16})
    params0, state0 = m0.init(jax.random.key(0), S_OUT, T_OUT)
    assert state0 is None
    loss, _ = m0(params0, state0, S_OUT, T_OUT, BATCH, None)
    assert bool(jnp.isfinite(loss))


def test_ft_pretrain_trains_the_paraphraser_only():
    m = methods.build({"name": "ft"})
    params, state = m.init(jax.random.key(0), S_OUT, T_OUT)
    g = jax.grad(lambda p: m.pretrain(p, state, S_OUT, T_OUT, BATCH, None)[0])(params)
    norm = lambda t: float(sum(jnp.abs(x).sum() for x in jax.tree_util.tree_leaves(t)))  # noqa
    assert norm(g["pair0"]["paraphraser"]) > 0 and norm(g["pair0"]["translator"]) == 0
    g = jax.grad(lambda p: m(p, state, S_OUT, T_OUT, BATCH, None)[0])(params)
    assert norm(g["pair0"]["paraphraser"]) == 0 and norm(g["pair0"]["translator"]) > 0


def test_default_pairs():
    assert zoo.resolve_pairs(None, S_OUT, T_OUT, "all") == [("stage1", "stage1"),
                                                            ("stage2", "stage2")]
    assert zoo.resolve_pairs(None, S_OUT, T_OUT, "last") == [("stage2", "stage2")]
    assert zoo.resolve_pairs(None, S_OUT, T_OUT, "pooled") == [("pooled", "pooled")]
    vec_s = (S_OUT[0], {"pooled": S_OUT[1]["pooled"]})
    vec_t = (T_OUT[0], {"pooled": T_OUT[1]["pooled"]})
    assert zoo.resolve_pairs(None, vec_s, vec_t, "last") == [("pooled", "pooled")]
    with pytest.raises(ValueError, match="no common spatial features"):
        zoo.resolve_pairs(None, vec_s, vec_t, "all")


def test_errors_list_valid_names():
    with pytest.raises(ValueError, match=r"valid methods: \[.*'rkd'.*\]"):
        methods.build({"name": "rkdd"})
    with pytest.raises(ValueError, match=r"valid options: \['angle_weight', 'distance_weight', "
                                         r"'pairs'\]"):
        methods.build({"name": "rkd", "angle": 50.0})
    m = methods.build({"name": "rkd", "pairs": [["stage9", "pooled"]]})
    with pytest.raises(ValueError, match=r"available student features: \['pooled', 'stage1', "
                                         r"'stage2'\]"):
        m({}, None, S_OUT, T_OUT, BATCH, None)
    m = methods.build({"name": "fitnet", "pairs": [["pooled", "logits"]]})
    with pytest.raises(ValueError, match="available teacher features"):
        m.init(jax.random.key(0), S_OUT, T_OUT)
    with pytest.raises(ValueError, match="pairs must be a non-empty list"):
        methods.build({"name": "sp", "pairs": "pooled"})({}, None, S_OUT, T_OUT, BATCH, None)
    with pytest.raises(ValueError, match="fsp needs >= 2 feature pairs"):
        methods.build({"name": "fsp", "pairs": [["stage1", "stage1"]]})(
            {}, None, S_SAME, T_SAME, BATCH, None)
    m = methods.build({"name": "vid"})
    with pytest.raises(ValueError, match="adapter params"):
        m({}, None, S_OUT, T_OUT, BATCH, None)
