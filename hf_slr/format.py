"""The checkpoint format of one compressed layer: bit packing, the per-module record, the
state-dict layout, the checks a load runs, and the information bound. See docs/format.md.

A compressed module ``<name>`` ([out, in] Linear, W = S + U V) is stored as the tensors

- ``<name>.U`` [out, r] and ``<name>.V`` [r, in] (float, the storage dtype);
- ``<name>.sparse_values``: the stored values of S, [nnz] (unstructured) or [out, in N / M] (N:M);
- ``<name>.sparse_mask`` (unstructured): uint8, the support, 1 bit per element, row-major;
- ``<name>.sparse_indices`` (N:M): uint8, the in-group position of every stored value,
  ceil(log2 M) bits each, in the order of ``sparse_values``;
- ``<name>.bias`` [out] when the Linear had one;
- ``<name>.weight``: the **record** of the module, uint8 ``[version, N, M]`` (``N = M = 0`` for
  unstructured S; format version 1 wrote ``[1]`` and took N:M from the config's ``sparsity``).

The record doubles as a guard: without ``import hf_slr`` transformers builds dense Linears and
stops on a size mismatch for ``weight`` instead of loading random weights. Every other fact of
the layer (rank, nnz, shapes) is read from the tensors' shapes, so it is stored exactly once.

This module is pure tensor code: it imports torch and safetensors only.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
VERSION_METADATA_KEY = "slr_format_version"
"""Format 1 also wrote its version into the safetensors metadata; it is checked where present."""
RECORD_KEY = "weight"
"""Suffix of the per-module record (it sits where a dense Linear keeps its weight)."""
FACTOR_KEYS = ("U", "V", "sparse_values")
MASK_KEY = "sparse_mask"
INDICES_KEY = "sparse_indices"


def index_bits(group_size: int) -> int:
    """Bits needed for an in-group position of an M-wide group."""
    return max(1, math.ceil(math.log2(group_size)))


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative ints < 2**bits into a flat uint8 stream, least significant bit first."""
    flat = values.reshape(-1).to(torch.int64)
    stream = (flat.unsqueeze(1) >> torch.arange(bits, device=flat.device)) & 1
    stream = stream.reshape(-1)
    stream = F.pad(stream, (0, (-stream.numel()) % 8))
    weights = 1 << torch.arange(8, device=flat.device)
    return (stream.reshape(-1, 8) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` ints of ``bits`` bits each (int64)."""
    stream = (packed.to(torch.int64).unsqueeze(1) >> torch.arange(8, device=packed.device)) & 1
    stream = stream.reshape(-1)[: count * bits].reshape(count, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(1)


def packed_bytes(count: int, bits: int) -> int:
    """Length of the uint8 stream that :func:`pack_bits` writes for ``count`` ints of ``bits`` bits."""
    return math.ceil(count * bits / 8)


@dataclass(frozen=True)
class LayerLayout:
    """The shape of one compressed layer, as read from its tensors and its record."""

    out_features: int
    in_features: int
    rank: int
    nnz: int
    nm_pattern: tuple[int, int] | None
    bias: bool

    def tensor_specs(self, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Suffix -> (shape, dtype) of every tensor this layer stores (the record excluded)."""
        out, inp = self.out_features, self.in_features
        specs = {"U": ((out, self.rank), dtype), "V": ((self.rank, inp), dtype)}
        if self.nm_pattern is None:
            specs["sparse_values"] = ((self.nnz,), dtype)
            specs[MASK_KEY] = ((packed_bytes(out * inp, 1),), torch.uint8)
        else:
            n, m = self.nm_pattern
            specs["sparse_values"] = ((out, inp // m * n), dtype)
            specs[INDICES_KEY] = ((packed_bytes(out * (inp // m) * n, index_bits(m)),), torch.uint8)
        if self.bias:
            specs["bias"] = ((out,), dtype)
        return specs


def record(nm_pattern: tuple[int, int] | None) -> torch.Tensor:
    """The per-module record that a save writes under ``<name>.weight``."""
    n, m = nm_pattern or (0, 0)
    return torch.tensor([FORMAT_VERSION, n, m], dtype=torch.uint8)


def read_record(name: str, value: torch.Tensor, legacy_nm_pattern: tuple[int, int] | None) -> tuple[int, tuple[int, int] | None]:
    """(format version, N:M pattern or None) of the record of module ``name``.

    Version 1 records hold the version only: the pattern is ``legacy_nm_pattern`` (the config's).
    """
    key = f"{name}.{RECORD_KEY}"
    if value.dtype != torch.uint8 or value.dim() != 1 or value.numel() == 0:
        raise ValueError(f"{key}: not an SLR module record (expected a 1-d uint8 tensor, got {value.dtype} {list(value.shape)})")
    version = int(value[0])
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{key}: SLR format version {version} is not readable by this hf_slr (reads {list(READABLE_VERSIONS)})")
    if version == 1:
        return version, legacy_nm_pattern
    if value.numel() != 3:
        raise ValueError(f"{key}: a version-2 record holds [version, N, M], got {value.tolist()}")
    n, m = int(value[1]), int(value[2])
    if (n, m) == (0, 0):
        return version, None
    if not 0 < n < m:
        raise ValueError(f"{key}: invalid N:M pattern {n}:{m} in the record")
    return version, (n, m)


class CheckpointIndex:
    """The tensor names, shapes and dtypes of a (possibly sharded) safetensors checkpoint, read from
    the headers only; records are small and read in full."""

    def __init__(self, files: list[str | os.PathLike]):
        from safetensors import safe_open

        self.files = [str(path) for path in files]
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self.metadata: dict[str, str] = {}
        self._file_of: dict[str, str] = {}
        for path in self.files:
            if not path.endswith(".safetensors"):
                raise ValueError(f"SLR checkpoints are safetensors only; cannot read {os.path.basename(path)}")
            with safe_open(path, framework="pt") as handle:
                self.metadata.update(handle.metadata() or {})
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    self.shapes[key], self.dtypes[key] = tuple(piece.get_shape()), piece.get_dtype()
                    self._file_of[key] = path

    def tensor(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self._file_of[key], framework="pt") as handle:
            return handle.get_tensor(key)

    def compressed_modules(self) -> list[str]:
        """Names of the modules that carry SLR tensors (a ``U`` or a record next to ``sparse_values``)."""
        prefixes = {key.rpartition(".")[0] for key in self.shapes if key.rpartition(".")[2] in ("U", "sparse_values")}
        return sorted(prefixes)


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64, "U8": torch.uint8}


def read_layouts(
    index: CheckpointIndex, linear_shapes: dict[str, tuple[int, int, bool]], legacy_nm_pattern: tuple[int, int] | None
) -> dict[str, LayerLayout]:
    """The layout of every compressed module of the checkpoint, checked against its headers.

    ``linear_shapes``: (out, in, has a bias) of the model's layers that may be compressed, by name.
    Raises ``ValueError`` naming the tensor when one is missing, of the wrong dtype or shape.
    """
    version = index.metadata.get(VERSION_METADATA_KEY)  # format 1 wrote it; records carry it since
    if version is not None and (not version.isdigit() or int(version) not in READABLE_VERSIONS):
        raise ValueError(
            f"safetensors metadata `{VERSION_METADATA_KEY}`={version!r}: not an SLR checkpoint this hf_slr reads "
            f"(versions {list(READABLE_VERSIONS)})"
        )
    names = index.compressed_modules()
    if not names:
        raise ValueError("The checkpoint has quant_method 'slr' but no compressed module tensors (U, V, sparse_values)")
    children: dict[str, set[str]] = {}
    for key in index.shapes:
        prefix, _, suffix = key.rpartition(".")
        children.setdefault(prefix, set()).add(suffix)
    layouts = {}
    for name in names:
        if name not in linear_shapes:
            raise ValueError(f"{name}.U: the checkpoint compresses {name}, which is not a Linear layer of this model")
        key = f"{name}.{RECORD_KEY}"
        if key not in index.shapes:
            raise ValueError(f"{key}: missing (the module record of a compressed layer)")
        _, nm_pattern = read_record(name, index.tensor(key), legacy_nm_pattern)
        out, inp, bias = linear_shapes[name]
        for suffix in FACTOR_KEYS + ((MASK_KEY,) if nm_pattern is None else (INDICES_KEY,)) + (("bias",) if bias else ()):
            if f"{name}.{suffix}" not in index.shapes:
                raise ValueError(f"{name}.{suffix}: missing from the checkpoint")
        value_key = f"{name}.sparse_values"
        dtype = _SAFETENSORS_DTYPES.get(index.dtypes[value_key])
        if dtype is None or not dtype.is_floating_point:
            raise ValueError(f"{value_key}: dtype {index.dtypes[value_key]} is not a float type")
        if nm_pattern is not None and inp % nm_pattern[1]:
            raise ValueError(f"{key}: pattern {nm_pattern[0]}:{nm_pattern[1]} does not divide in_features={inp}")
        u_shape = index.shapes[f"{name}.U"]
        layout = LayerLayout(
            out_features=out,
            in_features=inp,
            rank=u_shape[1] if len(u_shape) == 2 else -1,
            nnz=math.prod(index.shapes[value_key]),
            nm_pattern=nm_pattern,
            bias=bias,
        )
        specs = layout.tensor_specs(dtype)
        unexpected = sorted(children[name] - set(specs) - {RECORD_KEY})
        if unexpected:
            raise ValueError(f"{name}.{unexpected[0]}: unexpected tensor of a compressed module (it stores {sorted(specs)})")
        for suffix, (shape, expected) in specs.items():
            key = f"{name}.{suffix}"
            found = (index.shapes[key], _SAFETENSORS_DTYPES.get(index.dtypes[key]))
            if found != (shape, expected):
                raise ValueError(
                    f"{key}: expected {str(expected).removeprefix('torch.')} {list(shape)}, "
                    f"found {index.dtypes[key]} {list(found[0])}"
                )
        layouts[name] = layout
    return layouts


_POPCOUNT = torch.tensor([bin(byte).count("1") for byte in range(256)], dtype=torch.int64)


def check_layer_values(name: str, layout: LayerLayout, tensors: dict[str, torch.Tensor]) -> None:
    """The value checks of one loaded layer (``tensors``: suffix -> tensor): finite floats; a mask
    with exactly nnz bits set (padding bits clear); N:M positions below M, ascending within each
    group. Raises ``ValueError`` naming the tensor."""
    for suffix, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name}.{suffix}: holds NaN or inf values")
    if layout.nm_pattern is None:
        bits_set = int(_POPCOUNT.to(tensors[MASK_KEY].device)[tensors[MASK_KEY].long()].sum())
        if bits_set != layout.nnz:
            raise ValueError(f"{name}.{MASK_KEY}: {bits_set} bits set, but {name}.sparse_values holds {layout.nnz} values")
        return
    n, m = layout.nm_pattern
    count = layout.out_features * (layout.in_features // m) * n
    positions = unpack_bits(tensors[INDICES_KEY], index_bits(m), count).reshape(-1, n)
    if bool((positions >= m).any()) or (n > 1 and not bool((positions.diff(dim=-1) > 0).all())):
        raise ValueError(f"{name}.{INDICES_KEY}: in-group positions must be distinct, ascending and below M={m}")


def information_bound_bits(layout: LayerLayout, value_bits: int) -> int:
    """Bits a lossless encoding of one layer needs at the least by this accounting: nnz values, 1
    mask bit per element (unstructured) or ceil(log2 M) bits per stored value (N:M), U, V, bias."""
    bits = (layout.nnz + layout.rank * (layout.out_features + layout.in_features)) * value_bits
    bits += layout.out_features * value_bits if layout.bias else 0
    if layout.nm_pattern is None:
        return bits + layout.out_features * layout.in_features
    return bits + layout.nnz * index_bits(layout.nm_pattern[1])
