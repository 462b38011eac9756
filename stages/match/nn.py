"""Nearest-neighbour matching of patch feature grids by cosine similarity (the baseline matcher)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.match.grids import check_grids, cosine_similarity


@dataclass(frozen=True)
class NNResult:
    """Cosine similarity ``[B, N, M]`` (``-inf`` in invalid target columns), the best target per source
    patch ``indices [B, N]``, and ``keep [B, N]``: valid source patches (that are mutual NNs if asked)."""

    similarity: torch.Tensor
    indices: torch.Tensor
    keep: torch.Tensor


def nn_match(
    src_feats: torch.Tensor,
    trg_feats: torch.Tensor,
    src_valid: torch.Tensor | None = None,
    trg_valid: torch.Tensor | None = None,
    *,
    mutual: bool = False,
) -> NNResult:
    """Match each source patch to its most similar valid target patch.

    ``src_feats [B, Hs, Ws, C]``, ``trg_feats [B, Ht, Wt, C]``, validity masks ``[B, H, W]`` (None: all
    valid). With ``mutual`` a match is kept only if the source patch is also the target's best valid source.
    """
    src_valid, trg_valid = check_grids(src_feats, trg_feats, src_valid, trg_valid)
    similarity = cosine_similarity(src_feats, trg_feats)
    similarity = similarity.masked_fill(~trg_valid.flatten(1)[:, None, :], -torch.inf)
    indices = similarity.argmax(2)
    keep = src_valid.flatten(1).clone()
    if mutual:
        reverse = similarity.masked_fill(~keep[:, :, None], -torch.inf).argmax(1)  # best source per target
        sources = torch.arange(similarity.shape[1], device=similarity.device)
        keep &= reverse.gather(1, indices) == sources
    return NNResult(similarity=similarity, indices=indices, keep=keep)
