"""The sequential block-by-block driver on tiny random Llama / Qwen2 / Mistral / OPT models."""

import copy
import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

import hf_slr
from hf_slr import SLRConfig, SLRLinear, algorithms
from hf_slr.algorithms import Target
from hf_slr.algorithms.base import relative_objective
from hf_slr.calibration import calibration_ids
from hf_slr.compression.capture import capture_block_inputs
from hf_slr.integration import decoder_blocks

WORDS = "the a cat dog sat on mat ran far and then slept under tree big small red blue green old".split()
N_SAMPLES, SEQ_LEN = 6, 16
FAST = {"sparsegpt": {"blocksize": 8}, "oats": {"iterations": 3}}


def _texts(n=30, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(n)]


TEXTS = _texts()


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"<unk>": 0, "<eos>": 1, **{word: i + 2 for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


def tiny_model(arch="llama", layers=2, attn="sdpa", seed=0):
    """A random model whose blocks change their inputs markedly (initializer_range 0.2)."""
    common = dict(vocab_size=len(WORDS) + 2, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4)
    common |= dict(max_position_embeddings=64, initializer_range=0.2)
    configs = {
        "llama": lambda: LlamaConfig(intermediate_size=64, num_key_value_heads=2, **common),
        "qwen2": lambda: Qwen2Config(
            intermediate_size=64, num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=1, **common
        ),
        "mistral": lambda: MistralConfig(intermediate_size=64, num_key_value_heads=2, sliding_window=4, **common),
        "opt": lambda: OPTConfig(ffn_dim=64, word_embed_proj_dim=32, pad_token_id=0, **common),
    }
    torch.manual_seed(seed)
    config = configs[arch]()
    config._attn_implementation = attn
    return AutoModelForCausalLM.from_config(config).eval()


def _config(method="wanda", **overrides):
    rank = 2 if algorithms.get(method).low_rank else None  # pruning methods store no U V
    fields = dict(method=method, sparsity=0.5, rank=rank, dataset=TEXTS, n_samples=N_SAMPLES, seq_len=SEQ_LEN)
    fields["method_kwargs"] = FAST.get(method, {})
    return SLRConfig(**(fields | overrides))


def _slr_layers(model):
    return {name: module for name, module in model.named_modules() if isinstance(module, SLRLinear)}


@torch.no_grad()
def _hidden_states(model, ids):
    return model(ids, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "opt"])
def test_captured_block_calls_replay_the_model_forward(arch, attn, tokenizer):
    model = tiny_model(arch, layers=3, attn=attn)
    keys = list(model.state_dict())
    ids = calibration_ids(TEXTS, tokenizer, N_SAMPLES, SEQ_LEN)
    inputs, calls = capture_block_inputs(model, ids)
    assert list(model.state_dict()) == keys  # the blocks are back in place
    expected = _hidden_states(model, ids)
    _, blocks = decoder_blocks(model)
    hidden = inputs
    for index, block in enumerate(blocks):
        torch.testing.assert_close(hidden, expected[index])
        with torch.no_grad():  # mini-batches of 4 rows reuse the arguments captured with batch size 1
            hidden = torch.cat([calls[index](block, hidden[start : start + 4]) for start in range(0, N_SAMPLES, 4)])


def _hessian_of_inputs(model, module_name, ids):
    """X^T X of ``module_name``'s inputs in a plain forward of the whole model (float64)."""
    xs = []
    handle = model.get_submodule(module_name).register_forward_pre_hook(lambda m, args: xs.append(args[0]))
    _hidden_states(model, ids)
    handle.remove()
    x = torch.cat(xs).reshape(-1, xs[0].shape[-1]).double()
    return (x.T @ x).float()


def test_each_block_is_compressed_on_the_outputs_of_the_compressed_previous_block(tokenizer):
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    hf_slr.compress(model, _config("wanda", rank=0), tokenizer)
    ids = calibration_ids(TEXTS, tokenizer, N_SAMPLES, SEQ_LEN)
    name = "model.layers.1.self_attn.q_proj"
    weight = dense.get_submodule(name).weight.detach()
    layer = model.get_submodule(name)
    compressed_h = _hessian_of_inputs(model, name, ids)  # block 0 already compressed
    dense_h = _hessian_of_inputs(dense, name, ids)
    wanda = algorithms.get("wanda")
    with torch.no_grad():
        assert torch.equal(wanda.run(weight, compressed_h, Target(sparsity=0.5)).sparse != 0, layer.support())
        assert not torch.equal(wanda.run(weight, dense_h, Target(sparsity=0.5)).sparse != 0, layer.support())
        entry = next(e for e in model.slr_report["modules"] if e["module"] == name)
        objective = relative_objective(weight, layer.sparse_weight(), layer.U, layer.V, compressed_h)
    assert entry["relative_objective"] == pytest.approx(objective, rel=1e-4)


