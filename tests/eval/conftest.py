"""Tiny random Llamas and byte-level BPE tokenizers built in memory (no downloads): ``tokenizer``
adds no BOS token (GPT-2 / SmolLM2 style), ``bos_tokenizer`` puts one before every text (Gemma style)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from tiny_models import tiny_config

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: How do I boil an egg?\nAnswer: Put it in boiling water for eight minutes.",
    "Sparse plus low-rank compression keeps the model small and the answers right.",
] * 20


@pytest.fixture(scope="session")
def tokenizer():
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def bos_tokenizer(tokenizer):
    """``tokenizer`` plus a ``<bos>`` token that its post-processor puts before every text."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.add_special_tokens(["<bos>"])
    bos = backend.token_to_id("<bos>")
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<bos>")


def _tiny_llama(tokenizer):
    torch.manual_seed(0)
    config = tiny_config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    return _tiny_llama(tokenizer)


@pytest.fixture(scope="session")
def bos_model(bos_tokenizer):
    """A tiny random Llama with ``bos_tokenizer``'s vocabulary."""
    return _tiny_llama(bos_tokenizer)
