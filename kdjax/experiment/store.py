"""A results store you can trust: JSON-lines rows keyed by (cell key, seed).

Writing (:meth:`Store.append`): under an exclusive ``fcntl.flock`` on ``<file>.lock``
the file is re-read, rows already present (same ``cell_key``, ``seed`` and
``code_state``) are dropped, and the new rows are appended with one ``write`` + ``fsync``.
Two processes writing one output directory therefore never interleave lines or write a
row twice. If the file does not end with a newline (a crash while appending), a newline
is written first, so the torn fragment stays a line of its own. Nothing is ever
removed from the file.

Reading (:meth:`Store.read`) never fails on a bad line and never rewrites the file:

- a duplicated row (same ``cell_key``, ``seed`` and ``code_state``) is counted once;
- a truncated last line (no newline at the end: a crash while appending), a line that
  is not JSON or not an object, and a line that is not UTF-8 are skipped;

each with a :class:`ResultsWarning` that names the file and line number. The messages
are also kept in :attr:`Store.problems` for the report.

Non-finite numbers are never written: a row with NaN/inf values is stored with ``null``
in their place and the field names under ``"nonfinite"`` (with a warning).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import warnings
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

__all__ = ["Store", "ResultsWarning", "row_id", "to_json"]


class ResultsWarning(UserWarning):
    """Something in a results file was skipped or counted once (file and line named)."""


def row_id(row: Mapping[str, Any]) -> tuple:
    """``(cell_key, seed, code_state)``: rows with equal ids are duplicates."""
    return row.get("cell_key"), row.get("seed"), row.get("code_state")


def _plain(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return str(o)


def _finite(o: Any, path: str, bad: list[str]) -> Any:
    if isinstance(o, (np.floating, np.integer, np.ndarray)):
        o = _plain(o)
    if isinstance(o, float) and not math.isfinite(o):
        bad.append(path)
        return None
    if isinstance(o, dict):
        return {k: _finite(v, f"{path}.{k}" if path else str(k), bad) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v, f"{path}[{i}]", bad) for i, v in enumerate(o)]
    return o


def to_json(row: Mapping[str, Any]) -> str:
    """One JSON line (no NaN/inf: they become ``null`` and are listed in ``nonfinite``)."""
    bad: list[str] = []
    clean = _finite(dict(row), "", bad)
    if bad:
        clean["nonfinite"] = bad
        warnings.warn(f"row (cell {row.get('cell_key')}, seed {row.get('seed')}) has "
                      f"non-finite values in {bad}; stored as null.", ResultsWarning,
                      stacklevel=3)
    return json.dumps(clean, default=_plain, allow_nan=False, ensure_ascii=False)


class Store:
    """The rows of one JSON-lines file (see the module docstring)."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.problems: list[str] = []

    def __repr__(self) -> str:
        return f"Store({self.path!r})"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock of the store across processes (``flock`` on ``<file>.lock``)."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _warn(self, msg: str) -> None:
        self.problems.append(msg)
        warnings.warn(msg, ResultsWarning, stacklevel=3)

    def _parse(self, report: bool) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")
        torn = not data.endswith(b"\n")      # the last piece has no newline
        rows = []
        warn = self._warn if report else (lambda m: None)
        for i, raw in enumerate(lines, 1):
            last = i == len(lines)
            if not raw.strip():
                continue
            where = f"{self.path}, line {i}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                warn(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column "
                     f"{e.start + 1}); line skipped (it stays in the file).")
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                if last and torn:
                    warn(f"{where}: truncated last line (a crash while appending?); "
                         "skipped (it stays in the file).")
                else:
                    warn(f"{where}: not JSON ({e.msg}); line skipped (it stays in the "
                         "file).")
                continue
            if not isinstance(row, dict):
                warn(f"{where}: a JSON {type(row).__name__}, not a row object; skipped.")
                continue
            rows.append(row)
        return rows

    def read(self, *, report: bool = True) -> list[dict]:
        """The file's rows (``[]`` if it does not exist), bad lines skipped and each
        duplicated row counted once, with a :class:`ResultsWarning` per problem."""
        self.problems = []
        rows, seen, dups = [], set(), {}
        for r in self._parse(report):
            rid = row_id(r)
            if rid[0] is not None and rid in seen:
                dups[rid] = dups.get(rid, 1) + 1
                continue
            seen.add(rid)
            rows.append(r)
        if dups and report:
            n = sum(dups.values()) - len(dups)
            self._warn(f"{self.path}: {n} duplicated row(s) of {len(dups)} (cell, seed) "
                       f"key(s) counted once (e.g. cell {next(iter(dups))[0]} seed "
                       f"{next(iter(dups))[1]}).")
        return rows

    def append(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Appends the rows not in the file yet (by :func:`row_id`), under the lock.
        Returns the number of rows written."""
        rows = list(rows)
        if not rows:
            return 0
        with self.lock():
            have = {row_id(r) for r in self._parse(report=False)}
            new = []
            for r in rows:
                rid = row_id(r)
                if rid[0] is not None and rid in have:
                    continue
                have.add(rid)
                new.append(to_json(r) + "\n")
            if not new:
                return 0
            blob = "".join(new).encode("utf-8")
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
            try:
                size = os.fstat(fd).st_size
                if size:
                    with open(self.path, "rb") as f:
                        f.seek(size - 1)
                        if f.read(1) != b"\n":
                            blob = b"\n" + blob
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            return len(new)
