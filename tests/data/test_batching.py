"""Host batching: sharding over 8 fake devices, order, padding/dropping, coverage."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax.data import ArrayDataset, batches, num_batches


def _ds(n=37):
    x = np.arange(n * 6, dtype=np.float32).reshape(n, 3, 2)
    return ArrayDataset(x=x, y=np.arange(n) % 5, num_classes=5, name="toy", split="train",
                        extras={"env": (np.arange(n) % 3).astype(np.int32)})


def _indices(it):
    return [np.asarray(b["index"])[np.asarray(b["mask"]) > 0] for b in it]


def test_padded_epoch_sees_every_example_once_and_masks_padding():
    ds = _ds(37)
    out = list(batches(ds, 8, seed=0, shuffle=True, drop_remainder=False))
    assert len(out) == num_batches(37, 8, drop_remainder=False) == 5
    seen = np.concatenate(_indices(out))
    np.testing.assert_array_equal(np.sort(seen), np.arange(37))
    last = out[-1]
    np.testing.assert_array_equal(np.asarray(last["mask"]), [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(last["x"])[5:], 0.0)
    for b in out:  # every real row is the dataset row it claims to be
        idx, m = np.asarray(b["index"]), np.asarray(b["mask"]) > 0
        np.testing.assert_array_equal(np.asarray(b["x"])[m], ds.x[idx[m]])
        np.testing.assert_array_equal(np.asarray(b["y"])[m], ds.y[idx[m]])
        np.testing.assert_array_equal(np.asarray(b["env"])[m], ds.extras["env"][idx[m]])
        assert b["x"].shape == (8, 3, 2) and b["mask"].dtype == np.float32


def test_drop_remainder_drops_only_the_partial_batch():
    out = list(batches(_ds(37), 8, seed=3, drop_remainder=True))
    assert len(out) == 4
    seen = np.concatenate(_indices(out))
    assert len(seen) == 32 and len(set(seen.tolist())) == 32
    assert all(np.asarray(b["mask"]).min() == 1 for b in out)


def test_defaults_drop_when_shuffling_and_pad_in_dataset_order_otherwise():
    assert len(list(batches(_ds(37), 8, seed=0))) == 4
    evald = list(batches(_ds(37), 8, shuffle=False))
    np.testing.assert_array_equal(np.concatenate(_indices(evald)), np.arange(37))


def test_order_is_deterministic_from_seed_and_epoch():
    ds = _ds(37)
    a = np.concatenate(_indices(batches(ds, 8, seed=5, drop_remainder=False)))
    b = np.concatenate(_indices(batches(ds, 8, seed=5, drop_remainder=False)))
    c = np.concatenate(_indices(batches(ds, 8, seed=6, drop_remainder=False)))
    d = np.concatenate(_indices(batches(ds, 8, seed=5, epoch=1, drop_remainder=False)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    np.testing.assert_array_equal(a, np.random.default_rng([5, 0]).permutation(37))


def test_sharded_batches_over_eight_devices(n_devices):
    mesh = jax.make_mesh((n_devices,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    out = list(batches(_ds(37), 16, seed=0, drop_remainder=False, sharding=sharding))
    for b in out:
        for key, arr in b.items():
            assert arr.sharding == sharding, key
            shards = arr.addressable_shards
            assert len(shards) == n_devices
            assert {s.data.shape[0] for s in shards} == {16 // n_devices}
    np.testing.assert_array_equal(
        np.sort(np.concatenate(_indices(out))), np.arange(37))


def test_errors(n_devices):
    mesh = jax.make_mesh((n_devices,), ("data",))
    with pytest.raises(ValueError, match="divisible by the 8 shards"):
        next(batches(_ds(), 12, sharding=NamedSharding(mesh, P("data"))))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        next(batches(_ds(), 0))
    with pytest.raises(TypeError, match="ds must be an ArrayDataset"):
        next(batches({"x": 1}, 4))
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        next(batches(_ds(), 4, seed=-1))
