"""Calibration segments (SparseGPT/Wanda protocol) and the streamed H = X^T X accumulator."""

import json
import random
from types import SimpleNamespace

import datasets
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import PreTrainedTokenizerFast

from hf_slr.calibration import HessianAccumulator, InputNorms, calibration_ids
from hf_slr.texts import C4_TRAIN_FILE, bos_prefix, load_documents
from hf_slr.texts import data_dir

EOS = 0
BOS = 1
UNK = 2


class NumberTokenizer:
    """Each whitespace-separated integer is its own token id: windows can be checked by value."""

    eos_token_id = EOS

    def __call__(self, text, **kwargs):
        return SimpleNamespace(input_ids=[int(word) for word in text.split()])


def _document(first, length):
    return " ".join(str(first + i) for i in range(length))


def _sparsegpt_reference(documents, tokenizer, n_samples, seq_len, seed):
    """SparseGPT's get_c4 loop (random document, redrawn while too short; random window)."""
    random.seed(seed)
    rows = []
    for _ in range(n_samples):
        while True:
            ids = tokenizer(documents[random.randint(0, len(documents) - 1)]).input_ids
            if len(ids) > seq_len:
                break
        start = random.randint(0, len(ids) - seq_len - 1)
        rows.append(ids[start : start + seq_len])
    return torch.tensor(rows)


def test_shape_dtype_and_seed_determinism():
    documents = [_document(1000 * (d + 1), 50) for d in range(20)]
    ids = calibration_ids(documents, NumberTokenizer(), n_samples=6, seq_len=16, seed=3)
    assert ids.shape == (6, 16) and ids.dtype == torch.long
    assert torch.equal(ids, calibration_ids(documents, NumberTokenizer(), n_samples=6, seq_len=16, seed=3))
    assert not torch.equal(ids, calibration_ids(documents, NumberTokenizer(), n_samples=6, seq_len=16, seed=4))
    # every row is a window of consecutive tokens of one document
    assert torch.equal(ids.diff(dim=1), torch.ones(6, 15, dtype=torch.long))


def test_long_documents_match_sparsegpt_sampling():
    documents = [_document(1000 * (d + 1), 20 + 7 * d) for d in range(12)]
    ids = calibration_ids(documents, NumberTokenizer(), n_samples=10, seq_len=19, seed=0)
    assert torch.equal(ids, _sparsegpt_reference(documents, NumberTokenizer(), 10, 19, 0))


def test_short_documents_are_concatenated_with_eos():
    documents = [_document(100 * (d + 1), 5) for d in range(6)]  # 5 tokens each, seq_len 12
    ids = calibration_ids(documents, NumberTokenizer(), n_samples=8, seq_len=12, seed=1)
    assert ids.shape == (8, 12)
    stream = []
    for d in range(6):
        stream += [*range(100 * (d + 1), 100 * (d + 1) + 5), EOS]
    text = f" {' '.join(map(str, stream + stream))} "  # the documents in order, wrapping around
    for row in ids.tolist():
        assert f" {' '.join(map(str, row))} " in text
        assert EOS in row  # 12 tokens always cross a document boundary


class BosNumberTokenizer(NumberTokenizer):
    """A :class:`NumberTokenizer` that, like Gemma's, puts BOS before every text by default."""

    bos_token_id = BOS

    def __call__(self, text, add_special_tokens=True, **kwargs):
        ids = [int(word) if word.isdigit() else UNK for word in text.split()]
        return SimpleNamespace(input_ids=[BOS] * add_special_tokens + ids)


def test_every_segment_starts_with_bos_when_the_tokenizer_adds_one():
    """BOS, then seq_len - 1 tokens of the text: the draws of a BOS-free tokenizer at seq_len - 1."""
    short = [_document(100 * (d + 1), 5) for d in range(6)]  # concatenated with EOS
    long = [_document(1000 * (d + 1), 20 + 7 * d) for d in range(12)]
    for documents, seq_len in ((short, 12), (long, 19)):
        ids = calibration_ids(documents, BosNumberTokenizer(), n_samples=8, seq_len=seq_len, seed=1)
        assert ids.shape == (8, seq_len) and (ids[:, 0] == BOS).all() and not (ids[:, 1:] == BOS).any()
        plain = calibration_ids(documents, NumberTokenizer(), n_samples=8, seq_len=seq_len - 1, seed=1)
        assert torch.equal(ids[:, 1:], plain)


def test_bos_of_a_real_tokenizer_and_none_where_it_adds_none():
    def word_tokenizer(adds_bos):
        vocab = {"<unk>": 0, "<eos>": 1, "<bos>": 2, **{str(i): i + 3 for i in range(40)}}
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        if adds_bos:
            backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
        return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", bos_token="<bos>")

    plain, with_bos = word_tokenizer(False), word_tokenizer(True)
    documents = [" ".join(str(i) for i in range(d, d + 30)) for d in range(0, 10)]
    assert bos_prefix(plain) == [] and bos_prefix(with_bos) == [2]
    ids = calibration_ids(documents, with_bos, n_samples=4, seq_len=10, seed=0)
    assert (ids[:, 0] == 2).all() and torch.equal(ids[:, 1:], calibration_ids(documents, plain, 4, 9, seed=0))
    assert not (calibration_ids(documents, plain, 4, 10, seed=0) == 2).any()  # a tokenizer that names BOS but adds none


def test_too_little_text_is_an_error():
    with pytest.raises(ValueError, match="seq_len"):
        calibration_ids(["1 2 3", "4 5"], NumberTokenizer(), n_samples=1, seq_len=10)


