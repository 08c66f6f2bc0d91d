"""Training recipes above :mod:`kdjax.train`: KD-AIF sample weighting and meta pseudo
labels (:mod:`kdjax.recipes.kd_aif`), SimCLR pre-training (:mod:`kdjax.recipes.simclr`)."""

__all__: list[str] = []
