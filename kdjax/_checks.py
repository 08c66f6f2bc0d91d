"""Input validation shared by every public kdjax function.

Policy (the same everywhere in kdjax):

* Shapes, ranks and dtypes are static under ``jit``, so they are always checked, at
  trace time, and a bad one raises ``ValueError`` (shape/rank) or ``TypeError`` (dtype)
  whose message names the argument, what was expected and what was received.
* Values (a temperature <= 0, labels out of range, NaN/Inf in the inputs) can only be
  checked when they are concrete (Python numbers, NumPy arrays, or JAX arrays outside a
  trace). They are checked then; under a trace the check is skipped, and the opt-in
  :func:`kdjax.checked` wrapper (``jax.experimental.checkify``) enforces the same
  conditions inside compiled code.
"""

from __future__ import annotations

import contextvars
import functools
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

__all__ = [
    "is_concrete",
    "check_array",
    "check_float_array",
    "check_same_shape",
    "check_same_leading",
    "check_positive",
    "check_nonnegative",
    "check_in_range",
    "check_choice",
    "check_labels",
    "check_weights",
    "check_finite",
    "checked",
]

# True while a function wrapped by `checked` is being traced: traced value checks are
# then emitted as checkify checks (they are skipped otherwise, since a bare
# `checkify.check` cannot be staged out by jit).
_CHECKIFY_ACTIVE = contextvars.ContextVar("kdjax_checkify_active", default=False)

# The same flag as a jit-cache-sensitive context: JAX's tracing cache is keyed on the
# function and the argument types, not on ``_CHECKIFY_ACTIVE``. Without this, a
# ``checked(jax.jit(loss))`` call would leave a trace containing ``checkify.check`` in
# the cache of ``loss`` and a later plain ``jax.jit(loss)`` call with the same shapes
# would fail ("Cannot abstractly evaluate a checkify.check which was not
# functionalized"); the other order would silently drop kdjax's value checks.
_make_user_context = getattr(jax, "make_user_context", None)
_CHECKIFY_JIT_KEY = _make_user_context(False) if _make_user_context is not None else None


def checked(fn: Callable, errors=checkify.user_checks | checkify.nan_checks) -> Callable:
    """Opt-in runtime checks inside compiled code (``jax.experimental.checkify``).

    ``checked(fn)(*args)`` returns ``(error, out)``; call ``error.throw()`` to raise.
    While ``fn`` is traced, kdjax's value checks (finite inputs, ...) become
    ``checkify.check`` calls, and by default NaN-producing primitives are flagged too.
    Works under ``jax.jit(checked(fn))``.
    """
    checked_fn = checkify.checkify(fn, errors=errors)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        token = _CHECKIFY_ACTIVE.set(True)
        try:
            if _CHECKIFY_JIT_KEY is None:
                return checked_fn(*args, **kwargs)
            with _CHECKIFY_JIT_KEY(True):
                return checked_fn(*args, **kwargs)
        finally:
            _CHECKIFY_ACTIVE.reset(token)

    return wrapper


