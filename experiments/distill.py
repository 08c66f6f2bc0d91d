"""Teacher -> students: CE-only vs KD (and any registered method), mean ± std over seeds.

    python -m experiments.distill [--quick] [--stale=rerun|reuse] [--config.key=value ...]

Method. A teacher is trained once on the full training set (cached by config hash).
Each student sees the labels of only ``labelled`` training examples (stratified), while
the teacher's soft labels are available on every training input: a CE-only student
trains on the labelled subset, a KD student distils on all inputs (CE on the labelled
ones). Every run gets the same number of optimiser steps. All seeds of a run train as
one vmapped program; model selection on a validation split held out of the training
set; test accuracy, teacher agreement, ECE and KL to the teacher of the selected
student. Cells (run, seed) are rows of ``results.jsonl``: a rerun trains only missing
cells, and each run checkpoints, so a killed job resumes (see :mod:`kdjax.experiment`).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from experiments.common import fit_students, labelled_subset, load_splits, study_teacher
from kdjax import experiment as kx
from kdjax import methods, models
from kdjax.train import make_mesh

# Methods that read nothing but the teacher's logits: their teacher outputs can be
# computed once for the whole training set instead of every step.
LOGIT_ONLY = {"ce", "kd", "dkd", "dist"}
METRICS = (kx.Metric("test_accuracy"), kx.Metric("test_agreement"),
           kx.Metric("test_ece", higher_is_better=False), kx.Metric("val_accuracy"))


def train_students(cfg, run, seeds, splits, teacher, mesh, ckpt_dir):
    """Trains the given seeds of one run; one result row per seed."""
    train = splits[0]
    module, tvars, logits = teacher
    built = tuple(methods.build(m) for m in run["methods"])
    only_ce = all(m.name == "ce" for m in built)
    precompute = all(m.name in LOGIT_ONLY for m in built)
    mask = labelled_subset(train.y, cfg.labelled, train.num_classes)
    if only_ce:   # CE-only students can use the labelled examples only
        data = {"x": train.x[mask], "y": train.y[mask]}
    else:
        data = {"x": train.x, "y": train.y, "label_mask": mask.astype(np.float32)}
        if precompute:
            data["teacher_logits"] = logits["train"]
    # The same number of optimiser steps for every run.
    b = cfg.student.batch_size
    epochs = max(1, math.ceil(cfg.student.epochs * (len(train) // b) / (len(data["x"]) // b)))
    dtype = jnp.dtype(cfg.compute_dtype)
    student = models.create(cfg.student.model, train.num_classes, dtype=dtype,
                            **cfg.student.model_kwargs.to_dict())
    _, history, rows = fit_students(
        student, built, data, splits, logits, (module, tvars), seeds, epochs=epochs,
        batch_size=b, optimizer=cfg.student.optimizer, evaluations=cfg.student.evaluations,
        mesh=mesh, ckpt_dir=ckpt_dir, name=run["name"], vmap=cfg.vmap_seeds,
        progress=cfg.progress, teacher_from_batch=precompute and not only_ce,
        compute_dtype=dtype)
    for i, r in enumerate(rows):
        r.update(labelled_examples=int(mask.sum()), methods=run["methods"],
                 dataset=cfg.dataset.name, val_curve=[
                     [h["epoch"], h["val"]["accuracy"]] for h in history
                     if h.get("seed_index", 0) == i])
    return rows


def plot_curves(rows, runs, path):
    """Validation accuracy against the fraction of training, mean ± std over seeds."""
    fig, ax = kx.pyplot().subplots(figsize=(6, 4))
    for name in runs:
        curves = [r["val_curve"] for r in rows if r["run"] == name and r.get("val_curve")]
        if not curves or len({len(c) for c in curves}) != 1:
            continue
        arr = np.array([[a for _, a in sorted(c)] for c in curves])
        xs = np.linspace(0, 1, arr.shape[1] + 1)[1:]
        ax.plot(xs, arr.mean(0), label=name)
        ax.fill_between(xs, arr.mean(0) - arr.std(0), arr.mean(0) + arr.std(0), alpha=0.2)
    ax.set(xlabel="fraction of training", ylabel="validation accuracy")
    ax.legend()
    ax.grid(alpha=0.3)
    kx.save_figure(fig, path)


def main(argv=None):
    run = kx.Run.from_cli(argv, name="distill", config="experiments.configs.distill",
                          doc=__doc__, variants=["quick"])
    cfg = run.config
    runs = {r["name"]: r for r in cfg.runs}
    study = kx.study_key(cfg)     # also the checkpoint folder: configs never share state
    cells = kx.study_cells(cfg, study, {n: {"run": n} for n in runs}, range(cfg.seeds))
    run.plan(cells)               # refuses stale rows before any training
    mesh = make_mesh(cfg.num_devices or None)
    run.banner(f"{cfg.dataset.name}, {len(runs)} runs x {cfg.seeds} seeds")

    splits = load_splits(cfg.dataset)
    smallest = min(len(splits[0]), cfg.labelled or len(splits[0]))   # CE-only: labelled
    if cfg.student.batch_size > smallest:
        raise kx.ConfigError(f"student.batch_size={cfg.student.batch_size} is larger than "
                             f"the smallest training set of a run ({smallest} examples).")
    module, tvars, logits, t_acc = study_teacher(cfg, splits, mesh, run.log)

    rows = run.execute(cells, lambda cell, seeds: [
        dict(r, teacher_test_accuracy=t_acc) for r in train_students(
            cfg, runs[cell.fields["run"]], seeds, splits, (module, tvars, logits), mesh,
            run.path("ckpt", study))])

    header = (f"Dataset {cfg.dataset.name}; teacher {cfg.teacher.model} test accuracy "
              f"{100 * t_acc:.2f}%; students {cfg.student.model}, {cfg.labelled or 'all'} "
              "labelled examples; mean ± std over seeds (rank), accuracy/agreement/ECE "
              "in %.")
    run.report(header, kx.markdown_table(rows, row="run", metrics=METRICS,
                                         row_order=list(runs)), rows)
    plot_curves(rows, runs, run.path("curves.png"))
    return kx.summarize(rows, ["run"], [m.name for m in METRICS])


if __name__ == "__main__":
    kx.cli(main)
