"""SLRLinear: y = x (S + U V)^T + b, with S stored compactly.

Storage (all tensors safetensors can hold; the codec is :mod:`hf_slr.format`, see docs/format.md):

- ``U`` [out, r] and ``V`` [r, in]: dense low-rank factors (parameters);
- ``sparse_values``: the nonzeros of S (a parameter, so their values can be trained on a fixed
  support): unstructured S -> [nnz] in row-major order; N:M -> [out, in * N / M];
- unstructured: ``sparse_mask``, uint8 [ceil(out * in / 8)], the support, 1 bit per element,
  row-major, least significant bit first;
- N:M: ``sparse_indices``, uint8, the in-group position of every kept value packed in
  ceil(log2 M) bits each, in the order of ``sparse_values``;
- ``bias`` [out] when the replaced Linear had one.

The layer does not know how its factors were computed. It keeps this storage and the reference
forward (S rebuilt densely from the packed bits for the call, differentiable in ``sparse_values``,
U, V), which runs whenever autograd may need gradients (training mode, or grad enabled with an
input or parameter that requires grad). Inference delegates to :mod:`hf_slr.runtime`: the layer
prepares once, for its device and dtype, a runtime form that never unpacks bits per call
(docs/runtime.md); ``runtime`` holds it (a plain attribute, never in the state dict).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .format import INDICES_KEY, MASK_KEY, LayerLayout, index_bits, pack_bits, packed_bytes, unpack_bits
from .runtime import LayerRuntime, LayerStorage


class SLRLinear(nn.Module):
    """A Linear layer whose weight is S + U V (sparse plus low rank).

    Args:
        in_features, out_features: the replaced Linear's shape.
        rank: columns of U / rows of V.
        nnz: number of stored values of an unstructured S (ignored for N:M).
        nm_pattern: (N, M) for an N:M sparse S along the input dimension, else None.
        bias: whether the layer has a bias.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        nnz: int = 0,
        nm_pattern: tuple[int, int] | None = None,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.nm_pattern = tuple(nm_pattern) if nm_pattern is not None else None
        self.U = nn.Parameter(torch.zeros(out_features, rank, **factory))
        self.V = nn.Parameter(torch.zeros(rank, in_features, **factory))
        if self.nm_pattern is None:
            self.sparse_values = nn.Parameter(torch.zeros(nnz, **factory))
            mask_bytes = packed_bytes(out_features * in_features, 1)
            self.register_buffer(MASK_KEY, torch.zeros(mask_bytes, dtype=torch.uint8, device=device))
        else:
            n, m = self.nm_pattern
            if in_features % m:
                raise ValueError(f"nm_pattern {n}:{m} needs in_features divisible by {m}, got {in_features}")
            kept = in_features // m * n
            self.sparse_values = nn.Parameter(torch.zeros(out_features, kept, **factory))
            index_bytes = packed_bytes(out_features * kept, index_bits(m))
            self.register_buffer(INDICES_KEY, torch.zeros(index_bytes, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.support_key = MASK_KEY if self.nm_pattern is None else INDICES_KEY
        self.runtime = LayerRuntime()
        # Model code that initialises its projections by attribute (GPT-2's scaled init of
        # `c_proj.weight` on load) finds an empty float placeholder: the layer has no dense weight,
        # and the checkpoint's `<name>.weight` is the module record (hf_slr.format), not this buffer.
        self.register_buffer("weight", torch.empty(0, **factory), persistent=False)

    @classmethod
    def from_layout(cls, layout: LayerLayout, device=None, dtype=None) -> "SLRLinear":
        """An empty layer of ``layout``'s shapes (what a checkpoint's tensors then load into)."""
        return cls(
            layout.in_features, layout.out_features, layout.rank, nnz=layout.nnz, nm_pattern=layout.nm_pattern,
            bias=layout.bias, device=device, dtype=dtype,
        )

    @property
    def rank(self) -> int:
        """Columns of U (read from the tensor: the one place the rank is stored)."""
        return self.U.shape[1]

    @property
    def nnz(self) -> int:
        """Stored values of S (read from ``sparse_values``)."""
        return self.sparse_values.numel()

    @property
    def layout(self) -> LayerLayout:
        """The layer's shape record, as the checkpoint format describes it."""
        return LayerLayout(self.out_features, self.in_features, self.rank, self.nnz, self.nm_pattern, self.bias is not None)

    @classmethod
    def from_dense(
        cls,
        sparse: torch.Tensor,
        u: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor | None = None,
        nm_pattern: tuple[int, int] | None = None,
        support: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> "SLRLinear":
        """Build the compact layer from a dense S (zeros off its support), U, V and the bias.

        ``support`` (bool, like S) is the set of stored positions; by default the nonzeros of S. For
        N:M, groups with fewer than N nonzeros are completed with zero-valued positions.
        """
        out_features, in_features = sparse.shape
        dtype = dtype or sparse.dtype
        support = sparse != 0 if support is None else support.bool()
        layer = cls(
            in_features,
            out_features,
            u.shape[1],
            nnz=int(support.sum()),
            nm_pattern=nm_pattern,
            bias=bias is not None,
            device=sparse.device,
            dtype=dtype,
        )
        with torch.no_grad():
            layer.U.copy_(u)
            layer.V.copy_(v)
            if bias is not None:
                layer.bias.copy_(bias)
            if nm_pattern is None:
                layer.sparse_values.copy_(sparse[support])
                layer.sparse_mask.copy_(pack_bits(support, 1))
            else:
                n, m = nm_pattern
                groups = support.reshape(out_features, in_features // m, m)
                if int(groups.sum(-1).max()) > n:
                    raise ValueError(f"S violates the {n}:{m} pattern: a group of {m} holds more than {n} nonzeros")
                # Stored positions: the support first, then the lowest free positions, sorted per group.
                priority = groups.to(torch.int64) * 2 * m - torch.arange(m, device=sparse.device)
                positions = priority.topk(n, dim=-1).indices.sort(-1).values
                values = sparse.reshape(out_features, in_features // m, m).gather(-1, positions)
                layer.sparse_values.copy_(values.reshape(out_features, -1))
                layer.sparse_indices.copy_(pack_bits(positions, index_bits(m)))
        return layer

    def support(self) -> torch.Tensor:
        """Bool [out, in]: the positions S may hold (its sparsity pattern)."""
        shape = (self.out_features, self.in_features)
        if self.nm_pattern is None:
            return unpack_bits(self.sparse_mask, 1, shape[0] * shape[1]).reshape(shape).bool()
        n, m = self.nm_pattern
        positions = self._positions()
        groups = torch.zeros(shape[0], shape[1] // m, m, dtype=torch.bool, device=positions.device)
        return groups.scatter_(-1, positions, True).reshape(shape)

    def _positions(self) -> torch.Tensor:
        n, m = self.nm_pattern
        count = self.out_features * (self.in_features // m) * n
        return unpack_bits(self.sparse_indices, index_bits(m), count).reshape(self.out_features, -1, n)

    def sparse_weight(self) -> torch.Tensor:
        """S as a dense [out, in] tensor, rebuilt for this call (differentiable in ``sparse_values``)."""
        shape = (self.out_features, self.in_features)
        values = self.sparse_values
        if self.nm_pattern is None:
            dense = torch.zeros(shape, dtype=values.dtype, device=values.device)
            return dense.masked_scatter(self.support(), values)
        n, m = self.nm_pattern
        dense = torch.zeros(shape[0], shape[1] // m, m, dtype=values.dtype, device=values.device)
        return dense.scatter(-1, self._positions(), values.reshape(shape[0], -1, n)).reshape(shape)

    def to_dense(self) -> torch.Tensor:
        """W = S + U V, dense [out, in]."""
        return self.sparse_weight() + self.U @ self.V

    def storage(self) -> LayerStorage:
        """The stored tensors as the runtime reads them."""
        return LayerStorage(
            self.out_features, self.in_features, self.nm_pattern, self.sparse_values, self._buffers[self.support_key], self.U,
            self.V, self.bias,
        )

    def needs_autograd(self, x: torch.Tensor) -> bool:
        """Whether this call may need gradients: then the differentiable reference path runs."""
        if self.training:
            return True
        if not torch.is_grad_enabled():
            return False
        tensors = (x, self.sparse_values, self.U, self.V) + ((self.bias,) if self.bias is not None else ())
        return any(tensor.requires_grad for tensor in tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.needs_autograd(x):
            return self.reference_forward(x)
        parameters = self._parameters  # dict lookups: this runs on every call
        support = self._buffers[self.support_key]
        tensors = (parameters["sparse_values"], support, parameters["U"], parameters["V"], parameters.get("bias"))
        form = self.runtime.prepared(tensors, x, self.storage)
        if form is None:
            return self.reference_forward(x)
        out = form(x.reshape(-1, self.in_features))
        return out.reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        # .to() / .half() / .cuda() replace the tensors: drop the form prepared from the old ones now.
        self.runtime.clear()
        return super()._apply(fn, recurse)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x (S + U V)^T + b with S rebuilt from the packed bits (differentiable)."""
        # Factors may be stored in another dtype than the activations (`storage_dtype`): compute in x's.
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = F.linear(x, self.sparse_weight().to(x.dtype), bias)
        if self.rank:
            out = out + F.linear(F.linear(x, self.V.to(x.dtype)), self.U.to(x.dtype))
        return out

    def extra_repr(self) -> str:
        pattern = f"nm_pattern={self.nm_pattern[0]}:{self.nm_pattern[1]}" if self.nm_pattern else f"nnz={self.nnz}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"{pattern}, bias={self.bias is not None}"
        )
