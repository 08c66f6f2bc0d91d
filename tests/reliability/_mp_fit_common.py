"""The small streamed fit shared by the multi-process fit worker and its test."""

import numpy as np

GLOBAL_BATCH = 8
EPOCHS = 3
N_TRAIN, N_TEST = 64, 20


def problem():
    import jax

    from kdjax import methods, models
    from kdjax.data import ArrayDataset, from_array_dataset
    from kdjax.train import Distiller, make_optimizer

    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_TRAIN + N_TEST, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int32) + (x[:, 2] > 1).astype(np.int32)
    train = ArrayDataset(x=x[:N_TRAIN], y=y[:N_TRAIN], num_classes=3, name="mp",
                         split="train")
    test = ArrayDataset(x=x[N_TRAIN:], y=y[N_TRAIN:], num_classes=3, name="mp",
                        split="test")
    student = models.create("mlp", 3, hidden=(16,))
    teacher = models.create("mlp", 3, hidden=(8,))
    ms = (methods.build({"name": "ce", "weight": 0.5}),
          methods.build({"name": "kd", "weight": 0.5}),
          methods.build({"name": "rkd", "weight": 0.1}))   # a batch-level loss
    steps = N_TRAIN // GLOBAL_BATCH
    tx = make_optimizer({"name": "sgd", "learning_rate": 0.05, "momentum": 0.9,
                         "schedule": "cosine"},
                        total_steps=steps * EPOCHS, steps_per_epoch=steps)
    d = Distiller(student, ms, tx, teacher=teacher)
    tvars = jax.device_get(teacher.init(jax.random.PRNGKey(1), x[:2]))
    state = jax.device_get(d.init(0, x[:2], tvars))
    return d, state, tvars, from_array_dataset(train), from_array_dataset(test)


def run(mesh, replicate, ckpt_dir=None, die_at=None):
    """EPOCHS streamed epochs + evaluation; returns (params, starts, rows).

    ``starts``: the batch each epoch's stream started at (0, or where a resumed epoch
    continues).

    ``die_at=(epoch, batch)``: the process exits (code 3) before reading that batch,
    after the mid-epoch checkpoints before it (one every 2 steps) were saved.
    """
    import os

    from kdjax.data import Stream
    from kdjax.train import Checkpointer, distributed

    d, state, tvars, train, test = problem()
    starts = []   # the first batch each epoch's stream starts at

    class Recording(Stream):
        def batches(self, *a, **k):
            starts.append(k.get("start_batch", 0))
            return super().batches(*a, **k)

    stream = Recording(train.source, train.num_classes, train.transform)
    if die_at is not None:
        class Dying(Recording):
            def batches(self, *a, **k):
                it = super().batches(*a, **k)
                inner = it.__class__

                class DyingIterator(inner):
                    def __next__(self):
                        st = self.get_state()
                        if (st["epoch"], st["next_batch"]) == tuple(die_at):
                            os._exit(3)
                        return super().__next__()
                it.__class__ = DyingIterator
                return it
        stream = Dying(train.source, train.num_classes, train.transform)

    ck = Checkpointer(ckpt_dir) if ckpt_dir else None
    state, tvars = replicate(state, mesh), replicate(tvars, mesh)
    if ck is not None:
        restored = ck.restore_latest(state)
        if restored is not None:
            state = restored[1]
    epoch = distributed.stream_epoch_runner(d, stream, GLOBAL_BATCH, mesh, checkpointer=ck,
                                            checkpoint_every_steps=2 if ck else 0)
    rows = []
    start = int(distributed.to_host(state.epoch))
    for e in range(start, EPOCHS):
        state, terms = epoch(state, tvars)
        metrics = distributed.evaluate_stream(d, state, test, GLOBAL_BATCH, mesh,
                                              teacher=(d.teacher, tvars))
        rows.append({"epoch": e + 1, "train": terms, "test": metrics})
        if ck is not None:
            ck.save((e + 1) * (N_TRAIN // GLOBAL_BATCH), state, {"epoch_end": e + 1})
    return distributed.to_host(state.params), starts, rows


def flat(tree):
    import jax
    return np.concatenate([np.ravel(np.asarray(a, np.float64))
                           for a in jax.tree_util.tree_leaves(tree)])
