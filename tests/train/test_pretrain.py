"""Initialisation stage (FT, AB, FSP): lowers its loss, touches only what it may."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import methods, models
from kdjax.train import Distiller
from kdjax.train.pretrain import pretrain, pretrain_epochs, pretrain_keys

X = np.asarray(jax.random.normal(jax.random.key(0), (64, 16)), np.float32)
Y = np.arange(64) % 4
TEACHER = models.create("cnn1d", 4, channels=(8, 8), kernel_size=3)
STUDENT = models.create("cnn1d", 4, channels=(8, 8), kernel_size=3)
TVARS = TEACHER.init(jax.random.key(1), X[:2], train=False)
TX = optax.adam(1e-2)


def _distiller(*cfgs):
    return Distiller(STUDENT, tuple(methods.build(c) for c in cfgs),
                     optax.sgd(0.1), teacher=TEACHER)


def _stage_loss(d, state):
    """Sum of the pretrain losses on the whole data (student in eval mode)."""
    s_out = d.student_apply(state)(X)
    t_out = TEACHER.apply(TVARS, X, train=False)
    batch = {"x": X, "y": Y}
    total = 0.0
    for k, m in zip(d.keys, d.methods):
        if m.method.pretrain_loss is not None:
            total += float(m.pretrain(state.params["adapters"][k], state.method_state[k],
                                      s_out, t_out, batch, jax.random.key(0))[0])
    return total


def _equal(a, b):
    return all(bool(jnp.array_equal(x, y)) for x, y in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _copy(tree):
    return jax.tree_util.tree_map(lambda a: np.array(a), tree)


def test_ft_stage_trains_the_paraphraser_only():
    d = _distiller({"name": "ce"}, {"name": "ft", "pretrain_epochs": 6},
                   {"name": "fitnet"})
    assert pretrain_keys(d) == ["ft"] and pretrain_epochs(d) == 6
    state = d.init(0, X[:2], TVARS)
    before, loss0 = _copy(state), _stage_loss(d, state)
    history = []
    new = pretrain(d, state, TVARS, {"x": X, "y": Y}, batch_size=16, tx=TX, history=history)
    assert len(history) == 6
    assert _stage_loss(d, new) < 0.7 * loss0
    p0, p1 = before.params, new.params
    assert not _equal(p0["adapters"]["ft"]["pair0"]["paraphraser"],
                      p1["adapters"]["ft"]["pair0"]["paraphraser"])
    # translator, other methods' adapters, the student, BN statistics, optimiser state
    # and counters are untouched (FT's stage does not train the student)
    assert _equal(p0["adapters"]["ft"]["pair0"]["translator"],
                  p1["adapters"]["ft"]["pair0"]["translator"])
    assert _equal(p0["adapters"]["fitnet"], p1["adapters"]["fitnet"])
    assert _equal(p0["student"], p1["student"])
    assert _equal(before.batch_stats, new.batch_stats)
    assert _equal(before.opt_state, new.opt_state)
    assert int(new.epoch) == 0 and int(new.step) == 0
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(before)


def test_ab_and_fsp_stage_trains_student_features_not_head_and_is_deterministic():
    d = _distiller({"name": "ce"}, {"name": "ab", "pretrain_epochs": 4},
                   {"name": "fsp", "pretrain_epochs": 2})
    assert pretrain_keys(d) == ["ab", "fsp"] and pretrain_epochs(d) == 4
    state = d.init(0, X[:2], TVARS)
    before, loss0 = _copy(state), _stage_loss(d, state)
    new = pretrain(d, state, TVARS, {"x": X, "y": Y}, batch_size=16, tx=TX)
    assert _stage_loss(d, new) < loss0
    p0, p1 = before.params, new.params
    assert not _equal(p0["adapters"]["ab"], p1["adapters"]["ab"])
    assert not _equal(p0["student"]["conv1"], p1["student"]["conv1"])
    assert not _equal(before.batch_stats, new.batch_stats)   # student in train mode
    assert _equal(p0["student"]["head"], p1["student"]["head"])
    # same seed, same result
    again = pretrain(d, d.init(0, X[:2], TVARS), TVARS, {"x": X, "y": Y}, batch_size=16,
                     tx=TX)
    assert _equal(new.params, again.params)
    # train_student=False overrides the methods' pretrain_student
    frozen = pretrain(d, d.init(0, X[:2], TVARS), TVARS, {"x": X, "y": Y}, batch_size=16,
                      tx=TX, epochs=1, train_student=False)
    assert _equal(p0["student"], frozen.params["student"])


@pytest.mark.slow
def test_vmapped_seeds_match_single_runs():
    d = _distiller({"name": "ce"}, {"name": "ab", "pretrain_epochs": 2})
    keys = jnp.stack([jax.random.PRNGKey(s) for s in (0, 1)])
    stacked = jax.vmap(lambda k: d.init(k, X[:2], TVARS))(keys)
    new = pretrain(d, stacked, TVARS, {"x": X, "y": Y}, batch_size=16, tx=TX, num_seeds=2)
    one = pretrain(d, d.init(jax.random.PRNGKey(1), X[:2], TVARS), TVARS, {"x": X, "y": Y},
                   batch_size=16, tx=TX)
    got = jax.tree_util.tree_map(lambda a: a[1], new.params)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(one.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_no_pretrain_method_or_zero_epochs_is_a_noop_and_errors_name_arguments():
    d = _distiller({"name": "ce"}, {"name": "kd"})
    state = d.init(0, X[:2], TVARS)
    assert pretrain(d, state, TVARS, {"x": X, "y": Y}, batch_size=16) is state
    d = _distiller({"name": "ft", "pretrain_epochs": 0})
    state = d.init(0, X[:2], TVARS)
    assert pretrain(d, state, TVARS, {"x": X, "y": Y}, batch_size=16) is state
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        pretrain(d, state, TVARS, {"x": X, "y": Y}, batch_size=0, epochs=1)
    with pytest.raises(ValueError, match="epochs must be an int >= 0"):
        pretrain(d, state, TVARS, {"x": X, "y": Y}, batch_size=8, epochs=-1)
    d = _distiller({"name": "ft", "pretrain_epochs": 2.5})
    with pytest.raises(ValueError, match="ft: pretrain_epochs must be an int"):
        pretrain_epochs(d)
