"""Seeds as one vmapped program vs sequential runs.

    python -m benchmarks.seeds [--seeds 1,4,8] [--pairs digits_mlp,default]
                               [--teacher precomputed] [--modes auto]

For S seeds, time one epoch of ``S`` independent distillation runs (a) as one program,
the epoch vmapped over a stacked state (what ``fit`` does with one) and (b) as S
sequential epochs, in the epoch mode ``"auto"`` picks (``--modes scan,loop`` for
both). The teacher's logits are precomputed by default, as the drivers do, so the step
is the student's alone: the small configuration the issue names. Vmapping pays when a
single run leaves the device idle (per-step dispatch or kernel-launch overhead, small
kernels on a large device); it cannot beat the cores a single run already uses.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp

from benchmarks._common import report, time_fn
from benchmarks.train_step import build


def bench(pair: str, seeds: int, batch: int = 64, steps: int = 16,
          teacher_mode: str = "precomputed", mode: str = "auto"):
    d, _, tvars, b = build(pair, batch, teacher_mode=teacher_mode, epoch_mode=mode)
    mode = d.resolve_epoch_mode(b["x"])
    data = {k: jnp.concatenate([v] * steps) for k, v in b.items()}
    x0 = b["x"][:2]
    stacked = d.init_seeds(list(range(seeds)), x0, tvars)
    vm = d.epoch_runner(batch, x0, num_seeds=seeds)
    holder = {"v": stacked}

    def run_vmapped():
        holder["v"], t = vm(holder["v"], tvars, data)
        return t

    t_vm = time_fn(run_vmapped, repeats=3)["min_s"]
    single = d.epoch_runner(batch, x0)
    states = [d.init(s, x0, tvars) for s in range(seeds)]

    def run_sequential():
        out = None
        for i in range(seeds):
            states[i], out = single(states[i], tvars, data)
        return out

    t_seq = time_fn(run_sequential, repeats=3)["min_s"]
    auto = d.resolve_seed_mode(b["x"], seeds)   # the documented rule (Distiller.seed_mode)
    return {"pair": pair, "teacher": teacher_mode, "mode": mode, "seeds": seeds,
            "batch": batch, "vmapped_epoch_s": t_vm,
            "sequential_epoch_s": t_seq, "throughput_ratio": t_seq / t_vm,
            "auto": auto, "auto_vs_sequential": t_seq / t_vm if auto == "vmap" else 1.0,
            "samples_per_s_vmapped": seeds * steps * batch / t_vm}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", default="1,4,8")
    p.add_argument("--pairs", default="digits_mlp,default")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--teacher", default="precomputed")
    p.add_argument("--modes", default="auto")
    args = p.parse_args(argv)
    rows = [bench(pair, int(s), args.batch, teacher_mode=args.teacher, mode=m)
            for pair in args.pairs.split(",") for m in args.modes.split(",")
            for s in args.seeds.split(",")]
    report("seeds", rows)
    return rows


if __name__ == "__main__":
    main()
