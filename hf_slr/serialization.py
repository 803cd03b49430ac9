"""Writing and sharing compressed checkpoints: atomic save with a model card, push to the Hub."""

from __future__ import annotations

import html
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

from . import atomic
from .allocation.plot import plot_allocation
from .compression.plan import uses_data
from .config import SLRConfig, provenance_name
from .integration import compressed_layers

REPORT_FILE = "slr_report.json"
ALLOCATION_PLOT = "allocation.png"


def _slr_config(model) -> SLRConfig:
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if not isinstance(config, SLRConfig) or not compressed_layers(model):
        raise ValueError("The model is not SLR-compressed: load it with `quantization_config=SLRConfig(...)` first")
    return config


def _cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell: HTML escaped, pipes and backticks neutralised,
    one line."""
    return html.escape(" ".join(str(text).split())).replace("|", "&#124;").replace("`", "&#96;")


def model_card(model) -> str:
    """README.md for a compressed model: method, sparsity, ranks, base model, how to load it (the
    layer facts are read from the layers themselves)."""
    config = _slr_config(model)
    layers = compressed_layers(model).values()
    ranks = Counter(layer.rank for layer in layers)
    sparsities = [1.0 - layer.nnz / (layer.out_features * layer.in_features) for layer in layers]
    patterns = {layer.nm_pattern for layer in layers}
    base = provenance_name(config.base_model) or "unknown"
    rank_text = ", ".join(f"{rank} ({count} matrices)" for rank, count in sorted(ranks.items()))
    pattern = " and ".join(sorted(f"{p[0]}:{p[1]} semi-structured" if p else "unstructured" for p in patterns))
    calibration = "none (data-free)"
    if uses_data(config):
        calibration = f"{config.dataset}, {config.n_samples} x {config.seq_len} tokens, seed {config.seed}"
    return f"""---
library_name: transformers
tags:
- hf_slr
- sparse-plus-low-rank
- compressed
base_model: {json.dumps(base)}
---

# {_cell(Path(base).name)} compressed to sparse plus low-rank (hf_slr)

Every linear layer of the decoder blocks is stored as W = S + U V: a {pattern} sparse matrix S
plus rank-r factors U, V, computed by **{config.method}**.

| | |
|---|---|
| base model | {_cell(base)} |
| method | {config.method} {_cell(json.dumps(config.method_kwargs)) if config.method_kwargs else ''} |
| sparsity of S | {min(sparsities):.4f} to {max(sparsities):.4f} (mean {sum(sparsities) / len(sparsities):.4f}) |
| ranks | {rank_text} |
| compressed matrices | {len(sparsities)} |
| allocation | {config.allocation} |
| transformer matching | {_matching_text(config)} |
| calibration | {_cell(calibration)} |

## Loading

`import hf_slr` is **required** before loading: it registers the `slr` quantization method with
transformers.

```python
import hf_slr  # registers quant_method "slr"
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("<this repo>")
```

Without it transformers does not know the `slr` method and refuses the checkpoint (a size
mismatch on the `*.weight` module records) rather than loading random weights.
"""


def _matching_text(config: SLRConfig) -> str:
    if not config.transformer_matching:
        return "no"
    schedule = config.matching_hyperparameters
    return f"{schedule.epochs} epochs, batch {schedule.batch_size}, lr {schedule.lr}"


def is_slr_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a config.json with ``quant_method: "slr"`` (a checkpoint hf_slr wrote)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and (config.get("quantization_config") or {}).get("quant_method") == "slr"


def _replaced_by_a_new_save(relative: Path) -> bool:
    """Files of an earlier checkpoint that a new save supersedes even when it does not rewrite them:
    weight shards and their index, the report and the allocation plot."""
    name = relative.as_posix()
    return name.endswith(".safetensors") or name.endswith(".safetensors.index.json") or name in (REPORT_FILE, ALLOCATION_PLOT)


def check_save_target(target: Path, as_given) -> None:
    """Refuse a target that a save would clobber: a file, or a non-empty folder that is not an
    hf_slr checkpoint (``as_given``: the path as the user wrote it, for the message)."""
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"save_directory={str(as_given)!r} is a file, not a folder")
    if target.is_dir() and any(target.iterdir()) and not is_slr_checkpoint(target):
        raise FileExistsError(
            f"save_directory={str(as_given)!r} is a non-empty folder that is not an hf_slr checkpoint: "
            "hf_slr saves into a new folder, an empty one, or over an earlier hf_slr checkpoint; choose another folder"
        )


def save_pretrained(model, save_directory: str | os.PathLike, tokenizer=None, **kwargs) -> Path:
    """Write a compressed model: config, safetensors, tokenizer, README.md, report, and
    ``allocation.png`` when the report has an allocation (owl / learned). ``kwargs`` go to
    ``model.save_pretrained``.

    ``save_directory`` must be new, empty, or an earlier hf_slr checkpoint; any other non-empty
    folder is refused. The checkpoint is written into a temporary sibling folder, fsynced and
    swapped into place atomically (:mod:`hf_slr.atomic`): a failed or killed save leaves the old
    checkpoint or the new one, complete. Files of the old folder that the save does not write are
    kept, except superseded weights, report and plot.
    """
    card = model_card(model)
    target = Path(save_directory).absolute()
    check_save_target(target, save_directory)
    with atomic.replace_folder(target, replaced=_replaced_by_a_new_save) as tmp:
        model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
        report = getattr(model, "slr_report", None)
        if report:
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2))
        if report and report.get("allocation"):
            plot_allocation(report["allocation"], tmp / ALLOCATION_PLOT)
    return target


def push_to_hub(
    model,
    repo_id: str,
    tokenizer=None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload SLR-compressed model",
    revision: str | None = None,
    create_pr: bool = False,
):
    """Upload exactly what :func:`save_pretrained` writes (with the SLR model card) to ``repo_id``.

    ``model.push_to_hub`` also works, but replaces README.md with the Hub's generic card.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as work_dir:
        folder = save_pretrained(model, Path(work_dir) / "checkpoint", tokenizer=tokenizer)
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        ]
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )


def checkpoint_bytes(folder: str | os.PathLike) -> int:
    """Total size of the safetensors files of a saved model."""
    return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))
