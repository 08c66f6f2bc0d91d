"""Tests for kdjax.evaluation.probes: weighted k-NN classifier and linear probe."""

import jax
import numpy as np
import pytest

from kdjax.evaluation.probes import knn_accuracy, knn_predict, linear_probe


def np_weighted_knn(xtr, ytr, xte, num_classes, k, t):
    """Brute force InstDisc/DINO weighted k-NN (float64, no blocking, no shift)."""
    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    sims = unit(xte) @ unit(xtr).T
    preds = []
    for row in sims:
        nn = np.argsort(-row, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for j in nn:
            votes[ytr[j]] += np.exp(row[j] / t)
        preds.append(int(np.argmax(votes)))
    return np.array(preds)


def _blobs(seed, n, d=8, c=4, spread=1.5):
    """Gaussian blobs around fixed class centres (the same for every seed)."""
    centres = np.random.default_rng(1234).normal(size=(c, d)) * 2.0
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, size=n)
    x = centres[y] + spread * rng.normal(size=(n, d))
    return x.astype(np.float32), y.astype(np.int32)


@pytest.mark.parametrize("k,t,block", [(10, 0.07, 16), (1, 0.5, 200), (25, 0.01, 7)])
def test_knn_predict_equals_brute_force(k, t, block):
    xtr, ytr = _blobs(0, 300)
    xte, _ = _blobs(1, 97)
    got = knn_predict(xtr, ytr, xte, num_classes=4, k=k, temperature=t, block_size=block)
    want = np_weighted_knn(xtr, ytr, xte, 4, k, t)
    np.testing.assert_array_equal(got, want)


def test_knn_weighting_matters():
    # Two close class-0 points outweigh three far class-1 points only with weights.
    xtr = np.array([[1.0, 0.0], [1.0, 0.02], [0.6, 0.8], [0.6, 0.8], [0.6, 0.8]], np.float32)
    ytr = np.array([0, 0, 1, 1, 1], np.int32)
    xte = np.array([[1.0, 0.01]], np.float32)
    assert int(knn_predict(xtr, ytr, xte, k=5, temperature=0.07)[0]) == 0
    assert int(knn_predict(xtr, ytr, xte, k=5, temperature=100.0)[0]) == 1


def test_knn_accuracy():
    xtr, ytr = _blobs(2, 400, spread=0.3)
    xte, yte = _blobs(3, 100, spread=0.3)
    acc = knn_accuracy(xtr, ytr, xte, yte)
    want = np.mean(np_weighted_knn(xtr, ytr, xte, 4, 10, 0.07) == yte)
    assert acc == pytest.approx(want) and acc > 0.95
    assert knn_accuracy(xtr, ytr, xte, (yte + 1) % 4) < 0.1


def test_linear_probe_separable():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 3))
    x = (rng.normal(size=(600, 6)) * np.array([1, 10, 0.1, 1, 100, 1])).astype(np.float32)
    y = np.argmax((x / np.array([1, 10, 0.1, 1, 100, 1])) @ w, axis=1).astype(np.int32)
    res = linear_probe(jax.random.PRNGKey(0), x[:500], y[:500], x[500:], y[500:],
                       steps=300, learning_rate=0.05, weight_decay=0.0)
    assert res.train_accuracy > 0.97 and res.accuracy > 0.93
    assert res.weights.shape == (6, 3) and np.isfinite(res.final_loss)
    np.testing.assert_allclose(res.mean, x[:500].mean(0), rtol=1e-4, atol=1e-4)
    # Minibatch training: deterministic from the key, also accurate.
    a = linear_probe(jax.random.PRNGKey(1), x[:500], y[:500], x[500:], y[500:],
                     steps=300, learning_rate=0.05, batch_size=64)
    b = linear_probe(jax.random.PRNGKey(1), x[:500], y[:500], x[500:], y[500:],
                     steps=300, learning_rate=0.05, batch_size=64)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert a.accuracy > 0.9
    # Random labels cannot be predicted on held-out data.
    y_rand = rng.integers(0, 3, size=600).astype(np.int32)
    r = linear_probe(jax.random.PRNGKey(0), x[:500], y_rand[:500], x[500:], y_rand[500:],
                     steps=100)
    assert r.accuracy < 0.6


def test_linear_probe_weight_decay_shrinks_weights():
    x, y = _blobs(4, 200)
    small = linear_probe(jax.random.PRNGKey(0), x, y, x, y, steps=200, weight_decay=0.0)
    big = linear_probe(jax.random.PRNGKey(0), x, y, x, y, steps=200, weight_decay=1.0)
    assert np.linalg.norm(big.weights) < 0.5 * np.linalg.norm(small.weights)


def test_bad_inputs():
    x, y = _blobs(5, 20)
    with pytest.raises(ValueError, match="same feature dim"):
        knn_predict(x, y, x[:, :3])
    with pytest.raises(ValueError, match="train_labels must lie in"):
        knn_predict(x, y, x, num_classes=2)
    with pytest.raises(ValueError, match="k must be <= the number of training points"):
        knn_predict(x, y, x, k=21)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        knn_predict(x, y, x, temperature=0.0)
    with pytest.raises(TypeError, match="train_labels must have an integer dtype"):
        knn_predict(x, y.astype(np.float32), x, num_classes=4)
    with pytest.raises(ValueError, match="test_features and test_labels"):
        knn_accuracy(x, y, x, y[:5])
    with pytest.raises(ValueError, match="steps must be a positive int"):
        linear_probe(jax.random.PRNGKey(0), x, y, x, y, steps=0)
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        linear_probe(jax.random.PRNGKey(0), x, y, x, y, weight_decay=-1.0)
    with pytest.raises(ValueError, match="train_features and train_labels"):
        linear_probe(jax.random.PRNGKey(0), x, y[:3], x, y)
