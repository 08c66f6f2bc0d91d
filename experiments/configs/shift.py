"""Config of ``experiments/shift.py``: KD under distribution shift (ShiftKD, arXiv 2312.16242).

Grid: ``shifts`` x ``run_methods`` x ``seeds``. A shift is ``"name"`` or
``"name:target"`` (:func:`kdjax.data.make_shift`; for diversity shifts the target is the
left-out domain, :func:`kdjax.data.shift_domains`); a method is the name of an entry of
``methods`` (the catalogue). ``shift`` and ``method.name`` are the cell being run: the
driver sets them per cell, and ``python -m experiments.sweep experiments.shift`` sweeps
them (or anything else) for one cell.

Loss of a cell (ShiftKD): ``ce_weight * CE + kd_weight * KD(temperature) +
method.weight * sum_k w_k L_k`` with the defaults 0.6 / 0.4 (tau 4) / 0.4. The ``L_k``
are the entry's ``methods`` (kdjax method configs); ``w_k`` is the entry's ``weight``
for that config, and when omitted the method's reference weight
(``kdjax.methods.get(name).default_weight``: RepDistiller's weights for the classic zoo,
1e-4 for KD2M, 1 for CoSS), so the ShiftKD 0.4 multiplies a term of the reference scale.
Reference weights above 1 were set for CIFAR feature scales (FitNet 100, AT 1000, NST
50, SP 3000, PKT 30000, FT 200, FSP 50) and can swamp CE on our small models (FitNet at
its reference weight gives a rotated-digits student at 59% in-domain against CE's 94%):
such entries (rule ``val_grid``) train one student set per multiplier of
``weight_grid`` of that lambda and keep the one with the best mean val accuracy over
seeds (held-out source data, never a test split); the row records the multiplier and
every candidate's val accuracy. Entries with ``"kd": False`` drop the KD term: logit methods that replace KD (DKD,
logit-standardised KD, DIST) enter as ``0.6 CE + 0.4 * L_method`` with ``w = 1``. The
``ce`` entry is the CE-only student (``ce_weight`` only, rescaled to 1). ``augment``
adds a data manipulation (``kdjax.data.get_augmentation``) to KD; teacher and student
see the same augmented view. ``student_kwargs`` are added to the student's model options
for that entry (``kd+mixstyle``: MixStyle layers inside the student, which only the
student's training forward pass applies).

Deviations forced by our scale (stated in the report): CRD and SEED use smaller queues
(4096) than the reference (16384 / 65536) since the training sets have a few thousand
examples; AB, FT and FSP run their adapter initialisation stage
(:func:`kdjax.train.pretrain.pretrain`, ``pretrain_epochs`` each) before distillation.
"""

import ml_collections

