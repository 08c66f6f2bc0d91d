"""Influence functions for KD-AIF, in three layers:

* :mod:`kdjax.influence.curvature`: per-example losses, ``H v`` (jvp of grad) and the
  Gauss-Newton ``G v``;
* :mod:`kdjax.influence.solvers`: ``(H + lambda I)^{-1} b`` by :func:`cg`, :func:`lissa`,
  :func:`arnoldi` or :func:`direct`, one :class:`SolverDiagnostics` type, and the
  dispatcher :func:`inverse_hvp`;
* :mod:`kdjax.influence.scores`: single-jvp per-example directional derivatives,
  Koh & Liang influence scores and KD-AIF sample weights.
"""

from kdjax.influence import curvature, scores, solvers
from kdjax.influence.curvature import *  # noqa: F401,F403
from kdjax.influence.scores import *  # noqa: F401,F403
from kdjax.influence.solvers import *  # noqa: F401,F403

__all__ = [*curvature.__all__, *solvers.__all__, *scores.__all__]
