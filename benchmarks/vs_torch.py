"""kdjax's distillation step vs the same step in eager PyTorch (CPU), side by side.

    python -m benchmarks.vs_torch [--batch-sizes 64,256]

Same models (the default MNIST-1D pair: CNN1D teacher (32, 64, 128) -> CNN1D student
(16, 32), conv5 + BatchNorm + ReLU + avg-pool stages, global average pooling, linear
head), same loss (0.1 CE + 0.9 * 4^2 KL(p_T || p_S) at tau 4), same optimiser (SGD,
momentum 0.9), same batch, same threads (both libraries use the machine's cores;
torch's intra-op threads are set to ``os.cpu_count()``). kdjax runs the step inside
its on-device epoch, both as one ``lax.scan`` (``epoch_mode="scan"``) and as a loop of
jitted steps (``epoch_mode="loop"``; what the default ``"auto"`` picks for this conv
student on CPU); torch runs its usual eager loop. Two teacher modes, the same on both
sides: ``step`` (teacher forward in every step) and ``precomputed`` (teacher logits
computed once and read from the batch, as kdjax's drivers do for a deterministic
teacher input). On a GPU machine torch runs on CUDA (synchronised before timing).
Skipped with a message when torch is not installed (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import os
import time

import jax

from benchmarks._common import report, time_fn
from benchmarks.train_step import build


def torch_step_time(batch: int, steps: int = 16, repeats: int = 3,
                    teacher_mode: str = "step") -> float:
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count() or 1)
    dev = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def cnn1d(channels, num_classes=10):
        layers, c_in = [], 1
        for i, c in enumerate(channels):
            layers += [tnn.Conv1d(c_in, c, 5, padding=2, bias=False), tnn.BatchNorm1d(c),
                       tnn.ReLU()]
            if i < len(channels) - 1:
                layers.append(tnn.AvgPool1d(2))
            c_in = c
        return tnn.Sequential(*layers), tnn.Linear(c_in, num_classes)

    t_body, t_head = (m.to(dev) for m in cnn1d((32, 64, 128)))
    s_body, s_head = (m.to(dev) for m in cnn1d((16, 32)))
    t_body.eval(), t_head.eval()
    params = list(s_body.parameters()) + list(s_head.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    x = torch.randn(batch, 1, 40, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    tau = 4.0
    with torch.no_grad():
        zt_pre = t_head(t_body(x).mean(-1))

    def step():
        if teacher_mode == "precomputed":
            zt = zt_pre
        else:
            with torch.no_grad():
                zt = t_head(t_body(x).mean(-1))
        zs = s_head(s_body(x).mean(-1))
        ce = F.cross_entropy(zs, y)
        kd = F.kl_div(F.log_softmax(zs / tau, -1), F.log_softmax(zt / tau, -1),
                      reduction="batchmean", log_target=True) * tau**2
        loss = 0.1 * ce + 0.9 * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(3):
        step()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def kdjax_step_time(batch: int, steps: int = 16, mode: str = "scan",
                    teacher_mode: str = "step") -> float:
    import jax.numpy as jnp

    d, state, tvars, b = build("default", batch, teacher_mode=teacher_mode)
    data = {k: jnp.concatenate([v] * steps) for k, v in b.items()}
    epoch = d.loop_epoch(batch) if mode == "loop" else d.jit_epoch(batch)
    holder = {"s": state}

    def run():
        holder["s"], t = epoch(holder["s"], tvars, data)
        return t

    return time_fn(run, repeats=3)["min_s"] / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch-sizes", default="64,256")
    p.add_argument("--teacher", default="step,precomputed")
    args = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("torch is not installed: skipping the PyTorch comparison "
              "(pip install -e '.[bench]' installs the CPU wheel torch==2.13.0).")
        return []
    rows = []
    for tm in args.teacher.split(","):
        for b in map(int, args.batch_sizes.split(",")):
            tj = kdjax_step_time(b, teacher_mode=tm)
            tl = kdjax_step_time(b, mode="loop", teacher_mode=tm)
            tt = torch_step_time(b, teacher_mode=tm)
            rows.append({"teacher": tm, "batch": b, "kdjax_scan_step_ms": 1e3 * tj,
                         "kdjax_loop_step_ms": 1e3 * tl, "torch_eager_step_ms": 1e3 * tt,
                         "speedup_scan_over_torch": tt / tj,
                         "speedup_loop_over_torch": tt / tl, "torch": torch.__version__,
                         "torch_device": "cuda" if jax.default_backend() == "gpu" else "cpu",
                         "threads": os.cpu_count()})
    report("vs_torch", rows)
    return rows


if __name__ == "__main__":
    main()
