"""Method registry: experiments pick distillation methods by name from config.

A *method* turns ``(student_out, teacher_out, batch)`` into a scalar loss term, where
``*_out = (logits, features)`` as returned by :mod:`kdjax.models` (``features`` is a
dict of named arrays, channels-last). Methods with trainable adapters (FitNet
regressors, VID heads, CRD embeddings, ...) create their parameters in ``init``; they
live next to the student's parameters and are trained with them. Methods with
non-trained state (a CRD/SEED negative queue) carry it in ``state``.

A method config is an ``ml_collections.ConfigDict`` (or dict) with at least ``name`` and
``weight``; the other keys are the method's own options (e.g. ``pairs``: a list of
``[student_feature, teacher_feature]`` names, ``temperature``). Unknown option keys are
an error that lists the valid ones.

Calling convention: a method function receives one :class:`Inputs` (adapter params,
state, student and teacher outputs, batch, rng, models) and one read-only ``options``
mapping (every option of the method, the traced numbers substituted), and reads only
what it uses: ``loss(inputs, options) -> (scalar, new_state)``,
``init(rng, student_out, teacher_out, options) -> (params, state)``.
:func:`stateless` adapts ``fn(inputs, options) -> scalar``.

Each family registers its methods in its own module (``zoo``, ``kd2m``, ``coss``);
helpers shared by several families (feature picking, pair resolution, rng splitting,
adapter-param checks) live in :mod:`kdjax.methods.common`. This module holds the
registry and the two basic methods, ``ce`` and ``kd``.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import losses

__all__ = ["Method", "Inputs", "register", "get", "names", "build", "BuiltMethod",
           "stateless"]

_REGISTRY: dict[str, "Method"] = {}


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What a method's ``loss`` (and ``pretrain_loss``) reads besides its options.

    Attributes:
      params: this method's adapter params (``{}`` when it has none).
      state: this method's non-trained state (``None`` when it has none).
      student: the student's ``(logits, features)``.
      teacher: the teacher's ``(logits, features)``, or ``None`` (teacher-free terms).
      batch: a dict with ``"x"`` and, for supervised methods, ``"y"``, and optionally
        ``"weights"`` (per-example sample weights, which a method should honour when
        its math allows it).
      rng: a PRNG key for this term and step (may be ``None`` outside the engine).
      models: ``(student_fn, teacher_fn)`` when the method has ``needs_models``, else
        ``None`` (see :class:`Method`).
    """

    params: Any
    state: Any
    student: Any
    teacher: Any
    batch: Mapping[str, Any]
    rng: Any = None
    models: Any = None

    @property
    def weights(self):
        """``batch["weights"]`` (per-example sample weights), ``None`` when absent."""
        return self.batch.get("weights") if isinstance(self.batch, Mapping) else None


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered distillation method.

    Attributes:
      name: registry key.
      loss: ``loss(inputs, options) -> (scalar, new_state)``: ``inputs`` an
        :class:`Inputs`, ``options`` a read-only mapping of all the method's options
        (the traced numbers substituted); the function reads only what it uses.
      init: optional ``init(rng, student_out, teacher_out, options) -> (params,
        state)`` creating adapter parameters and state from example outputs (shapes).
      options: the option names and their defaults (the reference defaults).
      default_weight: the reference weight of the loss term.
      needs_labels: whether the loss reads ``batch["y"]``.
      doc: one line for listings.
      needs_models: when True ``inputs.models`` is ``(student_fn, teacher_fn)``, two
        functions ``x -> (logits, features)`` (student with the
        parameters being differentiated and its BatchNorm in eval mode; teacher in eval
        mode with ``stop_gradient`` on its parameters, so input gradients flow), for losses that evaluate the networks at other
        inputs (adversarial distillation, faithfulness penalties).
      pretrain_loss: optional initialisation stage (FT paraphraser, AB, FSP in the
        reference code): same signature as ``loss`` (called by
        :meth:`BuiltMethod.pretrain`); before distillation the engine
        minimises it over this method's adapter params only, with the student frozen,
        for ``options["pretrain_epochs"]`` epochs (the option must then exist).
      needs_teacher: False for teacher-free objectives (``ce``, the DG teacher
        objectives of :mod:`kdjax.methods.robust`), which may train without a teacher.
      traced_options: the numeric options the loss accepts as traced scalars (it uses
        them only in arithmetic, never in Python control flow or shapes). The engine
        passes them, with the weight, as arguments of the compiled step
        (``TrainState.hparams``), so runs that differ only in these numbers share one
        program. Every other option is static (baked into the program).
    """

    name: str
    loss: Callable[..., Any]
    init: Callable[..., Any] | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    default_weight: float = 1.0
    needs_labels: bool = False
    doc: str = ""
    pretrain_loss: Callable[..., Any] | None = None
    needs_models: bool = False
    needs_teacher: bool = True
    traced_options: tuple[str, ...] = ()


def register(method: Method) -> Method:
    """Adds ``method`` to the registry (a name can be registered once)."""
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered.")
    _REGISTRY[method.name] = method
    return method


def names() -> list[str]:
    """Sorted list of registered method names."""
    _load_families()
    return sorted(_REGISTRY)


def get(name: str) -> Method:
    """Looks a method up by name; an unknown name lists the valid ones."""
    _load_families()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid methods: {sorted(_REGISTRY)}.")
    return _REGISTRY[name]


@dataclasses.dataclass(frozen=True)
class BuiltMethod:
    """A method bound to its options and weight, ready for the training step."""

    method: Method
    weight: float
    options: Mapping[str, Any]

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def numbers(self) -> dict[str, float]:
        """The traced numbers of the term: ``weight`` and the method's
        ``traced_options`` (float32 host scalars)."""
        out = {"weight": np.float32(self.weight)}
        for k in self.method.traced_options:
            out[k] = np.float32(self.options[k])
        return out

    @property
    def static_options(self) -> dict[str, Any]:
        """The options baked into the compiled step (all but ``traced_options``)."""
        return {k: v for k, v in self.options.items()
                if k not in self.method.traced_options}

    def bound_options(self, numbers: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
        """The read-only options mapping the method functions get; ``numbers``
        (traced) replace the options of the same name (``weight`` is not an option)."""
        options = dict(self.options)
        if numbers:
            options.update({k: v for k, v in numbers.items() if k != "weight"})
        return types.MappingProxyType(options)

    def init(self, rng, student_out, teacher_out):
        """``(params, state)`` of the method (``({}, None)`` when it has no ``init``)."""
        if self.method.init is None:
            return {}, None
        return self.method.init(rng, student_out, teacher_out, self.bound_options())

    def _inputs(self, params, state, student_out, teacher_out, batch, rng, models):
        return Inputs(params=params, state=state, student=student_out, teacher=teacher_out,
                      batch=batch, rng=rng,
                      models=models if self.method.needs_models else None)

    def __call__(self, params, state, student_out, teacher_out, batch, rng, models=None,
                 numbers: Mapping[str, Any] | None = None):
        """The loss term; ``numbers`` (traced) replace the options of the same name."""
        inputs = self._inputs(params, state, student_out, teacher_out, batch, rng, models)
        return self.method.loss(inputs, self.bound_options(numbers))

    def pretrain(self, params, state, student_out, teacher_out, batch, rng, models=None):
        """The initialisation-stage loss ``pretrain_loss`` with the bound options."""
        if self.method.pretrain_loss is None:
            raise ValueError(f"method {self.name!r} has no pretrain_loss.")
        inputs = self._inputs(params, state, student_out, teacher_out, batch, rng, models)
        return self.method.pretrain_loss(inputs, self.bound_options())


def build(config: Mapping[str, Any]) -> BuiltMethod:
    """Binds a method config ``{name, weight, **options}`` to a :class:`BuiltMethod`.

    Missing options take the method's defaults; an unknown option key raises a
    ``ValueError`` that lists the valid keys.
    """
    config = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    if "name" not in config:
        raise ValueError(f"a method config needs a 'name' key, got keys {sorted(config)}.")
    method = get(config.pop("name"))
    weight = float(config.pop("weight", method.default_weight))
    unknown = sorted(set(config) - set(method.options))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for method {method.name!r}; "
            f"valid options: {sorted(method.options)}."
        )
    options = {**method.options, **config}
    return BuiltMethod(method=method, weight=weight, options=options)


def stateless(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adapts ``fn(inputs, options) -> scalar`` to ``loss(inputs, options) -> (scalar,
    inputs.state)`` (the state passes through unchanged)."""

    @functools.wraps(fn)
    def loss(inputs: Inputs, options: Mapping[str, Any]):
        return fn(inputs, options), inputs.state

    return loss


