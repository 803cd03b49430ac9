"""Bad input is refused before any long work, naming the field and the allowed values; a save never
destroys a user's data, even when killed; equal runs give byte-identical files."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from test_compression import TEXTS, tiny_model, tokenizer  # noqa: F401  (tokenizer is a fixture)
from transformers import AutoModelForCausalLM, GPT2Config

import hf_slr
from hf_slr import SLRConfig
from hf_slr.compression.plan import plan_compression

RATIO = {"compression_ratio": 0.5, "rank_ratio": 0.2}
# SLRConfig(**kwargs) must raise ValueError matching the text.
BAD_CONFIGS = [
    (dict(method="nope"), "`method` must be one of"),
    (dict(method=3), "`method` must be one of"),
    (dict(sparsity=1.0), "`sparsity` must be a float in \\[0, 1\\)"),
    (dict(sparsity=-0.1), "`sparsity` must be a float in \\[0, 1\\)"),
    (dict(sparsity=True), "`sparsity` must be a float in \\[0, 1\\)"),
    (dict(sparsity="4:2"), "0 < N < M"),
    (dict(sparsity="0:4"), "0 < N < M"),
    (dict(sparsity="half"), "'N:M' pattern"),
    (dict(rank=-1), "`rank` must be an int >= 0"),
    (dict(rank=2.5), "`rank` must be an int >= 0"),
    (dict(rank=True), "`rank` must be an int >= 0"),
    (dict(rank="8"), "`rank` must be an int >= 0"),
    (dict(compression_ratio=1.5, rank_ratio=0.3), "`compression_ratio` must be a float in \\(0, 1\\)"),
    (dict(compression_ratio=0, rank_ratio=0.3), "`compression_ratio` must be a float in \\(0, 1\\)"),
    (dict(compression_ratio=float("nan"), rank_ratio=0.3), "`compression_ratio` must be a float in \\(0, 1\\)"),
    (dict(compression_ratio=True, rank_ratio=0.3), "`compression_ratio` must be a float in \\(0, 1\\)"),
    (dict(compression_ratio=0.5, rank=8, sparsity="2:8"), "exclusive"),
    (dict(compression_ratio=0.5, sparsity=0.5, rank_ratio=0.3), "exclusive for unstructured"),
    (dict(compression_ratio=0.6, sparsity="2:4"), "keeps fewer parameters than the 2:4 pattern"),
    (dict(compression_ratio=0.4, sparsity="2:4", rank_ratio=0.1), "`rank_ratio` applies to unstructured sparsity only"),
    (dict(rank_ratio=0.3), "`rank_ratio` needs `compression_ratio`"),
    (dict(compression_ratio=0.5, rank_ratio=1.3), "`rank_ratio` must be a float in \\[0, 1\\]"),
    (dict(compression_ratio=0.5, rank_ratio=True), "`rank_ratio` must be a float in \\[0, 1\\]"),
    (dict(n_samples=0), "`n_samples` must be an int > 0"),
    (dict(n_samples=True), "`n_samples` must be an int > 0"),
    (dict(seq_len="long"), "`seq_len` must be an int > 0"),
    (dict(seq_len=-5), "`seq_len` must be an int > 0"),
    (dict(seed=1.5), "`seed` must be an int"),
    (dict(seed=True), "`seed` must be an int"),
    (dict(storage_dtype="int8"), "`storage_dtype` must be one of"),
    (dict(storage_dtype="float64"), "`storage_dtype` must be one of"),
    (dict(method_kwargs={"iterations": 3}), "`method_kwargs` of method 'magnitude_svd' has unknown name"),
    (dict(method="oats", method_kwargs={"iterations": 0}), "`method_kwargs\\['iterations'\\]` of method 'oats' must be an int >= 1, got 0"),
    (dict(method="oats", method_kwargs={"iterations": "3"}), "`method_kwargs\\['iterations'\\]` of method 'oats'"),
    (dict(method="oats", method_kwargs={"iterations": np.int64(3)}), "`method_kwargs\\['iterations'\\]` of method 'oats'"),
    (dict(method="oats", method_kwargs={"iterations": True}), "`method_kwargs\\['iterations'\\]` of method 'oats'"),
    (dict(method="qr_rpca", method_kwargs={"iterations": 0}), "of method 'qr_rpca' must be an int >= 1"),
    (dict(method="hassle_free", method_kwargs={"iterations": 0}), "of method 'hassle_free' must be an int >= 1"),
    (dict(method="sparsegpt", method_kwargs={"blocksize": 0}), "`method_kwargs\\['blocksize'\\]` of method 'sparsegpt'"),
    (dict(method="sparsegpt", method_kwargs={"percdamp": -0.1}), "`method_kwargs\\['percdamp'\\]` of method 'sparsegpt'"),
    (dict(method="threebasil", method_kwargs={"rho": 0}), "`method_kwargs\\['rho'\\]` of method 'threebasil'"),
    (dict(method="threebasil", method_kwargs={"min_iterations": 9, "max_iterations": 3}), "`method_kwargs\\['min_iterations'\\]`"),
    (dict(method="hassle_free", method_kwargs={"lowrank_step": "adam"}), "one of \\['gd', 'closed_form'\\]"),
    (dict(method="sslc", method_kwargs={"preserve_fraction": 1.5}), "`method_kwargs\\['preserve_fraction'\\]` of method 'sslc'"),
    (dict(method="oats", method_kwargs={"scope": "column"}), "`method_kwargs\\['scope'\\]` of method 'oats'"),
    (dict(method="oats", method_kwargs="iterations=3"), "`method_kwargs` of method 'oats' must be a dict"),
    (dict(tm_lr=0), "`tm_kwargs\\['lr'\\]` of transformer matching must be a finite float > 0"),
    (dict(tm_lr=float("inf")), "`tm_kwargs\\['lr'\\]` of transformer matching"),
    (dict(tm_kwargs={"epochs": 0}), "`tm_kwargs\\['epochs'\\]` of transformer matching must be an int >= 1"),
    (dict(tm_kwargs={"steps": 3}), "`tm_kwargs` of transformer matching has unknown name"),
    (dict(transformer_matching="yes"), "`transformer_matching` must be a bool"),
    (dict(allocation="random"), "`allocation` must be one of"),
    (dict(allocation="owl", sparsity="2:4", rank=4), "needs `compression_ratio`"),
    (dict(allocation_kwargs={"lam": 0.1}), "allocation 'uniform' must be empty"),
    (dict(RATIO, allocation="learned", allocation_kwargs={"steps": 0}), "`allocation_kwargs\\['steps'\\]` of allocation 'learned'"),
    (dict(RATIO, allocation="learned", allocation_kwargs={"xi_warmup": 0.9}), "xi_anneal"),
    (dict(RATIO, allocation="owl", allocation_kwargs={"lam": 0.9}), "`allocation_kwargs\\['lam'\\]` of allocation 'owl'"),
    (dict(dataset=3), "`dataset` must be"),
    (dict(dataset=[]), "`dataset` must be"),
    (dict(dataset=["a", 3]), "`dataset` must be"),
    (dict(modules_to_not_convert="q_proj"), "got the string 'q_proj' \\(write \\['q_proj'\\]\\)"),
    (dict(modules_to_not_convert=[3]), "`modules_to_not_convert` must be a list of module names"),
    (dict(tokenizer=3), "`tokenizer` must be a name, a path or a tokenizer object"),
    (dict(learning_rate=1e-3), "unknown fields \\['learning_rate'\\]"),
    (dict(quant_method="gptq"), "`quant_method` of an SLRConfig must be 'slr', got 'gptq'"),
    (dict(method="wanda", rank=8), "method 'wanda' prunes only"),
    (dict(method="sparsegpt", compression_ratio=0.5, rank_ratio=0.3), "method 'sparsegpt' prunes only"),
    (dict(method="wanda", sparsity="2:4", compression_ratio=0.4), "`compression_ratio` must be 0.5"),
    (dict(base_model=3), "`base_model` must be a model name or None"),
]


@pytest.mark.parametrize("kwargs, message", BAD_CONFIGS, ids=[str(k)[:60] for k, _ in BAD_CONFIGS])
def test_bad_configs_are_refused_when_built_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SLRConfig(**kwargs)


def test_quant_method_survives_from_dict_only_for_slr():
    with pytest.raises(ValueError, match="got 'gptq'"):
        SLRConfig.from_dict({"quant_method": "gptq", "method": "wanda"})


# Checks against the model, run by plan_compression before any weight loads.
BAD_PLANS = [
    (dict(sparsity="1:3"), ValueError, "`sparsity`='1:3' needs in_features divisible by 3"),
    (dict(method="oats", rank=40), ValueError, "The rank 40 set by `rank`"),
    (dict(dataset="missing/calibration.jsonl"), FileNotFoundError, "`dataset`='missing/calibration.jsonl'"),
    (dict(dataset="wikitext"), ValueError, "Unknown `dataset`='wikitext'"),
    (dict(seq_len=65), ValueError, "`seq_len`=65 exceeds the model's max_position_embeddings=64"),
    (dict(n_samples=10**9), ValueError, "`n_samples`=1000000000 x `seq_len`=16 needs about"),
    (dict(modules_to_not_convert=["q_prj"]), ValueError, "`modules_to_not_convert` names \\['q_prj'\\], which match no module"),
    (dict(modules_to_not_convert=["self_attn", "mlp"]), ValueError, "No projection layer"),
]


@pytest.mark.parametrize("overrides, error, message", BAD_PLANS, ids=[str(o) for o, _, _ in BAD_PLANS])
def test_bad_requests_for_a_model_are_refused_before_any_work(overrides, error, message, tokenizer):
    fields = dict(method="wanda", sparsity=0.5, dataset=TEXTS, n_samples=6, seq_len=16, tokenizer=tokenizer)
    with pytest.raises(error, match=message):
        plan_compression(tiny_model("llama"), SLRConfig(**(fields | overrides)))


def test_an_already_compressed_model_is_refused(tokenizer):
    model = hf_slr.compress(tiny_model("llama"), SLRConfig(method="magnitude_svd", rank=2))
    with pytest.raises(ValueError, match="is already SLR-compressed"):
        hf_slr.compress(model, SLRConfig(method="magnitude_svd", rank=2))


def test_a_model_without_tokenizer_for_a_data_method_is_refused():
    with pytest.raises(ValueError, match="`tokenizer`"):
        plan_compression(tiny_model("llama"), SLRConfig(method="wanda", dataset=TEXTS, n_samples=2, seq_len=8))


def test_nan_weights_are_refused_naming_the_module():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj: method 'magnitude_svd' failed: .*NaN"):
        hf_slr.compress(model, SLRConfig(method="magnitude_svd", rank=2))


def test_gpt2_conv1d_projections_compress_save_and_reload(tokenizer, tmp_path):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=22, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    model = AutoModelForCausalLM.from_config(config).eval()
    dense = {name: module.weight.T.clone() for name, module in model.named_modules() if name.endswith("c_fc")}
    request = SLRConfig(method="wanda", sparsity=0.5, dataset=TEXTS, n_samples=4, seq_len=16, tokenizer=tokenizer)
    hf_slr.compress(model, request)
    layers = {name for name, module in model.named_modules() if isinstance(module, hf_slr.SLRLinear)}
    assert {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"} <= layers and len(layers) == 8
    for name, weight in dense.items():  # S is W on its support: the Conv1D weight was read as W = weight^T
        layer = model.get_submodule(name)
        assert torch.equal(layer.sparse_weight()[layer.support()], weight[layer.support()])
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        compressed = model(ids).logits
        reloaded = AutoModelForCausalLM.from_pretrained(hf_slr.save_pretrained(model, tmp_path / "gpt2")).eval()
        assert torch.equal(reloaded(ids).logits, compressed)
        assert torch.allclose(model.dequantize()(ids).logits, compressed, atol=1e-5)


# --- saving never destroys a user's data ---------------------------------------------------------


def _compressed(seed=0):
    torch.manual_seed(seed)
    return hf_slr.compress(tiny_model("llama", seed=seed), SLRConfig(method="magnitude_svd", sparsity=0.5, rank=2))


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["folder", "cwd"])
def test_a_save_into_a_users_non_empty_folder_is_refused_and_touches_nothing(tmp_path, monkeypatch, where):
    folder = tmp_path / "work"
    (folder / "notes").mkdir(parents=True)
    (folder / "notes" / "thesis.txt").write_text("years of work")
    (folder / "config.json").write_text("{}")
    before = _digest(folder)
    monkeypatch.chdir(folder)
    with pytest.raises(FileExistsError, match="not an hf_slr checkpoint"):
        hf_slr.save_pretrained(_compressed(), folder if where == "folder" else ".")
    assert _digest(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_a_save_into_a_file_path_is_refused(tmp_path):
    (tmp_path / "model").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        hf_slr.save_pretrained(_compressed(), tmp_path / "model")


def test_saving_a_dense_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not SLR-compressed"):
        hf_slr.save_pretrained(tiny_model("llama"), tmp_path / "dense")


def test_overwriting_a_checkpoint_keeps_the_users_files_and_replaces_stale_shards(tmp_path):
    folder = hf_slr.save_pretrained(_compressed(0), tmp_path / "slr")
    (folder / "my_notes.md").write_text("mine")
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"stale shard of the old checkpoint")
    model = _compressed(1)
    hf_slr.save_pretrained(model, folder)
    assert (folder / "my_notes.md").read_text() == "mine"
    assert not (folder / "model-00002-of-00002.safetensors").exists()
    assert oct(folder.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    ids = torch.arange(10).reshape(2, 5)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(folder)(ids).logits, model(ids).logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slr"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    import hf_slr
    from hf_slr import SLRConfig, atomic
    from test_compression import tiny_model

    point, target, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.manual_seed(seed)
    model = hf_slr.compress(tiny_model("llama", seed=seed), SLRConfig(method="magnitude_svd", sparsity=0.5, rank=2))

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "weights":  # while transformers writes the safetensors file
        import transformers.modeling_utils
        transformers.modeling_utils.safe_save_file = die
    elif point == "card":
        import hf_slr.serialization as serialization
        serialization.plot_allocation = die
        model.slr_report["allocation"] = {{"x": 1}}
    elif point == "fsync":
        atomic.fsync_tree = die
    elif point == "swap":
        atomic._exchange = die
    elif point == "aside":  # the fallback without RENAME_EXCHANGE: killed between its two renames
        atomic._exchange = lambda first, second: False
        rename = os.rename
        calls = []
        def rename_then_die(source, destination):
            rename(source, destination)
            calls.append(source)
            if len(calls) == 1:
                die()
        atomic.os.rename = rename_then_die
    elif point == "cleanup":
        atomic.shutil.rmtree = die
    hf_slr.save_pretrained(model, target)
    """
)


