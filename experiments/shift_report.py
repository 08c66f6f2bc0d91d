"""The report of ``experiments/shift.py``: teachers, convergence, the method tables with
the broken-student flag, LODO means, ERM vs robust teachers, plots.

Broken-student rule: a (shift, teacher, method) cell whose mean in-domain accuracy is
more than ``config.broken_margin`` (10 points) below the CE student's on the same shift
is marked ``†`` in every table and left out of the ranks and the mean rank (its numbers
are shown, not ranked).
"""

from __future__ import annotations

import math
import os

import numpy as np

from kdjax import experiment as kx

MAIN = [("target_accuracy", "Target-domain accuracy", True),
        ("in_accuracy", "In-domain accuracy (test_in)", True),
        ("drop", "In-domain minus target accuracy (drop)", False),
        ("target_ece", "Target ECE (15 bins)", False),
        ("target_nll", "Target NLL (nats, not %)", False),
        ("target_agreement", "Teacher-student top-1 agreement on the target", True)]
CORR = [("target_worst_group_accuracy", "Worst-group accuracy on the target", True),
        ("target_spurious_rate", "Rate of predictions equal to the spurious attribute "
         "(target)", False)]
ROBUST = ("target_accuracy", "target_worst_group_accuracy", "target_spurious_rate")


def broken_cells(rows, margin: float) -> set[tuple]:
    """``{(shift, teacher, method)}`` whose mean in-domain accuracy is more than
    ``margin`` below the CE student's mean on the same shift."""
    mean = {}
    for r in rows:
        mean.setdefault((r["shift"], r["teacher"], r["method"]), []).append(r["in_accuracy"])
    ce = {s: np.mean(v) for (s, _, m), v in mean.items() if m == "ce"}
    return {k for k, v in mean.items()
            if k[0] in ce and k[2] != "ce" and np.mean(v) < ce[k[0]] - margin}


def lodo_rows(rows) -> list[dict]:
    """Adds, per shift with several targets, rows of column ``<name> (LODO mean)``: the
    per-seed mean over its targets (only seeds/methods present for every target)."""
    out = list(rows)
    targets = {}
    for r in rows:
        name, _, tgt = r["shift"].partition(":")
        if tgt:
            targets.setdefault(name, set()).add(r["shift"])
    for name, specs in targets.items():
        if len(specs) < 2:
            continue
        groups = {}
        for r in rows:
            if r["shift"] in specs:
                groups.setdefault((r["teacher"], r["method"], r["seed"]), []).append(r)
        for (teacher, method, seed), rs in groups.items():
            if len(rs) == len(specs):
                avg = {k: float(np.mean([x[k] for x in rs])) for k in rs[0]
                       if isinstance(rs[0][k], float) and all(
                           isinstance(x.get(k), float) for x in rs)}
                out.append({**avg, "shift": f"{name} (LODO mean)", "teacher": teacher,
                            "method": method, "seed": seed})
    return out


