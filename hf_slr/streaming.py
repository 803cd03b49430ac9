"""Checkpoint to checkpoint, block by block: compress a model larger than memory, resumably.

:func:`compress_checkpoint` never holds more than the model's non-block weights (embeddings, final
norm, head), one decoder block's dense weights and the calibration activations:

1. the model skeleton is built on the meta device (accelerate's ``init_empty_weights``) and only the
   non-block tensors are read from the source safetensors;
2. the calibration segments' block-0 inputs are captured (:mod:`hf_slr.compression.capture`);
3. each block's dense weights are read from the source when its turn comes, the block is compressed
   by the same code as the in-memory path (:func:`hf_slr.compression.driver.compress_block`), its
   compressed tensors are written to the work folder and the block goes back to the meta device;
4. the final checkpoint (the same tensors, config, card and report as ``hf_slr.save_pretrained``
   of the in-memory path, sharded one file per block) is assembled and swapped into place
   atomically (:mod:`hf_slr.atomic`).

The work folder ``.<out>.partial`` beside ``out`` records the progress: the finished blocks' files,
the inputs of the next block (float32, exact) and a fingerprint of the request, the source and the
calibration segments. Re-running the same call after a kill resumes at the first unfinished block
and gives tensors identical to an uninterrupted run (at the same thread count); a different
request or source on the same ``out`` is refused.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from . import atomic
from . import format as slr_format
from .calibration import calibration_ids
from .compression import distributed, driver
from .compression.plan import plan_compression
from .config import SLRConfig, provenance_name
from .integration import checkpoint_state_dict, decoder_blocks
from .serialization import REPORT_FILE, check_save_target, model_card

PROGRESS_FILE = "progress.json"


def _atomic_write(path: Path, write) -> None:
    """``write(temporary_path)``, fsync, then rename onto ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    atomic.fsync_directory(path.parent)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _source_fingerprint(source: Path) -> dict:
    """config.json's digest and each safetensors file's name, size and header digest."""
    files = {}
    for path in sorted(source.glob("*.safetensors")):
        with open(path, "rb") as handle:
            header = handle.read(8 + int.from_bytes(handle.read(8), "little"))
        files[path.name] = {"bytes": path.stat().st_size, "header_sha256": hashlib.sha256(header).hexdigest()}
    return {"config_sha256": _file_digest(source / "config.json"), "files": files}


class _Source:
    """The dense source checkpoint: its tensors by name, read one at a time."""

    def __init__(self, folder: Path):
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"`src`={str(folder)!r} holds no *.safetensors file (only safetensors sources stream)")
        self.index = slr_format.CheckpointIndex(files)

    def load(self, model: torch.nn.Module, names: list[str], dtype: torch.dtype) -> None:
        for name in names:
            value = self.index.tensor(name)
            set_module_tensor_to_device(model, name, "cpu", value=value, dtype=dtype if value.is_floating_point() else None)


def _load_skeleton(source_dir: Path, dtype: torch.dtype, source: _Source):
    """The model on the meta device with its non-block tensors loaded; the names of each block's tensors."""
    config = AutoConfig.from_pretrained(source_dir)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    prefix, blocks = decoder_blocks(model)
    block_keys = [[f"{prefix}.{i}.{key}" for key in block.state_dict()] for i, block in enumerate(blocks)]
    in_blocks = {key for keys in block_keys for key in keys}
    expected = [key for key in model.state_dict() if key not in in_blocks]
    present = [key for key in expected if key in source.index.shapes]
    source.load(model, present, dtype)
    model.tie_weights()
    missing = [key for key, tensor in model.state_dict().items() if key not in in_blocks and tensor.device.type == "meta"]
    if missing:
        raise ValueError(f"`src` lacks the tensors {missing[:5]} of {type(model).__name__}")
    absent = [key for keys in block_keys for key in keys if key not in source.index.shapes]
    if absent:
        raise ValueError(f"`src` lacks the block tensors {absent[:5]}")
    return model.eval(), block_keys


