"""Magnitude pruning: keep the largest |W|, rank 0.

Magnitude pruning (Han, Pool, Tran & Dally, 2015: "Learning both Weights and Connections for
Efficient Neural Networks"); HASSLE-free (Makni et al., 2025) §4.1.1 shows it is the optimum of the
layer objective for H = I.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Algorithm, Decomposition, Target
from .hyperparameters import hyperparameter
from .lowrank import zero_factors
from .projections import SCOPES, sparsity_mask


@dataclass(frozen=True)
class MagnitudeHyperparameters:
    """Hyperparameters of magnitude pruning."""

    scope: str = hyperparameter(
        "matrix", choices=SCOPES, doc="top-|W| over the whole matrix (the H = I optimum) or per output row"
    )


def magnitude_prune(weight: torch.Tensor, target: Target, scope: str) -> torch.Tensor:
    """Hard-threshold W: keep its largest |W_ij| per matrix or per row (N:M per group if set)."""
    return weight * sparsity_mask(weight.abs(), target, scope)


def decompose(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    target: Target,
    hyperparameters: MagnitudeHyperparameters,
    record_history: bool = True,
) -> Decomposition:
    """S = HT(W) over the whole matrix (``scope="matrix"``, the H = I optimum) or per row; U, V = 0."""
    weight = weight.float()
    sparse = magnitude_prune(weight, target, hyperparameters.scope)
    return Decomposition(sparse, *zero_factors(*weight.shape, target.rank, weight))


ALGORITHM = Algorithm(
    name="magnitude",
    needs_hessian=False,
    hyperparameters=MagnitudeHyperparameters,
    decompose=decompose,
    paper="Learning both Weights and Connections for Efficient Neural Networks (Han, Pool, Tran & Dally, 2015)",
    low_rank=False,
)
