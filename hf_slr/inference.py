"""Choosing how a model's SLRLinear layers execute at inference (docs/runtime.md).

Each layer picks its runtime form itself (``"auto"``: the C++ kernels on CPU, cuSPARSELt 2:4 on
CUDA, see :mod:`hf_slr.runtime.dispatch`); :func:`set_runtime` overrides that choice for a whole
model or some of its layers, ``$HF_SLR_RUNTIME`` for every layer without an override.
"""

from __future__ import annotations

from torch import nn

from .integration import compressed_layers, matches
from .runtime import FORMS, RUNTIME_ENV
from .runtime.dispatch import check_form

__all__ = ["FORMS", "RUNTIME_ENV", "runtime_forms", "set_runtime"]


def set_runtime(model: nn.Module, form: str | None = "auto", modules: list[str] | str | None = None) -> nn.Module:
    """Set the runtime form of the model's SLRLinear layers (all, or those named by ``modules``:
    full names or suffixes such as ``"mlp"`` or ``"q_proj"``) and drop their prepared forms.

    ``form``: ``"auto"``, ``"kernel"`` (C++ sparse kernels, CPU), ``"torch"`` (pure torch: CSR
    products / dense temporaries), ``"semi_structured"`` (2:4 on CUDA), ``"dense"`` (W = S + U V
    kept dense: fastest compute, no memory saving), ``"reference"`` (the differentiable path that
    rebuilds S every call), or None (follow ``$HF_SLR_RUNTIME``, else auto). Training and
    grad-enabled calls always run the reference path. Returns the model.
    """
    if form is not None:
        check_form(form)
    layers = compressed_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no SLRLinear layer")
    if modules is not None:
        names = [modules] if isinstance(modules, str) else list(modules)
        layers = {name: layer for name, layer in layers.items() if matches(name, names)}
        if not layers:
            raise ValueError(f"modules={names} names no SLRLinear layer of the model")
    for layer in layers.values():
        layer.runtime.form = form
        layer.runtime.clear()
    return model


def runtime_forms(model: nn.Module) -> dict[str, str | None]:
    """Per SLRLinear, the form prepared now (None before its first inference call)."""
    return {name: layer.runtime.prepared_form for name, layer in compressed_layers(model).items()}
