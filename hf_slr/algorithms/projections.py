"""Projections onto the sparsity set: boolean keep-masks (True = kept) of a score matrix.

Every mask keeps exactly the number of entries the :class:`Target` asks for (ties are broken by
``torch.topk``), so the result of any method built on these satisfies its target exactly.
"""

from __future__ import annotations

import torch

from .base import Target

__all__ = ["SCOPES", "mask_topk_per_row", "mask_topk_matrix", "mask_nm", "sparsity_mask", "SupportProjector"]

# Comparison groups of unstructured sparsity: every output row keeps its share, or the whole matrix.
SCOPES = ("row", "matrix")

SAMPLE_SIZE = 16384
"""Entries of the (seeded, uniform) sample whose quantile is the first threshold guess of a large matrix."""


def _keep_indices(scores: torch.Tensor, kept: int, dim: int) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if kept > 0:
        mask.scatter_(dim, scores.topk(kept, dim=dim).indices, True)
    return mask


def mask_topk_per_row(scores: torch.Tensor, kept_per_row: int) -> torch.Tensor:
    """Keep the ``kept_per_row`` largest scores of every row."""
    return _keep_indices(scores, min(kept_per_row, scores.shape[-1]), dim=-1)


def mask_topk_matrix(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """Keep the ``kept`` largest scores of the whole matrix."""
    return _keep_indices(scores.reshape(-1), min(kept, scores.numel()), dim=0).view_as(scores)


def mask_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M pattern along the input (last) dimension: keep the N largest of every M consecutive columns.

    Trailing columns that do not fill a whole group are pruned, matching ``Target.kept_per_row``.
    """
    rows, cols = scores.shape
    full = cols // m * m
    mask = torch.zeros_like(scores, dtype=torch.bool)
    groups = scores[:, :full].reshape(rows, cols // m, m)
    mask[:, :full] = _keep_indices(groups, n, dim=-1).reshape(rows, full)
    return mask


def sparsity_mask(scores: torch.Tensor, target: Target, scope: str = "row") -> torch.Tensor:
    """Keep-mask of ``scores`` [out, in] for ``target``: N:M if set, else top-k per row or per matrix."""
    if target.nm_pattern is not None:
        return mask_nm(scores, *target.nm_pattern)
    if scope == "row":
        return mask_topk_per_row(scores, target.kept_per_row(scores.shape[1]))
    if scope == "matrix":
        return mask_topk_matrix(scores, target.kept_total(*scores.shape))
    raise ValueError(f"scope must be 'row' or 'matrix', got {scope!r}")


class SupportProjector:
    """Keep-masks of ``projections.sparsity_mask`` (same sets, exact counts, ties to the lower
    index) for methods that project hundreds of times, without sorting: N:M ranks every entry by
    pairwise comparisons inside its group; top-k per row thresholds at ``kthvalue``; top-k per
    matrix finds the threshold inside a narrow band around the previous call's one (the support
    moves little between iterations; on the first call, around the quantile of a random sample),
    falling back to ``kthvalue``.
    """

    def __init__(self, target: Target, scope: str = "row"):
        if scope not in ("row", "matrix"):
            raise ValueError(f"scope must be 'row' or 'matrix', got {scope!r}")
        self.target, self.scope, self.threshold = target, scope, None
        self.strict = False  # whether exactly `kept` values of the last call are >= the threshold

    def apply(self, values: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` = ``values`` * self(|values|): the values on the keep-set (the same set), zero
        elsewhere. Per matrix, when exactly ``kept`` scores are >= the kept-th largest tau (no tie to
        break, known from the band search), in float passes only: scores above the float just below
        tau, on each sign (no boolean mask, no second search)."""
        scores = values.abs()
        if self.target.nm_pattern is None and self.scope == "matrix":
            kept = self.target.kept_total(*values.shape)
            if 0 < kept < values.numel():
                tau = self._matrix_threshold(scores.reshape(1, -1), kept)
                if self.strict:
                    below = float(torch.nextafter(tau.to(scores.dtype), tau.new_tensor(-float("inf"), dtype=scores.dtype)))
                    threshold = torch.nn.functional.threshold  # v > below, kept; -v > below, kept (negated twice)
                    threshold(torch.neg(values, out=out), below, 0.0, inplace=True).neg_()
                    return out.add_(threshold(values, below, 0.0))
                return torch.mul(values, self._top(scores.reshape(1, -1), kept, lambda *_: tau).view_as(scores), out=out)
        return torch.mul(values, self(scores), out=out)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        if self.target.nm_pattern is not None:
            return self._nm(scores, *self.target.nm_pattern)
        if self.scope == "row":
            return self._top(scores, self.target.kept_per_row(scores.shape[1]), self._row_threshold)
        flat = scores.reshape(1, -1)
        return self._top(flat, self.target.kept_total(*scores.shape), self._matrix_threshold).view_as(scores)

    @staticmethod
    def _nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
        full = scores.shape[1] // m * m
        groups = scores[:, :full].unflatten(1, (-1, m))  # a view: [rows, groups, m]
        mask = torch.zeros_like(scores, dtype=torch.bool)
        keep = mask[:, :full].unflatten(1, (-1, m))
        for i in range(m):
            larger = torch.zeros_like(groups[..., i], dtype=torch.uint8)
            for j in range(m):
                if j != i:  # entries ranked above entry i: larger ones, and equal ones to its left
                    larger += groups[..., j] >= groups[..., i] if j < i else groups[..., j] > groups[..., i]
            torch.lt(larger, n, out=keep[..., i])
        return mask

    @staticmethod
    def _top(scores: torch.Tensor, kept: int, threshold) -> torch.Tensor:
        """Keep the ``kept`` largest of every row of ``scores``, given the kept-th largest values."""
        width = scores.shape[1]
        if kept <= 0 or kept >= width:
            return torch.full_like(scores, kept > 0, dtype=torch.bool)
        tau = threshold(scores, kept)
        keep = scores > tau
        deficit = kept - torch.count_nonzero(keep, dim=1)[:, None]
        if bool((deficit > 0).any()):
            ties = scores == tau
            keep |= ties & (ties.cumsum(1) <= deficit)
        return keep

    @staticmethod
    def _row_threshold(scores: torch.Tensor, kept: int) -> torch.Tensor:
        return scores.kthvalue(scores.shape[1] - kept + 1, dim=1, keepdim=True).values

    def _matrix_threshold(self, flat: torch.Tensor, kept: int) -> torch.Tensor:
        values = flat[0]
        if self.threshold is None and values.numel() > 4 * SAMPLE_SIZE:  # first call: the quantile of a sample
            picks = torch.randint(values.numel(), (SAMPLE_SIZE,), generator=torch.Generator().manual_seed(0))
            rank = round(SAMPLE_SIZE * (1.0 - kept / values.numel()))
            self.threshold = float(values[picks.to(values.device)].kthvalue(min(max(rank, 1), SAMPLE_SIZE)).values)
        if self.threshold is not None:
            hint, spread = self.threshold, 0.02 * abs(self.threshold) + 1e-30
            for _ in range(3):
                above = int(torch.count_nonzero(values > hint + spread))
                band = values[(values > hint - spread).logical_and_(values <= hint + spread)]
                if above < kept <= above + band.numel():
                    tau = band.kthvalue(band.numel() - (kept - above) + 1).values
                    self.threshold, self.strict = float(tau), above + int(torch.count_nonzero(band >= tau)) == kept
                    return torch.tensor(self.threshold, dtype=values.dtype, device=values.device)
                spread *= 4
        tau = values.kthvalue(values.numel() - kept + 1).values
        self.threshold, self.strict = float(tau), False
        return tau
