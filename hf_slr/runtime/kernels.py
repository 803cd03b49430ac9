"""The CPU extension of the runtime (``csrc/masked_rows.cpp``): built once per machine with
torch's JIT (``torch.utils.cpp_extension.load``, ninja), cached, loaded on first use.

The build uses ``-O3`` and no ``-march`` flag, so the cached library is portable: its AVX-512 and
AVX2 variants are chosen at run time from the CPU's flags (``isa_level()``). The cache is
``$HF_SLR_CACHE/torch_extensions`` when ``HF_SLR_CACHE`` is set, torch's extension folder
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) otherwise; torch rebuilds when the
source or the flags change. When the build fails (no compiler, no ninja), :func:`extension`
returns None after one warning, and the runtime uses its pure-torch forms.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "masked_rows.cpp"
CACHE_ENV = "HF_SLR_CACHE"
ISA_NAMES = {0: "portable C++", 1: "AVX2", 2: "AVX-512"}

_lock = threading.Lock()
_state: dict[str, object] = {}


def _build_directory() -> str | None:
    cache = os.environ.get(CACHE_ENV)
    if not cache:
        return None
    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info.major}{sys.version_info.minor}"
    folder = Path(cache) / "torch_extensions" / tag
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


def _ninja_on_path() -> None:
    """torch looks for the ``ninja`` executable on PATH; the pip package's copy may sit beside
    the interpreter of a venv that is not activated."""
    if shutil.which("ninja"):
        return
    candidates = [Path(sys.executable).parent]
    try:
        import ninja

        candidates.insert(0, Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    for folder in candidates:
        if (folder / "ninja").exists():
            os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
            return


def _build():
    from torch.utils import cpp_extension

    source = SOURCE.read_bytes()
    name = "hf_slr_masked_rows_" + hashlib.sha1(source).hexdigest()[:12]
    _ninja_on_path()
    return cpp_extension.load(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=["-O3"],
        build_directory=_build_directory(),
        verbose=False,
    )


def extension():
    """The compiled module (``masked_rows_linear``, ``masked_rows_prefill``, ``masked_rows_support``,
    ``best_isa_level``), or None when it cannot be built here (warned once)."""
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" not in _state:
            try:
                _state["module"] = _build()
            except Exception as error:  # no compiler, no ninja, a failing build: fall back, once
                _state["module"] = None
                warnings.warn(
                    f"hf_slr: the CPU sparse kernels could not be built ({type(error).__name__}: "
                    f"{str(error).strip().splitlines()[-1] if str(error).strip() else error}); "
                    "SLRLinear runs its pure-torch runtime form instead (slower decoding).",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _state["module"]


def isa_level() -> int:
    """The best instruction set the kernels use on this CPU: 0 portable C++, 1 AVX2, 2 AVX-512
    (-1 when the extension is not available)."""
    module = extension()
    return -1 if module is None else int(module.best_isa_level())
