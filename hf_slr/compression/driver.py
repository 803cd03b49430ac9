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

import resource
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..algorithms.base import relative_objective
from ..allocation import module_targets
from ..calibration import calibration_ids
from ..integration import decoder_blocks, projection_shape, projection_weight, replace_module
from ..modules import SLRLinear
from . import distributed
from .capture import capture_block_inputs, dense_pass, forward_block
from .devices import on_compute_device
from .matching import transformer_matching
from .plan import CompressionPlan
from .statistics import allocation_statistics


def _storage_dtype(plan: CompressionPlan, linear: nn.Module) -> torch.dtype:
    storage = plan.request.storage_dtype
    return getattr(torch, storage) if storage else linear.weight.dtype


def _decompose(name: str, linear: nn.Linear, hessian: torch.Tensor | None, target, plan: CompressionPlan) -> tuple[SLRLinear, dict]:
    """Decompose one Linear in float32 and build its SLRLinear (in the storage dtype) and report entry."""
    start = time.perf_counter()
    weight = projection_weight(linear).detach().float()
    try:
        # No per-iteration objective: it costs an [out, in] x [in, in] product per iteration; the final
        # one is in the entry, convergence curves come from benchmarks/layerwise_objective.py.
        result = plan.algorithm.run(
            weight, hessian if plan.algorithm.needs_hessian else None, target, plan.method_hyperparameters, record_history=False
        )
        if not all(bool(torch.isfinite(t).all()) for t in result):
            raise ValueError("the result holds NaN or inf values")
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"{name}: method {plan.algorithm.name!r} failed: {error}") from error
    layer = SLRLinear.from_dense(
        result.sparse, result.u, result.v, linear.bias, nm_pattern=target.nm_pattern, dtype=_storage_dtype(plan, linear)
    )
    entry = {
        "module": name,
        "relative_objective": relative_objective(weight, result.sparse, result.u, result.v, hessian),
        "seconds": time.perf_counter() - start,
    }
    return layer, entry


def prepare(model: nn.Module, plan: CompressionPlan, input_ids: torch.LongTensor | None = None):
    """What the block loop needs before block 0: the calibration rows' block-0 inputs and every
    block's call arguments (None when no data is used), the targets and the allocation report.
    ``input_ids`` default to the plan's calibration segments."""
    request = plan.request
    _, blocks = decoder_blocks(model)
    linears = [{name: model.get_submodule(name) for name in names} for names in plan.blocks]
    shapes = {name: projection_shape(m) for group in linears for name, m in group.items()}
    inputs = calls = None
    if plan.uses_data:
        if input_ids is None:
            input_ids = calibration_ids(request.calibration_data, plan.tokenizer, request.n_samples, request.seq_len, request.seed)
        inputs, calls = capture_block_inputs(model, distributed.shard_rows(input_ids))
    statistics = {}
    if request.allocation != "uniform":
        statistics = allocation_statistics(model, request.allocation, blocks, linears, input_ids, inputs, calls)
    targets, allocation_report = module_targets(shapes, plan.blocks, request, **statistics)
    return inputs, calls, targets, allocation_report


def compress_block(
    model: nn.Module, plan: CompressionPlan, index: int, targets: dict, inputs: torch.Tensor | None, calls, report: dict
) -> torch.Tensor | None:
    """Compress decoder block ``index`` of ``model`` (its Linears replaced in place) and return the
    next block's inputs (None when no data is used). Appends the modules' and the block's entries
    to ``report``: per block its seconds, mean relative objective, peak resident memory and, with
    transformer matching, ``tm_loss_before`` / ``tm_loss_after``."""
    start = time.perf_counter()
    prefix, blocks = decoder_blocks(model)
    block = blocks[index]
    entry = {"block": f"{prefix}.{index}"}
    dense = {name: model.get_submodule(name) for name in plan.blocks[index]}
    owners = distributed.owners({name: projection_shape(linear) for name, linear in dense.items()})
    rank = distributed.world()[0]
    entries = []
    with on_compute_device(block) as device:
        hessians = {}
        if plan.needs_hessians:
            inputs, call = inputs.to(device), calls[index].to(device)
            sums, dense_outputs = dense_pass(block, call, inputs, dense)
            distributed.all_reduce_hessians(sums)  # float64: the same H whatever the row split
            hessians = {name: total.float() for name, total in sums.items()}
            del sums
        results = {
            name: _decompose(name, dense[name], hessians.pop(name, None), targets[name], plan)
            for name in dense
            if owners[name] == rank
        }
        del hessians
        layers = []
        for name, linear in dense.items():
            layer, module_entry = distributed.share_layer(*results.pop(name, (None, None)), owners[name], device, _storage_dtype(plan, linear))
            replace_module(model, name, layer)
            layers.append(layer)
            entries.append(module_entry)
        del dense
        if plan.matching is not None:
            entry["tm_loss_before"], entry["tm_loss_after"] = transformer_matching(
                block, call, inputs, dense_outputs, layers, plan.matching, seed=plan.request.seed
            )
        if plan.needs_hessians:
            del dense_outputs
            inputs = forward_block(block, call, inputs) if index + 1 < len(blocks) else None
    entry["seconds"] = time.perf_counter() - start
    entry["mean_relative_objective"] = sum(e["relative_objective"] for e in entries) / max(len(entries), 1)
    entry["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report["modules"].extend(entries)
    report["blocks"].append(entry)
    return inputs


def run(model: nn.Module, plan: CompressionPlan) -> dict:
    """Compress ``model`` in place by ``plan``, block by block; returns the report ``{"modules": [...],
    "blocks": [...]}``: per module its relative objective ||X(W - S - U V)||_F^2 / ||X W||_F^2 (H = I
    when data-free) and seconds; per block see :func:`compress_block`. With a non-uniform allocation the targets come from it
    (computed on the dense model before the first block is compressed) and ``"allocation"`` holds
    its report."""
    _, blocks = decoder_blocks(model)
    was_training = model.training
    model.eval()
    report = {"modules": [], "blocks": []}
    try:
        inputs, calls, targets, allocation_report = prepare(model, plan)
        if allocation_report is not None:
            report["allocation"] = allocation_report
        progress = tqdm(
            range(len(blocks)), desc=f"Compressing ({plan.request.method})", unit="block", disable=distributed.world()[0] != 0
        )
        for index in progress:
            inputs = compress_block(model, plan, index, targets, inputs, calls, report)
            progress.set_postfix(block_seconds=f"{report['blocks'][-1]['seconds']:.1f}")
    finally:
        model.train(was_training)
    return report
