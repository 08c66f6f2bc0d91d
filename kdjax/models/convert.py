"""torchvision ResNet state dicts -> Flax variables of :class:`TorchvisionResNet`.

The mapping (torch name -> Flax path, array transform):

=====================================  ==============================================
``<m>.weight`` of a conv (O, I, kh, kw)  ``params/<m>/kernel`` (kh, kw, I, O)
``fc.weight`` (O, I), ``fc.bias``        ``params/fc/kernel`` (I, O), ``params/fc/bias``
``<bn>.weight``, ``<bn>.bias``           ``params/<bn>/scale``, ``params/<bn>/bias``
``<bn>.running_mean``, ``running_var``   ``batch_stats/<bn>/mean``, ``batch_stats/<bn>/var``
``<bn>.num_batches_tracked``             dropped (Flax BatchNorm has a fixed momentum)
=====================================  ==============================================

with module names ``layer1.0.downsample.0`` -> ``layer1_0/downsample_conv`` and
``layer1.0.downsample.1`` -> ``layer1_0/downsample_bn``. Every key must map and every
Flax variable must be filled (shapes checked), so a wrong depth or a non-torchvision
file is a ``ValueError`` listing the offending names, never a silently partial model.

Files: ``.safetensors`` are read with ``safetensors.numpy`` (no torch needed);
``.pth``/``.pt`` (torchvision's downloads) need ``torch`` and are read with
``torch.load(weights_only=True)``; torch is imported only there.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
import numpy as np

from kdjax.models.torchvision import TORCHVISION_DEPTHS, TorchvisionResNet

__all__ = ["TORCHVISION_URLS", "load_state_dict", "torchvision_to_flax",
           "load_pretrained", "merge_pretrained"]

# torchvision's ImageNet-1k weights (torchvision.models.ResNet*_Weights.IMAGENET1K_V1).
TORCHVISION_URLS = {
    18: "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    34: "https://download.pytorch.org/models/resnet34-b627a593.pth",
    50: "https://download.pytorch.org/models/resnet50-0676ba61.pth",
}


def _missing_file_message(path, depth) -> str:
    urls = {depth: TORCHVISION_URLS[depth]} if depth in TORCHVISION_URLS \
        else TORCHVISION_URLS
    where = "; ".join(f"resnet{d}: {u}" for d, u in urls.items())
    return (f"pretrained checkpoint {os.fspath(path)!r} does not exist. Download "
            f"torchvision's ImageNet weights ({where}), e.g. `wget -P <dir> <url>` or "
            "`torchvision.models.resnet50(weights='IMAGENET1K_V1')` which caches them "
            "in ~/.cache/torch/hub/checkpoints/, and set the config's pretrained path "
            "to the file (.pth, or .safetensors converted with safetensors.torch.save_file).")


def load_state_dict(path, *, depth: int | None = None) -> dict[str, np.ndarray]:
    """Reads a torch state dict from ``.safetensors`` or ``.pth``/``.pt`` as NumPy arrays.

    A missing file raises ``FileNotFoundError`` naming torchvision's download URL for
    ``depth`` (all three when ``depth`` is None).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(_missing_file_message(path, depth))
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    if path.endswith((".pth", ".pt", ".bin")):
        try:
            import torch
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(f"reading {path!r} needs torch (pip install torch); or "
                              "convert it once to .safetensors elsewhere.") from err
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, Mapping) and "state_dict" in sd:
            sd = sd["state_dict"]
        return {k.removeprefix("module."): v.detach().cpu().numpy() for k, v in sd.items()}
    raise ValueError(f"path must end in .safetensors, .pth, .pt or .bin, got {path!r}.")


def _flax_path(torch_key: str) -> tuple[str, tuple[str, ...]] | None:
    """``(collection, path)`` of a torch key, or None for ``num_batches_tracked``."""
    *mods, leaf = torch_key.split(".")
    if leaf == "num_batches_tracked":
        return None
    name = ".".join(mods)
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", name)
    if m:
        sub = {"downsample.0": "downsample_conv", "downsample.1": "downsample_bn"}.get(
            m.group(3), m.group(3))
        path = (f"layer{m.group(1)}_{m.group(2)}", sub)
    else:
        path = (name,)
    is_bn = "bn" in path[-1]
    if leaf in ("running_mean", "running_var"):
        return "batch_stats", path + ("mean" if leaf == "running_mean" else "var",)
    if leaf == "weight":
        return "params", path + ("scale" if is_bn else "kernel",)
    if leaf == "bias":
        return "params", path + ("bias",)
    return "params", path + (leaf,)  # unknown leaf: reported as unmatched below


