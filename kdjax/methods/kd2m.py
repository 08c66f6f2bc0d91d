"""Registry entries for the KD2M family (arXiv:2504.01757; see kdjax.losses.distribution).

Each method compares the student's and the teacher's feature clouds of the batch,
``D(student_features, stop_gradient(teacher_features))``. Options common to all:

* ``features``: ``[student_feature, teacher_feature]`` names in the features dict
  (default ``["pooled", "pooled"]``, the ``(B, D)`` embedding). Other (channels-last)
  features are flattened per example; both must have the same flattened size.
* ``conditional``: label-conditional version (:func:`kdjax.losses.conditional`), with
  ``batch["y"]`` and the number of classes from the logits' shape; ``weighting``
  ``"sum"`` (authors) or ``"frequency"``.

``batch["weights"]`` (per-example sample weights), when present, are the weights of both
clouds. Reference weight ``lambda = 1e-4`` (authors' setting, 512-d features, CE weight 1).
Names: ``kd2m_exact_ot``, ``kd2m_sinkhorn``, ``kd2m_sinkhorn_divergence``,
``kd2m_sliced``, ``kd2m_gaussian_w2``, ``kd2m_gaussian_kl``, ``kd2m_mmd``,
``kd2m_joint_ot``, and the baseline ``kd2m_feature_mse``: the identity coupling,
``sum_i a_i ||x_i - y_i||^2`` (same example for student and teacher), an upper bound of
exact W2^2 (FitNet's MSE without a regressor, summed over feature dimensions so that it
is on the scale of ``kd2m_exact_ot`` and shares its weight).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax import losses
from kdjax._checks import check_choice
from kdjax.methods import Method, register
from kdjax.methods.common import check_feature_pair

__all__ = ["COMMON_OPTIONS", "KD2M_WEIGHT", "make_loss"]

#: The options every KD2M distance method has (see the module docstring).
COMMON_OPTIONS = {"features": ("pooled", "pooled"), "conditional": False, "weighting": "sum"}
#: The reference weight of a KD2M term (authors' setting).
KD2M_WEIGHT = 1e-4


def _feature(out, name, who):
    feats = out[1]
    if name not in feats:
        raise ValueError(f"{who} feature {name!r} not found; available features: "
                         f"{sorted(feats)}.")
    f = feats[name]
    return f.reshape(f.shape[0], -1)


def _pair(student_out, teacher_out, features):
    check_feature_pair(features)
    x = _feature(student_out, features[0], "student")
    y = jax.lax.stop_gradient(_feature(teacher_out, features[1], "teacher"))
    return x, y


def make_loss(distance, uses_rng=False):
    """A KD2M method ``loss(inputs, options) -> (value, state)`` for ``distance(x, y, a,
    b, **kw)``: ``x``/``y`` the flattened student/teacher features named by the
    ``features`` option, ``a = b = inputs.weights``; ``conditional`` and ``weighting``
    as in the module docstring; every other option is passed to ``distance`` as a
    keyword (and the step rng as ``key`` when ``uses_rng``)."""

    def loss(inputs, options):
        features, conditional = options["features"], options["conditional"]
        weighting = options["weighting"]
        kwargs = {k: v for k, v in options.items() if k not in COMMON_OPTIONS}
        check_choice(weighting, "weighting", ("sum", "frequency"))
        student_out, batch, rng = inputs.student, inputs.batch, inputs.rng
        x, y = _pair(student_out, inputs.teacher, features)
        if uses_rng:
            if rng is None:
                raise ValueError("this method needs an rng key (random projections), got None.")
            kwargs = {**kwargs, "key": rng}
        w = batch.get("weights")
        if conditional:
            if "y" not in batch:
                raise ValueError("conditional=True needs labels batch['y'], got batch keys "
                                 f"{sorted(batch)}.")
            value = losses.conditional(distance, x, y, batch["y"],
                                       num_classes=student_out[0].shape[-1], a=w, b=w,
                                       weighting=weighting, **kwargs)
        else:
            value = distance(x, y, w, w, **kwargs)
        return value, inputs.state

    return loss


def _joint_loss(inputs, options):
    student_out, teacher_out = inputs.student, inputs.teacher
    x, y = _pair(student_out, teacher_out, options["features"])
    w = inputs.batch.get("weights")
    value = losses.joint_ot(x, y, student_out[0], jax.lax.stop_gradient(teacher_out[0]),
                            w, w, beta=options["beta"], label_cost=options["label_cost"],
                            feature_scale=options["feature_scale"])
    return value, inputs.state


def _feature_mse(x, y, a=None, b=None):
    r"""Identity-coupling cost :math:`\sum_i a_i \|x_i - y_i\|^2 \ge W_2^2` (needs n == m).

    ``b`` is not read: same batch, so the coupling is the identity with the student's
    weights ``a``."""
    if x.shape != y.shape:
        raise ValueError(f"kd2m_feature_mse pairs example i of the student with example i "
                         f"of the teacher: x and y must have the same shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}.")
    n = x.shape[0]
    w = jnp.full((n,), 1.0 / n) if a is None else a / jnp.maximum(jnp.sum(a), 1e-12)
    d = x.astype(jnp.float32) - y.astype(jnp.float32)
    return w @ jnp.sum(d * d, -1)


_SINKHORN = {"epsilon": 0.05, "relative_to": "std", "threshold": 1e-3,
             "max_iterations": 2000, "min_iterations": 0, "differentiation": "implicit"}

_SPECS = [
    ("kd2m_exact_ot", losses.exact_ot, {}, False,
     "KD2M exact empirical W2^2 (assignment / LP plan, envelope gradient)"),
    ("kd2m_sinkhorn", losses.sinkhorn, dict(_SINKHORN), False,
     "KD2M entropic OT (ott-jax Sinkhorn), epsilon relative to the cost std"),
    ("kd2m_sinkhorn_divergence", losses.sinkhorn_divergence,
     dict(_SINKHORN, static_b=False), False, "KD2M debiased Sinkhorn divergence"),
    ("kd2m_sliced", losses.sliced_wasserstein, {"num_projections": 128}, True,
     "KD2M sliced W2^2 (random projections from the step rng)"),
    ("kd2m_gaussian_w2", losses.gaussian_w2, {"diagonal": True, "eig_floor": 1e-6}, False,
     "KD2M Gaussian W2 (diagonal by default, as the authors)"),
    ("kd2m_gaussian_kl", losses.gaussian_kl, {"var_floor": 1e-6}, False,
     "KD2M diagonal Gaussian KL(student || teacher)"),
    ("kd2m_feature_mse", _feature_mse, {}, False,
     "identity-coupling feature MSE (sum over dims), upper bound of W2^2; a baseline"),
    ("kd2m_mmd", losses.mmd, {"kernel": "linear", "bandwidth": "mean"}, False,
     "KD2M squared MMD (linear by default, as the authors; rbf with mean/median)"),
]

for _name, _dist, _opts, _rng, _doc in _SPECS:
    register(Method(_name, make_loss(_dist, uses_rng=_rng),
                    options={**COMMON_OPTIONS, **_opts},
                    default_weight=KD2M_WEIGHT, needs_labels=False, doc=_doc))

register(Method("kd2m_joint_ot", _joint_loss,
                options={"features": ("pooled", "pooled"), "beta": 1.0,
                         "label_cost": "sqeuclidean", "feature_scale": "max"},
                default_weight=KD2M_WEIGHT, needs_labels=False,
                doc="KD2M joint feature-logit exact OT between student and teacher"))
