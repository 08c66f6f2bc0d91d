"""Registry entries for the classic KD zoo (METHODS.md section 1).

Each method wraps a pure loss of :mod:`kdjax.losses` for the training engine: it picks
features by name from ``(logits, features)`` outputs, applies its adapters
(:mod:`kdjax.models.adapters`, parameters created by ``init`` from example outputs),
stops gradients into the teacher and honours ``batch["weights"]`` where the loss is
per-example. Default weights are RepDistiller's (resnet32x4 -> resnet8x4) and
mdistiller's (DKD).

Feature selection (``pairs``: a list of ``[student_feature, teacher_feature]``):
``None`` picks defaults from the outputs' feature dicts: ``"all"`` methods (AT, NST,
VID, AB, FSP: RepDistiller uses every stage) take every feature name present in both
with a spatial rank (3 or 4) except ``"pooled"``; ``"last"`` methods (FitNet, SP, FT)
take the last such name in sorted order (RepDistiller's ``feat[-2]``), falling back to
``"pooled"``; embedding methods (RKD, PKT, CC, CRD) use ``[["pooled", "pooled"]]``.

Initialisation stage (AB, FT, FSP, ``pretrain_loss``): run by
:func:`kdjax.train.pretrain.pretrain` for ``pretrain_epochs`` epochs before
distillation; ``pretrain_student`` says whether the stage also trains the student's
feature layers (RepDistiller: yes for AB and FSP, no for FT); FT's ``pretrain_params``
limits the stage to its paraphraser (the translator is trained in distillation only).

DKD's linear warm-up (mdistiller: 20 epochs): option ``warmup_steps`` (0 = off); the
method then keeps its own step counter in its state and scales its loss by
``min((step + 1) / warmup_steps, 1)``, with no change to the engine.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from kdjax import losses
from kdjax.losses.feature import match_spatial
from kdjax.methods import Method, register, stateless
from kdjax.models import adapters

__all__ = ["resolve_pairs", "NAMES"]

_sg = jax.lax.stop_gradient


def _features(out, who: str) -> Mapping[str, Any]:
    if not isinstance(out, (tuple, list)) or len(out) != 2 or not isinstance(out[1], Mapping):
        raise ValueError(f"{who}_out must be a (logits, features_dict) pair, got "
                         f"{type(out).__name__}.")
    return out[1]


def _pick(out, name: str, who: str):
    feats = _features(out, who)
    if name not in feats:
        raise ValueError(f"unknown {who} feature {name!r} in 'pairs'; available {who} "
                         f"features: {sorted(feats)}.")
    return feats[name]


def resolve_pairs(pairs, student_out, teacher_out, default: str) -> list[tuple[str, str]]:
    """Validates ``pairs`` against the outputs' feature names, or picks the default.

    ``default`` is ``"all"``, ``"last"`` or ``"pooled"`` (see the module docstring).
    An unknown name raises ``ValueError`` listing the available feature names.
    """
    if pairs is None:
        fs, ft = _features(student_out, "student"), _features(teacher_out, "teacher")
        spatial = sorted(n for n in fs if n in ft and n != "pooled"
                         and jnp.ndim(fs[n]) in (3, 4) and jnp.ndim(ft[n]) in (3, 4))
        if default == "all" and spatial:
            return [(n, n) for n in spatial]
        if default == "last" and spatial:
            return [(spatial[-1], spatial[-1])]
        if default == "all":
            raise ValueError(
                "no common spatial features ([B, L, C] or [B, H, W, C]) in student and "
                f"teacher outputs: student has {sorted(fs)}, teacher has {sorted(ft)}; "
                "set 'pairs'.")
        pairs = [["pooled", "pooled"]]
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or not pairs:
        raise ValueError(f"pairs must be a non-empty list of [student_feature, "
                         f"teacher_feature], got {pairs!r}.")
    out = []
    for p in pairs:
        if isinstance(p, (str, bytes)) or len(p) != 2:
            raise ValueError(f"each entry of pairs must be [student_feature, "
                             f"teacher_feature], got {p!r}.")
        _pick(student_out, p[0], "student")
        _pick(teacher_out, p[1], "teacher")
        out.append((str(p[0]), str(p[1])))
    return out


def _weights(batch):
    return batch.get("weights") if isinstance(batch, Mapping) else None


def _pair_iter(pairs, student_out, teacher_out, default):
    for k, (sn, tn) in enumerate(resolve_pairs(pairs, student_out, teacher_out, default)):
        yield f"pair{k}", _pick(student_out, sn, "student"), _sg(_pick(teacher_out, tn,
                                                                         "teacher"))


def _split(rng, n):
    return list(jax.random.split(rng, max(n, 1)))


# --- logit methods ------------------------------------------------------------------

def _check_warmup(warmup_steps):
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"dkd: warmup_steps must be an int >= 0, got {warmup_steps!r}.")


def _dkd_init(rng, s_out, t_out, alpha, beta, temperature, standardize, warmup_steps):
    """State: the step counter of the warm-up (``None`` without warm-up)."""
    del rng, s_out, t_out, alpha, beta, temperature, standardize
    _check_warmup(warmup_steps)
    return {}, ({"step": jnp.zeros((), jnp.int32)} if warmup_steps else None)


def _dkd(params, state, s_out, t_out, batch, rng, alpha, beta, temperature, standardize,
         warmup_steps):
    """DKD; with ``warmup_steps > 0`` the loss is scaled by ``min((t + 1) / warmup_steps,
    1)`` at the method's own step ``t`` (0-based, counted in its state), mdistiller's
    linear warm-up ``min(epoch / warmup, 1)`` (epochs from 1, 20 epochs) per step:
    set ``warmup_steps = 20 * steps_per_epoch`` for the reference schedule. The term
    reported by the engine is the scaled value."""
    del params, rng
    _check_warmup(warmup_steps)
    loss = losses.dkd(s_out[0], _sg(t_out[0]), batch["y"], alpha, beta, temperature,
                      weights=_weights(batch), standardize=standardize)
    if not warmup_steps:
        return loss, state
    if not isinstance(state, Mapping) or "step" not in state:
        raise ValueError(f"dkd: warmup_steps={warmup_steps} needs the step-counter state "
                         f"from init, got state {state!r}.")
    step = state["step"]
    scale = jnp.minimum((step + 1).astype(jnp.float32) / warmup_steps, 1.0)
    return scale * loss, {"step": step + 1}


def _kd_ls(params, s_out, t_out, batch, temperature):
    del params
    return losses.kd(s_out[0], _sg(t_out[0]), temperature, weights=_weights(batch),
                     standardize=True)


def _dist(params, s_out, t_out, batch, beta, gamma, temperature):
    del params, batch
    return losses.dist(s_out[0], _sg(t_out[0]), beta, gamma, temperature)


# --- FitNet ---------------------------------------------------------------------------

def _fitnet_init(rng, s_out, t_out, pairs):
    params = {}
    for (key, fs, ft), r in zip(_pair_iter(pairs, s_out, t_out, "last"),
                                _split(rng, 64)):
        params[key] = adapters.Regressor(ft.shape[-1]).init(r, fs)["params"]
    return params, None


def _fitnet(params, s_out, t_out, batch, pairs):
    total = 0.0
    for key, fs, ft in _pair_iter(pairs, s_out, t_out, "last"):
        _check_params(params, key, "fitnet")
        reg = adapters.Regressor(ft.shape[-1]).apply({"params": params[key]}, fs)
        reg, ft = match_spatial(reg, ft)
        total = total + losses.fitnet(reg, ft, weights=_weights(batch))
    return total


def _check_params(params, key, method):
    if key not in params:
        raise ValueError(f"{method}: adapter params for {key!r} missing (got keys "
                         f"{sorted(params)}); call init with the same 'pairs'.")


# --- AT, NST, SP ----------------------------------------------------------------------

def _at(params, s_out, t_out, batch, pairs, p):
    del params
    return sum(losses.attention_transfer(fs, ft, p, weights=_weights(batch))
               for _, fs, ft in _pair_iter(pairs, s_out, t_out, "all"))


def _nst(params, s_out, t_out, batch, pairs):
    del params
    return sum(losses.nst(fs, ft, weights=_weights(batch))
               for _, fs, ft in _pair_iter(pairs, s_out, t_out, "all"))


def _sp(params, s_out, t_out, batch, pairs):
    del params, batch
    return sum(losses.similarity_preserving(fs, ft)
               for _, fs, ft in _pair_iter(pairs, s_out, t_out, "last"))


# --- embedding-head methods: CC, CRD --------------------------------------------------

def _embed_init(rng, s_out, t_out, pairs, dim):
    params = {}
    for (key, fs, ft), r in zip(_pair_iter(pairs, s_out, t_out, "pooled"), _split(rng, 64)):
        rs, rt = jax.random.split(r)
        params[key] = {"student": adapters.Embed(dim).init(rs, fs)["params"],
                       "teacher": adapters.Embed(dim).init(rt, ft)["params"]}
    return params


def _embeds(params, key, fs, ft, dim, method):
    _check_params(params, key, method)
    es = adapters.Embed(dim).apply({"params": params[key]["student"]}, fs)
    et = adapters.Embed(dim).apply({"params": params[key]["teacher"]}, ft)
    return es, et


def _cc_init(rng, s_out, t_out, pairs, dim, variant, gamma, order):
    del variant, gamma, order
    return _embed_init(rng, s_out, t_out, pairs, dim), None


def _cc(params, s_out, t_out, batch, pairs, dim, variant, gamma, order):
    del batch
    total = 0.0
    for key, fs, ft in _pair_iter(pairs, s_out, t_out, "pooled"):
        es, et = _embeds(params, key, fs, ft, dim, "cc")
        total = total + losses.correlation_congruence(es, et, variant, gamma, order)
    return total


def _crd_init(rng, s_out, t_out, pairs, dim, temperature, queue_size):
    del temperature
    r_params, r_queue = jax.random.split(rng)
    params = _embed_init(r_params, s_out, t_out, pairs, dim)
    state = None
    if queue_size:
        state = {key: losses.init_crd_queue(r, int(queue_size), int(dim))
                 for key, r in zip(params, _split(r_queue, len(params)))}
    return params, state


def _crd(params, state, s_out, t_out, batch, rng, pairs, dim, temperature, queue_size):
    del rng
    total, new_state = 0.0, {}
    for key, fs, ft in _pair_iter(pairs, s_out, t_out, "pooled"):
        es, et = _embeds(params, key, fs, ft, dim, "crd")
        if queue_size:
            if state is None or key not in state:
                raise ValueError(f"crd: queue state for {key!r} missing; call init "
                                 f"(queue_size={queue_size}).")
            loss, new_state[key] = losses.crd_queue(es, et, state[key], temperature,
                                                    weights=_weights(batch))
        else:
            loss = losses.crd(es, et, temperature, weights=_weights(batch))
        total = total + loss
    return total, (new_state if queue_size else state)


# --- VID ------------------------------------------------------------------------------

def _vid_init(rng, s_out, t_out, pairs, init_variance, eps):
    params = {}
    for (key, fs, ft), r in zip(_pair_iter(pairs, s_out, t_out, "all"), _split(rng, 64)):
        head = adapters.VIDHead(ft.shape[-1], init_variance=init_variance, eps=eps)
        params[key] = head.init(r, fs)["params"]
    return params, None


def _vid(params, s_out, t_out, batch, pairs, init_variance, eps):
    total = 0.0
    for key, fs, ft in _pair_iter(pairs, s_out, t_out, "all"):
        _check_params(params, key, "vid")
        head = adapters.VIDHead(ft.shape[-1], init_variance=init_variance, eps=eps)
        mean, log_scale = head.apply({"params": params[key]}, fs)
        mean, ft = match_spatial(mean, ft)
        total = total + losses.vid(mean, ft, log_scale, eps, weights=_weights(batch))
    return total


# --- RKD, PKT ------------------------------------------------------------------------

def _rkd(params, s_out, t_out, batch, pairs, distance_weight, angle_weight):
    del params, batch
    return sum(losses.rkd(fs, ft, distance_weight, angle_weight)
               for _, fs, ft in _pair_iter(pairs, s_out, t_out, "pooled"))


def _pkt(params, s_out, t_out, batch, pairs):
    del params, batch
    return sum(losses.pkt(fs, ft) for _, fs, ft in _pair_iter(pairs, s_out, t_out, "pooled"))


# --- AB -------------------------------------------------------------------------------

def _ab_init(rng, s_out, t_out, pairs, margin, pretrain_epochs, pretrain_student):
    del margin, pretrain_epochs, pretrain_student
    params = {}
    for (key, fs, ft), r in zip(_pair_iter(pairs, s_out, t_out, "all"), _split(rng, 64)):
        params[key] = adapters.ABConnector(ft.shape[-1]).init(r, fs)["params"]
    return params, None


def _ab(params, s_out, t_out, batch, pairs, margin, pretrain_epochs, pretrain_student):
    del pretrain_epochs, pretrain_student
    items = list(_pair_iter(pairs, s_out, t_out, "all"))
    n = len(items)
    total = 0.0
    for i, (key, fs, ft) in enumerate(items):
        _check_params(params, key, "ab")
        src = adapters.ABConnector(ft.shape[-1]).apply({"params": params[key]}, fs)
        src, ft = match_spatial(src, ft)
        layer_weight = 2.0 ** (i - n + 1) * 3.0 / 1000.0  # RepDistiller ABLoss scaling
        total = total + layer_weight * losses.activation_boundary(
            src, ft, margin, weights=_weights(batch))
    return total


# --- FT -------------------------------------------------------------------------------

def _ft_modules(ft, rate):
    return adapters.Paraphraser(rate), adapters.Translator(ft.shape[-1], rate)


def _ft_init(rng, s_out, t_out, pairs, rate, p, pretrain_epochs, pretrain_student,
             pretrain_params):
    del p, pretrain_epochs, pretrain_student, pretrain_params
    params = {}
    for (key, fs, ft), r in zip(_pair_iter(pairs, s_out, t_out, "last"), _split(rng, 64)):
        rp, rt = jax.random.split(r)
        para, trans = _ft_modules(ft, rate)
        params[key] = {"paraphraser": para.init(rp, ft)["params"],
                       "translator": trans.init(rt, fs)["params"]}
    return params, None


def _ft(params, s_out, t_out, batch, pairs, rate, p, pretrain_epochs, pretrain_student,
        pretrain_params):
    del pretrain_epochs, pretrain_student, pretrain_params
    total = 0.0
    for key, fs, ft in _pair_iter(pairs, s_out, t_out, "last"):
        _check_params(params, key, "ft")
        para, trans = _ft_modules(ft, rate)
        # The paraphraser is trained in the pre-training stage only (frozen here).
        factor_t, _ = para.apply({"params": _sg(params[key]["paraphraser"])}, ft)
        factor_s = trans.apply({"params": params[key]["translator"]}, fs)
        total = total + losses.factor_transfer(factor_s, factor_t, p, weights=_weights(batch))
    return total


def _ft_pretrain(params, s_out, t_out, batch, pairs, rate, p, pretrain_epochs,
                 pretrain_student, pretrain_params):
    """Paraphraser reconstruction of the teacher feature (MSE, RepDistiller init stage)."""
    del p, pretrain_epochs, pretrain_student, pretrain_params
    total = 0.0
    for key, fs, ft in _pair_iter(pairs, s_out, t_out, "last"):
        _check_params(params, key, "ft")
        para, _ = _ft_modules(ft, rate)
        _, recon = para.apply({"params": params[key]["paraphraser"]}, ft)
        total = total + losses.fitnet(recon, ft.astype(jnp.float32), weights=_weights(batch))
    return total


# --- FSP ------------------------------------------------------------------------------

def _fsp(params, s_out, t_out, batch, pairs, pretrain_epochs, pretrain_student):
    del params, pretrain_epochs, pretrain_student
    items = list(_pair_iter(pairs, s_out, t_out, "all"))
    if len(items) < 2:
        raise ValueError(f"fsp needs >= 2 feature pairs (FSP matrices join consecutive "
                         f"layers), got {len(items)}.")
    return sum(losses.fsp(a[1], b[1], a[2], b[2], weights=_weights(batch))
               for a, b in zip(items[:-1], items[1:]))


register(Method("dkd", _dkd, init=_dkd_init,
                options={"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "standardize": False,
                         "warmup_steps": 0},
                default_weight=1.0, needs_labels=True,
                traced_options=("alpha", "beta", "temperature"),
                doc="decoupled KD, tau^2 (alpha TCKD + beta NCKD) (Zhao et al. 2022)"))
register(Method("kd_ls", stateless(_kd_ls), options={"temperature": 4.0},
                default_weight=0.9,
                doc="Hinton KD on z-scored logits (logit standardisation, Sun et al. 2024)"))
register(Method("dist", stateless(_dist),
                options={"beta": 1.0, "gamma": 1.0, "temperature": 1.0}, default_weight=1.0,
                doc="DIST inter+intra-class Pearson relation of predictions (Huang 2022)"))
register(Method("fitnet", stateless(_fitnet), init=_fitnet_init, options={"pairs": None},
                default_weight=100.0, doc="FitNet hint MSE with a 1x1 regressor"))
register(Method("at", stateless(_at), options={"pairs": None, "p": 2.0},
                default_weight=1000.0, doc="attention transfer (AT), RepDistiller scale"))
register(Method("nst", stateless(_nst), options={"pairs": None}, default_weight=50.0,
                doc="neuron selectivity transfer, polynomial-kernel MMD"))
register(Method("sp", stateless(_sp), options={"pairs": None}, default_weight=3000.0,
                doc="similarity-preserving KD, ||G_S - G_T||_F^2 / B^2"))
register(Method("cc", stateless(_cc), init=_cc_init,
                options={"pairs": None, "dim": 128, "variant": "repdistiller",
                         "gamma": 0.4, "order": 2},
                default_weight=0.02, doc="correlation congruence on 128-d embeddings"))
register(Method("vid", stateless(_vid), init=_vid_init,
                options={"pairs": None, "init_variance": 5.0, "eps": 1e-5},
                default_weight=1.0, doc="variational information distillation (Gaussian NLL)"))
register(Method("rkd", stateless(_rkd),
                options={"pairs": None, "distance_weight": 25.0, "angle_weight": 50.0},
                default_weight=1.0, doc="relational KD, distance 25 + angle 50"))
register(Method("pkt", stateless(_pkt), options={"pairs": None}, default_weight=30000.0,
                doc="probabilistic knowledge transfer, cosine kernel"))
register(Method("crd", _crd, init=_crd_init,
                options={"pairs": None, "dim": 128, "temperature": 0.07, "queue_size": 16384},
                default_weight=0.8,
                doc="contrastive representation distillation (queue_size=0: in-batch)"))
register(Method("ab", stateless(_ab), init=_ab_init,
                options={"pairs": None, "margin": 1.0, "pretrain_epochs": 30,
                         "pretrain_student": True},
                default_weight=1.0, pretrain_loss=stateless(_ab),
                doc="activation boundaries hinge with 1x1 connectors"))
register(Method("ft", stateless(_ft), init=_ft_init,
                options={"pairs": None, "rate": 0.5, "p": 1, "pretrain_epochs": 30,
                         "pretrain_student": False, "pretrain_params": ("paraphraser",)},
                default_weight=200.0, pretrain_loss=stateless(_ft_pretrain),
                doc="factor transfer (paraphraser pre-trained, translator L1)"))
register(Method("fsp", stateless(_fsp),
                options={"pairs": None, "pretrain_epochs": 30, "pretrain_student": True},
                default_weight=50.0, pretrain_loss=stateless(_fsp),
                doc="flow of solution procedure matrices between consecutive layers"))

#: The methods this module registers (the classic zoo, METHODS.md section 1).
NAMES = ("dkd", "kd_ls", "dist", "fitnet", "at", "nst", "sp", "cc", "vid", "rkd", "pkt",
         "crd", "ab", "ft", "fsp")
