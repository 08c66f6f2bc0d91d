"""Tests for kdjax.data.neighbors: blockwise k-NN graph and batch samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.data.neighbors import knn_graph, neighbor_batches, random_batches


def np_knn(x, k):
    """Brute force: full similarity matrix, self excluded, stable sort."""
    x = np.asarray(x, np.float64)
    u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sims = u @ u.T
    np.fill_diagonal(sims, -np.inf)
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(sims, idx, axis=1)


@pytest.mark.parametrize("n,d,k,block", [(203, 7, 9, 32), (64, 3, 5, 64), (50, 4, 49, 7)])
def test_knn_graph_equals_brute_force(n, d, k, block):
    x = np.random.default_rng(n).normal(size=(n, d)).astype(np.float32)
    x[3] *= 50.0  # scale must not matter
    idx, sims = knn_graph(x, k, block_size=block)
    assert idx.shape == (n, k) and idx.dtype == jnp.int32 and sims.dtype == jnp.float32
    want_idx, want_sims = np_knn(x, k)
    idx = np.asarray(idx)
    # the same neighbours in the same order, up to float32 near-ties: the float64
    # similarity of each returned neighbour equals the reference's at that rank, and
    # the indices are those of the reference wherever the rank is not a near-tie
    u = np.asarray(x, np.float64)
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    true_sims = np.take_along_axis(u @ u.T, idx, axis=1)
    np.testing.assert_allclose(true_sims, want_sims, atol=1e-5)
    gaps = np.abs(np.diff(want_sims, axis=1))
    tie = np.zeros_like(want_idx, bool)
    tie[:, 1:] |= gaps < 1e-5
    tie[:, :-1] |= gaps < 1e-5
    np.testing.assert_array_equal(idx[~tie], want_idx[~tie])
    assert all(len(set(row)) == k for row in idx)
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)
    assert not (np.asarray(idx) == np.arange(n)[:, None]).any()  # self excluded


def test_knn_graph_duplicates_and_zero_rows():
    x = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    x[7] = x[2]          # exact duplicate: the other copy is the nearest neighbour
    x[11] = 0.0          # zero row: similarity 0 to everything, finite
    idx, sims = knn_graph(x, 3, block_size=8)
    assert int(idx[2, 0]) == 7 and int(idx[7, 0]) == 2
    np.testing.assert_allclose(sims[2, 0], 1.0, atol=1e-6)
    assert np.isfinite(np.asarray(sims)).all()
    np.testing.assert_allclose(sims[11], 0.0, atol=1e-7)


def test_neighbor_batches_structure():
    n, m, c = 100, 3, 6
    x = np.random.default_rng(1).normal(size=(n, 5)).astype(np.float32)
    nbrs, _ = knn_graph(x, 8)
    nbrs = np.asarray(nbrs)
    key = jax.random.PRNGKey(3)
    batches = np.asarray(neighbor_batches(key, nbrs, 12, num_sampled=m, num_candidates=c))
    assert batches.shape == (n // 3, 12) and batches.dtype == np.int32
    groups = batches.reshape(-1, 1 + m)
    anchors = groups[:, 0]
    assert len(set(anchors.tolist())) == len(anchors)  # each anchor once per epoch
    for g in groups:
        tail = g[1:]
        assert len(set(tail.tolist())) == m                # without replacement
        assert set(tail.tolist()) <= set(nbrs[g[0], :c].tolist())
        assert g[0] not in tail
    # Sampling covers the candidate pool (not always the same top-m).
    chosen = np.concatenate([g[1:] for g in groups])
    ranks = [list(nbrs[g[0]]).index(j) for g in groups for j in g[1:]]
    assert max(ranks) == c - 1 and min(ranks) == 0 and chosen.size == len(ranks)
    # Deterministic from the key; a different key gives a different epoch.
    again = neighbor_batches(key, nbrs, 12, num_sampled=m, num_candidates=c)
    np.testing.assert_array_equal(again, batches)
    other = neighbor_batches(jax.random.fold_in(key, 1), nbrs, 12, num_sampled=m,
                             num_candidates=c)
    assert not np.array_equal(np.asarray(other), batches)
    # num_sampled == num_candidates: the top neighbours in order.
    top = np.asarray(neighbor_batches(key, nbrs, 8, num_sampled=3, num_candidates=3))
    for g in top.reshape(-1, 4):
        np.testing.assert_array_equal(g[1:], nbrs[g[0], :3])


def test_authors_configuration_shapes():
    # Each anchor + 15 of its top 31; 16 anchors per batch -> 256 examples.
    nbrs = np.random.default_rng(0).integers(0, 1000, size=(1000, 31)).astype(np.int32)
    b = neighbor_batches(jax.random.PRNGKey(0), nbrs, 256)
    assert b.shape == (1000 // 16, 256)


def test_random_batches():
    b = np.asarray(random_batches(jax.random.PRNGKey(0), 103, 10))
    assert b.shape == (10, 10) and b.dtype == np.int32
    assert len(set(b.ravel().tolist())) == 100 and b.min() >= 0 and b.max() < 103
    np.testing.assert_array_equal(random_batches(0, 103, 10), b)  # int seed = PRNGKey


def test_bad_inputs():
    x = np.ones((10, 3), np.float32)
    with pytest.raises(ValueError, match="k must be < the number of embeddings"):
        knn_graph(x, 10)
    with pytest.raises(ValueError, match="embeddings must have rank 2"):
        knn_graph(x[0], 1)
    with pytest.raises(TypeError, match="embeddings must have a floating dtype"):
        knn_graph(x.astype(np.int32), 1)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        knn_graph(x, 2, block_size=0)
    nbrs = np.zeros((10, 4), np.int32)
    with pytest.raises(ValueError, match="batch_size must be a multiple of 1 \\+ num_sampled"):
        neighbor_batches(jax.random.PRNGKey(0), nbrs, 10, num_sampled=3, num_candidates=4)
    with pytest.raises(ValueError, match="num_sampled <= num_candidates"):
        neighbor_batches(jax.random.PRNGKey(0), nbrs, 8, num_sampled=3, num_candidates=5)
    with pytest.raises(TypeError, match="neighbors must have an integer dtype"):
        neighbor_batches(jax.random.PRNGKey(0), nbrs.astype(np.float32), 8, num_sampled=3,
                         num_candidates=4)
    with pytest.raises(ValueError, match="dataset has only 10 examples"):
        neighbor_batches(jax.random.PRNGKey(0), nbrs, 64, num_sampled=3, num_candidates=4)
    with pytest.raises(ValueError, match="batch_size \\(11\\) must be <= num_examples"):
        random_batches(jax.random.PRNGKey(0), 10, 11)
    with pytest.raises(ValueError, match="num_examples must be a positive int"):
        random_batches(jax.random.PRNGKey(0), 0, 4)
