"""Activation-aware SVD: S = 0, U V = D^-1-rescaled truncated SVD of W D, D = sqrt(diag H).

004 Theorem 4.1 (in the [out, in] convention: M* = C_r(W D) D^-1): the exact minimiser of the layer
objective with H replaced by its diagonal.
"""

from __future__ import annotations

import torch

from .base import Target
from .lowrank import input_norms, truncated_svd


def decompose(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    target: Target,
    *,
    history: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """S = 0; U, V with U V = C_r(W D) D^-1 (dead channels: see ``lowrank.input_norms``)."""
    weight = weight.float()
    scale = input_norms(hessian)
    u, v = truncated_svd(weight * scale, target.rank)
    return torch.zeros_like(weight), u, v / scale
