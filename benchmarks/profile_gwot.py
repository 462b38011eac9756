"""Profile one GWOT solve: seconds per pair at 1 and 2 torch threads, and the operators that take the time.

Runs the solver on the synthetic warped-field features of :mod:`benchmarks.matcher` (real DAISY features
behave alike: every outer step runs), each thread count in its own subprocess, best of ``--repeats`` after
a warm-up, then prints ``torch.profiler``'s table of the most expensive operators for one solve at one
thread. Pass solver keywords as JSON to compare paths side by side, e.g.
``--options '{"coarse_to_fine": false}'``. ``--baseline DIR`` compares with another checkout (e.g. ``git
worktree add /tmp/old main``) side by side instead: both solvers imported into this one process and timed
interleaved at one thread (wall and CPU seconds, the CPU time being steadier on a shared machine), with the
largest difference between their plans.

Usage (from the repository root): python -m benchmarks.profile_gwot [--grid 60] [--repeats 3]
[--options JSON] [--rows 15] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
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


def import_gwot(root: Path) -> Callable:
    """``gwot`` as the checkout at ``root`` defines it (its ``stages`` and ``pipeline`` imported afresh)."""
    for name in [module for module in sys.modules if module.split(".")[0] in ("stages", "pipeline")]:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("stages.match").gwot
    finally:
        sys.path.remove(str(root))


def compare(baseline: Path, grid: int, repeats: int, options: dict) -> None:
    """Time the baseline checkout's solver and this one's interleaved in this process; print both."""
    solvers = {"baseline": import_gwot(baseline), "this checkout": import_gwot(REPO)}
    src_feats, trg_feats = feature_grids(grid, "cpu")
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in solvers}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plans = {name: solve(src_feats, trg_feats, **options).plan for name, solve in solvers.items()}
        for _ in range(repeats):
            for name, solve in solvers.items():
                wall, cpu = time.perf_counter(), time.process_time()
                solve(src_feats, trg_feats, **options)
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    dense = [plan if isinstance(plan, torch.Tensor) else plan.dense() for plan in plans.values()]
    print(f"grid {grid}x{grid}, options {options}, 1 thread, best of {repeats} interleaved after a warm-up")
    for name, measured in times.items():
        print(f"{name}: {min(w for w, _ in measured):.3f} s wall, {min(c for _, c in measured):.3f} s CPU")
    print(f"largest plan difference: {float((dense[0] - dense[1]).abs().max()):.3g} (plan mass 1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--options", default="{}", help="solver keywords as JSON")
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--baseline", type=Path, help="another checkout to time side by side with this one")
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    options = json.loads(args.options)
    if args.baseline:
        torch.set_num_threads(1)
        compare(args.baseline.resolve(), args.grid, args.repeats, options)
        return
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
