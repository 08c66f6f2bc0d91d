"""The generic distillation step, whole epochs on device, evaluation, and ``fit``.

One step computes

.. math::  \\mathcal{L} = \\sum_k w_k\\, \\mathcal{L}_k(s(x), \\mathrm{sg}[t(x)], \\text{batch})

with ``s(x) = (logits, features)`` of the student in train mode, ``t(x)`` the teacher in
eval mode under ``stop_gradient``, and the ``L_k`` the registered methods
(:mod:`kdjax.methods`) with their weights. Adapter parameters of the methods live in
``params["adapters"]`` next to ``params["student"]`` and are trained with them.

Performance choices (see ``benchmarks/``): small datasets live on device; a whole epoch
is one ``lax.scan`` over steps inside one jitted call (no host round trip per step);
the batch of each step is gathered on device and constrained to
``NamedSharding(mesh, P("data"))``, so the step is data-parallel over all devices with
XLA's collectives (the *global*-batch semantics for batch-level losses); the state
buffers are donated. Shapes are static: an epoch drops the last ``N mod B`` examples of
a fresh random permutation (every example is used equally often in expectation), and
evaluation pads with masked rows, so nothing recompiles across epochs.

Determinism: the key of epoch ``e`` is ``fold_in(seed_key, e)``, so a run resumed from
a checkpoint at epoch ``e`` replays exactly the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from kdjax._checks import check_float_array, check_labels, check_same_shape
from kdjax.methods import BuiltMethod
from kdjax.train import metrics as metrics_lib
from kdjax.train.sharding import data_sharding, replicated

__all__ = ["TrainState", "Distiller", "predict", "evaluate", "method_keys"]


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: checkpoint this and nothing is lost."""

    epoch: jax.Array
    step: jax.Array
    params: Any          # {"student": ..., "adapters": {method_key: ...}}
    batch_stats: Any     # student BatchNorm statistics ({} when none)
    opt_state: Any
    method_state: Any    # {method_key: state} (queues, ...)
    seed_key: jax.Array  # raw uint32 PRNG key of the run


EPOCH_MODES = ("auto", "loop", "scan")


def primitives(closed) -> set[str]:
    """Names of every primitive in a (closed) jaxpr, sub-jaxprs included."""
    from jax.extend import core as jex

    todo, names = [getattr(closed, "jaxpr", closed)], set()
    while todo:
        jaxpr = todo.pop()
        names.update(e.primitive.name for e in jaxpr.eqns)
        todo.extend(jex.subjaxprs(jaxpr))
    return names


def method_keys(methods: Sequence[BuiltMethod]) -> list[str]:
    """Unique keys for the methods of a run (``fitnet``, ``fitnet_1``, ...)."""
    keys, seen = [], {}
    for m in methods:
        n = seen.get(m.name, 0)
        keys.append(m.name if n == 0 else f"{m.name}_{n}")
        seen[m.name] = n + 1
    return keys


def _variables(params, batch_stats):
    return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


