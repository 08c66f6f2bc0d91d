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

Procedures (all compose :func:`kdjax.train.fit`; the weights live in ``data["weights"]``):

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
* :func:`mpl_teacher_grad` / :func:`mpl_step` / :func:`fit_mpl` (d): meta-pseudo-label
  teacher update from the student's validation loss after one student step (Pham et
  al. 2021), as KD-AIF updates the teacher with the student in the semi-supervised
  setting.

Conventions: ``loss_fn(params, batch) -> [B]`` per-example losses, as in
:mod:`kdjax.influence`; networks run in eval mode (BatchNorm running statistics) while
scoring, so examples are independent.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax import losses
from kdjax._checks import check_choice, check_positive
from kdjax.influence import (WEIGHT_MAPPINGS, ggn_vp, hvp, influence_weights, inverse_hvp,
                             per_example_jvp)
from kdjax.train.checkpoint import Checkpointer
from kdjax.train.engine import Distiller, TrainState
from kdjax.train.loop import fit, num_seeds_of

__all__ = [
    "CURVATURES",
    "distill_losses",
    "val_losses",
    "student_scores",
    "make_scorer",
    "with_weights",
    "one_shot",
    "fit_periodic",
    "semi_supervised_data",
    "corrupt_teacher_logits",
    "flip_labels",
    "mpl_teacher_grad",
    "mpl_step",
    "fit_mpl",
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
                   damping: float = 0.01, method: str | None = None, maxiter: int = 100,
                   tol: float = 1e-5, chunk_size: int = 1024):
    r"""KD-AIF influence of every training point on the validation loss, ``[N]``.

    .. math::
        g = \nabla_\theta \tfrac{1}{M}\textstyle\sum_j \ell^{val}_j,\quad
        s = (G + \lambda I)^{-1} g,\quad
        \mathcal{I}_i = -\nabla_\theta l_i^\top s

    (Koh & Liang 2017 eq. 2; KD-AIF sec. 3) with ``l_i = objective(model_fn(params,
    x_i), batch_i)`` (the *unweighted* distillation loss: up-weighting ``z_i`` by
    ``epsilon`` adds ``epsilon l_i``) and ``G`` the curvature of the training objective
    ``mean_i w_i l_i`` on ``curvature_data`` (``w_i = batch["weights"]`` if present,
    else 1). Unlike :func:`kdjax.influence.influence_scores` the validation loss may
    differ from the training loss (CE on labels vs the KD objective).

    Curvatures:

    * ``"ggn"`` (default): Gauss-Newton ``J^T H_out J`` of the network
      (:func:`kdjax.influence.ggn_vp`), PSD, solved by damped CG (``method="cg"``).
    * ``"last_layer"``: only the classifier ``params["head"]`` (``kernel``, ``bias``) is
      treated as variable, on frozen features ``features_fn(params, batch) ->
      [B, D]`` (the ``"pooled"`` embedding). The objective is convex in the head, its
      exact Hessian (:func:`kdjax.influence.hvp`) equals its GGN, and with ``C (D + 1)``
      parameters it is solved densely (``method="dense"``). Cheap, ignores the body.

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
        ``"dense"`` for the last layer).
      maxiter, tol: CG options.
      chunk_size: examples per chunk of the scoring JVP.

    Returns:
      ``(scores [N], info)``; ``info`` holds the solver diagnostics and ``||g||``.
    """
    check_choice(curvature, "curvature", CURVATURES)
    curvature_data = train_data if curvature_data is None else curvature_data

    def weighted(obj):
        def fn(logits, batch):
            out = obj(logits, batch)
            return out * batch["weights"].astype(out.dtype) if "weights" in batch else out
        return fn

    if curvature == "ggn":
        theta = params
        mfn = model_fn
        tr, cv, va = train_data, curvature_data, val_data
    else:
        if features_fn is None:
            raise ValueError("curvature='last_layer' needs features_fn(params, batch) -> "
                             "[B, D] (the frozen embedding that feeds params['head']).")
        if not (isinstance(params, Mapping) and "head" in params):
            raise ValueError("curvature='last_layer' needs a params dict with a 'head' "
                             f"entry (kernel, bias), got keys {list(params)}.")
        theta = params["head"]
        mfn = _head_logits
        add = lambda d: {**d, "pooled": jax.lax.stop_gradient(features_fn(params, d))}  # noqa: E731
        tr, cv, va = add(train_data), add(curvature_data), add(val_data)
    method = method or ("cg" if curvature == "ggn" else "dense")

    g_val = jax.grad(lambda p: jnp.mean(val_objective(mfn(p, va), va)))(theta)
    if curvature == "ggn":
        matvec = lambda v: ggn_vp(mfn, weighted(objective), theta, cv, v)  # noqa: E731
    else:
        matvec = lambda v: hvp(lambda p, b: weighted(objective)(mfn(p, b), b),  # noqa: E731
                               theta, cv, v)
    opts = {"tol": tol, "maxiter": maxiter} if method == "cg" else {}
    s, diag = inverse_hvp(matvec, g_val, method, damping, **opts)
    d = per_example_jvp(lambda p, b: objective(mfn(p, b), b), theta, tr, s,
                        chunk_size=chunk_size)
    return -d, {"inverse_hvp": diag, "val_grad_norm": optax.tree_utils.tree_norm(g_val)}


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
    check_choice(curvature, "curvature", CURVATURES)
    train = {k: jnp.asarray(v) for k, v in train_data.items() if k != "weights"}
    val = {k: jnp.asarray(v) for k, v in val_data.items()}
    n = train["x"].shape[0]
    idx = np.sort(np.random.default_rng(curvature_seed).permutation(n)[
        :min(curvature_examples, n)])
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


