r"""Faithful KD: plain KD vs adversarial vs faithful distillation, attacked and certified.

    python -m experiments.faithful [digits | mnist1d | mnist | fashion_mnist] [--config.k=v ...]

Reads top to bottom: config -> data -> teacher (trained once, cached) -> students (all
seeds of a run as one vmapped program; model selection on validation) -> faithfulness
evaluation on the teacher's correctly classified test points -> table, JSON lines, plot.
Finished (run, seed) rows are skipped on rerun (rows keyed by the config hash) and runs
checkpoint as they train.

Evaluated per student, ``y`` the teacher's label, ``B_eps(x)`` the clipped L-inf ball
(kdjax's formalism, :mod:`kdjax.faithful`):

* ``pgd_gap``: mean over points of the PGD lower bound on
  ``Delta(x) = max_{x' in B_eps(x)} |p^S_y(x') - p^T_y(x')|`` (joint attack, restarts);
* ``ibp_gap`` / ``crown_gap``: mean certified upper bound on ``Delta(x)`` (IBP on all
  eval points, CROWN on the first ``crown_points``);
* ``certified_faithful``: fraction of the CROWN points (all points with IBP when
  ``crown_points = 0``) with certified ``Delta(x) <= delta`` (the tighter of IBP and
  CROWN) and the student's argmax certified equal to ``y`` over the ball;
  ``certified_agree``: the latter alone; ``certified_faithful_ibp``: IBP only, all points;
* ``bound_violations``: points where PGD exceeded a certified bound (must be 0).
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import fit_seeds
from experiments.configs import faithful as faithful_config
from kdjax import data as kdata
from kdjax import faithful as F
from kdjax import methods, models
from kdjax.experiment.config import config_hash, load_config, parse_cli
from kdjax.methods.faithful import resolve_clip as resolve_clip_option
from kdjax.train import Distiller, EvalSet, Evaluation, make_mesh, make_optimizer, predict
from kdjax.experiment import results as R
from kdjax.train.engine import evaluate
from kdjax.train.teacher import get_teacher, teacher_apply

_CLIP_METHODS = ("faithful_pgd", "faithful_certified", "adversarial_distillation")


def load(argv):
    """Config from ``[variant] --config.k=v ...`` (variant default ``digits``)."""
    overrides, rest = parse_cli(argv)
    if len(rest) > 1 or (rest and rest[0].startswith("-")):
        variants = " | ".join(faithful_config.VARIANTS)
        raise SystemExit(f"unknown arguments {rest}; usage: [{variants}] "
                         "[--config.<key>=<value> ...].")
    return load_config("experiments.configs.faithful", overrides, rest[0] if rest else "digits")


def load_data(cfg):
    """``(train, val, test)``; validation is a random held-out part of train."""
    d = cfg.dataset
    kw = {"data_dir": d.data_dir or None, "normalize": bool(d.normalize)}
    if d.name in kdata.EMBEDDED:
        kw.update({k: d[k] for k in ("num_train", "num_test") if d[k]})
    elif d.max_train:
        kw["max_examples"] = d.max_train
    full = kdata.load(d.name, "train", **kw)
    kw.pop("max_examples", None)
    test = kdata.load(d.name, "test", **kw)
    perm = np.random.default_rng(0).permutation(len(full))
    return (full.subset(perm[d.val_size:], split="train"),
            full.subset(perm[:d.val_size], split="val"), test)


def resolve_clip(cfg, train_x):
    """``config.clip`` -> ``None`` or ``(lo, hi)`` floats through the one clip reader,
    :func:`kdjax.methods.faithful.resolve_clip` (``"data"``: the range of the training
    inputs, i.e. its ``"batch"`` reading of the whole training set)."""
    clip = resolve_clip_option("batch" if cfg.clip == "data" else cfg.clip, train_x)
    return None if clip is None else (float(clip[0]), float(clip[1]))


def build_methods(run, clip):
    """The run's methods; faithful/adversarial terms get ``clip`` unless they set one."""
    out = []
    for m in run["methods"]:
        m = dict(m)
        if m["name"] in _CLIP_METHODS and "clip" not in m:
            m["clip"] = "none" if clip is None else list(clip)
        out.append(methods.build(m))
    return tuple(out)


