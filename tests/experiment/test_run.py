"""Run: cells and their keys, resume, the revision rule, duplicate entries, the CLI entry
(--help, unknown keys, variants, read-only output), Ctrl-C exit 130."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import ml_collections
import pytest

from kdjax import experiment as kx


def config():
    c = ml_collections.ConfigDict()
    c.out_dir = "unused"
    c.cache_dir = ""
    c.seeds = 2
    c.lr = 0.1
    c.runs = ["a", "b"]
    return c


def make_run(tmp_path, state="s1", stale="refuse", log=None):
    return kx.Run(config(), name="t", out_dir=str(tmp_path / "out"), stale=stale,
                  metadata={"git_revision": state, "code_state": state},
                  log=log or (lambda m: None))


def cells_of(cfg):
    return kx.study_cells(cfg, kx.study_key(cfg), {n: {"run": n} for n in cfg.runs},
                          range(cfg.seeds))


def test_cell_keys_are_hashes_of_identity_and_seed():
    cfg = config()
    cells = cells_of(cfg)
    assert len(cells) == 4 and len({c.key for c in cells}) == 4
    assert len({c.group for c in cells}) == 2
    c = cells[0]
    assert c.key == kx.config_hash({"study": kx.study_key(cfg), "run": "a"}, 0)
    assert c.group == kx.config_hash({"study": kx.study_key(cfg), "run": "a"})
    moved = config()
    moved.out_dir = "elsewhere"          # where results go is not what they are
    assert [x.key for x in cells_of(moved)] == [x.key for x in cells]
    other = config()
    other.lr = 0.2
    assert cells_of(other)[0].key != c.key


def test_duplicate_grid_entries_are_errors():
    cfg = config()
    with pytest.raises(kx.ConfigError, match=r"duplicate entries \['a'\]"):
        kx.study_cells(cfg, "x", [("a", {"run": "a"}), ("a", {"run": "a"})], [0])
    with pytest.raises(kx.ConfigError, match="seeds"):
        kx.study_cells(cfg, "x", {"a": {}}, [0, 1, 0])
    with pytest.raises(kx.ConfigError, match="duplicate entries"):
        kx.expand(cfg, [("lr", [0.1, 0.1])], [0])
    with pytest.raises(kx.ConfigError, match="duplicate entries"):
        kx.parse_sweep("runs=['kd'],['kd']")


def test_execute_resumes_and_records_the_code_state(tmp_path):
    calls = []

    def fn(cell, seeds):
        calls.append((cell.fields["run"], list(seeds)))
        return [{"acc": 0.5 + 0.1 * s} for s in seeds]

    run = make_run(tmp_path)
    cells = cells_of(run.config)
    rows = run.execute(cells, fn)
    assert calls == [("a", [0, 1]), ("b", [0, 1])] and len(rows) == 4
    r = rows[0]
    assert r["run"] == "a" and r["code_state"] == "s1" and r["config_hash"] == kx.study_key(
        run.config) and {"cell_key", "group_key", "seed", "config"} <= set(r)
    assert make_run(tmp_path).execute(cells, fn) == rows and len(calls) == 2
    # one row lost: only its seed reruns
    path = run.store.path
    lines = open(path).read().splitlines()
    open(path, "w").write("\n".join(lines[:3]) + "\n")
    make_run(tmp_path).execute(cells, fn)
    assert calls[2:] == [("b", [1])]


def test_revision_rule_refuse_rerun_reuse(tmp_path):
    fn = lambda cell, seeds: [{"acc": 0.5} for _ in seeds]   # noqa: E731
    cells = cells_of(config())
    make_run(tmp_path, "old").execute(cells, fn)
    with pytest.raises(kx.StaleRowsError, match=r"4 of 4 cells.*\['old'\].*now s1"):
        make_run(tmp_path, "s1").plan(cells)
    # reuse: nothing trains, the header says which code the rows come from
    run = make_run(tmp_path, "s1", "reuse")
    rows = run.execute(cells, lambda c, s: pytest.fail("must not train"))
    assert len(rows) == 4 and "code old" in run.provenance(rows)
    # rerun: everything trains again; the old rows stay in the file, tables use the new
    calls = []
    run = make_run(tmp_path, "s1", "rerun")
    rows = run.execute(cells, lambda c, s: calls.append(s) or [{"acc": 0.7} for _ in s])
    assert len(calls) == 2 and [r["acc"] for r in rows] == [0.7] * 4
    assert len(open(run.store.path).read().splitlines()) == 8
    assert make_run(tmp_path, "s1").plan(cells) == []        # now current: done
    # rows written before the layer (no cell_key; config_hash = the study key) are
    # matched to their cells; a clean revision equal to the current one counts as done,
    # a +dirty one cannot be trusted
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    cfg = config()
    with open(legacy / "results.jsonl", "w") as f:
        for run_name, rev in (("a", "abc"), ("b", "abc+dirty")):
            for s in range(2):
                f.write(json.dumps({"run": run_name, "seed": s, "acc": 0.4,
                                    "config_hash": kx.study_key(cfg),
                                    "git_revision": rev}) + "\n")
    r = kx.Run(cfg, name="t", out_dir=str(legacy), metadata={"code_state": "abc"},
               log=lambda m: None)
    with pytest.raises(kx.StaleRowsError, match=r"2 of 4 cells.*abc\+dirty\(unknown"):
        r.plan(cells)
    r.stale = "rerun"
    assert [(c.fields["run"], c.seed) for c in r.plan(cells)] == [("b", 0), ("b", 1)]
    assert [x["run"] for x in r.rows(cells)] == ["a", "a"]


def test_report_prints_the_seeds_found(tmp_path):
    run = make_run(tmp_path)
    cells = cells_of(run.config)
    rows = run.execute(cells, lambda c, s: [{"acc": 0.5} if c.fields["run"] == "a" else None
                                            for _ in s])
    text = run.report("Header.", kx.markdown_table(rows, row="run", metrics=["acc"]), rows)
    assert "Seeds found: [0, 1]; 2 rows; code s1." in text
    assert open(run.path("results.md")).read() == text


def test_check_writable_fails_fast_on_a_read_only_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that can write anywhere")
        with pytest.raises(kx.RunError, match="cannot write to the output directory"):
            kx.check_writable(str(ro / "out"))
    finally:
        os.chmod(ro, 0o755)


# ------------------------------------------------------------------------ the CLI

_DRIVER = textwrap.dedent('''
    """A test driver.

    Its docstring is the --help text."""
    import sys, time
    from kdjax import experiment as kx

    def main(argv=None):
        run = kx.Run.from_cli(argv, name="toy", config="toycfg", doc=__doc__,
                              variants=["quick"])
        print("variant", run.variant, "lr", run.config.lr, flush=True)
        if run.config.sleep:
            print("sleeping", flush=True)
            time.sleep(60)

    if __name__ == "__main__":
        kx.cli(main)
''')
_CONFIG = textwrap.dedent('''
    import ml_collections
    def get_config(variant=None):
        c = ml_collections.ConfigDict()
        c.out_dir = ""
        c.lr = 0.1 if variant is None else 0.5
        c.sleep = False
        c.nested = ml_collections.ConfigDict({"width": 4})
        return c
    def validate(c):
        if c.lr <= 0:
            raise ValueError(f"config.lr must be > 0, got {c.lr}.")
''')


@pytest.fixture
def toy(tmp_path):
    (tmp_path / "toy.py").write_text(_DRIVER)
    (tmp_path / "toycfg.py").write_text(_CONFIG)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path), os.getcwd(), os.environ.get("PYTHONPATH", "")]),
        JAX_PLATFORMS="cpu")

    def run(*args, **kw):
        return subprocess.run([sys.executable, str(tmp_path / "toy.py"),
                               f"--config.out_dir={tmp_path / 'out'}", *args],
                              capture_output=True, text=True, env=env, timeout=300, **kw)
    run.env, run.path = env, tmp_path
    return run


def test_cli_help_variant_and_overrides(toy):
    p = toy("--help")
    assert p.returncode == 0 and "A test driver." in p.stdout and "--stale" in p.stdout
    p = toy("--quick", "--config.lr=0.3")
    assert p.returncode == 0 and "variant quick lr 0.3" in p.stdout
    p = toy("quick")
    assert "variant quick lr 0.5" in p.stdout


@pytest.mark.parametrize("args,expect", [
    (["--config.nested.widht=3"], "unknown config key 'nested.widht'.*valid keys there: "
                                  r"\['width'\].*Did you mean \['width'\]"),
    (["--config.lr=-1"], "config.lr must be > 0"),
    (["--config.lr=1e309"], "config.lr must be a finite number, got inf"),
    (["bogus"], "unknown variant 'bogus'"),
])
def test_cli_config_errors_are_one_line_exit_2(toy, args, expect):
    p = toy(*args)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    import re
    assert re.search(expect, p.stderr), p.stderr


@pytest.mark.parametrize("where", ["read-only", "under-a-file", "sysfs"])
def test_cli_unwritable_output_is_one_line_exit_1(toy, where):
    ro = toy.path / "ro"
    ro.mkdir()
    out = {"read-only": ro / "out", "under-a-file": toy.path / "toy.py" / "out",
           "sysfs": "/sys/kdjax_test_out"}[where]
    os.chmod(ro, 0o555)
    try:
        if where == "read-only" and os.access(ro, os.W_OK):
            pytest.skip("running as a user that can write anywhere (root)")
        p = subprocess.run([sys.executable, str(toy.path / "toy.py"),
                            f"--config.out_dir={out}"], capture_output=True,
                           text=True, env=toy.env, timeout=300)
        assert p.returncode == 1, p.stderr
        assert f"cannot write to the output directory '{out}'" in p.stderr
        assert "Traceback" not in p.stderr
    finally:
        os.chmod(ro, 0o755)


def test_ctrl_c_exits_130_with_one_line(toy):
    p = subprocess.Popen([sys.executable, str(toy.path / "toy.py"),
                          f"--config.out_dir={toy.path / 'out'}", "--config.sleep=True"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=toy.env,
                         # pytest-xdist workers ignore SIGINT and children inherit that:
                         # Python would then never raise KeyboardInterrupt (the CI failure)
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for _ in range(3000):                 # wait until it is inside main
            line = p.stdout.readline()
            if "sleeping" in line or p.poll() is not None:
                break
        time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
        p.stdout.close()
        p.stderr.close()
    assert p.returncode == 130, err
    assert "interrupted (Ctrl-C)" in err and "Traceback" not in err


def test_diverged_training_is_one_line_exit_1(tmp_path):
    """A DivergenceError (engine) or NonFiniteError (cache) reaching the CLI is one line
    naming the run, exit 1: a user sees what diverged, not a traceback."""
    script = tmp_path / "diverge.py"
    script.write_text(textwrap.dedent('''
        import sys
        from kdjax.experiment import cli
        from kdjax.train.cache import NonFiniteError
        from kdjax.train.loop import DivergenceError
        kind = sys.argv[1]
        def main(argv):
            if kind == "fit":
                raise DivergenceError("train 'kd' seed index 1 epoch 3: loss is not finite")
            raise NonFiniteError("teacher_abc: 2 leaves are not finite")
        cli(main, [])
    '''))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(),
                                                      os.environ.get("PYTHONPATH", "")]),
               JAX_PLATFORMS="cpu")
    for kind, name in (("fit", "seed index 1 epoch 3"), ("cache", "teacher_abc")):
        p = subprocess.run([sys.executable, str(script), kind], capture_output=True,
                           text=True, env=env, timeout=300)
        assert p.returncode == 1, p.stderr
        assert name in p.stderr and "Traceback" not in p.stderr, p.stderr
