"""Pure low-rank baseline: S = 0, U V = truncated SVD of W (Eckart-Young; 004 §4.2.1, C_r(W))."""

from __future__ import annotations

import torch

from .base import Target
from .lowrank import truncated_svd

NEEDS_HESSIAN = False


def decompose(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    target: Target,
    *,
    history: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """S = 0 (inside any sparsity set), U V = best rank-``target.rank`` approximation of W."""
    weight = weight.float()
    return (torch.zeros_like(weight), *truncated_svd(weight, target.rank))
