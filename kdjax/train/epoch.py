"""One epoch loop for every trainer of kdjax: plan, scan or loop mode, seeds, resume.

An epoch of a state ``s`` over device-resident ``data`` (a pytree of arrays with a
common leading dimension ``N``) is

.. math::  k = \\mathrm{epoch\\_key}(s), \\quad
           I = \\mathrm{plan}(\\mathrm{fold\\_in}(k, 0), N) \\in \\{0..N-1\\}^{T \\times B},
           \\quad s \\leftarrow \\mathrm{step}(s, c, \\mathrm{data}[I_i],
           \\mathrm{fold\\_in}(k, i + 1)), \\; i = 0..T-1,

then ``s <- advance(s)``; the epoch returns the new state and the mean over the ``T``
steps of the step's auxiliary output. ``plan`` is a fresh random permutation with the
last ``N mod B`` examples dropped (every example is used equally often in
expectation; shapes stay static) or a caller's ``index_fn(key, N) -> int[T, B]``.
The default ``epoch_key`` is ``fold_in(s.seed_key, s.epoch)`` and ``advance``
increments ``s.epoch``, so an epoch depends only on the state: a run resumed from a
checkpoint at epoch ``e`` replays the uninterrupted one exactly.

Two modes, same numbers (``tests/train/test_epoch.py``):

- ``"scan"``: the whole epoch is one compiled ``lax.scan`` (no host round trip per
  step; fastest for small dense models).
- ``"loop"``: a Python loop over one compiled step that draws the plan itself at
  step 0 (a ``lax.cond`` on the step index) and advances the state at the last step,
  so the epoch compiles exactly one program and dispatches once per step. On XLA:CPU
  convolutional backward passes inside a ``while`` body run through a slow generic
  kernel; this mode avoids that (``benchmarks/train_step.py``).

``num_seeds = S > 0`` vmaps the epoch over a leading seed axis of the state (seeds as
one program); ``consts`` (e.g. frozen teacher variables) and ``data`` are shared.
With a mesh, every gathered batch is constrained to ``NamedSharding(mesh, P("data"))``
(global-batch semantics, data parallel). Users: :class:`kdjax.train.Distiller`,
:func:`kdjax.train.pretrain.pretrain`, :class:`kdjax.recipes.simclr.SimCLR`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from kdjax.train.sharding import data_sharding

__all__ = ["EPOCH_MODES", "batch_plan", "default_advance", "default_epoch_key",
           "epoch_fn", "make_epoch"]

EPOCH_MODES = ("auto", "loop", "scan")

Step = Callable[[Any, Any, Any, jax.Array], tuple[Any, Any]]


def default_epoch_key(state) -> jax.Array:
    """``fold_in(state.seed_key, state.epoch)``: the key of the state's current epoch."""
    return jax.random.fold_in(state.seed_key, state.epoch)


def default_advance(state):
    """``state`` with ``epoch + 1``."""
    return state.replace(epoch=state.epoch + 1)


def _num_examples(data) -> int:
    return jax.tree_util.tree_leaves(data)[0].shape[0]


def batch_plan(key: jax.Array, n: int, batch_size: int,
               index_fn: Callable[[jax.Array, int], jax.Array] | None = None) -> jax.Array:
    """``int[steps, batch_size]`` rows of one epoch: a permutation of ``n`` drawn from
    ``key`` with the last ``n mod batch_size`` dropped, or ``index_fn(key, n)``."""
    steps = n // batch_size
    if steps == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the dataset ({n}).")
    if index_fn is None:
        perm = jax.random.permutation(key, n)
        return perm[: steps * batch_size].reshape(steps, batch_size)
    idx = index_fn(key, n)
    if idx.ndim != 2 or idx.shape[1] != batch_size:
        raise ValueError(f"index_fn must return int[steps, {batch_size}], "
                         f"got shape {idx.shape}.")
    return idx


def _gather(data, rows, mesh: Mesh | None):
    batch = jax.tree_util.tree_map(lambda a: a[rows], data)
    if mesh is not None:
        batch = jax.lax.with_sharding_constraint(batch, data_sharding(mesh))
    return batch


