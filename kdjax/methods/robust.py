"""Registry entries for domain-generalisation teacher objectives (DomainBed).

Supervised, teacher-free loss terms (they replace ``ce`` when a *teacher* is trained
with a robust algorithm, ``teacher.algorithm`` in ``experiments.shift``), wrapping the
pure functions of :mod:`kdjax.losses.robust` on the per-example cross-entropy of the
network's logits:

* ``groupdro``: Group DRO, weights ``q`` over the partitions carried in the method
  state (start ``1 / P``), ``eta`` 1e-2 (DomainBed ``groupdro_eta``).
* ``vrex``: V-REx, ``penalty_weight`` 10 from step ``anneal_steps`` (500) on and 1
  before (DomainBed ``vrex_lambda``, ``vrex_penalty_anneal_iters``); the step counter
  lives in the method state. DomainBed also resets the Adam state at the anneal step;
  not done here (deliberate deviation: the optimiser belongs to the engine).
* ``coral``: Deep CORAL on feature ``features`` (default ``"pooled"``, DomainBed's
  featurizer output), ``gamma`` 1 (DomainBed ``mmd_gamma``).

The partition of each example is read from ``batch[partition]``: ``"env"`` (the
training environment / domain: DomainBed's definition) or ``"group"`` (label x
spurious attribute: Sagawa et al. 2020's groups for Group DRO), so the training data
dict must carry that array; ``num_partitions`` (static) must be given.
"""

from __future__ import annotations

import jax.numpy as jnp

from kdjax import losses
from kdjax.losses import robust as R
from kdjax.methods import Method, register, stateless
from kdjax.methods.common import step_init

__all__ = ["NAMES", "ALGORITHMS"]

NAMES = ("groupdro", "vrex", "coral")
# teacher.algorithm values of the shift study and their method names ("erm" = ce)
ALGORITHMS = {"erm": "ce", "groupdro": "groupdro", "vrex": "vrex", "coral": "coral"}


def _partition(batch, partition: str, num_partitions: int):
    if partition not in batch:
        raise ValueError(f"option partition={partition!r}: the batch has no "
                         f"{partition!r} array (batch keys: {sorted(batch)}); pass it "
                         f"with the training data.")
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) or \
            num_partitions < 1:
        raise ValueError(f"option num_partitions must be a positive int, got "
                         f"{num_partitions!r}.")
    return batch[partition]


def _per_example_ce(student_out, batch):
    return losses.cross_entropy(student_out[0], batch["y"], reduction="none")


def _groupdro_init(rng, student_out, teacher_out, options):
    num_partitions = int(options["num_partitions"])
    return {}, {"q": jnp.full((num_partitions,), 1.0 / num_partitions, jnp.float32)}


def _groupdro(inputs, options):
    num_partitions, batch = options["num_partitions"], inputs.batch
    part = _partition(batch, options["partition"], num_partitions)
    loss, q = R.groupdro_loss(_per_example_ce(inputs.student, batch), part,
                              inputs.state["q"], num_partitions, options["eta"])
    return loss, {"q": q}


def _vrex(inputs, options):
    num_partitions, batch = options["num_partitions"], inputs.batch
    part = _partition(batch, options["partition"], num_partitions)
    step = inputs.state["step"]
    lam = jnp.where(step >= options["anneal_steps"], options["penalty_weight"], 1.0)
    loss = R.vrex_loss(_per_example_ce(inputs.student, batch), part, num_partitions, lam)
    return loss, {"step": step + 1}


def _coral(inputs, options):
    num_partitions, batch = options["num_partitions"], inputs.batch
    part = _partition(batch, options["partition"], num_partitions)
    features = options["features"]
    feats = inputs.student[1]
    if features not in feats:
        raise ValueError(f"option features={features!r} is not a feature of the network; "
                         f"available: {sorted(feats)}.")
    f = feats[features].reshape(feats[features].shape[0], -1)
    return R.coral_loss(_per_example_ce(inputs.student, batch), f, part, num_partitions,
                        options["gamma"])


_COMMON = {"partition": "env", "num_partitions": 0}
register(Method("groupdro", _groupdro, init=_groupdro_init,
                options={**_COMMON, "eta": 1e-2}, default_weight=1.0, needs_labels=True,
                needs_teacher=False,
                doc="Group DRO over batch[partition] (Sagawa et al. 2020; DomainBed)"))
register(Method("vrex", _vrex, init=step_init,
                options={**_COMMON, "penalty_weight": 10.0, "anneal_steps": 500},
                default_weight=1.0, needs_labels=True, needs_teacher=False,
                doc="V-REx: mean + lambda Var of per-partition risks (Krueger 2021)"))
register(Method("coral", stateless(_coral),
                options={**_COMMON, "gamma": 1.0, "features": "pooled"},
                default_weight=1.0, needs_labels=True, needs_teacher=False,
                doc="Deep CORAL: risks + gamma mean/cov gaps of features (Sun 2016)"))
