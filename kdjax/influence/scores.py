r"""Influence scores and KD-AIF weights (Koh & Liang 2017; KD-AIF, arXiv 2501.02705).

Sign convention (Koh & Liang 2017, eq. 2):

.. math::
    \mathcal{I}_{up,loss}(z_i) = \frac{d L_{val}(\hat\theta_{\epsilon, z_i})}{d\epsilon}
    \Big|_{\epsilon=0} = -\nabla L_{val}^\top H^{-1} \nabla l_i ,

the change of the validation loss per unit of up-weighting ``z_i`` (objective
``(1/N) sum_j l_j + epsilon l_i``). :func:`influence_scores` returns exactly this.
Removing ``z_i`` is ``epsilon = -1/N``, so ``L_val(theta_{-i}) - L_val(theta) ~
-I_up,loss(z_i) / N``. A **negative** score means up-weighting ``z_i`` lowers the
validation loss: the point is *helpful*, and :func:`influence_weights` gives it the
*larger* weight (the released KD-AIF code exponentiates the min-max-scaled score as is,
which with this sign would up-weight harmful points; we fix the sign deliberately).
"""

from __future__ import annotations

import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdjax._checks import check_choice, check_finite, check_float_array, check_positive
from kdjax.influence._validate import (_batch_size, _check_int, _check_like, _check_params,
                                       _float_dtype)
from kdjax.influence.curvature import LossFn, MatVec, _mean_loss, hvp, per_example_losses
from kdjax.influence.solvers import inverse_hvp

__all__ = ["per_example_jvp", "influence_scores", "influence_weights", "WEIGHT_MAPPINGS"]

WEIGHT_MAPPINGS = ("exp_minmax", "sigmoid")


def _pad_leading(x, total):
    pad = total - x.shape[0]
    if pad == 0:
        return x
    return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), mode="edge")


def _place(x, mesh, spec):
    """Reshards ``x`` onto ``mesh`` with ``spec`` (explicit axes) or constrains it (auto)."""
    sharding = NamedSharding(mesh, spec)
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


def per_example_jvp(loss_fn: LossFn, params: Any, data: Any, tangent: Any, *,
                    chunk_size: int = 1024, mesh: Mesh | None = None,
                    axis_name: str = "data") -> chex.Array:
    r"""All directional derivatives ``d_i = grad l_i(theta)^T t`` with one ``jax.jvp``.

    ``d = J_l t`` where ``J_l`` is the ``[N, P]`` Jacobian of the per-example-loss vector:
    a forward-mode product, so no per-example gradient is ever materialised (cost ~ one
    forward pass over the data, memory ~ one chunk). The ``N`` examples are processed in
    chunks of a fixed ``chunk_size`` with ``jax.lax.map``; the last chunk is padded by
    repeating the last example and the padded entries are dropped, so every chunk has
    the same shape and compiles once. With ``mesh``, the data are split over the mesh
    axis ``axis_name`` with ``jax.shard_map`` (``params`` and ``tangent`` replicated);
    each device scores its own shard (chunked locally) and the ``[N]`` result stays
    sharded over ``axis_name``; it equals the unsharded result. Data already sharded
    with ``NamedSharding(mesh, P(axis_name))`` are used in place; pass ``mesh`` for such
    data (the ``mesh=None`` path reshapes the global array). If ``N`` is not a multiple
    of the axis size the data are padded and the result is returned replicated.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.influence import per_example_jvp
      >>> loss = lambda w, b: b["x"] @ w                    # grad l_i = x_i
      >>> per_example_jvp(loss, jnp.zeros(2), {"x": jnp.eye(2)}, jnp.array([3.0, 4.0]),
      ...                 chunk_size=1)
      Array([3., 4.], dtype=float32)

    Args:
      loss_fn: ``(params, batch) -> [B]`` per-example losses (examples independent).
      params: parameter pytree.
      data: pytree of ``[N, ...]`` arrays.
      tangent: direction, shaped like ``params``.
      chunk_size: examples per chunk (per device with ``mesh``).
      mesh: optional ``jax.sharding.Mesh`` with axis ``axis_name``.
      axis_name: the data-parallel mesh axis.

    Returns:
      ``[N]`` array ``d_i = grad l_i^T tangent``.
    """
    _check_params(params)
    _check_like(tangent, params, "tangent")
    n = _batch_size(data, "data")
    chunk_size = _check_int(chunk_size, "chunk_size")
    n_shards = 1
    if mesh is not None:
        if axis_name not in mesh.shape:
            raise ValueError(f"axis_name must be an axis of mesh {dict(mesh.shape)}, got "
                             f"{axis_name!r}.")
        n_shards = mesh.shape[axis_name]
    n_global = math.ceil(n / n_shards) * n_shards  # padded so that shards are equal
    local_n = n_global // n_shards
    chunk_size = min(chunk_size, local_n)
    per_shard = math.ceil(local_n / chunk_size) * chunk_size
    # Trace-time check of the loss output on one chunk.
    probe = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct((chunk_size,) + tuple(np.shape(x)[1:]),
                                       jnp.result_type(x)), data)
    jax.eval_shape(lambda p, b: per_example_losses(loss_fn, p, b), params, probe)

    def local(p, t, shard):
        # Pads this shard to whole chunks (edge rows), scores it, drops the padding.
        shard = jax.tree_util.tree_map(lambda x: _pad_leading(x, per_shard), shard)
        chunks = jax.tree_util.tree_map(
            lambda x: x.reshape((-1, chunk_size) + x.shape[1:]), shard)

        def one(chunk):
            return jax.jvp(lambda q: per_example_losses(loss_fn, q, chunk), (p,), (t,))[1]

        return jax.lax.map(one, chunks).reshape(-1)[:local_n]

    data = jax.tree_util.tree_map(jnp.asarray, data)
    if mesh is None:
        return local(params, tangent, data)
    # Data sharded evenly over the axis need no global padding (so no resharding); an
    # uneven N (then the data cannot be sharded evenly anyway) is padded first.
    data = jax.tree_util.tree_map(
        lambda x: _place(_pad_leading(x, n_global), mesh, P(axis_name)), data)
    out = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(axis_name)),
                        out_specs=P(axis_name))(params, tangent, data)
    if n_global == n:
        return out
    out = _place(out, mesh, P())  # replicate, then trim
    return out[:n]


