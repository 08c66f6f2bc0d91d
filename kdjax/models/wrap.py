"""Any Flax model in the engine's contract: :func:`wrap` (linen) and :func:`from_nnx`.

:class:`~kdjax.train.Distiller` calls ``module.apply(variables, x, train=bool)`` and
expects ``(logits, features)``, with BatchNorm statistics in ``batch_stats``; kdjax's
own models follow this contract. An ordinary Flax model is made to follow it with

* ``wrap(module, features=paths)`` for a linen module: the inner module is called with
  ``train=`` only when its ``__call__`` takes it (or with a flag of another name such as
  ``deterministic=not train``: ``train_arg``), a bare logits output becomes
  ``(logits, {})``, and ``features`` are picked by module path as in
  :func:`~kdjax.models.with_features` (``capture_intermediates``/``sow``; the same
  helper, :func:`~kdjax.models.capture.apply_with_features`);
* ``from_nnx(NNXClass, *args, features=paths, **kwargs)`` for a ``flax.nnx`` module,
  through ``flax.nnx.bridge.ToLinen``: ``train`` switches the model with
  ``model.train()``/``model.eval()`` (Dropout, BatchNorm), features are method outputs
  and ``sow``-n values captured by ``nnx.capture``, keyed by attribute path
  (``"encoder/linear1"``).

Both nest the inner model's variables under one name, ``"module"``: a wrapped
student's ``params["student"]`` is ``{"module": <inner params>}``, its ``batch_stats``
``{"module": <inner batch_stats>}``. :func:`wrap_variables` turns variables of the inner
model (a linen variables dict, or a trained NNX model) into those of the wrapper, e.g.
for a teacher trained outside kdjax.

Random streams: the wrapper forwards every rng stream of its ``apply`` call (the
Distiller passes ``rngs={"dropout": ...}`` in train mode; ``Distiller.rng_streams``).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from flax.core import FrozenDict
from flax.nnx import variablelib
from flax.traverse_util import unflatten_dict

from kdjax.models.capture import apply_with_features, feature_names, pick_features

__all__ = ["Wrapped", "FromNNX", "wrap", "from_nnx", "wrap_variables", "check_signature",
           "check_output"]

INNER = "module"  # the one name the inner model's variables are nested under
_AUTO = "auto"


def _describe(out) -> str:
    if isinstance(out, (jax.Array, np.ndarray)) or hasattr(out, "shape"):
        return f"an array of shape {tuple(out.shape)}"
    if isinstance(out, (tuple, list)):
        return (f"a {type(out).__name__} of {len(out)} "
                f"({', '.join(_describe(o) for o in out)})")
    if isinstance(out, Mapping):
        return f"a {type(out).__name__} with keys {sorted(map(str, out))}"
    return f"a value of type {type(out).__name__}"


def _is_array(out) -> bool:
    return isinstance(out, (jax.Array, np.ndarray))


def _is_contract(out) -> bool:
    return (isinstance(out, (tuple, list)) and len(out) == 2 and _is_array(out[0])
            and isinstance(out[1], Mapping))


def _as_contract(out, features: Mapping[str, Any], owner: str):
    """``logits -> (logits, features)``; ``(logits, dict) -> (logits, dict | features)``."""
    if _is_array(out):
        return out, dict(features)
    if _is_contract(out):
        clash = sorted(set(out[1]) & set(features))
        if clash:
            raise ValueError(f"{owner} returns features {clash} and the wrapper was asked "
                             f"for features of the same names; rename them.")
        return out[0], {**out[1], **features}
    raise ValueError(f"{owner} returned {_describe(out)}; kdjax.models.wrap/from_nnx need "
                     f"logits (an array [batch, classes]) or a (logits, features dict) "
                     f"pair.")


def check_output(out, role: str = "model") -> None:
    """Raises ``ValueError`` unless ``out`` is ``(logits array, features dict)``; the
    message describes what was received and points at :func:`wrap`."""
    if not _is_contract(out):
        raise ValueError(f"the {role} returned {_describe(out)}, but the engine needs "
                         f"(logits, features dict); wrap a model that returns logits (or "
                         f"whose features are picked by path) with "
                         f"kdjax.models.wrap({role}, features=...) (linen) or "
                         f"kdjax.models.from_nnx(...) (NNX).")


def _call_parameters(module) -> Mapping[str, inspect.Parameter]:
    return inspect.signature(type(module).__call__).parameters


def check_signature(module, role: str = "model") -> None:
    """Raises ``ValueError`` unless ``module`` is a linen module whose ``__call__`` takes
    ``train`` (the engine's calling convention), naming :func:`wrap`/:func:`from_nnx`."""
    if isinstance(module, nnx.Module):
        raise ValueError(f"the {role} is a flax.nnx module; the engine takes linen "
                         f"modules: use kdjax.models.from_nnx({type(module).__name__}, "
                         f"*args, features=..., **kwargs).")
    params = _call_parameters(module)
    if "train" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ValueError(f"the {role} {type(module).__name__}.__call__ takes no `train` "
                         f"argument ({list(params)[1:]}); wrap it with "
                         f"kdjax.models.wrap({role}) (which passes train= only when "
                         f"accepted, or another flag with train_arg=...).")


class Wrapped(nn.Module):
    """A linen module in the engine's contract around ``module`` (build it with
    :func:`wrap`, which validates the fields).

    Attributes:
      module: the inner linen module.
      features: ``((feature_name, path), ...)`` picked from the inner module's
        intermediates (module outputs by path, and ``sow``-n values).
      train_arg: the keyword the inner ``__call__`` receives the mode under, or None.
      invert: pass ``not train`` (a ``deterministic`` flag).
    """

    module: nn.Module
    features: tuple[tuple[str, str], ...] = ()
    train_arg: str | None = None
    invert: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        # the inner module is applied functionally (its own apply, with
        # capture_intermediates), its variables stored under INNER in each collection
        inner = self.module.clone(parent=None, name=None)
        kwargs = {} if self.train_arg is None else {self.train_arg: train != self.invert}
        rngs = {name: self.make_rng(name) for name in self.scope.rngs}
        if self.is_initializing() and not self.has_variable("params", INNER):
            for col, tree in inner.init(rngs, x, **kwargs).items():
                if col != "intermediates":
                    self.put_variable(col, INNER, tree)
        variables = {col: tree[INNER] for col, tree in self.variables.items()
                     if INNER in tree}
        mutable = [c for c in variables if c != "params" and self.is_mutable_collection(c)]
        (out, features), updated = apply_with_features(
            inner, dict(self.features), variables, x, mutable=mutable,
            rngs={k: v for k, v in rngs.items() if k != "params"}, **kwargs)
        for col, tree in updated.items():
            self.put_variable(col, INNER, tree)
        return _as_contract(out, features, type(self.module).__name__)


def wrap(module: nn.Module, features: Mapping[str, str] | Sequence[str] = (), *,
         pooled: str | None = None, train_arg: str | None = _AUTO,
         invert: bool | None = None) -> Wrapped:
    """Any linen module as a module of the engine's contract (:class:`Wrapped`).

    Args:
      module: a linen module returning logits ``[B, classes]`` or
        ``(logits, features dict)``.
      features: module paths to return as features, a list (keyed by path) or a dict
        ``{feature_name: path}``, as in :func:`~kdjax.models.with_features`
        (:func:`~kdjax.models.available_paths` lists them).
      pooled: optional path whose output becomes ``features["pooled"]``.
      train_arg: the keyword of ``module.__call__`` that receives the mode. ``"auto"``
        (default): ``train`` if ``__call__`` takes it, else ``deterministic`` (passed
        ``not train``), else none (the module has one mode). None: never pass it.
      invert: pass ``not train``; default True exactly for ``"deterministic"``.

    Raises:
      ValueError: ``module`` is not a linen module, or ``train_arg`` names an argument
        that ``__call__`` does not take.
    """
    if isinstance(module, nnx.Module) or (isinstance(module, type)
                                          and issubclass(module, nnx.Module)):
        raise ValueError("wrap takes linen modules; for a flax.nnx module use "
                         "kdjax.models.from_nnx(NNXClass, *args, features=..., **kwargs).")
    if not isinstance(module, nn.Module):
        raise ValueError(f"wrap takes a linen module, got {type(module).__name__}.")
    params = _call_parameters(module)
    if train_arg == _AUTO:
        train_arg = next((a for a in ("train", "deterministic") if a in params), None)
    elif train_arg is not None and train_arg not in params and not any(
            p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ValueError(f"train_arg={train_arg!r}, but {type(module).__name__}.__call__ "
                         f"takes {list(params)[1:]}.")
    invert = (train_arg == "deterministic") if invert is None else bool(invert)
    return Wrapped(module, tuple(feature_names(features, pooled).items()), train_arg, invert)


def _nnx_call(names: Mapping[str, str], train: bool, owner: str):
    """The method ``ToLinen`` runs on the NNX model: set the mode, call, capture."""
    def call(model, x):
        model.train() if train else model.eval()
        if not names:
            return model(x), {}
        out, inter = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(x)
        return out, pick_features({"intermediates": inter.to_pure_dict()}, names, owner)
    return call


class FromNNX(nn.Module):
    """A ``flax.nnx`` model class in the engine's contract (build it with
    :func:`from_nnx`). The model is built as ``nnx_class(*args, **kwargs, rngs=...)``
    inside ``nnx.bridge.ToLinen``; its state lives in linen collections under
    ``"module"`` (``nnx.Param -> params``, ``nnx.BatchStat -> batch_stats``)."""

    nnx_class: Callable[..., nnx.Module]
    args: tuple = ()
    kwargs: FrozenDict = FrozenDict({})
    features: tuple[tuple[str, str], ...] = ()
    skip_rng: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        owner = getattr(self.nnx_class, "__name__", str(self.nnx_class))
        bridge = nnx.bridge.ToLinen(self.nnx_class, args=self.args, kwargs=self.kwargs,
                                    skip_rng=self.skip_rng, name=INNER)
        out, features = bridge(x, nnx_method=_nnx_call(dict(self.features), train, owner))
        return _as_contract(out, features, owner)


def from_nnx(nnx_class: Callable[..., nnx.Module], *args,
             features: Mapping[str, str] | Sequence[str] = (), pooled: str | None = None,
             **kwargs) -> FromNNX:
    """A ``flax.nnx`` model as a linen module of the engine's contract.

    Args:
      nnx_class: the NNX module class (not an instance: the bridge builds it from
        ``args``/``kwargs``, passing ``rngs=nnx.Rngs(...)`` from the linen rng streams
        when ``__init__`` takes ``rngs``). For a model trained in NNX, build the wrapper
        from its class and take its variables with :func:`wrap_variables`.
      features: paths of submodules (their method outputs) or of ``sow``-n
        ``nnx.Intermediate`` values, as a list or ``{feature_name: path}``; attribute
        paths joined by ``/`` (``"blocks/0/linear"``).
      pooled: optional path whose output becomes ``features["pooled"]``.
      **kwargs: constructor keywords (hashable values: the module is compared by value).

    ``train=True`` calls ``model.train()`` (Dropout on, BatchNorm on batch statistics,
    which are written back when ``batch_stats`` is mutable), ``train=False``
    ``model.eval()``. Init needs an rng for every stream the constructor takes
    (``nnx.Dropout(..., rngs=rngs)`` takes ``dropout``): the Distiller passes every
    stream of ``rng_streams``.
    """
    if not (isinstance(nnx_class, type) and issubclass(nnx_class, nnx.Module)):
        raise ValueError(f"from_nnx takes a flax.nnx Module class, got {nnx_class!r}"
                         + (" (an instance: pass type(model) and its constructor "
                            "arguments, and wrap_variables(model) for its weights)"
                            if isinstance(nnx_class, nnx.Module) else "") + ".")
    skip_rng = "rngs" not in inspect.signature(nnx_class.__init__).parameters
    return FromNNX(nnx_class, tuple(args), FrozenDict(kwargs),
                   tuple(feature_names(features, pooled).items()), skip_rng)


def wrap_variables(variables) -> dict:
    """Variables of a :func:`wrap`/:func:`from_nnx` wrapper from those of the inner
    model: a linen variables dict (``{"params": ..., "batch_stats": ...}``) or a
    ``flax.nnx`` model instance (its parameters and batch statistics, as the bridge
    stores them), each collection nested under ``"module"``."""
    if isinstance(variables, nnx.Module):
        flat: dict[str, dict] = {}
        for path, var in nnx.to_flat_state(nnx.state(variables, nnx.Not(nnx.RngState))):
            col = variablelib.variable_name_from_type(type(var), allow_register=True)
            flat.setdefault(col, {})[path] = var.get_value()
        variables = {col: unflatten_dict(tree) for col, tree in flat.items()}
    return {col: {INNER: tree} for col, tree in variables.items() if col != "intermediates"}
