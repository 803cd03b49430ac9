"""Every text hf_slr reads, from one loader: calibration documents and evaluation texts.

Sources (:func:`load_documents`): the offline copies under :func:`data_dir` (``"c4"``: the C4
train sample, or the validation sample with ``split="validation"``; ``"wikitext2"``: the WikiText-2
test text, one document); a local ``.jsonl`` / ``.json`` file (rows with a ``text`` field) or
``.txt`` file (one document); a list of strings; a :class:`datasets.Dataset` (its ``text``
column); a Hub dataset id ``"owner/name"`` or ``"owner/name:config"`` (``text`` column of
``split``, loaded with :func:`datasets.load_dataset`).

:func:`bos_prefix` is the one rule for models that expect a BOS token (the Gemma family): the
calibration segments and the perplexity windows each start with it (see their modules).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import datasets

__all__ = ["C4_TRAIN_FILE", "C4_VALIDATION_FILE", "WIKITEXT2_FILE", "bos_prefix", "check_source", "data_dir", "data_file", "load_documents"]

DATA_ENV = "HF_SLR_DATA"


def data_dir() -> Path:
    """The offline data folder: ``$HF_SLR_DATA``, else ``../shared/data`` beside the project root."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def data_file(relative: str) -> Path:
    """A file under :func:`data_dir`, with an error that says how to point at another copy."""
    path = data_dir() / relative
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found. Set {DATA_ENV} to the folder that holds the offline data "
            f"(see ../shared/data/README.md), or pass a path / Hub dataset name explicitly."
        )
    return path


C4_TRAIN_FILE = "c4/c4-train.00000-of-01024.first1000.jsonl"
"""The offline C4 train sample (``"c4"``, split "train"; 1000 documents)."""
C4_VALIDATION_FILE = "c4/c4_validation_2k.jsonl"
"""The offline C4 validation sample (``"c4"``, split "validation"; 2000 documents)."""
WIKITEXT2_FILE = "wikitext-2-raw/wikitext-2-raw-v1.test.gptq_joined.txt"
"""The WikiText-2 raw test rows joined with ``"\\n\\n"`` (the GPTQ text; ``"wikitext2"``)."""
BUILTIN = {("c4", "train"): C4_TRAIN_FILE, ("c4", "validation"): C4_VALIDATION_FILE, ("wikitext2", "test"): WIKITEXT2_FILE}

LOCAL_SUFFIXES = (".jsonl", ".json", ".txt")
TEXT_FIELD = "text"


def _texts(rows: Any, source: str) -> list[str]:
    if not isinstance(rows, list) or not all(isinstance(row, dict) and TEXT_FIELD in row for row in rows):
        raise ValueError(f"`dataset`={source!r}: every row must be an object with a {TEXT_FIELD!r} field")
    return [row[TEXT_FIELD] for row in rows]


def _builtin_names() -> list[str]:
    return sorted({name for name, _ in BUILTIN})


def _local_file(name: str, split: str) -> Path | None:
    """The file a local source names (a built-in name or a path ending in :data:`LOCAL_SUFFIXES`),
    which must exist; None for a Hub id."""
    if name in _builtin_names():
        if (name, split) not in BUILTIN:
            splits = sorted(s for n, s in BUILTIN if n == name)
            raise ValueError(f"`dataset`={name!r} has the offline split(s) {splits}, not {split!r}")
        return data_file(BUILTIN[name, split])
    path = Path(name)
    if path.suffix not in LOCAL_SUFFIXES:
        return None
    if not path.is_file():
        raise FileNotFoundError(f"`dataset`={name!r}: no such file ({path})")
    return path


def _read_local(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return [text]
    if path.suffix == ".jsonl":
        return _texts([json.loads(line) for line in text.splitlines() if line.strip()], str(path))
    return _texts(json.loads(text), str(path))


def load_documents(dataset: Any, split: str = "train") -> list[str]:
    """The documents of ``dataset`` (see the module docstring); ``split`` selects the offline C4
    sample and the split of a Hub dataset."""
    if isinstance(dataset, (list, tuple)):
        documents = list(dataset)
    elif isinstance(dataset, (str, Path)):
        name = str(dataset)
        path = _local_file(name, split)
        if path is not None:
            documents = _read_local(path)
        elif "/" in name:
            repo, _, config = name.partition(":")
            documents = datasets.load_dataset(repo, config or None, split=split)[TEXT_FIELD]
        else:
            raise ValueError(
                f"Unknown `dataset`={name!r}; allowed values: {_builtin_names()}, a local "
                f"{'/'.join(LOCAL_SUFFIXES)} file, a list of strings, a datasets.Dataset or a Hub id 'owner/name[:config]'"
            )
    elif isinstance(dataset, datasets.Dataset):
        if TEXT_FIELD not in dataset.column_names:
            raise ValueError(f"`dataset` has columns {dataset.column_names}; a {TEXT_FIELD!r} column is required")
        documents = dataset[TEXT_FIELD]
    else:
        raise ValueError(
            f"`dataset` must be one of {_builtin_names()}, a .jsonl/.json/.txt path, a list of strings, a datasets.Dataset "
            f"or a Hub dataset id, got {type(dataset).__name__}"
        )
    if not documents or not all(isinstance(text, str) for text in documents):
        raise ValueError("`dataset` must hold at least one document, and only strings")
    return documents


def check_source(dataset: Any, split: str = "train") -> None:
    """Fail early, naming ``dataset``, on a source that cannot load: a wrong type, an unknown name or
    a missing local file (Hub ids are only checked when loaded)."""
    if isinstance(dataset, (str, Path)):
        name = str(dataset)
        if _local_file(name, split) is None and "/" not in name:
            load_documents(name, split)  # raises: an unknown name
    elif not isinstance(dataset, (list, tuple)):
        load_documents(dataset, split)  # a datasets.Dataset (cheap to read) or a type error


def bos_prefix(tokenizer) -> list[int]:
    """``[bos_token_id]`` when ``tokenizer`` puts a BOS token before every text it encodes with its
    defaults (Gemma, Llama-2: ``tokenizer("x").input_ids[0] == tokenizer.bos_token_id``), else
    ``[]`` (GPT-2-style tokenizers such as SmolLM2's, which define a BOS token but add none).

    Callers that cut a token stream into windows encode the text without special tokens and
    prepend this prefix to every window, so that each one starts as the model saw its inputs in
    training, not only the first (the prefix token of lm-eval's ``loglikelihood_rolling``).
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("x", verbose=False).input_ids
    return [bos] if len(ids) > 0 and ids[0] == bos else []
