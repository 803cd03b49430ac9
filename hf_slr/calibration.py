"""Calibration data and activation statistics for the layer-wise objectives.

:func:`calibration_ids` draws the token segments of the SparseGPT/Wanda protocol (004 §5.1: 128
segments of 2048 tokens from the first C4 training shard); :class:`HessianAccumulator` streams
H = X^T X over the inputs of Linear layers while the pipeline runs a block forward (the Hessian of
the layer-wise objective, 002 eq. 1, 004 §3) and :class:`InputNorms` the per-channel input norms
||X_j|| (OWL's outlier statistics).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .utils import data_file

__all__ = ["C4_TRAIN_FILE", "LOCAL_SUFFIXES", "HessianAccumulator", "InputNorms", "calibration_ids", "load_documents"]

C4_TRAIN_FILE = "c4/c4-train.00000-of-01024.first1000.jsonl"
"""The offline C4 sample that ``dataset="c4"`` reads (under :func:`hf_slr.utils.data_dir`)."""

LOCAL_SUFFIXES = (".jsonl", ".json", ".txt")
TEXT_FIELD = "text"


def _texts(rows: Any, source: str) -> list[str]:
    if not isinstance(rows, list) or not all(isinstance(row, dict) and TEXT_FIELD in row for row in rows):
        raise ValueError(f"`dataset`={source!r}: every row must be an object with a {TEXT_FIELD!r} field")
    return [row[TEXT_FIELD] for row in rows]


def _local_file(name: str) -> Path | None:
    """The file a local source names ("c4" or a path ending in :data:`LOCAL_SUFFIXES`), which must
    exist; None for a Hub id."""
    path = data_file(C4_TRAIN_FILE) if name == "c4" else Path(name)
    if name != "c4" and path.suffix not in LOCAL_SUFFIXES:
        return None
    if not path.is_file():
        raise FileNotFoundError(f"`dataset`={name!r}: no such calibration file ({path})")
    return path


def _read_local(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return [text]
    if path.suffix == ".jsonl":
        return _texts([json.loads(line) for line in text.splitlines() if line.strip()], str(path))
    return _texts(json.loads(text), str(path))


def load_documents(dataset: Any) -> list[str]:
    """The calibration documents of ``dataset``.

    - ``"c4"``: the local C4 train sample (:data:`C4_TRAIN_FILE`, 1000 documents);
    - a ``.jsonl`` / ``.json`` file (rows, or a list of rows, with a ``text`` field) or a ``.txt``
      file (one document);
    - a list of strings (one document each);
    - a :class:`datasets.Dataset` (its ``text`` column);
    - a Hub dataset id ``"owner/name"`` or ``"owner/name:config"`` (``text`` column of the ``train``
      split, loaded with :func:`datasets.load_dataset`).
    """
    if isinstance(dataset, (list, tuple)):
        documents = list(dataset)
    elif isinstance(dataset, (str, Path)):
        name = str(dataset)
        path = _local_file(name)
        if path is not None:
            documents = _read_local(path)
        else:
            import datasets

            repo, _, config = name.partition(":")
            documents = datasets.load_dataset(repo, config or None, split="train")[TEXT_FIELD]
    else:
        import datasets

        if not isinstance(dataset, datasets.Dataset):
            raise ValueError(
                "`dataset` must be 'c4', a .jsonl/.json/.txt path, a list of strings, a datasets.Dataset "
                f"or a Hub dataset id, got {type(dataset).__name__}"
            )
        if TEXT_FIELD not in dataset.column_names:
            raise ValueError(f"`dataset` has columns {dataset.column_names}; a {TEXT_FIELD!r} column is required")
        documents = dataset[TEXT_FIELD]
    if not documents or not all(isinstance(text, str) for text in documents):
        raise ValueError("`dataset` must hold at least one document, and only strings")
    return documents


def check_source(dataset: Any) -> None:
    """Fail early, naming ``dataset``, on a source that cannot load: a wrong type or a missing local
    file (Hub names are only checked when loaded)."""
    if isinstance(dataset, (str, Path)):
        _local_file(str(dataset))
    elif not isinstance(dataset, (list, tuple)):
        load_documents(dataset)  # a datasets.Dataset (cheap to read) or a type error


def calibration_ids(
    dataset: Any, tokenizer, n_samples: int = 128, seq_len: int = 2048, seed: int = 0
) -> torch.LongTensor:
    """``n_samples`` segments of ``seq_len`` tokens, LongTensor [n_samples, seq_len].

    The SparseGPT/Wanda protocol: with ``random.Random(seed)``, draw a random document
    (``randint(0, n_docs - 1)``), tokenize it with the tokenizer's defaults, then draw a random
    window start (``randint(0, n_tokens - seq_len - 1)``). Where SparseGPT redraws a document that
    has ``seq_len`` tokens or fewer, the following documents (in order, wrapping around) are
    appended to it, each after the tokenizer's EOS token when it has one, until the stream is
    longer than ``seq_len``; with long enough documents both draw the same segments.
    """
    documents = load_documents(dataset)
    separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    encoded: dict[int, list[int]] = {}

    def encode(index: int) -> list[int]:
        if index not in encoded:
            encoded[index] = tokenizer(documents[index], verbose=False).input_ids
        return encoded[index]

    rng = random.Random(seed)
    rows = []
    for _ in range(n_samples):
        first = rng.randint(0, len(documents) - 1)
        stream, following = list(encode(first)), first
        while len(stream) <= seq_len:
            following = (following + 1) % len(documents)
            if following == first:
                raise ValueError(
                    f"`dataset` holds {len(stream)} tokens in all, fewer than `seq_len`={seq_len} + 1"
                )
            stream += separator + encode(following)
        start = rng.randint(0, len(stream) - seq_len - 1)
        rows.append(stream[start : start + seq_len])
    return torch.tensor(rows, dtype=torch.long)


class _InputHooks:
    """A context manager that, while open, passes the input of every call of each named Linear to
    ``_accumulate(name, x)`` (forward pre-hooks, removed on exit)."""

    def __init__(self, modules: dict[str, nn.Linear]):
        self.modules = modules
        self._handles = []

    def _accumulate(self, name: str, x: torch.Tensor):
        raise NotImplementedError

    def __enter__(self):
        def hook(name):
            return lambda module, args: self._accumulate(name, args[0].detach())

        self._handles = [module.register_forward_pre_hook(hook(name)) for name, module in self.modules.items()]
        return self

    def __exit__(self, *exc_info):
        for handle in self._handles:
            handle.remove()
        self._handles = []


class HessianAccumulator(_InputHooks):
    """Streams H = X^T X (float32, [in, in]) of the inputs X of Linear layers, and counts tokens.

    A context manager: while open, a forward pre-hook on every layer adds x^T x of each call's
    input, flattened to [tokens, in_features]; X itself is never kept. Layers called on the same
    input tensor (q/k/v, gate/up) share one product. H starts at zero on the layer's device, so
    channels (or layers) that never fire leave zeros (the algorithms handle them).

    Args:
        modules: name -> ``nn.Linear``.
    """

    def __init__(self, modules: dict[str, nn.Linear]):
        super().__init__(modules)
        self.hessians = {
            name: torch.zeros(module.in_features, module.in_features, device=module.weight.device)
            for name, module in modules.items()
        }
        self.tokens = dict.fromkeys(modules, 0)
        self._last_input = self._last_version = self._last_product = None

    def _accumulate(self, name: str, x: torch.Tensor):
        if x is not self._last_input or x._version != self._last_version:  # new, or changed in place
            flat = x.reshape(-1, x.shape[-1]).float()
            self._last_input, self._last_version, self._last_product = x, x._version, flat.T @ flat
        self.hessians[name] += self._last_product
        self.tokens[name] += x.numel() // x.shape[-1]

    def __exit__(self, *exc_info):
        super().__exit__(*exc_info)
        self._last_input = self._last_version = self._last_product = None


class InputNorms(_InputHooks):
    """Streams sum_t x_tj^2 of the inputs of Linear layers (float64); :attr:`norms` are
    ||X_j||_2 = sqrt(diag X^T X) per input channel (the statistics of Wanda's and OWL's metric)."""

    def __init__(self, modules: dict[str, nn.Linear]):
        super().__init__(modules)
        self.sums = {name: torch.zeros(m.in_features, dtype=torch.float64, device=m.weight.device) for name, m in modules.items()}

    def _accumulate(self, name: str, x: torch.Tensor):
        self.sums[name] += x.double().pow(2).flatten(0, -2).sum(0)

    @property
    def norms(self) -> dict[str, torch.Tensor]:
        return {name: total.sqrt().float().cpu() for name, total in self.sums.items()}
