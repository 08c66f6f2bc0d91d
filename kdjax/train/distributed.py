"""Multi-process (multi-host) data-parallel distillation.

One process per host, the same script everywhere. Each process calls
:func:`initialize` first (before any other JAX call), builds the global mesh
(:func:`global_mesh`, every process's devices on the ``"data"`` axis), places the
replicated state with :func:`replicate` and feeds *its own rows* of each global batch
with :func:`shard_host_batch`; a jitted :meth:`Distiller.train_step` then runs as one
SPMD program over all processes (XLA inserts the cross-process collectives: gloo on
CPU, NCCL/ICI on accelerators). :func:`train_steps` is that loop.

The global batch of step ``i`` is the concatenation, in process order, of the rows the
processes feed (:func:`process_rows` gives each process its slice), so a run over
``P`` processes computes exactly the single-process step on the same global batch.

Launching on a cluster: see ``docs/RELIABILITY.md`` (environment variables, one
process per host). On one machine, two CPU processes on localhost reproduce it (that is
what ``tests/reliability/test_multiprocess.py`` does).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdjax.train.sharding import DATA_AXIS

__all__ = ["initialize", "global_mesh", "process_rows", "replicate", "shard_host_batch",
           "to_host", "train_steps", "env_config"]


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_count: int | None = None,
               cpu_collectives: str | None = "gloo",
               initialization_timeout: int = 300) -> None:
    """``jax.distributed.initialize`` with CPU collectives (gloo) switched on.

    Must run before anything touches a JAX backend. With all three of
    ``coordinator_address`` (``"host:port"`` of process 0), ``num_processes`` and
    ``process_id`` left ``None``, JAX detects them from the cluster (SLURM, Open MPI,
    Kubernetes/GKE, Cloud TPU) or from ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``.

    Args:
      local_device_count: CPU only: how many CPU devices this process exposes (sets
        ``jax_num_cpu_devices``); ``None`` keeps the default (or ``XLA_FLAGS``).
      cpu_collectives: ``jax_cpu_collectives_implementation`` (``"gloo"``; ``"mpi"``
        needs an MPI build); ``None`` leaves the flag alone. Without it, cross-process
        computations on CPU fail.
    """
    given = [coordinator_address is None, num_processes is None, process_id is None]
    if any(given) and not all(given):
        raise ValueError("pass all of coordinator_address, num_processes and process_id, "
                         "or none of them (cluster auto-detection), got "
                         f"coordinator_address={coordinator_address!r}, "
                         f"num_processes={num_processes!r}, process_id={process_id!r}.")
    if num_processes is not None:
        if isinstance(num_processes, bool) or not isinstance(num_processes, int) \
                or num_processes < 1:
            raise ValueError(f"num_processes must be an int >= 1, got {num_processes!r}.")
        if isinstance(process_id, bool) or not isinstance(process_id, int) \
                or not 0 <= process_id < num_processes:
            raise ValueError(f"process_id must be an int in [0, {num_processes}), "
                             f"got {process_id!r}.")
        if not isinstance(coordinator_address, str) or ":" not in coordinator_address:
            raise ValueError("coordinator_address must look like 'host:port', got "
                             f"{coordinator_address!r}.")
    if local_device_count is not None:
        if isinstance(local_device_count, bool) or not isinstance(local_device_count, int) \
                or local_device_count < 1:
            raise ValueError(f"local_device_count must be an int >= 1, got "
                             f"{local_device_count!r}.")
        jax.config.update("jax_num_cpu_devices", local_device_count)
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=initialization_timeout)


def global_mesh() -> Mesh:
    """A 1-D ``("data",)`` mesh over every device of every process, in process order
    (process 0's devices first), so process ``p`` owns a contiguous block of rows."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def process_rows(global_batch_size: int, mesh: Mesh | None = None) -> slice:
    """The rows of a global batch that this process feeds (contiguous, process order)."""
    mesh = global_mesh() if mesh is None else mesh
    n_dev = mesh.devices.size
    if global_batch_size % n_dev:
        raise ValueError(f"global_batch_size {global_batch_size} must be divisible by the "
                         f"{n_dev} devices of the mesh.")
    per_device = global_batch_size // n_dev
    mine = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
    if mine != list(range(mine[0], mine[0] + len(mine))):
        raise ValueError("this process's devices are not contiguous on the mesh; build it "
                         "with global_mesh().")
    return slice(mine[0] * per_device, (mine[-1] + 1) * per_device)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree of host values (the same on every process: params, optimiser
    state, teacher variables) replicated on every device of the global mesh."""
    sharding = NamedSharding(mesh, P())

    def put(x):
        x = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree_util.tree_map(put, tree)


def shard_host_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Global arrays split over ``"data"`` from this process's rows of the batch.

    ``local_batch`` holds the rows :func:`process_rows` names (leading dimension
    ``global_batch / num_processes``); the result has the global leading dimension.
    """
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    n_local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)

    def put(x):
        x = np.asarray(x)
        if x.shape[0] % n_local:
            raise ValueError(f"local batch leading dimension {x.shape[0]} must be divisible "
                             f"by this process's {n_local} devices.")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map(put, local_batch)


def to_host(tree: Any) -> Any:
    """NumPy copy of a pytree of *replicated* global arrays (losses, params)."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise ValueError("to_host needs replicated arrays; gather sharded ones "
                                 "with jax.experimental.multihost_utils.process_allgather.")
            x = x.addressable_data(0)
        return np.asarray(x)

    return jax.tree_util.tree_map(get, tree)


def train_steps(distiller, state, teacher_vars, local_batches: Iterable[Any], mesh: Mesh,
                *, rng: jax.Array | None = None) -> Iterator[tuple[Any, dict]]:
    """Runs ``distiller.train_step`` on each batch over all processes' devices.

    ``state`` and ``teacher_vars`` are host pytrees (identical on every process; e.g.
    ``jax.device_get(distiller.init(seed, x, teacher_vars))``); ``local_batches``
    yields this process's rows of each global batch. The key of step ``i`` is
    ``fold_in(rng, i)`` (default ``fold_in(state.seed_key, 0)``). Yields
    ``(state, terms)`` after each step, with ``terms`` as host floats.
    """
    state = replicate(state, mesh)
    tvars = replicate(teacher_vars, mesh)
    if rng is None:
        rng = jax.random.fold_in(np.asarray(jax.device_get(state.seed_key)), 0)
    rng = replicate(rng, mesh)
    step = jax.jit(distiller.train_step, donate_argnums=(0,))
    for i, local in enumerate(local_batches):
        batch = shard_host_batch(local, mesh)
        state, terms = step(state, tvars, batch, jax.random.fold_in(rng, i))
        yield state, {k: float(v) for k, v in to_host(terms).items()}


def env_config() -> dict[str, Any]:
    """``(coordinator_address, num_processes, process_id)`` from ``KDJAX_COORDINATOR``,
    ``KDJAX_NUM_PROCESSES``, ``KDJAX_PROCESS_ID`` (all ``None`` when unset: JAX's own
    cluster detection then applies)."""
    addr = os.environ.get("KDJAX_COORDINATOR")
    n = os.environ.get("KDJAX_NUM_PROCESSES")
    pid = os.environ.get("KDJAX_PROCESS_ID")
    return {"coordinator_address": addr, "num_processes": int(n) if n else None,
            "process_id": int(pid) if pid else None}
