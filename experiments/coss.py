"""Unsupervised distillation (METHODS.md section 3): CoSS vs cosine, SEED and SimCLR.

    python -m experiments.coss [mnist1d | digits] [--stale=...] [--config.key=value ...]

Method. A teacher (SimCLR on the unlabelled inputs, or supervised) is trained once and
cached by config hash. Its training embeddings give a k-NN graph. Students learn from the
inputs only -- the distillation data dict has no labels in it -- all seeds of a run as
one vmapped program: SimCLR alone, per-sample cosine (L_co), SEED, CoSS (+ ablations of
the space-similarity weight and of the neighbour sampler). Equal budgets: every student
runs ``student.epochs * (N // batch_size)`` steps (with the neighbour sampler an "epoch"
is the first ``N // batch_size`` batches of a CoSS plan, not the authors' epoch).
Evaluation on frozen ``pooled`` features: weighted k-NN and a linear probe on the test
split and a shifted domain, and manifold preservation: linear CKA and 10-NN overlap of
student and teacher test embeddings. Cells (run, seed) are rows of ``results.jsonl``
(see :mod:`kdjax.experiment`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import best_variables, fit_seeds
from kdjax import data as kdata
from kdjax import experiment as kx
from kdjax import methods, models
from kdjax.data.core import normalize_like
from kdjax.data.neighbors import knn_graph, neighbor_batches
from kdjax.evaluation import embed, knn_accuracy, knn_overlap, linear_cka, linear_probe
from kdjax.recipes.simclr import SimCLR, view_augment
from kdjax.train import Checkpointer, Distiller, cache, make_mesh, make_optimizer
from kdjax.train.teacher import get_teacher

CONFIG = "experiments.configs.coss"
METRICS = ("knn_test", "probe_test", "knn_shift", "probe_shift")
MANIFOLD = ("cka_test", "knn_overlap_test")


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


# --- teacher ----------------------------------------------------------------------------

def _simclr(cfg, module, ocfg, n, batch_size, epochs):
    steps = n // batch_size
    return SimCLR(module, make_optimizer(ocfg.to_dict(), total_steps=steps * epochs,
                                         steps_per_epoch=steps),
                  view_augment(cfg.ssl.max_shift, cfg.ssl.scale, cfg.ssl.noise_std),
                  temperature=cfg.ssl.temperature, proj_dim=cfg.ssl.proj_dim,
                  hidden_dim=cfg.ssl.hidden_dim)


def get_teacher_for(cfg, train, mesh):
    """The SimCLR teacher (:mod:`kdjax.train.cache`, keyed by config hash; its training
    checkpoints, so a killed build resumes) or a supervised one (:func:`get_teacher`,
    selected on a held-out part of train). Returns ``(module, variables, meta)``."""
    tc = cfg.teacher
    if tc.kind != "simclr":
        perm = np.random.default_rng(0).permutation(len(train))
        part, val = train.subset(perm[tc.val_size:]), train.subset(perm[:tc.val_size])
        tcfg = {k: tc[k] for k in ("model", "epochs", "batch_size", "seed")}
        tcfg.update(model_kwargs=tc.model_kwargs.to_dict(), optimizer=tc.optimizer.to_dict(),
                    val_size=tc.val_size)
        return get_teacher(tcfg, {"dataset": cfg.dataset.to_dict()},
                           {"x": part.x, "y": part.y}, {"x": val.x, "y": val.y},
                           train.num_classes, cache_dir=cfg.cache_dir, mesh=mesh,
                           progress=cfg.progress)
    module = models.create(tc.model, train.num_classes, **tc.model_kwargs.to_dict())
    key = kx.config_hash("simclr", tc.to_dict(), cfg.ssl.to_dict(), cfg.dataset.to_dict())

    def build(ckpt_dir):
        trainer = _simclr(cfg, module, tc.optimizer, len(train), tc.batch_size, tc.epochs)
        state, losses = trainer.fit(trainer.init(int(tc.seed), train.x[:2]), train.x,
                                    epochs=tc.epochs, batch_size=tc.batch_size,
                                    checkpointer=Checkpointer(ckpt_dir), checkpoint_every=1,
                                    progress=cfg.progress, desc="simclr teacher")
        return trainer.encoder_variables(state), {
            "kind": "simclr", "config": tc.to_dict(), "ssl": cfg.ssl.to_dict(),
            "data": cfg.dataset.to_dict(), "key": key, "losses": losses}
    template = module.init(jax.random.PRNGKey(0), train.x[:2], train=False)
    variables, meta = cache.get_or_build(cfg.cache_dir, f"teacher_simclr_{key}", template,
                                         build, what=f"SimCLR teacher {key}")
    return module, variables, meta


# --- students ---------------------------------------------------------------------------

def train_students(cfg, run, seeds, train, teacher, t_train, neighbors, mesh, ckpt_dir):
    """Trains ``run`` for ``seeds``; ``(student, [(variables, info) per seed])``."""
    sc, (module, tvars) = cfg.student, teacher
    student = models.create(sc.model, train.num_classes, **sc.model_kwargs.to_dict())
    b, epochs, x2 = sc.batch_size, sc.epochs, train.x[:2]
    info = {"epochs": epochs, "steps": epochs * (len(train) // b), "global_batch_size": b,
            "train_examples": len(train), "sampler": run.get("sampler"),
            "method": run.get("method")}
    name = f"{ckpt_dir}/{run['name']}_" + "_".join(map(str, seeds))
    if run["kind"] == "init":   # untrained student: the floor of every probe
        return student, [(student.init(jax.random.fold_in(jax.random.PRNGKey(s), 1), x2,
                                       train=False), {**info, "epochs": 0, "steps": 0})
                         for s in seeds]
    if run["kind"] == "simclr":   # the student alone, self-supervised, no teacher
        trainer = _simclr(cfg, student, sc.optimizer, len(train), b, epochs)
        vm = cfg.vmap_seeds and len(seeds) > 1
        groups = [seeds] if vm else [[s] for s in seeds]
        out = []
        for g in groups:
            state = (jax.vmap(lambda k: trainer.init(k, x2))(
                jnp.stack([jax.random.PRNGKey(s) for s in g])) if vm else trainer.init(g[0], x2))
            state, losses = trainer.fit(
                state, train.x, epochs=epochs, batch_size=b, num_seeds=len(g) if vm else 0,
                checkpointer=Checkpointer(name if vm else f"{name}_{g[0]}"),
                checkpoint_every=cfg.checkpoint_every, progress=cfg.progress,
                desc=run["name"])
            for i in range(len(g)):
                st = jax.tree_util.tree_map(lambda a: a[i], state) if vm else state
                out.append((jax.device_get(trainer.encoder_variables(st)),
                            {**info, "final_loss": losses[-1][i]}))
        return student, out
    mcfg = {"hidden_dim": cfg.distill.hidden_dim, **dict(run["method"])}
    if mcfg["name"] == "seed":
        mcfg.setdefault("queue_size", cfg.distill.seed_queue_size)
    built = methods.build(mcfg)
    steps = len(train) // b
    tx = make_optimizer(sc.optimizer.to_dict(), total_steps=steps * epochs,
                        steps_per_epoch=steps)
    distiller = Distiller(student, (built,), tx, teacher=module, teacher_from_batch=True)
    index_fn = None
    if run["sampler"] == "neighbors":
        index_fn = neighbor_plan(neighbors, b, cfg.distill.num_sampled, cfg.distill.knn_k)
    bests, _ = fit_seeds(distiller, tvars, distill_data(train.x, t_train), seeds,
                         vmap=cfg.vmap_seeds, ckpt_dir=ckpt_dir, name=run["name"],
                         example_x=x2, epochs=epochs, batch_size=b, mesh=mesh,
                         checkpoint_every=cfg.checkpoint_every, progress=cfg.progress,
                         desc=run["name"], index_fn=index_fn)
    info["method"] = dict(built.options) | {"name": built.name}
    return student, [(best_variables(bst), info) for bst in bests]


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


def evaluate_embeddings(cfg, module, variables, splits, seed, mesh, t_feats=None):
    """Probe metrics of a frozen network; with the teacher's features ``t_feats``, also
    its manifold preservation on test: linear CKA and k-NN overlap."""
    feats = {k: embed(module, variables, d.x, mesh=mesh) for k, d in splits.items()
             if d is not None}
    m = probe_metrics(cfg, feats, splits["train"], splits["test"], splits["shift"], seed)
    if t_feats is not None:
        m.update(cka_test=linear_cka(feats["test"], t_feats["test"]),
                 knn_overlap_test=knn_overlap(feats["test"], t_feats["test"], cfg.eval.knn_k))
    return m, feats


def main(argv=None):
    run = kx.Run.from_cli(argv, name="coss", config=CONFIG, doc=__doc__,
                          variants=["mnist1d", "digits"])
    cfg = run.config
    study = kx.study_key(cfg)
    runs = {r["name"]: r for r in cfg.runs}
    cells = (kx.study_cells(cfg, study, [("teacher", {"run": "teacher"})], [cfg.teacher.seed])
             + kx.study_cells(cfg, study, [(n, {"run": n}) for n in runs], range(cfg.seeds)))
    run.plan(cells)
    mesh = make_mesh(cfg.num_devices or None)
    run.banner(f"{cfg.dataset.name}, {len(runs)} runs x {cfg.seeds} seeds")
    train, test, shift = load_data(cfg)
    splits = {"train": train, "test": test, "shift": shift}
    metrics = [m for m in METRICS if shift is not None or m.endswith("test")] + list(MANIFOLD)
    module, tvars, tmeta = get_teacher_for(cfg, train, mesh)
    t_metrics, t_feats = evaluate_embeddings(cfg, module, tvars, splits, cfg.teacher.seed, mesh)
    run.log(f"teacher {cfg.teacher.kind} {cfg.teacher.model} ("
            f"{'cached' if tmeta['cached'] else 'trained'}): " +
            ", ".join(f"{k} {100 * v:.2f}%" for k, v in t_metrics.items()))
    neighbors = None
    if any(r.get("sampler") == "neighbors" for r in cfg.runs):
        neighbors, _ = knn_graph(jnp.asarray(t_feats["train"]), k=cfg.distill.knn_k)
    common = dict(dataset=cfg.dataset.name, shift_domain=cfg.dataset.shift_config or None,
                  teacher_kind=cfg.teacher.kind)

    def cell(c, seeds):
        if c.fields["run"] == "teacher":
            return [{**t_metrics, "global_batch_size": cfg.teacher.batch_size,
                     "epochs": cfg.teacher.epochs, **common}]
        r = runs[c.fields["run"]]
        student, trained = train_students(cfg, r, seeds, train, (module, tvars),
                                          t_feats["train"], neighbors, mesh,
                                          run.path("ckpt", study))
        return [{"kind": r["kind"], **evaluate_embeddings(
            cfg, student, v, splits, s, mesh, t_feats)[0], **info, **common}
            for s, (v, info) in zip(seeds, trained)]
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
