"""Uniform KD vs KD-AIF (influence-weighted distillation, arXiv 2501.02705).

    python -m experiments.kd_aif [--config=digits] [--config.key=value ...]

Reads top to bottom: config -> data -> teacher (cached; for ``semi`` one trained on the
labelled subset only) -> per setting (clean / noisy / semi) the distillation data ->
per seed: uniform KD, KD-AIF one-shot (score the uniform student, retrain with fixed
weights) and periodic (re-score every K epochs), each mapping (exp-minmax / sigmoid) ->
model selection on validation -> test metrics and the AUROC of the weights for
separating bad points (corrupted, or teacher-wrong) from good ones -> table, JSON lines,
weight histograms. With ``--config.teacher_update=mpl`` the semi-supervised teacher is
then updated by meta pseudo labels (``kd_aif.fit_mpl``: the student's loss on the
labelled validation split after a look-ahead step drives the teacher) and
``config.mpl.runs`` are repeated on its pseudo-labels as ``mpl_<run>`` rows. Rows are keyed by the config hash and skipped on rerun; every run
checkpoints, so a killed job resumes where it stopped.

KD-AIF weights differ per seed, and the engine vmaps seeds over *shared* data, so the
seeds of a run train one after the other here (uniform runs too, for a paired
comparison: the same initialisation and batch order per seed).
"""

from __future__ import annotations

import functools
import os
import sys
import time

import jax
import numpy as np
import optax
from flax import serialization

from experiments.common import labelled_subset, load_data
from kdjax import methods, models
from kdjax.recipes import kd_aif
from kdjax.experiment.config import config_hash, load_config, parse_cli
from kdjax.influence import influence_weights
from kdjax.train import Checkpointer, Distiller, EvalSet, Evaluation, fit, make_optimizer, predict
from kdjax.experiment import results as R
from kdjax.train.engine import evaluate
from kdjax.train.teacher import get_teacher, teacher_apply

METRICS = ("test_accuracy", "test_agreement", "auroc", "val_accuracy")


def auroc(weights: np.ndarray, bad: np.ndarray) -> float:
    """P(weight of a good point > weight of a bad point) (ties count 1/2); NaN if a class
    is empty."""
    from sklearn.metrics import roc_auc_score

    bad = np.asarray(bad, bool)
    if bad.all() or not bad.any():
        return float("nan")
    return float(roc_auc_score(~bad, np.asarray(weights)))


def build_setting(cfg, setting, train, val, test, teachers, semi_teacher=None):
    """Distillation data, validation data and the 'bad point' mask of one setting
    (``semi_teacher``: ``(module, variables)`` replacing ``teachers["semi"]``)."""
    module, tvars = teachers["full"]
    if setting == "semi":
        module, tvars = semi_teacher or teachers["semi"]
    t_apply = teacher_apply(module, tvars)
    logits = {k: predict(t_apply, d.x, 512) for k, d in
              (("train", train), ("val", val), ("test", test))}
    t_test = evaluate(logits["test"], test.y)["accuracy"]
    val_d = {"x": val.x, "y": val.y}
    eval_val = EvalSet(x=val.x, y=val.y, teacher_logits=logits["val"])
    ce_scale = 1.0
    if setting == "semi":
        mask = teachers["semi_mask"]
        data = kd_aif.semi_supervised_data(train.x, train.y, mask, logits["train"])
        bad = ~mask & (np.argmax(logits["train"], -1) != train.y)  # wrong pseudo-labels
        n = cfg.semi.val_size
        val_d = {"x": val.x[:n], "y": val.y[:n]}
        eval_val = EvalSet(x=val.x[:n], y=val.y[:n], teacher_logits=logits["val"][:n])
        ce_scale = 1.0 / float(mask.mean())
    else:
        data = {"x": train.x, "y": train.y, "teacher_logits": logits["train"]}
        bad = np.argmax(logits["train"], -1) != train.y              # teacher errors
        if setting == "noisy":
            if cfg.noise.kind == "teacher":
                data["teacher_logits"], bad = kd_aif.corrupt_teacher_logits(
                    logits["train"], cfg.noise.fraction, cfg.noise.seed)
            else:
                data["y"], bad = kd_aif.flip_labels(train.y, cfg.noise.fraction,
                                                    train.num_classes, cfg.noise.seed)
    return {"data": data, "val": val_d, "eval_val": eval_val, "bad": bad,
            "ce_scale": ce_scale, "test_logits": logits["test"], "teacher_test": t_test}


