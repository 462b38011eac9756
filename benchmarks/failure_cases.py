"""The GWOT paper's failure cases (mirrored poses, objects of other sizes) and the matchers that address them.

Prints two Markdown tables.

1. Warped photos: scikit-image's photographs under seeded smooth warps (the demo's :func:`draw_pair`), in
   the cases normal, mirrored and target object at 0.5x, 0.7x, 1.4x and 2.0x, with DAISY features on a
   28 x 28 patch grid (the ``daisy`` backbone at a 392-px canvas) and with a flip-invariant variant (the
   normalised sum of DAISY and the mirrored DAISY of the mirrored image, which imitates DINOv2's roughly
   flip-invariant semantic features). Rows NN, gwot, gwot-flip, gwot-scale, gwot-robust (the repository
   catalog's matchers, solved by the match stage's own :func:`solve`); PCK@0.05 and PCK@0.1 of the target
   image's larger side, and seconds per pair.
2. Real fixtures (``../shared/fixtures``): PF-WILLOW's 4 classes (30 ordered pairs per class, PCK@0.1 of the
   keypoints' extent) and TSS's 3 pairs (6 directions, T5 flow accuracy), each also with its target
   mirrored (keypoints and flows mirrored with it), DAISY features of the catalog's ``daisy`` backbone.

Usage (from the repository root): python -m benchmarks.failure_cases [--seeds 2] [--willow-pairs 30]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.catalog import REPO_CATALOG, DatasetSpec, load_catalog
from stages.datasets.common import BadItems
from stages.datasets.demo import PHOTOS, draw_pair, load_photo, render_target
from stages.datasets.flo import UNKNOWN_FLOW, flow_validity, read_flo
from stages.datasets.pfwillow import normalize as normalize_willow
from stages.datasets.tss import normalize as normalize_tss
from stages.evaluate.pck import reference_length
from stages.evaluate.tss import score_direction
from stages.features.backbones import Backbone, create_backbone
from stages.features.canvas import CanvasTransform, image_to_canvas
from stages.match import dense_flow, transfer_keypoints
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


@dataclass(frozen=True)
class Pair:
    """One pair's features (``[H, W, C]``), canvases and ground truth (keypoints, or a flow)."""

    src: torch.Tensor
    src_flipped: torch.Tensor
    src_valid: torch.Tensor
    trg: torch.Tensor
    trg_valid: torch.Tensor
    transforms: tuple[CanvasTransform, CanvasTransform]
    src_kps: np.ndarray | None = None
    trg_kps: np.ndarray | None = None
    ref_length: float | None = None
    flow: np.ndarray | None = None  # ground truth on the source grid (TSS)
    trg_size: tuple[int, int] | None = None


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


def mirror_keypoints(points: np.ndarray, width: int) -> np.ndarray:
    """Keypoints ``[K, 2]`` of an image mirrored left-right (pixel centres: x becomes ``width - 1 - x``)."""
    return np.stack([width - 1 - points[:, 0], points[:, 1]], 1)


def willow_pairs(features, per_class: int) -> tuple[list[Pair], list[Pair]]:
    """PF-WILLOW fixture pairs (every third ordered pair of a class, ``per_class`` at most) and the same pairs
    with their target mirrored."""
    root = FIXTURES / "pf-willow"
    images, pairs = normalize_willow(root, DatasetSpec(name="pf-willow", kind="pf-willow"), BadItems("pf-willow"))
    paths = {row["image_id"]: root / row["path"] for row in images.to_pylist()}
    chosen = [
        row
        for _, rows in itertools.groupby(pairs.to_pylist(), key=lambda row: row["category"])
        for row in list(rows)[::3][:per_class]
    ]
    originals, mirrored = [], []
    for row in chosen:
        src, trg = (
            np.asarray(Image.open(paths[row[side]]).convert("RGB")) for side in ("src_image_id", "trg_image_id")
        )
        src_kps, trg_kps = np.asarray(row["src_kps"]), np.asarray(row["trg_kps"])
        length = reference_length("trg_kps", trg_kps=trg_kps)
        originals.append(make_pair(features, src, trg, src_kps=src_kps, trg_kps=trg_kps, ref_length=length))
        flipped_kps = mirror_keypoints(trg_kps, trg.shape[1])
        mirrored.append(make_pair(features, src, trg[:, ::-1], src_kps=src_kps, trg_kps=flipped_kps, ref_length=length))
    return originals, mirrored


