"""AUROC against a brute-force pair count (and sklearn), linear CKA against the HSIC form
and its invariances, k-NN overlap against a brute-force neighbour search."""

import numpy as np
import pytest

from kdjax.evaluation import auroc, knn_overlap, linear_cka


def brute_auroc(s, pos):
    p, n = s[pos], s[~pos]
    return np.mean([(a > b) + 0.5 * (a == b) for a in p for b in n])


def test_auroc_matches_pair_count_with_ties():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, size=60).astype(float)      # many ties
    pos = rng.uniform(size=60) < 0.4
    np.testing.assert_allclose(auroc(s, pos), brute_auroc(s, pos), rtol=1e-12)
    np.testing.assert_allclose(auroc(s, pos.astype(int)), brute_auroc(s, pos))
    assert auroc(np.arange(10.0), np.arange(10) >= 5) == 1.0
    assert auroc(-np.arange(10.0), np.arange(10) >= 5) == 0.0
    sk = pytest.importorskip("sklearn.metrics")
    np.testing.assert_allclose(auroc(s, pos), sk.roc_auc_score(pos, s), rtol=1e-12)


def test_auroc_errors():
    with pytest.raises(ValueError, match="both classes, got 3 positive and 0"):
        auroc([1.0, 2.0, 3.0], [True] * 3)
    assert np.isnan(auroc([1.0, 2.0], [True, True], if_undefined=float("nan")))
    with pytest.raises(ValueError, match="same length|one length"):
        auroc([1.0, 2.0], [True])
    with pytest.raises(ValueError, match="finite"):
        auroc([1.0, np.nan], [True, False])
    with pytest.raises(ValueError, match="booleans or 0/1"):
        auroc([1.0, 2.0], [2, 0])


def hsic_cka(x, y):
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = h @ x @ x.T @ h, h @ y @ y.T @ h
    return np.sum(k * l_) / np.sqrt(np.sum(k * k) * np.sum(l_ * l_))


def test_linear_cka_equals_hsic_form_and_is_invariant():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 8))
    y = x @ rng.normal(size=(8, 5)) + 0.5 * rng.normal(size=(50, 5))
    np.testing.assert_allclose(linear_cka(x, y), hsic_cka(x, y), rtol=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    np.testing.assert_allclose(linear_cka(x, 3.0 * x @ q + 7.0), 1.0, rtol=1e-10)
    np.testing.assert_allclose(linear_cka(x, y), linear_cka(y, x), rtol=1e-12)
    assert 0.0 <= linear_cka(x, rng.normal(size=(50, 3))) < linear_cka(x, y) <= 1.0


def test_linear_cka_errors():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="constant embedding"):
        linear_cka(x, np.ones((5, 2)))
    with pytest.raises(ValueError, match="same examples.*5 rows for x and 4"):
        linear_cka(np.ones((5, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="2-D"):
        linear_cka(np.ones(5), np.ones(5))


def brute_knn(z, k, metric):
    if metric == "cosine":
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
    d = ((z[:, None] - z[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return [set(np.argsort(row, kind="stable")[:k]) for row in d]


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_knn_overlap_matches_brute_force(metric):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 6))
    y = x[:, :3] + 0.3 * rng.normal(size=(40, 3))
    k = 5
    want = np.mean([len(a & b) / k for a, b in zip(brute_knn(x, k, metric),
                                                   brute_knn(y, k, metric))])
    np.testing.assert_allclose(knn_overlap(x, y, k, metric=metric), want, rtol=1e-12)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert knn_overlap(x, 2.0 * x @ q, k, metric=metric) == 1.0


def test_knn_overlap_of_unrelated_embeddings_is_near_chance_and_errors():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(400, 4)), rng.normal(size=(400, 4))
    assert abs(knn_overlap(x, y, 10) - 10 / 399) < 0.02
    with pytest.raises(ValueError, match=r"k must be an int in \[1, N - 1\] = \[1, 399\]"):
        knn_overlap(x, y, 400)
    with pytest.raises(ValueError, match="metric"):
        knn_overlap(x, y, 3, metric="manhattan")


def test_feature_distances_closed_forms():
    from kdjax.evaluation import feature_distances

    t = np.random.default_rng(4).normal(size=(40, 6)).astype(np.float32)
    d0 = feature_distances(t, t)
    assert abs(d0["w2"]) < 1e-4 and abs(d0["gaussian_w2"]) < 1e-3
    # a pure shift by s in every one of 6 dims: W2^2 = 6 s^2 (exact and Gaussian)
    far = feature_distances(t + 1.0, t)
    np.testing.assert_allclose(far["w2"], 6.0, rtol=1e-4)
    np.testing.assert_allclose(far["gaussian_w2"], 6.0, rtol=1e-3)
    np.testing.assert_allclose(far["w2_rel"], 6.0 / np.var(t.astype(np.float64), 0).sum(),
                               rtol=1e-4)
    with pytest.raises(ValueError, match="one width"):
        feature_distances(t, t[:, :3])
