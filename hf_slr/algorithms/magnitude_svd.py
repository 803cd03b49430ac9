"""Data-free sparse + low-rank in one shot: magnitude pruning, then the truncated SVD of the rest.

S = HT(W) (004 §4.1.1), L = C_r(W - S) (004 §4.2.1): the first alternation of OATS with H = I.
"""

from __future__ import annotations

import torch

from .base import Target
from .lowrank import truncated_svd
from .magnitude import magnitude_prune

NEEDS_HESSIAN = False


def decompose(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    target: Target,
    *,
    scope: str = "matrix",
    history: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Magnitude-prune W to ``target`` (per matrix by default, per row with ``scope="row"``), then
    U V = best rank-``target.rank`` approximation of W - S."""
    weight = weight.float()
    sparse = magnitude_prune(weight, target, scope)
    return (sparse, *truncated_svd(weight - sparse, target.rank))
