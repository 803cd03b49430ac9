"""`torchrun --nproc-per-node 2 hf-slr compress` (gloo on CPU): rows sharded, Hessians all-reduced,
Linears partitioned across ranks; the result equals one process's up to float summation order."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_compression import TEXTS, tiny_model, tokenizer  # noqa: F401  (tokenizer is a fixture)
from transformers import AutoModelForCausalLM

from hf_slr.compression import distributed

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def test_largest_first_partition_balances_the_ranks(monkeypatch):
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    shapes = {"q": (64, 64), "k": (16, 64), "v": (16, 64), "o": (64, 64), "gate": (128, 64), "up": (128, 64), "down": (64, 128)}
    owner = distributed.owners(shapes)
    load = [sum(shapes[n][0] * shapes[n][1] for n in owner if owner[n] == r) for r in (0, 1)]
    assert (owner["down"], owner["gate"], owner["up"]) == (0, 1, 0)  # equal sizes by name, ties to the lowest rank
    assert abs(load[0] - load[1]) <= 64 * 64


@pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun not installed")
def test_two_processes_give_the_one_process_result(tmp_path, tokenizer):
    dense = tmp_path / "dense"
    tiny_model("llama", layers=3).save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    (tmp_path / "calib.jsonl").write_text("\n".join(f'{{"text": "{text}"}}' for text in TEXTS))
    args = ["compress", str(dense), "--method", "wanda", "--sparsity", "0.5", "--calib", str(tmp_path / "calib.jsonl"),
            "--n-samples", "8", "--seq-len", "16"]
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "hf_slr.cli", *args, "--out", str(tmp_path / "one")], env=environment,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([TORCHRUN, "--nproc-per-node", "2", "--master-port", "29531", "-m", "hf_slr.cli", *args,
                          "--out", str(tmp_path / "two")], env=environment, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert set(a) == set(b)
    masks = [key for key in a if key.endswith("sparse_mask")]
    assert masks and all(torch.equal(a[key], b[key]) for key in masks)  # wanda: the same supports
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(tmp_path / run)(ids).logits for run in ("one", "two")]
    assert ((logits[0] - logits[1]).abs().max() / logits[0].abs().max()) < 1e-3
