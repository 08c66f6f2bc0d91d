"""Config of ``experiments/coss.py``: unsupervised distillation, CoSS vs baselines.

Setting: a teacher is trained once (SimCLR on the unlabelled training inputs by default,
or supervised with ``teacher.kind="supervised"``) and cached. Students learn from the
training INPUTS only (no labels, by construction): SimCLR alone (no teacher), per-sample
cosine distillation (CoSS's L_co), SEED, and CoSS with ablations of the space-similarity
weight ``l1`` and of the batch sampler (teacher-neighbour batches vs random batches).
Every student gets the same optimiser steps. Evaluation on frozen student ``pooled``
features: weighted k-NN (k=10, T=0.07) and a linear probe, fit on the train split's
features and labels, scored on the test split and on a shifted MNIST-1D domain.

The default is small (a 4000-example subset of MNIST-1D, few epochs) so that it runs in
minutes on a 2-core CPU. The full setting (CoSS-like scale for MNIST-1D):
``--config.dataset.max_train=0 --config.teacher.epochs=100
--config.teacher.model_kwargs.channels=(32,64,128) --config.student.epochs=60
--config.seeds=5``. Variants are config arguments: ``python -m experiments.coss digits``
(8x8 digits, 2-D CNNs, no shifted domain).
"""

import ml_collections

VARIANTS = ("mnist1d", "digits")
SAMPLERS = ("neighbors", "random")
TEACHER_KINDS = ("simclr", "supervised")
RUN_KINDS = ("simclr", "distill", "init")


def _adamw(lr=3e-3):
    return ml_collections.ConfigDict(
        {"name": "adamw", "learning_rate": lr, "weight_decay": 1e-4, "schedule": "cosine"})


