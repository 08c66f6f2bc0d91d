"""Device mesh and shardings for data-parallel training.

kdjax uses one mesh axis, ``"data"``: batches are split along their leading axis
(``NamedSharding(mesh, P("data"))``) and parameters are replicated. Under ``jax.jit``
XLA inserts the collectives, so a loss over a sharded batch is the *global*-batch loss.
On several hosts, call ``jax.distributed.initialize()`` first; ``make_mesh`` then
spans every process's devices and the same code runs unchanged.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["make_mesh", "data_sharding", "replicated", "shard_batch", "DATA_AXIS"]

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D ``("data",)`` mesh over the first ``num_devices`` devices (default all)."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"num_devices must be in [1, {len(devices)}], got {num_devices}.")
    return Mesh(np.asarray(devices[:n]), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Split the leading (batch) axis over ``"data"``."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Same value on every device (parameters, optimizer state)."""
    return NamedSharding(mesh, P())


def shard_batch(batch, mesh: Mesh):
    """Places a pytree of host arrays on ``mesh``, split along the leading axis.

    The leading dimension must be divisible by the number of devices.
    """
    n = mesh.devices.size

    def put(x):
        if x.shape[0] % n:
            raise ValueError(f"batch leading dimension {x.shape[0]} is not divisible by "
                             f"the {n} devices of the mesh.")
        return jax.device_put(x, data_sharding(mesh))

    return jax.tree_util.tree_map(put, batch)
