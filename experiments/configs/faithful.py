"""Config of ``experiments/faithful.py``: is the student faithful to its teacher?

Faithful KD (METHODS.md section 5, after arXiv 2306.04431): plain KD vs adversarial
distillation (ARD) vs faithful distillation (KD + PGD gap penalty, KD + certified gap
bound penalty with an eps ramp), each over ``seeds`` seeds. Evaluated on the first
``eval.num_points`` test points the teacher classifies correctly: clean accuracy and
teacher agreement (whole test split), the mean PGD confidence gap (lower bound on
``Delta(x) = max_{x' in B_eps(x)} |p^S_y(x') - p^T_y(x')|``), the mean certified upper
bound (IBP; CROWN on the first ``eval.crown_points``), the fraction certified
``(eps, delta)``-faithful and label-consistent, on a grid of ``eval.eps`` x
``eval.delta``.

Variants (``python -m experiments.faithful [variant] --config.k=v``):

* ``digits`` (default): scikit-learn 8x8 digits in ``[0, 1]`` (not normalised, so ``eps``
  is in pixel units and the ball is clipped to ``[0, 1]``); MLP teacher and student.
  About 5 minutes on 2 CPU cores.
* ``mnist1d``: MNIST-1D, normalised (``eps`` in units of the data std; clipped to the
  training set's range).
* ``mnist``, ``fashion_mnist`` (TFDS catalog, need network the first time): the paper's
  MNIST-scale setting, pixels in ``[0, 1]``, CNN teacher, MLP student; ``eps`` grids as
  used for MNIST certification (Gowal et al. 2018 train at 0.1-0.4; we evaluate small
  radii where students can be faithful).

``clip``: ``"data"`` (the training split's range ``[min x, max x]``), ``"none"`` or
``[lo, hi]``; used for the evaluation balls and, unless a method config sets its own
``clip``, for the training terms too.
"""

import ml_collections

from experiments.configs.common import validate_common

VARIANTS = ("digits", "mnist1d", "mnist", "fashion_mnist")
# which columns the table shows (eps = eval.report_eps, delta = eval.report_delta)
METRICS = ("test_accuracy", "test_agreement", "pgd_gap", "ibp_gap", "crown_gap",
           "certified_faithful", "certified_agree")


def _runs(eps_train: float, ramp_steps: int, pgd_weight: float, cert_weight: float):
    ce = {"name": "ce", "weight": 0.1}
    kd = {"name": "kd", "weight": 0.9, "temperature": 4.0}
    return [
        {"name": "kd", "methods": [ce, kd]},
        {"name": "ard", "methods": [ce, {"name": "adversarial_distillation", "weight": 0.9,
                                         "eps": eps_train, "temperature": 4.0,
                                         "steps": 5}]},
        {"name": "faithful_pgd", "methods": [ce, kd, {"name": "faithful_pgd",
                                                      "weight": pgd_weight,
                                                      "eps": eps_train, "steps": 5}]},
        {"name": "faithful_certified", "methods": [
            ce, kd, {"name": "faithful_certified", "weight": cert_weight, "eps": eps_train,
                     "ramp_steps": ramp_steps, "warmup_steps": 0, "bound": "ibp"}]},
    ]


