"""Uniform KD vs KD-AIF, influence-weighted distillation (arXiv 2501.02705).

    python -m experiments.kd_aif [mnist1d|digits|cifar10_4k|svhn_1k] [--config.key=value ...]

Method. Teachers are trained once (cached); for ``semi`` on the ``semi.labelled`` labels
only. Settings: clean; noisy (kdjax's stress test: 30% of the teacher's logits rolled);
semi (the paper's). Students distil with ``ce_weight CE + kd_weight tau^2 KL`` weighted per
example. Frozen teacher: ``uniform``, ``oneshot_<m>`` (score the uniform student, retrain),
``periodic_<m>`` (re-score every K epochs). Joint loop (semi, the paper's algorithm):
``mpl`` (uniform weights), ``joint_<m>`` (influence weights re-scored on the loop's student
every K epochs scale its pseudo-label loss; the teacher takes the MPL feedback step; the
loop's student is reported). Selection on validation; test accuracy, agreement with the
teacher, AUROC of the weights (bad = corrupted / teacher-wrong / wrong pseudo-label).
"""

from __future__ import annotations

import jax
import numpy as np
import optax

from experiments.common import evaluate_student, labelled_subset, load_splits
from kdjax import experiment as kx, models
from kdjax.data.corruption import corrupt_teacher_logits, flip_labels
from kdjax.evaluation import auroc
from kdjax.recipes import kd_aif
from kdjax.train import EvalSet, Evaluation, evaluate, make_optimizer, predict
from kdjax.train.teacher import get_teacher, teacher_apply

SELECTION = ("settings", "runs", "seeds")   # which cells run, not what a cell is: not keyed
METRICS = [kx.Metric(m) for m in ("test_accuracy", "test_agreement", "auroc", "val_accuracy")]


def teachers(cfg, train, val):
    """``{"full": (module, vars)}`` and, for ``semi``, the labelled-only teacher + mask."""
    def get(t, extra, mask, n):
        return get_teacher(t, {"dataset": cfg.dataset.to_dict(), **extra},
                           {"x": train.x[mask], "y": train.y[mask]},
                           {"x": val.x[:n], "y": val.y[:n]}, train.num_classes,
                           cache_dir=cfg.cache_dir, progress=cfg.progress)[:2]
    out = {"full": get(cfg.teacher, {}, slice(None), len(val.y))}
    if "semi" in cfg.settings:
        mask, n = labelled_subset(train.y, cfg.semi.labelled, train.num_classes), cfg.semi.val_size
        t = {**cfg.teacher.to_dict(), "epochs": cfg.semi.teacher_epochs,
             "batch_size": min(cfg.teacher.batch_size, int(mask.sum()))}
        out["semi"] = get(t, {"labelled": cfg.semi.labelled, "val_size": n}, mask, n) + (mask,)
    return out


def setting_data(cfg, setting, splits, teacher):
    """Distillation data, validation data, bad-point mask and teacher logits."""
    (train, val, test), (module, tvars) = splits, teacher[:2]
    apply, nz = teacher_apply(module, tvars), cfg.noise
    lg = {k: predict(apply, d.x) for k, d in zip(("train", "val", "test"), splits)}
    n = cfg.semi.val_size if setting == "semi" else len(val.y)
    data = {"x": train.x, "y": train.y, "teacher_logits": lg["train"]}
    bad, ce_scale = np.argmax(lg["train"], -1) != train.y, 1.0    # teacher errors
    if setting == "semi":
        data = kd_aif.semi_supervised_data(train.x, train.y, teacher[2], lg["train"])
        bad, ce_scale = ~teacher[2] & bad, 1.0 / float(teacher[2].mean())
    elif setting == "noisy" and cfg.noise.kind == "teacher":
        data["teacher_logits"], bad = corrupt_teacher_logits(lg["train"], nz.fraction, nz.seed)
    elif setting == "noisy":
        data["y"], bad = flip_labels(train.y, nz.fraction, train.num_classes, nz.seed)
    return {"data": data, "val": {"x": val.x[:n], "y": val.y[:n]}, "bad": bad, "logits": lg,
            "eval": EvalSet(x=val.x[:n], y=val.y[:n], teacher_logits=lg["val"][:n]),
            "objective": {**cfg.objective.to_dict(), "ce_scale": ce_scale},
            "teacher": teacher, "teacher_test": evaluate(lg["test"], test.y)["accuracy"]}


