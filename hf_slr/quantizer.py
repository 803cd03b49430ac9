"""SLRHfQuantizer: compress a dense model on load, or rebuild a compressed one from its checkpoint."""

from __future__ import annotations

import copy
import re

import torch
from transformers.quantizers.base import HfQuantizer

from . import format as slr_format
from . import integration
from .compression import driver
from .compression.plan import plan_compression
from .config import SLRConfig, provenance_name


class SLRHfQuantizer(HfQuantizer):
    """``quant_method: "slr"``.

    - dense weights + ``SLRConfig(method=...)``: the checks run before the weights load, the
      compression after (:mod:`hf_slr.compression`);
    - a compressed checkpoint: the layer layouts are read from the checkpoint's tensors and
      records (:mod:`hf_slr.format`), the target Linears replaced by empty SLRLinears of those
      layouts before the tensors load by name, and the loaded values checked after.

    The quantizer works on its own copy of the config: the caller's request is never modified.
    """

    requires_calibration = False

    def __init__(self, quantization_config: SLRConfig, **kwargs):
        super().__init__(copy.deepcopy(quantization_config), **kwargs)
        self.plan = None

    def _process_model_before_weight_loading(self, model, dtype=None, checkpoint_files=None, **kwargs):
        if self.pre_quantized:
            if not checkpoint_files:
                raise ValueError("An SLR checkpoint loads from its safetensors files (no checkpoint files were given)")
            index = slr_format.CheckpointIndex(checkpoint_files)
            layouts = slr_format.read_layouts(index, integration.linear_shapes(model), self.quantization_config.nm_pattern)
            storage = self.quantization_config.storage_dtype
            integration.build_skeleton(model, layouts, dtype=getattr(torch, storage) if storage else None)
            records = {re.escape(f"{name}.{slr_format.RECORD_KEY}") + "$" for name in layouts}
            model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | records
        else:
            self.plan = plan_compression(model, self.quantization_config)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            integration.check_loaded(model)
        else:
            model.slr_report = driver.run(model, self.plan)
            self.plan = None
            self.quantization_config.base_model = self.quantization_config.base_model or provenance_name(
                getattr(model.config, "_name_or_path", None)
            )
        return model

    def get_state_dict_and_metadata(self, model):
        # The format version is in every module record; no metadata key (whose order safetensors does not
        # fix), so that equal models give byte-identical files.
        return integration.checkpoint_state_dict(model), {}

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        return integration.dequantize(model, dtype=dtype)
