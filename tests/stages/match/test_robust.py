"""Flip- and scale-aware GWOT: the mirrored solve's index mapping, batch independence, and real photos under
seeded warps (mirrored pairs recovered, normal pairs untouched, rescaled pairs matched better)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from stages.datasets.demo import PHOTOS, draw_pair, load_photo, render_target
from stages.features.backbones import create_backbone
from stages.features.canvas import CanvasTransform, image_to_canvas
from stages.match import TransportPlan, transfer_keypoints
from stages.match.gwot import gwot
from stages.match.robust import (
    estimate_scale,
    mirror_grid,
    neighbourhoods,
    order_agreement,
    robust_gwot,
)

FAST = {"outer_iters": 5, "inner_iters": 30}


def random_grids(seed: int, batch: int = 1, src: tuple[int, int] = (6, 7), trg: tuple[int, int] = (5, 6)):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, *src, 8, generator=generator),
        torch.randn(batch, *trg, 8, generator=generator),
        torch.randn(batch, *src, 8, generator=generator),
    )


def test_mirrored_solve_is_the_plain_solve_of_the_mirrored_grid_mapped_back():
    src, _, flipped = random_grids(0)
    trg = mirror_grid(flipped)[:, :, :, :] + 0.05 * torch.randn(1, 6, 7, 8, generator=torch.Generator().manual_seed(1))
    src_valid = torch.ones(1, 6, 7, dtype=torch.bool)
    src_valid[0, :, 0] = False  # an invalid column: its mirror image is the last column
    result = robust_gwot(src, trg, src_valid, None, src_flipped=flipped, flip="auto", **FAST)
    assert result.mirrored.tolist() == [True]
    direct = gwot(mirror_grid(flipped), trg, mirror_grid(src_valid), None, **FAST)
    torch.testing.assert_close(result.plan.dense(), direct.plan.mirror_rows((6, 7)).dense(), rtol=0, atol=1e-7)
    assert result.objective_mirrored.item() == pytest.approx(direct.objective.item())
    assert (
        result.plan.dense().reshape(6, 7, -1)[:, 0].sum() == 0
    )  # the invalid column stays empty in original coordinates
    plain = gwot(src, trg, src_valid, None, **FAST)
    assert result.objective.item() == pytest.approx(plain.objective.item())


def test_mirror_rows_moves_column_j_to_w_minus_1_minus_j():
    plan = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 6, 4)  # source grid 2 x 3, M = 4
    mapped = TransportPlan(plan).mirror_rows((2, 3)).dense().reshape(2, 3, 4)
    assert torch.equal(mapped[1, 0], plan.reshape(2, 3, 4)[1, 2])


@pytest.mark.parametrize(("flip", "scale"), list(itertools.product(("off", "auto"), repeat=2)))
def test_a_pair_alone_equals_the_pair_in_a_batch(flip, scale):
    src, trg, flipped = random_grids(2, batch=4, src=(9, 9), trg=(9, 9))
    # Pair 1 is pair 0 with its target at half the size: another scale group.
    trg[1] = (
        torch.nn.functional.interpolate(src[0].permute(2, 0, 1)[None], size=(5, 5), mode="bilinear")[0]
        .permute(1, 2, 0)
        .repeat(2, 2, 1)[:9, :9]
    )
    kwargs = {"src_flipped": flipped, "flip": flip, "scale": scale, **FAST}
    together = robust_gwot(src, trg, **kwargs)
    for b in range(4):
        alone = robust_gwot(
            src[b : b + 1], trg[b : b + 1], src_flipped=flipped[b : b + 1], flip=flip, scale=scale, **FAST
        )
        torch.testing.assert_close(together.plan.dense()[b : b + 1], alone.plan.dense(), rtol=0, atol=1e-6)
        assert together.mirrored[b] == alone.mirrored[0]
        assert (together.k_src[b], together.k_trg[b]) == (alone.k_src[0], alone.k_trg[0])


def test_neighbourhoods_follow_the_scale_outside_the_dead_zone():
    assert neighbourhoods(1.1, 5, (28, 28), (28, 28)) == (5, 5)
    assert neighbourhoods(2.0, 5, (28, 28), (28, 28)) == (5, 11)
    assert neighbourhoods(0.5, 5, (28, 28), (28, 28)) == (11, 5)
    assert neighbourhoods(4.0, 5, (28, 28), (8, 8)) == (5, 7)  # at most the grid's side


def test_order_agreement_is_one_for_a_copy_zero_for_a_mirrored_copy_and_a_half_for_noise():
    src, trg, _ = random_grids(4, batch=2, src=(12, 14), trg=(12, 14))
    # Every patch's nearest neighbour in an exact copy is itself: all pairs of matches keep their order...
    assert order_agreement(src, src).tolist() == [1.0, 1.0]
    # ... and in a mirrored copy every pair of matches at least MIN_SPAN apart swaps it.
    assert order_agreement(src, mirror_grid(src)).tolist() == [0.0, 0.0]
    # Unrelated features: the mutual matches are chance, and so is their order.
    assert order_agreement(src, trg).tolist() == pytest.approx([0.5, 0.5], abs=0.15)


def test_bad_options_are_named():
    src, trg, flipped = random_grids(3)
    with pytest.raises(PipelineError, match="flip must be one of off, auto, got 'yes'"):
        robust_gwot(src, trg, src_flipped=flipped, flip="yes")
    with pytest.raises(PipelineError, match="flip='auto' needs src_flipped"):
        robust_gwot(src, trg, flip="auto")


# Real photos under seeded warps: the demo's warps, DAISY features on a 20 x 20 grid.
GRID = 20


@pytest.fixture(scope="module")
def daisy():
    return create_backbone("daisy", weights="none", image_size=GRID * 14, layer="prenorm", flip=True)


def warped(daisy, mirrored: bool, zoom: float, seeds=(0, 1, 2)):
    """Features, mirrored-source features, canvases and keypoints of three photos under seeded warps."""
    items = []
    for seed, name in zip(seeds, ("astronaut", "chelsea", "rocket"), strict=True):
        src = load_photo(name, 320)
        # The first seeded draw that leaves 15 textured keypoints with valid flow (deterministic).
        warp, _, src_kps = next(
            drawn
            for attempt in itertools.count()
            if (
                drawn := draw_pair(
                    src, np.random.default_rng([seed, attempt]), mirrored=mirrored, zoom=zoom, n_keypoints=15
                )
            )
        )
        trg = render_target(src, warp)
        grids = []
        for image in (src, trg):
            transform = CanvasTransform.fit(image.shape[1], image.shape[0], daisy.image_size, daisy.patch_size)
            canvas = image_to_canvas(image, transform)[None]
            grids.append(
                (daisy(canvas), daisy.flipped(canvas), torch.from_numpy(transform.valid_patches())[None], transform)
            )
        items.append((grids, src_kps, warp.forward(src_kps), max(trg.shape[:2])))
    assert name in PHOTOS
    return items


def pck(items, **options) -> tuple[float, list[bool]]:
    """PCK@0.1 over the items' keypoints under robust_gwot(options), and the orientations kept."""
    hits, total, kept = 0, 0, []
    for (src, trg), src_kps, trg_kps, length in items:
        result = robust_gwot(src[0], trg[0], src[2], trg[2], src_flipped=src[1], **options)
        predicted = transfer_keypoints(result.plan[0], src_kps, src[3], trg[3])
        hits += int((np.linalg.norm(predicted - trg_kps, axis=1) <= 0.1 * length).sum())
        total += len(src_kps)
        kept.append(bool(result.mirrored[0]))
    return hits / total, kept


