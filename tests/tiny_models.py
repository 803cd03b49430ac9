"""Tiny random-weight configs of the supported decoder families, for the unit tests."""

from __future__ import annotations


def tiny_config(family: str = "llama", **overrides):
    """A tiny random-weight config of ``family`` ("llama", "qwen2", "mistral", "opt"); ``overrides``
    replace any of its fields (``intermediate_size`` is OPT's ``ffn_dim``)."""
    from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    fields = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    fields |= dict(max_position_embeddings=128) | overrides
    if family == "opt":
        fields["ffn_dim"] = fields.pop("intermediate_size")
        fields.setdefault("word_embed_proj_dim", fields["hidden_size"])
        return OPTConfig(**fields)
    families = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
    if family not in families:
        raise ValueError(f"family must be one of {[*families, 'opt']}, got {family!r}")
    return families[family](**({"num_key_value_heads": 2} | fields))
