"""kdjax.train.cache: one pytree cache keyed by config hash. Corrupt entries (truncated
_METADATA, garbled OCDBT data, truncated meta json) are set aside and rebuilt, nothing
non-finite is cached, unwritable directories fail fast naming the path."""

import json
import os

import numpy as np
import pytest

from kdjax.train import cache
from kdjax.train.checkpoint import save_pytree


def _tree(v=1.0):
    return {"params": {"w": np.full((3, 4), v, np.float32),
                       "b": np.linspace(0, 1, 4).astype(np.float32) * v}}


class Builder:
    """A build function that counts its calls and records its checkpoint directory."""

    def __init__(self, tree):
        self.tree, self.calls, self.dirs = tree, 0, []

    def __call__(self, ckpt_dir):
        self.calls += 1
        self.dirs.append(ckpt_dir)
        os.makedirs(ckpt_dir, exist_ok=True)     # what a Checkpointer would do
        return self.tree, {"note": "built"}


def _assert_tree_equal(a, b):
    np.testing.assert_array_equal(a["params"]["w"], b["params"]["w"])
    np.testing.assert_array_equal(a["params"]["b"], b["params"]["b"])


def test_build_once_then_load(tmp_path):
    b = Builder(_tree(2.0))
    t1, m1 = cache.get_or_build(str(tmp_path), "teacher_abc", _tree(0), b, what="t")
    t2, m2 = cache.get_or_build(str(tmp_path), "teacher_abc", _tree(0), b, what="t")
    assert b.calls == 1 and m1["cached"] is False and m2["cached"] is True
    assert m2["note"] == "built" and "git_revision" in m2
    _assert_tree_equal(t2, _tree(2.0))
    # the build's checkpoint directory is removed once the entry is committed
    assert b.dirs == [cache.checkpoint_dir(str(tmp_path), "teacher_abc")]
    assert not os.path.exists(b.dirs[0])
    assert sorted(os.listdir(tmp_path)) == ["teacher_abc", "teacher_abc_meta.json"]


def test_layout_of_earlier_revisions_still_loads(tmp_path):
    """An entry written as the old get_teacher did (save_pytree + <name>_meta.json)."""
    save_pytree(str(tmp_path / "teacher_old"), _tree(3.0))
    (tmp_path / "teacher_old_meta.json").write_text(json.dumps({"key": "old"}))
    tree, meta = cache.load(str(tmp_path), "teacher_old", _tree(0))
    assert meta == {"key": "old"}
    _assert_tree_equal(tree, _tree(3.0))


