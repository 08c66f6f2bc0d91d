"""docs/guide/losses.md: its ```python blocks run, in order, in one namespace."""

import pathlib
import re

import pytest

GUIDE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "guide" / "losses.md"


def _blocks():
    return re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)


def test_guide_has_code():
    assert len(_blocks()) >= 5


@pytest.mark.slow
def test_guide_code_blocks_run(n_devices):
    namespace = {"__name__": "guide"}
    for i, code in enumerate(_blocks()):
        try:
            exec(compile(code, f"{GUIDE.name}[block {i}]", "exec"), namespace)
        except Exception as err:  # pragma: no cover - the message is the point
            raise AssertionError(f"block {i} of {GUIDE} failed: {err!r}\n{code}") from err
