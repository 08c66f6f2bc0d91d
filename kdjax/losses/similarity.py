r"""Unsupervised embedding distillation: CoSS space similarity, per-sample cosine, SEED.

These losses compare a student embedding ``S`` and a teacher embedding ``T`` of shape
``[batch, dim]`` (the student is projected to the teacher's ``dim`` beforehand, see
:class:`kdjax.models.projector.Projector`). They never read labels.

Batch semantics. :func:`coss` (through its space-similarity term) and :func:`seed`'s
queue are *batch-level*: the value depends on which examples form "the batch".

* Global batch: call the loss under plain ``jax.jit`` on arrays sharded over a
  ``("data",)`` mesh; XLA inserts the collectives and the columns are normalised over
  the whole global batch.
* Per-device batch (what the CoSS authors ran, PyTorch DDP: every GPU computes the
  loss on its own shard and gradients are averaged, i.e. the objective is the mean over
  devices of per-shard losses): wrap the loss with :func:`kdjax.losses.per_device`
  (``jax.shard_map``) or, inside your own ``shard_map``/``pmap``, pass ``axis_name``.
  :func:`kdjax.losses.per_group` gives the same numbers without a mesh by splitting the
  batch into ``num_groups`` contiguous groups (``num_groups = device count`` reproduces
  DDP). Both live in :mod:`kdjax.losses.batch`.

All math is in float32 whatever the input dtype. Zero-norm rows/columns are handled as
``torch.nn.functional.normalize`` does (``x / max(||x||, eps)``, ``eps = 1e-12``) with
``optax.safe_norm``, so they give a cosine of 0 and finite gradients.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from kdjax._checks import (
    check_array,
    check_float_array,
    check_nonnegative,
    check_positive,
    check_same_shape,
)
from kdjax.losses._utils import multiplicities, reduce_per_example

__all__ = [
    "coss",
    "space_similarity",
    "cosine_distillation",
    "disco",
    "seed",
    "seed_queue_init",
    "seed_queue_update",
]

_EPS = 1e-12  # torch.nn.functional.normalize's default, used by the CoSS code.


def _check_pair(student_emb, teacher_emb):
    check_float_array(student_emb, "student_emb", ndim=2)
    check_float_array(teacher_emb, "teacher_emb", ndim=2)
    check_same_shape(student_emb, teacher_emb, "student_emb", "teacher_emb")


def _normalize(x: chex.Array, axis: int, eps: float) -> chex.Array:
    """``x / max(||x||, eps)`` along ``axis`` with finite gradients at ``x = 0``."""
    return x / optax.safe_norm(x, eps, axis=axis, keepdims=True)


def _cosines(s: chex.Array, t: chex.Array, axis: int, eps: float) -> chex.Array:
    s = _normalize(s.astype(jnp.float32), axis, eps)
    t = _normalize(t.astype(jnp.float32), axis, eps)
    return jnp.sum(s * t, axis=axis)


def _column_cosines(s: chex.Array, t: chex.Array, w: chex.Array, eps: float) -> chex.Array:
    r"""Weighted column cosines ``sum_i w_i s_ij t_ij / (||s_:j||_w ||t_:j||_w)``,
    ``||v||_w = max(sqrt(sum_i w_i v_i^2), eps)`` (finite gradient at 0); ``[dim]``."""
    s, t = s.astype(jnp.float32), t.astype(jnp.float32)

    def norm(x):
        sq = w @ (x * x)
        ok = sq > eps * eps
        return jnp.where(ok, jnp.sqrt(jnp.where(ok, sq, 1.0)), eps)

    return (w @ (s * t)) / (norm(s) * norm(t))


def _maybe_pmean(x, axis_name):
    return x if axis_name is None else jax.lax.pmean(x, axis_name)


def space_similarity(student_emb: chex.Array, teacher_emb: chex.Array, *,
                     weights: chex.Array | None = None, eps: float = _EPS,
                     axis_name: str | None = None) -> chex.Array:
    r"""CoSS space-similarity term ``L_ss = -(1/D) sum_j cos(T_{:,j}, S_{:,j})``.

    Each feature column (``[batch]``) is L2-normalised across the batch; there is no
    mean-centring, so this is not a Pearson correlation. Unscaled (in ``[-1, 1]``);
    :func:`coss` adds the temperatures. Weighted (multiplicities ``w``, as a batch with
    row ``i`` repeated ``w_i`` times): the column inner products and norms are
    ``sum_i w_i s_ij t_ij`` and ``sqrt(sum_i w_i s_ij^2)``; the loss does not change
    when all weights are scaled by the same factor.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.losses import space_similarity
      >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> float(space_similarity(x, 3.0 * x))
      -1.0

    Args:
      student_emb: ``[batch, dim]`` student embedding (projected to the teacher dim).
      teacher_emb: ``[batch, dim]`` teacher embedding.
      eps: minimum column norm (``F.normalize``'s default ``1e-12``).
      axis_name: if given, the result is ``lax.pmean``-ed over this mapped axis (the
        per-device semantics inside ``shard_map``/``pmap``).
    """
    _check_pair(student_emb, teacher_emb)
    check_positive(eps, "eps")
    w = multiplicities(weights, student_emb.shape[0])
    return _maybe_pmean(-jnp.mean(_column_cosines(student_emb, teacher_emb, w, eps)),
                        axis_name)


def cosine_distillation(student_emb: chex.Array, teacher_emb: chex.Array,
                        tau_t: chex.Numeric = 0.07, tau_s: chex.Numeric = 0.1, *,
                        weights: chex.Array | None = None, reduction: str = "mean",
                        eps: float = _EPS, axis_name: str | None = None) -> chex.Array:
    r"""Per-sample cosine distillation, CoSS's ``L_co`` alone.

    .. math::
        l_i = -\frac{\cos(T_{i,:}, S_{i,:})}{\tau_t \tau_s},\qquad
        \mathcal{L} = \frac{1}{B}\sum_i w_i\, l_i

    The scale ``1/(tau_t tau_s)`` is how the CoSS code applies its temperatures
    (``normalize(T)/t_temp . normalize(S)/s_temp``), so ``coss(..., l1=0)`` equals this
    loss. It is the "L_co only" baseline of CoSS (arXiv 2409.13939, Eq. 1).

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.losses import cosine_distillation
      >>> x = jnp.array([[1.0, 2.0], [3.0, -1.0]])
      >>> round(float(cosine_distillation(x, 2.0 * x, tau_t=1.0, tau_s=1.0)), 6)
      -1.0

    Args:
      student_emb: ``[batch, dim]`` student embedding.
      teacher_emb: ``[batch, dim]`` teacher embedding (stop its gradient in a step).
      tau_t: teacher temperature (CoSS scripts: 0.07).
      tau_s: student temperature (CoSS scripts: 0.1).
      weights: optional ``[batch]`` per-example weights.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      eps: minimum row norm.
      axis_name: if given (and ``reduction != "none"``), ``lax.pmean`` over it.

    Returns:
      A float32 scalar, or ``[batch]`` for ``reduction="none"``.
    """
    _check_pair(student_emb, teacher_emb)
    check_positive(tau_t, "tau_t")
    check_positive(tau_s, "tau_s")
    check_positive(eps, "eps")
    per_example = -_cosines(student_emb, teacher_emb, 1, eps) / (tau_t * tau_s)
    out = reduce_per_example(per_example, weights, reduction)
    return out if reduction == "none" else _maybe_pmean(out, axis_name)


def coss(student_emb: chex.Array, teacher_emb: chex.Array, l0: chex.Numeric = 1.0,
         l1: chex.Numeric = 1.0, tau_t: chex.Numeric = 0.07, tau_s: chex.Numeric = 0.1,
         *, weights: chex.Array | None = None, eps: float = _EPS,
         axis_name: str | None = None) -> chex.Array:
    r"""CoSS: cosine similarity plus space similarity (Singh & Wang, ECCV 2024).

    .. math::
        \mathcal{L} = \frac{l_0\,\mathcal{L}_{co} + l_1\,\mathcal{L}_{ss}}
                           {\tau_t\,\tau_s},\quad
        \mathcal{L}_{co} = -\frac{1}{B}\sum_i \cos(T_{i,:}, S_{i,:}),\quad
        \mathcal{L}_{ss} = -\frac{1}{D}\sum_j \cos(T_{:,j}, S_{:,j})

    Reference: arXiv 2409.13939, Eqs. 1-3; code github.com/paganpasta/coss-pytorch
    ``losses.coss``: ``-(normalize(T)/t_temp * normalize(S)/s_temp).sum(-1).mean()``
    on the rows (weight ``l_0``) and on the transposed matrices (weight ``l_1``). So the
    temperatures do divide the whole loss by ``tau_t tau_s`` (about 143 with the
    script defaults ``l_0 = l_1 = 1``, ``tau_t = 0.07``, ``tau_s = 0.1``, loss weight
    ``beta = 1``); they are a scale, not a softmax temperature. Columns are normalised
    over the batch without centring. Normalisation is ``x / max(||x||, 1e-12)``, so a
    zero row/column contributes a cosine of 0 with finite gradients.

    Batch semantics: ``L_ss`` depends on the batch. The authors build batches of
    teacher-nearest neighbours (:mod:`kdjax.data.neighbors`) and compute the loss per
    GPU under DDP; use :func:`kdjax.losses.per_device`, :func:`kdjax.losses.per_group` or ``axis_name`` for that,
    plain ``jit`` for the global batch.

    Weights (``[B]``, ``>= 0``) are example multiplicities (the column term has no
    per-example decomposition): ``L_co = -sum_i w_i cos_i / sum_i w_i`` and ``L_ss``
    uses the weighted column cosines of :func:`space_similarity`, so integer weights
    give the loss of the batch with row ``i`` repeated ``w_i`` times.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.losses import coss
      >>> x = jnp.array([[1.0, 2.0], [3.0, -1.0]])
      >>> round(float(coss(x, x, tau_t=1.0, tau_s=1.0)), 6)
      -2.0

    Args:
      student_emb: ``[batch, dim]`` student embedding (after the projector).
      teacher_emb: ``[batch, dim]`` teacher embedding (stop its gradient in a step).
      l0: weight of ``L_co`` (scripts: 1).
      l1: weight of ``L_ss`` (scripts: 1; ``tools/opts.py`` default 0.5 is overridden).
      tau_t: teacher temperature (0.07).
      tau_s: student temperature (0.1).
      weights: optional ``[batch]`` example multiplicities (see above).
      eps: minimum row/column norm.
      axis_name: if given, the per-shard loss is ``lax.pmean``-ed over this axis.

    Returns:
      A float32 scalar.
    """
    _check_pair(student_emb, teacher_emb)
    w = multiplicities(weights, student_emb.shape[0])
    check_nonnegative(l0, "l0")
    check_nonnegative(l1, "l1")
    check_positive(tau_t, "tau_t")
    check_positive(tau_s, "tau_s")
    check_positive(eps, "eps")
    l_co = -(w @ _cosines(student_emb, teacher_emb, 1, eps)) / jnp.sum(w)
    l_ss = -jnp.mean(_column_cosines(student_emb, teacher_emb, w, eps))
    return _maybe_pmean((l0 * l_co + l1 * l_ss) / (tau_t * tau_s), axis_name)


def disco(student_emb: chex.Array, teacher_emb: chex.Array, *,
          normalize_teacher: bool = True, weights: chex.Array | None = None,
          reduction: str = "mean", eps: float = _EPS) -> chex.Array:
    r"""DisCo: the student's final embedding mimics the teacher's (Gao et al., ECCV 2022).

    .. math::
        l_i = \frac1D\,\big\|\hat s_i - \hat t_i\big\|_2^2,\qquad
        \hat s_i = \frac{s_i}{\max(\|s_i\|, \epsilon)},\
        \hat t_i = \frac{t_i}{\max(\|t_i\|, \epsilon)}

    the consistency regularisation of "DisCo: Remedy Self-supervised Learning on
    Lightweight Models with Distilled Contrastive Learning" (arXiv:2104.09124, Eq. 3):
    an MSE between the L2-normalised final (projection-head) embeddings of the student
    and of the frozen teacher on the *same* augmented view; ``1/D`` because the
    reference uses ``nn.MSELoss()`` (mean over all ``B x D`` elements). Equivalently
    ``l_i = (2 - 2 cos(s_i, t_i)) / D`` when both are normalised. In the paper it is
    added to the student's own contrastive (MoCo-v2) loss with weight 1; here it is the
    distillation term alone.

    Deviation flag: the released code (``Yuting-Gao/DisCo-pytorch``,
    ``moco/my_builder.py``) normalises the teacher embedding into a misspelt variable
    and returns the *unnormalised* one; ``normalize_teacher=False`` reproduces that.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.losses import disco
      >>> s = jnp.array([[3.0, 4.0], [1.0, 0.0]])
      >>> float(disco(s, 2.0 * s))
      0.0

    Args:
      student_emb: ``[batch, dim]`` student embedding (projected to the teacher dim).
      teacher_emb: ``[batch, dim]`` teacher embedding (stop its gradient in a step).
      normalize_teacher: L2-normalise the teacher embedding (the paper) or not (code).
      weights, reduction: per-example weights (``(1/B) sum_i w_i l_i``) and reduction.
      eps: minimum norm.
    """
    _check_pair(student_emb, teacher_emb)
    check_positive(eps, "eps")
    s = _normalize(student_emb.astype(jnp.float32), 1, eps)
    t = teacher_emb.astype(jnp.float32)
    if normalize_teacher:
        t = _normalize(t, 1, eps)
    per_example = jnp.mean((s - t) ** 2, axis=-1)
    return reduce_per_example(per_example, weights, reduction)


# --- SEED ------------------------------------------------------------------------------

def _replicated(x):
    """All-gathers ``x`` if it is sharded over an *explicit* mesh axis.

    With explicit sharding (``jax.make_mesh``'s default, used under ``jax.set_mesh``)
    a scatter of batch-sharded rows into a replicated queue is ambiguous and JAX asks
    for the output sharding; the queue is replicated, so gather the rows first. Auto
    meshes (``Mesh(devices, ("data",))``) need nothing: XLA inserts the collective.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not any(t == jax.sharding.AxisType.Explicit
                               for t in getattr(mesh, "axis_types", ())):
        return x
    if all(a is None for a in sharding.spec):
        return x
    return jax.reshard(x, P())


def seed_queue_init(key: chex.PRNGKey, size: int = 65536, dim: int = 128
                    ) -> tuple[chex.Array, chex.Array]:
    """A SEED/MoCo instance queue: ``size`` random unit rows ``[size, dim]`` and ptr 0.

    SEED initialises the queue with normalised Gaussian noise (``seed/builder.py``);
    the reference size is 65536. Returns ``(queue, ptr)`` with ``ptr`` an int32 scalar.
    """
    for v, n in ((size, "size"), (dim, "dim")):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{n} must be a positive int, got {v!r}.")
    queue = _normalize(jax.random.normal(key, (size, dim), jnp.float32), 1, _EPS)
    return queue, jnp.zeros((), jnp.int32)


def seed_queue_update(queue: chex.Array, ptr: chex.Array, teacher_emb: chex.Array,
                      *, eps: float = _EPS) -> tuple[chex.Array, chex.Array]:
    """FIFO ring-buffer update of a SEED queue; pure, returns ``(new_queue, new_ptr)``.

    The L2-normalised ``teacher_emb`` rows overwrite queue rows ``ptr, ptr+1, ...``
    (modulo the queue size: the write wraps around, so unlike MoCo/SEED the size need
    not be a multiple of the batch) and ``ptr`` advances by the batch size mod the
    size. Under ``jit`` over a sharded batch the global batch is enqueued, as SEED's
    ``concat_all_gather`` (on an explicit-sharding mesh, run under ``jax.set_mesh``).
    The teacher rows are stop-gradient-ed.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from kdjax.losses import seed_queue_update
      >>> q, p = seed_queue_update(jnp.zeros((3, 2)), jnp.int32(2), jnp.eye(2))
      >>> q.tolist(), int(p)
      ([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]], 1)
    """
    check_float_array(queue, "queue", ndim=2)
    check_float_array(teacher_emb, "teacher_emb", ndim=2)
    check_array(ptr, "ptr", ndim=0)
    if not jnp.issubdtype(jnp.asarray(ptr).dtype, jnp.integer):
        raise TypeError(f"ptr must have an integer dtype, got {jnp.asarray(ptr).dtype}.")
    size, dim = queue.shape
    b = teacher_emb.shape[0]
    if teacher_emb.shape[1] != dim:
        raise ValueError(
            f"teacher_emb must have the queue's dim {dim}, got shape {teacher_emb.shape}."
        )
    if b > size:
        raise ValueError(f"teacher_emb batch ({b}) must be <= the queue size ({size}).")
    keys = jax.lax.stop_gradient(_normalize(teacher_emb.astype(jnp.float32), 1, eps))
    keys = _replicated(keys)
    ptr = jnp.asarray(ptr, jnp.int32)
    rows = (ptr + jnp.arange(b, dtype=jnp.int32)) % size
    new_queue = queue.at[rows].set(keys.astype(queue.dtype))
    return new_queue, (ptr + b) % size


def seed(student_emb: chex.Array, teacher_emb: chex.Array, queue: chex.Array,
         tau_t: chex.Numeric = 1e-4, tau_s: chex.Numeric = 0.2, *,
         weights: chex.Array | None = None, reduction: str = "mean",
         eps: float = _EPS, axis_name: str | None = None) -> chex.Array:
    r"""SEED: match the student's and teacher's similarity distributions over a queue.

    With ``s_i, t_i`` the L2-normalised embeddings and ``q_k`` the queue rows,

    .. math::
        u_i = [s_i\cdot t_i,\ s_i\cdot q_1, \dots, s_i\cdot q_K] / \tau_s,\quad
        v_i = [t_i\cdot t_i,\ t_i\cdot q_1, \dots, t_i\cdot q_K] / \tau_t,\quad
        l_i = -\sum_k \mathrm{softmax}(v_i)_k \log\mathrm{softmax}(u_i)_k

    (the teacher embedding itself is the first "instance", as in SEED). Reference:
    Fang et al., "SEED: Self-supervised Distillation for Visual Representation", ICLR
    2021, Eq. 3-4; code as vendored in coss-pytorch ``seed/builder.py`` (soft
    cross-entropy). Reference defaults (``tools/opts.py``): ``tau_s = 0.2`` (``--temp``),
    ``tau_t = 1e-4`` (``--distill-t``), queue size 65536. Update the queue *after*
    the loss with :func:`seed_queue_update` (SEED enqueues the current teacher batch).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from kdjax.losses import seed, seed_queue_init
      >>> q, _ = seed_queue_init(jax.random.PRNGKey(0), 16, 4)
      >>> x = jax.random.normal(jax.random.PRNGKey(1), (2, 4))
      >>> bool(seed(x, x, q, tau_t=0.2, tau_s=0.2) > 0)
      True

    Args:
      student_emb: ``[batch, dim]`` student embedding.
      teacher_emb: ``[batch, dim]`` teacher embedding.
      queue: ``[K, dim]`` unit-norm teacher embeddings of past batches (used as is).
      tau_t: teacher temperature.
      tau_s: student temperature.
      weights: optional ``[batch]`` per-example weights.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      eps: minimum row norm.
      axis_name: if given (and ``reduction != "none"``), ``lax.pmean`` over it.
    """
    _check_pair(student_emb, teacher_emb)
    check_float_array(queue, "queue", ndim=2)
    if queue.shape[1] != student_emb.shape[1]:
        raise ValueError(
            f"queue must have shape (K, {student_emb.shape[1]}) to match the embeddings, "
            f"got {queue.shape}."
        )
    check_positive(tau_t, "tau_t")
    check_positive(tau_s, "tau_s")
    check_positive(eps, "eps")
    s = _normalize(student_emb.astype(jnp.float32), 1, eps)
    t = _normalize(teacher_emb.astype(jnp.float32), 1, eps)
    q = jax.lax.stop_gradient(queue.astype(jnp.float32))
    logits_s = jnp.concatenate([jnp.sum(s * t, 1, keepdims=True), s @ q.T], axis=1)
    logits_t = jnp.concatenate([jnp.sum(t * t, 1, keepdims=True), t @ q.T], axis=1)
    per_example = optax.softmax_cross_entropy(logits_s / tau_s,
                                              jax.nn.softmax(logits_t / tau_t, axis=1))
    out = reduce_per_example(per_example, weights, reduction)
    return out if reduction == "none" else _maybe_pmean(out, axis_name)
