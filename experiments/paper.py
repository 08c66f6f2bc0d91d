"""The papers' own settings at full scale, on streamed data (docs/scale.md).

    python -m experiments.paper shiftkd [variant] [--config.key=value ...]  # or kd2m, coss

Reads top to bottom: config -> streams (DomainBed folder / DomainNet / CelebA
OoD-Bench / TFDS catalog / ImageNet-style folder; decoding and augmentation in grain
workers) -> teacher (torchvision ResNet, ImageNet weights from ``teacher.pretrained``,
fine-tuned with CE on the training stream) -> student (ImageNet weights from
``student.pretrained``) distilled with the config's methods -> metrics of every
evaluation stream (in-domain validation, held-out target) -> one JSON line per run,
written by process 0. Works on one process or many (``jax.distributed``: the mesh spans
every process, each reads its rows of every global batch). ``pretrained=""`` starts
from random weights (tests only; the papers start from ImageNet).
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np

from kdjax import data as kdata
from kdjax import methods, models
from kdjax._io import atomic_write_text, run_metadata
from kdjax.data import domainbed as dbed
from kdjax.data import stream as st
from kdjax.experiment.config import load_config, parse_cli
from kdjax.models import convert
from kdjax.train import Checkpointer, Distiller, distributed, fit, make_optimizer

CONFIGS = {"shiftkd": "experiments.configs.paper_shiftkd",
           "kd2m": "experiments.configs.paper_kd2m", "coss": "experiments.configs.paper_coss"}


def streams(c):
    """``(train stream, {name: eval stream})`` for ``c.data.kind``."""
    d, dd = c.data, c.data.data_dir or None
    t_train, t_eval = (st.image_transform(train=t, size=d.image_size, extras=tuple(d.extras))
                       for t in (True, False))
    kw = dict(num_workers=d.num_workers)
    if d.kind in ("domainbed", "imagefolder"):
        domains = dbed.list_domains(d.root)
        held_out = [d.target] if d.kind == "domainbed" else [d.eval_domain]
        train_domains = [x for x in domains if x not in held_out] \
            if d.kind == "domainbed" else [d.train_domain]
        full = {}
        for dom in train_domains + held_out:
            b = dbed.domainbed_builder(d.root, dom, data_dir=dd)
            b.download_and_prepare()
            full[dom] = st.Stream(b.as_data_source("train"), len(b.info.features["label"].names),
                                  t_eval, name=dom, **kw)
        train, evals = [], {}
        for i, dom in enumerate(train_domains):   # DomainBed: in/out split per domain
            inn, out = dbed.holdout_split(len(full[dom]), d.holdout_fraction, seed=i)
            train.append(st.subset(full[dom], inn, transform=t_train))
            if len(out):
                evals[f"val_{dom}"] = st.subset(full[dom], out)
        for dom in held_out:
            evals[f"target_{dom}"] = full[dom]
        return st.concatenate(train), evals
    if d.kind == "domainnet":
        parts = st.domainnet_streams(d.target, t_train, t_eval, data_dir=dd, **kw)
        return st.concatenate(parts["train"].values()), {
            **{f"val_{k}": v for k, v in parts["val"].items()},
            f"target_{d.target}": parts["test_target"]}
    if d.kind == "celeba_oodbench":
        b = dbed.celeba_oodbench_builder(d.root, data_dir=dd)
        b.download_and_prepare()
        envs = {e: st.Stream(b.as_data_source(e), 2, t_eval, name=e, **kw)
                for e in dbed.OODBENCH_CELEBA_ENVS}
        train = st.concatenate([st.subset(envs[e], np.arange(len(envs[e])), transform=t_train)
                                for e in ("tr_env1", "tr_env2")])
        return train, {"target_te_env": envs["te_env"]}
    if d.kind == "catalog":
        return (st.catalog_stream(d.name, "train", t_train, data_dir=dd, **kw),
                {"test": st.catalog_stream(d.name, d.eval_split, t_eval, data_dir=dd, **kw)})
    raise ValueError(f"data.kind must be domainbed, imagefolder, domainnet, celeba_oodbench "
                     f"or catalog, got {d.kind!r}.")


def network(mc, num_classes, key, example):
    """``(module, variables)``: torchvision weights from ``mc.pretrained`` + fresh head;
    ``pretrained=""``: random init of any ``kdjax.models`` name."""
    if mc.pretrained:
        if not mc.model.startswith("tv_resnet"):
            raise ValueError(f"pretrained weights need a tv_resnet* model, got {mc.model!r}.")
        return convert.load_pretrained(os.path.expanduser(mc.pretrained),
                                       int(mc.model.removeprefix("tv_resnet")), num_classes,
                                       key=key)
    module = models.create(mc.model, num_classes)
    return module, jax.device_get(module.init(key, example, train=False))


def train(module, built, variables, stream, sc, mesh, ckpt, teacher=None):
    """``module`` trained with the methods ``built`` (``teacher``: ``(module, variables)``)
    on the stream from ``variables``, the schedule over ``sc.epochs``: ``(distiller, state)``."""
    steps = len(stream) // sc.batch_size
    tx = make_optimizer(sc.optimizer.to_dict(), total_steps=steps * sc.epochs,
                        steps_per_epoch=steps)
    t_mod, tv = teacher or (None, None)
    distiller = Distiller(module, built, tx, teacher=t_mod)
    state = distiller.init(sc.seed, stream.example()["x"][None], tv)
    params = {**state.params, "student": variables["params"]}
    state = state.replace(params=params, batch_stats=variables.get("batch_stats", {}),
                          opt_state=distiller.tx.init(params))
    return distiller, fit(distiller, state, tv, stream, epochs=sc.epochs,
                          batch_size=sc.batch_size, mesh=mesh, checkpointer=Checkpointer(ckpt),
                          progress=distributed.is_primary(), desc=ckpt).state


def main(c):
    mesh = distributed.global_mesh()
    train_s, evals = streams(c)
    key_t, key_s = jax.random.split(jax.random.PRNGKey(c.seed))
    example = train_s.example()["x"][None]
    t_mod, t_vars = network(c.teacher, train_s.num_classes, key_t, example)
    if c.teacher.epochs:   # fine-tune the ImageNet teacher on the source data (CE)
        _, t_state = train(t_mod, (methods.build({"name": "ce"}),), t_vars, train_s, c.teacher,
                           mesh, os.path.join(c.out_dir, "teacher"))
        t_vars = {"params": distributed.to_host(t_state.params["student"]),
                  "batch_stats": distributed.to_host(t_state.batch_stats)}
    s_mod, s_vars = network(c.student, train_s.num_classes, key_s, example)
    tv = distributed.replicate(t_vars, mesh)
    d, state = train(s_mod, tuple(methods.build(dict(m)) for m in c.methods), s_vars, train_s,
                     c.student, mesh, os.path.join(c.out_dir, "student"), (t_mod, tv))
    row = {"setting": c.name, "methods": [m["name"] for m in c.methods],
           "devices": jax.device_count(), "processes": jax.process_count(),
           "global_batch": c.student.batch_size, **run_metadata()}
    row.update(distributed.evaluate_streams(d, state, evals, c.eval_batch_size, mesh,
                                            teacher=(t_mod, tv)))
    if distributed.is_primary():
        os.makedirs(c.out_dir, exist_ok=True)
        atomic_write_text(os.path.join(c.out_dir, "results.json"),
                          json.dumps(row, indent=1, default=str))
    return row


if __name__ == "__main__":
    # multi-process: KDJAX_NUM_PROCESSES (+ KDJAX_COORDINATOR, KDJAX_PROCESS_ID), or
    # KDJAX_DISTRIBUTED=1 / SLURM with several tasks for JAX's cluster auto-detection
    if os.environ.get("KDJAX_NUM_PROCESSES") or os.environ.get("KDJAX_DISTRIBUTED") \
            or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        distributed.initialize(**distributed.env_config())
    overrides, args = parse_cli(sys.argv[1:])
    setting = args[0] if args else "shiftkd"
    main(load_config(CONFIGS[setting], overrides, args[1] if len(args) > 1 else None))
