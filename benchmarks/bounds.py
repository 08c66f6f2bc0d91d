"""Cost of certified (IBP, CROWN-IBP, CROWN) and attack (PGD-k) gap bounds, per example,
relative to one joint teacher+student forward pass, over batch sizes; also the tightness
(mean certified gap bound / mean PGD gap, and CROWN / IBP).

    python -m benchmarks.bounds            # short default run (MLP and CNN2D pairs)
    python -m benchmarks.bounds --full     # more batch sizes

Writes ``benchmarks/results/bounds.json``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks._common import report, time_fn
from kdjax import faithful as F
from kdjax.models import CNN2D, MLP


def _pair(name):
    if name == "mlp":
        mt, ms, shape = MLP(10, hidden=(128, 128)), MLP(10, hidden=(64,)), (64,)
    else:
        mt, ms, shape = CNN2D(10, channels=(8, 16)), CNN2D(10, channels=(8,)), (8, 8, 1)
    x = jnp.zeros((1,) + shape)
    vt, vs = mt.init(jax.random.key(0), x), ms.init(jax.random.key(1), x)
    return (lambda z: mt.apply(vt, z)[0]), (lambda z: ms.apply(vs, z)[0]), shape


def main(full: bool = False):
    batches = (16, 64, 256) if full else (16, 64)
    eps, k = 0.02, 10
    rows = []
    for net in ("mlp", "cnn2d"):
        tf, sf, shape = _pair(net)
        for b in batches:
            x = jax.random.uniform(jax.random.key(2), (b,) + shape)
            fns = {
                "forward": jax.jit(lambda x: (tf(x), sf(x))),
                f"pgd-{k}": jax.jit(lambda x: F.pgd_gap(tf, sf, x, eps=eps, steps=k,
                                                         key=jax.random.key(3))[0]),
            }
            for m in ("ibp", "crown-ibp", "crown"):
                fns[m] = jax.jit(lambda x, m=m: F.gap_upper_bound(
                    F.margin_bounds(tf, sf, x, eps=eps, method=m))["gap"])
            t = {name: time_fn(lambda f=f: f(x), repeats=3, min_time=0.1)["median_s"]
                 for name, f in fns.items()}
            vals = {name: float(jnp.mean(f(x))) for name, f in fns.items() if name != "forward"}
            for name in fns:
                rows.append({
                    "net": net, "batch": b, "method": name,
                    "us_per_example": 1e6 * t[name] / b,
                    "x_forward": t[name] / t["forward"],
                    "mean_gap_value": vals.get(name, float("nan")),
                    "bound/pgd": vals[name] / vals[f"pgd-{k}"] if name in vals else
                    float("nan"),
                })
    ratios = {}
    for net in ("mlp", "cnn2d"):
        r = {row["method"]: row["mean_gap_value"] for row in rows
             if row["net"] == net and row["batch"] == batches[-1]}
        ratios[net] = {"crown_over_ibp": r["crown"] / r["ibp"],
                       "crown_ibp_over_ibp": r["crown-ibp"] / r["ibp"]}
    print("tightness ratios (mean certified gap bound):", ratios)
    report("bounds", rows, extra={"eps": eps, "pgd_steps": k, "tightness": ratios})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true")
    main(parser.parse_args().full)