def flip_labels(y: np.ndarray, fraction: float, num_classes: int, seed: int = 0):
    """Flips a random ``fraction`` of labels to a uniformly drawn *other* class.

    Returns ``(noisy_y, flipped_mask)``.
    """
    rng = np.random.default_rng(seed)
    n = len(y)
    mask = np.zeros(n, bool)
    mask[rng.permutation(n)[:int(round(fraction * n))]] = True
    shift = rng.integers(1, num_classes, n)
    return np.where(mask, (y + shift) % num_classes, y).astype(y.dtype), mask


def corrupt_teacher_logits(logits: np.ndarray, fraction: float, seed: int = 0):
    """A noisy teacher on a random ``fraction`` of points: their logit vector is rolled by
    a random non-zero number of classes (the confident class moves to another class).

    Returns ``(noisy_logits, corrupted_mask)``.
    """
    rng = np.random.default_rng(seed)
    n, c = logits.shape
    mask = np.zeros(n, bool)
    mask[rng.permutation(n)[:int(round(fraction * n))]] = True
    shift = rng.integers(1, c, n)
    cols = (np.arange(c)[None, :] - shift[:, None]) % c
    rolled = np.take_along_axis(logits, cols, axis=1)
    return np.where(mask[:, None], rolled, logits).astype(logits.dtype), mask


