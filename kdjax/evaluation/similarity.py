"""How alike two embeddings are: linear CKA and k-NN overlap (same examples), and
distances between their distributions (held-out KD2M distances).

Used to measure manifold preservation in unsupervised distillation (CoSS, Singh & Wang,
ECCV 2024, arXiv:2409.13939, argue that matching the teacher's embedding space keeps its
manifold): a student embedding ``y`` of the inputs is compared with the teacher
embedding ``x`` of the same inputs, row ``i`` of both being example ``i``. Both are invariant to an orthogonal transform and an isotropic scaling of
either embedding, so spaces of different widths compare.
"""

from __future__ import annotations

import numpy as np

from kdjax._checks import check_choice

__all__ = ["linear_cka", "knn_overlap", "feature_distances"]


def _pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    for a, name in ((x, "x"), (y, "y")):
        if a.ndim != 2:
            raise ValueError(f"{name} must be a 2-D embedding [N, D], got shape {a.shape}.")
        if not np.isfinite(a).all():
            raise ValueError(f"{name} must be finite, got {int((~np.isfinite(a)).sum())} "
                             "non-finite values.")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must embed the same examples (one row each), got "
                         f"{x.shape[0]} rows for x and {y.shape[0]} for y.")
    return x, y


def linear_cka(x, y) -> float:
    r"""Linear centred kernel alignment (Kornblith et al., ICML 2019, eq. 5):

    .. math:: \mathrm{CKA}(X, Y) = \frac{\lVert \tilde Y^\top \tilde X \rVert_F^2}
              {\lVert \tilde X^\top \tilde X \rVert_F \, \lVert \tilde Y^\top \tilde Y
              \rVert_F}

    with :math:`\tilde X, \tilde Y` the column-centred embeddings; equals
    :math:`\mathrm{HSIC}(K, L) / \sqrt{\mathrm{HSIC}(K, K)\,\mathrm{HSIC}(L, L)}` for the
    linear kernels :math:`K = XX^\top, L = YY^\top`. In [0, 1]; 1 iff ``y`` is an
    orthogonal transform and scaling of ``x`` (after centring). Computed in float64.

    Args:
      x: ``[N, D1]`` embedding; y: ``[N, D2]`` embedding of the same ``N >= 2`` examples.
    """
    x, y = _pair(x, y)
    if x.shape[0] < 2:
        raise ValueError(f"linear_cka needs at least 2 examples, got {x.shape[0]}.")
    x = x - x.mean(0)
    y = y - y.mean(0)
    nx, ny = np.linalg.norm(x.T @ x), np.linalg.norm(y.T @ y)
    if nx == 0 or ny == 0:
        raise ValueError("linear_cka is undefined for a constant embedding (zero "
                         f"variance): {'x' if nx == 0 else 'y'}.")
    return float(np.linalg.norm(y.T @ x) ** 2 / (nx * ny))


def _neighbours(z: np.ndarray, k: int, metric: str, chunk: int = 1024) -> np.ndarray:
    if metric == "cosine":
        norm = np.linalg.norm(z, axis=1, keepdims=True)
        z = z / np.maximum(norm, 1e-12)
    sq = (z * z).sum(1)
    out = np.empty((len(z), k), np.int64)
    for i in range(0, len(z), chunk):
        d = sq[i:i + chunk, None] - 2 * z[i:i + chunk] @ z.T + sq[None]
        d[np.arange(d.shape[0]), np.arange(i, i + d.shape[0])] = np.inf   # not itself
        # stable order: by distance, then index (ties broken the same way in x and y)
        out[i:i + chunk] = np.argsort(d, axis=1, kind="stable")[:, :k]
    return out


def knn_overlap(x, y, k: int = 10, *, metric: str = "euclidean") -> float:
    r"""Mean fraction of shared ``k`` nearest neighbours:

    .. math:: \frac{1}{N} \sum_i \frac{|\mathcal N_k^X(i) \cap \mathcal N_k^Y(i)|}{k},

    where :math:`\mathcal N_k^X(i)` are the ``k`` nearest other rows to row ``i`` of
    ``x`` (``metric``: ``"euclidean"`` or ``"cosine"``; ties broken by index). 1 when
    the neighbourhoods agree (e.g. ``y`` a rotation and scaling of ``x``); about
    ``k / (N - 1)`` for unrelated embeddings. The local-structure counterpart of
    :func:`linear_cka` (CoSS, arXiv:2409.13939, samples its batches from these teacher
    neighbourhoods; this measures whether the student kept them).

    Args:
      x: ``[N, D1]``; y: ``[N, D2]`` embeddings of the same examples; k: ``1 <= k < N``.
    """
    x, y = _pair(x, y)
    check_choice(metric, "metric", ("euclidean", "cosine"))
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k < len(x):
        raise ValueError(f"k must be an int in [1, N - 1] = [1, {len(x) - 1}], got {k!r}.")
    nx, ny = _neighbours(x, k, metric), _neighbours(y, k, metric)
    shared = [len(np.intersect1d(a, b, assume_unique=True)) for a, b in zip(nx, ny)]
    return float(np.mean(shared) / k)


def feature_distances(x, y) -> dict[str, float]:
    r"""Distances between the distributions of two embeddings ``x`` (e.g. a student's)
    and ``y`` (the teacher's) of held-out examples (KD2M, arXiv:2504.01757, bounds the
    target error by such a distance):

    - ``w2``: exact squared 2-Wasserstein distance between the empirical measures
      (:func:`kdjax.losses.exact_ot`, squared Euclidean cost);
    - ``w2_rel``: ``w2`` divided by the total variance :math:`\sum_j \mathrm{Var}(y_j)`
      of ``y`` (comparable across feature scales);
    - ``gaussian_w2``: the closed-form W2^2 between Gaussians with the embeddings' means
      and full covariances (:func:`kdjax.losses.gaussian_w2`).

    Args:
      x: ``[N, D]``; y: ``[M, D]`` (same width).
    """
    import jax.numpy as jnp

    from kdjax import losses

    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be embeddings [N, D] of one width D, got shapes "
                         f"{x.shape} and {y.shape}.")
    w2 = float(losses.exact_ot(jnp.asarray(x), jnp.asarray(y)))
    t_var = float(np.sum(np.var(y.astype(np.float64), axis=0)))
    return {"w2": w2, "w2_rel": w2 / max(t_var, 1e-12),
            "gaussian_w2": float(losses.gaussian_w2(jnp.asarray(x), jnp.asarray(y)))}
