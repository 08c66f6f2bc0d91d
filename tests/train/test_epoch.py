"""The one epoch loop (kdjax.train.epoch): loop == scan, resume == uninterrupted,
vmapped seeds == separate runs, 1 vs 8 devices, one compiled program per epoch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from kdjax.train import count_compilations, make_mesh
from kdjax.train import epoch as E


@struct.dataclass
class _State:
    epoch: jax.Array
    seed_key: jax.Array
    w: jax.Array
    opt: optax.OptState


TX = optax.adam(0.05)


def _init(seed):
    w = jax.random.normal(jax.random.PRNGKey(seed + 100), (6, 3))
    return _State(epoch=jnp.zeros((), jnp.int32), seed_key=jax.random.PRNGKey(seed), w=w,
                  opt=TX.init(w))


def _step(state, scale, batch, rng):
    """Least squares on the batch plus a rng-dependent noise term (keys matter)."""
    def loss(w):
        r = batch["x"] @ w - batch["y"]
        return jnp.mean(r ** 2) * scale + 1e-3 * jnp.sum(w * jax.random.normal(rng, w.shape))
    value, g = jax.value_and_grad(loss)(state.w)
    upd, opt = TX.update(g, state.opt, state.w)
    return state.replace(w=optax.apply_updates(state.w, upd), opt=opt), {"loss": value}


def _data(n=50):
    r = np.random.default_rng(0)
    x = r.normal(size=(n, 6)).astype(np.float32)
    return {"x": jnp.asarray(x), "y": jnp.asarray(x[:, :3] * 2.0 + 0.1)}


def _run(mode, epochs, state, num_seeds=0, mesh=None, batch_size=8, **kw):
    run = E.make_epoch(_step, batch_size, mode=mode, num_seeds=num_seeds, mesh=mesh, **kw)
    losses = []
    for _ in range(epochs):
        state, aux = run(state, 1.0, _data())
        losses.append(np.asarray(aux["loss"]))
    return state, np.stack(losses)


def test_plan_is_a_permutation_without_the_remainder():
    idx = np.asarray(E.batch_plan(jax.random.PRNGKey(3), 50, 8))
    assert idx.shape == (6, 8) and len(set(idx.ravel())) == 48
    assert set(idx.ravel()) <= set(range(50))
    with pytest.raises(ValueError, match=r"batch_size 64 is larger than the dataset \(50\)"):
        E.batch_plan(jax.random.PRNGKey(3), 50, 64)
    with pytest.raises(ValueError, match=r"index_fn must return int\[steps, 8\], got shape"):
        E.batch_plan(jax.random.PRNGKey(3), 50, 8, lambda k, n: jnp.zeros((3, 4), jnp.int32))
    with pytest.raises(ValueError, match="mode must be 'scan' or 'loop', got 'eager'"):
        E.make_epoch(_step, 8, mode="eager")


def test_loop_equals_scan_and_a_hand_written_epoch():
    a, la = _run("scan", 3, _init(0))
    b, lb = _run("loop", 3, _init(0))
    np.testing.assert_array_equal(np.asarray(a.w), np.asarray(b.w))
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    assert int(a.epoch) == int(b.epoch) == 3
    # independent reference: the documented plan and keys, one jitted step at a time
    st, data = _init(0), _data()
    step = jax.jit(_step)
    for _ in range(3):
        key = jax.random.fold_in(st.seed_key, st.epoch)
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, 0), 50))[:48]
        for i, rows in enumerate(perm.reshape(6, 8)):
            st, _ = step(st, 1.0, {k: v[rows] for k, v in data.items()},
                         jax.random.fold_in(key, i + 1))
        st = st.replace(epoch=st.epoch + 1)
    np.testing.assert_allclose(np.asarray(a.w), np.asarray(st.w), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["scan", "loop"])
def test_resume_equals_uninterrupted(mode):
    full, _ = _run(mode, 4, _init(1))
    half, _ = _run(mode, 2, _init(1))
    half = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)), half)  # "reload"
    resumed, _ = _run(mode, 2, half)
    np.testing.assert_array_equal(np.asarray(resumed.w), np.asarray(full.w))


@pytest.mark.parametrize("mode", ["scan", "loop"])
def test_vmapped_seeds_equal_separate_runs(mode):
    stacked = jax.tree_util.tree_map(lambda *v: jnp.stack(v), *[_init(s) for s in (0, 1, 2)])
    vm, lv = _run(mode, 2, stacked, num_seeds=3)
    for i in range(3):
        one, lo = _run(mode, 2, _init(i))
        np.testing.assert_allclose(np.asarray(vm.w[i]), np.asarray(one.w), rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(lv[:, i], lo, rtol=1e-5)
    assert not np.allclose(np.asarray(vm.w[0]), np.asarray(vm.w[1]))


@pytest.mark.parametrize("mode", ["scan", "loop"])
def test_eight_devices_equal_one(mode, n_devices):
    out = {}
    for n in (1, n_devices):
        st, _ = _run(mode, 2, _init(0), mesh=make_mesh(n))
        out[n] = np.asarray(st.w)
    np.testing.assert_allclose(out[n_devices], out[1], rtol=1e-5, atol=1e-6)


def test_index_fn_and_custom_key_and_advance():
    """A fixed plan (rows in order) and a stage counter outside ``state.epoch``."""
    plan = lambda key, n: jnp.arange(48, dtype=jnp.int32).reshape(6, 8)  # noqa: E731
    key_fn = lambda st: jax.random.fold_in(st.seed_key, 7)  # noqa: E731
    same = lambda st: st  # noqa: E731
    a, _ = _run("scan", 1, _init(0), index_fn=plan, epoch_key=key_fn, advance=same)
    b, _ = _run("loop", 1, _init(0), index_fn=plan, epoch_key=key_fn, advance=same)
    np.testing.assert_array_equal(np.asarray(a.w), np.asarray(b.w))
    assert int(a.epoch) == int(b.epoch) == 0


@pytest.mark.parametrize("mode", ["scan", "loop"])
def test_one_compiled_program_per_epoch_and_none_after(mode):
    run = E.make_epoch(_step, 8, mode=mode, num_seeds=2)
    state = jax.tree_util.tree_map(lambda *v: jnp.stack(v), _init(0), _init(1))
    data = _data()
    with count_compilations() as first:
        state, _ = run(state, 1.0, data)
    with count_compilations() as later:
        for scale in (0.5, 2.0):          # a traced number: no new program
            state, _ = run(state, scale, data)
    assert first.count == 1 and later.count == 0
