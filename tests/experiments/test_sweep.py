"""Grid machinery (kdjax.experiment: cells, Run, tables, plots) and the sweep CLI
(experiments/sweep.py)."""

import json
import os
import sys
import textwrap

import ml_collections
import numpy as np
import pytest
from scipy import stats

from experiments import sweep
from kdjax import experiment as kx


def run_grid(cells, path, *, run_cell=None, run_cells=None, metadata, log):
    """The cells through :class:`kdjax.experiment.Run`, one seed or a group at a time."""
    run = kx.Run(cells[0].config, name="grid", out_dir=os.path.dirname(path),
                 results=os.path.basename(path), metadata=metadata, log=log)
    if run_cells is not None:
        return run.execute(cells, lambda c, seeds: run_cells(c.config, seeds))
    return run.execute(cells, lambda c, seeds: [run_cell(c.config, seeds[0])],
                       batch_seeds=False)


def base_config():
    c = ml_collections.ConfigDict()
    c.out_dir = "unused"
    c.temperature = 4.0
    c.method = ml_collections.ConfigDict({"name": "kd", "weight": 0.4})
    c.pairs = [["a", "b"]]
    return c


# ------------------------------------------------------------------ parsing / keys

def test_parse_sweep_values_are_literals():
    assert kx.parse_sweep("temperature=1,4,8") == ("temperature", [1, 4, 8])
    assert kx.parse_sweep("method.weight=0.1, 1") == ("method.weight", [0.1, 1])
    assert kx.parse_sweep("method.name=kd,'fitnet',dkd") == (
        "method.name", ["kd", "fitnet", "dkd"])
    # commas inside brackets/quotes do not split
    assert kx.parse_sweep("pairs=[['a','b'],['c','d']],[['e','f']]") == (
        "pairs", [[["a", "b"], ["c", "d"]], [["e", "f"]]])
    assert kx.parse_sweep("x='1,2',3") == ("x", ["1,2", 3])


@pytest.mark.parametrize("spec", ["temperature", "=1,2", "temperature=1,,2", "t="])
def test_parse_sweep_errors(spec):
    with pytest.raises(ValueError, match="sweep"):
        kx.parse_sweep(spec)


def test_unknown_key_lists_valid_keys_and_close_match():
    with pytest.raises(ValueError) as e:
        kx.validate_keys(base_config(), ["method.wieght"])
    msg = str(e.value)
    assert "method.wieght" in msg and "method.weight" in msg and "temperature" in msg
    assert "Did you mean" in msg
    kx.validate_keys(base_config(), ["method.weight", "temperature", "method"])


def test_expand_product_seeds_and_keys():
    cells = kx.expand(base_config(), [("temperature", [1, 4, 8]),
                                        ("method.weight", [0.1, 1])], range(3))
    assert len(cells) == 3 * 2 * 3
    assert len({c.key for c in cells}) == len(cells)
    assert len({c.group for c in cells}) == 6
    c = next(c for c in cells if c.overrides == (("temperature", 8), ("method.weight", 1))
             and c.seed == 2)
    assert c.config.temperature == 8.0 and isinstance(c.config.temperature, float)
    assert c.config.method.weight == 1.0
    # the base config is untouched; keys are deterministic and ignore the output dir
    assert base_config().temperature == 4.0
    other = base_config()
    other.out_dir = "elsewhere"
    again = kx.expand(other, [("temperature", [1, 4, 8]), ("method.weight", [0.1, 1])],
                        range(3))
    assert [a.key for a in again] == [a.key for a in cells]


def test_expand_errors():
    with pytest.raises(ValueError, match="Valid keys"):
        kx.expand(base_config(), [("temprature", [1])], [0])
    with pytest.raises(ValueError, match="seeds"):
        kx.expand(base_config(), [], [0, 0])
    with pytest.raises(ValueError, match="expects a bool|expects"):
        bad = base_config()
        bad.flag = True
        kx.expand(bad, [("flag", ["maybe"])], [0])

    def validate(c):
        if c.temperature <= 0:
            raise ValueError("config.temperature must be > 0")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kx.expand(base_config(), [("temperature", [1, -1])], [0], validate=validate)


# ------------------------------------------------------------------------- resume

