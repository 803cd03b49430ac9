"""The CUDA form of a 2:4 S: ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt, or CUTLASS
when torch is told to), so the sparse product runs on the GPU's sparse tensor cores; the low-rank
branch is two thin cuBLAS GEMMs. Any other S on CUDA runs the pure-torch form (CSR products for
short inputs, a dense temporary for long ones): see :mod:`.forms`.

:func:`semi_structured_supported` is plain logic (device, capability, dtype, pattern, shape), so it
is tested on machines without a GPU.
"""

from __future__ import annotations

import torch

from .forms import low_rank_linear
from .storage import LayerStorage, dense_sparse

SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
MIN_ROWS, MIN_COLUMNS = 32, 64
"""torch's shape constraint for 16-bit semi-structured tensors: rows a multiple of 32, columns of 64."""


def semi_structured_supported(
    device: torch.device, dtype: torch.dtype, nm_pattern, shape: tuple[int, int], capability: tuple[int, int] | None = None
) -> bool:
    """Whether a layer can use the semi-structured form: CUDA of compute capability >= 8.0 (sparse
    tensor cores), fp16 / bf16, a 2:4 S, ``out`` a multiple of 32 and ``in`` of 64.
    ``capability``: the device's (read from torch when None)."""
    if torch.device(device).type != "cuda" or dtype not in SEMI_STRUCTURED_DTYPES or tuple(nm_pattern or ()) != (2, 4):
        return False
    out, inp = shape
    if out % MIN_ROWS or inp % MIN_COLUMNS or not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    return tuple(capability) >= (8, 0)


class SemiStructured24:
    """S as a ``SparseSemiStructuredTensor`` (compressed values + metadata, built once on the GPU)."""

    name = "semi_structured"

    def __init__(self, storage: LayerStorage, device, dtype):
        dense = dense_sparse(storage).to(device, dtype)
        self.weight = torch.sparse.to_sparse_semi_structured(dense)
        self.U = storage.U.detach().to(device, dtype).contiguous()
        self.V = storage.V.detach().to(device, dtype).contiguous()
        self.bias = None if storage.bias is None else storage.bias.detach().to(device, dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return low_rank_linear(x, self.weight, self.U, self.V, self.bias)
