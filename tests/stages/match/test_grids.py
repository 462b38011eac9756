"""The feature grids every matcher takes: their checks, and the cosine similarity against a numpy oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from stages.match.grids import check_grids, cosine_similarity


def grids(seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    src = torch.randn(2, 3, 4, 6, generator=generator, dtype=torch.float64).to(dtype)
    trg = torch.randn(2, 5, 2, 6, generator=generator, dtype=torch.float64).to(dtype)
    return src, trg


def test_missing_masks_mean_every_patch_is_valid_and_given_masks_are_returned():
    src, trg = grids()
    src_valid, trg_valid = check_grids(src, trg, None, None)
    assert src_valid.shape == (2, 3, 4) and trg_valid.shape == (2, 5, 2)
    assert src_valid.all() and trg_valid.all() and src_valid.dtype == torch.bool
    mask = torch.ones(2, 5, 2, dtype=torch.bool)
    mask[1, 0, 0] = False
    assert torch.equal(check_grids(src, trg, None, mask)[1], mask)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda src, trg: (src[0], trg, None, None), r"feature grids must be \[B, H, W, C\]; got src \(3, 4, 6\)"),
        (lambda src, trg: (src, trg[:1], None, None), r"must agree on the batch size and the channels"),
        (lambda src, trg: (src, trg[..., :5], None, None), r"must agree on the batch size and the channels"),
        (
            lambda src, trg: (src, trg, torch.ones(2, 2, 4, dtype=torch.bool), None),
            r"src_valid must be a bool mask of shape \(2, 3, 4\); got torch.bool \(2, 2, 4\)",
        ),
        (
            lambda src, trg: (src, trg, None, torch.ones(2, 5, 2)),
            r"trg_valid must be a bool mask of shape \(2, 5, 2\); got torch.float32",
        ),
        (
            lambda src, trg: (src, trg, torch.tensor([True, False])[:, None, None].expand(2, 3, 4), None),
            r"src grids of pairs \[1\] have no valid patch",
        ),
    ],
)
def test_bad_grids_or_masks_are_one_error_naming_the_side_and_the_shapes(change, message):
    with pytest.raises(PipelineError, match=message):
        check_grids(*change(*grids()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_cosine_similarity_equals_an_explicit_numpy_cosine_in_at_least_float32(dtype):
    src, trg = grids(seed=3, dtype=dtype)
    similarity = cosine_similarity(src, trg)
    assert similarity.shape == (2, 12, 10) and similarity.dtype == torch.promote_types(dtype, torch.float32)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6  # float32 arithmetic on exact float16 inputs
    for b in range(2):
        s, t = src[b].reshape(12, 6).double().numpy(), trg[b].reshape(10, 6).double().numpy()
        cosine = (s @ t.T) / np.linalg.norm(s, axis=1)[:, None] / np.linalg.norm(t, axis=1)[None, :]
        np.testing.assert_allclose(similarity[b].double().numpy(), cosine, atol=tolerance)