def mirror_flow(flow: np.ndarray, trg_width: int) -> np.ndarray:
    """A source-grid flow into a target that is then mirrored left-right (unknown vectors stay unknown)."""
    xs = np.arange(flow.shape[1], dtype=np.float32)[None, :]
    known = flow_validity(flow)
    mirrored_x = (trg_width - 1 - (xs + flow[..., 0])) - xs
    return np.stack([np.where(known, mirrored_x, UNKNOWN_FLOW), flow[..., 1]], -1).astype(np.float32)


def tss_pairs(features) -> tuple[list[Pair], list[Pair]]:
    """TSS fixture directions and the same directions with their target mirrored."""
    root = FIXTURES / "tss"
    images, pairs = normalize_tss(root, DatasetSpec(name="tss", kind="tss"), BadItems("tss"))
    paths = {row["image_id"]: root / row["path"] for row in images.to_pylist()}
    originals, mirrored = [], []
    for row in pairs.to_pylist():
        src, trg = (
            np.asarray(Image.open(paths[row[side]]).convert("RGB")) for side in ("src_image_id", "trg_image_id")
        )
        flow = read_flo(root / row["flow_path"])
        size = (trg.shape[1], trg.shape[0])
        originals.append(make_pair(features, src, trg, flow=flow, trg_size=size))
        mirrored.append(make_pair(features, src, trg[:, ::-1], flow=mirror_flow(flow, trg.shape[1]), trg_size=size))
    return originals, mirrored


def stack(pairs: Sequence[Pair], name: str) -> torch.Tensor:
    """One field of every pair, stacked into a batch."""
    return torch.stack([getattr(pair, name) for pair in pairs])


def score(setting: MatcherSetting, pairs: Sequence[Pair], batch_size: int = 8) -> tuple[np.ndarray, float]:
    """Per pair: PCK at :data:`ALPHAS` (keypoint pairs) or T1..T50 (flow pairs); and seconds per pair."""
    scores, seconds = [], 0.0
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        fields = [stack(batch, name) for name in ("src", "trg", "src_valid", "trg_valid", "src_flipped")]
        began = time.perf_counter()
        solution = solve(setting, *fields)
        seconds += time.perf_counter() - began
        for pair, pair_scores in zip(batch, solution.scores, strict=True):
            if pair.flow is not None:
                flow = dense_flow(pair_scores, *pair.transforms, **readout_options(setting))
                scores.append(score_direction(flow, pair.flow, pair.trg_size))
                continue
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
            cells, seconds = [], []
            for pairs in cases.values():
                pck, per_pair = score(setting, pairs)
                cells.append(f"{pck[:, 0].mean():.2f} / {pck[:, 1].mean():.2f}")
                seconds.append(per_pair)
            lines.append(f"| {label} | {name} | " + " | ".join(cells) + f" | {np.mean(seconds):.2f} |")
    return lines


def fixtures_table(willow_per_class: int) -> list[str]:
    """Table 2's Markdown lines."""
    spec = load_catalog(REPO_CATALOG, environ={}).backbone("daisy")
    backbone = create_backbone(
        spec.model, weights=spec.weights, image_size=spec.image_size, layer=spec.layer, flip=True
    )
    features = memoised(lambda image: image_features(backbone, image))
    willow, willow_mirrored = willow_pairs(features, willow_per_class)
    tss, tss_mirrored = tss_pairs(features)
    lines = [
        f"| matcher | PF-WILLOW PCK@0.1 ({len(willow)} pairs) | mirrored targets | all "
        f"| TSS T5 ({len(tss)} directions) | mirrored targets | all |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, setting in settings(backbone.image_size).items():
        willow_scores = [score(setting, pairs)[0][:, 1] for pairs in (willow, willow_mirrored)]
        tss_scores = [score(setting, pairs)[0][:, 4] for pairs in (tss, tss_mirrored)]
        cells = [
            f"{100 * values.mean():.1f}"
            for group in (willow_scores, tss_scores)
            for values in (*group, np.concatenate(group))
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    """Print both tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2, help="warps per photo and case")
    parser.add_argument("--willow-pairs", type=int, default=30, help="PF-WILLOW pairs per class")
    args = parser.parse_args(argv)
    print("\n".join(warped_table(args.seeds)))
    print()
    print("\n".join(fixtures_table(args.willow_pairs)))


if __name__ == "__main__":
    main()
