"""Time, peak memory and accuracy per pair of NN, GWOT (dense and coarse-to-fine) and POT's dense entropic FGW.

Prints two Markdown tables. Speed: seconds per pair (best of the repeats after a warm-up) and peak memory on
growing grids of synthetic features (a smooth random field sampled on the source grid and, with noise, on a
rotated, zoomed and bent copy of it). Every measurement runs in its own subprocess with ``--threads`` torch
threads (1 by default: faster than 2 on a 2-core machine), so that its peak memory is its own: on CUDA
``torch.cuda.max_memory_allocated`` above the inputs; on CPU (Linux) the peak resident set during the solves
above the resident set before them (``VmHWM`` minus ``VmRSS`` of ``/proc/self/status``, the peak reset by
writing 5 to ``/proc/self/clear_refs`` just before: torch's CPU allocator keeps no statistics, and
tracemalloc does not see its allocations). Each time is the best wall-clock time; the CPU time of the same
solve is printed for the GWOT columns too, since on a shared machine it is the steadier of the two.
Accuracy: PCK@0.1 of dense and coarse-to-fine GWOT (and NN) on
scikit-image photos under seeded smooth warps, DAISY descriptors on a G x G grid (the project's
warp-quality test, at every grid size).

Matched work: the GWOT columns run exactly ``outer_iters`` mirror-descent steps (``outer_tol = 0``, at most
``inner_iters`` warm-started Sinkhorn iterations each; coarse-to-fine runs them on each level). POT runs
balanced (it has no unbalanced FGW) in float64 NumPy with C1/C2 the dense 0/1 neighbourhood matrices and
``alpha``/``epsilon`` mapped from the GWOT defaults as documented in ``stages.match.gwot.gwot``, for the same
``outer_iters`` steps (``tol = 0``), twice: as it runs by default (``numItermax = 1000`` cold Sinkhorn
iterations per step) and warm-started (``warmstart=True``) with GWOT's inner budget (``numItermax =
inner_iters``). Where a POT run, extrapolated as N^3 from the previous grid, would exceed ``--pot-budget``
seconds, one outer step is timed and multiplied by the number of steps (marked ``~``).

Usage (from the repository root): python -m benchmarks.matcher [--device cpu|cuda] [--grids 24,32,48,60,80]
[--repeats 3] [--threads 1] [--pot-budget 120] [--no-pot] [--no-pck] [--pck-warps 4]
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from stages.match import nn_match
from stages.match.gwot import gwot

CHANNELS = 64
REPO = Path(__file__).resolve().parents[1]
METHODS = ("nn", "dense", "c2f", "pot", "pot-warm")


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


def pot_settings(grid: int, warm: bool, steps: int) -> dict:
    """POT's keyword arguments at the GWOT defaults' spatial weight and entropy (see the module docstring)."""
    defaults = gwot_defaults()
    s = defaults["w_s"] * grid * grid / defaults["k"] ** 2  # w_s * sqrt(N M) / k^2 with N = M
    settings = dict(
        loss_fun="square_loss", epsilon=defaults["eps"] / (1 + s), alpha=s / (1 + s), max_iter=steps, tol=0.0
    )
    settings["solver"] = "PGD"
    if warm:
        settings.update(warmstart=True, numItermax=defaults["inner_iters"])
    return settings


def pot_fgw(src_feats: torch.Tensor, trg_feats: torch.Tensor, warm: bool, steps: int) -> np.ndarray:
    """POT's dense balanced entropic FGW (float64) for ``steps`` outer steps."""
    import ot

    grid, k = src_feats.shape[1], gwot_defaults()["k"]
    src = torch.nn.functional.normalize(src_feats[0].flatten(0, 1).double().cpu(), dim=-1)
    trg = torch.nn.functional.normalize(trg_feats[0].flatten(0, 1).double().cpu(), dim=-1)
    adjacency = neighbourhood_matrix(grid, k)
    uniform = np.full(grid * grid, 1 / grid**2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # POT warns that Sinkhorn did not converge within numItermax
        return ot.gromov.entropic_fused_gromov_wasserstein(
            (1 - src @ trg.T).numpy(), adjacency, adjacency, uniform, uniform, **pot_settings(grid, warm, steps)
        )


def gwot_fixed_steps(src_feats, trg_feats, valid=(None, None), **options):
    """GWOT at its defaults, running all ``outer_iters`` steps (no early stop), without the warning that says so."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gwot(src_feats, trg_feats, *valid, outer_tol=0.0, **options)


def _status_mib(field: str) -> float:
    """A ``/proc/self/status`` memory field (Linux reports KiB), in MiB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def reset_peak_memory(device: str) -> float:
    """Restart the peak-memory count from now; returns the memory in use now, in MiB."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident set restarts from the current one
    return _status_mib("VmRSS")


def peak_memory_mib(device: str) -> float:
    """Peak memory since :func:`reset_peak_memory`: CUDA allocations, or the process's resident set, in MiB."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _status_mib("VmHWM")


def measure(method: str, grid: int, device: str, repeats: int, pot_steps: int) -> dict:
    """Seconds per pair (best wall and CPU time of ``repeats`` after a warm-up) and peak memory of one method.

    For POT, ``pot_steps`` outer steps are run and the time is scaled to GWOT's number of outer steps.
    """
    src_feats, trg_feats = feature_grids(grid, device)
    solve = {
        "nn": lambda: nn_match(src_feats, trg_feats),
        "dense": lambda: gwot_fixed_steps(src_feats, trg_feats, coarse_to_fine=False),
        "c2f": lambda: gwot_fixed_steps(src_feats, trg_feats, coarse_to_fine=True),
        "pot": lambda: pot_fgw(src_feats, trg_feats, False, pot_steps),
        "pot-warm": lambda: pot_fgw(src_feats, trg_feats, True, pot_steps),
    }[method]
    before = reset_peak_memory(device)
    pot = method.startswith("pot")
    times, result = [], None
    for _ in range(repeats + (not pot)):  # POT has no warm-up to amortise
        result = None  # not alive during the next solve
        start, cpu = time.perf_counter(), time.process_time()
        result = solve()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start, time.process_time() - cpu))
    times = times[-repeats:]
    row = {
        "seconds": min(wall for wall, _ in times),
        "cpu_seconds": min(cpu for _, cpu in times),
        "memory_mib": peak_memory_mib(device) - before,
    }
    if method in ("dense", "c2f"):
        row["inner_iters"] = int(result.inner_iters.sum())
    if pot:
        row["seconds"] *= gwot_defaults()["outer_iters"] / pot_steps
    return row


