"""SparseGPT: OBS pruning with lazy blocked updates, rank 0.

"SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot" (Frantar & Alistarh,
2023), Algorithm 1.

Columns are processed left to right; pruning w_ij adds the OBS correction -(w_ij / [H^-1]_jj) H^-1_j,:
to the columns not yet processed, with H^-1 represented by the upper Cholesky factor of the damped
inverse Hessian (rows of that factor are the inverse Hessians of the remaining columns). The mask is
chosen per block of ``blocksize`` columns (adaptive mask selection) with saliency w^2 / [H^-1]_jj^2,
or per group of M columns for N:M.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Algorithm, Decomposition, Target
from .hyperparameters import hyperparameter
from .lowrank import damp_hessian, zero_factors
from .projections import SCOPES, mask_nm, mask_topk_matrix, mask_topk_per_row

__all__ = ["ALGORITHM", "SparseGPTHyperparameters", "inverse_hessian_cholesky", "sparsegpt_prune", "decompose"]


@dataclass(frozen=True)
class SparseGPTHyperparameters:
    """Hyperparameters of SparseGPT (paper defaults)."""

    percdamp: float = hyperparameter(
        0.01, low=0.0, low_open=True,
        doc="damping lambda = percdamp * mean(diag H); > 0 so that a singular H (dead channels) factorises",
    )
    blocksize: int = hyperparameter(128, low=1, doc="columns per lazy-update block (adaptive mask selection)")
    scope: str = hyperparameter("matrix", choices=SCOPES, doc="block budget shared over the matrix or per row")


# Cholesky retries multiply the damping by this factor (ill-conditioned or rank-deficient H).
DAMPING_GROWTH = 10.0
CHOLESKY_ATTEMPTS = 6


def inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor U of (H + lambda I)^-1 = U^T U, lambda = percdamp * mean(diag H), float32.

    Compute once per layer and reuse across iterations. Dead channels (zero diagonal) keep H_jj =
    lambda, so their weights get a tiny saliency and are pruned first; if the factorisation fails,
    lambda grows by ``DAMPING_GROWTH`` up to ``CHOLESKY_ATTEMPTS`` times.
    """
    hessian = hessian.double()
    mean_diagonal = float(hessian.diagonal().mean())
    if mean_diagonal <= 0:
        hessian = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for attempt in range(CHOLESKY_ATTEMPTS):
        damped = damp_hessian(hessian, percdamp * DAMPING_GROWTH**attempt)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper.float()
    raise torch.linalg.LinAlgError("Hessian is not positive definite even after damping")


def _share(total: int, start: int, stop: int, width: int) -> int:
    """The part of ``total`` that falls on columns [start, stop) of ``width``; shares sum to ``total``."""
    return total * stop // width - total * start // width


def _block_mask(saliency: torch.Tensor, target: Target, start: int, stop: int, width: int, scope: str):
    """Unstructured keep-mask of one block holding its exact share of the row / matrix budget."""
    rows, block_width = saliency.shape
    if scope == "row":
        pruned = _share(width - target.kept_per_row(width), start, stop, width)
        return mask_topk_per_row(saliency, block_width - pruned)
    if scope == "matrix":
        pruned = _share(rows * width - target.kept_total(rows, width), start, stop, width)
        return mask_topk_matrix(saliency, rows * block_width - pruned)
    raise ValueError(f"scope must be 'row' or 'matrix', got {scope!r}")


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian_inverse_cholesky: torch.Tensor,
    target: Target,
    blocksize: int = 128,
    scope: str = "matrix",
) -> torch.Tensor:
    """SparseGPT Alg. 1: the pruned and OBS-updated weight, exactly in ``target``'s sparsity set.

    ``scope="matrix"`` (SparseGPT's choice) gives every block its share of the matrix budget, chosen
    across all rows; ``"row"`` gives every row of every block its share of the per-row budget. N:M
    groups are chosen when the block reaches them (``blocksize`` is rounded down to a multiple of M).
    """
    pruned = weight.float().clone()
    factor = hessian_inverse_cholesky.float()
    width = pruned.shape[1]
    if target.nm_pattern is not None:
        n, m = target.nm_pattern
        blocksize = max(m, blocksize // m * m)
    for start in range(0, width, blocksize):
        stop = min(start + blocksize, width)
        # Work on the transposed block: column ``col`` is a contiguous row, the OBS update an in-place addr_.
        block = pruned[:, start:stop].T.contiguous()
        block_factor = factor[start:stop, start:stop]
        diagonal = block_factor.diagonal()
        errors = torch.empty_like(block)
        if target.nm_pattern is None:
            keep = _block_mask(block.T.pow(2) / diagonal.pow(2), target, start, stop, width, scope).T
        else:
            keep = torch.empty_like(block, dtype=torch.bool)
        for col in range(stop - start):
            if target.nm_pattern is not None and col % m == 0:
                group = slice(col, col + m)
                keep[group] = mask_nm(block[group].T.pow(2) / diagonal[group].pow(2), n, m).T
            error = block[col] * ~keep[col] / diagonal[col]
            block[col:].addr_(block_factor[col, col:], error, alpha=-1.0)
            block[col] *= keep[col]
            errors[col] = error
        pruned[:, start:stop] = block.T
        pruned[:, stop:].addmm_(errors.T, factor[start:stop, stop:], alpha=-1.0)
    return pruned


def decompose(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    target: Target,
    hyperparameters: SparseGPTHyperparameters,
    record_history: bool = True,
) -> Decomposition:
    """SparseGPT with the paper's defaults (lambda = 0.01 mean diag H, blocks of 128); U, V = 0."""
    weight = weight.float()
    hp = hyperparameters
    sparse = sparsegpt_prune(weight, inverse_hessian_cholesky(hessian, hp.percdamp), target, hp.blocksize, hp.scope)
    return Decomposition(sparse, *zero_factors(*weight.shape, target.rank, weight))


ALGORITHM = Algorithm(
    name="sparsegpt",
    needs_hessian=True,
    hyperparameters=SparseGPTHyperparameters,
    decompose=decompose,
    paper="SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot (Frantar & Alistarh, 2023)",
    low_rank=False,
)
