"""Results people can trust: run metadata on every row, atomic files, mean +- std tables.

Every row written by a driver carries :func:`run_metadata` (git revision, jax version,
device kind and count, process count) plus the driver's own config, seed and global
batch size. Files are written atomically (temp file + ``os.replace``), so a kill during
writing leaves the previous file intact.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np

__all__ = ["run_metadata", "atomic_write_text", "append_jsonl", "read_jsonl",
           "summarize", "markdown_table", "mean_std", "paired_ci95"]


def run_metadata() -> dict[str, Any]:
    """Git revision (``+dirty`` when the tree has changes), versions, devices."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10).stdout
        rev = (rev + ("+dirty" if dirty.strip() else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        rev = "unknown"
    dev = jax.devices()[0]
    return {"git_revision": rev, "jax_version": jax.__version__,
            "device_kind": dev.device_kind, "platform": dev.platform,
            "device_count": jax.device_count(), "process_count": jax.process_count()}


def atomic_write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` via a temp file in the same directory + rename."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_figure(fig, path: str, dpi: int = 120) -> None:
    """Lays out and writes a matplotlib figure to ``path`` (PNG) atomically (temp file in
    the same directory + rename), then closes it."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, ".tmp_" + os.path.basename(path))
    fig.tight_layout()
    fig.savefig(tmp, dpi=dpi, format="png")
    os.replace(tmp, path)
    import matplotlib.pyplot as plt   # lazy: kdjax itself does not need matplotlib

    plt.close(fig)


def read_jsonl(path: str) -> list[dict]:
    """Rows of a JSON-lines file ([] if missing); a torn last line is ignored."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


def append_jsonl(path: str, rows: Iterable[Mapping[str, Any]]) -> None:
    """Appends rows by atomically rewriting the file (old rows + new rows)."""
    old = read_jsonl(path)
    text = "".join(json.dumps(r, default=_json_default) + "\n" for r in [*old, *rows])
    atomic_write_text(path, text)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return str(o)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], float)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def paired_ci95(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired seeds and its 95% t-interval ``(mean, lo, hi)``."""
    from scipy import stats

    d = np.asarray(a, float) - np.asarray(b, float)
    if d.size < 2:
        return float(d.mean()) if d.size else float("nan"), float("nan"), float("nan")
    half = stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def summarize(rows: Sequence[Mapping[str, Any]], group_by: Sequence[str],
              metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Groups rows and gives ``mean``/``std``/``n`` of each metric per group."""
    groups: dict[tuple, list] = defaultdict(list)
    for r in rows:
        groups[tuple(r.get(k) for k in group_by)].append(r)
    out = []
    for key, rs in groups.items():
        entry = dict(zip(group_by, key))
        entry["n"] = len(rs)
        for m in metrics:
            mu, sd = mean_std([r.get(m, float("nan")) for r in rs])
            entry[m] = mu
            entry[m + "_std"] = sd
        out.append(entry)
    return out


def markdown_table(summary: Sequence[Mapping[str, Any]], keys: Sequence[str],
                   metrics: Sequence[str], *, percent: bool = True) -> str:
    """``| key... | metric (mean +- std) ... | n |`` from :func:`summarize` output."""
    head = "| " + " | ".join([*keys, *metrics, "n"]) + " |"
    sep = "|" + "|".join(["---"] * (len(keys) + len(metrics) + 1)) + "|"
    lines = [head, sep]
    scale = 100.0 if percent else 1.0
    for s in summary:
        cells = [str(s[k]) for k in keys]
        for m in metrics:
            cells.append(f"{scale * s[m]:.2f} +- {scale * s[m + '_std']:.2f}")
        cells.append(str(s["n"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
