"""Streaming input for datasets that do not fit in memory: grain over TFDS data sources.

A :class:`Stream` is a random-access source (``tfds.data_source(...)`` or
``builder.as_data_source(split)``: array_record files, no TensorFlow) plus a per-example
``transform(record, rng) -> {"x", "y", **extras}`` (decoding, resizing, augmentation)
that runs in grain's worker processes. :meth:`Stream.batches` yields one epoch of
NumPy batches with the same contract as :func:`kdjax.data.batches` (``x``, ``y``,
``mask``, ``index``, extras; the last batch dropped or padded with ``mask=0`` rows):

* **Order**: a permutation of the ``n`` records fixed by ``(seed, epoch)``
  (:func:`kdjax.data.batching.epoch_order`, the same as the in-memory path, so both
  give identical batches), or an explicit ``order`` (the training engine passes its own
  epoch plan; :func:`kdjax.train.distributed.stream_epoch_runner`).
* **Sharding over processes**: global batch ``b`` is ``order[b*B:(b+1)*B]``; a process
  reads only its ``rows`` of it (``slice(lo, hi)``; the engine uses
  :func:`kdjax.train.distributed.process_rows`), so ``P`` processes together read each
  example once and the global batch is their concatenation in process order.
* **Randomness in workers**: the ``rng`` handed to ``transform`` is
  ``np.random.default_rng([seed, epoch, position])`` with ``position`` the example's
  place in the epoch: the same augmentation whatever the number of processes or
  workers, and after a resume.
* **Resumable**: :meth:`StreamIterator.get_state` is a JSON-able dict (epoch, next
  batch, grain's own iterator state) that goes into the orbax checkpoint's metadata;
  :meth:`Stream.restore` continues at exactly the next batch.

Grain's ``MapDataset`` (random access) is batched per process and turned into an
``IterDataset`` with ``ReadOptions`` (threads) and, for ``num_workers > 0``,
``mp_prefetch`` (worker processes; the source and transform must then be picklable).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from kdjax.data.batching import epoch_order, num_batches
from kdjax.data.core import ArrayDataset

__all__ = ["Stream", "StreamIterator", "image_transform", "array_transform",
           "celeba_blond", "from_array_dataset", "materialize", "catalog_stream",
           "domainnet_streams", "concatenate", "subset"]


def _check_int(value, name, minimum=0):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")


# ------------------------------------------------------------------ transforms
@dataclasses.dataclass(frozen=True)
class array_transform:  # noqa: N801 - used like a function
    """Records that already hold arrays: ``x = (record[x_key] - mean) / std`` as float32
    (integers are divided by 255 first), ``y = record[y_key]``, extras copied."""

    x_key: str = "x"
    y_key: str = "label"
    extras: tuple[str, ...] = ()
    mean: Any = None
    std: Any = None

    def __call__(self, record, rng):
        x = np.asarray(record[self.x_key])
        x = x.astype(np.float32) / 255.0 if np.issubdtype(x.dtype, np.integer) \
            else x.astype(np.float32)
        if x.ndim == 2:
            x = x[..., None]
        if self.mean is not None:
            x = ((x - np.asarray(self.mean, np.float64)) / np.asarray(self.std, np.float64)
                 ).astype(np.float32)
        out = {"x": x, "y": np.int32(record[self.y_key])}
        out.update({k: np.asarray(record[k]) for k in self.extras})
        return out


@dataclasses.dataclass(frozen=True)
class image_transform:  # noqa: N801 - used like a function
    """Decode, augment, resize and normalise one image record (runs in the workers).

    ``image`` is a ``uint8 [H, W, C]`` array (TFDS ``Image`` features are decoded by the
    data source) or encoded JPEG/PNG bytes (decoded here with Pillow).

    ``train=True``: torchvision's ``RandomResizedCrop(size, scale=(0.08, 1),
    ratio=(3/4, 4/3))`` + horizontal flip with probability 1/2 (the ImageNet recipe of
    He et al. 2016 and the ShiftKD/DomainBed code); ``train=False``: resize the short
    side to ``size / 0.875`` and centre-crop ``size`` (torchvision's eval transform).
    Bilinear resampling (Pillow). Then ``(x / 255 - mean) / std`` (ImageNet statistics
    by default, as the pretrained backbones expect).
    """

    size: int = 224
    train: bool = False
    image_key: str = "image"
    label_key: str = "label"
    extras: tuple[str, ...] = ()
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    scale: tuple[float, float] = (0.08, 1.0)

    def __call__(self, record, rng):
        from PIL import Image

        img = record[self.image_key]
        if isinstance(img, (bytes, np.bytes_)):
            import io

            pil = Image.open(io.BytesIO(bytes(img))).convert("RGB")
        else:
            arr = np.asarray(img)
            if arr.ndim == 3 and arr.shape[-1] == 1:
                arr = np.repeat(arr, 3, axis=-1)
            pil = Image.fromarray(arr.astype(np.uint8)).convert("RGB")
        w, h = pil.size
        if self.train:
            box = _random_resized_crop_box(w, h, rng, self.scale)
            pil = pil.resize((self.size, self.size), Image.BILINEAR, box=box)
            if rng.random() < 0.5:
                pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            short = int(round(self.size / 0.875))
            nw, nh = (short, max(1, round(h * short / w))) if w <= h else \
                (max(1, round(w * short / h)), short)
            pil = pil.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - self.size) // 2, (nh - self.size) // 2
            pil = pil.crop((left, top, left + self.size, top + self.size))
        x = np.asarray(pil, np.float32) / 255.0
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        out = {"x": x.astype(np.float32), "y": np.int32(record[self.label_key])}
        out.update({k: np.asarray(record[k]) for k in self.extras})
        return out


@dataclasses.dataclass(frozen=True)
class celeba_blond:  # noqa: N801 - used like a function
    """celeb_a records -> the Blond-hair task, then ``transform``: ``label`` =
    ``attributes["Blond_Hair"]``, extras ``spurious`` = ``attributes["Male"]`` and
    ``group = 2 * label + spurious`` (Sagawa et al. 2020, as
    :func:`kdjax.data.core.celeba_arrays`)."""

    transform: Callable = None

    def __call__(self, record, rng):
        y = int(bool(record["attributes"]["Blond_Hair"]))
        a = int(bool(record["attributes"]["Male"]))
        rec = {"image": record["image"], "label": y, "spurious": np.int32(a),
               "group": np.int32(2 * y + a)}
        inner = self.transform or image_transform(extras=("spurious", "group"))
        return inner(rec, rng)


def _random_resized_crop_box(w, h, rng, scale, ratio=(3 / 4, 4 / 3)):
    """torchvision ``RandomResizedCrop.get_params``: 10 tries, then a centre crop."""
    area = w * h
    log_r = np.log(ratio)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(*log_r))
        cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return (left, top, left + cw, top + ch)
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        cw, ch = int(round(h * ratio[1])), h
    else:
        cw, ch = w, h
    left, top = (w - cw) // 2, (h - ch) // 2
    return (left, top, left + cw, top + ch)


# ---------------------------------------------------------------------- stream
class _ArraySource:
    """An :class:`ArrayDataset` as a grain random-access source of records."""

    def __init__(self, ds: ArrayDataset):
        self._arrays = {"x": ds.x, "label": ds.y, **ds.extras}

    def __len__(self):
        return len(self._arrays["x"])

    def __getitem__(self, i):
        return {k: v[int(i)] for k, v in self._arrays.items()}


@dataclasses.dataclass(frozen=True)
class _Fetch:
    """Position ``p`` of this process's epoch plan -> one transformed example.

    ``plan[p]`` is a record index, or ``-1`` for a padding row (mask 0, zeros)."""

    source: Any
    transform: Callable
    plan: np.ndarray
    positions: np.ndarray
    seed: int
    epoch: int

    def __call__(self, p):
        row = int(self.plan[p])
        rec = self.source[max(row, 0)]
        rng = np.random.default_rng([self.seed, self.epoch, int(self.positions[p])])
        out = {k: np.asarray(v) for k, v in self.transform(rec, rng).items()}
        if row < 0:
            out = {k: np.zeros_like(v) for k, v in out.items()}
        out["index"] = np.int32(max(row, 0))
        out["mask"] = np.float32(row >= 0)
        return out


@dataclasses.dataclass(frozen=True)
class Stream:
    """A streamed split: ``source[i] -> record`` and ``transform(record, rng) -> example``.

    Attributes:
      source: random-access source with ``__len__``/``__getitem__`` (a TFDS data source,
        :func:`from_array_dataset`'s wrapper, ...). Must be picklable for
        ``num_workers > 0`` (TFDS array_record sources are).
      num_classes: number of classes of ``y``.
      transform: ``(record, np.random.Generator) -> {"x", "y", **extras}`` with fixed
        shapes (e.g. :class:`image_transform`, :class:`array_transform`).
      name, split: for logs and results.
      num_workers: grain worker processes (``mp_prefetch``); 0 decodes in this process
        with ``num_threads`` threads.
      num_threads, prefetch: grain ``ReadOptions``.
    """

    source: Any
    num_classes: int
    transform: Callable = array_transform()
    name: str = ""
    split: str = ""
    num_workers: int = 0
    num_threads: int = 4
    prefetch: int = 64

    def __post_init__(self):
        _check_int(self.num_classes, "num_classes", 1)
        _check_int(self.num_workers, "num_workers")
        _check_int(self.num_threads, "num_threads", 1)
        if not callable(self.transform):
            raise TypeError(f"transform must be callable, got {type(self.transform).__name__}.")

    def __len__(self) -> int:
        return len(self.source)

    def example(self) -> dict:
        """The transformed record 0 (shapes and dtypes of one example)."""
        return self.transform(self.source[0], np.random.default_rng(0))

    def num_batches(self, batch_size: int, *, drop_remainder: bool) -> int:
        return num_batches(len(self), batch_size, drop_remainder=drop_remainder)

    def batches(self, batch_size: int, *, seed: int = 0, epoch: int = 0,
                shuffle: bool = True, drop_remainder: bool | None = None,
                order: np.ndarray | None = None, rows: slice | None = None,
                start_batch: int = 0) -> "StreamIterator":
        """One epoch of this process's rows of each global batch (NumPy arrays).

        Args:
          batch_size: the *global* batch size ``B``.
          seed, epoch, shuffle: the order is ``epoch_order(n, seed=seed, epoch=epoch,
            shuffle=shuffle)`` (as :func:`kdjax.data.batches`), unless ``order`` is
            given: a permutation (or any int array of record indices) whose
            consecutive ``B``-blocks are the global batches.
          drop_remainder: drop the last partial batch (default ``shuffle``) or pad it
            with ``mask=0`` rows.
          rows: the rows of every global batch this process reads (default all:
            ``slice(0, B)``).
          start_batch: skip the first batches (used by :meth:`restore`).

        Returns:
          A :class:`StreamIterator` yielding ``{"x", "y", "mask", "index", **extras}``
          with leading dimension ``rows.stop - rows.start``.
        """
        _check_int(batch_size, "batch_size", 1)
        _check_int(seed, "seed")
        _check_int(epoch, "epoch")
        _check_int(start_batch, "start_batch")
        if drop_remainder is None:
            drop_remainder = bool(shuffle)
        n = len(self)
        if order is None:
            order = epoch_order(n, seed=seed, epoch=epoch, shuffle=shuffle)
        order = np.asarray(order, np.int64)
        if order.ndim != 1 or (order.size and (order.min() < 0 or order.max() >= n)):
            raise ValueError(f"order must be a 1-D array of record indices in [0, {n}), "
                             f"got shape {order.shape}.")
        rows = slice(0, batch_size) if rows is None else rows
        lo, hi = rows.start or 0, rows.stop
        if not (isinstance(lo, (int, np.integer)) and isinstance(hi, (int, np.integer))
                and 0 <= lo < hi <= batch_size and rows.step in (None, 1)):
            raise ValueError(f"rows must be a contiguous slice within [0, {batch_size}), "
                             f"got {rows!r}.")
        nb = num_batches(len(order), batch_size, drop_remainder=drop_remainder)
        if start_batch > nb:
            raise ValueError(f"start_batch must be <= the {nb} batches of the epoch, got "
                             f"{start_batch}.")
        positions = (np.arange(nb)[:, None] * batch_size
                     + np.arange(lo, hi)[None]).reshape(-1)
        plan = np.where(positions < len(order),
                        order[np.minimum(positions, max(len(order) - 1, 0))], -1)
        state = {"seed": int(seed), "epoch": int(epoch), "batch_size": int(batch_size),
                 "rows": [int(lo), int(hi)], "num_batches": int(nb),
                 "next_batch": int(start_batch)}
        return StreamIterator(self, plan, positions, hi - lo, state)

    def restore(self, state: Mapping[str, Any], *, order: np.ndarray | None = None,
                shuffle: bool = True, drop_remainder: bool | None = None) -> "StreamIterator":
        """The iterator of :meth:`StreamIterator.get_state`, at its next batch."""
        lo, hi = state["rows"]
        return self.batches(state["batch_size"], seed=state["seed"], epoch=state["epoch"],
                            shuffle=shuffle, drop_remainder=drop_remainder, order=order,
                            rows=slice(lo, hi), start_batch=state["next_batch"])


def _absl_flags_parsed() -> None:
    """grain's worker start reads an absl flag; outside an absl app the flags are not
    parsed and that read raises ``UnparsedFlagAccessError``. Marking them parsed keeps
    every flag at its default (what grain's own tests do)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class StreamIterator:
    """Iterates the batches of one epoch; ``get_state()`` says where it stands."""

    def __init__(self, stream: Stream, plan, positions, local_batch: int, state: dict):
        import grain

        self._state = dict(state)
        start = state["next_batch"] * local_batch
        fetch = _Fetch(stream.source, stream.transform, plan, positions, state["seed"],
                       state["epoch"])
        ds = grain.MapDataset.range(len(plan))[start:].map(fetch).batch(
            local_batch, drop_remainder=False)
        it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=stream.num_threads,
                                                     prefetch_buffer_size=stream.prefetch))
        if stream.num_workers:
            _absl_flags_parsed()
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=stream.num_workers))
        self._it = iter(it_ds)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __len__(self) -> int:
        return self._state["num_batches"] - self._state["next_batch"]

    def __next__(self) -> dict:
        if self._state["next_batch"] >= self._state["num_batches"]:
            raise StopIteration
        # own copies: with worker processes grain hands out shared-memory buffers
        batch = {k: np.array(v) for k, v in next(self._it).items()}
        self._state["next_batch"] += 1
        return batch

    def get_state(self) -> dict:
        """JSON-able ``{"seed", "epoch", "batch_size", "rows", "num_batches",
        "next_batch"}``: everything :meth:`Stream.restore` needs (the rest of the epoch
        is a function of it)."""
        return dict(self._state)

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


