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
from typing import Any, Callable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from kdjax import _jaxpr
from kdjax._checks import check_float_array, check_labels, check_same_shape
from kdjax.methods import BuiltMethod
from kdjax.models.wrap import check_output, check_signature
from kdjax.train import epoch as epoch_lib
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
    hparams: Any = None  # {method_key: {"weight", traced options}}: arguments of the step


EPOCH_MODES = epoch_lib.EPOCH_MODES
SEED_MODES = ("auto", "vmap", "sequential")
NONFINITE = "nonfinite_params"   # key of the divergence flag in an epoch's mean terms
_STUDENT_RNG = 2**31 - 1         # fold_in tag of the student's rng streams in a step


primitives = _jaxpr.primitives  # names of every primitive in a jaxpr (one walker)
iter_eqns = _jaxpr.iter_eqns


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
      seed_mode: how :func:`~kdjax.train.fit` trains a state with a leading seed axis:
        ``"vmap"`` (one program over the stacked state), ``"sequential"`` (the seeds one
        after the other through the one-seed programs; same numbers up to float
        rounding) or ``"auto"`` (the default; :meth:`resolve_seed_mode`).
      rng_streams: rng streams passed to the student's train-mode apply (and to its
        init), each key ``fold_in(stream key of the step, index)``, so Dropout works;
        a stream a module does not use changes nothing. The teacher runs in eval mode
        without rngs.

    Any other Flax model (logits only, no ``train`` argument, features by module path,
    ``flax.nnx``) is passed as ``kdjax.models.wrap(module, features=...)`` or
    ``kdjax.models.from_nnx(NNXClass, ..., features=...)``: explicit rather than
    automatic, because the wrapper nests the parameters one level (``{"module": ...}``),
    which the user must see to build teacher variables and read checkpoints, and
    because only the user knows the feature paths; kdjax's own models stay unwrapped
    (their parameter trees and numbers are unchanged). :meth:`init` names the wrapper
    when a module does not follow the contract.
    """

    student: nn.Module
    methods: tuple[BuiltMethod, ...]
    tx: optax.GradientTransformation
    teacher: nn.Module | None = None
    augment: Callable[[jax.Array, dict], dict] | None = None
    compute_dtype: Any = jnp.float32
    teacher_from_batch: bool = False
    epoch_mode: str = "auto"
    seed_mode: str = "auto"
    rng_streams: tuple[str, ...] = ("dropout",)

    def __post_init__(self):
        if self.seed_mode not in SEED_MODES:
            raise ValueError(f"seed_mode must be one of {list(SEED_MODES)}, got "
                             f"{self.seed_mode!r}.")
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

    def _rngs(self, key) -> dict:
        """``{stream: fold_in(key, i)}`` for the streams of ``rng_streams``."""
        return {name: jax.random.fold_in(key, i) for i, name in enumerate(self.rng_streams)}

    def _student_out(self, params, batch_stats, x, train: bool, rng=None):
        """``rng``: key of the train-mode rng streams (:attr:`rng_streams`)."""
        vs = _variables(params["student"], batch_stats)
        x = x.astype(self.compute_dtype)
        kw = {} if rng is None else {"rngs": self._rngs(rng)}
        if train and batch_stats:
            out, upd = self.student.apply(vs, x, train=True, mutable=["batch_stats"], **kw)
            return out, upd["batch_stats"]
        return self.student.apply(vs, x, train=train, **kw), batch_stats

    def _init_student(self, key, x):
        """The student's variables; ``key`` seeds ``params`` and, folded, every stream
        of :attr:`rng_streams` (an NNX Dropout takes its stream at construction)."""
        check_signature(self.student, "student")
        return self.student.init({"params": key, **self._rngs(jax.random.fold_in(key, 1))},
                                 x, train=False)

    def hyperparameters(self) -> dict:
        """``{method_key: {"weight": w, <traced option>: v}}`` (float32): the numbers of
        the loss terms that the compiled step takes as arguments (``TrainState.hparams``;
        :attr:`kdjax.methods.Method.traced_options`)."""
        return {k: m.numbers for k, m in zip(self.keys, self.methods)}

    def signature(self) -> tuple:
        """What the compiled programs depend on: the networks, the methods and their
        static options, the optimiser's ``update`` function, augmentation, dtype and
        modes, but not the traced numbers (loss weights, traced options, and the
        learning rate of :func:`~kdjax.train.make_optimizer`, which lives in the
        optimiser state). Distillers with equal signatures share their jitted runners
        (:meth:`epoch_runner`), so cells that differ only in weights, temperatures or
        other traced options run the same compiled program."""
        methods = tuple((m.name, id(m.method), repr(sorted(m.static_options.items())))
                        for m in self.methods)
        return (self.student, self.teacher, methods, self.tx.update, self.augment,
                jnp.dtype(self.compute_dtype).name, self.teacher_from_batch,
                self.epoch_mode)

    # -- initialisation --------------------------------------------------------------
    def optimizer_numbers(self) -> dict:
        """The optimiser's injected hyperparameters (``{"learning_rate": lr}`` for
        :func:`~kdjax.train.make_optimizer`; ``{}`` for an optimiser without
        ``optax.inject_hyperparams``): numbers of ``opt_state``, not of the program, so
        :meth:`init_seeds` takes them as arguments of its shared compiled init."""
        hyper = getattr(self.tx.init({}), "hyperparams", None)
        return dict(hyper) if isinstance(hyper, Mapping) else {}

    def init(self, seed: int | jax.Array, example_x, teacher_vars=None,
             hparams=None, optimizer_numbers=None) -> TrainState:
        """Initial state from a seed and an example batch (shapes only matter);
        ``hparams`` defaults to :meth:`hyperparameters`; ``optimizer_numbers``
        (:meth:`optimizer_numbers`) replace the optimiser state's hyperparameters of
        the same names."""
        key = jax.random.PRNGKey(seed) if isinstance(seed, int) else seed
        k_student, k_adapters = jax.random.split(jax.random.fold_in(key, 1))
        x = jnp.asarray(example_x).astype(self.compute_dtype)
        variables = self._init_student(k_student, x)
        params = {"student": variables["params"], "adapters": {}}
        batch_stats = variables.get("batch_stats", {})
        s_out = self.student.apply(variables, x, train=False)
        check_output(s_out, "student")
        if self.teacher is not None:
            check_signature(self.teacher, "teacher")
        t_out = self._teacher_out(teacher_vars, x)
        if t_out is not None:
            check_output(t_out, "teacher")
        method_state = {}
        for i, (k, m) in enumerate(zip(self.keys, self.methods)):
            p, st = m.init(jax.random.fold_in(k_adapters, i), s_out, t_out)
            params["adapters"][k] = p
            method_state[k] = st
        hparams = self.hyperparameters() if hparams is None else hparams
        opt_state = self.tx.init(params)
        if optimizer_numbers:
            opt_state = optax.tree_utils.tree_set(opt_state, **optimizer_numbers)
        return TrainState(epoch=jnp.zeros((), jnp.int32), step=jnp.zeros((), jnp.int32),
                          params=params, batch_stats=batch_stats,
                          opt_state=opt_state, method_state=method_state,
                          seed_key=key,
                          hparams=jax.tree_util.tree_map(jnp.asarray, hparams))

    # -- one step --------------------------------------------------------------------
    def loss_fn(self, params, state: TrainState, teacher_vars, batch, rng):
        """Total loss and aux (new BN stats, new method state, per-term values)."""
        if self.augment is not None:
            batch = self.augment(jax.random.fold_in(rng, 0), batch)
        x = batch["x"]
        s_out, new_bs = self._student_out(params, state.batch_stats, x, train=True,
                                          rng=jax.random.fold_in(rng, _STUDENT_RNG))
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
        hparams = self.hyperparameters() if state.hparams is None else state.hparams
        for i, (k, m) in enumerate(zip(self.keys, self.methods)):
            value, st = m(params["adapters"][k], state.method_state[k], s_out, t_out,
                          batch, jax.random.fold_in(rng, i + 1), models=models,
                          numbers=hparams[k])
            terms[k] = value
            new_ms[k] = st
            total = total + hparams[k]["weight"] * value
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
    def step_fn(self, state: TrainState, teacher_vars, batch, rng):
        """:meth:`train_step` in the calling convention of :mod:`kdjax.train.epoch`; the
        terms also hold ``NONFINITE``: 1.0 when a parameter became NaN/Inf (the
        divergence guard of :func:`~kdjax.train.fit`), else 0.0."""
        state, terms = self.train_step(state, teacher_vars, batch, rng)
        finite = jnp.stack([jnp.isfinite(p).all()
                            for p in jax.tree_util.tree_leaves(state.params)]).all()
        return state, {**terms, NONFINITE: 1.0 - finite.astype(jnp.float32)}

    def epoch_fn(self, batch_size: int, mesh: Mesh | None = None,
                 index_fn: Callable[[jax.Array, int], jax.Array] | None = None):
        """``epoch(state, teacher_vars, data) -> (state, mean terms)``, not yet jitted.

        ``data`` is a dict of device arrays with equal leading dimension N (``x``, ``y``,
        optional ``weights``, ``label_mask``...). Each epoch draws a permutation from
        ``fold_in(seed_key, epoch)`` and runs ``N // batch_size`` steps in a
        ``lax.scan`` (:func:`kdjax.train.epoch.epoch_fn`). Pure, so it can be
        ``vmap``-ed over seeds.

        ``index_fn(key, n) -> int[steps, batch_size]`` replaces the random permutation
        with another jittable batch plan (e.g. CoSS's teacher-neighbour batches from
        :mod:`kdjax.data.neighbors`).
        """
        return epoch_lib.epoch_fn(self.step_fn, batch_size, index_fn=index_fn, mesh=mesh)

    def _epoch_plan(self, state: TrainState, data, batch_size: int, index_fn):
        """``(key, idx[steps, batch_size])`` of the epoch ``state.epoch``."""
        key = epoch_lib.default_epoch_key(state)
        n = jax.tree_util.tree_leaves(data)[0].shape[0]
        return key, epoch_lib.batch_plan(jax.random.fold_in(key, 0), n, batch_size, index_fn)

    def make_epoch(self, batch_size: int, mesh: Mesh | None = None, *, mode: str = "scan",
                   num_seeds: int = 0, index_fn=None):
        """A new jitted epoch runner ``run(state, teacher_vars, data) -> (state, mean
        terms)`` (:func:`kdjax.train.epoch.make_epoch`); keep it to reuse its program."""
        return epoch_lib.make_epoch(self.step_fn, batch_size, mode=mode, num_seeds=num_seeds,
                                    mesh=mesh, index_fn=index_fn)

    def loop_epoch(self, batch_size: int, mesh: Mesh | None = None, *, num_seeds: int = 0,
                   index_fn=None):
        """The loop-mode runner (one compiled step, a Python loop over steps; same numbers
        as :meth:`jit_epoch`); shared per distiller and arguments (:meth:`epoch_runner`)."""
        return self.epoch_runner(batch_size, None, mesh, num_seeds=num_seeds,
                                 index_fn=index_fn, mode="loop")

    def jit_epoch(self, batch_size: int, mesh: Mesh | None = None, *, num_seeds: int = 0,
                  index_fn=None):
        """The scan-mode runner (one compiled ``lax.scan`` per epoch, state donated);
        ``num_seeds > 0`` vmaps over a leading seed axis of the state."""
        return self.epoch_runner(batch_size, None, mesh, num_seeds=num_seeds,
                                 index_fn=index_fn, mode="scan")

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
        abstractly on ``example_x`` (shapes only; nothing runs or compiles).
        """
        if self.epoch_mode != "auto":
            return self.epoch_mode
        platform = (mesh.devices.flat[0].platform if mesh is not None
                    else jax.default_backend())
        if platform != "cpu":
            return "scan"
        x = jax.ShapeDtypeStruct((1, *example_x.shape[1:]), example_x.dtype)
        jaxpr = jax.make_jaxpr(
            lambda v: self._init_student(jax.random.PRNGKey(0), v))(x)
        return "loop" if "conv_general_dilated" in primitives(jaxpr) else "scan"

    def resolve_seed_mode(self, example_x, num_seeds: int, mesh: Mesh | None = None) -> str:
        """How :func:`~kdjax.train.fit` trains ``num_seeds`` stacked seeds: ``seed_mode``
        unless "auto".

        "auto" is a rule from ``benchmarks/seeds.py`` (one epoch, S seeds vmapped vs
        sequential; ratio > 1: vmap faster):

        ====================  =====  ========  ========  =========
        student, backend      S = 1  S = 4     S = 8     rule
        ====================  =====  ========  ========  =========
        MLP, 2-core CPU       1.03   1.11      0.94      vmap if S <= 4
        CNN1D, 2-core CPU     1.03   1.18      1.11      vmap
        MLP, H100             0.95   3.31      4.90      vmap
        CNN1D, H100           0.95   1.75      1.72      vmap
        ResNet-8x4, H100      --     0.48      --        sequential
        ====================  =====  ========  ========  =========

        so: ``"sequential"`` when the student has a 2-D convolution (vmapping it over
        per-seed kernels makes a grouped convolution, ``feature_group_count = S``, the
        slow case), or on a CPU for more than 4 seeds of a student without
        convolutions; else ``"vmap"``. The check traces the student abstractly on
        ``example_x`` (shapes only; nothing runs or compiles).
        """
        if self.seed_mode != "auto":
            return self.seed_mode
        if num_seeds <= 1:
            return "vmap"
        x = jax.ShapeDtypeStruct((1, *example_x.shape[1:]), example_x.dtype)
        jaxpr = jax.make_jaxpr(
            lambda v: self._init_student(jax.random.PRNGKey(0), v))(x)
        spatial = [len(e.params["dimension_numbers"].lhs_spec) - 2
                   for e, _ in iter_eqns(jaxpr) if e.primitive.name == "conv_general_dilated"]
        if any(d >= 2 for d in spatial):
            return "sequential"
        platform = (mesh.devices.flat[0].platform if mesh is not None
                    else jax.default_backend())
        if platform == "cpu" and not spatial and num_seeds > 4:
            return "sequential"
        return "vmap"

    def epoch_runner(self, batch_size: int, example_x, mesh: Mesh | None = None, *,
                     num_seeds: int = 0, index_fn=None, mode: str | None = None):
        """The jitted epoch runner of this distiller for these arguments, in ``mode``
        (default: :meth:`resolve_epoch_mode` on ``example_x``).

        Runners are built by :meth:`make_epoch` and kept in a module-level table keyed
        by :meth:`signature`, so repeated ``fit`` calls (sequential seeds, KD-AIF's
        stages) and distillers that differ only in traced numbers reuse one compiled
        program.
        """
        mode = self.resolve_epoch_mode(example_x, mesh) if mode is None else mode
        table = _RUNNERS.setdefault(self.signature(), {})
        key = ("epoch", batch_size, mesh, num_seeds, index_fn, mode)
        if key not in table:
            table[key] = self.make_epoch(batch_size, mesh, mode=mode, num_seeds=num_seeds,
                                         index_fn=index_fn)
        return table[key]

    def student_apply(self, state: TrainState):
        """``x -> (logits, features)`` of the student in eval mode."""
        return lambda x: self._student_out(state.params, state.batch_stats, x, False)[0]

    def predictor(self, batch_size: int = 512, mesh: Mesh | None = None, *,
                  num_seeds: int = 0):
        """``run(state, x) -> logits`` of the student (eval mode) over ``x`` (numpy).

        One compiled program per (batch size, mesh, seeds) whatever ``len(x)``: ``x`` is
        padded to a multiple of ``batch_size`` on the host and each batch goes through
        the same jitted forward pass (padding rows are dropped). ``num_seeds > 0``: a
        state with a leading seed axis gives ``logits[seeds, N, C]``, all seeds in one
        program. ``state`` needs only ``params["student"]`` and ``batch_stats``. Shared
        by every distiller with this student and compute dtype (the forward pass does
        not depend on the methods, optimiser or teacher), per arguments."""
        _check_batch_size(batch_size)
        table = _RUNNERS.setdefault(("student", self.student,
                                     jnp.dtype(self.compute_dtype).name), {})
        key = ("predict", batch_size, mesh, num_seeds)
        if key not in table:
            def forward(params, batch_stats, xb):
                if mesh is not None:
                    xb = jax.lax.with_sharding_constraint(xb, data_sharding(mesh))
                out = self._student_out({"student": params}, batch_stats, xb, False)[0]
                return out[0].astype(jnp.float32)

            if num_seeds:
                forward = jax.vmap(forward, in_axes=(0, 0, None))
            forward = jax.jit(forward)

            def run(state, x):
                x = np.asarray(x)
                xs = _pad_batches(x, batch_size, mesh)
                params, bs = state.params["student"], state.batch_stats
                out = [forward(params, bs, xb) for xb in xs]
                out = np.concatenate(jax.device_get(out), axis=-2)
                return out[..., : x.shape[0], :]

            table[key] = run
        return table[key]

    def init_seeds(self, seeds, example_x, teacher_vars=None) -> TrainState:
        """``init`` of every seed in ``seeds`` (ints: ``PRNGKey(seed)``), stacked along a
        leading seed axis, as one compiled program (shared per distiller and shapes; the
        loss terms' numbers and the learning rate are its arguments)."""
        table = _RUNNERS.setdefault(self.signature(), {})
        if "init" not in table:
            table["init"] = jax.jit(jax.vmap(
                lambda s, x, tv, hp, on: self.init(jax.random.PRNGKey(s), x, tv, hp, on),
                in_axes=(0, None, None, None, None)))
        return table["init"](np.asarray(seeds, np.int32), np.asarray(example_x),
                             teacher_vars, self.hyperparameters(), self.optimizer_numbers())

    def predict(self, state: TrainState, x: np.ndarray, batch_size: int = 512,
                mesh: Mesh | None = None) -> np.ndarray:
        """Student logits over ``x`` (eval mode), batched and padded like :func:`predict`
        (:meth:`predictor`: repeated evaluations do not recompile)."""
        return self.predictor(batch_size, mesh)(state, x)


# jitted runners per Distiller.signature(): built once, shared by equal-structure distillers
_RUNNERS: dict[tuple, dict] = {}


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
    stats = _batch_stats(
        np.asarray(logits), np.asarray(labels), np.ones(len(labels), np.float32),
        None if teacher_logits is None else np.asarray(teacher_logits),
        group=None if groups is None else np.asarray(groups), num_groups=num_groups)
    return metrics_lib.finalize(stats)


# one compiled program per shape, shared by every evaluation in the process
_batch_stats = jax.jit(metrics_lib.batch_stats, static_argnames=("num_bins", "num_groups"))


def replicate(tree, mesh: Mesh | None):
    """Places a pytree replicated on the mesh (no-op without a mesh)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, replicated(mesh))
