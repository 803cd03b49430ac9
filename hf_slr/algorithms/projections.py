"""Projections onto the sparsity set: boolean keep-masks (True = kept) of a score matrix.

Every mask keeps exactly the number of entries the :class:`Target` asks for (ties are broken by
``torch.topk``), so the result of any method built on these satisfies its target exactly.
"""

from __future__ import annotations

import torch

from .base import Target

__all__ = ["mask_topk_per_row", "mask_topk_matrix", "mask_nm", "sparsity_mask"]


def _keep_indices(scores: torch.Tensor, kept: int, dim: int) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if kept > 0:
        mask.scatter_(dim, scores.topk(kept, dim=dim).indices, True)
    return mask


def mask_topk_per_row(scores: torch.Tensor, kept_per_row: int) -> torch.Tensor:
    """Keep the ``kept_per_row`` largest scores of every row."""
    return _keep_indices(scores, min(kept_per_row, scores.shape[-1]), dim=-1)


def mask_topk_matrix(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """Keep the ``kept`` largest scores of the whole matrix."""
    return _keep_indices(scores.reshape(-1), min(kept, scores.numel()), dim=0).view_as(scores)


def mask_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M pattern along the input (last) dimension: keep the N largest of every M consecutive columns.

    Trailing columns that do not fill a whole group are pruned, matching ``Target.kept_per_row``.
    """
    rows, cols = scores.shape
    full = cols // m * m
    mask = torch.zeros_like(scores, dtype=torch.bool)
    groups = scores[:, :full].reshape(rows, cols // m, m)
    mask[:, :full] = _keep_indices(groups, n, dim=-1).reshape(rows, full)
    return mask


def sparsity_mask(scores: torch.Tensor, target: Target, scope: str = "row") -> torch.Tensor:
    """Keep-mask of ``scores`` [out, in] for ``target``: N:M if set, else top-k per row or per matrix."""
    if target.nm_pattern is not None:
        return mask_nm(scores, *target.nm_pattern)
    if scope == "row":
        return mask_topk_per_row(scores, target.kept_per_row(scores.shape[1]))
    if scope == "matrix":
        return mask_topk_matrix(scores, target.kept_total(*scores.shape))
    raise ValueError(f"scope must be 'row' or 'matrix', got {scope!r}")
