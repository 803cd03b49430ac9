import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("HF_SLR_TEST_THREADS", "1")))


def tiny_config(family: str):
    """A tiny random-weight config of one of the supported decoder families."""
    from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
    if family == "llama":
        return LlamaConfig(intermediate_size=128, num_key_value_heads=2, **common)
    if family == "qwen2":
        return Qwen2Config(intermediate_size=128, num_key_value_heads=2, **common)
    if family == "mistral":
        return MistralConfig(intermediate_size=128, num_key_value_heads=2, **common)
    if family == "opt":
        return OPTConfig(
            vocab_size=128,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=128,
            word_embed_proj_dim=64,
            max_position_embeddings=128,
        )
    raise ValueError(family)


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
