"""Layers point one way: ``pipeline`` knows nothing of ``stages``; download and datasets share no code; the
science imports no I/O frameworks. Every module is parsed with ``ast``, imports inside functions included."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from tests.catalogs import write_demo_catalog

REPO = Path(__file__).resolve().parents[1]
IO_FRAMEWORKS = {"dask", "distributed", "zarr", "pandas", "pyarrow", "click", "fsspec", "yaml"}

# Pure science: tensors in, tensors out. Each stage's thin entry (stage.py, and the match stage's driver side
# plan.py) is where I/O is composed, settings.py turns catalog entries into the solvers' keyword arguments, and
# tss_kit.py finds the TSS kit's files of a run. summary.py averages frames of scores: pandas, and nothing else.
SCIENCE = sorted(
    p
    for folder in ("stages/match", "stages/evaluate")
    for p in (REPO / folder).glob("*.py")
    if p.name not in {"stage.py", "plan.py", "settings.py", "tss_kit.py"}
) + [REPO / "stages/features/canvas.py"]
ALLOWED_FRAMEWORKS = {"summary.py": {"pandas"}}
PIPELINE = sorted((REPO / "pipeline").rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` may import, anywhere in it: ``import a.b`` -> ``a.b``; ``from a import b`` -> ``a``
    and ``a.b``; relative imports resolved against ``path``'s package."""
    package = list(path.relative_to(REPO).parent.parts)
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", SCIENCE, ids=lambda p: str(p.relative_to(REPO)))
def test_science_imports_no_io_framework_and_no_pipeline_plumbing(path):
    imports = imported_modules(path)
    allowed = ALLOWED_FRAMEWORKS.get(path.name, set())
    frameworks = {name for name in imports if name.split(".")[0] in IO_FRAMEWORKS - allowed}
    plumbing = {name for name in imports if name.split(".")[0] == "pipeline" and not name.startswith("pipeline.errors")}
    assert not frameworks, f"{path.name} imports {frameworks}"
    assert not plumbing, f"{path.name} imports {plumbing}"


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def stage_module_paths(path: Path) -> set[str]:
    """String constants in ``path`` that name a stages module (``"stages.x"``, ``"stages.x:attr"``)."""
    return {
        node.value
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.startswith(("stages.", "stages:"))
    }


@pytest.mark.parametrize("path", PIPELINE, ids=_rel)
def test_pipeline_imports_nothing_from_stages(path):
    """Stages reach the pipeline through its registry; the pipeline never names a stage module, not even lazily."""
    bad = {name for name in imported_modules(path) if name == "stages" or name.startswith("stages.")}
    assert not bad, f"{path.name} imports {bad}"
    assert not stage_module_paths(path), f"{path.name} names stage modules {stage_module_paths(path)}"


@pytest.mark.parametrize(
    ("folder", "other"), [("stages/download", "stages.datasets"), ("stages/datasets", "stages.download")]
)
def test_download_and_datasets_do_not_import_each_other(folder, other):
    for path in sorted((REPO / folder).glob("*.py")):
        bad = {name for name in imported_modules(path) if name == other or name.startswith(other + ".")}
        assert not bad, f"{_rel(path)} imports {bad}"


def test_the_checks_see_every_import():
    """The parser finds imports inside functions and ``from a import b`` as ``a.b`` candidates alike."""
    assert "stages.report.stage" in imported_modules(REPO / "stages/commands.py")
    assert {"pipeline.registry", "pipeline.cache"} <= imported_modules(REPO / "stages/download/stage.py")


def _modules_after(code: str) -> set[str]:
    """The top-level packages imported by a fresh interpreter after running ``code`` in the repository."""
    probe = f"import sys\n{code}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    return set(done.stdout.split())


@pytest.mark.slow
def test_the_command_line_and_status_import_no_torch(tmp_path):
    """``pipeline --help`` and ``pipeline status`` of a matched run (every stage's status reads its tables,
    the match stage's its ledger and parts) import neither torch, pandas nor matplotlib: they answer at once."""
    catalog = write_demo_catalog(tmp_path, n_pairs=2, matchers={"nn": {"method": "nn"}})
    matched = CliRunner().invoke(cli, ["--catalog", str(catalog), "-q", "run", "--stage", "download", "--stage",
                                       "normalize", "--stage", "features", "--stage", "match"])  # fmt: skip
    assert matched.exit_code == 0, matched.output
    status = (
        "from click.testing import CliRunner\nfrom pipeline.cli import cli\n"
        f"result = CliRunner().invoke(cli, ['--catalog', {str(catalog)!r}, 'status'])\n"
        "assert result.exit_code == 0 and 'match      done' in result.output, result.output"
    )
    for code in ("from pipeline.cli import cli", status):
        heavy = _modules_after(code) & {"torch", "pandas", "matplotlib", "distributed"}
        assert not heavy, f"{code.splitlines()[-1]} imports {heavy}"