def mpl_models(cfg, teacher_module, teacher_vars, student_module, example_x):
    """The pure functions and initial parameters of the MPL stage.

    ``teacher_fn(tp, x)``: the teacher in eval mode (its BatchNorm running statistics
    stay those of the pre-trained teacher); ``student_fn(sp, x)``: the feedback student
    in train mode (batch statistics; the running-statistics update is discarded, so the
    function is pure), initialised with ``PRNGKey(cfg.mpl.seed)``. Returns
    ``(teacher_fn, student_fn, teacher_params, student_params)``.
    """
    t_rest = {k: v for k, v in teacher_vars.items() if k != "params"}
    s_vars = student_module.init(jax.random.PRNGKey(cfg.mpl.seed), example_x[:2],
                                 train=False)
    s_rest = {k: v for k, v in s_vars.items() if k != "params"}

    def teacher_fn(tp, x):
        return teacher_module.apply({"params": tp, **t_rest}, x, train=False)[0]

    def student_fn(sp, x):
        if s_rest:
            (logits, _), _ = student_module.apply({"params": sp, **s_rest}, x, train=True,
                                                  mutable=list(s_rest))
            return logits
        return student_module.apply({"params": sp}, x, train=True)[0]

    return teacher_fn, student_fn, teacher_vars["params"], s_vars["params"]


def mpl_teacher(cfg, teachers, train, S, path):
    """The semi teacher after ``cfg.mpl.steps`` MPL steps (cached at ``path``).

    Unlabelled batches from every training input, meta signal on the labelled
    validation split ``S["val"]``, supervised CE on the labelled training subset.
    Returns ``(module, variables, log)`` (``log`` None when loaded from the cache).
    """
    module, tvars = teachers["semi"]
    if os.path.exists(path):
        with open(path, "rb") as f:
            return module, serialization.from_bytes(tvars, f.read()), None
    m = cfg.mpl
    student = models.create(cfg.student.model, train.num_classes,
                            **cfg.student.model_kwargs.to_dict())
    teacher_fn, student_fn, tp, sp = mpl_models(cfg, module, tvars, student, train.x)
    mask = teachers["semi_mask"]
    tp, _, log = kd_aif.fit_mpl(
        teacher_fn, student_fn, tp, sp, train.x, S["val"],
        key=jax.random.PRNGKey(m.seed + 1), steps=m.steps, batch_size=m.batch_size,
        teacher_tx=optax.sgd(m.teacher_lr, momentum=0.9),
        student_tx=optax.sgd(m.student_lr, momentum=0.9), student_lr=m.student_lr,
        temperature=cfg.objective.temperature, teacher_ce_weight=m.teacher_ce_weight,
        labelled={"x": train.x[mask], "y": train.y[mask]})
    new = {**tvars, "params": tp}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(serialization.to_bytes(new))
    os.replace(path + ".tmp", path)
    return module, new, log