def make_distiller(cfg, run, num_classes, teacher, clip, steps_per_epoch):
    student = models.create(cfg.student.model, num_classes, **cfg.student.model_kwargs.to_dict())
    tx = make_optimizer(cfg.student.optimizer, total_steps=cfg.student.epochs * steps_per_epoch,
                        steps_per_epoch=steps_per_epoch)
    return Distiller(student, build_methods(run, clip), tx, teacher=teacher)


def train_students(cfg, run, train, val, teacher, tvars, val_logits, clip, mesh, ckpt_dir,
                   seeds):
    """Trains ``seeds`` of one run (vmapped); returns ``(student, [variables per seed])``."""
    b = cfg.student.batch_size
    distiller = make_distiller(cfg, run, train.num_classes, teacher, clip, len(train) // b)
    data = {"x": train.x, "y": train.y}
    eval_sets = {"val": EvalSet(x=val.x, y=val.y, teacher_logits=val_logits)}
    epochs = cfg.student.epochs
    every = max(1, epochs // cfg.student.evaluations)
    common = dict(epochs=epochs, batch_size=b, mesh=mesh,
                  evaluation=Evaluation(eval_sets, every=every, select_on="val"),
                  checkpoint_every=every, progress=cfg.progress, desc=run["name"])
    bests, _ = fit_seeds(distiller, tvars, data, seeds, vmap=cfg.vmap_seeds,
                         ckpt_dir=ckpt_dir, name=run["name"], example_x=train.x[:2], **common)
    out = []
    for best in bests:
        v = {"params": best["params"]}
        if best["batch_stats"]:
            v["batch_stats"] = best["batch_stats"]
        out.append((v, best))
    return distiller.student, out


def make_evaluator(cfg, student, teacher, tvars, clip):
    r"""Jitted ``evaluate(student_vars, x, eps, key) -> dict`` of per-point PGD gaps,
    certified bounds (IBP; CROWN on the first ``crown_points``) and certified agreement.
    The student's variables are an argument, so all students of an architecture share
    one compilation."""
    ec = cfg.eval
    t_fn = lambda x: teacher.apply(tvars, x, train=False)[0].astype(jnp.float32)  # noqa

    @jax.jit
    def run(svars, x, eps, key):
        s_fn = lambda v: student.apply(svars, v, train=False)[0].astype(jnp.float32)  # noqa
        pgd, _ = F.pgd_gap(t_fn, s_fn, x, eps=eps, steps=ec.pgd_steps,
                           restarts=ec.pgd_restarts, key=key, clip=clip)
        ibp = F.margin_bounds(t_fn, s_fn, x, eps=eps, method="ibp", clip=clip)
        out = {"pgd": pgd, "ibp": F.gap_upper_bound(ibp)["gap"], "agree_ibp": _agree(ibp)}
        if ec.crown_points:
            xc = x[:ec.crown_points]
            cr = F.margin_bounds(t_fn, s_fn, xc, eps=eps, method=ec.crown_method, clip=clip)
            out["crown"] = F.gap_upper_bound(cr)["gap"]
            out["agree_crown"] = _agree(cr)
        return out

    return run


def _agree(mb):
    k = mb.student_lower.shape[-1]
    low = jnp.where(jax.nn.one_hot(mb.labels, k, dtype=bool), jnp.inf, mb.student_lower)
    return jnp.min(low, axis=-1) > 0


def faithfulness_metrics(evaluator, svars, x_eval, cfg):
    """Per-eps means and per-(eps, delta) certified fractions (see the module doc)."""
    ec = cfg.eval
    out = {"eps": {}}
    violations = 0
    for i, eps in enumerate(ec.eps):
        r = jax.device_get(evaluator(svars, x_eval, jnp.float32(eps),
                                     jax.random.fold_in(jax.random.PRNGKey(ec.seed), i)))
        upper = np.array(r["ibp"])
        agree = np.array(r["agree_ibp"])
        m = {"pgd_gap": float(r["pgd"].mean()), "ibp_gap": float(r["ibp"].mean())}
        if "crown" in r:
            nc = len(r["crown"])
            upper[:nc] = np.minimum(upper[:nc], r["crown"])
            agree[:nc] |= r["agree_crown"]
            m["crown_gap"] = float(r["crown"].mean())
            m["ibp_gap_crown_points"] = float(r["ibp"][:nc].mean())
            m["pgd_gap_crown_points"] = float(r["pgd"][:nc].mean())
            violations += int(np.sum(r["pgd"][:nc] > r["crown"] + 1e-5))
        violations += int(np.sum(r["pgd"] > r["ibp"] + 1e-5))
        # certified fractions over the CROWN points (the tighter of IBP and CROWN) when
        # CROWN ran, else over all points with IBP; IBP-only fractions over all points
        n = ("crown" in r) and len(r["crown"]) or len(upper)
        m["certified_gap"] = float(upper[:n].mean())
        m["certified_agree"] = float(agree[:n].mean())
        m["certified_faithful"] = {str(d): float(np.mean((upper[:n] <= d) & agree[:n]))
                                   for d in ec.delta}
        m["certified_faithful_ibp"] = {
            str(d): float(np.mean((r["ibp"] <= d) & r["agree_ibp"])) for d in ec.delta}
        m["certified_points"] = int(n)
        out["eps"][str(eps)] = m
    out["bound_violations"] = violations
    return out


def plot_gaps(summary_by_run, eps_grid, path):
    """Mean PGD gap (lower bound, solid) and certified bound (upper, dashed; the tighter
    of IBP and CROWN on the CROWN points) vs eps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (run, curves) in enumerate(summary_by_run.items()):
        color = f"C{i}"
        ax.plot(eps_grid, curves["pgd"], "-o", color=color, label=f"{run} PGD (lower)")
        ax.plot(eps_grid, curves["certified_gap"], "--s", color=color,
                label=f"{run} certified (upper)")
    ax.set_xlabel("eps (L-inf radius)")
    ax.set_ylabel("mean confidence gap |p^S_y - p^T_y|")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    R.save_figure(fig, path)


def _flat(row, cfg):
    """Table columns at ``(report_eps, report_delta)``."""
    m = row["faithfulness"]["eps"][str(cfg.eval.report_eps)]
    return {"pgd_gap": m["pgd_gap"], "ibp_gap": m["ibp_gap"],
            "crown_gap": m.get("crown_gap", float("nan")),
            "certified_faithful": m["certified_faithful"][str(cfg.eval.report_delta)],
            "certified_agree": m["certified_agree"]}


def main(argv=None):
    cfg = load(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    mesh = make_mesh(cfg.num_devices or None)
    os.makedirs(cfg.out_dir, exist_ok=True)
    meta = R.run_metadata()
    print(f"kdjax faithful: {cfg.dataset.name}, {cfg.seeds} seeds, {mesh.devices.size} "
          f"{meta['device_kind']} device(s), jax {meta['jax_version']}, rev {meta['git_revision']}")

    train, val, test = load_data(cfg)
    clip = resolve_clip(cfg, train.x)
    teacher, tvars, tmeta = get_teacher(
        cfg.teacher, {"dataset": cfg.dataset.to_dict()}, {"x": train.x, "y": train.y},
        {"x": val.x, "y": val.y}, train.num_classes, cache_dir=cfg.cache_dir, mesh=mesh,
        progress=cfg.progress)
    t_apply = teacher_apply(teacher, tvars)
    val_logits = predict(t_apply, val.x, 512, mesh)
    test_logits = predict(t_apply, test.x, 512, mesh)
    t_acc = evaluate(test_logits, test.y)["accuracy"]
    # evaluation points: the first num_points teacher-correct test points of a fixed shuffle
    correct = np.flatnonzero(test_logits.argmax(-1) == test.y)
    order = np.random.default_rng(cfg.eval.seed).permutation(correct)
    x_eval = jnp.asarray(test.x[order[:cfg.eval.num_points]])
    print(f"teacher {cfg.teacher.model}: test accuracy {100 * t_acc:.2f}% "
          f"({'cached' if tmeta['cached'] else 'trained'}); {len(x_eval)} eval points; "
          f"clip {clip}")

    results_path = os.path.join(cfg.out_dir, "results.jsonl")
    cfg_key = config_hash({k: v for k, v in cfg.to_dict().items()
                           if k not in ("out_dir", "cache_dir", "progress")})
    done = {(r["run"], r["seed"]) for r in R.read_jsonl(results_path)
            if r.get("config_hash") == cfg_key}
    evaluator = None
    for run in cfg.runs:
        seeds = [s for s in range(cfg.seeds) if (run["name"], s) not in done]
        if not seeds:
            continue
        t_run = time.time()
        student, trained = train_students(cfg, run, train, val, teacher, tvars, val_logits,
                                          clip, mesh, os.path.join(cfg.out_dir, "ckpt", cfg_key),
                                          seeds)
        if evaluator is None:
            evaluator = make_evaluator(cfg, student, teacher, tvars, clip)
        rows = []
        for s, (svars, best) in zip(seeds, trained):
            logits = predict(teacher_apply(student, svars), test.x, 512, mesh)
            m = evaluate(logits, test.y, test_logits)
            row = {"run": run["name"], "seed": s, "test_accuracy": m["accuracy"],
                   "test_agreement": m["agreement"], "test_kl_to_teacher": m["kl_to_teacher"],
                   "val_accuracy": best["metrics"]["val"]["accuracy"],
                   "best_epoch": best["epoch"], "global_batch_size": cfg.student.batch_size,
                   "methods": run["methods"],
                   "faithfulness": faithfulness_metrics(evaluator, svars, x_eval, cfg)}
            row.update(_flat(row, cfg))
            row.update(config_hash=cfg_key, dataset=cfg.dataset.name, clip=clip,
                       eval_points=int(len(x_eval)), teacher_test_accuracy=t_acc,
                       run_seconds=(time.time() - t_run) / len(seeds),
                       config=cfg.to_dict(), **meta)
            rows.append(row)
        R.append_jsonl(results_path, rows)
        print(f"{run['name']}: {len(seeds)} seed(s) in {time.time() - t_run:.0f} s")

    rows = [r for r in R.read_jsonl(results_path) if r.get("config_hash") == cfg_key]
    metrics = faithful_config.METRICS
    summary = R.summarize(rows, ["run"], metrics)
    order_ = {r["name"]: i for i, r in enumerate(cfg.runs)}
    summary.sort(key=lambda s: order_.get(s["run"], 99))
    ec = cfg.eval
    header = (f"Dataset {cfg.dataset.name}; teacher {cfg.teacher.model} "
              f"{dict(cfg.teacher.model_kwargs)} test accuracy {100 * t_acc:.2f}%; students "
              f"{cfg.student.model} {dict(cfg.student.model_kwargs)}; mean +- std over seeds, "
              f"in %. Gaps at eps = {ec.report_eps} on {len(x_eval)} teacher-correct test "
              f"points (CROWN: first {ec.crown_points}, {ec.crown_method}); "
              f"certified_faithful/agree (on the CROWN points) at delta = "
              f"{ec.report_delta}.\n\n")
    table = R.markdown_table(summary, ["run"], metrics)
    # grid: fraction certified (eps, delta)-faithful, mean over seeds
    grid_lines = ["", "Fraction certified (eps, delta)-faithful and label-consistent "
                  f"(first {ec.crown_points or len(x_eval)} eval points, mean over seeds, %):", "",
                  "| run | " + " | ".join(f"eps={e}, delta={d}" for e in ec.eps
                                         for d in ec.delta) + " |",
                  "|---|" + "---|" * (len(ec.eps) * len(ec.delta))]
    curves, violations = {}, 0
    for s in summary:
        rs = [r for r in rows if r["run"] == s["run"]]
        violations += sum(r["faithfulness"]["bound_violations"] for r in rs)
        cells = [100 * np.mean([r["faithfulness"]["eps"][str(e)]["certified_faithful"][str(d)]
                                for r in rs]) for e in ec.eps for d in ec.delta]
        grid_lines.append(f"| {s['run']} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
        # both curves on the same points (the CROWN points when CROWN ran)
        lower_key = "pgd_gap_crown_points" if ec.crown_points else "pgd_gap"
        curves[s["run"]] = {
            name: [np.mean([r["faithfulness"]["eps"][str(e)][k] for r in rs]) for e in ec.eps]
            for name, k in (("pgd", lower_key), ("certified_gap", "certified_gap"))}
    text = (header + table + "\n" + "\n".join(grid_lines) +
            f"\n\nPGD above a certified bound (must be 0): {violations} point(s).\n")
    R.atomic_write_text(os.path.join(cfg.out_dir, "results.md"), text)
    if curves:
        plot_gaps(curves, list(ec.eps), os.path.join(cfg.out_dir, "gaps.png"))
    print("\n" + text)
    print(f"wrote {cfg.out_dir}/results.jsonl, results.md, gaps.png in "
          f"{time.time() - t0:.0f} s")
    return summary


if __name__ == "__main__":
    main()
