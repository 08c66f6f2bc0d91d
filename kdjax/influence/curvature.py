r"""Curvature products of a per-example loss: ``H v`` and the Gauss-Newton ``G v``.

Convention of :mod:`kdjax.influence`: ``loss_fn(params, batch) -> [B]`` returns the
**per-example** losses of a batch (a pytree of arrays whose leaves share the leading
dimension ``B``); the objective whose curvature is used is their mean ``L(theta) =
(1/B) sum_i l_i(theta)``. An L2 penalty ``(lambda/2)||theta||^2`` is *not* part of
``loss_fn``: it enters the solvers (:mod:`kdjax.influence.solvers`) as ``damping``.
``loss_fn`` must treat examples independently (no batch statistics: run BatchNorm in
eval mode), because :mod:`kdjax.influence.scores` chunks and pads batches.

A curvature product ``matvec(v)`` maps a params-shaped pytree to one of the same shape:
:func:`hvp` (exact Hessian, forward-over-reverse) and :func:`ggn_vp` (Gauss-Newton,
positive semi-definite; the default for networks, whose Hessian is indefinite away from
a minimum) build them. Nothing is materialised.
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from kdjax._checks import check_float_array
from kdjax.influence._validate import _batch_size, _check_like, _check_params, _float_dtype

__all__ = ["per_example_losses", "hvp", "ggn_vp", "LossFn", "MatVec"]

LossFn = Callable[[Any, Any], chex.Array]
MatVec = Callable[[Any], Any]


def per_example_losses(loss_fn: LossFn, params: Any, batch: Any) -> chex.Array:
    r"""Calls ``loss_fn(params, batch)`` and checks it returns per-example losses ``[B]``.

    The convention of this module: ``loss_fn`` returns one loss per example,
    ``l_i(theta)``, shape ``[B]`` with ``B`` the leading dimension of every leaf of
    ``batch``; the objective whose curvature is used is their mean
    ``(1/B) sum_i l_i``. The result is cast to at least float32.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.influence import per_example_losses
      >>> loss = lambda w, b: (b["x"] @ w - b["y"]) ** 2
      >>> per_example_losses(loss, jnp.ones(2), {"x": jnp.eye(2), "y": jnp.zeros(2)})
      Array([1., 1.], dtype=float32)

    Args:
      loss_fn: ``(params, batch) -> [B]``.
      params: parameter pytree (floating leaves).
      batch: pytree of arrays sharing the leading dimension ``B``.

    Returns:
      ``[B]`` per-example losses.
    """
    _check_params(params)
    b = _batch_size(batch)
    return _checked_losses(loss_fn(params, batch), "loss_fn(params, batch)", b,
                           " (the batch's leading dimension)")


def _checked_losses(values: Any, name: str, b: int, note: str = "") -> chex.Array:
    """``values`` checked to be floating per-example losses ``[b]``, cast to >= float32.

    ``name`` is the call that produced them (e.g. ``"loss_fn(params, batch)"``); ``note``
    is appended to the expected shape in the error message.
    """
    check_float_array(values, name)
    if np.shape(values) != (b,):
        raise ValueError(
            f"{name} must return per-example losses of shape ({b},){note}, got shape "
            f"{np.shape(values)}.")
    return values.astype(_float_dtype(values.dtype))


def _mean_loss(loss_fn, batch):
    return lambda p: jnp.mean(per_example_losses(loss_fn, p, batch))


def hvp(loss_fn: LossFn, params: Any, batch: Any, v: Any) -> Any:
    r"""Hessian-vector product ``H v`` of the mean loss, by forward-over-reverse.

    .. math::
        H v = \nabla^2_\theta \Big[\frac{1}{B}\sum_i l_i(\theta)\Big] v
            = \frac{d}{dt}\nabla_\theta L(\theta + t v)\Big|_{t=0},

    computed as ``jax.jvp(jax.grad(L), (params,), (v,))`` (Pearlmutter 1994; one forward
    and one reverse pass, no Hessian materialised). The Hessian of a non-convex network is
    indefinite; prefer :func:`ggn_vp` as the curvature for inverse solves there.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.influence import hvp
      >>> loss = lambda w, b: 0.5 * (b["x"] @ w) ** 2      # H = mean_i x_i x_i^T
      >>> batch = {"x": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
      >>> hvp(loss, jnp.zeros(2), batch, jnp.ones(2))
      Array([0.5, 2. ], dtype=float32)

    Args:
      loss_fn: ``(params, batch) -> [B]`` per-example losses.
      params: parameter pytree.
      batch: pytree of arrays with a common leading dimension.
      v: pytree shaped like ``params``.

    Returns:
      ``H v``, shaped like ``params``.
    """
    _check_params(params)
    _check_like(v, params, "v")
    return jax.jvp(jax.grad(_mean_loss(loss_fn, batch)), (params,), (v,))[1]


def ggn_vp(model_fn: Callable[[Any, Any], Any],
           output_loss_fn: Callable[[Any, Any], chex.Array],
           params: Any, batch: Any, v: Any) -> Any:
    r"""Generalised Gauss-Newton product ``G v = J^T H_out J v`` (positive semi-definite).

    For a loss written as ``l_i = output_loss_fn(model_fn(params, batch), batch)[i]``,
    with ``f = model_fn(., batch)`` (outputs ``[B, ...]``, any pytree) and
    ``L_out(f) = (1/B) sum_i l_i`` as a function of the outputs:

    .. math::
        G v = J_f^\top \, \nabla^2_f L_{out} \, J_f v ,

    i.e. the Hessian with the second-order term of the model dropped (Schraudolph 2002;
    Martens 2020, sec. 8). ``G`` is PSD whenever ``L_out`` is convex in the outputs
    (softmax cross-entropy, KL to a fixed teacher, squared error), so damped CG on it is
    well posed; for a model linear in its parameters ``G`` equals the Hessian. Computed
    with one ``jax.jvp`` of the model (``J v``), one of ``grad L_out`` (``H_out J v``) and
    one ``jax.vjp`` of the model (``J^T .``); nothing is materialised.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.influence import ggn_vp
      >>> model = lambda w, b: b["x"] @ w                   # linear: G = H
      >>> out_loss = lambda f, b: 0.5 * f ** 2
      >>> batch = {"x": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
      >>> ggn_vp(model, out_loss, jnp.zeros(2), batch, jnp.ones(2))
      Array([0.5, 2. ], dtype=float32)

    Args:
      model_fn: ``(params, batch) -> outputs`` (an array ``[B, ...]`` or a pytree of them,
        e.g. kdjax's ``(logits, features)``).
      output_loss_fn: ``(outputs, batch) -> [B]`` per-example losses of the outputs.
      params: parameter pytree.
      batch: pytree of arrays with a common leading dimension.
      v: pytree shaped like ``params``.

    Returns:
      ``G v``, shaped like ``params``.
    """
    _check_params(params)
    _check_like(v, params, "v")
    b = _batch_size(batch)
    f = lambda p: model_fn(p, batch)  # noqa: E731
    outputs, jv = jax.jvp(f, (params,), (v,))

    def out_loss(o):
        return jnp.mean(_checked_losses(output_loss_fn(o, batch),
                                        "output_loss_fn(outputs, batch)", b))

    h_jv = jax.jvp(jax.grad(out_loss), (outputs,), (jv,))[1]
    _, f_vjp = jax.vjp(f, params)
    return f_vjp(h_jv)[0]
