"""OWL: outlier-weighted layer-wise sparsity (Yin et al. 2024), as used by 000 (App. A.2, B.3),
002 (Table 13) and OATS.

Per decoder layer l, the layer outlier distribution D_l is the fraction of entries of the Wanda
score A_ij = |W_ij| ||X_j||_2, pooled over the layer's matrices, above M times their mean. Layers
with more outliers keep more: the ratios are min-max normalised to [0, 2 lambda] and centred,
s_l = rho - (d_l - mean(d)), d_l = 2 lambda (D_l - min D) / (max D - min D), as in the OWL
code, so the spread is 2 lambda and the mean is exactly rho. The result is projected onto the
budget set (``project_sparsity``), which only matters when a sparsity leaves [0, 1] or layers differ
in size. Pure tensor math: imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..algorithms.hyperparameters import hyperparameter
from .budget import layer_sizes, project_sparsity

__all__ = ["OwlHyperparameters", "outlier_ratios", "owl_sparsity"]


@dataclass(frozen=True)
class OwlHyperparameters:
    """``allocation_kwargs`` of ``allocation="owl"`` (the OWL paper's defaults, M = 5, lambda = 0.08)."""

    outlier_threshold: float = hyperparameter(5.0, low=0.0, low_open=True, doc="M: outliers exceed M x the mean score")
    lam: float = hyperparameter(0.08, low=0.0, high=0.5, doc="lambda: the layer sparsities spread over [rho - lambda, rho + lambda]")

def outlier_ratios(
    weights: dict[str, torch.Tensor], norms: dict[str, torch.Tensor], groups: list[list[str]], outlier_threshold: float = 5.0
) -> torch.Tensor:
    """D_l: the share of |W_ij| ||X_j|| above ``outlier_threshold`` x their mean over layer l's matrices."""
    ratios = []
    for group in groups:
        scores = torch.cat([(weights[name].float().abs() * norms[name].float()).flatten() for name in group])
        ratios.append(float((scores > outlier_threshold * scores.mean()).double().mean()))
    return torch.tensor(ratios, dtype=torch.float64)


def owl_sparsity(
    weights: dict[str, torch.Tensor],
    norms: dict[str, torch.Tensor],
    groups: list[list[str]],
    compression_ratio: float,
    *,
    outlier_threshold: float = 5.0,
    lam: float = 0.08,
) -> torch.Tensor:
    """Per-layer sparsity s_l (float64 [L]) of OWL with mean ``compression_ratio`` (M = 5, lambda = 0.08)."""
    ratios = outlier_ratios(weights, norms, groups, outlier_threshold)
    spread = ratios.max() - ratios.min()
    scaled = (ratios - ratios.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(ratios)
    sparsity = compression_ratio - (scaled - scaled.mean())
    shapes = {name: tuple(weights[name].shape) for group in groups for name in group}
    return project_sparsity(sparsity, compression_ratio, layer_sizes(shapes, groups))
