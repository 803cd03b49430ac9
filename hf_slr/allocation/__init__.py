"""How the parameter budget is spread over matrices: one :class:`~hf_slr.algorithms.Target` per
compressed module. The one home of the budget rules:

- ``"uniform"``: the same rule for every matrix (:func:`.budget.uniform_target`);
- ``"owl"``: per-layer sparsity from the layers' outlier ratios (:mod:`.owl`, "Outlier Weighed
  Layerwise Sparsity (OWL)", Yin et al. 2024), rank ratio kappa = ``rank_ratio``
  everywhere (unset: each matrix's paper split, ``Algorithm.split``);
- ``"learned"``: per-layer sparsity and per-matrix rank ratio learned by the bilevel outer loop of
  "Compress Large Language Models via Collaboration Between Learning and Matrix Approximation"
  (:mod:`.bilevel`).

``owl`` and ``learned`` spread the budget of ``compression_ratio`` rho exactly (:mod:`.budget`):
sum_i nnz_i + r_i (m_i + n_i) = sum_i floor((1 - rho) m_i n_i). This package is tensor math
(torch only); the compression driver supplies the statistics (input norms, the loss closure).
"""

from __future__ import annotations

import time

import torch

from ..algorithms import Target
from ..algorithms.hyperparameters import check_hyperparameters, hyperparameter_values
from .bilevel import LearnedHyperparameters, learn_allocation
from .budget import allocate, default_rank_ratio, kept_total, uniform_target
from .owl import OwlHyperparameters, owl_sparsity

__all__ = ["ALLOCATIONS", "check_kwargs", "module_targets", "uniform_target"]


ALLOCATIONS = {"uniform": None, "owl": OwlHyperparameters, "learned": LearnedHyperparameters}
"""Allocation name -> its hyperparameter record (None: it takes none)."""


def check_kwargs(allocation: str, kwargs: dict):
    """The validated hyperparameter record of ``allocation`` (None for uniform); ``ValueError``
    naming the allocation, the field and its allowed values otherwise."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"`allocation` must be one of {list(ALLOCATIONS)}, got {allocation!r}")
    record = ALLOCATIONS[allocation]
    if record is None:
        if kwargs:
            raise ValueError(f"`allocation_kwargs` of allocation 'uniform' must be empty (it takes none), got {sorted(kwargs)}")
        return None
    return check_hyperparameters(f"allocation {allocation!r}", record, kwargs, field_label="allocation_kwargs")


def module_targets(
    shapes: dict[str, tuple[int, int]],
    groups: list[list[str]],
    request,
    weights: dict[str, torch.Tensor] | None = None,
    norms: dict[str, torch.Tensor] | None = None,
    loss=None,
    n_rows: int = 0,
) -> tuple[dict[str, Target], dict | None]:
    """Targets of every module under ``request.allocation``, and the allocation report (None for
    uniform): per-layer sparsity, per-module layer and rank ratio, loss curve, seconds.

    ``shapes``: (out, in) per module; ``groups``: the module names of every decoder block;
    ``request``: the SLRConfig (read only); ``weights``: the dense W per module, ``norms``: ||X_j||_2
    of each one's inputs (owl, learned); ``loss(W_hat, rows)``, ``n_rows``: see
    :func:`.bilevel.learn_allocation`.
    """
    if request.allocation == "uniform":
        return {name: uniform_target(*shapes[name], request) for name in shapes}, None
    if norms is None or weights is None or (request.allocation == "learned" and loss is None):
        raise ValueError(f"allocation {request.allocation!r} needs the weights, the input norms (and, learned, the loss)")
    start = time.perf_counter()
    groups = [group for group in groups if group]
    rho = request.effective_compression_ratio
    hyperparameters = hyperparameter_values(check_kwargs(request.allocation, request.allocation_kwargs))
    loss_curve, reference_losses = [], {}
    names = [name for group in groups for name in group]
    if request.rank_ratio is not None:
        kappas = [float(request.rank_ratio)] * len(names)
    else:  # the method's paper split, per matrix, at the mean kept fraction
        kappas = [default_rank_ratio(*shapes[name], request) for name in names]
    if request.allocation == "owl":
        sparsity = owl_sparsity(weights, norms, groups, rho, **hyperparameters)
        rank_ratio = torch.tensor(kappas, dtype=torch.float64)
    else:
        if hyperparameters["seed"] is None:
            hyperparameters["seed"] = request.seed
        initial_kappa = sum(kappas) / len(kappas)
        learned = learn_allocation(weights, norms, groups, rho, initial_kappa, loss, n_rows, **hyperparameters)
        sparsity, rank_ratio, loss_curve = learned.layer_sparsity, learned.rank_ratio, learned.loss_curve
        reference_losses = learned.reference_losses
    targets = allocate(shapes, groups, sparsity, rank_ratio, total=kept_total(shapes, rho))
    layer_of = {name: index for index, group in enumerate(groups) for name in group}
    report = {
        "allocation": request.allocation,
        "compression_ratio": rho,
        "layer_sparsity": sparsity.tolist(),
        "modules": {name: {"layer": layer_of[name], "rank_ratio": kappa} for name, kappa in zip(names, rank_ratio.tolist())},
        "loss_curve": loss_curve,
        "reference_losses": reference_losses,
        "seconds": time.perf_counter() - start,
    }
    return targets, report
