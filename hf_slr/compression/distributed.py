"""Compression across processes with torch.distributed (``torchrun --nproc-per-node N``): gloo on
CPU, NCCL on GPUs. A single process needs none of this and stays the default.

Each rank holds the calibration rows ``rank::world`` and computes their block inputs and outputs;
the Hessians H = X^T X are summed over ranks (all-reduce); the Linears of a block are partitioned
over the ranks, largest first, each decomposes its share, and every layer is broadcast from its
owner so that all ranks continue with the same compressed block. The result equals one process's
up to the summation order of H (partial sums per rank, then the all-reduce).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from ..format import LayerLayout
from ..modules import SLRLinear


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) without torch.distributed. Under torchrun (the
    ``WORLD_SIZE`` variable set) the process group is started here on first use."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def shard_rows(rows: torch.Tensor) -> torch.Tensor:
    """This rank's calibration rows: ``rank::world``."""
    rank, size = world()
    return rows[rank::size]


def all_reduce_hessians(hessians: dict[str, torch.Tensor]) -> None:
    """Sum every H over the ranks, in place (in name order, the same on every rank)."""
    if world()[1] > 1:
        for name in sorted(hessians):
            dist.all_reduce(hessians[name])


def owners(shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
    """The rank that decomposes each Linear: largest first, each to the least loaded rank
    (load = sum of out x in; ties to the lowest rank)."""
    size = world()[1]
    load, owner = [0] * size, {}
    for name in sorted(shapes, key=lambda n: (-shapes[n][0] * shapes[n][1], n)):
        rank = min(range(size), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += shapes[name][0] * shapes[name][1]
    return owner


def share_layer(layer: SLRLinear | None, entry: dict | None, owner: int, device: torch.device, dtype: torch.dtype):
    """The owner's layer and report entry on every rank: the layout and entry as objects, then the
    tensors, broadcast from ``owner``."""
    rank, size = world()
    if size == 1:
        return layer, entry
    message = [(layer.layout, entry) if rank == owner else None]
    dist.broadcast_object_list(message, src=owner)
    layout, entry = message[0]
    if rank != owner:
        layer = SLRLinear.from_layout(LayerLayout(*layout.__dict__.values()), device=device, dtype=dtype)
    for tensor in layer.state_dict().values():
        dist.broadcast(tensor, src=owner)
    return layer, entry


def check_supported(request) -> None:
    """Refuse what does not run across processes yet, before any work."""
    if world()[1] > 1 and (request.transformer_matching or request.allocation != "uniform"):
        raise ValueError(
            "transformer matching and non-uniform allocations do not run across processes yet: "
            "run them in one process (without torchrun)"
        )


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
