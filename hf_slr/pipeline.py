"""The block-by-block driver: the only place that walks a model.

``compress`` replaces every target ``nn.Linear`` of the decoder blocks by an :class:`SLRLinear`
computed by the configured algorithm; ``build_skeleton`` rebuilds those layers (empty, exact
shapes) before a compressed checkpoint's tensors load; ``dequantize`` turns them back into dense
Linears.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from . import algorithms
from .allocation import module_targets
from .config import SLRConfig
from .modules import FORMAT_VERSION, MARKER_KEY, SLRLinear

DEFAULT_SKIPS = ("lm_head",)


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


def _skipped(name: str, skips: list[str]) -> bool:
    return any(name == skip or name.endswith("." + skip) or f".{skip}." in f".{name}." for skip in skips)


def target_linears(model: nn.Module, config: SLRConfig) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside the decoder blocks, minus ``modules_to_not_convert``."""
    prefix, blocks = decoder_blocks(model)
    skips = list(DEFAULT_SKIPS) + list(config.modules_to_not_convert or [])
    linears = {}
    for name, module in blocks.named_modules():
        full_name = f"{prefix}.{name}"
        if isinstance(module, nn.Linear) and not _skipped(full_name, skips):
            linears[full_name] = module
    return linears


def _set_module(model: nn.Module, name: str, module: nn.Module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _storage_dtype(config: SLRConfig, weight: torch.Tensor) -> torch.dtype:
    return getattr(torch, config.storage_dtype) if config.storage_dtype else weight.dtype


def compress(model: nn.Module, config: SLRConfig, tokenizer=None) -> nn.Module:
    """Compress ``model`` in place with ``config``; fills ``config.compressed_modules``.

    Returns the model, with ``model.slr_report`` (one dict per compressed module: relative
    objective, rank, sparsity, seconds).
    """
    algorithm = algorithms.get(config.method)
    if algorithm.needs_hessian:
        raise NotImplementedError(
            f"method {config.method!r} needs calibration data; the calibrated pipeline is not available yet"
        )
    linears = target_linears(model, config)
    targets = module_targets(linears, config)
    layouts, report = {}, []
    for name, linear in tqdm(linears.items(), desc=f"Compressing ({config.method})"):
        start = time.perf_counter()
        weight = linear.weight.detach().float()
        sparse, u, v = algorithm.decompose(weight, None, targets[name], **config.method_kwargs)
        layer = SLRLinear.from_dense(
            sparse, u, v, linear.bias, nm_pattern=config.nm_pattern, dtype=_storage_dtype(config, linear.weight)
        )
        _set_module(model, name, layer)
        layouts[name] = {"rank": layer.rank, "nnz": layer.nnz, "sparsity": 1.0 - layer.nnz / weight.numel()}
        report.append(
            {
                "module": name,
                "rank": layer.rank,
                "sparsity": layouts[name]["sparsity"],
                "relative_objective": algorithms.base.relative_objective(weight, sparse, u, v, None),
                "seconds": time.perf_counter() - start,
            }
        )
    config.compressed_modules = layouts
    config.base_model = config.base_model or getattr(getattr(model, "config", None), "_name_or_path", None)
    model.slr_report = report
    return model


def build_skeleton(model: nn.Module, config: SLRConfig, dtype: torch.dtype | None = None):
    """Replace each module named in ``config.compressed_modules`` by an empty SLRLinear of its shape."""
    linears = target_linears(model, config)
    missing = sorted(set(config.compressed_modules) - set(linears))
    if missing:
        raise ValueError(
            f"`compressed_modules` names modules that are not Linear layers of this model: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}"
        )
    for name, layout in config.compressed_modules.items():
        linear = linears[name]
        layer = SLRLinear(
            linear.in_features,
            linear.out_features,
            layout["rank"],
            nnz=layout["nnz"],
            nm_pattern=config.nm_pattern,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=dtype or _storage_dtype(config, linear.weight),
        )
        _set_module(model, name, layer)


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every SLRLinear by a dense ``nn.Linear`` with weight S + U V."""
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, SLRLinear)]
    for name, layer in layers:
        with torch.no_grad():
            weight = layer.to_dense()
            dense = nn.Linear(
                layer.in_features,
                layer.out_features,
                bias=layer.bias is not None,
                device=weight.device,
                dtype=dtype or weight.dtype,
            )
            dense.weight.copy_(weight)
            if layer.bias is not None:
                dense.bias.copy_(layer.bias)
        _set_module(model, name, dense)
    return model


def state_dict_with_markers(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` plus the format marker of every SLRLinear (see modules.MARKER_KEY)."""
    state_dict = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, SLRLinear):
            state_dict[f"{name}.{MARKER_KEY}"] = torch.tensor([FORMAT_VERSION], dtype=torch.uint8)
    return state_dict
