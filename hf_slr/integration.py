"""Where hf_slr meets a transformers model: finding the decoder blocks and their Linear layers,
swapping in :class:`SLRLinear` (empty skeletons before a checkpoint loads, computed layers after
compression), turning them back into dense Linears, and the checkpoint's state dict.

This is the only module that walks a model (like transformers' ``integrations/``); it knows the
checkpoint layout through :mod:`hf_slr.format` and nothing of how a layer was computed.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import format as slr_format
from .modules import SLRLinear

DEFAULT_SKIPS = ("lm_head",)
"""Modules never compressed (the embeddings are not Linear layers of the blocks anyway)."""
PROJECTIONS = (nn.Linear, Conv1D)
"""The layers computing y = x W^T + b that hf_slr compresses: ``nn.Linear`` (W stored [out, in]) and
GPT-2's ``Conv1D`` (W^T stored, [in, out])."""


def projection_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a projection layer."""
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    return module.out_features, module.in_features


def projection_weight(module: nn.Module) -> torch.Tensor:
    """W [out, in] of a projection layer (a view for Conv1D, no copy)."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def swap_projection_weight(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """Make ``weight`` [out, in] the layer's W (no autograd); returns the tensor it replaced, in the
    layer's own storage layout, for :func:`restore_projection_weight`."""
    previous = module.weight.data
    module.weight.data = (weight.T if isinstance(module, Conv1D) else weight).to(previous)
    return previous


def restore_projection_weight(module: nn.Module, previous: torch.Tensor) -> None:
    module.weight.data = previous


def matches(name: str, patterns: list[str] | tuple[str, ...]) -> bool:
    """Whether the module ``name`` is named by one of ``patterns``: its full name, a suffix of
    whole components (``"q_proj"``, ``"self_attn.q_proj"``) or a component path inside it
    (``"mlp"`` names every module under ``...mlp.``)."""
    return any(name == p or name.endswith("." + p) or f".{p}." in f".{name}." for p in patterns)


def unmatched_patterns(model: nn.Module, patterns: list[str]) -> list[str]:
    """The ``patterns`` that name no module of ``model`` (see :func:`matches`)."""
    names = [name for name, _ in model.named_modules()]
    return [pattern for pattern in patterns if not any(matches(name, [pattern]) for name in names)]


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder blocks: the ModuleList with ``num_hidden_layers`` entries."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if config is not None else None
    n_layers = getattr(text_config, "num_hidden_layers", None)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n_layers is None or len(module) == n_layers)
    ]
    if not candidates:
        raise ValueError(f"Could not find the decoder blocks of {type(model).__name__} (a ModuleList of {n_layers} layers)")
    return max(candidates, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def block_linears(model: nn.Module, modules_to_not_convert: list[str] | None = None) -> list[dict[str, nn.Module]]:
    """Per decoder block, its projection layers (:data:`PROJECTIONS`) by full name, minus
    ``modules_to_not_convert``."""
    prefix, blocks = decoder_blocks(model)
    skips = list(DEFAULT_SKIPS) + list(modules_to_not_convert or [])
    groups = []
    for index, block in enumerate(blocks):
        named = ((f"{prefix}.{index}.{name}", module) for name, module in block.named_modules())
        groups.append({name: module for name, module in named if isinstance(module, PROJECTIONS) and not matches(name, skips)})
    return groups


def compressed_layers(model: nn.Module) -> dict[str, SLRLinear]:
    """The model's SLRLinear layers by qualified name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, SLRLinear)}


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where the submodule ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int, bool]]:
    """(out_features, in_features, has a bias) of every projection of the decoder blocks (what a
    checkpoint may compress)."""
    return {name: (*projection_shape(m), m.bias is not None) for group in block_linears(model) for name, m in group.items()}


def build_skeleton(model: nn.Module, layouts: dict[str, slr_format.LayerLayout], dtype: torch.dtype | None = None) -> None:
    """Replace each Linear named in ``layouts`` by an empty SLRLinear of that layout, in ``dtype``
    (default: the Linear's)."""
    for name, layout in layouts.items():
        weight = model.get_submodule(name).weight
        replace_module(model, name, SLRLinear.from_layout(layout, device=weight.device, dtype=dtype or weight.dtype))


def check_loaded(model: nn.Module) -> None:
    """The value checks of :func:`hf_slr.format.check_layer_values` on every loaded SLRLinear."""
    for name, layer in compressed_layers(model).items():
        tensors = {key: value for key, value in layer.state_dict().items()}
        slr_format.check_layer_values(name, layer.layout, tensors)


def dequantize(model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Replace every SLRLinear by a dense ``nn.Linear`` with weight S + U V (in ``dtype``, default
    the layer's; transformers passes ``config.dtype``, which is a string after a save/reload)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    for name, layer in compressed_layers(model).items():
        with torch.no_grad():
            weight = layer.to_dense()
            dense = nn.Linear(
                layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device,
                dtype=dtype or weight.dtype,
            )
            dense.weight.copy_(weight)
            if layer.bias is not None:
                dense.bias.copy_(layer.bias)
        replace_module(model, name, dense)
    return model


def checkpoint_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` plus the record of every SLRLinear (see :mod:`hf_slr.format`)."""
    state_dict = model.state_dict()
    for name, layer in compressed_layers(model).items():
        state_dict[f"{name}.{slr_format.RECORD_KEY}"] = slr_format.record(layer.nm_pattern)
    return state_dict


def information_bound_bytes(model: nn.Module) -> int:
    """Bytes a lossless encoding of the compressed model needs at the least: untouched tensors,
    plus :func:`hf_slr.format.information_bound_bits` of every SLRLinear. Tied tensors count once."""
    layers = compressed_layers(model)
    bits = sum(
        slr_format.information_bound_bits(layer.layout, layer.sparse_values.element_size() * 8) for layer in layers.values()
    )
    seen = set()
    for name, tensor in model.state_dict().items():
        if name.rpartition(".")[0] in layers or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        bits += tensor.numel() * tensor.element_size() * 8
    return (bits + 7) // 8


def kept_fraction(model: nn.Module) -> float:
    """(nnz(S) + rank (out + in)) / (out x in), summed over the compressed projections: the share
    of their parameters the model keeps, S values and U, V counted together."""
    layers = compressed_layers(model).values()
    if not layers:
        raise ValueError("The model has no SLRLinear layer")
    kept = sum(layer.nnz + layer.rank * (layer.out_features + layer.in_features) for layer in layers)
    return kept / sum(layer.out_features * layer.in_features for layer in layers)
