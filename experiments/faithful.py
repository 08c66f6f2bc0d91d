r"""Faithful KD: plain KD vs adversarial vs faithful distillation, attacked and certified.

    python -m experiments.faithful [digits | mnist1d | mnist | fashion_mnist] [--stale=...]

Method. A cached teacher; per run (KD, ARD, KD + PGD gap penalty, KD + certified gap
bound, on the evaluation's clipped L-inf balls) all seeds train as one vmapped program,
model selection on validation. Each student is attacked and certified on the first
``eval.num_points`` teacher-correct test points at every radius of ``eval.eps``
(:mod:`kdjax.faithful.evaluate`): PGD lower and IBP/CROWN upper bounds on the confidence
gap ``Delta``, the fraction certified ``(eps, delta)``-faithful and label-consistent, and
PGD points above a certified bound (must be 0). Tables at ``(eval.report_eps,
eval.report_delta)`` and per ``(eps, delta)``; both bounds vs eps in ``gaps.png``. Cells
(run, seed) are rows of ``results.jsonl``; a rerun trains only missing cells.
"""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np

from experiments import faithful_report
from experiments.common import best_variables, fit_students, study_teacher
from experiments.configs import faithful as faithful_config
from kdjax import data as kdata
from kdjax import experiment as kx
from kdjax import faithful as F
from kdjax import methods, models
from kdjax.methods.faithful import resolve_clip as resolve_clip_option
from kdjax.train import make_mesh

CONFIG = lambda v: ("experiments.configs.faithful", v or "digits")  # noqa: E731
METRICS = tuple(kx.Metric(m, higher_is_better=not m.endswith("_gap"))
                for m in faithful_config.METRICS)
_CLIP_METHODS = ("faithful_pgd", "faithful_certified", "adversarial_distillation")


def load(argv):
    """The config of ``[variant] --config.k=v ...`` (default ``digits``; nothing on disk)."""
    return kx.parse_config(argv, name="faithful", config=CONFIG,
                           variants=faithful_config.VARIANTS)[0]


def load_data(cfg):
    """``(train, val, test)``; validation is a random held-out part of train."""
    d = cfg.dataset
    kw = {"data_dir": d.data_dir or None, "normalize": bool(d.normalize)}
    if d.name in kdata.EMBEDDED:
        kw.update({k: d[k] for k in ("num_train", "num_test") if d[k]})
    cap = {"max_examples": d.max_train} if d.max_train and d.name not in kdata.EMBEDDED else {}
    full, test = kdata.load(d.name, "train", **kw, **cap), kdata.load(d.name, "test", **kw)
    perm = np.random.default_rng(0).permutation(len(full))
    return (full.subset(perm[d.val_size:], split="train"),
            full.subset(perm[:d.val_size], split="val"), test)


def resolve_clip(cfg, train_x):
    """``config.clip`` -> ``None`` or ``(lo, hi)`` through the one clip reader
    (``"data"``: its ``"batch"`` reading of the whole training set)."""
    clip = resolve_clip_option("batch" if cfg.clip == "data" else cfg.clip, train_x)
    return None if clip is None else (float(clip[0]), float(clip[1]))


def build_methods(run, clip):
    """The run's methods; faithful/adversarial terms get ``clip`` unless they set one."""
    c = {"clip": "none" if clip is None else list(clip)}
    return tuple(methods.build(dict(m, **c) if m["name"] in _CLIP_METHODS and "clip" not in m
                               else dict(m)) for m in run["methods"])


def make_evaluator(cfg, student, teacher, tvars, clip):
    """The jitted per-point evaluator of ``cfg.eval`` (:func:`kdjax.faithful.gap_evaluator`)."""
    ec = cfg.eval
    return F.gap_evaluator(lambda x: teacher.apply(tvars, x, train=False)[0],
                           lambda v, x: student.apply(v, x, train=False)[0],
                           steps=ec.pgd_steps, restarts=ec.pgd_restarts, clip=clip,
                           crown_points=ec.crown_points, crown_method=ec.crown_method)


