"""Faithful KD math: teacher-student gaps, attacks (lower bounds), IBP/CROWN bound
propagation and certification (upper bounds).

``kdjax.faithful.bounds`` is the bound-propagation interpreter; the other names are
re-exported from their modules so users write ``kdjax.faithful.pgd_gap``.
"""

from kdjax.faithful.bounds import crown_bounds, ibp_bounds, interval_box
from kdjax.faithful.gaps import *  # noqa: F401,F403
from kdjax.faithful.gaps import __all__ as _gaps_all

__all__ = ["crown_bounds", "ibp_bounds", "interval_box", *_gaps_all]
