r"""Faithfulness of a student to its teacher over a grid of radii, at evaluation points.

For each radius ``eps`` (``B_eps(x)`` the clipped L-inf ball, ``y`` the teacher's label
at ``x``), :func:`faithfulness_report` gives, from the per-point values of a
:func:`gap_evaluator`:

* ``pgd_gap``: mean PGD lower bound on ``Delta(x) = max_{x' in B_eps(x)} |p^S_y(x') -
  p^T_y(x')|`` (:func:`~kdjax.faithful.pgd_gap`, the one PGD loop);
* ``ibp_gap`` / ``crown_gap``: mean certified upper bound on ``Delta(x)``
  (:func:`~kdjax.faithful.margin_bounds` + :func:`~kdjax.faithful.gap_upper_bound`; IBP
  on all points, CROWN on the first ``crown_points``), and ``ibp_gap_crown_points`` /
  ``pgd_gap_crown_points`` on those points;
* ``certified_gap``, ``certified_agree``, ``certified_faithful[delta]``: over the CROWN
  points (all points with IBP when ``crown_points = 0``), the tighter of the two bounds,
  the fraction whose student argmax is certified to be ``y`` over the ball
  (:func:`~kdjax.faithful.certified_agreement`), and the fraction with both that and a
  certified ``Delta(x) <= delta``; ``certified_faithful_ibp[delta]``: IBP only, all
  points; ``certified_points``: how many points those fractions are over;
* ``bound_violations`` (over all radii): points where PGD exceeded a certified bound,
  which must be 0.

:func:`teacher_correct_points` picks the points, :func:`report_at` reads a report's
headline numbers at one ``(eps, delta)``, :func:`flatten_report` turns a report into
flat columns (the faithful driver's table and plot, ``experiments/faithful_report.py``,
read those).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax._checks import check_choice
from kdjax.faithful.attacks import pgd_gap
from kdjax.faithful.certify import (CROWN_METHODS, certified_agreement, gap_upper_bound,
                                    margin_bounds)

__all__ = ["teacher_correct_points", "gap_evaluator", "faithfulness_report", "report_at",
           "flatten_report"]


def teacher_correct_points(teacher_logits, labels, num: int, seed: int = 0) -> np.ndarray:
    """Indices of the first ``num`` points the teacher classifies correctly (``argmax``
    of ``teacher_logits`` equal to ``labels``), in the order of a fixed shuffle drawn
    from ``seed``: the points a faithfulness evaluation is about (fewer if there are
    not ``num`` of them)."""
    logits, labels = np.asarray(teacher_logits), np.asarray(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"teacher_logits must be [N, K] and labels [N], got shapes "
                         f"{logits.shape} and {labels.shape}.")
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be an int >= 1, got {num!r}.")
    correct = np.flatnonzero(logits.argmax(-1) == labels)
    return np.random.default_rng(seed).permutation(correct)[:num]


def gap_evaluator(teacher_fn: Callable, student_fn: Callable, *, steps: int = 20,
                  restarts: int = 1, crown_points: int = 0, crown_method: str = "crown",
                  clip=None) -> Callable:
    r"""Jitted ``evaluate(student_vars, x, eps, key) -> dict`` of per-point ``[B]``
    arrays: ``pgd`` (PGD lower bound on ``Delta``, ``steps`` x ``restarts``), ``ibp``
    (IBP upper bound), ``agree_ibp`` (student label certified by IBP) and, with
    ``crown_points > 0``, ``crown`` / ``agree_crown`` on the first ``crown_points``.

    ``teacher_fn``: ``x -> logits``; ``student_fn``: ``(variables, x) -> logits``. The
    student's variables are an argument, so all students of one architecture share one
    compilation. ``crown_method``: ``"crown"``, ``"alpha-crown"`` (optimised ReLU slopes,
    never looser than CROWN) or ``"crown-ibp"``.
    """
    check_choice(crown_method, "crown_method", CROWN_METHODS)
    if isinstance(crown_points, bool) or not isinstance(crown_points, int) or crown_points < 0:
        raise ValueError(f"crown_points must be an int >= 0, got {crown_points!r}.")
    t_fn = lambda x: teacher_fn(x).astype(jnp.float32)  # noqa: E731

    @jax.jit
    def evaluate(student_vars, x, eps, key):
        s_fn = lambda v: student_fn(student_vars, v).astype(jnp.float32)  # noqa: E731
        pgd, _ = pgd_gap(t_fn, s_fn, x, eps=eps, steps=steps, restarts=restarts, key=key,
                         clip=clip)
        ibp = margin_bounds(t_fn, s_fn, x, eps=eps, method="ibp", clip=clip)
        out = {"pgd": pgd, "ibp": gap_upper_bound(ibp)["gap"],
               "agree_ibp": certified_agreement(ibp)}
        if crown_points:
            cr = margin_bounds(t_fn, s_fn, x[:crown_points], eps=eps, method=crown_method,
                               clip=clip)
            out["crown"] = gap_upper_bound(cr)["gap"]
            out["agree_crown"] = certified_agreement(cr)
        return out

    return evaluate


def _at_radius(r: Mapping[str, np.ndarray], delta: Sequence[float], tol: float):
    upper, agree = np.array(r["ibp"]), np.array(r["agree_ibp"])
    m = {"pgd_gap": float(r["pgd"].mean()), "ibp_gap": float(r["ibp"].mean())}
    violations = int(np.sum(r["pgd"] > r["ibp"] + tol))
    n = len(upper)
    if "crown" in r:
        n = len(r["crown"])
        upper[:n] = np.minimum(upper[:n], r["crown"])
        agree[:n] |= r["agree_crown"]
        m["crown_gap"] = float(r["crown"].mean())
        m["ibp_gap_crown_points"] = float(r["ibp"][:n].mean())
        m["pgd_gap_crown_points"] = float(r["pgd"][:n].mean())
        violations += int(np.sum(r["pgd"][:n] > r["crown"] + tol))
    m["certified_gap"] = float(upper[:n].mean())
    m["certified_agree"] = float(agree[:n].mean())
    m["certified_faithful"] = {str(d): float(np.mean((upper[:n] <= d) & agree[:n]))
                               for d in delta}
    m["certified_faithful_ibp"] = {
        str(d): float(np.mean((r["ibp"] <= d) & r["agree_ibp"])) for d in delta}
    m["certified_points"] = int(n)
    return m, violations


def faithfulness_report(evaluate: Callable, student_vars: Any, x: jax.Array, *,
                        eps: Sequence[float], delta: Sequence[float], seed: int = 0,
                        tol: float = 1e-5) -> dict:
    """``{"eps": {str(eps): metrics}, "bound_violations": n}`` of one student at the
    points ``x`` (see the module docstring), from ``evaluate`` (:func:`gap_evaluator`).

    The PGD starts of radius ``i`` of ``eps`` come from ``fold_in(PRNGKey(seed), i)``;
    a PGD value above a certified bound by more than ``tol`` is a violation.
    """
    if not len(eps) or not len(delta):
        raise ValueError(f"eps and delta must be non-empty, got {eps} and {delta}.")
    out, violations = {"eps": {}}, 0
    for i, e in enumerate(eps):
        r = jax.device_get(evaluate(student_vars, x, jnp.float32(e),
                                    jax.random.fold_in(jax.random.PRNGKey(seed), i)))
        out["eps"][str(e)], v = _at_radius(r, delta, tol)
        violations += v
    out["bound_violations"] = violations
    return out


def report_at(report: Mapping[str, Any], eps: float, delta: float) -> dict:
    """The headline numbers of a :func:`faithfulness_report` at one ``(eps, delta)``:
    ``pgd_gap``, ``ibp_gap``, ``crown_gap`` (when CROWN ran), ``certified_agree`` and
    ``certified_faithful`` (at ``delta``)."""
    m = report["eps"][str(eps)]
    out = {k: m[k] for k in ("pgd_gap", "ibp_gap", "crown_gap", "certified_agree") if k in m}
    return {**out, "certified_faithful": m["certified_faithful"][str(delta)]}


def flatten_report(report: Mapping[str, Any]) -> dict:
    """Flat columns of a :func:`faithfulness_report`: ``"<metric>@eps=<e>"`` for each
    number and ``"<metric>@eps=<e>, delta=<d>"`` for each fraction at a ``delta``, plus
    ``bound_violations``."""
    out = {"bound_violations": report["bound_violations"]}
    for e, m in report["eps"].items():
        for k, v in m.items():
            if isinstance(v, Mapping):
                out.update({f"{k}@eps={e}, delta={d}": x for d, x in v.items()})
            else:
                out[f"{k}@eps={e}"] = v
    return out
