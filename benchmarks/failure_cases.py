"""The GWOT paper's failure cases (mirrored poses, objects of other sizes) and the matchers that address them.

Prints two Markdown tables.

1. Warped photos: scikit-image's photographs under seeded smooth warps (the demo's :func:`draw_pair`), in
   the cases normal, mirrored and target object at 0.5x, 0.7x, 1.4x and 2.0x, with DAISY features on a
   28 x 28 patch grid (the ``daisy`` backbone at a 392-px canvas) and with a flip-invariant variant (the
   normalised sum of DAISY and the mirrored DAISY of the mirrored image, which imitates DINOv2's roughly
   flip-invariant semantic features). Rows NN, gwot, gwot-flip, gwot-scale, gwot-robust (the repository
   catalog's matchers, solved by the match stage's own :func:`solve`); PCK@0.05 and PCK@0.1 of the target
   image's larger side, and seconds per pair.
2. Real fixtures (``../shared/fixtures``), through the pipeline's own stages (download of hand-placed
   archives, normalize, features with the repository catalog's ``daisy`` backbone and ``flip: true``, match)
   in a work folder: PF-WILLOW's 4 classes (a fixed sample of ``--willow-pairs`` pairs, PCK@0.1 per image)
   and TSS's 3 pairs beside a mirrored copy of each (image2 with its mask, matches and flows mirrored
   left-right, ``flip_gt`` 1): T5 without, with only and with all flipped directions; and per matcher how
   often the mirrored orientation was kept.

Usage (from the repository root):
python -m benchmarks.failure_cases [--seeds 2] [--willow-pairs 120] [--tables both] [--workdir PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image

from pipeline.catalog import REPO_CATALOG, Catalog, load_catalog
from pipeline.context import RunOptions
from pipeline.results import read_results, run_dir
from pipeline.runner import run_stages
from stages.datasets.demo import PHOTOS, draw_pair, load_photo, render_target
from stages.datasets.flo import UNKNOWN_FLOW, flow_validity, read_flo, write_flo
from stages.features.backbones import Backbone, create_backbone
from stages.features.canvas import CanvasTransform, image_to_canvas
from stages.match import transfer_keypoints
from stages.match.settings import MatcherSetting, parse_params
from stages.match.stage import readout_options, solve

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
MATCHERS = ("nn", "gwot", "gwot-flip", "gwot-scale", "gwot-robust")
CASES = {
    "normal": (False, 1.0),
    "mirrored": (True, 1.0),
    "scale 0.5": (False, 0.5),
    "scale 0.7": (False, 0.7),
    "scale 1.4": (False, 1.4),
    "scale 2.0": (False, 2.0),
}
GRID = 28
WARPED_KEYPOINTS = 20
ALPHAS = (0.05, 0.1)


def hand_placed(filename: str) -> dict[str, str]:
    """A catalog source that is never fetched: the benchmark hands its archive to the download stage."""
    return {"url": f"http://127.0.0.1:9/{filename}", "filename": filename}


@dataclass(frozen=True)
class Pair:
    """One warped pair's features (``[H, W, C]``), canvases and ground-truth keypoints."""

    src: torch.Tensor
    src_flipped: torch.Tensor
    src_valid: torch.Tensor
    trg: torch.Tensor
    trg_valid: torch.Tensor
    transforms: tuple[CanvasTransform, CanvasTransform]
    src_kps: np.ndarray
    trg_kps: np.ndarray
    ref_length: float


def image_features(
    backbone: Backbone, image: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, CanvasTransform]:
    """Tokens, mirrored-image tokens (on the original grid), valid patches and canvas of one image."""
    transform = CanvasTransform.fit(image.shape[1], image.shape[0], backbone.image_size, backbone.patch_size)
    canvas = image_to_canvas(image, transform)[None]
    valid = torch.from_numpy(transform.valid_patches())
    return backbone(canvas)[0], backbone.flipped(canvas)[0], valid, transform


