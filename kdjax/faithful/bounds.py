r"""Bound propagation over an L-inf ball: interval bounds (IBP) and CROWN.

Both bounds take any JAX function ``fn: x -> outputs`` made of supported operations and
bound ``C f(x')`` for every ``x'`` in the clipped ball

.. math::
    B(x) = \{x' : \|x' - x\|_\infty \le \epsilon,\ lo \le x' \le hi\}.

**Sound or refuse.** Every operation the interpreter accepts has a sound interval rule
and, in CROWN, a sound linear relaxation (or is concretised with its interval, which is
sound too); anything else raises ``NotImplementedError`` naming the operation (the
activation, e.g. ``elu``, when it sits inside one), the Flax module path from the jaxpr's
name stack and the source line. Refused on purpose: casts to integer or boolean dtypes
(fake quantisation: the output jumps), rounding (``round``/``floor``/``ceil``/``sign``),
comparisons and ``select_n`` with an input-dependent predicate (``jnp.where`` on ``x``),
gathers/scatters and ``dynamic_slice`` with input-dependent indices, ``argmax``,
control flow (``cond``, ``while``, ``scan``) and any primitive not listed below.

How it works (one design for both):

1. ``fn`` is traced once on a single example with :func:`jax.make_jaxpr`. The jaxpr is
   *flattened* into a small graph: calls (``jit``, ``custom_jvp_call`` such as
   ``jax.nn.relu``, ...) are inlined; every equation whose inputs do not depend on ``x``
   is evaluated at once (constant folding: eval-mode BatchNorm's
   ``rsqrt(var + eps) * scale`` becomes one constant, so BN is an affine map); ``max``/
   ``min``/``abs``/``clamp`` against constants become ReLUs plus affine maps
   (``max(a, c) = relu(a - c) + c``, ``max(a, b) = a + relu(b - a)``). The activations
   ``jax.nn.{silu, softplus, elu, celu, selu, leaky_relu, hard_tanh, mish, hard_silu,
   gelu}`` are recognised (a ``jit`` of that name whose inner jaxpr is *identical* to
   JAX's; ``gelu``, which JAX inlines, by a structural match of its sub-graph) and
   become one elementwise node with its own relaxation; anything else is bounded
   primitive by primitive.
2. The graph is de-duplicated (common-subexpression elimination, with constants compared
   by identity, by value, or by how they were folded). When the teacher and the student
   are the same function with the same parameters, their logits become one node, so a
   specification ``z^T - z^S`` has coefficient exactly 0 and both IBP (with ``C``) and
   CROWN bound it by exactly 0.
3. IBP (Gowal et al. 2018, Eq. 6): interval arithmetic node by node; affine maps in
   centre/radius form ``mu' = W mu + b, r' = |W| r``; monotone functions ``[f(l), f(u)]``;
   unimodal ones (``gelu``, ``silu``, ``mish``, even powers) ``[f(clip(x_0, l, u)),
   max(f(l), f(u))]`` with ``x_0`` the minimiser; products of two input-dependent values
   by the interval product; max pooling ``[max l, max u]``. With a specification ``C``
   the affine tail of the graph (everything after the last nonlinearity, e.g. the
   classifier) is folded into ``C`` before concretising (the "elision of the last layer",
   Gowal et al. 2018, sec. 3): tighter than ``C`` times the output box, and exact for
   ``z^T - z^S`` of identical networks.
4. CROWN (Zhang et al. 2018, "Efficient Neural Network Robustness Certification with
   General Activation Functions", Theorem 3.2 and Corollary 3.3): a backward pass of the
   linear coefficients ``Lambda`` from ``C``. Affine nodes are transposed with
   :func:`jax.vjp` (exact for affine maps); every nonlinear node ``z = f(a)`` with input
   bounds ``[l, u]`` is replaced by two lines ``k_l a + b_l <= f(a) <= k_u a + b_u``
   (the lower where ``Lambda > 0``, the upper where ``Lambda < 0``); the input is
   concretised over the box: ``min_{x' in B} Lambda x' = sum(Lambda^+ xl + Lambda^- xu)``.
   The lines:

   * ReLU: ``u(a - l)/(u - l)`` above, ``alpha a`` below with CROWN's adaptive
     ``alpha = 1[u >= -l]`` (Zhang et al. 2018, sec. 3.2, "CROWN-Ada").
   * convex ``f`` (``exp``, ``expm1``, ``rsqrt``, even powers, ``1/a`` on ``a > 0``):
     the chord above, the tangent at the midpoint below; concave ``f`` (``log``,
     ``log1p``, ``sqrt``, ``1/a`` on ``a < 0``): the reverse. Exact lines.
   * smooth or piecewise-smooth ``f`` (``tanh``, ``logistic``, ``erf``, ``gelu``,
     ``silu``, ``softplus``, ``elu``, ``selu``, ``celu``, ``mish``, ``leaky_relu``,
     ``hard_tanh``, ``hard_silu``): slope ``k`` = the chord or the tangent at the midpoint
     (whichever line lies closer to ``f`` at the midpoint), intercepts from ``g = f - k a``
     on a grid of ``N = 17`` points of ``[l, u]`` plus ``f``'s kinks:
     ``min g - M h^2 / 8 <= g(a) <= max g + M h^2 / 8`` (``h = (u - l)/(N - 1)``, ``M``
     an upper bound on ``|f''|`` between kinks: the linear-interpolation error bound),
     so the lines are sound for any slope; auto_LiRPA instead searches tangent points,
     which is tighter by at most ``M h^2 / 8``.
   * ``a * b`` (both input-dependent): McCormick planes, e.g.
     ``a b >= l_b a + l_a b - l_a l_b`` (the plane of each pair closer at the centre).
   * max pooling (``reduce_window_max``, ``reduce_max``): below, the element with the
     largest lower bound of each window, ``max_i a_i >= a_{j*}``; above, ``a_{j*}`` when
     it dominates (``l_{j*} >= u_i`` for every other ``i``; non-overlapping windows) and
     the constant ``max_i u_i`` otherwise.
   * odd powers other than 1: concretised with their interval.

   ``intermediate="crown"`` (full CROWN) bounds the input of every nonlinear node with
   its own backward pass (identity specification over the layer) intersected with IBP;
   ``intermediate="ibp"`` uses IBP bounds there (CROWN-IBP, Zhang et al. 2020, "Towards
   Stable and Efficient Training of Verifiably Robust Neural Networks", Eq. 7): cheaper
   and the usual choice for training.

Deliberate deviations and limits:

* No outward floating-point rounding: bounds are sound up to float32 round-off (about
  ``1e-6`` relative), as in auto_LiRPA's default mode; the sampled relaxations add a
  ``1e-6`` relative margin. Casts between floating dtypes (e.g. to bfloat16) are treated
  as the identity, so their rounding is not accounted for.
* A domain violation (``log``/``sqrt``/``rsqrt``/``1/a`` over an interval reaching
  outside their domain) or any non-finite intermediate bound makes that example's bounds
  ``(-inf, inf)``: no claim rather than a NaN.
* ``fn`` must treat examples independently (eval-mode networks): it is traced on one
  example and the bound is ``vmap``-ed (or ``lax.map``-ed, see ``batch_chunk``) over the
  batch, which also makes it shardable over a ``("data",)`` mesh by sharding ``x``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.extend import core as jcore

from kdjax._checks import check_choice, check_float_array, check_nonnegative, is_concrete
from kdjax._jaxpr import inner_jaxprs

__all__ = ["ibp_bounds", "crown_bounds", "interval_box", "check_ball", "SUPPORTED"]

# Primitives inlined when flattening.
_CALL_PRIMS = {"jit", "pjit", "closed_call", "core_call", "custom_jvp_call",
               "custom_vjp_call", "custom_vjp_call_jaxpr", "remat", "checkpoint",
               "remat2", "custom_lin"}
# Affine in their (single or summed) input-dependent arguments, non-negative linear part:
# radius = f(radius) with floating constants zeroed.
_STRUCTURAL = {"reshape", "broadcast_in_dim", "reduce_sum", "transpose", "squeeze",
               "expand_dims", "slice", "convert_element_type", "copy", "copy_p",
               "reduce_window_sum", "rev", "cumsum", "dynamic_slice", "concatenate",
               "pad", "select_n"}
_ADDITIVE = {"add", "sub", "add_any", "neg"}
_MULTIPLICATIVE = {"mul", "div", "dot_general", "conv_general_dilated"}
_IDENTITY = {"stop_gradient", "optimization_barrier"}
_MAXPOOL = {"reduce_window_max", "reduce_max"}
_UNARY_PRIMS = {"tanh", "logistic", "erf", "erfc", "exp", "expm1", "log", "log1p",
                "sqrt", "rsqrt", "square", "integer_pow"}
_WHY = {  # why a refused primitive cannot be bounded (the message says it)
    "convert_element_type": "a cast to an integer/boolean dtype (quantisation): the "
                            "output jumps between values",
    "round": "rounding: piecewise constant with jumps",
    "floor": "rounding: piecewise constant with jumps",
    "ceil": "rounding: piecewise constant with jumps",
    "sign": "piecewise constant with a jump",
    "gather": "indexing with an index array",
    "scatter": "scatter", "scatter-add": "scatter", "scatter_add": "scatter",
    "argmax": "argmax", "argmin": "argmin",
    "cond": "control flow", "while": "control flow", "scan": "control flow",
    "sort": "sorting",
    **{c: "a comparison of an input-dependent value (jnp.where on x: write the "
          "function with jnp.maximum/minimum/clip or a jax.nn activation)"
       for c in ("gt", "ge", "lt", "le", "eq", "ne")},
}


# ----------------------------------------------------------- elementwise functions


@dataclasses.dataclass(frozen=True)
class _Fn:
    """An elementwise function the interpreter can bound.

    ``f(t, p)`` (``p`` its parameters, a dict of floats); ``shape``: ``"inc"``,
    ``"dec"``, ``"valley"`` (decreasing then increasing, minimum at ``x0(p)``) or
    ``"none"`` (odd powers: monotone, but handled as ``"inc"``); ``relax``: ``"smooth"``
    (grid lines, ``M(p)`` bounds ``|f''|`` between ``kinks(p)``), ``"convex"``,
    ``"concave"``, ``"reciprocal"`` or ``"none"`` (concretised in CROWN); ``domain``:
    ``(lo, hi, open)`` or None.
    """
    f: Callable
    shape: Callable
    relax: Callable
    M: Callable = lambda p: 0.0
    kinks: Callable = lambda p: ()
    x0: Callable = lambda p: 0.0
    domain: Any = None


def _const(v):
    return lambda p: v


def _leaky(t, p):
    return jnp.where(t >= 0, t, p["negative_slope"] * t)


def _elu(t, p):
    return jnp.where(t > 0, t, p["alpha"] * jnp.expm1(jnp.minimum(t, 0.0)))


def _celu(t, p):
    return jnp.where(t > 0, t, p["alpha"] * jnp.expm1(jnp.minimum(t, 0.0) / p["alpha"]))


_SELU_A, _SELU_S = 1.6732632423543772, 1.0507009873554805

_FNS: dict[str, _Fn] = {
    # x0 (minimisers) and M (5% above max |f''| on [-30, 30], measured in float64 with
    # second differences; analytic values: tanh 4/(3 sqrt 3), logistic 1/(6 sqrt 3),
    # erf 2 sqrt(2/e)/sqrt(pi), softplus 1/4, silu 1/2, gelu 2 phi(0)).
    "tanh": _Fn(lambda t, p: jnp.tanh(t), _const("inc"), _const("smooth"), _const(0.81)),
    "logistic": _Fn(lambda t, p: jax.nn.sigmoid(t), _const("inc"), _const("smooth"),
                    _const(0.102)),
    "erf": _Fn(lambda t, p: lax.erf(t), _const("inc"), _const("smooth"), _const(1.02)),
    "erfc": _Fn(lambda t, p: lax.erfc(t), _const("dec"), _const("smooth"), _const(1.02)),
    "softplus": _Fn(lambda t, p: jax.nn.softplus(t), _const("inc"), _const("smooth"),
                    _const(0.27)),
    "silu": _Fn(lambda t, p: jax.nn.silu(t), _const("valley"), _const("smooth"),
                _const(0.53), x0=_const(-1.2784645614377839)),
    "gelu": _Fn(lambda t, p: jax.nn.gelu(t, approximate=True), _const("valley"),
                _const("smooth"), _const(0.84), x0=_const(-0.7524614257680738)),
    "gelu_erf": _Fn(lambda t, p: jax.nn.gelu(t, approximate=False), _const("valley"),
                    _const("smooth"), _const(0.84), x0=_const(-0.7517915280333438)),
    "mish": _Fn(lambda t, p: jax.nn.mish(t), _const("valley"), _const("smooth"),
                _const(0.68), x0=_const(-1.1924312165055273)),
    "elu": _Fn(_elu, lambda p: "inc" if p["alpha"] >= 0 else "valley", _const("smooth"),
               lambda p: abs(p["alpha"]), _const((0.0,))),
    "celu": _Fn(_celu, _const("inc"), _const("smooth"), lambda p: 1.0 / abs(p["alpha"]),
                _const((0.0,))),
    "selu": _Fn(lambda t, p: jax.nn.selu(t), _const("inc"), _const("smooth"),
                _const(_SELU_A * _SELU_S * 1.0001), _const((0.0,))),
    "leaky_relu": _Fn(_leaky, lambda p: "inc" if p["negative_slope"] >= 0 else "valley",
                      _const("smooth"), _const(0.0), _const((0.0,))),
    "hard_tanh": _Fn(lambda t, p: jnp.clip(t, -1.0, 1.0), _const("inc"), _const("smooth"),
                     _const(0.0), _const((-1.0, 1.0))),
    "hard_silu": _Fn(lambda t, p: jax.nn.hard_silu(t), _const("valley"), _const("smooth"),
                     _const(1.0 / 3.0 + 1e-6), _const((-3.0, 3.0)), x0=_const(-1.5)),
    "exp": _Fn(lambda t, p: jnp.exp(t), _const("inc"), _const("convex")),
    "expm1": _Fn(lambda t, p: jnp.expm1(t), _const("inc"), _const("convex")),
    "log": _Fn(lambda t, p: jnp.log(t), _const("inc"), _const("concave"),
               domain=(0.0, math.inf, True)),
    "log1p": _Fn(lambda t, p: jnp.log1p(t), _const("inc"), _const("concave"),
                 domain=(-1.0, math.inf, True)),
    "sqrt": _Fn(lambda t, p: jnp.sqrt(t), _const("inc"), _const("concave"),
                domain=(0.0, math.inf, False)),
    "rsqrt": _Fn(lambda t, p: lax.rsqrt(t), _const("dec"), _const("convex"),
                 domain=(0.0, math.inf, True)),
    "reciprocal": _Fn(lambda t, p: 1.0 / t, _const("dec"), _const("reciprocal")),
    "pow": _Fn(lambda t, p: lax.integer_pow(t, int(p["y"])),
               lambda p: "valley" if int(p["y"]) % 2 == 0 else "inc",
               lambda p: "convex" if int(p["y"]) % 2 == 0 else "none"),
}
_JIT_ACTS = {  # jit name -> (reference, kdjax function name, names of constant args)
    "silu": (jax.nn.silu, "silu", ()),
    "softplus": (jax.nn.softplus, "softplus", ()),
    "elu": (jax.nn.elu, "elu", ("alpha",)),
    "celu": (jax.nn.celu, "celu", ("alpha",)),
    "selu": (jax.nn.selu, "selu", ()),
    "leaky_relu": (jax.nn.leaky_relu, "leaky_relu", ("negative_slope",)),
    "hard_tanh": (jax.nn.hard_tanh, "hard_tanh", ()),
    "mish": (jax.nn.mish, "mish", ()),
    "hard_silu": (jax.nn.hard_silu, "hard_silu", ()),
}
_GRAPH_ACTS = {  # matched on the flattened graph (JAX inlines them)
    "gelu": lambda t: jax.nn.gelu(t, approximate=True),
    "gelu_erf": lambda t: jax.nn.gelu(t, approximate=False),
}
SUPPORTED = tuple(sorted(_STRUCTURAL | _ADDITIVE | _MULTIPLICATIVE | _IDENTITY | _MAXPOOL
                         | _UNARY_PRIMS | {"max", "min", "abs", "clamp"}))
_ACTIVATIONS = ("relu", "relu6", "hard_sigmoid", *sorted(set(_JIT_ACTS) | set(_GRAPH_ACTS)
                                                         | {"tanh", "sigmoid"}))


# --------------------------------------------------------------------------- graph


@dataclasses.dataclass(frozen=True)
class _C:
    """A constant (independent of ``x``) with a structural key for CSE."""
    value: Any
    key: Any


@dataclasses.dataclass
class _Node:
    kind: str            # "input" | "affine" | "relu" | "unary" | "mul" | "max"
    prim: Any            # jax primitive (affine, max) or None
    params: dict         # unary: {"fn": name, **float parameters}
    args: tuple          # ints (node ids) or _C
    shape: tuple
    dtype: Any
    bias: Any = None     # affine: f(0) (constant), None when 0
    layer: str = ""


_NONLINEAR = ("relu", "unary", "mul", "max")


class _Graph:
    """Flattened, constant-folded, de-duplicated graph of ``fn`` on one example."""

    def __init__(self, match_activations: bool = True):
        self.nodes: list[_Node] = []
        self._cse: dict[Any, int] = {}
        self._const_cache: dict[Any, _C] = {}
        self._keep_alive: list[Any] = []
        self.output: Any = None  # node id or _C
        self.match_activations = match_activations

    # -- constants
    def const(self, value) -> _C:
        if isinstance(value, _C):
            return value
        if is_concrete(value):
            arr = np.asarray(value)
            if arr.size <= 16:
                key = ("v", arr.shape, str(arr.dtype), arr.tobytes())
            else:
                key = ("v", arr.shape, str(arr.dtype),
                       hashlib.blake2b(np.ascontiguousarray(arr).tobytes(),
                                       digest_size=16).hexdigest())
        else:
            self._keep_alive.append(value)
            key = ("t", id(value))
        return _C(value, key)

    def fold(self, prim, params, args) -> list[_C]:
        key = ("fold", prim.name, _params_key(params), tuple(a.key for a in args))
        if key in self._const_cache:
            return self._const_cache[key]
        out = prim.bind(*[a.value for a in args], **params)
        outs = list(out) if prim.multiple_results else [out]
        res = [_C(o, (key, i)) for i, o in enumerate(outs)]
        self._const_cache[key] = res
        return res

    def add(self, kind, prim, params, args, shape, dtype, layer="") -> int:
        key = (kind, getattr(prim, "name", None), _params_key(params),
               tuple(("n", a) if isinstance(a, int) else a.key for a in args))
        if key in self._cse:
            return self._cse[key]
        bias = None
        if kind == "affine":
            bias = _affine_bias(prim, params, args, [self.nodes[a] if isinstance(a, int)
                                                     else None for a in args])
        self.nodes.append(_Node(kind, prim, params, tuple(args), tuple(shape), dtype,
                                bias, layer))
        idx = len(self.nodes) - 1
        self._cse[key] = idx
        if self.match_activations and kind in ("mul", "affine"):
            act = _match_graph_activation(self, idx)
            if act is not None:
                self._cse[key] = act
                return act
        return idx

    def unary(self, fn: str, arg: int, layer="", **p) -> int:
        a = self.nodes[arg]
        return self.add("unary", None, {"fn": fn, **p}, (arg,), a.shape, a.dtype, layer)


def _params_key(params: dict):
    items = []
    for k in sorted(params):
        v = params[k]
        try:
            hash(v)
            items.append((k, v))
        except TypeError:
            items.append((k, ("id", id(v))))
    return tuple(items)


def _zeros_like_node(node: _Node):
    return jnp.zeros(node.shape, node.dtype)


def _affine_bias(prim, params, args, nodes):
    """``f(0)`` of an affine equation when it can be non-zero, else ``None``."""
    name = prim.name
    if name in ("add", "sub"):
        consts = [a for a in args if isinstance(a, _C)]
        if not consts:
            return None
    elif name in ("concatenate", "pad", "select_n"):
        if not any(isinstance(a, _C) and jnp.issubdtype(jnp.result_type(a.value),
                                                        jnp.floating) for a in args):
            return None
    else:
        return None
    vals = [a.value if isinstance(a, _C) else _zeros_like_node(n)
            for a, n in zip(args, nodes)]
    return prim.bind(*vals, **params)


# ------------------------------------------------------------ activation matching


@functools.lru_cache(maxsize=None)
def _reference_graph(name: str, shape: tuple, dtype: str) -> _Graph:
    return _build_graph(_GRAPH_ACTS[name], jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)),
                        match_activations=False)


def _same(g: _Graph, i: int, r: _Graph, j: int, bind: dict) -> bool:
    """Does node ``i`` of ``g`` compute what node ``j`` of the reference ``r`` computes,
    with ``r``'s input bound to one node of ``g`` (``bind["x"]``)?"""
    if j == 0:
        return g.nodes[i].shape == r.nodes[0].shape and bind.setdefault("x", i) == i
    n, m = g.nodes[i], r.nodes[j]
    if (n.kind, getattr(n.prim, "name", None), _params_key(n.params), len(n.args),
            n.shape) != (m.kind, getattr(m.prim, "name", None), _params_key(m.params),
                         len(m.args), m.shape):
        return False
    for a, b in zip(n.args, m.args):
        if isinstance(b, _C):
            if not isinstance(a, _C) or a.key != b.key:
                return False
        elif not isinstance(a, int) or not _same(g, a, r, b, bind):
            return False
    return True


