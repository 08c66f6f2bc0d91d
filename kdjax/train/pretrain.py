"""Initialisation stage of the methods that define ``pretrain_loss`` (FT, AB, FSP).

RepDistiller (``helper/pretrain.py``) runs these before distillation, with the teacher
frozen, minimising the *unweighted* sum of the stage losses for ``init_epochs`` (30)
epochs with its own SGD optimiser (lr 0.05, momentum 0.9, weight decay 5e-4):

- **FT**: the paraphraser learns to reconstruct the teacher feature (MSE); the student
  is not used.
- **AB**: the connectors *and the student's feature layers* learn the activation
  boundaries of the teacher (the AB hinge).
- **FSP**: the *student's feature layers* learn the teacher's FSP matrices (FSP has no
  adapter).

:func:`pretrain` does the same on a :class:`~kdjax.train.engine.TrainState`: it trains
``params["adapters"][k]`` of every method ``k`` with a ``pretrain_loss`` (only the
per-pair parts named by its ``pretrain_params`` option when it has one: FT trains its
``"paraphraser"``, never its translator) and, where the
method's ``pretrain_student`` option is true (the reference default for AB and FSP,
false for FT), the student's parameters except its classifier ``head`` (RepDistiller
trains ``model_s.get_feat_modules()``, which excludes the classifier). The student runs
in train mode (BatchNorm statistics update) when it is trained and in eval mode
otherwise, as in the reference (``model_s.eval()`` then ``init_modules.train()``).
Everything else is left as it was: the other methods' adapters, the main optimiser
state, the epoch and step counters, the method states. The stage has its own optimiser
(``tx``), whose state is discarded afterwards, and its own key stream
(``fold_in(fold_in(seed_key, PRETRAIN_STREAM), epoch)``), so it does not shift the keys
of the distillation epochs.

Epochs run through the one epoch loop of :mod:`kdjax.train.epoch` in scan mode (one
jitted ``lax.scan``, dropping ``N mod B`` examples of a fresh permutation), vmapped over a
leading seed axis; the loop's state is ``(state, opt_state, stage_epoch)``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from kdjax.train import epoch as epoch_lib
from kdjax.train.engine import Distiller, TrainState, replicate

__all__ = ["pretrain", "pretrain_epoch_fn", "pretrain_step_fn", "pretrain_keys", "pretrain_epochs",
           "default_pretrain_optimizer", "PRETRAIN_STREAM"]

PRETRAIN_STREAM = 0x50524554  # "PRET": key stream of the stage, apart from the epochs'


def default_pretrain_optimizer(learning_rate: float = 0.05, momentum: float = 0.9,
                               weight_decay: float = 5e-4) -> optax.GradientTransformation:
    """RepDistiller's init-stage optimiser: SGD 0.05, momentum 0.9, coupled wd 5e-4."""
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(learning_rate, momentum=momentum))


def pretrain_keys(distiller: Distiller) -> list[str]:
    """Method keys (``distiller.keys``) of the methods that have a ``pretrain_loss``."""
    return [k for k, m in zip(distiller.keys, distiller.methods)
            if m.method.pretrain_loss is not None]


def pretrain_epochs(distiller: Distiller) -> int:
    """The largest ``pretrain_epochs`` option of those methods (0 when none)."""
    out = 0
    for m in distiller.methods:
        if m.method.pretrain_loss is not None:
            if "pretrain_epochs" not in m.options:
                raise ValueError(f"method {m.name!r} has a pretrain_loss but no "
                                 f"'pretrain_epochs' option; options: {sorted(m.options)}.")
            n = m.options["pretrain_epochs"]
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"{m.name}: pretrain_epochs must be an int >= 0, got {n!r}.")
            out = max(out, n)
    return out


def _trains_student(distiller: Distiller, train_student: bool | None) -> bool:
    if train_student is not None:
        return bool(train_student)
    return any(bool(m.options.get("pretrain_student", False)) for m in distiller.methods
               if m.method.pretrain_loss is not None)


def _student_part(student_params: Mapping[str, Any]) -> dict:
    return {n: v for n, v in student_params.items() if n != "head"}


def _adapter_part(method, params):
    names = method.options.get("pretrain_params")
    if names is None:
        return params
    if isinstance(names, str):
        names = (names,)
    out = {}
    for pair, sub in params.items():
        missing = sorted(set(names) - set(sub))
        if missing:
            raise ValueError(f"{method.name}: pretrain_params {list(names)} name adapter "
                             f"parts {missing} that {pair!r} does not have; it has "
                             f"{sorted(sub)}.")
        out[pair] = {n: sub[n] for n in names}
    return out


def _split(params, methods_by_key, train_student):
    trainable = {"adapters": {k: _adapter_part(m, params["adapters"][k])
                              for k, m in methods_by_key.items()}}
    if train_student:
        trainable["student"] = _student_part(params["student"])
    return trainable


def _deep_merge(base, update):
    if isinstance(base, Mapping) and isinstance(update, Mapping):
        return {**base, **{k: _deep_merge(base[k], v) for k, v in update.items()}}
    return update


def _merge(params, trainable):
    return _deep_merge(params, trainable)


