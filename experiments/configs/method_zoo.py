"""Config of ``experiments/method_zoo.py``: every zoo method on small teacher -> student
pairs (MNIST-1D cnn1d -> cnn1d, digits cnn2d -> cnn2d), mean +- std over seeds.

    python -m experiments.method_zoo [--config.key=value ...]
    python -m experiments.method_zoo repdistiller     # experiments/configs/repdistiller_cifar100.py

Loss of a run (RepDistiller's ``train_student.py``: ``gamma CE + alpha KD + beta
method``): ``ce_weight * CE + kd_weight * KD + w * method`` with ``w`` the method's
reference weight (``kdjax.methods.get(name).default_weight``: RepDistiller's
resnet32x4 -> resnet8x4 weights, mdistiller's DKD), overridable in ``method_weights``.
RepDistiller's benchmark table uses ``-r 1 -a 0 -b w`` for every feature method, hence
``ce_weight = 1`` and ``kd_weight = 0`` by default (``kd_weight=0.9`` gives the "+KD"
variants). The ``kd`` baseline is ``0.1 CE + 0.9 KD`` (tau 4) and ``kd_ls`` (a KD
replacement) takes the same 0.1 CE weight (``ce_weights``).

Caveat: the reference weights were tuned on CIFAR-100 ResNet feature maps (e.g. AT's
1000, SP's 3000, PKT's 30000 compensate for the scale of 8x8x256 maps and batch 64).
On these tiny 1-D/8x8 networks the same weights make some terms much larger or smaller
relative to CE; the table reports the reference setting as is, without tuning.

Feature pairs are the zoo's defaults (``kdjax.methods.zoo``): common stage names of
student and teacher. The students keep the teacher's widths with fewer stages (so FSP's
channel-matched Gram matrices exist, like resnet32x4 -> resnet8x4); the "last" methods
(FitNet, SP, FT) therefore pair the student's last stage with the teacher's stage of
the same name.

Initialisation stage (AB, FT, FSP): ``pretrain_epochs`` epochs of
``kdjax.train.pretrain`` (RepDistiller: 30) with the student's optimiser at a constant
learning rate. DKD warm-up: ``dkd_warmup_epochs`` (mdistiller: 20), turned into the
method's ``warmup_steps``; both are scaled down in the quick default.
"""

import ml_collections

from kdjax.methods import zoo

RUN_METHODS = ("ce", "kd", *zoo.NAMES)


def _adamw(lr=3e-3):
    return ml_collections.ConfigDict(
        {"name": "adamw", "learning_rate": lr, "weight_decay": 1e-4, "schedule": "cosine"})


def _setting(dataset, teacher_model, teacher_kwargs, student_model, student_kwargs, *,
             val_size, teacher_epochs, student_epochs, batch_size, num_train=0, num_test=0):
    s = ml_collections.ConfigDict()
    s.dataset = ml_collections.ConfigDict(
        {"name": dataset, "config": "", "data_dir": "", "num_train": num_train,
         "num_test": num_test, "val_size": val_size, "max_examples": 0})
    s.teacher = ml_collections.ConfigDict(
        {"model": teacher_model, "model_kwargs": teacher_kwargs, "epochs": teacher_epochs,
         "batch_size": 128, "seed": 0, "optimizer": _adamw()})
    s.student = ml_collections.ConfigDict(
        {"model": student_model, "model_kwargs": student_kwargs, "epochs": student_epochs,
         "batch_size": batch_size, "evaluations": 2, "augment": "",
         "optimizer": _adamw()})
    return s


def get_config():
    c = ml_collections.ConfigDict()
    c.out_dir = "runs/method_zoo"
    c.cache_dir = "runs/cache"
    c.seeds = 3
    c.vmap_seeds = True
    c.num_devices = 0
    c.progress = False

    c.settings = ml_collections.ConfigDict()
    c.settings.mnist1d = _setting(
        "mnist1d", "cnn1d", {"channels": (32, 64, 128)}, "cnn1d", {"channels": (32, 64)},
        num_train=4000, num_test=1000, val_size=500, teacher_epochs=20, student_epochs=6,
        batch_size=128)
    c.settings.digits = _setting(
        "digits", "cnn2d", {"channels": (32, 64, 128)}, "cnn2d", {"channels": (32, 64)},
        val_size=200, teacher_epochs=30, student_epochs=12, batch_size=64)
    c.setting_names = ["mnist1d", "digits"]

    c.methods = list(RUN_METHODS)
    c.ce_weight = 1.0              # RepDistiller -r
    c.kd_weight = 0.0              # RepDistiller -a, added to every zoo method's run
    c.kd_temperature = 4.0
    c.ce_weights = ml_collections.ConfigDict({"kd": 0.1, "kd_ls": 0.1})
    c.method_weights = ml_collections.ConfigDict()    # name -> weight (default: reference)
    c.method_options = ml_collections.ConfigDict()    # name -> {option: value}
    c.pretrain_epochs = 2          # AB / FT / FSP initialisation (RepDistiller: 30)
    c.dkd_warmup_epochs = 2        # mdistiller: 20
    return c


def validate(c):
    """Value checks with messages naming the key."""
    if c.seeds < 1:
        raise ValueError(f"config.seeds must be >= 1, got {c.seeds}.")
    if not c.setting_names:
        raise ValueError("config.setting_names must name at least one setting.")
    for name in c.setting_names:
        if name not in c.settings:
            raise ValueError(f"config.setting_names: unknown setting {name!r}; "
                             f"config.settings has {sorted(c.settings)}.")
        s = c.settings[name]
        for part in ("teacher", "student"):
            for k in ("epochs", "batch_size"):
                if s[part][k] < 1:
                    raise ValueError(f"config.settings.{name}.{part}.{k} must be >= 1, "
                                     f"got {s[part][k]}.")
        if s.dataset.val_size < 1:
            raise ValueError(f"config.settings.{name}.dataset.val_size must be >= 1, got "
                             f"{s.dataset.val_size}.")
    if not c.methods:
        raise ValueError("config.methods must name at least one method.")
    for key in ("methods", "setting_names"):
        if len(set(c[key])) != len(c[key]):
            raise ValueError(f"config.{key} has duplicate entries: {list(c[key])}.")
    bad = sorted(set(c.methods) - set(RUN_METHODS))
    if bad:
        raise ValueError(f"config.methods: unknown method(s) {bad}; valid: "
                         f"{list(RUN_METHODS)}.")
    for key in ("ce_weight", "kd_weight"):
        if c[key] < 0:
            raise ValueError(f"config.{key} must be >= 0, got {c[key]}.")
    for key in ("pretrain_epochs", "dkd_warmup_epochs"):
        if c[key] < 0:
            raise ValueError(f"config.{key} must be >= 0 (epochs), got {c[key]}.")
    for key in ("method_weights", "method_options", "ce_weights"):
        bad = sorted(set(c[key]) - set(RUN_METHODS))
        if bad:
            raise ValueError(f"config.{key}: unknown method(s) {bad}; valid: "
                             f"{list(RUN_METHODS)}.")
