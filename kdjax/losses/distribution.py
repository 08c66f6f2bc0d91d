"""distribution distillation losses (see kdjax.losses)."""

__all__: list[str] = []
