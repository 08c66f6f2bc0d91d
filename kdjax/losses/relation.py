"""Relation distillation losses: match how samples of a batch relate to each other.

Every loss here couples the examples of a batch (pairwise similarities, distances,
angles, in-batch negatives), so its value depends on what "the batch" is under data
parallelism:

* plain ``jax.jit`` over inputs sharded on a ``("data",)`` mesh axis computes the
  **global-batch** value (XLA inserts the collectives); this is what the reference codes
  (single process, one batch) compute, and it is what kdjax's training step uses;
* a ``shard_map``/``pmap`` over the same function computes the **per-device** value
  (relations only within each device's shard), which is what multi-GPU PyTorch runs of
  the reference codes compute (``DataParallel`` replicas / DDP each see their shard).

Inputs are ``[B, ...]`` features, flattened to ``[B, D]`` where a method works on
vectors. All math is float32.

Weights: every loss takes ``weights`` (``[B]``, ``>= 0``). For the batch-coupled ones
(SP, CC, RKD, PKT) they are example *multiplicities*
(:func:`kdjax.losses._utils.multiplicities`): pair sums ``sum_ij`` become
``sum_ij w_i w_j``, triplet sums get ``w_i w_j w_k``, in-batch normalisers (SP's and
PKT's row sums, RKD's mean distance) are weighted the same way, and the batch size
``B`` becomes ``sum_i w_i``. With integer weights SP, CC (Taylor), PKT and the RKD angle
term equal the unweighted loss on the batch with row ``i`` repeated ``w_i`` times
(tested); each docstring writes its weighted formula. CRD's weights are per anchor
(``(1/B) sum_i w_i l_i``, KD-AIF's convention).
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import optax

from kdjax._checks import (
    check_choice,
    check_float_array,
    check_nonnegative,
    check_positive,
    check_same_leading,
    check_same_shape,
)
from kdjax.losses._utils import l2_normalize, multiplicities, reduce_per_example

__all__ = [
    "similarity_preserving",
    "correlation_congruence",
    "rkd_distance",
    "rkd_angle",
    "rkd",
    "pkt",
    "crd",
    "crd_queue",
    "init_crd_queue",
]

_EPS = 1e-12
_ANGLE_CHUNK_ELEMENTS = 1 << 22  # angles per chunk in rkd_angle (16 MiB of float32)


def _explicit_sharding(x):
    """The ``NamedSharding`` of ``x`` if it is sharded over an Explicit mesh axis."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not getattr(mesh, "explicit_axes", ()):
        return None
    return sharding


def _global_batch(x):
    """Replicates ``x`` when it is sharded over an Explicit mesh axis (jax >= 0.7 default
    of ``jax.make_mesh``), so that batch x batch products are well-typed; XLA then
    all-gathers the (small) batch of features. No-op for Auto meshes, shard_map bodies
    (Manual axes) and unsharded arrays."""
    x = jnp.asarray(x)
    sharding = _explicit_sharding(x)
    if sharding is None:
        return x
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(sharding.mesh, jax.P()))


def _flat32(x):
    x = _global_batch(x)
    return x.astype(jnp.float32).reshape(x.shape[0], -1)


def _check_pair(student, teacher, names=("student", "teacher"), min_ndim=2):
    check_float_array(student, names[0], min_ndim=min_ndim)
    check_float_array(teacher, names[1], min_ndim=min_ndim)
    check_same_leading(student, teacher, *names)