# ------------------------------------------------------------ meta pseudo labels
def mpl_teacher_grad(teacher_fn: Callable, student_fn: Callable, teacher_params,
                     student_params, unlabelled: Mapping[str, Any],
                     val: Mapping[str, Any], *, student_lr: float,
                     temperature: float = 1.0):
    r"""Teacher gradient from the student's validation loss after one student step.

    Meta Pseudo Labels (Pham et al., CVPR 2021, sec. 3 and appendix A), as KD-AIF uses it
    to update the teacher with the student. One SGD look-ahead step of the student on the
    teacher's soft pseudo-labels of an unlabelled batch,

    .. math::
        \theta_S' = \theta_S - \eta\, g(\theta_T), \quad
        g(\theta_T) = \nabla_{\theta_S} \tau^2\, \overline{\mathrm{KL}}\big(
                      p^\tau_T(x_u;\theta_T) \,\|\, p^\tau_S(x_u;\theta_S)\big),

    and the teacher minimises ``R(theta_T) = L_val(theta_S')``. With ``v = grad
    L_val(theta_S')`` and ``d_ic = d/dt log p^tau_S(x_i; theta_S + t v)_c`` (one JVP of
    the student at ``theta_S``),

    .. math::
        \nabla_{\theta_T} R = -\eta\, \Big(\frac{\partial g}{\partial\theta_T}\Big)^\top v
        = \nabla_{\theta_T}\Big[\eta\,\tau^2\,\frac{1}{B}\sum_{i,c}
           p^\tau_T(x_i;\theta_T)_c\; \mathrm{sg}(d_{ic})\Big],

    because only the cross-entropy part ``-sum_c p_T log p_S`` of the KL depends on both.
    This is the first-order MPL approximation: the student's whole future is truncated
    to *one* plain-SGD step (the student's real optimiser is ignored) and no student
    Hessian is formed; for that one step the gradient is exact (MPL's REINFORCE form
    ``h * grad CE(y_hat, T)`` with ``h = eta v^T grad_S CE(y_hat, S)`` is the hard-label,
    sampled version of the same quantity). Reading: ``d_ic > 0`` means a student step
    towards class ``c`` on ``x_i`` moves along ``+v``, i.e. *raises* the validation loss,
    so the teacher step ``theta_T - alpha grad R`` lowers ``p_T(c | x_i)`` there.

    Args:
      teacher_fn, student_fn: ``(params, x) -> logits``.
      teacher_params, student_params: pytrees.
      unlabelled: dict with ``x`` (the student's look-ahead batch).
      val: labelled dict with ``x``, ``y`` (the validation loss ``mean CE``).
      student_lr: ``eta > 0`` of the look-ahead step.
      temperature: ``tau`` of the KD loss.

    Returns:
      ``(grad_teacher, info)`` with ``info = {"val_before", "val_after",
      "student_params_after"}``.
    """
    check_positive(student_lr, "student_lr")
    check_positive(temperature, "temperature")
    tau = temperature
    xu = unlabelled["x"]

    def kd_loss(sp, tp):
        return losses.kd(student_fn(sp, xu), teacher_fn(tp, xu), tau)

    def val_loss(sp):
        return jnp.mean(val_losses(student_fn(sp, val["x"]), val))

    g = jax.grad(kd_loss)(student_params, jax.lax.stop_gradient(teacher_params))
    after = jax.tree_util.tree_map(lambda p, gi: p - student_lr * gi, student_params, g)
    v = jax.grad(val_loss)(after)
    log_ps = lambda sp: jax.nn.log_softmax(student_fn(sp, xu).astype(jnp.float32) / tau)  # noqa: E731
    d = jax.lax.stop_gradient(jax.jvp(log_ps, (student_params,), (v,))[1])  # [B, C]

    def meta(tp):
        pt = jax.nn.softmax(teacher_fn(tp, xu).astype(jnp.float32) / tau)
        return student_lr * tau ** 2 * jnp.mean(jnp.sum(pt * d, axis=-1))

    grad = jax.grad(meta)(teacher_params)
    return grad, {"val_before": val_loss(student_params), "val_after": val_loss(after),
                  "student_params_after": after}


