"""How fast the command line answers: --help, a bad command line, list, status, and features with the hub offline.

Prints a Markdown table of the median wall time over ``--repeat`` runs of each command, each a fresh
``pipeline`` process (imports included, as a user waits for them). The stores live in a temporary folder
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


def pipeline(repo: Path, env: dict[str, str], *args: str) -> tuple[float, int]:
    """Wall seconds and exit status of ``pipeline --catalog <repo>/catalog.yaml ARGS`` in a fresh process."""
    command = [sys.executable, "-c", "from pipeline.cli import main; main()", "--catalog", str(repo / "catalog.yaml")]
    start = time.perf_counter()
    result = subprocess.run([*command, *args], capture_output=True, env={**env, "PYTHONPATH": str(repo)}, cwd=repo)
    return time.perf_counter() - start, result.returncode


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
        _, status = pipeline(
            args.repo, env, "-q", "run", "--stage", "download", "--stage", "normalize", "--dataset", "demo"
        )
        if status:
            raise SystemExit("could not normalise the demo dataset")
        print(f"| command ({args.repo}) | median s | exit status |\n|---|---:|---:|")
        for label, command in COMMANDS.items():
            runs = [pipeline(args.repo, env, *command) for _ in range(args.repeat)]
            print(f"| `{label}` | {statistics.median(t for t, _ in runs):.2f} | {runs[-1][1]} |")


if __name__ == "__main__":
    main()
