"""Influence scores (single jvp along s) vs naive per-example gradients vs one epoch.

Model: MLP 40 -> 128 -> 128 -> 10 (tanh) on MNIST-1D-sized synthetic data (40
features, 10 classes). For each training-set size N it times, after compilation:

* ``epoch``: one epoch of Adam, batch 128 (``lax.scan`` over batches), the yardstick;
* ``scores_jvp``: ``per_example_jvp`` along a fixed direction ``s`` (all N scores,
  chunk 1024): the part of ``influence_scores`` that scales with N;
* ``influence_total``: ``influence_scores`` end to end (grad of the validation loss,
  GGN-CG with 20 iterations on a 2048-example curvature batch, then the scores);
* ``naive_vmap``: ``vmap(grad)`` materialising the ``[N, P]`` per-example gradients, then
  ``G @ s`` (only while ``N * P * 4`` bytes <= 1 GiB; beyond, chunked by 1024: ``naive_chunked``);
* ``naive_loop``: a Python loop of a jitted per-example ``grad`` + dot (N = 1k only).

Peak memory is XLA's compiled ``memory_analysis()`` (temp + argument + output bytes) of each
jitted function. ``python -m benchmarks.influence`` runs N in {1k, 10k};
``--full`` adds 50k.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from benchmarks._common import machine_info, report, time_fn
from kdjax.influence import ggn_vp, influence_scores, per_example_jvp

D, H, C = 40, 128, 10
CHUNK = 1024
NAIVE_MAX_BYTES = 1 << 30


def init(key):
    ks = jax.random.split(key, 3)
    dims = [(D, H), (H, H), (H, C)]
    return [{"w": jax.random.normal(k, s) / np.sqrt(s[0]), "b": jnp.zeros(s[1])}
            for k, s in zip(ks, dims)]


def apply(params, batch):
    h = batch["x"]
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def out_loss(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def loss_fn(params, batch):
    return out_loss(apply(params, batch), batch)


def data(key, n):
    kx, ky = jax.random.split(key)
    return {"x": jax.random.normal(kx, (n, D)), "y": jax.random.randint(ky, (n,), 0, C)}


def mem_bytes(jitted, *args):
    m = jitted.lower(*args).compile().memory_analysis()
    if m is None:
        return float("nan")
    return float(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)


def make_epoch(n, batch_size=128):
    opt = optax.adam(1e-3)
    steps = n // batch_size

    @jax.jit
    def epoch(params, opt_state, train):
        batches = jax.tree_util.tree_map(
            lambda x: x[: steps * batch_size].reshape((steps, batch_size) + x.shape[1:]),
            train)

        def step(carry, b):
            p, s = carry
            g = jax.grad(lambda q: jnp.mean(loss_fn(q, b)))(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), batches)
        return params, opt_state

    return epoch, opt


def per_example_grad(params, x, y):
    return ravel_pytree(jax.grad(lambda p: loss_fn(p, {"x": x[None], "y": y[None]})[0])(
        params))[0]


def run(sizes, repeats=5):
    params = init(jax.random.key(0))
    p_count = ravel_pytree(params)[0].size
    val = data(jax.random.key(2), 1000)
    s = jax.tree_util.tree_map(lambda p: jax.random.normal(jax.random.key(3), p.shape),
                               params)
    s_flat = ravel_pytree(s)[0]
    rows = []
    for n in sizes:
        train = data(jax.random.key(1), n)
        row = {"N": n, "params": p_count}
        tf = lambda f: time_fn(f, repeats=repeats, min_time=0.05)["median_s"]  # noqa: E731

        epoch, opt = make_epoch(n)
        opt_state = opt.init(params)
        row["epoch_s"] = tf(lambda: epoch(params, opt_state, train))
        row["epoch_mem_MB"] = mem_bytes(epoch, params, opt_state, train) / 2**20

        jvp_fn = jax.jit(lambda p, t, d: per_example_jvp(loss_fn, p, d, t, chunk_size=CHUNK))
        row["scores_jvp_s"] = tf(lambda: jvp_fn(params, s, train))
        row["scores_jvp_mem_MB"] = mem_bytes(jvp_fn, params, s, train) / 2**20

        curv = jax.tree_util.tree_map(lambda x: x[:2048], train)

        @jax.jit
        def total(p, tr, va):
            mv = lambda v: ggn_vp(apply, out_loss, p, curv, v)  # noqa: E731
            return influence_scores(loss_fn, p, tr, va, matvec=mv, method="cg",
                                    damping=1e-2, tol=1e-10, maxiter=20, chunk_size=CHUNK)[0]

        row["influence_total_s"] = tf(lambda: total(params, train, val))
        row["influence_total_mem_MB"] = mem_bytes(total, params, train, val) / 2**20

        if n * p_count * 4 <= NAIVE_MAX_BYTES:
            naive = jax.jit(lambda p, t, d: jax.vmap(per_example_grad, (None, 0, 0))(
                p, d["x"], d["y"]) @ t)
            key = "naive_vmap"
        else:
            def naive_impl(p, t, d):
                chunks = jax.tree_util.tree_map(
                    lambda x: x[: n // CHUNK * CHUNK].reshape((-1, CHUNK) + x.shape[1:]), d)
                return jax.lax.map(lambda c: jax.vmap(per_example_grad, (None, 0, 0))(
                    p, c["x"], c["y"]) @ t, chunks).reshape(-1)
            naive = jax.jit(naive_impl)
            key = "naive_chunked"
        got = naive(params, s_flat, train)
        ref = jvp_fn(params, s, train)
        m = got.shape[0]
        row["max_rel_diff_vs_naive"] = float(jnp.max(jnp.abs(got - ref[:m])) /
                                             jnp.max(jnp.abs(ref[:m])))
        row["naive_kind"] = key
        row["naive_s"] = tf(lambda: naive(params, s_flat, train))
        row["naive_mem_MB"] = mem_bytes(naive, params, s_flat, train) / 2**20
        if key == "naive_chunked":  # it scored only whole chunks: scale to N
            row["naive_s"] *= n / m

        if n <= 1000:
            g1 = jax.jit(per_example_grad)
            g1(params, train["x"][0], train["y"][0]).block_until_ready()
            t0 = time.perf_counter()
            vals = [float(g1(params, train["x"][i], train["y"][i]) @ s_flat) for i in range(n)]
            row["naive_loop_s"] = time.perf_counter() - t0
            del vals

        for k in ("scores_jvp_s", "influence_total_s", "naive_s", "naive_loop_s"):
            if k in row:
                row[k.replace("_s", "_per_epoch")] = row[k] / row["epoch_s"]
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()},
              flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="also N = 50k")
    ap.add_argument("--name", default="influence")
    args = ap.parse_args()
    sizes = [1000, 10000] + ([50000] if args.full else [])
    rows = run(sizes)
    cols = ["N", "params", "epoch_s", "scores_jvp_s", "scores_jvp_per_epoch",
            "influence_total_s", "influence_total_per_epoch", "naive_kind", "naive_s",
            "naive_per_epoch", "naive_loop_s", "epoch_mem_MB", "scores_jvp_mem_MB",
            "influence_total_mem_MB", "naive_mem_MB", "max_rel_diff_vs_naive"]
    report(args.name, rows, columns=cols, extra={
        "model": f"MLP {D}-{H}-{H}-{C} tanh", "chunk_size": CHUNK,
        "influence_total": "GGN-CG 20 iters on 2048 examples + single-jvp scores",
        "args": vars(args), "machine_check": machine_info()["device_kind"]})


if __name__ == "__main__":
    main()
