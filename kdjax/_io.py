"""Files people can trust: one atomic writer, stable config hashes, run metadata.

Atomic writes: the content goes to a temp file with a unique name
(``.<name>.<random>.tmp``) in the target's directory, is flushed and ``fsync``-ed, and
is renamed over the target (``os.replace``, atomic on POSIX); the directory is then
``fsync``-ed. A kill at any point leaves either the old file or the new one, never a
mix. On an exception the temp file is removed (no leftovers). The file is created with
``os.open(..., 0o666)``, so its mode comes from the umask, as with a plain ``open()``
(``tempfile.mkstemp`` would give 0600).

:func:`config_hash` is the one hash of configs used to key cached teachers, checkpoints
and result rows. :func:`run_metadata` is what every result row records about the run
(git revision with ``+dirty``, the state of the code, versions, devices).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import secrets
import subprocess
from typing import Any, Callable

import numpy as np

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_bytes", "atomic_save_npy",
           "config_hash", "git_revision", "code_state", "run_metadata"]

# The parts of the tree whose changes can change a result (see :func:`code_state`).
CODE_PATHS = ("kdjax", "experiments")


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[Any], None], *, binary: bool = False) -> None:
    """Calls ``write(f)`` on a fresh temp file beside ``path``, then renames it over
    ``path``. The parent directory is created if missing. Nothing is left behind when
    ``write`` (or the disk) fails; the exception propagates."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else
                                                       {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(d)


def atomic_write_text(path: str, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}.")
    atomic_write(path, lambda f: f.write(text))


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"data must be bytes, got {type(data).__name__}.")
    atomic_write(path, lambda f: f.write(data), binary=True)


def atomic_save_npy(path: str, array) -> None:
    """``np.save`` to ``path`` (no ``.npy`` is appended) atomically."""
    arr = np.asarray(array)
    atomic_write(path, lambda f: np.save(f, arr, allow_pickle=False), binary=True)


def _plain(c):
    return c.to_dict() if hasattr(c, "to_dict") else c


def config_hash(*configs: Any, length: int = 16) -> str:
    """Stable hash of configs (dicts / ConfigDicts / JSON-able values): sha256 of their
    JSON with sorted keys (non-JSON values through ``str``), first ``length`` hex digits.
    Tuples and lists hash alike, so a config read back from a JSON row hashes as the
    original."""
    blob = json.dumps([_plain(c) for c in configs], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def _git(*args: str) -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        p = subprocess.run(["git", *args], cwd=here, capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.decode("utf-8", "replace") if p.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def _revision_and_state() -> tuple[str, str]:
    rev = (_git("rev-parse", "--short", "HEAD") or "").strip()
    if not rev:
        return "unknown", "unknown"
    dirty = (_git("status", "--porcelain", "--untracked-files=no") or "").strip()
    revision = rev + ("+dirty" if dirty else "")
    top = (_git("rev-parse", "--show-toplevel") or "").strip()
    paths = [p for p in CODE_PATHS if top and os.path.isdir(os.path.join(top, p))]
    diff = _git("-C", top, "diff", "HEAD", "--binary", "--", *paths) if paths else ""
    state = rev if not diff else f"{rev}+{hashlib.sha256(diff.encode()).hexdigest()[:12]}"
    return revision, state


def git_revision() -> str:
    """Short git revision of the checkout, ``+dirty`` when tracked files changed
    (``"unknown"`` outside a git checkout). Computed once per process: the code a
    process runs is the code it imported."""
    return _revision_and_state()[0]


def code_state() -> str:
    """The revision plus a hash of the uncommitted changes under :data:`CODE_PATHS`
    (``"<rev>"`` when those are clean, ``"<rev>+<12 hex>"`` otherwise): two runs with
    the same code state ran the same code. Once per process, like :func:`git_revision`."""
    return _revision_and_state()[1]


def run_metadata() -> dict[str, Any]:
    """Git revision (``+dirty`` when the tree has changes), code state, versions,
    devices: what every result row records."""
    import jax

    dev = jax.devices()[0]
    return {"git_revision": git_revision(), "code_state": code_state(),
            "jax_version": jax.__version__, "device_kind": dev.device_kind,
            "platform": dev.platform, "device_count": jax.device_count(),
            "process_count": jax.process_count()}
