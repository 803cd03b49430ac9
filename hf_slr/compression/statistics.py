"""What a non-uniform allocation needs from the model before the first block is compressed: the
input norms of every target Linear (one dense pass, block by block) and, for the learned
allocation, the LM-loss closure L_B(W_hat) of the bilevel outer loop."""

from __future__ import annotations

import torch
from torch import nn

from ..calibration import InputNorms
from ..integration import projection_weight, restore_projection_weight, swap_projection_weight
from .capture import BlockCall, forward_block, row_batches
from .devices import execution_device, on_compute_device


def allocation_statistics(
    model: nn.Module,
    allocation: str,
    blocks: nn.ModuleList,
    linears: list[dict[str, nn.Linear]],
    input_ids: torch.LongTensor,
    inputs: torch.Tensor,
    calls: list[BlockCall],
) -> dict:
    """The keyword arguments of :func:`hf_slr.allocation.module_targets` for ``allocation``: the
    dense weights, the input norms from one dense pass over the calibration rows and, for
    "learned", the loss closure and the number of rows."""
    norms, hidden = {}, inputs
    for index, block in enumerate(blocks):
        with on_compute_device(block) as device, InputNorms(linears[index]) as recorder:
            hidden = forward_block(block, calls[index].to(device), hidden.to(device))
        norms.update(recorder.norms)
    del hidden
    flat = {name: module for group in linears for name, module in group.items()}
    statistics = {"norms": norms, "weights": {name: projection_weight(linear).detach() for name, linear in flat.items()}}
    if allocation == "learned":
        statistics.update(loss=_lm_loss(model, flat, input_ids), n_rows=len(input_ids))
    return statistics


def _lm_loss(model: nn.Module, linears: dict[str, nn.Linear], input_ids: torch.LongTensor):
    """``loss(W_hat, rows, tokens=None)``: the causal-LM loss of ``model`` on ``input_ids[rows]`` (their
    first ``tokens`` tokens; None: all) with the weights of the named Linears temporarily replaced
    by ``W_hat`` (the dense ones are restored after)."""
    if any(linear.weight.device.type == "meta" for linear in linears.values()):
        raise ValueError("`allocation`='learned' needs the target weights in memory; it does not support offloaded models")
    device = execution_device(model.get_input_embeddings())

    @torch.no_grad()
    def loss(approximations: dict[str, torch.Tensor], rows: torch.LongTensor, tokens: int | None = None) -> float:
        dense = {}
        try:
            for name, weight in approximations.items():
                dense[name] = swap_projection_weight(linears[name], weight)
            batch = input_ids[rows][:, :tokens].to(device)
            total = sum(
                float(model(input_ids=batch[part], labels=batch[part], use_cache=False).loss) * len(batch[part])
                for part in row_batches(len(batch))
            )
        finally:
            for name, previous in dense.items():
                restore_projection_weight(linears[name], previous)
        return total / len(batch)

    return loss
