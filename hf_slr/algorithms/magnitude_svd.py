"""Data-free sparse + low-rank in one shot: magnitude pruning, then the truncated SVD of the rest.

S = HT(W), L = C_r(W - S) (HASSLE-free, Makni et al., 2025, §4.1.1 and §4.2.1): the first
alternation of OATS (Zhang & Papyan, 2025) with H = I.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Algorithm, Decomposition, Target
from .splits import RankRatio
from .hyperparameters import hyperparameter
from .lowrank import truncated_svd
from .magnitude import magnitude_prune
from .projections import SCOPES


@dataclass(frozen=True)
class MagnitudeSvdHyperparameters:
    """Hyperparameters of magnitude pruning + SVD."""

    scope: str = hyperparameter(
        "matrix", choices=SCOPES, doc="magnitude pruning over the whole matrix or per output row"
    )


def decompose(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    target: Target,
    hyperparameters: MagnitudeSvdHyperparameters,
    record_history: bool = True,
) -> Decomposition:
    """Magnitude-prune W to ``target`` (per matrix by default, per row with ``scope="row"``), then
    U V = best rank-``target.rank`` approximation of W - S."""
    weight = weight.float()
    sparse = magnitude_prune(weight, target, hyperparameters.scope)
    return Decomposition(sparse, *truncated_svd(weight - sparse, target.rank))


ALGORITHM = Algorithm(
    name="magnitude_svd",
    needs_hessian=False,
    hyperparameters=MagnitudeSvdHyperparameters,
    decompose=decompose,
    split=RankRatio(0.3),  # the OATS rule HASSLE-free 004 App. A.3 applies to every baseline
    paper="Magnitude pruning (Han, Pool, Tran & Dally, 2015) followed by the Eckart-Young truncated SVD "
    "(Eckart & Young, 1936); the H = I case of HASSLE-free (Makni et al., 2025)",
)
