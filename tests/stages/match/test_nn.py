"""Nearest-neighbour matching against a per-patch numpy oracle."""

from __future__ import annotations

import numpy as np
import torch

from stages.match.nn import nn_match


def grids(seed=0):
    generator = torch.Generator().manual_seed(seed)
    src = torch.randn(2, 3, 4, 6, generator=generator, dtype=torch.float64)
    trg = torch.randn(2, 5, 2, 6, generator=generator, dtype=torch.float64)
    src_valid, trg_valid = torch.ones(2, 3, 4, dtype=torch.bool), torch.ones(2, 5, 2, dtype=torch.bool)
    src_valid[0, 0, 0], trg_valid[1, 4, :] = False, False
    return src, trg, src_valid, trg_valid


def test_similarity_and_argmax_equal_an_explicit_cosine_search():
    src, trg, src_valid, trg_valid = grids()
    result = nn_match(src, trg, src_valid, trg_valid)
    for b in range(2):
        s, t = src[b].reshape(12, 6).numpy(), trg[b].reshape(10, 6).numpy()
        cosine = (s @ t.T) / np.linalg.norm(s, axis=1)[:, None] / np.linalg.norm(t, axis=1)[None, :]
        valid_columns = trg_valid[b].flatten().numpy()
        np.testing.assert_allclose(result.similarity[b][:, valid_columns].numpy(), cosine[:, valid_columns], rtol=1e-12)
        assert torch.all(result.similarity[b][:, ~valid_columns] == -torch.inf)
        expected = np.flatnonzero(valid_columns)[cosine[:, valid_columns].argmax(1)]
        np.testing.assert_array_equal(result.indices[b].numpy(), expected)
    np.testing.assert_array_equal(result.keep.numpy(), src_valid.flatten(1).numpy())


def test_mutual_filter_keeps_exactly_the_mutual_nearest_neighbours():
    src, trg, src_valid, trg_valid = grids(seed=1)
    result = nn_match(src, trg, src_valid, trg_valid, mutual=True)
    similarity = result.similarity.numpy()
    for b, i in np.ndindex(2, 12):
        j = result.indices[b, i].item()
        column = np.where(src_valid[b].flatten().numpy(), similarity[b, :, j], -np.inf)
        assert result.keep[b, i].item() == (bool(src_valid[b].flatten()[i]) and column.argmax() == i)
    assert 0 < result.keep.sum() < src_valid.sum()


def test_identical_grids_match_themselves_mutually():
    src, _, _, _ = grids(seed=2)
    result = nn_match(src, src, mutual=True)
    np.testing.assert_array_equal(result.indices.numpy(), np.tile(np.arange(12), (2, 1)))
    assert result.keep.all()
