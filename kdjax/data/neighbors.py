"""Teacher k-NN graph and neighbour batch sampling for CoSS (arXiv 2409.13939).

CoSS builds its training batches from an *offline* teacher k-NN graph
(coss-pytorch ``compute_close_far.py`` and ``batch_sampler.CFBatchSampler``): teacher
embeddings of the whole training set are L2-normalised, each example's nearest
neighbours by cosine similarity are stored, and every batch is a set of random anchors,
each followed by ``nearest_k = 15`` neighbours drawn without replacement from its
``total_k = 31`` nearest. The space-similarity term then sees groups of semantically
close examples.

* :func:`knn_graph` computes the graph blockwise in JAX (``[block, N]`` similarities at
  a time, ``jax.lax.top_k``), so N = 10k..50k fits in memory; self is excluded.
* :func:`neighbor_batches` and :func:`random_batches` return one epoch of batches as an
  int32 index array ``[num_batches, batch_size]``, deterministic from a PRNG key (use
  ``jax.random.fold_in(key, epoch)`` per epoch). They yield indices only; the training
  step gathers inputs with them and never sees labels.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax._checks import check_array, check_float_array

__all__ = ["knn_graph", "neighbor_batches", "random_batches"]


def _check_pos_int(v, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}.")


@functools.partial(jax.jit, static_argnames=("k", "block_size"))
def _knn_blocks(x, k: int, block_size: int):
    n = x.shape[0]
    x = x.astype(jnp.float32)
    x = x / optax.safe_norm(x, 1e-12, axis=1, keepdims=True)
    num_blocks = -(-n // block_size)
    pad = num_blocks * block_size - n
    queries = jnp.pad(x, ((0, pad), (0, 0))).reshape(num_blocks, block_size, -1)
    rows = jnp.arange(num_blocks * block_size).reshape(num_blocks, block_size)

    def block(args):
        q, r = args
        sims = jnp.dot(q, x.T, precision=jax.lax.Precision.HIGHEST)  # [block, N]
        sims = jnp.where(r[:, None] == jnp.arange(n)[None, :], -jnp.inf, sims)
        return jax.lax.top_k(sims, k)

    vals, idx = jax.lax.map(block, (queries, rows))
    return (idx.reshape(-1, k)[:n].astype(jnp.int32), vals.reshape(-1, k)[:n])


def knn_graph(embeddings: chex.Array, k: int = 31, *, block_size: int = 256
              ) -> tuple[chex.Array, chex.Array]:
    r"""Each row's ``k`` nearest other rows by cosine similarity, computed blockwise.

    ``sim(i, j) = <x_i/|x_i|, x_j/|x_j|>``; row ``i`` itself is excluded (set to
    ``-inf`` before ``jax.lax.top_k``, rather than dropping the first hit as the CoSS
    script does, which would be wrong when ``x_i`` has exact duplicates: duplicates are
    kept as neighbours with similarity 1). Neighbours are sorted by decreasing
    similarity; ties go to the lower index. Memory is ``O(block_size * N)``; zero rows
    have similarity 0 to everything.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.data.neighbors import knn_graph
      >>> x = jnp.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
      >>> idx, sims = knn_graph(x, k=1)
      >>> idx[:, 0].tolist()
      [1, 0, 1]

    Args:
      embeddings: ``[N, D]`` teacher embeddings (any float dtype; float32 math).
      k: neighbours per row, ``1 <= k < N`` (CoSS keeps the top 31 for sampling).
      block_size: query rows per block.

    Returns:
      ``(indices [N, k] int32, similarities [N, k] float32)``.
    """
    check_float_array(embeddings, "embeddings", ndim=2)
    _check_pos_int(k, "k")
    _check_pos_int(block_size, "block_size")
    n = embeddings.shape[0]
    if k >= n:
        raise ValueError(f"k must be < the number of embeddings ({n}), got {k}.")
    return _knn_blocks(jnp.asarray(embeddings), int(k), int(min(block_size, n)))


def _as_key(key):
    """An int seed becomes ``jax.random.PRNGKey(seed)``; keys pass through."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return jax.random.PRNGKey(int(key))
    return key


def _epoch_anchors(key, n: int, anchors_per_batch: int):
    num_batches = n // anchors_per_batch
    return jax.random.permutation(key, n)[: num_batches * anchors_per_batch], num_batches


