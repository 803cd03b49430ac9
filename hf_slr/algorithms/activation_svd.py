"""Activation-aware SVD: S = 0, U V = D^-1-rescaled truncated SVD of W D, D = sqrt(diag H).

"HASSLE-free: A unified Framework for Sparse plus Low-Rank Matrix Decomposition for LLMs" (Makni,
Behdin, Xu, Ponomareva & Mazumder, 2025), Theorem 4.1 (in the [out, in] convention:
M* = C_r(W D) D^-1): the exact minimiser of the layer objective with H replaced by its diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Algorithm, Decomposition, Target
from .lowrank import input_norms, truncated_svd


@dataclass(frozen=True)
class ActivationSvdHyperparameters:
    """The activation-aware SVD has no hyperparameters."""


def decompose(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    target: Target,
    hyperparameters: ActivationSvdHyperparameters,
    record_history: bool = True,
) -> Decomposition:
    """S = 0; U, V with U V = C_r(W D) D^-1 (dead channels: see ``lowrank.input_norms``)."""
    weight = weight.float()
    scale = input_norms(hessian)
    u, v = truncated_svd(weight * scale, target.rank)
    return Decomposition(torch.zeros_like(weight), u, v / scale)


ALGORITHM = Algorithm(
    name="activation_svd",
    needs_hessian=True,
    hyperparameters=ActivationSvdHyperparameters,
    decompose=decompose,
    paper="HASSLE-free: A unified Framework for Sparse plus Low-Rank Matrix Decomposition for LLMs "
    "(Makni, Behdin, Xu, Ponomareva & Mazumder, 2025), Theorem 4.1",
    sparse=False,
)