def _match_graph_activation(g: _Graph, idx: int):
    node = g.nodes[idx]
    if not jnp.issubdtype(node.dtype, jnp.floating):
        return None
    for name in _GRAPH_ACTS:
        r = _reference_graph(name, node.shape, str(jnp.dtype(node.dtype)))
        if not isinstance(r.output, int) or r.nodes[r.output].kind != node.kind:
            continue
        bind: dict = {}
        if _same(g, idx, r, r.output, bind) and "x" in bind:
            return g.unary(name, bind["x"], node.layer)
    return None


@functools.lru_cache(maxsize=None)
def _reference_jit(name: str, avals: tuple) -> str | None:
    ref = _JIT_ACTS[name][0]
    args = [jax.ShapeDtypeStruct(s, jnp.dtype(d)) for s, d in avals]
    try:
        closed = jax.make_jaxpr(ref)(*args)
    except Exception:  # noqa: BLE001 - a signature JAX's function does not take
        return None
    eqns = closed.jaxpr.eqns
    if len(eqns) != 1 or eqns[0].params.get("name") != name:
        return None
    return str(inner_jaxprs(eqns[0])[0])


def _jit_activation(g: _Graph, eqn, ins, layer):
    """The unary node of a recognised ``jax.nn`` activation, else None: a ``jit`` of
    that name whose inner jaxpr equals the one JAX's own function traces to (with its
    constant parameters as arguments, or baked in at their defaults)."""
    name = eqn.params.get("name")
    if name not in _JIT_ACTS or not ins or not isinstance(ins[0], int):
        return None
    _, fn, const_names = _JIT_ACTS[name]
    extra = ins[1:]
    if len(extra) not in (0, len(const_names)) or not all(
            isinstance(a, _C) and is_concrete(a.value) and np.size(a.value) == 1
            for a in extra):
        return None
    if not all(jnp.issubdtype(v.aval.dtype, jnp.floating) for v in eqn.invars):
        return None
    avals = tuple((tuple(v.aval.shape), str(v.aval.dtype)) for v in eqn.invars)
    ref = _reference_jit(name, avals)
    subs = inner_jaxprs(eqn)
    if ref is None or not subs or str(subs[0]) != ref:
        return None
    if extra:
        p = dict(zip(const_names, (float(np.asarray(a.value)) for a in extra)))
    else:
        p = {k: _JIT_DEFAULTS[k] for k in const_names}
    return g.unary(fn, ins[0], layer, **p)


