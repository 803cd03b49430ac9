"""SLRConfig, SLRLinear storage, compress-on-load, save/reload, dequantize, push_to_hub, guards."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import metadata_load
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hf_slr
from hf_slr import SLRConfig, SLRLinear
from hf_slr.allocation import uniform_target
from hf_slr.format import pack_bits, unpack_bits
from hf_slr.integration import information_bound_bytes, kept_fraction
from hf_slr.serialization import checkpoint_bytes, model_card

FAMILIES = ["llama", "qwen2", "opt"]


def _compress(folder, sparsity, rank=8, dtype=torch.float32):
    config = SLRConfig(method="magnitude_svd", sparsity=sparsity, rank=rank)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=dtype)


def _logits(model, seed=1):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------- storage ---------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_bit_packing_roundtrip_and_size(bits):
    values = torch.randint(0, 2**bits, (1001,))
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(1001 * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, 1001), values)


def _random_sparse(out, inp, nm_pattern=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inp, generator=g)
    if nm_pattern is None:
        return weight * (torch.rand(out, inp, generator=g) < 0.4)
    n, m = nm_pattern
    groups = weight.reshape(out, -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter(-1, groups.abs().topk(n, -1).indices, True)
    return (groups * keep).reshape(out, inp)


@pytest.mark.parametrize("nm_pattern", [None, (2, 4), (2, 8), (1, 4)])
def test_slr_linear_forward_matches_dense(nm_pattern):
    g = torch.Generator().manual_seed(3)
    sparse = _random_sparse(24, 32, nm_pattern)
    u, v, bias = torch.randn(24, 5, generator=g), torch.randn(5, 32, generator=g), torch.randn(24, generator=g)
    layer = SLRLinear.from_dense(sparse, u, v, bias, nm_pattern=nm_pattern)
    x = torch.randn(3, 7, 32, generator=g)
    reference = x @ (sparse + u @ v).T + bias
    torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.sparse_weight(), sparse)
    assert torch.equal(layer.to_dense(), sparse + u @ v)
    assert torch.equal(layer.support() & (sparse != 0), sparse != 0)
    # compact: no dense buffer of S anywhere in the layer
    assert all(t.numel() < sparse.numel() for t in layer.state_dict().values())


def test_storage_dtype_differs_from_activations():
    sparse = _random_sparse(8, 16)
    layer = SLRLinear.from_dense(sparse, torch.randn(8, 2), torch.randn(2, 16), dtype=torch.bfloat16)
    x = torch.randn(3, 16)
    out = layer(x)
    assert out.dtype == torch.float32
    reference = x @ (layer.sparse_weight().float() + layer.U.float() @ layer.V.float()).T
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_nm_groups_with_fewer_nonzeros_are_completed():
    sparse = _random_sparse(4, 16, (2, 4))
    sparse[0, :4] = 0.0
    sparse[1, 4:8] = torch.tensor([0.0, 0.0, 3.0, 0.0])
    layer = SLRLinear.from_dense(sparse, torch.zeros(4, 0), torch.zeros(0, 16), nm_pattern=(2, 4))
    assert torch.equal(layer.sparse_weight(), sparse)
    assert layer.support().reshape(4, 4, 4).sum(-1).eq(2).all()


def test_nm_violation_is_rejected():
    sparse = torch.ones(2, 8)
    with pytest.raises(ValueError, match="2:4 pattern"):
        SLRLinear.from_dense(sparse, torch.zeros(2, 0), torch.zeros(0, 8), nm_pattern=(2, 4))


# ------------------------------------------------------- compress / save / reload ------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_compress_save_reload_identical(tiny_dense_dir, tmp_path, family, sparsity):
    model = _compress(tiny_dense_dir(family), sparsity)
    slr_layers = [m for m in model.modules() if isinstance(m, SLRLinear)]
    assert len(slr_layers) > 0
    before = _logits(model)
    folder = hf_slr.save_pretrained(model, tmp_path / "slr")
    reloaded, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and not info["mismatched_keys"]
    assert torch.equal(_logits(reloaded), before)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_bf16_roundtrip(tiny_dense_dir, tmp_path):
    model = _compress(tiny_dense_dir("llama"), "2:4", dtype=torch.bfloat16)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.U.dtype == layer.sparse_values.dtype == torch.bfloat16
    before = _logits(model)
    reloaded = AutoModelForCausalLM.from_pretrained(hf_slr.save_pretrained(model, tmp_path / "slr"))
    assert reloaded.model.layers[0].mlp.down_proj.U.dtype == torch.bfloat16
    assert torch.equal(_logits(reloaded), before)


def test_reload_does_not_recompress(tiny_dense_dir, tmp_path, monkeypatch):
    folder = hf_slr.save_pretrained(_compress(tiny_dense_dir("llama"), 0.5), tmp_path / "slr")
    monkeypatch.setattr(hf_slr.compression.driver, "run", lambda *a, **k: pytest.fail("recompressed on reload"))
    AutoModelForCausalLM.from_pretrained(folder)


def test_compressed_layers_obey_budget(tiny_dense_dir):
    model = _compress(tiny_dense_dir("llama"), 0.5, rank=4)
    for layer in (m for m in model.modules() if isinstance(m, SLRLinear)):
        numel = layer.in_features * layer.out_features
        assert layer.nnz == numel - math.floor(0.5 * numel)
        assert layer.U.shape == (layer.out_features, 4) and layer.V.shape == (4, layer.in_features)


def test_dequantize_matches_s_plus_uv(tiny_dense_dir):
    model = _compress(tiny_dense_dir("llama"), "2:4")
    expected = {
        name: module.to_dense().detach().clone() for name, module in model.named_modules() if isinstance(module, SLRLinear)
    }
    dense = model.dequantize()
    assert not any(isinstance(m, SLRLinear) for m in dense.modules())
    assert not hasattr(dense.config, "quantization_config")
    for name, weight in expected.items():
        assert torch.equal(dense.get_submodule(name).weight, weight), name


def test_dequantize_after_save_and_reload(tiny_dense_dir, tmp_path):
    folder = hf_slr.save_pretrained(_compress(tiny_dense_dir("llama"), 0.5), tmp_path / "slr")
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    expected = {name: m.to_dense().detach().clone() for name, m in reloaded.named_modules() if isinstance(m, SLRLinear)}
    dense = reloaded.dequantize()
    for name, weight in expected.items():
        assert torch.equal(dense.get_submodule(name).weight, weight), name


def test_checkpoint_layout_and_model_card(tiny_dense_dir, tmp_path):
    model = _compress(tiny_dense_dir("llama"), "2:4", rank=4)
    folder = hf_slr.save_pretrained(model, tmp_path / "slr")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "slr" and config["method"] == "magnitude_svd"
    assert SLRConfig.from_dict(config) == model.config.quantization_config
    card = (folder / "README.md").read_text()
    for needle in ("magnitude_svd", "import hf_slr", "2:4", "4 (14 matrices)", "| calibration | none (data-free) |"):
        assert needle in card
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        prefix = "model.layers.0.self_attn.q_proj"
        assert {f"{prefix}.U", f"{prefix}.V", f"{prefix}.sparse_values", f"{prefix}.sparse_indices"} <= keys
        assert f.get_tensor(f"{prefix}.sparse_indices").dtype == torch.uint8
        assert f.get_slice(f"{prefix}.sparse_values").get_shape() == [64, 32]
        assert f.metadata() == {"format": "pt"}  # no key whose order could differ between runs
        assert f.get_tensor(f"{prefix}.weight").tolist() == [2, 2, 4]  # the module record: version, N, M
    assert not list(tmp_path.glob(".slr.tmp-*")), "temporary folder left behind"


def test_model_card_metadata_structure_and_measured_quality(tiny_dense_dir, tmp_path):
    """Hub metadata base_model + base_model_relation: quantized; "low-rank factors" only where a
    rank is > 0; the measured quality when passed, escaped."""
    dense_dir = tiny_dense_dir("llama")
    ppl = {"ppl": 23.456, "nll": 3.15, "dataset": "wikitext2", "n_windows": 20, "seq_len": 1024}
    metrics = {"WikiText-2 <b>|`x`": ppl, "dense WikiText-2 perplexity": 21.5, "note": "a | b"}
    folder = hf_slr.save_pretrained(_compress(dense_dir, 0.5, rank=4), tmp_path / "slr", metrics=metrics)
    card = (folder / "README.md").read_text()
    assert metadata_load(folder / "README.md") | {"tags": None} == {
        "library_name": "transformers", "tags": None, "base_model": Path(dense_dir).name, "base_model_relation": "quantized"
    }
    assert "W = S + U V" in card and "low-rank factors U, V" in card
    assert "| WikiText-2 &lt;b&gt;&#124;&#96;x&#96; | 23.46 perplexity (wikitext2, 20 x 1024 tokens) |" in card
    assert "| dense WikiText-2 perplexity | 21.5 |" in card and "| note | a &#124; b |" in card

    pruned = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=SLRConfig(method="magnitude", sparsity=0.5))
    card = model_card(pruned)
    assert "rank-r" not in card and "U, V" not in card and "Measured quality" not in card
    assert "compressed to sparse (pruned)" in card and "W = S, a sparse matrix (unstructured; pure pruning,\nno low-rank factors)" in card
    with pytest.raises(ValueError, match="`metrics` must be a mapping"):
        model_card(pruned, metrics=[("ppl", 1.0)])


def test_checkpoint_is_near_information_bound(tiny_dense_dir, tmp_path):
    dense_dir = tiny_dense_dir("llama")
    for sparsity in (0.5, "2:4"):
        model = _compress(dense_dir, sparsity, rank=4)
        disk = checkpoint_bytes(hf_slr.save_pretrained(model, tmp_path / f"slr{sparsity}"))
        # safetensors headers are a larger share of a tiny model than of a real one
        assert disk < checkpoint_bytes(dense_dir)
        assert disk <= 1.10 * information_bound_bytes(model)


def test_kept_fraction_and_info_count_s_and_factors(tiny_dense_dir, tmp_path):
    from hf_slr.cli import main

    model = _compress(tiny_dense_dir("llama"), 0.5, rank=4)
    shapes = [(m.out_features, m.in_features) for m in model.modules() if isinstance(m, SLRLinear)]
    expected = sum(o * i - math.floor(0.5 * o * i) + 4 * (o + i) for o, i in shapes) / sum(o * i for o, i in shapes)
    assert kept_fraction(model) == pytest.approx(expected, rel=1e-12)
    folder = hf_slr.save_pretrained(model, tmp_path / "slr")
    main(["info", str(folder), "--json", str(tmp_path / "info.json")])
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["projection_parameters_kept"] == pytest.approx(expected, abs=1e-6)
    assert info["bytes_on_disk"] == checkpoint_bytes(folder)


def test_failed_save_leaves_nothing(tiny_dense_dir, tmp_path, monkeypatch):
    model = _compress(tiny_dense_dir("llama"), 0.5)
    monkeypatch.setattr(type(model), "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        hf_slr.save_pretrained(model, tmp_path / "out" / "slr")
    assert list((tmp_path / "out").iterdir()) == []


def test_push_to_hub_uploads_exactly_the_saved_files(tiny_dense_dir, tmp_path, monkeypatch):
    from huggingface_hub import HfApi, RepoUrl

    model = _compress(tiny_dense_dir("llama"), 0.5)
    commits = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(HfApi, "create_commit", lambda self, repo_id, operations, **kw: commits.append((repo_id, kw, list(operations))))
    hf_slr.push_to_hub(model, "user/tiny-slr", commit_message="test")
    saved = {p.name for p in hf_slr.save_pretrained(model, tmp_path / "local").iterdir()}
    assert len(commits) == 1
    repo_id, kwargs, operations = commits[0]
    assert repo_id == "user/tiny-slr" and kwargs["commit_message"] == "test"
    assert {op.path_in_repo for op in operations} == saved
    assert {"config.json", "model.safetensors", "README.md"} <= saved


def test_plain_transformers_refuses_checkpoint(tiny_dense_dir, tmp_path):
    folder = hf_slr.save_pretrained(_compress(tiny_dense_dir("llama"), 0.5), tmp_path / "slr")
    code = (
        "import sys\nfrom transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0, "plain transformers loaded an SLR checkpoint with random weights"
    assert "mismatch" in (result.stderr + result.stdout).lower()


def test_registration_is_idempotent():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    hf_slr._register()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["slr"] is SLRConfig
    assert AUTO_QUANTIZER_MAPPING["slr"] is hf_slr.SLRHfQuantizer


# ------------------------------------------------------------- config --------------------------------


def test_config_roundtrip_exact():
    config = SLRConfig(
        method="magnitude_svd",
        sparsity="2:8",
        compression_ratio=0.5,
        modules_to_not_convert=["k_proj"],
        method_kwargs={"scope": "row"},
        storage_dtype="bfloat16",
        tm_kwargs={"epochs": 3},
    )
    data = config.to_dict()
    assert data["quant_method"] == "slr"
    again = SLRConfig.from_dict(json.loads(json.dumps(data)))
    assert again.to_dict() == data


@pytest.mark.parametrize(
    "shape, kwargs, expected",
    [
        # 004 §5: r = floor((1 - rho - N/M) m n / (m + n))
        ((576, 576), dict(sparsity="2:8", compression_ratio=0.5), (math.floor(0.25 * 576 * 576 / 1152), 0.75)),
        # 004 App. A.3: r = floor(kappa (1 - rho) m n / (m + n)), k = floor((1 - kappa)(1 - rho) m n)
        (
            (1536, 576),
            dict(compression_ratio=0.5, rank_ratio=0.3),
            (math.floor(0.3 * 0.5 * 1536 * 576 / 2112), 1 - math.floor(0.7 * 0.5 * 1536 * 576) / (1536 * 576)),
        ),
        ((64, 64), dict(sparsity=0.6, rank=7), (7, 0.6)),
        ((64, 64), dict(), (64, 0.5)),
    ],
)
def test_budget_formulas(shape, kwargs, expected):
    target = uniform_target(*shape, SLRConfig(**kwargs))
    assert target.rank == expected[0]
    assert target.sparsity == pytest.approx(expected[1], abs=1e-12)


def test_legacy_fields_of_format_1_configs_are_read():
    config = SLRConfig(tm_epochs=3, tm_lr=1e-3, compressed_modules={"a": {"rank": 1, "nnz": 2, "sparsity": 0.5}})
    assert config.tm_kwargs == {"epochs": 3, "lr": 1e-3}
    assert "compressed_modules" not in config.to_dict() and "tm_epochs" not in config.to_dict()


def test_the_library_never_writes_into_the_callers_config(tiny_dense_dir):
    config = SLRConfig(method="magnitude_svd", sparsity=0.5, rank=4)
    before = config.to_dict()
    first = AutoModelForCausalLM.from_pretrained(tiny_dense_dir("llama"), quantization_config=config)
    second = hf_slr.compress(AutoModelForCausalLM.from_pretrained(tiny_dense_dir("qwen2")), config)
    assert config.to_dict() == before
    assert first.config.quantization_config is not config and second.config.quantization_config is not config
    assert first.config.quantization_config.base_model == "dense-llama"  # a local path: its folder name only
    assert second.config.quantization_config.base_model == "dense-qwen2"


INVALID_CONFIGS = [
    (dict(method="nope"), "`method` must be one of"),
    (dict(sparsity=1.0), "`sparsity` must be a float in \\[0, 1\\)"),
    (dict(sparsity=-0.1), "`sparsity` must be a float in \\[0, 1\\)"),
    (dict(sparsity="4:2"), "0 < N < M"),
    (dict(sparsity="half"), "'N:M' pattern"),
    (dict(rank=-1), "`rank` must be an int >= 0"),
    (dict(rank=2.5), "`rank` must be an int >= 0"),
    (dict(compression_ratio=1.5, rank_ratio=0.3), "`compression_ratio` must be a float in \\(0, 1\\)"),
    (dict(compression_ratio=0.5, rank=8, sparsity="2:8"), "exclusive"),
    (dict(compression_ratio=0.5, sparsity=0.5, rank_ratio=0.3), "exclusive for unstructured"),
    (dict(compression_ratio=0.6, sparsity="2:4"), "keeps fewer parameters than the 2:4 pattern"),
    (dict(rank_ratio=0.3), "`rank_ratio` needs `compression_ratio`"),
    (dict(compression_ratio=0.5, rank_ratio=1.3), "`rank_ratio` must be a float in \\[0, 1\\]"),
    (dict(n_samples=0), "`n_samples` must be an int > 0"),
    (dict(seq_len="long"), "`seq_len` must be an int > 0"),
    (dict(storage_dtype="int8"), "`storage_dtype` must be one of"),
    (dict(method_kwargs={"iterations": 3}), "`method_kwargs` of method 'magnitude_svd' has unknown name"),
    (dict(allocation="random"), "`allocation` must be one of"),
    (dict(tm_lr=0), "`tm_kwargs\\['lr'\\]` of transformer matching must be a finite float > 0"),
    (dict(tm_lr=float("inf")), "`tm_kwargs\\['lr'\\]`"),
    (dict(tm_kwargs={"epochs": 0}), "`tm_kwargs\\['epochs'\\]` of transformer matching must be an int >= 1"),
    (dict(compression_ratio=float("nan"), rank_ratio=0.3), "`compression_ratio` must be a float in \\(0, 1\\)"),
    (dict(dataset=3), "`dataset` must be"),
    (dict(learning_rate=1e-3), "unknown fields \\['learning_rate'\\]"),
]


@pytest.mark.parametrize("kwargs, message", INVALID_CONFIGS, ids=[str(k) for k, _ in INVALID_CONFIGS])
def test_invalid_config_names_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SLRConfig(**kwargs)