# One line per method entry: the full catalogue (``run_methods`` picks from it).
METHODS = [
    {"name": "ce", "kd": False, "methods": []},
    {"name": "kd", "methods": []},
    # logit methods (replace KD)
    {"name": "dkd", "kd": False, "methods": [{"name": "dkd", "weight": 1.0}]},
    {"name": "kd_ls", "kd": False, "methods": [{"name": "kd_ls", "weight": 1.0}]},
    {"name": "dist", "kd": False, "methods": [{"name": "dist", "weight": 1.0}]},
    {"name": "mlkd", "kd": False, "methods": [{"name": "mlkd", "weight": 1.0}]},
    # feature methods (pairs picked per architecture when not given: see kdjax.methods.zoo)
    {"name": "fitnet", "methods": [{"name": "fitnet"}]},
    {"name": "at", "methods": [{"name": "at"}]},
    {"name": "nst", "methods": [{"name": "nst"}]},
    {"name": "vid", "methods": [{"name": "vid"}]},
    {"name": "ab", "methods": [{"name": "ab"}]},
    {"name": "ft", "methods": [{"name": "ft"}]},
    {"name": "fsp", "methods": [{"name": "fsp"}]},
    {"name": "reviewkd", "methods": [{"name": "reviewkd"}]},
    {"name": "disco", "methods": [{"name": "disco"}]},
    # relation methods
    {"name": "sp", "methods": [{"name": "sp"}]},
    {"name": "rkd", "methods": [{"name": "rkd"}]},
    {"name": "pkt", "methods": [{"name": "pkt"}]},
    {"name": "cc", "methods": [{"name": "cc"}]},
    {"name": "crd", "methods": [{"name": "crd", "queue_size": 4096}]},
    # distribution matching (KD2M); features picked per architecture (equal widths)
    {"name": "kd2m_sliced", "methods": [{"name": "kd2m_sliced"}]},
    {"name": "kd2m_sinkhorn", "methods": [{"name": "kd2m_sinkhorn"}]},
    {"name": "kd2m_sinkhorn_divergence", "methods": [{"name": "kd2m_sinkhorn_divergence"}]},
    {"name": "kd2m_feature_mse", "methods": [{"name": "kd2m_feature_mse"}]},
    {"name": "kd2m_gaussian_w2", "methods": [{"name": "kd2m_gaussian_w2"}]},
    {"name": "kd2m_mmd", "methods": [{"name": "kd2m_mmd"}]},
    {"name": "kd2m_exact_ot", "methods": [{"name": "kd2m_exact_ot"}]},
    {"name": "kd2m_gaussian_kl", "methods": [{"name": "kd2m_gaussian_kl"}]},
    {"name": "kd2m_joint_ot", "methods": [{"name": "kd2m_joint_ot"}]},
    {"name": "kd2m_gromov_wasserstein", "methods": [{"name": "kd2m_gromov_wasserstein"}]},
    # CoSS family (projector when widths differ)
    {"name": "coss", "methods": [{"name": "coss"}]},
    {"name": "cosine", "methods": [{"name": "cosine"}]},
    {"name": "seed", "methods": [{"name": "seed", "queue_size": 4096}]},
    # faithful distillation (kdjax.faithful; evaluate the networks inside an eps-ball)
    {"name": "faithful_pgd", "methods": [{"name": "faithful_pgd"}]},
    {"name": "faithful_certified", "methods": [{"name": "faithful_certified"}]},
    {"name": "adversarial_distillation", "methods": [{"name": "adversarial_distillation"}]},
    {"name": "rslad", "kd": False, "methods": [{"name": "rslad"}]},
    # data manipulation + KD
    {"name": "kd+noise", "methods": [], "augment": {"name": "gaussian_noise", "std": 0.1}},
    {"name": "kd+mixup", "methods": [], "augment": {"name": "mixup", "alpha": 0.2}},
    {"name": "kd+cutmix", "methods": [], "augment": {"name": "cutmix", "alpha": 1.0},
     "images_only": True},
    {"name": "kd+randaugment", "methods": [],
     "augment": {"name": "randaugment", "num_ops": 2, "magnitude": 0.5}},
    {"name": "kd+domainmix", "methods": [], "augment": {"name": "domainmix", "alpha": 0.2}},
    # MixStyle (kdjax.models.mixstyle; reference p 0.5, alpha 0.1) in the student after
    # its first stage (the reference: after ResNet's first two of four stages)
    {"name": "kd+mixstyle", "methods": [], "student_kwargs": {"mixstyle": [1]}},
]

# The quick relation method is SP (B x B Gram matrices), not RKD: RKD's angle term costs
# O(B^3) per step (93 ms a step for 3 seeds at B = 128 here, 55-106 s a cell, 41% of
# the quick run's 14 min); RKD stays in the full grid.
QUICK_METHODS = ["ce", "kd", "dkd", "kd_ls", "dist", "fitnet", "sp", "kd+mixup"]
FULL_SHIFTS = ["mnist1d_domains:base", "mnist1d_domains:shear", "mnist1d_domains:scale",
               "mnist1d_domains:clean", "rotated_digits:0", "rotated_digits:15",
               "rotated_digits:30", "rotated_digits:45", "rotated_digits:60",
               "rotated_digits:75", "coloured_digits", "spurious_mnist1d"]
# correlation shifts first: the robust-teacher question is asked there
QUICK_SHIFTS = ["coloured_digits", "spurious_mnist1d", "mnist1d_domains:shear",
                "rotated_digits:75"]
# Teacher objectives (teacher.algorithm; kdjax.methods.robust, DomainBed definitions).
# ``partition``: which array of the training data the objective groups by ("env": the
# training environment, DomainBed; "group": label x [attribute != label], Sagawa et
# al. 2020); num_partitions is filled in from the data. erm = plain cross-entropy.
ALGORITHMS = {
    "erm": {"name": "ce"},
    "groupdro": {"name": "groupdro", "partition": "group", "eta": 1e-2},
    "vrex": {"name": "vrex", "partition": "env", "penalty_weight": 10.0,
             "anneal_steps": 100},
    "coral": {"name": "coral", "partition": "env", "gamma": 1.0},
}


