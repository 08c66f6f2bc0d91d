"""RepDistiller's CIFAR-100 protocol (Tian et al., CRD, ICLR 2020) for
``experiments/method_zoo.py``; meant for an accelerator.

    python -m experiments.method_zoo repdistiller [--config.key=value ...]

Two teacher -> student pairs of the reference table: **resnet32x4 -> resnet8x4** and
**wrn_40_2 -> wrn_16_2**. Student training as ``train_student.py``: 240 epochs, SGD lr
0.05, momentum 0.9, weight decay 5e-4, learning rate x 0.1 at epochs 150, 180, 210,
batch 64, random crop (padding 4) + horizontal flip; loss ``1 CE + 0 KD + w method``
with the reference weights (``kdjax.methods.get(name).default_weight``) and ``0.1 CE +
0.9 KD`` (tau 4) for KD; AB/FT/FSP initialisation stage of 30 epochs (``init_epochs``);
DKD (mdistiller) with its 20-epoch linear warm-up. Teachers: the same SGD recipe
(``train_teacher.py``: 240 epochs, lr 0.05, decay at 150/180/210), trained once and
cached.

Deviations: RepDistiller reports the best *test* accuracy over epochs; here model
selection uses a validation split of 5000 training images (``dataset.val_size``; set
it small to train on nearly all of them) and the table reports test accuracy of the
selected epoch. Adapters have no BatchNorm (``kdjax.models.adapters``). Needs the TFDS
``cifar100`` dataset prepared under ``dataset.data_dir`` (no download here).
"""

import ml_collections

from experiments.configs import method_zoo as base

PAIRS = {"resnet32x4-resnet8x4": ("resnet32x4", "resnet8x4"),
         "wrn_40_2-wrn_16_2": ("wrn_40_2", "wrn_16_2")}


def _sgd():
    return ml_collections.ConfigDict(
        {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
         "schedule": "step", "decay_epochs": (150, 180, 210), "decay_factor": 0.1})


def get_config():
    c = base.get_config()
    c.out_dir = "runs/repdistiller_cifar100"
    c.progress = True
    c.settings = ml_collections.ConfigDict()
    for name, (teacher, student) in PAIRS.items():
        s = ml_collections.ConfigDict()
        s.dataset = ml_collections.ConfigDict(
            {"name": "cifar100", "config": "", "data_dir": "", "num_train": 0,
             "num_test": 0, "val_size": 5000, "max_examples": 0})
        s.teacher = ml_collections.ConfigDict(
            {"model": teacher, "model_kwargs": ml_collections.ConfigDict(), "epochs": 240,
             "batch_size": 64, "seed": 0, "optimizer": _sgd(), "augment": "crop_flip"})
        s.student = ml_collections.ConfigDict(
            {"model": student, "model_kwargs": ml_collections.ConfigDict(), "epochs": 240,
             "batch_size": 64, "evaluations": 24, "augment": "crop_flip",
             "optimizer": _sgd()})
        c.settings[name] = s
    c.setting_names = list(PAIRS)
    c.ce_weight = 1.0
    c.kd_weight = 0.0
    c.kd_temperature = 4.0
    c.pretrain_epochs = 30
    c.dkd_warmup_epochs = 20
    return c


validate = base.validate
