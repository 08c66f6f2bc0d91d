"""The classic KD zoo (METHODS.md section 1) on small teacher -> student pairs.

    python -m experiments.method_zoo [repdistiller] [--stale=...] [--config.key=value ...]

Method. Per setting (dataset, teacher, student; default MNIST-1D and digits, variant
``repdistiller``: the CIFAR-100 protocol) a teacher is trained once (cached). Each
method's student minimises RepDistiller's ``r CE + a KD + b method`` with the reference
weight ``b`` (``experiments/configs/method_zoo.py``; ``kd``: 0.1 CE + 0.9 KD); AB, FT and
FSP first run their initialisation stage (:func:`kdjax.train.pretrain.pretrain`). All
seeds of a method train as one vmapped program; model selection on validation; test
accuracy and teacher agreement of the selected students, one table (methods x settings,
mean ± std and rank per column). Cells (setting, method, seed) are rows of
``results.jsonl``; a rerun trains only missing cells (see :mod:`kdjax.experiment`).
"""

from __future__ import annotations

from experiments.common import fit_students, load_splits, study_teacher
from kdjax import data as kdata
from kdjax import experiment as kx
from kdjax import methods, models
from kdjax.train import make_mesh, make_optimizer
from kdjax.train.pretrain import pretrain

# Methods reading nothing but the teacher's logits: with a deterministic input their
# teacher outputs are computed once for the training set instead of every step.
LOGIT_ONLY = {"ce", "kd", "dkd", "kd_ls", "dist"}
METRICS = ("test_accuracy", "test_agreement", "val_accuracy")
CONFIGS = {None: "experiments.configs.method_zoo",
           "repdistiller": "experiments.configs.repdistiller_cifar100"}


def load(argv):
    """The config of ``[repdistiller] --config.k=v ...`` (nothing created on disk)."""
    return kx.parse_config(argv, name="method_zoo", config=lambda v: (CONFIGS[v], None),
                           variants=["repdistiller"])[0]


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
    return out + [{**m, **opts}]


def train_students(cfg, sname, name, seeds, splits, teacher, mesh, ckpt_dir):
    """Trains the given seeds of one (setting, method); one result row per seed."""
    s, train, (module, tvars, logits) = cfg.settings[sname], splits[0], teacher
    b = s.student.batch_size
    mcfgs = method_configs(cfg, name, len(train) // b)
    built = tuple(methods.build(m) for m in mcfgs)
    augment = kdata.get_augmentation(s.student.augment) if s.student.augment else None
    only_ce = all(m.name == "ce" for m in built)
    logit_only = all(m.name in LOGIT_ONLY for m in built) and augment is None
    data = {"x": train.x, "y": train.y}
    if logit_only and not only_ce:
        data["teacher_logits"] = logits["train"]
    tv = None if only_ce else tvars
    # the initialisation stage: the student's optimiser at a constant learning rate
    pre_tx = make_optimizer({**s.student.optimizer.to_dict(), "schedule": "constant",
                             "warmup_epochs": 0}, total_steps=1, steps_per_epoch=1)
    pre_losses = {}

    def init_stage(distiller, state, group):
        hist, n = [], len(group) if len(group) > 1 else 0
        state = pretrain(distiller, state, tv, data, batch_size=b, tx=pre_tx, mesh=mesh,
                         num_seeds=n, history=hist)
        for i, k in enumerate(group if hist else ()):
            pre_losses[k] = [h[i] if n else h for h in (hist[0], hist[-1])]
        return state

    _, _, rows = fit_students(
        models.create(s.student.model, train.num_classes, **s.student.model_kwargs.to_dict()),
        built, data, splits, logits, None if only_ce else (module, tvars), seeds,
        epochs=s.student.epochs, batch_size=b, optimizer=s.student.optimizer,
        evaluations=s.student.evaluations, mesh=mesh, ckpt_dir=ckpt_dir,
        name=f"{sname}_{name}", vmap=cfg.vmap_seeds, progress=cfg.progress,
        augment=augment, teacher_from_batch=logit_only and not only_ce, before_fit=init_stage)
    for k, r in zip(seeds, rows):
        r.update(pretrain_loss_first_last=pre_losses.get(k), methods=mcfgs,
                 dataset=s.dataset.name, teacher_model=s.teacher.model,
                 student_model=s.student.model)
    return rows


def main(argv=None):
    run = kx.Run.from_cli(argv, name="method_zoo", config=lambda v: (CONFIGS[v], None),
                          doc=__doc__, variants=["repdistiller"])
    cfg = run.config
    shared = {k: v for k, v in cfg.to_dict().items() if k not in (
        *kx.NOT_RESULT_KEYS, "settings", "setting_names", "methods")}
    # rows are keyed by what defines them: the setting and the shared loss options
    keys = {n: kx.config_hash(cfg.settings[n].to_dict(), shared) for n in cfg.setting_names}
    cells = {n: kx.study_cells(cfg, keys[n], [(m, {"setting": n, "method": m})
                                              for m in cfg.methods], range(cfg.seeds))
             for n in cfg.setting_names}
    run.plan([c for cs in cells.values() for c in cs])
    mesh = make_mesh(cfg.num_devices or None)
    run.banner(f"{list(cfg.setting_names)}, {len(cfg.methods)} methods x {cfg.seeds} seeds")
    rows, t_acc = [], {}
    for n in cfg.setting_names:
        splits = load_splits(cfg.settings[n].dataset)
        module, tvars, logits, t_acc[n] = study_teacher(
            cfg, splits, mesh, lambda m: run.log(f"[{n}] {m}"), setting=cfg.settings[n])
        rows += run.execute(cells[n], lambda c, seeds: train_students(
            cfg, n, c.fields["method"], seeds, splits, (module, tvars, logits), mesh,
            run.path("ckpt", keys[n])))
    header = (f"KD zoo, test accuracy and teacher agreement (%), mean ± std over seeds "
              f"(rank per column); loss = {cfg.ce_weight} CE + {cfg.kd_weight} KD + "
              "reference weight x method (kd: 0.1 CE + 0.9 KD). Teachers: " + "; ".join(
                  f"{n}: {cfg.settings[n].teacher.model} {100 * t_acc[n]:.2f}% -> "
                  f"{cfg.settings[n].student.model}" for n in cfg.setting_names) + ".")
    table = kx.markdown_table(rows, row="method", col="setting", row_order=list(cfg.methods),
                              col_order=list(cfg.setting_names),
                              metrics=[kx.Metric("test_accuracy", "test acc"),
                                       kx.Metric("test_agreement", "agreement")]).split("\n")
    table.insert(2, "| teacher | " + " | ".join(f"{100 * t_acc[n]:.2f} | 100" for n in
                                                cfg.setting_names) + " | - |")
    run.report(header, "\n".join(table), rows)
    acc = kx.pivot(rows, "method", "setting", "test_accuracy")
    kx.plot_bars(acc, list(cfg.methods), list(cfg.setting_names), run.path("results.png"),
                 ylabel="test accuracy (%)")
    return {(e["setting"], e["method"]): e for e in
            kx.summarize(rows, ["setting", "method"], METRICS)}


if __name__ == "__main__":
    kx.cli(main)
