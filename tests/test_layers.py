"""Layers point one way: the science imports no I/O frameworks, and the stores know nothing of matching."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IO_FRAMEWORKS = {"dask", "distributed", "zarr", "pandas", "pyarrow", "click", "fsspec", "yaml"}

# Pure science: tensors in, tensors out. Each stage's thin entry (stage.py) is where I/O is composed, and
# settings.py turns catalog entries into the solvers' keyword arguments.
SCIENCE = sorted(
    p
    for folder in ("stages/match", "stages/evaluate")
    for p in (REPO / folder).glob("*.py")
    if p.name not in {"stage.py", "settings.py"}
) + [REPO / "stages/features/canvas.py"]
# Pipeline plumbing that must not depend on what the matchers or the evaluation do.
PLUMBING = [p for p in (REPO / "pipeline").glob("*.py") if p.name not in {"runner.py", "cli.py"}]


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (``a.b.c`` -> ``a.b.c``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", SCIENCE, ids=lambda p: str(p.relative_to(REPO)))
def test_science_imports_no_io_framework_and_no_pipeline_plumbing(path):
    imports = imported_modules(path)
    frameworks = {name for name in imports if name.split(".")[0] in IO_FRAMEWORKS}
    plumbing = {name for name in imports if name.startswith("pipeline") and name != "pipeline.errors"}
    assert not frameworks, f"{path.name} imports {frameworks}"
    assert not plumbing, f"{path.name} imports {plumbing}"


@pytest.mark.parametrize("path", PLUMBING, ids=lambda p: str(p.relative_to(REPO)))
def test_plumbing_knows_nothing_of_matching_or_evaluation(path):
    bad = {n for n in imported_modules(path) if n.startswith(("stages.match", "stages.evaluate", "stages.report"))}
    assert not bad, f"{path.name} imports {bad}"
