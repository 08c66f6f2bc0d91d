"""Engine overhead: ``fit``'s epoch against a minimal hand-written jitted loop.

    python -m benchmarks.engine_overhead [--pairs default,digits_mlp] [--repeats 5]

Both run the same student, teacher, loss (the pair's methods of
``benchmarks/train_step.py``), optimiser and batch plan (a permutation from
``fold_in(seed_key, epoch)`` with the remainder dropped) over the same device-resident
data, in the epoch mode ``"auto"`` picks (scan: one jitted ``lax.scan``; loop: one
jitted step per batch). The hand-written loop is what a user would write: one jitted
step ``(params, batch_stats, opt_state, batch, key) -> ...`` on gathered rows. Each
repeat times one epoch of each, in both orders (engine first, then hand first); the
table gives the medians and ``ratio = engine / hand`` (target <= 1.10).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from benchmarks._common import block, report
from benchmarks.train_step import build
from kdjax.train import epoch as epoch_lib


def hand_written(d, tvars, batch_size: int, mode: str):
    """A minimal epoch for ``d``'s student/teacher/methods/optimiser, not using the
    engine's step (its own loss over the methods' functions)."""
    student, teacher, tx = d.student, d.teacher, d.tx
    methods = list(zip(d.keys, d.methods))

    def loss(params, bs, batch, key):
        vs = {"params": params["student"], **({"batch_stats": bs} if bs else {})}
        if bs:
            s_out, upd = student.apply(vs, batch["x"], train=True, mutable=["batch_stats"])
            bs = upd["batch_stats"]
        else:
            s_out = student.apply(vs, batch["x"], train=True)
        if d.teacher_from_batch:
            t_out = (batch["teacher_logits"], {})
        else:
            t_out = jax.lax.stop_gradient(teacher.apply(tvars, batch["x"], train=False))
        total = 0.0
        for i, (k, m) in enumerate(methods):
            v, _ = m(params["adapters"][k], None, s_out, t_out, batch,
                     jax.random.fold_in(key, i + 1))
            total = total + m.weight * v
        return total, bs

    def step(carry, batch, key):
        params, bs, opt = carry
        (value, bs), g = jax.value_and_grad(loss, has_aux=True)(params, bs, batch, key)
        upd, opt = tx.update(g, opt, params)
        return (optax.apply_updates(params, upd), bs, opt), value

    def plan(seed_key, epoch, n):
        key = jax.random.fold_in(seed_key, epoch)
        return key, epoch_lib.batch_plan(jax.random.fold_in(key, 0), n, batch_size)

    if mode == "scan":
        @jax.jit
        def epoch(carry, data, seed_key, e):
            key, idx = plan(seed_key, e, data["x"].shape[0])

            def body(c, inp):
                i, rows = inp
                return step(c, {k: v[rows] for k, v in data.items()},
                            jax.random.fold_in(key, i + 1))
            return jax.lax.scan(body, carry, (jnp.arange(idx.shape[0]), idx))
        return lambda carry, data, sk, e: epoch(carry, data, sk, e)[0]

    jplan = jax.jit(plan, static_argnums=2)
    jstep = jax.jit(lambda c, data, rows, key, i: step(
        c, {k: v[rows] for k, v in data.items()}, jax.random.fold_in(key, i + 1)),
        donate_argnums=(0,))

    def loop_epoch(carry, data, seed_key, e):
        key, idx = jplan(seed_key, e, data["x"].shape[0])
        for i in range(idx.shape[0]):
            carry, _ = jstep(carry, data, idx[i], key, i)
        return carry
    return loop_epoch


def bench(pair: str, batch: int, steps: int, repeats: int):
    d, _, tvars, b = build(pair, batch)
    mode = d.resolve_epoch_mode(b["x"])
    data = jax.device_put({k: jnp.concatenate([v] * steps) for k, v in b.items()})
    engine = d.epoch_runner(batch, data["x"])
    hand = hand_written(d, tvars, batch, mode)
    st = {"v": d.init(0, b["x"][:2], tvars)}
    init = d.init(0, b["x"][:2], tvars)
    carry = {"v": (init.params, init.batch_stats, init.opt_state)}
    e = {"n": 0}

    def run_engine():
        st["v"], t = engine(st["v"], tvars, data)
        return block(st["v"].params)

    def run_hand():
        carry["v"] = hand(carry["v"], data, init.seed_key, e["n"])
        e["n"] += 1
        return block(carry["v"][0])

    run_engine(), run_hand()          # compile both
    times = {"engine": [], "hand": []}
    for r in range(repeats):
        order = (("engine", run_engine), ("hand", run_hand))
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"pair": pair, "mode": mode, "batch": batch, "steps": steps, "repeats": repeats,
            "engine_epoch_s": round(med["engine"], 4), "hand_epoch_s": round(med["hand"], 4),
            "ratio": round(med["engine"] / med["hand"], 3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default="default,digits_mlp")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=6)
    args = p.parse_args(argv)
    rows = [bench(pair, args.batch, args.steps, args.repeats)
            for pair in args.pairs.split(",")]
    report("engine_overhead", rows)
    return rows


if __name__ == "__main__":
    main()