_JIT_DEFAULTS = {"alpha": 1.0, "negative_slope": 0.01}


# ------------------------------------------------------------------ flattening


def _frame(eqn) -> str:
    """``file:line`` of the innermost frame outside jax/flax/kdjax, if any."""
    try:
        frames = eqn.source_info.traceback.frames
    except Exception:  # noqa: BLE001 - no traceback recorded
        return ""
    skip = ("/jax/", "/jaxlib/", "/flax/", "/kdjax/faithful/", "/chex/")
    for fr in frames:
        if not any(s in fr.file_name for s in skip):
            return f"{fr.file_name}:{fr.line_num}"
    return ""


def _where(eqn, scope) -> str:
    prefix, calls = scope
    try:
        inner = str(eqn.source_info.name_stack)
    except Exception:  # noqa: BLE001
        inner = ""
    path = "/".join(p for p in (prefix, inner) if p)
    out = f"layer '{path or '<top level>'}'"
    if calls:
        out += " inside " + " > ".join(f"'{c}'" for c in calls)
    frame = _frame(eqn)
    return out + (f" at {frame}" if frame else "")


def _unsupported(name: str, eqn, scope, why: str = "") -> NotImplementedError:
    why = why or _WHY.get(name, "")
    calls = scope[1]
    act = next((c for c in reversed(calls) if c in _ACTIVATIONS or c in _FNS), None)
    what = f"activation '{act}' (primitive '{name}')" if act else f"primitive '{name}'"
    return NotImplementedError(
        f"bound propagation cannot bound {what}{': ' + why if why else ''}, in "
        f"{_where(eqn, scope)}. Supported activations: {', '.join(_ACTIVATIONS)}; "
        f"primitives: {', '.join(SUPPORTED)}.")


