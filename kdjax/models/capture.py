"""Features from a user's own Flax module, by module path, without editing it.

torchdistill selects intermediate features by module path in the config; the
functional Flax equivalent is ``capture_intermediates``: every submodule's output is
recorded in the ``intermediates`` collection, keyed by its path. :func:`with_features`
wraps any linen module whose ``__call__`` returns logits into an apply function that
returns ``(logits, features)`` like kdjax's own models, with ``features`` picked by
path (``"Dense_0"``, ``"block1/conv2"``, ...). Values a module ``sow``s into
``intermediates`` can be picked the same way. :func:`kdjax.models.wrap` uses the same
machinery (:func:`apply_with_features`) to make a *module* of the engine's contract.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
from flax.traverse_util import flatten_dict

__all__ = ["with_features", "available_paths", "feature_names", "apply_with_features",
           "pick_features"]


def _flat_intermediates(state: Mapping[str, Any]) -> dict[str, Any]:
    flat = flatten_dict(dict(state.get("intermediates", {})), sep="/")
    out = {}
    for key, value in flat.items():
        # capture_intermediates stores a tuple of outputs under "<path>/__call__".
        path = key.rsplit("/", 1)[0] if key.endswith("__call__") else key
        out[path] = value[-1] if isinstance(value, tuple) else value
    return out


def feature_names(paths: Mapping[str, str] | Sequence[str] | str,
                  pooled: str | None = None) -> dict[str, str]:
    """``{feature_name: path}`` from a list of paths (keyed by path) or a dict;
    ``pooled`` adds ``{"pooled": pooled}``."""
    if isinstance(paths, str):
        paths = [paths]
    names = dict(paths) if isinstance(paths, Mapping) else {p: p for p in paths}
    if pooled is not None:
        names["pooled"] = pooled
    return names


def pick_features(intermediates: Mapping[str, Any], names: Mapping[str, str],
                  owner: str) -> dict[str, Any]:
    """``{name: value}`` of the paths ``names`` in an ``{"intermediates": ...}`` state
    (linen's ``capture_intermediates``/``sow``, or NNX's ``nnx.capture``).

    Raises:
      ValueError: a requested path does not exist; the message names ``owner`` and lists
        the available paths.
    """
    flat = _flat_intermediates(intermediates)
    missing = sorted(p for p in names.values() if p not in flat)
    if missing:
        raise ValueError(f"feature path(s) {missing} not found in {owner}; available "
                         f"paths: {sorted(flat)}.")
    return {name: flat[path] for name, path in names.items()}


def apply_with_features(module: nn.Module, names: Mapping[str, str], variables, x, *,
                        mutable: Sequence[str] = (), **kwargs):
    """``module.apply(variables, x, **kwargs)`` that also returns the outputs at the
    paths ``names`` (:func:`feature_names`): ``((output, features), updated_state)``
    with ``updated_state`` the collections in ``mutable`` (without ``intermediates``).
    Paths are captured only when ``names`` is non-empty."""
    if not names:
        if not mutable:
            return (module.apply(variables, x, **kwargs), {}), {}
        out, state = module.apply(variables, x, mutable=list(mutable), **kwargs)
        return (out, {}), dict(state)
    out, state = module.apply(variables, x, capture_intermediates=True,
                              mutable=["intermediates", *mutable], **kwargs)
    features = pick_features(state, names, type(module).__name__)
    return (out, features), {k: v for k, v in state.items() if k != "intermediates"}


def available_paths(module: nn.Module, variables, x, **kwargs) -> list[str]:
    """All module paths whose outputs :func:`with_features` can return."""
    _, state = module.apply(variables, x, capture_intermediates=True,
                            mutable=["intermediates"], **kwargs)
    return sorted(_flat_intermediates(state))


def with_features(module: nn.Module, paths: Mapping[str, str] | Sequence[str],
                  *, pooled: str | None = None) -> Callable[..., Any]:
    """Wraps ``module`` into ``apply(variables, x, **kw) -> (logits, features)``.

    For a *module* of the engine's contract (to pass to
    :class:`~kdjax.train.Distiller`) use :func:`kdjax.models.wrap` with the same
    ``paths``.

    Args:
      module: any linen module whose ``__call__`` returns logits ``[B, classes]``.
      paths: module paths to capture, either a list (features keyed by path) or a dict
        ``{feature_name: path}``.
      pooled: optional path whose output becomes ``features["pooled"]``.

    Returns:
      ``apply(variables, x, *, mutable=False, **kwargs)``; when ``mutable`` names
      collections (e.g. ``["batch_stats"]`` in training) it returns
      ``((logits, features), updated_state)`` as ``module.apply`` does.

    Raises:
      ValueError: at trace time if a requested path does not exist; the message lists
      the available paths.
    """
    names = feature_names(paths, pooled)

    def apply(variables, x, *, mutable=False, **kwargs):
        out, rest = apply_with_features(module, names, variables, x,
                                        mutable=[] if mutable is False else list(mutable),
                                        **kwargs)
        return out if mutable is False else (out, rest)

    return apply
