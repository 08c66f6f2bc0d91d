"""Evaluation of trained networks: k-NN and linear probes (:mod:`kdjax.evaluation.probes`)."""

from kdjax.evaluation.probes import *  # noqa: F401,F403
from kdjax.evaluation.probes import __all__  # noqa: F401