def test_run_grid_resumes_and_counts_calls(tmp_path):
    path = str(tmp_path / "rows.jsonl")
    cells = kx.expand(base_config(), [("temperature", [1, 2])], range(3))
    calls = []

    def run_cell(config, seed):
        calls.append((config.temperature, seed))
        return {"acc": config.temperature + seed / 10, "global_batch_size": 8}

    meta = {"git_revision": "test"}
    rows = run_grid(cells, path, run_cell=run_cell, metadata=meta, log=lambda m: None)
    assert len(calls) == 6 and len(rows) == 6
    r = rows[0]
    assert {"cell_key", "group_key", "seed", "overrides", "config", "git_revision",
            "global_batch_size"} <= set(r)
    assert r["config"]["temperature"] == r["overrides"]["temperature"]
    # rerun: nothing runs, same rows
    rows2 = run_grid(cells, path, run_cell=run_cell, metadata=meta, log=lambda m: None)
    assert len(calls) == 6 and rows2 == rows
    # lose one row (e.g. killed before it was written): only that cell reruns
    lines = open(path).read().splitlines()
    lost = json.loads(lines[3])
    open(path, "w").write("\n".join(lines[:3] + lines[4:]) + "\n")
    run_grid(cells, path, run_cell=run_cell, metadata=meta, log=lambda m: None)
    assert calls[6:] == [(lost["config"]["temperature"], lost["seed"])]
    # more seeds: only the new ones run
    more = kx.expand(base_config(), [("temperature", [1, 2])], range(4))
    run_grid(more, path, run_cell=run_cell, metadata=meta, log=lambda m: None)
    assert sorted(calls[7:]) == [(1.0, 3), (2.0, 3)]


def test_run_grid_batched_seeds_and_skips(tmp_path):
    path = str(tmp_path / "rows.jsonl")
    cells = kx.expand(base_config(), [("temperature", [1, 2])], range(3))
    calls = []

    def run_cells(config, seeds):
        calls.append((config.temperature, list(seeds)))
        if config.temperature == 2:
            return None  # skipped cell: nothing written
        return [{"acc": float(s)} for s in seeds]

    rows = run_grid(cells, path, run_cells=run_cells, metadata={}, log=lambda m: None)
    assert calls == [(1.0, [0, 1, 2]), (2.0, [0, 1, 2])]
    assert sorted(r["seed"] for r in rows) == [0, 1, 2]
    # a partially finished group runs only its missing seeds, together
    lines = open(path).read().splitlines()
    open(path, "w").write("\n".join(lines[:1]) + "\n")
    run_grid(cells, path, run_cells=run_cells, metadata={}, log=lambda m: None)
    assert calls[2] == (1.0, [1, 2])


# -------------------------------------------------------------------- aggregation

def _rows(rng, methods=("a", "b", "c"), cols=("x", "y"), seeds=5):
    return [{"m": m, "s": c, "seed": s, "acc": float(rng.uniform())}
            for m in methods for c in cols for s in range(seeds)]


def test_pivot_mean_std_against_numpy():
    rows = _rows(np.random.default_rng(0))
    rows.append({"m": "a", "s": "x", "seed": 99, "acc": float("nan")})  # ignored
    table = kx.pivot(rows, "m", "s", "acc")
    for (m, c), cell in table.items():
        v = np.array([r["acc"] for r in rows if r["m"] == m and r["s"] == c
                      and not np.isnan(r["acc"])])
        assert cell["n"] == 5
        np.testing.assert_allclose(cell["mean"], v.mean())
        np.testing.assert_allclose(cell["std"], v.std(ddof=1))


def test_ranks_ties_and_nan():
    assert kx.ranks([0.5, 0.9, 0.5, float("nan")]) == [2.5, 1.0, 2.5, pytest.approx(
        float("nan"), nan_ok=True)]
    assert kx.ranks([3.0, 1.0, 2.0], higher_is_better=False) == [3.0, 1.0, 2.0]


def test_paired_differences_against_scipy():
    rows = _rows(np.random.default_rng(1))
    table = kx.pivot(rows, "m", "s", "acc")
    diffs = kx.paired_differences(table, "a")
    for c in ("x", "y"):
        a = np.array([r["acc"] for r in rows if r["m"] == "b" and r["s"] == c])
        b = np.array([r["acc"] for r in rows if r["m"] == "a" and r["s"] == c])
        d = a - b
        lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
        mean, l2, h2, n = diffs[("b", c)]
        np.testing.assert_allclose([mean, l2, h2], [d.mean(), lo, hi], rtol=1e-10)
        assert n == 5
        assert diffs[("a", c)][:1] == (0.0,)
    # only common seeds are paired
    rows2 = [r for r in rows if not (r["m"] == "b" and r["seed"] == 0)]
    d2 = kx.paired_differences(kx.pivot(rows2, "m", "s", "acc"), "a")
    assert d2[("b", "x")][3] == 4


