"""Where a decoder block computes while it is compressed, one block at a time: on its accelerate
execution device (offloaded weights brought in and offloaded again after), or on the GPU when the
model sits in CPU memory and one is available."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from accelerate.hooks import attach_align_device_hook, remove_hook_from_module
from accelerate.utils import has_offloaded_params, named_module_tensors, set_module_tensor_to_device
from torch import nn


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its accelerate hook's execution device, else where its weights are."""
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if device is not None:
        return torch.device(device)
    devices = [p.device for p in module.parameters() if p.device.type != "meta"]
    return devices[0] if devices else torch.device("cpu")


def _onload(block: nn.Module, device: torch.device) -> bool:
    """Bring accelerate-offloaded weights of ``block`` onto ``device`` and drop their offload hooks."""
    offloaded = [module for module in block.modules() if has_offloaded_params(module)]
    for module in offloaded:
        hook = module._hf_hook
        names = named_module_tensors(module, include_buffers=hook.offload_buffers, recurse=hook.place_submodules)
        values = {name: hook.weights_map[name] for name, _ in names}
        remove_hook_from_module(module)
        for name, value in values.items():
            set_module_tensor_to_device(module, name, device, value=value)
    return bool(offloaded)


def _offload(block: nn.Module, device: torch.device):
    """Keep ``block`` in CPU memory, its weights brought to ``device`` for each forward (accelerate's
    ``cpu_offload`` layout); a block offloaded to disk comes back in CPU memory, compressed."""
    block.to("cpu")
    attach_align_device_hook(block, execution_device=device, offload=True, weights_map=block.state_dict())


@contextmanager
def on_compute_device(block: nn.Module):
    """Yield the device ``block`` is processed on, one block at a time.

    A block on an accelerator or placed by accelerate hooks computes where it is; an
    accelerate-offloaded block is brought onto its execution device and offloaded again afterwards;
    a block in CPU memory (no hooks) moves to the GPU when there is one, and back afterwards.
    """
    device = execution_device(block)
    if _onload(block, device):
        try:
            yield device
        finally:
            _offload(block, device)
    elif device.type == "cpu" and torch.cuda.is_available() and not hasattr(block, "_hf_hook"):
        accelerator = torch.device("cuda", torch.cuda.current_device())
        block.to(accelerator)
        try:
            yield accelerator
        finally:
            block.to(device)
    else:
        yield device
