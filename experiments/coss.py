"""Unsupervised distillation (METHODS.md section 3): CoSS vs cosine, SEED and SimCLR.

    python -m experiments.coss [digits] [--config.key=value ...]

Reads top to bottom: config -> data -> teacher (SimCLR on the unlabelled inputs, or a
supervised network; trained once, cached) -> teacher k-NN graph -> students (all seeds of
a run as one vmapped program, trained on the inputs only: the distillation data dict has
no labels in it) -> frozen-feature probes (weighted k-NN, linear probe) on the test split
and on a shifted domain -> table, JSON lines, bar chart. Finished (run, seed) rows are
skipped on rerun (keyed by the config hash) and students checkpoint every few epochs.

Equal budgets: every student runs ``student.epochs * (N // batch_size)`` optimiser steps
on batches of ``batch_size``. With the neighbour sampler an "epoch" is the first
``N // batch_size`` batches of a CoSS neighbour plan (random anchors, each followed by
``num_sampled`` of its ``knn_k`` nearest teacher neighbours), not the authors' epoch
(every example an anchor once, i.e. ``1 + num_sampled`` times more steps).
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import data as kdata
from kdjax import methods, models
from kdjax.experiment.config import config_hash, load_config, parse_cli
from kdjax.data.core import normalize_like
from kdjax.data.neighbors import knn_graph, neighbor_batches
from kdjax.evaluation.probes import knn_accuracy, linear_probe
from kdjax.recipes.simclr import SimCLR, view_augment
from kdjax.train import (Checkpointer, Distiller, fit, load_pytree, make_mesh,
                         make_optimizer, predict, save_pytree)
from kdjax.experiment import results as R
from kdjax.train.teacher import get_teacher

CONFIG = "experiments.configs.coss"
METRICS = ("knn_test", "probe_test", "knn_shift", "probe_shift")


# --- data -------------------------------------------------------------------------------

def load_data(cfg):
    """``(train, test, shift or None)``; the shift split uses the train normalisation."""
    kw = {"data_dir": cfg.dataset.data_dir or None}
    if cfg.dataset.config:
        kw["config"] = cfg.dataset.config
    train = kdata.load(cfg.dataset.name, "train", **kw)
    test = kdata.load(cfg.dataset.name, "test", **kw)
    if 0 < cfg.dataset.max_train < len(train):
        idx = np.sort(np.random.default_rng(0).permutation(len(train))[:cfg.dataset.max_train])
        train = train.subset(idx)
    shift = None
    if cfg.dataset.shift_config:
        raw = kdata.load("mnist1d", "test", data_dir=kw["data_dir"],
                         config=cfg.dataset.shift_config, normalize=False)
        shift = normalize_like(raw, train.info["mean"], train.info["std"])
    return train, test, shift


def distill_data(x, teacher_features):
    """What a distilled student trains on: inputs and precomputed teacher embeddings.

    There is no ``"y"`` (nor any label-derived array) in it, so no loss term can read
    labels. ``teacher_logits`` is an empty placeholder (the engine's
    ``teacher_from_batch`` contract); the CoSS-family methods read only features.
    """
    n = len(x)
    if len(teacher_features) != n:
        raise ValueError(f"teacher_features must have one row per input ({n}), got "
                         f"{len(teacher_features)}.")
    return {"x": np.asarray(x, np.float32),
            "teacher_logits": np.zeros((n, 0), np.float32),
            "teacher_features": {"pooled": np.asarray(teacher_features, np.float32)}}


def neighbor_plan(neighbors, batch_size: int, num_sampled: int, num_candidates: int):
    """``index_fn(key, n)`` for :meth:`Distiller.epoch_fn`: ``n // batch_size`` batches of
    CoSS neighbour groups (the same number of steps as a random-batch epoch)."""
    neighbors = jnp.asarray(neighbors, jnp.int32)

    def index_fn(key, n):
        plan = neighbor_batches(key, neighbors, batch_size, num_sampled=num_sampled,
                                num_candidates=num_candidates)
        return plan[: n // batch_size]

    return index_fn


def embed(module, variables, x, mesh=None, feature: str = "pooled"):
    """Frozen ``features[feature]`` of ``module`` in eval mode, ``[N, D]`` numpy."""
    return predict(lambda xb: (module.apply(variables, xb, train=False)[1][feature],),
                   np.asarray(x), 512, mesh)


# --- teacher ----------------------------------------------------------------------------

def _optimizer(ocfg, n, batch_size, epochs):
    steps = n // batch_size
    return make_optimizer(ocfg.to_dict(), total_steps=steps * epochs, steps_per_epoch=steps)


def _simclr(cfg, module, ocfg, n, batch_size, epochs):
    return SimCLR(module, _optimizer(ocfg, n, batch_size, epochs),
                  view_augment(cfg.ssl.max_shift, cfg.ssl.scale, cfg.ssl.noise_std),
                  temperature=cfg.ssl.temperature, proj_dim=cfg.ssl.proj_dim,
                  hidden_dim=cfg.ssl.hidden_dim)


def get_simclr_teacher(cfg, train, mesh):
    """SimCLR teacher on the training inputs, cached under ``cache_dir`` by config hash."""
    tc = cfg.teacher
    module = models.create(tc.model, train.num_classes, **tc.model_kwargs.to_dict())
    key = config_hash("simclr", tc.to_dict(), cfg.ssl.to_dict(), cfg.dataset.to_dict())
    path = os.path.join(os.path.abspath(cfg.cache_dir), f"teacher_simclr_{key}")
    meta_path = path + "_meta.json"
    template = module.init(jax.random.PRNGKey(0), train.x[:2], train=False)
    if os.path.exists(meta_path) and os.path.isdir(path):
        with open(meta_path) as f:
            meta = json.load(f)
        return module, load_pytree(path, template), {**meta, "cached": True}
    trainer = _simclr(cfg, module, tc.optimizer, len(train), tc.batch_size, tc.epochs)
    state = trainer.init(int(tc.seed), train.x[:2])
    state, losses = trainer.fit(state, train.x, epochs=tc.epochs, batch_size=tc.batch_size,
                                progress=cfg.progress, desc="simclr teacher")
    variables = jax.device_get(trainer.encoder_variables(state))
    save_pytree(path, variables)
    meta = {"kind": "simclr", "config": tc.to_dict(), "ssl": cfg.ssl.to_dict(),
            "data": cfg.dataset.to_dict(), "key": key, "losses": losses, **R.run_metadata()}
    R.atomic_write_text(meta_path, json.dumps(meta, indent=2, default=str))
    return module, variables, {**meta, "cached": False}


def get_supervised_teacher(cfg, train, mesh):
    """A cross-entropy teacher (kdjax.train.teacher), selected on a held-out part of train."""
    tc = cfg.teacher
    perm = np.random.default_rng(0).permutation(len(train))
    fit_part, val = train.subset(perm[tc.val_size:]), train.subset(perm[:tc.val_size])
    tcfg = {k: tc[k] for k in ("model", "epochs", "batch_size", "seed")}
    tcfg.update(model_kwargs=tc.model_kwargs.to_dict(), optimizer=tc.optimizer.to_dict(),
                val_size=tc.val_size)
    module, variables, meta = get_teacher(
        tcfg, {"dataset": cfg.dataset.to_dict()}, {"x": fit_part.x, "y": fit_part.y},
        {"x": val.x, "y": val.y}, train.num_classes, cache_dir=cfg.cache_dir, mesh=mesh,
        progress=cfg.progress)
    return module, variables, {**meta, "kind": "supervised"}


# --- students ---------------------------------------------------------------------------

def _seed_slice(tree, i):
    return jax.tree_util.tree_map(lambda a: a[i], tree)


def _student_vars(params, batch_stats):
    return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def train_students(cfg, run, train, teacher, tvars, t_train, neighbors, mesh, ckpt_dir,
                   seeds):
    """Trains ``run`` for ``seeds`` (vmapped when enabled); returns one
    ``(variables, info)`` per seed with the student's eval-mode variables."""
    sc = cfg.student
    student = models.create(sc.model, train.num_classes, **sc.model_kwargs.to_dict())
    b, epochs = sc.batch_size, sc.epochs
    steps = epochs * (len(train) // b)
    vmapped = cfg.vmap_seeds and len(seeds) > 1
    keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
    x2 = train.x[:2]
    info = {"epochs": epochs, "steps": steps, "global_batch_size": b,
            "train_examples": len(train), "sampler": run.get("sampler"),
            "method": run.get("method")}
    ck_name = os.path.join(ckpt_dir, run["name"] + "_" + "_".join(map(str, seeds)))

    if run["kind"] == "init":   # untrained student: the floor of every probe
        out = []
        for s in seeds:
            v = student.init(jax.random.fold_in(jax.random.PRNGKey(s), 1), x2, train=False)
            out.append((v, {**info, "epochs": 0, "steps": 0}))
        return student, out

    if run["kind"] == "simclr":   # the student alone, self-supervised, no teacher
        trainer = _simclr(cfg, student, sc.optimizer, len(train), b, epochs)
        if vmapped:
            state = jax.vmap(lambda k: trainer.init(k, x2))(keys)
            state, losses = trainer.fit(state, train.x, epochs=epochs, batch_size=b,
                                        num_seeds=len(seeds),
                                        checkpointer=Checkpointer(ck_name),
                                        checkpoint_every=cfg.checkpoint_every,
                                        progress=cfg.progress, desc=run["name"])
            states = [_seed_slice(state, i) for i in range(len(seeds))]
            finals = [losses[-1][i] for i in range(len(seeds))]
        else:
            states, finals = [], []
            for s in seeds:
                st, losses = trainer.fit(trainer.init(s, x2), train.x, epochs=epochs,
                                         batch_size=b,
                                         checkpointer=Checkpointer(f"{ck_name}_{s}"),
                                         checkpoint_every=cfg.checkpoint_every,
                                         progress=cfg.progress, desc=run["name"])
                states.append(st)
                finals.append(losses[-1][0])
        return student, [(jax.device_get(trainer.encoder_variables(st)),
                          {**info, "final_loss": f}) for st, f in zip(states, finals)]

    # distillation: inputs + teacher embeddings, no labels
    mcfg = {"hidden_dim": cfg.distill.hidden_dim, **dict(run["method"])}
    if mcfg["name"] == "seed":
        mcfg.setdefault("queue_size", cfg.distill.seed_queue_size)
    built = methods.build(mcfg)
    distiller = Distiller(student, (built,), _optimizer(sc.optimizer, len(train), b, epochs),
                          teacher=teacher, teacher_from_batch=True)
    data = distill_data(train.x, t_train)
    index_fn = None
    if run["sampler"] == "neighbors":
        index_fn = neighbor_plan(neighbors, b, cfg.distill.num_sampled, cfg.distill.knn_k)
    common = dict(epochs=epochs, batch_size=b, mesh=mesh, checkpoint_every=cfg.checkpoint_every,
                  progress=cfg.progress, desc=run["name"], index_fn=index_fn)
    if vmapped:
        state = jax.vmap(lambda k: distiller.init(k, x2, tvars))(keys)
        bests = fit(distiller, state, tvars, data, checkpointer=Checkpointer(ck_name),
                    **common).best
    else:
        bests = [fit(distiller, distiller.init(s, x2, tvars), tvars, data,
                     checkpointer=Checkpointer(f"{ck_name}_{s}"), **common).best[0]
                 for s in seeds]
    info["method"] = {k: v for k, v in built.options.items()} | {"name": built.name}
    return student, [(_student_vars(bst["params"], bst["batch_stats"]), info)
                     for bst in bests]


# --- evaluation -------------------------------------------------------------------------

def probe_metrics(cfg, feats, train, test, shift, seed: int):
    """k-NN and linear-probe top-1 on test (and shift); bank/probe fit on train."""
    e = cfg.eval
    nc = train.num_classes
    knn = lambda q, y: knn_accuracy(feats["train"], train.y, q, y, num_classes=nc,
                                    k=e.knn_k, temperature=e.knn_temperature)
    probe = linear_probe(jax.random.PRNGKey(seed), feats["train"], train.y, feats["test"],
                         test.y, num_classes=nc, steps=e.probe_steps,
                         learning_rate=e.probe_learning_rate,
                         weight_decay=e.probe_weight_decay)
    m = {"knn_test": knn(feats["test"], test.y), "probe_test": probe.accuracy,
         "probe_train": probe.train_accuracy}
    if shift is not None:
        z = (jnp.asarray(feats["shift"]) - probe.mean) / probe.std
        pred = jnp.argmax(z @ probe.weights + probe.bias, axis=1)
        m["knn_shift"] = knn(feats["shift"], shift.y)
        m["probe_shift"] = float(jnp.mean(pred == jnp.asarray(shift.y)))
    return m


def _features(module, variables, splits, mesh):
    return {k: embed(module, variables, d.x, mesh) for k, d in splits.items() if d is not None}


# --- outputs ----------------------------------------------------------------------------

def plot_bars(summary, metrics, path, title=""):
    """Grouped bar chart: one group per run, one bar per metric, error bars = std."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [s["run"] for s in summary]
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(runs)), 4))
    xs = np.arange(len(runs))
    for j, m in enumerate(metrics):
        mu = [100 * s[m] for s in summary]
        sd = [100 * s[m + "_std"] for s in summary]
        ax.bar(xs + (j - (len(metrics) - 1) / 2) * width, mu, width, yerr=sd, capsize=2,
               label=m)
    ax.set_xticks(xs, runs, rotation=30, ha="right")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, ncol=len(metrics))
    ax.grid(axis="y", alpha=0.3)
    R.save_figure(fig, path)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    overrides, rest = parse_cli(argv)
    if len(rest) > 1 or (rest and rest[0].startswith("-")):
        raise SystemExit(f"unknown arguments {rest}; use [variant] --config.<key>=<value>.")
    cfg = load_config(CONFIG, overrides, arg=rest[0] if rest else None)
    t0 = time.time()
    mesh = make_mesh(cfg.num_devices or None)
    os.makedirs(cfg.out_dir, exist_ok=True)
    meta = R.run_metadata()
    print(f"kdjax coss: {cfg.dataset.name}, {cfg.seeds} seeds, {mesh.devices.size} "
          f"{meta['device_kind']} device(s), jax {meta['jax_version']}, rev {meta['git_revision']}")

    train, test, shift = load_data(cfg)
    splits = {"train": train, "test": test, "shift": shift}
    metrics = METRICS if shift is not None else METRICS[:2]

    get = get_simclr_teacher if cfg.teacher.kind == "simclr" else get_supervised_teacher
    teacher, tvars, tmeta = get(cfg, train, mesh)
    t_feats = _features(teacher, tvars, splits, mesh)
    t_metrics = probe_metrics(cfg, t_feats, train, test, shift, cfg.teacher.seed)
    print(f"teacher {cfg.teacher.kind} {cfg.teacher.model} ({'cached' if tmeta['cached'] else 'trained'}): "
          + ", ".join(f"{k} {100 * v:.2f}%" for k, v in t_metrics.items()))

    results_path = os.path.join(cfg.out_dir, "results.jsonl")
    # what defines the results (not where they go or how progress is shown)
    cfg_key = config_hash({k: v for k, v in cfg.to_dict().items()
                           if k not in ("out_dir", "cache_dir", "progress")})
    done = {(r["run"], r["seed"]) for r in R.read_jsonl(results_path)
            if r.get("config_hash") == cfg_key}
    common = dict(config_hash=cfg_key, dataset=cfg.dataset.name,
                  shift_domain=cfg.dataset.shift_config or None,
                  teacher_kind=cfg.teacher.kind, config=cfg.to_dict(), **meta)
    if ("teacher", cfg.teacher.seed) not in done:
        R.append_jsonl(results_path, [{"run": "teacher", "seed": cfg.teacher.seed,
                                       **t_metrics, "global_batch_size": cfg.teacher.batch_size,
                                       "epochs": cfg.teacher.epochs, **common}])

    neighbors = None
    if any(r.get("sampler") == "neighbors" for r in cfg.runs):
        neighbors, _ = knn_graph(jnp.asarray(t_feats["train"]), k=cfg.distill.knn_k)
    for run in cfg.runs:
        seeds = [s for s in range(cfg.seeds) if (run["name"], s) not in done]
        if not seeds:
            continue
        student, trained = train_students(
            cfg, run, train, teacher, tvars, t_feats["train"], neighbors, mesh,
            os.path.join(cfg.out_dir, "ckpt", cfg_key), seeds)
        rows = []
        for s, (variables, info) in zip(seeds, trained):
            m = probe_metrics(cfg, _features(student, variables, splits, mesh), train, test,
                              shift, s)
            rows.append({"run": run["name"], "seed": s, "kind": run["kind"], **m, **info,
                         **common})
        R.append_jsonl(results_path, rows)
        print(f"  {run['name']}: " + ", ".join(
            f"{k} {100 * np.mean([r[k] for r in rows]):.2f}%" for k in metrics))

    rows = [r for r in R.read_jsonl(results_path) if r.get("config_hash") == cfg_key]
    order = {"teacher": -1, **{r["name"]: i for i, r in enumerate(cfg.runs)}}
    summary = sorted(R.summarize(rows, ["run"], metrics), key=lambda s: order.get(s["run"], 99))
    table = R.markdown_table(summary, ["run"], metrics)
    header = (f"Dataset {cfg.dataset.name} ({len(train)} unlabelled train inputs), shifted "
              f"domain {cfg.dataset.shift_config or 'none'}; teacher {cfg.teacher.kind} "
              f"{cfg.teacher.model}{tuple(cfg.teacher.model_kwargs.channels)}; students "
              f"{cfg.student.model}{tuple(cfg.student.model_kwargs.channels)}, "
              f"{cfg.student.epochs} epochs, batch {cfg.student.batch_size}; weighted k-NN "
              f"(k={cfg.eval.knn_k}, T={cfg.eval.knn_temperature}) and linear-probe top-1 "
              f"(%), mean +- std over seeds (teacher: one run).\n\n")
    R.atomic_write_text(os.path.join(cfg.out_dir, "results.md"), header + table + "\n")
    plot_bars([s for s in summary], metrics, os.path.join(cfg.out_dir, "results.png"),
              f"{cfg.dataset.name}: frozen-feature probes (mean +- std over seeds)")
    print("\n" + header + table)
    print(f"\nwrote {cfg.out_dir}/results.jsonl, results.md, results.png in "
          f"{time.time() - t0:.0f} s")
    return summary


if __name__ == "__main__":
    main()
