"""The one table formatter: mean ± std against numpy, ranks, n = seeds found, paired CIs
against scipy."""

import numpy as np
import pytest
from scipy import stats

from kdjax import experiment as kx


def rows(rng, runs=("ce", "kd", "dkd"), seeds=4):
    return [{"run": r, "seed": s, "acc": float(rng.uniform()), "ece": float(rng.uniform())}
            for r in runs for s in range(seeds)]


def test_markdown_table_cells_ranks_n_and_ci():
    rs = rows(np.random.default_rng(0))
    rs.append(dict(rs[0]))                   # a duplicated row counts once per seed
    text = kx.markdown_table(rs, row="run", baseline="ce", metrics=[
        kx.Metric("acc"), kx.Metric("ece", higher_is_better=False, scale=1.0, digits=3)])
    lines = text.splitlines()
    assert lines[0] == "| run | acc | ece | n |"
    means = {}
    for r in ("ce", "kd", "dkd"):
        a = np.array([x["acc"] for x in rs[:12] if x["run"] == r])
        means[r] = a.mean()
        line = next(ln for ln in lines if ln.startswith(f"| {r} |"))
        assert f"{100 * a.mean():.2f} ± {100 * a.std(ddof=1):.2f}" in line
        assert line.endswith("| 4 |")
    order = sorted(means, key=lambda k: -means[k])
    best = next(ln for ln in lines if ln.startswith(f"| {order[0]} |"))
    assert best.split("|")[2].strip().endswith("(1)")
    # paired differences with the t-interval over the 4 common seeds
    kd = np.array([x["acc"] for x in rs[:12] if x["run"] == "kd"])
    ce = np.array([x["acc"] for x in rs[:12] if x["run"] == "ce"])
    d = kd - ce
    half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / np.sqrt(4)
    diff_line = [ln for ln in lines if ln.startswith("| kd |")][1]
    assert (f"{100 * d.mean():+.2f} [{100 * (d.mean() - half):+.2f}, "
            f"{100 * (d.mean() + half):+.2f}]") in diff_line


def test_columns_per_col_value_and_missing_cells():
    rs = [{"m": m, "s": c, "seed": k, "acc": 0.1 * k + (m == "b")}
          for m in "ab" for c in "xy" for k in range(3) if not (m == "b" and c == "y")]
    text = kx.markdown_table(rs, row="m", col="s", metrics=["acc"], mean_rank=True)
    lines = text.splitlines()
    assert lines[0] == "| m | x | y | mean rank | n |"
    assert lines[3].startswith("| b |") and "| - |" in lines[3]
    assert "(1)" in lines[3].split("|")[2]


def test_stats_helpers():
    assert kx.mean_std([1.0, float("nan"), 3.0]) == (2.0, pytest.approx(np.sqrt(2)))
    assert kx.mean_std([5.0]) == (5.0, 0.0)
    assert kx.ranks([0.5, 0.9, 0.5, float("nan")])[:3] == [2.5, 1.0, 2.5]
    assert kx.seeds_found([{"seed": 10}, {"seed": 2}, {"seed": 2}]) == [2, 10]
    s = kx.summarize([{"g": 1, "seed": 0, "v": 1.0}, {"g": 1, "seed": 0, "v": 1.0},
                      {"g": 1, "seed": 1, "v": 3.0}], ["g"], ["v"])
    assert s == [{"g": 1, "n": 2, "v": 2.0, "v_std": pytest.approx(np.sqrt(2))}]