# --- the two basic methods -------------------------------------------------------------

def _ce(inputs, options):
    """CE on the labels (mixed as ``lam CE(y) + (1-lam) CE(y_b)`` when a mixing
    augmentation put ``y_b``/``lam`` in the batch). With ``batch["label_mask"]`` (1 = labelled), the mean is over
    the labelled rows of the batch only (0 when none), so a semi-supervised batch's CE
    has the scale of a fully labelled one."""
    batch, logits = inputs.batch, inputs.student[0]
    label_smoothing = options["label_smoothing"]
    per_example = losses.cross_entropy(logits, batch["y"], weights=batch.get("weights"),
                                       label_smoothing=label_smoothing, reduction="none")
    if "y_b" in batch:  # mixup / cutmix: lam * CE(y_a) + (1 - lam) * CE(y_b)
        lam = batch["lam"]
        per_b = losses.cross_entropy(logits, batch["y_b"], weights=batch.get("weights"),
                                     label_smoothing=label_smoothing, reduction="none")
        per_example = lam * per_example + (1.0 - lam) * per_b
    if "label_mask" not in batch:
        return per_example.mean()
    mask = batch["label_mask"].astype(per_example.dtype)
    return (per_example * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def _kd(inputs, options):
    return losses.kd(inputs.student[0], jax.lax.stop_gradient(inputs.teacher[0]),
                     options["temperature"], weights=inputs.weights)


register(Method("ce", stateless(_ce), options={"label_smoothing": 0.0},
                default_weight=1.0, needs_labels=True, needs_teacher=False,
                doc="cross-entropy with the labels (batch['weights'] as sample weights)"))
register(Method("kd", stateless(_kd), options={"temperature": 4.0}, default_weight=0.9,
                traced_options=("temperature",),
                doc="Hinton KD, tau^2 KL(p_T || p_S)"))

_FAMILIES = ("zoo", "kd2m", "coss", "faithful", "robust", "shiftkd")
_loaded = False


def _load_families() -> None:
    """Imports the family modules (each registers its methods) once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib

    for family in _FAMILIES:
        importlib.import_module(f"kdjax.methods.{family}")