def influence_scores(loss_fn: LossFn, params: Any, train_data: Any, val_data: Any, *,
                     val_loss_fn: LossFn | None = None,
                     matvec: MatVec | None = None, method: str = "cg",
                     damping: chex.Numeric = 0.01, chunk_size: int = 1024,
                     mesh: Mesh | None = None, axis_name: str = "data",
                     **solver_options) -> tuple[chex.Array, dict[str, Any]]:
    r"""Koh & Liang influence ``I_up,loss(z_i)`` of every training point on the val loss.

    .. math::
        s = (H + \lambda I)^{-1} \nabla_\theta L_{val}, \qquad
        \mathcal{I}_{up,loss}(z_i) = -\nabla_\theta l_i^\top s
        \quad (i = 1..N),

    with ``L_val = mean_j val_loss_fn(params, val_data)_j`` (default ``val_loss_fn =
    loss_fn``; KD-AIF measures a distillation objective on the training points against
    a cross-entropy on labelled validation points) and ``H`` the curvature of the
    mean training loss (Koh & Liang 2017, eq. 2; KD-AIF, arXiv 2501.02705, sec. 3).
    ``s`` is computed once by :func:`inverse_hvp`; the ``N`` dot products are then one
    ``jax.jvp`` of the per-example-loss vector along ``s`` (:func:`per_example_jvp`),
    chunked and optionally sharded over ``mesh``.

    Sign: a score is the change of the validation loss per unit up-weighting of ``z_i``;
    **negative = helpful** (removing the point would raise the validation loss by about
    ``-score / N``). Pass the scores to :func:`influence_weights`, which up-weights
    helpful points.

    Curvature: ``matvec`` defaults to the exact Hessian of the mean loss over all of
    ``train_data`` (:func:`hvp`), right for convex / last-layer models. For networks pass
    the Gauss-Newton product, e.g. ``matvec=lambda v: ggn_vp(model_fn, out_loss, params,
    batch, v)`` on the training data or a large subset (the Hessian is indefinite there
    and CG on it is unreliable). The default materialises activations for all of
    ``train_data`` in each matvec; pass a subset-based ``matvec`` for large ``N``.

    Sharding: with ``mesh`` the scores are computed per device on the ``axis_name``
    shards (``shard_map``); the gradient and the curvature products follow the sharding
    of ``val_data`` / ``train_data`` under ``jit`` (global-batch semantics, XLA inserts
    the reductions). On a mesh with ``Explicit`` axis types, ``loss_fn`` itself must be
    differentiable on explicitly sharded batches.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.influence import influence_scores
      >>> loss = lambda w, b: 0.5 * (b["x"] @ w - b["y"]) ** 2
      >>> train = {"x": jnp.array([[1.0], [1.0]]), "y": jnp.array([1.0, 3.0])}
      >>> val = {"x": jnp.array([[1.0]]), "y": jnp.array([1.0])}
      >>> scores, info = influence_scores(loss, jnp.array([2.0]), train, val, damping=1e-6)
      >>> scores.round(4)  # the point with y=1 agrees with the validation point: helpful
      Array([-1.,  1.], dtype=float32)

    Args:
      loss_fn: ``(params, batch) -> [B]`` per-example losses.
      params: parameter pytree at (or near) the training optimum.
      train_data: pytree of ``[N, ...]`` training arrays.
      val_data: pytree of validation arrays (its mean loss is the target).
      val_loss_fn: ``(params, batch) -> [B]`` validation loss (default ``loss_fn``).
      matvec: optional curvature product ``v -> H v`` (default: :func:`hvp` on
        ``train_data``).
      method, damping, **solver_options: passed to :func:`inverse_hvp`.
      chunk_size, mesh, axis_name: passed to :func:`per_example_jvp`.

    Returns:
      ``(scores [N], info)`` with ``info = {"s": s, "val_grad_norm": ||grad L_val||,
      "inverse_hvp": SolverDiagnostics}``.
    """
    _check_params(params)
    _batch_size(train_data, "train_data")
    _batch_size(val_data, "val_data")
    val_loss_fn = loss_fn if val_loss_fn is None else val_loss_fn
    g_val = jax.grad(_mean_loss(val_loss_fn, val_data))(params)
    if matvec is None:
        matvec = lambda v: hvp(loss_fn, params, train_data, v)  # noqa: E731
    s, diag = inverse_hvp(matvec, g_val, method, damping, **solver_options)
    d = per_example_jvp(loss_fn, params, train_data, s, chunk_size=chunk_size, mesh=mesh,
                        axis_name=axis_name)
    return -d, {"s": s, "val_grad_norm": otu.tree_norm(g_val), "inverse_hvp": diag}


