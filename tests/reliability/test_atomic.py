"""Atomic files (kdjax._io): a kill during a write leaves the old file; no temp file is left
after a failure; the umask decides the mode; torn JSONL lines are reported, skipped, kept."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from kdjax._io import atomic_save_npy, atomic_write_bytes, atomic_write_text
from kdjax.experiment import ResultsWarning, Store

_WRITER = textwrap.dedent("""
    import sys, time
    import kdjax._io as r

    path, marker = sys.argv[1], sys.argv[2]
    real_write = r.os.fdopen

    class SlowFile:
        # wraps the temp file: announce that writing started, then write slowly
        def __init__(self, f):
            self.f = f
        def write(self, text):
            chunk = 1 << 16
            for i in range(0, len(text), chunk):
                self.f.write(text[i:i + chunk])
                self.f.flush()
                if i == 0:
                    open(marker, "w").close()
                time.sleep(0.01)
        def __getattr__(self, name):
            return getattr(self.f, name)
        def __enter__(self):
            return self
        def __exit__(self, *a):
            return self.f.__exit__(*a)

    r.os.fdopen = lambda *a, **k: SlowFile(real_write(*a, **k))
    r.atomic_write_text(path, "NEW" * (20 * 1024 * 1024))   # 60 MB, slowly
    print("finished")
""")


def test_sigkill_during_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "results.json"
    old = json.dumps({"rows": list(range(100))})
    atomic_write_text(str(path), old)
    marker = tmp_path / "started"
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(marker)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(6000):             # wait (up to ~10 min) until writing is under way
            if marker.exists() or p.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.exists(), p.communicate()[1][-2000:]
        # a partial temp file exists next to the target: the write really is in progress
        tmp = [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
        assert tmp and os.path.getsize(tmp_path / tmp[0]) > 0
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -signal.SIGKILL
    assert path.read_text() == old          # the old content survives, untouched
    # the leftover temp file never replaces the target and is ignored by readers
    assert json.loads(path.read_text())["rows"][-1] == 99


def test_atomic_write_replaces_the_file_when_it_completes(tmp_path):
    path = tmp_path / "a" / "b.txt"
    atomic_write_text(str(path), "one")
    atomic_write_text(str(path), "two")
    assert path.read_text() == "two"
    assert [f for f in os.listdir(path.parent)] == ["b.txt"]


def test_store_skips_a_torn_last_line_and_keeps_it(tmp_path):
    store = Store(str(tmp_path / "rows.jsonl"))
    path = store.path
    store.append([{"seed": 0, "acc": 0.5}, {"seed": 1, "acc": 0.6}])
    with open(path, "a") as f:               # a writer killed mid-line (non-atomic append)
        f.write('{"seed": 2, "acc": 0.')
    with pytest.warns(ResultsWarning, match="line 3: truncated last line"):
        assert store.read() == [{"seed": 0, "acc": 0.5}, {"seed": 1, "acc": 0.6}]
    store.append([{"seed": 3, "acc": 0.7}])
    with pytest.warns(ResultsWarning, match="line 3: not JSON"):
        rows = store.read()
    assert rows == [{"seed": 0, "acc": 0.5}, {"seed": 1, "acc": 0.6}, {"seed": 3, "acc": 0.7}]
    # nothing was deleted from disk: the torn fragment is still its own line
    lines = open(path).read().splitlines()
    assert lines[2] == '{"seed": 2, "acc": 0.' and len(lines) == 4


@pytest.mark.parametrize("write", ["text", "bytes", "npy"])
def test_a_failed_write_leaves_no_temp_file_and_the_old_content(tmp_path, write, monkeypatch):
    path = tmp_path / "f.bin"
    atomic_write_bytes(str(path), b"old")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    import kdjax._io as io_mod
    monkeypatch.setattr(io_mod.os, "fsync", boom)
    with pytest.raises(OSError, match="No space"):
        {"text": lambda: atomic_write_text(str(path), "new"),
         "bytes": lambda: atomic_write_bytes(str(path), b"new"),
         "npy": lambda: atomic_save_npy(str(path), np.arange(3))}[write]()
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_files_get_the_umask_mode_and_npy_roundtrips(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(str(tmp_path / "a.txt"), "x")
        atomic_save_npy(str(tmp_path / "a.npy"), np.arange(4.0))
    finally:
        os.umask(old)
    for f in ("a.txt", "a.npy"):
        assert os.stat(tmp_path / f).st_mode & 0o777 == 0o640   # 0o666 & ~0o027
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.arange(4.0))
    with pytest.raises(ValueError, match="text must be a str"):
        atomic_write_text(str(tmp_path / "b.txt"), b"bytes")
