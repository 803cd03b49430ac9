"""Wanda (Sun et al. 2024; 004 §4.1.2): keep the largest |W_ij| * ||X_j||_2 of every output row, rank 0.

The metric is |W D| with D = sqrt(diag H): hard-thresholding W D solves the layer objective with H
replaced by its diagonal. Comparison groups are output rows (Wanda's default); N:M along the input.
"""

from __future__ import annotations

import torch

from .base import Target
from .lowrank import input_norms, zero_factors
from .projections import sparsity_mask


def decompose(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    target: Target,
    *,
    scope: str = "row",
    history: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """S = W on the top-|W_ij| ||X_j|| entries (per output row by default); U, V = 0."""
    weight = weight.float()
    sparse = weight * sparsity_mask((weight * input_norms(hessian)).abs(), target, scope)
    return (sparse, *zero_factors(*weight.shape, target.rank, weight))
