"""In-memory dataset splits and :func:`load` (embedded TFDS builders or the TFDS catalog).

Small datasets live in host memory (and then on device) as NumPy arrays in an
:class:`ArrayDataset`. :func:`load` returns one split:

* ``"mnist1d"`` and ``"digits"`` come from kdjax's own TFDS builders
  (:mod:`kdjax.data.builders`), prepared once into ``data_dir`` as ``array_record`` and
  read back with ``builder.as_data_source(split)`` (no TensorFlow needed);
* any other name is a TFDS catalog name (``"mnist"``, ``"fashion_mnist"``,
  ``"cifar10"``, ``"cifar100"``, ``"svhn_cropped"``, ``"mnist_corrupted/<c>"``,
  ``"cifar10_corrupted/<c>_<severity>"``, ``"celeb_a"``, ...) read with
  ``tfds.data_source(name, split=...)``; that needs network access the first time.

Normalisation (``normalize=True``): per-channel mean and std computed on the TRAIN split
of the same dataset/config and applied to every split; recorded in ``info["mean"]``,
``info["std"]``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

import numpy as np

from kdjax._checks import check_choice

__all__ = ["ArrayDataset", "load", "default_data_dir", "EMBEDDED", "normalize_like",
           "channel_stats", "DOMAINNET_DOMAINS"]

EMBEDDED = ("mnist1d", "digits")

# Catalog datasets whose records are {"image", "label"}; other names are tried with the
# same keys, and celeb_a has its own conversion.
CATALOG_KNOWN = ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn_cropped",
                 "mnist_corrupted/<corruption>", "cifar10_corrupted/<corruption>_<1-5>",
                 "celeb_a", "domainnet/<domain>")

# TFDS domainnet's domains (Peng et al. 2019, "Moment Matching for Multi-Source Domain
# Adaptation"; 345 classes, 586k images): a diversity shift, used leave-one-domain-out.
# At 224 px they do not fit in memory: stream them (kdjax.data.stream.catalog_stream).
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")

# celeb_a: label and spurious attribute of the Blond-hair task (Sagawa et al. 2020).
CELEBA_LABEL = "Blond_Hair"
CELEBA_SPURIOUS = "Male"


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """One in-memory split of a dataset.

    Attributes:
      x: float32 inputs, channels-last: ``(N, 40, 1)`` MNIST-1D, ``(N, 8, 8, 1)``
        digits, ``(N, 28, 28, 1)`` MNIST, ``(N, H, W, C)`` colour images.
      y: int32 labels ``(N,)`` in ``[0, num_classes)``.
      num_classes: number of classes.
      name: dataset name (``"mnist1d"``, ``"digits"``, a catalog name, a shift name).
      split: split name (``"train"``, ``"test"``, ``"val"``, ``"test_target"``, ...).
      extras: per-example side information, each an array with leading dimension N
        (``"env"``, ``"domain"``, ``"group"``, ``"color"``, ``"label_clean"``, ...).
      info: builder config / generation parameters / normalisation statistics.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str
    split: str
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        x, y = np.asarray(self.x), np.asarray(self.y)
        if x.ndim < 2:
            raise ValueError(f"x must have rank >= 2 (N, ...), got shape {x.shape}.")
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must have shape ({x.shape[0]},) to match x {x.shape}, "
                             f"got {y.shape}.")
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"x must be a floating array, got {x.dtype}.")
        if not np.issubdtype(y.dtype, np.integer):
            raise TypeError(f"y must be an integer array, got {y.dtype}.")
        if not isinstance(self.num_classes, (int, np.integer)) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}.")
        if y.size and (y.min() < 0 or y.max() >= self.num_classes):
            raise ValueError(f"y must lie in [0, {self.num_classes}), got values in "
                             f"[{y.min()}, {y.max()}].")
        for key, value in self.extras.items():
            if np.shape(value)[:1] != (x.shape[0],):
                raise ValueError(f"extras[{key!r}] must have leading dimension "
                                 f"{x.shape[0]}, got shape {np.shape(value)}.")
        object.__setattr__(self, "x", x.astype(np.float32, copy=False))
        object.__setattr__(self, "y", y.astype(np.int32, copy=False))
        object.__setattr__(self, "extras", {k: np.asarray(v) for k, v in self.extras.items()})

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, idx, *, split: str | None = None) -> "ArrayDataset":
        """The examples at ``idx`` (integer indices or a boolean mask), extras included."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise ValueError(f"a boolean idx must have shape ({len(self)},), "
                                 f"got {idx.shape}.")
        elif not np.issubdtype(idx.dtype, np.integer) and idx.size:
            raise TypeError(f"idx must hold integers or booleans, got {idx.dtype}.")
        return dataclasses.replace(
            self, x=self.x[idx], y=self.y[idx],
            extras={k: v[idx] for k, v in self.extras.items()},
            split=self.split if split is None else split)


def default_data_dir(data_dir=None) -> str:
    """``data_dir``, else ``$KDJAX_DATA_DIR``, else ``~/tensorflow_datasets``."""
    if data_dir is not None:
        return os.fspath(data_dir)
    return os.environ.get("KDJAX_DATA_DIR",
                          os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (last axis) mean and std of ``x`` in float64; std floored at 1e-8."""
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axis=axes, dtype=np.float64)
    std = x.std(axis=axes, dtype=np.float64)
    return mean, np.maximum(std, 1e-8)


