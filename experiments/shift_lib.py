"""Building blocks of ``experiments/shift.py``: method entries and their loss terms, data
and teachers (ERM and robust), student predictions and the metrics of one seed.

Kept out of the driver so that it reads top to bottom; nothing here holds state across
calls: caches live in a :class:`Context` that the driver creates.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import data as kdata
from kdjax import methods, models
from kdjax.data import pruning
from kdjax.experiment import NOT_RESULT_KEYS
from kdjax.train.engine import evaluate
from kdjax.train.teacher import get_teacher

# Methods that read nothing but the teacher's logits (teacher outputs precomputed).
LOGIT_ONLY = {"ce", "kd", "dkd", "kd_ls", "dist"}
# Logit KD variants whose temperature follows config.temperature unless set.
TAU_FOLLOWS_KD = {"dkd", "kd_ls"}
CORRELATION = {"coloured_digits", "coloured_mnist", "spurious_mnist1d", "celeb_a_blond"}
SIGNAL_SHIFTS = {"mnist1d_domains", "spurious_mnist1d"}
# Keys that plan the grid or say where things go: not part of a cell's identity.
PLAN_KEYS = ("shifts", "run_methods", "seeds", "methods", "shift_options", "models",
             "num_devices", "algorithms", "robust_teachers", "robust_methods",
             "broken_margin", "weight_grid")


def parse_shift(spec: str) -> tuple[str, str | None]:
    name, _, target = str(spec).partition(":")
    return name, (target or None)


def input_kind(shift_name: str) -> str:
    return "signal" if shift_name in SIGNAL_SHIFTS else "image"


def is_correlation(spec: str) -> bool:
    return parse_shift(spec)[0] in CORRELATION


def resolve_entry(cfg) -> dict:
    """The catalogue entry of ``cfg.method.name`` with its method weight ``lambda`` and
    the rule that gave it (``reference``: ``config.method.weight`` x the method's
    reference weight; an entry's own ``weight`` is recorded as ``entry``)."""
    entries = {e["name"]: e for e in cfg.methods}
    entry = dict(entries[cfg.method.name])
    entry.setdefault("kd", True)
    entry.setdefault("augment", None)
    entry.setdefault("images_only", False)
    entry["weight_rule"] = "entry" if "weight" in entry else "reference"
    entry["weight"] = float(entry.get("weight", cfg.method.weight))
    entry["methods"] = [dict(m) for m in entry["methods"]]
    if entry["weight_rule"] == "reference" and any(
            "weight" not in m and methods.get(m["name"]).default_weight > 1
            for m in entry["methods"]):
        # reference weights > 1 were set for CIFAR feature scales (FitNet 100, AT 1000,
        # SP 3000, ...): lambda is multiplied by the best of config.weight_grid on val
        entry["weight_rule"] = "val_grid"
        entry["weight_grid"] = [float(g) for g in cfg.weight_grid]
    return entry


def grid_entries(entry) -> list[dict]:
    """One entry per candidate weight (``weight`` x each multiplier of ``weight_grid``;
    the entry itself when it has no grid)."""
    return [{**entry, "weight": entry["weight"] * g, "grid_multiplier": g}
            for g in entry["weight_grid"]] if "weight_grid" in entry else [entry]


def select_on_val(candidates) -> tuple[int, list[float]]:
    """Index of the candidate (a list of per-seed rows) with the highest mean val
    accuracy over seeds (first on ties), and every candidate's mean val accuracy."""
    means = [float(np.mean([r["val_accuracy"] for r in rows])) for rows in candidates]
    return int(np.argmax(means)), means


def shift_options(cfg, name: str) -> dict:
    return cfg.shift_options[name].to_dict() if name in cfg.shift_options else {}


def cell_identity(cfg) -> dict:
    """What defines a cell's result (hashed into its key; seeds are added by the grid)."""
    name, _ = parse_shift(cfg.shift)
    ident = {k: v for k, v in cfg.to_dict().items()
             if k not in NOT_RESULT_KEYS + PLAN_KEYS}
    ident["entry"] = resolve_entry(cfg)
    ident["shift_options"] = shift_options(cfg, name)
    ident["models"] = cfg.models[input_kind(name)].to_dict()
    if cfg.prune.score == "none" or cfg.prune.keep >= 1:
        ident.pop("prune", None)  # keys of unpruned cells as before the option existed
    algorithm = cfg.teacher.algorithm
    if algorithm != "erm":  # the teacher objective(s) define the result too
        names = list(cfg.robust_teachers) if algorithm == "robust" else [algorithm]
        ident["algorithms"] = {a: cfg.algorithms[a].to_dict() for a in names}
    return ident


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


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def student_model(cfg, entry, num_classes: int):
    """The cell's student network: ``config.models[kind]``'s options updated with the
    entry's ``student_kwargs`` (``kd+mixstyle``: MixStyle layers)."""
    mc = cfg.models[input_kind(parse_shift(cfg.shift)[0])]
    return models.create(mc.student, num_classes, **_tuples(
        {**mc.student_kwargs.to_dict(), **entry.get("student_kwargs", {})}))


def stack(trees):
    return jax.tree_util.tree_map(lambda *a: np.stack([np.asarray(x) for x in a]), *trees)


def logits_fn(module, chunk: int = 1024):
    """``f(stacked_variables, x) -> [S, N, C]`` logits in eval mode, vmapped over a
    leading seed axis, over padded chunks of a fixed size (one compilation)."""
    run = jax.jit(lambda v, xb: jax.vmap(
        lambda vv: module.apply(vv, xb, train=False)[0].astype(jnp.float32))(v))

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


def split_metrics(logits, ds, teacher_logits=None, correlation=False) -> dict:
    """Accuracy, NLL, ECE (+ agreement, worst/average group accuracy and the rate of
    predictions that equal the spurious attribute on correlation shifts)."""
    kw = {"groups": ds.extras["group"], "num_groups": 2 * ds.num_classes} \
        if correlation else {}
    m = evaluate(logits, ds.y, teacher_logits, **kw)
    if correlation:
        m["spurious_rate"] = float((np.argmax(logits, -1) == ds.extras["spurious"]).mean())
    return m


@dataclasses.dataclass
class Context:
    """Per-process caches of one driver run (data splits and teachers by key)."""

    splits: dict = dataclasses.field(default_factory=dict)
    teachers: dict = dataclasses.field(default_factory=dict)
    skipped: set = dataclasses.field(default_factory=set)   # "method on shift: reason"
    log: object = print


def load_shift(ctx: Context, cfg) -> dict:
    name, target = parse_shift(cfg.shift)
    key = json.dumps([cfg.shift, shift_options(cfg, name), cfg.data_seed,
                      cfg.val_fraction, cfg.data_dir], sort_keys=True)
    if key not in ctx.splits:
        ctx.splits.clear()  # one shift at a time in memory
        ctx.splits[key] = kdata.make_shift(
            name, target=target, seed=int(cfg.data_seed), data_dir=cfg.data_dir or None,
            val_fraction=float(cfg.val_fraction), **shift_options(cfg, name))
    return ctx.splits[key]


def _train_teacher(ctx: Context, cfg, splits, algorithm: str) -> dict:
    name, _ = parse_shift(cfg.shift)
    mc = cfg.models[input_kind(name)]
    tr, va = splits["train"], splits["val"]
    tcfg = {"model": mc.teacher, "model_kwargs": _tuples(mc.teacher_kwargs.to_dict()),
            "epochs": cfg.teacher.epochs, "batch_size": cfg.teacher.batch_size,
            "seed": cfg.teacher.seed, "optimizer": cfg.teacher.optimizer.to_dict()}
    train, algo = {"x": tr.x, "y": tr.y}, None
    if algorithm != "erm":  # a DG objective (kdjax.methods.robust) over env or group
        algo = cfg.algorithms[algorithm].to_dict()
        part = algo.get("partition", "env")
        n = 2 * tr.num_classes if part == "group" else int(tr.extras["env"].max()) + 1
        algo = {**algo, "num_partitions": n}
        train.update(env=tr.extras["env"], group=tr.extras["group"])
    dcfg = {"shift": name, "target": tr.info.get("target"),
            "options": shift_options(cfg, name), "data_seed": cfg.data_seed,
            "val_fraction": cfg.val_fraction}
    t0 = time.time()
    module, variables, meta = get_teacher(tcfg, dcfg, train, {"x": va.x, "y": va.y},
                                          tr.num_classes, cache_dir=cfg.cache_dir,
                                          progress=cfg.progress, algorithm=algo)
    logits = {s: logits_fn(module)(stack([variables]), splits[s].x)[0] for s in splits}
    corr = is_correlation(cfg.shift)
    metrics = {"teacher_algorithm": algorithm, "teacher_seconds": time.time() - t0,
               "teacher_cached": bool(meta.get("cached"))}
    for s, prefix in (("test_target", "teacher_target"), ("test_in", "teacher_in"),
                      ("val", "teacher_val")):
        for k, v in split_metrics(logits[s], splits[s], correlation=corr).items():
            if k in ("accuracy", "worst_group_accuracy", "average_group_accuracy",
                     "spurious_rate", "loss", "ece"):
                metrics[f"{prefix}_{'nll' if k == 'loss' else k}"] = v
    ctx.log(f"teacher {mc.teacher} ({algorithm}) on {cfg.shift}: val "
            f"{100 * metrics['teacher_val_accuracy']:.1f}%, in-domain "
            f"{100 * metrics['teacher_in_accuracy']:.1f}%, target "
            f"{100 * metrics['teacher_target_accuracy']:.1f}% "
            f"({'cached' if meta['cached'] else 'trained'}, {time.time() - t0:.0f} s)")
    return {"module": module, "variables": variables, "logits": logits,
            "metrics": metrics}


def teacher(ctx: Context, cfg, splits) -> dict:
    """The cell's teacher: ``erm``, a named algorithm, or ``robust`` (the robust
    algorithm of ``config.robust_teachers`` with the best val worst-group accuracy;
    selected on held-out source data, never the target)."""
    algorithm = cfg.teacher.algorithm
    names = list(cfg.robust_teachers) if algorithm == "robust" else [algorithm]
    out = []
    for a in names:
        key = json.dumps([cfg.shift, a, cfg.teacher.to_dict(), cfg.algorithms[a].to_dict(),
                          cfg.models.to_dict(), shift_options(cfg, parse_shift(cfg.shift)[0]),
                          cfg.data_seed], sort_keys=True, default=str)
        if key not in ctx.teachers:
            ctx.teachers[key] = _train_teacher(ctx, cfg, splits, a)
        out.append(ctx.teachers[key])
    # val worst-group accuracy, ties broken by val average-group accuracy (groups are
    # small on val); diversity shifts: val accuracy
    m = lambda t: t["metrics"]
    return max(out, key=lambda t: (m(t).get("teacher_val_worst_group_accuracy", 0.0),
                                   m(t).get("teacher_val_average_group_accuracy", 0.0),
                                   m(t)["teacher_val_accuracy"]))


def prune(cfg, splits, t):
    """``(train split, its teacher logits)`` after ``config.prune`` (pruning before
    distillation): keep the ``keep`` fraction of highest ``score`` per class, scores
    from the cell's trained teacher (EL2N on its logits, GraNd on its parameters; the
    paper scores with early-training networks: a documented deviation) or random."""
    tr, logits = splits["train"], t["logits"]["train"]
    score, keep = cfg.prune.score, float(cfg.prune.keep)
    if score == "none" or keep >= 1:
        return tr, logits
    if score == "random":
        s = pruning.random_scores(len(tr), cfg.data_seed)
    elif score == "el2n":
        s = pruning.el2n_scores(logits, tr.y)
    else:
        v, module = t["variables"], t["module"]
        s = pruning.grand_scores(lambda p, x: module.apply({**v, "params": p}, x,
                                                           train=False)[0],
                                 [v["params"]], tr.x, tr.y)
    idx = pruning.keep_indices(s, keep, tr.y)
    return tr.subset(idx), logits[idx]


def student_row(cfg, entry, terms, splits, t, m, best, val_gain, seconds) -> dict:
    """The result row of one student seed from its split metrics ``m``."""
    name, _ = parse_shift(cfg.shift)
    mc = cfg.models[input_kind(name)]
    tgt, ind = m["test_target"], m["test_in"]
    return {
        "shift": cfg.shift, "shift_kind": "correlation" if is_correlation(cfg.shift)
        else "diversity", "target_domain": splits["test_target"].info.get("target"),
        "method": entry["name"], "teacher": cfg.teacher.algorithm,
        "target_accuracy": tgt["accuracy"], "in_accuracy": ind["accuracy"],
        "val_accuracy": m["val"]["accuracy"], "drop": ind["accuracy"] - tgt["accuracy"],
        "target_ece": tgt["ece"], "target_nll": tgt["loss"],
        "target_agreement": tgt["agreement"], "target_kl_to_teacher": tgt["kl_to_teacher"],
        "in_agreement": ind["agreement"],
        "target_worst_group_accuracy": tgt.get("worst_group_accuracy"),
        "target_average_group_accuracy": tgt.get("average_group_accuracy"),
        "target_spurious_rate": tgt.get("spurious_rate"),
        "best_epoch": best["epoch"], "epochs": cfg.student.epochs,
        "val_gain_last_quarter": val_gain, "weight": entry["weight"],
        "weight_rule": entry["weight_rule"],
        "weight_multiplier": entry.get("grid_multiplier", 1.0), "global_batch_size": cfg.student.batch_size,
        "train_examples": len(splits["train"]), "prune": cfg.prune.to_dict(),
        "student": mc.student,
        **({"student_kwargs": entry["student_kwargs"]} if "student_kwargs" in entry else {}),
        "teacher_model": mc.teacher, "loss_terms": terms, "augment": entry["augment"],
        **t["metrics"], "train_seconds": seconds}


def student_rows(cfg, entry, terms, splits, t, student, res, seconds) -> list[dict]:
    """One row per seed of a :func:`kdjax.train.fit` result ``res``: the val-selected
    checkpoints evaluated on val, test_in and the target."""
    corr, epochs = is_correlation(cfg.shift), cfg.student.epochs
    variables = stack([{"params": bb["params"], **({"batch_stats": bb["batch_stats"]}
                                                   if bb["batch_stats"] else {})}
                       for bb in res.best])
    logits = {s: logits_fn(student)(variables, splits[s].x)
              for s in ("val", "test_in", "test_target")}
    return [student_row(cfg, entry, terms, splits, t, {
        s: split_metrics(logits[s][i], splits[s], t["logits"][s], corr and s != "val")
        for s in logits}, best, val_gain_last_quarter(res.history, i, epochs), seconds)
        for i, best in enumerate(res.best)]


def val_gain_last_quarter(history, seed_index: int, epochs: int) -> float:
    """Best val accuracy of the evaluations in the last quarter of training minus the
    best one before it (> 0: still improving when training stopped)."""
    pts = [(h["epoch"], h["val"]["accuracy"]) for h in history
           if h["seed_index"] == seed_index and "val" in h]
    early = [a for e, a in pts if e <= 0.75 * epochs]
    late = [a for e, a in pts if e > 0.75 * epochs]
    return float(max(late) - max(early)) if early and late else float("nan")