def warped_photo_pck(grid: int, warps: int) -> dict[str, float]:
    """PCK@0.1 of NN, dense and coarse-to-fine GWOT (defaults) on ``warps`` seeded warps of each of 5 photos,
    with DAISY on a G x G grid."""
    sys.path.insert(0, str(REPO / "tests" / "stages" / "match"))
    import test_quality as quality

    from stages.match import transfer_keypoints

    daisy = quality.daisy_backbone(grid)
    hits, total = {"nn": 0, "dense": 0, "c2f": 0}, 0
    photos = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")
    seeded = [(name, photo + len(photos) * warp) for warp in range(warps) for photo, name in enumerate(photos)]
    for name, seed in seeded:
        original, warped, keypoints, truth = quality.warped_keypoints(name, seed)
        height, width = original.shape[:2]
        src_feats, src_valid, src_transform = quality.daisy_grid(warped, daisy)
        trg_feats, trg_valid, trg_transform = quality.daisy_grid(original, daisy)
        valid = (src_valid, trg_valid)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores = {
                "nn": nn_match(src_feats, trg_feats, *valid).similarity[0],
                "dense": gwot(src_feats, trg_feats, *valid, coarse_to_fine=False).plan[0],
                "c2f": gwot(src_feats, trg_feats, *valid).plan[0],
            }
        for method, score in scores.items():
            temperature = 0.02 if method == "nn" else None
            predicted = transfer_keypoints(score, keypoints, src_transform, trg_transform, temperature=temperature)
            hits[method] += int((np.linalg.norm(predicted - truth, axis=1) <= 0.1 * max(height, width)).sum())
        total += len(truth)
    return {method: count / total for method, count in hits.items()}


