"""SSLC: "1+1>2: A Synergistic Sparse and Low-Rank Compression Method for Large Language Models"
(Zong, Zhang, Li, Tan, Ren, Zhai & Hu, 2025; seed 001 §4.2, Alg. 1).

Alternates, in the space scaled by ||X_j||_2 = sqrt(H_jj) (001 eq. 6), a bilateral-random-projection
low-rank step L' = Y1 (A2^T Y1)^-1 Y2^T of (W - S) ||X|| (eq. 7-8) and a sparse step keeping the
largest salience delta_ij = (|W - L|_ij ||X_j||_2)^2 (eq. 4, diagonal approximation; eq. 5), T = 40
times (§5.3). The top 1% salient weights of W are preserved and excluded from the alternation
(§4.2.3): taken out of W before the first L step and always in S's support, counting in its
budget, so S holds ``target``'s nonzeros in all. §4.2.3 does not say what S holds there; with
``preserve="support"`` (default) it is the residual W - L, so the weights are reproduced exactly
and L is unconstrained there; ``preserve="values"`` keeps S = W, which pulls L to 0 at those
entries. On SmolLM2 at 50% (WikiText-2 / C4): support 45.1 / 73.6, values 46.4 / 76.2, no
preservation 43.7 / 70.9 (docs/results.md, "SSLC ablation"); the paper's 1% stays the default.

Sparse scope: eq. 5 writes one percentile theta, but Alg. 1 takes "sparse algorithm Sparse(.)" as
a parameter and App. E.1, Table 6 gives r = 0 (pure pruning) 6.92 on LLaMA-2-7B, Wanda's own 50%
number, which is Wanda's per-output-row comparison. So the S step ranks eq. 4's salience within
each output row (``scope="row"``, the default); ``scope="matrix"`` is the literal single threshold.
On SmolLM2-135M at 50% of the parameters the literal reading costs 13 WikiText-2 ppl (61.2 vs 48.1
at kappa 0.25; docs/results.md, "SSLC ablation").

BRP test matrix: A1 is Gaussian at the first iteration and the previous right factor V_{t-1}^T after
(GoDec-style subspace reuse). range(L~ V_{t-1}^T) contains the column space of L~ P_row(V_{t-1}),
which is at least as close to L~ as L_{t-1}, so every L step is no worse than keeping L_{t-1}: the
property App. A (eq. 12-14) needs for the objective never to increase.

Rank: the paper uses r = 128 for 4096-wide LLaMA layers (App. E.1, 50% compression); ``split``
keeps the same fraction of the smaller dimension at other widths (r = 128 min(out, in) / 4096, e.g.
18 for SmolLM2-135M's 576-wide layers), the default when only a compression ratio is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .alternating import scaled_alternating_minimization
from .base import Algorithm, Decomposition, Target
from .splits import ScaledRank
from .hyperparameters import SEED_RANGE, hyperparameter
from .lowrank import bilateral_random_projection, input_norms
from .projections import SCOPES, sparsity_mask

@dataclass(frozen=True)
class SSLCHyperparameters:
    """Hyperparameters of SSLC (paper defaults)."""

    iterations: int = hyperparameter(40, low=1, doc="alternations T (001 §5.3)")
    preserve_fraction: float = hyperparameter(
        0.01, low=0.0, high=1.0, doc="top salient fraction of W always in S, outside the alternation (001 §4.2.3)"
    )
    preserve: str = hyperparameter(
        "support", choices=("support", "values"),
        doc="preserved weights: always in S's support with S = W - L there (exact, L free) or S = W (literal)",
    )
    scope: str = hyperparameter("row", choices=SCOPES, doc="salience compared per output row (Wanda, Table 6 r=0) or 'matrix'")
    power_iterations: int = hyperparameter(0, low=0, doc="GoDec power steps inside each bilateral random projection")
    seed: int = hyperparameter(0, **SEED_RANGE, doc="seed of the first Gaussian test matrix")


def preserved_mask(salience: torch.Tensor, target: Target, fraction: float, scope: str) -> torch.Tensor:
    """Top ``fraction`` of ``salience`` (per ``scope``), restricted to a mask feasible for ``target``."""
    top = sparsity_mask(salience, Target(sparsity=1.0 - fraction), scope)
    return top & sparsity_mask(salience, target, scope)


def decompose(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    target: Target,
    hyperparameters: SSLCHyperparameters,
    record_history: bool = True,
) -> Decomposition:
    """SSLC Alg. 1: preserve the top ``preserve_fraction`` salient weights, then T alternations.

    ``power_iterations > 0`` applies GoDec's power scheme inside each BRP: a closer L step, but no
    longer provably no worse than L_{t-1}. ``seed`` fixes the first Gaussian test matrix.
    """
    hp = hyperparameters
    weight = weight.float()
    salience = (weight * input_norms(hessian)).abs()
    preserved = preserved_mask(salience, target, hp.preserve_fraction, hp.scope) if hp.preserve_fraction > 0 else None
    generator = torch.Generator().manual_seed(hp.seed)

    def brp_step(matrix: torch.Tensor, previous_v: torch.Tensor | None):
        test_matrix = None if previous_v is None else previous_v.T
        return bilateral_random_projection(
            matrix, target.rank, test_matrix=test_matrix, power_iterations=hp.power_iterations, generator=generator
        )

    return scaled_alternating_minimization(
        weight,
        hessian,
        target,
        iterations=hp.iterations,
        low_rank_step=brp_step,
        scope=hp.scope,
        preserved=preserved,
        preserve_values=hp.preserve == "values",
        record_history=record_history,
    )


ALGORITHM = Algorithm(
    name="sslc",
    needs_hessian=True,
    hyperparameters=SSLCHyperparameters,
    decompose=decompose,
    split=ScaledRank(rank=128, width=4096),  # 001 App. E.1, Table 6: r = 128 at 50% on LLaMA-2-7B
    paper="1+1>2: A Synergistic Sparse and Low-Rank Compression Method for Large Language Models "
    "(Zong, Zhang, Li, Tan, Ren, Zhai & Hu, 2025)",
)
