"""get_teacher's augmentation option: applied in training, part of the cache key,
bad names rejected before any training."""

import numpy as np
import pytest

from kdjax.train.teacher import get_teacher


def _data(n=128, seed=0):
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, 8, 8, 1)).astype(np.float32)
    y = (x[:, :, :4].mean((1, 2, 3)) > x[:, :, 4:].mean((1, 2, 3))).astype(np.int32)
    return {"x": x, "y": y}


def _cfg(**extra):
    return {"model": "cnn2d", "model_kwargs": {"channels": (4,)}, "epochs": 2,
            "batch_size": 32, "seed": 0,
            "optimizer": {"name": "sgd", "learning_rate": 0.1, "schedule": "constant"},
            **extra}


def _flat(variables):
    import jax
    return np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(variables)])


def test_teacher_augmentation_is_applied_and_keyed(tmp_path):
    train, val = _data(), _data(64, seed=1)
    args = ({"dataset": "toy"}, train, val, 2)
    cache = str(tmp_path / "cache")
    _, plain, m0 = get_teacher(_cfg(), *args, cache_dir=cache, progress=False)
    _, flipped, m1 = get_teacher(_cfg(augment="flip"), *args, cache_dir=cache, progress=False)
    # trained apart (different cache keys), and the flips changed what was learnt
    assert m0["key"] != m1["key"] and not m1["cached"]
    assert not np.allclose(_flat(plain), _flat(flipped))
    # a second call loads the augmented teacher from the cache
    _, again, m2 = get_teacher(_cfg(augment="flip"), *args, cache_dir=cache, progress=False)
    assert m2["cached"] and np.array_equal(_flat(again), _flat(flipped))


def test_teacher_bad_augmentation_is_rejected(tmp_path):
    args = ({"dataset": "toy"}, _data(), _data(64, seed=1), 2)
    with pytest.raises(ValueError, match=r"teacher config 'augment'.*crop_flip"):
        get_teacher(_cfg(augment="rotate"), *args, cache_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match=r"invalid options \['sigma'\]"):
        get_teacher(_cfg(augment="gaussian_noise", augment_kwargs={"sigma": 0.1}), *args,
                    cache_dir=str(tmp_path), progress=False)


# --- the cache key and the teacher objective (algorithm) ---------------------------------

def test_cross_entropy_teacher_keys_are_those_of_earlier_revisions(tmp_path):
    from kdjax._io import config_hash
    import os
    train, val = _data(), _data(64, seed=1)
    cache = str(tmp_path / "cache")
    _, v0, m0 = get_teacher(_cfg(), {"dataset": "toy"}, train, val, 2, cache_dir=cache,
                            progress=False)
    # the key of the old get_teacher: config_hash(teacher config, data config, classes)
    assert m0["key"] == config_hash(_cfg(), {"dataset": "toy"}, 2)
    assert os.path.isdir(os.path.join(cache, f"teacher_{m0['key']}"))
    # plain CE spelled out, with its default options, is the same teacher
    _, v1, m1 = get_teacher(_cfg(), {"dataset": "toy"}, train, val, 2, cache_dir=cache,
                            progress=False,
                            algorithm={"name": "ce", "weight": 1.0, "label_smoothing": 0.0})
    assert m1["cached"] and m1["key"] == m0["key"] and "algorithm" not in m1
    assert np.array_equal(_flat(v0), _flat(v1))


def test_teacher_algorithm_is_keyed_and_reads_partition_arrays(tmp_path):
    train, val = _data(), _data(64, seed=1)
    # an environment per example: the first half of the rows is env 0
    train = {**train, "env": (np.arange(len(train["x"])) >= 64).astype(np.int32)}
    cache = str(tmp_path / "cache")
    algo = {"name": "groupdro", "partition": "env", "num_partitions": 2, "eta": 0.5}
    _, ce, m0 = get_teacher(_cfg(), {"dataset": "toy"}, train, val, 2, cache_dir=cache,
                            progress=False)
    _, dro, m1 = get_teacher(_cfg(), {"dataset": "toy"}, train, val, 2, cache_dir=cache,
                             progress=False, algorithm=algo)
    assert m1["key"] != m0["key"] and not m1["cached"]
    assert m1["algorithm"]["name"] == "groupdro" and m1["algorithm"]["eta"] == 0.5
    assert not np.allclose(_flat(ce), _flat(dro))      # a different objective was trained
    _, again, m2 = get_teacher(_cfg(), {"dataset": "toy"}, train, val, 2, cache_dir=cache,
                               progress=False, algorithm=algo)
    assert m2["cached"] and np.array_equal(_flat(again), _flat(dro))
    # without the partition array: refused before training, naming the key
    no_env = {k: v for k, v in train.items() if k != "env"}
    with pytest.raises(ValueError, match=r"teacher\.algorithm 'groupdro' reads "
                                         r"batch\['env'\].*train has only \['x', 'y'\]"):
        get_teacher(_cfg(), {"dataset": "toy"}, no_env, val, 2, cache_dir=cache,
                    progress=False, algorithm=algo)
    with pytest.raises(ValueError, match=r"teacher\.algorithm: unknown method 'irm'"):
        get_teacher(_cfg(), {"dataset": "toy"}, train, val, 2, cache_dir=cache,
                    progress=False, algorithm={"name": "irm"})
