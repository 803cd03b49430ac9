"""Perplexity with the protocol of the pruning papers (GPTQ/SparseGPT/Wanda/OATS).

The whole evaluation text is tokenized once and cut into windows of ``seq_len`` tokens, starting
every ``stride`` tokens; only full windows are scored, so a short tail is dropped, as in the
papers. With ``stride == seq_len`` (the default) the windows do not overlap and every token but
the first of each window is predicted. With ``stride < seq_len`` this is the Hugging Face
sliding-window protocol (https://huggingface.co/docs/transformers/perplexity): the first window
scores all its tokens, each later window only the ``stride`` tokens it adds, with the previous
``seq_len - stride`` tokens as context. Perplexity is exp of the mean NLL over all scored tokens.

Models that expect a BOS token (their tokenizer adds one, e.g. the Gemma family; see
:func:`hf_slr.texts.bos_prefix`): the text is tokenized without special tokens and every window
gets BOS prepended, so the model runs on ``seq_len + 1`` positions. The BOS position itself is not
scored (nor its prediction of the window's first token): the windows, the scored tokens and their
count are those of the protocol above, each window conditioned on BOS as at the start of a document.
This extends lm-eval's ``loglikelihood_rolling``, which puts the BOS prefix before its first
window, to the papers' windows, each of which starts without context. Tokenizers that add no BOS
(GPT-2 style, SmolLM2) are unaffected.

Datasets:

- ``"wikitext2"``: WikiText-2 raw test rows joined with ``"\\n\\n"`` (the GPTQ text);
- ``"c4"``: the SparseGPT/Wanda C4 protocol (first 1100 validation documents joined with ``" "``,
  first 256 windows) applied to the offline 2000-document validation sample, whose shard and
  order are unknown: the numbers are comparable between models, not to the papers' C4 column;
- a local ``.txt`` file (used as is) or ``.json``/``.jsonl`` file (``text`` fields joined with
  ``"\\n\\n"``);
- a Hub dataset id ``"owner/name"`` or ``"owner/name:config"`` (``text`` column of ``split``,
  joined with ``"\\n\\n"``), loaded with :func:`datasets.load_dataset`.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..texts import bos_prefix, load_documents

__all__ = ["DATASETS", "load_text", "perplexity"]

C4_DOCS = 1100
C4_WINDOWS = 256

DATASETS = ("wikitext2", "c4")
"""Names of the built-in offline datasets."""


def load_text(dataset: str, split: str = "test") -> str:
    """The evaluation text of ``dataset`` (see the module docstring); ``split`` applies to Hub datasets."""
    if dataset == "c4":
        return " ".join(load_documents("c4", "validation")[:C4_DOCS])
    return "\n\n".join(load_documents(dataset, split))


def _window_starts(n_tokens: int, seq_len: int, stride: int, max_windows: int | None) -> list[int]:
    starts = list(range(0, n_tokens - seq_len + 1, stride))
    if not starts:
        raise ValueError(f"The text has {n_tokens} tokens, fewer than seq_len={seq_len}")
    return starts if max_windows is None else starts[:max_windows]


@torch.inference_mode()
def perplexity(
    model,
    tokenizer,
    dataset: str = "wikitext2",
    seq_len: int = 2048,
    stride: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    split: str = "test",
) -> dict:
    """Perplexity of a causal LM on ``dataset`` (protocols in the module docstring).

    Runs the in-memory ``model`` on its own device and in its own dtype (log-probabilities are
    taken in float32). ``stride`` defaults to ``seq_len`` (non-overlapping windows);
    ``max_windows`` keeps the first windows only (default: all, 256 for ``"c4"``); ``split`` is
    the split of a Hub dataset.

    Returns a dict with ``ppl``, ``nll`` (mean NLL per scored token, nats), ``n_tokens`` (scored
    tokens), ``n_windows``, ``seq_len``, ``stride``, ``dataset``, ``bos`` (whether every window
    started with BOS) and ``seconds``.
    """
    stride = seq_len if stride is None else stride
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    if max_windows is None and dataset == "c4":
        max_windows = C4_WINDOWS
    start_time = time.perf_counter()

    prefix = torch.tensor(bos_prefix(tokenizer), dtype=torch.long)
    text = load_text(dataset, split)
    if prefix.numel():
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt", verbose=False).input_ids[0]
    else:
        ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    starts = _window_starts(ids.numel(), seq_len, stride, max_windows)
    device = model.get_input_embeddings().weight.device

    nll_sum, n_scored = 0.0, 0
    batches = range(0, len(starts), batch_size)
    for first in tqdm(batches, desc=f"perplexity {dataset}", disable=not progress):
        batch_starts = starts[first : first + batch_size]
        inputs = torch.stack([torch.cat([prefix, ids[s : s + seq_len]]) for s in batch_starts]).to(device)
        logits = model(input_ids=inputs, use_cache=False).logits
        for row, start in enumerate(batch_starts):
            # The first window scores every prediction, later ones only the (up to) `stride` new tokens;
            # none scores the BOS prefix's prediction.
            skip = prefix.numel() + (0 if start == 0 else max(seq_len - stride - 1, 0))
            targets = inputs[row, skip + 1 :]
            nll_sum += F.cross_entropy(logits[row, skip:-1].float(), targets, reduction="sum").item()
            n_scored += targets.numel()

    nll = nll_sum / n_scored
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "n_tokens": n_scored,
        "n_windows": len(starts),
        "seq_len": seq_len,
        "stride": stride,
        "dataset": dataset,
        "bos": bool(prefix.numel()),
        "seconds": time.perf_counter() - start_time,
    }
