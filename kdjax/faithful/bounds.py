r"""Bound propagation over an L-inf ball: interval bounds (IBP) and CROWN.

Both bounds take any JAX function ``fn: x -> outputs`` made of supported operations and
bound ``C f(x')`` for every ``x'`` in the clipped ball

.. math::
    B(x) = \{x' : \|x' - x\|_\infty \le \epsilon,\ lo \le x' \le hi\}.

How it works (one design for both):

1. ``fn`` is traced once on a single example with :func:`jax.make_jaxpr`. The jaxpr is
   *flattened* into a small graph: calls (``jit``, ``custom_jvp_call`` such as
   ``jax.nn.relu``, ...) are inlined; every equation whose inputs do not depend on ``x``
   is evaluated at once (constant folding: eval-mode BatchNorm's
   ``rsqrt(var + eps) * scale`` becomes one constant, so BN is an affine map); ``max``/
   ``min``/``abs``/``clamp`` against constants become ReLUs plus affine maps
   (``max(a, c) = relu(a - c) + c``, ``max(a, b) = a + relu(b - a)``).
2. The graph is de-duplicated (common-subexpression elimination, with constants compared
   by identity, by value, or by how they were folded). When the teacher and the student
   are the same function with the same parameters, their logits become one node, so a
   specification ``z^T - z^S`` has coefficient exactly 0 and both IBP (with ``C``) and
   CROWN bound it by exactly 0.
3. IBP (Gowal et al. 2018, Eq. 6): interval arithmetic node by node; affine maps in
   centre/radius form ``mu' = W mu + b, r' = |W| r``; ReLU, max pooling, ``tanh`` and
   ``logistic`` are monotone, so ``[f(l), f(u)]``. With a specification ``C`` the affine
   tail of the graph (everything after the last nonlinearity, e.g. the classifier) is
   folded into ``C`` before concretising (the "elision of the last layer", Gowal et al.
   2018, sec. 3): tighter than ``C`` times the output box, and exact for ``z^T - z^S``
   of identical networks.
4. CROWN (Zhang et al. 2018, "Efficient Neural Network Robustness Certification with
   General Activation Functions", Theorem 3.2 and Corollary 3.3): a backward pass of the
   linear coefficients ``Lambda`` from ``C``. Affine nodes are transposed with
   :func:`jax.vjp` (exact for affine maps); each ReLU with pre-activation bounds
   ``l < 0 < u`` is relaxed by ``u(a - l)/(u - l)`` above and by ``alpha a`` below with
   CROWN's adaptive ``alpha = 1[u >= -l]`` (Zhang et al. 2018, sec. 3.2, "CROWN-Ada");
   the input is concretised over the box:
   ``min_{x' in B} Lambda x' = sum(Lambda^+ xl + Lambda^- xu)``.
   ``intermediate="crown"`` (full CROWN) bounds every ReLU input with its own backward
   pass (identity specification over the layer) intersected with IBP;
   ``intermediate="ibp"`` uses IBP bounds there (CROWN-IBP, Zhang et al. 2020,
   "Towards Stable and Efficient Training of Verifiably Robust Neural Networks", Eq. 7):
   cheaper and the usual choice for training.

Deliberate deviations and limits:

* Max pooling (``reduce_window_max``/``reduce_max``), ``tanh`` and ``logistic`` are not
  linearly relaxed by CROWN: the backward pass concretises them with their interval
  (from CROWN-tightened input bounds in full CROWN). Sound, looser than a relaxation.
* No outward floating-point rounding: bounds are sound up to float32 round-off (about
  ``1e-6`` relative), as in auto_LiRPA's default mode.
* ``fn`` must treat examples independently (eval-mode networks): it is traced on one
  example and the bound is ``vmap``-ed (or ``lax.map``-ed, see ``batch_chunk``) over the
  batch, which also makes it shardable over a ``("data",)`` mesh by sharding ``x``.
* Unsupported primitives (``exp``, products of two input-dependent values, ...) raise
  ``NotImplementedError`` naming the primitive and the layer (Flax module path).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from kdjax._checks import check_choice, check_float_array, check_nonnegative, is_concrete

__all__ = ["ibp_bounds", "crown_bounds", "interval_box"]

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
_MONOTONE = {"reduce_window_max", "reduce_max", "tanh", "logistic"}
_SUPPORTED = sorted(_STRUCTURAL | _ADDITIVE | _MULTIPLICATIVE | _IDENTITY | _MONOTONE
                    | {"max", "min", "abs", "clamp"})


# --------------------------------------------------------------------------- graph


@dataclasses.dataclass(frozen=True)
class _C:
    """A constant (independent of ``x``) with a structural key for CSE."""
    value: Any
    key: Any


@dataclasses.dataclass
class _Node:
    kind: str            # "input" | "affine" | "relu" | "monotone"
    prim: Any            # jax primitive (affine, monotone) or None
    params: dict
    args: tuple          # ints (node ids) or _C
    shape: tuple
    dtype: Any
    bias: Any = None     # affine: f(0) (constant), None when 0
    layer: str = ""


class _Graph:
    """Flattened, constant-folded, de-duplicated graph of ``fn`` on one example."""

    def __init__(self):
        self.nodes: list[_Node] = []
        self._cse: dict[Any, int] = {}
        self._const_cache: dict[Any, _C] = {}
        self._keep_alive: list[Any] = []
        self.output: Any = None  # node id or _C

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
        return idx


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


def _layer_name(eqn) -> str:
    try:
        name = str(eqn.source_info.name_stack)
    except Exception:  # pragma: no cover - private API drift
        name = ""
    try:
        from jax._src import source_info_util
        where = source_info_util.summarize(eqn.source_info)
    except Exception:  # pragma: no cover
        where = ""
    return f"layer '{name or '<top level>'}' at {where}" if where else \
        f"layer '{name or '<top level>'}'"


def _unsupported(name: str, eqn, why: str = "") -> NotImplementedError:
    return NotImplementedError(
        f"bound propagation does not support primitive '{name}'"
        f"{' (' + why + ')' if why else ''} in {_layer_name(eqn)}. Supported: "
        f"{', '.join(_SUPPORTED)} (and calls/custom_jvp such as jax.nn.relu).")


def _build_graph(fn: Callable, x_one) -> _Graph:
    closed = jax.make_jaxpr(fn)(x_one)  # x_one: a ShapeDtypeStruct of one example
    g = _Graph()
    g.nodes.append(_Node("input", None, {}, (), tuple(x_one.shape), x_one.dtype))
    env_in = [g.const(c) for c in closed.consts]
    outs = _flatten(g, closed.jaxpr, env_in, [0])
    g.output = outs[0]
    return g


def _read(g: _Graph, env, v):
    if isinstance(v, jcore.Literal):
        return g.const(v.val)
    return env[v]


def _flatten(g: _Graph, jaxpr, consts, args):
    env = {}
    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for eqn in jaxpr.eqns:
        ins = [_read(g, env, v) for v in eqn.invars]
        outs = _flatten_eqn(g, eqn, ins)
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


def _flatten_eqn(g: _Graph, eqn, ins):
    prim, params, name = eqn.primitive, eqn.params, eqn.primitive.name
    if name in _CALL_PRIMS:
        sub = _sub_jaxpr(params)
        if sub is None:
            raise _unsupported(name, eqn, "call without an inner jaxpr")
        jaxpr, consts = sub
        return _flatten(g, jaxpr, [g.const(c) for c in consts], ins)
    if name in _IDENTITY:  # also on constants: stop_gradient(params) keeps their CSE key
        return [ins[0]]
    if all(isinstance(a, _C) for a in ins):
        return g.fold(prim, params, ins)
    if prim.multiple_results:
        raise _unsupported(name, eqn, "multiple results")
    out_aval = eqn.outvars[0].aval
    shape, dtype = out_aval.shape, out_aval.dtype
    layer = _layer_name(eqn)
    var = [isinstance(a, int) for a in ins]

    if name in _STRUCTURAL or name in _ADDITIVE:
        if name == "select_n" and var[0]:
            raise _unsupported(name, eqn, "input-dependent predicate")
        if name == "dynamic_slice" and any(var[1:]):
            raise _unsupported(name, eqn, "input-dependent indices")
        return [g.add("affine", prim, params, ins, shape, dtype, layer)]
    if name == "mul":
        if all(var):
            raise _unsupported(name, eqn, "product of two input-dependent values")
        return [g.add("affine", prim, params, ins, shape, dtype, layer)]
    if name == "div":
        if var[1]:
            raise _unsupported(name, eqn, "division by an input-dependent value")
        return [g.add("affine", prim, params, ins, shape, dtype, layer)]
    if name == "dot_general":
        if all(var):
            raise _unsupported(name, eqn, "product of two input-dependent operands")
        return [g.add("affine", prim, params, ins, shape, dtype, layer)]
    if name == "conv_general_dilated":
        if var[1]:
            raise _unsupported(name, eqn, "input-dependent kernel")
        return [g.add("affine", prim, params, ins, shape, dtype, layer)]
    if name in _MONOTONE:
        return [g.add("monotone", prim, params, ins, shape, dtype, layer)]
    if name in ("max", "min", "abs", "clamp"):
        return [_rewrite_piecewise(g, eqn, ins, shape, dtype, layer)]
    raise _unsupported(name, eqn)


def _rewrite_piecewise(g: _Graph, eqn, ins, shape, dtype, layer):
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
        raise _unsupported(name, eqn, "only clamp(const, x, const)")
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


def _monotone(node: _Node, v):
    return node.prim.bind(v, **node.params)


def _forward_ibp(g: _Graph, lo, hi, upto: int | None = None, tighten=None):
    """Interval bounds of every node (in order); ``tighten(i, l, u)`` may refine the
    input bounds of nonlinear node ``i`` (full CROWN)."""
    lows, highs = {0: lo}, {0: hi}
    n = len(g.nodes) if upto is None else upto + 1
    for i in range(1, n):
        node = g.nodes[i]
        if node.kind == "affine":
            mids = {a: (lows[a] + highs[a]) / 2 for a in node.args if isinstance(a, int)}
            rads = {a: (highs[a] - lows[a]) / 2 for a in node.args if isinstance(a, int)}
            mid = _eval_affine(node, mids)
            rad = _eval_affine(node, rads, radius=True)
            lows[i], highs[i] = mid - rad, mid + rad
        else:
            a = node.args[0]
            la, ua = lows[a], highs[a]
            if tighten is not None:
                la, ua = tighten(i, a, lows, highs)
                lows[a], highs[a] = la, ua
            if node.kind == "relu":
                lows[i], highs[i] = jnp.maximum(la, 0), jnp.maximum(ua, 0)
            else:
                lows[i], highs[i] = _monotone(node, la), _monotone(node, ua)
    return lows, highs


# ------------------------------------------------------------------------- backward


def _backward(g: _Graph, target: int, lam, lows, highs, xl, xu, *, relax: bool):
    """Lower bound of ``sum(lam * node_target)`` per row of ``lam`` (``[S, *shape]``).

    ``relax=True``: CROWN (ReLUs linearly relaxed with the bounds in ``lows``/``highs``
    of their inputs; monotone nodes concretised with their interval).
    ``relax=False``: every nonlinear node is concretised with its interval (IBP with the
    affine tail folded into the specification).
    """
    s = lam.shape[0]
    coeffs = {target: lam}
    bias = jnp.zeros((s,), lam.dtype)

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
        elif node.kind == "relu" and relax:
            a = node.args[0]
            l, u = lows[a], highs[a]
            unstable = (l < 0) & (u > 0)
            denom = jnp.where(unstable, u - l, 1.0)
            slope_up = jnp.where(unstable, u / denom, (l >= 0).astype(l.dtype))
            icpt_up = jnp.where(unstable, -l * u / denom, 0.0)
            alpha = jnp.where(unstable, (u >= -l).astype(l.dtype),
                              (l >= 0).astype(l.dtype))
            pos, neg = jnp.maximum(lam_i, 0), jnp.minimum(lam_i, 0)
            bias = bias + dot(neg, icpt_up)
            acc(a, pos * alpha + neg * slope_up)
        else:  # concretise with the node's interval
            pos, neg = jnp.maximum(lam_i, 0), jnp.minimum(lam_i, 0)
            bias = bias + dot(pos, lows[i]) + dot(neg, highs[i])
    if 0 in coeffs:
        lam0 = coeffs.pop(0)
        bias = bias + dot(jnp.maximum(lam0, 0), xl) + dot(jnp.minimum(lam0, 0), xu)
    return bias


def _spec_bounds(g: _Graph, target: int, spec, lows, highs, xl, xu, relax):
    """``(lower, upper)`` of ``spec @ flat(node_target)``; ``spec`` is ``[S, n]``."""
    shape = g.nodes[target].shape
    lam = jnp.concatenate([spec, -spec], axis=0).reshape((-1,) + shape)
    res = _backward(g, target, lam, lows, highs, xl, xu, relax=relax)
    s = spec.shape[0]
    return res[:s] + 0.0, 0.0 - res[s:]  # (+ 0.0: no negative zeros)


def _per_example(g: _Graph, lo, hi, spec, method: str):
    """Bounds for one example (box ``lo``, ``hi`` of shape ``(1, ...)``); ``spec`` ``[S, K]`` or None."""
    out = g.output
    if isinstance(out, _C):
        val = jnp.reshape(out.value, (-1,)).astype(jnp.float32)
        v = val if spec is None else spec @ val
        return v, v
    def crown_tighten(i, a, lows, highs):
        if a == 0:
            return lows[a], highs[a]
        n = int(np.prod(g.nodes[a].shape))
        eye = jnp.eye(n, dtype=jnp.float32)
        lc, uc = _spec_bounds(g, a, eye, lows, highs, lo, hi, relax=True)
        shp = g.nodes[a].shape
        return (jnp.maximum(lows[a], lc.reshape(shp)),
                jnp.minimum(highs[a], uc.reshape(shp)))

    tighten = crown_tighten if method == "crown" else None
    lows, highs = _forward_ibp(g, lo, hi, upto=out, tighten=tighten)
    if method == "ibp" and spec is None:
        return lows[out].reshape(-1), highs[out].reshape(-1)
    n = int(np.prod(g.nodes[out].shape))
    spec = jnp.eye(n, dtype=jnp.float32) if spec is None else spec
    return _spec_bounds(g, out, spec.astype(jnp.float32), lows, highs, lo, hi,
                        relax=(method != "ibp"))


# --------------------------------------------------------------------------- public


def interval_box(x: chex.Array, eps: chex.Numeric, clip=None):
    """``(x_lower, x_upper)``: the L-inf ball of radius ``eps`` around ``x``, clipped to
    ``clip = (lo, hi)`` when given: ``[max(x - eps, lo), min(x + eps, hi)]``."""
    x = jnp.asarray(x)
    xl, xu = x - eps, x + eps
    if clip is not None:
        xl, xu = jnp.maximum(xl, clip[0]), jnp.minimum(xu, clip[1])
    return xl, xu


def _validate(fn, x, eps, clip, C):
    if not callable(fn):
        raise TypeError(f"fn must be a callable x -> outputs, got {type(fn).__name__}.")
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


def _bounds(fn, x, eps, clip, C, method, batch_chunk):
    _validate(fn, x, eps, clip, C)
    g = _build_graph(_flat_outputs(fn), jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype))
    if C is not None and C.ndim == 2:
        C = jnp.broadcast_to(C, (x.shape[0],) + C.shape)

    def one(args):
        xl1, xu1, c1 = args
        return _per_example(g, xl1[None], xu1[None], c1, method)

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
                 batch_chunk: int | None = None):
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
    the box). ``intermediate="crown"``: every ReLU's input is bounded by its own CROWN
    pass (full CROWN; cost grows with layer widths), intersected with IBP;
    ``"ibp"``: IBP bounds there (CROWN-IBP, Zhang et al. 2020, Eq. 7; the cheap training
    bound). Max pooling/``tanh``/``logistic`` are concretised with intervals, not
    relaxed (see :mod:`kdjax.faithful.bounds`). Bound ``z^T - z^S`` through ``C`` on the joint
    function ``x -> (z^T, z^S)``: shared sub-networks cancel exactly.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.faithful.bounds import crown_bounds
      >>> f = lambda x: jnp.maximum(x, 0.0) - jnp.maximum(x, 0.0)
      >>> crown_bounds(f, jnp.array([[0.0]]), 1.0)[1].tolist()
      [[0.0]]

    Args:
      fn, x, eps, clip, C, batch_chunk: as in :func:`ibp_bounds`.
      intermediate: ``"crown"`` (default) or ``"ibp"``.

    Returns:
      ``(lower, upper)``, each float32 ``[B, K]`` (``[B, S]`` with ``C``).

    References:
      Zhang, Weng, Chen, Hsieh, Daniel, "Efficient Neural Network Robustness
      Certification with General Activation Functions", NeurIPS 2018, arXiv:1811.00866.
      Zhang et al., "Towards Stable and Efficient Training of Verifiably Robust Neural
      Networks", ICLR 2020, arXiv:1906.06316.
    """
    check_choice(intermediate, "intermediate", ("crown", "ibp"))
    return _bounds(fn, x, eps, clip, C, "crown" if intermediate == "crown" else "crown-ibp",
                   batch_chunk)
