"""SLRHfQuantizer: compress a dense model on load, or rebuild a compressed one from its checkpoint."""

from __future__ import annotations

import re

from transformers.quantizers.base import HfQuantizer

from . import pipeline
from .config import SLRConfig
from .modules import FORMAT_VERSION, MARKER_KEY


class SLRHfQuantizer(HfQuantizer):
    """``quant_method: "slr"``.

    - dense weights + ``SLRConfig(method=...)``: the weights load as usual, then
      ``_process_model_after_weight_loading`` runs the compression pipeline;
    - a compressed checkpoint (its config lists ``compressed_modules``): the target Linears are
      replaced by empty SLRLinears of the recorded shapes before the tensors load by name.
    """

    requires_calibration = False

    def __init__(self, quantization_config: SLRConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        if self.pre_quantized and not quantization_config.is_compressed:
            raise ValueError(
                "This checkpoint's `quantization_config` has quant_method 'slr' but no `compressed_modules`: "
                "it was not written by hf_slr after compression, so its layer shapes are unknown."
            )

    def _process_model_before_weight_loading(self, model, dtype=None, **kwargs):
        if self.pre_quantized:
            pipeline.build_skeleton(model, self.quantization_config)
            # The per-module marker that makes plain transformers refuse the checkpoint (see modules.py).
            markers = {re.escape(f"{name}.{MARKER_KEY}") + "$" for name in self.quantization_config.compressed_modules}
            model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | markers
        else:
            # Resolved once here (a name is loaded) and reused by the compression after loading.
            self.calibration_tokenizer = pipeline.check_inputs(model, self.quantization_config, self.quantization_config.tokenizer_object)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            pipeline.compress(model, self.quantization_config, tokenizer=self.calibration_tokenizer)
        return model

    def get_state_dict_and_metadata(self, model):
        return pipeline.state_dict_with_markers(model), {"slr_format_version": str(FORMAT_VERSION)}

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        return pipeline.dequantize(model, dtype=dtype)