def flip_invariant(
    backbone: Backbone, image: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, CanvasTransform]:
    """:func:`image_features` of the flip-invariant variant: ``normalise(D(x) + mirror(D(mirror x)))``,
    which is also the mirrored image's variant mirrored back, so both token grids are the same."""
    tokens, flipped, valid, transform = image_features(backbone, image)
    invariant = torch.nn.functional.normalize(tokens + flipped, dim=-1)
    return invariant, invariant, valid, transform


def memoised(features):
    """``features`` computed once per distinct image (pairs share images; DAISY takes seconds per canvas)."""
    memo = {}

    def cached(image: np.ndarray):
        key = (image.shape, hashlib.sha1(np.ascontiguousarray(image).tobytes()).digest())
        if key not in memo:
            memo[key] = features(image)
        return memo[key]

    return cached


def make_pair(features, src: np.ndarray, trg: np.ndarray, **truth) -> Pair:
    """A :class:`Pair` of two images under ``features`` (:func:`image_features` or :func:`flip_invariant`)."""
    src_tokens, src_flipped, src_valid, src_transform = features(src)
    trg_tokens, _, trg_valid, trg_transform = features(trg)
    return Pair(src_tokens, src_flipped, src_valid, trg_tokens, trg_valid, (src_transform, trg_transform), **truth)


def warped_pairs(features, seeds: int) -> dict[str, list[Pair]]:
    """Every case's pairs: each photo under ``seeds`` warps (seeded by photo, case and seed)."""
    photos = {name: load_photo(name, 320) for name in PHOTOS}
    cases = {}
    for case_index, (case, (mirrored, zoom)) in enumerate(CASES.items()):
        pairs = []
        for (photo_index, src), seed in itertools.product(enumerate(photos.values()), range(seeds)):
            rng = np.random.default_rng([seed, photo_index, case_index])
            drawn = draw_pair(src, rng, mirrored=mirrored, zoom=zoom, n_keypoints=WARPED_KEYPOINTS)
            if drawn is None:
                continue
            warp, _, src_kps = drawn
            trg = render_target(src, warp)
            pairs.append(
                make_pair(
                    features, src, trg, src_kps=src_kps, trg_kps=warp.forward(src_kps), ref_length=max(trg.shape[:2])
                )
            )
        cases[case] = pairs
    return cases


def stack(pairs: Sequence[Pair], name: str) -> torch.Tensor:
    """One field of every pair, stacked into a batch."""
    return torch.stack([getattr(pair, name) for pair in pairs])


def score(setting: MatcherSetting, pairs: Sequence[Pair], batch_size: int = 8) -> tuple[np.ndarray, float]:
    """Per pair: PCK at :data:`ALPHAS`; and seconds per pair."""
    scores, seconds = [], 0.0
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        fields = [stack(batch, name) for name in ("src", "trg", "src_valid", "trg_valid", "src_flipped")]
        began = time.perf_counter()
        solution = solve(setting, *fields)
        seconds += time.perf_counter() - began
        for pair, pair_scores in zip(batch, solution.scores, strict=True):
            predicted = transfer_keypoints(pair_scores, pair.src_kps, *pair.transforms, **readout_options(setting))
            errors = np.linalg.norm(predicted - pair.trg_kps, axis=1)
            scores.append([float(np.mean(errors <= alpha * pair.ref_length)) for alpha in ALPHAS])
    return np.asarray(scores), seconds / len(pairs)


def settings(image_size: int) -> dict[str, MatcherSetting]:
    """The catalog's matchers of :data:`MATCHERS`, as the match stage resolves them."""
    catalog = load_catalog(REPO_CATALOG, environ={})
    return {
        name: MatcherSetting(
            name, catalog.matcher(name).method, parse_params(catalog.matcher(name)), f"daisy-{image_size}"
        )
        for name in MATCHERS
    }