def is_concrete(x: Any) -> bool:
    """True when ``x`` has a value now (not a tracer inside jit/grad/vmap)."""
    return not isinstance(x, jax.core.Tracer)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def check_array(
    x: Any,
    name: str,
    *,
    ndim: int | Sequence[int] | None = None,
    min_ndim: int | None = None,
    float_only: bool = False,
    allow_empty: bool = False,
) -> None:
    """Checks rank, dtype kind and non-emptiness of ``x``; raises naming ``name``."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        if isinstance(x, (int, float)) and not float_only:
            return
        if not isinstance(x, (list, tuple, int, float)):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}.")
        x = np.asarray(x)
    shape = _shape(x)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if len(shape) not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(
                f"{name} must have rank {want}, got rank {len(shape)} with shape {shape}."
            )
    if min_ndim is not None and len(shape) < min_ndim:
        raise ValueError(
            f"{name} must have rank >= {min_ndim}, got rank {len(shape)} with shape {shape}."
        )
    if float_only and not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} must have a floating dtype (float32, bfloat16, ...), got {x.dtype}."
        )
    if not allow_empty and len(shape) > 0 and shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch, got shape {shape}.")


def check_float_array(x: Any, name: str, *, ndim=None, min_ndim=None) -> None:
    """``check_array`` with ``float_only=True``."""
    check_array(x, name, ndim=ndim, min_ndim=min_ndim, float_only=True)


def check_same_shape(a: Any, b: Any, name_a: str, name_b: str) -> None:
    """Raises ``ValueError`` unless ``a`` and ``b`` have identical shapes."""
    if _shape(a) != _shape(b):
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, "
            f"got {_shape(a)} for {name_a} and {_shape(b)} for {name_b}."
        )


def check_same_leading(a: Any, b: Any, name_a: str, name_b: str) -> None:
    """Raises ``ValueError`` unless the leading (batch) dimensions agree."""
    sa, sb = _shape(a), _shape(b)
    if not sa or not sb or sa[0] != sb[0]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same batch size (leading dimension), "
            f"got {sa} for {name_a} and {sb} for {name_b}."
        )


def _as_float(value: Any) -> float | None:
    if not is_concrete(value):
        return None
    arr = np.asarray(value)
    if arr.size != 1:
        return None
    return float(arr.reshape(()))


def check_positive(value: Any, name: str) -> None:
    """Raises ``ValueError`` if a concrete ``value`` is not > 0 (skipped when traced)."""
    v = _as_float(value)
    if v is not None and not v > 0:
        raise ValueError(f"{name} must be > 0, got {v}.")


def check_nonnegative(value: Any, name: str) -> None:
    """Raises ``ValueError`` if a concrete ``value`` is not >= 0 (skipped when traced)."""
    v = _as_float(value)
    if v is not None and not v >= 0:
        raise ValueError(f"{name} must be >= 0, got {v}.")


def check_in_range(value: Any, name: str, low: float, high: float, *,
                   low_open: bool = False, high_open: bool = False) -> None:
    """Raises ``ValueError`` if a concrete ``value`` lies outside the interval."""
    v = _as_float(value)
    if v is None:
        return
    ok_low = v > low if low_open else v >= low
    ok_high = v < high if high_open else v <= high
    if not (ok_low and ok_high):
        lb = "(" if low_open else "["
        rb = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lb}{low}, {high}{rb}, got {v}.")


def check_choice(value: Any, name: str, choices: Iterable[Any]) -> None:
    """Raises ``ValueError`` listing the valid choices when ``value`` is not one."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(
            f"{name} must be one of {sorted(map(str, choices))}, got {value!r}."
        )


def check_labels(labels: Any, name: str, num_classes: int, batch: int | None = None) -> None:
    """Checks integer labels of shape ``[batch]`` in ``[0, num_classes)``."""
    check_array(labels, name, ndim=1)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {labels.dtype}.")
    if batch is not None and _shape(labels)[0] != batch:
        raise ValueError(
            f"{name} must have shape ({batch},) to match the batch, got {_shape(labels)}."
        )
    if is_concrete(labels):
        arr = np.asarray(labels)
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(
                f"{name} must lie in [0, {num_classes}), got values in "
                f"[{arr.min()}, {arr.max()}]."
            )


def check_weights(weights: Any, name: str, batch: int) -> None:
    """Checks per-example weights: float, shape ``[batch]``, non-negative if concrete."""
    if weights is None:
        return
    check_array(weights, name, ndim=1, float_only=True)
    if _shape(weights)[0] != batch:
        raise ValueError(
            f"{name} must have shape ({batch},) (one weight per example), "
            f"got {_shape(weights)}."
        )
    if is_concrete(weights):
        arr = np.asarray(weights, dtype=np.float64)
        if (arr < 0).any():
            raise ValueError(f"{name} must be >= 0, got min {arr.min()}.")


def check_finite(x: Any, name: str) -> None:
    """Eager NaN/Inf check for concrete arrays; under a trace, a checkify check.

    Outside ``jit`` this raises ``ValueError`` at once. Inside ``jit`` it adds a
    ``checkify.check`` only while the function is traced under :func:`checked`;
    otherwise it is skipped (no cost, no error).
    """
    if is_concrete(x):
        arr = np.asarray(x, dtype=np.float64)
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise ValueError(f"{name} must be finite, got {bad} NaN/Inf entries.")
    elif _CHECKIFY_ACTIVE.get():
        checkify.check(jnp.all(jnp.isfinite(x)), f"{name} must be finite (NaN/Inf found).")
