"""Wall time of `hf-slr compress` in one process vs `torchrun --nproc-per-node 2` (gloo, CPU), one
thread per process, and how far the two outputs are apart.

    python benchmarks/distributed_speed.py [--layers 24] [--method wanda] [--smollm2] [--repeat 2]

The issue's target: 2 processes x 1 thread <= 0.8x the wall time of 1 process x 1 thread. Each
configuration runs ``--repeat`` times and the best time counts (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig


def _run(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return time.perf_counter() - start


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--smollm2", action="store_true", help="the real model instead of a random one")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        if args.smollm2:
            from hf_slr.testing import demo_model_path

            source = Path(demo_model_path())
        else:
            source = work / "dense"
            config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=args.layers, num_attention_heads=8,
                                 num_key_value_heads=8, vocab_size=49152, max_position_embeddings=1024)
            AutoModelForCausalLM.from_config(config).save_pretrained(source)
            from hf_slr.testing import demo_model_path

            AutoTokenizer.from_pretrained(demo_model_path()).save_pretrained(source)
        common = ["compress", str(source), "--method", args.method, "--sparsity", "0.5", "--n-samples", "32", "--seq-len", "256"]
        times = {"one": [], "two": []}
        for attempt in range(args.repeat):
            for kind in ("one", "two"):
                out = work / f"{kind}{attempt}"
                if kind == "one":
                    command = [sys.executable, "-m", "hf_slr.cli", *common, "--out", str(out)]
                else:
                    command = [torchrun, "--nproc-per-node", "2", "--master-port", "29533", "-m", "hf_slr.cli", *common, "--out", str(out)]
                times[kind].append(_run(command))
                print(kind, attempt, f"{times[kind][-1]:.1f} s", flush=True)
        one, two = _tensors(work / "one0"), _tensors(work / "two0")
        masks = [key for key in one if key.endswith("sparse_mask")]
        differing = sum(not torch.equal(one[key], two[key]) for key in masks)
        popcount = torch.tensor([bin(byte).count("1") for byte in range(256)])
        bits = sum(int(popcount[(one[key] ^ two[key]).long()].sum()) for key in masks)
        total_bits = sum(one[key].numel() * 8 for key in masks)
        ids = torch.arange(64).reshape(2, 32)
        with torch.no_grad():
            logits = [AutoModelForCausalLM.from_pretrained(work / run)(ids).logits for run in ("one0", "two0")]
        relative = float((logits[0] - logits[1]).abs().max() / logits[0].abs().max())
    result = {
        "model": "SmolLM2-135M" if args.smollm2 else f"random Llama, hidden 512, {args.layers} layers",
        "method": args.method,
        "one_process_s": min(times["one"]),
        "two_processes_s": min(times["two"]),
        "ratio": min(times["two"]) / min(times["one"]),
        "masks_differing": f"{differing} / {len(masks)}",
        "mask_bits_differing": bits / max(total_bits, 1),
        "max_relative_logit_difference": relative,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