@dataclasses.dataclass(frozen=True, eq=False)
class Distiller:
    """A student, an optional teacher, the loss terms and an optimiser.

    Attributes:
      student: a Flax module returning ``(logits, features)``.
      methods: the loss terms (``kdjax.methods.build(cfg)`` for each).
      tx: optax optimiser.
      teacher: Flax module returning ``(logits, features)``, or None (CE-only runs).
      augment: optional jittable ``augment(key, batch) -> batch`` applied per step
        (:func:`kdjax.data.get_augmentation`); teacher and student see the same
        augmented view ("consistent teaching"). Mixing augmentations add ``y_b`` and
        ``lam`` to the batch, which the ``ce`` method honours.
      compute_dtype: dtype of the inputs fed to the networks (``jnp.bfloat16`` for
        bf16 compute; parameters stay float32 and losses are computed in float32).
      epoch_mode: how :func:`~kdjax.train.fit` runs an epoch: ``"scan"`` (one compiled
        ``lax.scan``; fastest for small dense models), ``"loop"`` (a Python loop over
        jitted steps on device-resident data; same numbers, and on XLA:CPU several
        times faster for convolutional networks; see ``benchmarks/train_step.py``) or
        ``"auto"`` (the default: ``"loop"`` on a CPU backend when the student convolves,
        else ``"scan"``; :meth:`resolve_epoch_mode`).
      teacher_from_batch: read the teacher's outputs from the batch
        (``batch["teacher_logits"]``, optional ``batch["teacher_features"]`` dict)
        instead of running the teacher each step. Valid when the teacher's input is
        deterministic (no augmentation): compute them once with :func:`predict`.
    """

    student: nn.Module
    methods: tuple[BuiltMethod, ...]
    tx: optax.GradientTransformation
    teacher: nn.Module | None = None
    augment: Callable[[jax.Array, dict], dict] | None = None
    compute_dtype: Any = jnp.float32
    teacher_from_batch: bool = False
    epoch_mode: str = "auto"

    def __post_init__(self):
        if self.epoch_mode not in EPOCH_MODES:
            raise ValueError(f"epoch_mode must be one of {sorted(EPOCH_MODES)}, got "
                             f"{self.epoch_mode!r}.")
        if self.teacher_from_batch and self.augment is not None:
            raise ValueError("teacher_from_batch=True needs a deterministic teacher input, "
                             "but augment is set; precomputed teacher outputs would not "
                             "match the augmented views.")
        needs_teacher = [m.name for m in self.methods if m.method.needs_teacher]
        if needs_teacher and self.teacher is None and not self.teacher_from_batch:
            raise ValueError(f"methods {needs_teacher} need a teacher, but teacher=None.")
        if not self.methods:
            raise ValueError("methods must name at least one loss term, got none.")

    @property
    def keys(self) -> list[str]:
        return method_keys(self.methods)

    # -- forward passes --------------------------------------------------------------
    def _teacher_out(self, teacher_vars, x):
        if self.teacher is None:
            return None
        out = self.teacher.apply(teacher_vars, x.astype(self.compute_dtype), train=False)
        return jax.lax.stop_gradient(out)

    def _student_out(self, params, batch_stats, x, train: bool):
        vs = _variables(params["student"], batch_stats)
        x = x.astype(self.compute_dtype)
        if train and batch_stats:
            out, upd = self.student.apply(vs, x, train=True, mutable=["batch_stats"])
            return out, upd["batch_stats"]
        return self.student.apply(vs, x, train=train), batch_stats

    # -- initialisation --------------------------------------------------------------
    def init(self, seed: int | jax.Array, example_x, teacher_vars=None) -> TrainState:
        """Initial state from a seed and an example batch (shapes only matter)."""
        key = jax.random.PRNGKey(seed) if isinstance(seed, int) else seed
        k_student, k_adapters = jax.random.split(jax.random.fold_in(key, 1))
        x = jnp.asarray(example_x).astype(self.compute_dtype)
        variables = self.student.init(k_student, x, train=False)
        params = {"student": variables["params"], "adapters": {}}
        batch_stats = variables.get("batch_stats", {})
        s_out = self.student.apply(variables, x, train=False)
        t_out = self._teacher_out(teacher_vars, x)
        method_state = {}
        for i, (k, m) in enumerate(zip(self.keys, self.methods)):
            p, st = m.init(jax.random.fold_in(k_adapters, i), s_out, t_out)
            params["adapters"][k] = p
            method_state[k] = st
        return TrainState(epoch=jnp.zeros((), jnp.int32), step=jnp.zeros((), jnp.int32),
                          params=params, batch_stats=batch_stats,
                          opt_state=self.tx.init(params), method_state=method_state,
                          seed_key=key)

    # -- one step --------------------------------------------------------------------
    def loss_fn(self, params, state: TrainState, teacher_vars, batch, rng):
        """Total loss and aux (new BN stats, new method state, per-term values)."""
        if self.augment is not None:
            batch = self.augment(jax.random.fold_in(rng, 0), batch)
        x = batch["x"]
        s_out, new_bs = self._student_out(params, state.batch_stats, x, train=True)
        s_out = (s_out[0].astype(jnp.float32), s_out[1])
        if self.teacher_from_batch:
            t_out = (batch["teacher_logits"], batch.get("teacher_features", {}))
        else:
            t_out = self._teacher_out(teacher_vars, x)
        if t_out is not None:
            t_out = (t_out[0].astype(jnp.float32), t_out[1])
        total = jnp.zeros((), jnp.float32)
        terms, new_ms = {}, {}
        models = None
        if any(m.method.needs_models for m in self.methods):
            def student_fn(xs):
                out = self._student_out(params, state.batch_stats, xs, train=False)[0]
                return out[0].astype(jnp.float32), out[1]

            def teacher_fn(xs):
                # stop_gradient on the teacher's *parameters*, not its output, so that
                # input gradients through the teacher exist (PGD on teacher-student gaps)
                out = self.teacher.apply(jax.lax.stop_gradient(teacher_vars),
                                         xs.astype(self.compute_dtype), train=False)
                return out[0].astype(jnp.float32), out[1]

            models = (student_fn, teacher_fn)
        for i, (k, m) in enumerate(zip(self.keys, self.methods)):
            value, st = m(params["adapters"][k], state.method_state[k], s_out, t_out,
                          batch, jax.random.fold_in(rng, i + 1), models=models)
            terms[k] = value
            new_ms[k] = st
            total = total + m.weight * value
        terms["total"] = total
        return total, (new_bs, new_ms, terms)

    def train_step(self, state: TrainState, teacher_vars, batch, rng):
        """One optimiser step on ``batch`` (dict with ``x``, ``y``, optional weights)."""
        grads, (new_bs, new_ms, terms) = jax.grad(self.loss_fn, has_aux=True)(
            state.params, state, teacher_vars, batch, rng)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        state = state.replace(step=state.step + 1, params=params, batch_stats=new_bs,
                              opt_state=opt_state, method_state=new_ms)
        return state, terms

    # -- one epoch on device ---------------------------------------------------------
    def epoch_fn(self, batch_size: int, mesh: Mesh | None = None,
                 index_fn: Callable[[jax.Array, int], jax.Array] | None = None):
        """``epoch(state, teacher_vars, data) -> (state, mean terms)``, not yet jitted.

        ``data`` is a dict of device arrays with equal leading dimension N (``x``, ``y``,
        optional ``weights``, ``label_mask``...). Each epoch draws a permutation from
        ``fold_in(seed_key, epoch)`` and runs ``N // batch_size`` steps in a
        ``lax.scan``. Pure, so it can be ``vmap``-ed over seeds.

        ``index_fn(key, n) -> int[steps, batch_size]`` replaces the random permutation
        with another jittable batch plan (e.g. CoSS's teacher-neighbour batches from
        :mod:`kdjax.data.neighbors`).
        """
        def epoch(state: TrainState, teacher_vars, data):
            key, idx = self._epoch_plan(state, data, batch_size, index_fn)

            def body(st, inp):
                i, rows = inp
                return self._step_at(st, teacher_vars, data, key, i, rows, mesh)

            state, terms = jax.lax.scan(body, state, (jnp.arange(idx.shape[0]), idx))
            return state.replace(epoch=state.epoch + 1), jax.tree_util.tree_map(
                jnp.mean, terms)

        return epoch

    def _epoch_plan(self, state: TrainState, data, batch_size: int, index_fn):
        """``(key, idx[steps, batch_size])`` of the epoch ``state.epoch``."""
        n = jax.tree_util.tree_leaves(data)[0].shape[0]
        steps = n // batch_size
        if steps == 0:
            raise ValueError(f"batch_size {batch_size} is larger than the dataset ({n}).")
        key = jax.random.fold_in(state.seed_key, state.epoch)
        if index_fn is None:
            perm = jax.random.permutation(jax.random.fold_in(key, 0), n)
            return key, perm[: steps * batch_size].reshape(steps, batch_size)
        idx = index_fn(jax.random.fold_in(key, 0), n)
        if idx.ndim != 2 or idx.shape[1] != batch_size:
            raise ValueError(f"index_fn must return int[steps, {batch_size}], "
                             f"got shape {idx.shape}.")
        return key, idx

    def _step_at(self, state, teacher_vars, data, key, i, rows, mesh):
        """Step ``i`` of an epoch: gather ``rows`` of ``data`` on device, then train."""
        batch = jax.tree_util.tree_map(lambda a: a[rows], data)
        if mesh is not None:
            batch = jax.lax.with_sharding_constraint(batch, data_sharding(mesh))
        return self.train_step(state, teacher_vars, batch, jax.random.fold_in(key, i + 1))

    def loop_epoch(self, batch_size: int, mesh: Mesh | None = None, *, num_seeds: int = 0,
                   index_fn=None):
        """Like :meth:`jit_epoch` but a Python loop over jitted steps (same numbers).

        Data stay on device and each step gathers its rows inside the compiled step,
        so the only per-step host work is the dispatch. On XLA:CPU a convolutional step
        inside ``lax.scan`` runs markedly slower than the same step jitted alone (see
        ``benchmarks/train_step.py``); this mode avoids that. Cached like ``jit_epoch``.
        """
        cache = self.__dict__.setdefault("_loop_cache", {})
        ckey = (batch_size, mesh, num_seeds, index_fn)
        if ckey not in cache:
            plan = lambda st, d: self._epoch_plan(st, d, batch_size, index_fn)
            # the step picks its rows of the epoch plan itself: one dispatch per step
            step = lambda st, tv, d, k, i, idx: self._step_at(st, tv, d, k, i, idx[i], mesh)
            bump = lambda st: st.replace(epoch=st.epoch + 1)
            if num_seeds:
                plan = jax.vmap(plan, in_axes=(0, None))
                step = jax.vmap(step, in_axes=(0, None, None, 0, None, 0))
                bump = jax.vmap(bump)
            plan, bump = jax.jit(plan), jax.jit(bump, donate_argnums=(0,))
            step = jax.jit(step, donate_argnums=(0,))

            def epoch(state, teacher_vars, data):
                key, idx = plan(state, data)
                terms = []
                for i in range(idx.shape[-2]):
                    state, t = step(state, teacher_vars, data, key, i, idx)
                    terms.append(t)
                mean = jax.tree_util.tree_map(lambda *v: jnp.mean(jnp.stack(v), 0), *terms)
                return bump(state), mean

            cache[ckey] = epoch
        return cache[ckey]

    def jit_epoch(self, batch_size: int, mesh: Mesh | None = None, *, num_seeds: int = 0,
                  index_fn=None):
        """Jitted epoch with the state donated; ``num_seeds > 0`` vmaps over a leading
        seed axis of the state (seeds as one program). Cached per distiller and
        arguments, so repeated ``fit`` calls reuse the compiled program."""
        cache = self.__dict__.setdefault("_epoch_cache", {})
        key = (batch_size, mesh, num_seeds, index_fn)
        if key not in cache:
            fn = self.epoch_fn(batch_size, mesh, index_fn)
            if num_seeds:
                fn = jax.vmap(fn, in_axes=(0, None, None))
            cache[key] = jax.jit(fn, donate_argnums=(0,))
        return cache[key]

    def resolve_epoch_mode(self, example_x, mesh: Mesh | None = None) -> str:
        """The epoch mode :func:`~kdjax.train.fit` uses: ``epoch_mode`` unless "auto".

        "auto" gives ``"loop"`` when the devices are CPUs and the student (the network
        that is differentiated) contains a convolution, else ``"scan"``. Why: XLA:CPU
        compiles the *backward* convolutions inside a ``while`` body with non-canonical
        dimension orders (e.g. ``b0f_0oi->b0f``) that it runs through a slow generic
        kernel, about 4x slower than the same step jitted alone, where they are
        canonicalised; a convolutional teacher's forward pass is not affected, and for
        dense students the scan is faster (no per-step dispatch);
        ``benchmarks/train_step.py`` measures both modes. The check traces the student
        abstractly on ``example_x`` (shapes only; nothing runs), cached per distiller.
        """
        if self.epoch_mode != "auto":
            return self.epoch_mode
        platform = (mesh.devices.flat[0].platform if mesh is not None
                    else jax.default_backend())
        if platform != "cpu":
            return "scan"
        cache = self.__dict__.setdefault("_mode_cache", {})
        shape = (tuple(example_x.shape[1:]), str(example_x.dtype))
        if shape not in cache:
            x = jax.ShapeDtypeStruct((1, *shape[0]), example_x.dtype)
            jaxpr = jax.make_jaxpr(
                lambda v: self.student.init(jax.random.PRNGKey(0), v, train=False))(x)
            cache[shape] = "loop" if "conv_general_dilated" in primitives(jaxpr) else "scan"
        return cache[shape]

    def epoch_runner(self, batch_size: int, example_x, mesh: Mesh | None = None, *,
                     num_seeds: int = 0, index_fn=None):
        """:meth:`loop_epoch` or :meth:`jit_epoch`, as :meth:`resolve_epoch_mode` says."""
        mode = self.resolve_epoch_mode(example_x, mesh)
        runner = self.loop_epoch if mode == "loop" else self.jit_epoch
        return runner(batch_size, mesh, num_seeds=num_seeds, index_fn=index_fn)

    def student_apply(self, state: TrainState):
        """``x -> (logits, features)`` of the student in eval mode."""
        return lambda x: self._student_out(state.params, state.batch_stats, x, False)[0]

    def predict(self, state: TrainState, x: np.ndarray, batch_size: int = 512,
                mesh: Mesh | None = None) -> np.ndarray:
        """Student logits over ``x`` (eval mode), batched and padded like :func:`predict`.

        The compiled program is cached per (batch size, mesh), so repeated evaluations
        during training do not recompile.
        """
        _check_batch_size(batch_size)
        cache = self.__dict__.setdefault("_predict_cache", {})
        key = (batch_size, mesh)
        if key not in cache:
            apply = lambda v, xb: self._student_out(v[0], v[1], xb, False)[0]
            cache[key] = jax.jit(_batched_logits(apply, mesh))
        xs = _pad_batches(x, batch_size, mesh)
        out = np.asarray(cache[key]((state.params, state.batch_stats), xs))
        return out.reshape(-1, out.shape[-1])[: x.shape[0]]


