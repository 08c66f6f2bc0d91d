"""Host-side batching of an :class:`~kdjax.data.ArrayDataset` into device batches.

:func:`batches` yields dicts ``{"x", "y", "mask", "index", **extras}`` of JAX arrays,
optionally placed with a ``NamedSharding`` over a ``("data",)`` mesh (the batch axis is
split across devices, see ARCHITECTURE.md "Parallelism").

The last partial batch is never silently mis-weighted:

* ``drop_remainder=True`` (training): the ``len(ds) % batch_size`` examples left over
  after shuffling are skipped this epoch (a different set every epoch);
* ``drop_remainder=False`` (evaluation): the last batch is padded to ``batch_size``
  with zero rows whose ``mask`` is 0, so every batch has the same static shape (one
  compilation) and metrics weighted by ``mask`` count every example exactly once.
"""

from __future__ import annotations

from typing import Iterator

import jax
import numpy as np

from kdjax.data.core import ArrayDataset

__all__ = ["batches", "num_batches", "epoch_order"]


def _check_batch_args(ds, batch_size, seed, epoch):
    if not isinstance(ds, ArrayDataset):
        raise TypeError(f"ds must be an ArrayDataset, got {type(ds).__name__}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    for name, value in (("seed", seed), ("epoch", epoch)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}.")


def num_batches(n: int, batch_size: int, *, drop_remainder: bool) -> int:
    """Batches per epoch: ``n // batch_size`` if dropping, else ``ceil(n / batch_size)``."""
    if n < 0 or batch_size < 1:
        raise ValueError(f"need n >= 0 and batch_size >= 1, got n={n}, "
                         f"batch_size={batch_size}.")
    return n // batch_size if drop_remainder else -(-n // batch_size)


def epoch_order(n: int, *, seed: int, epoch: int = 0, shuffle: bool = True) -> np.ndarray:
    """The example order of one epoch: a permutation drawn from ``(seed, epoch)``.

    Uses ``np.random.default_rng([seed, epoch])``, so the order depends only on the seed
    and the epoch number (not on any global state), and differs between epochs.
    """
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def batches(ds: ArrayDataset, batch_size: int, *, seed: int = 0, epoch: int = 0,
            shuffle: bool = True, drop_remainder: bool | None = None,
            sharding: jax.sharding.Sharding | None = None) -> Iterator[dict]:
    """Yields one epoch of batches of ``ds``.

    Args:
      ds: the dataset split.
      batch_size: global batch size; must be divisible by the number of devices of
        ``sharding``'s ``"data"`` axis when a sharding is given.
      seed, epoch: the shuffling order is ``epoch_order(len(ds), seed=seed,
        epoch=epoch)``; pass the epoch number to get a fresh order every epoch.
      shuffle: shuffle (training) or keep the dataset order (evaluation).
      drop_remainder: drop the last partial batch (``True``) or pad it with ``mask=0``
        rows (``False``). Default: ``shuffle`` (drop when training, pad when evaluating).
      sharding: e.g. ``NamedSharding(mesh, P("data"))`` over a ``("data",)`` mesh; every
        array is placed with it (the leading, batch axis is split). ``None``: default
        device.

    Yields:
      ``{"x": float32 [B, ...], "y": int32 [B], "mask": float32 [B] (1 real, 0 padding),
      "index": int32 [B] (row in ds; 0 for padding), **extras}``.
    """
    _check_batch_args(ds, batch_size, seed, epoch)
    if drop_remainder is None:
        drop_remainder = bool(shuffle)
    if sharding is not None:
        if not isinstance(sharding, jax.sharding.Sharding):
            raise TypeError("sharding must be a jax.sharding.Sharding (e.g. NamedSharding"
                            f"(mesh, P('data'))), got {type(sharding).__name__}.")
        mesh, spec = getattr(sharding, "mesh", None), getattr(sharding, "spec", None)
        n_shards = 1
        if mesh is not None and spec is not None and len(spec) and spec[0] is not None:
            axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
            n_shards = int(np.prod([mesh.shape[a] for a in axes]))
        if batch_size % n_shards:
            raise ValueError(f"batch_size must be divisible by the {n_shards} shards "
                             f"of the sharding's batch axis, got batch_size={batch_size}.")
    n = len(ds)
    order = epoch_order(n, seed=seed, epoch=epoch, shuffle=shuffle)
    arrays = {"x": ds.x, "y": ds.y, **ds.extras}
    put = (lambda a: jax.device_put(a, sharding)) if sharding is not None \
        else jax.device_put
    for b in range(num_batches(n, batch_size, drop_remainder=drop_remainder)):
        idx = order[b * batch_size:(b + 1) * batch_size]
        real = len(idx)
        batch = {k: v[idx] for k, v in arrays.items()}
        batch["index"] = idx.astype(np.int32)
        batch["mask"] = np.ones((real,), np.float32)
        if real < batch_size:  # pad: zero rows, mask 0
            pad = batch_size - real
            batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
                     for k, v in batch.items()}
        yield {k: put(v) for k, v in batch.items()}
