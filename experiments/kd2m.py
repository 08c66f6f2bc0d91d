"""KD2M (arXiv:2504.01757): students trained with CE + lambda * D(feature distributions).

    python -m experiments.kd2m [mnist1d | digits | quick | paper:<tfds name>] [--stale=...]

Method. A cached teacher; each run adds to the student's CE one distance D between the
batch distributions of student and teacher ``pooled`` features (exact OT, Sinkhorn,
Gaussian W2/KL, MMD, class-conditional forms; or a baseline: KD, feature MSE), weighted
by lambda: a number or "auto" = ``ratio * log(C) / D_0`` (``D_0``: the distance of the
initial seed-0 student on training data). Seeds train as one vmapped program; model
selection on validation; reported: test accuracy, agreement and *held-out* distances of
the pooled test features (exact W2^2, W2^2 / teacher variance, Gaussian W2^2: one fixed
metric for every run, the quantity of the paper's bound). Cells (run, seed) are rows of
``results.jsonl``; a rerun trains only missing cells (see :mod:`kdjax.experiment`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from experiments.common import best_variables, fit_students, load_splits, study_teacher
from experiments.configs.kd2m import VARIANTS, config_for, make_runs
from kdjax import data as kdata
from kdjax import experiment as kx
from kdjax import methods, models
from kdjax.evaluation import embed, feature_distances
from kdjax.train import make_mesh

ACCURACY = ("test_accuracy", "test_agreement", "val_accuracy")
DISTANCES = ("heldout_w2", "heldout_w2_rel", "heldout_gaussian_w2")
METRICS = (*[kx.Metric(m) for m in ACCURACY],
           *[kx.Metric(m, scale=1.0, digits=4, higher_is_better=False) for m in DISTANCES])
FEATURE = "pooled"


def load(argv):
    """The config of ``[variant] --config.k=v ...`` (nothing created on disk)."""
    return kx.parse_config(argv, name="kd2m", config=config_for, variants=VARIANTS)[0]


def load_data(cfg):
    """train / val / test (:func:`experiments.common.load_splits`); images are read as
    signals ``[N, H * W, C]`` by ``cnn1d`` students."""
    return load_splits(cfg.dataset, as_signals=cfg.student.model == "cnn1d")


def resolve_weights(cfg, run, student, teacher, tvars, train):
    """Method configs with "auto" weights replaced by ``ratio * log(C) / D_0``."""
    out, calib, key = [], {}, jax.random.PRNGKey(0)
    x = jnp.asarray(train.x[:min(cfg.calibration_examples, len(train))])
    batch = {"x": x, "y": jnp.asarray(train.y[:len(x)])}
    for mc in map(dict, run["methods"]):
        if mc.get("weight") == "auto":
            m = methods.build({k: v for k, v in mc.items() if k != "weight"})
            s_out = student.apply(student.init(key, x[:2], train=False), x, train=False)
            t_out = teacher.apply(tvars, x, train=False)
            d0 = float(m(*m.init(key, s_out, t_out), s_out, t_out, batch, key)[0])
            if not d0 > 0 or not math.isfinite(d0):
                raise ValueError(f"run {run['name']!r}: cannot calibrate lambda of "
                                 f"{mc['name']!r}, initial distance D_0 = {d0}.")
            mc["weight"] = cfg.kd2m_ratio * math.log(train.num_classes) / d0
            calib[mc["name"]] = {"d0": d0, "weight": mc["weight"]}
        out.append(mc)
    return out, calib


def heldout_distances(s_feat, t_feat):
    """Exact W2^2, W2^2 / teacher total variance, full Gaussian W2^2 (test features)."""
    return {f"heldout_{k}": v for k, v in feature_distances(s_feat, t_feat).items()}


def train_students(cfg, run, seeds, splits, teacher, mesh, ckpt_dir):
    """Trains the given seeds of one run; one result row per seed."""
    (train, _, test), (module, tvars, logits, t_feat) = splits, teacher
    student = models.create(cfg.student.model, train.num_classes,
                            **cfg.student.model_kwargs.to_dict())
    method_cfgs, calib = resolve_weights(cfg, run, student, module, tvars, train)
    built = tuple(methods.build(m) for m in method_cfgs)
    augment = kdata.get_augmentation(cfg.student.augment) if cfg.student.augment else None
    only_ce = all(m.name == "ce" for m in built)
    logit_only = all(m.name in ("ce", "kd") for m in built) and augment is None
    data = {"x": train.x, "y": train.y}
    if logit_only and not only_ce:
        data["teacher_logits"] = logits["train"]
    bests, _, rows = fit_students(
        student, built, data, splits, logits, None if only_ce else (module, tvars), seeds,
        epochs=cfg.student.epochs, batch_size=cfg.student.batch_size,
        optimizer=cfg.student.optimizer, evaluations=cfg.student.evaluations, mesh=mesh,
        ckpt_dir=ckpt_dir, name=run["name"], vmap=cfg.vmap_seeds, progress=cfg.progress,
        augment=augment, teacher_from_batch=logit_only and not only_ce)
    n = min(cfg.heldout_examples or len(test), len(test))
    for best, r in zip(bests, rows):
        s_feat = embed(student, best_variables(best), test.x[:n], feature=FEATURE, mesh=mesh)
        r.update(heldout_distances(s_feat, t_feat[:n]), heldout_examples=int(n),
                 feature=FEATURE, methods=method_cfgs, lambda_calibration=calib,
                 dataset=cfg.dataset.name)
    return rows


def plot(rows, runs, out):
    """Test accuracy per run; test accuracy against the held-out relative W2^2."""
    acc, w2 = (kx.pivot(rows, "run", "dataset", m) for m in ("test_accuracy", "heldout_w2_rel"))
    cols = sorted({c for _, c in acc})
    kx.plot_bars(acc, runs, cols, out + ".png", ylabel="test accuracy (%)")
    kx.plot_scatter(w2, acc, runs, cols, out + "_w2.png", x_scale=1.0, log_x=True,
                    diagonal=False, ylabel="test accuracy (%)",
                    xlabel="held-out W2^2(student, teacher) / teacher feature variance")


def main(argv=None):
    run = kx.Run.from_cli(argv, name="kd2m", config=config_for, doc=__doc__,
                          variants=VARIANTS)
    cfg = run.config
    w = cfg.kd2m_weight
    runs = {r["name"]: r for r in make_runs(cfg.run_names, w if w == "auto" else float(w))}
    study = kx.study_key(cfg)
    cells = kx.study_cells(cfg, study, [(n, {"run": n}) for n in cfg.run_names],
                           range(cfg.seeds))
    run.plan(cells)
    mesh = make_mesh(cfg.num_devices or None)
    run.banner(f"{cfg.dataset.name}, {len(runs)} runs x {cfg.seeds} seeds")

    splits = load_data(cfg)
    module, tvars, logits, t_acc = study_teacher(cfg, splits, mesh, run.log)
    t_feat = embed(module, tvars, splits[2].x, feature=FEATURE, mesh=mesh)

    rows = run.execute(cells, lambda cell, seeds: [
        dict(r, teacher_test_accuracy=t_acc) for r in train_students(
            cfg, runs[cell.fields["run"]], seeds, splits, (module, tvars, logits, t_feat),
            mesh, run.path("ckpt", study))])

    n_held = min(cfg.heldout_examples or len(splits[2]), len(splits[2]))
    ratio = f" (ratio {cfg.kd2m_ratio})" if cfg.kd2m_weight == "auto" else ""
    header = (f"Dataset {cfg.dataset.name}; teacher {cfg.teacher.model} test accuracy "
              f"{100 * t_acc:.2f}%; students {cfg.student.model} "
              f"{dict(cfg.student.model_kwargs)}, {cfg.student.epochs} epochs; lambda "
              f"{cfg.kd2m_weight}{ratio}; mean ± std over seeds (rank; accuracy in %); "
              f"held-out '{FEATURE}' distances on {n_held} test examples.")
    run.report(header, kx.markdown_table(rows, row="run", metrics=METRICS,
                                         row_order=list(runs)), rows)
    plot(rows, list(runs), run.path("results"))
    return kx.summarize(rows, ["run"], [*ACCURACY, *DISTANCES])


if __name__ == "__main__":
    kx.cli(main)
