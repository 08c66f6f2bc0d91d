r"""Damped inverse curvature products: solve ``(H + lambda I) x = b`` for a pytree ``b``.

``H`` is given only through ``matvec(v) = H v`` (:mod:`kdjax.influence.curvature`);
``damping = lambda > 0`` means the same thing in every solver (for an L2-regularised
objective ``L + (lambda/2)||theta||^2`` it *is* the regulariser, so the solve is exact).
Four solvers, one function each, all returning ``(x, SolverDiagnostics)``:

* :func:`cg`: conjugate gradient (Hestenes & Stiefel 1952); needs ``H + lambda I``
  positive definite (use the Gauss-Newton product for networks).
* :func:`lissa`: the stochastic-Neumann recursion of Agarwal et al. 2017, as in Koh &
  Liang's and the KD-AIF authors' ``s_test``.
* :func:`arnoldi`: the low-rank inverse of Schioppa et al. 2022 (arXiv 2112.03052),
  with breakdown handling; exact at full rank.
* :func:`direct`: materialises ``H`` and solves through its eigen-decomposition.

:func:`inverse_hvp` is a thin dispatcher over them (``method=`` one of
:data:`INVERSE_METHODS`). All are jit-compatible (the integer knobs are static).
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

from kdjax._checks import check_choice, check_finite, check_positive, is_concrete
from kdjax.influence._validate import _check_int, _check_like, _check_params
from kdjax.influence.curvature import MatVec

__all__ = [
    "SolverDiagnostics",
    "cg",
    "lissa",
    "arnoldi",
    "direct",
    "inverse_hvp",
    "INVERSE_METHODS",
]

INVERSE_METHODS = ("cg", "lissa", "arnoldi", "direct")


class SolverDiagnostics(NamedTuple):
    """What every solver reports (a pytree: returnable from ``jax.jit``).

    Attributes:
      relative_residual: ``||(H + lambda I) x - b|| / ||b||`` of the returned ``x``
        (one extra matvec; 0 for ``b = 0``).
      iterations: matvecs of the method proper: CG iterations run, LiSSA ``depth``,
        Arnoldi steps, ``P`` for the direct solve.
      converged: ``relative_residual <= max(tol, 100 eps)`` with the solver's ``tol``
        (``eps`` of the dtype). A low-rank Arnoldi solve is an approximation by design
        and usually reports ``False``.
      eigenvalues: Arnoldi: the kept Ritz values (descending by magnitude); direct: all
        eigenvalues of ``H`` (ascending); ``None`` for CG and LiSSA.
      breakdowns: Arnoldi: number of Krylov breakdowns (restarts with a fresh vector);
        0 for the other solvers.
    """

    relative_residual: chex.Array
    iterations: chex.Array
    converged: chex.Array
    eigenvalues: chex.Array | None = None
    breakdowns: chex.Array | int = 0


# ------------------------------------------------------------------ shared pieces
def _prepare(matvec, b, damping):
    """Checks the common arguments; returns the damped product ``v -> (H + lambda I) v``."""
    check_positive(damping, "damping")
    if not callable(matvec):
        raise TypeError(f"matvec must be callable (v -> H v), got {type(matvec).__name__}.")
    _check_params(b, "b")
    check_finite(ravel_pytree(b)[0], "b")
    _check_like(jax.eval_shape(matvec, b), b, "matvec(b)", "b")
    return lambda v: otu.tree_add_scale(matvec(v), damping, v)


def _diagnostics(damped, x, b, tol, iterations, eigenvalues=None, breakdowns=0):
    r = otu.tree_sub(b, damped(x))
    nb = otu.tree_norm(b)
    res = otu.tree_norm(r) / jnp.maximum(nb, jnp.finfo(nb.dtype).tiny)
    eps = jnp.finfo(res.dtype).eps
    return SolverDiagnostics(
        relative_residual=res, iterations=jnp.asarray(iterations, jnp.int32),
        converged=res <= jnp.maximum(tol, 100.0 * eps), eigenvalues=eigenvalues,
        breakdowns=jnp.asarray(breakdowns, jnp.int32))


def _flat(matvec, b):
    b_flat, unravel = ravel_pytree(b)

    def mv(x):
        return ravel_pytree(matvec(unravel(x)))[0].astype(b_flat.dtype)

    return b_flat, unravel, mv


# ------------------------------------------------------------------------ solvers
def cg(matvec: MatVec, b: Any, damping: chex.Numeric = 0.01, *, tol: float = 1e-5,
       maxiter: int = 200) -> tuple[Any, SolverDiagnostics]:
    r"""Conjugate gradient on ``(H + lambda I) x = b``, pytree-native.

    .. math::
        x_0 = 0,\ r_0 = p_0 = b;\quad \alpha_k = \frac{r_k^\top r_k}{p_k^\top A p_k},\
        x_{k+1} = x_k + \alpha_k p_k,\ r_{k+1} = r_k - \alpha_k A p_k,\
        p_{k+1} = r_{k+1} + \frac{r_{k+1}^\top r_{k+1}}{r_k^\top r_k} p_k

    with ``A = H + lambda I`` (Hestenes & Stiefel 1952; Martens 2010; Koh & Liang 2017
    sec. 3 use CG for their convex models), stopped when ``||r_k|| <= tol ||b||``, after
    ``maxiter`` iterations, or when ``p^T A p <= 0`` (``A`` not positive definite along
    ``p``: an indefinite Hessian; then the iterate is returned as it stands and the
    residual says how good it is). Deviation from ``jax.scipy.sparse.linalg.cg``
    (same recursion): this loop reports its iteration count, which jax's does not.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.influence import cg
      >>> a = jnp.array([[2.0, 0.0], [0.0, 4.0]])
      >>> x, info = cg(lambda v: a @ v, jnp.ones(2), damping=1.0)
      >>> x, int(info.iterations), bool(info.converged)
      (Array([0.33333334, 0.2       ], dtype=float32), 2, True)

    Args:
      matvec: ``v -> H v`` on pytrees shaped like ``b``.
      b: right-hand side pytree.
      damping: ``lambda > 0``.
      tol: relative residual at which to stop.
      maxiter: iteration cap.

    Returns:
      ``(x, SolverDiagnostics)``.
    """
    damped = _prepare(matvec, b, damping)
    check_positive(tol, "tol")
    maxiter = _check_int(maxiter, "maxiter")
    nb2 = otu.tree_vdot(b, b)
    stop2 = (tol ** 2) * nb2

    def cond(c):
        k, _, _, _, rs, ok = c
        return (k < maxiter) & (rs > stop2) & ok

    def body(c):
        k, x, r, p, rs, _ = c
        ap = damped(p)
        pap = otu.tree_vdot(p, ap)
        ok = pap > 0
        alpha = jnp.where(ok, rs / jnp.where(ok, pap, 1.0), 0.0)
        x = otu.tree_add_scale(x, alpha, p)
        r = otu.tree_add_scale(r, -alpha, ap)
        rs_new = otu.tree_vdot(r, r)
        p = otu.tree_add_scale(r, rs_new / jnp.maximum(rs, jnp.finfo(rs.dtype).tiny), p)
        return k + ok.astype(k.dtype), x, r, p, rs_new, ok

    init = (jnp.zeros((), jnp.int32), otu.tree_zeros_like(b), b, b, nb2, jnp.array(True))
    k, x, *_ = jax.lax.while_loop(cond, body, init)
    return x, _diagnostics(damped, x, b, tol, k)


def lissa(matvec: MatVec, b: Any, damping: chex.Numeric = 0.01, *, scale: float = 25.0,
          depth: int = 1000, tol: float = 1e-5) -> tuple[Any, SolverDiagnostics]:
    r"""LiSSA: the truncated Neumann recursion of Agarwal et al. 2017 (Koh & Liang ``s_test``).

    .. math::
        h_0 = b,\quad h_j = b + (1 - d)\, h_{j-1} - H h_{j-1} / s \ (j = 1..depth),\quad
        x = h_{depth} / s,\qquad d = \lambda / s .

    Its fixed point is ``(H/s + d I)^{-1} b / s = (H + lambda I)^{-1} b``; it converges
    iff ``s > lambda_max(H) + lambda``, the error contracting by ``1 - (lambda_min(H) +
    lambda) / s`` per step. Reference defaults (Koh & Liang / KD-AIF code): ``damp =
    0.01``, ``scale = 25``, ``recursion_depth = 5000``, i.e. ``lambda = 0.25`` in this
    parameterisation. Deviation: the reference draws a fresh training minibatch for each
    step; here ``matvec`` is fixed (deterministic).

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.influence import lissa
      >>> a = jnp.array([[2.0, 0.0], [0.0, 4.0]])
      >>> x, info = lissa(lambda v: a @ v, jnp.ones(2), damping=1.0, scale=6.0, depth=200)
      >>> [round(float(v), 5) for v in x], bool(info.converged)
      ([0.33333, 0.2], True)

    Args:
      matvec: ``v -> H v``.
      b: right-hand side pytree.
      damping: ``lambda > 0`` (``< scale``).
      scale: ``s > lambda_max(H) + lambda``.
      depth: number of recursion steps.
      tol: relative residual reported as converged.

    Returns:
      ``(x, SolverDiagnostics)``.
    """
    damped = _prepare(matvec, b, damping)
    check_positive(scale, "scale")
    check_positive(tol, "tol")
    depth = _check_int(depth, "depth")
    if is_concrete(damping) and not float(damping) < float(scale):
        raise ValueError(f"damping must be < scale for LiSSA to converge, got damping="
                         f"{float(damping)} and scale={scale}.")

    def step(_, h):
        return otu.tree_add(b, otu.tree_sub(h, otu.tree_scale(1.0 / scale, damped(h))))

    x = otu.tree_scale(1.0 / scale, jax.lax.fori_loop(0, depth, step, b))
    return x, _diagnostics(damped, x, b, tol, depth)


def _orthogonalise(w, q, keep):
    """Twice classical Gram-Schmidt of ``w`` against the rows of ``q`` where ``keep``."""
    coef = jnp.zeros(q.shape[0], w.dtype)
    for _ in range(2):
        h = (q @ w) * keep
        w = w - h @ q
        coef = coef + h
    return w, coef


def _arnoldi_basis(mv, v0, n_iter, key, breakdown_tol):
    r"""Arnoldi with full re-orthogonalisation and restart on breakdown.

    Returns ``Q`` (``[n_iter + 1, P]``, orthonormal rows), the Hessenberg matrix
    ``[n_iter + 1, n_iter]`` with ``A Q_m^T = Q^T H_m`` and the number of breakdowns. At
    step ``j`` the new direction ``w = A q_j - sum_k h_kj q_k`` is a breakdown when
    ``||w|| <= breakdown_tol ||A q_j||`` (the Krylov space is invariant up to rounding);
    then ``h_{j+1,j} = 0`` and ``q_{j+1}`` is a fresh random vector orthogonalised
    against the basis (the process continues in a new Krylov space). Normalising the
    rounding noise instead (the plain recursion) loses orthogonality.
    """
    dim = v0.shape[0]
    q = jnp.zeros((n_iter + 1, dim), v0.dtype).at[0].set(v0 / jnp.linalg.norm(v0))
    hm = jnp.zeros((n_iter + 1, n_iter), v0.dtype)
    tiny = jnp.finfo(v0.dtype).tiny

    def body(j, carry):
        q, hm, breaks = carry
        w = mv(q[j])
        size = jnp.linalg.norm(w)
        keep = (jnp.arange(n_iter + 1) <= j).astype(w.dtype)
        w, h = _orthogonalise(w, q, keep)
        hm = hm.at[:, j].add(h)
        norm = jnp.linalg.norm(w)
        broke = norm <= breakdown_tol * size
        z, _ = _orthogonalise(jax.random.normal(jax.random.fold_in(key, j), (dim,),
                                                v0.dtype), q, keep)
        zn = jnp.linalg.norm(z)
        fresh = jnp.where(zn > tiny, z / jnp.maximum(zn, tiny), 0.0)
        nxt = jnp.where(broke, fresh, w / jnp.maximum(norm, tiny))
        hm = hm.at[j + 1, j].set(jnp.where(broke, 0.0, norm))
        return q.at[j + 1].set(nxt), hm, breaks + broke.astype(jnp.int32)

    return jax.lax.fori_loop(0, n_iter, body, (q, hm, jnp.zeros((), jnp.int32)))


def arnoldi(matvec: MatVec, b: Any, damping: chex.Numeric = 0.01, *, rank: int = 20,
            iters: int | None = None, complement: str = "drop",
            key: jax.Array | None = None, breakdown_tol: float | None = None,
            tol: float = 1e-5) -> tuple[Any, SolverDiagnostics]:
    r"""Low-rank inverse from Arnoldi (Schioppa et al. 2022, arXiv 2112.03052, alg. 1-2).

    ``m = iters`` (default ``min(P, 2 rank)``) Arnoldi steps on ``H`` from a random
    start (``key``) give an orthonormal basis ``Q_m`` and ``T = Q_m H Q_m^T``; with the
    eigen-decomposition of ``(T + T^T)/2`` the ``rank`` Ritz pairs ``(lambda_k, u_k)`` of
    largest ``|lambda_k|`` are kept and

    .. math::
        x = \sum_k u_k \frac{u_k^\top b}{\lambda_k + \lambda}
            \quad [+ (b - U U^\top b)/\lambda \ \text{with complement="damping"}] .

    ``complement="drop"`` (Schioppa: gradients projected on the top subspace) ignores the
    rest; ``"damping"`` treats the remaining eigenvalues as 0.

    Breakdown (deviation, needed for exactness): when the Krylov space of the start
    vector is exhausted, e.g. for a Hessian with all-zero rows (dead units, unused
    parameters), the new direction is rounding noise; it is detected by the relative
    test ``||w|| <= breakdown_tol ||H q_j||`` (default ``1000 eps`` of the dtype) and the
    process restarts from a fresh random vector orthogonal to the basis (``h_{j+1,j} =
    0``). So ``Q_m`` stays orthonormal, and with ``rank = iters = P`` the solve is exact
    (up to rounding) for any symmetric ``H``, singular or not; ``diagnostics.breakdowns``
    counts the restarts. Memory ``O(iters * P)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.influence import arnoldi
      >>> a = jnp.diag(jnp.array([0.0, 0.0, 2.0]))            # singular PSD
      >>> x, info = arnoldi(lambda v: a @ v, jnp.ones(3), damping=1.0, rank=3)
      >>> x.round(5), int(info.breakdowns) >= 1
      (Array([1.     , 1.     , 0.33333], dtype=float32), True)

    Args:
      matvec: ``v -> H v`` (``H`` symmetric).
      b: right-hand side pytree.
      damping: ``lambda > 0``.
      rank: Ritz pairs kept (``<= P``).
      iters: Arnoldi steps, in ``[rank, P]``.
      complement: ``"drop"`` or ``"damping"``.
      key: PRNG key of the start and restart vectors (default ``jax.random.key(0)``).
      breakdown_tol: relative breakdown threshold (default ``1000 eps``).
      tol: relative residual reported as converged.

    Returns:
      ``(x, SolverDiagnostics)``.
    """
    damped = _prepare(matvec, b, damping)
    check_choice(complement, "complement", ("drop", "damping"))
    check_positive(tol, "tol")
    b_flat, unravel, mv = _flat(matvec, b)
    dim = b_flat.shape[0]
    rank = _check_int(rank, "rank")
    if rank > dim:
        raise ValueError(f"rank must be <= the parameter count {dim}, got {rank}.")
    n_iter = min(dim, 2 * rank) if iters is None else _check_int(iters, "iters")
    if not rank <= n_iter <= dim:
        raise ValueError(f"iters must be in [rank={rank}, parameter count={dim}], got "
                         f"{n_iter}.")
    if breakdown_tol is None:
        breakdown_tol = 1e3 * float(jnp.finfo(b_flat.dtype).eps)
    check_positive(breakdown_tol, "breakdown_tol")
    key = jax.random.key(0) if key is None else key
    k0, k1 = jax.random.split(key)
    v0 = jax.random.normal(k0, (dim,), b_flat.dtype)
    q, hm, breaks = _arnoldi_basis(mv, v0, n_iter, k1, breakdown_tol)
    t = hm[:n_iter, :n_iter]
    evals, evecs = jnp.linalg.eigh(0.5 * (t + t.T))
    top = jnp.argsort(-jnp.abs(evals))[:rank]
    lam, u = evals[top], q[:n_iter].T @ evecs[:, top]  # [rank], [P, rank]
    coef = u.T @ b_flat
    x_flat = u @ (coef / (lam + damping))
    if complement == "damping":
        x_flat = x_flat + (b_flat - u @ coef) / damping
    x = unravel(x_flat)
    return x, _diagnostics(damped, x, b, tol, n_iter, lam, breaks)


def direct(matvec: MatVec, b: Any, damping: chex.Numeric = 0.01, *,
           max_size: int = 4096, tol: float = 1e-5) -> tuple[Any, SolverDiagnostics]:
    r"""Dense solve: materialise ``H`` (``P`` matvecs), then its eigen-decomposition.

    .. math::
        x = V \,\mathrm{diag}\big(1 / (e + \lambda)\big)\, V^\top b,
        \qquad (H + H^\top)/2 = V \mathrm{diag}(e) V^\top .

    Symmetrising absorbs rounding asymmetry of the products; the eigen route (rather
    than an LU solve) also returns the spectrum. Refuses ``P > max_size`` with a
    ``ValueError``. The reference for the other solvers on small problems.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.influence import direct
      >>> a = jnp.array([[2.0, 0.0], [0.0, 4.0]])
      >>> x, info = direct(lambda v: a @ v, jnp.ones(2), damping=1.0)
      >>> x.round(6), info.eigenvalues
      (Array([0.333333, 0.2     ], dtype=float32), Array([2., 4.], dtype=float32))

    Args:
      matvec: ``v -> H v``.
      b: right-hand side pytree.
      damping: ``lambda > 0``.
      max_size: largest parameter count accepted.
      tol: relative residual reported as converged.

    Returns:
      ``(x, SolverDiagnostics)``.
    """
    damped = _prepare(matvec, b, damping)
    check_positive(tol, "tol")
    b_flat, unravel, mv = _flat(matvec, b)
    dim = b_flat.shape[0]
    if dim > max_size:
        raise ValueError(
            f"the direct solve materialises a {dim} x {dim} matrix; the parameter count "
            f"{dim} exceeds max_size={max_size}. Use method='cg', 'lissa' or 'arnoldi', "
            f"or raise max_size.")
    eye = jnp.eye(dim, dtype=b_flat.dtype)
    h = jax.lax.map(mv, eye, batch_size=min(dim, 256))  # rows: (H e_i)^T = H^T
    evals, evecs = jnp.linalg.eigh(0.5 * (h + h.T))
    x = unravel(evecs @ ((evecs.T @ b_flat) / (evals + damping)))
    return x, _diagnostics(damped, x, b, tol, dim, evals)


_SOLVERS = {"cg": cg, "lissa": lissa, "arnoldi": arnoldi, "direct": direct}


def inverse_hvp(matvec: MatVec, b: Any, method: str = "cg", damping: chex.Numeric = 0.01,
                **options) -> tuple[Any, SolverDiagnostics]:
    r"""Solves ``(H + damping I) x = b`` with the solver ``method``; ``(x, diagnostics)``.

    A dispatcher: ``inverse_hvp(matvec, b, "arnoldi", 0.01, rank=30)`` is
    ``arnoldi(matvec, b, 0.01, rank=30)``; see :func:`cg`, :func:`lissa`,
    :func:`arnoldi` and :func:`direct` for the math and the options of each. An option
    the chosen solver does not take raises a ``TypeError`` that lists the valid ones.

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
      method: one of :data:`INVERSE_METHODS`.
      damping: ``lambda > 0`` added to the diagonal.
      **options: keyword options of the chosen solver.

    Returns:
      ``(x, SolverDiagnostics)``.
    """
    check_choice(method, "method", INVERSE_METHODS)
    solver = _SOLVERS[method]
    valid = [n for n, p in inspect.signature(solver).parameters.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY]
    bad = sorted(set(options) - set(valid))
    if bad:
        raise TypeError(f"invalid options {bad} for method {method!r}; valid options are "
                        f"{valid}.")
    return solver(matvec, b, damping, **options)