def _block_state_dict(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The checkpoint tensors (records included) under ``prefix``, contiguous, tied copies broken."""
    return {
        key: tensor.detach().contiguous().clone()
        for key, tensor in checkpoint_state_dict(model).items()
        if key.startswith(prefix) and tensor.device.type != "meta"
    }


def compress_checkpoint(src: str | os.PathLike, out: str | os.PathLike, config: SLRConfig, tokenizer=None, dtype=torch.float32) -> Path:
    """Compress the dense checkpoint folder ``src`` into ``out`` with ``config`` (left unchanged),
    block by block (see the module docstring); returns ``out``. ``tokenizer`` (an object) defaults
    to the config's, else ``src``'s own. Non-uniform allocations need the whole model: use
    ``from_pretrained(..., quantization_config=config)`` for those."""
    source_dir, target = Path(src), Path(out).absolute()
    if not (source_dir / "config.json").is_file():
        raise FileNotFoundError(f"`src`={str(src)!r} is not a local model folder (no config.json)")
    if config.allocation != "uniform":
        raise ValueError(f"`allocation`={config.allocation!r} needs the whole dense model: compress in memory with from_pretrained")
    check_save_target(target, out)
    source = _Source(source_dir)
    model, block_keys = _load_skeleton(source_dir, dtype, source)
    request = copy.deepcopy(config)  # the job's own copy: the caller's request is never written to
    plan = plan_compression(model, request, tokenizer)
    prefix, blocks = decoder_blocks(model)

    work = target.parent / f".{target.name}.partial"
    work.mkdir(parents=True, exist_ok=True)
    input_ids = None
    if plan.uses_data:
        input_ids = calibration_ids(
            request.calibration_data, plan.tokenizer, request.n_samples, request.seq_len, request.seed
        )
    fingerprint = {
        "request": {key: value for key, value in request.to_dict().items() if key != "base_model"},
        "source": _source_fingerprint(source_dir),
        "calibration": None if input_ids is None else hashlib.sha256(input_ids.numpy().tobytes()).hexdigest(),
        "dtype": str(dtype),
        "processes": distributed.world()[1],
    }
    progress = _read_progress(work, fingerprint)
    inputs, calls, targets, _ = driver.prepare(model, plan, input_ids)
    finished = progress["finished"]
    if finished and inputs is not None:
        inputs = load_file(_inputs_file(work, finished))["inputs"] if finished < len(blocks) else None
    report = progress["report"]
    lead = distributed.world()[0] == 0
    bar = tqdm(range(len(blocks)), desc=f"Compressing ({request.method})", unit="block", initial=finished, disable=not lead)
    for index in bar:
        if index < finished:
            continue
        source.load(model, block_keys[index], dtype)
        inputs = driver.compress_block(model, plan, index, targets, inputs, calls, report)
        if lead:
            tensors = _block_state_dict(model, f"{prefix}.{index}.")
            _atomic_write(work / f"block-{index:05d}.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        if inputs is not None:
            rows = {"inputs": inputs.cpu().contiguous()}
            _atomic_write(_inputs_file(work, index + 1), lambda p: save_file(rows, p, metadata={"format": "pt"}))
        distributed.barrier()  # every rank's inputs are on disk before the progress says so
        if lead:
            state = {"fingerprint": fingerprint, "finished": index + 1, "report": report}
            _atomic_write(work / PROGRESS_FILE, lambda p: p.write_text(json.dumps(state, indent=1)))
        _inputs_file(work, index).unlink(missing_ok=True)
        blocks[index].to("meta")
        _return_freed_memory()
        bar.set_postfix(block_seconds=f"{report['blocks'][-1]['seconds']:.1f}")
    request.base_model = request.base_model or provenance_name(str(source_dir))
    model.config.quantization_config = request
    model.slr_report = report
    if lead:
        _assemble(model, source_dir, work, target, len(blocks), tokenizer)
        shutil.rmtree(work)
    distributed.barrier()
    return target


def _return_freed_memory() -> None:
    """Hand the freed heap of the finished block back to the OS (glibc's ``malloc_trim``): without
    it the allocator keeps it, and the resident size grows with every block though nothing is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _inputs_file(work: Path, block: int) -> Path:
    """The inputs of ``block`` for this process's calibration rows."""
    rank, size = distributed.world()
    return work / (f"inputs-{block:05d}.safetensors" if size == 1 else f"inputs-{block:05d}.rank{rank}.safetensors")


def _read_progress(work: Path, fingerprint: dict) -> dict:
    """The recorded progress of an earlier run of the same job, or a fresh one; refuses a work
    folder of another job."""
    path = work / PROGRESS_FILE
    if not path.exists():
        return {"finished": 0, "report": {"modules": [], "blocks": []}}
    progress = json.loads(path.read_text())
    if progress.get("fingerprint") != fingerprint:
        changed = sorted(k for k in fingerprint if progress.get("fingerprint", {}).get(k) != fingerprint[k])
        raise ValueError(
            f"{work} holds an unfinished run with another {' and '.join(changed)}: resume it with the same "
            "arguments, or delete that folder to start over"
        )
    return progress


def _assemble(model, source_dir: Path, work: Path, target: Path, n_blocks: int, tokenizer) -> None:
    """Write the final checkpoint: config, one shard for the non-block tensors and one per block
    (hard links to the work files), the index, generation config, tokenizer, card and report."""
    prefix, _ = decoder_blocks(model)
    rest, seen = {}, set()
    for key, tensor in model.state_dict().items():
        if key.startswith(f"{prefix}.") or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        rest[key] = tensor.detach().contiguous()
    n_files = n_blocks + 1
    names = [f"model-{i + 1:05d}-of-{n_files:05d}.safetensors" for i in range(n_files)]
    with atomic.replace_folder(target) as tmp:
        model.config.save_pretrained(tmp)
        if (source_dir / "generation_config.json").exists():
            GenerationConfig.from_pretrained(source_dir).save_pretrained(tmp)
        save_file(rest, tmp / names[0], metadata={"format": "pt"})
        weight_map = dict.fromkeys(rest, names[0])
        for index in range(n_blocks):
            os.link(work / f"block-{index:05d}.safetensors", tmp / names[index + 1])
            weight_map.update(dict.fromkeys(slr_format.CheckpointIndex([tmp / names[index + 1]]).shapes, names[index + 1]))
        total = sum((tmp / name).stat().st_size for name in names)
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
        )
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(model))
        (tmp / REPORT_FILE).write_text(json.dumps(model.slr_report, indent=2))
