"""Block inputs for the sequential protocol of SparseGPT ("SparseGPT: Massive Language Models Can
Be Accurately Pruned in One-Shot", Frantar and Alistarh, 2023): the hidden states entering decoder
block 0 for every calibration row, the arguments each block receives, and block forwards in
mini-batches (with H = X^T X of the block's Linears recorded on the way)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..calibration import HessianAccumulator
from ..integration import decoder_blocks
from .devices import execution_device

FORWARD_BATCH_SIZE = 8
"""Calibration segments per block forward when collecting statistics and propagating outputs."""


def _to(value, device: torch.device, dtype: torch.dtype | None = None):
    """``value`` with every tensor inside (tuples, lists, dicts) on ``device``, floating ones in ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype if dtype is not None and value.is_floating_point() else None)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(item, device, dtype) for item in value)
    if isinstance(value, dict):
        return {key: _to(item, device, dtype) for key, item in value.items()}
    return value


@dataclass
class BlockCall:
    """The arguments a decoder block receives besides its hidden states (attention mask, position
    embeddings / ids, cache off), as the model's own forward passes them."""

    args: tuple
    kwargs: dict

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "BlockCall":
        return BlockCall(_to(self.args, device, dtype), _to(self.kwargs, device, dtype))

    def __call__(self, block: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        output = block(hidden_states, *self.args, **self.kwargs)
        return output[0] if isinstance(output, tuple) else output


class _StopForward(Exception):
    """Ends the model forward once the block inputs are recorded."""


class _BlockCatcher(nn.Module):
    """Stands in for a decoder block while its inputs are recorded; passes its hidden states on."""

    def __init__(self, block: nn.Module, index: int, capture: "_Capture"):
        super().__init__()
        self.block, self.index, self.capture = block, index, capture

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # the model may read attributes of its layers (e.g. the attention type)
            return getattr(super().__getattr__("block"), name)

    def forward(self, *args, **kwargs):
        hidden_states, args = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
        self.capture.record(self.index, hidden_states, BlockCall(args, kwargs))
        return hidden_states


class _Capture:
    """What the catchers record: block 0's hidden states per row, and each block's first call."""

    def __init__(self, n_blocks: int):
        self.calls: list[BlockCall | None] = [None] * n_blocks
        self.hidden_states: list[torch.Tensor] = []

    def record(self, index: int, hidden_states: torch.Tensor, call: BlockCall):
        if index == 0:
            self.hidden_states.append(hidden_states)
        if self.calls[index] is None:
            self.calls[index] = call
        if index == 0 and len(self.hidden_states) > 1 or index == len(self.calls) - 1:
            raise _StopForward


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.LongTensor) -> tuple[torch.Tensor, list[BlockCall]]:
    """The hidden states entering decoder block 0 for every row of ``input_ids`` [n, T, hidden],
    and the :class:`BlockCall` of every block.

    Each row runs through the model's own forward (cache off) with the blocks replaced by catchers,
    up to block 0 (and, for row 0, through every catcher to record each block's arguments: blocks
    may differ, e.g. sliding-window masks). All rows have the same length and no padding, so the
    arguments, captured with batch size 1, are the same for every row and broadcast over
    mini-batches (SparseGPT likewise reuses one attention mask).
    """
    _, blocks = decoder_blocks(model)
    capture = _Capture(len(blocks))
    originals = list(blocks)
    device = execution_device(model.get_input_embeddings())
    for index, block in enumerate(originals):
        blocks[index] = _BlockCatcher(block, index, capture)
    try:
        for row in input_ids:
            try:
                model(input_ids=row.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for index, block in enumerate(originals):
            blocks[index] = block
    return torch.cat(capture.hidden_states), capture.calls


def row_batches(n_rows: int):
    return (slice(start, start + FORWARD_BATCH_SIZE) for start in range(0, n_rows, FORWARD_BATCH_SIZE))


@torch.no_grad()
def forward_block(block: nn.Module, call: BlockCall, inputs: torch.Tensor) -> torch.Tensor:
    """The block's outputs for every calibration row, in mini-batches."""
    outputs = torch.empty_like(inputs)
    for rows in row_batches(len(inputs)):
        outputs[rows] = call(block, inputs[rows])
    return outputs


def dense_pass(
    block: nn.Module, call: BlockCall, inputs: torch.Tensor, linears: dict[str, nn.Linear]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """H = X^T X of every Linear in ``linears`` (float64 sums, see :class:`HessianAccumulator`) and
    the block's outputs, from one forward."""
    with HessianAccumulator(linears) as accumulator:
        outputs = forward_block(block, call, inputs)
    return accumulator.sums, outputs
