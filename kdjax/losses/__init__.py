"""Pure knowledge-distillation losses: ``from kdjax.losses import kd``.

One function per method; every function takes arrays and returns a float32 scalar
(or per-example values with ``reduction="none"``). See each docstring for the formula,
the reference and its default weights. Each family module defines ``__all__``; this
namespace re-exports all of them.
"""

from kdjax.losses import distribution, feature, logit, relation, similarity
from kdjax.losses.distribution import *  # noqa: F401,F403
from kdjax.losses.feature import *  # noqa: F401,F403
from kdjax.losses.logit import *  # noqa: F401,F403
from kdjax.losses.relation import *  # noqa: F401,F403
from kdjax.losses.similarity import *  # noqa: F401,F403

__all__ = sorted(
    set(logit.__all__) | set(feature.__all__) | set(relation.__all__)
    | set(distribution.__all__) | set(similarity.__all__)
)
