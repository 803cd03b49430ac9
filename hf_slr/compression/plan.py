"""The checks a compression runs once, before any weight loads or any long work, and the plan
they hand to the driver: which Linears of which block, with which method record, on which data."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import AutoTokenizer

from .. import algorithms
from ..algorithms import Algorithm
from ..allocation import uniform_target
from ..texts import check_source
from ..integration import block_linears, compressed_layers, projection_shape, unmatched_patterns
from . import distributed
from .matching import MatchingHyperparameters


def uses_data(request) -> bool:
    """Whether compressing with ``request`` (an SLRConfig) reads calibration data: a Hessian-based
    method, transformer matching or a non-uniform allocation."""
    return algorithms.get(request.method).needs_hessian or request.transformer_matching or request.allocation != "uniform"


@dataclass(frozen=True)
class CompressionPlan:
    """What the driver needs, checked: the request (read only), the method and its validated
    hyperparameters, the transformer-matching schedule (None when off), the names of the target
    Linears of every decoder block, and the calibration tokenizer (None when no data is used)."""

    request: object
    algorithm: Algorithm
    method_hyperparameters: object
    matching: MatchingHyperparameters | None
    blocks: list[list[str]]
    tokenizer: object | None

    @property
    def uses_data(self) -> bool:
        return self.tokenizer is not None

    @property
    def needs_hessians(self) -> bool:
        """Whether each block's forward records H = X^T X and its dense outputs."""
        return self.algorithm.needs_hessian or self.matching is not None


def plan_compression(model: nn.Module, request, tokenizer=None) -> CompressionPlan:
    """Check ``request`` (an SLRConfig) against ``model``'s shapes (the weights may still be on the
    meta device) and resolve the calibration tokenizer: fails before any long work, naming the
    config field at fault.

    ``tokenizer`` (an object) defaults to the request's tokenizer object or name, else the
    model's own (``model.config._name_or_path``); data-free runs load none.
    """
    if compressed_layers(model):
        raise ValueError(
            f"{type(model).__name__} is already SLR-compressed ({len(compressed_layers(model))} SLRLinear layers): "
            "compress its dense parent, or call `model.dequantize()` first"
        )
    unmatched = unmatched_patterns(model, request.modules_to_not_convert or [])
    if unmatched:
        raise ValueError(f"`modules_to_not_convert` names {unmatched}, which match no module of {type(model).__name__}")
    groups = block_linears(model, request.modules_to_not_convert)
    linears = {name: linear for group in groups for name, linear in group.items()}
    if not linears:
        raise ValueError(
            "No projection layer (nn.Linear or Conv1D) of the decoder blocks is left to compress: "
            f"check `modules_to_not_convert`={request.modules_to_not_convert!r}"
        )
    nm_pattern = request.nm_pattern
    for name, linear in linears.items():
        out_features, in_features = projection_shape(linear)
        if nm_pattern is not None and in_features % nm_pattern[1]:
            raise ValueError(
                f"`sparsity`={request.sparsity!r} needs in_features divisible by {nm_pattern[1]}, but {name} "
                f"has in_features={in_features}; leave it dense with `modules_to_not_convert`"
            )
        if request.allocation == "uniform":
            rank = uniform_target(out_features, in_features, request).rank
            if rank > min(out_features, in_features):
                raise ValueError(
                    f"The rank {rank} set by `rank` / `compression_ratio` exceeds min(out_features, in_features)="
                    f"{min(out_features, in_features)} of {name}"
                )
    distributed.check_supported(request)
    calibrated = uses_data(request)
    max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if calibrated and max_positions is not None and request.seq_len > max_positions:
        raise ValueError(f"`seq_len`={request.seq_len} exceeds the model's max_position_embeddings={max_positions}")
    if calibrated:
        _check_activation_memory(model, request)
        check_source(request.calibration_data)
    return CompressionPlan(
        request=request,
        algorithm=algorithms.get(request.method),
        method_hyperparameters=request.method_hyperparameters,
        matching=request.matching_hyperparameters if request.transformer_matching else None,
        blocks=[list(group) for group in groups],
        tokenizer=_calibration_tokenizer(model, request, tokenizer) if calibrated else None,
    )


ACTIVATION_COPIES = 3
"""Block activations held at once per calibration token: the block inputs, the dense outputs
(Hessian pass / matching targets) and the propagated outputs."""


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``); None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _check_activation_memory(model: nn.Module, request) -> None:
    """Refuse ``n_samples`` x ``seq_len`` whose float32 block activations cannot fit in memory."""
    hidden = getattr(model.config.get_text_config(), "hidden_size", None)
    available = _available_memory()
    if hidden is None or available is None:
        return
    needed = ACTIVATION_COPIES * request.n_samples * request.seq_len * hidden * 4
    if needed > available:
        raise ValueError(
            f"`n_samples`={request.n_samples} x `seq_len`={request.seq_len} needs about {needed / 2**30:.1f} GiB of "
            f"block activations (hidden size {hidden}), more than the {available / 2**30:.1f} GiB available: lower them"
        )


def _calibration_tokenizer(model: nn.Module, request, tokenizer):
    """``tokenizer``, else the request's tokenizer object or name, else the model's own tokenizer."""
    source = tokenizer if tokenizer is not None else request.tokenizer_source
    if source is not None and not isinstance(source, str):
        return source
    name = source or getattr(model.config, "_name_or_path", None)
    if not name:
        raise ValueError(f"Method {request.method!r} needs calibration data: pass `tokenizer` (an object, a name or a path)")
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ValueError(f"`tokenizer`: could not load a tokenizer from {name!r} ({error})") from error