def get_config(variant: str = "full"):
    """``variant``: ``"full"`` (every method, LODO over 3 MNIST-1D targets) or
    ``"quick"`` (``--quick``: 8 methods, one target per shift, one robust teacher per
    correlation shift, shorter schedules)."""
    if variant not in ("full", "quick"):
        raise ValueError(f"config variant must be 'full' or 'quick', got {variant!r}.")
    quick = variant == "quick"
    c = ml_collections.ConfigDict()
    c.out_dir = "runs/shift_quick" if quick else "runs/shift"
    c.cache_dir = "runs/cache"
    c.data_dir = ""                # "" = $KDJAX_DATA_DIR or ~/tensorflow_datasets
    c.progress = False
    c.num_devices = 1              # 1 = no data parallelism (small models; CPU)
    c.seeds = 3                    # all seeds of a cell run as one vmapped program

    # the grid
    c.shifts = list(QUICK_SHIFTS if quick else FULL_SHIFTS)
    c.run_methods = list(QUICK_METHODS if quick else [m["name"] for m in METHODS])
    c.methods = [dict(m) for m in METHODS]

    # the cell (set per cell by the driver; swept by experiments.sweep)
    c.shift = "rotated_digits:75"
    c.method = ml_collections.ConfigDict({"name": "kd", "weight": 0.4})

    # ShiftKD loss mix
    c.ce_weight = 0.6
    c.kd_weight = 0.4
    c.temperature = 4.0

    # data: construction seed (fixed across student seeds: one teacher per shift) and
    # per-shift make_shift options
    c.data_seed = 0
    c.val_fraction = 0.2
    c.shift_options = ml_collections.ConfigDict({
        "mnist1d_domains": {"num_train": 1500, "num_test": 500},
        "rotated_digits": {"angles": [0, 30, 60, 75] if quick else [0, 15, 30, 45, 60, 75]},
        "coloured_digits": {"replicas": 2},
        "spurious_mnist1d": {"num_train": 4000, "num_test": 1000},
    })

    # architectures by input kind: signals [N, L, C] and images [N, H, W, C]
    c.models = ml_collections.ConfigDict({
        "signal": {"teacher": "cnn1d", "teacher_kwargs": {"channels": [32, 64, 128]},
                   "student": "cnn1d", "student_kwargs": {"channels": [16, 32, 64]}},
        "image": {"teacher": "cnn2d", "teacher_kwargs": {"channels": [32, 64, 128]},
                  "student": "cnn2d", "student_kwargs": {"channels": [16, 32]}},
    })

    c.teacher = ml_collections.ConfigDict()
    c.teacher.epochs = 15 if quick else 30
    c.teacher.batch_size = 128
    c.teacher.seed = 0
    c.teacher.algorithm = "erm"    # the cell's teacher: erm, a key of algorithms, or
                                   # "robust" (best of robust_teachers on val; per cell)
    c.algorithms = {k: dict(v) for k, v in ALGORITHMS.items()}
    # robust teachers trained per correlation shift; the best on the val split's
    # worst-group accuracy (never the target) teaches the ``robust_methods`` students
    c.robust_teachers = ["groupdro"] if quick else ["groupdro", "vrex", "coral"]
    c.robust_methods = ["kd", "dkd"] if quick else ["kd", "dkd", "dist", "fitnet", "rkd"]
    # pruning before distillation (kdjax.data.pruning; scores from the cell's teacher)
    c.prune = ml_collections.ConfigDict({"score": "none", "keep": 1.0})
    # broken-student flag: in-domain accuracy more than this below the CE student's
    c.broken_margin = 0.10
    # multipliers of lambda tried on val for entries whose reference weight is > 1
    c.weight_grid = [1.0, 0.1] if quick else [1.0, 0.1, 0.01]
    c.teacher.optimizer = ml_collections.ConfigDict(
        {"name": "adamw", "learning_rate": 3e-3, "weight_decay": 1e-4, "schedule": "cosine"})

    c.student = ml_collections.ConfigDict()
    c.student.epochs = 20 if quick else 40
    c.student.batch_size = 128
    c.student.evaluations = 10                   # validation/checkpoint points per run
    # Peak learning rate chosen on the val split (held-out source data, never a target):
    # in the optimizer sweep (experiments/configs/shift_sweeps.py, KD students of the four
    # quick shifts, 3 seeds; docs/results/shift_sweep_optimizer.md) AdamW at 0.05 had the
    # best mean val accuracy on every shift (92.3 / 93.8 / 96.6 / 98.3%) against 0.003
    # (89.9 / 93.1 / 95.0 / 92.6%; SGD+momentum at 0.05: 90.8 / 93.0 / 95.7 / 97.4%).
    c.student.optimizer = ml_collections.ConfigDict(
        {"name": "adamw", "learning_rate": 0.05, "weight_decay": 1e-4, "schedule": "cosine"})
    return c


