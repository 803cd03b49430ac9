"""QR-based RPCA: S + L with one QR per iteration instead of an SVD.

"Compress Large Language Models via Collaboration Between Learning and Matrix Approximation"
(NeurIPS 2025; seed 000 App. C.3, Algorithm 2).

From S_0 = 0 and a Gaussian V_0 [r, in], every iteration does
    A = (W - S) V^T,  A = Q R,  U = Q,  V = Q^T (W - S),  S = P_Omega(W - U V)
i.e. one step of subspace iteration for the low-rank part (a bilateral random projection with test
matrix V^T) and the exact sparse projection for the sparse part. ||W - S - U V||_F never increases:
U V is the best approximation with column space range((W - S) V_prev^T), which contains the
best one with the previous row space, and P_Omega is exact.

``scaling="activation"`` (default) runs the iteration on W D, D = sqrt(diag H) = ||X_j||, so it
minimises the diagonal-Hessian objective ||(W - S - U V) D||_F (OATS' objective, 004 Cor. 4.2);
``"none"`` runs it on W itself (data-free, ``hessian`` may be None). On the 8 SmolLM2 layers of
BENCHMARKS.md (rank 16, per-row budget) the layer objective tr(E H E^T) / tr(W H W^T) has geomean
1.30e-2 (2:4) / 5.31e-3 (50%) with activation scaling against 3.41e-2 / 1.82e-2 without; on random
layers the two agree when all channels have the same norm and scaling wins 10-17x when the norms
spread over two decades. The per-matrix budget (default) gives 4.78e-3 at 50%, below OATS' 5.30e-3.

``init=(S, U, V)`` warm-starts from a previous solution (000 App. C.3): S_0 = S and V_0 = V, with
Gaussian rows appended when the target rank grew, or trailing rows dropped when it shrank. 80
iterations by default (000 Table 6; 20 inside the bilevel loop, where ``init`` is given).

:func:`solve` runs a stack of same-shape matrices at once (one batched QR and matmul per iteration;
:func:`decompose` is a stack of one), and :func:`solve_many` several targets of one stack from the
same warm start, sharing the first iteration's QR: the inner solves of the learned allocation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Algorithm, Decomposition, Target, relative_objective
from .splits import RankRatio
from .hyperparameters import SEED_RANGE, hyperparameter
from .lowrank import input_norms, pad_factors
from .projections import SCOPES, SupportProjector

__all__ = ["ALGORITHM", "QRRPCAHyperparameters", "decompose", "solve", "solve_many"]


@dataclass(frozen=True)
class QRRPCAHyperparameters:
    """Hyperparameters of QR-RPCA (paper defaults)."""

    iterations: int = hyperparameter(80, low=1, doc="QR + projection steps (000 Table 6; 20 inside the bilevel loop)")
    scaling: str = hyperparameter(
        "activation", choices=("activation", "none"), doc="run on W D, D = sqrt(diag H) ('activation') or on W ('none')"
    )
    scope: str = hyperparameter("matrix", choices=SCOPES, doc="support of S per matrix (000's budget K) or per row")
    seed: int = hyperparameter(0, **SEED_RANGE, doc="seed of the Gaussian rows of V_0")


def _initial_row_space(
    init_v: torch.Tensor | None, rank: int, in_features: int, like: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """V_0 [rank, in]: the warm start's rows (truncated to ``rank``) plus Gaussian rows."""
    rows = like.new_zeros(0, in_features) if init_v is None else init_v.to(like)[:rank]
    missing = rank - rows.shape[0]
    gaussian = torch.randn(missing, in_features, generator=generator, dtype=like.dtype).to(like.device)
    return torch.cat([rows, gaussian])


def _row_spaces(weights: torch.Tensor, ranks: list[int], init_v, seed: int) -> torch.Tensor:
    """V_0 [B, max(ranks), n]: per matrix its warm start's rows (or Gaussian ones), zero-padded."""
    v = weights.new_zeros(weights.shape[0], max(ranks, default=0), weights.shape[2])
    for b, rank in enumerate(ranks):
        v[b, :rank] = _initial_row_space(init_v[b], rank, weights.shape[2], weights, torch.Generator().manual_seed(seed))
    return v


