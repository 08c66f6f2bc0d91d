"""KD2M (arXiv:2504.01757): students trained with CE + lambda * D(feature distributions).

    python -m experiments.kd2m [digits | paper:<tfds name>] [--config.key=value ...]

Reads top to bottom: config -> data -> teacher (trained once, cached by
``get_teacher``) -> per run: lambda ("auto": scale-matched on training data, see
``experiments/configs/kd2m.py``) -> all seeds as one vmapped program -> model selection
on validation -> test accuracy and *held-out* feature distances between student and
teacher (exact W2^2 and Gaussian W2^2 of the pooled test features: one fixed metric for
every run, the quantity of the paper's bound) -> table, JSON lines, plot. Finished
(run, seed) rows are skipped on rerun (keyed by the config hash); each run checkpoints,
so a killed job resumes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import fit_seeds, load_splits, teacher_and_logits
from kdjax import data as kdata
from kdjax import losses, methods, models
from kdjax.experiment.config import config_hash, load_config, parse_cli
from kdjax.train import Distiller, EvalSet, Evaluation, make_mesh, make_optimizer, predict
from kdjax.experiment import results as R
from kdjax.train.engine import evaluate
from kdjax.train.teacher import teacher_apply

from experiments.configs.kd2m import make_runs

ACCURACY = ("test_accuracy", "test_agreement", "val_accuracy")
DISTANCES = ("heldout_w2", "heldout_w2_rel", "heldout_gaussian_w2")
FEATURE = "pooled"


# --- data ----------------------------------------------------------------------------------

def load_data(cfg):
    """train / val (held out of train) / test: see :func:`experiments.common.load_splits`.

    With 1-D conv networks (``cnn1d``) image datasets (``digits``: ``[N, 8, 8, 1]``) are
    read as signals ``[N, H * W, C]`` (row-major pixels: 64-long signals for digits)."""
    splits = load_splits(cfg.dataset)
    if cfg.student.model == "cnn1d" and splits[0].x.ndim == 4:
        splits = tuple(dataclasses.replace(s, x=s.x.reshape(len(s), -1, s.x.shape[-1]))
                       for s in splits)
    return splits


def features(module, variables, x, mesh, batch_size=512):
    """Pooled features of ``module`` in eval mode, batched (float32 numpy)."""
    apply = lambda xb: (module.apply(variables, xb, train=False)[1][FEATURE],)  # noqa: E731
    return predict(apply, x, batch_size, mesh)


# --- lambda ----------------------------------------------------------------------------------

def resolve_weights(cfg, run, student, teacher, tvars, train, num_classes):
    """Method configs with "auto" weights replaced by ``ratio * log(C) / D_0``.

    ``D_0``: the method's value between the initial (seed 0) student and the teacher on
    the first ``calibration_examples`` training examples (training data only).
    """
    out, calib = [], {}
    n = min(cfg.calibration_examples, len(train))
    batch = {"x": jnp.asarray(train.x[:n]), "y": jnp.asarray(train.y[:n])}
    for mc in run["methods"]:
        mc = dict(mc)
        if mc.get("weight") == "auto":
            m = methods.build({k: v for k, v in mc.items() if k != "weight"})
            s_vars = student.init(jax.random.PRNGKey(0), batch["x"][:2], train=False)
            s_out = student.apply(s_vars, batch["x"], train=False)
            t_out = teacher.apply(tvars, batch["x"], train=False)
            params, state = m.init(jax.random.PRNGKey(0), s_out, t_out)
            d0 = float(m(params, state, s_out, t_out, batch, jax.random.PRNGKey(0))[0])
            if not d0 > 0 or not math.isfinite(d0):
                raise ValueError(f"run {run['name']!r}: cannot calibrate lambda of "
                                 f"{mc['name']!r}, initial distance D_0 = {d0}.")
            mc["weight"] = cfg.kd2m_ratio * math.log(num_classes) / d0
            calib[mc["name"]] = {"d0": d0, "weight": mc["weight"]}
        out.append(mc)
    return out, calib


# --- students ----------------------------------------------------------------------------------

def heldout_distances(s_feat, t_feat):
    """Exact W2^2, W2^2 / teacher total variance, full Gaussian W2^2 (test features)."""
    x, y = jnp.asarray(s_feat), jnp.asarray(t_feat)
    w2 = float(losses.exact_ot(x, y))
    t_var = float(np.sum(np.var(np.asarray(t_feat, np.float64), axis=0)))
    return {"heldout_w2": w2, "heldout_w2_rel": w2 / max(t_var, 1e-12),
            "heldout_gaussian_w2": float(losses.gaussian_w2(x, y))}


def run_students(cfg, run, train, val, test, teacher, tvars, logits, t_test_feat, mesh,
                 ckpt_dir, done):
    """Trains all seeds of one run; returns result rows."""
    seeds = [s for s in range(cfg.seeds) if (run["name"], s) not in done]
    if not seeds:
        return []
    student = models.create(cfg.student.model, train.num_classes,
                            **cfg.student.model_kwargs.to_dict())
    method_cfgs, calib = resolve_weights(cfg, run, student, teacher, tvars, train,
                                         train.num_classes)
    built = tuple(methods.build(m) for m in method_cfgs)
    augment = (kdata.get_augmentation(cfg.student.augment) if cfg.student.augment
               else None)
    logit_only = all(m.name in ("ce", "kd") for m in built) and augment is None
    data = {"x": train.x, "y": train.y}
    if logit_only and any(m.name == "kd" for m in built):
        data["teacher_logits"] = logits["train"]
    b = cfg.student.batch_size
    steps_per_epoch = len(train) // b
    epochs = cfg.student.epochs
    tx = make_optimizer(cfg.student.optimizer, total_steps=epochs * steps_per_epoch,
                        steps_per_epoch=steps_per_epoch)
    only_ce = all(m.name == "ce" for m in built)
    distiller = Distiller(student, built, tx, teacher=None if only_ce else teacher,
                          augment=augment,
                          teacher_from_batch=logit_only and not only_ce)
    eval_sets = {"val": EvalSet(x=val.x, y=val.y, teacher_logits=logits["val"])}
    every = max(1, epochs // cfg.student.evaluations)
    common = dict(epochs=epochs, batch_size=b, mesh=mesh,
                  evaluation=Evaluation(eval_sets, every=every, select_on="val"),
                  checkpoint_every=every, progress=cfg.progress, desc=run["name"])
    tv = None if only_ce else tvars
    bests, _ = fit_seeds(distiller, tv, data, seeds, vmap=cfg.vmap_seeds, ckpt_dir=ckpt_dir,
                         name=run["name"], example_x=train.x[:2], **common)
    n_held = min(cfg.heldout_examples or len(test), len(test))
    rows = []
    for s, best in zip(seeds, bests):
        variables = {"params": best["params"]}
        if best["batch_stats"]:
            variables["batch_stats"] = best["batch_stats"]
        m = evaluate(predict(teacher_apply(student, variables), test.x, 512, mesh), test.y,
                     logits["test"])
        s_feat = features(student, variables, test.x[:n_held], mesh)
        rows.append({
            "run": run["name"], "seed": s, "test_accuracy": m["accuracy"],
            "test_agreement": m["agreement"], "test_ece": m["ece"],
            "val_accuracy": best["metrics"]["val"]["accuracy"], "best_epoch": best["epoch"],
            **heldout_distances(s_feat, t_test_feat[:n_held]),
            "heldout_examples": int(n_held), "feature": FEATURE,
            "epochs": epochs, "global_batch_size": b, "train_examples": len(train),
            "methods": method_cfgs, "lambda_calibration": calib,
        })
    return rows


# --- outputs ----------------------------------------------------------------------------------

def table(summary):
    """Markdown: accuracies in %, distances as numbers (mean +- std over seeds)."""
    cols = [*ACCURACY, *DISTANCES]
    lines = ["| run | " + " | ".join(cols) + " | n |", "|" + "---|" * (len(cols) + 2)]
    for s in summary:
        cells = [f"{100 * s[c]:.2f} +- {100 * s[c + '_std']:.2f}" for c in ACCURACY]
        cells += [f"{s[c]:.4g} +- {s[c + '_std']:.2g}" for c in DISTANCES]
        lines.append(f"| {s['run']} | " + " | ".join(cells) + f" | {s['n']} |")
    return "\n".join(lines)


def plot(summary, path, teacher_acc):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["run"] for s in summary]
    acc = np.array([100 * s["test_accuracy"] for s in summary])
    err = np.array([100 * s["test_accuracy_std"] for s in summary])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.bar(range(len(names)), acc, yerr=err, capsize=3, color="tab:blue")
    ax1.axhline(100 * teacher_acc, color="k", ls="--", lw=1, label="teacher")
    ax1.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax1.set_ylim(max(0.0, acc.min() - 3 * max(err.max(), 1.0)), min(100.0, 100 * teacher_acc + 3))
    ax1.set_ylabel("test accuracy (%)")
    ax1.legend()
    for s, a, e in zip(summary, acc, err):
        ax2.errorbar(s["heldout_w2_rel"], a, xerr=s["heldout_w2_rel_std"], yerr=e, fmt="o",
                     capsize=2)
        ax2.annotate(s["run"], (s["heldout_w2_rel"], a), fontsize=7,
                     xytext=(3, 3), textcoords="offset points")
    ax2.set_xscale("log")
    ax2.set_xlabel("held-out W2^2(student, teacher) / teacher feature variance")
    ax2.set_ylabel("test accuracy (%)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    R.save_figure(fig, path)


def load(argv):
    """Config from ``[variant] --config.k=v ...``; variant ``digits``/``mnist1d`` or
    ``paper:<cifar10|cifar100|svhn_cropped>``."""
    overrides, rest = parse_cli(argv)
    if len(rest) > 1 or (rest and rest[0].startswith("-")):
        raise SystemExit(f"unknown arguments {rest}; usage: [digits | mnist1d | "
                         "paper:<dataset>] [--config.<key>=<value> ...].")
    variant = rest[0] if rest else "mnist1d"
    if variant.startswith("paper:"):
        return load_config("experiments.configs.kd2m_paper", overrides, variant[6:])
    return load_config("experiments.configs.kd2m", overrides, variant)


def main(argv=None):
    cfg = load(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    mesh = make_mesh(cfg.num_devices or None)
    os.makedirs(cfg.out_dir, exist_ok=True)
    meta = R.run_metadata()
    print(f"kdjax kd2m: {cfg.dataset.name}, {cfg.seeds} seeds, {mesh.devices.size} "
          f"{meta['device_kind']} device(s), jax {meta['jax_version']}, rev {meta['git_revision']}")

    train, val, test = load_data(cfg)
    teacher, tvars, tmeta, logits = teacher_and_logits(
        cfg.teacher, cfg.dataset, train, val, test, cache_dir=cfg.cache_dir, mesh=mesh,
        progress=cfg.progress)
    t_test = evaluate(logits["test"], test.y)
    t_test_feat = features(teacher, tvars, test.x, mesh)
    print(f"teacher {cfg.teacher.model}: test accuracy {100 * t_test['accuracy']:.2f}% "
          f"({'cached' if tmeta['cached'] else 'trained'})")

    results_path = os.path.join(cfg.out_dir, "results.jsonl")
    cfg_key = config_hash({k: v for k, v in cfg.to_dict().items()
                           if k not in ("out_dir", "cache_dir", "progress")})
    done = {(r["run"], r["seed"]) for r in R.read_jsonl(results_path)
            if r.get("config_hash") == cfg_key}
    runs = make_runs(cfg.run_names, cfg.kd2m_weight if cfg.kd2m_weight == "auto"
                     else float(cfg.kd2m_weight))
    for run in runs:
        t_run = time.time()
        rows = run_students(cfg, run, train, val, test, teacher, tvars, logits, t_test_feat,
                            mesh, os.path.join(cfg.out_dir, "ckpt", cfg_key), done)
        for r in rows:
            r.update(config_hash=cfg_key, dataset=cfg.dataset.name,
                     teacher_test_accuracy=t_test["accuracy"], config=cfg.to_dict(), **meta)
        R.append_jsonl(results_path, rows)
        if rows:
            print(f"{run['name']}: {len(rows)} seeds in {time.time() - t_run:.0f} s")

    rows = [r for r in R.read_jsonl(results_path) if r.get("config_hash") == cfg_key]
    summary = R.summarize(rows, ["run"], [*ACCURACY, *DISTANCES])
    order = {n: i for i, n in enumerate(cfg.run_names)}
    summary = sorted([s for s in summary if s["run"] in order], key=lambda s: order[s["run"]])
    n_held = min(cfg.heldout_examples or len(test), len(test))
    header = (f"Dataset {cfg.dataset.name}; teacher {cfg.teacher.model} "
              f"{dict(cfg.teacher.model_kwargs)} test accuracy {100 * t_test['accuracy']:.2f}%; "
              f"students {cfg.student.model} {dict(cfg.student.model_kwargs)}, "
              f"{cfg.student.epochs} epochs; lambda {cfg.kd2m_weight}"
              f"{f' (ratio {cfg.kd2m_ratio})' if cfg.kd2m_weight == 'auto' else ''}; "
              f"mean +- std over {cfg.seeds} seeds (accuracy/agreement in %). Held-out "
              f"distances between student and teacher '{FEATURE}' features on "
              f"{n_held} test examples: exact W2^2, W2^2 / "
              f"teacher total variance, Gaussian (full covariance) W2^2.\n\n")
    text = table(summary)
    R.atomic_write_text(os.path.join(cfg.out_dir, "results.md"), header + text + "\n")
    plot(summary, os.path.join(cfg.out_dir, "results.png"), t_test["accuracy"])
    print("\n" + header + text)
    print(f"\nwrote {cfg.out_dir}/results.jsonl, results.md, results.png in "
          f"{time.time() - t0:.0f} s")
    return summary


if __name__ == "__main__":
    main()
