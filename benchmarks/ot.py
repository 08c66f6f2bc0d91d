"""Value+gradient time of the KD2M distances, and the same problems solved with POT.

``python -m benchmarks.ot`` (short grid: n in {128, 512}, d in {64, 512});
``python -m benchmarks.ot --full`` (n in 128, 256, ..., 4096; d in {64, 512}). Both clouds
have n points (x ~ N(0, I), y ~ N(0.5, 1.5^2 I)). kdjax rows time
``jit(value_and_grad(distance))`` (compiled ahead, ``compile_s``; excluded). POT rows (numpy, CPU, float64)
solve the same problems at matched accuracy and time the value only (POT has no gradient
here without a backend), so they are a lower bound for a POT-based training step:
``ot.emd2`` for exact OT (same optimum: ``rel_diff`` is the relative difference to the
kdjax value), log-domain ``ot.sinkhorn`` with the same absolute epsilon and a 1e-3
marginal threshold, whose value is computed as kdjax's (``<P, C> + eps KL(P | a b^T)``,
``rel_diff`` again). POT rows are skipped with a message when POT is absent.

Cells that would hang: a cell whose single call is predicted (from the same row at the
previous n, with the growth exponent of the last two sizes, at least 2) to take more than
``--budget`` seconds is not run, and a cell whose first call takes longer is not
repeated; both are recorded as rows with ``skipped`` giving the reason.
Writes ``benchmarks/results/ot.json``.
"""

from __future__ import annotations

import argparse
import functools
import math
import time

import jax
import numpy as np

from benchmarks._common import report, time_fn
from kdjax.losses import distribution as D


def _distances(key):
    return {
        "exact_ot": D.exact_ot,
        "sinkhorn": functools.partial(D.sinkhorn, epsilon=0.05, threshold=1e-3),
        "sinkhorn_divergence": functools.partial(D.sinkhorn_divergence, epsilon=0.05,
                                                 threshold=1e-3),
        "sliced_w2_128proj": functools.partial(D.sliced_wasserstein, key=key,
                                               num_projections=128),
        "gaussian_w2_full": D.gaussian_w2,
        "gaussian_w2_diag": functools.partial(D.gaussian_w2, diagonal=True),
        "gaussian_kl": D.gaussian_kl,
        "mmd_rbf": functools.partial(D.mmd, kernel="rbf"),
    }


