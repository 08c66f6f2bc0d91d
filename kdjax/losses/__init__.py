"""Pure knowledge-distillation losses: ``from kdjax.losses import kd``.

One function per method; every function takes arrays and returns a float32 scalar
(or per-example values with ``reduction="none"``). See each docstring for the formula,
the reference and its default weights.
"""

from kdjax.losses.logit import cross_entropy, kd, kl_to_teacher

__all__ = ["cross_entropy", "kd", "kl_to_teacher"]
