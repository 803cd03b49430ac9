"""Alternating minimisation of ||(W - S - L) D||_F in the D-scaled space, D = sqrt(diag H).

Shared by OATS ("OATS: Outlier-Aware Pruning Through Sparse and Low Rank Decomposition", Zhang &
Papyan, 2025; HASSLE-free 004 §4.2.2, Corollary 4.2) and SSLC ("1+1>2: A Synergistic Sparse and
Low-Rank Compression Method for Large Language Models", Zong et al., 2025; 001 eq. 3-8): with W~ = W D,
    L~_t = low-rank approximation of (W~ - S~_{t-1}),   S~_t = projection of (W~ - L~_t) onto the sparsity set,
then S = S~ D^-1 and L = L~ D^-1. Both steps are exact minimisers of the scaled objective when the
low-rank step is (no worse than keeping L~_{t-1}), so it never increases (001 App. A eq. 12-14).
"""

from __future__ import annotations

from typing import Callable

import torch

from .base import Decomposition, Target, relative_objective
from .lowrank import input_norms
from .projections import SupportProjector

# low_rank_step(matrix, previous_v) -> (U, V): previous_v is None at the first iteration.
LowRankStep = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


def scaled_alternating_minimization(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    target: Target,
    *,
    iterations: int,
    low_rank_step: LowRankStep,
    scope: str,
    preserved: torch.Tensor | None = None,
    preserve_values: bool = False,
    record_history: bool = True,
) -> Decomposition:
    """Run ``iterations`` (>= 1) alternations (L step, then S step) and return unscaled (S, U, V),
    with the relative objective after every alternation when ``record_history``.

    ``preserved`` (bool [out, in], a subset of a feasible mask) marks weights excluded from the
    decomposition (001 §4.2.3): they are taken out of W before the first L step, and the sparse
    step always keeps them in its support, so S ends up in the sparsity set exactly. There S holds
    the residual W - L (the default: the weights are reproduced exactly and L is free there) or,
    with ``preserve_values``, W itself (the literal reading: L is pulled to 0 there).
    With ``target.rank == 0`` one iteration is the fixed point.
    """
    weight, hessian = weight.float(), hessian.float()
    scale = input_norms(hessian)
    kept_as_is, free = torch.zeros_like(weight), None  # free: where S may take the residual (None: everywhere)
    if preserved is not None and preserve_values:
        kept_as_is, free = weight * preserved, ~preserved
    scaled = (weight - kept_as_is) * scale
    # "support": the preserved weights start in S, so the first L step fits W without them.
    sparse = scaled * preserved if preserved is not None and not preserve_values else torch.zeros_like(scaled)
    project = SupportProjector(target, scope)  # the sparsity_mask sets, without a sort per iteration
    v, history = None, []
    for _ in range(iterations if target.rank > 0 else 1):
        u, v = low_rank_step(scaled - sparse, v)
        residual = scaled - u @ v
        scores = residual.abs()
        keep = project(scores if preserved is None else scores.masked_fill(preserved, torch.inf))
        sparse = residual * (keep if free is None else keep & free)
        if record_history:
            history.append(relative_objective(weight, kept_as_is + sparse / scale, u, v / scale, hessian))
    return Decomposition(kept_as_is + sparse / scale, u, v / scale, tuple(history))
