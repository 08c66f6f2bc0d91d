"""Tests for kdjax.influence.solvers: every solver against numpy.linalg.solve on
well-conditioned, singular and ill-conditioned PSD matrices (float32 and float64), the
LiSSA reference recursion, Arnoldi breakdown, the shared diagnostics and the dispatcher."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from _influence_helpers import flat, rel_err  # noqa: E402
from kdjax.influence import arnoldi, cg, direct, inverse_hvp, lissa, SolverDiagnostics


# -------------------------------------------------------------------- solvers
def spd_problem(eigs, seed=0):
    """A pytree problem: params {"a": [3, 4], "b": [len - 12]}, H = Q diag(eigs) Q^T."""
    rng = np.random.default_rng(seed)
    dim = len(eigs)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    a = (q * np.asarray(eigs)) @ q.T
    template = {"a": jnp.zeros((3, 4)), "b": jnp.zeros((dim - 12,))}
    _, unravel = ravel_pytree(template)
    a_j = jnp.asarray(a, jnp.float32)
    matvec = lambda v: unravel(a_j @ ravel_pytree(v)[0])  # noqa: E731
    b_vec = rng.normal(size=dim)
    return a, matvec, unravel(jnp.asarray(b_vec, jnp.float32)), b_vec, q


DAMP = 0.1


@pytest.fixture(scope="module")
def spd():
    return spd_problem(np.logspace(-2, 1, 17))


def exact(a, b_vec, damping=DAMP):
    return np.linalg.solve(a + damping * np.eye(len(b_vec)), b_vec)


@pytest.mark.parametrize("use_jit", [False, True])
def test_cg_matches_exact(spd, use_jit):
    a, matvec, b, b_vec, _ = spd
    solve = lambda b: inverse_hvp(matvec, b, "cg", DAMP, tol=1e-6, maxiter=500)  # noqa
    x, info = (jax.jit(solve) if use_jit else solve)(b)
    assert jax.tree_util.tree_structure(x) == jax.tree_util.tree_structure(b)
    assert rel_err(flat(x), exact(a, b_vec)) < 1e-4
    assert float(info.relative_residual) < 1e-5 and bool(info.converged)


def test_lissa_matches_exact(spd):
    # scale 12 > lambda_max + damping = 10.1; contraction 1 - 0.11/12 per step, so 2000
    # steps leave ~1e-8 of the initial error; float32 rounding gives the 1e-3 tolerance.
    a, matvec, b, b_vec, _ = spd
    x, info = jax.jit(lambda b: inverse_hvp(matvec, b, "lissa", DAMP, scale=12.0,
                                            depth=2000))(b)
    assert rel_err(flat(x), exact(a, b_vec)) < 1e-3
    # Too few steps visibly does not converge (the check can fail).
    x_short, _ = inverse_hvp(matvec, b, "lissa", DAMP, scale=12.0, depth=20)
    assert rel_err(flat(x_short), exact(a, b_vec)) > 0.1


def test_lissa_equals_reference_recursion(spd):
    # The KD-AIF / Koh & Liang recursion with damp d and scale s solves (H + d*s I)x = b.
    a, matvec, b, b_vec, _ = spd
    d_ref, s_ref, depth = 0.01, 12.0, 50
    h = b_vec.copy()
    for _ in range(depth):
        h = b_vec + (1 - d_ref) * h - a @ h / s_ref
    x, _ = inverse_hvp(matvec, b, "lissa", d_ref * s_ref, scale=s_ref, depth=depth)
    assert rel_err(flat(x), h / s_ref) < 1e-4


def test_arnoldi_full_rank_is_exact(spd):
    a, matvec, b, b_vec, _ = spd
    x, info = jax.jit(lambda b: inverse_hvp(matvec, b, "arnoldi", DAMP, rank=17,
                                            iters=17))(b)
    assert rel_err(flat(x), exact(a, b_vec)) < 1e-4
    np.testing.assert_allclose(np.sort(info.eigenvalues), np.logspace(-2, 1, 17),
                               rtol=1e-3, atol=1e-5)


def test_arnoldi_low_rank_projects_on_top_eigenspace():
    eigs = np.concatenate([[10.0, 8.0, 6.0, 4.0, 2.0], np.linspace(1e-3, 2e-3, 12)])
    a, matvec, b, b_vec, q = spd_problem(eigs, seed=1)
    u = q[:, :5]  # top-5 eigenvectors (eigs sorted descending)
    coef = u.T @ b_vec
    drop = u @ (coef / (eigs[:5] + DAMP))
    x, info = jax.jit(lambda b: inverse_hvp(matvec, b, "arnoldi", DAMP, rank=5,
                                            iters=12))(b)
    assert rel_err(flat(x), drop) < 1e-3
    np.testing.assert_allclose(np.sort(info.eigenvalues), np.sort(eigs[:5]), rtol=1e-4)
    # complement="damping": tail eigenvalues (<= 2e-3) treated as 0, so vs the exact
    # damped inverse the error is at most 2e-3 / (0.1 + 2e-3) ~ 2%.
    x2, _ = jax.jit(lambda b: inverse_hvp(matvec, b, "arnoldi", DAMP, rank=5,
                                          iters=12, complement="damping"))(b)
    assert rel_err(flat(x2), exact(a, b_vec)) < 0.02
    assert rel_err(flat(x2), drop + (b_vec - u @ coef) / DAMP) < 1e-3


def test_direct_is_exact_and_refuses_large(spd):
    a, matvec, b, b_vec, _ = spd
    x, info = jax.jit(lambda b: inverse_hvp(matvec, b, "direct", DAMP))(b)
    assert rel_err(flat(x), exact(a, b_vec)) < 1e-5
    np.testing.assert_allclose(info.eigenvalues, np.logspace(-2, 1, 17), rtol=1e-4,
                               atol=1e-6)
    with pytest.raises(ValueError, match="exceeds max_size=10"):
        inverse_hvp(matvec, b, "direct", DAMP, max_size=10)


def test_solver_bad_inputs(spd):
    _, matvec, b, _, _ = spd
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="damping must be > 0"):
            inverse_hvp(matvec, b, "cg", bad)
    with pytest.raises(ValueError, match=r"\['arnoldi', 'cg', 'direct', 'lissa'\].*'newton'"):
        inverse_hvp(matvec, b, "newton")
    with pytest.raises(ValueError, match="same pytree structure"):
        inverse_hvp(lambda v: {"a": v["a"]}, b)
    with pytest.raises(ValueError, match="damping must be < scale"):
        inverse_hvp(matvec, b, "lissa", 30.0, scale=25.0)
    with pytest.raises(ValueError, match="rank must be <= the parameter count 17"):
        inverse_hvp(matvec, b, "arnoldi", rank=18)
    with pytest.raises(ValueError, match="b must be finite"):
        inverse_hvp(matvec, {"a": jnp.full((3, 4), jnp.nan), "b": b["b"]})



# ------------------------------- singular and ill-conditioned Hessians vs numpy
def singular_hessian(dtype):
    """The issue-16 case: H = X^T X / 200 with 6 always-zero features (6 zero rows and
    columns) and skewed features (eigenvalues from ~1e-3 down to 0)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(200, 30)) ** 3
    x[:, :6] = 0.0
    return x.T @ x / 200, rng.normal(size=30)


