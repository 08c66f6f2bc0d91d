"""Forward + backward time of the classic KD losses (jit), by batch size.

``python -m benchmarks.losses`` (short: batch 64 and 256) or ``--full`` (64 ... 1024).
Each row: loss, batch, median seconds of one jitted ``value_and_grad`` w.r.t. the
student input (compilation excluded; reported separately), and XLA's FLOP estimate.
Feature maps are ``[B, 8, 8, C]`` (C = 64 student / 64 teacher), embeddings ``[B, 128]``,
logits ``[B, 100]``; CRD's queue holds 16384 x 128.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from benchmarks._common import cost_flops, report, time_fn
from kdjax import losses


def _cases(b: int, c: int):
    k = jax.random.split(jax.random.key(0), 10)
    zs, zt = jax.random.normal(k[0], (b, 100)), jax.random.normal(k[1], (b, 100))
    y = jax.random.randint(k[2], (b,), 0, 100)
    fs, ft = jax.random.normal(k[3], (b, 8, 8, c)), jax.random.normal(k[4], (b, 8, 8, c))
    gs, gt = jax.random.normal(k[5], (b, 4, 4, c)), jax.random.normal(k[6], (b, 4, 4, c))
    es, et = jax.random.normal(k[7], (b, 128)), jax.random.normal(k[8], (b, 128))
    queue = losses.init_crd_queue(k[9], 16384, 128)
    log_scale = jnp.zeros((c,))
    return {
        "kd": (lambda s: losses.kd(s, zt), zs),
        "dkd": (lambda s: losses.dkd(s, zt, y), zs),
        "dkd_standardized": (lambda s: losses.dkd(s, zt, y, standardize=True), zs),
        "dist": (lambda s: losses.dist(s, zt), zs),
        "fitnet": (lambda s: losses.fitnet(s, ft), fs),
        "attention_transfer": (lambda s: losses.attention_transfer(s, ft), fs),
        "nst": (lambda s: losses.nst(s, ft), fs),
        "fsp": (lambda s: losses.fsp(s, gs, ft, gt), fs),
        "activation_boundary": (lambda s: losses.activation_boundary(s, ft), fs),
        "factor_transfer": (lambda s: losses.factor_transfer(s, ft), fs),
        "vid": (lambda s: losses.vid(s, ft, log_scale), fs),
        "similarity_preserving": (lambda s: losses.similarity_preserving(s, ft), fs),
        "cc_taylor": (lambda s: losses.correlation_congruence(s, et), es),
        "rkd": (lambda s: losses.rkd(s, et), es),
        "pkt": (lambda s: losses.pkt(s, et), es),
        "crd_in_batch": (lambda s: losses.crd(s, et), es),
        "crd_queue": (lambda s, q: losses.crd_queue(s, et, q)[0], es, queue),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="batch 64..1024")
    parser.add_argument("--only", default="", help="comma-separated loss names")
    parser.add_argument("--channels", type=int, default=64)
    args = parser.parse_args(argv)
    batches = (64, 128, 256, 512, 1024) if args.full else (64, 256)
    only = {n for n in args.only.split(",") if n}
    rows = []
    for b in batches:
        for name, (fn, x, *extra) in _cases(b, args.channels).items():
            if only and name not in only:
                continue
            # Large constants (the CRD queue) are arguments, not closure constants.
            step = jax.jit(jax.value_and_grad(fn))
            t0 = time.perf_counter()
            jax.block_until_ready(step(x, *extra))
            compile_s = time.perf_counter() - t0
            t = time_fn(lambda: step(x, *extra), repeats=3, min_time=0.1)
            rows.append({"loss": name, "batch": b, "fwd_bwd_ms": 1e3 * t["median_s"],
                         "min_ms": 1e3 * t["min_s"], "compile_s": compile_s,
                         "gflops": cost_flops(step, x, *extra) / 1e9})
            print(rows[-1], flush=True)
    report("losses", rows, columns=["loss", "batch", "fwd_bwd_ms", "min_ms", "compile_s",
                                    "gflops"],
           extra={"args": vars(args), "note": "jit value_and_grad w.r.t. the student "
                  "input; median of 3 repeats; CPU machine shared with other jobs"})


if __name__ == "__main__":
    main()
