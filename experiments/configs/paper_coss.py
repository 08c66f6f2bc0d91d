"""CoSS on an ImageNet-100-layout folder (Singh and Wang, "Simple Unsupervised
Knowledge Distillation With Space Similarity", ECCV 2024) for ``experiments/paper.py``:

    python -m experiments.paper coss --config.data.root=/data/imagenet100

``data.root`` holds ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` (the usual
ImageNet-100 subset layout; read as a two-"domain" DomainBed-layout folder). Teacher:
torchvision ResNet-50 with ImageNet weights, not fine-tuned (``teacher.epochs = 0``);
student ResNet-18 from scratch (``student.pretrained = ""``: CoSS distils without
labels into a randomly initialised student), loss CoSS only (no CE: the distillation
data carry no labels into the loss). The student's classifier head is untrained, so
the reported accuracy is not CoSS's metric; evaluate the ``pooled`` features with
``kdjax.evaluation`` (k-NN, linear probe) for the paper's numbers.
"""

from experiments.configs import paper_common as pc

validate = pc.validate


def get_config():
    c = pc.base("coss_imagenet100", "runs/paper_coss_imagenet100")
    c.data.kind = "imagefolder"
    c.data.train_domain = "train"
    c.data.eval_domain = "val"
    c.data.holdout_fraction = 0.0
    c.teacher = pc.network(50, epochs=0, batch_size=256, lr=0.01)  # lr used if epochs > 0
    c.student = pc.network(18, epochs=100, batch_size=256, lr=0.05)
    c.student.pretrained = ""
    c.methods = [{"name": "coss", "weight": 1.0}]
    return c
