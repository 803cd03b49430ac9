"""Pure low-rank baseline: S = 0, U V = truncated SVD of W.

Eckart-Young ("The approximation of one matrix by another of lower rank", Eckart & Young, 1936):
C_r(W) is the best rank-r approximation in Frobenius norm (HASSLE-free, Makni et al., 2025, §4.2.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Algorithm, Decomposition, Target
from .lowrank import truncated_svd


@dataclass(frozen=True)
class SvdHyperparameters:
    """The truncated SVD has no hyperparameters."""


def decompose(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    target: Target,
    hyperparameters: SvdHyperparameters,
    record_history: bool = True,
) -> Decomposition:
    """S = 0 (inside any sparsity set), U V = best rank-``target.rank`` approximation of W."""
    weight = weight.float()
    return Decomposition(torch.zeros_like(weight), *truncated_svd(weight, target.rank))


ALGORITHM = Algorithm(
    name="svd",
    needs_hessian=False,
    hyperparameters=SvdHyperparameters,
    decompose=decompose,
    paper="The approximation of one matrix by another of lower rank (Eckart & Young, 1936)",
    sparse=False,
)
