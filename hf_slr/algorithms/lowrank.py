"""Low-rank solvers and Hessian helpers shared by the S + LR methods.

Every solver returns factors ``(U, V)`` with exactly ``rank`` columns / rows (zero-padded when the
matrix has smaller rank), so ``U @ V`` has rank <= ``rank``.
"""

from __future__ import annotations

import torch

__all__ = [
    "truncated_svd",
    "randomized_svd",
    "bilateral_random_projection",
    "hessian_sqrt",
    "reduced_rank_regression",
    "damp_hessian",
    "zero_factors",
    "input_norms",
    "pad_factors",
    "balance_factors",
    "WhitenedLowRank",
]

# Eigenvalues below this fraction of the largest are treated as zero (dead / collinear channels).
EIGEN_RELATIVE_FLOOR = 1e-10
NORM_RELATIVE_FLOOR = 1e-5
"""Input norms below this fraction of the largest are floored to it (dead channels): the channel
then weighs < 1e-10 of the largest in any D-scaled objective, and undoing the scaling (D^-1)
amplifies float32 round-off of the scaled problem by at most 1e5, not 1e10, so values stay bounded."""


def pad_factors(u: torch.Tensor, v: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad (U [m, k], V [k, n]) to exactly ``rank`` columns / rows."""
    missing = rank - u.shape[1]
    if missing > 0:
        u = torch.cat([u, u.new_zeros(u.shape[0], missing)], dim=1)
        v = torch.cat([v, v.new_zeros(missing, v.shape[1])], dim=0)
    return u, v


def balance_factors(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each rank-1 component of U V so that ||U[:, c]|| = ||V[c, :]||; U V is unchanged.

    The convention of PiSSA (Meng, Wang & Zhang, "PiSSA: Principal Singular Values and Singular
    Vectors Adaptation of Large Language Models", 2024): when U V is an SVD, each side carries the
    square root of the singular value. Solvers that leave the singular values on one side (U after
    a whitened SVD, V after a bilateral random projection) produce factors whose scales differ by
    orders of magnitude, which makes gradient steps on them (LoRA in factors mode, transformer
    matching) badly conditioned. A component with a zero side is zero on both sides. Computed in
    float64 and returned in the input dtypes.
    """
    u64, v64 = u.double(), v.double()
    u_norm, v_norm = torch.linalg.vector_norm(u64, dim=0), torch.linalg.vector_norm(v64, dim=1)
    live = (u_norm > 0) & (v_norm > 0)
    ratio = torch.where(live, v_norm / torch.where(live, u_norm, 1.0), 0.0).sqrt()
    inverse = torch.where(live, 1.0 / torch.where(live, ratio, 1.0), 0.0)
    return (u64 * ratio).to(u.dtype), (v64 * inverse[:, None]).to(v.dtype)


def zero_factors(
    out_features: int, in_features: int, rank: int, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """U = 0 [out, rank], V = 0 [rank, in]: the low-rank part of a pure pruning method."""
    return like.new_zeros(out_features, rank), like.new_zeros(rank, in_features)


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` approximation U @ V of ``matrix`` in Frobenius norm (Eckart-Young)."""
    if rank == 0:
        return zero_factors(*matrix.shape, 0, matrix)
    left, singular, right_t = torch.linalg.svd(matrix, full_matrices=False)
    k = min(rank, singular.numel())
    return pad_factors(left[:, :k] * singular[:k], right_t[:k], rank)


def _range_basis(
    matrix: torch.Tensor, test_matrix: torch.Tensor, power_iterations: int
) -> torch.Tensor:
    """Orthonormal basis of range((A A^T)^q A Omega), re-orthonormalised at every power step."""
    basis = torch.linalg.qr(matrix @ test_matrix).Q
    for _ in range(power_iterations):
        basis = torch.linalg.qr(matrix.T @ basis).Q
        basis = torch.linalg.qr(matrix @ basis).Q
    return basis


def _gaussian(rows: int, cols: int, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(rows, cols, generator=generator, dtype=like.dtype).to(like.device)


def randomized_svd(
    matrix: torch.Tensor,
    rank: int,
    *,
    oversampling: int = 10,
    power_iterations: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomized SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1) truncated to ``rank``."""
    if rank == 0:
        return truncated_svd(matrix, 0)
    sketch = min(rank + oversampling, min(matrix.shape))
    basis = _range_basis(matrix, _gaussian(matrix.shape[1], sketch, matrix, generator), power_iterations)
    u_small, v = truncated_svd(basis.T @ matrix, rank)
    return basis @ u_small, v


def bilateral_random_projection(
    matrix: torch.Tensor,
    rank: int,
    *,
    test_matrix: torch.Tensor | None = None,
    power_iterations: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` BRP approximation of 001 eq. 7 (GoDec, Zhou & Tao 2011): L = Y1 (A2^T Y1)^-1 Y2^T.

    Y1 = A A1 and Y2 = A^T A2 with GoDec's choice A2 = Y1, so L = Q Q^T A with Q = orth(Y1); this
    QR form is the same matrix, computed without inverting the (possibly singular) A2^T Y1.
    ``test_matrix`` is A1 [in, rank] (Gaussian from ``generator`` when None); GoDec's power scheme
    replaces Y1 by (A A^T)^q A A1.
    """
    if rank == 0:
        return truncated_svd(matrix, 0)
    if test_matrix is None:
        test_matrix = _gaussian(matrix.shape[1], rank, matrix, generator)
    basis = _range_basis(matrix, test_matrix, power_iterations)[:, :rank]
    return pad_factors(basis, basis.T @ matrix, rank)


def hessian_sqrt(hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H^1/2, H^+1/2) of a symmetric PSD H via float64 eigendecomposition.

    Eigenvalues below ``EIGEN_RELATIVE_FLOOR`` x the largest (dead channels, round-off negatives)
    count as zero: the inverse square root is the Moore-Penrose one on the numerical range of H.
    """
    sym = 0.5 * (hessian + hessian.T).double()
    eigenvalues, eigenvectors = torch.linalg.eigh(sym)
    floor = EIGEN_RELATIVE_FLOOR * eigenvalues.abs().max().clamp_min(1e-300)
    live = eigenvalues > floor
    root = torch.where(live, eigenvalues, torch.zeros_like(eigenvalues)).sqrt()
    inv_root = torch.where(live, 1.0 / root.clamp_min(floor.sqrt()), torch.zeros_like(root))
    return (eigenvectors * root) @ eigenvectors.T, (eigenvectors * inv_root) @ eigenvectors.T


def reduced_rank_regression(
    residual: torch.Tensor,
    hessian: torch.Tensor,
    rank: int,
    *,
    roots: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin_{rank(L) <= r} tr((R - L) H (R - L)^T) for R [out, in]: L = P_r(R H^1/2) H^+1/2.

    002 eq. 4 in the [out, in] convention (002 writes the transpose, H^-1/2 P_r(H^1/2 R)). Returns
    (U, V) with U @ V = L. Directions of ``residual`` in the null space of H cost nothing and are
    left out of L. ``roots`` = ``hessian_sqrt(hessian)``, when the same H serves many calls.
    """
    root, inv_root = hessian_sqrt(hessian) if roots is None else roots
    u, v = truncated_svd(residual.double() @ root.double(), rank)
    return u.to(residual.dtype), (v @ inv_root.double()).to(residual.dtype)


def damp_hessian(hessian: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """H + lambda I with lambda = percdamp * mean(diag H) (SparseGPT, Frantar & Alistarh 2023)."""
    damping = percdamp * hessian.diagonal().mean()
    return hessian + damping * torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)


def floored_norms(norms: torch.Tensor) -> torch.Tensor:
    """``norms`` (float32) with dead channels floored at ``NORM_RELATIVE_FLOOR`` x the largest; all
    ones when every channel is dead."""
    norms = norms.double().clamp_min(0)
    largest = norms.max()
    if largest <= 0:
        return torch.ones_like(norms, dtype=torch.float32)
    return norms.clamp_min(NORM_RELATIVE_FLOOR * largest).float()


def input_norms(hessian: torch.Tensor) -> torch.Tensor:
    """D = sqrt(diag H) = ||X_j||_2 per input channel (Wanda's scale, 004 §4.1.2), float32, with
    dead channels floored (:func:`floored_norms`) so that D^-1 stays finite and bounded."""
    return floored_norms(hessian.diagonal().double().clamp_min(0).sqrt())


class WhitenedLowRank:
    """Randomized 002 eq. 4 for a fixed H = Q Lambda Q^T: L = P_r(R F) F^-1 with F = Q Lambda^1/2.

    The closed-form low-rank step of 3BASiL and HASSLE-free, reused across their iterations: the
    eigendecomposition is computed once by the caller and the whitened residual R F is never
    formed; the randomized SVD (Halko et al. 2011, Alg. 4.4) only multiplies it with thin
    matrices. Its test matrix is the previous right singular basis (stored as F V), so successive
    calls continue one subspace iteration.
    """

    def __init__(self, q, sqrt_lam, out_features, rank, sketch, generator):
        self.q, self.sqrt_lam, self.rank = q, sqrt_lam, rank
        self.factor = q * sqrt_lam
        self.test = self.factor @ torch.randn(q.shape[0], sketch, generator=generator, dtype=q.dtype).to(q.device)
        self.u = q.new_zeros(out_features, rank)
        self.right = q.new_zeros(rank, q.shape[0])

    def fit(self, residual: torch.Tensor, power_iterations: int = 0) -> None:
        """(U, right) <- top-``rank`` SVD of residual @ F (U carries the singular values)."""
        if self.rank == 0:
            return
        left = torch.linalg.qr(residual @ self.test).Q
        for _ in range(power_iterations):
            left = torch.linalg.qr(residual @ (self.factor @ (self.factor.T @ (residual.T @ left)))).Q
        small_u, right = truncated_svd((left.T @ residual) @ self.factor, self.test.shape[1])
        self.u, self.right = left @ small_u[:, : self.rank], right[: self.rank]
        self.test = self.factor @ right.T

    def v(self) -> torch.Tensor:
        """V of L = U V: right Lambda^-1/2 Q^T."""
        return (self.right / self.sqrt_lam) @ self.q.T

    def v_hessian(self) -> torch.Tensor:
        """V H = right Lambda^1/2 Q^T = (F right^T)^T, so that L H = U (V H) (002 eq. 3)."""
        return self.test[:, : self.rank].T
