"""Pairs per second of the match stage with 1 and 2 CPU workers, and the scaling between them.

Prints a Markdown table. A throwaway catalog in a temporary folder holds the offline demo dataset
(``--pairs`` pairs of photos of at most ``--max-side`` px) and its DAISY features on ``--image-size`` px
canvases (computed once, untimed). For each worker count the benchmark starts a LocalCluster of that many
one-thread worker processes, warms them up (imports and a first solve, untimed), then times the match stage
through that scheduler for NN and for GWOT with default settings, each into a fresh run: the time from
submitting the batches to the last part written, so planning and the summary are included. Batches hold
``--batch-size`` pairs, so there are enough of them for every worker.

Usage: python benchmarks/match_stage.py [--workers 1,2] [--pairs 24] [--batch-size 4] [--image-size 224]
       [--max-side 320]
(Run it as a module from the repository root: as a script, this file would shadow the ``pipeline`` package.)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import yaml
from distributed import Client, LocalCluster

from pipeline.catalog import load_catalog
from pipeline.context import RunOptions, StageContext
from pipeline.runner import run_stages
from stages.match import stage as match_stage
from stages.match.gwot import gwot


def prepare(folder: Path, args: argparse.Namespace) -> Path:
    """A catalog in ``folder`` whose demo dataset is downloaded, normalised and has DAISY features."""
    demo = {"n_pairs": args.pairs, "max_side": args.max_side, "n_keypoints": 8}  # small photos have few textured points
    body = {
        "stores": {"data_root": "data", "cache_root": "cache", "outputs": "outputs"},
        "datasets": {"demo": {"kind": "demo", "options": demo}},
        "backbones": {"daisy": {"model": "daisy", "weights": "none", "image_size": args.image_size}},
        "default_backbone": "daisy",
        "matchers": {"nn": {"method": "nn"}, "gwot": {"method": "gwot"}},
        "cluster": {"n_workers": 1},
    }
    path = folder / "catalog.yaml"
    path.write_text(yaml.safe_dump(body))
    run_stages(load_catalog(path), ["download", "normalize", "features"], ["demo"], RunOptions(progress=False))
    return path


def _warm_up() -> None:
    """Import the solver and run one small solve, as a first task would."""
    features = torch.rand(1, 4, 4, 8)
    gwot(features, features)


def time_match(catalog: Path, address: str, method: str, batch_size: int) -> float:
    """Seconds the match stage takes for every demo pair under the catalog matcher ``method``."""
    # force: the batches of earlier timings under the same outputs would otherwise be linked, not matched
    run_name = f"{method}-{time.time_ns()}"
    options = RunOptions(progress=False, scheduler=address, matchers=(method,), run_name=run_name, force=True)
    ctx = StageContext(load_catalog(catalog), ("demo",), options)
    start = time.perf_counter()
    match_stage.match(ctx, batch_size)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--pairs", type=int, default=24, help="demo pairs")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per task")
    parser.add_argument("--image-size", type=int, default=224, help="canvas px (multiple of 14)")
    parser.add_argument("--max-side", type=int, default=320, help="demo photos' longest side, px")
    args = parser.parse_args()
    workers = [int(n) for n in args.workers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        catalog = prepare(Path(folder), args)
        for n_workers in workers:
            with (
                LocalCluster(n_workers=n_workers, threads_per_worker=1, dashboard_address=":0") as cluster,
                Client(cluster) as client,
            ):
                client.run(_warm_up)
                for method in ("nn", "gwot"):
                    rows.append(
                        (method, n_workers, time_match(catalog, cluster.scheduler_address, method, args.batch_size))
                    )
    grid = args.image_size // 14
    print(f"match stage on the demo: {args.pairs} pairs, DAISY {grid}x{grid} patches, {args.batch_size} pairs/task\n")
    print("| method | workers | seconds | pairs/s | scaling vs 1 worker |")
    print("|---|---|---|---|---|")
    single = {method: seconds for method, n, seconds in rows if n == 1}
    for method, n_workers, seconds in sorted(rows):
        scaling = f"{single[method] / seconds:.2f}x" if method in single else "-"
        print(f"| {method} | {n_workers} | {seconds:.2f} | {args.pairs / seconds:.2f} | {scaling} |")


if __name__ == "__main__":
    main()