def get_config(variant: str = "digits"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid variants: {list(VARIANTS)}.")
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.out_dir = f"runs/faithful_{variant}"
    c.cache_dir = "runs/cache"
    c.seeds = 3
    c.vmap_seeds = True
    c.num_devices = 0
    c.progress = True
    c.clip = "data"

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = variant
    c.dataset.data_dir = ""
    c.dataset.normalize = variant == "mnist1d"
    c.dataset.num_train = 0          # mnist1d only (0 = builder default)
    c.dataset.num_test = 0
    c.dataset.max_train = 0          # catalog only: read the first examples (0 = all)
    c.dataset.val_size = 200 if variant == "digits" else 1000

    c.teacher = ml_collections.ConfigDict()
    c.teacher.seed = 0
    c.teacher.batch_size = 64 if variant == "digits" else 128
    c.teacher.optimizer = ml_collections.ConfigDict(
        {"name": "adamw", "learning_rate": 3e-3, "weight_decay": 1e-4, "schedule": "cosine"})
    c.student = ml_collections.ConfigDict()
    c.student.batch_size = c.teacher.batch_size
    c.student.evaluations = 5        # validation points per run (model selection)
    c.student.optimizer = ml_collections.ConfigDict(
        {"name": "adamw", "learning_rate": 3e-3, "weight_decay": 1e-4, "schedule": "cosine"})

    c.eval = ml_collections.ConfigDict()
    c.eval.num_points = 200          # teacher-correct test points for gaps/certificates
    c.eval.crown_points = 50         # CROWN on the first of them (full CROWN is costly)
    c.eval.crown_method = "crown"    # "crown", "alpha-crown" (optimised slopes) or "crown-ibp"
    c.eval.pgd_steps = 20
    c.eval.pgd_restarts = 2
    c.eval.delta = (0.05, 0.1, 0.2)
    c.eval.seed = 0

    if variant == "digits":
        c.teacher.model, c.teacher.model_kwargs = "mlp", ml_collections.ConfigDict(
            {"hidden": (128, 128)})
        c.teacher.epochs = 40
        c.student.model, c.student.model_kwargs = "mlp", ml_collections.ConfigDict(
            {"hidden": (32,)})
        c.student.epochs = 30
        c.eval.eps = (0.01, 0.02, 0.05, 0.1)
        c.eval.report_eps, c.eval.report_delta = 0.02, 0.1
        c.runs = _runs(eps_train=0.05, ramp_steps=200, pgd_weight=4.0, cert_weight=2.0)
    elif variant == "mnist1d":
        c.teacher.model, c.teacher.model_kwargs = "cnn1d", ml_collections.ConfigDict(
            {"channels": (16, 32), "use_bn": False})
        c.teacher.epochs = 30
        c.student.model, c.student.model_kwargs = "mlp", ml_collections.ConfigDict(
            {"hidden": (64,)})
        c.student.epochs = 20
        c.eval.eps = (0.01, 0.02, 0.05, 0.1)
        c.eval.report_eps, c.eval.report_delta = 0.02, 0.1
        c.eval.crown_method = "crown-ibp"
        c.runs = _runs(eps_train=0.05, ramp_steps=500, pgd_weight=4.0, cert_weight=2.0)
    else:  # mnist, fashion_mnist (TFDS)
        c.teacher.model, c.teacher.model_kwargs = "cnn2d", ml_collections.ConfigDict(
            {"channels": (16, 32), "use_bn": False})
        c.teacher.epochs = 10
        c.student.model, c.student.model_kwargs = "mlp", ml_collections.ConfigDict(
            {"hidden": (128,)})
        c.student.epochs = 10
        c.eval.eps = (0.005, 0.01, 0.02, 0.05)
        c.eval.report_eps, c.eval.report_delta = 0.01, 0.1
        c.eval.crown_method = "crown-ibp"
        c.runs = _runs(eps_train=0.02, ramp_steps=2000, pgd_weight=4.0, cert_weight=2.0)
    return c


def validate(c):
    """Value checks with messages naming the key."""
    validate_common(c)
    if c.eval.num_points < 1 or not 0 <= c.eval.crown_points <= c.eval.num_points:
        raise ValueError(f"config.eval.num_points must be >= 1 and config.eval.crown_points "
                         f"in [0, num_points], got {c.eval.num_points} and "
                         f"{c.eval.crown_points}.")
    from kdjax.faithful.certify import CROWN_METHODS

    if c.eval.crown_method not in CROWN_METHODS:
        raise ValueError(f"config.eval.crown_method must be one of {list(CROWN_METHODS)}, "
                         f"got {c.eval.crown_method!r}.")
    if not c.eval.eps or any(e <= 0 for e in c.eval.eps):
        raise ValueError(f"config.eval.eps must be a non-empty list of radii > 0, got "
                         f"{c.eval.eps}.")
    if not c.eval.delta or any(d < 0 for d in c.eval.delta):
        raise ValueError(f"config.eval.delta must be a non-empty list of values >= 0, got "
                         f"{c.eval.delta}.")
    if c.eval.report_eps not in c.eval.eps or c.eval.report_delta not in c.eval.delta:
        raise ValueError(f"config.eval.report_eps/report_delta must be in config.eval.eps/"
                         f"delta, got {c.eval.report_eps} / {c.eval.report_delta}.")
    clip = c.clip
    if not (clip in ("data", "none") or (isinstance(clip, (tuple, list)) and len(clip) == 2
                                          and clip[0] < clip[1])):
        raise ValueError(f"config.clip must be 'data', 'none' or [lo, hi] with lo < hi, got "
                         f"{clip!r}.")
    if not c.runs:
        raise ValueError("config.runs must name at least one run.")
    for r in c.runs:
        if "name" not in r or "methods" not in r:
            raise ValueError(f"each entry of config.runs needs 'name' and 'methods', got {r}.")
