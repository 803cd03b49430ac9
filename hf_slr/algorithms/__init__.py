"""Layer-wise S + LR algorithms, one module per method, discovered by name.

A module that defines ``decompose(weight, hessian, target, **hyper)`` is a method named after its
file; ``NEEDS_HESSIAN = False`` marks data-free methods. Helper modules (projections, low-rank
solvers) define no ``decompose``.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from .base import Algorithm, Target

__all__ = ["Algorithm", "Target", "available", "get", "hyperparameters"]

_REGISTRY: dict[str, Algorithm] | None = None


def _discover() -> dict[str, Algorithm]:
    global _REGISTRY
    if _REGISTRY is None:
        found = {}
        for info in pkgutil.iter_modules(__path__):
            if info.name.startswith("_") or info.name == "base":
                continue
            module = importlib.import_module(f"{__name__}.{info.name}")
            if hasattr(module, "decompose"):
                found[info.name] = Algorithm(
                    info.name, module.decompose, getattr(module, "NEEDS_HESSIAN", True)
                )
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


def hyperparameters(name: str) -> dict[str, object]:
    """The keyword hyperparameters of method ``name`` with their defaults."""
    signature = inspect.signature(get(name).decompose)
    return {
        p.name: p.default
        for p in signature.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