def _transform(value: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if path[-1] == "kernel" and value.ndim == 4:  # (O, I, kh, kw) -> (kh, kw, I, O)
        return value.transpose(2, 3, 1, 0)
    if path[-1] == "kernel" and value.ndim == 2:  # Linear (O, I) -> (I, O)
        return value.T
    return value


def torchvision_to_flax(state_dict: Mapping[str, Any], depth: int, *,
                        num_classes: int | None = None) -> dict:
    """Flax variables ``{"params", "batch_stats"}`` of ``TorchvisionResNet(depth)``.

    Args:
      state_dict: torch names -> arrays (NumPy or anything ``np.asarray`` reads).
      depth: 18, 34 or 50.
      num_classes: the classifier size the arrays must have (default: ``fc.weight``'s
        rows). Use :func:`merge_pretrained` to put a fresh head of another size on.

    Raises:
      ValueError: keys without a counterpart, variables left unfilled, or shape
        mismatches, each listed.
    """
    if depth not in TORCHVISION_DEPTHS:
        raise ValueError(f"depth must be one of {sorted(TORCHVISION_DEPTHS)}, got {depth!r}.")
    if "fc.weight" not in state_dict:
        raise ValueError("state_dict has no 'fc.weight'; is it a torchvision ResNet state "
                         f"dict? first keys: {sorted(state_dict)[:5]}.")
    n_out = int(np.shape(state_dict["fc.weight"])[0])
    if num_classes is not None and num_classes != n_out:
        raise ValueError(f"num_classes={num_classes} but the checkpoint's fc has {n_out} "
                         "outputs; load with num_classes=None and replace the head with "
                         "merge_pretrained.")
    model = TorchvisionResNet(num_classes=n_out, depth=depth)
    template = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32), train=False))
    flat_template = {(c,) + tuple(p.key for p in path): leaf.shape
                     for c in template
                     for path, leaf in jax.tree_util.tree_flatten_with_path(template[c])[0]}
    out: dict[tuple, np.ndarray] = {}
    unmatched, bad_shapes = [], []
    for key, value in state_dict.items():
        mapped = _flax_path(key)
        if mapped is None:
            continue
        collection, path = mapped
        full = (collection,) + path
        if full not in flat_template:
            unmatched.append(key)
            continue
        arr = _transform(value, path)
        if arr.shape != flat_template[full]:
            bad_shapes.append(f"{key}: {np.shape(value)} -> {arr.shape}, expected "
                              f"{flat_template[full]}")
            continue
        out[full] = arr
    missing = sorted("/".join(k) for k in set(flat_template) - set(out))
    if unmatched or bad_shapes or missing:
        raise ValueError(
            f"state_dict does not match torchvision resnet{depth}: "
            f"unmatched torch keys {sorted(unmatched)[:10]}, shape mismatches "
            f"{bad_shapes[:10]}, Flax variables left unfilled {missing[:10]}.")
    variables: dict = {}
    for full, arr in out.items():
        node = variables
        for part in full[:-1]:
            node = node.setdefault(part, {})
        node[full[-1]] = arr
    return variables


def merge_pretrained(init_variables: Mapping, pretrained: Mapping, *,
                     skip: tuple[str, ...] = ("fc",)) -> dict:
    """``init_variables`` with every top-level module but ``skip`` from ``pretrained``.

    The usual fine-tuning start: the backbone from ImageNet, a freshly initialised
    classifier of the task's size (``skip=("fc",)``). Shapes are checked.
    """
    out = {}
    for col, tree in init_variables.items():
        out[col] = dict(tree)
        for name, sub in tree.items():
            if name in skip:
                continue
            if col not in pretrained or name not in pretrained[col]:
                raise ValueError(f"pretrained variables lack {col}/{name}.")
            new = pretrained[col][name]
            s_new = jax.tree_util.tree_map(np.shape, new)
            s_old = jax.tree_util.tree_map(np.shape, sub)
            if s_new != s_old:
                raise ValueError(f"{col}/{name}: pretrained shapes {s_new} differ from "
                                 f"the model's {s_old}.")
            out[col][name] = jax.tree_util.tree_map(np.asarray, new)
    return out


def load_pretrained(path, depth: int, num_classes: int, *, key: jax.Array,
                    dtype=np.float32) -> tuple[TorchvisionResNet, dict]:
    """``(module, variables)``: torchvision weights from ``path`` with a fresh head.

    The head is ``num_classes`` wide and initialised from ``key`` (unless the file's
    ``fc`` already has ``num_classes`` outputs: then it is kept). A missing file is a
    ``FileNotFoundError`` naming torchvision's URL.
    """
    sd = load_state_dict(path, depth=depth)
    pretrained = torchvision_to_flax(sd, depth)
    module = TorchvisionResNet(num_classes=num_classes, depth=depth, dtype=dtype)
    if int(np.shape(sd["fc.weight"])[0]) == num_classes:
        return module, pretrained
    init = module.init(key, np.zeros((1, 64, 64, 3), np.float32), train=False)
    return module, merge_pretrained(jax.device_get(init), pretrained)
