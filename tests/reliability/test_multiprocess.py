"""Two CPU processes on localhost (gloo) run the sharded distillation step and match the
single-process run (kdjax.train.distributed)."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import _mp_common as common  # noqa: E402  (tests/reliability is on sys.path via rootdir)
from kdjax.train import distributed, make_mesh, replicate, shard_batch

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process(num_devices):
    d, state, tvars, batches = common.problem()
    mesh = make_mesh(num_devices)
    state, tvars = replicate(state, mesh), replicate(tvars, mesh)
    step = jax.jit(d.train_step)
    rng = jax.random.PRNGKey(7)
    losses = []
    for i, b in enumerate(batches):
        state, terms = step(state, tvars, shard_batch(b, mesh), jax.random.fold_in(rng, i))
        losses.append(float(terms["total"]))
    return np.asarray(losses), common.flat(state.params)


@pytest.mark.slow
@pytest.mark.parametrize("local_devices", [1, 2])
def test_two_processes_match_single_process(tmp_path, local_devices):
    addr = f"127.0.0.1:{_free_port()}"
    procs = []
    for pid in range(2):
        out = tmp_path / f"p{pid}.npz"
        procs.append((subprocess.Popen(
            [sys.executable, os.path.join(HERE, "_mp_worker.py"), addr, "2", str(pid),
             str(local_devices), str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), out))
    try:
        for p, _ in procs:
            p.wait(timeout=300)
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
    for p, _ in procs:
        assert p.returncode == 0, p.stdout.read()[-4000:]
    res = [np.load(out) for _, out in procs]
    n_global = 2 * local_devices
    assert all(int(r["devices"]) == n_global for r in res)
    # each process fed its own half of the global batch
    per = common.GLOBAL_BATCH // 2
    assert [tuple(r["rows"]) for r in res] == [(0, per), (per, 2 * per)]
    ref_losses, ref_params = _single_process(n_global)
    for r in res:
        np.testing.assert_allclose(r["losses"], ref_losses, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r["params"], ref_params, rtol=1e-5, atol=1e-6)
    # and training did something (the comparison is not between two no-ops)
    assert not np.allclose(ref_params, common.flat(common.problem()[1].params))
    assert len(set(np.round(ref_losses, 6))) > 1


def test_initialize_validates_its_arguments():
    with pytest.raises(ValueError, match=r"pass all of coordinator_address, num_processes "
                                         r"and process_id, or none of them"):
        distributed.initialize("127.0.0.1:1234", 2)
    with pytest.raises(ValueError, match=r"process_id must be an int in \[0, 2\), got 2"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match=r"coordinator_address must look like 'host:port', "
                                         r"got 'localhost'"):
        distributed.initialize("localhost", 2, 0)


@pytest.mark.slow
def test_single_process_helpers_match_the_engine_path():
    # on one process the helpers are the ordinary sharded path
    d, state, tvars, batches = common.problem()
    mesh = distributed.global_mesh()
    assert mesh.devices.size == jax.device_count()
    assert distributed.process_rows(16, mesh) == slice(0, 16)
    losses = [t["total"] for _, t in distributed.train_steps(
        d, state, tvars, batches[:1], mesh, rng=jax.random.PRNGKey(7))]
    ref_losses, _ = _single_process(1)
    np.testing.assert_allclose(losses[0], ref_losses[0], rtol=1e-5)