def _pad_to(x: np.ndarray, multiple: int):
    n = x.shape[0]
    m = int(math.ceil(n / multiple) * multiple)
    pad = [(0, m - n)] + [(0, 0)] * (x.ndim - 1)
    return np.pad(x, pad)


def _check_batch_size(batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")


def _batched_logits(apply_fn: Callable, mesh: Mesh | None):
    """``run(variables, xs[steps, B, ...]) -> logits[steps, B, C]`` (not jitted)."""
    def run(variables, xs):
        def body(_, xb):
            if mesh is not None:
                xb = jax.lax.with_sharding_constraint(xb, data_sharding(mesh))
            return None, apply_fn(variables, xb)[0].astype(jnp.float32)
        return jax.lax.scan(body, None, xs)[1]
    return run


def _pad_batches(x, batch_size: int, mesh: Mesh | None):
    if mesh is not None:
        batch_size = int(math.ceil(batch_size / mesh.devices.size) * mesh.devices.size)
    return _pad_to(np.asarray(x), batch_size).reshape(-1, batch_size, *x.shape[1:])


def predict(apply_fn: Callable, x: np.ndarray, batch_size: int = 512,
            mesh: Mesh | None = None) -> np.ndarray:
    """Logits of ``apply_fn(x_batch) -> (logits, features)`` over ``x``, batched.

    The input is padded to a multiple of ``batch_size`` (padding rows are dropped from
    the result). With a mesh, batches are sharded over ``"data"``. ``apply_fn`` is a
    closure, so each call compiles once: use it for one-off predictions (a teacher's
    logits); :meth:`Distiller.predict` reuses one compiled program across evaluations.
    """
    _check_batch_size(batch_size)
    run = jax.jit(_batched_logits(lambda _, xb: apply_fn(xb), mesh))
    out = np.asarray(run(None, _pad_batches(x, batch_size, mesh)))
    return out.reshape(-1, out.shape[-1])[: x.shape[0]]


def evaluate(logits: np.ndarray, labels: np.ndarray, teacher_logits: np.ndarray | None = None,
             groups: np.ndarray | None = None, num_groups: int = 0) -> dict[str, float]:
    """Accuracy, loss, ECE (+ agreement and KL to the teacher, worst-group accuracy)."""
    check_float_array(logits, "logits", ndim=2)
    check_labels(np.asarray(labels), "labels", np.shape(logits)[-1], batch=np.shape(logits)[0])
    if teacher_logits is not None:
        check_same_shape(logits, teacher_logits, "logits", "teacher_logits")
    stats = metrics_lib.batch_stats(
        jnp.asarray(logits), jnp.asarray(labels), jnp.ones(len(labels)),
        None if teacher_logits is None else jnp.asarray(teacher_logits),
        group=None if groups is None else jnp.asarray(groups), num_groups=num_groups)
    return metrics_lib.finalize(stats)


def replicate(tree, mesh: Mesh | None):
    """Places a pytree replicated on the mesh (no-op without a mesh)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, replicated(mesh))
