"""Throughput, peak memory and store size of the features stage's backbones at several canvas sizes.

Prints a Markdown table. Each (model, size) runs in its own subprocess so that its peak memory is its own:
on CUDA ``torch.cuda.max_memory_allocated`` (model included); on CPU the process's peak resident set
(``ru_maxrss``, model and libraries included) and its growth over the resident set after the imports.
DINOv2 models run with random weights: the same FLOPs and memory as the real ones, no download. Images are
scikit-image's photographs (different aspect ratios, so canvases carry padding as real ones do), ``--batch``
per forward pass through ``shard_features``, the function the stage's workers run; on CUDA one batch
warms up first, untimed (on a CPU the first call's overhead is negligible next to seconds per image). The
tokens are then written as one shard of a real ``FeatureStore``: ``store MiB/img`` is its tokens' bytes on
disk per image and ``ratio`` the raw float16 bytes over the stored bytes (the store keeps a crc32c per
chunk and no compressor, so about 1).

Usage: python benchmarks/features.py [--device cpu|cuda] [--sizes 448,840]
       [--models vit_small_patch14_dinov2.lvd142m,vit_base_patch14_dinov2.lvd142m,daisy]
       [--n-images 2] [--batch 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from skimage import data as skdata

from pipeline.features_store import FeatureStore
from stages.features.backbones import create_backbone
from stages.features.canvas import CanvasTransform
from stages.features.stage import shard_features

PHOTOS = (skdata.astronaut, skdata.coffee, skdata.chelsea, skdata.rocket)
DEFAULT_MODELS = "vit_small_patch14_dinov2.lvd142m,vit_base_patch14_dinov2.lvd142m,daisy"


def photos(n_images: int) -> list[np.ndarray]:
    """``n_images`` RGB photographs [H, W, 3] uint8, cycling through scikit-image's."""
    return [PHOTOS[i % len(PHOTOS)]() for i in range(n_images)]


def peak_memory_mib(device: str) -> float:
    """Peak memory so far: CUDA allocations on a GPU, the resident set on a CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def stored_bytes(path: Path) -> int:
    """Bytes of the token chunks (shard files) under a store's ``tokens`` array."""
    return sum(p.stat().st_size for p in (path / "tokens" / "c").rglob("*") if p.is_file())


def measure(model: str, size: int, device: str, n_images: int, batch: int) -> dict[str, float]:
    """One row of the table: images/s, peak memory and on-disk size per image of ``model`` at ``size`` px."""
    baseline = peak_memory_mib(device)
    weights = "none" if model == "daisy" else "random"
    backbone = create_backbone(model, weights=weights, image_size=size, layer="prenorm", flip=False, device=device)
    images = photos(n_images)
    transforms = [CanvasTransform.fit(i.shape[1], i.shape[0], size, backbone.patch_size) for i in images]
    if device == "cuda":
        shard_features(images[:batch], transforms[:batch], backbone, batch_size=batch)
        torch.cuda.synchronize()
    start = time.perf_counter()
    features = shard_features(images, transforms, backbone, batch_size=batch)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = peak_memory_mib(device)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "store.zarr"
        store = FeatureStore.create_or_open(
            path,
            image_ids=[str(i) for i in range(n_images)],
            transforms=[t.as_dict() for t in transforms],
            grid=(backbone.grid_size, backbone.grid_size),
            dim=backbone.dim,
            key_params=backbone.key_params(),
            random_weights=backbone.random_weights,
            shard_size=n_images,
        )
        store.write_shard(0, features.tokens, features.valid)
        on_disk = stored_bytes(path)
    return {
        "images_per_s": n_images / seconds,
        "seconds_per_image": seconds / n_images,
        "peak_mib": peak,
        "growth_mib": peak - baseline,
        "store_mib_per_image": on_disk / n_images / 2**20,
        "ratio": features.tokens.nbytes / on_disk,
        "dim": backbone.dim,
    }


def run_isolated(model: str, size: int, args: argparse.Namespace) -> dict[str, float]:
    """``measure`` in a fresh interpreter, so that peak memory is this measurement's alone."""
    command = [sys.executable, __file__, "--worker", model, "--sizes", str(size), "--device", args.device]
    command += ["--n-images", str(args.n_images), "--batch", str(args.batch)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", default="448,840", help="canvas sizes in px, multiples of 14")
    parser.add_argument("--models", default=DEFAULT_MODELS, help="timm DINOv2 names or daisy, comma-separated")
    parser.add_argument("--n-images", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="canvases per forward pass")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    if args.worker:
        print(json.dumps(measure(args.worker, sizes[0], args.device, args.n_images, args.batch)))
        return
    threads = torch.get_num_threads()
    print(f"device {args.device}, {args.n_images} images, batch {args.batch}, torch threads {threads}")
    print()
    print("| model | canvas | C | img/s | s/img | peak MiB | growth MiB | store MiB/img | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model in args.models.split(","):
        for size in sizes:
            row = run_isolated(model, size, args)
            print(
                f"| {model} | {size} | {row['dim']} | {row['images_per_s']:.2f} "
                f"| {row['seconds_per_image']:.2f} | {row['peak_mib']:.0f} | {row['growth_mib']:.0f} "
                f"| {row['store_mib_per_image']:.2f} | {row['ratio']:.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
