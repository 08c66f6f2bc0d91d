"""Value+gradient time of the KD2M distances, and the same problems solved with POT.

``python -m benchmarks.ot`` (short grid: n in {128, 512}, d in {64, 512});
``python -m benchmarks.ot --full`` (n in 128..4096). POT rows (numpy, CPU, float64) solve
the same problems at matched accuracy: ``ot.emd2`` for exact OT, log-domain
``ot.sinkhorn2`` with the same absolute epsilon and threshold for Sinkhorn; they time the
value only (POT has no gradient here without a backend), so they are a lower bound for a
POT-based training step. POT rows are skipped with a message when POT is absent.
Writes ``benchmarks/results/ot.json``.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="n in 128..4096")
    parser.add_argument("--max-exact-n", type=int, default=2048,
                        help="skip exact OT (host assignment) above this n")
    args = parser.parse_args(argv)
    ns = [128, 256, 512, 1024, 2048, 4096] if args.full else [128, 512]
    dims = [64, 512]
    try:
        import ot
    except ImportError:
        ot = None
        print("POT is not installed: POT rows skipped.")
    key = jax.random.key(0)
    rows = []
    for d in dims:
        for n in ns:
            kx, ky = jax.random.split(jax.random.key(n * 1000 + d))
            x = jax.random.normal(kx, (n, d))
            y = 0.5 + 1.5 * jax.random.normal(ky, (n, d))
            for name, fn in _distances(key).items():
                if name == "exact_ot" and n > args.max_exact_n:
                    continue
                step = jax.jit(jax.value_and_grad(fn))
                t = time_fn(lambda: step(x, y), repeats=3, min_time=0.1)
                row = {"impl": "kdjax", "distance": name, "n": n, "d": d,
                       "value": float(step(x, y)[0]), "median_ms": 1e3 * t["median_s"]}
                if name == "sinkhorn":
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
                return ot.emd2(w, w, ot.dist(xn, yn), numItermax=10_000_000)

            def pot_sinkhorn():
                return ot.sinkhorn2(w, w, ot.dist(xn, yn), reg=eps_abs, method="sinkhorn_log",
                                    stopThr=1e-3, numItermax=2000)

            for name, fn in (("exact_ot", pot_exact), ("sinkhorn", pot_sinkhorn)):
                if name == "exact_ot" and n > args.max_exact_n:
                    continue
                t = time_fn(fn, repeats=3, min_time=0.1)
                row = {"impl": "POT (value only)", "distance": name, "n": n, "d": d,
                       "value": float(fn()), "median_ms": 1e3 * t["median_s"]}
                rows.append(row)
                print(row, flush=True)
    report("ot", rows, columns=["impl", "distance", "n", "d", "value", "median_ms", "iters"],
           extra={"full": args.full, "note": "kdjax rows: jit(value_and_grad); POT rows: "
                  "value only, float64 numpy; sinkhorn: epsilon 0.05 x mean cost, "
                  "threshold 1e-3 (POT: reg cost without entropy term, same plan)."})


if __name__ == "__main__":
    main()