def normalize_like(ds: ArrayDataset, mean, std) -> ArrayDataset:
    """``(x - mean) / std`` per channel, with ``mean``/``std`` recorded in ``info``."""
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    x = ((ds.x - mean) / std).astype(np.float32)
    info = {**ds.info, "normalized": True, "mean": mean.tolist(), "std": std.tolist()}
    return dataclasses.replace(ds, x=x, info=info)


def _records_to_arrays(records: Sequence[dict], keys: Sequence[str]) -> dict[str, np.ndarray]:
    return {k: np.stack([np.asarray(r[k]) for r in records]) for k in keys}


def _read_source(source, n: int | None = None, chunk: int = 4096) -> list[dict]:
    """The first ``n`` (default all) records of a TFDS data source, read in chunks.

    Uses the batched ``__getitems__`` where it works; ``tfds.testing.mock_data``'s
    patched sources fail on it (TypeError), and are read one record at a time.
    """
    n = len(source) if n is None else min(len(source), int(n))
    out: list[dict] = []
    for start in range(0, n, chunk):
        idx = list(range(start, min(n, start + chunk)))
        try:
            out.extend(source.__getitems__(idx))
        except (AttributeError, TypeError):
            out.extend(source[i] for i in idx)
    return out


# ----------------------------------------------------------------- embedded datasets


def _load_embedded_raw(name: str, split: str, data_dir, config, overrides) -> ArrayDataset:
    from kdjax.data import builders

    builder = builders.make_builder(name, config, data_dir=default_data_dir(data_dir),
                                    **overrides)
    check_choice(split, "split", ("train", "test"))
    if not builder.is_prepared():
        # mnist1d seeds NumPy's and Python's global RNGs, and TFDS draws from Python's
        # `random` (temporary directory names): keep the caller's streams unchanged.
        builders._with_global_rng_restored(builder.download_and_prepare)
    source = builder.as_data_source(split)
    arrays = _records_to_arrays(_read_source(source), ("x", "label", "index"))
    order = np.argsort(arrays["index"], kind="stable")  # back to generation order
    cfg = builder.builder_config
    info = {"builder": builder.name, "config": cfg.name, "params": cfg.params(),
            "version": str(builder.version), "data_dir": os.fspath(builder.data_dir)}
    return ArrayDataset(
        x=arrays["x"][order], y=arrays["label"][order].astype(np.int32), num_classes=10,
        name=name, split=split, extras={"index": arrays["index"][order]}, info=info)


@functools.lru_cache(maxsize=64)
def _train_stats_cached(key) -> tuple[tuple, tuple]:
    kind, name, data_dir, config, overrides = key
    if kind == "embedded":
        ds = _load_embedded_raw(name, "train", data_dir, config, dict(overrides))
    else:
        try:
            ds = _load_catalog_raw(name, "train", data_dir, dict(overrides))
        except ValueError:
            raise
        except Exception as err:  # e.g. cifar10_corrupted has only a test split
            raise ValueError(
                f"normalize=True needs the train split of {name!r} for its statistics, "
                f"which could not be read ({type(err).__name__}: {err}); pass "
                "normalize=False and normalise yourself.") from err
    mean, std = channel_stats(ds.x)
    return tuple(mean.tolist()), tuple(std.tolist())


