r"""Which batch a batch-level loss sees under data parallelism: global or per-device.

A *batch-level* loss couples the examples of a batch (relation losses such as SP, RKD,
PKT, CC, DIST's intra-class term, CoSS's space similarity, every distance of
:mod:`kdjax.losses.distribution`): its value depends on which examples form "the batch".

* **Global batch**: call the loss under plain ``jax.jit`` on arrays sharded over a
  ``("data",)`` mesh. XLA inserts the collectives and the loss is that of the whole
  global batch, exactly the single-device number (tested on 8 devices). This is what
  single-GPU reference code computes.
* **Per-device batch**: :func:`per_device` runs the loss on each device's shard with
  ``jax.shard_map`` and averages over devices (``pmean``): what PyTorch DDP (or
  ``pmap``) optimises when every worker computes the loss on its own sub-batch.
  :func:`per_group` computes the same numbers without a mesh (contiguous groups,
  ``vmap``).

Per-example losses (KD, CE, FitNet, AT, ...) give the same value either way when the
shards have equal size.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

__all__ = ["per_device", "per_group"]


def _leading(v):
    return np.shape(v)[0] if v is not None and np.shape(v) else None


def _check_divisible(args, divisor: int, what: str) -> None:
    """Raises ``ValueError`` unless every positional array's leading dimension divides
    by ``divisor``; ``what`` ends the message ("divisible by <what>")."""
    for i, v in enumerate(args):
        n = _leading(v)
        if n is not None and n % divisor:
            raise ValueError(
                f"positional argument {i} has leading dimension {n}, which must be "
                f"divisible by {what}.")


def per_device(fn: Callable[..., Any], mesh: jax.sharding.Mesh,
               axis_name: str = "data") -> Callable[..., Any]:
    r"""Per-device semantics: ``fn`` on each device's shard of the batch, then ``pmean``.

    ``per_device(fn, mesh)(*arrays, **kwargs)`` splits every positional array (with a
    leading axis) along that axis over ``mesh`` axis ``axis_name`` (``jax.shard_map``,
    default ``check_vma=True``), evaluates ``fn`` on each shard and returns the mean
    over devices, replicated:

    .. math:: \mathcal L_{\mathrm{per\text{-}device}} = \frac1K\sum_{k=1}^K
        \mathcal L(\text{shard}_k)

    Positional ``None`` and scalars are replicated. Keyword arguments that are arrays
    (a PRNG ``key``, a weight vector you want replicated) are passed as replicated
    inputs; other keywords are closed over as constants. ``fn`` must return a scalar
    (or a pytree of scalars, each averaged). Every leading dimension must divide by the
    axis size. Works for Explicit meshes (``jax.make_mesh``'s default: inputs are
    resharded) and Auto meshes; differentiable.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from kdjax.losses import per_device, coss
      >>> mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
      >>> x = jnp.ones((4, 3))
      >>> round(float(per_device(coss, mesh)(x, x, tau_t=1.0, tau_s=1.0)), 6)
      -2.0

    Args:
      fn: the loss, ``fn(*arrays, **kwargs) -> scalar``.
      mesh: a ``jax.sharding.Mesh`` containing ``axis_name``.
      axis_name: the data-parallel mesh axis.

    Returns:
      ``wrapped(*arrays, **kwargs)``, jitted.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}.")
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name must be one of the mesh axes {tuple(mesh.axis_names)}, "
                         f"got {axis_name!r}.")
    size = mesh.shape[axis_name]
    # Outside a jax.set_mesh context the shard_map runs on an Auto-typed copy of the
    # mesh and device_put moves the inputs onto it: with an Explicit mesh
    # (jax.make_mesh's default) the scalar output would otherwise carry the mesh in its
    # type and jax.grad there fails to seed its cotangent ("Length of device assignment
    # 1 is not equal to the size of the mesh"). Inside a context (a training step under
    # jax.set_mesh) shard_map must use the context's mesh as given, and reshard places
    # the inputs.
    auto = jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))
    explicit = mesh.axis_types[mesh.axis_names.index(axis_name)] == jax.sharding.AxisType.Explicit

    def placement():
        if jax.sharding.get_abstract_mesh().empty:
            return auto, jax.device_put
        return mesh, (jax.sharding.reshard if explicit else jax.lax.with_sharding_constraint)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        arr_kw = {k: v for k, v in kwargs.items() if isinstance(v, (jax.Array, np.ndarray))}
        static_kw = {k: v for k, v in kwargs.items() if k not in arr_kw}
        _check_divisible(args, size, f"the {size} devices of mesh axis {axis_name!r}")

        def local(args, arr_kw):
            out = fn(*args, **arr_kw, **static_kw)
            return jax.tree_util.tree_map(lambda v: jax.lax.pmean(v, axis_name), out)

        specs = tuple(P() if _leading(v) is None else P(axis_name) for v in args)
        on, place = placement()
        mapped = jax.shard_map(local, mesh=on, in_specs=(specs, {k: P() for k in arr_kw}),
                               out_specs=P())
        shardings = tuple(jax.sharding.NamedSharding(on, s) for s in specs)
        replicated = jax.sharding.NamedSharding(on, P())

        @jax.jit
        def run(args, arr_kw):
            # Place the inputs on the mesh first (a no-op when they already are).
            args = tuple(v if v is None else place(v, sh) for v, sh in zip(args, shardings))
            arr_kw = {k: place(v, replicated) for k, v in arr_kw.items()}
            return mapped(args, arr_kw)

        return run(tuple(args), arr_kw)

    return wrapped


def per_group(fn: Callable[..., Any], num_groups: int) -> Callable[..., Any]:
    r"""Mean of ``fn`` over ``num_groups`` contiguous equal slices of the batch.

    Equals :func:`per_device` on ``num_groups`` devices (contiguous shards), without a
    mesh: every positional array ``[B, ...]`` is reshaped to ``[G, B/G, ...]`` and
    ``fn`` is ``vmap``-ped over groups; keyword arguments are shared by all groups.
    Under ``jit`` with the batch sharded over ``G`` devices each group stays on its
    device. ``num_groups=1`` is the plain loss.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kdjax.losses import coss, per_group
      >>> x = jnp.arange(12.0).reshape(4, 3)
      >>> round(float(per_group(coss, 2)(x, x, tau_t=1.0, tau_s=1.0)), 6)
      -2.0
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}.")
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}.")

    def wrapped(*args, **kwargs):
        _check_divisible(args, num_groups, f"num_groups={num_groups}")
        if num_groups == 1:
            return fn(*args, **kwargs)
        grouped = [v if _leading(v) is None
                   else jnp.reshape(v, (num_groups, v.shape[0] // num_groups, *v.shape[1:]))
                   for v in args]
        axes = [None if _leading(v) is None else 0 for v in args]
        values = jax.vmap(lambda *a: fn(*a, **kwargs), in_axes=axes)(*grouped)
        return jax.tree_util.tree_map(lambda v: jnp.mean(v.astype(jnp.float32), 0), values)

    return wrapped
