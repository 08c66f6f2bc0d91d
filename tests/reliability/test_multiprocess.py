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
import _mp_fit_common as fit_common  # noqa: E402
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


# ------------------------------------------------------------- streamed multi-host fit
def _launch_fit(tmp_path, tag, local_devices, ckpt=None, die_at=None):
    addr = f"127.0.0.1:{_free_port()}"
    procs = []
    for pid in range(2):
        out = str(tmp_path / f"{tag}_p{pid}.npz")
        args = [sys.executable, os.path.join(HERE, "_mp_fit_worker.py"), addr, "2",
                str(pid), str(local_devices), out]
        if ckpt is not None:
            args.append(str(ckpt))
        if die_at is not None:
            args += [str(die_at[0]), str(die_at[1])]
        procs.append((subprocess.Popen(args, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True), out))
    try:
        for p, _ in procs:
            p.wait(timeout=400)
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
    return procs


def _results(procs):
    import json

    for p, _ in procs:
        assert p.returncode == 0, p.stdout.read()[-4000:]
    out = []
    for _, path in procs:
        with open(path + ".json") as f:
            out.append((np.load(path), json.load(f)))
    return out


def _assert_rows_close(rows, ref_rows):
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in ref_rows]
    for r, q in zip(rows, ref_rows):
        for part in ("train", "test"):
            for k, v in q[part].items():
                np.testing.assert_allclose(r[part][k], v, rtol=1e-5, atol=1e-6,
                                           err_msg=f"{part}/{k}")


@pytest.fixture(scope="module")
def single_process_fit():
    mesh = make_mesh(4)
    params, _, rows = fit_common.run(mesh, replicate)
    return fit_common.flat(params), rows


@pytest.mark.slow
def test_two_process_streamed_fit_equals_one_process(tmp_path, single_process_fit):
    ref_params, ref_rows = single_process_fit
    res = _results(_launch_fit(tmp_path, "fit", 2))
    assert [bool(r["primary"]) for r, _ in res] == [True, False]
    for arrays, rows in res:
        assert int(arrays["devices"]) == 4 and arrays["starts"].tolist() == [0, 0, 0]
        np.testing.assert_allclose(arrays["params"], ref_params, rtol=1e-5, atol=1e-6)
        _assert_rows_close(rows, ref_rows)
    # training moved the parameters and evaluation saw the whole (padded) test set
    init = fit_common.flat(fit_common.problem()[1].params["student"])
    assert not np.allclose(ref_params[:init.size], init)
    assert len(ref_rows) == fit_common.EPOCHS


@pytest.mark.slow
def test_two_process_streamed_fit_killed_mid_epoch_resumes(tmp_path, single_process_fit):
    ref_params, ref_rows = single_process_fit
    ckpt = tmp_path / "ckpt"
    procs = _launch_fit(tmp_path, "killed", 2, ckpt, die_at=(1, 5))
    assert [p.returncode for p, _ in procs] == [3, 3], procs[0][0].stdout.read()[-3000:]
    steps = sorted(int(n) for n in os.listdir(ckpt) if n.isdigit())
    assert steps[-1] == 8 + 4          # epoch 1, after its 4th step (saved every 2)
    res = _results(_launch_fit(tmp_path, "resumed", 2, ckpt))
    for arrays, rows in res:
        # epoch 1 continued at batch 4 (after the last mid-epoch save), epoch 2 from 0
        assert arrays["starts"].tolist() == [4, 0]
        np.testing.assert_allclose(arrays["params"], ref_params, rtol=1e-5, atol=1e-6)
        # the resumed run evaluates epochs 2 and 3 with the uninterrupted run's numbers
        _assert_rows_close(rows, ref_rows[1:])