# ----------------------------------------------------------------------- weights
def influence_weights(scores: chex.Array, mapping: str = "exp_minmax",
                      temperature: chex.Numeric = 1.0, normalize: bool = True,
                      higher_is_helpful: bool = False) -> chex.Array:
    r"""Maps influence scores to KD-AIF sample weights; helpful points weigh more.

    Let ``h = -scores`` (helpfulness; ``scores`` are :func:`influence_scores`'
    ``I_up,loss``, negative = helpful; pass ``higher_is_helpful=True`` for scores already
    oriented that way). Then

    * ``"exp_minmax"`` (the KD-AIF authors' code): ``u = 2 (h - min h) / (max h - min h)
      - 1`` in ``[-1, 1]``, ``w = exp(u / temperature)``; the code uses ``temperature =
      1`` (weights in ``[1/e, e]``).
    * ``"sigmoid"`` (the paper, sec. 3): ``w = sigmoid(z / temperature)`` with ``z = (h -
      mean h) / std h`` the standardised helpfulness. Standardising is our choice: raw
      scores scale with ``N`` and the curvature, so a sigmoid of them is meaningless.

    Both are non-decreasing in ``h``. With ``normalize`` the weights are divided by their
    mean (mean 1), so ``(1/B) sum_i w_i l_i`` keeps the loss scale
    (:func:`kdjax.losses._utils.reduce_per_example`). Constant scores give ``u = z = 0``:
    all ones after normalisation (no NaN).

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.influence import influence_weights
      >>> w = influence_weights(jnp.array([-1.0, 0.0, 1.0]))   # first point most helpful
      >>> bool(w[0] > w[1] > w[2]), round(float(w.mean()), 6)
      (True, 1.0)

    Args:
      scores: ``[N]`` influence scores.
      mapping: ``"exp_minmax"`` or ``"sigmoid"``.
      temperature: ``> 0``; larger flattens the weights.
      normalize: divide by the mean weight.
      higher_is_helpful: orientation of ``scores`` (default: Koh & Liang's, lower is
        helpful).

    Returns:
      ``[N]`` non-negative weights (float32 or wider).
    """
    check_float_array(scores, "scores", ndim=1)
    check_choice(mapping, "mapping", WEIGHT_MAPPINGS)
    check_positive(temperature, "temperature")
    check_finite(scores, "scores")
    h = scores.astype(_float_dtype(scores.dtype))
    if not higher_is_helpful:
        h = -h
    if mapping == "exp_minmax":
        lo, hi = jnp.min(h), jnp.max(h)
        rng = hi - lo
        u = jnp.where(rng > 0, 2.0 * (h - lo) / jnp.where(rng > 0, rng, 1.0) - 1.0, 0.0)
        w = jnp.exp(u / temperature)
    else:
        std = jnp.std(h)
        z = jnp.where(std > 0, (h - jnp.mean(h)) / jnp.where(std > 0, std, 1.0), 0.0)
        w = jax.nn.sigmoid(z / temperature)
    if normalize:
        w = w / jnp.maximum(jnp.mean(w), jnp.finfo(w.dtype).tiny)
    return w
