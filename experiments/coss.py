"""Unsupervised distillation (METHODS.md section 3): CoSS vs cosine, SEED and SimCLR.

    python -m experiments.coss [mnist1d | digits] [--stale=...] [--config.key=value ...]

Method. A teacher (SimCLR on the unlabelled inputs, or supervised) is trained once and cached by
config hash. Its training embeddings give a k-NN graph. Students learn from the inputs only --
the distillation data dict has no labels in it -- all seeds of a run as one vmapped program:
SimCLR alone, per-sample cosine (L_co), SEED, CoSS (+ ablations of the space-similarity weight
and of the neighbour sampler). Equal budgets: every student runs ``student.epochs * (N // B)``
steps (``B`` the batch size; with the neighbour sampler an "epoch" is the first ``N // B``
batches of a CoSS plan, not the authors' epoch). Evaluation on frozen ``pooled`` features:
weighted k-NN and a linear probe, fit on train, on the test split and a shifted domain, and
manifold preservation: linear CKA and 10-NN overlap of student and teacher test embeddings.
Cells (run, seed) are rows of ``results.jsonl`` (:mod:`kdjax.experiment`).
"""

import functools

import jax
import numpy as np

from experiments.common import best_variables, fit_seeds
from kdjax import data as kdata, experiment as kx, methods, models
from kdjax.data.core import normalize_like
from kdjax.data.neighbors import knn_graph
from kdjax.evaluation import evaluate_encoder
from kdjax.recipes.simclr import cached_encoder, label_free_data, make_simclr, neighbor_plan
from kdjax.train import Distiller, make_mesh, make_optimizer
from kdjax.train.teacher import get_teacher

METRICS = ("knn_test", "probe_test", "knn_shift", "probe_shift", "cka_test", "knn_overlap_test")


def load_data(cfg):
    """``{"train", "test"[, "shift"]}`` datasets; ``shift`` has the train normalisation."""
    d = cfg.dataset
    kw = {"data_dir": d.data_dir or None, **({"config": d.config} if d.config else {})}
    splits = {split: kdata.load(d.name, split, **kw) for split in ("train", "test")}
    if 0 < d.max_train < len(splits["train"]):   # a random subset
        idx = np.random.default_rng(0).permutation(len(splits["train"]))[:d.max_train]
        splits["train"] = splits["train"].subset(np.sort(idx))
    if d.shift_config:
        shift = kdata.load("mnist1d", "test", data_dir=kw["data_dir"], config=d.shift_config,
                           normalize=False)
        splits["shift"] = normalize_like(shift, *map(splits["train"].info.get, ("mean", "std")))
    return splits


def get_teacher_for(cfg, train, mesh):
    """``(module, variables, meta)``: SimCLR (cached by config hash) or supervised teacher."""
    tc = cfg.teacher
    if tc.kind == "simclr":
        module = models.create(tc.model, train.num_classes, **tc.model_kwargs.to_dict())
        return module, *cached_encoder(module, train.x, config=tc.to_dict(),
                                       ssl=cfg.ssl.to_dict(), data=cfg.dataset.to_dict(),
                                       cache_dir=cfg.cache_dir, progress=cfg.progress)
    perm = np.random.default_rng(0).permutation(len(train))
    part, val = train.subset(perm[tc.val_size:]), train.subset(perm[:tc.val_size])
    tcfg = {k: v for k, v in tc.to_dict().items() if k != "kind"}   # the cache key
    return get_teacher(tcfg, {"dataset": cfg.dataset.to_dict()}, {"x": part.x, "y": part.y},
                       {"x": val.x, "y": val.y}, train.num_classes, cache_dir=cfg.cache_dir,
                       mesh=mesh, progress=cfg.progress)


def train_students(cfg, run, seeds, train, teacher, mesh, ckpt_dir):
    """``(student, [(variables, info) per seed])`` of ``run``, distilled from ``teacher``."""
    sc, (module, tvars, t_train, neighbors) = cfg.student, teacher
    student = models.create(sc.model, train.num_classes, **sc.model_kwargs.to_dict())
    b, epochs, x2, steps = sc.batch_size, sc.epochs, train.x[:2], len(train) // sc.batch_size
    info = dict(epochs=epochs, steps=epochs * steps, global_batch_size=b, train_examples=len(train),
                sampler=run.get("sampler"), method=run.get("method"))
    fit = dict(vmap=cfg.vmap_seeds, ckpt_dir=ckpt_dir, name=run["name"], epochs=epochs,
               batch_size=b, checkpoint_every=cfg.checkpoint_every, progress=cfg.progress,
               desc=run["name"])
    if run["kind"] == "init":   # untrained student: the floor of every probe
        return student, [(student.init(jax.random.fold_in(jax.random.PRNGKey(s), 1), x2,
                                       train=False), info | {"epochs": 0, "steps": 0})
                         for s in seeds]
    if run["kind"] == "simclr":   # the student alone, self-supervised, no teacher
        trainer = make_simclr(student, sc.optimizer.to_dict(), num_examples=len(train),
                              batch_size=b, epochs=epochs, **cfg.ssl.to_dict())
        trained = trainer.fit_seeds(train.x, seeds, **fit)
        return student, [(v, {**info, "final_loss": losses[-1]}) for v, losses in trained]
    mcfg = {"hidden_dim": cfg.distill.hidden_dim, **dict(run["method"])}
    if mcfg["name"] == "seed":
        mcfg.setdefault("queue_size", cfg.distill.seed_queue_size)
    built = methods.build(mcfg)
    tx = make_optimizer(sc.optimizer.to_dict(), total_steps=steps * epochs, steps_per_epoch=steps)
    distiller = Distiller(student, (built,), tx, teacher=module, teacher_from_batch=True)
    index_fn = None if run["sampler"] == "random" else neighbor_plan(   # CoSS batches
        neighbors, b, num_sampled=cfg.distill.num_sampled, num_candidates=cfg.distill.knn_k)
    bests, _ = fit_seeds(distiller, tvars, label_free_data(train.x, t_train), seeds,
                         example_x=x2, mesh=mesh, index_fn=index_fn, **fit)
    info["method"] = dict(built.options) | {"name": built.name}
    return student, [(best_variables(bst), info) for bst in bests]


