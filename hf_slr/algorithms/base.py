"""The one contract every layer-wise algorithm follows.

An algorithm is a function ``decompose(weight, hessian, target, **hyper) -> (S, U, V)``:

- ``weight``: the dense matrix W, float32 (or float64), shape [out, in];
- ``hessian``: H = X^T X accumulated over the calibration tokens, float32, shape [in, in]
  (``None`` for data-free methods; such methods set ``needs_hessian = False``);
- ``target``: the :class:`Target` the result must satisfy exactly;
- returns S [out, in] (zeros outside its support), U [out, r], V [r, in], all in W's dtype.

This package is pure tensor math: it imports torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Target:
    """What a decomposition must satisfy: S in the sparsity set, rank(U V) <= rank.

    ``sparsity`` is the fraction of zeros of S (unstructured); when ``nm_pattern = (N, M)`` is set,
    S keeps N of every M consecutive weights along the input dimension instead.
    """

    rank: int = 0
    sparsity: float = 0.0
    nm_pattern: tuple[int, int] | None = None

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"Target.rank must be >= 0, got {self.rank}")
        if self.nm_pattern is None:
            if not 0.0 <= self.sparsity <= 1.0:
                raise ValueError(f"Target.sparsity must be in [0, 1], got {self.sparsity}")
        else:
            n, m = self.nm_pattern
            if not 0 < n <= m:
                raise ValueError(f"Target.nm_pattern must satisfy 0 < N <= M, got {self.nm_pattern}")

    def kept_per_row(self, in_features: int) -> int:
        """Nonzeros per row of S under a per-row budget (unstructured) or the N:M pattern."""
        if self.nm_pattern is not None:
            n, m = self.nm_pattern
            return in_features // m * n
        return in_features - int(math.floor(self.sparsity * in_features + 1e-6))

    def kept_total(self, out_features: int, in_features: int) -> int:
        """Nonzeros of S under a per-matrix budget (unstructured) or the N:M pattern."""
        if self.nm_pattern is not None:
            return out_features * self.kept_per_row(in_features)
        numel = out_features * in_features
        return numel - int(math.floor(self.sparsity * numel + 1e-6))


Decompose = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Algorithm:
    """A registered method: its function and whether it needs calibration statistics."""

    name: str
    decompose: Decompose
    needs_hessian: bool


def relative_objective(
    weight: torch.Tensor, sparse: torch.Tensor, u: torch.Tensor, v: torch.Tensor, hessian: torch.Tensor | None
) -> float:
    """tr(E H E^T) / tr(W H W^T) with E = W - S - U V (002 eq. 1; H = I when ``hessian`` is None)."""
    error = weight - sparse - u @ v
    if hessian is None:
        return float(error.pow(2).sum() / weight.pow(2).sum().clamp_min(1e-30))
    num = ((error @ hessian) * error).sum()
    den = ((weight @ hessian) * weight).sum().clamp_min(1e-30)
    return float(num / den)