def test_pivot_markdown_has_every_cell_rank_and_ci():
    rows = _rows(np.random.default_rng(2))
    table = kx.pivot(rows, "m", "s", "acc")
    text = kx.pivot_markdown(table, ["a", "b", "c"], ["x", "y"], baseline="a")
    lines = text.splitlines()
    assert lines[0] == "| method | x | y | mean rank |"
    means = {k: v["mean"] for k, v in table.items()}
    best_x = max("abc", key=lambda m: means[(m, "x")])
    row = next(ln for ln in lines if ln.startswith(f"| {best_x} |"))
    assert f"{100 * means[(best_x, 'x')]:.1f} ± " in row and "(1)" in row
    assert "Difference to a" in text
    assert sum(ln.startswith("| b |") for ln in lines) == 2  # table + difference block


def test_plots_are_written(tmp_path):
    rows = _rows(np.random.default_rng(3))
    t = kx.pivot(rows, "m", "s", "acc")
    kx.plot_bars(t, ["a", "b", "c"], ["x", "y"], str(tmp_path / "bars.png"), ylabel="acc")
    kx.plot_scatter(t, t, ["a", "b", "c"], ["x", "y"], str(tmp_path / "sc.png"),
                      xlabel="in", ylabel="out")
    for f in ("bars.png", "sc.png"):
        assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp_")]


# ---------------------------------------------------------------------- sweep CLI

@pytest.fixture
def fake_driver(tmp_path, monkeypatch):
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "cfg.py").write_text(textwrap.dedent("""
        import ml_collections
        def get_config():
            c = ml_collections.ConfigDict()
            c.out_dir = "unused"
            c.temperature = 4.0
            c.method = ml_collections.ConfigDict({"weight": 0.4})
            return c
        def validate(c):
            if c.temperature <= 0:
                raise ValueError(f"config.temperature must be > 0, got {c.temperature}.")
    """))
    (pkg / "drv.py").write_text(textwrap.dedent("""
        CONFIG_MODULE = "fakepkg.cfg"
        CALLS = []
        def run_cell(config, seed):
            CALLS.append((config.temperature, config.method.weight, seed))
            return {"score": config.temperature * config.method.weight + 0.01 * seed,
                    "global_batch_size": 4}
    """))
    (pkg / "nodrv.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for m in [m for m in sys.modules if m.startswith("fakepkg")]:
        monkeypatch.delitem(sys.modules, m)
    return tmp_path


def test_sweep_cli_runs_resumes_and_tabulates(fake_driver, capsys):
    out = str(fake_driver / "out")
    argv = ["fakepkg.drv", "--sweep", "temperature=1,4,8", "--sweep", "method.weight=0.1,1",
            "--seeds", "2", "--out", out]
    rows = sweep.main(argv)
    import fakepkg.drv as drv
    assert len(drv.CALLS) == 12 and len(rows) == 12
    sweep.main(argv)
    assert len(drv.CALLS) == 12  # resumed: nothing reran
    text = open(f"{out}/sweep.md").read()
    assert text.count("| temperature=") == 6
    best = "temperature=8, method.weight=1"
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {best} |"))
    scores = [8 * 1 + 0.01 * s for s in (0, 1)]
    assert f"{np.mean(scores):.4f} ± {np.std(scores, ddof=1):.4f} (1)" in line
    assert (fake_driver / "out" / "sweep_score.png").exists()


def test_sweep_cli_errors(fake_driver):
    out = str(fake_driver / "out")
    with pytest.raises(ValueError, match="unknown sweep key 'temprature'.*Valid keys"):
        sweep.main(["fakepkg.drv", "--sweep", "temprature=1,2", "--out", out])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sweep.main(["fakepkg.drv", "--sweep", "temperature=1,-1", "--out", out])
    with pytest.raises(ValueError, match="neither run_cell"):
        sweep.main(["fakepkg.nodrv", "--sweep", "temperature=1"])
    with pytest.raises(ValueError, match="cannot import driver"):
        sweep.main(["fakepkg.missing"])
    with pytest.raises(SystemExit):
        sweep.main(["fakepkg.drv", "--sweep", "temperature"])
    with pytest.raises(SystemExit):
        sweep.main(["fakepkg.drv", "--sweep", "temperature=1", "--sweep", "temperature=2"])
    # config overrides pass through kdjax.config (unknown key lists valid keys)
    with pytest.raises(ValueError, match="valid keys there"):
        sweep.main(["fakepkg.drv", "--config.nope=1", "--out", out])
