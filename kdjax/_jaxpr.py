"""One walker over jaxprs (sub-jaxprs included), shared by the engine, the bound
interpreter and the benchmarks.

Only public JAX (``jax.extend.core``): a jaxpr's equations, and the jaxprs inside an
equation's parameters (``jit``, ``custom_jvp_call``, ``scan``, ``cond``, ``while`` ...).
"""

from __future__ import annotations

from typing import Any, Iterator

from jax.extend import core as jcore

__all__ = ["inner_jaxprs", "iter_eqns", "primitives"]


def _open(jaxpr: Any):
    return getattr(jaxpr, "jaxpr", jaxpr)


def inner_jaxprs(eqn) -> list:
    """The (open) jaxprs in one equation's parameters, in parameter order."""
    return list(jcore.jaxprs_in_params(eqn.params))


def iter_eqns(jaxpr: Any) -> Iterator[tuple[Any, int]]:
    """Yields ``(eqn, repeats)`` for every equation of ``jaxpr`` (open or closed) and of
    its sub-jaxprs, depth first; ``repeats`` is the product of the ``length`` of the
    enclosing ``scan`` equations (1 outside a scan)."""
    stack = [(_open(jaxpr), 1)]
    while stack:
        j, times = stack.pop()
        for e in j.eqns:
            yield e, times
            inner = times * (e.params.get("length", 1) if e.primitive.name == "scan" else 1)
            stack.extend((sub, inner) for sub in inner_jaxprs(e))


def primitives(jaxpr: Any) -> set[str]:
    """Names of every primitive in a (closed) jaxpr, sub-jaxprs included."""
    return {e.primitive.name for e, _ in iter_eqns(jaxpr)}
