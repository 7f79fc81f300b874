"""The package's structure as written in docs/concepts.md ("Layers"): imports only flow downward, the math
imports nothing outside the math, and no function of the training plumbing outgrows a screen. Read from the
source (every import, the ones inside functions too), so a new module or import is checked as it lands."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dibregman

ROOT = Path(dibregman.__file__).parent

# from the bottom up; a module may import from its own rank or below
LAYERS: list[tuple[str, set[str]]] = [
    ("base", {"io", "integrity", "safe_pickle", "dist", "plugins", "assets", "run_folder"}),
    # math: torch only, no I/O; registry (a pure name table) is there so the divergences may keep one
    ("math", {"registry", "schedules", "precond", "divergences", "ratio", "losses", "sampling"}),
    ("models", {"nets", "teachers", "generator", "text", "pipeline", "lora"}),
    ("data and measures", {"data", "grids", "stats", "metrics"}),
    ("artefacts", {"artifacts"}),
    ("training", {"train"}),
    ("products", {"report", "export", "tiny"}),
    ("api", {"api", ""}),  # "": the package's __init__, which re-exports the API
    ("entry", {"cli", "__main__"}),
]
RANK = {top: rank for rank, (_, tops) in enumerate(LAYERS) for top in tops}
MATH = LAYERS[1][1]


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(name: str) -> bool:
    path = ROOT.joinpath(*name.split(".")) if name else ROOT
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path, module: str | None = None) -> set[str]:
    """The package modules ``path`` (the module ``module``, by default where it lies) imports, as dotted names
    relative to the package ('' is the package)."""
    module = _module(path) if module is None else module
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.removeprefix("dibregman").lstrip(".") for a in node.names
                      if a.name.split(".")[0] == "dibregman"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif (node.module or "").split(".")[0] == "dibregman":
                target = node.module.removeprefix("dibregman").lstrip(".")
            else:
                continue
            # `from .. import dist` imports the module dist, not the package
            subs = {f"{target}.{a.name}".lstrip(".") for a in node.names}
            found |= {s for s in subs if _exists(s)} or {target}
    return found - {module}


def _rank(name: str) -> int:
    top = name.split(".")[0]
    assert top in RANK, f"dibregman.{name} is in no layer: add it to LAYERS here and to docs/concepts.md"
    return RANK[top]


SOURCES = sorted(ROOT.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_downward(path):
    module = _module(path)
    up = sorted(dep for dep in _imports(path) if _rank(dep) > _rank(module))
    assert not up, (f"dibregman.{module} ({LAYERS[_rank(module)][0]}) imports up the layers: "
                    + ", ".join(f"{d} ({LAYERS[_rank(d)][0]})" for d in up))
    if module.split(".")[0] in MATH:  # torch only: no I/O, no models
        outside = sorted(dep for dep in _imports(path) if dep.split(".")[0] not in MATH)
        assert not outside, f"dibregman.{module} is math and imports {outside}"


def test_the_layer_check_sees_imports_inside_functions(tmp_path):
    # the checker itself: a lazy import up the layers (the kind this test exists to catch) is found
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\n\ndef f():\n    from ..train.checkpoint import entry\n    from .. import dist\n"
                     "    import dibregman.api\n")
    found = _imports(probe, "teachers.probe")
    assert found == {"train.checkpoint", "dist", "api"}
    assert sorted(d for d in found if _rank(d) > _rank("teachers.probe")) == ["api", "train.checkpoint"]


def _long_functions(folder: Path, limit: int) -> list[str]:
    out = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return out


def test_no_function_of_the_training_plumbing_is_over_80_lines():
    assert not _long_functions(ROOT / "train", 80)


def test_the_distillation_step_reads_like_the_algorithm_box():
    from dibregman.train.step import distill_step

    tree = ast.parse(Path(distill_step.__code__.co_filename).read_text())
    (node,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "distill_step"]
    assert node.end_lineno - node.lineno + 1 <= 60
