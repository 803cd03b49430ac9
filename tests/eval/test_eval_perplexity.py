from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from hf_slr.eval import perplexity
from hf_slr.eval.perplexity import C4_DOCS, load_text
from hf_slr.texts import bos_prefix, data_file

TEXT = "Sparse plus low-rank compression of the quick brown fox, one window at a time.\n\n" * 12


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


@torch.no_grad()
def reference_nll(model, ids, seq_len, stride):
    """Sum and count of -log p over the tokens each full window adds (HF sliding-window loop)."""
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids) - seq_len + 1, stride):
        end = begin + seq_len
        log_probs = torch.log_softmax(model(torch.tensor([ids[begin:end]])).logits[0].float(), -1)
        for pos in range(max(prev_end, begin + 1), end):
            total -= log_probs[pos - begin - 1, ids[pos]].item()
            count += 1
        prev_end = end
    return total, count


@pytest.mark.parametrize("stride, batch_size", [(None, 3), (16, 1), (15, 4), (6, 2)])
def test_matches_hand_computation(tiny_model, tokenizer, text_file, stride, batch_size):
    ids = tokenizer(TEXT).input_ids
    seq_len = 16
    total, count = reference_nll(tiny_model, ids, seq_len, stride or seq_len)
    out = perplexity(
        tiny_model, tokenizer, text_file, seq_len=seq_len, stride=stride, batch_size=batch_size, progress=False
    )
    n_windows = len(range(0, len(ids) - seq_len + 1, stride or seq_len))
    assert (out["n_windows"], out["n_tokens"]) == (n_windows, count)
    assert out["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_non_overlapping_scores_all_but_first_token_of_each_window(tiny_model, tokenizer, text_file):
    out = perplexity(tiny_model, tokenizer, text_file, seq_len=16, max_windows=3, progress=False)
    assert (out["n_windows"], out["n_tokens"], out["stride"]) == (3, 3 * 15, 16)


def test_wikitext2_windows(tiny_model, tokenizer):
    out = perplexity(tiny_model, tokenizer, "wikitext2", seq_len=32, max_windows=2, progress=False)
    assert out["n_windows"] == 2 and out["dataset"] == "wikitext2"
    assert math.isfinite(out["ppl"])


def test_c4_text_joins_first_1100_documents():
    text = load_text("c4")
    with data_file("c4/c4_validation_2k.jsonl").open(encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    assert C4_DOCS == 1100
    assert text == " ".join(docs[:C4_DOCS])


def test_local_jsonl(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    assert load_text(str(path)) == "a\n\nb"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dataset": "wikitext"}, "Unknown `dataset`='wikitext'; allowed values: \\['c4', 'wikitext2'\\]"),
        ({"dataset": "missing.txt"}, "no such file"),
        ({"stride": 17}, "stride must be in"),
        ({"seq_len": 100_000}, "fewer than seq_len=100000"),
    ],
)
def test_errors(tiny_model, tokenizer, text_file, kwargs, message):
    kwargs = {"dataset": text_file, "seq_len": 16, **kwargs}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        perplexity(tiny_model, tokenizer, progress=False, **kwargs)


# --- models that expect BOS (issue 16 item 6) ----------------------------------------------------


class RecordingModel(torch.nn.Module):
    """``model`` that keeps every ``input_ids`` batch it is called on."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, []

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, input_ids, **kwargs):
        self.inputs.append(input_ids.clone())
        return self.model(input_ids=input_ids, **kwargs)


@torch.no_grad()
def reference_bos_nll(model, ids, bos, seq_len, stride):
    """Brute force: every window is [BOS] + seq_len text tokens; the text tokens scored are those of
    :func:`reference_nll` (each window's new ones), never the BOS position's prediction."""
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids) - seq_len + 1, stride):
        end = begin + seq_len
        log_probs = torch.log_softmax(model(torch.tensor([[bos] + ids[begin:end]])).logits[0].float(), -1)
        for pos in range(max(prev_end, begin + 1), end):
            total -= log_probs[pos - begin, ids[pos]].item()  # logits row pos - begin predicts ids[pos]
            count += 1
        prev_end = end
    return total, count


@pytest.mark.parametrize("stride, batch_size", [(None, 3), (6, 2)])
def test_every_window_starts_with_bos_when_the_tokenizer_adds_one(
    bos_model, bos_tokenizer, tokenizer, text_file, stride, batch_size
):
    bos = bos_tokenizer.bos_token_id
    ids = bos_tokenizer(TEXT, add_special_tokens=False).input_ids
    assert bos_tokenizer(TEXT).input_ids == [bos] + ids and ids == tokenizer(TEXT).input_ids
    seq_len = 16
    model = RecordingModel(bos_model)
    out = perplexity(model, bos_tokenizer, text_file, seq_len=seq_len, stride=stride, batch_size=batch_size, progress=False)
    rows = torch.cat(model.inputs)
    n_windows = len(range(0, len(ids) - seq_len + 1, stride or seq_len))
    assert out["bos"] is True and rows.shape == (n_windows, seq_len + 1)
    assert (rows[:, 0] == bos).all() and not (rows[:, 1:] == bos).any()  # BOS first, and only there
    total, count = reference_bos_nll(bos_model, ids, bos, seq_len, stride or seq_len)
    _, count_without_bos = reference_nll(bos_model, ids, seq_len, stride or seq_len)
    assert (out["n_windows"], out["n_tokens"]) == (n_windows, count) and count == count_without_bos
    assert out["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_a_tokenizer_that_names_bos_but_adds_none_is_unchanged(tiny_model, tokenizer, text_file):
    """SmolLM2 style: a BOS token is defined but not added: the windows are the raw token ids."""
    named = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    assert named.bos_token_id is not None and bos_prefix(named) == [] and bos_prefix(tokenizer) == []
    ids = named(TEXT).input_ids
    model = RecordingModel(tiny_model)
    out = perplexity(model, named, text_file, seq_len=16, batch_size=2, progress=False)
    expected = [ids[s : s + 16] for s in range(0, len(ids) - 16 + 1, 16)]
    assert torch.cat(model.inputs).tolist() == expected and out["bos"] is False
    total, count = reference_nll(tiny_model, ids, 16, 16)
    assert out["n_tokens"] == count and out["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
