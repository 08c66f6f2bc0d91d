"""Features from a user's own Flax module, by module path, without editing it.

torchdistill selects intermediate features by module path in the config; the
functional Flax equivalent is ``capture_intermediates``: every submodule's output is
recorded in the ``intermediates`` collection, keyed by its path. :func:`with_features`
wraps any linen module whose ``__call__`` returns logits into an apply function that
returns ``(logits, features)`` like kdjax's own models, with ``features`` picked by
path (``"Dense_0"``, ``"block1/conv2"``, ...). Values a module ``sow``s into
``intermediates`` can be picked the same way.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
from flax.traverse_util import flatten_dict

__all__ = ["with_features", "available_paths"]


def _flat_intermediates(state: Mapping[str, Any]) -> dict[str, Any]:
    flat = flatten_dict(dict(state.get("intermediates", {})), sep="/")
    out = {}
    for key, value in flat.items():
        # capture_intermediates stores a tuple of outputs under "<path>/__call__".
        path = key.rsplit("/", 1)[0] if key.endswith("__call__") else key
        out[path] = value[-1] if isinstance(value, tuple) else value
    return out


def available_paths(module: nn.Module, variables, x, **kwargs) -> list[str]:
    """All module paths whose outputs :func:`with_features` can return."""
    _, state = module.apply(variables, x, capture_intermediates=True,
                            mutable=["intermediates"], **kwargs)
    return sorted(_flat_intermediates(state))


def with_features(module: nn.Module, paths: Mapping[str, str] | Sequence[str],
                  *, pooled: str | None = None) -> Callable[..., Any]:
    """Wraps ``module`` into ``apply(variables, x, **kw) -> (logits, features)``.

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
    names = dict(paths) if isinstance(paths, Mapping) else {p: p for p in paths}
    if pooled is not None:
        names["pooled"] = pooled

    def apply(variables, x, *, mutable=False, **kwargs):
        extra = [] if mutable is False else list(mutable)
        logits, state = module.apply(variables, x, capture_intermediates=True,
                                     mutable=["intermediates", *extra], **kwargs)
        flat = _flat_intermediates(state)
        missing = sorted(p for p in names.values() if p not in flat)
        if missing:
            raise ValueError(f"feature path(s) {missing} not found in "
                             f"{type(module).__name__}; available paths: {sorted(flat)}.")
        features = {name: flat[path] for name, path in names.items()}
        if mutable is False:
            return logits, features
        rest = {k: v for k, v in state.items() if k != "intermediates"}
        return (logits, features), rest

    return apply

