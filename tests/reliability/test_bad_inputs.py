"""Bad inputs across the public API: each raises the right type with a useful message.

Every case asserts the exception type and a message that names the argument, says what
was expected and what was received (and lists the valid choices for names).
"""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kdjax import influence, losses, methods, models
from kdjax import data as kdata
from kdjax.experiment.config import apply_overrides
from kdjax.train import (Distiller, Evaluation, evaluate, fit, make_mesh, make_optimizer,
                         predict, shard_batch)


def f(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def i(*values):
    return jnp.asarray(values, jnp.int32)


F43, F53, I43 = f(4, 3), f(5, 3), jnp.ones((4, 3), jnp.int32)
F45 = f(4, 5)
IMG = f(4, 6, 6, 2)
LAB = i(0, 1, 2, 1)
MAT = lambda v: v  # noqa: E731  identity "Hessian"
TX = make_optimizer({"name": "sgd", "learning_rate": 0.1}, total_steps=10, steps_per_epoch=1)
CFG = ml_collections.ConfigDict({"lr": 0.1, "epochs": 3, "model": {"name": "mlp"}})
_DS = kdata.ArrayDataset(x=np.zeros((8, 3), np.float32), y=np.zeros(8, np.int32),
                         num_classes=2, name="toy", split="train")


def _distiller(teacher=True, names=("ce", "kd")):
    ms = tuple(methods.build({"name": n}) for n in names)
    return Distiller(models.create("mlp", 3, hidden=(4,)), ms, TX,
                     teacher=models.create("mlp", 3, hidden=(4,)) if teacher else None)


def _fit(**kw):
    d = _distiller()
    x = np.zeros((16, 5), np.float32)
    tv = d.teacher.init(jax.random.PRNGKey(0), x[:2])
    st = d.init(0, x[:2], tv)
    args = dict(epochs=1, batch_size=8, progress=False)
    args.update(kw)
    return fit(d, st, tv, {"x": x, "y": np.zeros(16, np.int32)}, **args)


def _per_example(params, batch):
    return (batch["x"] @ params["w"]) ** 2


# (id, thunk, exception type, regex the message must match)
CASES = [
    # ---- logit losses ---------------------------------------------------------------
    ("kd/rank", lambda: losses.kd(f(8), F43), ValueError,
     r"student_logits must have rank 2, got rank 1 with shape \(8,\)"),
    ("kd/batch-mismatch", lambda: losses.kd(F43, F53), ValueError,
     r"student_logits and teacher_logits must have the same shape, got \(4, 3\) for "
     r"student_logits and \(5, 3\) for teacher_logits"),
    ("kd/int-dtype", lambda: losses.kd(I43, F43), TypeError,
     r"student_logits must have a floating dtype .*got int32"),
    ("kd/temperature-0", lambda: losses.kd(F43, F43, 0.0), ValueError,
     r"temperature must be > 0, got 0\.0"),
    ("kd/temperature-neg", lambda: losses.kd(F43, F43, -2.0), ValueError,
     r"temperature must be > 0, got -2\.0"),
    ("kd/empty-batch", lambda: losses.kd(f(0, 3), f(0, 3)), ValueError,
     r"student_logits must be a non-empty batch, got shape \(0, 3\)"),
    ("kd/weights-shape", lambda: losses.kd(F43, F43, weights=jnp.ones(5)), ValueError,
     r"weights must have shape \(4,\) \(one weight per example\), got \(5,\)"),
    ("kd/weights-negative", lambda: losses.kd(F43, F43, weights=-jnp.ones(4)), ValueError,
     r"weights must be >= 0, got min -1\.0"),
    ("kd/reduction", lambda: losses.kd(F43, F43, reduction="avg"), ValueError,
     r"reduction must be one of \['mean', 'none', 'sum'\], got 'avg'"),
    ("cross_entropy/labels-range", lambda: losses.cross_entropy(F43, i(0, 1, 3, 0)),
     ValueError, r"labels must lie in \[0, 3\), got values in \[0, 3\]"),
    ("cross_entropy/labels-float", lambda: losses.cross_entropy(F43, f(4)), TypeError,
     r"labels must have an integer dtype, got float32"),
    ("cross_entropy/labels-batch", lambda: losses.cross_entropy(F43, i(0, 1)), ValueError,
     r"labels must have shape \(4,\) to match the batch, got \(2,\)"),
    ("dkd/labels-negative", lambda: losses.dkd(F43, F43, i(0, -1, 2, 1)), ValueError,
     r"labels must lie in \[0, 3\), got values in \[-1, 2\]"),
    ("dkd/temperature-0", lambda: losses.dkd(F43, F43, LAB, temperature=0.0), ValueError,
     r"temperature must be > 0, got 0\.0"),
    ("dist/batch-mismatch", lambda: losses.dist(F43, F53), ValueError,
     r"student_logits and teacher_logits must have the same shape"),
    ("dist/temperature-neg", lambda: losses.dist(F43, F43, temperature=-1.0), ValueError,
     r"temperature must be > 0, got -1\.0"),
    ("kl_to_teacher/int-dtype", lambda: losses.kl_to_teacher(I43, F43), TypeError,
     r"student_logits must have a floating dtype .*got int32"),
    ("kl_to_teacher/batch-mismatch", lambda: losses.kl_to_teacher(F43, F53), ValueError,
     r"student_logits and teacher_logits must have the same shape, got \(4, 3\)"),
    ("kl_to_teacher/temperature-0", lambda: losses.kl_to_teacher(F43, F43, 0.0),
     ValueError, r"temperature must be > 0, got 0\.0"),
    # ---- feature losses -------------------------------------------------------------
    ("fitnet/shape", lambda: losses.fitnet(IMG, f(4, 6, 6, 3)), ValueError,
     r"student_regressed and teacher must have the same shape, got \(4, 6, 6, 2\) .*"
     r"\(4, 6, 6, 3\)"),
    ("attention_transfer/batch-mismatch",
     lambda: losses.attention_transfer(IMG, f(5, 6, 6, 2)), ValueError,
     r"student and teacher must have the same batch size .*\(4, 6, 6, 2\).*\(5, 6, 6, 2\)"),
    ("attention_transfer/int-dtype",
     lambda: losses.attention_transfer(IMG.astype(jnp.int32), IMG), TypeError,
     r"student must have a floating dtype .*got int32"),
    ("attention_map/p-0", lambda: losses.attention_map(IMG, 0.0), ValueError,
     r"p must be > 0, got 0\.0"),
    ("nst/rank", lambda: losses.nst(f(4), f(4)), ValueError,
     r"student must have rank 3 or 4, got rank 1 with shape \(4,\)"),
    ("vid/log_scale-shape", lambda: losses.vid(F45, F45, jnp.zeros(3)), ValueError,
     r"log_scale .*\(5,\).*got \(3,\)"),
    # ---- relation losses ------------------------------------------------------------
    ("similarity_preserving/batch-mismatch",
     lambda: losses.similarity_preserving(F45, f(6, 5)), ValueError,
     r"student and teacher must have the same batch size .*\(4, 5\).*\(6, 5\)"),
    ("rkd/rank", lambda: losses.rkd(f(4), f(4)), ValueError,
     r"student must have rank >= 2, got rank 1"),
    ("pkt/int-dtype", lambda: losses.pkt(jnp.ones((4, 5), jnp.int32), F45), TypeError,
     r"student must have a floating dtype .*got int32"),
    ("crd/temperature-0", lambda: losses.crd(F45, F45, 0.0), ValueError,
     r"temperature must be > 0, got 0\.0"),
    ("correlation_congruence/variant",
     lambda: losses.correlation_congruence(F45, F45, variant="rbf"), ValueError,
     r"variant must be one of \[.*'taylor'.*\], got 'rbf'"),
    # ---- similarity losses ----------------------------------------------------------
    ("coss/batch-mismatch", lambda: losses.coss(F45, f(6, 5)), ValueError,
     r"student_emb and teacher_emb must have the same shape, got \(4, 5\) .*\(6, 5\)"),
    ("cosine_distillation/tau_t-0",
     lambda: losses.cosine_distillation(F45, F45, tau_t=0.0), ValueError,
     r"tau_t must be > 0, got 0\.0"),
    ("space_similarity/int-dtype",
     lambda: losses.space_similarity(jnp.ones((4, 5), jnp.int32), F45), TypeError,
     r"student_emb must have a floating dtype .*got int32"),
    # ---- distribution losses --------------------------------------------------------
    ("sinkhorn/epsilon-0", lambda: losses.sinkhorn(F45, F45, epsilon=0.0), ValueError,
     r"epsilon must be > 0, got 0\.0"),
    ("sinkhorn/feature-dim", lambda: losses.sinkhorn(F45, f(4, 3)), ValueError,
     r"x and y must have the same feature dimension, got 5 for x .* 3 for y"),
    ("sinkhorn/relative_to", lambda: losses.sinkhorn(F45, F45, relative_to="max"),
     ValueError, r"relative_to must be one of \[.*'std'.*\], got 'max'"),
    ("sinkhorn_divergence/nan-input",
     lambda: losses.sinkhorn_divergence(F45.at[0, 0].set(jnp.nan), F45), ValueError,
     r"x must be finite, got 1 NaN/Inf entries"),
    ("mmd/kernel", lambda: losses.mmd(F45, F45, kernel="laplace"), ValueError,
     r"kernel must be one of \[.*'linear'.*\], got 'laplace'"),
    ("mmd/bandwidth-neg", lambda: losses.mmd(F45, F45, kernel="rbf", bandwidth=-1.0),
     ValueError, r"bandwidth must be > 0, got -1\.0"),
    ("conditional/labels-range",
     lambda: losses.conditional(losses.mmd, F45, F45, i(0, 1, 5, 1), num_classes=3),
     ValueError, r"labels_x must lie in \[0, 3\), got values in \[0, 5\]"),
    # ---- methods --------------------------------------------------------------------
    ("methods.get/unknown", lambda: methods.get("hinton"), ValueError,
     r"unknown method 'hinton'; valid methods: \[.*'kd'.*\]"),
    ("methods.build/unknown-option", lambda: methods.build({"name": "kd", "temp": 2}),
     ValueError, r"unknown option\(s\) \['temp'\] for method 'kd'; valid options: "
                 r"\[.*'temperature'.*\]"),
    ("methods.build/no-name", lambda: methods.build({"weight": 1.0}), ValueError,
     r"a method config needs a 'name' key, got keys \['weight'\]"),
    # ---- models ---------------------------------------------------------------------
    ("models.create/unknown", lambda: models.create("vgg11", 10), ValueError,
     r"unknown model 'vgg11'; valid models: \[.*'mlp'.*\]"),
    ("models.create/num_classes", lambda: models.create("mlp", 1), ValueError,
     r"num_classes must be an int >= 2, got 1"),
    ("models.create/resnet-depth", lambda: models.create("resnet10", 10), ValueError,
     r"ResNet depth must be 6n\+2 >= 8 .*got 10 in 'resnet10'"),
    ("models.create/bad-option", lambda: models.create("mlp", 10, widht=3), ValueError,
     r"bad option for model 'mlp': .*widht"),
    # ---- data -----------------------------------------------------------------------
    ("data.load/name-type", lambda: kdata.load(3), TypeError, r"name must be a str, got int"),
    ("data.load/unknown-embedded-config", lambda: kdata.load("mnist1d", config="sheer"),
     ValueError, r"config for 'mnist1d' must be one of \[.*'shear'.*\] .*got 'sheer'"),
    ("data.make_shift/unknown", lambda: kdata.make_shift("rotated_svhn"), ValueError,
     r"name must be one of \[.*'rotated_digits'.*\], got 'rotated_svhn'"),
    ("data.make_shift/val_fraction", lambda: kdata.make_shift("rotated_digits",
                                                              val_fraction=1.5),
     ValueError, r"val_fraction must be in \(0, 1\), got 1\.5"),
    ("data.shift_domains/unknown", lambda: kdata.shift_domains("nope"), ValueError,
     r"name must be one of \[.*'mnist1d_domains'.*\], got 'nope'"),
    ("data.get_augmentation/unknown", lambda: kdata.get_augmentation("jitter"), ValueError,
     r"name must be one of \[.*'crop_flip'.*\], got 'jitter'"),
    ("data.get_augmentation/option", lambda: kdata.get_augmentation("crop", pad=2),
     TypeError, r"invalid options \['pad'\] for augmentation 'crop'; valid options are "
                r"\['padding'\]"),
    ("data.batches/batch_size-0", lambda: list(kdata.batches(_DS, 0)), ValueError,
     r"batch_size must be a positive int, got 0"),
    ("data.batches/not-dataset", lambda: list(kdata.batches({"x": 1}, 2)), TypeError,
     r"ds must be an ArrayDataset, got dict"),
    # ---- influence ------------------------------------------------------------------
    ("inverse_hvp/damping-0", lambda: influence.inverse_hvp(MAT, {"w": f(3)}, damping=0.0),
     ValueError, r"damping must be > 0, got 0\.0"),
    ("inverse_hvp/method", lambda: influence.inverse_hvp(MAT, {"w": f(3)}, method="lu"),
     ValueError, r"method must be one of \[.*'cg'.*\], got 'lu'"),
    ("influence_weights/mapping",
     lambda: influence.influence_weights(f(6), mapping="softmax"), ValueError,
     r"mapping must be one of \[.*'exp_minmax'.*\], got 'softmax'"),
    ("influence_weights/temperature-0",
     lambda: influence.influence_weights(f(6), temperature=0.0), ValueError,
     r"temperature must be > 0, got 0\.0"),
    ("per_example_losses/batch-mismatch",
     lambda: influence.per_example_losses(_per_example, {"w": f(3)},
                                          {"x": f(4, 3), "y": f(5)}), ValueError,
     r"every leaf of batch must have the same leading \(example\) dimension, got "
     r".*4.*5"),
    # ---- train ----------------------------------------------------------------------
    ("fit/epochs-0", lambda: _fit(epochs=0), ValueError,
     r"epochs and batch_size must be >= 1, got 0 and 8"),
    ("fit/batch-not-divisible", lambda: _fit(mesh=make_mesh(8), batch_size=12), ValueError,
     r"batch_size 12 must be divisible by the 8 devices of the mesh"),
    ("fit/select_on", lambda: _fit(evaluation=Evaluation(select_on="val")), ValueError,
     r"select_on='val' is not an eval set; valid: \[\]"),
    ("fit/batch-larger-than-data", lambda: _fit(batch_size=32), ValueError,
     r"batch_size 32 is larger than the dataset \(16\)"),
    ("evaluate/batch-mismatch", lambda: evaluate(np.zeros((4, 3)), np.zeros(5, np.int32)),
     ValueError, r"labels must have shape \(4,\) to match the batch, got \(5,\)"),
    ("evaluate/labels-range", lambda: evaluate(np.zeros((4, 3)), np.array([0, 1, 2, 7])),
     ValueError, r"labels must lie in \[0, 3\), got values in \[0, 7\]"),
    ("predict/batch_size-0", lambda: predict(lambda x: (x, {}), np.zeros((4, 3)), 0),
     ValueError, r"batch_size must be a positive int, got 0"),
    ("make_optimizer/name", lambda: make_optimizer({"name": "lion", "learning_rate": 0.1},
                                                   total_steps=1, steps_per_epoch=1),
     ValueError, r"optimizer\.name must be one of \['adam', 'adamw', 'sgd'\], got 'lion'"),
    ("make_optimizer/lr-0", lambda: make_optimizer({"name": "sgd", "learning_rate": 0.0},
                                                   total_steps=1, steps_per_epoch=1),
     ValueError, r"optimizer\.learning_rate must be > 0, got 0\.0"),
    ("make_optimizer/schedule",
     lambda: make_optimizer({"learning_rate": 0.1, "schedule": "linear"}, total_steps=1,
                            steps_per_epoch=1), ValueError,
     r"optimizer\.schedule must be one of \['constant', 'cosine', 'step'\], got 'linear'"),
    ("make_mesh/too-many", lambda: make_mesh(9), ValueError,
     r"num_devices must be in \[1, 8\], got 9"),
    ("make_mesh/zero", lambda: make_mesh(0), ValueError,
     r"num_devices must be in \[1, 8\], got 0"),
    ("shard_batch/not-divisible", lambda: shard_batch({"x": np.zeros((6, 2))}, make_mesh(4)),
     ValueError, r"batch leading dimension 6 is not divisible by the 4 devices"),
    ("Distiller/no-teacher", lambda: _distiller(teacher=False), ValueError,
     r"methods \['kd'\] need a teacher, but teacher=None"),
    ("Distiller/no-methods", lambda: _distiller(names=()), ValueError,
     r"methods must name at least one loss term, got none"),
    # ---- config ---------------------------------------------------------------------
    ("config/unknown-key", lambda: apply_overrides(CFG, ["model.nmae=cnn"]), ValueError,
     r"unknown config key 'model\.nmae': 'nmae' is not in model; valid keys there: "
     r"\['name'\]"),
    ("config/wrong-type", lambda: apply_overrides(CFG, ["epochs=fast"]), ValueError,
     r"config key 'epochs' expects int, got 'fast' \(str\)"),
    ("config/no-equals", lambda: apply_overrides(CFG, ["epochs"]), ValueError,
     r"override 'epochs' must look like key=value"),
]


def test_table_is_large_enough():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case):
    _, thunk, exc, pattern = case
    with pytest.raises(exc) as info:
        thunk()
    assert re.search(pattern, str(info.value)), (
        f"message {str(info.value)!r} does not match {pattern!r}")
