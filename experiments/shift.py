"""KD under distribution shift (ShiftKD, arXiv 2312.16242): shifts x teachers x methods.

    python -m experiments.shift [--quick] [--stale RULE] [--config.key=value ...]

Config -> cells (shift x teacher x method entry x seed; shift outermost) -> per shift:
data (training domains, a 20% val split of each, test_in, the target domain) ->
teachers (ERM; on correlation shifts also robust ones, DomainBed objectives, the best
on val worst-group accuracy; cached) -> per method: the students of all pending seeds
through ``fit``, checkpoint (and a ``val_grid`` weight) selected on val, never the
target -> metrics on val, test_in, target -> rows -> report. Resumable (``kx.Run``).
``run_cells(config, seeds)`` runs the cell named by ``config.shift``,
``config.teacher.algorithm`` and ``config.method.name`` (``experiments.sweep`` hook).
"""

from __future__ import annotations

import os
import shutil
import time

import jax
import jax.numpy as jnp

from experiments import shift_lib as L
from experiments import shift_report
from experiments.configs import shift as shift_config
from kdjax import data as kdata
from kdjax import experiment as kx
from kdjax import methods
from kdjax.train import (Checkpointer, Distiller, EvalSet, Evaluation, fit, make_mesh,
                         make_optimizer)
from kdjax.train.pretrain import pretrain

CONFIG_MODULE = "experiments.configs.shift"
plan_block = (lambda cfg, shift, algorithm, names: kx.expand(
    cfg, [("shift", [shift]), ("teacher.algorithm", [algorithm]), ("method.name", names)],
    range(cfg.seeds), identity=L.cell_identity, validate=shift_config.validate))


def plan(cfg) -> list[kx.Cell]:
    """ERM-teacher cells of every shift x method; on correlation shifts, the
    ``robust_methods`` students of the best robust teacher too, right after their ERM
    counterparts (and CE), so a cut-short run still has the ERM-vs-robust comparison."""
    cells = []
    for s in cfg.shifts:
        first = [m for m in cfg.run_methods if m == "ce" or m in cfg.robust_methods]
        robust = L.is_correlation(s) and cfg.robust_teachers and cfg.robust_methods
        cells += plan_block(cfg, s, cfg.teacher.algorithm, first if robust else
                            list(cfg.run_methods))
        if robust:
            cells += plan_block(cfg, s, "robust", list(cfg.robust_methods))
            rest = [m for m in cfg.run_methods if m not in first]
            cells += plan_block(cfg, s, cfg.teacher.algorithm, rest) if rest else []
    return cells


def run_cells(cfg, seeds, ctx: L.Context | None = None) -> list[dict] | None:
    """Trains the cell's students for ``seeds`` as one vmapped program (one per candidate
    weight of a ``val_grid`` entry, the best on val kept); one metrics dict per seed
    (``None``: skipped, with the reason in ``ctx.skipped``)."""
    ctx = L.Context() if ctx is None else ctx
    seeds, entry = [int(s) for s in seeds], L.resolve_entry(cfg)
    kind = L.input_kind(L.parse_shift(cfg.shift)[0])
    skip = "image-only data manipulation, the inputs are 1-D signals" \
        if entry["images_only"] and kind != "image" else ""
    splits = L.load_shift(ctx, cfg) if not skip else None
    if not skip:
        tr = splits["train"]
        t = L.teacher(ctx, cfg, splits)
        student = L.student_model(cfg, entry, tr.num_classes)
        shapes = [jax.eval_shape(lambda x: student.init_with_output(
            jax.random.PRNGKey(0), x, train=False)[0], tr.x[:2]), jax.eval_shape(
            lambda x: t["module"].apply(t["variables"], x, train=False), tr.x[:2])]
        skip = L.loss_terms(cfg, entry, *shapes)[1]
    if skip:
        return ctx.skipped.add(f"{entry['name']} on {cfg.shift}: skipped, {skip}.")
    grid, key = L.grid_entries(entry), kx.config_hash(L.cell_identity(cfg))
    ckpt = os.path.join(cfg.out_dir, "ckpt", f"{key}_s{'_'.join(map(str, seeds))}")
    dirs = [ckpt + (f"_w{i}" if len(grid) > 1 else "") for i in range(len(grid))]
    t0 = time.time()
    cands = [train_students(cfg, e, L.loss_terms(cfg, e, *shapes)[0], splits, t, student,
                            seeds, d) for e, d in zip(grid, dirs)]
    best, means = L.select_on_val(cands)
    rows = [{**r, "weight_grid_val": means} if len(cands) > 1 else r for r in cands[best]]
    for d in dirs:  # rows are written next: work is kept
        shutil.rmtree(d, ignore_errors=True)
    ctx.log(f"{cfg.shift:>22s} {cfg.teacher.algorithm:>6s} {entry['name']:<10s} seeds "
            f"{seeds}: target {100 * sum(r['target_accuracy'] for r in rows) / len(rows):.1f}%"
            + (f", weight x{rows[0]['weight_multiplier']:g} of {entry['weight_grid']} on "
               f"val" if len(cands) > 1 else "") + f" ({time.time() - t0:.0f} s)")
    return rows


