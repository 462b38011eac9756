"""Time and peak memory per pair of NN, GWOT (defaults) and POT's dense entropic FGW on growing grids.

Prints a Markdown table; times are the best of the repeats (robust to other load on the machine). Each
measurement runs in its own subprocess so that peak memory is its own: on CUDA it is
``torch.cuda.max_memory_allocated`` above the inputs; on CPU the growth of the process's peak resident set
(``ru_maxrss``) during the solves. Features are synthetic: a smooth random field sampled on the
source grid and, with noise, on a rotated, zoomed and bent copy of it for the target.

POT runs balanced (it has no unbalanced FGW) in float64 NumPy with C1/C2 the dense 0/1 neighbourhood
matrices, ``alpha``/``epsilon`` mapped from the GWOT defaults as documented in ``stages.match.gwot.gwot``,
the same number of outer steps and its default inner Sinkhorn (at most 1000 iterations, no warm start).
Where its time, extrapolated as N^3 from the previous grid, would exceed ``--pot-budget`` seconds, only one
outer step is timed and multiplied by the number of steps (every step does the same work); such
estimates are marked ``~``. The last column is the largest absolute difference between POT's plan and
GWOT's at matched settings (``rho = inf``, ``w_y = 0``, float32, 1000 inner iterations like POT's).

Usage (from the repository root): python -m benchmarks.matcher [--device cpu|cuda] [--grids 16,24,32,48,60]
[--repeats 3]
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from stages.match import gwot, nn_match

CHANNELS = 64
REPO = Path(__file__).resolve().parents[1]


def feature_grids(grid: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``[1, G, G, C]`` float32 source and target features of a smooth random field under a smooth warp."""
    rng = np.random.default_rng(seed)
    frequencies = rng.normal(scale=2 * np.pi / 6, size=(2, CHANNELS))  # wavelength ~ 6 patches
    phases = rng.uniform(0, 2 * np.pi, CHANNELS)
    ys, xs = np.mgrid[0:grid, 0:grid].astype(np.float64)
    src_points = np.stack([xs, ys], -1)
    angle, zoom, centre = np.deg2rad(15), 1.1, (grid - 1) / 2
    rotation = zoom * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    bend = 0.8 * np.sin(src_points[..., ::-1] * 2 * np.pi / grid)
    trg_points = (src_points - centre) @ rotation.T + centre + bend
    src = np.cos(src_points @ frequencies + phases)
    trg = np.cos(trg_points @ frequencies + phases) + 0.5 * rng.normal(size=(grid, grid, CHANNELS))
    return tuple(torch.from_numpy(f).float()[None].to(device) for f in (src, trg))