def get_config(variant: str = "mnist1d"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid variants: {list(VARIANTS)}.")
    c = ml_collections.ConfigDict()
    c.out_dir = "runs/coss"
    c.cache_dir = "runs/cache"
    c.seeds = 3
    c.vmap_seeds = True            # all seeds of a run as one vmapped program
    c.num_devices = 0              # 0 = all local devices
    c.progress = True
    c.checkpoint_every = 5         # student epochs between checkpoints (resume)

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = variant       # "mnist1d" or "digits"
    c.dataset.config = ""          # embedded builder config ("" = default)
    c.dataset.data_dir = ""        # "" = $KDJAX_DATA_DIR or ~/tensorflow_datasets
    c.dataset.max_train = 4000 if variant == "mnist1d" else 0   # random subset, 0 = all
    # Shifted test domain (MNIST-1D domain name from kdjax.data.MNIST1D_DOMAINS, "" =
    # none); normalised with the SOURCE train statistics.
    c.dataset.shift_config = "shear" if variant == "mnist1d" else ""

    # Augmented views of SimCLR (teacher and the SimCLR-only student), kdjax.recipes.simclr.
    c.ssl = ml_collections.ConfigDict()
    c.ssl.temperature = 0.5
    c.ssl.proj_dim = 64
    c.ssl.hidden_dim = 256
    c.ssl.max_shift = 6 if variant == "mnist1d" else 1
    c.ssl.scale = 0.3
    c.ssl.noise_std = 0.2

    conv = "cnn1d" if variant == "mnist1d" else "cnn2d"
    c.teacher = ml_collections.ConfigDict()
    c.teacher.kind = "simclr"      # or "supervised" (penultimate "pooled" features)
    c.teacher.model = conv
    c.teacher.model_kwargs = ml_collections.ConfigDict({"channels": (32, 64)})
    c.teacher.epochs = 20 if variant == "mnist1d" else 60
    c.teacher.batch_size = 256
    c.teacher.seed = 0
    c.teacher.val_size = 500       # supervised teacher only: held out for model selection
    c.teacher.optimizer = _adamw()

    c.student = ml_collections.ConfigDict()
    c.student.model = conv
    c.student.model_kwargs = ml_collections.ConfigDict({"channels": (16, 32)})
    c.student.epochs = 10 if variant == "mnist1d" else 40
    c.student.batch_size = 256     # a multiple of 1 + distill.num_sampled
    c.student.optimizer = _adamw()

    c.distill = ml_collections.ConfigDict()
    c.distill.hidden_dim = 256     # projector width (CoSS: 2048 for ResNets)
    c.distill.knn_k = 31           # teacher k-NN graph (CoSS: top 31)
    c.distill.num_sampled = 15     # neighbours per anchor in a batch (CoSS: 15)
    c.distill.seed_queue_size = 1024   # SEED: 65536 for ImageNet; about N/4 here

    c.eval = ml_collections.ConfigDict()
    c.eval.knn_k = 10
    c.eval.knn_temperature = 0.07
    c.eval.probe_steps = 300
    c.eval.probe_learning_rate = 0.01
    c.eval.probe_weight_decay = 1e-4

    # Each run: a name, a kind ("simclr": student alone; "distill": method + sampler;
    # "init": the untrained student, a floor) and for "distill" the method config.
    c.runs = [
        {"name": "init", "kind": "init"},
        {"name": "simclr", "kind": "simclr"},
        {"name": "cosine", "kind": "distill", "sampler": "random",
         "method": {"name": "cosine"}},
        {"name": "seed", "kind": "distill", "sampler": "random",
         "method": {"name": "seed"}},
        {"name": "coss_l1=1", "kind": "distill", "sampler": "neighbors",
         "method": {"name": "coss", "l1": 1.0}},
        {"name": "coss_l1=0.5", "kind": "distill", "sampler": "neighbors",
         "method": {"name": "coss", "l1": 0.5}},
        {"name": "coss_l1=0", "kind": "distill", "sampler": "neighbors",
         "method": {"name": "coss", "l1": 0.0}},
        {"name": "coss_l1=1_random", "kind": "distill", "sampler": "random",
         "method": {"name": "coss", "l1": 1.0}},
    ]
    return c


def validate(c):
    """Value checks with messages naming the key."""
    if c.seeds < 1:
        raise ValueError(f"config.seeds must be >= 1, got {c.seeds}.")
    if c.dataset.name not in VARIANTS:
        raise ValueError(f"config.dataset.name must be one of {list(VARIANTS)}, got "
                         f"{c.dataset.name!r}.")
    if c.dataset.max_train < 0:
        raise ValueError(f"config.dataset.max_train must be >= 0, got {c.dataset.max_train}.")
    if c.dataset.shift_config:
        from kdjax.data import MNIST1D_DOMAINS
        if c.dataset.name != "mnist1d":
            raise ValueError("config.dataset.shift_config needs dataset.name='mnist1d', got "
                             f"{c.dataset.name!r}; set it to ''.")
        if c.dataset.shift_config not in MNIST1D_DOMAINS:
            raise ValueError(f"config.dataset.shift_config must be one of "
                             f"{sorted(MNIST1D_DOMAINS)} or '', got "
                             f"{c.dataset.shift_config!r}.")
    if c.teacher.kind not in TEACHER_KINDS:
        raise ValueError(f"config.teacher.kind must be one of {list(TEACHER_KINDS)}, got "
                         f"{c.teacher.kind!r}.")
    for part in ("teacher", "student"):
        for k in ("epochs", "batch_size"):
            if c[part][k] < 1:
                raise ValueError(f"config.{part}.{k} must be >= 1, got {c[part][k]}.")
    group = 1 + c.distill.num_sampled
    if c.distill.num_sampled < 1 or c.distill.knn_k < c.distill.num_sampled:
        raise ValueError(f"need 1 <= config.distill.num_sampled <= config.distill.knn_k, "
                         f"got {c.distill.num_sampled} and {c.distill.knn_k}.")
    if c.student.batch_size % group:
        raise ValueError(f"config.student.batch_size must be a multiple of 1 + "
                         f"config.distill.num_sampled = {group} (whole anchor groups), got "
                         f"{c.student.batch_size}.")
    if not 0 < c.ssl.temperature:
        raise ValueError(f"config.ssl.temperature must be > 0, got {c.ssl.temperature}.")
    if c.checkpoint_every < 1:
        raise ValueError(f"config.checkpoint_every must be >= 1, got {c.checkpoint_every}.")
    if not c.runs:
        raise ValueError("config.runs must name at least one run.")
    names = [r.get("name") for r in c.runs]
    if len(set(names)) != len(names):
        raise ValueError(f"config.runs names must be unique, got {names}.")
    for r in c.runs:
        if "name" not in r or r.get("kind") not in RUN_KINDS:
            raise ValueError(f"each entry of config.runs needs a 'name' and a 'kind' in "
                             f"{list(RUN_KINDS)}, got {r}.")
        if r["kind"] == "distill":
            if "method" not in r or r.get("sampler") not in SAMPLERS:
                raise ValueError(f"distill run {r['name']!r} needs 'method' and a 'sampler' "
                                 f"in {list(SAMPLERS)}, got {r}.")
            from kdjax import methods
            m = methods.build(dict(r["method"]))   # unknown methods/options raise here
            if m.method.needs_labels:
                raise ValueError(f"run {r['name']!r}: method {m.name!r} reads labels; this "
                                 f"experiment distils without labels.")