# ---------------------------------------------------------------- conversions
def from_array_dataset(ds: ArrayDataset, **stream_kwargs) -> Stream:
    """An in-memory split as a :class:`Stream` (records ``{"x", "label", **extras}``,
    identity transform): the reference the streaming path is tested against."""
    transform = array_transform("x", "label", tuple(ds.extras))
    return Stream(_ArraySource(ds), ds.num_classes, transform, name=ds.name,
                  split=ds.split, **stream_kwargs)


def materialize(stream: Stream, *, max_examples: int | None = None,
                batch_size: int = 256) -> ArrayDataset:
    """Reads a stream in record order (eval transform, no shuffling) into memory."""
    n = len(stream) if max_examples is None else min(len(stream), int(max_examples))
    xs, ys, extras = [], [], {}
    for b in stream.batches(batch_size, shuffle=False, drop_remainder=False,
                            order=np.arange(n)):
        keep = b["mask"] > 0
        xs.append(b["x"][keep])
        ys.append(b["y"][keep])
        for k, v in b.items():
            if k not in ("x", "y", "mask", "index"):
                extras.setdefault(k, []).append(v[keep])
    return ArrayDataset(x=np.concatenate(xs), y=np.concatenate(ys).astype(np.int32),
                        num_classes=stream.num_classes, name=stream.name,
                        split=stream.split,
                        extras={k: np.concatenate(v) for k, v in extras.items()})


