"""The small distillation problem shared by the multi-process worker and its test."""

import numpy as np

GLOBAL_BATCH = 8
STEPS = 4


def problem():
    import jax

    from kdjax import methods, models
    from kdjax.train import Distiller, make_optimizer

    student = models.create("mlp", 3, hidden=(16,))
    teacher = models.create("mlp", 3, hidden=(8,))
    ms = (methods.build({"name": "ce", "weight": 0.5}),
          methods.build({"name": "kd", "weight": 0.5}),
          methods.build({"name": "rkd", "weight": 0.1}))   # a batch-level loss
    tx = make_optimizer({"name": "sgd", "learning_rate": 0.05, "schedule": "constant"},
                        total_steps=STEPS, steps_per_epoch=STEPS)
    d = Distiller(student, ms, tx, teacher=teacher)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH * STEPS, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=GLOBAL_BATCH * STEPS).astype(np.int32)
    tvars = jax.device_get(teacher.init(jax.random.PRNGKey(1), x[:2]))
    state = jax.device_get(d.init(0, x[:2], tvars))
    batches = [{"x": x[i * GLOBAL_BATCH:(i + 1) * GLOBAL_BATCH],
                "y": y[i * GLOBAL_BATCH:(i + 1) * GLOBAL_BATCH]} for i in range(STEPS)]
    return d, state, tvars, batches


def flat(tree):
    import jax
    return np.concatenate([np.ravel(np.asarray(a, np.float64))
                           for a in jax.tree_util.tree_leaves(tree)])
