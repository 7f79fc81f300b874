"""Every ```python block of README.md and docs/*.md runs as written.

Each block runs in a fresh namespace inside its own temporary working directory, so the ``runs/...``
folders the examples write land in a temporary folder. Blocks that must not run are fenced as
```text (or ```bash for shell commands). Slow: the README's example alone distills for 300 steps.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# An opening fence naming python (```python, ```py), its body, and the closing fence at the same indent.
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?:python|py)[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.MULTILINE | re.DOTALL)


def python_blocks() -> list[tuple[str, str]]:
    """``(id, source)`` for every python block; the id is ``file:line`` of the opening fence."""
    blocks = []
    for path in DOCS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            indent = m.group("indent")
            body = "".join(ln[len(indent):] if ln.startswith(indent) else ln
                           for ln in m.group("body").splitlines(keepends=True))
            blocks.append((f"{path.relative_to(ROOT).as_posix()}:{line}", body))
    return blocks


BLOCKS = python_blocks()


def test_the_docs_have_examples():
    names = {block_id.split(":")[0] for block_id, _ in BLOCKS}
    assert "README.md" in names
    assert {"docs/usage.md", "docs/divergences.md", "docs/teachers.md"} <= names


@pytest.mark.parametrize("source", [src for _, src in BLOCKS], ids=[block_id for block_id, _ in BLOCKS])
def test_python_block_runs(source, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    exec(compile(source, request.node.callspec.id, "exec"), {"__name__": "__doc_example__"})
