"""The README's Python examples work as written: every import they make, and the matcher library's example
end to end (it needs no data)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_the_readme_has_its_examples():
    assert len(PYTHON_BLOCKS) >= 4
    assert any("from stages.match" in block for block in PYTHON_BLOCKS)


def test_every_import_in_the_readme_examples_works(tmp_path):
    imports = [line for block in PYTHON_BLOCKS for line in block.splitlines() if re.match(r"(from \S+ )?import ", line)]
    done = subprocess.run([sys.executable, "-c", "\n".join(imports)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def test_the_matcher_library_example_runs(tmp_path):
    """The example that solves random features: its two printed arrays are finite (x, y) rows, two per call."""
    (example,) = [block for block in PYTHON_BLOCKS if "from stages.match" in block]
    done = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    numbers = [float(n) for n in re.findall(r"-?\d+\.\d*(?:e[-+]?\d+)?", done.stdout)]
    assert len(numbers) == 8 and all(abs(n) < 1e4 for n in numbers), done.stdout