def warped_table(seeds: int) -> list[str]:
    """Table 1's Markdown lines."""
    backbone = create_backbone("daisy", weights="none", image_size=GRID * 14, layer="prenorm", flip=True)
    lines = [
        "| features | matcher | " + " | ".join(f"{case} @0.05 / @0.1" for case in CASES) + " | s/pair |",
        "|---|---|" + "---|" * (len(CASES) + 1),
    ]
    matchers = settings(backbone.image_size)
    variants = {"DAISY": image_features, "flip-invariant DAISY": flip_invariant}
    for label, variant in variants.items():
        cases = warped_pairs(memoised(lambda image, variant=variant: variant(backbone, image)), seeds)
        for name, setting in matchers.items():
            score(setting, next(iter(cases.values()))[:1])  # a warm-up: the first solves pay one-time costs
            cells, seconds = [], []
            for pairs in cases.values():
                pck, per_pair = score(setting, pairs)
                cells.append(f"{pck[:, 0].mean():.2f} / {pck[:, 1].mean():.2f}")
                seconds.append(per_pair)
            lines.append(f"| {label} | {name} | " + " | ".join(cells) + f" | {np.mean(seconds):.2f} |")
    return lines


def mirrored_flow(flow: np.ndarray, source_width: int | None = None, target_width: int | None = None) -> np.ndarray:
    """A flow ``[H, W, 2]`` after mirroring its source image (``source_width``) and/or its target image
    (``target_width``) left-right; unknown vectors stay unknown."""
    known = flow_validity(flow)
    xs = np.arange(flow.shape[1], dtype=np.float64)[None, :]
    target_x, target_y = xs + flow[..., 0], flow[..., 1]
    if target_width is not None:
        target_x = target_width - 1 - target_x
    if source_width is not None:
        target_x, target_y, known = (values[:, ::-1] for values in (target_x, target_y, known))
    return np.stack([np.where(known, target_x - xs, UNKNOWN_FLOW), np.where(known, target_y, UNKNOWN_FLOW)], -1)


def mirror_png(source: Path, target: Path) -> None:
    """``target``: the PNG ``source`` mirrored left-right (same mode)."""
    Image.open(source).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(target)


def tss_with_mirrored(root: Path) -> Path:
    """A ``TSS_CVPR2016.zip`` under ``root`` of the fixture pairs and, beside each, ``<pair>_mirrored``: the
    same pair with image2 (its mask, matches and both flows with it) mirrored left-right, ``flip_gt`` 1."""
    tree = root / "tss" / "TSS_CVPR2016"
    shutil.copytree(FIXTURES / "tss" / "TSS_CVPR2016", tree)
    for pair_dir in sorted(tree.glob("*/*")):
        mirrored = pair_dir.with_name(pair_dir.name + "_mirrored")
        shutil.copytree(pair_dir, mirrored)
        width = Image.open(pair_dir / "image2.png").width
        for name in ("image2.png", "mask2.png"):
            mirror_png(pair_dir / name, mirrored / name)
        write_flo(mirrored / "flow1.flo", mirrored_flow(read_flo(pair_dir / "flow1.flo"), target_width=width))
        write_flo(mirrored / "flow2.flo", mirrored_flow(read_flo(pair_dir / "flow2.flo"), source_width=width))
        corr = np.loadtxt(pair_dir / "corr.txt", ndmin=2)
        corr[:, 2] = 1 - corr[:, 2] + 1 / width  # normalised 1-based x: pixel x = c * width - 1
        np.savetxt(mirrored / "corr.txt", corr, fmt="%.6f", delimiter="\t")
        (mirrored / "flip_gt.txt").write_text("1")
    return Path(shutil.make_archive(str(tree), "zip", root_dir=tree.parent, base_dir=tree.name))


def fixture_catalog(root: Path) -> Catalog:
    """A catalog over ``root``: PF-WILLOW and TSS (hand-placed archives), the repository catalog's ``daisy``
    backbone (``flip: true``) and :data:`MATCHERS`, one in-process worker."""
    repo = load_catalog(REPO_CATALOG, environ={})
    body = {
        "stores": {"data_root": "data", "cache_root": "cache", "outputs": "outputs"},
        "datasets": {
            "pf-willow": {"kind": "pf-willow", "sources": [hand_placed("PF-dataset-WILLOW.zip")]},
            "tss": {"kind": "tss", "sources": [hand_placed("TSS_CVPR2016.zip")]},
        },
        "backbones": {"daisy": {key: value for key, value in asdict(repo.backbone("daisy")).items() if key != "name"}},
        "default_backbone": "daisy",
        "matchers": {
            name: {"method": repo.matcher(name).method, "params": dict(repo.matcher(name).params)} for name in MATCHERS
        },
        "cluster": {"n_workers": 1, "processes": False, "threads_per_worker": 1},
    }
    (root / "catalog.yaml").write_text(yaml.safe_dump(body))
    return load_catalog(root / "catalog.yaml", environ={})