def _columns(ranks: list[int], width: int, like: torch.Tensor) -> torch.Tensor:
    """[B, 1, width]: column c of matrix b is live iff c < ranks[b]."""
    return (torch.arange(width, device=like.device) < torch.tensor(ranks, device=like.device)[:, None])[:, None].to(like.dtype)


def _low_rank(weights, sparse, v, columns, buffer):
    """One subspace step: U = Q of (W - S) V^T (columns beyond each rank zeroed), V = U^T (W - S)."""
    difference = torch.sub(weights, sparse, out=buffer)
    u = torch.linalg.qr(difference @ v.mT).Q * columns
    return u, u.mT @ difference


def _residual(weights, u, v, out):
    """W - U V into ``out``."""
    return torch.baddbmm(weights, u, v, alpha=-1.0, out=out) if u.shape[2] else out.copy_(weights)


def _project(residual, projectors, out):
    """S = P_Omega(residual) of every matrix into ``out``."""
    for b, project in enumerate(projectors):
        project.apply(residual[b], out=out[b])
    return out


def solve(
    weights: torch.Tensor,
    ranks: list[int],
    projectors: list,
    iterations: int,
    *,
    sparse: torch.Tensor | None = None,
    init_v: list[torch.Tensor | None] | None = None,
    seed: int = 0,
    callback=None,
    approximate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """000 Algorithm 2 on a stack of B matrices of one shape at once: (S, U, V) of ``weights``
    [B, m, n] (float32, already scaled) after ``iterations`` steps; the one implementation
    (:func:`decompose` is this with B = 1).

    ``ranks[b]``: the rank of matrix b; the stack runs at R = max(ranks) with the columns of Q
    beyond ranks[b] zeroed after each (batched) QR, so U [B, m, R] and V [B, R, n] have zero
    columns / rows there (Householder QR is column-sequential: Q's first r columns do not depend on
    the later ones). ``projectors[b]``: the sparse projection of matrix b (a
    :class:`SupportProjector`, whose ``apply`` keeps the entries of the largest scores).
    ``sparse`` [B, m, n] and ``init_v[b]`` [r_b, n] warm-start (V_0 truncated to ranks[b], or
    extended by Gaussian rows of a generator seeded with ``seed``, one per matrix as in a
    per-matrix call). ``callback(S, U, V)`` runs after every iteration. With ``approximate`` the
    first tensor returned is S + U V (as S + W - (W - U V), from the last residual) instead of S.
    """
    init_v = [None] * weights.shape[0] if init_v is None else init_v
    sparse = weights.new_zeros(weights.shape) if sparse is None else sparse.to(weights).clone()
    v = _row_spaces(weights, ranks, init_v, seed)
    columns = _columns(ranks, v.shape[1], weights)
    u = weights.new_zeros(weights.shape[0], weights.shape[1], v.shape[1])
    buffer = torch.empty_like(weights)  # W - S, then W - U V: one allocation for all iterations
    for _ in range(iterations):
        if v.shape[1] > 0:
            u, v = _low_rank(weights, sparse, v, columns, buffer)
        _project(_residual(weights, u, v, buffer), projectors, sparse)
        if callback is not None:
            callback(sparse, u, v)
    if approximate:
        sparse = sparse.add_(weights).sub_(buffer) if iterations else sparse.baddbmm_(u, v)
    return sparse, u, v


def solve_many(
    weights: torch.Tensor,
    ranks: list[list[int]],
    projectors: list[list],
    iterations: list[int],
    *,
    sparse: torch.Tensor | None = None,
    init_v: list[torch.Tensor | None] | None = None,
    seed: int = 0,
    approximate: list[bool] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`solve` of the same stack for several targets t (``ranks[t]``, ``projectors[t]``,
    ``iterations[t]`` >= 1) from the same warm start, the first iteration's subspace step done once:
    at the widest rank of each matrix, V_0's leading rows are every target's V_0 (the warm start's
    rows, then the same Gaussian rows), so each target's Q is the leading columns of the one QR,
    and its residual W - U_t V_t is the widest one plus the few columns it drops. Equal to
    ``[solve(weights, ranks[t], ..., approximate=approximate[t]) for t]`` up to round-off (tested)."""
    init_v = [None] * weights.shape[0] if init_v is None else init_v
    approximate = [False] * len(ranks) if approximate is None else approximate
    start = weights.new_zeros(weights.shape) if sparse is None else sparse.to(weights)
    widest = [max(column) for column in zip(*ranks)]
    v = _row_spaces(weights, widest, init_v, seed)
    buffer = torch.empty_like(weights)
    widest_columns = _columns(widest, v.shape[1], weights)
    if v.shape[1] > 0:
        u, v = _low_rank(weights, start, v, widest_columns, buffer)
    else:
        u = weights.new_zeros(weights.shape[0], weights.shape[1], 0)
    widest_residual = _residual(weights, u, v, torch.empty_like(weights))
    results = []
    for target_ranks, target_projectors, count, finish in zip(ranks, projectors, iterations, approximate):
        width = max(target_ranks, default=0)
        columns = _columns(target_ranks, width, weights)
        u_t, v_t = u[:, :, :width] * columns, v[:, :width] * columns.mT
        # W - U_t V_t = (W - U V) + the columns of U V that target t drops (a thin product)
        low, high = min(target_ranks, default=0), v.shape[1]
        dropped = (widest_columns - _columns(target_ranks, high, weights))[:, :, low:high]
        residual = torch.baddbmm(widest_residual, u[:, :, low:high] * dropped, v[:, low:high], out=buffer)
        sparse_t = _project(residual, target_projectors, torch.empty_like(weights))
        if count > 1:
            rows = [v_t[b, :rank] for b, rank in enumerate(target_ranks)]
            sparse_t, u_t, v_t = solve(
                weights, target_ranks, target_projectors, count - 1, sparse=sparse_t, init_v=rows, seed=seed, approximate=finish
            )
        elif finish:
            sparse_t = sparse_t.add_(weights).sub_(residual)
        results.append((sparse_t, u_t, v_t))
    return results


def decompose(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    target: Target,
    hyperparameters: QRRPCAHyperparameters,
    record_history: bool = True,
    *,
    init: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> Decomposition:
    """000 Algorithm 2 for ``iterations`` steps on W D (``scaling="activation"``) or W ("none"):
    :func:`solve` with a batch of one.

    P_Omega keeps the K largest |W D - U V| of the matrix (``scope="matrix"``: 000's budget K is
    per matrix, and it reaches lower objectives than OATS' per-row choice ``"row"`` on SmolLM2);
    N:M targets keep N of every M along the input dimension. ``init = (S, U, V)`` warm-starts from
    a previous solution (a direct-call argument, not a hyperparameter: the bilevel allocation uses it).
    """
    hp = hyperparameters
    if hp.scaling not in ("activation", "none"):
        raise ValueError(f"scaling must be 'activation' or 'none', got {hp.scaling!r}")
    if hp.scaling == "activation" and hessian is None:
        raise ValueError("scaling='activation' needs the Hessian (diag H = ||X_j||^2)")
    w = weight.float()
    out_features, in_features = w.shape
    scale = input_norms(hessian).to(w) if hp.scaling == "activation" else torch.ones(in_features).to(w)
    rank = min(target.rank, out_features, in_features)
    init_sparse, _, init_v = (None, None, None) if init is None else init  # a tuple or a Decomposition
    history = []

    def record(sparse, u, v):
        history.append(relative_objective(w, sparse[0] / scale, u[0], v[0] / scale, hessian))

    sparse, u, v = solve(
        (w * scale)[None],
        [rank],
        [SupportProjector(target, hp.scope)],
        hp.iterations,
        sparse=None if init is None else (init_sparse.to(w) * scale)[None],
        init_v=None if init is None else [init_v.to(w) * scale],
        seed=hp.seed,
        callback=record if record_history else None,
    )
    u, v = pad_factors(u[0], v[0] / scale, target.rank)
    return Decomposition((sparse[0] / scale).to(weight.dtype), u.to(weight.dtype), v.to(weight.dtype), tuple(history))


ALGORITHM = Algorithm(
    name="qr_rpca",
    needs_hessian=True,
    hyperparameters=QRRPCAHyperparameters,
    decompose=decompose,
    split=RankRatio(0.25),  # 000: mu_kappa initialised uniformly at 0.25
    paper="Compress Large Language Models via Collaboration Between Learning and Matrix Approximation "
    "(NeurIPS 2025), App. C.3, Algorithm 2",
)