def run_isolated(method: str, grid: int, args: argparse.Namespace, pot_steps: int = 0) -> dict:
    """``measure`` in a fresh interpreter, so that its peak memory is not an earlier measurement's."""
    command = [sys.executable, "-m", "benchmarks.matcher", "--worker", method, "--grids", str(grid)]
    command += ["--device", args.device, "--repeats", str(args.repeats), "--threads", str(args.threads)]
    command += ["--pot-steps", str(pot_steps)]
    output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--grids", default="24,32,48,60,80", help="comma-separated grid sides (square grids)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per measurement")
    parser.add_argument("--pot-budget", type=float, default=120.0, help="time one POT step beyond this many s")
    parser.add_argument("--no-pot", action="store_true", help="skip the POT columns (slow at large grids)")
    parser.add_argument("--no-pck", action="store_true", help="skip the warped-photo accuracy table")
    parser.add_argument("--pck-warps", type=int, default=4, help="seeded warps per photo in the accuracy table")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--pot-steps", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    grids = [int(g) for g in args.grids.split(",")]
    if args.worker:
        print(json.dumps(measure(args.worker, grids[0], args.device, args.repeats, args.pot_steps)))
        return
    import ot

    defaults = gwot_defaults()
    memory = "CUDA max_memory_allocated" if args.device.startswith("cuda") else "peak RSS above the start (VmHWM)"
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor()
    print(
        f"device {args.device} ({device or platform.machine()}), torch {torch.__version__} with {args.threads} "
        f"thread(s), POT {ot.__version__}, repeats {args.repeats}; memory = {memory}\n"
        f"GWOT defaults {defaults}, run for exactly outer_iters steps (per level for c2f)\n"
        f"POT default: {pot_settings(grids[0], False, defaults['outer_iters'])} (alpha, epsilon at G={grids[0]})\n"
        f"POT warm: {pot_settings(grids[0], True, defaults['outer_iters'])}\n"
    )
    print(
        "| grid | NN s | NN MiB | dense s | dense CPU s | dense MiB | c2f s | c2f CPU s | c2f MiB | c2f inner iters "
        "| POT s | POT warm s | POT MiB | dense / c2f | POT warm / c2f | POT warm / dense |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    steps = defaults["outer_iters"]
    previous = {}
    for grid in grids:
        rows = {method: run_isolated(method, grid, args) for method in ("nn", "dense", "c2f")}
        for method in () if args.no_pot else ("pot", "pot-warm"):
            expected = previous[method][0] * (grid / previous[method][1]) ** 6 if method in previous else 0.0
            full = expected <= args.pot_budget
            rows[method] = run_isolated(method, grid, args, pot_steps=steps if full else 1)
            rows[method]["mark"] = "" if full else "~"
            previous[method] = (rows[method]["seconds"], grid)
        pot, warm, dense, fine = rows.get("pot"), rows.get("pot-warm"), rows["dense"], rows["c2f"]
        cells = [
            f"{grid}x{grid}",
            f"{rows['nn']['seconds']:.4f}",
            f"{rows['nn']['memory_mib']:.0f}",
            f"{dense['seconds']:.3f}",
            f"{dense['cpu_seconds']:.3f}",
            f"{dense['memory_mib']:.0f}",
            f"{fine['seconds']:.3f}",
            f"{fine['cpu_seconds']:.3f}",
            f"{fine['memory_mib']:.0f}",
            str(fine["inner_iters"]),
            f"{dense['seconds'] / fine['seconds']:.1f}x",
        ]
        if args.no_pot:
            cells[10:10] = ["-", "-", "-"]
            cells += ["-", "-"]
        else:
            cells[10:10] = [
                f"{pot['mark']}{pot['seconds']:.2f}",
                f"{warm['mark']}{warm['seconds']:.2f}",
                f"{max(pot['memory_mib'], warm['memory_mib']):.0f}",
            ]
            cells += [
                f"{warm['mark']}{warm['seconds'] / fine['seconds']:.0f}x",
                f"{warm['mark']}{warm['seconds'] / dense['seconds']:.1f}x",
            ]
        print("| " + " | ".join(cells) + " |", flush=True)
    if args.no_pck:
        return
    print(f"\nPCK@0.1 on {args.pck_warps} warps of 5 photos (up to 30 keypoints each), DAISY on a G x G grid:\n")
    print("| grid | NN | GWOT dense | GWOT coarse-to-fine |")
    print("|---|---|---|---|")
    for grid in grids:
        pck = warped_photo_pck(grid, args.pck_warps)
        print(f"| {grid}x{grid} | {pck['nn']:.3f} | {pck['dense']:.3f} | {pck['c2f']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