def train_students(cfg, run, seeds, splits, teacher, student, evaluator, x_eval, mesh,
                   ckpt_dir):
    """Trains the given seeds of one run, then attacks and certifies each selected student
    at ``x_eval``; one result row per seed."""
    t0, (module, tvars, logits, clip), ec = time.time(), teacher, cfg.eval
    bests, _, rows = fit_students(
        student, build_methods(run, clip), {"x": splits[0].x, "y": splits[0].y}, splits,
        logits, (module, tvars), seeds, epochs=cfg.student.epochs,
        batch_size=cfg.student.batch_size, optimizer=cfg.student.optimizer,
        evaluations=cfg.student.evaluations, mesh=mesh, ckpt_dir=ckpt_dir, name=run["name"],
        vmap=cfg.vmap_seeds, progress=cfg.progress)
    for best, r in zip(bests, rows):
        rep = F.faithfulness_report(evaluator, best_variables(best), x_eval, eps=ec.eps,
                                    delta=ec.delta, seed=ec.seed)
        r.update(F.report_at(rep, ec.report_eps, ec.report_delta), faithfulness=rep,
                 methods=run["methods"], dataset=cfg.dataset.name, clip=clip,
                 eval_points=int(len(x_eval)), run_seconds=(time.time() - t0) / len(seeds))
    return rows


def main(argv=None):
    run = kx.Run.from_cli(argv, name="faithful", config=CONFIG, doc=__doc__,
                          variants=faithful_config.VARIANTS)
    cfg, ec = run.config, run.config.eval
    study, runs = kx.study_key(cfg), {r["name"]: r for r in cfg.runs}
    cells = kx.study_cells(cfg, study, [(n, {"run": n}) for n in runs], range(cfg.seeds))
    run.plan(cells)
    mesh = make_mesh(cfg.num_devices or None)
    run.banner(f"{cfg.dataset.name}, {len(cfg.runs)} runs x {cfg.seeds} seeds")

    splits = load_data(cfg)
    clip = resolve_clip(cfg, splits[0].x)
    module, tvars, logits, t_acc = study_teacher(cfg, splits, mesh, run.log)
    test = splits[2]
    x_eval = jnp.asarray(test.x[F.teacher_correct_points(logits["test"], test.y,
                                                         ec.num_points, ec.seed)])
    run.log(f"{len(x_eval)} eval points; clip {clip}")
    student = models.create(cfg.student.model, splits[0].num_classes,
                            **cfg.student.model_kwargs.to_dict())
    evaluator = make_evaluator(cfg, student, module, tvars, clip)

    rows = run.execute(cells, lambda cell, seeds: [
        dict(r, teacher_test_accuracy=t_acc) for r in train_students(
            cfg, runs[cell.fields["run"]], seeds, splits, (module, tvars, logits, clip),
            student, evaluator, x_eval, mesh, run.path("ckpt", study))])

    header = (f"Dataset {cfg.dataset.name}; teacher {cfg.teacher.model} "
              f"{dict(cfg.teacher.model_kwargs)} test accuracy {100 * t_acc:.2f}%; students "
              f"{cfg.student.model} {dict(cfg.student.model_kwargs)}; mean ± std over seeds "
              f"(rank), in %. Gaps at eps = {ec.report_eps} on {len(x_eval)} teacher-correct "
              f"test points (CROWN: first {ec.crown_points}, {ec.crown_method}); "
              f"certified_faithful/agree (on the CROWN points) at delta = {ec.report_delta}.")
    table = "\n\n".join([
        kx.markdown_table(rows, row="run", metrics=METRICS, row_order=list(runs)),
        "Fraction certified (eps, delta)-faithful and label-consistent (first "
        f"{ec.crown_points or len(x_eval)} eval points, %):",
        faithful_report.certification_table(rows, ec.eps, ec.delta, row_order=list(runs)),
        "PGD above a certified bound (must be 0): "
        f"{sum(r['faithfulness']['bound_violations'] for r in rows)} point(s)."])
    run.report(header, table, rows)
    if rows:
        faithful_report.plot_gap_bounds(rows, ec.eps, run.path("gaps.png"),
                                        crown=ec.crown_points > 0)
    return kx.summarize(rows, ["run"], [m.name for m in METRICS])


if __name__ == "__main__":
    kx.cli(main)
