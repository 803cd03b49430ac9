"""What an SLR layer stores, as the runtime reads it, and the supports derived from it once.

A layer hands the runtime a :class:`LayerStorage`: its shape, N:M pattern, and the tensors of the
checkpoint format (docs/format.md): ``values`` (the stored values of S, row-major), ``support``
(the packed 1-bit mask of an unstructured S, or the packed in-group positions of an N:M S), U, V
and the bias. Preparing a form reads the packed bits here, once, in row chunks (so a large layer
never needs an int64 temporary of its full size); a forward never touches them.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F

from ..format import index_bits, unpack_bits

CHUNK_ELEMENTS = 1 << 22
"""Rows are read in chunks of about this many elements of S."""

_BYTE_WEIGHTS = 1 << torch.arange(8, dtype=torch.uint8)


class LayerStorage(NamedTuple):
    out_features: int
    in_features: int
    nm_pattern: tuple[int, int] | None
    values: torch.Tensor
    support: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    bias: torch.Tensor | None

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.values, self.support, self.U, self.V) + ((self.bias,) if self.bias is not None else ())


def row_chunks(storage: LayerStorage) -> Iterator[tuple[int, int]]:
    """Row ranges covering the layer, each starting at a multiple of 8 rows (so that both packed
    streams start on a byte boundary: 8 rows hold a whole number of bytes)."""
    step = max(8, CHUNK_ELEMENTS // max(1, storage.in_features) // 8 * 8)
    for start in range(0, storage.out_features, step):
        yield start, min(storage.out_features, start + step)


def support_rows(storage: LayerStorage, start: int, stop: int) -> torch.Tensor:
    """Bool [stop - start, in]: the support of rows ``start:stop`` (``start`` a multiple of 8)."""
    rows, inp = stop - start, storage.in_features
    if storage.nm_pattern is None:
        first, last = start * inp // 8, -(-stop * inp // 8)
        bits = unpack_bits(storage.support[first:last], 1, rows * inp)
        return bits.reshape(rows, inp).bool()
    n, m = storage.nm_pattern
    width, per_row = index_bits(m), inp // m * n
    first, last = start * per_row * width // 8, -(-stop * per_row * width // 8)
    positions = unpack_bits(storage.support[first:last], width, rows * per_row).reshape(rows, inp // m, n)
    groups = torch.zeros(rows, inp // m, m, dtype=torch.bool, device=positions.device)
    return groups.scatter_(-1, positions, True).reshape(rows, inp)


def stored_mask_words(storage: LayerStorage) -> torch.Tensor | None:
    """The stored 1-bit mask viewed as int64 [out, in / 64] row words, when it has that layout
    (unstructured S, in % 64 == 0, 8-byte aligned); else None. A view: no copy."""
    out, inp = storage.out_features, storage.in_features
    if storage.nm_pattern is not None or inp % 64:
        return None
    try:
        return storage.support.view(torch.int64).view(out, inp // 64)
    except RuntimeError:  # storage offset not 8-byte aligned
        return None


def support_words(storage: LayerStorage) -> torch.Tensor:
    """Int64 [out, ceil(in / 64)]: the support as 1 bit per element, each row padded to whole
    64-bit words (bit c of row o: word c // 64, bit c % 64); :func:`stored_mask_words` when it
    applies, else built chunk by chunk."""
    out, inp = storage.out_features, storage.in_features
    stored = stored_mask_words(storage)
    if stored is not None:
        return stored
    words = -(-inp // 64)
    result = torch.empty(out, words, dtype=torch.int64, device=storage.support.device)
    weights = _BYTE_WEIGHTS.to(storage.support.device)
    for start, stop in row_chunks(storage):
        bits = F.pad(support_rows(storage, start, stop), (0, words * 64 - inp)).to(torch.uint8)
        packed = (bits.reshape(stop - start, words * 8, 8) * weights).sum(-1, dtype=torch.uint8)
        result[start:stop] = packed.view(torch.int64)
    return result


def row_counts(storage: LayerStorage) -> torch.Tensor:
    """Int64 [out]: stored values per row."""
    if storage.nm_pattern is not None:
        n, m = storage.nm_pattern
        return torch.full((storage.out_features,), storage.in_features // m * n, dtype=torch.int64, device=storage.support.device)
    counts = [support_rows(storage, start, stop).sum(1) for start, stop in row_chunks(storage)]
    return torch.cat(counts)


def row_starts(counts: torch.Tensor) -> torch.Tensor:
    """Int64 [out + 1]: index of each row's first stored value (and the total at the end)."""
    return F.pad(counts.cumsum(0), (1, 0))


def support_columns(storage: LayerStorage) -> torch.Tensor:
    """Int32 [nnz]: the column of every stored value, in the order of ``values``."""
    columns = [support_rows(storage, start, stop).nonzero()[:, 1].to(torch.int32) for start, stop in row_chunks(storage)]
    return torch.cat(columns)


def dense_sparse(storage: LayerStorage) -> torch.Tensor:
    """S as a dense [out, in] tensor of the values' dtype (read once, chunk by chunk)."""
    values = storage.values.detach().reshape(-1)
    starts = row_starts(row_counts(storage)).tolist()
    dense = torch.zeros(storage.out_features, storage.in_features, dtype=values.dtype, device=values.device)
    for start, stop in row_chunks(storage):
        dense[start:stop].masked_scatter_(support_rows(storage, start, stop), values[starts[start] : starts[stop]])
    return dense