def ill_conditioned_hessian(dtype):
    """H = Q diag(e) Q^T with e from 1e2 down to 1e-8 (condition number 1e10), PSD."""
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(24, 24)))
    return (q * np.logspace(2, -8, 24)) @ q.T, rng.normal(size=24)


def _reference(h, b, damping):
    # Independent references: LU solve, and the pseudo-inverse route for the singular
    # case (H + lambda I)^{-1} = V diag(1/(e + lambda)) V^T agrees with it.
    x = np.linalg.solve(h + damping * np.eye(len(b)), b)
    np.testing.assert_allclose(np.linalg.lstsq(h + damping * np.eye(len(b)), b, rcond=None)[0],
                               x, rtol=1e-8)
    return x


# (solver, options, damping, tolerance float32, tolerance float64). The damping is the
# one each method is meant for: CG and the exact methods at 1e-2 (damped condition
# number ~1e4), LiSSA at 1 (its contraction 1 - lambda/scale needs ~scale/lambda steps).
SOLVER_CASES = [
    ("cg", {"tol": 1e-7, "maxiter": 2000}, 1e-2, 1e-3, 1e-6),
    ("lissa", {"depth": 3000}, 1.0, 1e-4, 1e-9),
    ("arnoldi", {"rank": None}, 1e-2, 1e-3, 1e-9),
    ("direct", {}, 1e-2, 1e-3, 1e-9),
]


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
@pytest.mark.parametrize("problem", [singular_hessian, ill_conditioned_hessian])
@pytest.mark.parametrize("method,options,damping,tol32,tol64", SOLVER_CASES,
                         ids=[c[0] for c in SOLVER_CASES])
