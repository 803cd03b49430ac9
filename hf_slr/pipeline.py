"""The block-by-block driver: the only place that walks a model.

``compress`` replaces every target ``nn.Linear`` of the decoder blocks by an :class:`SLRLinear`
computed by the configured algorithm. Methods that need activation statistics follow the
sequential protocol of SparseGPT (Frantar and Alistarh, 2023): the inputs of decoder block 0 are captured for every
calibration segment; then each block in turn accumulates H = X^T X over the inputs of its
Linears, has them decomposed and replaced, is optionally refined by transformer matching
(002 §3), and its outputs, computed with the compressed block, become the next block's inputs.
Data-free methods decompose the weights directly, without data or tokenizer.

``build_skeleton`` rebuilds the compressed layers (empty, exact shapes) before a compressed
checkpoint's tensors load; ``dequantize`` turns them back into dense Linears.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from . import algorithms
from .algorithms.base import relative_objective
from .allocation import module_targets, uniform_targets
from .calibration import HessianAccumulator, InputNorms, calibration_ids, check_source
from .config import SLRConfig
from .modules import FORMAT_VERSION, MARKER_KEY, SLRLinear

DEFAULT_SKIPS = ("lm_head",)
FORWARD_BATCH_SIZE = 8
"""Calibration segments per block forward when collecting statistics and propagating outputs."""


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder blocks: the ModuleList with ``num_hidden_layers`` entries."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if config is not None else None
    n_layers = getattr(text_config, "num_hidden_layers", None)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n_layers is None or len(module) == n_layers)
    ]
    if not candidates:
        raise ValueError(f"Could not find the decoder blocks of {type(model).__name__} (a ModuleList of {n_layers} layers)")
    return max(candidates, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def _skipped(name: str, skips: list[str]) -> bool:
    return any(name == skip or name.endswith("." + skip) or f".{skip}." in f".{name}." for skip in skips)


def _block_linears(model: nn.Module, config: SLRConfig) -> list[dict[str, nn.Linear]]:
    """Per decoder block, its ``nn.Linear`` layers by full name, minus ``modules_to_not_convert``."""
    prefix, blocks = decoder_blocks(model)
    skips = list(DEFAULT_SKIPS) + list(config.modules_to_not_convert or [])
    groups = []
    for index, block in enumerate(blocks):
        names = ((f"{prefix}.{index}.{name}", module) for name, module in block.named_modules())
        groups.append({name: module for name, module in names if isinstance(module, nn.Linear) and not _skipped(name, skips)})
    return groups


def target_linears(model: nn.Module, config: SLRConfig) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside the decoder blocks, minus ``modules_to_not_convert``."""
    return {name: module for group in _block_linears(model, config) for name, module in group.items()}


