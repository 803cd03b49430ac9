"""hf_slr: sparse plus low-rank (W = S + U V) compression of LLMs, native to the Hugging Face stack.

``import hf_slr`` registers ``quant_method: "slr"`` with transformers, so that
``AutoModelForCausalLM.from_pretrained(dense, quantization_config=SLRConfig(...))`` compresses on
load and ``from_pretrained(compressed_dir)`` reloads a compressed checkpoint.
"""

from transformers.quantizers import auto as _auto

from .config import QUANT_METHOD, SLRConfig
from .entrypoints import compress
from .inference import runtime_forms, set_runtime
from .modules import SLRLinear
from .quantizer import SLRHfQuantizer
from .serialization import push_to_hub, save_pretrained
from .streaming import compress_checkpoint

__version__ = "0.1.0"
__all__ = [
    "SLRConfig", "SLRHfQuantizer", "SLRLinear", "compress", "push_to_hub", "runtime_forms", "save_pretrained", "set_runtime",
]


def _register():
    """Register the config and the quantizer once (a re-import or reload must not raise)."""
    if QUANT_METHOD not in _auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        _auto.register_quantization_config(QUANT_METHOD)(SLRConfig)
    if QUANT_METHOD not in _auto.AUTO_QUANTIZER_MAPPING:
        _auto.register_quantizer(QUANT_METHOD)(SLRHfQuantizer)


_register()
