"""One process of the streamed multi-process fit:
``python _mp_fit_worker.py ADDR N PID LOCAL OUT [CKPT_DIR [DIE_EPOCH DIE_BATCH]]``."""

import json
import os
import sys

os.environ.pop("XLA_FLAGS", None)        # the device count comes from initialize()
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    addr, n, pid, local, out = sys.argv[1:6]
    ckpt = sys.argv[6] if len(sys.argv) > 6 else None
    die_at = (int(sys.argv[7]), int(sys.argv[8])) if len(sys.argv) > 8 else None
    from kdjax.train import distributed

    distributed.initialize(addr, int(n), int(pid), local_device_count=int(local))
    import jax
    import numpy as np

    import _mp_fit_common as common

    jax.config.update("jax_default_matmul_precision", "highest")
    mesh = distributed.global_mesh()
    params, starts, rows = common.run(mesh, distributed.replicate, ckpt, die_at)
    # every process reports what it computed (the test checks they all agree)
    np.savez(out, params=common.flat(params), devices=jax.device_count(),
             primary=distributed.is_primary(), starts=np.asarray(starts))
    with open(out + ".json", "w") as f:
        json.dump(rows, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
