"""Cost of certified (IBP, CROWN-IBP, CROWN) and attack (PGD-k) gap bounds, per example,
relative to one joint teacher+student forward pass, over batch sizes; also the tightness
(mean certified gap bound / mean PGD gap, and CROWN / IBP).

    python -m benchmarks.bounds            # short default run (MLP and CNN2D pairs)
    python -m benchmarks.bounds --full     # more batch sizes
    python -m benchmarks.bounds --tightness  # bound widths per activation (IBP, CROWN-IBP,
                                             # CROWN) on random MLPs, with PGD violations

Writes ``benchmarks/results/bounds.json`` (``bounds_tightness.json`` for --tightness).

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


ACTIVATIONS = {
    "relu": jax.nn.relu, "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid, "gelu": jax.nn.gelu,
    "silu": jax.nn.silu, "softplus": jax.nn.softplus, "elu": jax.nn.elu,
    "leaky_relu": jax.nn.leaky_relu, "hard_tanh": jax.nn.hard_tanh,
}


def _mlp(act, seed, width=32, depth=2, d=16, k=10):
    keys = jax.random.split(jax.random.key(seed), depth + 1)
    dims = [d] + [width] * depth + [k]
    ws = [jax.random.normal(kk, (a, b)) / jnp.sqrt(a) for kk, a, b in zip(keys, dims, dims[1:])]

    def fn(x):
        h = x
        for w in ws[:-1]:
            h = act(h @ w) if act != "layernorm" else jax.nn.relu(_ln(h @ w))
        return h @ ws[-1]
    return fn


def _ln(h):
    mu = h.mean(-1, keepdims=True)
    return (h - mu) * jax.lax.rsqrt(((h - mu) ** 2).mean(-1, keepdims=True) + 1e-5)


def _maxpool_net(seed):
    keys = jax.random.split(jax.random.key(seed), 2)
    w1, w2 = jax.random.normal(keys[0], (16, 32)) / 4, jax.random.normal(keys[1], (16, 10)) / 4
    return lambda x: jnp.max(jax.nn.relu(x @ w1).reshape(x.shape[0], 16, 2), -1) @ w2


def tightness(eps=0.05, batch=32, seeds=(0, 1, 2)):
    """Mean output-bound width per method, and PGD points outside the bounds (must be 0)."""
    nets = {**{a: (lambda s, a=a: _mlp(ACTIVATIONS[a], s)) for a in ACTIVATIONS},
            "layernorm+relu": lambda s: _mlp("layernorm", s), "maxpool": _maxpool_net}
    rows = []
    for name, make in nets.items():
        for seed in seeds:
            fn = make(seed)
            x = jax.random.normal(jax.random.key(100 + seed), (batch, 16))
            w = {}
            viol = 0
            k = fn(x).shape[-1]
            dirs = jnp.concatenate([jnp.eye(k), -jnp.eye(k)])
            pgd = jax.jit(jax.vmap(lambda d, kk: F.pgd_maximize(
                lambda z: fn(z) @ d, x, eps=eps, key=kk, steps=20, restarts=1)[0]))(
                    dirs, jax.random.split(jax.random.key(seed), 2 * k))
            hi_seen, lo_seen = pgd[:k].T, -pgd[k:].T
            for m, f in (("ibp", lambda x: F.ibp_bounds(fn, x, eps)),
                         ("crown-ibp", lambda x: F.crown_bounds(fn, x, eps, intermediate="ibp")),
                         ("crown", lambda x: F.crown_bounds(fn, x, eps))):
                lo, up = jax.jit(f)(x)
                w[m] = float(jnp.mean(up - lo))
                viol += int(jnp.sum((hi_seen > up + 1e-5) | (lo_seen < lo - 1e-5)))
            rows.append({"net": name, "seed": seed, "eps": eps, **{f"width_{m}": v for m, v in
                         w.items()}, "crown_over_ibp": w["crown"] / w["ibp"],
                         "pgd_violations": viol})
            print(rows[-1])
    report("bounds_tightness", rows, extra={"eps": eps, "batch": batch})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--tightness", action="store_true")
    args = parser.parse_args()
    if args.tightness:
        tightness()
    else:
        main(args.full)
