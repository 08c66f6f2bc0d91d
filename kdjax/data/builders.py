"""kdjax's embedded, offline datasets as TFDS builders.

Two ``tfds.core.GeneratorBasedBuilder`` subclasses, prepared once into a data directory
as ``array_record`` files and read back through ``builder.as_data_source(split)``
(random access, no TensorFlow needed; ``tfds.load`` would need TensorFlow):

* :class:`KdjaxMnist1d` (TFDS name ``kdjax_mnist1d``): MNIST-1D, Greydanus & Kalai,
  "Scaling down deep learning with MNIST-1D" (ICML 2024), generated with the ``mnist1d``
  package (``mnist1d.data.make_dataset``). The generation parameters are fields of the
  :class:`Mnist1dConfig`, so every setting (a *domain* of the diversity shift) is its own
  builder config and its own prepared directory.
* :class:`KdjaxDigits` (TFDS name ``kdjax_digits``): scikit-learn's handwritten digits
  (UCI "Optical Recognition of Handwritten Digits", Alpaydin & Kaynak 1998; 1797 8x8
  scans shipped with scikit-learn), with a fixed stratified train/test split.

Both store ``x`` as float32 channels-last, ``label`` and an ``index`` (position in the
generated / original dataset) so that a loaded split can be put back in generation order
(TFDS shuffles records by key hash when writing).

Preparing without TensorFlow works with ``file_format="array_record"`` and
``tfds.features.Tensor`` / ``ClassLabel`` / ``Scalar`` features (checked with
tensorflow-datasets 4.9.10). ``DatasetInfo`` is built directly rather than with
``dataset_info_from_configs``, which looks for metadata files beside the module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

__all__ = [
    "Mnist1dConfig",
    "DigitsConfig",
    "KdjaxMnist1d",
    "KdjaxDigits",
    "MNIST1D_DOMAINS",
    "make_builder",
]

# Fields of Mnist1dConfig passed to mnist1d's generator (everything but the sizes).
_MNIST1D_GEN_FIELDS = (
    "template_len", "padding", "scale_coeff", "max_translation", "corr_noise_scale",
    "iid_noise_scale", "shear_scale", "shuffle_seq", "final_seq_length", "seed",
)


@dataclasses.dataclass(eq=False)
class Mnist1dConfig(tfds.core.BuilderConfig):
    """MNIST-1D generation parameters (defaults: ``mnist1d.data.get_dataset_args()``).

    ``num_train`` + ``num_test`` examples are generated in one call of
    ``mnist1d.data.make_dataset`` (``num_samples = num_train + num_test``,
    ``train_split = num_train / num_samples``), so train and test come from the same
    generation and are disjoint. ``num_train + num_test`` must be a multiple of 10
    (the generator makes ``num_samples // 10`` examples per class).
    """

    num_train: int = 10_000
    num_test: int = 2_000
    template_len: int = 12
    padding: tuple[int, int] = (36, 60)
    scale_coeff: float = 0.4
    max_translation: int = 48
    corr_noise_scale: float = 0.25
    iid_noise_scale: float = 2e-2
    shear_scale: float = 0.75
    shuffle_seq: bool = False
    final_seq_length: int = 40
    seed: int = 42

    def params(self) -> dict[str, Any]:
        """The generation parameters and sizes as a plain (JSON-able) dict."""
        out = {f: getattr(self, f) for f in ("num_train", "num_test") + _MNIST1D_GEN_FIELDS}
        out["padding"] = list(out["padding"])
        return out


@dataclasses.dataclass(eq=False)
class DigitsConfig(tfds.core.BuilderConfig):
    """Split parameters for scikit-learn's digits: stratified ``test_fraction`` split."""

    test_fraction: float = 0.2
    split_seed: int = 0

    def params(self) -> dict[str, Any]:
        return {"test_fraction": self.test_fraction, "split_seed": self.split_seed}


# Named MNIST-1D domains for the diversity shift: each changes one group of generation
# parameters relative to the package defaults (sizes small enough for a 2-core CPU).
_DOMAIN_SIZES = dict(num_train=4_000, num_test=1_000)
MNIST1D_DOMAINS: dict[str, dict[str, Any]] = {
    # Little noise, no shear, little scale change: the "clean" rendering.
    "clean": dict(iid_noise_scale=0.0, corr_noise_scale=0.05, shear_scale=0.0,
                  scale_coeff=0.1, seed=101),
    # Heavy i.i.d. Gaussian noise on every sample.
    "iid_noise": dict(iid_noise_scale=0.3, seed=102),
    # Heavy spatially correlated background noise.
    "corr_noise": dict(corr_noise_scale=1.0, seed=103),
    # Strong linear shear.
    "shear": dict(shear_scale=3.0, seed=104),
    # Strong random amplitude scaling.
    "scale": dict(scale_coeff=1.5, seed=105),
    # No translation at all (the default translates by up to 48 of 72 positions).
    "translation": dict(max_translation=1, iid_noise_scale=0.05, seed=106),
}


def _config_name(base: str, overrides: dict[str, Any]) -> str:
    if not overrides:
        return base
    blob = json.dumps(overrides, sort_keys=True, default=list).encode()
    return f"{base}_{hashlib.sha1(blob).hexdigest()[:10]}"


def _mnist1d_configs() -> list[Mnist1dConfig]:
    configs = [Mnist1dConfig(name="default", description="mnist1d package defaults, "
                             "10k train / 2k test.")]
    for dom, params in MNIST1D_DOMAINS.items():
        configs.append(Mnist1dConfig(name=dom, description=f"MNIST-1D domain '{dom}': "
                                     f"{params}", **_DOMAIN_SIZES, **params))
    return configs


def _with_global_rng_restored(fn, *args, **kwargs):
    """Runs ``fn`` and restores NumPy's and Python's global RNG states afterwards.

    ``mnist1d`` seeds the global generators (``np.random.seed``, ``random.seed``); the
    caller's random streams must not change because a dataset was built.
    """
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        return fn(*args, **kwargs)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def generate_mnist1d(config: Mnist1dConfig) -> dict[str, np.ndarray]:
    """Generates MNIST-1D with ``config``: ``{"x", "y", "x_test", "y_test"}`` arrays.

    ``x`` is float32 ``[N, final_seq_length]``. The global NumPy/Python RNG states are
    restored afterwards.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    total = config.num_train + config.num_test
    if total % 10:
        raise ValueError(
            "num_train + num_test must be a multiple of 10 for MNIST-1D (10 classes), "
            f"got {config.num_train} + {config.num_test} = {total}.")
    args = get_dataset_args()
    for f in _MNIST1D_GEN_FIELDS:
        setattr(args, f, getattr(config, f))
    args.padding = list(config.padding)
    args.num_samples = total
    args.train_split = config.num_train / total
    data = _with_global_rng_restored(make_dataset, args)
    return {
        "x": np.asarray(data["x"], np.float32), "y": np.asarray(data["y"], np.int64),
        "x_test": np.asarray(data["x_test"], np.float32),
        "y_test": np.asarray(data["y_test"], np.int64),
    }


class _EmbeddedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of kdjax's builders.

    ``code_path`` is given explicitly: TFDS 4.9.10 derives it through
    ``importlib_resources.abc.Traversable``, and that backport package is not a
    dependency of TFDS, so preparing a builder that lives in a package fails with
    ``ModuleNotFoundError: importlib_resources`` where it is missing.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)


class KdjaxMnist1d(_EmbeddedBuilder):
    """MNIST-1D (Greydanus & Kalai 2024) generated by the ``mnist1d`` package.

    Records: ``x`` float32 ``(final_seq_length, 1)``, ``label`` in [0, 10), ``index``
    (generation order). Configs: ``default`` (package defaults, 10k/2k) and the domains
    of :data:`MNIST1D_DOMAINS` (4k/1k each); any other :class:`Mnist1dConfig` can be
    passed as ``config=``.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = _mnist1d_configs()

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description="MNIST-1D procedural 1-D digits; generation parameters: "
                        + json.dumps(cfg.params(), sort_keys=True),
            features=tfds.features.FeaturesDict({
                "x": tfds.features.Tensor(shape=(cfg.final_seq_length, 1),
                                          dtype=np.float32),
                "label": tfds.features.ClassLabel(num_classes=10),
                "index": tfds.features.Scalar(dtype=np.int64),
            }),
            supervised_keys=("x", "label"),
            homepage="https://github.com/greydanus/mnist1d",
            citation="Greydanus and Kalai, Scaling down deep learning with MNIST-1D, "
                     "ICML 2024.",
        )

    def _split_generators(self, dl_manager):
        data = generate_mnist1d(self.builder_config)
        return {
            "train": self._generate_examples(data["x"], data["y"]),
            "test": self._generate_examples(data["x_test"], data["y_test"]),
        }

    def _generate_examples(self, x, y):
        for i in range(len(y)):
            yield i, {"x": x[i, :, None], "label": int(y[i]), "index": i}