def run_fixtures(root: Path, willow_pairs: int) -> pd.DataFrame:
    """Download (hand-placed archives), normalise, extract DAISY features and match PF-WILLOW (a fixed sample
    of ``willow_pairs`` pairs) and TSS with its mirrored pairs under ``root``; the run's pairs table."""
    catalog = fixture_catalog(root)
    willow = root / "PF-dataset-WILLOW.zip"
    if not willow.exists():
        shutil.make_archive(str(willow.with_suffix("")), "zip", root_dir=FIXTURES / "pf-willow", base_dir=willow.stem)
    tss = root / "tss" / "TSS_CVPR2016.zip"
    if not tss.exists():
        tss_with_mirrored(root)
    for dataset, archive, max_pairs in (("tss", tss, None), ("pf-willow", willow, willow_pairs)):
        options = RunOptions(archives={dataset: (archive,)}, progress=False, max_pairs=max_pairs)
        run_stages(catalog, ("download", "normalize", "features", "match"), (dataset,), options)
    return read_results(run_dir(catalog.stores.outputs, "default"))


def fixtures_table(root: Path, willow_pairs: int) -> list[str]:
    """Table 2's Markdown lines: PF-WILLOW PCK@0.1 per image and TSS T5 without, with only and with all its
    mirrored (flip_gt 1) directions, per matcher; and how often the mirrored orientation was kept."""
    pairs = run_fixtures(root, willow_pairs)
    willow = pairs[pairs["dataset"] == "pf-willow"]
    tss = pairs[pairs["dataset"] == "tss"]
    lines = [
        f"| matcher | PF-WILLOW PCK@0.1 ({willow['pair_id'].nunique()} pairs) | TSS T5 w/o flip "
        f"({(~tss['flip']).sum() // tss['matcher'].nunique()}) | TSS T5 flipped | TSS T5 all "
        "| kept mirrored: PF-WILLOW / TSS w/o flip / TSS flipped |",
        "|---|---|---|---|---|---|",
    ]
    for name in MATCHERS:
        rows = {part: frame[frame["matcher_name"] == name] for part, frame in (("willow", willow), ("tss", tss))}
        at_01 = [
            float(pck[list(alphas).index(0.1)])
            for alphas, pck in zip(rows["willow"]["alphas"], rows["willow"]["pck"], strict=True)
        ]
        t5 = np.array([accuracy[4] for accuracy in rows["tss"]["flow_accuracy"]])
        flipped = rows["tss"]["flip"].to_numpy()
        mirrored = [
            int((frame["orientation"] == "mirrored").sum())
            for frame in (rows["willow"], rows["tss"][~flipped], rows["tss"][flipped])
        ]
        cells = [100 * np.mean(at_01), 100 * t5[~flipped].mean(), 100 * t5[flipped].mean(), 100 * t5.mean()]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{value:.1f}" for value in cells)
            + " | "
            + " / ".join(map(str, mirrored))
            + " |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    """Print both tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2, help="warps per photo and case")
    parser.add_argument("--willow-pairs", type=int, default=120, help="PF-WILLOW pairs (a fixed sample)")
    parser.add_argument("--tables", choices=("warped", "fixtures", "both"), default="both")
    parser.add_argument(
        "--workdir", type=Path, help="the fixtures run's folder, kept (reruns reuse its features); default: temporary"
    )
    args = parser.parse_args(argv)
    if args.tables != "fixtures":
        print("\n".join(warped_table(args.seeds)))
        print()
    if args.tables != "warped":
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            print("\n".join(fixtures_table(args.workdir, args.willow_pairs)))
            return
        with tempfile.TemporaryDirectory() as root:
            print("\n".join(fixtures_table(Path(root), args.willow_pairs)))


if __name__ == "__main__":
    main()
