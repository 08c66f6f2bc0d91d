"""KD2M paper setting (arXiv:2504.01757, section 5) with the paper's networks:

    python -m experiments.paper kd2m                       # CIFAR-10; or svhn_cropped, cifar100

ImageNet-pretrained ResNet-34 teacher (fine-tuned with CE, ``teacher.epochs``) ->
ImageNet-pretrained ResNet-18 student, both 512-d pooled features; loss CE +
lambda * D with lambda = 1e-4 (here D = Gaussian W2 between the pooled feature
distributions, ``kd2m_gaussian_w2``; swap with ``--config.methods``), SGD lr 1e-2
momentum 0.9, cosine, 15 epochs, batch 128. Images stream from the TFDS catalog
(``data.name``) and are resized to ``data.image_size`` (the paper's resolution is not
restated here: 224 matches the ImageNet weights; 32 keeps CIFAR's own). The CIFAR-scale
version on kdjax's model zoo is ``experiments/configs/kd2m_paper.py``.
"""

from experiments.configs import paper_common as pc

DATASETS = ("cifar10", "cifar100", "svhn_cropped")
validate = pc.validate


def get_config(dataset: str = "cifar10"):
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {dataset!r}.")
    c = pc.base(f"kd2m_{dataset}", f"runs/paper_kd2m_{dataset}")
    c.data.kind = "catalog"
    c.data.name = dataset
    c.teacher = pc.network(34, epochs=5, batch_size=128, lr=0.01)
    c.student = pc.network(18, epochs=15, batch_size=128, lr=0.01)
    c.student.optimizer.weight_decay = 0.0
    c.methods = [{"name": "ce", "weight": 1.0},
                 {"name": "kd2m_gaussian_w2", "weight": 1e-4}]
    return c
