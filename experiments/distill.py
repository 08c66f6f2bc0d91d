"""Teacher -> students: CE-only vs KD (and any registered method), mean +- std over seeds.

    python -m experiments.distill [--config.key=value ...]

Reads top to bottom: config -> data -> teacher (trained once, cached) -> students (all
seeds of a run as one vmapped program) -> model selection on validation -> test
metrics -> table, JSON lines, plot. Finished (run, seed) rows are skipped on rerun, and
each run checkpoints every epoch, so a killed job resumes where it stopped.
"""

from __future__ import annotations

import math
import os
import sys
import time

import jax.numpy as jnp
import numpy as np

from experiments.common import fit_seeds, load_splits, teacher_and_logits
from kdjax import methods, models
from kdjax.config import config_hash, load_config, parse_cli
from kdjax.train import Distiller, EvalSet, make_mesh, make_optimizer, predict
from kdjax.train import results as R
from kdjax.train.engine import evaluate
from kdjax.train.teacher import teacher_apply

# Methods that read nothing but the teacher's logits: their teacher outputs can be
# computed once for the whole training set instead of every step.
LOGIT_ONLY = {"ce", "kd", "dkd", "dist"}
METRICS = ("test_accuracy", "test_agreement", "test_ece", "val_accuracy")


def labelled_subset(y: np.ndarray, n: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """Boolean mask of ``n`` labelled examples, stratified by class."""
    if n == 0 or n >= len(y):
        return np.ones(len(y), bool)
    rng = np.random.default_rng(seed + 1)
    mask = np.zeros(len(y), bool)
    per_class = max(n // num_classes, 1)
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)
        mask[rng.choice(idx, min(per_class, len(idx)), replace=False)] = True
    return mask


def load_data(cfg):
    """train / val (held out of train) / test: see :func:`experiments.common.load_splits`."""
    return load_splits(cfg.dataset)


def run_students(cfg, run, train, val, test, teacher, tvars, logits, mesh, ckpt_dir, done):
    """Trains all seeds of one run; returns result rows and validation curves."""
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
    total_steps = cfg.student.epochs * (len(train) // b)
    steps_per_epoch = len(data["x"]) // b
    epochs = max(1, math.ceil(total_steps / steps_per_epoch))
    tx = make_optimizer(cfg.student.optimizer, total_steps=epochs * steps_per_epoch,
                        steps_per_epoch=steps_per_epoch)
    dtype = jnp.dtype(cfg.compute_dtype)
    student = models.create(cfg.student.model, train.num_classes, dtype=dtype,
                            **cfg.student.model_kwargs.to_dict())
    distiller = Distiller(student, built, tx, teacher=teacher, compute_dtype=dtype,
                          teacher_from_batch=precompute and not only_ce)
    seeds = [s for s in range(cfg.seeds) if (run["name"], s) not in done]
    if not seeds:
        return [], []
    eval_sets = {"val": EvalSet(x=val.x, y=val.y, teacher_logits=logits["val"])}
    every = max(1, epochs // cfg.student.evaluations)  # evaluate + checkpoint this often
    bests, history = fit_seeds(
        distiller, tvars, data, seeds, vmap=cfg.vmap_seeds, ckpt_dir=ckpt_dir,
        name=run["name"], example_x=train.x[:2], epochs=epochs, batch_size=b, mesh=mesh,
        eval_sets=eval_sets, select_on="val", eval_every=every, checkpoint_every=every,
        progress=cfg.progress, desc=run["name"])
    rows = []
    for i, (s, best) in enumerate(zip(seeds, bests)):
        variables = {"params": best["params"]}
        if best["batch_stats"]:
            variables["batch_stats"] = best["batch_stats"]
        test_logits = predict(teacher_apply(student, variables), test.x, 512, mesh)
        m = evaluate(test_logits, test.y, logits["test"])
        rows.append({
            "run": run["name"], "seed": s, "test_accuracy": m["accuracy"],
            "test_agreement": m["agreement"], "test_ece": m["ece"],
            "test_kl_to_teacher": m["kl_to_teacher"],
            "val_accuracy": best["metrics"]["val"]["accuracy"], "best_epoch": best["epoch"],
            "epochs": epochs, "global_batch_size": b, "train_examples": len(data["x"]),
            "labelled_examples": int(mask.sum()), "methods": run["methods"],
        })
    curves = [{"run": run["name"], "seed": seeds[r["seed_index"]], "epoch": r["epoch"],
               "val_accuracy": r["val"]["accuracy"]} for r in history]
    return rows, curves


def plot_curves(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in sorted({c["run"] for c in curves}):
        cs = [c for c in curves if c["run"] == run]
        # x axis: fraction of training (runs have different epoch counts)
        by_seed = {}
        for c in cs:
            by_seed.setdefault(c["seed"], []).append((c["epoch"], c["val_accuracy"]))
        arr = np.array([[a for _, a in sorted(v)] for v in by_seed.values()])
        xs = np.linspace(0, 1, arr.shape[1] + 1)[1:]
        mu, sd = arr.mean(0), arr.std(0)
        ax.plot(xs, mu, label=run)
        ax.fill_between(xs, mu - sd, mu + sd, alpha=0.2)
    ax.set_xlabel("fraction of training")
    ax.set_ylabel("validation accuracy")
    ax.legend()
    ax.grid(alpha=0.3)
    R.save_figure(fig, path)


def main(argv=None):
    overrides, rest = parse_cli(sys.argv[1:] if argv is None else argv)
    if rest:
        raise SystemExit(f"unknown arguments {rest}; use --config.<key>=<value>.")
    cfg = load_config("experiments.configs.distill", overrides)
    t0 = time.time()
    mesh = make_mesh(cfg.num_devices or None)
    out_dir = cfg.out_dir
    os.makedirs(out_dir, exist_ok=True)
    meta = R.run_metadata()
    print(f"kdjax distill: {cfg.dataset.name}, {cfg.seeds} seeds, {mesh.devices.size} "
          f"{meta['device_kind']} device(s), jax {meta['jax_version']}, rev {meta['git_revision']}")

    train, val, test = load_data(cfg)
    teacher, tvars, tmeta, logits = teacher_and_logits(
        cfg.teacher, cfg.dataset, train, val, test, cache_dir=cfg.cache_dir, mesh=mesh,
        progress=cfg.progress)
    t_test = evaluate(logits["test"], test.y)
    print(f"teacher {cfg.teacher.model}: test accuracy {100 * t_test['accuracy']:.2f}% "
          f"({'cached' if tmeta['cached'] else 'trained'})")

    results_path = os.path.join(out_dir, "results.jsonl")
    # what defines the results (not where they go or how progress is shown)
    cfg_key = config_hash({k: v for k, v in cfg.to_dict().items()
                           if k not in ("out_dir", "cache_dir", "progress")})
    old = [r for r in R.read_jsonl(results_path) if r.get("config_hash") == cfg_key]
    done = {(r["run"], r["seed"]) for r in old}
    curves_path = os.path.join(out_dir, "curves.jsonl")
    for run in cfg.runs:
        # checkpoints are keyed by the config hash: a changed config never resumes
        # from another config's state
        rows, curves = run_students(cfg, run, train, val, test, teacher, tvars, logits,
                                    mesh, os.path.join(out_dir, "ckpt", cfg_key), done)
        for r in rows:
            r.update(config_hash=cfg_key, dataset=cfg.dataset.name,
                     teacher_test_accuracy=t_test["accuracy"], config=cfg.to_dict(), **meta)
        R.append_jsonl(results_path, rows)
        R.append_jsonl(curves_path, [dict(c, config_hash=cfg_key) for c in curves])

    rows = [r for r in R.read_jsonl(results_path) if r.get("config_hash") == cfg_key]
    summary = R.summarize(rows, ["run"], METRICS)
    order = {r["name"]: i for i, r in enumerate(cfg.runs)}
    summary.sort(key=lambda s: order.get(s["run"], 99))
    table = R.markdown_table(summary, ["run"], METRICS)
    header = (f"Dataset {cfg.dataset.name}; teacher {cfg.teacher.model} test accuracy "
              f"{100 * t_test['accuracy']:.2f}%; students {cfg.student.model}, "
              f"{cfg.labelled or 'all'} labelled examples; mean +- std over seeds "
              f"(accuracy/agreement/ECE in %).\n\n")
    R.atomic_write_text(os.path.join(out_dir, "results.md"), header + table + "\n")
    curves = [c for c in R.read_jsonl(curves_path) if c.get("config_hash") == cfg_key]
    if curves:
        plot_curves(curves, os.path.join(out_dir, "curves.png"))
    print("\n" + header + table)
    print(f"\nwrote {out_dir}/results.jsonl, results.md, curves.png in {time.time() - t0:.0f} s")
    return summary


if __name__ == "__main__":
    main()
