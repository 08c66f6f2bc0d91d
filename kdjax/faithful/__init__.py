"""Faithful KD math: teacher-student gaps at points (:mod:`~kdjax.faithful.metrics`),
attacks as lower bounds over a ball (:mod:`~kdjax.faithful.attacks`), IBP/CROWN bound
propagation (:mod:`~kdjax.faithful.bounds`), certification as upper bounds
(:mod:`~kdjax.faithful.certify`) and both over a grid of radii at evaluation points
(:mod:`~kdjax.faithful.evaluate`).

The public names are re-exported here: users write ``kdjax.faithful.pgd_gap``.
"""

from kdjax.faithful.attacks import *  # noqa: F401,F403
from kdjax.faithful.attacks import __all__ as _attacks_all
from kdjax.faithful.bounds import check_ball, crown_bounds, ibp_bounds, interval_box
from kdjax.faithful.certify import *  # noqa: F401,F403
from kdjax.faithful.certify import __all__ as _certify_all
from kdjax.faithful.evaluate import *  # noqa: F401,F403
from kdjax.faithful.evaluate import __all__ as _evaluate_all
from kdjax.faithful.metrics import *  # noqa: F401,F403
from kdjax.faithful.metrics import __all__ as _metrics_all

__all__ = ["check_ball", "crown_bounds", "ibp_bounds", "interval_box", *_metrics_all,
           *_attacks_all, *_certify_all, *_evaluate_all]