def test_gwot_flip_recovers_mirrored_pairs_and_leaves_normal_ones_alone(daisy):
    mirrored = warped(daisy, mirrored=True, zoom=1.0)
    plain_score, _ = pck(mirrored)
    flip_score, kept = pck(mirrored, flip="auto")
    assert kept == [True, True, True]
    assert flip_score >= plain_score + 0.3, (plain_score, flip_score)
    normal = warped(daisy, mirrored=False, zoom=1.0)
    assert pck(normal, flip="auto") == (pck(normal)[0], [False, False, False])


@pytest.mark.parametrize("zoom", [0.5, 2.0])
def test_gwot_scale_beats_gwot_on_rescaled_pairs(daisy, zoom):
    items = warped(daisy, mirrored=False, zoom=zoom)
    estimates = [estimate_scale(src[0], trg[0], src[2], trg[2]).scale.item() for (src, trg), *_ in items]
    if zoom < 1:
        assert estimates == pytest.approx([zoom] * len(items), rel=0.25)
    else:
        # The estimator's known weak point (README): across a 2x zoom DAISY's fixed radius matches few patches,
        # so estimates fall short (here 1.81, 1.16, 1.0), but never point the wrong way.
        assert min(estimates) >= 1.0 and max(estimates) == pytest.approx(zoom, rel=0.25)
    assert pck(items, scale="auto")[0] >= pck(items)[0] + 0.05