def epoch_fn(step: Step, batch_size: int, *, index_fn=None, mesh: Mesh | None = None,
             epoch_key: Callable = default_epoch_key,
             advance: Callable = default_advance) -> Callable:
    """The pure (not jitted) scanned epoch ``epoch(state, consts, data) -> (state,
    mean aux)``; ``step(state, consts, batch, rng) -> (state, aux)``."""
    def epoch(state, consts, data):
        key = epoch_key(state)
        idx = batch_plan(jax.random.fold_in(key, 0), _num_examples(data), batch_size,
                         index_fn)

        def body(st, inp):
            i, rows = inp
            return step(st, consts, _gather(data, rows, mesh), jax.random.fold_in(key, i + 1))

        state, aux = jax.lax.scan(body, state, (jnp.arange(idx.shape[0]), idx))
        return advance(state), jax.tree_util.tree_map(lambda a: jnp.mean(a, 0), aux)

    return epoch


def _loop_step(step: Step, batch_size: int, index_fn, mesh, epoch_key, advance):
    """``(state, consts, data, idx, i) -> (state, idx, aux)``: step ``i`` of an epoch;
    step 0 draws the plan (``idx`` in is a placeholder), the last step advances."""
    def run(state, consts, data, idx, i):
        key = epoch_key(state)
        idx = jax.lax.cond(
            i == 0,
            lambda: batch_plan(jax.random.fold_in(key, 0), _num_examples(data), batch_size,
                               index_fn).astype(idx.dtype),
            lambda: idx)
        rows = jax.lax.dynamic_index_in_dim(idx, i, keepdims=False)
        state, aux = step(state, consts, _gather(data, rows, mesh),
                          jax.random.fold_in(key, i + 1))
        state = jax.lax.cond(i + 1 == idx.shape[0], advance, lambda s: s, state)
        return state, idx, aux

    return run


def make_epoch(step: Step, batch_size: int, *, mode: str = "scan", num_seeds: int = 0,
               mesh: Mesh | None = None, index_fn=None,
               epoch_key: Callable = default_epoch_key,
               advance: Callable = default_advance) -> Callable:
    """A jitted epoch runner ``run(state, consts, data) -> (state, mean aux)``.

    Built once and reused (the caller keeps it): every call with the same shapes runs
    the same compiled program; the state is donated. ``mode`` is ``"scan"`` or
    ``"loop"`` (module docstring); ``num_seeds > 0`` vmaps over a leading seed axis of
    the state. In loop mode the mean aux is computed on the host (numpy arrays).
    """
    if mode not in ("scan", "loop"):
        raise ValueError(f"mode must be 'scan' or 'loop', got {mode!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
    if mode == "scan":
        fn = epoch_fn(step, batch_size, index_fn=index_fn, mesh=mesh, epoch_key=epoch_key,
                      advance=advance)
        if num_seeds:
            fn = jax.vmap(fn, in_axes=(0, None, None))
        return jax.jit(fn, donate_argnums=(0,))

    one = _loop_step(step, batch_size, index_fn, mesh, epoch_key, advance)
    if num_seeds:
        one = jax.vmap(one, in_axes=(0, None, None, 0, None))
    one = jax.jit(one, donate_argnums=(0, 3))

    def plan_of(state, data):
        return batch_plan(jax.random.fold_in(epoch_key(state), 0), _num_examples(data),
                          batch_size, index_fn)

    if num_seeds:
        plan_of = jax.vmap(plan_of, in_axes=(0, None))
    shapes: dict = {}   # abstract plan shape per data signature (traced, never compiled)

    def run(state, consts, data):
        sig = (jax.tree_util.tree_structure(data),
               tuple((a.shape, a.dtype) for a in jax.tree_util.tree_leaves(data)))
        if sig not in shapes:
            shapes[sig] = jax.eval_shape(plan_of, state, data)
        shape, dtype = shapes[sig].shape, shapes[sig].dtype
        idx = np.zeros(shape, dtype)
        aux = []
        for i in range(shape[-2]):
            state, idx, a = one(state, consts, data, idx, i)
            aux.append(a)
        aux = jax.device_get(aux)
        return state, jax.tree_util.tree_map(lambda *v: np.mean(np.stack(v), 0), *aux)

    return run