def _build_graph(fn: Callable, x_one, match_activations: bool = True) -> _Graph:
    closed = jax.make_jaxpr(fn)(x_one)  # x_one: a ShapeDtypeStruct of one example
    g = _Graph(match_activations)
    g.nodes.append(_Node("input", None, {}, (), tuple(x_one.shape), x_one.dtype))
    env_in = [g.const(c) for c in closed.consts]
    outs = _flatten(g, closed.jaxpr, env_in, [0], ("", ()))
    g.output = outs[0]
    return g


def _read(g: _Graph, env, v):
    if isinstance(v, jcore.Literal):
        return g.const(v.val)
    return env[v]


def _flatten(g: _Graph, jaxpr, consts, args, scope):
    env = {}
    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for eqn in jaxpr.eqns:
        ins = [_read(g, env, v) for v in eqn.invars]
        outs = _flatten_eqn(g, eqn, ins, scope)
        for v, o in zip(eqn.outvars, outs):
            env[v] = o
    return [_read(g, env, v) for v in jaxpr.outvars]


def _sub_jaxpr(params):
    for k in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if k in params:
            j = params[k]
            if isinstance(j, jcore.ClosedJaxpr):
                return j.jaxpr, list(j.consts)
            if isinstance(j, jcore.Jaxpr):
                return j, []
    return None


def _flatten_eqn(g: _Graph, eqn, ins, scope):
    prim, params, name = eqn.primitive, eqn.params, eqn.primitive.name
    if name in _IDENTITY:  # also on constants: stop_gradient(params) keeps their CSE key
        return [ins[0]]
    if all(isinstance(a, _C) for a in ins):
        return g.fold(prim, params, ins)
    where = _where(eqn, scope)
    if name in _CALL_PRIMS:
        act = _jit_activation(g, eqn, ins, where)
        if act is not None:
            return [act]
        sub = _sub_jaxpr(params)
        if sub is None:
            raise _unsupported(name, eqn, scope, "call without an inner jaxpr")
        jaxpr, consts = sub
        try:
            here = str(eqn.source_info.name_stack)
        except Exception:  # noqa: BLE001
            here = ""
        call = params.get("name") or name
        inner = ("/".join(p for p in (scope[0], here) if p), scope[1] + (str(call),))
        return _flatten(g, jaxpr, [g.const(c) for c in consts], ins, inner)
    if prim.multiple_results:
        raise _unsupported(name, eqn, scope, "multiple results")
    out_aval = eqn.outvars[0].aval
    shape, dtype = out_aval.shape, out_aval.dtype
    var = [isinstance(a, int) for a in ins]
    floating = jnp.issubdtype(dtype, jnp.floating)
    if not floating:
        raise _unsupported(name, eqn, scope, _WHY.get(name) or
                           f"an input-dependent value of dtype {dtype}")

    def affine():
        return [g.add("affine", prim, params, ins, shape, dtype, where)]

    if name in _STRUCTURAL or name in _ADDITIVE:
        if name == "select_n" and var[0]:
            raise _unsupported(name, eqn, scope, "input-dependent predicate")
        if name == "dynamic_slice" and any(var[1:]):
            raise _unsupported(name, eqn, scope, "input-dependent indices")
        return affine()
    if name == "mul":
        if all(var):
            if ins[0] == ins[1]:
                return [g.unary("pow", ins[0], where, y=2.0)]
            return [g.add("mul", None, {}, ins, shape, dtype, where)]
        return affine()
    if name == "div":
        if var[1]:
            recip = g.unary("reciprocal", ins[1], where)
            if var[0]:
                return [g.add("mul", None, {}, (ins[0], recip), shape, dtype, where)]
            return [g.add("affine", jcore.primitives.mul_p, {}, (ins[0], recip), shape,
                          dtype, where)]
        return affine()
    if name == "dot_general":
        if all(var):
            raise _unsupported(name, eqn, scope, "product of two input-dependent operands")
        return affine()
    if name == "conv_general_dilated":
        if var[1]:
            raise _unsupported(name, eqn, scope, "input-dependent kernel")
        return affine()
    if name in _MAXPOOL:
        return [g.add("max", prim, params, ins, shape, dtype, where)]
    if name in _UNARY_PRIMS:
        if name == "integer_pow":
            y = int(params["y"])
            if y < 1:
                raise _unsupported(name, eqn, scope, f"negative or zero power y={y}")
            if y == 1:
                return [ins[0]]
            return [g.unary("pow", ins[0], where, y=float(y))]
        if name == "square":
            return [g.unary("pow", ins[0], where, y=2.0)]
        if params and any(v is not None for k, v in params.items() if k == "accuracy"):
            raise _unsupported(name, eqn, scope, "a reduced-accuracy variant")
        return [g.unary(name, ins[0], where)]
    if name in ("max", "min", "abs", "clamp"):
        return [_rewrite_piecewise(g, eqn, ins, shape, dtype, where, scope)]
    raise _unsupported(name, eqn, scope)


def _rewrite_piecewise(g: _Graph, eqn, ins, shape, dtype, layer, scope):
    """``max``/``min``/``abs``/``clamp`` as ReLUs plus affine maps (exact rewrites)."""
    lp = jax.extend.core.primitives
    add_p, sub_p, neg_p = lp.add_p, lp.sub_p, lp.neg_p
    name = eqn.primitive.name

    def full(a):  # broadcast a constant to the output shape
        if isinstance(a, int):
            return a
        return g.const(jnp.broadcast_to(jnp.asarray(a.value, dtype), shape)) \
            if np.shape(a.value) != tuple(shape) else a

    def is_zero(a):
        return isinstance(a, _C) and is_concrete(a.value) and not np.any(np.asarray(a.value))

    def aff(p, args):
        return g.add("affine", p, {}, tuple(args), shape, dtype, layer)

    def relu(a):
        return g.add("relu", None, {}, (a,), shape, dtype, layer)

    def relu_of_diff(a, b):  # relu(a - b)
        if is_zero(b):
            return relu(full(a))
        return relu(aff(sub_p, (full(a), full(b))))

    def plus(a, b):
        return full(a) if is_zero(b) else aff(add_p, (full(a), full(b)))

    def minus(a, b):
        return aff(sub_p, (full(a), full(b)))

    if name == "abs":
        (a,) = ins
        return aff(add_p, (relu(a), relu(aff(neg_p, (a,)))))
    if name == "max":
        a, b = ins
        if not isinstance(a, int):
            a, b = b, a
        return plus(relu_of_diff(a, b), b) if isinstance(b, _C) else \
            aff(add_p, (a, relu_of_diff(b, a)))
    if name == "min":  # min(a, b) = a - relu(a - b)
        a, b = ins
        if not isinstance(a, int):
            a, b = b, a
        return minus(a, relu_of_diff(a, b))
    # clamp(lo, x, hi) = min(max(x, lo), hi)
    lo, x, hi = ins
    if not isinstance(x, int) or isinstance(lo, int) or isinstance(hi, int):
        raise _unsupported(name, eqn, scope, "only clamp(const, x, const)")
    m = plus(relu_of_diff(x, lo), lo)
    return minus(m, relu_of_diff(m, hi))



