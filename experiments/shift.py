"""KD under distribution shift (ShiftKD, arXiv 2312.16242): methods x shifts x seeds.

    python -m experiments.shift [--quick] [--config.key=value ...]

Reads top to bottom: config -> grid of cells (shift x method entry x seed) -> for each
shift: data (training domains, a 20% held-out val split of each, test_in, the target
domain) -> teacher (trained once on the training domains, selected on val, cached by
config hash) -> for each method: students of all pending seeds as one vmapped program,
checkpointed through ``fit`` -> model selection on val (never the target) -> target
accuracy, in-domain accuracy, worst-group accuracy (correlation shifts), teacher-student
agreement on the target -> rows (JSON lines) -> table (methods x shifts, mean ± std,
rank, difference to vanilla KD with a paired 95% CI) and plots.

Resumable: a row is keyed by a config hash of its cell (what defines the result: the
shift, the resolved method entry, loss weights, models, training settings) and the seed;
finished rows are skipped on rerun, and a killed cell resumes from its last checkpoint.

``run_cell(config, seed)`` / ``run_cells(config, seeds)`` run the cell named by
``config.shift`` and ``config.method.name``: the hooks of ``python -m experiments.sweep``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import grid
from experiments.configs import shift as shift_config
from kdjax import data as kdata
from kdjax import methods, models
from kdjax.experiment.config import config_hash, load_config, parse_cli
from kdjax.train import Checkpointer, Distiller, EvalSet, Evaluation, fit, make_mesh, make_optimizer
from kdjax.experiment import results as R
from kdjax.train.engine import evaluate
from kdjax.train.pretrain import pretrain
from kdjax.train.teacher import get_teacher

CONFIG_MODULE = "experiments.configs.shift"
# Methods that read nothing but the teacher's logits (teacher outputs precomputed).
LOGIT_ONLY = {"ce", "kd", "dkd", "kd_ls", "dist"}
# Logit KD variants whose temperature follows config.temperature unless set.
TAU_FOLLOWS_KD = {"dkd", "kd_ls"}
CORRELATION = {"coloured_digits", "coloured_mnist", "spurious_mnist1d", "celeb_a_blond"}
SIGNAL_SHIFTS = {"mnist1d_domains", "spurious_mnist1d"}
# Keys that plan the grid or say where things go: not part of a cell's identity.
PLAN_KEYS = ("shifts", "run_methods", "seeds", "methods", "shift_options", "models",
             "num_devices")
METRICS = ("target_accuracy", "in_accuracy", "val_accuracy", "target_agreement",
           "target_average_group_accuracy", "target_worst_group_accuracy")


def log(msg: str) -> None:
    print(msg, flush=True)


SKIPPED: list[str] = []  # "method on shift: reason" of the cells skipped in this process


def _skip(entry, cfg, reason: str) -> None:
    note = f"{entry['name']} on {cfg.shift}: skipped, {reason}."
    log(note)
    if note not in SKIPPED:
        SKIPPED.append(note)


# ---------------------------------------------------------------- cell definition

def parse_shift(spec: str) -> tuple[str, str | None]:
    name, _, target = str(spec).partition(":")
    return name, (target or None)


def input_kind(shift_name: str) -> str:
    return "signal" if shift_name in SIGNAL_SHIFTS else "image"


def resolve_entry(cfg) -> dict:
    """The catalogue entry of ``cfg.method.name`` with its method weight ``lambda``."""
    entries = {e["name"]: e for e in cfg.methods}
    entry = dict(entries[cfg.method.name])
    entry.setdefault("kd", True)
    entry.setdefault("augment", None)
    entry.setdefault("images_only", False)
    entry["weight"] = float(entry.get("weight", cfg.method.weight))
    entry["methods"] = [dict(m) for m in entry["methods"]]
    return entry


def cell_identity(cfg) -> dict:
    """What defines a cell's result (hashed into its key; seeds are added by the grid)."""
    name, _ = parse_shift(cfg.shift)
    ident = {k: v for k, v in cfg.to_dict().items()
             if k not in grid.NOT_RESULT_KEYS + PLAN_KEYS}
    ident["entry"] = resolve_entry(cfg)
    ident["shift_options"] = _shift_options(cfg, name)
    ident["models"] = cfg.models[input_kind(name)].to_dict()
    return ident


