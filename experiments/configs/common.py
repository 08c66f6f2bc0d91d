"""Config pieces shared by several drivers."""

import ml_collections


def cnn1d_teacher() -> ml_collections.ConfigDict:
    """The MNIST-1D teacher used by several drivers: CNN1D (32, 64, 128), 30 epochs of
    AdamW 3e-3 (cosine), batch 128. Identical configs share one cached teacher
    (the cache key is a hash of this config and the data config)."""
    t = ml_collections.ConfigDict()
    t.model = "cnn1d"
    t.model_kwargs = ml_collections.ConfigDict({"channels": (32, 64, 128)})
    t.epochs = 30
    t.batch_size = 128
    t.seed = 0
    t.optimizer = ml_collections.ConfigDict(
        {"name": "adamw", "learning_rate": 3e-3, "weight_decay": 1e-4, "schedule": "cosine"})
    return t
