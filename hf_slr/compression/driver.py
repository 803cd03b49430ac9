"""The block-by-block driver: runs a :class:`~.plan.CompressionPlan` on a loaded model.

Every target ``nn.Linear`` of the decoder blocks is replaced by an :class:`SLRLinear` computed by
the plan's algorithm. With calibration data the driver follows the sequential protocol of
SparseGPT (Frantar and Alistarh, 2023): the inputs of decoder block 0 are captured for every
calibration segment; then each block in turn accumulates H = X^T X over the inputs of its Linears,
has them decomposed and replaced, is optionally refined by transformer matching, and its outputs,
computed with the compressed block, become the next block's inputs. Data-free methods decompose
the weights directly.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..algorithms.base import relative_objective
from ..allocation import module_targets
from ..calibration import calibration_ids
from ..integration import decoder_blocks, projection_shape, projection_weight, replace_module
from ..modules import SLRLinear
from .capture import capture_block_inputs, dense_pass, forward_block
from .devices import on_compute_device
from .matching import transformer_matching
from .plan import CompressionPlan
from .statistics import allocation_statistics


def _decompose(name: str, linear: nn.Linear, hessian: torch.Tensor | None, target, plan: CompressionPlan) -> tuple[SLRLinear, dict]:
    """Decompose one Linear in float32 and build its SLRLinear (in the storage dtype) and report entry."""
    start = time.perf_counter()
    weight = projection_weight(linear).detach().float()
    try:
        result = plan.algorithm.run(weight, hessian if plan.algorithm.needs_hessian else None, target, plan.method_hyperparameters)
        if not all(bool(torch.isfinite(t).all()) for t in result):
            raise ValueError("the result holds NaN or inf values")
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"{name}: method {plan.algorithm.name!r} failed: {error}") from error
    storage = plan.request.storage_dtype
    layer = SLRLinear.from_dense(
        result.sparse, result.u, result.v, linear.bias, nm_pattern=target.nm_pattern,
        dtype=getattr(torch, storage) if storage else linear.weight.dtype,
    )
    entry = {
        "module": name,
        "relative_objective": relative_objective(weight, result.sparse, result.u, result.v, hessian),
        "seconds": time.perf_counter() - start,
    }
    if result.history:
        entry["history"] = list(result.history)
    return layer, entry


def run(model: nn.Module, plan: CompressionPlan) -> dict:
    """Compress ``model`` in place by ``plan``; returns the report ``{"modules": [...], "blocks": [...]}``:
    per module its relative objective ||X(W - S - U V)||_F^2 / ||X W||_F^2 (H = I when data-free),
    seconds and, for iterative methods, the objective per iteration (``history``); per block its
    seconds and, with transformer matching, ``tm_loss_before`` / ``tm_loss_after``. With a non-uniform
    allocation the targets come from it (computed on the dense model before the first block is
    compressed) and ``"allocation"`` holds its report."""
    request = plan.request
    prefix, blocks = decoder_blocks(model)
    linears = [{name: model.get_submodule(name) for name in names} for names in plan.blocks]
    shapes = {name: projection_shape(m) for group in linears for name, m in group.items()}
    was_training = model.training
    model.eval()
    report = {"modules": [], "blocks": []}
    try:
        if plan.uses_data:
            input_ids = calibration_ids(request.calibration_data, plan.tokenizer, request.n_samples, request.seq_len, request.seed)
            inputs, calls = capture_block_inputs(model, input_ids)
        statistics = {}
        if request.allocation != "uniform":
            statistics = allocation_statistics(model, request.allocation, blocks, linears, input_ids, inputs, calls)
        targets, allocation_report = module_targets(shapes, plan.blocks, request, **statistics)
        if allocation_report is not None:
            report["allocation"] = allocation_report
        del statistics
        progress = tqdm(list(enumerate(blocks)), desc=f"Compressing ({request.method})")
        for index, block in progress:
            start = time.perf_counter()
            block_entry = {"block": f"{prefix}.{index}"}
            dense, linears[index] = linears[index], None  # the dense weights go with this block
            with on_compute_device(block) as device:
                hessians = {}
                if plan.needs_hessians:
                    inputs, call = inputs.to(device), calls[index].to(device)
                    hessians, dense_outputs = dense_pass(block, call, inputs, dense)
                layers = []
                for name in list(dense):
                    layer, entry = _decompose(name, dense.pop(name), hessians.get(name), targets[name], plan)
                    replace_module(model, name, layer)
                    layers.append(layer)
                    report["modules"].append(entry)
                del hessians
                if plan.matching is not None:
                    block_entry["tm_loss_before"], block_entry["tm_loss_after"] = transformer_matching(
                        block, call, inputs, dense_outputs, layers, plan.matching, seed=request.seed
                    )
                if plan.needs_hessians:
                    del dense_outputs
                    if index + 1 < len(blocks):
                        inputs = forward_block(block, call, inputs)
            block_entry["seconds"] = time.perf_counter() - start
            report["blocks"].append(block_entry)
            progress.set_postfix(block_seconds=f"{block_entry['seconds']:.1f}")
    finally:
        model.train(was_training)
    return report
