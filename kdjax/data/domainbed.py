"""A TFDS builder for DomainBed-layout image folders: ``<root>/<domain>/<class>/*.jpg``.

PACS, VLCS, Office-Home and TerraIncognita as DomainBed's download script leaves them
(Gulrajani & Lopez-Paz, "In Search of Lost Domain Generalization", ICLR 2021;
``domainbed/scripts/download.py`` and ``domainbed/datasets.py``, which reads each domain
with ``torchvision.datasets.ImageFolder``) are one directory per domain with one
sub-directory per class. :class:`DomainbedFolder` turns one domain into one TFDS
builder config, prepared once into ``data_dir`` as ``array_record`` and read back with
``builder.as_data_source("train")`` (random access, no TensorFlow), the input of a
:class:`kdjax.data.Stream`.

Records: ``image`` (the file's bytes stored as they are, JPEG-encoded; the data source
decodes them to ``uint8 [H, W, 3]`` with Pillow), ``label`` (class index: the classes
are the *sorted union* of class directory names over all domains, so a label means the
same class in every domain; ``ImageFolder`` sorts per domain, which is the same when
every domain has every class, as in all four datasets), ``domain`` (index of the domain
in the sorted domain list), ``filename`` (path relative to ``root``) and ``index``
(position in the sorted file list, for a stable order: TFDS shuffles records by key
hash when writing).

One split, ``"train"``, holds the whole domain, as in DomainBed, where every
environment is split into ``in``/``out`` parts by the experiment (``holdout_fraction``
0.2 with a seeded permutation): :func:`holdout_split`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

__all__ = ["DomainbedConfig", "DomainbedFolder", "domainbed_builder", "list_domains",
           "list_classes", "holdout_split", "DOMAINBED_DATASETS", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# The domains of the datasets DomainBed's download script produces (for checks/docs).
DOMAINBED_DATASETS = {
    "PACS": ("art_painting", "cartoon", "photo", "sketch"),
    "VLCS": ("Caltech101", "LabelMe", "SUN09", "VOC2007"),
    "OfficeHome": ("Art", "Clipart", "Product", "Real World"),
    "TerraIncognita": ("location_100", "location_38", "location_43", "location_46"),
}


def _subdirs(path: str) -> list[str]:
    return sorted(d for d in os.listdir(path)
                  if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))


def list_domains(root: str) -> list[str]:
    """The sorted domain directory names under ``root``."""
    if not os.path.isdir(root):
        raise ValueError(f"root must be a DomainBed-layout directory "
                         f"(<root>/<domain>/<class>/*.jpg), got {root!r}, which does not "
                         "exist.")
    domains = _subdirs(root)
    if not domains:
        raise ValueError(f"root {root!r} has no domain sub-directories.")
    return domains


def list_classes(root: str) -> list[str]:
    """The sorted union of class directory names over every domain of ``root``."""
    return sorted({c for d in list_domains(root) for c in _subdirs(os.path.join(root, d))})


def _files(root: str, domain: str) -> list[tuple[str, str]]:
    out = []
    base = os.path.join(root, domain)
    for cls in _subdirs(base):
        for dirpath, _, names in sorted(os.walk(os.path.join(base, cls))):
            for name in sorted(names):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    out.append((cls, os.path.relpath(os.path.join(dirpath, name), root)))
    return out


@dataclasses.dataclass(eq=False)
class DomainbedConfig(tfds.core.BuilderConfig):
    """One domain of a DomainBed-layout folder.

    Attributes:
      root: the dataset directory (``<root>/<domain>/<class>/*.jpg``).
      domain: the domain directory name.
      classes: class names (label order); default: :func:`list_classes` of ``root``.
    """

    root: str = ""
    domain: str = ""
    classes: tuple[str, ...] = ()


class DomainbedFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One domain of a DomainBed-layout image folder as a TFDS dataset (module docs).

    Build with :func:`domainbed_builder` (config name
    ``<dataset>_<domain>_<hash of root and classes>``, so two folders never share a
    prepared directory).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:  # see builders._EmbeddedBuilder
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"DomainBed-layout folder {cfg.root!r}, domain {cfg.domain!r}.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=list(cfg.classes)),
                "domain": tfds.features.Scalar(dtype=np.int64),
                "filename": tfds.features.Text(),
                "index": tfds.features.Scalar(dtype=np.int64),
            }),
            supervised_keys=("image", "label"),
            homepage="https://github.com/facebookresearch/DomainBed",
            citation="Gulrajani and Lopez-Paz, In Search of Lost Domain Generalization, "
                     "ICLR 2021.",
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        cfg = self.builder_config
        label = {c: i for i, c in enumerate(cfg.classes)}
        domain = list_domains(cfg.root).index(cfg.domain)
        for i, (cls, rel) in enumerate(_files(cfg.root, cfg.domain)):
            path = os.path.join(cfg.root, rel)
            with open(path, "rb") as f:
                data = f.read()
            if not rel.lower().endswith((".jpg", ".jpeg")):
                data = _to_jpeg(data)
            yield rel, {"image": data, "label": label[cls], "domain": domain,
                        "filename": rel, "index": i}


def _to_jpeg(data: bytes) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def domainbed_builder(root, domain: str, *, data_dir=None, dataset: str | None = None,
                      classes=None) -> DomainbedFolder:
    """The (not yet prepared) builder of ``domain`` under ``root``.

    Call ``builder.download_and_prepare()`` once, then
    ``builder.as_data_source("train")``. ``dataset`` names it (default: ``root``'s
    base name); ``classes`` fixes the label order (default :func:`list_classes`).
    """
    from kdjax.data.core import default_data_dir

    root = os.path.abspath(os.fspath(root))
    domains = list_domains(root)
    if domain not in domains:
        raise ValueError(f"domain must be one of {domains} (the directories under "
                         f"{root!r}), got {domain!r}.")
    classes = tuple(list_classes(root) if classes is None else classes)
    if not classes:
        raise ValueError(f"no class directories under {root!r}/<domain>/.")
    dataset = dataset or os.path.basename(root.rstrip(os.sep))
    tag = hashlib.sha1(repr((root, classes)).encode()).hexdigest()[:8]
    safe = "".join(ch if ch.isalnum() else "_" for ch in f"{dataset}_{domain}").lower()
    cfg = DomainbedConfig(name=f"{safe}_{tag}", description=f"{dataset}/{domain}",
                          root=root, domain=domain, classes=classes)
    return DomainbedFolder(config=cfg, data_dir=default_data_dir(data_dir),
                           file_format="array_record")


def holdout_split(n: int, fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray,
                                                                         np.ndarray]:
    """``(in_idx, out_idx)``: DomainBed's per-environment split (``misc.split_dataset``
    with ``holdout_fraction``): a seeded permutation, the first ``int(n * fraction)``
    indices held out. Sorted index arrays."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}.")
    perm = np.random.default_rng(seed).permutation(n)
    k = int(n * fraction)
    return np.sort(perm[k:]), np.sort(perm[:k])
