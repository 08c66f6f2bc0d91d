"""Config of ``experiments/kd2m.py``: KD2M distances vs CE, logit KD and feature MSE.

Setting (KD2M, arXiv:2504.01757, section 5): every student trains on all labelled
training examples with ``CE + lambda * D(student pooled features, teacher pooled
features)`` over each batch; the baselines are CE only, logit KD (Hinton), FitNet (MSE
after a learnt regressor) and the identity-coupling feature MSE (``kd2m_feature_mse``,
an upper bound of exact W2^2). Student and teacher pooled features must have the same
width (no projector, as the paper): both CNN1Ds end with 128 channels.

lambda (``"weight": "auto"``): the paper's lambda = 1e-4 is for 512-d ResNet features,
whose distances are large; at other widths and for other distances the scale differs by
orders of magnitude. "auto" sets, per run, ``lambda = kd2m_ratio * log(C) / D_0`` where
``D_0`` is the run's distance between the *initial* (seed 0) student's and the teacher's
pooled features on the first ``calibration_examples`` training examples and ``log(C)``
is the initial CE: the distance term starts at ``kd2m_ratio`` times the CE term. It uses
training data only (never validation or test); ``kd2m_ratio = 1`` is a scale-matching
choice, not tuned. A number instead of "auto" is used as is.

Every row also reports distances between the student's and the teacher's pooled
features on the held-out TEST split (exact W2^2 and Gaussian W2^2, the same metrics for
every run, and W2^2 relative to the teacher's total feature variance), which is the
quantity of the paper's bound.

Variants: ``python -m experiments.kd2m digits`` (sklearn digits, 8x8 images as 64-long
signals); overrides ``--config.seeds=5 --config.student.epochs=40
--config.run_names="['ce', 'kd2m_exact_ot']"``.
"""

import math

import ml_collections

from experiments.configs.common import cnn1d_teacher, validate_common

# name -> method config of the distance term (the CE term is added to every run)
DISTANCES = {
    "kd2m_exact_ot": {"name": "kd2m_exact_ot"},
    "kd2m_exact_ot_cond": {"name": "kd2m_exact_ot", "conditional": True},
    "kd2m_sinkhorn_div": {"name": "kd2m_sinkhorn_divergence", "max_iterations": 200,
                          "min_iterations": 0},
    "kd2m_sliced": {"name": "kd2m_sliced", "num_projections": 64},
    "kd2m_gaussian_w2": {"name": "kd2m_gaussian_w2"},
    "kd2m_gaussian_w2_cond": {"name": "kd2m_gaussian_w2", "conditional": True},
    "kd2m_gaussian_w2_full": {"name": "kd2m_gaussian_w2", "diagonal": False},
    "kd2m_gaussian_kl": {"name": "kd2m_gaussian_kl"},
    "kd2m_gaussian_kl_cond": {"name": "kd2m_gaussian_kl", "conditional": True},
    "kd2m_mmd_linear": {"name": "kd2m_mmd"},
    "kd2m_mmd_rbf": {"name": "kd2m_mmd", "kernel": "rbf"},
    "kd2m_mmd_rbf_cond": {"name": "kd2m_mmd", "kernel": "rbf", "conditional": True},
    "kd2m_joint_ot": {"name": "kd2m_joint_ot"},
}

BASELINES = {
    "ce": [],
    "kd": [{"name": "kd", "weight": 1.0, "temperature": 4.0}],
    "fitnet": [{"name": "fitnet", "pairs": [["pooled", "pooled"]]}],   # weight 100
    "feature_mse": [{"name": "kd2m_feature_mse", "weight": "auto"}],
}

DEFAULT_RUNS = ("ce", "kd", "fitnet", "feature_mse", "kd2m_exact_ot", "kd2m_exact_ot_cond",
                "kd2m_sinkhorn_div", "kd2m_gaussian_w2", "kd2m_gaussian_w2_cond",
                "kd2m_gaussian_kl", "kd2m_mmd_linear", "kd2m_mmd_rbf")


def make_runs(names, kd2m_weight="auto"):
    """``[{"name", "methods"}]`` for run names of BASELINES and DISTANCES; the distance
    terms (and ``feature_mse``) get ``kd2m_weight`` (a number, or "auto")."""
    runs = []
    for n in names:
        if n in BASELINES:
            extra = [dict(m, weight=kd2m_weight) if m.get("weight") == "auto" else dict(m)
                     for m in BASELINES[n]]
        elif n in DISTANCES:
            extra = [{"weight": kd2m_weight, **DISTANCES[n]}]
        else:
            raise ValueError(f"unknown run {n!r}; valid runs: "
                             f"{sorted(BASELINES) + sorted(DISTANCES)}.")
        runs.append({"name": n, "methods": [{"name": "ce", "weight": 1.0}, *extra]})
    return runs


