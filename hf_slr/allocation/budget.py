"""From per-layer sparsity and per-matrix rank ratio to exact integer :class:`Target` s.

A decoder layer l with compression ratio s_l keeps (1 - s_l) m n parameters of each of its
[m, n] matrices; matrix i spends the share kappa_i of them on U, V (000 §4: the rank ratio):
r_i = floor(kappa_i (1 - s_l) m n / (m + n)) and nnz_i = (1 - s_l) m n - r_i (m + n). With a
``total``, the integer rounding remainder goes to nnz so that sum_i nnz_i + r_i (m_i + n_i) equals
it exactly. The feasible set of the layer sparsities, {sum_l w_l s_l = rho sum_l w_l, 0 <= s <= 1}
with w_l the parameters of layer l, is what :func:`project_sparsity` projects onto (000 App. C.1).
:func:`uniform_target` is the uniform rule (the first strategy). Pure tensor math: imports torch only.
"""

from __future__ import annotations

import math

import torch

from ..algorithms import Target
from ..algorithms import get as get_algorithm

Shapes = dict[str, tuple[int, int]]


DEFAULT_RANK = 64
"""Rank of U V when the request fixes neither ``rank`` nor ``compression_ratio`` (002/004 use 64
for 4096-wide layers)."""
DEFAULT_SPARSITY = 0.5


def uniform_target(out_features: int, in_features: int, request) -> Target:
    """The uniform rule: the same budget for every [out, in] matrix, from ``request`` (an SLRConfig).

    Without ``compression_ratio``: ``rank`` (default 64; 0 for a pruning method) and ``sparsity``
    (default 0.5, or N:M). A pruning method's ``rank_ratio`` is 0.
    With it, the papers' formulas: for N:M, r = floor((1 - rho - N/M) m n / (m + n)) (HASSLE-free
    §5); for unstructured S, with ``rank_ratio`` kappa, r = floor(kappa (1 - rho) m n / (m + n)) and
    nnz(S) = floor((1 - kappa)(1 - rho) m n) (HASSLE-free App. A.3, the OATS rule). Without
    ``rank_ratio`` the method's own paper split decides r (:func:`default_rank_ratio`) and S holds
    the rest, nnz(S) = floor((1 - rho) m n) - r (m + n), rounded down to whole rows (a multiple of
    m) so that per-row and per-matrix sparse steps both keep exactly nnz(S).
    """
    nm_pattern, sparsity = request.nm_pattern, request.sparsity_fraction
    algorithm = get_algorithm(request.method)
    numel, fan = out_features * in_features, out_features + in_features
    if request.compression_ratio is None:
        rank = (DEFAULT_RANK if algorithm.low_rank else 0) if request.rank is None else request.rank
        return Target(rank=rank, sparsity=DEFAULT_SPARSITY if sparsity is None else sparsity, nm_pattern=nm_pattern)
    kept = 1.0 - request.compression_ratio
    if nm_pattern is not None:
        n, m = nm_pattern
        return Target(rank=int(math.floor((kept - n / m) * numel / fan)), sparsity=sparsity, nm_pattern=nm_pattern)
    if request.rank_ratio is not None:
        kappa = request.rank_ratio
        nnz = int(math.floor((1.0 - kappa) * kept * numel))
        rank = int(math.floor(kappa * kept * numel / fan))
    else:
        kappa = algorithm.split.rank_ratio(out_features, in_features, kept)
        rank = min(int(math.floor(kappa * kept * numel / fan + 1e-9)), out_features, in_features)
        nnz = max(0, int(math.floor(kept * numel)) - rank * fan) if algorithm.sparse else 0
        nnz -= nnz % out_features  # whole rows: a per-row scope keeps nnz exactly, never more than the budget
    return Target(rank=rank, sparsity=(numel - nnz) / numel)


def default_rank_ratio(out_features: int, in_features: int, request) -> float:
    """kappa of an [out, in] matrix under the method's own paper split (``Algorithm.split``) at the
    request's ``compression_ratio``: the share of the kept parameters its U V take."""
    return get_algorithm(request.method).split.rank_ratio(out_features, in_features, 1.0 - request.effective_compression_ratio)


def kept_total(shapes: Shapes, compression_ratio: float) -> int:
    """The parameter budget of a uniform ``compression_ratio``: sum_i floor((1 - rho) m_i n_i)."""
    return sum(int(math.floor((1.0 - compression_ratio) * m * n)) for m, n in shapes.values())


