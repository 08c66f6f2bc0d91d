"""Data-parallel scaling over 1..8 devices (fake CPU devices here; real ones on a GPU box).

    python -m benchmarks.scaling [--devices 1,2,4,8] [--batch 256]

Each device count runs in its own process (``XLA_FLAGS=--xla_force_host_platform_
device_count=N`` must be set before jax starts) and times one on-device epoch of the
default distillation step with the global batch sharded over an N-device ``("data",)``
mesh; it also records the final loss so the runs can be checked for equality. On one
CPU, fake devices share the same cores: this measures sharding overhead and checks
correctness, not speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchmarks._common import report

CHILD = r"""
import json, sys, jax, jax.numpy as jnp
from benchmarks._common import time_fn
from benchmarks.train_step import build
from kdjax.train import make_mesh, replicate
n, batch, steps = int(sys.argv[1]), int(sys.argv[2]), 16
mesh = make_mesh(n) if jax.devices()[0].platform != "cpu" or jax.device_count() >= n else None
d, state, tvars, b = build("default", batch)
data = {k: jnp.concatenate([v] * steps) for k, v in b.items()}
epoch = d.epoch_runner(batch, b["x"], mesh)
state, data, tvars = replicate(state, mesh), replicate(data, mesh), replicate(tvars, mesh)
holder = {"s": state}
def run():
    holder["s"], t = epoch(holder["s"], tvars, data)
    return t
first = None
fresh = replicate(d.init(0, b["x"][:2], tvars), mesh)
_, t0 = jax.jit(d.epoch_fn(batch, mesh))(fresh, tvars, data)
t = time_fn(run, repeats=3)["min_s"]
print(json.dumps({"devices": n, "mode": d.resolve_epoch_mode(b["x"], mesh), "epoch_s": t,
                  "samples_per_s": steps * batch / t,
                  "first_epoch_loss": float(t0["total"]),
                  "platform": jax.devices()[0].platform}))
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--devices", default="1,2,4,8")
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args(argv)
    rows = []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for n in map(int, args.devices.split(",")):
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={n}").strip()
        out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(args.batch)],
                             env=env, cwd=root, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["samples_per_s"]
    for r in rows:
        r["relative_throughput"] = r["samples_per_s"] / base
        r["loss_rel_diff_vs_1"] = abs(r["first_epoch_loss"] - rows[0]["first_epoch_loss"]) / abs(
            rows[0]["first_epoch_loss"])
    report("scaling", rows)
    return rows


if __name__ == "__main__":
    main()
