"""Small shared helpers: where the offline data lives."""

from __future__ import annotations

import os
from pathlib import Path

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
