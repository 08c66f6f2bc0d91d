"""Config pieces shared by several drivers."""

import ml_collections

from kdjax import models
from kdjax.train.optim import validate_optimizer_config


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


def validate_common(c) -> None:
    """Checks of the keys the distill, kd2m and faithful configs share (seeds, dataset
    sizes, teacher/student epochs and batch size), with messages naming the key."""
    if c.seeds < 1:
        raise ValueError(f"config.seeds must be >= 1, got {c.seeds}.")
    if c.dataset.val_size < 1:
        raise ValueError(f"config.dataset.val_size must be >= 1, got {c.dataset.val_size}.")
    if (c.dataset.num_train or c.dataset.num_test) and c.dataset.name != "mnist1d":
        raise ValueError("config.dataset.num_train/num_test only apply to mnist1d, got "
                         f"dataset.name={c.dataset.name!r}.")
    for part in ("teacher", "student"):
        for k in ("epochs", "batch_size"):
            if c[part][k] < 1:
                raise ValueError(f"config.{part}.{k} must be >= 1, got {c[part][k]}.")
        # before any training (resnet999, an unknown optimiser or a NaN/inf/negative
        # learning rate of the student used to fail only after the teacher had trained)
        models.check_name(c[part].model, f"config.{part}.model")
        validate_optimizer_config(c[part].optimizer, f"config.{part}.optimizer")
