"""Peak memory of one distillation step at growing batch sizes (XLA memory analysis).

    python -m benchmarks.memory [--batch-sizes 64,256,1024,4096] [--pair default]

Reports the compiled step's argument, output and temporary buffer sizes
(``compiled.memory_analysis()``); with donation the state's input and output buffers
alias, so peak is about arguments + temporaries. On a GPU the device's
``memory_stats()["peak_bytes_in_use"]`` is recorded too.
"""

from __future__ import annotations

import argparse

import jax

from benchmarks._common import report
from benchmarks.train_step import build


def bench(pair: str, batch: int):
    d, state, tvars, b = build(pair, batch)
    step = jax.jit(d.train_step, donate_argnums=(0,))
    compiled = step.lower(state, tvars, b, jax.random.PRNGKey(0)).compile()
    m = compiled.memory_analysis()
    row = {"pair": pair, "batch": batch,
           "argument_mb": m.argument_size_in_bytes / 2**20,
           "output_mb": m.output_size_in_bytes / 2**20,
           "temp_mb": m.temp_size_in_bytes / 2**20,
           "alias_mb": m.alias_size_in_bytes / 2**20}
    row["peak_estimate_mb"] = row["argument_mb"] + row["output_mb"] + row["temp_mb"] - row["alias_mb"]
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        compiled(state, tvars, b, jax.random.PRNGKey(0))
        row["device_peak_mb"] = jax.devices()[0].memory_stats()["peak_bytes_in_use"] / 2**20
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch-sizes", default="64,256,1024,4096")
    p.add_argument("--pair", default="default")
    args = p.parse_args(argv)
    rows = [bench(args.pair, int(b)) for b in args.batch_sizes.split(",")]
    report("memory", rows)
    return rows


if __name__ == "__main__":
    main()