def neighbor_batches(key: chex.PRNGKey, neighbors: chex.Array, batch_size: int, *,
                     num_sampled: int = 15, num_candidates: int = 31) -> chex.Array:
    """One epoch of CoSS neighbour batches: anchors each followed by sampled neighbours.

    Anchors are a random permutation of ``range(N)`` (every example is an anchor at most
    once per epoch; the last ``N mod anchors_per_batch`` are dropped, as the authors'
    sampler drops the incomplete batch). Each anchor ``a`` is followed by
    ``num_sampled`` distinct neighbours drawn uniformly without replacement from
    ``neighbors[a, :num_candidates]`` (authors: 15 of the top 31; with
    ``num_sampled == num_candidates`` the top ones in order). A batch is
    ``[a_1, n_1^1..n_1^m, a_2, n_2^1..., ...]`` with
    ``batch_size / (1 + num_sampled)`` anchors, so ``batch[g * (1+m)]`` is an anchor and
    the next ``m`` entries its neighbours.

    Duplicates are kept, as in the authors' sampler: an example can appear in a batch
    both as an anchor and as another anchor's neighbour, or as the neighbour of two
    anchors (the batch size stays fixed; the loss then counts it twice). Keep every
    anchor group on one device by making ``batch_size / device_count`` a multiple of
    ``1 + num_sampled`` (the authors' per-GPU batch holds whole groups).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from kdjax.data.neighbors import knn_graph, neighbor_batches
      >>> x = jax.random.normal(jax.random.PRNGKey(0), (40, 8))
      >>> nbrs, _ = knn_graph(x, k=7)
      >>> neighbor_batches(jax.random.PRNGKey(1), nbrs, 16, num_sampled=3,
      ...                  num_candidates=7).shape
      (10, 16)

    Args:
      key: PRNG key or int seed (fold in the epoch number for a new epoch).
      neighbors: ``[N, K]`` int neighbour indices from :func:`knn_graph`.
      batch_size: examples per batch, a multiple of ``1 + num_sampled``.
      num_sampled: neighbours per anchor (authors: 15).
      num_candidates: sample from the nearest ``num_candidates`` (authors: 31),
        ``num_sampled <= num_candidates <= K``.

    Returns:
      int32 ``[N // anchors_per_batch, batch_size]``.
    """
    check_array(neighbors, "neighbors", ndim=2)
    if not jnp.issubdtype(jnp.asarray(neighbors).dtype, jnp.integer):
        raise TypeError(f"neighbors must have an integer dtype, got "
                        f"{jnp.asarray(neighbors).dtype}.")
    _check_pos_int(batch_size, "batch_size")
    _check_pos_int(num_sampled, "num_sampled")
    _check_pos_int(num_candidates, "num_candidates")
    n, k = neighbors.shape
    if not num_sampled <= num_candidates <= k:
        raise ValueError(
            f"need num_sampled <= num_candidates <= neighbors.shape[1], got num_sampled="
            f"{num_sampled}, num_candidates={num_candidates}, neighbors shape "
            f"{neighbors.shape}."
        )
    group = 1 + num_sampled
    if batch_size % group:
        raise ValueError(f"batch_size must be a multiple of 1 + num_sampled = {group}, "
                         f"got {batch_size}.")
    if n < batch_size // group:
        raise ValueError(f"batch_size needs {batch_size // group} anchors but the dataset "
                         f"has only {n} examples.")
    return _neighbor_batches(_as_key(key), jnp.asarray(neighbors, jnp.int32), int(batch_size),
                             int(num_sampled), int(num_candidates))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _neighbor_batches(key, neighbors, batch_size, num_sampled, num_candidates):
    group = 1 + num_sampled
    k_perm, k_pick = jax.random.split(key)
    anchors, num_batches = _epoch_anchors(k_perm, neighbors.shape[0], batch_size // group)
    cands = neighbors[anchors, :num_candidates]
    if num_sampled < num_candidates:
        # A uniform random subset without replacement: the ranks of iid uniform keys.
        order = jnp.argsort(jax.random.uniform(k_pick, cands.shape), axis=1)[:, :num_sampled]
        cands = jnp.take_along_axis(cands, order, axis=1)
    groups = jnp.concatenate([anchors[:, None].astype(jnp.int32), cands], axis=1)
    return groups.reshape(num_batches, batch_size)


def random_batches(key: chex.PRNGKey, num_examples: int, batch_size: int) -> chex.Array:
    """One epoch of uniformly shuffled batches, the same interface as
    :func:`neighbor_batches` (int32 ``[num_examples // batch_size, batch_size]``, no
    repeats within an epoch, the incomplete last batch dropped).

    Examples:
      >>> import jax
      >>> from kdjax.data.neighbors import random_batches
      >>> random_batches(jax.random.PRNGKey(0), 10, 4).shape
      (2, 4)
    """
    _check_pos_int(num_examples, "num_examples")
    _check_pos_int(batch_size, "batch_size")
    if batch_size > num_examples:
        raise ValueError(f"batch_size ({batch_size}) must be <= num_examples "
                         f"({num_examples}).")
    idx, num_batches = _epoch_anchors(_as_key(key), int(num_examples), int(batch_size))
    return idx.astype(jnp.int32).reshape(num_batches, batch_size)