def _shift_options(cfg, name: str) -> dict:
    return cfg.shift_options[name].to_dict() if name in cfg.shift_options else {}


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _flat_dim(shape) -> int:
    return int(np.prod(shape[1:]))


def pick_features(s_shapes, t_shapes) -> tuple[str, str] | None:
    """A [student, teacher] feature pair of equal flattened width for methods that
    compare clouds in one space (KD2M): ``pooled`` when the widths agree, else the
    deepest common feature of equal width; ``None`` when there is none."""
    fs, ft = s_shapes[1], t_shapes[1]
    if "pooled" in fs and "pooled" in ft and \
            _flat_dim(fs["pooled"].shape) == _flat_dim(ft["pooled"].shape):
        return ("pooled", "pooled")
    common = sorted(n for n in fs if n in ft
                    and _flat_dim(fs[n].shape) == _flat_dim(ft[n].shape))
    return (common[-1], common[-1]) if common else None


def loss_terms(cfg, entry, s_shapes=None, t_shapes=None) -> tuple[list[dict], str]:
    """The cell's method configs with final weights, and a skip reason ("" = run).

    ``ce_weight CE + kd_weight KD(temperature) + lambda sum_k w_k L_k`` (see the config
    docstring); the CE-only entry is ``CE`` with weight 1.
    """
    extra = entry["methods"]
    if not entry["kd"] and not extra:
        return [{"name": "ce", "weight": 1.0}], ""
    terms = [{"name": "ce", "weight": float(cfg.ce_weight)}]
    if entry["kd"]:
        terms.append({"name": "kd", "weight": float(cfg.kd_weight),
                      "temperature": float(cfg.temperature)})
    for m in extra:
        method = methods.get(m["name"])
        t = dict(m)
        t["weight"] = entry["weight"] * float(m.get("weight", method.default_weight))
        if m["name"] in TAU_FOLLOWS_KD and "temperature" not in m:
            t["temperature"] = float(cfg.temperature)
        if "features" in method.options and "features" not in m and s_shapes is not None:
            pair = pick_features(s_shapes, t_shapes)
            if pair is None:
                return [], (f"{m['name']} compares student and teacher features in one "
                            f"space, but no feature has equal widths (set 'features' or "
                            f"match the models' widths)")
            t["features"] = list(pair)
        terms.append(t)
    return terms, ""


# ------------------------------------------------------------------ data, teacher

@functools.lru_cache(maxsize=2)
def _load_shift(name, target, options_json, data_seed, val_fraction, data_dir):
    return kdata.make_shift(name, target=target, seed=data_seed, data_dir=data_dir or None,
                            val_fraction=val_fraction, **json.loads(options_json))


def load_shift(cfg) -> dict:
    name, target = parse_shift(cfg.shift)
    return _load_shift(name, target, json.dumps(_shift_options(cfg, name), sort_keys=True),
                       int(cfg.data_seed), float(cfg.val_fraction), cfg.data_dir)


def _groups(ds, correlation: bool):
    if not correlation:
        return {}
    return {"groups": ds.extras["group"], "num_groups": 2 * ds.num_classes}


_TEACHERS: dict[str, tuple] = {}