def similarity_preserving(student: chex.Array, teacher: chex.Array, *,
                          weights: chex.Array | None = None) -> chex.Array:
    r"""Similarity-preserving KD (SP, Tung & Mori 2019).

    With ``F`` the batch of flattened features (``[B, D]``) and ``G = rownorm_2(F F^T)``:

    .. math:: \mathcal{L}_{SP} = \frac{1}{B^2}\,\| G^S - G^T \|_F^2

    Weighted (multiplicities ``w``, see the module docstring):
    ``G_ij = A_ij / max(sqrt(sum_k w_k A_ik^2), 1e-12)`` with ``A = F F^T`` and
    ``L = sum_ij w_i w_j (G^S_ij - G^T_ij)^2 / (sum_i w_i)^2``.

    (paper eq. (3)-(4)); rows L2-normalised as in the paper and RepDistiller
    (torchdistill normalises by the L1 norm, see docs/METHODS.md). Reference weight 3000.
    Batch-level (see the module docstring for data-parallel semantics). Student and
    teacher feature sizes may differ.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.losses import similarity_preserving
      >>> f = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
      >>> round(float(similarity_preserving(f, 3 * f)), 6)
      0.0

    References:
      Tung, Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019,
      arXiv:1907.09682.
    """
    _check_pair(student, teacher)
    fs, ft = _flat32(student), _flat32(teacher)
    w = _global_batch(multiplicities(weights, fs.shape[0]))

    def rownorm(g):   # x / max(||x||_w, eps): finite gradient at 0
        sq = (g * g) @ w
        ok = sq > _EPS * _EPS
        return g / jnp.where(ok, jnp.sqrt(jnp.where(ok, sq, 1.0)), _EPS)[:, None]

    gs, gt = rownorm(fs @ fs.T), rownorm(ft @ ft.T)
    return (w @ ((gs - gt) ** 2) @ w) / jnp.sum(w) ** 2


def correlation_congruence(student: chex.Array, teacher: chex.Array,
                           variant: str = "taylor", gamma: chex.Numeric = 0.4,
                           order: int = 2, *,
                           weights: chex.Array | None = None) -> chex.Array:
    r"""Correlation congruence KD (CC, Peng et al. 2019).

    ``variant="taylor"`` (the paper, eq. (7)-(9)): embeddings are L2-normalised and the
    Gaussian-RBF correlation ``k(x, y) = exp(-gamma ||x - y||^2)`` is replaced by its
    order-``P`` Taylor expansion ``sum_{p=0}^P exp(-2 gamma) (2 gamma)^p / p! (x^T y)^p``;

    .. math:: \mathcal{L}_{CC} = \frac{1}{B^2}\,\| \Psi(F^T) - \Psi(F^S) \|_F^2

    with the paper's ``gamma = 0.4, P = 2``. Dimensions of student and teacher may differ.

    ``variant="repdistiller"``: RepDistiller's ``Correlation`` proxy (the one its
    CIFAR-100 table and weight 0.02 use), on same-shape embeddings:
    ``delta = |f^S - f^T|``, ``L = mean_{i<B} sum_d delta_{i,d} delta_{i+1,d}``; it is
    not the paper's formula (it correlates consecutive samples' residuals).

    Both are batch-level (see the module docstring). Weighted (multiplicities ``w``):
    Taylor ``L = sum_ij w_i w_j (Psi^T_ij - Psi^S_ij)^2 / (sum_i w_i)^2``;
    RepDistiller ``L = sum_i w_i w_{i+1} <delta_i, delta_{i+1}> / sum_i w_i w_{i+1}``
    (consecutive pairs: no repeated-rows identity for this variant).

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.losses import correlation_congruence
      >>> f = jnp.array([[1.0, 0.0], [0.5, 1.0], [0.0, 2.0]])
      >>> float(correlation_congruence(f, f))
      0.0

    References:
      Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019,
      arXiv:1904.01802.
    """
    _check_pair(student, teacher)
    check_choice(variant, "variant", ("taylor", "repdistiller"))
    fs, ft = _flat32(student), _flat32(teacher)
    if variant == "repdistiller":
        check_same_shape(fs, ft, "student (flattened)", "teacher (flattened)")
        if fs.shape[0] < 2:
            raise ValueError(f"student must have a batch of >= 2 for variant='repdistiller', "
                             f"got shape {student.shape}.")
        w = _global_batch(multiplicities(weights, fs.shape[0]))
        delta = jnp.abs(fs - ft)
        ww = w[:-1] * w[1:]
        return ww @ jnp.sum(delta[:-1] * delta[1:], axis=-1) / jnp.maximum(jnp.sum(ww), _EPS)
    check_positive(gamma, "gamma")
    if not isinstance(order, int) or order < 0:
        raise ValueError(f"order must be a non-negative int, got {order!r}.")

    def psi(f):
        f = l2_normalize(f)
        g = f @ f.T
        out = jnp.zeros_like(g)
        for p in range(order + 1):
            out = out + (2.0 * gamma) ** p / math.factorial(p) * g**p
        return jnp.exp(-2.0 * gamma) * out

    w = _global_batch(multiplicities(weights, fs.shape[0]))
    return (w @ ((psi(ft) - psi(fs)) ** 2) @ w) / jnp.sum(w) ** 2


