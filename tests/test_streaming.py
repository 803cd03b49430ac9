"""Streamed, resumable compression (hf_slr.compress_checkpoint, hf-slr compress): the same tensors as
the in-memory path, a killed run resumes where it stopped, another job's work folder is refused."""

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_compression import TEXTS, tiny_model, tokenizer  # noqa: F401  (tokenizer is a fixture)
from transformers import AutoModelForCausalLM

import hf_slr
from hf_slr import SLRConfig

LAYERS = 4


def _request(tokenizer, method="wanda", **overrides):
    fields = dict(method=method, sparsity=0.5, dataset=TEXTS, n_samples=6, seq_len=16, tokenizer=tokenizer)
    if method == "oats":
        fields |= dict(rank=2, method_kwargs={"iterations": 2})
    return SLRConfig(**(fields | overrides))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.fixture
def dense_dir(tmp_path):
    tiny_model("llama", layers=LAYERS).save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


@pytest.mark.parametrize("method, overrides", [("wanda", {}), ("oats", {"transformer_matching": True, "tm_kwargs": {"epochs": 1}}), ("magnitude_svd", {"rank": 2})])
def test_streamed_checkpoint_equals_the_in_memory_one(dense_dir, tmp_path, tokenizer, method, overrides):
    request = _request(tokenizer, method, **overrides)
    before = request.to_dict()
    streamed = hf_slr.compress_checkpoint(dense_dir, tmp_path / "streamed", request, tokenizer=tokenizer)
    in_memory = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=request)
    saved = hf_slr.save_pretrained(in_memory, tmp_path / "in-memory", tokenizer=tokenizer)
    assert request.to_dict() == before
    a, b = _tensors(streamed), _tensors(saved)
    assert set(a) == set(b) and all(torch.equal(a[key], b[key]) for key in a)
    for name in ("config.json", "README.md"):
        assert (streamed / name).read_text() == (saved / name).read_text()
    report = json.loads((streamed / "slr_report.json").read_text())
    assert len(report["blocks"]) == LAYERS and {"seconds", "peak_rss_mib", "mean_relative_objective"} <= set(report["blocks"][0])
    reloaded = AutoModelForCausalLM.from_pretrained(streamed)
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, in_memory(ids).logits)
    assert not (tmp_path / ".streamed.partial").exists()


KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    import hf_slr
    from hf_slr.compression import driver
    from test_compression import TEXTS, WORDS
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {{"<unk>": 0, "<eos>": 1, **{{word: i + 2 for i, word in enumerate(WORDS)}}}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    kill_after, calls = int(sys.argv[3]), []
    compress_block = driver.compress_block

    def counted(*args, **kwargs):
        if len(calls) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        calls.append(args[2])
        return compress_block(*args, **kwargs)

    driver.compress_block = counted
    config = hf_slr.SLRConfig(method="oats", sparsity=0.5, rank=2, method_kwargs={{"iterations": 2}}, dataset=TEXTS,
                              n_samples=6, seq_len=16, seed=int(sys.argv[4]))
    hf_slr.compress_checkpoint(sys.argv[1], sys.argv[2], config, tokenizer=tokenizer)
    print("blocks", calls)
    """
)


def _run(script, dense_dir, out, kill_after, seed=0):
    return subprocess.run(
        [sys.executable, str(script), str(dense_dir), str(out), str(kill_after), str(seed)], capture_output=True, text=True
    )


def test_a_killed_run_resumes_at_the_first_unfinished_block_and_matches_an_uninterrupted_run(dense_dir, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN.format(tests=str(Path(__file__).parent)))
    killed = _run(script, dense_dir, tmp_path / "out", kill_after=3)  # dies when block 3 of 4 starts
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    assert json.loads((tmp_path / ".out.partial" / "progress.json").read_text())["finished"] == 3

    refused = _run(script, dense_dir, tmp_path / "out", kill_after=99, seed=1)  # another request, same --out
    assert refused.returncode != 0 and "holds an unfinished run with another calibration and request" in refused.stderr

    resumed = _run(script, dense_dir, tmp_path / "out", kill_after=99)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "blocks [3]" in resumed.stdout  # only the unfinished block is computed again
    fresh = _run(script, dense_dir, tmp_path / "fresh", kill_after=99)
    assert "blocks [0, 1, 2, 3]" in fresh.stdout
    a, b = _tensors(tmp_path / "out"), _tensors(tmp_path / "fresh")
    assert set(a) == set(b) and all(torch.equal(a[key], b[key]) for key in a)
    assert not (tmp_path / ".out.partial").exists()


def test_the_cli_streams_by_default(dense_dir, tmp_path, tokenizer, monkeypatch):
    from hf_slr import cli

    calls = []
    monkeypatch.setattr(hf_slr, "compress_checkpoint", lambda *args, **kwargs: calls.append(args) or Path(args[1]))
    monkeypatch.setattr(cli, "AutoTokenizer", None, raising=False)
    tokenizer.save_pretrained(dense_dir)
    cli.main(["compress", str(dense_dir), "--method", "magnitude_svd", "--rank", "2", "--out", str(tmp_path / "o")])
    assert calls and calls[0][0] == str(dense_dir)


def test_non_uniform_allocation_and_foreign_targets_are_refused_before_work(dense_dir, tmp_path, tokenizer):
    owl = SLRConfig(method="magnitude_svd", compression_ratio=0.5, rank_ratio=0.2, allocation="owl")
    with pytest.raises(ValueError, match="needs the whole dense model"):
        hf_slr.compress_checkpoint(dense_dir, tmp_path / "o", owl)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an hf_slr checkpoint"):
        hf_slr.compress_checkpoint(dense_dir, tmp_path / "mine", _request(tokenizer))


@pytest.mark.parametrize("method", hf_slr.algorithms.available())
def test_the_cli_compression_ratio_alone_works_for_every_method(method, dense_dir, tmp_path, tokenizer, monkeypatch):
    """``hf-slr compress --compression-ratio 0.5``: each method's own paper split (issue 16 item 2)."""
    from hf_slr import cli
    from hf_slr.allocation import uniform_target

    requests = []
    monkeypatch.setattr(hf_slr, "compress_checkpoint", lambda *args, **kwargs: requests.append(args[2]) or Path(args[1]))
    tokenizer.save_pretrained(dense_dir)
    cli.main(["compress", str(dense_dir), "--method", method, "--compression-ratio", "0.5", "--out", str(tmp_path / "o")])
    (config,) = requests
    assert config.compression_ratio == 0.5 and config.rank_ratio is None
    target = uniform_target(64, 48, config)
    assert 64 * 48 // 2 - (64 + 48) < target.kept_total(64, 48) + target.rank * (64 + 48) <= 64 * 48 // 2