@pytest.mark.parametrize(
    "point, existing",
    [(point, False) for point in ("weights", "card", "fsync", "cleanup")]
    + [(point, True) for point in ("weights", "card", "fsync", "swap", "aside", "cleanup")],
)
def test_a_killed_save_leaves_the_old_or_the_new_checkpoint_and_the_next_save_cleans_up(tmp_path, point, existing):
    script = tmp_path / "save.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent)))
    target = tmp_path / "out" / "slr"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "neighbour.txt").write_text("not ours")
    if existing:
        hf_slr.save_pretrained(_compressed(0), target)
        (target / "my_notes.md").write_text("mine")
    old = _digest(target) if existing else None
    result = subprocess.run([sys.executable, str(script), point, str(target), "1"], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert (tmp_path / "out" / "neighbour.txt").read_text() == "not ours"

    hf_slr.atomic.recover(target)  # what the next save does first
    if target.exists():
        now = _digest(target)
        new_model = _compressed(1)
        if now != old:  # the new checkpoint, complete, with the user's file kept
            ids = torch.arange(10).reshape(2, 5)
            with torch.no_grad():
                assert torch.equal(AutoModelForCausalLM.from_pretrained(target)(ids).logits, new_model(ids).logits)
        if existing:
            assert (target / "my_notes.md").read_text() == "mine"
    else:
        assert not existing, "the old checkpoint was lost"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(["neighbour.txt"] + (["slr"] if target.exists() else []))


def test_equal_runs_write_byte_identical_files(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        torch.set_num_threads(1)
        import hf_slr
        from test_compression import tiny_model
        model = hf_slr.compress(tiny_model("llama"), hf_slr.SLRConfig(method="magnitude_svd", sparsity="2:4", rank=2))
        hf_slr.save_pretrained(model, sys.argv[1])
        """
    )
    digests = []
    for run in range(2):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"run{run}")], check=True, capture_output=True)
        digests.append(_digest(tmp_path / f"run{run}"))
        digests[-1].pop("slr_report.json")  # a log of the run: it records seconds
    assert digests[0] == digests[1] and "model.safetensors" in digests[0]
    config = json.loads((tmp_path / "run0" / "config.json").read_text())
    assert "/" not in json.dumps(config["quantization_config"]), "a local path leaked into config.json"
