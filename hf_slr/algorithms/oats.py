"""OATS (Zhang & Papyan 2025; 004 §4.2.2, Theorem 4.1, Corollary 4.2).

Alternating minimisation of ||(W - S - L) D||_F with D = sqrt(diag H): the low-rank step is the
truncated SVD C_r((W - S) D) (Theorem 4.1), the sparse step hard-thresholds (W - L) D (004 §4.1.2,
the Wanda metric) per output row as in the authors' code; 80 iterations (004 §5, "default value used
in OATS"). OATS sets rank = int(rank_ratio * (1 - sparsity) * out*in / (out + in)), rank_ratio 0.25
or 0.3; here the split is the caller's ``target``.
"""

from __future__ import annotations

import torch

from .alternating import scaled_alternating_minimization
from .base import Target
from .lowrank import truncated_svd


def decompose(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    target: Target,
    *,
    iterations: int = 80,
    scope: str = "row",
    history: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OATS: ``iterations`` alternations of L~ = C_r(W~ - S~), S~ = HT(W~ - L~), W~ = W D."""
    return scaled_alternating_minimization(
        weight,
        hessian,
        target,
        iterations=iterations,
        low_rank_step=lambda matrix, _previous_v: truncated_svd(matrix, target.rank),
        scope=scope,
        history=history,
    )
