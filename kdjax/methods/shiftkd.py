"""Registry entries for the methods added for the ShiftKD, KD2M and CoSS studies.

* ``mlkd``: multi-level logit distillation (:func:`kdjax.losses.mlkd`; Jin et al.
  CVPR 2023), instance + batch + class alignment over temperatures 2..6, one view.
  Reference weight 1 (with CE 1).
* ``reviewkd``: ReviewKD (Chen et al. CVPR 2021): the student's stages, deepest first,
  go through a chain of ABF fusions (:class:`kdjax.models.adapters.ABF`, parameters
  created by ``init``), each output is compared with the teacher's stage of the same
  level by the hierarchical context loss (:func:`kdjax.losses.hcl`). ``pairs``: a list
  of ``[student_feature, teacher_feature]`` from shallow to deep (default: every common
  spatial feature, sorted, as the zoo's ``"all"`` methods); ``mid_features`` 64
  (reference ``mid_channel`` for ResNets on CIFAR). Reference weight 1.
* ``kd2m_gromov_wasserstein``: KD2M with the Gromov-Wasserstein discrepancy
  (:func:`kdjax.losses.gromov_wasserstein`), the KD2M options (``features``,
  ``conditional``, ``weighting``) of :mod:`kdjax.methods.kd2m`; student and teacher
  features may have different sizes. Weight ``1e-4`` like the other KD2M distances
  (GW is on the scale of squared costs squared: calibrate ``weight`` on your data).
* ``disco``: DisCo (Gao et al. ECCV 2022, :func:`kdjax.losses.disco`): MSE between the
  normalised student (projected to the teacher's size by a linear head created by
  ``init`` when the sizes differ) and teacher embeddings, ``features`` default
  ``["pooled", "pooled"]``. Reference weight 1.

``batch["weights"]`` is honoured by all four (multiplicities for the batch-coupled
MLKD and GW, per-example weights for ReviewKD and DisCo).
"""

from __future__ import annotations

import jax

from kdjax import losses
from kdjax.methods import Method, register, stateless
from kdjax.methods.common import (check_feature_pair, check_params, pick, resolve_pairs,
                                  split_rng)
from kdjax.methods.kd2m import COMMON_OPTIONS, KD2M_WEIGHT, make_loss
from kdjax.models import adapters

__all__: list[str] = []

_sg = jax.lax.stop_gradient


# --- MLKD ------------------------------------------------------------------------------

def _mlkd(inputs, options):
    return losses.mlkd(inputs.student[0], _sg(inputs.teacher[0]),
                       tuple(options["temperatures"]),
                       instance_weight=options["instance_weight"],
                       batch_weight=options["batch_weight"],
                       class_weight=options["class_weight"], weights=inputs.weights)


register(Method("mlkd", stateless(_mlkd),
                options={"temperatures": losses.MLKD_TEMPERATURES, "instance_weight": 1.0,
                         "batch_weight": 1.0, "class_weight": 1.0},
                default_weight=1.0,
                doc="multi-level logit distillation (instance+batch+class, tau 2..6)"))


# --- ReviewKD --------------------------------------------------------------------------

def _levels(pairs, s_out, t_out):
    """``[(student_map, teacher_map)]`` from shallow to deep."""
    names = resolve_pairs(pairs, s_out, t_out, "all")
    return [(pick(s_out, sn, "student"), _sg(pick(t_out, tn, "teacher")))
            for sn, tn in names]


def _abfs(levels, mid_features):
    n = len(levels)
    # the deepest level (last) starts the chain and has nothing to fuse with
    return [adapters.ABF(mid_features, ft.shape[-1], fuse=k < n - 1)
            for k, (_, ft) in enumerate(levels)]


def _review(params, levels, mods):
    """Runs the ABF chain deepest first; returns the fused maps, shallow to deep."""
    outs = [None] * len(levels)
    residual = None
    for k in reversed(range(len(levels))):
        fs, ft = levels[k]
        check_params(params, f"abf{k}", "reviewkd")
        outs[k], residual = mods[k].apply({"params": params[f"abf{k}"]}, fs, residual,
                                          ft.shape[1:-1])
    return outs


def _reviewkd_init(rng, s_out, t_out, options):
    lv = _levels(options["pairs"], s_out, t_out)
    mods = _abfs(lv, options["mid_features"])
    params, residual = {}, None
    for k, r in zip(reversed(range(len(lv))), split_rng(rng, len(lv))):
        fs, ft = lv[k]
        variables = mods[k].init(r, fs, residual, ft.shape[1:-1])
        params[f"abf{k}"] = variables["params"]
        _, residual = mods[k].apply(variables, fs, residual, ft.shape[1:-1])
    return params, None


def _reviewkd(inputs, options):
    lv = _levels(options["pairs"], inputs.student, inputs.teacher)
    outs = _review(inputs.params, lv, _abfs(lv, options["mid_features"]))
    return losses.hcl(outs, [ft for _, ft in lv], tuple(options["levels"]),
                      weights=inputs.weights)


register(Method("reviewkd", stateless(_reviewkd), init=_reviewkd_init,
                options={"pairs": None, "mid_features": 64, "levels": (4, 2, 1)},
                default_weight=1.0,
                doc="ReviewKD: ABF fusion chain + hierarchical context loss"))


# --- KD2M Gromov-Wasserstein -------------------------------------------------------------

register(Method("kd2m_gromov_wasserstein", make_loss(losses.gromov_wasserstein),
                options={**COMMON_OPTIONS, "epsilon": 3e-3, "max_iterations": 50},
                default_weight=KD2M_WEIGHT, needs_labels=False,
                doc="KD2M Gromov-Wasserstein (ott-jax entropic GW plan, exact objective)"))


# --- DisCo ---------------------------------------------------------------------------------

def _embeddings(s_out, t_out, features):
    check_feature_pair(features)
    s = pick(s_out, features[0], "student")
    t = _sg(pick(t_out, features[1], "teacher"))
    return s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)


def _disco_init(rng, s_out, t_out, options):
    s, t = _embeddings(s_out, t_out, options["features"])
    if s.shape[-1] == t.shape[-1]:
        return {}, None
    return {"head": adapters.Pointwise(t.shape[-1]).init(rng, s)["params"]}, None


def _disco(inputs, options):
    s, t = _embeddings(inputs.student, inputs.teacher, options["features"])
    if "head" in inputs.params:
        s = adapters.Pointwise(t.shape[-1]).apply({"params": inputs.params["head"]}, s)
    return losses.disco(s, t, normalize_teacher=options["normalize_teacher"],
                        weights=inputs.weights)


register(Method("disco", stateless(_disco), init=_disco_init,
                options={"features": ("pooled", "pooled"), "normalize_teacher": True},
                default_weight=1.0, doc="DisCo: MSE of normalised final embeddings"))
