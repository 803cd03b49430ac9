import os

import pytest
import torch

from tiny_models import tiny_config

torch.set_num_threads(int(os.environ.get("HF_SLR_TEST_THREADS", "1")))


@pytest.fixture
def tiny_dense_dir(tmp_path):
    """Save a tiny random model of ``family`` and return its folder."""
    from transformers import AutoModelForCausalLM

    def make(family: str = "llama", dtype=torch.float32):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=dtype)
        folder = tmp_path / f"dense-{family}"
        model.save_pretrained(folder)
        return str(folder)

    return make
