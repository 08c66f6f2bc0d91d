"""Registry entries for the classic KD zoo (docs/METHODS.md section 1).

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

from typing import Mapping

import jax
import jax.numpy as jnp

from kdjax import losses
from kdjax.losses.feature import match_spatial
from kdjax.methods import Method, register, stateless
from kdjax.methods.common import check_params, pair_features, resolve_pairs, split_rng
from kdjax.models import adapters

__all__ = ["resolve_pairs", "NAMES"]

_sg = jax.lax.stop_gradient


# --- logit methods ------------------------------------------------------------------

def _check_warmup(warmup_steps):
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"dkd: warmup_steps must be an int >= 0, got {warmup_steps!r}.")


def _dkd_init(rng, s_out, t_out, options):
    """State: the step counter of the warm-up (``None`` without warm-up)."""
    warmup_steps = options["warmup_steps"]
    _check_warmup(warmup_steps)
    return {}, ({"step": jnp.zeros((), jnp.int32)} if warmup_steps else None)


def _dkd(inputs, options):
    """DKD; with ``warmup_steps > 0`` the loss is scaled by ``min((t + 1) / warmup_steps,
    1)`` at the method's own step ``t`` (0-based, counted in its state), mdistiller's
    linear warm-up ``min(epoch / warmup, 1)`` (epochs from 1, 20 epochs) per step:
    set ``warmup_steps = 20 * steps_per_epoch`` for the reference schedule. The term
    reported by the engine is the scaled value."""
    warmup_steps, state = options["warmup_steps"], inputs.state
    _check_warmup(warmup_steps)
    loss = losses.dkd(inputs.student[0], _sg(inputs.teacher[0]), inputs.batch["y"],
                      options["alpha"], options["beta"], options["temperature"],
                      weights=inputs.weights, standardize=options["standardize"])
    if not warmup_steps:
        return loss, state
    if not isinstance(state, Mapping) or "step" not in state:
        raise ValueError(f"dkd: warmup_steps={warmup_steps} needs the step-counter state "
                         f"from init, got state {state!r}.")
    step = state["step"]
    scale = jnp.minimum((step + 1).astype(jnp.float32) / warmup_steps, 1.0)
    return scale * loss, {"step": step + 1}


def _kd_ls(inputs, options):
    return losses.kd(inputs.student[0], _sg(inputs.teacher[0]), options["temperature"],
                     weights=inputs.weights, standardize=True)


def _dist(inputs, options):
    return losses.dist(inputs.student[0], _sg(inputs.teacher[0]), options["beta"],
                       options["gamma"], options["temperature"])


def _pairs(inputs, options, default):
    """:func:`~kdjax.methods.common.pair_features` of the inputs' outputs."""
    return pair_features(options["pairs"], inputs.student, inputs.teacher, default)


def _init_pairs(rng, s_out, t_out, options, default, make):
    """``{key: make(rng, fs, ft)}`` over the resolved pairs (one key split each)."""
    items = pair_features(options["pairs"], s_out, t_out, default)
    return {key: make(r, fs, ft) for (key, fs, ft), r in zip(items, split_rng(rng, 64))}


# --- FitNet ---------------------------------------------------------------------------

def _fitnet_init(rng, s_out, t_out, options):
    def make(r, fs, ft):
        return adapters.Regressor(ft.shape[-1]).init(r, fs)["params"]

    return _init_pairs(rng, s_out, t_out, options, "last", make), None


def _fitnet(inputs, options):
    params, total = inputs.params, 0.0
    for key, fs, ft in _pairs(inputs, options, "last"):
        check_params(params, key, "fitnet")
        reg = adapters.Regressor(ft.shape[-1]).apply({"params": params[key]}, fs)
        reg, ft = match_spatial(reg, ft)
        total = total + losses.fitnet(reg, ft, weights=inputs.weights)
    return total


# --- AT, NST, SP ----------------------------------------------------------------------

def _at(inputs, options):
    return sum(losses.attention_transfer(fs, ft, options["p"], weights=inputs.weights)
               for _, fs, ft in _pairs(inputs, options, "all"))


def _nst(inputs, options):
    return sum(losses.nst(fs, ft, weights=inputs.weights)
               for _, fs, ft in _pairs(inputs, options, "all"))


def _sp(inputs, options):
    return sum(losses.similarity_preserving(fs, ft)
               for _, fs, ft in _pairs(inputs, options, "last"))


# --- embedding-head methods: CC, CRD --------------------------------------------------

def _embed_init(rng, s_out, t_out, options):
    dim = options["dim"]

    def make(r, fs, ft):
        rs, rt = jax.random.split(r)
        return {"student": adapters.Embed(dim).init(rs, fs)["params"],
                "teacher": adapters.Embed(dim).init(rt, ft)["params"]}

    return _init_pairs(rng, s_out, t_out, options, "pooled", make)


def _embeds(params, key, fs, ft, dim, method):
    check_params(params, key, method)
    es = adapters.Embed(dim).apply({"params": params[key]["student"]}, fs)
    et = adapters.Embed(dim).apply({"params": params[key]["teacher"]}, ft)
    return es, et


def _cc_init(rng, s_out, t_out, options):
    return _embed_init(rng, s_out, t_out, options), None


def _cc(inputs, options):
    total = 0.0
    for key, fs, ft in _pairs(inputs, options, "pooled"):
        es, et = _embeds(inputs.params, key, fs, ft, options["dim"], "cc")
        total = total + losses.correlation_congruence(es, et, options["variant"],
                                                      options["gamma"], options["order"])
    return total


