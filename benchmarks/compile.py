"""Time to result: XLA compilations, compile and run seconds per cell of a small grid.

    python -m benchmarks.compile [--shifts 2] [--methods kd,rkd,dkd,pkt] [--seeds 3]
                                 [--epochs 4] [--cache DIR] [--legacy]

A cell is what a study driver runs for one (shift, method): initialise ``S`` seeds,
``fit`` them as one vmapped program with validation-based selection, then predict the
test split with the selected students. The data are two synthetic "shifts" of one
MNIST-1D-sized problem (1,024 train, 256 val, 256 test examples of 40 x 1, 10
classes; a fixed random MLP teacher whose logits are computed once per shift, as
drivers cache their teachers), a CNN-1D student. Every cell is counted with
:func:`kdjax.train.count_compilations` (XLA backend compilations; persistent-cache hits
separately). ``--cache DIR`` turns on :func:`kdjax.train.enable_compilation_cache`:
run twice to see a warm cache. ``--legacy`` runs the cell the way the drivers did
before this engine (seeds initialised by an eager ``jax.vmap``; the test split
predicted seed by seed with ``Distiller.predict``), for a side-by-side comparison.

Targets (issue 18): at most 3 programs per cell on the training path (init, epoch,
evaluation), none after the first cell for repeated shapes, compile share < 30 %.
"""

from __future__ import annotations

import argparse
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._common import report
from kdjax import methods, models
from kdjax.train import (Distiller, EvalSet, Evaluation, count_compilations,
                         enable_compilation_cache, evaluate, fit, make_optimizer, predict)

NUM_CLASSES = 10


def make_shift(index: int, n_train=1024, n_eval=256, length=40):
    """Synthetic shift ``index``: class templates plus noise; the test domain is scaled
    and noisier (shift 0) or shifted in time (shift 1)."""
    rng = np.random.default_rng(index)
    templates = rng.normal(size=(NUM_CLASSES, length)).astype(np.float32)

    def draw(n, test):
        y = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
        x = templates[y] + 0.8 * rng.normal(size=(n, length)).astype(np.float32)
        if test:
            x = 1.3 * x + 0.5 * rng.normal(size=x.shape) if index == 0 else np.roll(x, 3, 1)
        return {"x": x[..., None].astype(np.float32), "y": y}

    return {"train": draw(n_train, False), "val": draw(n_eval, False),
            "test": draw(n_eval, True)}


def teacher_for(splits):
    teacher = models.create("mlp", NUM_CLASSES, hidden=(64,))
    tvars = teacher.init(jax.random.PRNGKey(7), splits["train"]["x"][:2], train=False)
    apply = lambda x: teacher.apply(tvars, x, train=False)  # noqa: E731
    logits = {k: predict(apply, v["x"], 256) for k, v in splits.items()}
    return teacher, tvars, logits


def run_cell(splits, teacher, tvars, t_logits, method: str, seeds, epochs: int,
             batch: int, legacy: bool):
    student = models.create("cnn1d", NUM_CLASSES, channels=(16, 16))
    steps = len(splits["train"]["x"]) // batch
    tx = make_optimizer({"name": "sgd", "learning_rate": 0.05, "schedule": "cosine"},
                        total_steps=steps * epochs, steps_per_epoch=steps)
    built = (methods.build({"name": "ce", "weight": 0.1}), methods.build({"name": method}))
    d = Distiller(student, built, tx, teacher=teacher)
    tr, va, te = splits["train"], splits["val"], splits["test"]
    ev = Evaluation({"val": EvalSet(x=va["x"], y=va["y"], teacher_logits=t_logits["val"])},
                    every=max(1, epochs // 2), select_on="val")
    with count_compilations() as c:
        t0 = time.perf_counter()
        if legacy:
            keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
            state = jax.vmap(lambda k: d.init(k, tr["x"][:2], tvars))(keys)
        else:
            state = d.init_seeds(seeds, tr["x"][:2], tvars)
        res = fit(d, state, tvars, tr, epochs=epochs, batch_size=batch, evaluation=ev,
                  progress=False)
        if legacy:
            logits = [d.predict(types.SimpleNamespace(params={"student": b["params"]},
                                                      batch_stats=b["batch_stats"]), te["x"])
                      for b in res.best]
        else:
            stacked = jax.tree_util.tree_map(lambda *v: np.stack(v),
                                             *[(b["params"], b["batch_stats"])
                                               for b in res.best])
            logits = d.predictor(512, num_seeds=len(seeds))(
                types.SimpleNamespace(params={"student": stacked[0]},
                                      batch_stats=stacked[1]), te["x"])
        acc = [evaluate(lg, te["y"], t_logits["test"])["accuracy"] for lg in logits]
        wall = time.perf_counter() - t0
    return {"compilations": c.count, "cache_hits": c.cache_hits,
            "compile_s": round(c.seconds, 3), "run_s": round(wall - c.seconds, 3),
            "wall_s": round(wall, 3), "compile_share": round(c.seconds / wall, 3),
            "test_acc_mean": float(np.mean(acc))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shifts", type=int, default=2)
    p.add_argument("--methods", default="kd,rkd,dkd,pkt")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--cache", default=None, help="persistent compilation cache directory")
    p.add_argument("--legacy", action="store_true", help="the drivers' old cell")
    p.add_argument("--name", default="compile")
    args = p.parse_args(argv)
    if args.cache:
        enable_compilation_cache(args.cache)
    rows, t_all = [], time.perf_counter()
    with count_compilations() as total:
        for s in range(args.shifts):
            splits = make_shift(s)
            teacher, tvars, t_logits = teacher_for(splits)
            for m in args.methods.split(","):
                row = run_cell(splits, teacher, tvars, t_logits, m, list(range(args.seeds)),
                               args.epochs, args.batch, args.legacy)
                rows.append({"shift": s, "method": m, **row})
                print(rows[-1], flush=True)
    wall = time.perf_counter() - t_all
    summary = {"legacy": args.legacy, "cache": bool(args.cache), "wall_s": round(wall, 2),
               "compilations": total.count, "compile_s": round(total.seconds, 2),
               "cache_hits": total.cache_hits,
               "compile_share": round(total.seconds / wall, 3),
               "max_compilations_per_cell": max(r["compilations"] for r in rows),
               "cells_after_first_max_compilations":
                   max([r["compilations"] for r in rows[1:]] or [0])}
    print(summary)
    report(args.name, rows, extra={"summary": summary, "argv": argv})
    return rows, summary


if __name__ == "__main__":
    main()