# -------------------------------------------------------------------------- forward


def _eval_affine(node: _Node, vals, *, radius=False):
    """``f(vals)`` (``radius=False``) or ``|L| vals`` for radii (``radius=True``)."""
    name = node.prim.name
    if not radius:
        args = [vals[a] if isinstance(a, int) else a.value for a in node.args]
        return node.prim.bind(*args, **node.params)
    if name in ("add", "sub", "add_any"):
        rs = [vals[a] for a in node.args if isinstance(a, int)]
        out = rs[0] if len(rs) == 1 else rs[0] + rs[1]
        return jnp.broadcast_to(out, node.shape)
    if name == "neg":
        return vals[node.args[0]]
    if name in _MULTIPLICATIVE:
        args = [vals[a] if isinstance(a, int) else jnp.abs(a.value) for a in node.args]
        return node.prim.bind(*args, **node.params)
    # structural: non-negative linear part; zero the floating constants (data), keep
    # integer/bool ones (indices, predicates).
    args = []
    for a in node.args:
        if isinstance(a, int):
            args.append(vals[a])
        elif jnp.issubdtype(jnp.result_type(a.value), jnp.floating):
            args.append(jnp.zeros(np.shape(a.value), jnp.result_type(a.value)))
        else:
            args.append(a.value)
    return node.prim.bind(*args, **node.params)


def _fn_of(node: _Node):
    p = {k: v for k, v in node.params.items() if k != "fn"}
    spec = _FNS[node.params["fn"]]
    return spec, p, (lambda t: spec.f(t, p))


def _in_domain(name, spec, l, u):
    if name == "reciprocal":
        return (l > 0) | (u < 0)
    if spec.domain is None:
        return jnp.ones_like(l, dtype=bool)
    lo, _, open_ = spec.domain
    return l > lo if open_ else l >= lo


def _unary_ibp(node: _Node, l, u):
    spec, p, f = _fn_of(node)
    fl, fu = f(l), f(u)
    shape = spec.shape(p)
    if shape == "dec":
        lo, hi = fu, fl
    elif shape == "valley":
        lo = jnp.minimum(jnp.minimum(fl, fu), f(jnp.clip(spec.x0(p), l, u)))
        hi = jnp.maximum(fl, fu)
    else:
        lo, hi = fl, fu
    ok = _in_domain(node.params["fn"], spec, l, u)
    return jnp.where(ok, lo, jnp.nan), jnp.where(ok, hi, jnp.nan)


def _mul_ibp(lx, ux, ly, uy):
    c = jnp.stack([lx * ly, lx * uy, ux * ly, ux * uy])
    return jnp.min(c, axis=0), jnp.max(c, axis=0)


def _live(g: _Graph) -> list[int]:
    live, todo = set(), [g.output] if isinstance(g.output, int) else []
    while todo:
        i = todo.pop()
        if i in live:
            continue
        live.add(i)
        todo.extend(a for a in g.nodes[i].args if isinstance(a, int))
    return sorted(live)


def _forward_ibp(g: _Graph, lo, hi, live, tighten=None):
    """Interval bounds of every live node (in order); ``tighten(a, lows, highs)`` may
    refine (in place) the bounds of an input of a nonlinear node (full CROWN)."""
    lows, highs = {0: lo}, {0: hi}
    for i in live:
        if i == 0:
            continue
        node = g.nodes[i]
        var = [a for a in node.args if isinstance(a, int)]
        if node.kind == "affine":
            mids = {a: (lows[a] + highs[a]) / 2 for a in var}
            rads = {a: (highs[a] - lows[a]) / 2 for a in var}
            mid = _eval_affine(node, mids)
            rad = _eval_affine(node, rads, radius=True)
            lows[i], highs[i] = mid - rad, mid + rad
            continue
        if tighten is not None:
            for a in var:
                tighten(a, lows, highs)
        a = node.args[0]
        la, ua = lows[a], highs[a]
        if node.kind == "relu":
            lows[i], highs[i] = jnp.maximum(la, 0), jnp.maximum(ua, 0)
        elif node.kind == "unary":
            lows[i], highs[i] = _unary_ibp(node, la, ua)
        elif node.kind == "mul":
            b = node.args[1]
            lows[i], highs[i] = _mul_ibp(la, ua, lows[b], highs[b])
        else:  # max pooling: monotone
            lows[i] = node.prim.bind(la, **node.params)
            highs[i] = node.prim.bind(ua, **node.params)
    return lows, highs


# ------------------------------------------------------------------ relaxations

_GRID = 17


def _unary_lines(node: _Node, l, u):
    """``(k_l, b_l, k_u, b_u)`` with ``k_l a + b_l <= f(a) <= k_u a + b_u`` on ``[l, u]``,
    or None (concretise)."""
    spec, p, f = _fn_of(node)
    kind = spec.relax(p)
    if kind == "none":
        return None
    m, w = (l + u) / 2, u - l
    dm = jax.grad(lambda t: jnp.sum(f(t)))(m)
    fl, fu, fm = f(l), f(u), f(m)
    wide = w > 0
    chord = jnp.where(wide, (fu - fl) / jnp.where(wide, w, 1.0), dm)
    # The tangent and secant are exact lines of f in real arithmetic; in floating point
    # their intercepts carry rounding errors of the order of eps times the magnitudes
    # involved (|f| at the points that define the line and |k| max(|l|, |u|)), which
    # near a zero of f exceed |f| itself (x^4 on [-9, 3]: a chord of ~1e4 units
    # evaluated where f ~ 1e-3).
    # Each intercept is pushed outward by a multiple of that error, so the line is
    # sound as evaluated, not only in exact arithmetic.
    eps = 16 * jnp.finfo(l.dtype).eps
    reach = jnp.maximum(jnp.abs(l), jnp.abs(u))
    t_slack = eps * (jnp.abs(fm) + jnp.abs(dm) * reach)
    s_slack = eps * (jnp.abs(fl) + jnp.abs(fu) + jnp.abs(chord) * reach)
    tangent_lo, tangent_hi = (dm, fm - dm * m - t_slack), (dm, fm - dm * m + t_slack)
    secant_lo, secant_hi = (chord, fl - chord * l - s_slack), (chord, fl - chord * l + s_slack)
    if kind == "reciprocal":
        kind_convex = l > 0
        kl = jnp.where(kind_convex, tangent_lo[0], secant_lo[0])
        bl = jnp.where(kind_convex, tangent_lo[1], secant_lo[1])
        ku = jnp.where(kind_convex, secant_hi[0], tangent_hi[0])
        bu = jnp.where(kind_convex, secant_hi[1], tangent_hi[1])
        return kl, bl, ku, bu
    if kind == "convex":
        return (*tangent_lo, *secant_hi)
    if kind == "concave":
        return (*secant_lo, *tangent_hi)
    # smooth: intercepts of g = f - k a from a grid plus the kinks, widened by the
    # interpolation error M h^2 / 8 (|g''| = |f''| <= M between consecutive points).
    frac = jnp.linspace(0.0, 1.0, _GRID, dtype=l.dtype)
    t = l[..., None] + w[..., None] * frac
    kinks = spec.kinks(p)
    if kinks:
        t = jnp.concatenate([t, jnp.clip(jnp.asarray(kinks, l.dtype), l[..., None],
                                         u[..., None])], axis=-1)
    ft = f(t)
    err = spec.M(p) * (w / (_GRID - 1)) ** 2 / 8

    def intercepts(k):
        gv = ft - k[..., None] * t
        slack = 1e-6 * (1.0 + jnp.max(jnp.abs(gv), axis=-1))
        return jnp.min(gv, axis=-1) - err - slack, jnp.max(gv, axis=-1) + err + slack

    (bl1, bu1), (bl2, bu2) = intercepts(chord), intercepts(dm)
    low1 = chord * m + bl1 >= dm * m + bl2
    up1 = chord * m + bu1 <= dm * m + bu2
    return (jnp.where(low1, chord, dm), jnp.where(low1, bl1, bl2),
            jnp.where(up1, chord, dm), jnp.where(up1, bu1, bu2))


