"""Compressing a model already in memory (the in-memory twin of
``from_pretrained(..., quantization_config=SLRConfig(...))``)."""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from .compression import driver
from .compression.plan import plan_compression
from .config import SLRConfig
from .quantizer import SLRHfQuantizer


def compress(model: nn.Module, config: SLRConfig, tokenizer=None) -> nn.Module:
    """Compress ``model`` in place with the request ``config`` (left unchanged) and return it.

    ``tokenizer`` (for calibration) defaults to the config's tokenizer, else the model's own
    (``AutoTokenizer.from_pretrained(model.config._name_or_path)``); data-free methods without
    transformer matching or allocation use no data and no tokenizer. The model gets
    ``model.slr_report`` (see :func:`hf_slr.compression.driver.run`) and, for a transformers model,
    an attached quantizer whose own copy of the config (with ``base_model``) is what
    ``save_pretrained`` writes, as after a compressing ``from_pretrained``.
    """
    if isinstance(model, PreTrainedModel) and getattr(model, "hf_quantizer", None) is None:
        quantizer = SLRHfQuantizer(config, pre_quantized=False)
        quantizer.plan = plan_compression(model, quantizer.quantization_config, tokenizer)
        model.hf_quantizer = quantizer
        quantizer.postprocess_model(model)  # runs the plan, as after the weights of from_pretrained load
    else:
        model.slr_report = driver.run(model, plan_compression(model, config, tokenizer))
    return model
