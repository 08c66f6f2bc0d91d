"""Pure knowledge-distillation losses: ``from kdjax.losses import kd``.

One function per method; every function takes arrays and returns a float32 scalar
(or per-example values with ``reduction="none"``). See each docstring for the formula,
the reference and its default weights. Each family module defines ``__all__``; this
namespace re-exports exactly their union (a name defined in two families is an import
error, not a silent shadowing). :mod:`kdjax.losses.batch` holds the per-device /
per-group wrappers for batch-level losses.

Importing this package imports jax, optax and chex only; ott-jax is imported by the
first call of an OT loss (``sinkhorn``, ``sinkhorn_divergence``, ``sliced_wasserstein``,
``gromov_wasserstein``).
"""

from kdjax.losses import batch, distribution, feature, logit, relation, similarity
from kdjax.losses.batch import *  # noqa: F401,F403
from kdjax.losses.distribution import *  # noqa: F401,F403
from kdjax.losses.feature import *  # noqa: F401,F403
from kdjax.losses.logit import *  # noqa: F401,F403
from kdjax.losses.relation import *  # noqa: F401,F403
from kdjax.losses.similarity import *  # noqa: F401,F403

_FAMILIES = (batch, distribution, feature, logit, relation, similarity)


def _union(families) -> list[str]:
    seen: dict[str, str] = {}
    for module in families:
        for name in module.__all__:
            if name in seen:
                raise ImportError(f"kdjax.losses: {name!r} is exported by both "
                                  f"{seen[name]} and {module.__name__}.")
            seen[name] = module.__name__
    return sorted(seen)


__all__ = _union(_FAMILIES)
