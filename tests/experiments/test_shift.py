"""experiments/shift.py: config validation, loss composition, cell keys, end-to-end smoke."""

import jax
import numpy as np
import pytest

from experiments import shift as S
from experiments import shift_lib as L
from experiments import shift_report as SR
from experiments.configs import shift as C
from kdjax.experiment.config import config_hash, load_config
from kdjax.experiment import Store


def quick(**over):
    return load_config("experiments.configs.shift",
                       [f"{k}={v!r}" for k, v in over.items()], arg="quick")


# ------------------------------------------------------------------- validation

@pytest.mark.parametrize("over,match", [
    ({"run_methods": ["kd", "nope"]}, r"unknown method entry 'nope'.*valid entries.*'fitnet'"),
    ({"method.name": "nope"}, r"unknown method entry 'nope'"),
    ({"shifts": ["rotated_digits:75", "nowhere"]}, r"unknown shift 'nowhere'.*valid shifts.*"
                                                   r"'coloured_digits'"),
    ({"shifts": ["rotated_digits:90"]}, r"unknown target '90'.*valid targets.*'75'"),
    ({"shift": "mnist1d_domains:moon"}, r"unknown target 'moon'.*'shear'"),
    ({"seeds": 0}, r"config.seeds must be >= 1"),
    ({"temperature": 0.0}, r"config.temperature must be > 0"),
    ({"student.epochs": 0}, r"config.student.epochs must be >= 1"),
])
def test_validate_names_keys_and_choices(over, match):
    with pytest.raises(ValueError, match=match):
        quick(**over)


def test_validate_method_configs_inside_entries():
    cfg = C.get_config("quick")
    with cfg.unlocked():
        cfg.methods = cfg.methods + [{"name": "bad", "methods": [{"name": "fitnett"}]}]
    with pytest.raises(ValueError, match=r"unknown method 'fitnett' in entry 'bad'.*valid "
                                         r"methods"):
        C.validate(cfg)
    with cfg.unlocked():
        cfg.methods = cfg.methods[:-1] + [{"name": "bad", "methods": [], "agument": {}}]
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['agument'\].*valid keys"):
        C.validate(cfg)
    with pytest.raises(ValueError, match="'full' or 'quick'"):
        C.get_config("fast")


def test_catalogue_covers_every_registered_method():
    from kdjax import methods
    from kdjax.methods import robust
    used = {m["name"] for e in C.METHODS for m in e["methods"]}
    # DG objectives and the robust-training objectives without a teacher (pgd_at,
    # certified_training) train teachers, not students
    teachers = {n for n in methods.names() if not methods.get(n).needs_teacher}
    assert set(methods.names()) - used <= {"ce", "kd", *robust.NAMES, *teachers}
    assert {"mlkd", "reviewkd", "disco", "rslad", "kd2m_gromov_wasserstein"} <= used
    assert {a["name"] for a in C.ALGORITHMS.values()} == {"ce", *robust.NAMES}


# ------------------------------------------------------------- loss composition

def _cell(method, **over):
    return quick(**{"method.name": method, **over})


def test_loss_terms_shiftkd_mix():
    terms, skip = L.loss_terms(_cell("kd"), L.resolve_entry(_cell("kd")))
    assert not skip
    assert terms == [{"name": "ce", "weight": 0.6},
                     {"name": "kd", "weight": 0.4, "temperature": 4.0}]
    terms, _ = L.loss_terms(_cell("ce"), L.resolve_entry(_cell("ce")))
    assert terms == [{"name": "ce", "weight": 1.0}]
    cfg = _cell("fitnet", temperature=8.0)
    terms, _ = L.loss_terms(cfg, L.resolve_entry(cfg))
    assert terms[1]["temperature"] == 8.0
    assert terms[2] == {"name": "fitnet", "weight": pytest.approx(0.4 * 100.0)}
    cfg = _cell("dkd", temperature=2.0, **{"method.weight": 0.5})
    terms, _ = L.loss_terms(cfg, L.resolve_entry(cfg))
    assert [t["name"] for t in terms] == ["ce", "dkd"]  # DKD replaces KD
    assert terms[1]["weight"] == 0.5 and terms[1]["temperature"] == 2.0