def _pairwise_distances(e, eps=_EPS):
    """Euclidean distances ``[B, B]`` with a zero, zero-gradient diagonal (RKD)."""
    sq = jnp.sum(e * e, axis=-1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (e @ e.T)
    d2 = jnp.maximum(d2, eps)
    d = jnp.sqrt(d2)  # d2 >= eps > 0: finite gradient; clamped entries get 0 gradient
    return jnp.where(jnp.eye(e.shape[0], dtype=bool), 0.0, d)


def _mean_normalise(d, ww):
    pos = (d > 0) * ww
    count = jnp.sum(pos)
    mean = jnp.sum(pos * d) / jnp.where(count > 0, count, 1.0)
    return d / jnp.where(count > 0, mean, 1.0)


def rkd_distance(student: chex.Array, teacher: chex.Array, *,
                 weights: chex.Array | None = None) -> chex.Array:
    r"""RKD distance term: ``mean_{i,j} huber(psi^S_ij, psi^T_ij)``, ``psi = d / mean d``.

    ``d`` are Euclidean distances between flattened embeddings, ``mean d`` the mean over
    positive (off-diagonal) distances; Huber = smooth-L1 with ``delta = 1``; mean over
    all ``B^2`` entries (RepDistiller ``RKDLoss``). Paper eq. (4)-(5).

    Weighted (multiplicities ``w``): ``mean d = sum_{ij: d_ij>0} w_i w_j d_ij /
    sum_{ij: d_ij>0} w_i w_j`` and ``L = sum_ij w_i w_j huber_ij / (sum_i w_i)^2``.
    (A batch with repeated rows differs slightly: its duplicate pairs, at distance
    ``~0``, enter the reference's mean distance; here a row is not paired with itself.)
    """
    _check_pair(student, teacher)
    fs, ft = _flat32(student), _flat32(teacher)
    w = _global_batch(multiplicities(weights, fs.shape[0]))
    ww = w[:, None] * w[None, :]
    ds = _mean_normalise(_pairwise_distances(fs), ww)
    dt = _mean_normalise(_pairwise_distances(ft), ww)
    return jnp.sum(ww * optax.huber_loss(ds, dt, delta=1.0)) / jnp.sum(w) ** 2


def _angles(e, i):
    """``cos angle(e_j - e_i, e_k - e_i)`` for all ``j, k``: ``[B, B]`` for anchor ``i``."""
    v = l2_normalize(e - e[i][None, :])
    return v @ v.T


def rkd_angle(student: chex.Array, teacher: chex.Array, *,
              weights: chex.Array | None = None) -> chex.Array:
    r"""RKD angle term: ``mean_{i,j,k} huber(cos angle^S_{ijk}, cos angle^T_{ijk})``.

    ``cos angle_{ijk} = <n(e_j - e_i), n(e_k - e_i)>`` with ``n`` the L2 normalisation
    (zero vectors stay zero, as torch ``F.normalize``); mean over all ``B^3`` triplets
    (RepDistiller; paper eq. (6)-(7) with the vertex at the anchor). Computed in chunks
    of anchors (``lax.map`` with ``batch_size`` and a rematerialised body), each chunk
    holding about ``2^22`` angles, so memory stays ``O(max(B^2, 2^22) + B D)`` instead
    of the reference's ``O(B^3 + B^2 D)``.

    Weighted (multiplicities ``w``):
    ``L = sum_ijk w_i w_j w_k huber_ijk / (sum_i w_i)^3``; equal to the unweighted loss
    on the batch with rows repeated ``w_i`` times (a duplicate of the anchor gives a
    zero vector, like the anchor itself).
    """
    _check_pair(student, teacher)
    es, et = _flat32(student), _flat32(teacher)
    w = _global_batch(multiplicities(weights, es.shape[0]))

    @jax.checkpoint
    def per_anchor(i):
        h = optax.huber_loss(_angles(es, i), _angles(et, i), delta=1.0)
        return w[i] * (w @ h @ w)

    b = es.shape[0]
    chunk = max(1, min(b, _ANGLE_CHUNK_ELEMENTS // (b * b)))
    sums = jax.lax.map(per_anchor, jnp.arange(b), batch_size=chunk)
    return jnp.sum(sums) / jnp.sum(w) ** 3


def rkd(student: chex.Array, teacher: chex.Array, distance_weight: chex.Numeric = 25.0,
        angle_weight: chex.Numeric = 50.0, *,
        weights: chex.Array | None = None) -> chex.Array:
    r"""Relational KD (RKD, Park et al. 2019): ``w_d L_distance + w_a L_angle``.

    See :func:`rkd_distance` and :func:`rkd_angle`. Reference (RepDistiller, paper):
    ``w_d = 25``, ``w_a = 50``, outer weight 1, embeddings = the pooled features.
    Zero distances (duplicate samples, the diagonal) are clamped to ``1e-12`` before the
    square root and the diagonal is zeroed, so gradients stay finite. Batch-level;
    ``weights``: see the two terms.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.losses import rkd
      >>> e = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
      >>> round(float(rkd(e, 2 * e)), 6)
      0.0

    References:
      Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019,
      arXiv:1904.05068.
    """
    check_nonnegative(distance_weight, "distance_weight")
    check_nonnegative(angle_weight, "angle_weight")
    return (distance_weight * rkd_distance(student, teacher, weights=weights)
            + angle_weight * rkd_angle(student, teacher, weights=weights))


def pkt(student: chex.Array, teacher: chex.Array, eps: float = 1e-7, *,
        weights: chex.Array | None = None) -> chex.Array:
    r"""Probabilistic knowledge transfer (PKT, Passalis & Tefas 2018), cosine kernel.

    ``x_i <- x_i / (||x_i|| + eps)``; ``K = (1 + X X^T) / 2``; ``P = K / rowsum(K)``:

    .. math::
        \mathcal{L}_{PKT} = \frac{1}{B^2}\sum_{i,j} P^T_{ij}
            \log\frac{P^T_{ij} + \epsilon}{P^S_{ij} + \epsilon}

    (paper eq. (8)-(10) with the cosine kernel; the mean over ``B x B`` and ``eps = 1e-7``
    follow RepDistiller's ``PKT``, whose weight 30000 assumes the mean). Batch-level.
    Weighted (multiplicities ``w``): ``P_ij = K_ij / sum_k w_k K_ik`` and
    ``L = sum_ij w_i w_j P^T_ij log((P^T_ij + eps) / (P^S_ij + eps)) / (sum_i w_i)^2``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.losses import pkt
      >>> f = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
      >>> abs(float(pkt(f, 2 * f))) < 1e-6
      True

    References:
      Passalis, Tefas, "Learning Deep Representations with Probabilistic Knowledge
      Transfer", ECCV 2018, arXiv:1803.10837.
    """
    _check_pair(student, teacher)
    check_positive(eps, "eps")
    fs, ft = _flat32(student), _flat32(teacher)
    w = _global_batch(multiplicities(weights, fs.shape[0]))

    def probs(f):
        # optax.safe_norm: a zero row stays 0 with a zero (not NaN) gradient
        f = f / (optax.safe_norm(f, 0.0, axis=-1, keepdims=True) + eps)
        k = (f @ f.T + 1.0) / 2.0
        return k / (k @ w)[:, None]

    ps, pt = probs(fs), probs(ft)
    return (w @ (pt * jnp.log((pt + eps) / (ps + eps))) @ w) / jnp.sum(w) ** 2


def _check_embeddings(student_emb, teacher_emb):
    check_float_array(student_emb, "student_emb", ndim=2)
    check_float_array(teacher_emb, "teacher_emb", ndim=2)
    check_same_shape(student_emb, teacher_emb, "student_emb", "teacher_emb")


def crd(student_emb: chex.Array, teacher_emb: chex.Array,
        temperature: chex.Numeric = 0.07, *, symmetric: bool = True,
        weights: chex.Array | None = None, reduction: str = "mean") -> chex.Array:
    r"""Contrastive representation distillation, in-batch InfoNCE variant.

    Embeddings are L2-normalised (the CRD heads already do); with
    ``S_{ij} = <s_i, t_j> / tau``:

    .. math::
        \ell_i = -\log\frac{e^{S_{ii}}}{\sum_j e^{S_{ij}}}
                 \;\big[ -\log\frac{e^{S_{ii}}}{\sum_j e^{S_{ji}}} \big]_{\text{symmetric}}

    i.e. each student embedding must pick its own teacher embedding among the batch's
    (and, with ``symmetric``, the converse), mirroring CRD's student- and
    teacher-anchored terms ``L = L_s + L_t``. Deliberate deviation: Tian et al. (eq.
    (10)-(19)) use an NCE estimate against a dataset-sized memory bank with 16384
    negatives; this variant uses the ``B - 1`` in-batch negatives and a softmax (the
    InfoNCE form the paper discusses in sec. 3.4); :func:`crd_queue` keeps a fixed-size
    queue of negatives instead. ``tau = 0.07``, 128-d embeddings, weight 0.8
    (RepDistiller). Batch-level (negatives are the batch).

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.losses import crd
      >>> e = jnp.eye(4)
      >>> float(crd(e, e)) < 1e-5
      True

    References:
      Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020,
      arXiv:1910.10699.
    """
    _check_embeddings(student_emb, teacher_emb)
    check_positive(temperature, "temperature")
    s = l2_normalize(_flat32(student_emb))
    t = l2_normalize(_flat32(teacher_emb))
    logits = s @ t.T / temperature
    idx = jnp.arange(s.shape[0])
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, idx)
    if symmetric:
        per_example = per_example + optax.softmax_cross_entropy_with_integer_labels(
            logits.T, idx)
    return reduce_per_example(per_example, weights, reduction)


def init_crd_queue(rng: chex.PRNGKey, size: int = 16384, dim: int = 128) -> dict:
    """A CRD negative queue: ``{"student": [size, dim], "teacher": [size, dim]}``.

    Filled with random unit vectors (as MoCo-style queues start); memory is
    ``2 * size * dim`` floats whatever the dataset size.
    """
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}.")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}.")
    ks, kt = jax.random.split(rng)
    return {"student": l2_normalize(jax.random.normal(ks, (size, dim))),
            "teacher": l2_normalize(jax.random.normal(kt, (size, dim)))}


