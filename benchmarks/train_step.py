"""Distillation-step throughput: samples/s, XLA FLOPs, achieved FLOP/s vs matmul peak.

    python -m benchmarks.train_step [--batch-sizes 64,256,1024] [--pair default]

For each batch size: one jitted KD step (teacher forward under stop_gradient, student
forward+backward, optax update; state donated) timed after warm-up, and the same step
inside an on-device epoch, as ``fit`` runs it: one ``lax.scan`` over steps
(``epoch_mode="scan"``) and a loop of jitted steps (``epoch_mode="loop"``); the fraction
of peak uses the faster of the two. FLOPs are XLA's
cost analysis of the compiled step; the peak is a dense float32 matmul measured in the
same run. Prints a table and writes ``benchmarks/results/train_step.json``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._common import cost_flops, matmul_peak_flops, report, time_fn
from kdjax import methods, models
from kdjax.train import Distiller, make_optimizer

PAIRS = {
    # name: (teacher, teacher kwargs, student, student kwargs, input shape)
    "default": ("cnn1d", {"channels": (32, 64, 128)}, "cnn1d", {"channels": (16, 32)},
                (40, 1)),
    "digits_mlp": ("cnn2d", {"channels": (32, 64)}, "mlp", {"hidden": (128,)}, (8, 8, 1)),
    "resnet8x4": ("resnet32x4", {}, "resnet8x4", {}, (32, 32, 3)),
}


def build(pair: str, batch: int, num_classes: int = 10):
    tname, tkw, sname, skw, shape = PAIRS[pair]
    teacher = models.create(tname, num_classes, **tkw)
    student = models.create(sname, num_classes, **skw)
    tx = make_optimizer({"name": "sgd", "learning_rate": 0.05, "schedule": "cosine"},
                        total_steps=1000, steps_per_epoch=100)
    d = Distiller(student, (methods.build({"name": "ce", "weight": 0.1}),
                            methods.build({"name": "kd", "weight": 0.9})), tx, teacher=teacher)
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, *shape))
    y = jax.random.randint(jax.random.PRNGKey(1), (batch,), 0, num_classes)
    tvars = teacher.init(jax.random.PRNGKey(2), x[:2], train=False)
    state = d.init(0, x[:2], tvars)
    return d, state, tvars, {"x": x, "y": y}


def bench(pair: str, batch: int, peak: float, epoch_steps: int = 16):
    d, state, tvars, batch_data = build(pair, batch)
    step = jax.jit(d.train_step, donate_argnums=(0,))
    key = jax.random.PRNGKey(3)
    flops = cost_flops(jax.jit(d.train_step), state, tvars, batch_data, key)
    holder = {"s": state}

    def run_step():
        holder["s"], terms = step(holder["s"], tvars, batch_data, key)
        return terms

    t_step = time_fn(run_step, repeats=5)["median_s"]
    # the same step inside an on-device epoch of `epoch_steps` steps
    n = batch * epoch_steps
    data = {k: jnp.concatenate([v] * epoch_steps) for k, v in batch_data.items()}
    epoch = d.jit_epoch(batch)
    holder["s"] = d.init(0, batch_data["x"][:2], tvars)

    def run_epoch():
        holder["s"], terms = epoch(holder["s"], tvars, data)
        return terms

    t_epoch = time_fn(run_epoch, repeats=3)["median_s"] / epoch_steps
    loop = d.loop_epoch(batch)
    holder["s"] = d.init(0, batch_data["x"][:2], tvars)

    def run_loop():
        holder["s"], terms = loop(holder["s"], tvars, data)
        return terms

    t_loop = time_fn(run_loop, repeats=3)["median_s"] / epoch_steps
    t_best = min(t_epoch, t_loop)
    return {
        "pair": pair, "batch": batch, "step_ms": 1e3 * t_step,
        "samples_per_s": batch / t_step, "epoch_step_ms": 1e3 * t_epoch,
        "epoch_samples_per_s": n / (t_epoch * epoch_steps),
        "loop_step_ms": 1e3 * t_loop, "loop_samples_per_s": batch / t_loop,
        "gflop_per_step": flops / 1e9, "achieved_gflop_s": flops / t_best / 1e9,
        "fraction_of_peak": flops / t_best / peak,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch-sizes", default="64,256,1024")
    p.add_argument("--pairs", default="default,digits_mlp")
    args = p.parse_args(argv)
    peak = matmul_peak_flops()
    print(f"measured dense f32 matmul peak: {peak / 1e9:.1f} GFLOP/s "
          f"({jax.devices()[0].device_kind}, {jax.device_count()} device(s))")
    rows = [bench(pair, int(b), peak) for pair in args.pairs.split(",")
            for b in args.batch_sizes.split(",")]
    report("train_step", rows, extra={"matmul_peak_gflop_s": peak / 1e9})
    return rows


if __name__ == "__main__":
    main()
