"""Checkpointer fallback past corrupted steps, with real truncated / garbled files:
the bad step is moved aside under a fresh name, the newest readable step is restored,
and later saves of the bad step's number succeed (issue 20, problem 1)."""

import os
import warnings

import numpy as np
import pytest

from kdjax.train.checkpoint import Checkpointer, move_aside


def _tree(v):
    return {"w": np.full((4, 3), v, np.float32), "b": np.arange(3, dtype=np.int32) + int(v)}


def _truncate_step(directory, step):
    """Truncates every file of one step to 0 bytes (what a cut copy leaves)."""
    n = 0
    for root, _, files in os.walk(os.path.join(directory, str(step))):
        for f in files:
            with open(os.path.join(root, f), "r+b") as fh:
                fh.truncate(0)
            n += 1
    assert n > 0


def _garble_step(directory, step):
    """Overwrites the middle of every data file with bytes (bit rot), sizes unchanged."""
    for root, _, files in os.walk(os.path.join(directory, str(step))):
        for f in files:
            p = os.path.join(root, f)
            size = os.path.getsize(p)
            if size > 8:
                with open(p, "r+b") as fh:
                    fh.seek(size // 2)
                    fh.write(b"\xff" * min(64, size - size // 2))


def _save_steps(directory, steps, keep=3):
    ck = Checkpointer(str(directory), max_to_keep=keep)
    for s in steps:
        ck.save(s, _tree(s), {"step": s})
    return ck


def test_move_aside_never_reuses_a_name(tmp_path):
    p = tmp_path / "thing"
    names = []
    for i in range(3):
        p.write_text(str(i))
        names.append(move_aside(str(p)))
    assert [os.path.basename(n) for n in names] == [
        "thing.corrupt-1", "thing.corrupt-2", "thing.corrupt-3"]
    assert [open(n).read() for n in names] == ["0", "1", "2"]
    assert not p.exists()


@pytest.mark.parametrize("damage", [_truncate_step, _garble_step])
def test_corrupt_latest_step_is_moved_aside_and_resaved(tmp_path, damage):
    d = tmp_path / "ck"
    _save_steps(d, [1, 2, 3, 4])
    damage(str(d), 4)
    ck = Checkpointer(str(d), max_to_keep=3)
    with pytest.warns(UserWarning, match=r"checkpoint step 4 .* unreadable.*moved .*/4 "
                                         r"aside to .*/4\.corrupt-1"):
        step, tree, meta = ck.restore_latest(_tree(0))
    assert step == 3 and meta == {"step": 3}
    np.testing.assert_array_equal(tree["w"], _tree(3)["w"])
    assert ck.steps() == [2, 3]
    assert sorted(os.listdir(d)) == ["2", "3", "4.corrupt-1"]
    # the step number is free again: saving it works (it raised StepAlreadyExistsError)
    ck.save(4, _tree(40), {"step": 40})
    step, tree, meta = Checkpointer(str(d)).restore_latest(_tree(0))
    assert step == 4 and meta == {"step": 40}
    np.testing.assert_array_equal(tree["b"], _tree(40)["b"])


def test_repeated_corruption_of_the_same_step_keeps_every_set_aside(tmp_path):
    d = tmp_path / "ck"
    ck = _save_steps(d, [1, 2])
    for expected in ("2.corrupt-1", "2.corrupt-2"):
        _truncate_step(str(d), 2)
        with pytest.warns(UserWarning, match=expected):
            step, _, _ = Checkpointer(str(d)).restore_latest(_tree(0))
        assert step == 1
        ck = Checkpointer(str(d))
        ck.save(2, _tree(2), {"step": 2})
    assert sorted(os.listdir(d)) == ["1", "2", "2.corrupt-1", "2.corrupt-2"]


def test_all_steps_corrupt_restarts_from_scratch_and_saves_again(tmp_path):
    d = tmp_path / "ck"
    _save_steps(d, [1, 2], keep=2)
    for s in (1, 2):
        _truncate_step(str(d), s)
    ck = Checkpointer(str(d), max_to_keep=2)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert ck.restore_latest(_tree(0)) is None
    assert sum("unreadable" in str(x.message) for x in w) == 2
    # a fresh run saves steps 1 and 2 again (it crashed at step 2 before)
    for s in (1, 2):
        ck.save(s, _tree(s + 10), {"step": s})
    step, tree, _ = Checkpointer(str(d)).restore_latest(_tree(0))
    assert step == 2
    np.testing.assert_array_equal(tree["w"], _tree(12)["w"])
    assert sorted(os.listdir(d)) == ["1", "1.corrupt-1", "2", "2.corrupt-1"]


def test_truncated_meta_json_alone_makes_a_step_unreadable(tmp_path):
    d = tmp_path / "ck"
    _save_steps(d, [1, 2])
    meta_files = [os.path.join(r, f) for r, _, fs in os.walk(d / "2" / "meta") for f in fs]
    assert meta_files
    for p in meta_files:
        with open(p, "r+b") as fh:
            fh.truncate(max(os.path.getsize(p) // 2, 1))
    with pytest.warns(UserWarning, match=r"step 2"):
        step, _, meta = Checkpointer(str(d)).restore_latest(_tree(0))
    assert step == 1 and meta == {"step": 1}


def test_unwritable_checkpoint_directory_fails_at_construction(tmp_path):
    from kdjax.train.checkpoint import NotWritableError
    (tmp_path / "f").write_text("")
    with pytest.raises(NotWritableError, match=r"f/ck.*cannot be created"):
        Checkpointer(str(tmp_path / "f" / "ck"))
