"""ott-jax solvers as kdjax uses them (imported lazily: ``import kdjax.losses`` does not
import ott-jax, which costs seconds; the first OT loss call does).

One deliberate addition to ott-jax 0.6.0: :class:`Sinkhorn` is ott's solver with a
``one_iteration`` whose two error branches carry the same varying manual axes (vma), so
that the solver runs inside ``jax.shard_map`` with its default ``check_vma=True``.
ott's version selects between the computed marginal error (varying over the mesh axis
when the point clouds are per-device shards) and a constant ``inf`` (invariant), and
``lax.cond`` rejects branches of different vma: ``TypeError: cond branches must have
equal output types``. Here the constant gets the vma of the computed error (see ``skipped``).
Nothing else changes (same iterates, errors and outputs; tested against ott's own
solver and POT).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from ott.geometry import pointcloud
from ott.problems.linear import linear_problem
from ott.solvers.linear import acceleration, implicit_differentiation
from ott.solvers.linear import sinkhorn as ott_sinkhorn
from ott.solvers.quadratic import gromov_wasserstein as ott_gw
from ott.problems.quadratic import quadratic_problem

__all__ = ["Sinkhorn", "solve", "solver_kwargs", "sinkhorn_divergence", "pointcloud",
           "gromov_wasserstein"]


def _varying_like(value, refs):
    """``value`` with the varying manual axes (vma) of the float leaves of ``refs``.

    Inside ``shard_map`` an elementwise op gives its output the union of its operands'
    vma, so ``where(True, value, r)`` against one element ``r`` of each reference
    leaf does it with public operations only (the select is constant-folded). Outside
    ``shard_map`` it is the identity.
    """
    for leaf in jax.tree_util.tree_leaves(refs):
        if jnp.size(leaf) and jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            value = jnp.where(True, value, jnp.ravel(leaf)[0].astype(jnp.result_type(value)))
    return value


@jax.tree_util.register_pytree_node_class
class Sinkhorn(ott_sinkhorn.Sinkhorn):
    """ott-jax's ``Sinkhorn`` whose iteration is ``shard_map(check_vma=True)``-safe."""

    def init_state(self, ot_prob, init):
        # The loop carry (potentials, errors) starts as constants; give it the vma of
        # the problem so that the scan's carry types agree with the iterates'.
        state = super().init_state(ot_prob, init)
        return jax.tree_util.tree_map(lambda v: _varying_like(v, ot_prob), state)

    def one_iteration(self, ot_prob, state, iteration, compute_error):
        if self.anderson:
            state = self.anderson.update(state, iteration, ot_prob, self.lse_mode)
        if self.lse_mode:
            state = self.lse_step(ot_prob, state, iteration)
        else:
            state = self.kernel_step(ot_prob, state, iteration)
        if self.anderson:
            state = self.anderson.update_history(state, ot_prob, self.lse_mode)

        def error(state, prob):
            return state.solution_error(
                prob, self.norm_error, lse_mode=self.lse_mode,
                parallel_dual_updates=self.parallel_dual_updates,
                recenter=self.recenter_potentials)[0]

        def skipped(state, prob):
            return _varying_like(jnp.array(jnp.inf, dtype=prob.dtype), (state.potentials, prob))

        err = jax.lax.cond(
            jnp.logical_or(iteration == self.max_iterations - 1,
                           jnp.logical_and(compute_error, iteration >= self.min_iterations)),
            error, skipped, state, ot_prob)
        state = state.set(errors=state.errors.at[iteration // self.inner_iterations, :].set(err))
        if self.progress_fn is not None:
            jax.debug.callback(self.progress_fn,
                               (iteration, self.inner_iterations, self.max_iterations, state))
        return state


def solver_kwargs(threshold, max_iterations, min_iterations, differentiation) -> dict:
    """Sinkhorn keyword arguments: tolerances and implicit (Danskin) or unrolled grads."""
    if differentiation == "implicit":
        diff = dict(implicit_diff=implicit_differentiation.ImplicitDiff(), use_danskin=True)
    else:
        diff = dict(implicit_diff=None, use_danskin=False)
    return dict(threshold=threshold, max_iterations=max_iterations,
                min_iterations=min_iterations, **diff)


def solve(geom, a, b, **kwargs):
    """``ott.solvers.linear.solve`` (balanced, full rank) with :class:`Sinkhorn`."""
    return Sinkhorn(**kwargs)(linear_problem.LinearProblem(geom, a=a, b=b))


def sinkhorn_divergence(x, y, a, b, epsilon, static_b, kwargs):
    """ott's ``sinkdiv`` (point clouds, balanced) composed from :func:`solve`.

    ``S = OT(x, y) - (OT(x, x) + OT(y, y)) / 2``; the symmetric terms use ott's
    symmetric settings (parallel dual updates, momentum 0.5, symmetric implicit diff),
    as ``ott.tools.sinkhorn_divergence`` does. Returns ``(value, (out_xy, out_xx,
    out_yy))`` with ``out_yy = None`` when ``static_b``.
    """
    sym = dict(kwargs, parallel_dual_updates=True,
               momentum=acceleration.Momentum(start=0, value=0.5), anderson=None)
    if kwargs.get("implicit_diff") is not None:
        sym["implicit_diff"] = kwargs["implicit_diff"].replace(symmetric=True)
    out_xy = solve(pointcloud.PointCloud(x, y, epsilon=epsilon), a, b, **kwargs)
    out_xx = solve(pointcloud.PointCloud(x, x, epsilon=epsilon), a, a, **sym)
    value = out_xy.reg_ot_cost - 0.5 * out_xx.reg_ot_cost
    out_yy = None
    if not static_b:
        out_yy = solve(pointcloud.PointCloud(y, y, epsilon=epsilon), b, b, **sym)
        value = value - 0.5 * out_yy.reg_ot_cost
    return value, (out_xy, out_xx, out_yy)


@jax.tree_util.register_pytree_node_class
class GromovWasserstein(ott_gw.GromovWasserstein):
    """ott-jax's GW solver whose outer loop carry starts with the problem's vma (as
    :class:`Sinkhorn`'s), so that it runs inside ``shard_map(check_vma=True)``."""

    def init_state(self, prob, init):
        state = super().init_state(prob, init)
        refs = (prob.a, prob.b, init.geom)
        return state.set(**{k: _varying_like(getattr(state, k), refs) for k in
                            ("costs", "linear_convergence", "old_transport_mass", "errors")
                            if getattr(state, k) is not None})


def gromov_wasserstein(x, y, a, b, epsilon, outer_kwargs, inner_max_iterations):
    """Entropic GW between point clouds with squared Euclidean intra-cloud costs
    (``ott.solvers.quadratic.gromov_wasserstein.GromovWasserstein``, its inner linear
    solver being :class:`Sinkhorn`; ``epsilon`` relative to the mean linearised cost)."""
    prob = quadratic_problem.QuadraticProblem(
        pointcloud.PointCloud(x, x), pointcloud.PointCloud(y, y), a=a, b=b)
    inner = Sinkhorn(max_iterations=inner_max_iterations)
    solver = GromovWasserstein(inner, epsilon=epsilon, relative_epsilon="mean",
                                      **outer_kwargs)
    return solver(prob)
