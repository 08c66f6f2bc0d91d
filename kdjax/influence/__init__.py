"""Influence functions for KD-AIF: curvature products (jvp of grad), inverse-HVP
solvers and single-jvp influence scores and weights (see :mod:`kdjax.influence.core`)."""

from kdjax.influence.core import *  # noqa: F401,F403
from kdjax.influence.core import __all__  # noqa: F401