def _check_entry(entry):
    if not isinstance(entry, dict) or "name" not in entry or "methods" not in entry:
        raise ValueError(f"each entry of config.methods needs 'name' and 'methods' (a list "
                         f"of method configs), got {entry!r}.")
    valid = {"name", "methods", "kd", "augment", "images_only", "weight", "student_kwargs"}
    unknown = sorted(set(entry) - valid)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in method entry {entry['name']!r}; "
                         f"valid keys: {sorted(valid)}.")


def validate(c):
    """Value checks with messages naming the key and the valid choices."""
    from kdjax import data as kdata
    from kdjax import methods as kmethods

    if c.seeds < 1:
        raise ValueError(f"config.seeds must be >= 1, got {c.seeds}.")
    for part in ("teacher", "student"):
        for k in ("epochs", "batch_size"):
            if c[part][k] < 1:
                raise ValueError(f"config.{part}.{k} must be >= 1, got {c[part][k]}.")
    if c.student.evaluations < 1:
        raise ValueError(f"config.student.evaluations must be >= 1, got "
                         f"{c.student.evaluations}.")
    for k in ("ce_weight", "kd_weight", "temperature"):
        if not c[k] >= 0 or (k == "temperature" and c[k] == 0):
            raise ValueError(f"config.{k} must be {'> 0' if k == 'temperature' else '>= 0'}"
                             f", got {c[k]}.")
    if not c.method.weight >= 0:
        raise ValueError(f"config.method.weight must be >= 0, got {c.method.weight}.")
    if not 0 < c.val_fraction < 1:
        raise ValueError(f"config.val_fraction must be in (0, 1), got {c.val_fraction}.")
    entries = list(c.methods)
    for e in entries:
        _check_entry(e)
        for m in e["methods"]:
            if not isinstance(m, dict) or "name" not in m:
                raise ValueError(f"method configs of entry {e['name']!r} need a 'name', "
                                 f"got {m!r}.")
            if m["name"] not in kmethods.names():
                raise ValueError(f"unknown method {m['name']!r} in entry {e['name']!r}; "
                                 f"valid methods: {kmethods.names()}.")
    catalogue = [e["name"] for e in entries]
    if len(set(catalogue)) != len(catalogue):
        raise ValueError(f"config.methods has duplicate entry names: {catalogue}.")
    if not c.run_methods:
        raise ValueError("config.run_methods must name at least one method entry.")
    for name in [*c.run_methods, c.method.name]:
        if name not in catalogue:
            raise ValueError(f"unknown method entry {name!r} (config.run_methods / "
                             f"config.method.name); valid entries: {catalogue}.")
    if not c.shifts:
        raise ValueError("config.shifts must name at least one shift.")
    for spec in [*c.shifts, c.shift]:
        name, _, target = str(spec).partition(":")
        if name not in kdata.list_shifts():
            raise ValueError(f"unknown shift {name!r} in {spec!r} (config.shifts / "
                             f"config.shift); valid shifts: {kdata.list_shifts()}.")
        if target and target not in kdata.shift_domains(name):
            raise ValueError(f"unknown target {target!r} of shift {name!r}; valid targets: "
                             f"{list(kdata.shift_domains(name))}.")
    for name in c.shift_options.keys():
        if name not in kdata.list_shifts():
            raise ValueError(f"config.shift_options.{name}: unknown shift; valid shifts: "
                             f"{kdata.list_shifts()}.")
    algos = list(c.algorithms.keys())
    for name in [c.teacher.algorithm, *c.robust_teachers]:
        if name not in algos and not (name == c.teacher.algorithm == "robust"):
            raise ValueError(f"unknown teacher algorithm {name!r} (config.teacher.algorithm "
                             f"/ config.robust_teachers); valid: {algos}.")
    for name in c.robust_methods:
        if name not in catalogue:
            raise ValueError(f"unknown method entry {name!r} in config.robust_methods; "
                             f"valid entries: {catalogue}.")
    if c.prune.score not in ("none", "random", "el2n", "grand"):
        raise ValueError(f"config.prune.score must be one of ['none', 'random', 'el2n', "
                         f"'grand'], got {c.prune.score!r}.")
    if not 0 < c.prune.keep <= 1:
        raise ValueError(f"config.prune.keep must be in (0, 1], got {c.prune.keep}.")
    if not c.weight_grid or not all(isinstance(g, (int, float)) and g > 0
                                    for g in c.weight_grid):
        raise ValueError(f"config.weight_grid must be a non-empty list of positive "
                         f"multipliers, got {list(c.weight_grid)}.")
    if not 0 <= c.broken_margin <= 1:
        raise ValueError(f"config.broken_margin must be in [0, 1], got {c.broken_margin}.")
    for kind in c.models.keys():
        if kind not in ("signal", "image"):
            raise ValueError(f"config.models.{kind}: valid kinds are ['image', 'signal'].")
