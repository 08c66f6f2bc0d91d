"""Shared benchmark helpers: machine info, timing of jitted functions, table + JSON output.

Every benchmark prints a Markdown table and writes ``benchmarks/results/<name>.json``
(or ``$KDJAX_BENCH_OUT/<name>.json``) holding the rows and :func:`machine_info`.
Timings use ``block_until_ready`` and a warm-up call (so compilation is excluded and
reported separately where relevant).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def machine_info() -> dict[str, Any]:
    """CPU/accelerator kind, device count, versions: recorded with every result."""
    dev = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def block(x):
    return jax.tree_util.tree_map(
        lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def time_fn(fn: Callable[[], Any], *, repeats: int = 5, min_time: float = 0.2,
            warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of ``fn()`` (outputs blocked), after ``warmup`` calls.

    Each of ``repeats`` measurements loops ``fn`` until ``min_time`` seconds pass.
    """
    for _ in range(warmup):
        block(fn())
    samples = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            block(fn())
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        samples.append(dt / n)
    return {"median_s": statistics.median(samples), "min_s": min(samples),
            "max_s": max(samples)}


def matmul_peak_flops(n: int | None = None, dtype=np.float32, repeats: int = 5) -> float:
    """Measured dense-matmul peak FLOP/s of the default device (n x n @ n x n, jit; n =
    2048 on CPU, 8192 on accelerators, at JAX's default matmul precision)."""
    n = n or (2048 if jax.default_backend() == "cpu" else 8192)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    t = time_fn(lambda: f(a, b), repeats=repeats)["min_s"]
    return 2.0 * n**3 / t


def cost_flops(jitted, *args) -> float:
    """Matmul and convolution FLOPs of one call of ``jitted(*args)``, counted on its jaxpr.

    ``2 * prod(out) * prod(contracted)`` per ``dot_general`` and ``2 * prod(out) *
    prod(window) * in_features / groups`` per ``conv_general_dilated``, sub-jaxprs
    included (a ``scan`` body counts ``length`` times): the "model FLOPs" that a dense
    matmul peak bounds. Counted on the jaxpr rather than by XLA's cost analysis, which
    counts cuDNN convolutions as 0 FLOPs on GPU (elementwise work is not counted here).
    """
    closed = jax.make_jaxpr(getattr(jitted, "__wrapped__", jitted))(*args)
    return _jaxpr_flops(closed.jaxpr)


def _jaxpr_flops(jaxpr) -> float:
    from kdjax._jaxpr import iter_eqns

    total = 0.0
    for e, times in iter_eqns(jaxpr):
        name = e.primitive.name
        if name == "dot_general":
            (lc, _), _ = e.params["dimension_numbers"]
            a = e.invars[0].aval.shape
            total += times * 2.0 * np.prod(e.outvars[0].aval.shape) * np.prod(
                [a[i] for i in lc])
        elif name == "conv_general_dilated":
            rhs = e.invars[1].aval.shape
            spec = e.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
            window = np.prod([rhs[i] for i in spec[2:]])
            total += times * 2.0 * np.prod(e.outvars[0].aval.shape) * window * rhs[spec[1]]
    return total


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def report(name: str, rows: Sequence[dict[str, Any]], *, columns=None, extra=None,
           out_dir: str | None = None) -> str:
    """Prints the table and writes ``<out_dir>/<name>.json`` atomically; returns the path."""
    table = markdown_table(rows, columns)
    print(f"\n## {name}\n\n{table}\n")
    out_dir = out_dir or os.environ.get("KDJAX_BENCH_OUT") or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    payload = {"benchmark": name, "machine": machine_info(), "rows": list(rows),
               **(extra or {})}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path