def _freeze(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


# ------------------------------------------------------------------- TFDS catalog


def _to_float_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:  # (N, H, W) -> channels-last
        images = images[..., None]
    if np.issubdtype(images.dtype, np.integer):
        return images.astype(np.float32) / 255.0
    return images.astype(np.float32)


def _resize(images: np.ndarray, image_size) -> np.ndarray:
    import jax
    import jax.numpy as jnp

    h, w = image_size
    out = []
    for start in range(0, len(images), 1024):
        chunk = jnp.asarray(images[start:start + 1024])
        out.append(np.asarray(jax.image.resize(
            chunk, (chunk.shape[0], h, w, chunk.shape[-1]), method="linear",
            antialias=True)))
    return np.concatenate(out) if out else images


def celeba_arrays(records: Sequence[dict]) -> dict[str, np.ndarray]:
    """Blond-hair task arrays from celeb_a records (Sagawa et al. 2020, Group DRO).

    ``y`` = ``attributes["Blond_Hair"]``, spurious attribute ``a`` =
    ``attributes["Male"]``, ``group = 2 * y + a`` (0: not blond female, 1: not blond
    male, 2: blond female, 3: blond male).
    """
    y = np.asarray([bool(r["attributes"][CELEBA_LABEL]) for r in records], np.int32)
    a = np.asarray([bool(r["attributes"][CELEBA_SPURIOUS]) for r in records], np.int32)
    return {"y": y, "spurious": a, "group": 2 * y + a}


def _load_catalog_raw(name: str, split: str, data_dir, kwargs) -> ArrayDataset:
    import tensorflow_datasets as tfds

    kwargs = dict(kwargs)
    image_size = kwargs.pop("image_size", None)
    max_examples = kwargs.pop("max_examples", None)
    source = tfds.data_source(name, split=split, data_dir=data_dir, **kwargs)
    records = _read_source(source, max_examples)
    images = _to_float_images(np.stack([np.asarray(r["image"]) for r in records]))
    if image_size is not None:
        images = _resize(images, tuple(image_size))
    extras: dict[str, np.ndarray] = {}
    base = name.split("/")[0]
    if base == "celeb_a":
        arrays = celeba_arrays(records)
        y, num_classes = arrays["y"], 2
        extras = {"spurious": arrays["spurious"], "group": arrays["group"]}
    else:
        y = np.asarray([r["label"] for r in records], np.int32)
        num_classes = _catalog_num_classes(source, base, y)
    info = {"source": "tfds", "tfds_name": name, "image_size": image_size,
            "max_examples": max_examples}
    return ArrayDataset(x=images, y=y, num_classes=num_classes, name=name, split=split,
                        extras=extras, info=info)


def _catalog_num_classes(source, base: str, y: np.ndarray) -> int:
    try:
        return int(source.dataset_info.features["label"].num_classes)
    except Exception:  # noqa: BLE001 - mocked or unusual sources: fall back to a table
        known = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100,
                 "svhn_cropped": 10, "mnist_corrupted": 10, "cifar10_corrupted": 10}
        return known.get(base, int(y.max()) + 1 if y.size else 1)


# --------------------------------------------------------------------------- load


def load(name: str, split: str = "train", *, data_dir=None,
         config: str | dict | None = None, normalize: bool = True,
         **kwargs) -> ArrayDataset:
    """Loads one split of a dataset into memory as an :class:`ArrayDataset`.

    Args:
      name: ``"mnist1d"`` or ``"digits"`` (kdjax's embedded TFDS builders, offline), or
        a TFDS catalog name such as ``"mnist"``, ``"cifar10"``,
        ``"mnist_corrupted/fog"``, ``"celeb_a"`` (read with ``tfds.data_source``; needs
        network access the first time).
      split: ``"train"`` or ``"test"`` for embedded datasets; any TFDS split string
        for catalog datasets.
      data_dir: where prepared datasets live; default ``$KDJAX_DATA_DIR`` or
        ``~/tensorflow_datasets``.
      config: embedded datasets only: a named builder config (MNIST-1D: ``"default"``
        and the domains ``"clean"``, ``"iid_noise"``, ``"corr_noise"``, ``"shear"``,
        ``"scale"``, ``"translation"``), or a dict of parameters (``{"base": name,
        "num_train": 2000, ...}``).
      normalize: subtract the per-channel mean and divide by the std of the TRAIN split.
      **kwargs: embedded: config parameter overrides (``num_train=2000``); catalog:
        ``image_size=(h, w)`` (resize), ``max_examples`` (read only the first ones) and
        anything else ``tfds.data_source`` accepts (``download=False``, ...).

    Returns:
      An :class:`ArrayDataset`; ``info`` records the config and normalisation stats.
      celeb_a gives the Blond-hair task: ``y`` = Blond_Hair, ``extras["spurious"]`` =
      Male, ``extras["group"] = 2 * y + spurious``.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}.")
    if not isinstance(split, str):
        raise TypeError(f"split must be a str, got {type(split).__name__}.")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}.")
    data_dir = default_data_dir(data_dir)
    if name in EMBEDDED:
        ds = _load_embedded_raw(name, split, data_dir, config, kwargs)
        key = ("embedded", name, data_dir, _freeze(config), _freeze(kwargs))
    else:
        if config is not None:
            raise ValueError("config is only used by the embedded datasets "
                             f"{list(EMBEDDED)}; for catalog dataset {name!r} put the "
                             "TFDS config in the name ('mnist_corrupted/fog'), got "
                             f"config={config!r}.")
        ds = _load_catalog(name, split, data_dir, kwargs)
        key = ("catalog", name, data_dir, None, _freeze(kwargs))
    if not normalize:
        return ds
    if split == "train":
        mean, std = channel_stats(ds.x)
    else:
        mean, std = _train_stats_cached(key)
    return normalize_like(ds, mean, std)


def _load_catalog(name: str, split: str, data_dir, kwargs) -> ArrayDataset:
    import tensorflow_datasets as tfds

    try:
        tfds.builder_cls(name.split("/")[0].split(":")[0])
    except Exception as err:  # DatasetNotFoundError and friends
        raise ValueError(
            f"unknown dataset name {name!r}: the embedded datasets are {list(EMBEDDED)}; "
            "any other name is passed to the TFDS catalog (e.g. "
            f"{', '.join(CATALOG_KNOWN)}), which does not know it.") from err
    return _load_catalog_raw(name, split, data_dir, kwargs)
