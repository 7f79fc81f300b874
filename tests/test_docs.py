"""The docs agree with the code.

Fast checks: every ``--option`` a page names exists (in the CLI, a benchmark script, or a few outside tools
the pages call), every preset, teacher spec, data set, divergence and repository file it names exists, and
every option of ``distill``/``train-teacher``/``demo --help`` is documented in docs/usage.md.

Slow: every ```python block of README.md and docs/*.md runs as written, each in a fresh namespace inside
its own temporary working directory (the ``runs/...`` folders the examples write land there). Blocks that
must not run are fenced as ```text (or ```bash for shell commands). The README's example alone distills
for 300 steps.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.usefixtures("one_thread")]

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


@pytest.mark.slow
def test_the_docs_have_examples():
    names = {block_id.split(":")[0] for block_id, _ in BLOCKS}
    assert "README.md" in names
    assert {"docs/usage.md", "docs/divergences.md", "docs/teachers.md"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("source", [src for _, src in BLOCKS], ids=[block_id for block_id, _ in BLOCKS])
def test_python_block_runs(source, tmp_path, monkeypatch, request):
    if "fashion-mnist" in source:  # the shipped teachers' reference images are Fashion-MNIST's test split
        from dibregman.data.images import load_images

        try:
            load_images("fashion-mnist:test")
        except FileNotFoundError as e:
            pytest.skip(f"needs Fashion-MNIST: {e}")
    monkeypatch.chdir(tmp_path)
    exec(compile(source, request.node.callspec.id, "exec"), {"__name__": "__doc_example__"})



# ------------------------------------------------------------------------- names the pages use must exist
PAGES = {path.relative_to(ROOT).as_posix(): path.read_text() for path in DOCS}
# flags of the outside tools the pages call (pip, pytest, torchrun, apt-get, tar, hf)
OUTSIDE_FLAGS = {"--standalone", "--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port",
                 "--local-dir", "--include", "--help", "--strict-markers", "--no-docs",
                 "--arch", "--precond",  # EDM's own train.py
                 "--option"}  # --option=VALUE: the form of any option


def _subparsers() -> dict[str, Any]:
    from dibregman.cli import build_parser

    return next(a for a in build_parser()._actions if a.dest == "command").choices


def _cli_flags() -> set[str]:
    return {flag for sub in _subparsers().values() for a in sub._actions for flag in a.option_strings}


def _benchmark_flags() -> set[str]:
    return {m for f in (ROOT / "benchmarks").glob("*.py") for m in re.findall(r"add_argument\(\s*\"(--[\w-]+)",
                                                                                 f.read_text())}


def _prose(text: str) -> str:
    """The text without fenced blocks of other languages' output (```text blocks hold printed tables)."""
    return re.sub(r"^```text\n.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def test_every_option_a_page_names_exists():
    known = _cli_flags() | _benchmark_flags() | OUTSIDE_FLAGS
    bad = {(page, flag) for page, text in PAGES.items()
           for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", _prose(text)) if flag not in known}
    assert not bad, sorted(bad)


def test_every_preset_a_page_names_exists():
    from dibregman.train.config import PRESETS

    names = {n for kind in PRESETS.values() for n in kind}
    bad = {(page, m) for page, text in PAGES.items() for m in re.findall(r"--preset[ =]([a-z][\w-]*)", text)
           if m not in names}
    bad |= {(page, m) for page, text in PAGES.items() for m in re.findall(r"preset[=(]\s*[\"']([\w-]+)", text)
            if m not in names}
    assert not bad, sorted(bad)
    usage = PAGES["docs/usage.md"]
    table = usage[usage.index("## Presets"):usage.index("## Config files")]
    listed = set(re.findall(r"`([\w-]+)`", table))
    for kind, presets in PRESETS.items():
        assert set(presets) <= listed, f"{kind} presets missing from docs/usage.md: {set(presets) - listed}"


def test_every_spec_a_page_names_exists():
    from dibregman.assets import shipped_names
    from dibregman.data.images import IMAGE_SOURCES
    from dibregman.data.toy2d import TOY_SETS
    from dibregman.teachers.gmm import BUILTINS
    from dibregman.train.config import divergence_from_spec

    bad = set()
    for page, text in PAGES.items():
        for name in re.findall(r"gmm:([\w]+)\b(?![./])", text):
            if name not in BUILTINS:
                bad.add((page, f"gmm:{name}"))
        for name in re.findall(r"net:([\w-]+)\b(?![./-])", text):
            if name not in shipped_names("teacher"):
                bad.add((page, f"net:{name}"))
        for name in re.findall(r"--data[ =]([a-z][\w-]*)\b(?![./:])", text):
            if name not in TOY_SETS and name not in IMAGE_SOURCES:
                bad.add((page, f"--data {name}"))
        for spec in re.findall(r"--(?:divergence|critic-loss)[ =]([a-z][\w.:]*)", text):
            if not spec.startswith("py:"):
                try:
                    divergence_from_spec(spec)
                except ValueError:
                    bad.add((page, f"divergence {spec}"))
        for spec in re.findall(r"--divergences[ =]([\w.:,]+)", text):
            for one in spec.split(","):
                try:
                    divergence_from_spec(one)
                except ValueError:
                    bad.add((page, f"divergence {one}"))
    assert not bad, sorted(bad)


def test_every_repository_file_a_page_names_exists():
    bad = set()
    for page, text in PAGES.items():
        here = (ROOT / page).parent
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in link and not (here / link).exists():
                bad.add((page, link))
        for path in re.findall(r"`((?:src|docs|tests|benchmarks)/[\w./-]+)`", text):
            if not (ROOT / path).exists():
                bad.add((page, path))
        for name in re.findall(r"\b([A-Z]+\.md)\b", text):
            if not any((d / name).exists() for d in (ROOT, ROOT / "docs")):
                bad.add((page, name))
    assert not bad, sorted(bad)


def test_no_internal_words_on_the_pages():
    words = ("issue target", "previous session", "this session", "lent to", "the method spec", "METHOD.md")
    bad = {(page, w) for page, text in PAGES.items() for w in words if w in " ".join(text.split())}
    assert not bad, sorted(bad)


@pytest.mark.parametrize("command", ["distill", "train-teacher", "demo"])
def test_every_help_option_is_in_usage(command):
    """A config field is documented as a row of the options tables; any other flag by its name."""
    usage = PAGES["docs/usage.md"]
    rows = set(re.findall(r"^\| `(\w+)` \|", usage, flags=re.MULTILINE))
    missing = []
    for action in _subparsers()[command]._actions:
        if not action.option_strings or action.dest == "help":
            continue
        flag = action.option_strings[0]
        if flag[2:].replace("-", "_") == action.dest and action.dest in rows:
            continue
        if not any(f in usage for f in action.option_strings):
            missing.append(flag)
    assert not missing, f"{command}: options missing from docs/usage.md: {missing}"


def test_the_resumable_options_in_usage_are_the_codes():
    from dibregman.train.config import RESUMABLE

    text = (ROOT / "docs" / "usage.md").read_text()
    block = text.split("(`RESUMABLE` in `train/config.py`):", 1)[1].split("\n\n", 2)[1]
    assert {w.strip(",") for w in block.split()} == set(RESUMABLE)
