"""Batches of patch feature grids, as every matcher takes them: their checks and the cosine similarity between them."""

from __future__ import annotations

import torch

from pipeline.errors import PipelineError


def check_grids(
    src_feats: torch.Tensor,
    trg_feats: torch.Tensor,
    src_valid: torch.Tensor | None,
    trg_valid: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check two batches of feature grids ``[B, H, W, C]`` and return their validity masks ``[B, H, W]``.

    A missing mask means every patch is valid; every pair needs at least one valid patch on each side.
    """
    if src_feats.ndim != 4 or trg_feats.ndim != 4:
        raise PipelineError(
            f"feature grids must be [B, H, W, C]; got src {tuple(src_feats.shape)}, trg {tuple(trg_feats.shape)}"
        )
    if src_feats.shape[0] != trg_feats.shape[0] or src_feats.shape[3] != trg_feats.shape[3]:
        raise PipelineError(
            "src and trg feature grids must agree on the batch size and the channels; "
            f"got src {tuple(src_feats.shape)}, trg {tuple(trg_feats.shape)}"
        )
    masks = []
    for side, feats, valid in (("src", src_feats, src_valid), ("trg", trg_feats, trg_valid)):
        if valid is None:
            valid = torch.ones(feats.shape[:3], dtype=torch.bool, device=feats.device)
        if valid.shape != feats.shape[:3] or valid.dtype != torch.bool:
            raise PipelineError(
                f"{side}_valid must be a bool mask of shape {tuple(feats.shape[:3])}; "
                f"got {valid.dtype} {tuple(valid.shape)}"
            )
        empty = (~valid.flatten(1).any(1)).nonzero().flatten().tolist()
        if empty:
            raise PipelineError(f"{side} grids of pairs {empty} have no valid patch; expected at least one")
        masks.append(valid.to(feats.device))
    return masks[0], masks[1]


def cosine_similarity(src_feats: torch.Tensor, trg_feats: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every source patch to every target patch: ``[B, Hs, Ws, C] x [B, Ht, Wt, C] ->
    [B, N, M]``, computed in at least float32 (half-precision features are upcast)."""
    dtype = torch.promote_types(src_feats.dtype, torch.float32)
    src = torch.nn.functional.normalize(src_feats.flatten(1, 2).to(dtype), dim=-1)
    trg = torch.nn.functional.normalize(trg_feats.flatten(1, 2).to(dtype), dim=-1)
    return torch.bmm(src, trg.transpose(1, 2))