def mpl_step(teacher_fn: Callable, student_fn: Callable, teacher_params, student_params,
             teacher_opt_state, student_opt_state, teacher_tx: optax.GradientTransformation,
             student_tx: optax.GradientTransformation, unlabelled, val, *,
             student_lr: float, temperature: float = 1.0, teacher_ce_weight: float = 1.0,
             labelled: Mapping[str, Any] | None = None):
    """One joint MPL step: teacher update (meta gradient + supervised CE) then student.

    The teacher's gradient is :func:`mpl_teacher_grad` (the student's loss on ``val``
    after a look-ahead step) plus ``teacher_ce_weight`` times the gradient of the
    teacher's own CE on the labelled batch ``labelled`` (default ``val``; MPL keeps the
    teacher's supervised loss); the student then takes its optimiser step on the KD loss
    to the *updated* teacher's soft pseudo-labels of ``unlabelled`` (MPL's order). Pure
    and jittable; returns ``(teacher_params, student_params, teacher_opt_state,
    student_opt_state, info)``.
    """
    g_meta, info = mpl_teacher_grad(teacher_fn, student_fn, teacher_params, student_params,
                                    unlabelled, val, student_lr=student_lr,
                                    temperature=temperature)
    sup = val if labelled is None else labelled
    g_ce = jax.grad(lambda tp: jnp.mean(val_losses(teacher_fn(tp, sup["x"]), sup)))(
        teacher_params)
    g_t = jax.tree_util.tree_map(lambda a, b: a + teacher_ce_weight * b, g_meta, g_ce)
    upd, teacher_opt_state = teacher_tx.update(g_t, teacher_opt_state, teacher_params)
    teacher_params = optax.apply_updates(teacher_params, upd)
    t = jax.lax.stop_gradient(teacher_fn(teacher_params, unlabelled["x"]))
    g_s = jax.grad(lambda sp: losses.kd(student_fn(sp, unlabelled["x"]), t, temperature))(
        student_params)
    upd, student_opt_state = student_tx.update(g_s, student_opt_state, student_params)
    student_params = optax.apply_updates(student_params, upd)
    return teacher_params, student_params, teacher_opt_state, student_opt_state, info


def fit_mpl(teacher_fn: Callable, student_fn: Callable, teacher_params, student_params,
            unlabelled_x, val: Mapping[str, Any], *, key: jax.Array, steps: int,
            batch_size: int, teacher_tx: optax.GradientTransformation,
            student_tx: optax.GradientTransformation, student_lr: float,
            temperature: float = 1.0, teacher_ce_weight: float = 1.0,
            labelled: Mapping[str, Any] | None = None):
    r"""``steps`` joint MPL steps (:func:`mpl_step`): the teacher learns from the student.

    Step ``k`` draws an unlabelled batch of ``batch_size`` rows of ``unlabelled_x``
    (without replacement within the batch) with ``jax.random.fold_in(key, k)``; the
    meta signal is the student's mean CE on the whole ``val`` dict after its look-ahead
    step (:func:`mpl_teacher_grad`, first-order MPL), the teacher's supervised CE is on
    the whole ``labelled`` dict (default ``val``). One jitted step, a Python loop over
    steps (the conv-friendly mode on XLA:CPU); deterministic given ``key``.

    Returns ``(teacher_params, student_params, log)`` with ``log`` a dict of ``[steps]``
    arrays: ``val_before`` / ``val_after`` (the student's validation loss before and
    after the look-ahead step on the *pre-update* teacher).
    """
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}.")
    check_positive(student_lr, "student_lr")
    unlabelled_x = jnp.asarray(unlabelled_x)
    n = unlabelled_x.shape[0]
    if batch_size > n:
        raise ValueError(f"batch_size must be <= the number of unlabelled examples ({n}), "
                         f"got {batch_size}.")
    val = {k: jnp.asarray(v) for k, v in val.items()}
    labelled = None if labelled is None else {k: jnp.asarray(v) for k, v in labelled.items()}

    @jax.jit
    def step(k, tp, sp, ts, ss, xs, val, labelled):
        idx = jax.random.choice(jax.random.fold_in(key, k), n, (batch_size,), replace=False)
        tp, sp, ts, ss, info = mpl_step(
            teacher_fn, student_fn, tp, sp, ts, ss, teacher_tx, student_tx,
            {"x": xs[idx]}, val, student_lr=student_lr, temperature=temperature,
            teacher_ce_weight=teacher_ce_weight, labelled=labelled)
        return tp, sp, ts, ss, info["val_before"], info["val_after"]

    tp, sp = teacher_params, student_params
    ts, ss = teacher_tx.init(tp), student_tx.init(sp)
    before, after = [], []
    for k in range(int(steps)):
        tp, sp, ts, ss, vb, va = step(k, tp, sp, ts, ss, unlabelled_x, val, labelled)
        before.append(vb)
        after.append(va)
    return tp, sp, {"val_before": np.asarray(jnp.stack(before)),
                    "val_after": np.asarray(jnp.stack(after))}
