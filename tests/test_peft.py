"""LoRA on SLRLinear (hf_slr.peft): U, V as the adapter, or an extra adapter beside them."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import hf_slr
from hf_slr.calibration import calibration_ids
from hf_slr.peft import (
    DEFAULT_LEARNING_RATE,
    SLRLoraLinear,
    alpaca_dataset,
    get_slr_peft_model,
    load_slr_peft_model,
    recovery_training_arguments,
    text_dataset,
)
from test_compression import TEXTS, WORDS, tiny_model, tokenizer  # noqa: F401  (tokenizer: a fixture)
from tiny_models import tiny_config

RANK = 4
SPARSITIES = [0.5, "2:4"]


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = tiny_config(vocab_size=64, hidden_size=32, intermediate_size=64, max_position_embeddings=2048)
    path = tmp_path_factory.mktemp("dense")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture
def ids():
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def compressed(dense_dir, sparsity, rank=RANK, **kwargs):
    config = hf_slr.SLRConfig(method="magnitude_svd", sparsity=sparsity, rank=rank, **kwargs)
    return AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=config)


def train(model, ids, steps=3):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def slr_layers(model):
    return {name: module for name, module in model.named_modules() if isinstance(module, hf_slr.SLRLinear)}


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("mode, r", [("factors", None), ("factors", 6), ("extra", None)])
def test_initial_output_unchanged(dense_dir, ids, sparsity, mode, r):
    model = compressed(dense_dir, sparsity)
    reference = logits(model, ids)
    peft_model = get_slr_peft_model(model, r=r, mode=mode)
    assert (logits(peft_model, ids) - reference).abs().max() <= 1e-6
    layer = peft_model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer, SLRLoraLinear) and layer.lora_A["default"].weight.shape[0] == (r or RANK)


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("mode", ["factors", "extra"])
def test_training_changes_only_the_adapter(dense_dir, ids, sparsity, mode):
    model = compressed(dense_dir, sparsity)
    factors = sum(layer.U.numel() + layer.V.numel() for layer in slr_layers(model).values())
    peft_model = get_slr_peft_model(model, mode=mode)
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == factors
    if mode == "factors":  # A = V, B = U: the factors arrive balanced from Algorithm.run
        layer = peft_model.get_base_model().model.layers[1].mlp.down_proj
        assert torch.allclose(layer.lora_A["default"].weight, layer.base_layer.V, rtol=1e-6, atol=0)
        assert torch.allclose(layer.lora_B["default"].weight, layer.base_layer.U, rtol=1e-6, atol=0)

    before = {name: t.clone() for name, t in peft_model.state_dict().items()}
    train(peft_model, ids)
    after = peft_model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {name for name in before if ".lora_A." in name or ".lora_B." in name}
    # S values, support buffers, U and V of the base layers, norms and embeddings are among the unchanged.
    assert any("sparse_values" in name for name in before) and any(name.endswith(".base_layer.U") for name in before)


@pytest.mark.parametrize("mode", ["factors", "extra"])
def test_adapter_save_and_load(dense_dir, ids, tmp_path, mode):
    peft_model = train(get_slr_peft_model(compressed(dense_dir, "2:4"), mode=mode), ids)
    peft_model.save_pretrained(tmp_path)
    loaded = load_slr_peft_model(compressed(dense_dir, "2:4"), tmp_path)
    assert torch.equal(logits(loaded, ids), logits(peft_model, ids))


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize(
    "mode, r, merged_rank", [("factors", None, RANK), ("factors", 6, 6), ("extra", None, 2 * RANK)]
)
def test_merge_save_and_reload(dense_dir, ids, tmp_path, sparsity, mode, r, merged_rank):
    peft_model = train(get_slr_peft_model(compressed(dense_dir, sparsity), r=r, mode=mode), ids)
    tuned = logits(peft_model, ids)
    merged = peft_model.merge_and_unload()
    layers = slr_layers(merged)
    assert not any(isinstance(module, SLRLoraLinear) for module in merged.modules())
    assert {name: layer.rank for name, layer in layers.items()} == dict.fromkeys(layers, merged_rank)
    assert (logits(merged, ids) - tuned).abs().max() <= 1e-5

    hf_slr.save_pretrained(merged, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert all(layer.rank == merged_rank for layer in slr_layers(reloaded).values())
    assert torch.equal(logits(reloaded, ids), logits(merged, ids))


def test_new_lora_on_a_sparse_only_checkpoint(dense_dir, ids, tmp_path):
    """The papers' sequential baseline: S alone (rank 0), then a new LoRA; merging gives U V of its rank."""
    model = compressed(dense_dir, "2:4", rank=0)
    reference = logits(model, ids)
    peft_model = get_slr_peft_model(model, r=RANK, mode="extra")
    assert torch.equal(logits(peft_model, ids), reference)  # B starts at zero
    tuned = logits(train(peft_model, ids), ids)
    assert (tuned - reference).abs().max() > 1e-3
    merged = peft_model.merge_and_unload()
    assert all(layer.rank == RANK for layer in slr_layers(merged).values())
    assert (logits(merged, ids) - tuned).abs().max() <= 1e-5
    hf_slr.save_pretrained(merged, tmp_path / "merged")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), ids), logits(merged, ids))


