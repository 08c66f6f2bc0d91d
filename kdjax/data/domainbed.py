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

:class:`CelebaBlondOodBench` is the same kind of builder for CelebA-Blond with
OoD-Bench's environment split files (``tr_env1``, ``tr_env2``, ``te_env``), beside the
Sagawa et al. split that :func:`kdjax.data.load` gives for the TFDS ``celeb_a``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

__all__ = ["DomainbedConfig", "DomainbedFolder", "domainbed_builder", "list_domains",
           "list_classes", "holdout_split", "DOMAINBED_DATASETS", "IMAGE_EXTENSIONS",
           "CelebaBlondOodBench", "celeba_oodbench_builder", "celeba_split_file",
           "OODBENCH_CELEBA_ENVS", "CELEBA_ATTRIBUTES"]

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


# ------------------------------------------------- CelebA-Blond, OoD-Bench's split
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald",
    "Bangs", "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair",
    "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair",
    "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose",
    "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair",
    "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick",
    "Wearing_Necklace", "Wearing_Necktie", "Young")
OODBENCH_CELEBA_ENVS = ("tr_env1", "tr_env2", "te_env")


def _read_split_file(path: str, attr_table) -> list[tuple[str, np.ndarray]]:
    """``[(filename, 40 attributes in {0, 1})]`` of one OoD-Bench split file.

    ``*.pickle``/``*.pkl``: OoD-Bench's pandas DataFrame (index: image file names,
    column ``labels``: the 40 CelebA attributes in {0, 1}); needs pandas. Any other
    file: one image file name per line (first whitespace/comma field), attributes read
    from ``list_attr_celeba.txt`` (``attr_table``).
    """
    if path.endswith((".pickle", ".pkl")):
        import pickle

        try:
            import pandas as pd  # noqa: F401  (unpickling a DataFrame needs it)
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(f"reading OoD-Bench's {path!r} needs pandas "
                              "(pip install pandas).") from err
        with open(path, "rb") as f:
            df = pickle.load(f)
        labels = np.stack([np.asarray(v) for v in df["labels"].values])
        return [(str(n), (labels[i] > 0).astype(np.int64)) for i, n in enumerate(df.index)]
    out = []
    with open(path) as f:
        for line in f:
            name = line.replace(",", " ").split()
            if not name or name[0].lower() in ("filename", "image_id"):
                continue
            if attr_table is None:
                raise ValueError(f"split file {path!r} lists file names only; it needs "
                                 "list_attr_celeba.txt beside img_align_celeba.")
            out.append((name[0], attr_table[name[0]]))
    return out


def _read_attr_table(path: str) -> dict[str, np.ndarray]:
    """CelebA's ``list_attr_celeba.txt``: count, header, then ``file v1..v40`` in ±1."""
    with open(path) as f:
        lines = f.read().splitlines()
    header = lines[1].split()
    if tuple(header) != CELEBA_ATTRIBUTES:
        raise ValueError(f"{path!r} does not have CelebA's 40 attribute columns.")
    table = {}
    for line in lines[2:]:
        parts = line.split()
        if parts:
            table[parts[0]] = (np.asarray(parts[1:], np.int64) > 0).astype(np.int64)
    return table


@dataclasses.dataclass(eq=False)
class CelebaOodBenchConfig(tfds.core.BuilderConfig):
    """``root`` holds ``img_align_celeba/`` and ``blond_split/<env>_df.pickle`` (or
    ``<env>.txt`` file lists with ``list_attr_celeba.txt``)."""

    root: str = ""


class CelebaBlondOodBench(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """CelebA-Blond with OoD-Bench's two training environments and test environment.

    OoD-Bench (Ye et al., "OoD-Bench: Quantifying and Understanding Two Dimensions of
    Out-of-Distribution Generalization", CVPR 2022) splits CelebA into ``tr_env1``,
    ``tr_env2`` (the training environments, with different strengths of the
    hair-colour/gender correlation) and ``te_env`` (the test environment), given as
    pickled DataFrames under ``blond_split/``. Each becomes a TFDS split. Records:
    ``image`` (the JPEG as it is), ``label`` = Blond_Hair (attribute 9), ``spurious`` =
    Male (attribute 20), ``group = 2 * label + spurious`` (as the Sagawa split of
    :func:`kdjax.data.core.celeba_arrays`), ``env`` (0, 1, 2), ``filename``, and
    ``index`` (row in the split file).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"CelebA-Blond, OoD-Bench split, from {self.builder_config.root!r}.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=["not_blond", "blond"]),
                "spurious": tfds.features.Scalar(dtype=np.int64),
                "group": tfds.features.Scalar(dtype=np.int64),
                "env": tfds.features.Scalar(dtype=np.int64),
                "filename": tfds.features.Text(),
                "index": tfds.features.Scalar(dtype=np.int64),
            }),
            supervised_keys=("image", "label"),
            homepage="https://github.com/ynysjtu/ood_bench",
            citation="Ye et al., OoD-Bench, CVPR 2022.",
        )

    def _split_generators(self, dl_manager):
        root = self.builder_config.root
        attr_path = os.path.join(root, "list_attr_celeba.txt")
        attrs = _read_attr_table(attr_path) if os.path.isfile(attr_path) else None
        return {env: self._generate_examples(env, i, celeba_split_file(root, env), attrs)
                for i, env in enumerate(OODBENCH_CELEBA_ENVS)}

    def _generate_examples(self, env, env_index, path, attrs):
        images = os.path.join(self.builder_config.root, "img_align_celeba")
        blond, male = CELEBA_ATTRIBUTES.index("Blond_Hair"), CELEBA_ATTRIBUTES.index("Male")
        for i, (name, a) in enumerate(_read_split_file(path, attrs)):
            with open(os.path.join(images, name), "rb") as f:
                data = f.read()
            y, s = int(a[blond]), int(a[male])
            yield f"{env}/{name}", {"image": data, "label": y, "spurious": s,
                                    "group": 2 * y + s, "env": env_index,
                                    "filename": name, "index": i}


def celeba_split_file(root: str, env: str) -> str:
    """The split file of OoD-Bench environment ``env`` under ``root/blond_split``."""
    base = os.path.join(root, "blond_split")
    for name in (f"{env}_df.pickle", f"{env}.pickle", f"{env}.txt", f"{env}.csv"):
        if os.path.isfile(os.path.join(base, name)):
            return os.path.join(base, name)
    raise FileNotFoundError(
        f"no OoD-Bench split file for {env!r} under {base!r} (expected {env}_df.pickle "
        "from OoD-Bench's data release, https://github.com/ynysjtu/ood_bench, or a "
        f"{env}.txt list of file names with list_attr_celeba.txt in {root!r}).")


def celeba_oodbench_builder(root, *, data_dir=None) -> CelebaBlondOodBench:
    """The (not yet prepared) builder of CelebA-Blond with OoD-Bench's split under
    ``root`` (``img_align_celeba/``, ``blond_split/``); splits ``tr_env1``, ``tr_env2``,
    ``te_env``."""
    from kdjax.data.core import default_data_dir

    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(os.path.join(root, "img_align_celeba")):
        raise ValueError(f"root must hold img_align_celeba/ and blond_split/ (CelebA "
                         f"aligned images and OoD-Bench's split files), got {root!r}.")
    for env in OODBENCH_CELEBA_ENVS:
        celeba_split_file(root, env)
    tag = hashlib.sha1(root.encode()).hexdigest()[:8]
    return CelebaBlondOodBench(config=CelebaOodBenchConfig(name=f"oodbench_{tag}", root=root),
                               data_dir=default_data_dir(data_dir), file_format="array_record")
