"""How the parameter budget is spread over matrices: one :class:`Target` per compressed module.

- ``"uniform"``: the same rule for every matrix (``SLRConfig.budget``);
- ``"owl"``: per-layer sparsity from the layers' outlier ratios (:mod:`.owl`), rank ratio kappa
  = ``rank_ratio`` everywhere;
- ``"learned"``: per-layer sparsity and per-matrix rank ratio learned by the bilevel outer loop
  of 000 (:mod:`.bilevel`).

``owl`` and ``learned`` spread the budget of ``compression_ratio`` rho exactly (:mod:`.budget`):
sum_i nnz_i + r_i (m_i + n_i) = sum_i floor((1 - rho) m_i n_i). This package imports torch only;
the pipeline supplies the statistics (input norms, the loss closure).
"""

from __future__ import annotations

import inspect
import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..algorithms import Target
from .bilevel import learn_allocation
from .budget import allocate, kept_total
from .owl import owl_sparsity

if TYPE_CHECKING:
    from ..config import SLRConfig

__all__ = ["ALLOCATIONS", "hyperparameters", "check_kwargs", "uniform_targets", "module_targets"]

ALLOCATIONS = ("uniform", "owl", "learned")
_FUNCTIONS = {"owl": owl_sparsity, "learned": learn_allocation}


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# allocation -> hyperparameter -> (check, allowed values in words)
_CONSTRAINTS = {
    "owl": {
        "outlier_threshold": (lambda v: _real(v) and v > 0, "a float > 0"),
        "lam": (lambda v: _real(v) and 0 <= v <= 0.5, "a float in [0, 0.5]"),
    },
    "learned": {
        "steps": (lambda v: _int(v) and v > 0, "an int > 0"),
        "batch_size": (lambda v: _int(v) and v > 0, "an int > 0"),
        "lr": (lambda v: _real(v) and v > 0, "a float > 0"),
        "sigma2": (lambda v: _real(v) and v > 0, "a float > 0"),
        "gamma0": (lambda v: _real(v) and 0 < v <= 1, "a float in (0, 1]"),
        "gamma_target": (lambda v: _real(v) and 0 < v <= 1, "a float in (0, 1]"),
        "xi_warmup": (lambda v: _real(v) and 0 <= v <= 1, "a float in [0, 1]"),
        "xi_anneal": (lambda v: _real(v) and 0 <= v <= 1, "a float in [0, 1], >= xi_warmup"),
        "inner_iterations": (lambda v: _int(v) and v > 0, "an int > 0"),
        "init": (lambda v: v in ("uniform", "owl"), "'uniform' or 'owl'"),
        "seed": (_int, "an int"),
    },
}


def hyperparameters(allocation: str) -> dict[str, object]:
    """The keyword hyperparameters of ``allocation`` (its function's keyword-only parameters) with
    their defaults; ``"uniform"`` has none."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"`allocation` must be one of {list(ALLOCATIONS)}, got {allocation!r}")
    if allocation == "uniform":
        return {}
    parameters = inspect.signature(_FUNCTIONS[allocation]).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def check_kwargs(allocation: str, kwargs: dict) -> None:
    """Fail on ``allocation_kwargs`` that ``allocation`` does not take or with invalid values."""
    known = hyperparameters(allocation)
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ValueError(
            f"`allocation_kwargs` has {unknown}, which allocation {allocation!r} does not take; allowed: {sorted(known)}"
        )
    for key, value in kwargs.items():
        check, description = _CONSTRAINTS[allocation][key]
        if not check(value):
            raise ValueError(f"`allocation_kwargs[{key!r}]` must be {description}, got {value!r}")
    merged = known | kwargs
    if allocation == "learned" and merged["xi_anneal"] < merged["xi_warmup"]:
        raise ValueError(
            f"`allocation_kwargs['xi_anneal']`={merged['xi_anneal']} must be >= `xi_warmup`={merged['xi_warmup']}"
        )


def uniform_targets(linears: dict[str, nn.Linear], config: SLRConfig) -> dict[str, Target]:
    """The same rule for every matrix: ``config.budget`` (fixed rank or the papers' ratio formulas)."""
    nm_pattern = config.nm_pattern
    targets = {}
    for name, linear in linears.items():
        rank, sparsity = config.budget(linear.out_features, linear.in_features)
        targets[name] = Target(rank=rank, sparsity=sparsity, nm_pattern=nm_pattern)
    return targets


def module_targets(
    blocks: list[dict[str, nn.Linear]],
    config: SLRConfig,
    norms: dict[str, torch.Tensor] | None = None,
    loss=None,
    n_rows: int = 0,
) -> tuple[dict[str, Target], dict | None]:
    """Targets of every module under ``config.allocation``, and the allocation report (None for
    uniform): per-layer sparsity, per-module rank ratio / rank / nnz, loss curve, seconds.

    ``blocks``: the target Linears of every decoder block; ``norms``: ||X_j||_2 of each one's
    inputs (owl, learned); ``loss(W_hat, rows)``, ``n_rows``: see :func:`.bilevel.learn_allocation`.
    """
    linears = {name: linear for group in blocks for name, linear in group.items()}
    if config.allocation == "uniform":
        return uniform_targets(linears, config), None
    if norms is None or (config.allocation == "learned" and loss is None):
        raise ValueError(f"allocation {config.allocation!r} needs the input norms (and, learned, the loss closure)")
    start = time.perf_counter()
    groups = [list(group) for group in blocks if group]
    weights = {name: linear.weight.detach() for name, linear in linears.items()}
    shapes = {name: (linear.out_features, linear.in_features) for name, linear in linears.items()}
    rho, kwargs = config.compression_ratio, config.allocation_kwargs
    loss_curve = []
    if config.allocation == "owl":
        sparsity = owl_sparsity(weights, norms, groups, rho, **kwargs)
        rank_ratio = torch.full((len(linears),), float(config.rank_ratio), dtype=torch.float64)
    else:
        learned = learn_allocation(
            weights, norms, groups, rho, config.rank_ratio, loss, n_rows, **({"seed": config.seed} | kwargs)
        )
        sparsity, rank_ratio, loss_curve = learned.layer_sparsity, learned.rank_ratio, learned.loss_curve
    targets = allocate(shapes, groups, sparsity, rank_ratio, total=kept_total(shapes, rho))
    layer_of = {name: index for index, group in enumerate(groups) for name in group}
    report = {
        "allocation": config.allocation,
        "compression_ratio": rho,
        "layer_sparsity": sparsity.tolist(),
        "modules": {
            name: {
                "layer": layer_of[name],
                "rank_ratio": kappa,
                "rank": targets[name].rank,
                "nnz": targets[name].kept_total(*shapes[name]),
            }
            for name, kappa in zip(layer_of, rank_ratio.tolist())
        },
        "loss_curve": loss_curve,
        "seconds": time.perf_counter() - start,
    }
    return targets, report
