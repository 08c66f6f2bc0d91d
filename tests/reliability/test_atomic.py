"""Atomic results: a kill during a write leaves the old file; torn JSONL lines are ignored."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from kdjax.train.results import append_jsonl, atomic_write_text, read_jsonl

_WRITER = textwrap.dedent("""
    import sys, time
    import kdjax.train.results as r

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
        tmp = [f for f in os.listdir(tmp_path) if f.startswith(".tmp_")]
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


def test_append_jsonl_ignores_a_torn_last_line(tmp_path):
    path = str(tmp_path / "rows.jsonl")
    append_jsonl(path, [{"seed": 0, "acc": 0.5}, {"seed": 1, "acc": 0.6}])
    with open(path, "a") as f:               # a writer killed mid-line (non-atomic append)
        f.write('{"seed": 2, "acc": 0.')
    assert read_jsonl(path) == [{"seed": 0, "acc": 0.5}, {"seed": 1, "acc": 0.6}]
    append_jsonl(path, [{"seed": 3, "acc": 0.7}])
    rows = read_jsonl(path)
    assert rows == [{"seed": 0, "acc": 0.5}, {"seed": 1, "acc": 0.6}, {"seed": 3, "acc": 0.7}]
    # the rewrite dropped the torn fragment: every line of the file parses
    with open(path) as f:
        assert all(json.loads(line) for line in f if line.strip())
