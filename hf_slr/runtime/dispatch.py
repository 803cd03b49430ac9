"""Which runtime form a layer runs, and the one prepared form each layer caches.

A layer's request is its own choice (``hf_slr.set_runtime``), else ``$HF_SLR_RUNTIME``, else
``"auto"``. ``"auto"`` picks, per device and dtype: CPU -> ``"kernel"`` (the C++ kernels; the
pure-torch ``"torch"`` form when they cannot be built or for float64); CUDA -> ``"semi_structured"``
for a 2:4 S in fp16 / bf16 on compute capability >= 8.0, ``"torch"`` otherwise; other devices ->
``"reference"`` (the layer's differentiable path, which rebuilds S every call). A request that
cannot run where the input is (e.g. ``"kernel"`` on CUDA) falls back to ``"auto"`` with one
warning.

The cache is keyed on the request, the input's device and dtype, and every stored tensor's
``data_ptr`` and version counter, so an in-place change (``load_state_dict``, an optimizer step,
``copy_``), a replaced tensor (PEFT merge) or a move (``.to()``) prepares again on the next call.
Writes through ``tensor.data`` bypass the version counter: call ``LayerRuntime.clear()`` after them.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

from . import kernels
from .cuda import SemiStructured24, semi_structured_supported
from .forms import DenseWeight, MaskedRows, SparseCSR
from .storage import LayerStorage

FORMS = ("auto", "kernel", "torch", "dense", "semi_structured", "reference")
RUNTIME_ENV = "HF_SLR_RUNTIME"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_BUILDERS = {"kernel": MaskedRows, "torch": SparseCSR, "dense": DenseWeight, "semi_structured": SemiStructured24}
_warned: set[tuple] = set()


def check_form(form: str) -> str:
    if form not in FORMS:
        raise ValueError(f"Unknown SLR runtime form {form!r}; choose one of {FORMS}")
    return form


def _warn_once(key: tuple, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def resolve(requested: str, device: torch.device, dtype: torch.dtype, nm_pattern, shape: tuple[int, int]) -> str:
    """The form a layer of ``shape`` / ``nm_pattern`` runs for inputs on ``device`` in ``dtype``."""
    kind = device.type
    if requested == "kernel" and (kind != "cpu" or dtype not in KERNEL_DTYPES or kernels.extension() is None):
        _warn_once(("kernel", kind, dtype), f"hf_slr: runtime form 'kernel' cannot run on {kind} {dtype}; using 'auto'")
        requested = "auto"
    if requested == "semi_structured" and not semi_structured_supported(device, dtype, nm_pattern, shape):
        _warn_once(
            ("semi_structured", kind, dtype, nm_pattern),
            f"hf_slr: runtime form 'semi_structured' needs a 2:4 S in fp16 / bf16 on a CUDA GPU of compute "
            f"capability >= 8.0 with out % 32 == in % 64 == 0; got {nm_pattern} {dtype} on {kind}; using 'auto'",
        )
        requested = "auto"
    if requested != "auto":
        return requested
    if kind == "cpu":
        return "kernel" if dtype in KERNEL_DTYPES and kernels.extension() is not None else "torch"
    if kind == "cuda":
        return "semi_structured" if semi_structured_supported(device, dtype, nm_pattern, shape) else "torch"
    return "reference"


def _version(tensor: torch.Tensor) -> int:
    # Inference tensors (created under torch.inference_mode) have no version counter.
    return -1 if tensor.is_inference() else tensor._version


class LayerRuntime:
    """The runtime state of one layer: its requested form (None: ``$HF_SLR_RUNTIME`` or auto) and
    the form prepared for the last (request, device, dtype, tensors) it ran with.

    A plain attribute of the layer, never a parameter or buffer: it is not in the state dict, a
    copy or a pickle of the layer starts without a prepared form.
    """

    __slots__ = ("form", "_key", "_prepared")

    def __init__(self, form: str | None = None):
        self.form = None if form is None else check_form(form)
        self.clear()

    def clear(self) -> None:
        """Drop the prepared form (the next forward prepares again)."""
        self._key, self._prepared = None, None

    def requested(self) -> str:
        return self.form or check_form(os.environ.get(RUNTIME_ENV) or "auto")

    @property
    def prepared_form(self) -> str | None:
        """Name of the form prepared now (None before the first fast forward)."""
        return None if self._key is None else getattr(self._prepared, "name", "reference")

    def prepared(self, tensors: tuple, x: torch.Tensor, storage: Callable[[], LayerStorage]):
        """The form to run on ``x`` (None: the reference path). ``tensors``: the layer's stored
        tensors (None for an absent bias), checked on every call; ``storage``: builds the
        :class:`LayerStorage`, called only when the form must be prepared again."""
        key = [self.form or os.environ.get(RUNTIME_ENV) or "auto", x.device, x.dtype]
        for tensor in tensors:
            if tensor is not None:
                key += (tensor.data_ptr(), _version(tensor))
        if key != self._key:
            self.clear()
            requested, device, dtype = check_form(key[0]), key[1], key[2]
            layer = storage()
            name = resolve(requested, device, dtype, layer.nm_pattern, (layer.out_features, layer.in_features))
            with torch.no_grad():
                self._prepared = None if name == "reference" else _BUILDERS[name](layer, device, dtype)
            self._key = key
        return self._prepared

    def __deepcopy__(self, memo) -> "LayerRuntime":
        return LayerRuntime(self.form)

    def __getstate__(self):
        return {"form": self.form}

    def __setstate__(self, state) -> None:
        self.form = state["form"]
        self.clear()
