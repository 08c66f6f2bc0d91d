"""One process of the multi-process test: ``python _mp_worker.py ADDR N PID LOCAL OUT``."""

import os
import sys

os.environ.pop("XLA_FLAGS", None)        # the device count comes from initialize()
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    addr, n, pid, local, out = sys.argv[1:6]
    from kdjax.train import distributed

    distributed.initialize(addr, int(n), int(pid), local_device_count=int(local))
    import jax
    import numpy as np

    import _mp_common as common

    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.process_count() == int(n) and jax.local_device_count() == int(local)
    d, state, tvars, batches = common.problem()
    mesh = distributed.global_mesh()
    rows = distributed.process_rows(common.GLOBAL_BATCH, mesh)
    local_batches = [{k: v[rows] for k, v in b.items()} for b in batches]
    losses = []
    for state, terms in distributed.train_steps(d, state, tvars, local_batches, mesh,
                                                rng=jax.random.PRNGKey(7)):
        losses.append(terms["total"])
    params = distributed.to_host(state.params)
    np.savez(out, losses=np.asarray(losses), params=common.flat(params),
             devices=jax.device_count(), rows=np.asarray([rows.start, rows.stop]))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