def train_run(cfg, run, seed, S, splits, student, ckpt):
    """One seed of one run: ``(best record, weights or None, extra row fields)``."""
    train, inf, b, epochs = splits[0], cfg.influence, cfg.student.batch_size, cfg.student.epochs
    tx = make_optimizer(cfg.student.optimizer, total_steps=epochs * (len(train) // b),
                        steps_per_epoch=len(train) // b)
    opts = {k: inf[k] for k in ("curvature", "curvature_examples", "damping")}
    if inf.curvature == "ggn":   # maxiter is CG's; the last layer is solved directly
        opts["maxiter"] = inf.maxiter
    if run in kd_aif.PROCEDURES:   # frozen teacher
        every = max(1, epochs // cfg.student.evaluations)
        d = kd_aif.make_distiller(student, tx, **cfg.objective.to_dict())
        return kd_aif.frozen_teacher_run(
            run, d, lambda: d.init(seed, train.x[:2]), S["data"], S["val"],
            objective=S["objective"], scorer_options=opts, epochs=epochs,
            rescore_every=inf.rescore_every, temperature=inf.temperature, checkpoint_dir=ckpt,
            batch_size=b, checkpoint_every=every, progress=cfg.progress, desc=run,
            evaluation=Evaluation({"val": S["eval"]}, every=every, select_on="val")) + ({},)
    (tm, tv, mask), o, data = S["teacher"], S["objective"], S["data"]
    res = kd_aif.fit_joint(
        (tm, tv), (student, student.init(jax.random.PRNGKey(seed), train.x[:2])), data,
        S["val"], key=jax.random.PRNGKey(seed), epochs=epochs, batch_size=b,
        teacher_tx=optax.sgd(cfg.mpl.teacher_lr, momentum=0.9), student_tx=tx,
        student_lr=cfg.mpl.student_lr, objective=o, teacher_ce_weight=cfg.mpl.teacher_ce_weight,
        labelled={"x": train.x[mask], "y": train.y[mask]},
        scorer=kd_aif.make_joint_scorer(tm, student, data, S["val"], objective=o, **opts)
        if run.startswith("joint") else None, rescore_every=inf.rescore_every,
        mapping=kd_aif.mapping_of(run) or "exp_minmax", weight_temperature=inf.temperature,
        select_fn=lambda sv: evaluate(predict(teacher_apply(student, sv), S["val"]["x"]),
                                      S["val"]["y"])["accuracy"])
    after = evaluate(predict(teacher_apply(tm, res.teacher_vars), splits[2].x), splits[2].y)
    return res.best, res.weights_log[-1][1], {**res.overhead(), "teacher_after": after["accuracy"]}


def main(argv=None):
    run = kx.Run.from_cli(argv, name="kd_aif", config="experiments.configs.kd_aif",
                          doc=__doc__, variants=["mnist1d", "digits", "cifar10_4k", "svhn_1k"])
    cfg, ident = run.config, kx.default_identity(run.config)
    study = kx.config_hash({**{k: v for k, v in ident.items() if k not in SELECTION},
                            "semi": {k: v for k, v in ident["semi"].items() if k != "runs"}})
    entries = [(f"{s}/{r}", {"setting": s, "run": r}) for s in cfg.settings
               for r in (cfg.semi.runs if s == "semi" else cfg.runs)]
    cells = kx.study_cells(cfg, study, entries, range(cfg.seeds))
    run.plan(cells)
    run.banner(f"{cfg.dataset.name}, settings {list(cfg.settings)}, {cfg.seeds} seeds")
    splits = load_splits(cfg.dataset)
    ts, cache = teachers(cfg, *splits[:2]), {}
    student = models.create(cfg.student.model, splits[0].num_classes,
                            **cfg.student.model_kwargs.to_dict())

    def cell_fn(cell, seeds):
        s, r, rows = cell.fields["setting"], cell.fields["run"], []
        S = cache[s] = cache.get(s) or setting_data(cfg, s, splits, ts.get(s, ts["full"]))
        for seed in seeds:
            best, w, extra = train_run(cfg, r, seed, S, splits, student,
                                       run.path("ckpt", study, s, str(seed)))
            m = evaluate_student(student, best, splits[2], S["logits"]["test"], None)
            w, bad = np.ones(len(S["bad"])) if w is None else np.asarray(w), S["bad"]
            rows.append({"test_accuracy": m["accuracy"], "test_agreement": m["agreement"],
                         "val_accuracy": best["value"], "best_epoch": best["epoch"],
                         "auroc": auroc(w, ~bad, if_undefined=np.nan) if np.ptp(w) else np.nan,
                         "bad_fraction": float(bad.mean()), "train_examples": len(w),
                         "labelled_examples": int(np.sum(S["data"].get("label_mask", 1 + 0 * w))),
                         "teacher_test_accuracy": S["teacher_test"], **extra})
        return rows

    rows = run.execute(cells, cell_fn)
    tables = [f"### {s}{' (kdjax stress test, not in the paper)' * (s == 'noisy')}\n\n"
              + kx.markdown_table([r for r in rows if r["setting"] == s], row="run",
                                  metrics=METRICS, baseline="uniform")
              for s in cfg.settings if any(r["setting"] == s for r in rows)]
    run.report(f"KD-AIF on {cfg.dataset.name}; student {cfg.student.model}, {cfg.student.epochs} "
               f"epochs, re-scored every {cfg.influence.rescore_every}; semi: {cfg.semi.labelled} "
               f"labels; study {study}. Mean ± std over seeds (%), paired 95% CIs vs uniform KD; "
               "AUROC of the weights, good vs bad points.", "\n\n".join(tables), rows)
    return kx.summarize(rows, ["setting", "run"], [m.name for m in METRICS])


if __name__ == "__main__":
    kx.cli(main)
