"""The checkpoint describes itself: layouts come from the tensors and the per-module records;
format-1 checkpoints still load; incomplete or inconsistent checkpoints are refused, naming the
tensor."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_slr
from hf_slr import SLRConfig, SLRLinear
from hf_slr.format import FORMAT_VERSION, pack_bits

DATA = Path(__file__).parent / "data"
LAYER = "model.layers.0.self_attn.q_proj"


def _edit_config(folder: Path, edit):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    edit(data["quantization_config"])
    path.write_text(json.dumps(data))


def _edit_tensors(folder: Path, edit, metadata_edit=None):
    path = folder / "model.safetensors"
    with safe_open(path, "pt") as handle:
        metadata = dict(handle.metadata())
    tensors = load_file(path)
    edit(tensors)
    if metadata_edit is not None:
        metadata_edit(metadata)
    save_file(tensors, path, metadata=metadata)


def _layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, SLRLinear)}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def saved(tiny_dense_dir, tmp_path):
    """A fresh checkpoint of each format (unstructured 50% + r4, 2:4 + r4) and its model."""

    def make(sparsity):
        config = SLRConfig(method="magnitude_svd", sparsity=sparsity, rank=4)
        model = AutoModelForCausalLM.from_pretrained(tiny_dense_dir("llama"), quantization_config=config)
        folder = hf_slr.save_pretrained(model, tmp_path / f"slr-{str(sparsity).replace(':', '_')}")
        return model, folder

    return make


@pytest.mark.parametrize("name", ["v1_unstructured", "v1_nm"])
@pytest.mark.parametrize("strip_shapes", [False, True])
def test_format_1_checkpoints_still_load(name, strip_shapes, tmp_path):
    """Saved by the format-1 code (tests/data): same logits; ranks/nnz in config.json are not read."""
    folder = Path(shutil.copytree(DATA / name, tmp_path / name))
    if strip_shapes:
        _edit_config(folder, lambda q: q.pop("compressed_modules"))
    expected = load_file(folder / "expected_logits.safetensors")
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert len(_layers(model)) == 7
    assert torch.equal(_logits(model, expected["input_ids"]), expected["logits"])
    if name == "v1_nm":
        assert all(layer.nm_pattern == (2, 4) for layer in _layers(model).values())
    # a re-save writes the current format, which reloads identically
    again = AutoModelForCausalLM.from_pretrained(hf_slr.save_pretrained(model, tmp_path / "resaved"))
    with safe_open(tmp_path / "resaved" / "model.safetensors", "pt") as handle:
        assert handle.get_tensor(f"{LAYER}.weight")[0] == FORMAT_VERSION
    assert torch.equal(_logits(again, expected["input_ids"]), expected["logits"])


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_config_json_holds_no_layer_shape_and_edits_of_the_request_do_not_change_the_load(saved, sparsity):
    model, folder = saved(sparsity)
    quantization_config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert "compressed_modules" not in quantization_config
    ids = torch.arange(12).reshape(2, 6)
    expected = _logits(model, ids)
    # the request fields are not layout: rewriting them leaves the loaded model unchanged
    _edit_config(folder, lambda q: q.update(rank=1, sparsity="1:8" if sparsity == "2:4" else 0.9))
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(_logits(reloaded, ids), expected)
    assert {n: l.layout for n, l in _layers(reloaded).items()} == {n: l.layout for n, l in _layers(model).items()}


@pytest.mark.parametrize(
    "sparsity, corrupt, match",
    [
        (0.5, lambda t: t.pop(f"{LAYER}.V"), f"{LAYER}.V: missing"),
        (0.5, lambda t: t.pop(f"{LAYER}.sparse_mask"), f"{LAYER}.sparse_mask: missing"),
        (0.5, lambda t: t.pop(f"{LAYER}.sparse_values"), f"{LAYER}.sparse_values: missing"),
        ("2:4", lambda t: t.pop(f"{LAYER}.sparse_indices"), f"{LAYER}.sparse_indices: missing"),
        (0.5, lambda t: t.pop(f"{LAYER}.weight"), f"{LAYER}.weight: missing"),
        (0.5, lambda t: t.update({f"{LAYER}.sparse_values": t[f"{LAYER}.sparse_values"].view(torch.int32)}), "not a float type"),
        (0.5, lambda t: t.update({f"{LAYER}.U": t[f"{LAYER}.U"][:, :3].contiguous()}), f"{LAYER}.V: expected float32 \\[3, 64\\]"),
        (0.5, lambda t: t.update({f"{LAYER}.sparse_mask": t[f"{LAYER}.sparse_mask"].to(torch.int16)}), f"{LAYER}.sparse_mask: expected uint8"),
        (0.5, lambda t: t.update({f"{LAYER}.weight": torch.tensor([9, 0, 0], dtype=torch.uint8)}), "format version 9"),
        ("2:4", lambda t: t.update({f"{LAYER}.weight": torch.tensor([2, 4, 2], dtype=torch.uint8)}), "invalid N:M pattern 4:2"),
        (0.5, lambda t: t.update({f"{LAYER}.weight": torch.tensor([0, 0, 0], dtype=torch.uint8)}), "format version 0"),
        (0.5, lambda t: t.update({f"{LAYER}.weight": torch.tensor([2, 0, 0], dtype=torch.int32)}), "not an SLR module record"),
        (0.5, lambda t: t.update({f"{LAYER}.weight": torch.tensor([[2, 0, 0]], dtype=torch.uint8)}), "not an SLR module record"),
        (0.5, lambda t: t.update({f"{LAYER}.weight": torch.tensor([2, 0], dtype=torch.uint8)}), "holds \\[version, N, M\\]"),
        ("2:4", lambda t: t.update({f"{LAYER}.weight": torch.tensor([2, 0, 0], dtype=torch.uint8)}), f"{LAYER}.sparse_mask: missing"),
        (0.5, lambda t: t.update({f"{LAYER}.weight": torch.tensor([2, 2, 4], dtype=torch.uint8)}), f"{LAYER}.sparse_indices: missing"),
        (0.5, lambda t: t.update({f"{LAYER}.U": t[f"{LAYER}.U"].to(torch.bfloat16)}), f"{LAYER}.U: expected float32"),
        (0.5, lambda t: t.update({f"{LAYER}.sparse_mask": t[f"{LAYER}.sparse_mask"][:-1].clone()}), f"{LAYER}.sparse_mask: expected uint8 \\[512\\]"),
        ("2:4", lambda t: t.update({f"{LAYER}.sparse_indices": t[f"{LAYER}.sparse_indices"][:-1].clone()}), f"{LAYER}.sparse_indices: expected uint8"),
        ("2:4", lambda t: t.update({f"{LAYER}.sparse_values": t[f"{LAYER}.sparse_values"][:, :-2].clone()}), f"{LAYER}.sparse_values: expected float32 \\[64, 32\\]"),
        (0.5, lambda t: t.update({f"{LAYER}.bias": torch.zeros(64)}), f"{LAYER}.bias: unexpected tensor"),
        (0.5, lambda t: t.update({f"{LAYER}.scales": torch.zeros(64)}), f"{LAYER}.scales: unexpected tensor"),
        (0.5, lambda t: t.update({f"{LAYER}.V": t[f"{LAYER}.V"].T.contiguous()}), f"{LAYER}.V: expected float32 \\[4, 64\\]"),
    ],
)
def test_incomplete_or_inconsistent_checkpoints_are_refused_naming_the_tensor(saved, sparsity, corrupt, match):
    _, folder = saved(sparsity)
    _edit_tensors(folder, corrupt)
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("version", ["7", "x", ""])
def test_an_unknown_format_version_in_the_metadata_is_refused(saved, version):
    _, folder = saved(0.5)

    def edit(metadata):
        metadata["slr_format_version"] = version

    _edit_tensors(folder, lambda t: None, edit)
    with pytest.raises(ValueError, match="slr_format_version"):
        AutoModelForCausalLM.from_pretrained(folder)


def _flip_first_clear_bit(tensors):
    mask = tensors[f"{LAYER}.sparse_mask"]
    byte = int((mask != 255).nonzero()[0])
    bit = next(b for b in range(8) if not int(mask[byte]) >> b & 1)
    mask[byte] |= 1 << bit


def _duplicate_first_position(tensors):
    indices = tensors[f"{LAYER}.sparse_indices"]
    # 2 bits per position, group 0 of row 0 holds positions p0 < p1 in bits 0-3: make both p0
    first = int(indices[0]) & 0b11
    indices[0] = (int(indices[0]) & 0b11110000) | first | first << 2


@pytest.mark.parametrize(
    "sparsity, corrupt, match",
    [
        (0.5, _flip_first_clear_bit, f"{LAYER}.sparse_mask: .* bits set"),
        ("2:4", _duplicate_first_position, f"{LAYER}.sparse_indices: in-group positions"),
        (0.5, lambda t: t[f"{LAYER}.sparse_values"].__setitem__(0, float("nan")), f"{LAYER}.sparse_values: holds NaN"),
        ("2:4", lambda t: t[f"{LAYER}.U"].__setitem__((0, 0), float("inf")), f"{LAYER}.U: holds NaN or inf"),
        ("2:4", lambda t: t[f"{LAYER}.sparse_values"].__setitem__((3, 3), float("-inf")), f"{LAYER}.sparse_values: holds NaN"),
        (0.5, lambda t: t[f"{LAYER}.V"].__setitem__((1, 2), float("nan")), f"{LAYER}.V: holds NaN"),
        (0.5, lambda t: t[f"{LAYER}.sparse_mask"].zero_(), f"{LAYER}.sparse_mask: 0 bits set"),
    ],
)
def test_values_that_disagree_with_the_layout_are_refused(saved, sparsity, corrupt, match):
    _, folder = saved(sparsity)
    _edit_tensors(folder, corrupt)
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(folder)


def test_a_truncated_file_is_refused(saved):
    _, folder = saved(0.5)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(Exception, match="(?i)safetensors|incomplete|invalid|deserializ"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_a_layer_of_another_model_is_refused(saved):
    _, folder = saved(0.5)

    def add_layer(tensors):
        for suffix in ("U", "V", "sparse_values", "sparse_mask", "weight"):
            tensors[f"model.layers.9.mlp.up_proj.{suffix}"] = tensors[f"{LAYER}.{suffix}"].clone()

    _edit_tensors(folder, add_layer)
    with pytest.raises(ValueError, match="model.layers.9.mlp.up_proj.U: the checkpoint compresses"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_mixed_formats_in_one_checkpoint_describe_themselves(tiny_dense_dir, tmp_path):
    """Each module's record carries its own pattern: a checkpoint may mix N:M and unstructured."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_dense_dir("llama"), quantization_config=SLRConfig(method="magnitude_svd", sparsity="2:4", rank=2)
    )
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(64, 64, generator=generator) * (torch.rand(64, 64, generator=generator) < 0.3)
    model.model.layers[0].self_attn.q_proj = SLRLinear.from_dense(dense, torch.randn(64, 3), torch.randn(3, 64)).eval()
    ids = torch.arange(12).reshape(2, 6)
    reloaded = AutoModelForCausalLM.from_pretrained(hf_slr.save_pretrained(model, tmp_path / "mixed"))
    assert reloaded.model.layers[0].self_attn.q_proj.nm_pattern is None
    assert reloaded.model.layers[0].self_attn.q_proj.rank == 3
    assert reloaded.model.layers[0].self_attn.k_proj.nm_pattern == (2, 4)
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))


def test_pack_bits_is_the_documented_layout():
    """LSB first: positions (1, 3) of a 2:4 group pack as 0b1101 = 13 in the low nibble."""
    assert pack_bits(torch.tensor([1, 3]), 2).tolist() == [0b1101]
