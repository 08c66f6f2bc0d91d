"""The classic KD zoo (METHODS.md section 1) on small teacher -> student pairs.

    python -m experiments.method_zoo [--config.key=value ...]          # MNIST-1D + digits
    python -m experiments.method_zoo repdistiller [--config.key=value]  # CIFAR-100 protocol

Reads top to bottom: config -> per setting (dataset + teacher + student): data ->
teacher (trained once, cached by ``get_teacher``) -> per method: loss terms
(``ce_weight CE + kd_weight KD + w method``, see ``experiments/configs/method_zoo.py``)
-> all seeds as one vmapped program: init -> initialisation stage for AB/FT/FSP
(:func:`kdjax.train.pretrain.pretrain`) -> ``fit`` with model selection on validation ->
test accuracy and teacher agreement -> one Markdown table (methods x settings), JSON
lines, a bar plot with error bars. Finished (setting, method, seed) rows are skipped on
rerun (keyed by the config hash of the setting), and each run checkpoints, so a killed
job resumes.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import load_splits, teacher_and_logits
from kdjax import data as kdata
from kdjax import methods, models
from kdjax.experiment.config import config_hash, load_config, parse_cli
from kdjax.train import (Checkpointer, Distiller, EvalSet, Evaluation, fit, make_mesh,
                         make_optimizer, predict)
from kdjax.experiment import results as R
from kdjax.train.engine import evaluate
from kdjax.train.pretrain import pretrain
from kdjax.train.teacher import teacher_apply

# Methods reading nothing but the teacher's logits: with a deterministic input their
# teacher outputs are computed once for the training set instead of every step.
LOGIT_ONLY = {"ce", "kd", "dkd", "kd_ls", "dist"}
METRICS = ("test_accuracy", "test_agreement", "val_accuracy")


def load_data(s):
    """train / val (held out of train) / test: see :func:`experiments.common.load_splits`."""
    return load_splits(s.dataset)


def method_configs(cfg, name: str, steps_per_epoch: int) -> list[dict]:
    """The loss terms of the run of method ``name`` (RepDistiller's r CE + a KD + b m)."""
    ce = {"name": "ce", "weight": float(cfg.ce_weights.get(name, cfg.ce_weight))}
    if name == "ce":
        return [{"name": "ce", "weight": 1.0}]
    if name == "kd":
        return [ce, {"name": "kd", "weight": 0.9, "temperature": float(cfg.kd_temperature)}]
    out = [ce]
    if cfg.kd_weight > 0:
        out.append({"name": "kd", "weight": float(cfg.kd_weight),
                    "temperature": float(cfg.kd_temperature)})
    m = {"name": name,
         "weight": float(cfg.method_weights.get(name, methods.get(name).default_weight))}
    opts = dict(cfg.method_options.get(name, {}))
    if "pretrain_epochs" in methods.get(name).options:
        opts.setdefault("pretrain_epochs", int(cfg.pretrain_epochs))
    if name == "dkd":
        opts.setdefault("warmup_steps", int(cfg.dkd_warmup_epochs * steps_per_epoch))
    out.append({**m, **opts})
    return out


def run_method(cfg, sname, s, name, train, val, test, teacher, tvars, logits, mesh,
               ckpt_dir, done):
    """Trains all seeds of one (setting, method); returns result rows."""
    seeds = [k for k in range(cfg.seeds) if (sname, name, k) not in done]
    if not seeds:
        return []
    b = s.student.batch_size
    steps_per_epoch = len(train) // b
    mcfgs = method_configs(cfg, name, steps_per_epoch)
    built = tuple(methods.build(m) for m in mcfgs)
    augment = kdata.get_augmentation(s.student.augment) if s.student.augment else None
    only_ce = all(m.name == "ce" for m in built)
    logit_only = all(m.name in LOGIT_ONLY for m in built) and augment is None
    data = {"x": train.x, "y": train.y}
    if logit_only and not only_ce:
        data["teacher_logits"] = logits["train"]
    epochs = s.student.epochs
    tx = make_optimizer(s.student.optimizer, total_steps=epochs * steps_per_epoch,
                        steps_per_epoch=steps_per_epoch)
    student = models.create(s.student.model, train.num_classes,
                            **s.student.model_kwargs.to_dict())
    distiller = Distiller(student, built, tx, teacher=None if only_ce else teacher,
                          augment=augment, teacher_from_batch=logit_only and not only_ce)
    tv = None if only_ce else tvars
    keys = jnp.stack([jax.random.PRNGKey(k) for k in seeds])
    n_seeds = len(seeds) if cfg.vmap_seeds and len(seeds) > 1 else 0
    every = max(1, epochs // s.student.evaluations)
    val_set = EvalSet(x=val.x, y=val.y, teacher_logits=logits["val"])
    common = dict(epochs=epochs, batch_size=b, mesh=mesh,
                  evaluation=Evaluation({"val": val_set}, every=every, select_on="val"),
                  checkpoint_every=every, progress=cfg.progress, desc=f"{sname}/{name}")
    # the initialisation stage: the student's optimiser at a constant learning rate
    pre_tx = make_optimizer({**s.student.optimizer.to_dict(), "schedule": "constant",
                             "warmup_epochs": 0}, total_steps=1, steps_per_epoch=1)
    groups = [seeds] if n_seeds else [[k] for k in seeds]
    bests, pre_losses = [], {}
    for group in groups:
        ckpt = Checkpointer(os.path.join(ckpt_dir, f"{sname}_{name}_" +
                                         "_".join(map(str, group))))
        if n_seeds:
            state = jax.vmap(lambda k: distiller.init(k, train.x[:2], tv))(keys)
        else:
            state = distiller.init(jax.random.PRNGKey(group[0]), train.x[:2], tv)
        if not ckpt.steps():   # a resumed run restores its (pre-trained) state
            hist = []
            state = pretrain(distiller, state, tv, data, batch_size=b, tx=pre_tx, mesh=mesh,
                             num_seeds=n_seeds, history=hist)
            if hist:
                for k_i, k in enumerate(group):
                    pre_losses[k] = [h[k_i] if n_seeds else h for h in (hist[0], hist[-1])]
        bests += fit(distiller, state, tv, data, checkpointer=ckpt, **common).best
    rows = []
    for k, best in zip(seeds, bests):
        variables = {"params": best["params"]}
        if best["batch_stats"]:
            variables["batch_stats"] = best["batch_stats"]
        m = evaluate(predict(teacher_apply(student, variables), test.x, 512, mesh), test.y,
                     logits["test"])
        rows.append({
            "setting": sname, "method": name, "seed": k, "test_accuracy": m["accuracy"],
            "test_agreement": m["agreement"], "test_ece": m["ece"],
            "val_accuracy": best["metrics"]["val"]["accuracy"], "best_epoch": best["epoch"],
            "pretrain_loss_first_last": pre_losses.get(k), "epochs": epochs,
            "global_batch_size": b, "train_examples": len(train), "methods": mcfgs,
            "dataset": s.dataset.name, "teacher_model": s.teacher.model,
            "student_model": s.student.model,
        })
    return rows


def table(summaries, setting_names, method_names, teacher_acc):
    """Markdown: one row per method, accuracy and agreement per setting (mean +- std)."""
    head = ["method"] + [f"{s} {c}" for s in setting_names for c in ("test acc", "agreement")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| teacher | " + " | ".join(
        f"{100 * teacher_acc[s]:.2f} | 100" for s in setting_names) + " |")
    for name in method_names:
        cells = []
        for s in setting_names:
            e = summaries.get((s, name))
            if e is None:
                cells += ["-", "-"]
            else:
                cells += [f"{100 * e[c]:.2f} +- {100 * e[c + '_std']:.2f}"
                          for c in ("test_accuracy", "test_agreement")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summaries, setting_names, method_names, teacher_acc, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(setting_names), 1, figsize=(10, 3.5 * len(setting_names)),
                             squeeze=False)
    for ax, s in zip(axes[:, 0], setting_names):
        names = [n for n in method_names if (s, n) in summaries]
        acc = np.array([100 * summaries[(s, n)]["test_accuracy"] for n in names])
        err = np.array([100 * summaries[(s, n)]["test_accuracy_std"] for n in names])
        colors = ["tab:gray" if n in ("ce", "kd") else "tab:blue" for n in names]
        ax.bar(range(len(names)), acc, yerr=err, capsize=3, color=colors)
        ax.axhline(100 * teacher_acc[s], color="k", ls="--", lw=1, label="teacher")
        if len(acc):
            ax.set_ylim(max(0.0, acc.min() - 3 * max(err.max(), 1.0)),
                        min(100.0, max(acc.max() + err.max(), 100 * teacher_acc[s]) + 2))
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(s)
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3, axis="y")
    R.save_figure(fig, path)