class KdjaxDigits(_EmbeddedBuilder):
    """scikit-learn's 8x8 handwritten digits (UCI optdigits test set, 1797 scans).

    Records: ``x`` float32 ``(8, 8, 1)`` scaled to [0, 1] (pixel counts / 16),
    ``label`` in [0, 10), ``index`` (row in ``sklearn.datasets.load_digits()``). The
    train/test split is stratified by label (``train_test_split(stratify=y)``) with a
    fixed seed: ``test_fraction`` 0.2 and ``split_seed`` 0 by default.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [DigitsConfig(name="default", description="80/20 stratified split, "
                                    "seed 0.")]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn handwritten digits, 8x8 in [0, 1]; split "
                        + json.dumps(self.builder_config.params(), sort_keys=True),
            features=tfds.features.FeaturesDict({
                "x": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.float32),
                "label": tfds.features.ClassLabel(num_classes=10),
                "index": tfds.features.Scalar(dtype=np.int64),
            }),
            supervised_keys=("x", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
            citation="Alpaydin and Kaynak, Optical Recognition of Handwritten Digits, "
                     "UCI Machine Learning Repository, 1998.",
        )

    def _split_generators(self, dl_manager):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        cfg = self.builder_config
        digits = load_digits()
        images = (digits.images / 16.0).astype(np.float32)[..., None]
        idx = np.arange(len(digits.target))
        train_idx, test_idx = train_test_split(
            idx, test_size=cfg.test_fraction, random_state=cfg.split_seed,
            stratify=digits.target)
        return {
            "train": self._generate_examples(images, digits.target, np.sort(train_idx)),
            "test": self._generate_examples(images, digits.target, np.sort(test_idx)),
        }

    def _generate_examples(self, images, labels, rows):
        for i in rows:
            yield int(i), {"x": images[i], "label": int(labels[i]), "index": int(i)}


_BUILDERS = {"mnist1d": (KdjaxMnist1d, Mnist1dConfig), "digits": (KdjaxDigits, DigitsConfig)}


def resolve_config(name: str, config: str | dict | tfds.core.BuilderConfig | None = None,
                   **overrides) -> tfds.core.BuilderConfig:
    """The builder config for embedded dataset ``name``.

    ``config`` is a named config (``None`` = ``"default"``), a dict of parameters
    (optionally with ``"base"``: the named config they override) or a config instance.
    ``overrides`` are applied on top. A config that differs from a named one gets a name
    with a hash of its overrides, hence its own prepared directory.
    """
    if name not in _BUILDERS:
        raise ValueError(f"name must be one of {sorted(_BUILDERS)}, got {name!r}.")
    builder_cls, config_cls = _BUILDERS[name]
    named = {c.name: c for c in builder_cls.BUILDER_CONFIGS}
    if isinstance(config, tfds.core.BuilderConfig):
        if overrides:
            raise ValueError("keyword overrides cannot be combined with a BuilderConfig "
                             f"instance, got overrides {sorted(overrides)}.")
        return config
    if config is None or isinstance(config, str):
        base, params = (config or "default"), {}
    elif isinstance(config, dict):
        params = dict(config)
        base = params.pop("base", "default")
    else:
        raise TypeError("config must be None, a config name, a dict or a "
                        f"tfds.core.BuilderConfig, got {type(config).__name__}.")
    if base not in named:
        raise ValueError(f"config for {name!r} must be one of {sorted(named)} (or a dict "
                         f"of parameters), got {base!r}.")
    params.update(overrides)
    valid = [f.name for f in dataclasses.fields(config_cls)
             if f.name not in ("name", "version", "release_notes", "supported_versions",
                               "description", "tags")]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"unknown {name} config parameters {unknown}; valid parameters "
                         f"are {sorted(valid)}.")
    if "padding" in params:
        params["padding"] = tuple(params["padding"])
    base_cfg = named[base]
    # Drop overrides equal to the base value so that equal configs share one directory.
    params = {k: v for k, v in params.items() if getattr(base_cfg, k) != v}
    if not params:
        return base_cfg
    _validate_params(name, {**base_cfg.params(), **params})
    return dataclasses.replace(
        base_cfg, name=_config_name(base, {k: (list(v) if isinstance(v, tuple) else v)
                                           for k, v in params.items()}),
        description=f"{base} with {dict(sorted(params.items()))}", **params)


def _validate_params(name: str, p: dict[str, Any]) -> None:
    if name == "mnist1d":
        for key in ("num_train", "num_test", "final_seq_length", "template_len",
                    "max_translation"):
            if not isinstance(p[key], (int, np.integer)) or p[key] < 1:
                raise ValueError(f"{key} must be a positive integer, got {p[key]!r}.")
        for key in ("scale_coeff", "corr_noise_scale", "iid_noise_scale", "shear_scale"):
            if not p[key] >= 0:
                raise ValueError(f"{key} must be >= 0, got {p[key]!r}.")
        if (p["num_train"] + p["num_test"]) % 10:
            raise ValueError("num_train + num_test must be a multiple of 10, got "
                             f"{p['num_train']} + {p['num_test']}.")
    else:
        if not 0 < p["test_fraction"] < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {p['test_fraction']}.")


def make_builder(name: str, config=None, *, data_dir=None, **overrides):
    """The (not yet prepared) TFDS builder of embedded dataset ``name``."""
    cfg = resolve_config(name, config, **overrides)
    builder_cls, _ = _BUILDERS[name]
    return builder_cls(config=cfg, data_dir=data_dir, file_format="array_record")
