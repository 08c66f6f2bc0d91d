"""Config of ``experiments/distill.py``: teacher -> students (CE-only vs KD, ...).

Default setting (why it is informative): the teacher is trained on the full MNIST-1D
training set; each student sees the labels of only ``labelled`` examples, while the
teacher's soft labels are available on every training input. CE-only students can use
the labelled subset only; KD students distil on all inputs (CE on the labelled ones).
Both get the same number of optimiser steps. Model selection uses a held-out
validation split of the training set (never the test split).

Override from the command line: ``python -m experiments.distill --config.seeds=5
--config.student.epochs=60 --config.dataset.name=digits``. Variant ``quick``
(``--quick``): a 1200-example MNIST-1D, tiny networks, 2 seeds, 3 teacher and 2 student
epochs (a smoke run of a minute on a CPU; output under ``runs/distill_quick``).
"""

import ml_collections

from experiments.configs.common import cnn1d_teacher, validate_common


def get_config(variant: str | None = None):
    if variant not in (None, "quick"):
        raise ValueError(f"variant must be 'quick' or none, got {variant!r}.")
    c = ml_collections.ConfigDict()
    c.out_dir = "runs/distill"
    c.cache_dir = "runs/cache"
    c.seeds = 3
    c.vmap_seeds = True            # all seeds of a run as one vmapped program
    c.num_devices = 0              # 0 = all local devices
    c.progress = True
    c.compute_dtype = "float32"    # "bfloat16": bf16 student compute, float32 params/losses

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "mnist1d"     # or "digits", or a TFDS catalog name
    c.dataset.config = ""          # embedded builder config ("" = default)
    c.dataset.data_dir = ""        # "" = $KDJAX_DATA_DIR or ~/tensorflow_datasets
    c.dataset.num_train = 0        # mnist1d only: generated train size (0 = builder default)
    c.dataset.num_test = 0         # mnist1d only: generated test size (0 = builder default)
    c.dataset.val_size = 1000      # held out of train for model selection
    c.labelled = 500               # labelled examples the students see (0 = all)

    c.teacher = cnn1d_teacher()

    c.student = ml_collections.ConfigDict()
    c.student.model = "cnn1d"
    c.student.model_kwargs = ml_collections.ConfigDict({"channels": (16, 32)})
    c.student.epochs = 20          # epochs over the full (distillation) set
    c.student.batch_size = 128
    c.student.evaluations = 20     # validation/checkpoint points per run (model selection)
    c.student.optimizer = ml_collections.ConfigDict(
        {"name": "adamw", "learning_rate": 3e-3, "weight_decay": 1e-4, "schedule": "cosine"})

    # Each run: a name and its loss terms (method configs, see kdjax.methods).
    c.runs = [
        {"name": "ce", "methods": [{"name": "ce", "weight": 1.0}]},
        {"name": "kd", "methods": [{"name": "ce", "weight": 0.1},
                                   {"name": "kd", "weight": 0.9, "temperature": 4.0}]},
    ]
    if variant == "quick":
        c.out_dir = "runs/distill_quick"
        c.seeds = 2
        c.dataset.num_train, c.dataset.num_test, c.dataset.val_size = 1200, 300, 200
        c.labelled = 200
        c.teacher.epochs, c.student.epochs = 3, 2
        c.teacher.model_kwargs.channels = (8, 8)
        c.student.model_kwargs.channels = (4,)
    return c


def validate(c):
    """Value checks with messages naming the key."""
    if c.compute_dtype not in ("float32", "bfloat16"):
        raise ValueError("config.compute_dtype must be one of ['bfloat16', 'float32'], "
                         f"got {c.compute_dtype!r}.")
    validate_common(c)
    if c.labelled < 0:
        raise ValueError(f"config.labelled must be >= 0, got {c.labelled}.")
    if not c.runs:
        raise ValueError("config.runs must name at least one run.")
    for r in c.runs:
        if "name" not in r or "methods" not in r:
            raise ValueError(f"each entry of config.runs needs 'name' and 'methods', got {r}.")
    names = [r["name"] for r in c.runs]
    if len(set(names)) != len(names):
        raise ValueError(f"config.runs names must be distinct, got {names}.")
