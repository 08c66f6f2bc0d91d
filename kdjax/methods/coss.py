"""Registry entries for unsupervised embedding distillation (docs/METHODS.md section 3).

``coss`` (CoSS, arXiv 2409.13939), ``cosine`` (its per-sample term alone) and ``seed``
(SEED, ICLR 2021, as the CoSS baseline). None reads labels (``needs_labels=False``).

Each method takes the student and teacher embeddings by feature name (default
``"pooled"``, ``[B, D]``), stops the teacher's gradient, and maps the student through a
:class:`kdjax.models.projector.Projector` (``Dense(2048) -> ReLU -> Dense(D_t)``, no BN,
as the CoSS ``Wrapper``) whose params ``init`` creates when the dims differ
(``projector="auto"``; ``"always"`` / ``"never"`` override). With ``use_bn=True`` the
projector's running statistics live in the method state.

Batch semantics: ``coss`` with ``num_groups=G`` is the mean of the loss over ``G``
contiguous slices of the batch (:func:`kdjax.losses.per_group`); with ``G`` equal to
the device count and a batch sharded over a ``("data",)`` mesh this is the authors'
per-GPU (DDP) loss. The default ``G=1`` is the global batch. ``coss`` ignores
``batch["weights"]`` (its column term has no per-example form); ``cosine`` and ``seed``
honour them.

``seed`` keeps its instance queue (``[queue_size, D_t]`` unit rows and a pointer) in the
method state: the loss uses the queue, then enqueues the (global) teacher batch.
"""

from __future__ import annotations

import jax

from kdjax import losses
from kdjax._checks import check_choice
from kdjax.methods import Method, register
from kdjax.methods.common import features
from kdjax.models.projector import Projector

__all__: list[str] = []

_sg = jax.lax.stop_gradient
_PROJECTOR_MODES = ("auto", "always", "never")


def _pick(out, name: str, who: str, option: str):
    feats = features(out, who)
    if name not in feats:
        raise ValueError(f"unknown {who} feature {name!r} in option {option!r}; available "
                         f"{who} features: {sorted(feats)}.")
    x = feats[name]
    if jax.numpy.ndim(x) != 2:
        raise ValueError(f"{who} feature {name!r} must be an embedding (batch, dim), got "
                         f"shape {jax.numpy.shape(x)}.")
    return x


def _embeddings(student_out, teacher_out, o):
    s = _pick(student_out, o["student_feature"], "student", "student_feature")
    t = _pick(teacher_out, o["teacher_feature"], "teacher", "teacher_feature")
    return s, _sg(t)


def _head(o, out_dim: int) -> Projector:
    return Projector(out_dim=out_dim, hidden_dim=o["hidden_dim"], use_bn=o["use_bn"])


def _init_projector(rng, student_out, teacher_out, o):
    """``(params, batch_stats or None)`` for the projector (``{}`` when not used)."""
    check_choice(o["projector"], "projector", _PROJECTOR_MODES)
    s, t = _embeddings(student_out, teacher_out, o)
    mode = o["projector"]
    if mode == "never" or (mode == "auto" and s.shape[1] == t.shape[1]):
        if s.shape[1] != t.shape[1]:
            raise ValueError(f"projector='never' needs equal embedding dims, got student "
                             f"{s.shape} and teacher {t.shape}.")
        return {}, None
    variables = _head(o, t.shape[1]).init(rng, s, train=False)
    return variables["params"], variables.get("batch_stats")


def _project(params, batch_stats, s, t, o):
    """Student embedding through the projector; returns ``(s, new_batch_stats)``."""
    if not params:
        return s, batch_stats
    head = _head(o, t.shape[1])
    if o["use_bn"]:
        s, upd = head.apply({"params": params, "batch_stats": batch_stats}, s, train=True,
                            mutable=["batch_stats"])
        return s, upd["batch_stats"]
    return head.apply({"params": params}, s, train=True), batch_stats


_COMMON = {"student_feature": "pooled", "teacher_feature": "pooled", "projector": "auto",
           "hidden_dim": 2048, "use_bn": False}


# --- coss and cosine ------------------------------------------------------------------

def _init_plain(rng, student_out, teacher_out, o):
    params, bs = _init_projector(rng, student_out, teacher_out, o)
    return params, (None if bs is None else {"batch_stats": bs})


def _projected(inputs, o):
    """``(student, teacher, new_state)``: the embeddings, the student's projected, and
    the state of ``coss``/``cosine`` (the projector's batch stats, or ``None``)."""
    state = inputs.state
    s, t = _embeddings(inputs.student, inputs.teacher, o)
    s, bs = _project(inputs.params, None if state is None else state["batch_stats"], s, t, o)
    return s, t, (None if bs is None else {"batch_stats": bs})


def _coss(inputs, o):
    s, t, new_state = _projected(inputs, o)
    value = losses.per_group(losses.coss, o["num_groups"])(
        s, t, l0=o["l0"], l1=o["l1"], tau_t=o["tau_t"], tau_s=o["tau_s"])
    return value, new_state


def _cosine(inputs, o):
    s, t, new_state = _projected(inputs, o)
    value = losses.cosine_distillation(s, t, o["tau_t"], o["tau_s"],
                                       weights=inputs.batch.get("weights"))
    return value, new_state


register(Method(
    "coss", _coss, init=_init_plain,
    options={**_COMMON, "l0": 1.0, "l1": 1.0, "tau_t": 0.07, "tau_s": 0.1, "num_groups": 1},
    default_weight=1.0, needs_labels=False,
    doc="CoSS: (l0 L_co + l1 L_ss) / (tau_t tau_s) on embeddings, projector if dims differ"))
register(Method(
    "cosine", _cosine, init=_init_plain,
    options={**_COMMON, "tau_t": 0.07, "tau_s": 0.1}, default_weight=1.0,
    needs_labels=False,
    doc="per-sample cosine -cos(T_i, S_i) / (tau_t tau_s) (CoSS's L_co alone)"))


# --- seed -----------------------------------------------------------------------------

def _init_seed(rng, student_out, teacher_out, o):
    k_head, k_queue = jax.random.split(rng)
    params, bs = _init_projector(k_head, student_out, teacher_out, o)
    t = _pick(teacher_out, o["teacher_feature"], "teacher", "teacher_feature")
    queue, ptr = losses.seed_queue_init(k_queue, int(o["queue_size"]), int(t.shape[1]))
    state = {"queue": queue, "ptr": ptr}
    if bs is not None:
        state["batch_stats"] = bs
    return params, state


def _seed(inputs, o):
    state = inputs.state
    s, t = _embeddings(inputs.student, inputs.teacher, o)
    s, bs = _project(inputs.params, state.get("batch_stats"), s, t, o)
    value = losses.seed(s, t, state["queue"], o["tau_t"], o["tau_s"],
                        weights=inputs.batch.get("weights"))
    queue, ptr = losses.seed_queue_update(state["queue"], state["ptr"], t)
    new_state = {"queue": queue, "ptr": ptr}
    if bs is not None:
        new_state["batch_stats"] = bs
    return value, new_state


register(Method(
    "seed", _seed, init=_init_seed,
    options={**_COMMON, "tau_t": 1e-4, "tau_s": 0.2, "queue_size": 65536},
    default_weight=1.0, needs_labels=False,
    doc="SEED: cross-entropy of similarity distributions over a teacher queue"))