def table(rows, metric: str, methods, cols, *, broken=(), higher=True, baseline=None,
          teacher="erm", scale: float = 100.0) -> str:
    """``mean ± std (rank)`` per method x column; ``†`` = broken (not ranked); mean rank
    over the ranked columns; with ``baseline`` the paired differences with 95% CIs."""
    rs = [r for r in rows if r["teacher"] == teacher]
    tab = kx.pivot(rs, "method", "shift", metric)
    rank = {}
    for c in cols:
        ok = [m for m in methods if (m, c) in tab and (c, teacher, m) not in broken]
        rank.update({(m, c): k for m, k in zip(ok, kx.ranks([tab[(m, c)]["mean"]
                                                              for m in ok], higher))})
    lines = ["| method | " + " | ".join(cols) + " | mean rank |",
             "|" + "---|" * (len(cols) + 2)]
    for m in methods:
        cells, rk = [], []
        for c in cols:
            t = tab.get((m, c))
            text = "-" if t is None else kx.format_mean_std(t["mean"], t["std"], scale,
                                                            1 if scale == 100 else 2)
            if (c, teacher, m) in broken:
                text += " †"
            elif (m, c) in rank and not math.isnan(rank[(m, c)]):
                text += f" ({rank[(m, c)]:g})"
                rk.append(rank[(m, c)])
            cells.append(text)
        mean_rank = f"{np.mean(rk):.2f}" if rk else "-"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {mean_rank} |")
    if baseline is None or not any(m == baseline for m, _ in tab):
        return "\n".join(lines)
    diffs = kx.paired_differences(tab, baseline)
    lines += ["", f"Difference to {baseline} (mean [95% CI], paired over seeds):", "",
              "| method | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for m in methods:
        if m == baseline:
            continue
        cells = []
        for c in cols:
            d = diffs.get((m, c))
            cells.append("-" if d is None else f"{100 * d[0]:+.1f} (n={d[3]})"
                         if math.isnan(d[1]) else
                         f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]")
            if (c, teacher, m) in broken:
                cells[-1] += " †"
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _teachers(rows) -> str:
    seen, lines = set(), [
        "| shift | teacher | val | in-domain | target | val worst-group | target "
        "worst-group | target spurious rate |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        key = (r["shift"], r.get("teacher_algorithm"))
        if key in seen or key[1] is None:  # LODO mean rows carry no teacher
            continue
        seen.add(key)
        f = lambda k: "-" if r.get(k) is None else f"{100 * r[k]:.1f}"
        lines.append(f"| {r['shift']} | {r['teacher_algorithm']}"
                     f"{' (robust pick)' if r['teacher'] == 'robust' else ''} | "
                     + " | ".join(f(k) for k in (
                         "teacher_val_accuracy", "teacher_in_accuracy",
                         "teacher_target_accuracy", "teacher_val_worst_group_accuracy",
                         "teacher_target_worst_group_accuracy",
                         "teacher_target_spurious_rate")) + " |")
    return "\n".join(lines)


def _convergence(rows, methods, shifts) -> str:
    lines = ["| shift | method | best epoch / epochs | val gain, last quarter (points) |"
             " in-domain / teacher in-domain |", "|---|---|---|---|---|"]
    for s in shifts:
        for m in methods:
            rs = [r for r in rows if r["shift"] == s and r["method"] == m
                  and r["teacher"] == "erm"]
            if rs:
                ratio = np.mean([r["in_accuracy"] / r["teacher_in_accuracy"] for r in rs])
                gain = 100 * np.nanmean([r["val_gain_last_quarter"] for r in rs])
                lines.append(f"| {s} | {m} | {np.mean([r['best_epoch'] for r in rs]):.1f}"
                             f" / {rs[0]['epochs']} | {gain:+.2f} | {ratio:.3f} |")
    return "\n".join(lines)


def _weights(rows) -> str:
    """The ``val_grid`` choices: per cell, the multiplier kept and each candidate's mean
    val accuracy (the rows carry them; the target is never read)."""
    lines = ["| shift | teacher | method | multiplier kept | mean val accuracy per "
             "multiplier |", "|---|---|---|---|---|"]
    seen = set()
    for r in rows:
        key = (r["shift"], r["teacher"], r["method"])
        if r.get("weight_rule") == "val_grid" and "weight_grid_val" in r and key not in seen:
            seen.add(key)
            grid = r["config"]["weight_grid"]
            vals = ", ".join(f"x{g:g}: {100 * v:.1f}" for g, v in zip(grid, r["weight_grid_val"]))
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | x{r['weight_multiplier']:g} "
                         f"| {vals} |")
    return "\n".join(lines) if seen else ""


def _robust(rows, methods, shifts) -> str:
    lines = ["| shift | method | robust teacher | " + " | ".join(
        f"{k.replace('target_', '').replace('_', ' ')}: ERM / robust / diff [95% CI]"
        for k in ROBUST) + " |", "|" + "---|" * (3 + len(ROBUST))]
    for s in shifts:
        for m in methods:
            pair = {t: {r["seed"]: r for r in rows if r["shift"] == s and r["method"] == m
                        and r["teacher"] == t} for t in ("erm", "robust")}
            common = sorted(set(pair["erm"]) & set(pair["robust"]))
            if not common:
                continue
            cells = []
            for k in ROBUST:
                a = [pair["robust"][i][k] for i in common]
                b = [pair["erm"][i][k] for i in common]
                d, lo, hi = kx.paired_ci95(a, b)
                cells.append(f"{100 * np.mean(b):.1f} / {100 * np.mean(a):.1f} / "
                             f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]")
            alg = pair["robust"][common[0]]["teacher_algorithm"]
            lines.append(f"| {s} | {m} | {alg} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(cfg, rows, out_dir: str, notes, seconds: float) -> tuple[str, str]:
    """``(header, body)`` of results.md; writes the plots."""
    rows = lodo_rows(rows)
    shifts = [s for s in cfg.shifts if any(r["shift"] == s for r in rows)]
    cols = shifts + sorted({r["shift"] for r in rows if r["shift"].endswith("(LODO mean)")})
    methods = [m for m in cfg.run_methods if any(r["method"] == m for r in rows)]
    corr = [s for s in shifts if any(r["shift"] == s and r.get("target_worst_group_accuracy")
                                     is not None for r in rows)]
    broken = broken_cells([r for r in rows if "(LODO" not in r["shift"]], cfg.broken_margin)
    broken |= {(f"{s.partition(':')[0]} (LODO mean)", t, m) for s, t, m in broken}
    base = "kd" if "kd" in methods else None
    header = "\n".join([
        "# KD under distribution shift (ShiftKD protocol)", "",
        f"Mean ± std over seeds (accuracies in %), rank within the column in brackets (1 = "
        f"best). Students: {cfg.student.epochs} epochs, checkpoint selected on the val "
        f"split ({100 * cfg.val_fraction:.0f}% of each training domain), never the "
        f"target. Loss: {cfg.ce_weight} CE + {cfg.kd_weight} KD (tau {cfg.temperature}) + "
        f"lambda x method; weight rule recorded per row (`weight_rule`: reference = "
        f"{cfg.method.weight} x the method's reference weight; val_grid = methods whose "
        f"reference weight is > 1, lambda x the multiplier of {list(cfg.weight_grid)} with "
        f"the best mean val accuracy). † = broken student "
        f"(in-domain accuracy more than {100 * cfg.broken_margin:.0f} points below the CE "
        f"student's on that shift): shown, not ranked, left out of the mean rank. "
        f"Wall time of this run (incl. data and teachers): {seconds:.0f} s."])
    parts = ["## Teachers (val = held-out source data)", "", _teachers(rows), "",
             "Correlation shifts (recipe `multiclass`, `kdjax.data.shifts.MULTICLASS_RECIPE`:"
             " 10 classes, attribute = label with probability 0.95 / 0.85 in the two "
             "training environments, independent of the label at test, 5% label noise): "
             "a classifier of the attribute alone scores 10% on the target, one of the "
             "shape alone at most 95% (1 - label noise). DomainBed's binary ColoredMNIST "
             "recipe (`recipe='domainbed'`) stays available but is degenerate for ERM "
             "(colour predicts the noisy label better than shape: every model is a colour "
             "classifier).", ""]
    for metric, title, higher in MAIN:
        parts += [f"## {title} (ERM teacher)", "",
                  table(rows, metric, methods, cols, broken=broken, higher=higher,
                        baseline=base if metric in ("target_accuracy", "in_accuracy")
                        else None, scale=1.0 if metric == "target_nll" else 100.0), ""]
    for metric, title, higher in CORR if corr else ():
        parts += [f"## {title} (ERM teacher; groups = label x [attribute != label])", "",
                  table(rows, metric, methods, corr, broken=broken, higher=higher,
                        baseline=base if "worst" in metric else None), ""]
    if any(r["teacher"] == "robust" for r in rows):
        parts += ["## Students of the ERM teacher vs of the best robust teacher "
                  "(robust - ERM, paired over seeds)", "",
                  _robust(rows, list(cfg.robust_methods), corr), ""]
    parts += ["## Convergence (ERM teacher)", "", _convergence(rows, methods, shifts), ""]
    if _weights(rows):
        parts += ["## Method weights chosen on val (rule `val_grid`)", "", _weights(rows), ""]
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    erm = [r for r in rows if r["teacher"] == "erm"]
    tab = {k: kx.pivot(erm, "method", "shift", k) for k in ("target_accuracy", "in_accuracy")}
    kx.plot_bars(tab["target_accuracy"], methods, cols, os.path.join(out_dir,
                 "target_accuracy.png"), ylabel="target accuracy (%)",
                 title="KD under shift: target accuracy")
    kx.plot_scatter(tab["in_accuracy"], tab["target_accuracy"], methods, shifts,
                    os.path.join(out_dir, "in_vs_target.png"), xlabel="in-domain (%)",
                    ylabel="target (%)", title="in-domain vs out-of-domain")
    return header, "\n".join(parts)


def sweep_summary(rows, baseline_rows=(), title: str = "", baseline: str | None = None) -> str:
    """Markdown of a shift sweep (``python -m experiments.sweep experiments.shift``): one
    row per setting of the swept keys other than ``shift`` (e.g. ``prune.score=el2n
    prune.keep=0.5``), one column per shift; target, in-domain, val and, on correlation
    shifts, worst-group accuracy, each with paired 95% CIs against the baseline: the
    setting named ``baseline``, else ``baseline_rows`` (rows of another run on the swept
    shifts, labelled ``baseline``) when given, else the first setting."""
    def label(r):
        return " ".join(f"{k}={v}" for k, v in r["overrides"].items() if k != "shift")

    if not rows:
        raise ValueError("sweep_summary: the sweep has no rows.")
    swept = {r["shift"] for r in rows}
    rows = [{**r, "method": label(r)} for r in rows]
    rows += [{**r, "method": "baseline"} for r in baseline_rows if r["shift"] in swept]
    first = baseline or ("baseline" if baseline_rows else rows[0]["method"])
    if not any(r["method"] == first for r in rows):
        raise ValueError(f"baseline setting {first!r} is not in the sweep; settings: "
                         f"{sorted({r['method'] for r in rows})}.")
    settings = list(dict.fromkeys([first] + [r["method"] for r in rows]))
    shifts = list(dict.fromkeys(r["shift"] for r in rows))
    corr = [s for s in shifts if any(r["shift"] == s and r.get(
        "target_worst_group_accuracy") is not None for r in rows)]
    teacher = rows[0]["teacher"]
    parts = [f"# {title}" if title else "# Shift sweep", "",
             f"Mean ± std over seeds {sorted({r['seed'] for r in rows})} (%), rank within "
             f"the column in brackets; differences to `{first}` paired over seeds. "
             f"Code {sorted({r.get('code_state', '?') for r in rows})}.", ""]
    for metric, name, cols in [("target_accuracy", "Target accuracy", shifts),
                               ("in_accuracy", "In-domain accuracy", shifts),
                               ("val_accuracy", "Val accuracy (held-out source data: the "
                                "split that selects)", shifts),
                               ("target_worst_group_accuracy", "Target worst-group "
                                "accuracy", corr)]:
        if cols:
            parts += [f"## {name}", "", table(rows, metric, settings, cols,
                                              baseline=first, teacher=teacher), ""]
    return "\n".join(parts)


def _main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="python -m experiments.shift_report",
                                description=sweep_summary.__doc__)
    p.add_argument("out", help="Markdown file to write")
    p.add_argument("sweep", help="sweep.jsonl of the sweep")
    p.add_argument("--base-file", help="rows of another run as the baseline")
    p.add_argument("--base-method", help="keep only these rows of --base-file (method)")
    p.add_argument("--baseline", help="a setting of the sweep as the baseline")
    p.add_argument("--title", default="")
    a = p.parse_args(argv)
    base = kx.Store(a.base_file).read() if a.base_file else []
    base = [r for r in base if a.base_method in (None, r["method"]) and r["teacher"] == "erm"]
    text = sweep_summary(kx.Store(a.sweep).read(), base, baseline=a.baseline,
                         title=a.title or os.path.basename(os.path.dirname(
                             os.path.abspath(a.sweep))))
    with open(a.out, "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    _main()