def shift_teacher(cfg, splits):
    """``(module, variables, logits per split, metrics, meta)``, trained once per shift
    on the training domains with selection on val (cached on disk by config hash)."""
    name, target = parse_shift(cfg.shift)
    kind = input_kind(name)
    mc = cfg.models[kind]
    tcfg = {"model": mc.teacher, "model_kwargs": _tuples(mc.teacher_kwargs.to_dict()),
            "epochs": cfg.teacher.epochs, "batch_size": cfg.teacher.batch_size,
            "seed": cfg.teacher.seed, "optimizer": cfg.teacher.optimizer.to_dict()}
    dcfg = {"shift": name, "target": splits["train"].info.get("target"),
            "options": _shift_options(cfg, name), "data_seed": cfg.data_seed,
            "val_fraction": cfg.val_fraction}
    key = config_hash(tcfg, dcfg)
    if key in _TEACHERS:
        return _TEACHERS[key]
    tr, va = splits["train"], splits["val"]
    t0 = time.time()
    module, variables, meta = get_teacher(
        tcfg, dcfg, {"x": tr.x, "y": tr.y}, {"x": va.x, "y": va.y}, tr.num_classes,
        cache_dir=cfg.cache_dir, mesh=None, progress=cfg.progress)
    fn = _logits_fn(module)
    logits = {s: fn(_stack([variables]), splits[s].x)[0] for s in splits}
    corr = name in CORRELATION
    metrics = {}
    for s, prefix in (("test_target", "teacher_target"), ("test_in", "teacher_in"),
                      ("val", "teacher_val")):
        m = evaluate(logits[s], splits[s].y, **_groups(splits[s], corr))
        metrics[f"{prefix}_accuracy"] = m["accuracy"]
        if corr:
            metrics[f"{prefix}_worst_group_accuracy"] = m["worst_group_accuracy"]
    log(f"teacher {mc.teacher} on {cfg.shift}: target "
        f"{100 * metrics['teacher_target_accuracy']:.1f}%, in-domain "
        f"{100 * metrics['teacher_in_accuracy']:.1f}% "
        f"({'cached' if meta['cached'] else 'trained'}, {time.time() - t0:.0f} s)")
    _TEACHERS.clear()  # keep one shift's teacher in memory
    _TEACHERS[key] = (module, variables, logits, metrics, meta)
    return _TEACHERS[key]


# ------------------------------------------------------------------ evaluation

def _stack(trees):
    return jax.tree_util.tree_map(lambda *a: np.stack([np.asarray(x) for x in a]), *trees)


@functools.lru_cache(maxsize=16)
def _logits_fn(module, chunk: int = 1024):
    """``f(stacked_variables, x) -> [S, N, C]`` logits in eval mode, vmapped over a leading
    seed axis; ``x`` is processed in padded chunks of a fixed size (one compilation)."""
    @jax.jit
    def run(variables, xb):
        return jax.vmap(lambda v: module.apply(v, xb, train=False)[0].astype(jnp.float32)
                        )(variables)

    def f(variables, x):
        x = np.asarray(x)
        outs = []
        for i in range(0, len(x), chunk):
            xb = x[i:i + chunk]
            pad = chunk - len(xb)
            if pad:
                xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
            outs.append(np.asarray(run(variables, xb))[:, :chunk - pad])
        return np.concatenate(outs, axis=1)

    return f


# ----------------------------------------------------------------------- one cell

