"""Projection head from the student's embedding dim to the teacher's (CoSS, SEED).

CoSS (github.com/paganpasta/coss-pytorch, ``wrapper.py``) appends to the student, when
the student and teacher dims differ, ``Linear(d_s, 2048) -> ReLU -> Linear(2048, d_t)``,
with no BatchNorm, trained with the student and used only for distillation (the
evaluated features are the student's own ``pooled`` embedding). ``use_bn=True`` adds a
BatchNorm after the hidden Dense (SimCLR/MoCo-v2-style heads) as an option; it keeps
running statistics in ``batch_stats``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

__all__ = ["Projector"]


class Projector(nn.Module):
    """Two-layer MLP ``Dense(hidden) -> [BN] -> ReLU -> Dense(out_dim)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from kdjax.models.projector import Projector
      >>> head = Projector(out_dim=8, hidden_dim=16)
      >>> variables = head.init(jax.random.PRNGKey(0), jnp.ones((2, 4)))
      >>> head.apply(variables, jnp.ones((2, 4))).shape
      (2, 8)

    Attributes:
      out_dim: output dim (the teacher's embedding dim).
      hidden_dim: hidden width (CoSS: 2048).
      use_bn: BatchNorm after the hidden layer (CoSS: no).
      dtype: computation dtype (params are float32).
    """

    out_dim: int
    hidden_dim: int = 2048
    use_bn: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.ndim != 2:
            raise ValueError(f"Projector input must have shape (batch, dim), got {x.shape}.")
        for v, n in ((self.out_dim, "out_dim"), (self.hidden_dim, "hidden_dim")):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"Projector {n} must be a positive int, got {v!r}.")
        h = nn.Dense(self.hidden_dim, dtype=self.dtype, name="hidden")(x.astype(self.dtype))
        if self.use_bn:
            h = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                             name="bn")(h)
        h = nn.relu(h)
        return nn.Dense(self.out_dim, dtype=self.dtype, name="out")(h)
