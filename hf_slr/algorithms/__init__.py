"""Layer-wise S + LR algorithms, one module per method, each declaring itself.

A module that defines ``ALGORITHM = Algorithm(name, needs_hessian, hyperparameters, decompose,
paper)`` is a registered method (its ``name`` is its file name). Helper modules (projections,
low-rank solvers, the alternating loop, the hyperparameter machinery) define none.

    algorithm = algorithms.get("oats")
    record = algorithm.check({"iterations": 40})          # ValueError on a bad name, type or range
    sparse, u, v = result = algorithm.run(weight, hessian, target, record)
    result.history                                         # objective per iteration
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import Algorithm, Decomposition, Target
from .hyperparameters import check_hyperparameters, describe_hyperparameters, hyperparameter

__all__ = [
    "Algorithm",
    "Decomposition",
    "Target",
    "available",
    "check_hyperparameters",
    "describe_hyperparameters",
    "get",
    "hyperparameter",
]

_REGISTRY: dict[str, Algorithm] | None = None


def _discover() -> dict[str, Algorithm]:
    global _REGISTRY
    if _REGISTRY is None:
        found = {}
        for info in pkgutil.iter_modules(__path__):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{__name__}.{info.name}")
            algorithm = getattr(module, "ALGORITHM", None)
            if isinstance(algorithm, Algorithm):
                if algorithm.name != info.name:
                    raise RuntimeError(f"{module.__name__}.ALGORITHM is named {algorithm.name!r}, not {info.name!r}")
                found[info.name] = algorithm
        _REGISTRY = dict(sorted(found.items()))
    return _REGISTRY


def available() -> list[str]:
    """Names of all registered methods."""
    return list(_discover())


def get(name: str) -> Algorithm:
    """The registered method ``name``; a ``ValueError`` lists the allowed names otherwise."""
    registry = _discover()
    if name not in registry:
        raise ValueError(f"Unknown method {name!r}; allowed values: {sorted(registry)}")
    return registry[name]