def load(argv):
    """Config from ``[repdistiller] --config.k=v ...``."""
    overrides, rest = parse_cli(argv)
    if len(rest) > 1 or (rest and rest[0] != "repdistiller"):
        raise SystemExit(f"unknown arguments {rest}; usage: [repdistiller] "
                         "[--config.<key>=<value> ...].")
    module = ("experiments.configs.repdistiller_cifar100" if rest
              else "experiments.configs.method_zoo")
    return load_config(module, overrides)


def main(argv=None):
    cfg = load(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    mesh = make_mesh(cfg.num_devices or None)
    os.makedirs(cfg.out_dir, exist_ok=True)
    meta = R.run_metadata()
    print(f"kdjax method_zoo: {list(cfg.setting_names)}, {len(cfg.methods)} methods, "
          f"{cfg.seeds} seeds, {mesh.devices.size} {meta['device_kind']} device(s), "
          f"jax {meta['jax_version']}, rev {meta['git_revision']}")
    results_path = os.path.join(cfg.out_dir, "results.jsonl")
    shared = {k: v for k, v in cfg.to_dict().items()
              if k not in ("out_dir", "cache_dir", "progress", "settings", "setting_names",
                           "methods")}
    summaries, teacher_acc, hashes = {}, {}, {}
    for sname in cfg.setting_names:
        s = cfg.settings[sname]
        train, val, test = load_data(s)
        teacher, tvars, tmeta, logits = teacher_and_logits(
            s.teacher, s.dataset, train, val, test, cache_dir=cfg.cache_dir, mesh=mesh,
            progress=cfg.progress)
        teacher_acc[sname] = evaluate(logits["test"], test.y)["accuracy"]
        print(f"[{sname}] teacher {s.teacher.model} test accuracy "
              f"{100 * teacher_acc[sname]:.2f}% ({'cached' if tmeta['cached'] else 'trained'})")
        # rows are keyed by what defines them: this setting and the shared loss options
        key = config_hash(s.to_dict(), shared)
        hashes[sname] = key
        done = {(r["setting"], r["method"], r["seed"]) for r in R.read_jsonl(results_path)
                if r.get("config_hash") == key}
        for name in cfg.methods:
            t_run = time.time()
            rows = run_method(cfg, sname, s, name, train, val, test, teacher, tvars, logits,
                              mesh, os.path.join(cfg.out_dir, "ckpt", key), done)
            for r in rows:
                r.update(config_hash=key, teacher_test_accuracy=teacher_acc[sname],
                         config=cfg.to_dict(), **meta)
            R.append_jsonl(results_path, rows)
            if rows:
                print(f"[{sname}] {name}: {len(rows)} seeds in {time.time() - t_run:.0f} s")
        rows = [r for r in R.read_jsonl(results_path) if r.get("config_hash") == key]
        for e in R.summarize(rows, ["setting", "method"], METRICS):
            summaries[(e["setting"], e["method"])] = e

    header = (f"KD zoo, test accuracy and teacher agreement (%), mean +- std over "
              f"{cfg.seeds} seeds; loss = {cfg.ce_weight} CE + {cfg.kd_weight} KD + "
              f"reference weight x method (kd: 0.1 CE + 0.9 KD). Settings: " +
              "; ".join(f"{n}: {cfg.settings[n].teacher.model} "
                        f"{dict(cfg.settings[n].teacher.model_kwargs)} -> "
                        f"{cfg.settings[n].student.model} "
                        f"{dict(cfg.settings[n].student.model_kwargs)}, "
                        f"{cfg.settings[n].student.epochs} epochs"
                        for n in cfg.setting_names) + ".\n\n")
    text = table(summaries, list(cfg.setting_names), list(cfg.methods), teacher_acc)
    R.atomic_write_text(os.path.join(cfg.out_dir, "results.md"), header + text + "\n")
    plot(summaries, list(cfg.setting_names), list(cfg.methods), teacher_acc,
         os.path.join(cfg.out_dir, "results.png"))
    print("\n" + header + text)
    print(f"\nwrote {cfg.out_dir}/results.jsonl, results.md, results.png in "
          f"{time.time() - t0:.0f} s")
    return summaries


if __name__ == "__main__":
    main()