def layer_sizes(shapes: Shapes, groups: list[list[str]]) -> torch.Tensor:
    """w_l = sum of m n over the matrices of layer l (float64)."""
    sizes = [sum(shapes[name][0] * shapes[name][1] for name in group) for group in groups]
    return torch.tensor(sizes, dtype=torch.float64)


def project_sparsity(z: torch.Tensor, target: float, weights: torch.Tensor | None = None, iterations: int = 200) -> torch.Tensor:
    """Euclidean projection of ``z`` onto {sum w s = target sum w, 0 <= s <= 1} (000 App. C.1, Thm. 1).

    KKT: s = clip(z - nu w, 0, 1) with nu the root of the non-increasing f(nu) = sum w s(nu) -
    target sum w, found by bisection; nu is then recomputed in closed form on the free coordinates
    (0 < s < 1) so that the weighted mean is exact up to float64 round-off. 000 states the
    inequality sum s >= rho L; at the optimum of the outer problem it is active (keeping more
    parameters never raises the loss), and the budget here must be met exactly, hence equality.
    ``weights`` (default: all ones) are the layer sizes, equal for a stack of identical blocks.
    """
    z = z.detach().double()
    w = torch.ones_like(z) if weights is None else weights.double() / weights.double().mean()
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"the target mean sparsity must be in [0, 1], got {target}")
    goal = target * float(w.sum())

    def clipped(nu: float) -> torch.Tensor:
        return (z - nu * w).clamp(0.0, 1.0)

    low, high = float(((z - 1.0) / w).min()), float((z / w).max())  # f(low) >= 0 >= f(high)
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        if float((w * clipped(middle)).sum()) > goal:
            low = middle
        else:
            high = middle
    s = clipped(0.5 * (low + high))
    free = (s > 0.0) & (s < 1.0)
    if bool(free.any()):
        fixed = float((w * s)[~free].sum())
        nu = (float((w * z)[free].sum()) - (goal - fixed)) / float((w * w)[free].sum())
        s = torch.where(free, (z - nu * w).clamp(0.0, 1.0), s)
    return s


def _distribute(nnz: list[int], fractions: list[float], bounds: list[int], remainder: int) -> None:
    """Add ``remainder`` (any sign) to ``nnz`` one unit at a time, largest fractional parts first
    for a positive remainder (smallest first for a negative one), within 0 <= nnz_i <= bounds_i."""
    step = 1 if remainder > 0 else -1
    order = sorted(range(len(nnz)), key=lambda i: -step * fractions[i])
    while remainder:
        movable = [i for i in order if 0 <= nnz[i] + step <= bounds[i]][: abs(remainder)]
        if not movable:
            raise ValueError(f"cannot place {remainder} more parameters: every matrix is at its bound")
        for i in movable:
            nnz[i] += step
        remainder -= step * len(movable)


def allocate(
    shapes: Shapes,
    groups: list[list[str]],
    layer_sparsity: torch.Tensor,
    rank_ratio: torch.Tensor,
    total: int | None = None,
) -> dict[str, Target]:
    """Targets of every matrix from s_l per layer and kappa_i per matrix (in ``groups`` order).

    Both are clipped to [0, 1] first (samples of the outer loop may leave the box). With
    ``total`` the integer remainder is spread over nnz (largest fractional parts first) so that
    the budget is met exactly; every Target satisfies ``kept_total(m, n) == nnz_i``.
    """
    names = [name for group in groups for name in group]
    layer_of = [index for index, group in enumerate(groups) for _ in group]
    sparsity = layer_sparsity.detach().double().clamp(0.0, 1.0).tolist()
    ratios = rank_ratio.detach().double().clamp(0.0, 1.0).tolist()
    ranks, nnz, fractions, numels = [], [], [], []
    for name, layer, kappa in zip(names, layer_of, ratios):
        m, n = shapes[name]
        kept = (1.0 - sparsity[layer]) * m * n
        rank = min(int(math.floor(kappa * kept / (m + n))), m, n)
        values = kept - rank * (m + n)
        ranks.append(rank)
        nnz.append(int(math.floor(values)))
        fractions.append(values - math.floor(values))
        numels.append(m * n)
    if total is not None:
        used = sum(k + r * sum(shapes[name]) for name, k, r in zip(names, nnz, ranks))
        _distribute(nnz, fractions, numels, total - used)
    return {
        name: Target(rank=rank, sparsity=(numel - kept) / numel)
        for name, rank, kept, numel in zip(names, ranks, nnz, numels)
    }
