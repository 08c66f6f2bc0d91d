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
from kdjax.methods.kd2m import _COMMON, KD2M_WEIGHT, _make_loss
from kdjax.methods.zoo import _check_params, _pick, _split, _weights, resolve_pairs
from kdjax.models import adapters

__all__: list[str] = []

_sg = jax.lax.stop_gradient


# --- MLKD ------------------------------------------------------------------------------

def _mlkd(params, s_out, t_out, batch, temperatures, instance_weight, batch_weight,
          class_weight):
    del params
    return losses.mlkd(s_out[0], _sg(t_out[0]), tuple(temperatures),
                       instance_weight=instance_weight, batch_weight=batch_weight,
                       class_weight=class_weight, weights=_weights(batch))


register(Method("mlkd", stateless(_mlkd),
                options={"temperatures": losses.MLKD_TEMPERATURES, "instance_weight": 1.0,
                         "batch_weight": 1.0, "class_weight": 1.0},
                default_weight=1.0,
                doc="multi-level logit distillation (instance+batch+class, tau 2..6)"))


# --- ReviewKD --------------------------------------------------------------------------

def _levels(pairs, s_out, t_out):
    """``[(student_map, teacher_map)]`` from shallow to deep."""
    names = resolve_pairs(pairs, s_out, t_out, "all")
    return [(_pick(s_out, sn, "student"), _sg(_pick(t_out, tn, "teacher")))
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
        _check_params(params, f"abf{k}", "reviewkd")
        outs[k], residual = mods[k].apply({"params": params[f"abf{k}"]}, fs, residual,
                                          ft.shape[1:-1])
    return outs


def _reviewkd_init(rng, s_out, t_out, pairs, mid_features, levels):
    del levels
    lv = _levels(pairs, s_out, t_out)
    mods = _abfs(lv, mid_features)
    params, residual = {}, None
    for k, r in zip(reversed(range(len(lv))), _split(rng, len(lv))):
        fs, ft = lv[k]
        variables = mods[k].init(r, fs, residual, ft.shape[1:-1])
        params[f"abf{k}"] = variables["params"]
        _, residual = mods[k].apply(variables, fs, residual, ft.shape[1:-1])
    return params, None


def _reviewkd(params, s_out, t_out, batch, pairs, mid_features, levels):
    lv = _levels(pairs, s_out, t_out)
    outs = _review(params, lv, _abfs(lv, mid_features))
    return losses.hcl(outs, [ft for _, ft in lv], tuple(levels), weights=_weights(batch))


register(Method("reviewkd", stateless(_reviewkd), init=_reviewkd_init,
                options={"pairs": None, "mid_features": 64, "levels": (4, 2, 1)},
                default_weight=1.0,
                doc="ReviewKD: ABF fusion chain + hierarchical context loss"))


# --- KD2M Gromov-Wasserstein -------------------------------------------------------------

register(Method("kd2m_gromov_wasserstein", _make_loss(losses.gromov_wasserstein),
                options={**_COMMON, "epsilon": 3e-3, "max_iterations": 50},
                default_weight=KD2M_WEIGHT, needs_labels=False,
                doc="KD2M Gromov-Wasserstein (ott-jax entropic GW plan, exact objective)"))


# --- DisCo ---------------------------------------------------------------------------------

def _embeddings(s_out, t_out, features):
    if not isinstance(features, (list, tuple)) or len(features) != 2:
        raise ValueError("features must be a [student_feature, teacher_feature] pair, "
                         f"got {features!r}.")
    s = _pick(s_out, features[0], "student")
    t = _sg(_pick(t_out, features[1], "teacher"))
    return s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)


def _disco_init(rng, s_out, t_out, features, normalize_teacher):
    del normalize_teacher
    s, t = _embeddings(s_out, t_out, features)
    if s.shape[-1] == t.shape[-1]:
        return {}, None
    return {"head": adapters.Pointwise(t.shape[-1]).init(rng, s)["params"]}, None


def _disco(params, s_out, t_out, batch, features, normalize_teacher):
    s, t = _embeddings(s_out, t_out, features)
    if "head" in params:
        s = adapters.Pointwise(t.shape[-1]).apply({"params": params["head"]}, s)
    return losses.disco(s, t, normalize_teacher=normalize_teacher, weights=_weights(batch))


register(Method("disco", stateless(_disco), init=_disco_init,
                options={"features": ("pooled", "pooled"), "normalize_teacher": True},
                default_weight=1.0, doc="DisCo: MSE of normalised final embeddings"))
