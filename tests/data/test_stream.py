"""Streaming input (grain over random-access sources) against the in-memory path."""

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from kdjax import methods, models
from kdjax.data import ArrayDataset, batches, load
from kdjax.data.stream import (Stream, StreamIterator, array_transform,
                               from_array_dataset, image_transform, materialize)
from kdjax.train import Checkpointer, Distiller, make_mesh, make_optimizer
from kdjax.train import distributed


def _ds(n=53, seed=0):
    rng = np.random.default_rng(seed)
    return ArrayDataset(x=rng.normal(size=(n, 4, 4, 1)).astype(np.float32),
                        y=rng.integers(0, 3, n).astype(np.int32), num_classes=3,
                        name="toy", split="train", extras={"env": rng.integers(0, 2, n)})


def _assert_same_batches(mem, streamed):
    assert len(mem) == len(streamed)
    for a, b in zip(mem, streamed):
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), b[k], err_msg=k)


@pytest.mark.parametrize("shuffle", [True, False])
def test_stream_equals_in_memory_batches(shuffle):
    ds = _ds()
    mem = list(batches(ds, 8, seed=3, epoch=2, shuffle=shuffle))
    got = list(from_array_dataset(ds).batches(8, seed=3, epoch=2, shuffle=shuffle))
    _assert_same_batches(mem, got)
    # padded last batch when evaluating: 53 = 6 * 8 + 5
    if not shuffle:
        assert got[-1]["mask"].tolist() == [1] * 5 + [0] * 3


def test_stream_over_a_tfds_data_source_equals_load():
    # mock mnist through tfds.data_source (array_record path), vs kdjax.data.load
    with tfds.testing.mock_data(num_examples=40):
        mem = load("mnist", "train", normalize=False)
        src = tfds.data_source("mnist", split="train")
        stream = Stream(src, 10, array_transform("image", "label"))
        got = list(stream.batches(16, seed=1, epoch=0))
    _assert_same_batches(list(batches(mem, 16, seed=1, epoch=0)), got)


def test_process_rows_partition_each_global_batch():
    ds, s = _ds(), None
    s = from_array_dataset(ds)
    whole = list(s.batches(8, seed=5, epoch=1))
    parts = [list(s.batches(8, seed=5, epoch=1, rows=slice(lo, lo + 4))) for lo in (0, 4)]
    for w, a, b in zip(whole, *parts):
        for k in w:
            np.testing.assert_array_equal(w[k], np.concatenate([a[k], b[k]]))


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_mid_epoch_gives_the_remaining_examples(workers):
    s = from_array_dataset(_ds(), num_workers=workers)
    full = list(s.batches(8, seed=2, epoch=4))
    it = s.batches(8, seed=2, epoch=4)
    for _ in range(2):
        next(it)
    state = it.get_state()
    assert state["next_batch"] == 2
    rest = list(s.restore(state))
    assert len(rest) == len(full) - 2
    for a, b in zip(full[2:], rest):
        np.testing.assert_array_equal(a["index"], b["index"])
        np.testing.assert_array_equal(a["x"], b["x"])
    # the epoch's examples are each seen once, and the order changes with the epoch
    seen = np.concatenate([b["index"] for b in full])
    assert len(set(seen.tolist())) == len(seen) == 48
    other = np.concatenate([b["index"] for b in s.batches(8, seed=2, epoch=5)])
    assert not np.array_equal(seen, other)


class _Images:
    """uint8 images of varying size, encoded as JPEG bytes for half of them."""

    def __init__(self, n=12):
        self.rng = np.random.default_rng(0)
        self.items = [self.rng.integers(0, 256, (30 + 3 * i, 40 - i, 3), dtype=np.uint8)
                      for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        img = self.items[i]
        if i % 2:
            import io

            from PIL import Image
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG")
            img = buf.getvalue()
        return {"image": img, "label": i % 3}


def test_image_transform_shapes_determinism_and_normalisation():
    s = Stream(_Images(), 3, image_transform(size=16, train=True))
    a = list(s.batches(4, seed=0, epoch=0))
    b = list(s.batches(4, seed=0, epoch=0))
    c = list(s.batches(4, seed=0, epoch=1))
    assert a[0]["x"].shape == (4, 16, 16, 3) and a[0]["x"].dtype == np.float32
    np.testing.assert_array_equal(a[0]["x"], b[0]["x"])          # (seed, epoch) fixed
    order_a = np.concatenate([x["index"] for x in a])
    order_c = np.concatenate([x["index"] for x in c])
    assert not np.array_equal(order_a, order_c)
    # eval transform: centre crop of a constant image is that constant, normalised
    class Const:
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"image": np.full((20, 30, 3), 255, np.uint8), "label": 0}

    x = Stream(Const(), 2, image_transform(size=8)).example()["x"]
    np.testing.assert_allclose(x[..., 0], (1 - 0.485) / 0.229, rtol=1e-5)


def test_materialize_reads_the_stream_in_record_order():
    ds = _ds(20)
    back = materialize(from_array_dataset(ds), batch_size=6)
    np.testing.assert_array_equal(back.x, ds.x)
    np.testing.assert_array_equal(back.extras["env"], ds.extras["env"])


def test_bad_arguments_are_named():
    s = from_array_dataset(_ds())
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        s.batches(0)
    with pytest.raises(ValueError, match="rows must be a contiguous slice"):
        s.batches(8, rows=slice(4, 12))
    with pytest.raises(ValueError, match=r"order must be a 1-D array of record indices"):
        s.batches(8, order=np.array([0, 99]))
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        Stream(s.source, 0)