def catalog_stream(name: str, split: str, transform: Callable | None = None, *,
                   data_dir=None, **stream_kwargs) -> Stream:
    """A TFDS catalog split as a :class:`Stream` (``tfds.data_source``, no TensorFlow).

    ``transform`` defaults to :class:`image_transform` (eval mode, 224 px); for
    ``celeb_a`` wrap it in :class:`celeba_blond`. ``num_classes`` comes from the
    dataset's ``label`` feature (2 for celeb_a).
    """
    import tensorflow_datasets as tfds

    from kdjax.data.core import default_data_dir

    source = tfds.data_source(name, split=split, data_dir=default_data_dir(data_dir))
    base = name.split("/")[0]
    if base == "celeb_a":
        num_classes = 2
        transform = celeba_blond(transform)
    else:
        num_classes = int(source.dataset_info.features["label"].num_classes)
        transform = transform or image_transform()
    return Stream(source, num_classes, transform, name=name, split=split, **stream_kwargs)


def domainnet_streams(target: str, transform_train: Callable, transform_eval: Callable,
                      *, data_dir=None, **stream_kwargs) -> dict:
    """DomainNet leave-one-domain-out: ``{"train": {domain: stream}, "val": {domain:
    stream}, "test_target": stream}`` with the five other domains' ``train`` splits for
    training, their ``test`` splits for in-domain validation, and ``target``'s ``test``
    split as the held-out domain."""
    from kdjax.data.core import DOMAINNET_DOMAINS

    if target not in DOMAINNET_DOMAINS:
        raise ValueError(f"target must be one of {list(DOMAINNET_DOMAINS)}, got {target!r}.")
    sources = [d for d in DOMAINNET_DOMAINS if d != target]
    mk = lambda d, s, t: catalog_stream(f"domainnet/{d}", s, t, data_dir=data_dir,
                                        **stream_kwargs)
    return {"train": {d: mk(d, "train", transform_train) for d in sources},
            "val": {d: mk(d, "test", transform_eval) for d in sources},
            "test_target": mk(target, "test", transform_eval)}


