"""The code blocks of docs/guide/faithful.md run, in order, in one namespace."""

import os
import re

GUIDE = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "guide", "faithful.md")


def test_faithful_guide_code_blocks_run():
    text = open(GUIDE).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 5
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{GUIDE}:block{i}", "exec"), namespace)  # noqa: S102
    assert "convert_element_type" in namespace["message"]
