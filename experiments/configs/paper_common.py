"""Shared fields of the paper-scale configs of ``experiments/paper.py``."""

import ml_collections

# torchvision ImageNet-1k weights, where `wget -P ~/.cache/kdjax <url>` puts them
# (kdjax.models.convert.TORCHVISION_URLS lists the URLs).
WEIGHTS = {18: "~/.cache/kdjax/resnet18-f37072fd.pth",
           34: "~/.cache/kdjax/resnet34-b627a593.pth",
           50: "~/.cache/kdjax/resnet50-0676ba61.pth"}


def sgd(lr, weight_decay=5e-4, momentum=0.9, schedule="cosine"):
    return ml_collections.ConfigDict({"name": "sgd", "learning_rate": lr,
                                      "momentum": momentum, "weight_decay": weight_decay,
                                      "schedule": schedule})


def network(depth, epochs, batch_size, lr, seed=0):
    return ml_collections.ConfigDict({
        "model": f"tv_resnet{depth}", "pretrained": WEIGHTS[depth], "epochs": epochs,
        "batch_size": batch_size, "optimizer": sgd(lr), "seed": seed})


def base(name, out_dir):
    c = ml_collections.ConfigDict()
    c.name = name
    c.out_dir = out_dir
    c.seed = 0
    c.eval_batch_size = 256
    c.data = ml_collections.ConfigDict({
        "kind": "domainbed", "root": "", "name": "", "target": "", "train_domain": "",
        "eval_domain": "", "eval_split": "test", "data_dir": "", "image_size": 224,
        "holdout_fraction": 0.2, "num_workers": 8, "extras": ()})
    return c


def validate(c):
    from kdjax.models import convert  # noqa: F401 - the error names the URL at load

    if c.data.image_size < 8:
        raise ValueError(f"config.data.image_size must be >= 8, got {c.data.image_size}.")
    for part in ("teacher", "student"):
        if c[part].batch_size % 1 or c[part].batch_size < 1:
            raise ValueError(f"config.{part}.batch_size must be >= 1.")