def compressed_layers(model: nn.Module) -> dict[str, SLRLinear]:
    """The model's SLRLinear layers by qualified name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, SLRLinear)}


def _set_module(model: nn.Module, name: str, module: nn.Module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _storage_dtype(config: SLRConfig, weight: torch.Tensor) -> torch.dtype:
    return getattr(torch, config.storage_dtype) if config.storage_dtype else weight.dtype


# --- validation -------------------------------------------------------------------------------


def _validate(model: nn.Module, config: SLRConfig, linears: dict[str, nn.Linear], targets, calibrated: bool):
    """Fail before any long work, naming the config field at fault."""
    if not linears:
        raise ValueError("No Linear layer of the decoder blocks is left to compress: check `modules_to_not_convert`")
    for name, linear in linears.items():
        target = targets[name]
        if target.nm_pattern is not None and linear.in_features % target.nm_pattern[1]:
            raise ValueError(
                f"`sparsity`={config.sparsity!r} needs in_features divisible by {target.nm_pattern[1]}, but {name} "
                f"has in_features={linear.in_features}; leave it dense with `modules_to_not_convert`"
            )
        if target.rank > min(linear.out_features, linear.in_features):
            raise ValueError(
                f"The rank {target.rank} set by `rank` / `compression_ratio` exceeds min(out_features, in_features)="
                f"{min(linear.out_features, linear.in_features)} of {name}"
            )
    max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if calibrated and max_positions is not None and config.seq_len > max_positions:
        raise ValueError(f"`seq_len`={config.seq_len} exceeds the model's max_position_embeddings={max_positions}")


def uses_data(config: SLRConfig) -> bool:
    """Whether compressing with ``config`` reads calibration data: a Hessian-based method, transformer
    matching or a non-uniform allocation."""
    return algorithms.get(config.method).needs_hessian or config.transformer_matching or config.allocation != "uniform"


def check_inputs(model: nn.Module, config: SLRConfig, tokenizer=None):
    """Every check of :func:`compress` that needs only the module shapes: run by the quantizer
    before the weights load, so that bad input fails before any long work. Returns the calibration
    tokenizer (loaded once here), or None when the run uses no data."""
    linears = {name: module for group in _block_linears(model, config) for name, module in group.items()}
    calibrated = uses_data(config)
    _validate(model, config, linears, uniform_targets(linears, config), calibrated)
    if not calibrated:
        return None
    check_source(config.calibration_data)
    return _calibration_tokenizer(model, config, tokenizer)


def _calibration_tokenizer(model: nn.Module, config: SLRConfig, tokenizer):
    """``tokenizer``, else the config's tokenizer object or name, else the model's own tokenizer."""
    tokenizer = tokenizer if tokenizer is not None else config.tokenizer_object
    if tokenizer is not None:
        return tokenizer
    name = config.tokenizer or getattr(model.config, "_name_or_path", None)
    if not name:
        raise ValueError(f"Method {config.method!r} needs calibration data: pass `tokenizer` (an object, a name or a path)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ValueError(f"`tokenizer`: could not load a tokenizer from {name!r} ({error})") from error


# --- devices ------------------------------------------------------------------------------------


def _execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its accelerate hook's execution device, else where its weights are."""
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if device is not None:
        return torch.device(device)
    devices = [p.device for p in module.parameters() if p.device.type != "meta"]
    return devices[0] if devices else torch.device("cpu")


def _onload(block: nn.Module, device: torch.device) -> bool:
    """Bring accelerate-offloaded weights of ``block`` onto ``device`` and drop their offload hooks."""
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import has_offloaded_params, named_module_tensors, set_module_tensor_to_device

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
    from accelerate.hooks import attach_align_device_hook

    block.to("cpu")
    attach_align_device_hook(block, execution_device=device, offload=True, weights_map=block.state_dict())


@contextmanager
def _on_compute_device(block: nn.Module):
    """Yield the device ``block`` is processed on, one block at a time.

    A block on an accelerator or placed by accelerate hooks computes where it is; an
    accelerate-offloaded block is brought onto its execution device and offloaded again afterwards;
    a block in CPU memory (no hooks) moves to the GPU when there is one, and back afterwards.
    """
    device = _execution_device(block)
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


# --- block inputs -------------------------------------------------------------------------------


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
    device = _execution_device(model.get_input_embeddings())
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


def _row_batches(n_rows: int):
    return (slice(start, start + FORWARD_BATCH_SIZE) for start in range(0, n_rows, FORWARD_BATCH_SIZE))


@torch.no_grad()
def _forward_block(block: nn.Module, call: BlockCall, inputs: torch.Tensor) -> torch.Tensor:
    """The block's outputs for every calibration row, in mini-batches."""
    outputs = torch.empty_like(inputs)
    for rows in _row_batches(len(inputs)):
        outputs[rows] = call(block, inputs[rows])
    return outputs