def test_loss_terms_skips_with_reasons():
    cfg = _cell("ft")  # methods with an initialisation stage run (pretrain), no skip
    terms, skip = L.loss_terms(cfg, L.resolve_entry(cfg))
    assert not skip and terms[-1]["name"] == "ft"

    def shapes(widths):
        f = {n: jax.ShapeDtypeStruct((2, w), np.float32) for n, w in widths.items()}
        return (jax.ShapeDtypeStruct((2, 10), np.float32), f)
    cfg = _cell("kd2m_sliced")
    terms, skip = L.loss_terms(cfg, L.resolve_entry(cfg), shapes({"pooled": 32}),
                               shapes({"pooled": 128}))
    assert "no feature has equal widths" in skip
    terms, skip = L.loss_terms(cfg, L.resolve_entry(cfg), shapes({"pooled": 64}),
                               shapes({"pooled": 64}))
    assert not skip and terms[-1]["features"] == ["pooled", "pooled"]
    assert terms[-1]["weight"] == pytest.approx(0.4 * 1e-4)


def test_cell_identity_is_the_cell_only():
    a = _cell("fitnet")
    base = config_hash(L.cell_identity(a))
    b = _cell("fitnet", out_dir="/elsewhere", progress=True, run_methods=["kd"])
    assert config_hash(L.cell_identity(b)) == base
    c = _cell("fitnet")
    with c.unlocked():
        c.methods = [dict(e, methods=[{"name": "rkd", "distance_weight": 1.0}])
                     if e["name"] == "rkd" else e for e in c.methods]
    assert config_hash(L.cell_identity(c)) == base  # another entry changed: same key
    with c.unlocked():
        c.methods = [dict(e, methods=[{"name": "fitnet", "weight": 1.0}])
                     if e["name"] == "fitnet" else e for e in c.methods]
    assert config_hash(L.cell_identity(c)) != base
    assert config_hash(L.cell_identity(_cell("fitnet", temperature=2.0))) != base


def test_student_kwargs_entry_builds_a_mixstyle_student_and_keys_the_cell():
    cfg = _cell("kd+mixstyle", shift="rotated_digits:75")
    entry = L.resolve_entry(cfg)
    assert entry["student_kwargs"] == {"mixstyle": [1]} and entry["augment"] is None
    assert config_hash(L.cell_identity(cfg)) != config_hash(L.cell_identity(_cell("kd")))
    net = L.student_model(cfg, entry, 10)
    plain = L.student_model(cfg, L.resolve_entry(_cell("kd")), 10)
    assert net.mixstyle == (1,) and plain.mixstyle == () and net.channels == plain.channels
    x = jax.numpy.ones((4, 8, 8, 1))
    v = net.init(jax.random.PRNGKey(0), x)
    outs = [net.apply(v, x * jax.numpy.arange(4.0)[:, None, None, None] + 1, train=True,
                      mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(k)})[0][0]
            for k in range(6)]
    assert any(not np.allclose(outs[0], o) for o in outs[1:])  # MixStyle is live
    bad = _cell("kd")
    with bad.unlocked():
        bad.methods = bad.methods + [{"name": "x", "methods": [], "student_kwarg": {}}]
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['student_kwarg'\]"):
        C.validate(bad)


def test_weight_grid_rule_entries_and_val_selection():
    # reference weight > 1 (FitNet 100): a val grid; reference weight 1 (RKD), an entry's
    # weight set in the method config (DKD) or no method term (KD): no grid
    fit = L.resolve_entry(_cell("fitnet", weight_grid=[1.0, 0.1, 0.01]))
    assert fit["weight_rule"] == "val_grid" and fit["weight_grid"] == [1.0, 0.1, 0.01]
    assert [e["weight"] for e in L.grid_entries(fit)] == pytest.approx([0.4, 0.04, 0.004])
    for name, rule in (("rkd", "reference"), ("dkd", "reference"), ("kd", "reference")):
        e = L.resolve_entry(_cell(name))
        assert e["weight_rule"] == rule and "weight_grid" not in e
        assert L.grid_entries(e) == [e]
    # the grid is a plan key: it changes the key of grid entries only
    assert config_hash(L.cell_identity(_cell("rkd", weight_grid=[1.0, 0.5]))) == \
        config_hash(L.cell_identity(_cell("rkd")))
    assert config_hash(L.cell_identity(_cell("fitnet", weight_grid=[1.0, 0.5]))) != \
        config_hash(L.cell_identity(_cell("fitnet")))
    # selection: highest mean val accuracy over seeds, first on ties; target ignored
    rows = lambda *v: [{"val_accuracy": a, "target_accuracy": 1.0 - a} for a in v]
    best, means = L.select_on_val([rows(0.5, 0.7), rows(0.8, 0.6), rows(0.7, 0.7)])
    assert best == 1 and means == pytest.approx([0.6, 0.7, 0.7])
    with pytest.raises(ValueError, match=r"config.weight_grid must be a non-empty list"):
        quick(weight_grid=[1.0, 0.0])