def _mul_planes(lx, ux, ly, uy):
    """McCormick planes of ``x y`` on the box, averaged pairwise:
    ``(ax_l, ay_l, c_l, ax_u, ay_u, c_u)`` with
    ``ax_l x + ay_l y + c_l <= x y <= ax_u x + ay_u y + c_u``.

    Each pair of planes (``x y >= l_y x + l_x y - l_x l_y`` and
    ``x y >= u_y x + u_x y - u_x u_y``; above ``u_y x + l_x y - l_x u_y`` and
    ``l_y x + u_x y - u_x l_y``) ties at the centre of the box, so picking one by value
    would depend on rounding; their average is a valid plane too and needs no choice."""
    mx, my = (lx + ux) / 2, (ly + uy) / 2
    return my, mx, -(lx * ly + ux * uy) / 2, my, mx, -(lx * uy + ux * ly) / 2


def _disjoint_windows(node: _Node) -> bool:
    if node.prim.name == "reduce_max":
        return True
    p = node.params
    return (all(tuple(pd) == (0, 0) for pd in p["padding"])
            and all(d == 1 for d in p["base_dilation"])
            and all(d == 1 for d in p["window_dilation"])
            and tuple(p["window_strides"]) == tuple(p["window_dimensions"]))


def _max_lines(node: _Node, la, ua):
    """``(select_vjp, dominant)``: ``select_vjp`` transposes ``a -> a_{j*}`` (``j*`` the
    element of each window with the largest lower bound, via the vjp of the max at the
    lower bounds); ``dominant`` (float 0/1) where ``a_{j*}`` is also an upper line."""
    f = lambda v: node.prim.bind(v, **node.params)  # noqa: E731
    _, vjp = jax.vjp(f, la)
    dominant = jnp.zeros(node.shape, la.dtype)
    if _disjoint_windows(node):
        mask = vjp(jnp.ones(node.shape, la.dtype))[0]
        u_other = f(jnp.where(mask == 1.0, -jnp.inf, ua))
        dominant = (f(la) >= u_other).astype(la.dtype)
    return vjp, dominant


def _lines(g: _Graph, i: int, lows, highs, cache):
    if i not in cache:
        cache[i] = _compute_lines(g, i, lows, highs)
    return cache[i]


def _compute_lines(g: _Graph, i: int, lows, highs):
    """The relaxation of node ``i``, behind an optimisation barrier: a slope and its
    intercept are chosen together from one comparison, and XLA must not recompute that
    comparison separately for each of them (a rounding tie could then pair the slope of
    one line with the intercept of another: seen with a tie-breaking McCormick choice)."""
    node = g.nodes[i]
    a = node.args[0]
    if node.kind == "max":
        vjp, dominant = _max_lines(node, *lax.optimization_barrier((lows[a], highs[a])))
        return vjp, lax.optimization_barrier(dominant)
    if node.kind == "relu":
        l, u = lows[a], highs[a]
        unstable = (l < 0) & (u > 0)
        denom = jnp.where(unstable, u - l, 1.0)
        slope_up = jnp.where(unstable, u / denom, (l >= 0).astype(l.dtype))
        icpt_up = jnp.where(unstable, -l * u / denom, 0.0)
        alpha = jnp.where(unstable, (u >= -l).astype(l.dtype), (l >= 0).astype(l.dtype))
        lines = (alpha, jnp.zeros_like(l), slope_up, icpt_up)
    elif node.kind == "unary":
        lines = _unary_lines(node, lows[a], highs[a])
    else:
        b = node.args[1]
        lines = _mul_planes(lows[a], highs[a], lows[b], highs[b])
    return None if lines is None else lax.optimization_barrier(lines)


# ------------------------------------------------------------------------- backward


def _backward(g: _Graph, target: int, lam, lows, highs, xl, xu, *, relax: bool,
              cache=None):
    """Lower bound of ``sum(lam * node_target)`` per row of ``lam`` (``[S, *shape]``).

    ``relax=True``: CROWN (nonlinear nodes linearly relaxed with the bounds in
    ``lows``/``highs`` of their inputs; the relaxation lines are cached in ``cache``).
    ``relax=False``: every nonlinear node is concretised with its interval (IBP with the
    affine tail folded into the specification).
    """
    s = lam.shape[0]
    coeffs = {target: lam}
    bias = jnp.zeros((s,), lam.dtype)
    cache = {} if cache is None else cache

    def acc(i, a):
        coeffs[i] = coeffs[i] + a if i in coeffs else a

    def dot(a, b):  # sum over all but the spec axis, b broadcast to a's trailing shape
        return jnp.sum((a * b).reshape(s, -1), axis=1)

    for i in range(target, 0, -1):
        if i not in coeffs:
            continue
        node, lam_i = g.nodes[i], coeffs.pop(i)
        if node.kind == "affine":
            if node.bias is not None:
                bias = bias + dot(lam_i, node.bias)
            var_idx = [k for k, a in enumerate(node.args) if isinstance(a, int)]

            def f(*vs, node=node, var_idx=var_idx):
                args = [a.value if isinstance(a, _C) else None for a in node.args]
                for k, v in zip(var_idx, vs):
                    args[k] = v
                return node.prim.bind(*args, **node.params)

            zeros = [jnp.zeros(g.nodes[node.args[k]].shape, g.nodes[node.args[k]].dtype)
                     for k in var_idx]
            _, vjp = jax.vjp(f, *zeros)
            cts = jax.vmap(vjp)(lam_i.astype(node.dtype))
            for k, ct in zip(var_idx, cts):
                acc(node.args[k], ct.astype(lam.dtype))
            continue
        lines = _lines(g, i, lows, highs, cache) if relax else None
        pos, neg = jnp.maximum(lam_i, 0), jnp.minimum(lam_i, 0)
        if lines is None:  # concretise with the node's interval
            bias = bias + dot(pos, lows[i]) + dot(neg, highs[i])
        elif node.kind in ("relu", "unary"):
            kl, bl, ku, bu = lines
            bias = bias + dot(pos, bl) + dot(neg, bu)
            acc(node.args[0], pos * kl + neg * ku)
        elif node.kind == "mul":
            axl, ayl, cl, axu, ayu, cu = lines
            bias = bias + dot(pos, cl) + dot(neg, cu)
            acc(node.args[0], pos * axl + neg * axu)
            acc(node.args[1], pos * ayl + neg * ayu)
        else:  # max pooling
            vjp, dominant = lines
            bias = bias + dot(neg * (1.0 - dominant), highs[i])
            (ct,) = jax.vmap(vjp)((pos + neg * dominant).astype(node.dtype))
            acc(node.args[0], ct.astype(lam.dtype))
    if 0 in coeffs:
        lam0 = coeffs.pop(0)
        bias = bias + dot(jnp.maximum(lam0, 0), xl) + dot(jnp.minimum(lam0, 0), xu)
    return bias