def main(argv=None):
    run = kx.Run.from_cli(argv, name="coss", config="experiments.configs.coss", doc=__doc__,
                          variants=["mnist1d", "digits"])
    cfg, runs = run.config, {r["name"]: r for r in run.config.runs}
    study, mesh = kx.study_key(cfg), make_mesh(cfg.num_devices or None)
    cells = (kx.study_cells(cfg, study, [("teacher", {"run": "teacher"})], [cfg.teacher.seed])
             + kx.study_cells(cfg, study, [(n, {"run": n}) for n in runs], range(cfg.seeds)))
    run.plan(cells)
    run.banner(f"{cfg.dataset.name}, {len(runs)} runs x {cfg.seeds} seeds")
    splits = load_data(cfg)
    train = splits["train"]
    metrics = [m for m in METRICS if "shift" in splits or not m.endswith("shift")]
    evaluate = functools.partial(evaluate_encoder, data={k: (d.x, d.y) for k, d in splits.items()},
                                 num_classes=train.num_classes, mesh=mesh, **cfg.eval.to_dict())
    module, tvars, tmeta = get_teacher_for(cfg, train, mesh)
    t_metrics, t_feats = evaluate(module, tvars, key=jax.random.PRNGKey(cfg.teacher.seed))
    run.log(f"teacher {cfg.teacher.kind} {cfg.teacher.model} ("
            f"{'cached' if tmeta['cached'] else 'trained'}): " +
            ", ".join(f"{k} {100 * v:.2f}%" for k, v in t_metrics.items()))
    neighbors = (knn_graph(t_feats["train"], k=cfg.distill.knn_k)[0]
                 if any(r.get("sampler") == "neighbors" for r in cfg.runs) else None)
    teacher = (module, tvars, t_feats["train"], neighbors)
    common = dict(dataset=cfg.dataset.name, shift_domain=cfg.dataset.shift_config or None,
                  teacher_kind=cfg.teacher.kind)

    def cell(c, seeds):
        if c.fields["run"] == "teacher":
            return [{**t_metrics, "global_batch_size": cfg.teacher.batch_size,
                     "epochs": cfg.teacher.epochs, **common}]
        r = runs[c.fields["run"]]
        student, out = train_students(cfg, r, seeds, train, teacher, mesh, run.path("ckpt", study))
        return [{"kind": r["kind"], **evaluate(student, v, key=jax.random.PRNGKey(s),
                                               teacher_features=t_feats)[0], **info, **common}
                for s, (v, info) in zip(seeds, out)]
    rows = run.execute(cells, cell)
    header = (f"Dataset {cfg.dataset.name} ({len(train)} unlabelled train inputs), shifted "
              f"domain {cfg.dataset.shift_config or 'none'}; teacher {cfg.teacher.kind} "
              f"{cfg.teacher.model}; students {cfg.student.model}, {cfg.student.epochs} "
              f"epochs, batch {cfg.student.batch_size}; weighted k-NN (k={cfg.eval.knn_k}, "
              f"T={cfg.eval.knn_temperature}) and linear-probe top-1 (%), linear CKA and "
              f"{cfg.eval.knn_k}-NN overlap with the teacher's test embedding (x 100), "
              "mean ± std over seeds (rank; teacher: one run).")
    run.report(header, kx.markdown_table(rows, row="run", metrics=metrics,
                                         row_order=["teacher", *runs]), rows)
    kx.plot_bars(kx.pivot([dict(r, _m=m, _v=r.get(m)) for r in rows for m in metrics],
                          "_m", "run", "_v"), metrics, ["teacher", *runs],
                 run.path("results.png"), ylabel="top-1 accuracy (%) / CKA, overlap x 100")
    return kx.summarize(rows, ["run"], metrics)


if __name__ == "__main__":
    kx.cli(main)