def test_plan_orders_shift_outermost_and_adds_robust_teacher_cells():
    cfg = quick(shifts=["spurious_mnist1d", "rotated_digits:75"],
                run_methods=["ce", "kd", "dkd"], robust_methods=["kd"], seeds=2)
    cells = S.plan(cfg)
    got = [(c.config.shift, c.config.teacher.algorithm, c.config.method.name)
           for c in cells[::2]]
    assert [c.seed for c in cells] == [0, 1] * (len(cells) // 2)
    assert got == [("spurious_mnist1d", "erm", "ce"), ("spurious_mnist1d", "erm", "kd"),
                   ("spurious_mnist1d", "robust", "kd"), ("spurious_mnist1d", "erm", "dkd"),
                   ("rotated_digits:75", "erm", "ce"), ("rotated_digits:75", "erm", "kd"),
                   ("rotated_digits:75", "erm", "dkd")]
    assert len({c.key for c in cells}) == len(cells)
    with pytest.raises(ValueError, match="unknown teacher algorithm 'irmm'"):
        quick(robust_teachers=["irmm"])


def _row(shift, method, seed, in_acc, teacher="erm", **kw):
    return {"shift": shift, "method": method, "seed": seed, "in_accuracy": in_acc,
            "teacher": teacher, "target_accuracy": kw.get("target", in_acc - 0.1), **kw}


def test_broken_student_flag_marks_and_excludes_from_ranks():
    """A student 10.5 points below CE in-domain is broken (marked, not ranked); one 9.5
    below is not."""
    rows = []
    for s in range(3):
        rows += [_row("a", "ce", s, 0.90), _row("a", "kd", s, 0.91),
                 _row("a", "fitnet", s, 0.795), _row("a", "rkd", s, 0.805),
                 _row("b", "ce", s, 0.80), _row("b", "fitnet", s, 0.85)]
    broken = SR.broken_cells(rows, 0.10)
    assert broken == {("a", "erm", "fitnet")}
    text = SR.table(rows, "target_accuracy", ["ce", "kd", "fitnet", "rkd"], ["a", "b"],
                    broken=broken, baseline="kd")
    line = {ln.split(" | ")[0][2:]: ln for ln in text.split("Difference")[0].splitlines()
            if ln.startswith("| ")}
    assert "69.5 ± 0.0 †" in line["fitnet"] and "(1)" in line["fitnet"]  # b: ranked 1st
    assert line["fitnet"].rstrip(" |").endswith("1.00")  # mean rank over b only
    assert "(3)" in line["rkd"] and "(1)" in line["kd"] and "(2)" in line["ce"]
    diff = text.split("Difference to kd")[1]
    assert any(ln.startswith("| fitnet |") and "†" in ln for ln in diff.splitlines())


def test_val_gain_last_quarter_and_lodo_rows():
    hist = [{"epoch": e, "seed_index": 0, "val": {"accuracy": a}}
            for e, a in ((2, 0.5), (4, 0.6), (6, 0.7), (8, 0.72))]
    assert L.val_gain_last_quarter(hist, 0, 8) == pytest.approx(0.02)
    rows = [_row("m:x", "kd", 0, 0.9, target=0.5), _row("m:y", "kd", 0, 0.8, target=0.7),
            _row("m:x", "ce", 0, 0.9, target=0.4)]
    out = SR.lodo_rows(rows)
    lodo = [r for r in out if r["shift"] == "m (LODO mean)"]
    assert len(lodo) == 1 and lodo[0]["method"] == "kd"  # ce lacks target y
    assert lodo[0]["target_accuracy"] == pytest.approx(0.6)


# ------------------------------------------------------------------ end to end

TINY = ["--config.student.epochs=2", "--config.teacher.epochs=2",
        "--config.student.evaluations=2", "--config.seeds=2",
        "--config.shifts=['spurious_mnist1d', 'coloured_digits']",
        "--config.run_methods=['ce', 'kd', 'fitnet', 'kd+cutmix']",
        "--config.robust_methods=['kd']",
        "--config.shift_options.spurious_mnist1d.num_train=400",
        "--config.shift_options.spurious_mnist1d.num_test=200",
        "--config.shift_options.coloured_digits.replicas=1"]


@pytest.mark.slow
def test_shift_end_to_end_table_metadata_and_resume(tmp_path, monkeypatch):
    argv = ["--quick", *TINY, f"--config.out_dir={tmp_path / 'out'}",
            f"--config.cache_dir={tmp_path / 'cache'}"]
    rows = S.main(argv)
    methods = ["ce", "kd", "fitnet"]
    shifts = ["spurious_mnist1d", "coloured_digits"]
    # kd+cutmix runs on images only
    erm = [r for r in rows if r["teacher"] == "erm"]
    assert {(r["method"], r["shift"]) for r in erm} == (
        {(m, s) for m in methods for s in shifts} | {("kd+cutmix", "coloured_digits")})
    robust = [r for r in rows if r["teacher"] == "robust"]
    assert {(r["method"], r["shift"], r["teacher_algorithm"]) for r in robust} == {
        ("kd", s, "groupdro") for s in shifts}
    assert len(rows) == 9 * 2
    for r in rows:
        for k in ("git_revision", "jax_version", "device_kind", "device_count", "config",
                  "seed", "global_batch_size", "cell_key", "loss_terms",
                  "target_accuracy", "in_accuracy", "target_agreement",
                  "target_worst_group_accuracy", "teacher_target_accuracy",
                  "teacher_val_accuracy", "target_ece", "target_nll", "drop",
                  "target_spurious_rate", "best_epoch", "val_gain_last_quarter",
                  "weight", "weight_rule"):
            assert k in r, k
        assert r["config"]["shift"] == r["shift"]
        assert r["config"]["method"]["name"] == r["method"]
        assert r["config"]["teacher"]["algorithm"] == r["teacher"]
        assert 0.0 <= r["target_worst_group_accuracy"] <= r["target_average_group_accuracy"]
        assert r["global_batch_size"] == 128
    # FitNet (reference weight 100) ran the quick grid x[1, 0.1]; the row is the best on val
    for r in (r for r in rows if r["method"] == "fitnet"):
        assert r["weight_rule"] == "val_grid" and len(r["weight_grid_val"]) == 2
        g = [1.0, 0.1][int(np.argmax(r["weight_grid_val"]))]
        assert r["weight_multiplier"] == g and r["weight"] == pytest.approx(0.4 * g)
        fit_rows = [x for x in rows if x["method"] == "fitnet" and x["shift"] == r["shift"]]
        assert np.mean([x["val_accuracy"] for x in fit_rows]) == pytest.approx(
            max(r["weight_grid_val"]))
    # worst-group accuracy recomputed from per-group accuracy bounds the average
    text = open(tmp_path / "out" / "results.md").read()
    table = text.split("## Target-domain accuracy")[1].split("Difference to kd")[0]
    for m in methods:
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {m} |"))
        assert line.count("±") == 2, line
    assert "kd+cutmix on spurious_mnist1d: skipped" in text
    assert "## Students of the ERM teacher vs of the best robust teacher" in text
    assert "## Method weights chosen on val (rule `val_grid`)" in text
    assert "| spurious_mnist1d | erm | fitnet | x" in text
    assert "| spurious_mnist1d | groupdro (robust pick) |" in text
    # the robust teacher differs from the ERM one (another objective, another model)
    t = {r["teacher_algorithm"]: r["teacher_val_accuracy"] for r in rows
         if r["shift"] == "coloured_digits"}
    assert set(t) == {"erm", "groupdro"}
    for f in ("target_accuracy.png", "in_vs_target.png"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    assert not (tmp_path / "out" / "ckpt").exists() or not any(
        (tmp_path / "out" / "ckpt").iterdir())
    # rerun: every cell is skipped (no training) and the rows are unchanged
    monkeypatch.setattr(S, "fit", lambda *a, **k: pytest.fail("a finished cell reran"))
    rows2 = S.main(argv)
    assert sorted(r["cell_key"] for r in rows2) == sorted(r["cell_key"] for r in rows)
    assert len(Store(str(tmp_path / "out" / "results.jsonl")).read()) == 18


def test_sweep_configs_parse_and_name_valid_keys_and_values():
    import shlex

    from experiments import sweep
    from experiments.configs import shift_sweeps as SW
    from kdjax import experiment as kx

    for name in SW.SWEEPS:
        argv = shlex.split(SW.command(name).replace("\\\n", " "))[3:]  # after "-m sweep"
        args = sweep.parse_args(argv)
        assert args.driver == "experiments.shift" and args.seeds == 3
        base = load_config("experiments.configs.shift", args.overrides, arg="quick")
        cells = kx.expand(base, args.sweeps, [0], identity=L.cell_identity,
                          validate=C.validate)
        assert len(cells) == np.prod([len(v) for _, v in args.sweeps])
    with pytest.raises(ValueError, match="unknown sweep 'nope'"):
        SW.command("nope")


def test_pruned_train_split_keeps_the_hardest_per_class():
    from kdjax.data import ArrayDataset
    cfg = quick(**{"prune.score": "el2n", "prune.keep": 0.5})
    y = np.array([0, 0, 1, 1, 1, 1])
    tr = ArrayDataset(x=np.zeros((6, 2), np.float32), y=y, num_classes=2, name="t",
                      split="train")
    logits = np.array([[5.0, 0], [0, 5.0], [0, 5.0], [5.0, 0], [0, 1.0], [1.0, 0]])
    kept, t_kept = L.prune(cfg, {"train": tr}, {"logits": {"train": logits}})
    # class 0: row 1 (wrong, confident) is hardest; class 1: rows 3 and 5
    np.testing.assert_array_equal(t_kept, logits[[1, 3, 5]])
    assert len(kept) == 3
    assert "prune" not in L.cell_identity(quick())
    assert "prune" in L.cell_identity(cfg)


def test_report_on_constructed_rows(tmp_path):
    """The whole report from synthetic rows: teachers, LODO mean column, broken mark,
    ERM-vs-robust block with a paired CI, convergence."""
    cfg = C.get_config("quick")
    with cfg.unlocked():
        cfg.shifts = ["mnist1d_domains:base", "mnist1d_domains:shear", "coloured_digits"]
        cfg.run_methods = ["ce", "kd", "fitnet"]
        cfg.robust_methods = ["kd"]
    rows = []
    for s in range(3):
        for shift in cfg.shifts:
            corr = shift == "coloured_digits"
            for teacher, methods_ in (("erm", cfg.run_methods), ("robust", ["kd"])):
                if teacher == "robust" and not corr:
                    continue
                for m in methods_:
                    ind = {"ce": 0.9, "kd": 0.91, "fitnet": 0.5}[m] + 0.01 * s
                    tgt = ind - 0.2 + (0.1 + 0.01 * s if teacher == "robust" else 0)
                    rows.append({
                        "shift": shift, "teacher": teacher, "method": m, "seed": s,
                        "in_accuracy": ind, "target_accuracy": tgt, "drop": ind - tgt,
                        "target_ece": 0.1, "target_nll": 0.5, "target_agreement": 0.8,
                        "target_worst_group_accuracy": tgt - 0.3 if corr else None,
                        "target_spurious_rate": 0.3 if corr else None,
                        "best_epoch": 18, "epochs": 20, "val_gain_last_quarter": 0.001,
                        "teacher_algorithm": "groupdro" if teacher == "robust" else "erm",
                        "teacher_val_accuracy": 0.95, "teacher_in_accuracy": 0.94,
                        "teacher_target_accuracy": 0.7})
    header, body = SR.report(cfg, rows, str(tmp_path), ["x on y: skipped, z."], 12.0)
    assert "12 s" in header and "† = broken student" in header
    assert "| mnist1d_domains (LODO mean) | erm" not in body  # no teacher of a mean
    target = body.split("## Target-domain accuracy")[1].split("## In-domain")[0]
    assert "mnist1d_domains (LODO mean)" in target.splitlines()[2]
    fit = next(ln for ln in target.splitlines() if ln.startswith("| fitnet |"))
    assert fit.count("†") == 4 and fit.endswith("| - |")  # broken everywhere, no rank
    rob = body.split("best robust teacher")[1]
    line = next(ln for ln in rob.splitlines() if ln.startswith("| coloured_digits | kd |"))
    assert "groupdro" in line and "+11.0 [" in line  # robust - ERM = 0.10 + 0.01 s
    assert "| coloured_digits | groupdro (robust pick) |" in body
    assert "x on y: skipped, z." in body
    assert (tmp_path / "target_accuracy.png").stat().st_size > 0


def test_sweep_summary_rows_per_setting_and_paired_cis_to_the_baseline(tmp_path):
    """Settings become rows (the swept keys but shift), shifts columns; the difference to
    the baseline sweep's rows is paired over seeds; worst-group only where defined."""
    rows, base = [], []
    for s in range(3):
        for shift, corr in (("coloured_digits", True), ("rotated_digits:75", False)):
            for score, gain in (("random", 0.0), ("el2n", 0.02 + 0.01 * s)):
                rows.append(_row(shift, "kd", s, 0.9, target=0.6 + gain, overrides={
                    "shift": shift, "prune.score": score, "prune.keep": 0.5},
                    target_worst_group_accuracy=0.2 if corr else None, code_state="abc"))
            base.append(_row(shift, "kd", s, 0.9, target=0.6, overrides={
                "shift": shift, "method.name": "kd"},
                target_worst_group_accuracy=0.2 if corr else None))
    other = _row("elsewhere", "kd", 0, 0.9, overrides={"shift": "elsewhere"})
    text = SR.sweep_summary(rows, base + [other], title="pruning")
    assert "elsewhere" not in text  # baseline rows of shifts the sweep did not run
    target = text.split("## Target accuracy")[1].split("## In-domain")[0]
    assert "| method | coloured_digits | rotated_digits:75 |" in target
    line = next(ln for ln in target.splitlines()
                if ln.startswith("| prune.score=el2n prune.keep=0.5 |") and "[" in ln)
    assert line.count("+3.0 [+0.5, +5.5]") == 2  # 0.02 + 0.01 s: mean 3, t-interval
    assert "differences to `baseline`" in text
    worst = text.split("## Target worst-group accuracy")[1]
    assert "rotated_digits:75" not in worst and "coloured_digits" in worst
    # the CLI writes the same table from the two files
    import pathlib
    import subprocess
    import sys
    for name, rs in (("sweep.jsonl", rows), ("base.jsonl", base)):
        Store(str(tmp_path / name)).append(rs)
    subprocess.run([sys.executable, "-m", "experiments.shift_report", str(tmp_path / "s.md"),
                    str(tmp_path / "sweep.jsonl"), "--base-file", str(tmp_path / "base.jsonl"),
                    "--base-method", "kd"], check=True,
                   capture_output=True, cwd=str(pathlib.Path(__file__).parents[2]))
    written = (tmp_path / "s.md").read_text()
    assert written.split("## Target accuracy")[1] == text.split("## Target accuracy")[1] + "\n"
    # a setting of the sweep as the baseline; an unknown one is refused with the list
    own = SR.sweep_summary(rows, baseline="prune.score=random prune.keep=0.5")
    assert "differences to `prune.score=random prune.keep=0.5`" in own
    assert own.count("+3.0 [+0.5, +5.5]") == 2
    with pytest.raises(ValueError, match=r"baseline setting 'x' is not in the sweep; "
                                         r"settings: \['prune.score=el2n"):
        SR.sweep_summary(rows, baseline="x")
    with pytest.raises(ValueError, match="the sweep has no rows"):
        SR.sweep_summary([])
