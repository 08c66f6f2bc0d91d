"""Influence functions for KD-AIF, in three layers:

* :mod:`kdjax.influence.curvature`: per-example losses, ``H v`` (jvp of grad) and the
  Gauss-Newton ``G v``;
* :mod:`kdjax.influence.solvers`: ``(H + lambda I)^{-1} b`` by :func:`cg`, :func:`lissa`,
  :func:`arnoldi` or :func:`direct`, one :class:`SolverDiagnostics` type, and the
  dispatcher :func:`inverse_hvp`;
* :mod:`kdjax.influence.scores`: single-jvp per-example directional derivatives,
  Koh & Liang influence scores and KD-AIF sample weights.
"""

from kdjax.influence.curvature import ggn_vp, hvp, per_example_losses
from kdjax.influence.scores import (WEIGHT_MAPPINGS, influence_scores, influence_weights,
                                    per_example_jvp)
from kdjax.influence.solvers import (INVERSE_METHODS, SolverDiagnostics, arnoldi, cg,
                                     direct, inverse_hvp, lissa)

__all__ = [
    "per_example_losses",
    "hvp",
    "ggn_vp",
    "SolverDiagnostics",
    "cg",
    "lissa",
    "arnoldi",
    "direct",
    "inverse_hvp",
    "INVERSE_METHODS",
    "per_example_jvp",
    "influence_scores",
    "influence_weights",
    "WEIGHT_MAPPINGS",
]
