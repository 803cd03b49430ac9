"""Calibration data and activation statistics for the layer-wise objectives.

:func:`calibration_ids` draws the token segments of the SparseGPT/Wanda protocol (004 §5.1: 128
segments of 2048 tokens from the first C4 training shard); :class:`HessianAccumulator` streams
H = X^T X over the inputs of Linear layers while the compression driver runs a block forward (the Hessian of
the layer-wise objective, 002 eq. 1, 004 §3) and :class:`InputNorms` the per-channel input norms
||X_j|| (OWL's outlier statistics).
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

from .integration import projection_shape
from .texts import bos_prefix, load_documents

__all__ = ["HessianAccumulator", "InputNorms", "calibration_ids"]

def calibration_ids(
    dataset: Any, tokenizer, n_samples: int = 128, seq_len: int = 2048, seed: int = 0
) -> torch.LongTensor:
    """``n_samples`` segments of ``seq_len`` tokens, LongTensor [n_samples, seq_len].

    The SparseGPT/Wanda protocol: with ``random.Random(seed)``, draw a random document
    (``randint(0, n_docs - 1)``), tokenize it with the tokenizer's defaults, then draw a random
    window start (``randint(0, n_tokens - seq_len - 1)``). Where SparseGPT redraws a document that
    has ``seq_len`` tokens or fewer, the following documents (in order, wrapping around) are
    appended to it, each after the tokenizer's EOS token when it has one, until the stream is
    longer than ``seq_len``; with long enough documents both draw the same segments.

    For a tokenizer that adds a BOS token (:func:`hf_slr.texts.bos_prefix`; the Gemma family) the
    documents are encoded without special tokens and every segment is BOS followed by
    ``seq_len - 1`` drawn tokens (the same draws with ``seq_len - 1`` in place of ``seq_len``), the
    input such models see at the start of every document; other tokenizers are unaffected.
    """
    for name, value in (("n_samples", n_samples), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
    documents = load_documents(dataset)
    separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    prefix = bos_prefix(tokenizer)
    drawn = seq_len - len(prefix)
    encoded: dict[int, list[int]] = {}

    def encode(index: int) -> list[int]:
        if index not in encoded:
            if prefix:
                encoded[index] = tokenizer(documents[index], add_special_tokens=False, verbose=False).input_ids
            else:
                encoded[index] = tokenizer(documents[index], verbose=False).input_ids
        return encoded[index]

    rng = random.Random(seed)
    rows = []
    for _ in range(n_samples):
        first = rng.randint(0, len(documents) - 1)
        stream, following = list(encode(first)), first
        while len(stream) <= drawn:
            following = (following + 1) % len(documents)
            if following == first:
                raise ValueError(
                    f"`dataset` holds {len(stream)} tokens in all, fewer than `seq_len`={seq_len} + 1"
                    + (" - 1 (the BOS token each segment starts with)" if prefix else "")
                )
            stream += separator + encode(following)
        start = rng.randint(0, len(stream) - drawn - 1)
        rows.append(prefix + stream[start : start + drawn])
    return torch.tensor(rows, dtype=torch.long)


class _InputHooks:
    """A context manager that, while open, passes the input of every call of each named Linear to
    ``_accumulate(name, x)`` (forward pre-hooks, removed on exit)."""

    def __init__(self, modules: dict[str, nn.Linear]):
        self.modules = modules
        self._handles = []

    def _accumulate(self, name: str, x: torch.Tensor):
        raise NotImplementedError

    def __enter__(self):
        def hook(name):
            return lambda module, args: self._accumulate(name, args[0].detach())

        self._handles = [module.register_forward_pre_hook(hook(name)) for name, module in self.modules.items()]
        return self

    def __exit__(self, *exc_info):
        for handle in self._handles:
            handle.remove()
        self._handles = []


class HessianAccumulator(_InputHooks):
    """Streams H = X^T X ([in, in]) of the inputs X of Linear layers, and counts tokens.

    The sums are kept in float64 (:attr:`sums`) so that they hardly depend on how the rows were
    batched or split across processes: one process and an all-reduce of per-rank sums give the
    same float32 :attr:`hessians` (the products of float32 activations are exact in float64 up
    to ~1e-16 relative).

    A context manager: while open, a forward pre-hook on every layer adds x^T x of each call's
    input, flattened to [tokens, in_features]; X itself is never kept. Layers called on the same
    input tensor (q/k/v, gate/up) share one product. H starts at zero on the layer's device, so
    channels (or layers) that never fire leave zeros (the algorithms handle them).

    Args:
        modules: name -> ``nn.Linear``.
    """

    def __init__(self, modules: dict[str, nn.Linear]):
        super().__init__(modules)
        self.sums = {
            name: torch.zeros(projection_shape(module)[1], projection_shape(module)[1], dtype=torch.float64, device=module.weight.device)
            for name, module in modules.items()
        }
        self.tokens = dict.fromkeys(modules, 0)
        self._last_input = self._last_version = self._last_product = None

    def _accumulate(self, name: str, x: torch.Tensor):
        if x is not self._last_input or x._version != self._last_version:  # new, or changed in place
            flat = x.reshape(-1, x.shape[-1]).double()
            self._last_input, self._last_version, self._last_product = x, x._version, flat.T @ flat
        self.sums[name] += self._last_product
        self.tokens[name] += x.numel() // x.shape[-1]

    def __exit__(self, *exc_info):
        super().__exit__(*exc_info)
        self._last_input = self._last_version = self._last_product = None

    @property
    def hessians(self) -> dict[str, torch.Tensor]:
        """H per layer, float32."""
        return {name: total.float() for name, total in self.sums.items()}


class InputNorms(_InputHooks):
    """Streams sum_t x_tj^2 of the inputs of Linear layers (float64); :attr:`norms` are
    ||X_j||_2 = sqrt(diag X^T X) per input channel (the statistics of Wanda's and OWL's metric)."""

    def __init__(self, modules: dict[str, nn.Linear]):
        super().__init__(modules)
        self.sums = {
            name: torch.zeros(projection_shape(m)[1], dtype=torch.float64, device=m.weight.device) for name, m in modules.items()
        }

    def _accumulate(self, name: str, x: torch.Tensor):
        self.sums[name] += x.double().pow(2).flatten(0, -2).sum(0)

    @property
    def norms(self) -> dict[str, torch.Tensor]:
        return {name: total.sqrt().float().cpu() for name, total in self.sums.items()}