def train_students(cfg, entry, terms, splits, t, student, seeds, ckpt_dir) -> list[dict]:
    """The students of ``seeds`` for one loss (``terms``), checkpoint selected on val."""
    tr, va = splits["train"], splits["val"]
    built = tuple(methods.build(x) for x in terms)
    only_ce = all(m.name == "ce" for m in built)
    aug = dict(entry["augment"] or {})
    augment = kdata.get_augmentation(aug.pop("name"), **aug) if aug else None
    precompute = augment is None and not only_ce and all(m.name in L.LOGIT_ONLY for m in built)
    tr, t_train = L.prune(cfg, splits, t)  # config.prune (default: keep everything)
    data = {"x": tr.x, "y": tr.y, "domain": tr.extras["domain"],
            **({"teacher_logits": t_train} if precompute else {})}
    b, epochs = cfg.student.batch_size, cfg.student.epochs
    steps = len(tr) // b
    tx = make_optimizer(cfg.student.optimizer.to_dict(), total_steps=epochs * steps,
                        steps_per_epoch=steps)
    distiller = Distiller(student, built, tx, teacher=None if only_ce else t["module"],
                          augment=augment, teacher_from_batch=precompute)
    every = max(1, epochs // cfg.student.evaluations)
    mesh = None if cfg.num_devices == 1 else make_mesh(cfg.num_devices or None)
    t0, tvars = time.time(), t["variables"]
    state = jax.vmap(lambda k: distiller.init(k, tr.x[:2], tvars))(
        jnp.stack([jax.random.PRNGKey(s) for s in seeds]))
    ckpt = Checkpointer(ckpt_dir)
    if not ckpt.steps():  # initialisation stage (FT, AB, FSP); a resumed cell has done it
        state = pretrain(distiller, state, tvars, data, batch_size=b, mesh=mesh,
                         num_seeds=len(seeds))
    res = fit(distiller, state, tvars, data, epochs=epochs, batch_size=b, mesh=mesh,
              evaluation=Evaluation({"val": EvalSet(x=va.x, y=va.y,
                                                    teacher_logits=t["logits"]["val"])},
                                    every=every, select_on="val"),
              checkpoint_every=every, checkpointer=ckpt, progress=cfg.progress,
              desc=f"{cfg.shift} {entry['name']}")
    ckpt.close()
    return L.student_rows(cfg, entry, terms, splits, t, student, res, time.time() - t0)


def main(argv=None):
    run = kx.Run.from_cli(argv, name="shift", doc=__doc__, variants=["quick", "full"],
                          config=CONFIG_MODULE)
    cfg = run.config
    run.banner(f"{len(cfg.shifts)} shifts x {len(cfg.run_methods)} methods x {cfg.seeds} "
               f"seeds, robust teachers {list(cfg.robust_teachers)}")
    ctx = L.Context(log=run.log)
    rows = run.execute(plan(cfg), lambda cell, seeds: run_cells(cell.config, seeds, ctx))
    if not rows:
        raise kx.RunError("no results (every cell was skipped).")
    header, table = shift_report.report(cfg, rows, run.out_dir, sorted(ctx.skipped),
                                        time.time() - run.t0)
    run.report(header, table, rows)
    return rows


if __name__ == "__main__":
    kx.cli(main)
