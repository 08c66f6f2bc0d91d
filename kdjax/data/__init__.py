"""kdjax.data: embedded TFDS builders, TFDS catalog loading, shifts, augmentation, batching.

* :func:`load` -> :class:`ArrayDataset` (one in-memory split; ``"mnist1d"``/``"digits"``
  from kdjax's TFDS builders, other names from the TFDS catalog).
* :func:`batches`: deterministic, sharded host->device batches with a ``mask``.
* :mod:`kdjax.data.augment`: jittable batch augmentations; :func:`get_augmentation`.
* :func:`make_shift` / :func:`list_shifts`: diversity and correlation shift benchmarks.
* :class:`Stream`: datasets too large for memory, streamed with grain from a TFDS data
  source (:mod:`kdjax.data.stream`).
"""

from kdjax.data import augment
from kdjax.data.augment import get_augmentation
from kdjax.data.batching import batches, num_batches
from kdjax.data.builders import MNIST1D_DOMAINS, KdjaxDigits, KdjaxMnist1d
from kdjax.data.core import EMBEDDED, ArrayDataset, default_data_dir, load
from kdjax.data.shifts import list_shifts, make_shift, shift_domains
from kdjax.data.stream import (Stream, StreamIterator, array_transform, from_array_dataset,
                               image_transform, materialize)

__all__ = [
    "ArrayDataset",
    "load",
    "default_data_dir",
    "EMBEDDED",
    "MNIST1D_DOMAINS",
    "KdjaxMnist1d",
    "KdjaxDigits",
    "batches",
    "num_batches",
    "augment",
    "get_augmentation",
    "make_shift",
    "list_shifts",
    "shift_domains",
    "Stream",
    "StreamIterator",
    "array_transform",
    "image_transform",
    "from_array_dataset",
    "materialize",
]
