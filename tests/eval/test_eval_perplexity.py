from __future__ import annotations

import json
import math

import pytest
import torch

from hf_slr.eval import perplexity
from hf_slr.eval.perplexity import C4_DOCS, load_text
from hf_slr.texts import data_file

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