def pretrain_step_fn(distiller: Distiller, tx: optax.GradientTransformation, *,
                     train_student: bool | None = None) -> Callable:
    """``step((state, opt_state, e), teacher_vars, batch, rng) -> (carry, loss)``: one
    optimiser step of the stage (:mod:`kdjax.train.epoch` convention)."""
    keys = pretrain_keys(distiller)
    if not keys:
        raise ValueError("no method of the distiller has a pretrain_loss; methods: "
                         f"{distiller.keys}.")
    student_trained = _trains_student(distiller, train_student)
    by_key = {k: m for k, m in zip(distiller.keys, distiller.methods) if k in keys}

    def loss_fn(trainable, state: TrainState, teacher_vars, batch, rng):
        if distiller.augment is not None:
            batch = distiller.augment(jax.random.fold_in(rng, 0), batch)
        params = _merge(state.params, trainable)
        x = batch["x"]
        s_out, new_bs = distiller._student_out(params, state.batch_stats, x,
                                               train=student_trained)
        if not student_trained:
            s_out = jax.lax.stop_gradient(s_out)
        s_out = (s_out[0].astype(jnp.float32), s_out[1])
        if distiller.teacher_from_batch:
            t_out = (batch["teacher_logits"], batch.get("teacher_features", {}))
        else:
            t_out = distiller._teacher_out(teacher_vars, x)
        t_out = (t_out[0].astype(jnp.float32), jax.lax.stop_gradient(t_out[1]))
        total = jnp.zeros((), jnp.float32)
        for i, k in enumerate(keys):
            m = by_key[k]
            value, _ = m.pretrain(params["adapters"][k], state.method_state[k], s_out,
                                  t_out, batch, jax.random.fold_in(rng, i + 1))
            total = total + value
        return total, new_bs

    def step(carry, teacher_vars, batch, rng):
        state, opt_state, e = carry
        trainable = _split(state.params, by_key, student_trained)
        (loss, new_bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, state, teacher_vars, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        state = state.replace(params=_merge(state.params, trainable), batch_stats=new_bs)
        return (state, opt_state, e), loss

    return step


def _stage_key(carry):
    """Key of the stage's epoch ``e``: ``fold_in(fold_in(seed_key, PRETRAIN_STREAM), e)``."""
    state, _, e = carry
    return jax.random.fold_in(jax.random.fold_in(state.seed_key, PRETRAIN_STREAM), e)


def _next_stage_epoch(carry):
    state, opt_state, e = carry
    return state, opt_state, e + 1


def pretrain_epoch_fn(distiller: Distiller, tx: optax.GradientTransformation,
                      batch_size: int, mesh: Mesh | None = None, *,
                      train_student: bool | None = None) -> Callable:
    """``epoch((state, opt_state, e), teacher_vars, data) -> ((state, opt_state, e + 1),
    mean pretrain loss)``, pure and not jitted (see :func:`pretrain`).

    ``opt_state`` is ``tx.init`` of the trainable subtree (:func:`init_opt_state`), ``e``
    the stage's epoch index (int32).
    """
    step = pretrain_step_fn(distiller, tx, train_student=train_student)
    return epoch_lib.epoch_fn(step, batch_size, mesh=mesh, epoch_key=_stage_key,
                              advance=_next_stage_epoch)


def init_opt_state(distiller: Distiller, tx: optax.GradientTransformation,
                   state: TrainState, *, train_student: bool | None = None):
    """``tx.init`` of the subtree the stage trains (one seed's state)."""
    by_key = {k: m for k, m in zip(distiller.keys, distiller.methods)
              if m.method.pretrain_loss is not None}
    return tx.init(_split(state.params, by_key, _trains_student(distiller, train_student)))


def pretrain(distiller: Distiller, state: TrainState, teacher_vars,
             train_data: Mapping[str, Any], *, batch_size: int, epochs: int | None = None,
             tx: optax.GradientTransformation | None = None, mesh: Mesh | None = None,
             num_seeds: int = 0, train_student: bool | None = None,
             history: list | None = None) -> TrainState:
    """Runs the initialisation stage; returns the updated state.

    Args:
      distiller: the distiller of the run (its methods, teacher, augmentation).
      state: from ``distiller.init`` (a leading seed axis when ``num_seeds > 0``).
      teacher_vars: the frozen teacher's variables.
      train_data: dict of arrays (``x``, ``y``, ...), as for :func:`~kdjax.train.fit`.
      batch_size: global batch size of the stage.
      epochs: default: the largest ``pretrain_epochs`` option of the methods. 0 returns
        ``state`` unchanged, as does a distiller without any pretrain method.
      tx: the stage's optimiser (default :func:`default_pretrain_optimizer`).
      num_seeds: 0 for one run, ``S`` for a state with a leading seed axis (vmapped).
      train_student: also train the student (minus its ``head``); default: true when
        any pretrain method's ``pretrain_student`` option is (RepDistiller: AB, FSP).
      history: if given, the mean stage loss of each epoch is appended (a float, or a
        list per seed).
    """
    if not pretrain_keys(distiller):
        return state
    epochs = pretrain_epochs(distiller) if epochs is None else epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
    if mesh is not None and batch_size % mesh.devices.size:
        raise ValueError(f"batch_size {batch_size} must be divisible by the "
                         f"{mesh.devices.size} devices of the mesh.")
    if epochs == 0:
        return state
    tx = default_pretrain_optimizer() if tx is None else tx
    step = pretrain_step_fn(distiller, tx, train_student=train_student)
    run = epoch_lib.make_epoch(step, batch_size, mode="scan", num_seeds=num_seeds, mesh=mesh,
                               epoch_key=_stage_key, advance=_next_stage_epoch)

    def init(st):
        opt = init_opt_state(distiller, tx, st, train_student=train_student)
        return st, opt, jnp.zeros((), jnp.int32)

    state = replicate(state, mesh)
    carry = replicate(jax.jit(jax.vmap(init) if num_seeds else init)(state), mesh)
    data = replicate(jax.device_put(dict(train_data)), mesh)
    tvars = replicate(teacher_vars, mesh)
    for _ in range(epochs):
        carry, loss = run(carry, tvars, data)
        if history is not None:
            history.append(jax.device_get(loss).tolist())
    return carry[0]