def _dense_pass(
    block: nn.Module, call: BlockCall, inputs: torch.Tensor, linears: dict[str, nn.Linear]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """H = X^T X of every Linear in ``linears`` and the block's outputs, from one forward."""
    with HessianAccumulator(linears) as accumulator:
        outputs = _forward_block(block, call, inputs)
    return accumulator.hessians, outputs


# --- transformer matching -----------------------------------------------------------------------


@contextmanager
def _trainable_float32(block: nn.Module, parameters: list[nn.Parameter]):
    """``block`` in float32 with only ``parameters`` requiring grad; dtypes and flags restored after."""
    tensors = list(block.parameters()) + [b for b in block.buffers() if b.is_floating_point()]
    dtypes = [t.dtype for t in tensors]
    flags = [p.requires_grad for p in block.parameters()]
    chosen = {id(p) for p in parameters}
    for tensor in tensors:
        tensor.data = tensor.data.float()
    for parameter in block.parameters():
        parameter.requires_grad_(id(parameter) in chosen)
    try:
        yield
    finally:
        for tensor, dtype in zip(tensors, dtypes):
            tensor.data = tensor.data.to(dtype)
        for parameter, flag in zip(block.parameters(), flags):
            parameter.requires_grad_(flag)


def _matching_loss(block: nn.Module, call: BlockCall, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean squared error between the block's outputs and ``targets`` over all rows (float32)."""
    with torch.no_grad():
        total = sum(
            F.mse_loss(call(block, inputs[rows].float()), targets[rows].float(), reduction="sum")
            for rows in _row_batches(len(inputs))
        )
    return float(total) / targets.numel()


def transformer_matching(
    block: nn.Module,
    call: BlockCall,
    inputs: torch.Tensor,
    dense_outputs: torch.Tensor,
    layers: list[SLRLinear],
    epochs: int = 20,
    batch_size: int = 8,
    lr: float = 2e-5,
    seed: int = 0,
) -> tuple[float, float]:
    """Transformer matching (002 §3, App. B): refine the S values (on their fixed support), U and
    V of ``layers`` so that the compressed ``block`` reproduces the dense block's outputs on the
    same inputs, min ||T(X) - T_dense(X)||_F^2, with Adam (PyTorch defaults), ``lr`` annealed to 0
    by a cosine schedule over ``epochs`` passes of shuffled mini-batches of ``batch_size`` rows, in
    float32. Every other parameter of the block stays fixed.

    Returns the mean squared error over all rows before and after.
    """
    parameters = [p for layer in layers for p in (layer.sparse_values, layer.U, layer.V) if p.numel()]
    call = call.to(inputs.device, torch.float32)
    with _trainable_float32(block, parameters):
        before = _matching_loss(block, call, inputs, dense_outputs)
        if not parameters:
            return before, before
        optimizer = torch.optim.Adam(parameters, lr=lr)
        steps = epochs * math.ceil(len(inputs) / batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(len(inputs), generator=generator).to(inputs.device)
            for start in range(0, len(inputs), batch_size):
                rows = order[start : start + batch_size]
                with torch.enable_grad():
                    loss = F.mse_loss(call(block, inputs[rows].float()), dense_outputs[rows].float())
                    loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
        after = _matching_loss(block, call, inputs, dense_outputs)
    return before, after


# --- allocation ---------------------------------------------------------------------------------


def _allocation_statistics(
    model: nn.Module, config: SLRConfig, blocks: nn.ModuleList, block_linears, input_ids, inputs, calls
) -> dict:
    """What ``module_targets`` needs for owl / learned: the input norms of every target Linear from
    one dense pass over the calibration rows, block by block, and (learned) the loss closure."""
    norms, hidden = {}, inputs
    for index, block in enumerate(blocks):
        with _on_compute_device(block) as device, InputNorms(block_linears[index]) as recorder:
            hidden = _forward_block(block, calls[index].to(device), hidden.to(device))
        norms.update(recorder.norms)
    del hidden
    statistics = {"norms": norms}
    if config.allocation == "learned":
        linears = {name: module for group in block_linears for name, module in group.items()}
        statistics.update(loss=_lm_loss(model, linears, input_ids), n_rows=len(input_ids))
    return statistics


def _lm_loss(model: nn.Module, linears: dict[str, nn.Linear], input_ids: torch.LongTensor):
    """``loss(W_hat, rows)``: the causal-LM loss of ``model`` on ``input_ids[rows]`` with the weights
    of the named Linears temporarily replaced by ``W_hat`` (the dense ones are restored after)."""
    if any(linear.weight.device.type == "meta" for linear in linears.values()):
        raise ValueError("`allocation`='learned' needs the target weights in memory; it does not support offloaded models")
    device = _execution_device(model.get_input_embeddings())

    @torch.no_grad()
    def loss(approximations: dict[str, torch.Tensor], rows: torch.LongTensor) -> float:
        dense = {name: linears[name].weight.data for name in approximations}
        try:
            for name, weight in approximations.items():
                linears[name].weight.data = weight.to(dense[name])
            batch = input_ids[rows].to(device)
            total = sum(
                float(model(input_ids=batch[part], labels=batch[part], use_cache=False).loss) * len(batch[part])
                for part in _row_batches(len(batch))
            )
        finally:
            for name, weight in dense.items():
                linears[name].weight.data = weight
        return total / len(batch)

    return loss


# --- compression --------------------------------------------------------------------------------


def _decompose(
    name: str, linear: nn.Linear, hessian: torch.Tensor | None, target, algorithm, config: SLRConfig
) -> tuple[SLRLinear, dict]:
    """Decompose one Linear in float32 and build its SLRLinear (in the storage dtype) and report entry."""
    start = time.perf_counter()
    weight = linear.weight.detach().float()
    kwargs = dict(config.method_kwargs)
    history = [] if "history" in algorithms.hyperparameters(algorithm.name) else None
    if history is not None:
        kwargs["history"] = history
    sparse, u, v = algorithm.decompose(weight, hessian if algorithm.needs_hessian else None, target, **kwargs)
    layer = SLRLinear.from_dense(
        sparse, u, v, linear.bias, nm_pattern=config.nm_pattern, dtype=_storage_dtype(config, linear.weight)
    )
    entry = {
        "module": name,
        "rank": layer.rank,
        "sparsity": 1.0 - layer.nnz / weight.numel(),
        "relative_objective": relative_objective(weight, sparse, u, v, hessian),
        "seconds": time.perf_counter() - start,
    }
    if history:
        entry["history"] = history
    return layer, entry


def _attach_quantizer(model: nn.Module, config: SLRConfig):
    """Make a model compressed by :func:`compress` after loading look loaded compressed (config,
    ``hf_quantizer``) so that ``save_pretrained`` writes a reloadable checkpoint."""
    from .quantizer import SLRHfQuantizer

    quantizer = SLRHfQuantizer(config, pre_quantized=True)
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)


def compress(model: nn.Module, config: SLRConfig, tokenizer=None) -> nn.Module:
    """Compress ``model`` in place with ``config``; fills ``config.compressed_modules``.

    ``tokenizer`` (for calibration) defaults to the config's tokenizer, else the model's own
    (``AutoTokenizer.from_pretrained(model.config._name_or_path)``); data-free methods without
    transformer matching use no data and no tokenizer.

    Returns the model, with ``model.slr_report``: ``{"modules": [...], "blocks": [...]}``, per module
    its relative objective ||X(W - S - U V)||_F^2 / ||X W||_F^2 (with H = I when data-free), rank,
    sparsity, seconds and, for iterative methods, the objective per iteration (``history``); per
    block its seconds and, with transformer matching, ``tm_loss_before`` / ``tm_loss_after``.
    With ``allocation`` "owl" or "learned" the targets come from the allocation (computed on the
    dense model before the first block is compressed) and ``"allocation"`` holds its report: per-layer
    sparsity, per-module rank ratio / rank / nnz, the outer-loop loss curve and seconds.
    """
    algorithm = algorithms.get(config.method)
    prefix, blocks = decoder_blocks(model)
    block_linears = _block_linears(model, config)
    allocated = config.allocation != "uniform"
    calibrated = algorithm.needs_hessian or config.transformer_matching
    tokenizer = check_inputs(model, config, tokenizer)

    was_training = model.training
    model.eval()
    layouts, report = {}, {"modules": [], "blocks": []}
    try:
        if uses_data(config):
            input_ids = calibration_ids(config.calibration_data, tokenizer, config.n_samples, config.seq_len, config.seed)
            inputs, calls = capture_block_inputs(model, input_ids)
        statistics = _allocation_statistics(model, config, blocks, block_linears, input_ids, inputs, calls) if allocated else {}
        targets, allocation_report = module_targets(block_linears, config, **statistics)
        if allocation_report is not None:
            report["allocation"] = allocation_report
        del statistics
        progress = tqdm(list(enumerate(blocks)), desc=f"Compressing ({config.method})")
        for index, block in progress:
            start = time.perf_counter()
            block_entry = {"block": f"{prefix}.{index}"}
            linears, block_linears[index] = block_linears[index], None  # the dense weights go with this block
            with _on_compute_device(block) as device:
                hessians = {}
                if calibrated:
                    inputs, call = inputs.to(device), calls[index].to(device)
                    hessians, dense_outputs = _dense_pass(block, call, inputs, linears)
                layers = []
                for name in list(linears):
                    layer, entry = _decompose(name, linears.pop(name), hessians.get(name), targets[name], algorithm, config)
                    _set_module(model, name, layer)
                    layers.append(layer)
                    layouts[name] = {"rank": layer.rank, "nnz": layer.nnz, "sparsity": entry["sparsity"]}
                    report["modules"].append(entry)
                del hessians
                if config.transformer_matching:
                    block_entry["tm_loss_before"], block_entry["tm_loss_after"] = transformer_matching(
                        block, call, inputs, dense_outputs, layers,
                        epochs=config.tm_epochs, batch_size=config.tm_batch_size, lr=config.tm_lr, seed=config.seed,
                    )
                if calibrated:
                    del dense_outputs
                    if index + 1 < len(blocks):
                        inputs = _forward_block(block, call, inputs)
            block_entry["seconds"] = time.perf_counter() - start
            report["blocks"].append(block_entry)
            progress.set_postfix(block_seconds=f"{block_entry['seconds']:.1f}")
    finally:
        model.train(was_training)
    config.compressed_modules = layouts
    config.base_model = config.base_model or getattr(getattr(model, "config", None), "_name_or_path", None)
    model.slr_report = report
    if isinstance(model, PreTrainedModel) and getattr(model, "hf_quantizer", None) is None:
        _attach_quantizer(model, config)
    return model


def build_skeleton(model: nn.Module, config: SLRConfig, dtype: torch.dtype | None = None):
    """Replace each module named in ``config.compressed_modules`` by an empty SLRLinear of its shape."""
    linears = target_linears(model, config)
    missing = sorted(set(config.compressed_modules) - set(linears))
    if missing:
        raise ValueError(
            f"`compressed_modules` names modules that are not Linear layers of this model: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}"
        )
    for name, layout in config.compressed_modules.items():
        linear = linears[name]
        layer = SLRLinear(
            linear.in_features,
            linear.out_features,
            layout["rank"],
            nnz=layout["nnz"],
            nm_pattern=config.nm_pattern,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=dtype or _storage_dtype(config, linear.weight),
        )
        _set_module(model, name, layer)


def dequantize(model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Replace every SLRLinear by a dense ``nn.Linear`` with weight S + U V (in ``dtype``, default
    the layer's; transformers passes ``config.dtype``, which is a string after a save/reload)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    for name, layer in compressed_layers(model).items():
        with torch.no_grad():
            weight = layer.to_dense()
            dense = nn.Linear(
                layer.in_features,
                layer.out_features,
                bias=layer.bias is not None,
                device=weight.device,
                dtype=dtype or weight.dtype,
            )
            dense.weight.copy_(weight)
            if layer.bias is not None:
                dense.bias.copy_(layer.bias)
        _set_module(model, name, dense)
    return model


def state_dict_with_markers(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` plus the format marker of every SLRLinear (see modules.MARKER_KEY)."""
    state_dict = model.state_dict()
    for name in compressed_layers(model):
        state_dict[f"{name}.{MARKER_KEY}"] = torch.tensor([FORMAT_VERSION], dtype=torch.uint8)
    return state_dict
