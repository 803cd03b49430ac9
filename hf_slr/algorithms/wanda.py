"""Wanda: keep the largest |W_ij| * ||X_j||_2 of every output row, rank 0.

"A Simple and Effective Pruning Approach for Large Language Models" (Sun, Liu, Bair & Kolter,
2024); HASSLE-free (Makni et al., 2025) §4.1.2. The metric is |W D| with D = sqrt(diag H):
hard-thresholding W D solves the layer objective with H replaced by its diagonal. Comparison
groups are output rows (Wanda's default); N:M along the input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Algorithm, Decomposition, Target
from .hyperparameters import hyperparameter
from .lowrank import input_norms, zero_factors
from .projections import SCOPES, sparsity_mask


@dataclass(frozen=True)
class WandaHyperparameters:
    """Hyperparameters of Wanda."""

    scope: str = hyperparameter("row", choices=SCOPES, doc="comparison group: output row (Wanda's default) or matrix")


def decompose(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    target: Target,
    hyperparameters: WandaHyperparameters,
    record_history: bool = True,
) -> Decomposition:
    """S = W on the top-|W_ij| ||X_j|| entries (per output row by default); U, V = 0."""
    weight = weight.float()
    sparse = weight * sparsity_mask((weight * input_norms(hessian)).abs(), target, hyperparameters.scope)
    return Decomposition(sparse, *zero_factors(*weight.shape, target.rank, weight))


ALGORITHM = Algorithm(
    name="wanda",
    needs_hessian=True,
    hyperparameters=WandaHyperparameters,
    decompose=decompose,
    paper="A Simple and Effective Pruning Approach for Large Language Models (Sun, Liu, Bair & Kolter, 2024)",
    low_rank=False,
)