class _ConcatSource:
    """Random access over several sources in sequence; record ``i`` gains ``_env``."""

    def __init__(self, sources):
        self.sources = list(sources)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, i):
        i = int(i)
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return {"_env": k, "_record": self.sources[k][i - int(self.offsets[k])]}


@dataclasses.dataclass(frozen=True)
class _EnvTransform:
    transforms: tuple

    def __call__(self, record, rng):
        out = dict(self.transforms[record["_env"]](record["_record"], rng))
        out["env"] = np.int32(record["_env"])
        return out


def concatenate(streams, *, name: str = "", split: str = "") -> Stream:
    """One stream over several (e.g. the source domains of a leave-one-domain-out
    run), each keeping its own transform; examples gain ``env`` (the stream's position
    in ``streams``), the environment index that DomainBed's objectives read."""
    streams = list(streams)
    if not streams:
        raise ValueError("streams must hold at least one Stream, got none.")
    classes = {s.num_classes for s in streams}
    if len(classes) != 1:
        raise ValueError(f"streams must have the same num_classes, got {sorted(classes)}.")
    first = streams[0]
    return Stream(_ConcatSource([s.source for s in streams]), first.num_classes,
                  _EnvTransform(tuple(s.transform for s in streams)),
                  name=name or "+".join(s.name for s in streams), split=split or first.split,
                  num_workers=first.num_workers, num_threads=first.num_threads,
                  prefetch=first.prefetch)


class _SubsetSource:
    def __init__(self, source, idx):
        self.source, self.idx = source, np.asarray(idx, np.int64)

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        return self.source[int(self.idx[int(i)])]


def subset(stream: Stream, idx, *, transform: Callable | None = None,
           split: str | None = None) -> Stream:
    """The records ``idx`` of ``stream`` (e.g. DomainBed's in/out split of a domain,
    :func:`kdjax.data.domainbed.holdout_split`), optionally with another transform."""
    idx = np.asarray(idx, np.int64)
    if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= len(stream))):
        raise ValueError(f"idx must be a 1-D array of indices in [0, {len(stream)}), got "
                         f"shape {idx.shape}.")
    return dataclasses.replace(stream, source=_SubsetSource(stream.source, idx),
                               transform=transform or stream.transform,
                               split=stream.split if split is None else split)