def test_disable_unmerge_and_delta_weight(dense_dir, ids):
    model = compressed(dense_dir, 0.5)
    reference = logits(model, ids)
    peft_model = train(get_slr_peft_model(model), ids)
    tuned = logits(peft_model, ids)
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model, ids), reference)

    layer = peft_model.get_base_model().model.layers[0].self_attn.o_proj
    u, v = layer.base_layer.U, layer.base_layer.V
    x = torch.randn(3, layer.in_features)
    expected = x @ (layer.base_layer.to_dense() + layer.get_delta_weight("default")).T
    assert torch.allclose(layer(x), expected, atol=1e-5)

    peft_model.merge_adapter()
    assert (logits(peft_model, ids) - tuned).abs().max() <= 1e-5
    peft_model.unmerge_adapter()
    assert layer.base_layer.U is u and layer.base_layer.V is v
    assert torch.equal(logits(peft_model, ids), tuned)


def test_storage_dtype(dense_dir, ids, tmp_path):
    """bfloat16 S, U, V under float32 activations: the adapter trains in float32, merges back in bfloat16."""
    model = compressed(dense_dir, "2:4", storage_dtype="bfloat16")
    reference = logits(model, ids)
    peft_model = get_slr_peft_model(model)
    assert peft_model.get_base_model().model.layers[0].mlp.up_proj.lora_A["default"].weight.dtype == torch.float32
    assert (logits(peft_model, ids) - reference).abs().max() <= 1e-6
    merged = train(peft_model, ids).merge_and_unload()
    assert all(layer.U.dtype == torch.bfloat16 for layer in slr_layers(merged).values())
    hf_slr.save_pretrained(merged, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.equal(logits(reloaded, ids), logits(merged, ids))


def test_gradient_checkpointing(dense_dir, ids):
    grads = []
    for checkpointing in (False, True):
        peft_model = get_slr_peft_model(compressed(dense_dir, "2:4"))
        if checkpointing:
            peft_model.activation_checkpointing_enable()
        peft_model.train()
        peft_model(ids, labels=ids).loss.backward()
        grads.append({name: p.grad for name, p in peft_model.named_parameters() if p.requires_grad})
    assert peft_model.get_base_model().model.layers[0].gradient_checkpointing
    assert all(grads[1][name] is not None and torch.allclose(grads[1][name], g) for name, g in grads[0].items())


def test_errors(dense_dir):
    model = compressed(dense_dir, 0.5)
    with pytest.raises(ValueError, match="no SLRLinear layers"):
        get_slr_peft_model(LlamaForCausalLM.from_pretrained(dense_dir))
    for r in (0, -1, 2.5):
        with pytest.raises(ValueError, match="`r` must be an int > 0"):
            get_slr_peft_model(model, r=r)
    with pytest.raises(ValueError, match="`mode` must be one of"):
        get_slr_peft_model(model, mode="dense")
    with pytest.raises(ValueError, match="matches no SLRLinear layer"):
        get_slr_peft_model(model, target_modules=["lm_head"])
    with pytest.raises(ValueError, match="is set by `mode`"):
        get_slr_peft_model(model, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="needs a LoRA rank >= the layer's rank 4"):
        get_slr_peft_model(model, r=2)


def _factor_norms(layer):
    return torch.linalg.vector_norm(layer.lora_B["default"].weight, dim=0), torch.linalg.vector_norm(
        layer.lora_A["default"].weight, dim=1
    )


@pytest.mark.parametrize("lora_alpha", [None, 32])
def test_factors_init_balances_unbalanced_checkpoints(dense_dir, ids, lora_alpha):
    """Checkpoints saved before Algorithm.run balanced U, V: the adapter starts balanced anyway
    (A = V', B = U' / scaling with ||U'[:, c]|| = ||V'[c, :]||) and the output is unchanged."""
    model = compressed(dense_dir, "2:4")
    scales = torch.logspace(-4, 4, RANK)
    with torch.no_grad():
        for layer in slr_layers(model).values():
            layer.U.mul_(scales)
            layer.V.div_(scales[:, None])
    reference = logits(model, ids)
    peft_model = get_slr_peft_model(model, lora_alpha=lora_alpha)
    assert (logits(peft_model, ids) - reference).abs().max() <= 1e-5
    layer = peft_model.get_base_model().model.layers[0].self_attn.v_proj
    b_norm, a_norm = _factor_norms(layer)
    assert torch.allclose(b_norm * layer.scaling["default"], a_norm, rtol=1e-5)


def test_zero_components_start_at_zero_and_learn(dense_dir, ids):
    """A zero component of U V gets PEFT's padding init (Kaiming A row, zero B column): the output
    is unchanged and, unlike a zero row and a zero column, it receives a gradient."""
    model = compressed(dense_dir, 0.5)
    target = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        target.U[:, 1] = 0
    reference = logits(model, ids)
    peft_model = get_slr_peft_model(model)
    assert (logits(peft_model, ids) - reference).abs().max() <= 1e-6
    layer = peft_model.get_base_model().model.layers[0].mlp.up_proj
    assert layer.lora_A["default"].weight[1].abs().sum() > 0 and not layer.lora_B["default"].weight[:, 1].any()
    peft_model.train()
    peft_model(ids, labels=ids).loss.backward()
    assert layer.lora_B["default"].weight.grad[:, 1].abs().sum() > 0


def _first_step_gradient_norm(method, tokenizer, method_kwargs):
    """The LoRA (factors mode) gradient norm of one loss on a tiny Llama compressed at 2:4 + r4.

    Its RMSNorm weights are scaled by 10, as trained LLMs have large-activation channels: the
    Hessian's scale is what unbalances whitened factors (U x sqrt(lambda), V / sqrt(lambda))."""
    model = tiny_model()
    with torch.no_grad():
        for block in model.model.layers:
            block.input_layernorm.weight.mul_(10)
            block.post_attention_layernorm.weight.mul_(10)
    config = hf_slr.SLRConfig(
        method=method, sparsity="2:4", rank=4, dataset=TEXTS, n_samples=8, seq_len=32, method_kwargs=method_kwargs
    )
    peft_model = get_slr_peft_model(hf_slr.compress(model, config, tokenizer)).train()
    batch = calibration_ids(TEXTS, tokenizer, 4, 16, seed=3)
    peft_model(batch, labels=batch).loss.backward()
    return float(torch.stack([p.grad.norm() for p in peft_model.parameters() if p.requires_grad]).norm())


def test_first_step_gradient_norm_does_not_depend_on_the_method(tokenizer):
    """Unbalanced (singular values and the Hessian's scale in U) this was 140-270x magnitude_svd's
    for HASSLE-free and 3BASiL on this model (two seeds); balanced it is 0.4-1.3x."""
    reference = _first_step_gradient_norm("magnitude_svd", tokenizer, {})
    for method, kwargs in [("hassle_free", {"iterations": 5}), ("threebasil", {"max_iterations": 30, "min_iterations": 10})]:
        norm = _first_step_gradient_norm(method, tokenizer, kwargs)
        assert reference / 10 < norm < 10 * reference, (method, norm, reference)


def test_recovery_training_arguments_and_alpaca(tokenizer, tmp_path):
    args = recovery_training_arguments(tmp_path, max_steps=50, seed=3)
    assert args.learning_rate == DEFAULT_LEARNING_RATE and args.warmup_steps == 5 and args.seed == 3
    assert args.max_grad_norm == 1.0 and args.save_strategy == "no" and not args.remove_unused_columns
    rows = alpaca_dataset(tokenizer, seq_len=48)
    assert len(rows) == 335 and all(len(row["input_ids"]) == len(row["labels"]) <= 48 for row in rows)
    assert all(row["labels"][0] == -100 for row in rows)  # the prompt is not scored
    assert any(label != -100 for row in rows for label in row["labels"])


def test_text_dataset_scores_every_token_of_segments_other_than_the_calibration(tokenizer):
    documents = [" ".join(WORDS[(i * 3 + j * 7) % len(WORDS)] for j in range(40 + i)) for i in range(20)]
    rows = text_dataset(tokenizer, documents, n_samples=6, seq_len=32)
    assert len(rows) == 6 and all(row["labels"] == row["input_ids"] and len(row["input_ids"]) == 32 for row in rows)
    assert all(row["attention_mask"] == [1] * 32 for row in rows)
    encoded = [tokenizer(text).input_ids for text in documents]
    windows = {tuple(ids[i : i + 32]) for ids in encoded for i in range(len(ids) - 31)}
    assert all(tuple(row["input_ids"]) in windows for row in rows)  # each a window of one document
    calibration = calibration_ids(documents, tokenizer, n_samples=6, seq_len=32).tolist()
    assert [row["input_ids"] for row in rows] != calibration
    with pytest.raises(ValueError, match="dataset"):
        text_dataset(tokenizer, "no-such-corpus", n_samples=2, seq_len=8)
