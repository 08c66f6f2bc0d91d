"""kdjax: knowledge distillation in JAX/Flax.

Subpackages: :mod:`kdjax.losses` (pure losses), :mod:`kdjax.models` (Flax models that
return ``(logits, features)``), :mod:`kdjax.data` (embedded TFDS builders, catalog
loading, shift constructions, batching), :mod:`kdjax.train` (train state, distillation
step, sharding, checkpoints, results).
"""

from kdjax._checks import checked

__version__ = "0.1.0"
__all__ = ["checked", "__version__"]
