"""Magnitude pruning: keep the largest |W| (004 §4.1.1: the optimum of the layer objective for H = I)."""

from __future__ import annotations

import torch

from .base import Target
from .lowrank import zero_factors
from .projections import sparsity_mask

NEEDS_HESSIAN = False


def magnitude_prune(weight: torch.Tensor, target: Target, scope: str) -> torch.Tensor:
    """Hard-threshold W: keep its largest |W_ij| per matrix or per row (N:M per group if set)."""
    return weight * sparsity_mask(weight.abs(), target, scope)


def decompose(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    target: Target,
    *,
    scope: str = "matrix",
    history: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """S = HT(W) over the whole matrix (``scope="matrix"``, the H = I optimum) or per row; U, V = 0."""
    weight = weight.float()
    return (magnitude_prune(weight, target, scope), *zero_factors(*weight.shape, target.rank, weight))
