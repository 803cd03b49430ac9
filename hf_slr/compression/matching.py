"""Transformer matching, the "TM" of 3BASiL-TM ("an efficient one-shot post-training method for
(S + LR) decomposition", seed paper 002, §3 and App. B): after a block is compressed, refine the
S values (on their fixed support), U and V of its SLRLinear layers so that the compressed block
reproduces the dense block's outputs on the same inputs, min ||T(X) - T_dense(X)||_F^2."""

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


@dataclass(frozen=True)
class MatchingHyperparameters:
    """``tm_kwargs``: the schedule of transformer matching (3BASiL App. B defaults)."""

    epochs: int = hyperparameter(20, low=1, doc="passes over the calibration rows")
    batch_size: int = hyperparameter(8, low=1, doc="calibration rows per Adam step")
    lr: float = hyperparameter(2e-5, low=0.0, low_open=True, doc="Adam learning rate, annealed to 0 by a cosine schedule")


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
    ``batch_size`` rows, in float32. Every other parameter of the block stays fixed.

    Returns the mean squared error over all rows before and after.
    """
    parameters = [p for layer in layers for p in (layer.sparse_values, layer.U, layer.V) if p.numel()]
    call = call.to(inputs.device, torch.float32)
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
                    loss = F.mse_loss(call(block, inputs[rows].float()), dense_outputs[rows].float())
                    loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
        after = _matching_loss(block, call, inputs, dense_outputs)
    return before, after
