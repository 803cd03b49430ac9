"""Transformer matching, the "TM" of 3BASiL-TM ("an efficient one-shot post-training method for
(S + LR) decomposition", seed paper 002, §3 and App. B): after a block is compressed, refine every
parameter of the block ("We set all parameters in transformer block T_i to be trainable": the S
values on their fixed support, U, V, norms and biases) so that the compressed block reproduces the
dense block's outputs on the same inputs, min ||T(X) - T_dense(X)||_F^2.

The dense outputs are computed once per block (the driver passes them in). ``precision="auto"``
runs the block's forward and backward under bfloat16 autocast where the hardware multiplies
bfloat16 natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX), about 2x faster on such a CPU;
Adam updates the float32 parameters either way (mixed precision), and the losses reported before
and after are measured in float32."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..algorithms.hyperparameters import hyperparameter
from ..modules import SLRLinear
from .capture import BlockCall, row_batches


PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class MatchingHyperparameters:
    """``tm_kwargs``: the schedule of transformer matching (3BASiL App. B defaults)."""

    epochs: int = hyperparameter(20, low=1, doc="passes over the calibration rows")
    batch_size: int = hyperparameter(8, low=1, doc="calibration rows per Adam step")
    lr: float = hyperparameter(2e-5, low=0.0, low_open=True, doc="Adam learning rate, annealed to 0 by a cosine schedule")
    precision: str = hyperparameter(
        "auto", choices=PRECISIONS, doc="forward/backward dtype: 'auto' = bfloat16 autocast where native, else float32"
    )


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (None: plain float32)."""
    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return torch.bfloat16 if native else None
    return None


@contextmanager
def _trainable_float32(block: nn.Module, parameters: list[nn.Parameter]):
    """``block`` in float32 with only ``parameters`` requiring grad; dtypes and flags restored after."""
    tensors = list(block.parameters()) + [b for b in block.buffers() if b.is_floating_point()]
    dtypes = [t.dtype for t in tensors]
    flags = [p.requires_grad for p in block.parameters()]
    chosen = {id(p) for p in parameters}
    for tensor in tensors:
        tensor.data = tensor.data.float()
    for parameter in block.parameters():
        parameter.requires_grad_(id(parameter) in chosen)
    try:
        yield
    finally:
        for tensor, dtype in zip(tensors, dtypes):
            tensor.data = tensor.data.to(dtype)
        for parameter, flag in zip(block.parameters(), flags):
            parameter.requires_grad_(flag)


def _matching_loss(block: nn.Module, call: BlockCall, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean squared error between the block's outputs and ``targets`` over all rows (float32)."""
    with torch.no_grad():
        total = sum(
            F.mse_loss(call(block, inputs[rows].float()), targets[rows].float(), reduction="sum")
            for rows in row_batches(len(inputs))
        )
    return float(total) / targets.numel()


def transformer_matching(
    block: nn.Module,
    call: BlockCall,
    inputs: torch.Tensor,
    dense_outputs: torch.Tensor,
    layers: list[SLRLinear],
    hyperparameters: MatchingHyperparameters,
    seed: int = 0,
) -> tuple[float, float]:
    """Transformer matching of ``block`` (see the module docstring) with Adam (PyTorch defaults),
    ``lr`` annealed to 0 by a cosine schedule over ``epochs`` passes of shuffled mini-batches of
    ``batch_size`` rows, float32 parameters (forward under ``precision``'s autocast). ``layers``
    are the block's SLRLinear layers; every parameter of the block is trained.

    Returns the mean squared error over all rows before and after.
    """
    compressed = {id(p) for layer in layers for p in (layer.sparse_values, layer.U, layer.V)}
    parameters = [p for layer in layers for p in (layer.sparse_values, layer.U, layer.V) if p.numel()]
    parameters += [p for p in block.parameters() if id(p) not in compressed and p.numel()]
    call = call.to(inputs.device, torch.float32)
    autocast = autocast_dtype(hyperparameters.precision, inputs.device)
    with _trainable_float32(block, parameters):
        before = _matching_loss(block, call, inputs, dense_outputs)
        if not parameters:
            return before, before
        epochs, batch_size = hyperparameters.epochs, hyperparameters.batch_size
        optimizer = torch.optim.Adam(parameters, lr=hyperparameters.lr)
        steps = epochs * math.ceil(len(inputs) / batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(len(inputs), generator=generator).to(inputs.device)
            for start in range(0, len(inputs), batch_size):
                rows = order[start : start + batch_size]
                with torch.enable_grad():
                    with torch.autocast(inputs.device.type, dtype=autocast, enabled=autocast is not None):
                        outputs = call(block, inputs[rows].float())
                    loss = F.mse_loss(outputs.float(), dense_outputs[rows].float())
                    loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
        after = _matching_loss(block, call, inputs, dense_outputs)
    return before, after