def _spec_bounds(g: _Graph, target: int, spec, lows, highs, xl, xu, relax, cache=None):
    """``(lower, upper)`` of ``spec @ flat(node_target)``; ``spec`` is ``[S, n]``."""
    shape = g.nodes[target].shape
    lam = jnp.concatenate([spec, -spec], axis=0).reshape((-1,) + shape)
    res = _backward(g, target, lam, lows, highs, xl, xu, relax=relax, cache=cache)
    s = spec.shape[0]
    return res[:s] + 0.0, 0.0 - res[s:]  # (+ 0.0: no negative zeros)


def _optimised_slopes(g: _Graph, target: int, spec, lows, highs, xl, xu, cache, init,
                      steps: int, lr: float):
    """alpha-CROWN on the final specification: ``(lower, upper)`` of ``spec @ node_target``
    with the lower slope of every unstable ReLU a free ``alpha in [0, 1]`` per row of the
    specification, maximised by projected Adam (``steps``, learning rate ``lr`` decayed by
    0.98 a step) from CROWN-Ada's slopes; the best bound of every row over the iterates
    (``init``, CROWN's, included) is kept. Any ``alpha in [0, 1]`` gives a sound line, so
    every iterate is a sound bound. Intermediate bounds stay those of ``lows``/``highs``."""
    relus = [i for i in sorted(cache) if g.nodes[i].kind == "relu" and cache[i] is not None]
    s = spec.shape[0]
    if not relus:
        return init
    shape = g.nodes[target].shape
    lam = jnp.concatenate([spec, -spec], axis=0).reshape((-1,) + shape)
    unstable = [(lows[g.nodes[i].args[0]] < 0) & (highs[g.nodes[i].args[0]] > 0)
                for i in relus]

    def bound(alphas):  # lower bounds of the 2S rows of lam . z, [2S]
        lines = dict(cache)
        for i, a, m in zip(relus, alphas, unstable):
            kl, bl, ku, bu = cache[i]
            lines[i] = (jnp.where(m, a, kl), bl, ku, bu)
        return _backward(g, target, lam, lows, highs, xl, xu, relax=True, cache=lines)

    tx = optax.adam(optax.exponential_decay(lr, transition_steps=1, decay_rate=0.98))
    alphas = [jnp.broadcast_to(cache[i][0], (2 * s,) + cache[i][0].shape) for i in relus]
    best = jnp.concatenate([init[0], -init[1]])

    def objective(alphas):  # (sum of the rows' bounds, the rows)
        rows = bound(alphas)
        return jnp.sum(rows), rows

    def step(carry, _):  # one backward pass: the bound of the iterate and its gradient
        alphas, opt, best = carry
        grad, rows = jax.grad(objective, has_aux=True)(alphas)
        updates, opt = tx.update([-gr for gr in grad], opt, alphas)
        alphas = [jnp.clip(a, 0.0, 1.0) for a in optax.apply_updates(alphas, updates)]
        return (alphas, opt, jnp.maximum(best, rows)), None

    (alphas, _, best), _ = lax.scan(step, (alphas, tx.init(alphas), best), None,
                                    length=steps)
    best = jnp.maximum(best, bound(alphas))  # the last iterate
    return best[:s] + 0.0, 0.0 - best[s:]


def _per_example(g: _Graph, lo, hi, spec, method: str, alpha=(0, 0.5)):
    """Bounds for one example (box ``lo``, ``hi`` of shape ``(1, ...)``); ``spec`` ``[S, K]``
    or None; ``alpha``: ``(steps, lr)`` of the optimised ReLU slopes (0 steps:
    CROWN-Ada). Non-finite intermediate bounds (a domain violation, an overflow) give
    ``(-inf, inf)``: no claim."""
    out = g.output
    if isinstance(out, _C):
        val = jnp.reshape(out.value, (-1,)).astype(jnp.float32)
        v = val if spec is None else spec @ val
        return v, v
    live = _live(g)
    cache: dict = {}
    done: set = set()

    def crown_tighten(a, lows, highs):
        if a == 0 or a in done or g.nodes[a].kind == "input":
            return
        done.add(a)
        n = int(np.prod(g.nodes[a].shape))
        eye = jnp.eye(n, dtype=jnp.float32)
        lc, uc = _spec_bounds(g, a, eye, lows, highs, lo, hi, relax=True, cache=cache)
        shp = g.nodes[a].shape
        lows[a] = jnp.maximum(lows[a], lc.reshape(shp))
        highs[a] = jnp.minimum(highs[a], uc.reshape(shp))

    tighten = crown_tighten if method == "crown" else None
    lows, highs = _forward_ibp(g, lo, hi, live, tighten=tighten)
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(lows[i])) & jnp.all(jnp.isfinite(highs[i]))
                            for i in live]))
    if method == "ibp" and spec is None:
        res = lows[out].reshape(-1), highs[out].reshape(-1)
    else:
        n = int(np.prod(g.nodes[out].shape))
        spec = jnp.eye(n, dtype=jnp.float32) if spec is None else spec
        spec = spec.astype(jnp.float32)
        res = _spec_bounds(g, out, spec, lows, highs, lo, hi, relax=False)
        if method != "ibp":  # CROWN, intersected with IBP (never looser)
            rc = _spec_bounds(g, out, spec, lows, highs, lo, hi, relax=True, cache=cache)
            if alpha[0]:
                rc = _optimised_slopes(g, out, spec, lows, highs, lo, hi, cache, rc, *alpha)
            res = jnp.maximum(res[0], rc[0]), jnp.minimum(res[1], rc[1])
    lower, upper = (r.astype(jnp.float32) for r in res)
    return (jnp.where(ok & ~jnp.isnan(lower), lower, -jnp.inf),
            jnp.where(ok & ~jnp.isnan(upper), upper, jnp.inf))


# --------------------------------------------------------------------------- public


def interval_box(x: chex.Array, eps: chex.Numeric, clip=None):
    """``(x_lower, x_upper)``: the L-inf ball of radius ``eps`` around ``x``, clipped to
    ``clip = (lo, hi)`` when given: ``[max(x - eps, lo), min(x + eps, hi)]``."""
    x = jnp.asarray(x)
    xl, xu = x - eps, x + eps
    if clip is not None:
        xl, xu = jnp.maximum(xl, clip[0]), jnp.minimum(xu, clip[1])
    return xl, xu


def check_ball(x, eps, clip=None) -> None:
    """The one validation of an L-inf ball ``(x, eps, clip)`` (bounds, attacks,
    certification and the faithful methods call it): ``x`` floating of rank >= 2, ``eps``
    a scalar >= 0 (may be traced), ``clip`` None or a pair ``(lo, hi)`` with ``lo < hi``
    (checked where concrete)."""
    check_float_array(x, "x", min_ndim=2)
    if np.ndim(eps) != 0:
        raise ValueError(f"eps must be a scalar, got shape {np.shape(eps)}.")
    check_nonnegative(eps, "eps")
    if clip is not None:
        if not isinstance(clip, (tuple, list)) or len(clip) != 2:
            raise ValueError(f"clip must be None or a pair (lo, hi), got {clip!r}.")
        if is_concrete(clip[0]) and is_concrete(clip[1]) and \
                np.any(np.asarray(clip[0]) >= np.asarray(clip[1])):
            raise ValueError(f"clip must satisfy lo < hi, got {clip!r}.")


def _validate(fn, x, eps, clip, C):
    if not callable(fn):
        raise TypeError(f"fn must be a callable x -> outputs, got {type(fn).__name__}.")
    check_ball(x, eps, clip)
    out = jax.eval_shape(fn, x)
    leaves = jax.tree_util.tree_leaves(out)
    if not leaves:
        raise ValueError("fn must return at least one array.")
    for leaf in leaves:
        if len(leaf.shape) < 1 or leaf.shape[0] != x.shape[0]:
            raise ValueError(
                f"every output of fn must have the batch size {x.shape[0]} as leading "
                f"dimension, got an output of shape {leaf.shape}.")
    k = sum(int(np.prod(leaf.shape[1:])) for leaf in leaves)
    if C is not None:
        check_float_array(C, "C", ndim=(2, 3))
        if C.shape[-1] != k:
            raise ValueError(f"C must have last dimension {k} (the number of outputs of fn "
                             f"per example), got shape {C.shape}.")
        if C.ndim == 3 and C.shape[0] != x.shape[0]:
            raise ValueError(f"C must have shape [{x.shape[0]}, S, {k}] or [S, {k}], "
                             f"got {C.shape}.")
    return k