def run_setting(cfg, setting, S, train, test, ckpt_dir, w_dir, done, runs=None,
                prefix=""):
    """All runs and seeds of one setting; returns the result rows.

    ``runs`` (default ``cfg.runs``) are base run names; rows, checkpoints and weight
    files are named ``prefix + run`` (``"mpl_"`` for the MPL-updated teacher)."""
    runs = list(cfg.runs if runs is None else runs)
    o = cfg.objective
    built = (methods.build({"name": "ce", "weight": o.ce_weight}),
             methods.build({"name": "kd", "weight": o.kd_weight, "temperature": o.temperature}))
    b = cfg.student.batch_size
    steps = len(S["data"]["x"]) // b
    epochs = cfg.student.epochs
    tx = make_optimizer(cfg.student.optimizer, total_steps=epochs * steps,
                        steps_per_epoch=steps)
    student = models.create(cfg.student.model, train.num_classes,
                            **cfg.student.model_kwargs.to_dict())
    distiller = Distiller(student, built, tx, teacher_from_batch=True)
    objective = functools.partial(kd_aif.distill_losses, ce_weight=o.ce_weight,
                                  kd_weight=o.kd_weight, temperature=o.temperature,
                                  ce_scale=S["ce_scale"])
    inf = cfg.influence
    scorer = kd_aif.make_scorer(distiller, S["data"], S["val"], objective=objective,
                                curvature=inf.curvature,
                                curvature_examples=inf.curvature_examples,
                                damping=inf.damping, maxiter=inf.maxiter)
    every = max(1, epochs // cfg.student.evaluations)
    fit_kw = dict(batch_size=b, checkpoint_every=every, progress=cfg.progress,
                  evaluation=Evaluation({"val": S["eval_val"]}, every=every, select_on="val"))
    rows = []
    for seed in range(cfg.seeds):
        todo = [r for r in runs if (setting, prefix + r, seed) not in done]
        if not todo:
            continue
        d = os.path.join(ckpt_dir, setting, str(seed))
        # fit donates its state: a fresh (identical) initial state for every run
        init = functools.partial(distiller.init, seed, train.x[:2])
        results = {}
        uniform_state = None
        if "uniform" in todo or any(r.startswith("oneshot") for r in todo):
            res = fit(distiller, init(), None, S["data"], epochs=epochs,
                      desc=f"{setting} {prefix}uniform",
                      checkpointer=Checkpointer(os.path.join(d, "uniform")), **fit_kw)
            uniform_state, (best,) = res.state, res.best
            results["uniform"] = (best, np.ones(len(S["bad"]), np.float32))
        scores = None
        for run in todo:
            kind, _, mapping = run.partition("_")
            mapping = {"exp": "exp_minmax", "sigmoid": "sigmoid"}.get(mapping)
            if kind == "oneshot":
                if scores is None:
                    scores = scorer(uniform_state)
                w = influence_weights(scores, mapping, inf.temperature)
                (best,) = fit(distiller, init(), None, kd_aif.with_weights(S["data"], w),
                              epochs=epochs, desc=f"{setting} {prefix}{run}",
                              checkpointer=Checkpointer(os.path.join(d, run)), **fit_kw).best
                results[run] = (best, np.asarray(w))
            elif kind == "periodic":
                _, best, _, log = kd_aif.fit_periodic(
                    distiller, init(), None, S["data"], scorer, epochs=epochs,
                    rescore_every=inf.rescore_every, mapping=mapping,
                    temperature=inf.temperature, checkpoint_dir=os.path.join(d, run),
                    desc=f"{setting} {prefix}{run}", **fit_kw)
                w = log[-1][1]
                results[run] = (best, np.ones(len(S["bad"]), np.float32) if w is None
                                else np.asarray(w))
        for run in todo:
            best, w = results[run]
            variables = {"params": best["params"]}
            if best["batch_stats"]:
                variables["batch_stats"] = best["batch_stats"]
            m = evaluate(predict(teacher_apply(student, variables), test.x, 512), test.y,
                         S["test_logits"])
            bad = S["bad"]
            name = f"{setting}_{prefix}{run}_{seed}"
            np.savez(os.path.join(w_dir, name + ".tmp.npz"), weights=w, bad=bad)
            os.replace(os.path.join(w_dir, name + ".tmp.npz"),
                       os.path.join(w_dir, name + ".npz"))
            rows.append({
                "setting": setting, "run": prefix + run, "seed": seed,
                "test_accuracy": m["accuracy"], "test_agreement": m["agreement"],
                "test_ece": m["ece"], "val_accuracy": best["metrics"]["val"]["accuracy"],
                "best_epoch": best["epoch"], "auroc": auroc(w, bad) if run != "uniform"
                else float("nan"),
                "mean_weight_bad": float(w[bad].mean()) if bad.any() else float("nan"),
                "mean_weight_good": float(w[~bad].mean()) if (~bad).any() else float("nan"),
                "bad_fraction": float(bad.mean()), "teacher_test_accuracy": S["teacher_test"],
                "epochs": epochs, "global_batch_size": b, "train_examples": len(bad),
            })
    return rows


def plot_weights(w_dirs, rows, path):
    """Histograms of the weights of bad vs good points, one panel per (setting, run);
    ``w_dirs``: the weight directories of the rows' config hashes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["setting"], r["run"]) for r in rows
                     if not r["run"].endswith("uniform")})
    if not panels:
        return
    settings = sorted({s for s, _ in panels})
    runs = sorted({r for _, r in panels})
    fig, axes = plt.subplots(len(settings), len(runs), squeeze=False,
                             figsize=(3.2 * len(runs), 2.6 * len(settings)))
    for i, s in enumerate(settings):
        for j, r in enumerate(runs):
            ax = axes[i][j]
            files = [os.path.join(w_dir, f) for w_dir in w_dirs if os.path.isdir(w_dir)
                     for f in sorted(os.listdir(w_dir))
                     if f.startswith(f"{s}_{r}_") and f[len(f"{s}_{r}_"):-4].isdigit()
                     and f.endswith(".npz")]
            if not files:
                ax.axis("off")
                continue
            arrs = [np.load(f) for f in files]
            w = np.concatenate([a["weights"] for a in arrs])
            bad = np.concatenate([a["bad"] for a in arrs]).astype(bool)
            bins = np.linspace(w.min(), w.max() + 1e-6, 40)
            ax.hist(w[~bad], bins, alpha=0.6, density=True, label="good")
            if bad.any():
                ax.hist(w[bad], bins, alpha=0.6, density=True, label="bad")
            ax.set_title(f"{s} / {r}", fontsize=9)
            ax.set_xlabel("weight")
            ax.legend(fontsize=7)
    R.save_figure(fig, path, dpi=110)


def load_teachers(cfg, train, val):
    """The cached teachers: ``{"full": (module, variables)}`` and, when the semi setting
    runs, ``"semi"`` (trained on the labelled subset only) and ``"semi_mask"``."""
    data_cfg = {"dataset": cfg.dataset.to_dict()}
    teachers = {}
    module, tvars, tmeta = get_teacher(cfg.teacher, data_cfg, {"x": train.x, "y": train.y},
                                       {"x": val.x, "y": val.y}, train.num_classes,
                                       cache_dir=cfg.cache_dir, progress=cfg.progress)
    teachers["full"] = (module, tvars)
    if "semi" in cfg.settings:
        mask = labelled_subset(train.y, cfg.semi.labelled, train.num_classes)
        n = cfg.semi.val_size
        semi_teacher = cfg.teacher.to_dict()    # same steps budget order, small set
        semi_teacher.update(epochs=cfg.semi.teacher_epochs,
                            batch_size=min(cfg.teacher.batch_size, int(mask.sum())))
        sm, sv, _ = get_teacher(semi_teacher, {**data_cfg, "labelled": cfg.semi.labelled,
                                              "val_size": n},
                                {"x": train.x[mask], "y": train.y[mask]},
                                {"x": val.x[:n], "y": val.y[:n]}, train.num_classes,
                                cache_dir=cfg.cache_dir, progress=cfg.progress)
        teachers["semi"], teachers["semi_mask"] = (sm, sv), mask
    return teachers


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    variant = "mnist1d"
    for a in list(argv):
        if a.startswith("--config="):
            variant = a.split("=", 1)[1]
            argv.remove(a)
    overrides, rest = parse_cli(argv)
    if rest:
        raise SystemExit(f"unknown arguments {rest}; use --config=<variant> and "
                         "--config.<key>=<value>.")
    cfg = load_config("experiments.configs.kd_aif", overrides, arg=variant)
    t0 = time.time()
    os.makedirs(cfg.out_dir, exist_ok=True)
    meta = R.run_metadata()
    print(f"kdjax kd_aif: {cfg.dataset.name}, settings {list(cfg.settings)}, {cfg.seeds} "
          f"seeds, {meta['device_kind']}, jax {meta['jax_version']}, "
          f"rev {meta['git_revision']}")

    train, val, test = load_data(cfg)
    teachers = load_teachers(cfg, train, val)
    results_path = os.path.join(cfg.out_dir, "results.jsonl")
    selection = ("out_dir", "cache_dir", "progress", "settings", "runs", "seeds")
    base = {k: v for k, v in cfg.to_dict().items() if k not in selection}
    # frozen-teacher rows do not depend on the MPL options; MPL rows do (not on mpl.runs)
    cfg_key = config_hash({k: v for k, v in base.items() if k not in ("teacher_update",
                                                                       "mpl")})
    mpl_on = cfg.teacher_update == "mpl"
    mpl_key = config_hash({**base, "mpl": {k: v for k, v in base["mpl"].items()
                                           if k != "runs"}}) if mpl_on else None
    mpl_runs = ["mpl_" + r for r in cfg.mpl.runs] if mpl_on else []
    key_of = lambda run: mpl_key if run.startswith("mpl_") else cfg_key  # noqa: E731
    old = [r for r in R.read_jsonl(results_path) if r.get("config_hash") == key_of(r["run"])]
    done = {(r["setting"], r["run"], r["seed"]) for r in old}
    w_dirs = {k: os.path.join(cfg.out_dir, "weights", k) for k in (cfg_key, mpl_key) if k}
    for d in w_dirs.values():
        os.makedirs(d, exist_ok=True)
    header_lines = []
    for setting in cfg.settings:
        S = build_setting(cfg, setting, train, val, test, teachers)
        header_lines.append(f"{setting}: teacher test accuracy "
                            f"{100 * S['teacher_test']:.2f}%, bad points "
                            f"{100 * S['bad'].mean():.1f}% of {len(S['bad'])}")
        rows = run_setting(cfg, setting, S, train, test,
                           os.path.join(cfg.out_dir, "ckpt", cfg_key), w_dirs[cfg_key], done)
        for r in rows:
            r.update(config_hash=cfg_key, dataset=cfg.dataset.name, config=cfg.to_dict(),
                     **meta)
        R.append_jsonl(results_path, rows)
        if setting == "semi" and mpl_on:
            ck = os.path.join(cfg.out_dir, "ckpt", mpl_key)
            t0_mpl = time.time()
            semi_t = mpl_teacher(cfg, teachers, train, S, os.path.join(ck, "teacher.msgpack"))
            S = build_setting(cfg, setting, train, val, test, teachers, semi_t[:2])
            if semi_t[2] is not None:
                lg = semi_t[2]
                print(f"MPL teacher update: {cfg.mpl.steps} steps in "
                      f"{time.time() - t0_mpl:.0f} s; student val CE before/after look-ahead"
                      f", first 10 steps {lg['val_before'][:10].mean():.3f}/"
                      f"{lg['val_after'][:10].mean():.3f}, last 10 "
                      f"{lg['val_before'][-10:].mean():.3f}/{lg['val_after'][-10:].mean():.3f}")
            header_lines.append(f"semi, MPL-updated teacher ({cfg.mpl.steps} steps): "
                                f"test accuracy {100 * S['teacher_test']:.2f}%, bad points "
                                f"{100 * S['bad'].mean():.1f}%")
            rows = run_setting(cfg, setting, S, train, test, ck, w_dirs[mpl_key], done,
                               runs=cfg.mpl.runs, prefix="mpl_")
            for r in rows:
                r.update(config_hash=mpl_key, dataset=cfg.dataset.name,
                         config=cfg.to_dict(), **meta)
            R.append_jsonl(results_path, rows)

    all_runs = list(cfg.runs) + mpl_runs
    rows = [r for r in R.read_jsonl(results_path) if r.get("config_hash") == key_of(r["run"])
            and r["setting"] in cfg.settings and r["run"] in all_runs
            and (r["setting"] == "semi" or not r["run"].startswith("mpl_"))
            and r["seed"] < cfg.seeds]
    summary = R.summarize(rows, ["setting", "run"], METRICS)
    order = {(s, r): (i, j) for i, s in enumerate(cfg.settings) for j, r in enumerate(all_runs)}
    summary.sort(key=lambda s: order[(s["setting"], s["run"])])
    table = R.markdown_table(summary, ["setting", "run"], METRICS)
    header = (f"KD-AIF on {cfg.dataset.name}; student {cfg.student.model} "
              f"{tuple(cfg.student.model_kwargs.channels)}, {cfg.student.epochs} epochs, "
              f"curvature {cfg.influence.curvature}; mean +- std over seeds (in %). AUROC: "
              f"weights separating good from bad points (noisy: corrupted, "
              f"{cfg.noise.kind} x{cfg.noise.fraction}; clean: teacher-wrong; semi: wrong "
              f"pseudo-labels); nan for uniform weights.\n" + "\n".join(header_lines)
              + "\n\n")
    R.atomic_write_text(os.path.join(cfg.out_dir, "results.md"), header + table + "\n")
    plot_weights(list(w_dirs.values()), rows, os.path.join(cfg.out_dir, "weights.png"))
    print("\n" + header + table)
    print(f"\nwrote {cfg.out_dir}/results.jsonl, results.md, weights.png in "
          f"{time.time() - t0:.0f} s")
    return summary


if __name__ == "__main__":
    main()