# ------------------------------------------------------- the engine fed by a stream
def _problem():
    ds = _ds(64, seed=1)
    student = models.create("cnn2d", 3, channels=(4,), use_bn=True)
    teacher = models.create("mlp", 3, hidden=(8,))
    tx = make_optimizer({"name": "sgd", "learning_rate": 0.1, "schedule": "constant"},
                        total_steps=8, steps_per_epoch=4)
    d = Distiller(student, (methods.build({"name": "ce", "weight": 0.5}),
                            methods.build({"name": "kd", "weight": 0.5})), tx,
                  teacher=teacher, epoch_mode="loop")
    tvars = teacher.init(jax.random.PRNGKey(1), ds.x[:2])
    return ds, d, tvars


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree_util.tree_leaves(tree)])


@pytest.mark.parametrize("devices", [1, 8])
def test_stream_epochs_equal_in_memory_epochs(devices):
    ds, d, tvars = _problem()
    mesh = make_mesh(devices)
    mem_epoch = d.epoch_runner(16, ds.x, mesh)
    run = distributed.stream_epoch_runner(d, from_array_dataset(ds), 16, mesh)
    data = jax.device_put({"x": ds.x, "y": ds.y}, distributed.replicate(0, mesh).sharding)
    s1 = s2 = None
    for e in range(2):
        s1, t1 = mem_epoch(s1 if s1 is not None else d.init(0, ds.x[:2], tvars), tvars, data)
        s2, t2 = run(s2 if s2 is not None else d.init(0, ds.x[:2], tvars), tvars)
        np.testing.assert_allclose(float(t1["total"]), t2["total"], rtol=1e-6)
    np.testing.assert_allclose(_flat(s1.params), _flat(s2.params), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(_flat(s1.batch_stats), _flat(s2.batch_stats), rtol=1e-6,
                               atol=1e-7)
    assert int(s2.epoch) == 2
    assert not np.allclose(_flat(s2.params), _flat(d.init(0, ds.x[:2], tvars).params))


def test_killed_mid_epoch_resumes_at_the_same_example(tmp_path):
    ds, d, tvars = _problem()
    stream = from_array_dataset(ds)
    ref = distributed.stream_epoch_runner(d, stream, 16)
    s_ref, t_ref = ref(d.init(0, ds.x[:2], tvars), tvars)

    class Killed(Exception):
        pass

    class DyingIterator(StreamIterator):   # dies before the 4th of 4 batches
        def __next__(self):
            if self.get_state()["next_batch"] == 3:
                raise Killed
            return super().__next__()

    class Dying(Stream):
        def batches(self, *a, **k):
            it = super().batches(*a, **k)
            it.__class__ = DyingIterator
            return it

    dying = Dying(stream.source, 3, stream.transform)
    ck = Checkpointer(str(tmp_path / "stream"))
    run = distributed.stream_epoch_runner(d, dying, 16, checkpointer=ck,
                                          checkpoint_every_steps=1)
    with pytest.raises(Killed):
        run(d.init(0, ds.x[:2], tvars), tvars)
    assert ck.steps()[-1] == 3      # saved after steps 1, 2, 3 (the newest two kept)
    # a restarted run resumes after step 3 (the fresh state is only a template)
    starts = []

    class Recording(Stream):
        def batches(self, *a, **k):
            starts.append(k.get("start_batch", 0))
            return super().batches(*a, **k)

    run = distributed.stream_epoch_runner(d, Recording(stream.source, 3, stream.transform),
                                          16, checkpointer=ck, checkpoint_every_steps=1)
    s, t = run(d.init(0, ds.x[:2], tvars), tvars)
    assert starts == [3]
    np.testing.assert_allclose(_flat(s.params), _flat(s_ref.params), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(t["total"], t_ref["total"], rtol=1e-6)


def test_evaluate_stream_equals_in_memory_evaluate():
    from kdjax.train.engine import evaluate

    ds, d, tvars = _problem()
    state = d.init(0, ds.x[:2], tvars)
    mesh = make_mesh(8)
    got = distributed.evaluate_stream(d, state, from_array_dataset(ds), 24, mesh)
    ref = evaluate(d.predict(state, ds.x, 24), ds.y)
    for k in ("accuracy", "loss", "ece"):
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-7)


def test_fit_takes_a_stream_with_the_same_numbers():
    from kdjax.train import EvalSet, Evaluation, fit

    ds, d, tvars = _problem()
    mesh = make_mesh(8)
    ev = Evaluation({"val": EvalSet(x=ds.x[:24], y=ds.y[:24])})
    runs = []
    for train_data in ({"x": ds.x, "y": ds.y}, from_array_dataset(ds)):
        res = fit(d, d.init(0, ds.x[:2], tvars), tvars, train_data, epochs=2,
                  batch_size=16, mesh=mesh, evaluation=ev, progress=False)
        runs.append(res)
    mem, streamed = runs
    np.testing.assert_allclose(_flat(streamed.state.params), _flat(mem.state.params),
                               rtol=1e-6, atol=1e-7)
    assert [r["epoch"] for r in streamed.history] == [1, 2]
    for a, b in zip(mem.history, streamed.history):
        np.testing.assert_allclose(b["val"]["loss"], a["val"]["loss"], rtol=1e-6)
        np.testing.assert_allclose(b["train"]["total"], a["train"]["total"], rtol=1e-6)
