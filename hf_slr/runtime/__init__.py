"""How an SLRLinear executes at inference: its compact storage (the checkpoint format) is kept as it
is, and each layer prepares once, for its device and dtype, a runtime form that a forward reads
without unpacking bits (docs/runtime.md).

- :mod:`.storage`: the layer's tensors as the runtime reads them, and the supports derived once;
- :mod:`.forms`: the CPU / pure-torch forms; :mod:`.cuda`: the 2:4 semi-structured CUDA form;
- :mod:`.kernels`: the C++ extension (``csrc/masked_rows.cpp``), built once per machine;
- :mod:`.dispatch`: form selection and the per-layer cache.

This package knows nothing of how a layer was computed and nothing of models (``hf_slr.set_runtime``
walks a model through ``hf_slr.integration``).
"""

from .dispatch import FORMS, RUNTIME_ENV, LayerRuntime, resolve
from .storage import LayerStorage

__all__ = ["FORMS", "RUNTIME_ENV", "LayerRuntime", "LayerStorage", "resolve"]