def test_every_solver_matches_numpy_on_singular_and_ill_conditioned(
        method, options, damping, tol32, tol64, problem, x64):
    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        h, b = problem(dtype)
        options = dict(options)
        if method == "arnoldi":
            options["rank"] = len(b)                      # full rank: exact
        if method == "lissa":
            options["scale"] = 1.1 * float(np.linalg.eigvalsh(h).max()) + 2 * damping
        hj, bj = jnp.asarray(h, dtype), jnp.asarray(b, dtype)
        x, info = jax.jit(lambda b: inverse_hvp(lambda v: hj @ v, b, method, damping,
                                                **options))(bj)
        assert x.dtype == dtype and isinstance(info, SolverDiagnostics)
        err = rel_err(x, _reference(h, b, damping))
        assert err < (tol64 if x64 else tol32), f"{method}: relative error {err:.2e}"
        # The residual reaches the rounding floor eps * cond(H + lambda I) (in float32
        # and condition 1e4 that is above the default tol, and converged says so).
        ev_h = np.linalg.eigvalsh(h)
        kappa = (ev_h.max() + damping) / (max(ev_h.min(), 0.0) + damping)
        eps = np.finfo(np.dtype(dtype)).eps
        assert float(info.relative_residual) <= max(1e-6 if x64 else 1e-5, 10 * eps * kappa)
        assert bool(info.converged) == (float(info.relative_residual) <= max(
            options.get("tol", 1e-5), 100 * eps))
        if x64:
            assert bool(info.converged)
        if info.eigenvalues is not None:  # PSD: no negative Ritz value beyond rounding
            ev = np.asarray(info.eigenvalues)
            assert ev.min() >= -100 * np.finfo(np.dtype(dtype)).eps * ev.max()


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_arnoldi_restarts_on_breakdown_and_keeps_an_orthonormal_basis(x64):
    """Issue 16 item 8: on 6 all-zero rows the Krylov space runs out; the plain
    recursion normalised rounding noise (relative error 0.38). Now the breakdown is
    detected (relative test) and the basis restarts orthogonally."""
    from kdjax.influence.solvers import _arnoldi_basis

    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        h, b = singular_hessian(dtype)
        hj = jnp.asarray(h, dtype)
        x, info = arnoldi(lambda v: hj @ v, jnp.asarray(b, dtype), 0.01, rank=30)
        assert int(info.breakdowns) >= 1 and int(info.iterations) == 30
        assert rel_err(x, _reference(h, b, 0.01)) < (1e-9 if x64 else 1e-4)
        v0 = jax.random.normal(jax.random.key(3), (30,), dtype)
        q, hm, breaks = _arnoldi_basis(lambda v: hj @ v, v0, 30, jax.random.key(4),
                                       1e3 * float(jnp.finfo(dtype).eps))
        q = np.asarray(q[:30], np.float64)
        eps = float(jnp.finfo(dtype).eps)
        assert np.abs(q @ q.T - np.eye(30)).max() < 100 * eps
        # A Q_m^T = Q^T H_m: the Hessenberg relation holds through the restarts.
        np.testing.assert_allclose(h @ q.T, np.asarray(q.T @ np.asarray(hm[:30], np.float64)),
                                   atol=1e3 * eps * np.abs(h).max())
        # Without the relative breakdown test (threshold ~0) the basis degrades.
        x_bad, _ = arnoldi(lambda v: hj @ v, jnp.asarray(b, dtype), 0.01, rank=30,
                           breakdown_tol=1e-300 if x64 else 1e-38)
        assert rel_err(x_bad, _reference(h, b, 0.01)) > 1e-2


def test_cg_reports_iterations_and_stops_on_indefinite_curvature():
    # Well-posed 2 x 2 SPD: exact in 2 iterations.
    a = jnp.array([[3.0, 1.0], [1.0, 2.0]])
    x, info = cg(lambda v: a @ v, jnp.array([1.0, 0.0]), 1e-3, tol=1e-6)
    np.testing.assert_allclose(x, np.linalg.solve(np.asarray(a) + 1e-3 * np.eye(2), [1, 0]),
                               rtol=1e-5)
    assert int(info.iterations) == 2 and bool(info.converged)
    assert info.eigenvalues is None and int(info.breakdowns) == 0
    # Indefinite: p^T A p < 0 on the first direction: stop, report non-convergence.
    x, info = cg(lambda v: jnp.array([-1.0, 1.0]) * v, jnp.array([1.0, 0.0]), 1e-3)
    assert int(info.iterations) == 0 and not bool(info.converged)
    assert np.isfinite(np.asarray(x)).all()


def test_dispatcher_equals_the_solver_functions_and_checks_options(spd):
    _, matvec, b, _, _ = spd
    for method, fn, opts in (("cg", cg, {"tol": 1e-6}), ("lissa", lissa, {"scale": 12.0}),
                             ("arnoldi", arnoldi, {"rank": 5}), ("direct", direct, {})):
        x1, d1 = inverse_hvp(matvec, b, method, DAMP, **opts)
        x2, d2 = fn(matvec, b, DAMP, **opts)
        np.testing.assert_array_equal(flat(x1), flat(x2))
        assert float(d1.relative_residual) == float(d2.relative_residual)
    with pytest.raises(TypeError, match=r"invalid options \['rank'\] for method 'cg'; "
                                        r"valid options are \['tol', 'maxiter'\]"):
        inverse_hvp(matvec, b, "cg", rank=3)
    with pytest.raises(ValueError, match=r"iters must be in \[rank=5, parameter count=17\]"):
        arnoldi(matvec, b, rank=5, iters=3)
