"""Tests for kdjax.data.corruption: label flips and teacher-logit corruption."""

import numpy as np
import pytest

from kdjax.data.corruption import corrupt_teacher_logits, flip_labels


def test_noise_helpers():
    y = np.arange(100) % 10
    noisy, mask = flip_labels(y, 0.3, 10, seed=0)
    assert mask.sum() == 30
    assert (noisy[mask] != y[mask]).all() and (noisy[~mask] == y[~mask]).all()
    logits = np.eye(10, dtype=np.float32)[y] * 5
    bad, m2 = corrupt_teacher_logits(logits, 0.3, seed=1)
    assert m2.sum() == 30
    assert (bad[m2].argmax(-1) != y[m2]).all() and (bad[~m2] == logits[~m2]).all()
    np.testing.assert_allclose(np.sort(bad, -1), np.sort(logits, -1))  # a permutation
    # deterministic given the seed; other seeds pick other rows
    np.testing.assert_array_equal(flip_labels(y, 0.3, 10, seed=0)[0], noisy)
    assert not np.array_equal(flip_labels(y, 0.3, 10, seed=1)[1], mask)


def test_corruption_bad_inputs():
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\], got 1.5"):
        flip_labels(np.zeros(4, np.int32), 1.5, 3)
    with pytest.raises(TypeError, match="y must hold integer labels"):
        flip_labels(np.zeros(4), 0.5, 3)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2, got 1"):
        flip_labels(np.zeros(4, np.int32), 0.5, 1)
    with pytest.raises(ValueError, match="logits"):
        corrupt_teacher_logits(np.zeros(4), 0.5)