def _enqueue(queue, new):
    """FIFO update: newest first, oldest dropped; the queue keeps size and sharding."""
    k = queue.shape[0]
    sharding = _explicit_sharding(queue)
    new = jax.lax.stop_gradient(new).astype(queue.dtype)
    out = jnp.concatenate([new, _global_batch(queue)], axis=0)[:k]
    if sharding is not None:
        out = jax.sharding.reshard(out, sharding)
    return out


def crd_queue(student_emb: chex.Array, teacher_emb: chex.Array, queue: dict,
              temperature: chex.Numeric = 0.07, *, weights: chex.Array | None = None,
              reduction: str = "mean") -> tuple[chex.Array, dict]:
    r"""CRD with a fixed-size queue of negatives (pure: returns the updated queue).

    Student anchor ``s_i``: positive ``t_i``, negatives the queued teacher embeddings
    ``Q^T``; teacher anchor ``t_i``: positive ``s_i``, negatives ``Q^S``:

    .. math::
        \ell_i = -\log\frac{e^{s_i^T t_i/\tau}}{e^{s_i^T t_i/\tau}
                 + \sum_k e^{s_i^T Q^T_k/\tau}}
                 - \log\frac{e^{t_i^T s_i/\tau}}{e^{t_i^T s_i/\tau}
                 + \sum_k e^{t_i^T Q^S_k/\tau}}

    Then the batch's (stop-gradient) embeddings are pushed to the front of the queues and
    the oldest dropped. Deviation from CRD: a FIFO queue of recent embeddings (MoCo)
    replaces the per-sample memory bank, whose size grows with the dataset (a known
    out-of-memory complaint); softmax replaces the NCE estimate. Reference: 16384
    negatives, ``tau = 0.07``, 128-d.

    Sharding: under ``jit`` the queue may be sharded along its first axis on a
    ``("data",)`` mesh (``NamedSharding(mesh, P("data"))``); the result equals the
    unsharded one (XLA gathers what the matmul needs). Under ``shard_map`` each device
    keeps its own queue shard, filled with its own local batch.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from kdjax.losses import crd_queue, init_crd_queue
      >>> q = init_crd_queue(jax.random.key(0), size=8, dim=4)
      >>> loss, q2 = crd_queue(jnp.eye(4)[:2], jnp.eye(4)[:2], q)
      >>> q2["teacher"].shape, bool(jnp.all(q2["teacher"][:2] == jnp.eye(4)[:2]))
      ((8, 4), True)

    Args:
      student_emb, teacher_emb: ``[B, dim]`` embeddings.
      queue: ``{"student": [K, dim], "teacher": [K, dim]}`` (see :func:`init_crd_queue`).
      temperature: ``tau > 0``.

    Returns:
      ``(loss, new_queue)``.
    """
    _check_embeddings(student_emb, teacher_emb)
    check_positive(temperature, "temperature")
    if not isinstance(queue, dict) or set(queue) != {"student", "teacher"}:
        raise ValueError("queue must be a dict with keys ['student', 'teacher'], got "
                         f"{sorted(queue) if isinstance(queue, dict) else type(queue)}.")
    for key in ("student", "teacher"):
        check_float_array(queue[key], f"queue[{key!r}]", ndim=2)
        if queue[key].shape[1] != student_emb.shape[1]:
            raise ValueError(
                f"queue[{key!r}] must have {student_emb.shape[1]} columns (the embedding "
                f"dim), got shape {queue[key].shape}.")
    s = l2_normalize(_flat32(student_emb))
    t = l2_normalize(_flat32(teacher_emb))
    qs = _global_batch(queue["student"]).astype(jnp.float32)
    qt = _global_batch(queue["teacher"]).astype(jnp.float32)
    pos = jnp.sum(s * t, axis=-1, keepdims=True) / temperature

    def term(anchor, negatives):
        logits = jnp.concatenate([pos, anchor @ negatives.T / temperature], axis=-1)
        return -jax.nn.log_softmax(logits, axis=-1)[:, 0]

    per_example = term(s, qt) + term(t, qs)
    loss = reduce_per_example(per_example, weights, reduction)
    new_queue = {"student": _enqueue(queue["student"], s),
                 "teacher": _enqueue(queue["teacher"], t)}
    return loss, new_queue
