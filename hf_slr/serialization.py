"""Writing and sharing compressed checkpoints: atomic save with a model card, push to the Hub."""

from __future__ import annotations

import html
import json
import os
import tempfile
from collections import Counter
from collections.abc import Mapping
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


def _structure(layers, pattern: str) -> tuple[str, str]:
    """(kind, sentence) of what every compressed layer stores: S + U V, S alone (rank 0 everywhere:
    pure pruning) or U V alone (no nonzero in S: pure low rank)."""
    if all(layer.rank == 0 for layer in layers):
        return "sparse (pruned)", f"is stored as W = S, a sparse matrix ({pattern}; pure pruning,\nno low-rank factors)"
    if all(layer.nnz == 0 for layer in layers):
        return "low-rank", "is stored as W = U V, low-rank factors (no sparse part)"
    return "sparse plus low-rank", f"is stored as W = S + U V: a sparse matrix S ({pattern})\nplus low-rank factors U, V"


def _metric_text(value) -> str:
    """A measured quality for the card: a number, a :func:`hf_slr.eval.perplexity` result (its
    perplexity and protocol), or anything else as JSON."""
    if isinstance(value, bool) or value is None:
        return _cell(json.dumps(value))
    if isinstance(value, (int, float)):
        return f"{value:.4g}"
    if isinstance(value, Mapping) and isinstance(value.get("ppl"), (int, float)):
        protocol = [str(value["dataset"])] if value.get("dataset") else []
        if value.get("n_windows") and value.get("seq_len"):
            protocol.append(f"{value['n_windows']} x {value['seq_len']} tokens")
        return f"{value['ppl']:.4g} perplexity" + (f" ({_cell(', '.join(protocol))})" if protocol else "")
    if isinstance(value, str):
        return _cell(value)
    return _cell(json.dumps(value, default=str))


def _quality_section(metrics) -> str:
    if not metrics:
        return ""
    rows = "\n".join(f"| {_cell(label)} | {_metric_text(value)} |" for label, value in metrics.items())
    return f"""
## Measured quality

| | |
|---|---|
{rows}
"""


def model_card(model, metrics: Mapping | None = None) -> str:
    """README.md for a compressed model: method, sparsity, ranks, base model, how to load it (the
    layer facts are read from the layers themselves), and the measured quality when given.

    ``metrics``: label -> value (a number, text, or a :func:`hf_slr.eval.perplexity` result),
    e.g. ``{"WikiText-2 perplexity": perplexity(model, tokenizer), "dense": 23.48}``; labels and
    texts are escaped.
    """
    config = _slr_config(model)
    if metrics is not None and not isinstance(metrics, Mapping):
        raise ValueError(f"`metrics` must be a mapping of label -> value, got {type(metrics).__name__}")
    layers = list(compressed_layers(model).values())
    ranks = Counter(layer.rank for layer in layers)
    sparsities = [1.0 - layer.nnz / (layer.out_features * layer.in_features) for layer in layers]
    patterns = {layer.nm_pattern for layer in layers}
    base = provenance_name(config.base_model)
    rank_text = ", ".join(f"{rank} ({count} matrices)" for rank, count in sorted(ranks.items()))
    pattern = " and ".join(sorted(f"{p[0]}:{p[1]} semi-structured" if p else "unstructured" for p in patterns))
    kind, structure = _structure(layers, pattern)
    calibration = "none (data-free)"
    if uses_data(config):
        calibration = f"{config.dataset}, {config.n_samples} x {config.seq_len} tokens, seed {config.seed}"
    # base_model_relation: the Hub's word for a checkpoint derived by compressing its base model
    base_metadata = f"base_model: {json.dumps(base)}\nbase_model_relation: quantized\n" if base else ""
    return f"""---
library_name: transformers
tags:
- hf_slr
- sparse-plus-low-rank
- compressed
{base_metadata}---

# {_cell(Path(base or "unknown").name)} compressed to {kind} (hf_slr)

Every linear layer of the decoder blocks {structure}, computed by **{config.method}**.

| | |
|---|---|
| base model | {_cell(base or "unknown")} |
| method | {config.method} {_cell(json.dumps(config.method_kwargs)) if config.method_kwargs else ''} |
| sparsity of S | {min(sparsities):.4f} to {max(sparsities):.4f} (mean {sum(sparsities) / len(sparsities):.4f}) |
| ranks | {rank_text} |
| compressed matrices | {len(sparsities)} |
| allocation | {config.allocation} |
| transformer matching | {_matching_text(config)} |
| calibration | {_cell(calibration)} |
{_quality_section(metrics)}
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


def save_pretrained(model, save_directory: str | os.PathLike, tokenizer=None, metrics: Mapping | None = None, **kwargs) -> Path:
    """Write a compressed model: config, safetensors, tokenizer, README.md, report, and
    ``allocation.png`` when the report has an allocation (owl / learned). ``metrics``: the
    measured quality the model card states (see :func:`model_card`). ``kwargs`` go to
    ``model.save_pretrained``.

    ``save_directory`` must be new, empty, or an earlier hf_slr checkpoint; any other non-empty
    folder is refused. The checkpoint is written into a temporary sibling folder, fsynced and
    swapped into place atomically (:mod:`hf_slr.atomic`): a failed or killed save leaves the old
    checkpoint or the new one, complete. Files of the old folder that the save does not write are
    kept, except superseded weights, report and plot.
    """
    card = model_card(model, metrics)
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
    metrics: Mapping | None = None,
):
    """Upload exactly what :func:`save_pretrained` writes (with the SLR model card, stating
    ``metrics`` when given) to ``repo_id``.

    ``model.push_to_hub`` also works, but replaces README.md with the Hub's generic card.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as work_dir:
        folder = save_pretrained(model, Path(work_dir) / "checkpoint", tokenizer=tokenizer, metrics=metrics)
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