class _Budget:
    """Per-row (impl, distance, d) history of seconds per call, to skip hopeless cells."""

    def __init__(self, budget_s):
        self.budget_s = budget_s
        self.history = {}

    def predict(self, key, n):
        pts = self.history.get(key, [])
        if not pts:
            return 0.0
        (n1, t1) = pts[-1]
        p = 2.0
        if len(pts) > 1:
            (n0, t0) = pts[-2]
            if t0 > 0 and t1 > 0 and n1 > n0:
                p = max(2.0, math.log(t1 / t0) / math.log(n1 / n0))
        return t1 * (n / n1) ** p

    def run(self, key, n, fn):
        """``(timing dict or None, skipped reason or None, output of the first call)``."""
        pred = self.predict(key, n)
        if pred > self.budget_s:
            return None, (f"predicted {pred:.1f} s per call > budget {self.budget_s:.0f} s "
                          f"(from n={self.history[key][-1][0]})"), None
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())       # warm-up
        first = time.perf_counter() - t0
        if first > self.budget_s:
            self.history.setdefault(key, []).append((n, first))
            return ({"median_s": first, "first_call_s": first},
                    f"first call took {first:.1f} s > budget {self.budget_s:.0f} s: "
                    "not repeated (median_ms is that single call)", out)
        if first > 2.0:
            t = time_fn(fn, repeats=1, min_time=0.0, warmup=0)
        else:
            t = time_fn(fn, repeats=3, min_time=0.1, warmup=0)
        self.history.setdefault(key, []).append((n, t["median_s"]))
        return t, None, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="n in 128, 256, ..., 4096")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="seconds per call above which a cell is skipped (recorded)")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 512])
    args = parser.parse_args(argv)
    ns = [128, 256, 512, 1024, 2048, 4096] if args.full else [128, 512]
    try:
        import ot
    except ImportError:
        ot = None
        print("POT is not installed: POT rows skipped.")
    key = jax.random.key(0)
    budget = _Budget(args.budget)
    rows = []
    t_start = time.time()
    for d in args.dims:
        for n in ns:
            kx, ky = jax.random.split(jax.random.key(n * 1000 + d))
            x = jax.random.normal(kx, (n, d))
            y = 0.5 + 1.5 * jax.random.normal(ky, (n, d))
            values, eps_abs = {}, None
            for name, fn in _distances(key).items():
                row = {"impl": "kdjax", "distance": name, "n": n, "d": d}
                t, skipped, out = None, None, None
                if budget.predict(("kdjax", name, d), n) <= budget.budget_s:
                    t0 = time.perf_counter()
                    step = jax.jit(jax.value_and_grad(fn)).lower(x, y).compile()
                    row["compile_s"] = time.perf_counter() - t0
                    t, skipped, out = budget.run(("kdjax", name, d), n, lambda: step(x, y))
                else:
                    _, skipped, _ = budget.run(("kdjax", name, d), n, None)
                if out is not None:
                    row["value"] = values[name] = float(out[0])
                if t is not None:
                    row["median_ms"] = 1e3 * t["median_s"]
                if skipped:
                    row["skipped"] = skipped
                if name == "sinkhorn" and out is not None:
                    _, diag = jax.jit(functools.partial(fn, return_diagnostics=True))(x, y)
                    row["iters"] = int(diag["iterations"])
                    eps_abs = float(diag["epsilon"])
                rows.append(row)
                print(row, flush=True)
            if ot is None:
                continue
            xn, yn = np.asarray(x, np.float64), np.asarray(y, np.float64)
            w = np.full(n, 1.0 / n)

            def pot_exact():
                return ot.emd2(w, w, ot.dist(xn, yn), numItermax=100_000_000)

            def pot_sinkhorn():
                c = ot.dist(xn, yn)
                plan = ot.sinkhorn(w, w, c, reg=eps_abs, method="sinkhorn_log",
                                   stopThr=1e-3, numItermax=2000)
                kl = np.sum(np.where(plan > 0, plan * np.log(plan / np.outer(w, w) + 1e-300),
                                     0.0))
                return np.sum(plan * c) + eps_abs * kl

            pots = [("exact_ot", pot_exact)]
            if eps_abs is not None:
                pots.append(("sinkhorn", pot_sinkhorn))
            for name, fn in pots:
                t, skipped, out = budget.run(("POT", name, d), n, fn)
                row = {"impl": "POT (value only)", "distance": name, "n": n, "d": d}
                if out is not None:
                    row["value"] = float(out)
                    if name in values:
                        row["rel_diff"] = abs(float(out) - values[name]) / abs(values[name])
                if t is not None:
                    row["median_ms"] = 1e3 * t["median_s"]
                if skipped:
                    row["skipped"] = skipped
                rows.append(row)
                print(row, flush=True)
    report("ot", rows, columns=["impl", "distance", "n", "d", "value", "median_ms", "iters",
                                "rel_diff", "compile_s", "skipped"],
           extra={"full": args.full, "budget_s": args.budget,
                  "wall_s": time.time() - t_start,
                  "note": "kdjax rows: jit(value_and_grad), float32; POT rows: value only, "
                  "float64 numpy; sinkhorn: epsilon 0.05 x std of the cost matrix (kdjax "
                  "default relative_to='std'; POT gets the same absolute epsilon), "
                  "threshold 1e-3; rel_diff: |POT - kdjax| / |kdjax| of the value; "
                  "skipped: reason a cell was not (fully) timed."})


if __name__ == "__main__":
    main()