VARIANTS = ["mnist1d", "digits", "quick", "paper:"]


def config_for(variant: str | None):
    """``(config module, get_config argument)`` of a command-line variant of the KD2M
    driver: ``paper:<tfds name>`` is :mod:`experiments.configs.kd2m_paper`."""
    if variant and variant.startswith("paper:"):
        return "experiments.configs.kd2m_paper", variant[6:]
    return "experiments.configs.kd2m", variant or "mnist1d"


def get_config(variant: str = "mnist1d"):
    c = ml_collections.ConfigDict()
    c.out_dir = "runs/kd2m"
    c.cache_dir = "runs/cache"
    c.seeds = 3
    c.vmap_seeds = True
    c.num_devices = 0              # 0 = all local devices
    c.progress = True

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "mnist1d"
    c.dataset.config = ""
    c.dataset.data_dir = ""
    c.dataset.num_train = 0        # mnist1d only (0 = builder default)
    c.dataset.num_test = 0
    c.dataset.max_examples = 0     # TFDS catalog datasets only: read the first ones (0 = all)
    c.dataset.val_size = 1000      # held out of train for model selection

    c.teacher = cnn1d_teacher()

    c.student = ml_collections.ConfigDict()
    c.student.model = "cnn1d"
    c.student.model_kwargs = ml_collections.ConfigDict({"channels": (16, 128)})
    c.student.epochs = 15
    c.student.batch_size = 128
    c.student.evaluations = 5      # validation points per run (model selection)
    c.student.augment = ""         # kdjax.data augmentation name ("" = none)
    c.student.optimizer = ml_collections.ConfigDict(
        {"name": "adamw", "learning_rate": 3e-3, "weight_decay": 1e-4, "schedule": "cosine"})

    c.kd2m_weight = "auto"         # lambda of the distance terms: "auto" or a number
    c.kd2m_ratio = 1.0             # "auto" lambda: distance term / CE term at init
    c.calibration_examples = 256   # training examples used by "auto"
    c.heldout_examples = 1000      # test examples for the held-out distances (0 = all)
    c.run_names = list(DEFAULT_RUNS)   # any of BASELINES and DISTANCES (see make_runs)

    if variant == "digits":
        c.out_dir = "runs/kd2m_digits"
        c.dataset.name = "digits"
        c.dataset.val_size = 200
        c.student.batch_size = 64
        c.teacher.batch_size = 64
        c.calibration_examples = 128
    elif variant == "quick":   # a smoke run of a few minutes on a CPU
        c.out_dir = "runs/kd2m_quick"
        c.seeds = 2
        c.dataset.num_train, c.dataset.num_test, c.dataset.val_size = 900, 200, 200
        c.teacher.epochs, c.student.epochs, c.student.evaluations = 2, 2, 1
        c.teacher.model_kwargs.channels = (8, 16)
        c.student.model_kwargs.channels = (16,)
        c.run_names = ["ce", "kd2m_exact_ot", "kd2m_gaussian_w2_cond"]
    elif variant != "mnist1d":
        raise ValueError(f"unknown variant {variant!r}; valid: ['digits', 'mnist1d', "
                         "'quick'].")
    return c


def validate(c):
    """Value checks with messages naming the key."""
    validate_common(c)
    if c.student.evaluations < 1:
        raise ValueError(f"config.student.evaluations must be >= 1, got "
                         f"{c.student.evaluations}.")
    if c.kd2m_weight != "auto":
        try:
            w = float(c.kd2m_weight)
        except (TypeError, ValueError):
            w = -1.0
        if not (w > 0 and math.isfinite(w)):
            raise ValueError(f"config.kd2m_weight must be 'auto' or a positive number, got "
                             f"{c.kd2m_weight!r}.")
    if not c.kd2m_ratio > 0:
        raise ValueError(f"config.kd2m_ratio must be > 0, got {c.kd2m_ratio}.")
    if c.calibration_examples < 2:
        raise ValueError(f"config.calibration_examples must be >= 2, got "
                         f"{c.calibration_examples}.")
    if c.heldout_examples < 0:
        raise ValueError(f"config.heldout_examples must be >= 0, got {c.heldout_examples}.")
    if not c.run_names:
        raise ValueError("config.run_names must name at least one run.")
    valid = sorted(BASELINES) + sorted(DISTANCES)
    if len(set(c.run_names)) != len(c.run_names):
        raise ValueError(f"config.run_names has duplicate entries: {list(c.run_names)}.")
    for n in c.run_names:
        if n not in valid:
            raise ValueError(f"config.run_names: unknown run {n!r}; valid runs: {valid}.")
