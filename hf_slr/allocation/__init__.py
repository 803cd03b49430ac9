"""How the parameter budget is spread over matrices: one :class:`Target` per compressed module."""

from __future__ import annotations

from torch import nn

from ..algorithms import Target
from ..config import SLRConfig


def uniform_targets(linears: dict[str, nn.Linear], config: SLRConfig) -> dict[str, Target]:
    """The same rule for every matrix: ``config.budget`` (fixed rank or the papers' ratio formulas)."""
    nm_pattern = config.nm_pattern
    targets = {}
    for name, linear in linears.items():
        rank, sparsity = config.budget(linear.out_features, linear.in_features)
        targets[name] = Target(rank=rank, sparsity=sparsity, nm_pattern=nm_pattern)
    return targets


def module_targets(linears: dict[str, nn.Linear], config: SLRConfig) -> dict[str, Target]:
    """Targets of every module under ``config.allocation``."""
    return uniform_targets(linears, config)