def _crd_init(rng, s_out, t_out, options):
    queue_size, dim = options["queue_size"], options["dim"]
    r_params, r_queue = jax.random.split(rng)
    params = _embed_init(r_params, s_out, t_out, options)
    state = None
    if queue_size:
        state = {key: losses.init_crd_queue(r, int(queue_size), int(dim))
                 for key, r in zip(params, split_rng(r_queue, len(params)))}
    return params, state


def _crd(inputs, options):
    queue_size, temperature = options["queue_size"], options["temperature"]
    state = inputs.state
    total, new_state = 0.0, {}
    for key, fs, ft in _pairs(inputs, options, "pooled"):
        es, et = _embeds(inputs.params, key, fs, ft, options["dim"], "crd")
        if queue_size:
            if state is None or key not in state:
                raise ValueError(f"crd: queue state for {key!r} missing; call init "
                                 f"(queue_size={queue_size}).")
            loss, new_state[key] = losses.crd_queue(es, et, state[key], temperature,
                                                    weights=inputs.weights)
        else:
            loss = losses.crd(es, et, temperature, weights=inputs.weights)
        total = total + loss
    return total, (new_state if queue_size else state)


# --- VID ------------------------------------------------------------------------------

def _vid_head(ft, options):
    return adapters.VIDHead(ft.shape[-1], init_variance=options["init_variance"],
                            eps=options["eps"])


def _vid_init(rng, s_out, t_out, options):
    def make(r, fs, ft):
        return _vid_head(ft, options).init(r, fs)["params"]

    return _init_pairs(rng, s_out, t_out, options, "all", make), None


def _vid(inputs, options):
    params, total = inputs.params, 0.0
    for key, fs, ft in _pairs(inputs, options, "all"):
        check_params(params, key, "vid")
        mean, log_scale = _vid_head(ft, options).apply({"params": params[key]}, fs)
        mean, ft = match_spatial(mean, ft)
        total = total + losses.vid(mean, ft, log_scale, options["eps"],
                                   weights=inputs.weights)
    return total


# --- RKD, PKT ------------------------------------------------------------------------

def _rkd(inputs, options):
    return sum(losses.rkd(fs, ft, options["distance_weight"], options["angle_weight"])
               for _, fs, ft in _pairs(inputs, options, "pooled"))


def _pkt(inputs, options):
    return sum(losses.pkt(fs, ft) for _, fs, ft in _pairs(inputs, options, "pooled"))


# --- AB -------------------------------------------------------------------------------

def _ab_init(rng, s_out, t_out, options):
    def make(r, fs, ft):
        return adapters.ABConnector(ft.shape[-1]).init(r, fs)["params"]

    return _init_pairs(rng, s_out, t_out, options, "all", make), None


def _ab(inputs, options):
    params = inputs.params
    items = list(_pairs(inputs, options, "all"))
    n = len(items)
    total = 0.0
    for i, (key, fs, ft) in enumerate(items):
        check_params(params, key, "ab")
        src = adapters.ABConnector(ft.shape[-1]).apply({"params": params[key]}, fs)
        src, ft = match_spatial(src, ft)
        layer_weight = 2.0 ** (i - n + 1) * 3.0 / 1000.0  # RepDistiller ABLoss scaling
        total = total + layer_weight * losses.activation_boundary(
            src, ft, options["margin"], weights=inputs.weights)
    return total


# --- FT -------------------------------------------------------------------------------

def _ft_modules(ft, rate):
    return adapters.Paraphraser(rate), adapters.Translator(ft.shape[-1], rate)


def _ft_init(rng, s_out, t_out, options):
    def make(r, fs, ft):
        rp, rt = jax.random.split(r)
        para, trans = _ft_modules(ft, options["rate"])
        return {"paraphraser": para.init(rp, ft)["params"],
                "translator": trans.init(rt, fs)["params"]}

    return _init_pairs(rng, s_out, t_out, options, "last", make), None


def _ft(inputs, options):
    params, total = inputs.params, 0.0
    for key, fs, ft in _pairs(inputs, options, "last"):
        check_params(params, key, "ft")
        para, trans = _ft_modules(ft, options["rate"])
        # The paraphraser is trained in the pre-training stage only (frozen here).
        factor_t, _ = para.apply({"params": _sg(params[key]["paraphraser"])}, ft)
        factor_s = trans.apply({"params": params[key]["translator"]}, fs)
        total = total + losses.factor_transfer(factor_s, factor_t, options["p"],
                                               weights=inputs.weights)
    return total


def _ft_pretrain(inputs, options):
    """Paraphraser reconstruction of the teacher feature (MSE, RepDistiller init stage)."""
    params, total = inputs.params, 0.0
    for key, fs, ft in _pairs(inputs, options, "last"):
        check_params(params, key, "ft")
        para, _ = _ft_modules(ft, options["rate"])
        _, recon = para.apply({"params": params[key]["paraphraser"]}, ft)
        total = total + losses.fitnet(recon, ft.astype(jnp.float32), weights=inputs.weights)
    return total


# --- FSP ------------------------------------------------------------------------------

def _fsp(inputs, options):
    items = list(_pairs(inputs, options, "all"))
    if len(items) < 2:
        raise ValueError(f"fsp needs >= 2 feature pairs (FSP matrices join consecutive "
                         f"layers), got {len(items)}.")
    return sum(losses.fsp(a[1], b[1], a[2], b[2], weights=inputs.weights)
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

#: The methods this module registers (the classic zoo, docs/METHODS.md section 1).
NAMES = ("dkd", "kd_ls", "dist", "fitnet", "at", "nst", "sp", "cc", "vid", "rkd", "pkt",
         "crd", "ab", "ft", "fsp")