def _flat_outputs(fn):
    def flat(x):
        leaves = jax.tree_util.tree_leaves(fn(x))
        return jnp.concatenate([jnp.reshape(v, (v.shape[0], -1)) for v in leaves], axis=1)
    return flat


def _bounds(fn, x, eps, clip, C, method, batch_chunk, alpha=(0, 0.5)):
    _validate(fn, x, eps, clip, C)
    g = _build_graph(_flat_outputs(fn), jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype))
    if C is not None and C.ndim == 2:
        C = jnp.broadcast_to(C, (x.shape[0],) + C.shape)

    def one(args):
        xl1, xu1, c1 = args
        return _per_example(g, xl1[None], xu1[None], c1, method, alpha)

    # One compiled program per call (also when called eagerly: the interpreter would
    # otherwise dispatch op by op); inside an outer jit this is a nested call.
    @jax.jit
    def run(x, eps, cs):
        xl, xu = interval_box(x, eps, clip)
        if batch_chunk is None:
            return jax.vmap(lambda a, b, c: one((a, b, c)))(xl, xu, cs)
        return lax.map(one, (xl, xu, cs), batch_size=batch_chunk)

    return run(x, eps, C)


def ibp_bounds(fn: Callable, x: chex.Array, eps: chex.Numeric, *, clip=None,
               C: chex.Array | None = None, batch_chunk: int | None = None):
    r"""Interval bound propagation (IBP) of ``fn`` over the L-inf ball around ``x``.

    Without ``C``: elementwise bounds ``l <= f(x') <= u`` for all ``x'`` in
    ``B(x) = {||x' - x||_inf <= eps} ∩ [lo, hi]`` by interval arithmetic (Gowal et al.
    2018, Eq. 6): affine ``mu' = W mu + b``, ``r' = |W| r``; monotone ``[f(l), f(u)]``.
    With ``C`` (``[S, K]`` or ``[B, S, K]``): bounds on ``C f(x')``, where the affine
    layers after the last nonlinearity are folded into ``C`` first (Gowal et al. 2018,
    sec. 3, "elision"); this bounds ``z^T - z^S`` of two identical networks by exactly 0
    (the graph is de-duplicated, see :mod:`kdjax.faithful.bounds`). Differentiable (use it as a
    training bound).

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.faithful.bounds import ibp_bounds
      >>> lo, up = ibp_bounds(lambda x: jnp.maximum(2.0 * x, 0.0), jnp.array([[1.0]]), 0.5)
      >>> lo.tolist(), up.tolist()
      ([[1.0]], [[3.0]])

    Args:
      fn: JAX function of ``x`` (``[B, ...]``) returning an array or pytree of arrays
        with leading dimension ``B``; outputs are flattened per example and concatenated
        to ``K`` values. Examples must be processed independently (eval mode).
      x: ``[B, ...]`` floating inputs (centres of the balls).
      eps: L-inf radius ``>= 0`` (a scalar; may be traced).
      clip: optional ``(lo, hi)`` data range intersected with the ball.
      C: optional specification, ``[S, K]`` or ``[B, S, K]``.
      batch_chunk: ``None`` vmaps over the batch; an int uses ``lax.map`` with that batch
        size (less memory).

    Returns:
      ``(lower, upper)``, each float32 ``[B, K]`` (``[B, S]`` with ``C``).

    References:
      Gowal et al., "On the Effectiveness of Interval Bound Propagation for Training
      Verifiably Robust Models", 2018, arXiv:1810.12715.
    """
    return _bounds(fn, x, eps, clip, C, "ibp", batch_chunk)


def crown_bounds(fn: Callable, x: chex.Array, eps: chex.Numeric, *, clip=None,
                 C: chex.Array | None = None, intermediate: str = "crown",
                 batch_chunk: int | None = None, alpha_steps: int = 0,
                 alpha_lr: float = 0.5):
    r"""CROWN linear-relaxation bounds of ``C f(x')`` over the L-inf ball around ``x``.

    Backward pass from ``Lambda = C`` (Zhang et al. 2018, Theorem 3.2): through affine
    maps ``Lambda <- Lambda W`` (bias ``Lambda b`` accumulated); through a ReLU with
    input bounds ``l < 0 < u``

    .. math::
        \alpha a \le \mathrm{relu}(a) \le \tfrac{u}{u - l}(a - l),\qquad
        \alpha = 1[u \ge -l],

    using the upper line where ``Lambda < 0`` and the lower where ``Lambda > 0`` (the
    lower bound; the upper is ``-lower(-C)``); finally
    ``min_{x' in B} Lambda x' = sum(Lambda^+ x_l + Lambda^- x_u)`` (Corollary 3.3 with
    the box). ``intermediate="crown"``: the input of every nonlinear node is bounded by
    its own CROWN pass (full CROWN; cost grows with layer widths), intersected with IBP;
    ``"ibp"``: IBP bounds there (CROWN-IBP, Zhang et al. 2020, Eq. 7; the cheap training
    bound). The other nonlinear nodes (``tanh``, ``gelu``, products, max pooling, ...)
    use the lines listed in :mod:`kdjax.faithful.bounds`. Bound ``z^T - z^S`` through ``C`` on the joint
    function ``x -> (z^T, z^S)``: shared sub-networks cancel exactly.

    ``alpha_steps > 0``: alpha-CROWN (Xu et al. 2021, "Fast and Complete", sec. 3.1): in
    the final backward pass the lower slope of every unstable ReLU is a free
    ``alpha in [0, 1]`` per specification row (any such line ``alpha a <= relu(a)`` is
    sound), maximised by projected Adam from CROWN-Ada's slopes for ``alpha_steps`` steps
    at learning rate ``alpha_lr`` (x 0.98 a step), keeping each row's best iterate, so
    the result is never looser than CROWN. auto_LiRPA's defaults: 20 iterations, Adam,
    lr 0.5, decay 0.98, keep best. Deviation: the intermediate bounds are not optimised
    (auto_LiRPA optimises their slopes too), so the gain is that of the last pass only.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.faithful.bounds import crown_bounds
      >>> f = lambda x: jnp.maximum(x, 0.0) - jnp.maximum(x, 0.0)
      >>> crown_bounds(f, jnp.array([[0.0]]), 1.0)[1].tolist()
      [[0.0]]

    Args:
      fn, x, eps, clip, C, batch_chunk: as in :func:`ibp_bounds`.
      intermediate: ``"crown"`` (default) or ``"ibp"``.
      alpha_steps: optimisation steps of alpha-CROWN (``0``, the default: CROWN-Ada;
        20 is auto_LiRPA's default).
      alpha_lr: alpha-CROWN's Adam learning rate (auto_LiRPA's 0.5).

    Returns:
      ``(lower, upper)``, each float32 ``[B, K]`` (``[B, S]`` with ``C``).

    References:
      Zhang, Weng, Chen, Hsieh, Daniel, "Efficient Neural Network Robustness
      Certification with General Activation Functions", NeurIPS 2018, arXiv:1811.00866.
      Zhang et al., "Towards Stable and Efficient Training of Verifiably Robust Neural
      Networks", ICLR 2020, arXiv:1906.06316.
    """
    check_choice(intermediate, "intermediate", ("crown", "ibp"))
    if not isinstance(alpha_steps, int) or isinstance(alpha_steps, bool) or alpha_steps < 0:
        raise ValueError(f"alpha_steps must be an int >= 0, got {alpha_steps!r}.")
    if not (isinstance(alpha_lr, (int, float)) and np.isfinite(alpha_lr) and alpha_lr > 0):
        raise ValueError(f"alpha_lr must be a finite number > 0, got {alpha_lr!r}.")
    return _bounds(fn, x, eps, clip, C, "crown" if intermediate == "crown" else "crown-ibp",
                   batch_chunk, (alpha_steps, float(alpha_lr)))
