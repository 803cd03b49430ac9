"""OATS: "OATS: Outlier-Aware Pruning Through Sparse and Low Rank Decomposition" (Zhang & Papyan, 2025).

As analysed in HASSLE-free (Makni et al., 2025; 004 §4.2.2, Theorem 4.1, Corollary 4.2):
alternating minimisation of ||(W - S - L) D||_F with D = sqrt(diag H): the low-rank step is the
truncated SVD C_r((W - S) D) (Theorem 4.1), the sparse step hard-thresholds (W - L) D (004 §4.1.2,
the Wanda metric) per output row as in the authors' code; 80 iterations (004 §5, "default value used
in OATS"). OATS sets rank = int(rank_ratio * (1 - sparsity) * out*in / (out + in)), rank_ratio 0.25
or 0.3; here the split is the caller's ``target``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .alternating import scaled_alternating_minimization
from .base import Algorithm, Decomposition, Target
from .splits import RankRatio
from .hyperparameters import hyperparameter
from .lowrank import truncated_svd
from .projections import SCOPES


@dataclass(frozen=True)
class OatsHyperparameters:
    """Hyperparameters of OATS (paper defaults)."""

    iterations: int = hyperparameter(80, low=1, doc="alternations (the default value used in OATS)")
    scope: str = hyperparameter("row", choices=SCOPES, doc="support of S per output row (authors' code) or per matrix")


def decompose(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    target: Target,
    hyperparameters: OatsHyperparameters,
    record_history: bool = True,
) -> Decomposition:
    """OATS: ``iterations`` alternations of L~ = C_r(W~ - S~), S~ = HT(W~ - L~), W~ = W D."""
    return scaled_alternating_minimization(
        weight,
        hessian,
        target,
        iterations=hyperparameters.iterations,
        low_rank_step=lambda matrix, _previous_v: truncated_svd(matrix, target.rank),
        scope=hyperparameters.scope,
        record_history=record_history,
    )


ALGORITHM = Algorithm(
    name="oats",
    needs_hessian=True,
    hyperparameters=OatsHyperparameters,
    decompose=decompose,
    split=RankRatio(0.3),  # "default value in OATS for the Llama3-8B model" (004 App. A.3)
    paper="OATS: Outlier-Aware Pruning Through Sparse and Low Rank Decomposition (Zhang & Papyan, 2025)",
)