@pytest.mark.parametrize(
    "arch, method",
    [("llama", "wanda"), ("llama", "sparsegpt"), ("llama", "oats"), ("qwen2", "oats"), ("mistral", "sparsegpt"), ("opt", "wanda")],
)
def test_compress_on_load_then_save_and_reload_gives_identical_logits(arch, method, tokenizer, tmp_path):
    tiny_model(arch).save_pretrained(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=_config(method, tokenizer=tokenizer))
    layers = _slr_layers(model)
    assert len(layers) > 0
    assert len(model.slr_report["modules"]) == len(layers)
    assert len(model.slr_report["blocks"]) == model.config.num_hidden_layers
    for layer in layers.values():
        assert layer.rank == (2 if method == "oats" else 0) and layer.nnz == layer.in_features * layer.out_features // 2
    assert all(set(entry) == {"module", "relative_objective", "seconds"} for entry in model.slr_report["modules"])
    hf_slr.save_pretrained(model, tmp_path / "compressed", tokenizer=tokenizer)
    card = (tmp_path / "compressed" / "README.md").read_text()
    assert f"| calibration | texts@sha256:" in card and f"({len(TEXTS)} documents), {N_SAMPLES} x {SEQ_LEN} tokens, seed 0 |" in card
    assert TEXTS[0] not in card and TEXTS[0] not in (tmp_path / "compressed" / "config.json").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "compressed")
    ids = calibration_ids(TEXTS, tokenizer, 2, SEQ_LEN, seed=7)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_from_pretrained_loads_the_model_s_own_tokenizer_once(tokenizer, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    tiny_model("llama").save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    loads = []
    load = AutoTokenizer.from_pretrained.__func__
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(a) or load(cls, *a, **k)))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=_config("wanda"))
    assert len(_slr_layers(model)) > 0
    assert loads == [(str(tmp_path / "dense"),)]


def test_compress_a_loaded_model_then_save_and_reload(tokenizer, tmp_path):
    model = tiny_model("llama")
    hf_slr.compress(model, _config("oats"), tokenizer)
    hf_slr.save_pretrained(model, tmp_path / "compressed")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "compressed")
    ids = calibration_ids(TEXTS, tokenizer, 2, SEQ_LEN, seed=7)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_a_datasets_dataset_calibrates_like_the_same_list_of_texts(tokenizer, tmp_path):
    import datasets

    from_list, from_dataset = tiny_model("llama"), tiny_model("llama")
    hf_slr.compress(from_list, _config("wanda"), tokenizer)
    config = _config("wanda", dataset=datasets.Dataset.from_dict({"text": TEXTS}))
    assert config.dataset.startswith("datasets.Dataset@") and SLRConfig.from_dict(config.to_dict()) == config
    hf_slr.compress(from_dataset, config, tokenizer)
    layers = _slr_layers(from_dataset)
    for name, layer in _slr_layers(from_list).items():
        assert torch.equal(layer.sparse_weight(), layers[name].sparse_weight())
    hf_slr.save_pretrained(from_dataset, tmp_path / "compressed")  # the description, not the data, is saved
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "compressed").config.quantization_config.dataset == config.dataset


def test_data_free_method_needs_no_data_and_no_tokenizer():
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    hf_slr.compress(model, SLRConfig(method="magnitude_svd", rank=2, dataset="missing/calibration.jsonl"))
    for entry in model.slr_report["modules"]:
        layer, weight = model.get_submodule(entry["module"]), dense.get_submodule(entry["module"]).weight
        with torch.no_grad():
            expected = relative_objective(weight, layer.sparse_weight(), layer.U, layer.V, None)
        assert entry["relative_objective"] == pytest.approx(expected, rel=1e-5)


def test_half_precision_model_keeps_its_dtype_through_compression_and_matching(tokenizer):
    model = tiny_model("llama").to(torch.bfloat16)
    hf_slr.compress(model, _config("wanda", transformer_matching=True, tm_epochs=1), tokenizer)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(0 < block["tm_loss_after"] < float("inf") for block in model.slr_report["blocks"])