def run_cells(config, seeds) -> list[dict] | None:
    """Trains the cell ``(config.shift, config.method.name)`` for ``seeds`` as one
    vmapped program; returns one metrics dict per seed (``None``: cell skipped)."""
    cfg = config
    seeds = [int(s) for s in seeds]
    name, _ = parse_shift(cfg.shift)
    entry = resolve_entry(cfg)
    kind = input_kind(name)
    if entry["images_only"] and kind != "image":
        _skip(entry, cfg, "image-only data manipulation, the inputs are 1-D signals")
        return None
    splits = load_shift(cfg)
    tr, va = splits["train"], splits["val"]
    corr = name in CORRELATION
    teacher, tvars, t_logits, t_metrics, t_meta = shift_teacher(cfg, splits)
    mc = cfg.models[kind]
    student = models.create(mc.student, tr.num_classes, **_tuples(mc.student_kwargs.to_dict()))
    s_shapes = jax.eval_shape(lambda x: student.init_with_output(
        jax.random.PRNGKey(0), x, train=False)[0], tr.x[:2])
    t_shapes = jax.eval_shape(lambda x: teacher.apply(tvars, x, train=False), tr.x[:2])
    terms, skip = loss_terms(cfg, entry, s_shapes, t_shapes)
    if skip:
        _skip(entry, cfg, skip)
        return None
    built = tuple(methods.build(t) for t in terms)
    only_ce = all(m.name == "ce" for m in built)
    augment = None
    if entry["augment"]:
        aug = dict(entry["augment"])
        augment = kdata.get_augmentation(aug.pop("name"), **aug)
    precompute = augment is None and not only_ce and all(m.name in LOGIT_ONLY for m in built)
    data = {"x": tr.x, "y": tr.y}
    if precompute:
        data["teacher_logits"] = t_logits["train"]

    b = cfg.student.batch_size
    epochs = cfg.student.epochs
    steps_per_epoch = len(tr) // b
    tx = make_optimizer(cfg.student.optimizer.to_dict(), total_steps=epochs * steps_per_epoch,
                        steps_per_epoch=steps_per_epoch)
    distiller = Distiller(student, built, tx, teacher=None if only_ce else teacher,
                          augment=augment, teacher_from_batch=precompute)
    eval_sets = {"val": EvalSet(x=va.x, y=va.y, teacher_logits=t_logits["val"])}
    every = max(1, epochs // cfg.student.evaluations)
    group = config_hash(cell_identity(cfg))
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt", f"{group}_s{'_'.join(map(str, seeds))}")
    mesh = None if cfg.num_devices == 1 else make_mesh(cfg.num_devices or None)
    t0 = time.time()
    keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
    state = jax.vmap(lambda k: distiller.init(k, tr.x[:2], tvars))(keys)
    ckpt = Checkpointer(ckpt_dir)
    if not ckpt.steps():  # initialisation stage (FT, AB, FSP); a resumed cell has done it
        state = pretrain(distiller, state, tvars, data, batch_size=b, mesh=mesh,
                         num_seeds=len(seeds))
    bests = fit(distiller, state, tvars, data, epochs=epochs, batch_size=b, mesh=mesh,
                evaluation=Evaluation(eval_sets, every=every, select_on="val"),
                checkpoint_every=every, checkpointer=ckpt, progress=cfg.progress,
                desc=f"{cfg.shift} {entry['name']}").best
    ckpt.close()

    # selected checkpoints (best val accuracy per seed) on every split
    variables = _stack([{"params": bb["params"],
                         **({"batch_stats": bb["batch_stats"]} if bb["batch_stats"] else {})}
                        for bb in bests])
    fn = _logits_fn(student)
    logits = {s: fn(variables, splits[s].x) for s in ("val", "test_in", "test_target")}
    rows = []
    for i, (s, best) in enumerate(zip(seeds, bests)):
        tgt = evaluate(logits["test_target"][i], splits["test_target"].y,
                       t_logits["test_target"], **_groups(splits["test_target"], corr))
        ind = evaluate(logits["test_in"][i], splits["test_in"].y, t_logits["test_in"])
        val = evaluate(logits["val"][i], va.y)
        rows.append({
            "shift": cfg.shift, "shift_kind": "correlation" if corr else "diversity",
            "target_domain": splits["test_target"].info.get("target"),
            "method": entry["name"],
            "target_accuracy": tgt["accuracy"], "target_agreement": tgt["agreement"],
            "target_kl_to_teacher": tgt["kl_to_teacher"], "target_ece": tgt["ece"],
            "target_average_group_accuracy": tgt.get("average_group_accuracy"),
            "target_worst_group_accuracy": tgt.get("worst_group_accuracy"),
            "in_accuracy": ind["accuracy"], "in_agreement": ind["agreement"],
            "val_accuracy": val["accuracy"], "best_epoch": best["epoch"], "epochs": epochs,
            "global_batch_size": b, "train_examples": len(tr), "student": mc.student,
            "teacher": mc.teacher, "loss_terms": terms, "augment": entry["augment"],
            "teacher_cached": bool(t_meta.get("cached")), **t_metrics,
            "train_seconds": time.time() - t0,
        })
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # rows are written next: work is kept
    acc = np.mean([r["target_accuracy"] for r in rows])
    log(f"{cfg.shift:>24s} {entry['name']:<16s} seeds {seeds}: target "
        f"{100 * acc:.1f}% ({time.time() - t0:.0f} s)")
    return rows


def run_cell(config, seed: int) -> dict | None:
    """One seed of the cell ``(config.shift, config.method.name)`` (sweep hook)."""
    out = run_cells(config, [seed])
    return None if out is None else out[0]


# -------------------------------------------------------------------------- report

def report(cfg, rows, out_dir: str, notes: list[str]) -> str:
    """Writes results.md and the plots; returns the Markdown text."""
    shifts = [s for s in cfg.shifts if any(r["shift"] == s for r in rows)]
    meths = [m for m in cfg.run_methods if any(r["method"] == m for r in rows)]
    tab = {m: grid.pivot(rows, "method", "shift", m) for m in METRICS}
    base = "kd" if "kd" in meths else None
    teacher = {s: next(r for r in rows if r["shift"] == s) for s in shifts}
    parts = [
        "# KD under distribution shift (ShiftKD protocol)",
        "",
        f"Mean ± std over seeds (n per cell = {cfg.seeds}; accuracies in %), rank within the "
        f"column in brackets (1 = best). Checkpoint selected on the val split (20% of the "
        f"training domains). Loss: {cfg.ce_weight} CE + {cfg.kd_weight} KD (tau "
        f"{cfg.temperature}) + {cfg.method.weight} x method (reference weights).",
        "",
        "Teachers: " + "; ".join(
            f"{s}: target {100 * teacher[s]['teacher_target_accuracy']:.1f}%, in-domain "
            f"{100 * teacher[s]['teacher_in_accuracy']:.1f}%" for s in shifts),
        "",
        "## Target-domain accuracy (selected checkpoint)", "",
        grid.pivot_markdown(tab["target_accuracy"], meths, shifts, baseline=base), "",
        "## In-domain accuracy (test_in)", "",
        grid.pivot_markdown(tab["in_accuracy"], meths, shifts), "",
        "## Teacher-student agreement on the target domain", "",
        grid.pivot_markdown(tab["target_agreement"], meths, shifts), "",
    ]
    corr = [s for s in shifts if parse_shift(s)[0] in CORRELATION]
    if corr:
        parts += ["## Correlation shifts: worst-group accuracy on the target "
                  "(groups = label x spurious attribute)", "",
                  grid.pivot_markdown(tab["target_worst_group_accuracy"], meths, corr,
                                      baseline=base), "",
                  "## Correlation shifts: average group accuracy on the target", "",
                  grid.pivot_markdown(tab["target_average_group_accuracy"], meths, corr), ""]
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    text = "\n".join(parts)
    R.atomic_write_text(os.path.join(out_dir, "results.md"), text)
    grid.plot_bars(tab["target_accuracy"], meths, shifts,
                   os.path.join(out_dir, "target_accuracy.png"),
                   ylabel="target accuracy (%)", title="KD under shift: target accuracy")
    grid.plot_scatter(tab["in_accuracy"], tab["target_accuracy"], meths, shifts,
                      os.path.join(out_dir, "in_vs_target.png"),
                      xlabel="in-domain accuracy (%)", ylabel="target accuracy (%)",
                      title="in-domain vs out-of-domain")
    if corr:
        grid.plot_bars(tab["target_worst_group_accuracy"], meths, corr,
                       os.path.join(out_dir, "worst_group_accuracy.png"),
                       ylabel="worst-group accuracy (%)", title="correlation shifts")
    return text


def plan(cfg) -> list[grid.Cell]:
    """Cells: shifts x method entries x seeds (shift outermost: one teacher at a time)."""
    sweeps = [("shift", list(cfg.shifts)), ("method.name", list(cfg.run_methods))]
    return grid.expand(cfg, sweeps, range(cfg.seeds), identity=cell_identity,
                       validate=shift_config.validate)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    quick = "--quick" in argv
    argv = [a for a in argv if a != "--quick"]
    overrides, rest = parse_cli(argv)
    if rest:
        raise SystemExit(f"unknown arguments {rest}; use --quick and --config.<key>=<value>.")
    cfg = load_config(CONFIG_MODULE, overrides, arg="quick" if quick else "full")
    t0 = time.time()
    os.makedirs(cfg.out_dir, exist_ok=True)
    meta = R.run_metadata()
    log(f"kdjax shift: {len(cfg.shifts)} shifts x {len(cfg.run_methods)} methods x "
        f"{cfg.seeds} seeds; {meta['device_kind']}, jax {meta['jax_version']}, rev "
        f"{meta['git_revision']}; out {cfg.out_dir}")
    cells = plan(cfg)
    rows = grid.run_grid(cells, os.path.join(cfg.out_dir, "results.jsonl"),
                         run_cells=run_cells, metadata=meta, log=log)
    if not rows:
        raise SystemExit("no results (every cell was skipped).")
    text = report(cfg, rows, cfg.out_dir, list(SKIPPED))
    log("\n" + text)
    log(f"wrote {cfg.out_dir}/results.jsonl, results.md, target_accuracy.png, "
        f"in_vs_target.png in {time.time() - t0:.0f} s")
    return rows


if __name__ == "__main__":
    main()
