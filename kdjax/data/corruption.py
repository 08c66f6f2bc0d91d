r"""Label corruption as a data construction: flipped labels, a wrong teacher on a subset.

Both are pure functions of numpy arrays and a seed, returning the corrupted array and
the boolean mask of corrupted rows (the ground truth an influence method should find).
They build kdjax's label-noise stress test of KD-AIF (not a setting of the KD-AIF
paper, arXiv 2501.02705, whose experiments are clean and semi-supervised): a weighting
that down-weights the corrupted rows should help there first.
"""

from __future__ import annotations

import numpy as np

from kdjax._checks import check_array

__all__ = ["flip_labels", "corrupt_teacher_logits"]


def _subset(n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}.")
    mask = np.zeros(n, bool)
    mask[rng.permutation(n)[:int(round(fraction * n))]] = True
    return mask


def flip_labels(y: np.ndarray, fraction: float, num_classes: int, seed: int = 0):
    """Flips a random ``fraction`` of labels to a uniformly drawn *other* class.

    Row ``i`` of the chosen subset gets ``(y_i + k_i) mod C`` with ``k_i`` uniform in
    ``{1, ..., C - 1}`` (symmetric label noise, never the true class).

    Examples:
      >>> import numpy as np
      >>> from kdjax.data.corruption import flip_labels
      >>> noisy, mask = flip_labels(np.zeros(10, np.int32), 0.3, 4, seed=0)
      >>> int(mask.sum()), bool((noisy[mask] != 0).all()), bool((noisy[~mask] == 0).all())
      (3, True, True)

    Args:
      y: ``[N]`` integer labels in ``[0, num_classes)``.
      fraction: share of rows to flip, in ``[0, 1]``.
      num_classes: ``C >= 2``.
      seed: numpy seed of the subset and the shifts.

    Returns:
      ``(noisy_y, flipped_mask)``.
    """
    y = np.asarray(y)
    check_array(y, "y", ndim=1)
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"y must hold integer labels, got dtype {y.dtype}.")
    if isinstance(num_classes, bool) or int(num_classes) < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
    rng = np.random.default_rng(seed)
    mask = _subset(len(y), fraction, rng)
    shift = rng.integers(1, num_classes, len(y))
    return np.where(mask, (y + shift) % num_classes, y).astype(y.dtype), mask


def corrupt_teacher_logits(logits: np.ndarray, fraction: float, seed: int = 0):
    """A confidently wrong teacher on a random ``fraction`` of rows.

    The logit vector of a chosen row is rolled by ``k_i`` uniform in ``{1, ..., C-1}``
    classes (``z'_c = z_{(c - k_i) mod C}``): the same confidence, on another class.

    Examples:
      >>> import numpy as np
      >>> from kdjax.data.corruption import corrupt_teacher_logits
      >>> z = np.tile(np.array([[5.0, 0.0, 0.0]]), (4, 1))
      >>> noisy, mask = corrupt_teacher_logits(z, 0.5, seed=0)
      >>> int(mask.sum()), bool((noisy[mask].argmax(1) != 0).all())
      (2, True)

    Args:
      logits: ``[N, C]`` teacher logits.
      fraction: share of rows to corrupt, in ``[0, 1]``.
      seed: numpy seed.

    Returns:
      ``(noisy_logits, corrupted_mask)``.
    """
    logits = np.asarray(logits)
    check_array(logits, "logits", ndim=2)
    rng = np.random.default_rng(seed)
    n, c = logits.shape
    mask = _subset(n, fraction, rng)
    shift = rng.integers(1, c, n)
    cols = (np.arange(c)[None, :] - shift[:, None]) % c
    rolled = np.take_along_axis(logits, cols, axis=1)
    return np.where(mask[:, None], rolled, logits).astype(logits.dtype), mask
