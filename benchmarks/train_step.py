"""Distillation-step throughput: samples/s, XLA FLOPs, achieved FLOP/s vs matmul peak.

    python -m benchmarks.train_step [--batch-sizes 64,256,1024] [--pairs default,digits_mlp]
                                    [--teacher step,precomputed] [--dtype float32]

For each pair, batch size and teacher mode, the KD step (0.1 CE + 0.9 KD, SGD, state
donated) is timed three ways after warm-up: one jitted step on its own ("step"), and
inside an on-device epoch as ``fit`` runs it, both as one ``lax.scan`` over the steps
(``epoch_mode="scan"``) and as a loop of jitted steps (``epoch_mode="loop"``).
``auto`` is the mode ``Distiller(epoch_mode="auto")`` (the default) picks; the fraction
of peak uses it. Teacher modes: ``step`` runs the teacher's forward pass in every step
(what a step with augmentation must do), ``precomputed`` reads teacher logits computed
once (``teacher_from_batch=True``; what the drivers do when the teacher input is
deterministic). FLOPs are XLA's cost analysis of the compiled step; the peak is a dense
matmul of the same dtype measured in the same run. ``--dtype bfloat16`` runs the
networks in bf16 (``compute_dtype``; parameters and losses stay float32). Prints a
table and writes ``benchmarks/results/train_step.json``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

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


def build(pair: str, batch: int, num_classes: int = 10, *, teacher_mode: str = "step",
          epoch_mode: str = "auto", dtype=jnp.float32):
    """``(distiller, state, teacher_vars, batch)`` of a pair. ``teacher_mode="precomputed"``
    puts the teacher's logits in the batch (the teacher variables are then ``None``)."""
    if teacher_mode not in ("step", "precomputed"):
        raise ValueError(f"teacher_mode must be 'step' or 'precomputed', got {teacher_mode!r}.")
    tname, tkw, sname, skw, shape = PAIRS[pair]
    # the networks compute in `dtype` (flax casts the float32 parameters), as the drivers
    # build them for `compute_dtype`
    teacher = models.create(tname, num_classes, dtype=dtype, **tkw)
    student = models.create(sname, num_classes, dtype=dtype, **skw)
    tx = make_optimizer({"name": "sgd", "learning_rate": 0.05, "schedule": "cosine"},
                        total_steps=1000, steps_per_epoch=100)
    pre = teacher_mode == "precomputed"
    d = Distiller(student, (methods.build({"name": "ce", "weight": 0.1}),
                            methods.build({"name": "kd", "weight": 0.9})), tx,
                  teacher=None if pre else teacher, teacher_from_batch=pre,
                  epoch_mode=epoch_mode, compute_dtype=dtype)
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, *shape)).astype(dtype)
    y = jax.random.randint(jax.random.PRNGKey(1), (batch,), 0, num_classes)
    tvars = teacher.init(jax.random.PRNGKey(2), x[:2], train=False)
    data = {"x": x, "y": y}
    if pre:
        data["teacher_logits"] = teacher.apply(tvars, x, train=False)[0]
        tvars = None
    state = d.init(0, x[:2], tvars)
    return d, state, tvars, data


def bench(pair: str, batch: int, peak: float, *, teacher_mode: str = "step",
          dtype=jnp.float32, epoch_steps: int = 16):
    d, state, tvars, batch_data = build(pair, batch, teacher_mode=teacher_mode, dtype=dtype)
    step = jax.jit(d.train_step, donate_argnums=(0,))
    key = jax.random.PRNGKey(3)
    flops = cost_flops(jax.jit(d.train_step), state, tvars, batch_data, key)
    holder = {"s": state}

    def run_step():
        holder["s"], terms = step(holder["s"], tvars, batch_data, key)
        return terms

    t_step = time_fn(run_step, repeats=5)["median_s"]
    # the same step inside an on-device epoch of `epoch_steps` steps, in both modes
    data = {k: jnp.concatenate([v] * epoch_steps) for k, v in batch_data.items()}
    per_step = {}
    for mode, runner in (("scan", d.jit_epoch), ("loop", d.loop_epoch)):
        epoch = runner(batch)
        holder["s"] = d.init(0, batch_data["x"][:2], tvars)

        def run_epoch():
            holder["s"], terms = epoch(holder["s"], tvars, data)
            return terms

        per_step[mode] = time_fn(run_epoch, repeats=3)["median_s"] / epoch_steps
    auto = d.resolve_epoch_mode(batch_data["x"])
    t = per_step[auto]
    return {
        "pair": pair, "teacher": teacher_mode, "dtype": jnp.dtype(dtype).name,
        "batch": batch, "step_ms": 1e3 * t_step, "scan_ms": 1e3 * per_step["scan"],
        "loop_ms": 1e3 * per_step["loop"], "auto": auto, "samples_per_s": batch / t,
        "gflop_per_step": flops / 1e9, "achieved_gflop_s": flops / t / 1e9,
        "fraction_of_peak": flops / t / peak,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch-sizes", default="64,256,1024")
    p.add_argument("--pairs", default="default,digits_mlp")
    p.add_argument("--teacher", default="step,precomputed")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    peak = matmul_peak_flops(dtype=dtype)
    print(f"measured dense {dtype.name} matmul peak: {peak / 1e9:.1f} GFLOP/s "
          f"({jax.devices()[0].device_kind}, {jax.device_count()} device(s))")
    rows = [bench(pair, int(b), peak, teacher_mode=tm, dtype=dtype)
            for pair in args.pairs.split(",") for tm in args.teacher.split(",")
            for b in args.batch_sizes.split(",")]
    name = "train_step" if dtype == jnp.float32 else f"train_step_{dtype.name}"
    report(name, rows, extra={"matmul_peak_gflop_s": peak / 1e9})
    return rows


if __name__ == "__main__":
    main()