@pytest.mark.parametrize("method, rank", [("wanda", 0), ("magnitude_svd", 2)])
def test_transformer_matching_reduces_block_error_and_keeps_the_support(method, rank, tokenizer):
    dense = tiny_model("llama")
    plain, matched = copy.deepcopy(dense), copy.deepcopy(dense)
    hf_slr.compress(plain, _config(method, rank=rank), tokenizer)
    tm = dict(transformer_matching=True, tm_epochs=10, tm_batch_size=2, tm_lr=1e-3)
    hf_slr.compress(matched, _config(method, rank=rank, **tm), tokenizer)

    ids = calibration_ids(TEXTS, tokenizer, N_SAMPLES, SEQ_LEN)
    target, plain_out, matched_out = (_hidden_states(m, ids)[1] for m in (dense, plain, matched))
    plain_error, matched_error = (target - plain_out).pow(2).mean(), (target - matched_out).pow(2).mean()
    assert matched_error < 0.9 * plain_error
    for block in matched.slr_report["blocks"]:
        assert block["tm_loss_after"] < block["tm_loss_before"]
    assert matched.slr_report["blocks"][0]["tm_loss_before"] == pytest.approx(float(plain_error), rel=1e-3)

    plain_layers, matched_layers = _slr_layers(plain), _slr_layers(matched)
    for name in plain_layers:
        if name.startswith("model.layers.0."):  # same inputs, same decomposition before matching
            assert torch.equal(plain_layers[name].support(), matched_layers[name].support())
            assert not torch.equal(plain_layers[name].sparse_values, matched_layers[name].sparse_values)
        assert matched_layers[name].nnz == plain_layers[name].nnz
    dense_state = dense.state_dict()
    for key, value in matched.state_dict().items():
        if not key.startswith("model.layers."):  # only the blocks' parameters are trained
            assert torch.equal(value, dense_state[key]), key
    # "all parameters in transformer block T_i" (002 App. B): the norms too
    norms = [key for key in dense_state if key.startswith("model.layers.") and "norm" in key]
    assert norms and all(not torch.equal(matched.state_dict()[key], dense_state[key]) for key in norms)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_matching_precision_trains_float32_parameters(precision, tokenizer):
    from hf_slr.compression.matching import autocast_dtype

    model = tiny_model("llama")
    tm = dict(transformer_matching=True, tm_kwargs={"epochs": 4, "batch_size": 2, "lr": 1e-3, "precision": precision})
    hf_slr.compress(model, _config("wanda", **tm), tokenizer)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(block["tm_loss_after"] < block["tm_loss_before"] for block in model.slr_report["blocks"])
    assert autocast_dtype(precision, torch.device("cpu")) == (None if precision == "float32" else torch.bfloat16)


@pytest.mark.filterwarnings("ignore:Attempting to save a model with offloaded modules")
def test_offloaded_blocks_compress_like_resident_ones(tokenizer, tmp_path):
    tiny_model("llama", layers=3).save_pretrained(tmp_path / "dense")
    config = dict(tokenizer=tokenizer, transformer_matching=True, tm_epochs=2, tm_batch_size=2)
    resident = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=_config("wanda", **config))
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map |= {"model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk"}
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense",
        quantization_config=_config("wanda", **config),
        device_map=device_map,
        offload_folder=tmp_path / "offload",
    )
    ids = calibration_ids(TEXTS, tokenizer, 2, SEQ_LEN, seed=7)
    with torch.no_grad():
        assert torch.equal(resident(ids).logits, offloaded(ids).logits)
    hf_slr.save_pretrained(offloaded, tmp_path / "compressed")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "compressed")
    with torch.no_grad():
        assert torch.equal(resident(ids).logits, reloaded(ids).logits)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(sparsity="1:3"), ValueError, "`sparsity`='1:3' needs in_features divisible by 3"),
        (dict(method="oats", rank=40), ValueError, "`rank`"),
        (dict(dataset="missing/calibration.jsonl"), FileNotFoundError, "`dataset`"),
        (dict(seq_len=65), ValueError, "`seq_len`=65 exceeds"),
        (dict(tokenizer=None), ValueError, "`tokenizer`"),
        (dict(modules_to_not_convert=["self_attn", "mlp"]), ValueError, "`modules_to_not_convert`"),
    ],
)
def test_bad_inputs_fail_before_any_work_and_name_the_field(overrides, error, match, tokenizer):
    model = tiny_model("llama")
    config = _config(**({"method": "wanda", "tokenizer": tokenizer} | overrides))
    with pytest.raises(error, match=match):
        hf_slr.compress(model, config)
    assert not _slr_layers(model) and config.base_model is None


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(sparsity="1:3"), ValueError, "`sparsity`='1:3' needs in_features divisible by 3"),
        (dict(dataset="missing/calibration.jsonl"), FileNotFoundError, "`dataset`"),
        (dict(seq_len=65), ValueError, "`seq_len`=65 exceeds"),
    ],
)
def test_from_pretrained_fails_before_the_weights_load(overrides, error, match, tokenizer, tmp_path, monkeypatch):
    from transformers.modeling_utils import PreTrainedModel

    tiny_model("llama").save_pretrained(tmp_path / "dense")
    monkeypatch.setattr(PreTrainedModel, "_load_pretrained_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(error, match=match):
        AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=_config("wanda", tokenizer=tokenizer, **overrides))