def neighbourhood_matrix(grid: int, k: int) -> np.ndarray:
    """Dense 0/1 Chebyshev k x k neighbourhood matrix of a grid x grid grid, ``[G*G, G*G]``."""
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    near = (np.abs(rows[:, None] - rows[None]) <= k // 2) & (np.abs(cols[:, None] - cols[None]) <= k // 2)
    return near.astype(np.float64)


def gwot_defaults() -> dict:
    """The keyword defaults of ``gwot``."""
    return {
        name: parameter.default
        for name, parameter in inspect.signature(gwot).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }


def pot_fgw(src_feats: torch.Tensor, trg_feats: torch.Tensor, steps: int) -> np.ndarray:
    """POT's dense balanced entropic FGW at the GWOT defaults' spatial weight and entropy (float64)."""
    import ot

    defaults = gwot_defaults()
    grid, k = src_feats.shape[1], defaults["k"]
    n = grid * grid
    s = defaults["w_s"] * n / k**2  # w_s * sqrt(N M) / k^2 with N = M
    src = torch.nn.functional.normalize(src_feats[0].flatten(0, 1).double().cpu(), dim=-1)
    trg = torch.nn.functional.normalize(trg_feats[0].flatten(0, 1).double().cpu(), dim=-1)
    adjacency = neighbourhood_matrix(grid, k)
    uniform = np.full(n, 1 / n)
    return ot.gromov.entropic_fused_gromov_wasserstein(
        (1 - src @ trg.T).numpy(),
        adjacency,
        adjacency,
        uniform,
        uniform,
        loss_fun="square_loss",
        epsilon=defaults["eps"] / (1 + s),
        alpha=s / (1 + s),
        max_iter=steps,
        tol=0.0,
        solver="PGD",
    )


def matched_gwot(src_feats: torch.Tensor, trg_feats: torch.Tensor) -> np.ndarray:
    """GWOT at POT's settings: balanced, no symmetry term, every outer step, converged inner solves."""
    plan = gwot(src_feats, trg_feats, w_y=0.0, rho=math.inf, outer_tol=0.0, inner_iters=1000, inner_tol=1e-7).plan
    return plan[0].double().cpu().numpy()


def peak_memory_mib(device: str) -> float:
    """Peak memory so far: CUDA allocations, or the process's peak resident set, in MiB."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(method: str, grid: int, device: str, repeats: int, pot_steps: int) -> dict:
    """Seconds per pair (best of ``repeats`` after a warm-up) and peak memory growth of one method.

    For POT, ``pot_steps`` outer steps are run and the time is scaled to GWOT's number of outer steps.
    """
    src_feats, trg_feats = feature_grids(grid, device)
    solve = {
        "nn": lambda: nn_match(src_feats, trg_feats),
        "gwot": lambda: gwot(src_feats, trg_feats),
        "pot": lambda: pot_fgw(src_feats, trg_feats, pot_steps),
    }[method]
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = peak_memory_mib(device)
    times = []
    for _ in range(repeats + (method != "pot")):  # POT has no warm-up to amortise
        start = time.perf_counter()
        result = solve()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    times = times[-repeats:]
    row = {"seconds": min(times), "memory_mib": peak_memory_mib(device) - before}
    if method == "gwot":
        row["inner_iters"] = int(result.inner_iters.sum())
    if method == "pot":
        row["seconds"] *= gwot_defaults()["outer_iters"] / pot_steps
        if pot_steps == gwot_defaults()["outer_iters"]:
            row["max_diff"] = float(np.abs(result - matched_gwot(src_feats, trg_feats)).max())
            row["max_entry"] = float(result.max())
    return row


def run_isolated(method: str, grid: int, device: str, repeats: int, pot_steps: int = 0) -> dict:
    """``measure`` in a fresh interpreter, so that its peak memory is not an earlier measurement's."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.matcher",
        "--worker",
        method,
        "--grids",
        str(grid),
        "--device",
        device,
        "--repeats",
        str(repeats),
        "--pot-steps",
        str(pot_steps),
    ]
    output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--grids", default="16,24,32,48,60", help="comma-separated grid sides (square grids)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pot-budget", type=float, default=90.0, help="skip POT beyond this many seconds")
    parser.add_argument("--worker", choices=["nn", "gwot", "pot"], help=argparse.SUPPRESS)
    parser.add_argument("--pot-steps", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    grids = [int(g) for g in args.grids.split(",")]
    if args.worker:
        print(json.dumps(measure(args.worker, grids[0], args.device, args.repeats, args.pot_steps)))
        return
    memory = "CUDA max_memory_allocated" if args.device.startswith("cuda") else "growth of peak RSS"
    print(
        f"device {args.device}, torch threads {torch.get_num_threads()}, repeats {args.repeats}, "
        f"GWOT defaults {gwot_defaults()}; memory = {memory}\n"
    )
    print(
        "| grid | NN s/pair | NN MiB | GWOT s/pair | GWOT MiB | GWOT inner iters | POT FGW s/pair | POT MiB "
        "| POT / GWOT time | max abs plan diff (max entry) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    steps = gwot_defaults()["outer_iters"]
    pot_seconds, pot_grid = None, None
    for grid in grids:
        nn = run_isolated("nn", grid, args.device, args.repeats)
        solver = run_isolated("gwot", grid, args.device, args.repeats)
        expected = 0.0 if pot_seconds is None else pot_seconds * (grid / pot_grid) ** 6
        full = expected <= args.pot_budget
        pot = run_isolated("pot", grid, args.device, 1, pot_steps=steps if full else 1)
        pot_seconds, pot_grid = pot["seconds"], grid
        mark = "" if full else "~"
        difference = f"{pot['max_diff']:.1e} ({pot['max_entry']:.1e})" if full else "n/a (1 step timed)"
        pot_cells = [
            f"{mark}{pot['seconds']:.2f}",
            f"{pot['memory_mib']:.0f}",
            f"{mark}{pot['seconds'] / solver['seconds']:.0f}x",
            difference,
        ]
        cells = [
            f"{grid}x{grid}",
            f"{nn['seconds']:.4f}",
            f"{nn['memory_mib']:.0f}",
            f"{solver['seconds']:.3f}",
            f"{solver['memory_mib']:.0f}",
            str(solver["inner_iters"]),
            *pot_cells,
        ]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
