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

:func:`stream_epoch_runner` is the epoch of :func:`kdjax.train.fit` when the training
data is a :class:`kdjax.data.Stream`: each process reads only its rows of every global
batch (grain workers decode/augment them), the global batch is assembled with
``jax.make_array_from_process_local_data``, and the step and its keys are the in-memory
engine's, so a stream gives the same numbers as the in-memory path on data that fits
both ways. With a ``Checkpointer`` it also saves mid-epoch (state, the stream's
position and the running loss sums), so a killed run resumes at the same example.
:func:`evaluate_stream` evaluates over a stream with the masked sufficient statistics
of :mod:`kdjax.train.metrics`, summed over the global batch (XLA's collectives), so
every process gets the metrics of the whole set.

Launching on a cluster: see ``docs/scale.md`` (SLURM and TPU pod launch lines, one
process per host). On one machine, two CPU processes on localhost reproduce it (that is
what ``tests/reliability/test_multiprocess.py`` does).
"""

from __future__ import annotations

import os
import types
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdjax.train.epoch import batch_plan, default_epoch_key
from kdjax.train.sharding import DATA_AXIS

__all__ = ["initialize", "global_mesh", "process_rows", "replicate", "shard_host_batch",
           "to_host", "train_steps", "env_config", "is_primary", "stream_epoch_runner",
           "evaluate_stream", "evaluate_streams"]


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


def is_primary() -> bool:
    """True on process 0: the one process that writes results, tables and plots
    (orbax checkpoints are written collectively: every process calls ``save``)."""
    return jax.process_index() == 0


def _batch_rows(batch_size: int, mesh: Mesh | None) -> slice:
    return slice(0, batch_size) if mesh is None else process_rows(batch_size, mesh)


def _to_global(local: dict, mesh: Mesh | None):
    if mesh is None:
        return jax.tree_util.tree_map(jnp.asarray, local)
    return shard_host_batch(local, mesh)


def stream_epoch_runner(distiller, stream, batch_size: int, mesh: Mesh | None = None, *,
                        index_fn=None, checkpointer=None, checkpoint_every_steps: int = 0):
    """``epoch(state, teacher_vars, data=None) -> (state, mean terms)`` over a stream.

    The same contract as the engine's epochs (:mod:`kdjax.train.epoch`): the plan of
    epoch ``e`` is ``batch_plan(fold_in(default_epoch_key(state), 0), n, B, index_fn)``
    (a permutation from ``fold_in(seed_key, e)``, or ``index_fn``'s batches), step
    ``i`` trains on the rows ``plan[i]`` with key ``fold_in(key, i + 1)``; only where
    the rows come from differs (this process's share of each global batch, read from ``stream``, versus a gather
    from device memory). The batch holds the keys of ``stream.example()`` (``x``,
    ``y``, extras), as the in-memory dict of ``fit``.

    ``checkpointer`` (a :class:`~kdjax.train.Checkpointer` of its own, e.g. under
    ``<run>/stream``) with ``checkpoint_every_steps = k > 0``: after every ``k`` steps
    the state, the stream position (:meth:`StreamIterator.get_state`) and the running
    sums of the loss terms are saved; an epoch that finds a checkpoint of itself resumes
    after its last saved step, so a killed run continues at the same example and ends
    with the parameters of an uninterrupted one. Seed-batched states are not supported.
    """
    if checkpoint_every_steps and checkpointer is None:
        raise ValueError("checkpoint_every_steps > 0 needs a checkpointer, got None.")
    n = len(stream)
    rows = _batch_rows(batch_size, mesh)
    keys = tuple(stream.example())
    step = jax.jit(lambda st, tv, b, k, i: distiller.train_step(
        st, tv, b, jax.random.fold_in(k, i + 1)), donate_argnums=(0,))

    def epoch(state, teacher_vars, data=None):
        del data
        if np.ndim(to_host(state.epoch)):
            raise ValueError("streams train one seed at a time; got a state with a "
                             "leading seed axis.")
        e = int(to_host(state.epoch))
        host = types.SimpleNamespace(seed_key=jnp.asarray(to_host(state.seed_key)),
                                     epoch=jnp.asarray(e, jnp.int32))
        key = default_epoch_key(host)
        plan = np.asarray(batch_plan(jax.random.fold_in(key, 0), n, batch_size, index_fn))
        start, sums = 0, None
        if checkpointer is not None:
            restored = checkpointer.restore_latest(state)
            if restored is not None and restored[2].get("epoch") == e:
                _, state, meta = restored
                start, sums = meta["stream"]["next_batch"], meta["sums"]
        it = stream.batches(batch_size, order=plan.reshape(-1), rows=rows,
                            drop_remainder=True, start_batch=start, seed=0, epoch=e)
        key = replicate(key, mesh) if mesh is not None else key
        for i, local in enumerate(it, start=start):
            batch = _to_global({k: local[k] for k in keys}, mesh)
            state, terms = step(state, teacher_vars, batch, key, i)
            t = {k: float(v) for k, v in to_host(terms).items()}
            sums = t if sums is None else {k: sums[k] + t[k] for k in t}
            if checkpoint_every_steps and (i + 1) % checkpoint_every_steps == 0 \
                    and i + 1 < len(plan):
                checkpointer.save(e * len(plan) + i + 1, state,
                                  {"epoch": e, "stream": it.get_state(), "sums": sums})
        state = state.replace(epoch=state.epoch + 1)
        return state, {k: v / len(plan) for k, v in sums.items()}

    return epoch


def evaluate_stream(distiller, state, stream, batch_size: int = 512,
                    mesh: Mesh | None = None, *, teacher=None, num_groups: int = 0,
                    group_key: str = "group") -> dict[str, float]:
    """Metrics of the student (eval mode) over every example of ``stream``.

    Each process reads its rows of each padded global batch; per-batch masked sums
    (:func:`kdjax.train.metrics.batch_stats`) are computed on the global batch (so
    they are global sums, replicated on every process) and accumulated on the host:
    the result is the same on every process and equals the single-process metrics.
    ``teacher``: optional ``(module, variables)`` for agreement / KL to the teacher.
    """
    return evaluate_streams(distiller, state, {"_": stream}, batch_size, mesh,
                            teacher=teacher, num_groups=num_groups, group_key=group_key)["_"]


def evaluate_streams(distiller, state, streams, batch_size: int = 512,
                     mesh: Mesh | None = None, *, teacher=None, num_groups: int = 0,
                     group_key: str = "group") -> dict[str, dict[str, float]]:
    """:func:`evaluate_stream` of every ``{name: stream}`` with one compiled program."""
    from kdjax.train import metrics as metrics_lib

    rows = _batch_rows(batch_size, mesh)

    @jax.jit
    def stats(st, tvars, b):
        logits = distiller.student_apply(st)(b["x"])[0]
        t_logits = None
        if teacher is not None:
            t_logits = teacher[0].apply(tvars, b["x"], train=False)[0].astype(jnp.float32)
        group = b.get(group_key) if num_groups else None
        return metrics_lib.batch_stats(logits, b["y"], b["mask"], t_logits, group=group,
                                       num_groups=num_groups)

    tvars = None if teacher is None else teacher[1]
    keep = ["x", "y", "mask"] + ([group_key] if num_groups else [])
    out = {}
    for name, stream in streams.items():
        total = None
        for local in stream.batches(batch_size, shuffle=False, drop_remainder=False,
                                    rows=rows):
            s = to_host(stats(state, tvars, _to_global({k: local[k] for k in keep}, mesh)))
            total = s if total is None else jax.tree_util.tree_map(np.add, total, s)
        out[name] = metrics_lib.finalize(total)
    return out
