"""Profile one GWOT solve: seconds per pair at 1 and 2 torch threads, and the operators that take the time.

Runs the solver on the synthetic warped-field features of :mod:`benchmarks.matcher` (real DAISY features
behave alike: every outer step runs), each thread count in its own subprocess, best of ``--repeats`` after
a warm-up, then prints ``torch.profiler``'s table of the most expensive operators for one solve at one
thread. Pass solver keywords as JSON to compare paths side by side, e.g.
``--options '{"coarse_to_fine": false}'``. Run it on two commits to compare before and after.

Usage (from the repository root): python -m benchmarks.profile_gwot [--grid 60] [--repeats 3]
[--options JSON] [--rows 15]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from benchmarks.matcher import feature_grids
from stages.match.gwot import gwot

REPO = Path(__file__).resolve().parents[1]


def timed_solves(grid: int, repeats: int, options: dict) -> float:
    """Best seconds of ``repeats`` solves after a warm-up."""
    src_feats, trg_feats = feature_grids(grid, "cpu")
    times = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-convergence at the defaults is expected and not the point here
        for _ in range(repeats + 1):
            start = time.perf_counter()
            gwot(src_feats, trg_feats, **options)
            times.append(time.perf_counter() - start)
    return min(times[1:])


def profile_table(grid: int, options: dict, rows: int) -> str:
    """``torch.profiler``'s operator table (by self CPU time) of one solve."""
    src_feats, trg_feats = feature_grids(grid, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gwot(src_feats, trg_feats, **options)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            gwot(src_feats, trg_feats, **options)
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--options", default="{}", help="solver keywords as JSON")
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    options = json.loads(args.options)
    if args.threads:
        torch.set_num_threads(args.threads)
        print(timed_solves(args.grid, args.repeats, options))
        return
    print(f"grid {args.grid}x{args.grid}, options {options}, best of {args.repeats} after a warm-up")
    for threads in (1, 2):
        command = [sys.executable, "-m", "benchmarks.profile_gwot", *sys.argv[1:], "--threads", str(threads)]
        seconds = float(subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO).stdout)
        print(f"{threads} torch thread(s): {seconds:.3f} s/pair")
    torch.set_num_threads(1)
    print(profile_table(args.grid, options, args.rows))


if __name__ == "__main__":
    main()
