"""How a method's paper splits a matrix's kept parameters between S and U V by default.

With only ``compression_ratio`` rho set, an [m, n] matrix keeps (1 - rho) m n parameters; the
method's own split decides how many go to U V. Two rules appear in the seed papers:

- :class:`RankRatio` kappa: r = floor(kappa (1 - rho) m n / (m + n)) (OATS; HASSLE-free 004 App. A.3
  uses kappa = 0.3, "default value in OATS for the Llama3-8B model"; 3BASiL 002 Table 3 at p = 0.5
  is best with 3:8 + LR, kappa = 0.25);
- :class:`ScaledRank`: a fixed rank at the paper's width, r = rank min(m, n) / width (SSLC 001
  App. E.1: r = 128 at 4096), whatever rho.

Either is expressed as kappa_i, the share of matrix i's kept parameters spent on U V, which is what
the budget code (``hf_slr.allocation.budget``) consumes. Pure arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RankRatio:
    """kappa: the same share of every matrix's kept parameters goes to U V."""

    kappa: float

    def rank_ratio(self, out_features: int, in_features: int, kept: float) -> float:
        return self.kappa

    def __str__(self) -> str:
        return f"rank ratio kappa = {self.kappa}"


@dataclass(frozen=True)
class ScaledRank:
    """Rank ``rank`` at width ``width``, scaled with the smaller dimension: r = rank min(m, n) / width
    (at least 1), capped by the kept parameters (kappa <= 1)."""

    rank: int
    width: int

    def rank_for(self, out_features: int, in_features: int) -> int:
        return max(1, round(self.rank * min(out_features, in_features) / self.width))

    def rank_ratio(self, out_features: int, in_features: int, kept: float) -> float:
        kept_parameters = kept * out_features * in_features
        if kept_parameters <= 0:
            return 0.0
        return min(1.0, self.rank_for(out_features, in_features) * (out_features + in_features) / kept_parameters)

    def __str__(self) -> str:
        return f"rank {self.rank} at width {self.width}, scaled to min(out, in)"


PRUNING = RankRatio(0.0)
"""Pruning methods: no U V."""
LOW_RANK_ONLY = RankRatio(1.0)
"""Pure low-rank methods: every kept parameter in U V."""
