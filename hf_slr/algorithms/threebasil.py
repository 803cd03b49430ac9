"""3BASiL: 3-block ADMM on (S, L, D) with dual V (002 §2.2 eqs. 3-5, App. B eqs. 35-36).

"3BASiL: An Algorithmic Framework for Sparse plus Low-Rank Compression of LLMs" (Makni, Meng &
Mazumder, NeurIPS 2025; seed 002).

The problem (002 eq. 1) min tr((W - S - L) H' (W - S - L)^T) s.t. S in the sparsity set,
rank(L) <= r is split with a copy D of S (002 eq. 2) and solved by

    S = (H' + rho I)^-1 (H'(W - L) - V + rho D)           (eq. 3)
    L = P_r((W - S) H'^1/2) H'^-1/2                       (eq. 4, [out, in] convention)
    D = P_sparse(S + V / rho),  V += rho (S - D)          (eq. 5)

with H' = H + 0.005 diag(H) + 0.005 mean(diag H) I (App. B). As in the authors' code (and the
ALPS S-step it builds on), the iteration runs on the diagonally rescaled problem W~ = W diag(d),
H~ = diag(d)^-1 H' diag(d)^-1, d = sqrt(diag H'): H~ has a unit diagonal, so rho_0 = 0.1 means the
same on every layer, and P_sparse ranks |S_ij d_j| (the sparsity set is invariant to column
scaling). H~ = Q Lambda Q^T is eigendecomposed once per layer; (H~ + rho I)^-1 = Q (Lambda +
rho)^-1 Q^T is re-formed only when rho changes (every 10 iterations), and eq. 4 is a randomized
SVD that never forms (W~ - S~) H~^1/2, so an iteration costs one [out, in] x [in, in] product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Algorithm, Decomposition, Target, relative_objective
from .splits import RankRatio
from .hyperparameters import SEED_RANGE, ConstraintError, hyperparameter
from .lowrank import WhitenedLowRank, pad_factors
from .projections import SCOPES, SupportProjector

__all__ = ["ALGORITHM", "ThreeBASiLHyperparameters", "decompose", "masked_conjugate_gradient"]


@dataclass(frozen=True)
class ThreeBASiLHyperparameters:
    """Hyperparameters of 3BASiL (paper / authors' code defaults; 002 App. B)."""

    rho: float = hyperparameter(0.1, low=0.0, low_open=True, doc="initial ADMM penalty rho_0 (002 App. B)")
    rho_update_every: int = hyperparameter(
        10, low=1, doc="iterations between rho updates / support comparisons (eq. 36)"
    )
    max_iterations: int = hyperparameter(2000, low=1, doc="hard stop of the ADMM")
    min_iterations: int = hyperparameter(
        100, low=0, doc="the stable_support stop is checked only after this many (<= max_iterations)"
    )
    stable_support: float = hyperparameter(
        3e-4, low=0.0, high=1.0, doc="stop when fewer than this x nnz support entries changed (authors' code)"
    )
    diagonal_damping: float = hyperparameter(0.005, low=0.0, doc="H' = H + this * diag(H) + ... (App. B)")
    identity_damping: float = hyperparameter(
        0.005, low=0.0, low_open=True, doc="H' = ... + this * mean(diag H) * I (App. B); > 0 keeps dead channels finite"
    )
    scope: str = hyperparameter(
        "matrix", choices=SCOPES, doc="unstructured support per matrix (authors' code) or per row"
    )
    oversampling: int = hyperparameter(8, low=0, doc="randomized-SVD sketch = rank + oversampling")
    refit_rounds: int = hyperparameter(1, low=0, doc="polish rounds (S by CG on its support, then the exact L)")
    refit_cg_steps: int = hyperparameter(10, low=0, doc="conjugate-gradient steps per polish round")
    seed: int = hyperparameter(0, **SEED_RANGE, doc="seed of the initial sketch")

    def __post_init__(self):
        if self.min_iterations > self.max_iterations:
            raise ConstraintError("min_iterations", f"<= max_iterations ({self.max_iterations})", self.min_iterations)


def _rescaled_hessian(
    hessian: torch.Tensor, diagonal_damping: float, identity_damping: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d, H~, dead) with d = sqrt(diag H') and H~ = H' / (d d^T), H' of 002 App. B."""
    diagonal = hessian.diagonal()
    mean = diagonal.mean()
    if mean <= 0:
        hessian, diagonal, mean = torch.eye(len(diagonal), dtype=hessian.dtype, device=hessian.device), 0, 1
    damped = hessian + torch.diag(diagonal_damping * diagonal + identity_damping * mean)
    scale = damped.diagonal().sqrt()
    return scale, damped / scale[:, None] / scale[None, :], hessian.diagonal() <= 0


def _next_rho(rho: float, change: int, kept: int, increased: bool) -> tuple[float, bool, str]:
    """002 eq. 36 on s = |supp D_t (sym. diff.) supp D_t-10|, plus the authors' early-support rule:
    before rho was ever increased, a small change divides rho by 5 (restarting if s > 0)."""
    if change > 0.1 * kept:
        return rho * 1.1, True, "continue"
    if change > 0.005 * kept:
        return rho * 1.05, True, "continue"
    if change > 0:
        return (rho * 1.02, True, "continue") if increased else (rho / 5, False, "restart")
    return (rho, True, "stop") if increased else (rho / 5, False, "continue")


def masked_conjugate_gradient(
    start: torch.Tensor, rhs: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, steps: int
) -> torch.Tensor:
    """min_S tr(S H S^T) / 2 - tr(S rhs^T) over supp(S) in ``mask``: row-wise CG from ``start``.

    Every row is an independent SPD system H_JJ s = rhs_J on its support J (the ALPS back-solve);
    CG iterates minimise the quadratic over growing Krylov spaces, so the objective never rises.
    """
    x = start * mask
    residual = (rhs - x @ hessian) * mask
    direction, norm = residual, residual.pow(2).sum(1, keepdim=True)
    for _ in range(steps):
        product = (direction @ hessian) * mask
        curvature = (direction * product).sum(1, keepdim=True)
        alpha = torch.where(curvature > 0, norm / curvature.clamp_min(1e-30), 0.0)
        x = x + alpha * direction
        residual = residual - alpha * product
        new_norm = residual.pow(2).sum(1, keepdim=True)
        direction = residual + torch.where(norm > 0, new_norm / norm.clamp_min(1e-30), 0.0) * direction
        norm = new_norm
    return x


def decompose(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    target: Target,
    hyperparameters: ThreeBASiLHyperparameters,
    record_history: bool = True,
) -> Decomposition:
    """3BASiL (002 eqs. 3-5 / 35) from S = W~, D = P(W~), V = 0, L = 0, rho_0 = 0.1 (App. B).

    Every ``rho_update_every`` iterations rho follows eq. 36; the run stops when the support of D
    did not change over those iterations (after rho was increased once), after ``min_iterations``
    once fewer than ``stable_support`` x nnz entries changed (authors' code), or at
    ``max_iterations`` (on the SmolLM2 layers of BENCHMARKS.md: 270-500 iterations, the authors'
    code 280-470). The returned S is the feasible D, polished by ``refit_rounds`` rounds of
    S on its fixed support (``refit_cg_steps`` CG steps: the ALPS back-solve of 002's reference
    code) then the exact L of eq. 4, each a descent step. ``scope`` ranks unstructured sparsity per
    "matrix" (authors' code) or per "row". With ``record_history``, the result's
    ``diagnostics["primal_residual"]`` holds ||S - D||_F / ||D||_F after each iteration.
    """
    hp = hyperparameters
    rho, rho_update_every = hp.rho, hp.rho_update_every
    max_iterations, min_iterations = hp.max_iterations, hp.min_iterations
    stable_support, refit_rounds, refit_cg_steps = hp.stable_support, hp.refit_rounds, hp.refit_cg_steps
    history, residuals = [], []
    dtype = torch.promote_types(weight.dtype, torch.float32)
    out_features, in_features = weight.shape
    scale, rescaled, dead = _rescaled_hessian(hessian.to(dtype), hp.diagonal_damping, hp.identity_damping)
    eigenvalues, eigenvectors = torch.linalg.eigh(rescaled.double())
    lam = eigenvalues.clamp_min(1e-12 * eigenvalues.max()).to(dtype)
    q = eigenvectors.to(dtype)

    w = weight.to(dtype) * scale
    w[:, dead] = 0
    w_hessian = w @ rescaled
    rank = min(target.rank, out_features, in_features)
    sketch = min(rank + hp.oversampling, out_features, in_features)
    low_rank = WhitenedLowRank(q, lam.sqrt(), out_features, rank, sketch, torch.Generator().manual_seed(hp.seed))

    project = SupportProjector(target, hp.scope)
    mask = project(w.abs())
    kept = max(int(mask.sum()), 1)
    d, dual = w * mask, torch.zeros_like(w)
    s, y, scratch = (torch.empty_like(w) for _ in range(3))  # reused: big allocations page-fault
    zero = w.new_zeros(())
    previous_mask, increased, inverse = mask, False, None
    for iteration in range(max_iterations):
        if inverse is None:
            inverse = (q / (lam + rho)) @ q.T
        # eq. 3: S = (W~ H~ - L~ H~ - V + rho D) (H~ + rho I)^-1
        torch.addmm(w_hessian, low_rank.u, low_rank.v_hessian(), alpha=-1, out=y).add_(d, alpha=rho).sub_(dual)
        torch.mm(y, inverse, out=s)
        # eq. 4: L = P_r((W~ - S) H~^1/2) H~^-1/2
        low_rank.fit(torch.sub(w, s, out=scratch), power_iterations=2 if iteration == 0 else 0)
        # eq. 5: D = P(S + V / rho); V + rho (S - D) = rho (Y - D)
        torch.add(s, dual, alpha=1 / rho, out=y)
        mask = project(torch.abs(y, out=scratch))
        torch.where(mask, y, zero, out=d)
        torch.mul(y, rho, out=dual).masked_fill_(mask, 0.0)
        if record_history:
            history.append(relative_objective(weight, d / scale, low_rank.u, low_rank.v() / scale, hessian))
            residuals.append(float(torch.linalg.norm(s - d) / torch.linalg.norm(d).clamp_min(1e-30)))
        if (iteration + 1) % rho_update_every:
            continue
        change = int(torch.count_nonzero(mask != previous_mask))
        previous_mask = mask
        new_rho, increased, action = _next_rho(rho, change, kept, increased)
        if action == "stop" or (iteration + 1 >= min_iterations and change < stable_support * kept):
            break
        if action == "restart":
            d, dual = w * project(w.abs()), torch.zeros_like(w)
        if new_rho != rho:
            rho, inverse = min(new_rho, 1e6), None

    sparse = d
    for _ in range(refit_rounds):
        rhs = torch.addmm(w_hessian, low_rank.u, low_rank.v_hessian(), alpha=-1)  # (W~ - L~) H~
        sparse = masked_conjugate_gradient(sparse, rhs, rescaled, mask, refit_cg_steps)
        low_rank.fit(w - sparse, power_iterations=2)
    sparse_out = (sparse / scale).to(weight.dtype)
    u_out, v_out = pad_factors(low_rank.u.to(weight.dtype), (low_rank.v() / scale).to(weight.dtype), target.rank)
    if record_history and refit_rounds > 0:
        history.append(relative_objective(weight, sparse_out, u_out, v_out, hessian))
    diagnostics = {"primal_residual": residuals} if record_history else {}
    return Decomposition(sparse_out, u_out, v_out, tuple(history), diagnostics)


ALGORITHM = Algorithm(
    name="threebasil",
    needs_hessian=True,
    hyperparameters=ThreeBASiLHyperparameters,
    decompose=decompose,
    # 002 Table 3, the fixed compression ratio p = 0.5: its best configuration, 3:8 + LR, puts 12.5% of
    # the parameters in U V, a quarter of those kept ("+64LR" is the unbudgeted N:M + 64 setting).
    split=RankRatio(0.25),
    paper="3BASiL: An Algorithmic Framework for Sparse plus Low-Rank Compression of LLMs "
    "(Makni, Meng & Mazumder, NeurIPS 2025)",
)
