"""The runtime forms of an SLR layer: what it prepares once for a device and a dtype, and how each
computes y = x (S + U V)^T + b without reading the packed bits again.

- :class:`MaskedRows` (``"kernel"``, CPU): S as its values plus a row-padded 1-bit mask, run by the
  C++ kernels of ``csrc/masked_rows.cpp``: a sparse product for short inputs (decoding), and, from
  ``prefill_tokens`` tokens on, S expanded block of rows by block into a cache-sized dense buffer,
  one GEMM per block.
- :class:`SparseCSR` (``"torch"``, any device, no compiler): S as a torch CSR tensor with int32
  indices; ``torch.sparse`` products for short inputs, a scatter into a dense temporary (prepared
  indices, no bit unpacking) and one GEMM for long ones.
- :class:`DenseWeight` (``"dense"``): W = S + U V kept dense (the fastest on compute, no memory
  saving; never chosen automatically).
- ``SemiStructured24`` (``"semi_structured"``, CUDA 2:4 fp16/bf16) lives in :mod:`.cuda`.

Every form keeps the low-rank branch as two thin GEMMs (x V^T, then U) or fuses it into the kernel.
Forms hold plain tensors (views of the layer's own tensors where dtype and device already match);
they are never parameters or buffers of the layer.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..format import index_bits
from . import kernels
from .storage import LayerStorage, dense_sparse, row_counts, row_starts, stored_mask_words, support_columns

PREFILL_TOKENS = 16
"""Tokens from which the kernel form expands S and calls GEMMs instead of its sparse product (the
measured crossover on an AVX-512 CPU, fp32 and bf16: docs/runtime.md)."""
PREFILL_BLOCK_BYTES = 4 << 20
"""Size of the dense buffer the prefill path expands S into, block of rows by block."""


def low_rank_linear(x: torch.Tensor, weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor, bias: torch.Tensor | None):
    """x weight^T + b + (x V^T) U^T for a 2-d x: one GEMM with ``weight`` (a dense tensor or any
    weight ``F.linear`` takes) plus the two thin ones."""
    out = F.linear(x, weight, bias)
    return out.addmm_(F.linear(x, V), U.t()) if U.shape[1] else out


def _factors(storage: LayerStorage, device, dtype):
    """U, V and the bias in ``dtype`` on ``device`` (views when they already are)."""
    bias = None if storage.bias is None else storage.bias.detach().to(device, dtype).contiguous()
    return storage.U.detach().to(device, dtype).contiguous(), storage.V.detach().to(device, dtype).contiguous(), bias


def _masked_rows_support(storage: LayerStorage) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask words, row starts) of the kernel form, read from the packed bits by the extension in
    one pass (no large temporaries: they would stay in the process heap after a load); the stored
    mask itself when it already has the layout."""
    n, m = storage.nm_pattern or (0, 0)
    packed = storage.support.detach().cpu().contiguous()
    mask, counts = kernels.extension().masked_rows_support(
        packed, storage.out_features, storage.in_features, n, m, index_bits(m) if m else 1
    )
    stored = stored_mask_words(storage)
    return (mask if stored is None else stored), row_starts(counts)


class MaskedRows:
    """The C++ kernels' form: ``values`` [nnz], ``mask`` int64 [out, words], ``row_start`` [out + 1]."""

    name = "kernel"

    def __init__(self, storage: LayerStorage, device, dtype, isa_level: int = -1):
        if kernels.extension() is None:
            raise RuntimeError("the hf_slr CPU kernels are not available")
        self.in_features = storage.in_features
        self.nm = storage.nm_pattern or (0, 0)
        self.values = storage.values.detach().to(device, dtype).reshape(-1).contiguous()
        self.mask, self.row_start = _masked_rows_support(storage)
        self.U, self.V, self.bias = _factors(storage, device, dtype)
        self.isa_level = isa_level
        self.prefill_tokens = PREFILL_TOKENS
        self.block_bytes = PREFILL_BLOCK_BYTES

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        extension = kernels.extension()
        if x.shape[0] >= self.prefill_tokens:
            return extension.masked_rows_prefill(
                x, self.values, self.mask, self.row_start, self.U, self.V, self.bias, self.block_bytes, self.isa_level
            )
        return extension.masked_rows_linear(
            x, self.values, self.mask, self.row_start, self.U, self.V, self.bias, *self.nm, self.isa_level
        )


class SparseCSR:
    """Pure torch: S as a CSR tensor (int32 indices). CPU CSR products run in float32 (MKL has no
    bf16 / fp16 kernels), so other dtypes keep a float32 copy of the values."""

    name = "torch"

    def __init__(self, storage: LayerStorage, device, dtype):
        self.shape = (storage.out_features, storage.in_features)
        self.dtype = dtype
        product_dtype = torch.float32 if torch.device(device).type == "cpu" and dtype not in (torch.float32, torch.float64) else dtype
        counts = row_counts(storage)
        crow = row_starts(counts).to(device, torch.int32)
        values = storage.values.detach().to(device, product_dtype).reshape(-1).contiguous()
        columns = support_columns(storage).to(device)
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            self.matrix = torch.sparse_csr_tensor(crow, columns, values, self.shape, check_invariants=False)
        self.counts = counts.to(device)
        self.U, self.V, self.bias = _factors(storage, device, dtype)
        self.prefill_tokens = PREFILL_TOKENS

    def dense_sparse(self) -> torch.Tensor:
        """S as a dense tensor: the CSR values scattered at their flat positions (rows from the
        prepared counts, columns from the CSR; no bit unpacking)."""
        out, inp = self.shape
        rows = torch.repeat_interleave(torch.arange(out, device=self.counts.device), self.counts, output_size=self.matrix.values().numel())
        positions = rows * inp + self.matrix.col_indices()
        dense = torch.zeros(out * inp, dtype=self.dtype, device=self.counts.device)
        return dense.scatter_(0, positions, self.matrix.values().to(self.dtype)).view(self.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] >= self.prefill_tokens:
            return low_rank_linear(x, self.dense_sparse(), self.U, self.V, self.bias)
        product = torch.mm(self.matrix, x.to(self.matrix.dtype).t()).t().to(self.dtype)
        if self.bias is not None:
            product = product + self.bias
        return product.addmm_(F.linear(x, self.V), self.U.t()) if self.U.shape[1] else product


class DenseWeight:
    """W = S + U V, dense, kept: the speed of nn.Linear at its memory."""

    name = "dense"

    def __init__(self, storage: LayerStorage, device, dtype):
        U, V, self.bias = _factors(storage, device, dtype)
        weight = dense_sparse(storage).to(device, dtype)
        self.weight = weight.addmm_(U, V) if U.shape[1] else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