def _truncate_metadata(tree_dir, meta_path):
    p = os.path.join(tree_dir, "_METADATA")
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.truncate(size // 2)


def _garble_ocdbt(tree_dir, meta_path):
    n = 0
    for root, _, files in os.walk(tree_dir):
        if os.path.basename(root) != "d" and "ocdbt" not in root:
            continue
        for name in files:
            p = os.path.join(root, name)
            size = os.path.getsize(p)
            with open(p, "r+b") as f:
                f.seek(size // 3)
                f.write(bytes(range(256))[: max(1, size // 3)])
            n += 1
    assert n, "no OCDBT data files found to garble"


def _truncate_meta_json(tree_dir, meta_path):
    with open(meta_path, "r+b") as f:
        f.truncate(os.path.getsize(meta_path) // 2)


def _non_utf8_meta(tree_dir, meta_path):
    with open(meta_path, "wb") as f:
        f.write(b'{"key": "\xff\xfe"}')


@pytest.mark.parametrize("damage", [_truncate_metadata, _garble_ocdbt, _truncate_meta_json,
                                    _non_utf8_meta])
def test_corrupt_entry_is_set_aside_and_rebuilt(tmp_path, damage):
    d = str(tmp_path)
    cache.get_or_build(d, "teacher_k", _tree(0), Builder(_tree(1.0)), what="t")
    tree_dir, meta_path = cache.entry_paths(d, "teacher_k")
    damage(tree_dir, meta_path)
    b = Builder(_tree(5.0))
    with pytest.warns(cache.CacheWarning, match=r"cache entry .*teacher_k is unreadable.*"
                                                r"set aside .*teacher_k\.corrupt-1"):
        tree, meta = cache.get_or_build(d, "teacher_k", _tree(0), b, what="t")
    assert b.calls == 1 and meta["cached"] is False
    _assert_tree_equal(tree, _tree(5.0))
    assert sorted(os.listdir(d)) == ["teacher_k", "teacher_k.corrupt-1", "teacher_k_meta.json",
                                     "teacher_k_meta.json.corrupt-1"]
    # the rebuilt entry is a normal hit afterwards
    again, meta = cache.get_or_build(d, "teacher_k", _tree(0), b, what="t")
    assert b.calls == 1 and meta["cached"] is True
    _assert_tree_equal(again, _tree(5.0))


def test_entry_that_no_longer_fits_the_template_is_rebuilt(tmp_path):
    d = str(tmp_path)
    cache.get_or_build(d, "e", _tree(0), Builder(_tree(1.0)), what="t")
    wider = {"params": {"w": np.zeros((3, 5), np.float32), "b": np.zeros(4, np.float32)}}
    with pytest.warns(cache.CacheWarning, match="unreadable"):
        assert cache.load(d, "e", wider) is None


def test_non_finite_result_is_never_cached(tmp_path):
    d = str(tmp_path)
    bad = _tree(1.0)
    bad["params"]["w"][1, 2] = np.nan
    bad["params"]["b"][0] = np.inf
    with pytest.raises(cache.NonFiniteError,
                       match=r"teacher xyz \(lr=1e6\): refusing to cache a non-finite .*"
                             r"\['params'\]\['b'\]"):
        cache.get_or_build(d, "teacher_xyz", _tree(0), Builder(bad), what="teacher xyz (lr=1e6)")
    assert not os.path.exists(cache.entry_paths(d, "teacher_xyz")[1])
    assert cache.nonfinite_leaves(bad) == [("['params']['b']", 1), ("['params']['w']", 1)]
    assert cache.nonfinite_leaves(_tree(1.0)) == []


def test_diverged_entry_cached_by_older_code_is_set_aside(tmp_path):
    bad = _tree(1.0)
    bad["params"]["w"][:] = np.nan
    save_pytree(str(tmp_path / "teacher_nan"), bad)
    (tmp_path / "teacher_nan_meta.json").write_text("{}")
    with pytest.warns(cache.CacheWarning, match=r"non-finite"):
        assert cache.load(str(tmp_path), "teacher_nan", _tree(0)) is None
    assert (tmp_path / "teacher_nan.corrupt-1").is_dir()


def test_unwritable_directory_fails_fast_naming_the_path(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    target = str(blocker / "cache")
    with pytest.raises(cache.NotWritableError, match=r"a_file/cache.*cannot be created"):
        cache.ensure_writable(target)
    b = Builder(_tree(1.0))
    with pytest.raises(cache.NotWritableError, match=r"a_file/cache"):
        cache.get_or_build(target, "teacher_k", _tree(0), b, what="t")
    assert b.calls == 0            # failed before any work
    with pytest.raises(cache.NotWritableError, match=r"is not a directory"):
        cache.ensure_writable(str(blocker))


def test_full_disk_is_reported_before_the_build(tmp_path):
    free = __import__("shutil").disk_usage(tmp_path).free
    b = Builder(_tree(1.0))
    with pytest.raises(cache.NotWritableError, match=rf"{tmp_path}.* bytes free, "
                                                     rf"{2 * free + 1} needed"):
        cache.get_or_build(str(tmp_path), "t", _tree(0), b, what="t", need_bytes=2 * free + 1)
    assert b.calls == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_fails_fast(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        with pytest.raises(cache.NotWritableError, match=r"ro.* not writable"):
            cache.ensure_writable(str(d))
    finally:
        d.chmod(0o755)