@pytest.mark.parametrize("field, n_samples, seq_len", [("n_samples", 0, 4), ("n_samples", 2.0, 4), ("seq_len", 2, -3)])
def test_segment_counts_and_lengths_are_checked(field, n_samples, seq_len):
    with pytest.raises(ValueError, match=f"`{field}` must be an int >= 1"):
        calibration_ids(["1 2 3 4 5 6 7 8 9"], NumberTokenizer(), n_samples=n_samples, seq_len=seq_len)


def test_local_files_dataset_and_list_give_the_same_documents(tmp_path):
    documents = [_document(10, 8), _document(50, 3)]
    jsonl, json_file, txt = tmp_path / "d.jsonl", tmp_path / "d.json", tmp_path / "d.txt"
    jsonl.write_text("\n".join(json.dumps({"text": t, "url": "x"}) for t in documents) + "\n")
    json_file.write_text(json.dumps([{"text": t} for t in documents]))
    txt.write_text(documents[0])
    assert load_documents(str(jsonl)) == documents
    assert load_documents(json_file) == documents
    assert load_documents(str(txt)) == [documents[0]]
    assert load_documents(datasets.Dataset.from_dict({"text": documents})) == documents
    assert load_documents(tuple(documents)) == documents


def test_default_c4_sample():
    if not (data_dir() / C4_TRAIN_FILE).exists():
        pytest.skip("offline data not available")
    documents = load_documents("c4")
    assert len(documents) == 1000 and all(isinstance(text, str) and text for text in documents)


@pytest.mark.parametrize(
    "dataset, error, match",
    [
        ("missing/calibration.jsonl", FileNotFoundError, "`dataset`"),
        (42, ValueError, "`dataset` must be"),
        ([], ValueError, "at least one document"),
        (datasets.Dataset.from_dict({"content": ["a"]}), ValueError, "'text' column"),
    ],
)
def test_bad_sources_name_the_field(dataset, error, match):
    with pytest.raises(error, match=match):
        load_documents(dataset)


def test_bad_rows_name_the_field(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(ValueError, match="`dataset`.*'text' field"):
        load_documents(path)


def test_hessian_equals_xtx_of_captured_inputs():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    block[0].weight.data[:2] = -10.0  # ReLU kills channels 0 and 1: zero rows / columns of H for block[2]
    block[0].bias.data[:2] = -10.0
    captured = {"first": [], "second": []}
    handles = [
        block[0].register_forward_hook(lambda m, args, out: captured["first"].append(args[0].reshape(-1, 6))),
        block[2].register_forward_hook(lambda m, args, out: captured["second"].append(args[0].reshape(-1, 5))),
    ]
    batches = [torch.rand(2, 7, 6), torch.rand(3, 4, 6)]  # [batch, tokens, features], two calls
    with HessianAccumulator({"first": block[0], "second": block[2]}) as accumulator:
        for batch in batches:
            block(batch)
    for handle in handles:
        handle.remove()
    for name, xs in captured.items():
        x = torch.cat(xs).double()
        torch.testing.assert_close(accumulator.hessians[name].double(), x.T @ x, rtol=1e-5, atol=1e-5)
        assert accumulator.hessians[name].dtype == torch.float32
        assert accumulator.tokens[name] == 2 * 7 + 3 * 4
    assert torch.all(accumulator.hessians["second"][:2] == 0)
    # hooks are gone after the context: nothing more accumulates
    before = accumulator.hessians["first"].clone()
    block(batches[0])
    assert torch.equal(accumulator.hessians["first"], before)


class Fork(nn.Module):
    """Two layers on the same input tensor (like q/k/v), then one on an in-place-modified copy."""

    def __init__(self):
        super().__init__()
        self.left, self.right, self.after = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        x = x.clone()
        out = self.left(x) + self.right(x)
        x.mul_(2.0)
        return out + self.after(x)


def test_layers_sharing_an_input_each_get_its_hessian():
    fork, x = Fork(), torch.randn(2, 5, 4)
    with HessianAccumulator({"left": fork.left, "right": fork.right, "after": fork.after}) as accumulator:
        fork(x)
        fork(x)
    flat = x.reshape(-1, 4)
    torch.testing.assert_close(accumulator.hessians["left"], 2 * flat.T @ flat)
    torch.testing.assert_close(accumulator.hessians["right"], 2 * flat.T @ flat)
    torch.testing.assert_close(accumulator.hessians["after"], 8 * flat.T @ flat)
    assert accumulator.tokens == {"left": 20, "right": 20, "after": 20}


def test_input_norms_are_the_column_norms_of_the_stacked_inputs():
    fork, x = Fork(), torch.randn(2, 5, 4)
    with InputNorms({"left": fork.left, "after": fork.after}) as recorder:
        fork(x)
        fork(x[:1])
    fork(x)  # after the context: not counted
    stacked = torch.cat([x, x[:1]]).reshape(-1, 4).double()
    torch.testing.assert_close(recorder.norms["left"], stacked.norm(dim=0).float())
    torch.testing.assert_close(recorder.norms["after"], 2 * stacked.norm(dim=0).float())


def test_hessian_of_half_precision_inputs_is_float32():
    layer = nn.Linear(4, 2).to(torch.bfloat16)
    x = torch.randn(10, 4).to(torch.bfloat16)
    with HessianAccumulator({"layer": layer}) as accumulator:
        layer(x)
    torch.testing.assert_close(accumulator.hessians["layer"], x.float().T @ x.float())
