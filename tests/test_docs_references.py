"""Docstrings cite the math reference by section (``docs/METHODS.md section N``): every
cited file exists in the repository and every cited section is a heading there."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_cited_methods_section_exists():
    text = (ROOT / "docs" / "METHODS.md").read_text()
    headings = set(re.findall(r"^## (\d+)\. ", text, flags=re.M))
    cited = {}
    for path in (ROOT / "kdjax").rglob("*.py"):
        src = path.read_text()
        assert not re.search(r"(?<!docs/)METHODS\.md", src), (
            f"{path.relative_to(ROOT)} cites METHODS.md outside docs/")
        for n in re.findall(r"docs/METHODS\.md section (\d+)", src):
            cited.setdefault(n, []).append(str(path.relative_to(ROOT)))
    assert cited, "no docstring cites docs/METHODS.md: the test checks nothing"
    missing = {n: f for n, f in cited.items() if n not in headings}
    assert not missing, f"sections cited but not in docs/METHODS.md: {missing}"
