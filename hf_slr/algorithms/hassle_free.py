"""HASSLE-free: alternating minimisation of the layer objective (004 eq. 1).

"HASSLE-free: A unified Framework for Sparse plus Low-Rank Matrix Decomposition for LLMs" (Makni,
Behdin, Xu, Ponomareva & Mazumder, 2025; seed 004, Algorithms 1-2).

With H = X^T X + lambda I, lambda = 0.01 mean(diag X^T X) (004 A.2, SparseGPT's damping), every
outer iteration solves
    (P1, eq. 4)  S = SparseGPT(W - U V) with the fixed H^-1 (its Cholesky factor computed once);
    (P2, eq. 5)  U V ~ W - S, either
      - "closed_form": the reduced-rank regression L = P_r((W - S) H^1/2) H^-1/2 (002 eq. 4; the
        "improved implementation" of 3BASiL (Makni, Meng & Mazumder, 2025; 002 §4.1 / App. B),
        whose numbers BENCHMARKS.md reports), or
      - "gd": Low-Rank-GD (004 Alg. 1): T_LR = 50 Adam steps at eta_t = 1e-2 / (t + 10) on U and
        the diagonally rescaled V~ = V D of 004 eq. 7 (D = sqrt(diag H), H~ = D^-1 H D^-1 has a
        unit diagonal), warm-started from the previous (U, V); 004 Alg. 2 starts from U = 0 on
        the input side and a Gaussian on the output side. (Mapping back is V = V~ D^-1: the
        "U <- D U" of Alg. 2 and the "M* = D U* V*^T" of eq. 7 should read D^-1.)
T_AM = 80 (004 A.2, OATS' default). The default is "closed_form": it solves (P2) exactly instead
of approximately (002 App. B); on the 8 SmolLM2 layers of BENCHMARKS.md (rank 16) it reaches
geomean objectives of 6.02e-3 (2:4) / 2.26e-3 (50%) against 7.77e-3 / 2.90e-3 for "gd", in 70% of
the CPU time (benchmarks/layerwise_objective.py; 002 Table 6 finds the same order on Llama3-8B).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Algorithm, Decomposition, Target, relative_objective
from .splits import RankRatio
from .hyperparameters import SEED_RANGE, hyperparameter
from .lowrank import WhitenedLowRank, damp_hessian, pad_factors
from .projections import SCOPES
from .sparsegpt import inverse_hessian_cholesky, sparsegpt_prune

__all__ = ["ALGORITHM", "HassleFreeHyperparameters", "decompose"]

LOWRANK_STEPS = ("gd", "closed_form")


@dataclass(frozen=True)
class HassleFreeHyperparameters:
    """Hyperparameters of HASSLE-free (paper defaults; 004 A.2)."""

    iterations: int = hyperparameter(80, low=1, doc="outer alternations T_AM (004 A.2, OATS' default)")
    lowrank_step: str = hyperparameter(
        "closed_form", choices=LOWRANK_STEPS, doc="(P2) solver: exact reduced-rank regression or Low-Rank-GD (Adam)"
    )
    lowrank_iterations: int = hyperparameter(50, low=1, doc="Adam steps T_LR per outer iteration ('gd' only)")
    learning_rate: float = hyperparameter(
        1e-2, low=0.0, low_open=True, doc="Adam step eta; step t uses eta / (t + 10) ('gd' only)"
    )
    percdamp: float = hyperparameter(
        0.01, low=0.0, low_open=True, doc="H + lambda I, lambda = percdamp * mean(diag H) (SparseGPT's damping)"
    )
    blocksize: int = hyperparameter(128, low=1, doc="SparseGPT's lazy-update block width")
    scope: str = hyperparameter("matrix", choices=SCOPES, doc="SparseGPT's budget per matrix or per row")
    power_iterations: int = hyperparameter(
        1, low=0, doc="power steps of the warm-started randomized SVD ('closed_form'; 2q + 1 at the first iteration)"
    )
    oversampling: int = hyperparameter(8, low=0, doc="randomized-SVD sketch = rank + oversampling ('closed_form')")
    seed: int = hyperparameter(0, **SEED_RANGE, doc="seed of the sketch ('closed_form') or of U_0 ('gd')")


def _adam_low_rank(
    residual_hessian: torch.Tensor,
    rescaled: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    steps: int,
    learning_rate: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """004 Alg. 1: Adam on Obj(U, V) = tr((M - U V) H (M - U V)^T) / 2, given M H = ``residual_hessian``.

    The gradients -(M - U V) H V^T and -U^T (M - U V) H are evaluated through M H, V H and U^T U,
    so a step costs O((out + in) in r) instead of a dense [out, in] x [in, in] product.
    """
    u, v = u.clone(), v.clone()
    optimizer = torch.optim.Adam([u, v], lr=learning_rate)
    for _ in range(steps):
        v_hessian = v @ rescaled
        u.grad = u @ (v_hessian @ v.T) - residual_hessian @ v.T
        v.grad = (u.T @ u) @ v_hessian - u.T @ residual_hessian
        optimizer.step()
    return u, v


def decompose(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    target: Target,
    hyperparameters: HassleFreeHyperparameters,
    record_history: bool = True,
) -> Decomposition:
    """HASSLE-free with SparseGPT for (P1) and ``lowrank_step`` for (P2), ``iterations`` = T_AM.

    ``lowrank_iterations`` (T_LR) and ``learning_rate`` (eta) apply to "gd"; ``power_iterations``
    and ``oversampling`` to the randomized SVD of "closed_form" (warm-started from the previous
    outer iteration). ``blocksize`` and ``scope`` are SparseGPT's. The iterate with the lowest
    damped objective is returned (as in the authors' code for "gd"; "closed_form" does not increase
    the objective in its low-rank step, so it returns the last one).
    """
    hp = hyperparameters
    lowrank_step, percdamp, seed = hp.lowrank_step, hp.percdamp, hp.seed
    if lowrank_step not in LOWRANK_STEPS:
        raise ValueError(f"lowrank_step must be 'gd' or 'closed_form', got {lowrank_step!r}")
    weight32 = weight.float()
    out_features, in_features = weight.shape
    rank = min(target.rank, out_features, in_features)
    generator = torch.Generator().manual_seed(seed)
    factor = inverse_hessian_cholesky(hessian, percdamp)
    damped = damp_hessian(hessian.double(), percdamp)
    u, v = weight32.new_zeros(out_features, rank), weight32.new_zeros(rank, in_features)

    if lowrank_step == "closed_form":
        eigenvalues, eigenvectors = torch.linalg.eigh(damped)
        sqrt_lam = eigenvalues.clamp_min(1e-12 * eigenvalues.max()).sqrt().float()
        sketch = min(rank + hp.oversampling, out_features, in_features)
        low_rank = WhitenedLowRank(eigenvectors.float(), sqrt_lam, out_features, rank, sketch, generator)
    else:
        scale = damped.diagonal().sqrt()
        rescaled = (damped / scale[:, None] / scale[None, :]).float()
        scale = scale.float()
        u = torch.randn(out_features, rank, generator=generator).to(weight32)  # output side: Gaussian
        best = (float("inf"), None)

    sparse, history = weight32, []
    for t in range(1, hp.iterations + 1):
        sparse = sparsegpt_prune(weight32 - u @ v, factor, target, hp.blocksize, hp.scope)
        residual = weight32 - sparse
        if lowrank_step == "closed_form":
            low_rank.fit(residual, power_iterations=hp.power_iterations if t > 1 else 2 * hp.power_iterations + 1)
            u, v = low_rank.u, low_rank.v()
        else:
            residual = residual * scale
            residual_hessian = residual @ rescaled
            u, v_scaled = _adam_low_rank(residual_hessian, rescaled, u, v * scale,
                                         hp.lowrank_iterations, hp.learning_rate / (t + 10))
            v = v_scaled / scale
            objective = _rescaled_objective(residual, residual_hessian, rescaled, u, v_scaled)
            if objective < best[0]:
                best = (objective, (sparse, u, v))
        if record_history:
            history.append(relative_objective(weight32, sparse, u, v, hessian))
    if lowrank_step == "gd":
        sparse, u, v = best[1]
    u, v = pad_factors(u, v, target.rank)
    return Decomposition(sparse.to(weight.dtype), u.to(weight.dtype), v.to(weight.dtype), tuple(history))


def _rescaled_objective(residual, residual_hessian, rescaled, u, v) -> float:
    """tr((M - U V) H (M - U V)^T) from M H, without a dense product."""
    cross = ((u.T @ residual_hessian) * v).sum()
    quadratic = ((u.T @ u) * (v @ rescaled @ v.T)).sum()
    return float((residual * residual_hessian).sum() - 2 * cross + quadratic)


ALGORITHM = Algorithm(
    name="hassle_free",
    needs_hessian=True,
    hyperparameters=HassleFreeHyperparameters,
    decompose=decompose,
    split=RankRatio(0.3),  # 004 App. A.3, Table 4: kappa = 0.3
    paper="HASSLE-free: A unified Framework for Sparse plus Low-Rank Matrix Decomposition for LLMs "
    "(Makni, Behdin, Xu, Ponomareva & Mazumder, 2025)",
)
