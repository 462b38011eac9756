"""How fast the command line answers: --help, a bad command line, list, status, and features with the hub offline.

Prints a Markdown table of the median wall time over ``--repeat`` runs of each command, each a fresh
``pipeline`` process (imports included, as a user waits for them), and its median CPU time (user + system),
which a loaded machine inflates far less than the wall time. The stores live in a temporary folder
with the demo dataset normalised; the features run uses the shipped catalog's default backbone (hub
weights) with an empty Hugging Face cache and a hub address that refuses connections, so it must fail at
once with the one-line error, before any cluster starts. Targets (issue 9): --help, status and a bad
command line under 1 s; the offline features error under 5 s. Times depend on the machine's load: compare
commits side by side (``--repo`` another checkout).

Usage: python benchmarks/cli_latency.py [--repeat 3] [--repo PATH]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {
    "--help": ["--help"],
    "bad command line": ["run", "--stage", "nope"],
    "list backbones": ["list", "backbones"],
    "status --dataset demo": ["status", "--dataset", "demo"],
    "features, hub offline": ["-q", "run", "--stage", "features", "--dataset", "demo"],
}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pipeline(repo: Path, env: dict[str, str], *args: str) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and exit status of ``pipeline --catalog <repo>/catalog.yaml ARGS`` in a fresh
    process."""
    command = [sys.executable, "-c", "from pipeline.cli import main; main()", "--catalog", str(repo / "catalog.yaml")]
    cpu, start = _children_cpu(), time.perf_counter()
    result = subprocess.run([*command, *args], capture_output=True, env={**env, "PYTHONPATH": str(repo)}, cwd=repo)
    return time.perf_counter() - start, _children_cpu() - cpu, result.returncode


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose command line to time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        env = {
            **os.environ,
            "PIPELINE_DATA_ROOT": f"{folder}/data",
            "PIPELINE_CACHE_ROOT": f"{folder}/cache",
            "PIPELINE_OUTPUTS": f"{folder}/outputs",
            "HF_HOME": f"{folder}/hf",
            "HF_HUB_OFFLINE": "0",
            "HF_ENDPOINT": "http://127.0.0.1:9",  # a hub that refuses connections: a machine offline
        }
        *_, status = pipeline(
            args.repo, env, "-q", "run", "--stage", "download", "--stage", "normalize", "--dataset", "demo"
        )
        if status:
            raise SystemExit("could not normalise the demo dataset")
        print(f"| command ({args.repo}) | median wall s | median CPU s | exit status |\n|---|---:|---:|---:|")
        for label, command in COMMANDS.items():
            runs = [pipeline(args.repo, env, *command) for _ in range(args.repeat)]
            wall, cpu = (statistics.median(run[index] for run in runs) for index in (0, 1))
            print(f"| `{label}` | {wall:.2f} | {cpu:.2f} | {runs[-1][2]} |")


if __name__ == "__main__":
    main()
