r"""KD-AIF: influence-weighted knowledge distillation (arXiv 2501.02705), on the engine.

The student minimises the weighted distillation objective (KD-AIF, sec. 3)

.. math::
    \mathcal{L}(\theta) = \frac{1}{N}\sum_i w_i\, l_i(\theta), \qquad
    l_i = \alpha\, c\, m_i\, \mathrm{CE}(y_i, s_i) + \beta\, \tau^2\,
          \mathrm{KL}\big(p^T_i \,\|\, p^S_i\big)

(:func:`distill_losses`; ``m_i`` = 1 for a labelled example, ``c = 1 / mean(m)`` so that
the engine's "CE over the labelled rows of a batch" has the same scale, ``p = softmax(z /
tau)``). The weights come from the Koh & Liang influence of every training point on a
labelled validation loss ``L_val = mean_j CE(y_j, s_j)`` (:func:`student_scores`):

.. math::
    \mathcal{I}(z_i) = -\nabla_\theta l_i^\top (G + \lambda I)^{-1}
                        \nabla_\theta L_{val}

(negative = helpful), with ``G`` the Gauss-Newton curvature of the (weighted) training
objective (default for networks; PSD) or, as a cheap option, the exact Hessian of the
last layer on frozen features (convex in the head, so exact = GGN, solved densely).
:func:`kdjax.influence.influence_weights` maps scores to weights (``"exp_minmax"``: the
authors' code, ``w = exp(minmax(-I))``; ``"sigmoid"``: the paper) with mean 1; helpful
points get the larger weight. The engine's ``ce`` and ``kd`` methods honour
``batch["weights"]`` as ``(1/B) sum_i w_i l_i``.

Frozen-teacher procedures (compose :func:`kdjax.train.fit`; the weights live in
``data["weights"]``; :func:`frozen_teacher_run` runs one by name):

* :func:`one_shot` (a): train with uniform weights, score every training point with the
  trained student, map to weights, retrain from the same initialisation.
* :func:`fit_periodic` (b): re-score every ``K`` epochs with the *current* student and
  replace ``data["weights"]`` between ``fit`` calls (uniform for the first ``K``
  epochs). Deterministic: the weights of chunk ``c`` are a pure function of the state
  at epoch ``cK``; resumable: each chunk has its own checkpoint directory and the
  weights of a chunk are saved before its training starts.
* :func:`semi_supervised_data` (c): labelled subset + teacher pseudo-labels; the labels
  of unlabelled points are never stored (``y`` holds the teacher's argmax there and
  ``label_mask = 0`` keeps them out of CE).
* :func:`fit_joint` (d), the paper's semi-supervised algorithm: teacher and student
  train together; influence weights, re-scored on the loop's student
  (:func:`make_joint_scorer`) every ``K`` epochs, scale the student's pseudo-label
  loss, and the teacher takes the meta-pseudo-label feedback step (Pham et al. 2021;
  :mod:`kdjax.recipes.mpl`) after each look-ahead; :func:`joint_step` is one step. The
  reported student is the loop's student.

Conventions: ``loss_fn(params, batch) -> [B]`` per-example losses, as in
:mod:`kdjax.influence`; networks run in eval mode (BatchNorm running statistics) while
scoring, so examples are independent.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable, Mapping, NamedTuple

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax import losses, methods
from kdjax._checks import check_choice, check_positive
from kdjax.influence import (WEIGHT_MAPPINGS, ggn_vp, hvp, influence_scores,
                             influence_weights)
from kdjax.recipes import mpl
from kdjax.train.checkpoint import Checkpointer
from kdjax.train.engine import Distiller, TrainState
from kdjax.train.epoch import make_epoch
from kdjax.train.loop import fit, num_seeds_of

__all__ = [
    "CURVATURES",
    "distill_losses",
    "make_distiller",
    "val_losses",
    "student_scores",
    "make_scorer",
    "with_weights",
    "one_shot",
    "fit_periodic",
    "PROCEDURES",
    "frozen_teacher_run",
    "mapping_of",
    "semi_supervised_data",
    "joint_step",
    "make_joint_scorer",
    "JointState",
    "JointResult",
    "fit_joint",
]

CURVATURES = ("ggn", "last_layer")


# ------------------------------------------------------------------- objectives
def distill_losses(logits: chex.Array, batch: Mapping[str, Any], *, ce_weight: float = 0.1,
                   kd_weight: float = 0.9, temperature: float = 4.0,
                   ce_scale: float = 1.0) -> chex.Array:
    r"""Per-example distillation objective ``l_i`` (unweighted), ``[B]``.

    .. math::
        l_i = \alpha\, c\, m_i\, \mathrm{CE}(y_i, z_i) + \beta\,\tau^2\,
              \mathrm{KL}(\mathrm{softmax}(t_i/\tau) \,\|\, \mathrm{softmax}(z_i/\tau))

    with ``alpha = ce_weight``, ``beta = kd_weight``, ``c = ce_scale``, ``m_i =
    batch["label_mask"]`` (1 when absent), ``t_i = batch["teacher_logits"]``. With
    ``c = 1 / mean(m)`` over the training set, ``mean_i w_i l_i`` is the expectation of
    the engine's loss with methods ``ce`` (weight alpha) and ``kd`` (beta, tau) on
    ``batch["weights"] = w`` (exactly equal for a fully labelled batch).

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.recipes.kd_aif import distill_losses
      >>> z = jnp.zeros((2, 3))
      >>> b = {"y": jnp.array([0, 1]), "teacher_logits": z}
      >>> distill_losses(z, b, ce_weight=1.0, kd_weight=1.0).round(4)
      Array([1.0986, 1.0986], dtype=float32)

    Args:
      logits: ``[B, C]`` student logits.
      batch: dict with ``y`` ``[B]``, ``teacher_logits`` ``[B, C]``, optional
        ``label_mask`` ``[B]``.
      ce_weight, kd_weight, temperature: the loss weights and KD temperature.
      ce_scale: factor on the CE term (``1 / labelled fraction``).

    Returns:
      ``[B]`` float32 losses.
    """
    logits = logits.astype(jnp.float32)
    out = kd_weight * losses.kd(logits, jax.lax.stop_gradient(
        batch["teacher_logits"].astype(jnp.float32)), temperature, reduction="none")
    if ce_weight:
        ce = losses.cross_entropy(logits, batch["y"], reduction="none")
        if "label_mask" in batch:
            ce = ce * batch["label_mask"].astype(jnp.float32)
        out = out + ce_weight * ce_scale * ce
    return out


def make_distiller(student, tx: optax.GradientTransformation, *, ce_weight: float = 0.1,
                   kd_weight: float = 0.9, temperature: float = 4.0) -> Distiller:
    r"""The engine's form of the frozen-teacher objective :func:`distill_losses`.

    A :class:`~kdjax.train.Distiller` of ``student`` with the methods ``ce`` (weight
    ``alpha = ce_weight``) and ``kd`` (weight ``beta = kd_weight``, temperature ``tau``),
    the teacher's logits read from ``batch["teacher_logits"]``
    (``teacher_from_batch=True``). Its loss on a batch with ``weights`` ``w`` is
    ``(1/B) sum_i w_i l_i`` with ``l_i = alpha m_i CE_i + beta tau^2 KL_i`` (CE over the
    labelled rows ``m_i = 1`` of the batch), as the procedures here train it.
    """
    built = (methods.build({"name": "ce", "weight": ce_weight}),
             methods.build({"name": "kd", "weight": kd_weight, "temperature": temperature}))
    return Distiller(student, built, tx, teacher_from_batch=True)


def val_losses(logits: chex.Array, batch: Mapping[str, Any]) -> chex.Array:
    """Validation loss per example: ``CE(y_j, z_j)`` on labelled data, ``[B]``."""
    return losses.cross_entropy(logits.astype(jnp.float32), batch["y"], reduction="none")


# ----------------------------------------------------------------------- scores
def _head_logits(head, batch):
    return batch["pooled"] @ head["kernel"] + head["bias"]


def student_scores(model_fn: Callable[[Any, Any], Any], params: Any,
                   train_data: Mapping[str, Any], val_data: Mapping[str, Any], *,
                   objective: Callable[[Any, Any], chex.Array],
                   val_objective: Callable[[Any, Any], chex.Array] = val_losses,
                   curvature: str = "ggn", curvature_data: Mapping[str, Any] | None = None,
                   features_fn: Callable[[Any, Any], Any] | None = None,
                   damping: float = 0.01, method: str | None = None, **options):
    r"""KD-AIF influence of every training point on the validation loss, ``[N]``.

    .. math::
        g = \nabla_\theta \tfrac{1}{M}\textstyle\sum_j \ell^{val}_j,\quad
        s = (G + \lambda I)^{-1} g,\quad
        \mathcal{I}_i = -\nabla_\theta l_i^\top s

    (Koh & Liang 2017 eq. 2; KD-AIF sec. 3) with ``l_i = objective(model_fn(params,
    x_i), batch_i)`` (the *unweighted* distillation loss: up-weighting ``z_i`` by
    ``epsilon`` adds ``epsilon l_i``) and ``G`` the curvature of the training objective
    ``mean_i w_i l_i`` on ``curvature_data`` (``w_i = batch["weights"]`` if present,
    else 1). This is :func:`kdjax.influence.influence_scores` with a model-output loss,
    a separate validation loss (CE on labels vs the KD objective) and one of two
    curvatures:

    * ``"ggn"`` (default): Gauss-Newton ``J^T H_out J`` of the network
      (:func:`kdjax.influence.ggn_vp`), PSD, solved by damped CG (``method="cg"``).
    * ``"last_layer"``: only the classifier ``params["head"]`` (``kernel``, ``bias``) is
      treated as variable, on frozen features ``features_fn(params, batch) ->
      [B, D]`` (the ``"pooled"`` embedding). The objective is convex in the head, its
      exact Hessian (:func:`kdjax.influence.hvp`) equals its GGN, and with ``C (D + 1)``
      parameters it is solved directly (``method="direct"``). Cheap, ignores the body.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from kdjax.recipes.kd_aif import student_scores, val_losses
      >>> model = lambda p, b: b["x"] @ p
      >>> x = jnp.eye(2)
      >>> train = {"x": x, "y": jnp.array([0, 1])}
      >>> val = {"x": x, "y": jnp.array([0, 1])}
      >>> s, _ = student_scores(model, jnp.zeros((2, 2)), train, val, objective=val_losses)
      >>> bool((s < 0).all())   # each point agrees with the validation labels: helpful
      True

    Args:
      model_fn: ``(params, batch) -> logits [B, C]`` (eval mode).
      params: the student's parameters.
      train_data: dict of ``[N, ...]`` arrays read by ``objective`` (and ``model_fn``).
      val_data: labelled validation dict read by ``val_objective``.
      objective: ``(logits, batch) -> [B]`` per-example training loss.
      val_objective: ``(logits, batch) -> [B]`` validation loss (default CE).
      curvature: ``"ggn"`` or ``"last_layer"``.
      curvature_data: the examples whose curvature is used (default ``train_data``; a
        fixed subset bounds the cost of each product).
      features_fn: ``(params, batch) -> [B, D]`` frozen features (``last_layer`` only).
      damping: ``lambda`` of the damped solve.
      method: :func:`kdjax.influence.inverse_hvp` method (default ``"cg"`` for GGN,
        ``"direct"`` for the last layer).
      **options: solver options (e.g. ``tol``, ``maxiter``) and ``chunk_size`` of the
        scoring JVP, passed to :func:`kdjax.influence.influence_scores`.

    Returns:
      ``(scores [N], info)``: :func:`kdjax.influence.influence_scores`' info (``s``,
      ``val_grad_norm``, ``inverse_hvp`` diagnostics).
    """
    check_choice(curvature, "curvature", CURVATURES)
    curvature_data = train_data if curvature_data is None else curvature_data

    def weighted(obj):
        def fn(logits, batch):
            out = obj(logits, batch)
            return out * batch["weights"].astype(out.dtype) if "weights" in batch else out
        return fn

    if curvature == "ggn":
        theta, mfn = params, model_fn
        tr, cv, va = train_data, curvature_data, val_data
    else:
        if features_fn is None:
            raise ValueError("curvature='last_layer' needs features_fn(params, batch) -> "
                             "[B, D] (the frozen embedding that feeds params['head']).")
        if not (isinstance(params, Mapping) and "head" in params):
            raise ValueError("curvature='last_layer' needs a params dict with a 'head' "
                             f"entry (kernel, bias), got keys {list(params)}.")
        theta, mfn = params["head"], _head_logits
        add = lambda d: {**d, "pooled": jax.lax.stop_gradient(features_fn(params, d))}  # noqa: E731
        tr, cv, va = add(train_data), add(curvature_data), add(val_data)
    method = method or ("cg" if curvature == "ggn" else "direct")
    if curvature == "ggn":
        matvec = lambda v: ggn_vp(mfn, weighted(objective), theta, cv, v)  # noqa: E731
    else:
        matvec = lambda v: hvp(lambda p, b: weighted(objective)(mfn(p, b), b),  # noqa: E731
                               theta, cv, v)
    return influence_scores(lambda p, b: objective(mfn(p, b), b), theta, tr, va,
                            val_loss_fn=lambda p, b: val_objective(mfn(p, b), b),
                            matvec=matvec, method=method, damping=damping, **options)


def _scorer_data(train_data, val_data, curvature, curvature_examples, curvature_seed):
    """The scorers' inputs: ``(train without "weights", val, N, idx)`` as device arrays,
    ``idx`` the sorted fixed random subset (``curvature_seed``) of
    ``min(curvature_examples, N)`` training rows that the curvature uses."""
    check_choice(curvature, "curvature", CURVATURES)
    train = {k: jnp.asarray(v) for k, v in train_data.items() if k != "weights"}
    val = {k: jnp.asarray(v) for k, v in val_data.items()}
    n = train["x"].shape[0]
    idx = np.sort(np.random.default_rng(curvature_seed).permutation(n)[
        :min(curvature_examples, n)])
    return train, val, n, idx


def make_scorer(distiller: Distiller, train_data: Mapping[str, Any],
                val_data: Mapping[str, Any], *, objective: Callable,
                curvature: str = "ggn", curvature_examples: int = 1024,
                curvature_seed: int = 0, **options) -> Callable[[TrainState], jax.Array]:
    """``scorer(state, weights=None) -> scores [N]`` for a single-seed engine state.

    Builds :func:`student_scores` for ``distiller.student`` in eval mode, jitted once
    (the data are arguments, not constants). The curvature uses a fixed random subset
    of ``curvature_examples`` training examples (drawn with ``curvature_seed``), the
    same for every call, so a score is a deterministic function of the state (and of
    the current weights, which enter the curvature of the weighted objective).
    ``train_data`` must not contain ``"weights"``; pass them to the scorer.
    """
    train, val, n, idx = _scorer_data(train_data, val_data, curvature,
                                      curvature_examples, curvature_seed)
    module = distiller.student

    @jax.jit
    def score(params, batch_stats, train, val, weights):
        def variables(p):
            return {"params": p, **({"batch_stats": batch_stats} if batch_stats else {})}

        model_fn = lambda p, b: module.apply(variables(p), b["x"], train=False)[0]  # noqa: E731
        features_fn = lambda p, b: module.apply(variables(p), b["x"], train=False)[1]["pooled"]  # noqa: E731
        cv = jax.tree_util.tree_map(lambda a: a[idx], {**train, "weights": weights})
        return student_scores(model_fn, params, train, val, objective=objective,
                              curvature=curvature, curvature_data=cv,
                              features_fn=features_fn, **options)

    def scorer(state: TrainState, weights=None):
        w = jnp.ones((n,), jnp.float32) if weights is None else jnp.asarray(weights)
        scores, info = score(state.params["student"], state.batch_stats, train, val, w)
        return scores

    return scorer


# --------------------------------------------------------------------- procedures
def with_weights(data: Mapping[str, Any], weights) -> dict:
    """A copy of the training data dict with ``"weights"`` set (``None`` removes it)."""
    out = {k: v for k, v in data.items() if k != "weights"}
    if weights is not None:
        w = jnp.asarray(weights, jnp.float32)
        n = jax.tree_util.tree_leaves(out)[0].shape[0]
        if w.shape != (n,):
            raise ValueError(f"weights must have shape ({n},) (one per training example), "
                             f"got {w.shape}.")
        out["weights"] = w
    return out


def one_shot(distiller: Distiller, init_state: TrainState, teacher_vars, data, scorer, *,
             mapping: str = "exp_minmax", temperature: float = 1.0,
             uniform_state: TrainState | None = None, checkpoint_dir: str | None = None,
             **fit_kwargs):
    """KD-AIF one-shot: uniform training, scoring, retraining with fixed weights.

    1. ``uniform_state`` (or a fresh ``fit`` from ``init_state`` with uniform weights);
    2. ``scores = scorer(uniform_state)``, ``w = influence_weights(scores, mapping)``;
    3. ``fit`` again from ``init_state`` (same initialisation and batch order) on
       ``data["weights"] = w``.

    Returns ``(state, best, history, weights, scores)`` of the weighted run. With
    ``checkpoint_dir`` the stages checkpoint to ``uniform/`` and ``weighted/``.
    """
    check_choice(mapping, "mapping", WEIGHT_MAPPINGS)
    ck = (lambda name: Checkpointer(os.path.join(checkpoint_dir, name))) if checkpoint_dir \
        else (lambda name: None)
    copy = lambda: jax.tree_util.tree_map(jnp.copy, init_state)  # noqa: E731 (fit donates)
    if uniform_state is None:
        uniform_state = fit(distiller, copy(), teacher_vars, with_weights(data, None),
                            checkpointer=ck("uniform"), **fit_kwargs).state
    scores = scorer(uniform_state)
    weights = influence_weights(scores, mapping, temperature)
    res = fit(distiller, copy(), teacher_vars, with_weights(data, weights),
              checkpointer=ck("weighted"), **fit_kwargs)
    return res.state, res.best[0], res.history, weights, scores


def _atomic_save_npy(path, array):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp.npy"
    np.save(tmp, np.asarray(array))
    os.replace(tmp, path)


def fit_periodic(distiller: Distiller, state: TrainState, teacher_vars, data, scorer, *,
                 epochs: int, rescore_every: int, mapping: str = "exp_minmax",
                 temperature: float = 1.0, checkpoint_dir: str | None = None,
                 **fit_kwargs):
    """KD-AIF with periodic re-scoring: weights recomputed every ``rescore_every`` epochs.

    Epochs ``[0, K)`` use uniform weights; before epoch ``cK`` (``c >= 1``) the current
    student is scored (:func:`make_scorer`, curvature of the currently weighted
    objective) and ``data["weights"] = influence_weights(scores, mapping)`` replaces the
    previous weights (they are not multiplied). Training continues from the same state:
    the optimiser state (step count, schedule) and the epoch keys ``fold_in(seed_key,
    epoch)`` carry on, so the run equals one long run whose data weights change at
    epochs ``K, 2K, ...``.

    Resume: with ``checkpoint_dir``, chunk ``c`` checkpoints to ``chunk_<c>/`` (its first
    checkpoint is the chunk's starting state, so ``fit`` resumes with the right epoch
    count) and its weights go to ``weights_<c>.npy`` before training; a restarted call
    reloads them, replays nothing that finished and gives the same result.

    Returns ``(state, best, history, weights_log)``; ``best`` is the best over all
    chunks on ``evaluation.select_on`` (as in :func:`kdjax.train.fit`), ``weights_log`` a
    list of ``(epoch, weights)`` (``weights`` None for the uniform start).
    """
    check_choice(mapping, "mapping", WEIGHT_MAPPINGS)
    if isinstance(rescore_every, bool) or int(rescore_every) < 1:
        raise ValueError(f"rescore_every must be an integer >= 1, got {rescore_every!r}.")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    if num_seeds_of(state):
        raise ValueError("fit_periodic trains one seed (weights differ per seed); "
                         "got a state with a leading seed axis.")
    evaluation = fit_kwargs.get("evaluation")
    select_on = evaluation.select_on if evaluation is not None else None
    k = int(rescore_every)
    weights, log, history, best = None, [], [], None
    for c, start in enumerate(range(0, epochs, k)):
        end = min(start + k, epochs)
        ck = None
        if checkpoint_dir is not None:
            ck = Checkpointer(os.path.join(checkpoint_dir, f"chunk_{c}"))
            if not ck.steps():   # the chunk's start, so that fit resumes from epoch `start`
                ck.save(start, {"state": state, "best": [{
                    "params": state.params["student"], "batch_stats": state.batch_stats}]},
                    {"history": [], "best": [{"value": -np.inf, "epoch": -1,
                                              "metrics": None}]})
        if c > 0:
            wpath = checkpoint_dir and os.path.join(checkpoint_dir, f"weights_{c}.npy")
            if wpath and os.path.exists(wpath):
                weights = jnp.asarray(np.load(wpath))
            else:
                weights = influence_weights(scorer(state, weights), mapping, temperature)
                if wpath:
                    _atomic_save_npy(wpath, weights)
        log.append((start, weights))
        state, b, h = _fit_chunk(distiller, state, teacher_vars, with_weights(data, weights),
                                 start, end, ck, fit_kwargs)
        history += [r for r in h if r["epoch"] > start]
        if best is None or select_on is None or b["value"] > best["value"]:
            best = b
    return state, best, history, log


def _fit_chunk(distiller, state, teacher_vars, data, start, end, ck, fit_kwargs):
    """``fit`` for epochs ``[start, end)``: with a checkpointer (whose first checkpoint is
    the chunk's start) up to ``end``; without, ``end - start`` epochs, labels offset."""
    if ck is not None:
        res = fit(distiller, state, teacher_vars, data, epochs=end, checkpointer=ck,
                  **fit_kwargs)
        return res.state, res.best[0], res.history
    res = fit(distiller, state, teacher_vars, data, epochs=end - start, **fit_kwargs)
    history = [dict(r, epoch=r["epoch"] + start) for r in res.history]
    best = dict(res.best[0], epoch=res.best[0]["epoch"] + start)
    return res.state, best, history


# ---------------------------------------------------------------- data settings
def semi_supervised_data(x: np.ndarray, y: np.ndarray, labelled: np.ndarray,
                         teacher_logits: np.ndarray) -> dict[str, np.ndarray]:
    """Distillation data for the semi-supervised setting (KD-AIF sec. 4, CIFAR-4k/SVHN-1k).

    ``y`` keeps the true label where ``labelled`` and the teacher's pseudo-label
    ``argmax t_i`` elsewhere, so the true labels of unlabelled points never enter the
    data (by construction); ``label_mask = labelled`` keeps pseudo-labels out of the CE
    term (the engine's ``ce`` averages over labelled rows). The KD term uses the
    teacher's soft pseudo-labels ``teacher_logits`` on every point.
    """
    labelled = np.asarray(labelled, bool)
    y, t = np.asarray(y), np.asarray(teacher_logits, np.float32)
    if labelled.shape != y.shape or t.shape[:1] != y.shape or x.shape[:1] != y.shape:
        raise ValueError(f"x, y, labelled and teacher_logits must share the leading "
                         f"dimension, got {x.shape}, {y.shape}, {labelled.shape}, {t.shape}.")
    pseudo = np.argmax(t, axis=-1).astype(y.dtype)
    return {"x": np.asarray(x), "y": np.where(labelled, y, pseudo),
            "label_mask": labelled.astype(np.float32), "teacher_logits": t}


# ------------------------------------------------------------ the joint loop
def _split_vars(variables):
    return variables["params"], {k: v for k, v in variables.items() if k != "params"}


def _module_fns(module, rest, train):
    """``fn(params, x) -> logits`` of a kdjax module (``(logits, features)`` outputs);
    in train mode the batch statistics of ``x`` are used and their update discarded."""
    mutable = list(rest) if train else False

    def fn(p, x):
        out = module.apply({"params": p, **rest}, x, train=train, mutable=mutable)
        return (out[0] if mutable else out)[0]

    return fn


def joint_step(teacher_fn: Callable, student_fn: Callable, teacher_params, student_params,
               teacher_opt_state, student_opt_state, teacher_tx, student_tx,
               batch: Mapping[str, Any], val: Mapping[str, Any],
               labelled: Mapping[str, Any] | None, *, objective: Mapping[str, float],
               student_lr: float, teacher_ce_weight: float = 1.0):
    r"""One step of KD-AIF's joint loop: MPL teacher feedback, weighted student update.

    With ``w_i = batch["weights"]`` (influence weights, mean 1) and ``l_i`` the
    distillation loss of :func:`distill_losses` (``objective``: ``ce_weight``,
    ``kd_weight``, ``temperature``, ``ce_scale``) to the teacher's logits of ``x_i``,

    .. math::
        L_S(\theta_S;\theta_T) = \frac{1}{B}\sum_i w_i\, l_i(\theta_S;\theta_T)

    is the student's pseudo-label loss. The teacher takes the MPL feedback step
    (:func:`kdjax.recipes.mpl.mpl_step`: meta gradient of the student's validation CE
    after one look-ahead SGD step of ``student_lr`` on ``L_S``, plus
    ``teacher_ce_weight`` times its CE on ``labelled``), then the student takes its
    optimiser step on ``L_S`` to the updated teacher. The influence weights thus enter
    both the student update and, through the look-ahead, the teacher's feedback.
    Pure and jittable. Returns ``(teacher_params, student_params, teacher_opt_state,
    student_opt_state, info)`` as :func:`kdjax.recipes.mpl.mpl_step`.
    """
    x, w = batch["x"], batch["weights"].astype(jnp.float32)

    def student_loss(sp, t_logits):
        b = {**batch, "teacher_logits": t_logits}
        return jnp.mean(w * distill_losses(student_fn(sp, x), b, **objective))

    return mpl.mpl_step(teacher_fn, student_fn, teacher_params, student_params,
                        teacher_opt_state, student_opt_state, teacher_tx, student_tx,
                        {"x": x}, val, student_lr=student_lr,
                        temperature=objective["temperature"],
                        teacher_ce_weight=teacher_ce_weight, labelled=labelled, weights=w,
                        kd_weight=objective["kd_weight"], student_loss=student_loss)


def make_joint_scorer(teacher_module, student_module, train_data: Mapping[str, Any],
                      val_data: Mapping[str, Any], *, objective: Mapping[str, float],
                      curvature: str = "ggn", curvature_examples: int = 1024,
                      curvature_seed: int = 0, predict_batch: int = 512, **options):
    """``scorer(teacher_vars, student_vars, weights) -> scores [N]`` for the joint loop.

    The student is scored (:func:`student_scores`, eval mode) on the distillation loss
    to the *current* teacher's logits (eval mode, predicted in batches of
    ``predict_batch``); the curvature is that of the currently weighted objective on a
    fixed random subset of ``curvature_examples`` rows (``curvature_seed``), so a score
    is a deterministic function of the two networks and the weights. Jitted once.
    """
    train, val, n, idx = _scorer_data(train_data, val_data, curvature,
                                      curvature_examples, curvature_seed)
    obj = functools.partial(distill_losses, **objective)

    @jax.jit
    def score(teacher_vars, student_vars, train, val, weights):
        tfn = _module_fns(teacher_module, _split_vars(teacher_vars)[1], train=False)
        tp = teacher_vars["params"]
        t_logits = jax.lax.map(lambda xi: tfn(tp, xi[None])[0], train["x"],
                               batch_size=min(predict_batch, n))
        tr = {**train, "teacher_logits": t_logits}
        sp, rest = _split_vars(student_vars)
        out = lambda p, b: student_module.apply({"params": p, **rest}, b["x"],  # noqa: E731
                                                train=False)
        cv = jax.tree_util.tree_map(lambda a: a[idx], {**tr, "weights": weights})
        return student_scores(lambda p, b: out(p, b)[0], sp, tr, val, objective=obj,
                              curvature=curvature, curvature_data=cv,
                              features_fn=lambda p, b: out(p, b)[1]["pooled"],
                              **options)[0]

    return lambda tv, sv, weights: score(tv, sv, train, val, jnp.asarray(weights))


@flax.struct.dataclass
class JointState:
    """The joint loop's state (the epoch loop's ``seed_key`` / ``epoch`` convention)."""

    teacher: Any
    student: Any
    student_rest: Any
    teacher_opt: Any
    student_opt: Any
    seed_key: jax.Array
    epoch: jax.Array


class JointResult(NamedTuple):
    """What :func:`fit_joint` returns.

    Attributes:
      teacher_vars, student_vars: the final networks (flax variables).
      best: the student with the best ``select_fn`` value over the epochs (the last
        one if no ``select_fn``), as :func:`kdjax.train.fit`'s best record: ``{"epoch",
        "value", "params", "batch_stats"}``.
      weights_log: ``[(epoch, weights [N])]``, the weights in force from that epoch.
      timing: ``{"epoch_s": [...], "rescore_s": [...]}`` wall seconds (after the first
        epoch's compile; the first entry of each includes compilation).
      history: per epoch ``{"epoch", "val_before", "val_after", "select"}`` (the
        student's validation CE before/after the look-ahead, mean over the epoch).
    """

    teacher_vars: Any
    student_vars: Any
    best: dict
    weights_log: list
    timing: dict
    history: list

    def overhead(self) -> dict:
        """Median seconds per epoch and per re-scoring, first (compiling) one dropped."""
        med = lambda v: float(np.median(v[1:] or v)) if v else float("nan")  # noqa: E731
        return {"epoch_s": med(self.timing["epoch_s"]),
                "rescore_s": med(self.timing["rescore_s"])}


def _copy(tree):
    return jax.tree_util.tree_map(jnp.copy, tree)


def fit_joint(teacher: tuple[Any, Any], student: tuple[Any, Any],
              data: Mapping[str, Any], val: Mapping[str, Any], *, key: jax.Array,
              epochs: int, batch_size: int, teacher_tx: optax.GradientTransformation,
              student_tx: optax.GradientTransformation, student_lr: float,
              objective: Mapping[str, float], teacher_ce_weight: float = 1.0,
              labelled: Mapping[str, Any] | None = None, scorer: Callable | None = None,
              rescore_every: int = 1, mapping: str = "exp_minmax",
              weight_temperature: float = 1.0, select_fn: Callable | None = None
              ) -> JointResult:
    r"""KD-AIF's joint teacher-student loop (arXiv 2501.02705, sec. 3, semi-supervised).

    ``teacher`` and ``student`` are ``(module, variables)`` pairs of kdjax modules
    (``apply(variables, x, train) -> (logits, features)``). The epochs are run by
    :func:`kdjax.train.epoch.make_epoch` (loop mode: one compiled step): each walks a
    fresh permutation of ``data`` (drawn from ``fold_in(fold_in(key, epoch), 0)``, drop
    remainder) in batches of ``batch_size``; each step is :func:`joint_step` (teacher:
    MPL feedback + CE on ``labelled``; student: influence-weighted pseudo-label loss to
    the updated teacher). Before epoch ``cK`` (``K = rescore_every``, ``c >= 1``) the *current*
    student is re-scored by ``scorer(teacher_vars, student_vars, weights)``
    (:func:`make_joint_scorer`) and the weights become ``influence_weights(scores,
    mapping, weight_temperature)`` (replaced, not multiplied); epochs ``[0, K)`` use
    uniform weights, and ``scorer=None`` keeps them uniform throughout (plain MPL with
    the distillation objective). The reported student is this loop's student.

    Networks: the teacher runs in eval mode (its BatchNorm statistics stay those it
    came with; MPL updates only its parameters); the student runs in train mode, and
    its BatchNorm running statistics are updated from the forward pass of each real
    student step. Deterministic given ``key``; not resumable (no checkpoints).

    Args:
      teacher, student: ``(module, variables)``.
      data: training dict ``x``, ``y``, optional ``label_mask`` (``[N, ...]``); any
        ``weights`` or ``teacher_logits`` are ignored (the loop sets both).
      val: labelled dict ``x``, ``y``: the MPL meta signal (and, through ``scorer``,
        the influence target).
      key: PRNG key of the batch order.
      epochs, batch_size: loop length and batch size.
      teacher_tx, student_tx: optax optimisers.
      student_lr: ``eta`` of the look-ahead step.
      objective: :func:`distill_losses` options (``ce_weight``, ``kd_weight``,
        ``temperature``, ``ce_scale``).
      teacher_ce_weight: weight of the teacher's supervised CE.
      labelled: the teacher's supervised data (default ``val``).
      scorer, rescore_every, mapping, weight_temperature: the re-scoring.
      select_fn: optional ``student_vars -> float`` (higher is better), evaluated after
        every epoch for model selection.

    Returns:
      :class:`JointResult`.
    """
    for name, v in (("epochs", epochs), ("batch_size", batch_size),
                    ("rescore_every", rescore_every)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}.")
    check_positive(student_lr, "student_lr")
    check_choice(mapping, "mapping", WEIGHT_MAPPINGS)
    missing = sorted({"ce_weight", "kd_weight", "temperature"} - set(objective))
    if missing:
        raise ValueError(f"objective must have keys ce_weight, kd_weight, temperature "
                         f"(and optionally ce_scale), missing {missing}.")
    data = {k: jnp.asarray(v) for k, v in data.items()
            if k not in ("weights", "teacher_logits")}
    n = data["x"].shape[0]
    if batch_size > n:
        raise ValueError(f"batch_size must be <= the number of training examples ({n}), "
                         f"got {batch_size}.")
    val = {k: jnp.asarray(v) for k, v in val.items()}
    labelled = None if labelled is None else {k: jnp.asarray(v) for k, v in labelled.items()}
    (t_mod, t_vars), (s_mod, s_vars) = teacher, student
    tp, t_rest = _split_vars(t_vars)
    sp, s_rest = _split_vars(s_vars)
    tfn = _module_fns(t_mod, t_rest, train=False)
    objective = dict(objective)

    def step(st: JointState, consts, batch, rng):
        del rng                                   # the joint step is deterministic
        val, labelled = consts
        sfn = _module_fns(s_mod, st.student_rest, train=True)
        new_rest = st.student_rest
        if new_rest:  # running statistics from the forward pass at the pre-update params
            new_rest = dict(s_mod.apply({"params": st.student, **new_rest}, batch["x"],
                                        train=True, mutable=list(new_rest))[1])
        tp, sp, ts, ss, info = joint_step(
            tfn, sfn, st.teacher, st.student, st.teacher_opt, st.student_opt, teacher_tx,
            student_tx, batch, val, labelled, objective=objective, student_lr=student_lr,
            teacher_ce_weight=teacher_ce_weight)
        return (st.replace(teacher=tp, student=sp, student_rest=new_rest, teacher_opt=ts,
                           student_opt=ss), (info["val_before"], info["val_after"]))

    run_epoch = make_epoch(step, batch_size, mode="loop")
    state = JointState(teacher=_copy(tp), student=_copy(sp), student_rest=_copy(s_rest),
                       teacher_opt=teacher_tx.init(tp), student_opt=student_tx.init(sp),
                       seed_key=key, epoch=jnp.zeros((), jnp.int32))
    weights = jnp.ones((n,), jnp.float32)
    log, history = [(0, None)], []
    timing = {"epoch_s": [], "rescore_s": []}
    best = None
    for epoch in range(int(epochs)):
        if scorer is not None and epoch > 0 and epoch % rescore_every == 0:
            t0 = time.perf_counter()
            scores = scorer({"params": state.teacher, **t_rest},
                            {"params": state.student, **state.student_rest}, weights)
            weights = jax.block_until_ready(
                influence_weights(scores, mapping, weight_temperature))
            timing["rescore_s"].append(time.perf_counter() - t0)
            log.append((epoch, np.asarray(weights)))
        t0 = time.perf_counter()
        state, (before, after) = run_epoch(state, (val, labelled),
                                           {**data, "weights": weights})
        jax.block_until_ready(state.student)
        timing["epoch_s"].append(time.perf_counter() - t0)
        s_now = {"params": state.student, **state.student_rest}
        value = None if select_fn is None else float(select_fn(s_now))
        history.append({"epoch": epoch + 1, "val_before": float(before),
                        "val_after": float(after), "select": value})
        if best is None or select_fn is None or value > best["value"]:
            best = {"epoch": epoch + 1, "value": value, "params": _copy(state.student),
                    "batch_stats": _copy(state.student_rest.get("batch_stats", {}))}
    tp, sp, s_rest = state.teacher, state.student, state.student_rest
    return JointResult({"params": tp, **t_rest}, {"params": sp, **s_rest}, best, log,
                       timing, history)


PROCEDURES = ("uniform", "oneshot_exp", "oneshot_sigmoid", "periodic_exp",
              "periodic_sigmoid")


def mapping_of(run: str) -> str | None:
    """The weight mapping a run name ends with: ``"<kind>_exp"`` -> ``"exp_minmax"``,
    ``"<kind>_sigmoid"`` -> ``"sigmoid"``, else ``None`` (uniform weights)."""
    return {"exp": "exp_minmax", "sigmoid": "sigmoid"}.get(run.rpartition("_")[2])


def frozen_teacher_run(name: str, distiller: Distiller, init: Callable[[], TrainState],
                       data, val, *, objective: Mapping[str, float],
                       scorer_options: Mapping[str, Any], epochs: int, rescore_every: int,
                       temperature: float = 1.0, checkpoint_dir: str, **fit_kwargs):
    """One frozen-teacher procedure by name: ``(best record, weights [N] or None)``.

    The influence scorer is :func:`make_scorer` on ``data`` / ``val`` with
    :func:`distill_losses` (``objective`` options) and ``scorer_options``.

    ``name`` is one of :data:`PROCEDURES`: ``uniform`` (:func:`kdjax.train.fit`, w = 1),
    ``oneshot_<m>`` (:func:`one_shot` from the uniform run's final state) or
    ``periodic_<m>`` (:func:`fit_periodic`), ``m`` = ``exp`` (``exp_minmax``) or
    ``sigmoid``. ``init()`` returns a fresh initial state (``fit`` donates its state);
    the uniform run checkpoints to ``checkpoint_dir/uniform`` (a one-shot run reloads
    it), the others to ``checkpoint_dir/<name>``. ``weights`` are the last ones used
    (None for uniform).
    """
    check_choice(name, "name", PROCEDURES)
    kind, mapping = name.partition("_")[0], mapping_of(name)
    own = os.path.join(checkpoint_dir, name)
    scorer = make_scorer(distiller, data, val, objective=functools.partial(
        distill_losses, **objective), **scorer_options)
    if kind == "periodic":
        _, best, _, log = fit_periodic(distiller, init(), None, data, scorer, epochs=epochs,
                                       rescore_every=rescore_every, mapping=mapping,
                                       temperature=temperature, checkpoint_dir=own,
                                       **fit_kwargs)
        return best, log[-1][1]
    uni = fit(distiller, init(), None, with_weights(data, None), epochs=epochs,
              checkpointer=Checkpointer(os.path.join(checkpoint_dir, "uniform")),
              **fit_kwargs)
    if kind == "uniform":
        return uni.best[0], None
    _, best, _, w, _ = one_shot(distiller, init(), None, data, scorer, mapping=mapping,
                                temperature=temperature, uniform_state=uni.state,
                                checkpoint_dir=own, epochs=epochs, **fit_kwargs)
    return best, w
