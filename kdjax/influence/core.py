r"""Influence functions for KD-AIF (arXiv 2501.02705), after Koh & Liang (2017).

Everything here is a pure function of a parameter pytree and arrays, usable under
``jax.jit``. Conventions used throughout:

* ``loss_fn(params, batch) -> [B]`` returns the **per-example** losses of a batch (a pytree
  of arrays whose leaves share the leading dimension ``B``). The training objective is the
  mean ``L(theta) = (1/N) sum_i l_i(theta)``; an L2 penalty ``(lambda/2)||theta||^2`` is
  *not* part of ``loss_fn`` but enters as the ``damping`` of the inverse Hessian.
  ``loss_fn`` must treat examples independently (no batch statistics: run BatchNorm in
  eval mode), because batches are chunked and padded.
* Curvature products ``matvec(v)`` map a params-shaped pytree to one of the same shape.
  :func:`hvp` (exact Hessian, forward-over-reverse) and :func:`ggn_vp` (Gauss-Newton,
  positive semi-definite; the default to use for networks, whose Hessian is indefinite
  away from a minimum) build them.
* :func:`inverse_hvp` solves ``(H + damping I) x = b`` with CG, LiSSA, low-rank Arnoldi
  or a dense solve; ``damping`` means the same ``lambda`` for every method.

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
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdjax._checks import (
    check_array,
    check_choice,
    check_finite,
    check_float_array,
    check_positive,
    is_concrete,
)

__all__ = [
    "per_example_losses",
    "hvp",
    "ggn_vp",
    "inverse_hvp",
    "per_example_jvp",
    "influence_scores",
    "influence_weights",
    "INVERSE_METHODS",
    "WEIGHT_MAPPINGS",
]

INVERSE_METHODS = ("cg", "lissa", "arnoldi", "dense")
WEIGHT_MAPPINGS = ("exp_minmax", "sigmoid")

LossFn = Callable[[Any, Any], chex.Array]
MatVec = Callable[[Any], Any]


# --------------------------------------------------------------------------- checks
def _check_params(params: Any, name: str = "params") -> None:
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError(f"{name} must be a non-empty pytree of arrays, got {params!r}.")
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(
                f"{name}{jax.tree_util.keystr(path)} must be a floating array, got "
                f"{getattr(leaf, 'dtype', type(leaf).__name__)}.")


def _check_like(tree: Any, ref: Any, name: str, ref_name: str = "params") -> None:
    """``tree`` must have ``ref``'s pytree structure and leaf shapes, floating dtype."""
    ts, rs = jax.tree_util.tree_structure(tree), jax.tree_util.tree_structure(ref)
    if ts != rs:
        raise ValueError(
            f"{name} must have the same pytree structure as {ref_name}, got {ts} for "
            f"{name} and {rs} for {ref_name}.")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree),
                            jax.tree_util.tree_leaves(ref)):
        if np.shape(a) != np.shape(b):
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} must have shape {np.shape(b)} like "
                f"{ref_name}, got {np.shape(a)}.")
        if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
            raise TypeError(
                f"{name}{jax.tree_util.keystr(path)} must be floating, got "
                f"{jnp.result_type(a)}.")


def _batch_size(batch: Any, name: str = "batch") -> int:
    leaves = jax.tree_util.tree_leaves_with_path(batch)
    if not leaves:
        raise ValueError(f"{name} must be a non-empty pytree of arrays, got {batch!r}.")
    sizes = {}
    for path, leaf in leaves:
        check_array(leaf, f"{name}{jax.tree_util.keystr(path)}", min_ndim=1)
        sizes[jax.tree_util.keystr(path)] = np.shape(leaf)[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(
            f"every leaf of {name} must have the same leading (example) dimension, got "
            f"{sizes}.")
    return next(iter(sizes.values()))


def _check_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _float_dtype(dtype):
    """At least float32 (bf16 inputs give float32 losses, float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)


# ------------------------------------------------------------------- basic products
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
    out = loss_fn(params, batch)
    check_float_array(out, "loss_fn(params, batch)")
    if np.shape(out) != (b,):
        raise ValueError(
            f"loss_fn(params, batch) must return per-example losses of shape ({b},) "
            f"(the batch's leading dimension), got shape {np.shape(out)}.")
    return out.astype(_float_dtype(out.dtype))


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
        values = output_loss_fn(o, batch)
        check_float_array(values, "output_loss_fn(outputs, batch)")
        if np.shape(values) != (b,):
            raise ValueError(
                f"output_loss_fn(outputs, batch) must return per-example losses of shape "
                f"({b},), got shape {np.shape(values)}.")
        return jnp.mean(values.astype(_float_dtype(values.dtype)))

    h_jv = jax.jvp(jax.grad(out_loss), (outputs,), (jv,))[1]
    _, f_vjp = jax.vjp(f, params)
    return f_vjp(h_jv)[0]


# ----------------------------------------------------------------- inverse products
def _relative_residual(matvec_damped, x, b):
    r = otu.tree_sub(b, matvec_damped(x))
    nb = otu.tree_norm(b)
    return otu.tree_norm(r) / jnp.maximum(nb, jnp.finfo(nb.dtype).tiny)


def _flat(matvec, b):
    b_flat, unravel = ravel_pytree(b)

    def mv(x):
        return ravel_pytree(matvec(unravel(x)))[0].astype(b_flat.dtype)

    return b_flat, unravel, mv


def _arnoldi(mv, v0, n_iter):
    """Arnoldi with full (twice classical Gram-Schmidt) re-orthogonalisation.

    Returns ``Q`` (``[n_iter + 1, P]``, orthonormal rows; a zero row after an exact
    breakdown) and the Hessenberg matrix ``[n_iter + 1, n_iter]`` with ``A Q_m^T =
    Q^T Hm``.
    """
    dim = v0.shape[0]
    q = jnp.zeros((n_iter + 1, dim), v0.dtype).at[0].set(v0 / jnp.linalg.norm(v0))
    hm = jnp.zeros((n_iter + 1, n_iter), v0.dtype)

    def body(j, carry):
        q, hm = carry
        w = mv(q[j])
        keep = (jnp.arange(n_iter + 1) <= j).astype(w.dtype)
        for _ in range(2):
            h = (q @ w) * keep
            w = w - h @ q
            hm = hm.at[:, j].add(h)
        norm = jnp.linalg.norm(w)
        hm = hm.at[j + 1, j].set(norm)
        q = q.at[j + 1].set(jnp.where(norm > 0, w / jnp.where(norm > 0, norm, 1.0), 0.0))
        return q, hm

    return jax.lax.fori_loop(0, n_iter, body, (q, hm))


def inverse_hvp(matvec: MatVec, b: Any, method: str = "cg", damping: chex.Numeric = 0.01,
                *, tol: float = 1e-5, maxiter: int = 200,
                scale: float = 25.0, depth: int = 1000,
                rank: int = 20, arnoldi_iters: int | None = None,
                arnoldi_complement: str = "drop", seed: int = 0,
                max_dense_size: int = 4096) -> tuple[Any, dict[str, chex.Array]]:
    r"""Solves ``(H + damping I) x = b`` for a pytree ``b``; returns ``(x, diagnostics)``.

    ``H`` is given only through ``matvec(v) = H v`` (e.g. ``lambda v: hvp(loss_fn, params,
    batch, v)`` or :func:`ggn_vp`); ``damping = lambda > 0`` is the same in every method
    (for an L2-regularised objective ``L + (lambda/2)||theta||^2`` it *is* the
    regulariser, so the solve is exact). Methods:

    * ``"cg"``: conjugate gradient on ``H + lambda I`` (``jax.scipy.sparse.linalg.cg``,
      pytree-native) with relative tolerance ``tol`` and ``maxiter`` iterations. Needs
      ``H + lambda I`` positive definite: use the GGN for non-convex networks.
      (Martens 2010; Koh & Liang 2017 sec. 3 use CG for their convex models.)
    * ``"lissa"``: the stochastic-Neumann recursion of Agarwal et al. 2017 as in Koh &
      Liang's / the KD-AIF authors' ``s_test``:
      ``h_0 = b``, ``h_j = b + (1 - d) h_{j-1} - H h_{j-1} / scale`` for ``j = 1..depth``,
      result ``x = h_depth / scale``, with ``d = lambda / scale``. Its fixed point is
      ``(H/scale + d I)^{-1} b / scale = (H + lambda I)^{-1} b``; it converges iff
      ``scale > lambda_max(H) + lambda``, the error contracting by
      ``1 - (lambda_min(H) + lambda) / scale`` per step. Reference defaults:
      ``damp = 0.01``, ``scale = 25``, ``recursion_depth = 5000``, i.e. ``lambda =
      0.25`` in our parameterisation. Deviation: the reference draws a fresh
      training minibatch for each step; here ``matvec`` is fixed (deterministic).
    * ``"arnoldi"``: low-rank inverse of Schioppa et al. 2022 (arXiv 2112.03052):
      ``arnoldi_iters`` (default ``min(P, 2 rank)``) Arnoldi steps on ``H`` from a random
      start (``seed``), eigen-decomposition of the (symmetrised) Hessenberg matrix, keep
      the ``rank`` Ritz pairs ``(lambda_k, u_k)`` of largest ``|lambda_k|`` and return
      ``x = sum_k u_k (u_k^T b) / (lambda_k + lambda)``. ``arnoldi_complement="drop"``
      (Schioppa: gradients projected on the top subspace) ignores the rest;
      ``"damping"`` adds ``(b - U U^T b) / lambda`` (treats the remaining eigenvalues as 0).
      Exact when ``rank`` equals the parameter count. Memory ``O(arnoldi_iters * P)``.
    * ``"dense"``: materialises ``H`` (``P`` matvecs on the flattened parameters), then
      ``x = V diag(1 / (e + lambda)) V^T b`` from ``eigh`` of the symmetrised matrix.
      Refuses ``P > max_dense_size`` with a ``ValueError``.

    All methods are jit-compatible (call ``inverse_hvp`` inside a jitted function; the
    method and the integer knobs are static).

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.influence import inverse_hvp
      >>> a = jnp.array([[2.0, 0.0], [0.0, 4.0]])
      >>> x, info = inverse_hvp(lambda v: a @ v, jnp.ones(2), "cg", damping=1.0)
      >>> x
      Array([0.33333334, 0.2       ], dtype=float32)

    Args:
      matvec: ``v -> H v`` on pytrees shaped like ``b``.
      b: right-hand side pytree (e.g. the validation-loss gradient).
      method: one of ``"cg"``, ``"lissa"``, ``"arnoldi"``, ``"dense"``.
      damping: ``lambda > 0`` added to the diagonal.
      tol, maxiter: CG relative tolerance and iteration cap.
      scale, depth: LiSSA scale (> ``lambda_max(H) + lambda``) and number of steps.
      rank, arnoldi_iters, arnoldi_complement, seed: Arnoldi knobs (see above).
      max_dense_size: largest parameter count the dense solve accepts.

    Returns:
      ``(x, diagnostics)``: ``x`` shaped like ``b``; ``diagnostics`` always holds
      ``"relative_residual"`` ``||(H + lambda I) x - b|| / ||b||`` (one extra matvec), and
      per method: cg ``"converged"`` (relative residual <= ``max(2 tol, 100 eps)``; jax's
      ``cg`` does not report its iteration count); lissa ``"last_update"`` (relative size
      of the last step); arnoldi ``"eigenvalues"`` (kept Ritz values, descending by magnitude); dense
      ``"eigenvalues"`` (all of ``H``, ascending).
    """
    check_choice(method, "method", INVERSE_METHODS)
    check_positive(damping, "damping")
    if not callable(matvec):
        raise TypeError(f"matvec must be callable (v -> H v), got {type(matvec).__name__}.")
    _check_params(b, "b")
    check_finite(ravel_pytree(b)[0], "b")
    hb = jax.eval_shape(matvec, b)
    _check_like(hb, b, "matvec(b)", "b")

    def damped(v):
        return otu.tree_add_scale(matvec(v), damping, v)

    diag: dict[str, chex.Array] = {}
    if method == "cg":
        check_positive(tol, "tol")
        maxiter = _check_int(maxiter, "maxiter")
        x, _ = jax.scipy.sparse.linalg.cg(damped, b, tol=tol, maxiter=maxiter)
        res = _relative_residual(damped, x, b)
        # jax's cg does not expose its iteration count; "converged" reports whether the
        # true relative residual reached tol (up to rounding: 100 ulp of the dtype).
        eps = jnp.finfo(res.dtype).eps
        diag["converged"] = res <= jnp.maximum(2.0 * tol, 100.0 * eps)
    elif method == "lissa":
        check_positive(scale, "scale")
        depth = _check_int(depth, "depth")
        if is_concrete(damping) and is_concrete(scale) and not float(damping) < float(scale):
            raise ValueError(f"damping must be < scale for LiSSA to converge, got damping="
                             f"{float(damping)} and scale={scale}.")

        def step(_, carry):
            h, _ = carry
            new = otu.tree_add(b, otu.tree_sub(h, otu.tree_scale(1.0 / scale, damped(h))))
            return new, otu.tree_norm(otu.tree_sub(new, h)) / jnp.maximum(
                otu.tree_norm(new), jnp.finfo(jnp.float32).tiny)

        h, last = jax.lax.fori_loop(0, depth, step, (b, jnp.zeros((), jnp.float32)))
        x = otu.tree_scale(1.0 / scale, h)
        diag["last_update"] = last
    elif method == "arnoldi":
        check_choice(arnoldi_complement, "arnoldi_complement", ("drop", "damping"))
        b_flat, unravel, mv = _flat(matvec, b)
        dim = b_flat.shape[0]
        rank = _check_int(rank, "rank")
        if rank > dim:
            raise ValueError(f"rank must be <= the parameter count {dim}, got {rank}.")
        n_iter = min(dim, 2 * rank) if arnoldi_iters is None else _check_int(
            arnoldi_iters, "arnoldi_iters")
        if not rank <= n_iter <= dim:
            raise ValueError(f"arnoldi_iters must be in [rank={rank}, parameter count="
                             f"{dim}], got {n_iter}.")
        v0 = jax.random.normal(jax.random.key(seed), (dim,), b_flat.dtype)
        q, hm = _arnoldi(mv, v0, n_iter)
        t = hm[:n_iter, :n_iter]
        evals, evecs = jnp.linalg.eigh(0.5 * (t + t.T))
        top = jnp.argsort(-jnp.abs(evals))[:rank]
        lam, u = evals[top], q[:n_iter].T @ evecs[:, top]  # [rank], [P, rank]
        coef = u.T @ b_flat
        x_flat = u @ (coef / (lam + damping))
        if arnoldi_complement == "damping":
            x_flat = x_flat + (b_flat - u @ coef) / damping
        x = unravel(x_flat)
        diag["eigenvalues"] = lam
    else:  # dense
        b_flat, unravel, mv = _flat(matvec, b)
        dim = b_flat.shape[0]
        if dim > max_dense_size:
            raise ValueError(
                f"method='dense' materialises a {dim} x {dim} matrix; the parameter count "
                f"{dim} exceeds max_dense_size={max_dense_size}. Use method='cg', 'lissa' "
                f"or 'arnoldi', or raise max_dense_size.")
        eye = jnp.eye(dim, dtype=b_flat.dtype)
        h = jax.lax.map(mv, eye, batch_size=min(dim, 256))  # rows: (H e_i)^T = H^T
        evals, evecs = jnp.linalg.eigh(0.5 * (h + h.T))
        x = unravel(evecs @ ((evecs.T @ b_flat) / (evals + damping)))
        diag["eigenvalues"] = evals
    diag["relative_residual"] = _relative_residual(damped, x, b)
    return x, diag


# ----------------------------------------------------------------------- scores
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
                     matvec: MatVec | None = None, method: str = "cg",
                     damping: chex.Numeric = 0.01, chunk_size: int = 1024,
                     mesh: Mesh | None = None, axis_name: str = "data",
                     **solver_options) -> tuple[chex.Array, dict[str, Any]]:
    r"""Koh & Liang influence ``I_up,loss(z_i)`` of every training point on the val loss.

    .. math::
        s = (H + \lambda I)^{-1} \nabla_\theta L_{val}, \qquad
        \mathcal{I}_{up,loss}(z_i) = -\nabla_\theta l_i^\top s
        \quad (i = 1..N),

    with ``L_val = mean_j loss_fn(params, val_data)_j`` and ``H`` the curvature of the
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
      matvec: optional curvature product ``v -> H v`` (default: :func:`hvp` on
        ``train_data``).
      method, damping, **solver_options: passed to :func:`inverse_hvp`.
      chunk_size, mesh, axis_name: passed to :func:`per_example_jvp`.

    Returns:
      ``(scores [N], info)`` with ``info = {"s": s, "val_grad_norm": ||grad L_val||,
      "inverse_hvp": diagnostics}``.
    """
    _check_params(params)
    _batch_size(train_data, "train_data")
    _batch_size(val_data, "val_data")
    g_val = jax.grad(_mean_loss(loss_fn, val_data))(params)
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
