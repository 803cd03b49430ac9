"""Peak resident memory of `hf-slr compress`: streamed (default) vs in memory (--in-memory).

Random Llama models (hidden 512) with 4 and 24 layers are saved, then compressed by the CLI in a
fresh process each; the peak RSS (ru_maxrss of the child) is compared with the dense checkpoint's
bytes. The issue's target: the growth of peak RSS from 4 to 24 layers <= 0.25x the growth of the
model's bytes. ``--smollm2`` adds the real model (a data-aware method, small calibration).

    python benchmarks/streaming_memory.py [--smollm2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

MIB = 2**20


def _measure(source: Path, out: Path, args: list[str], in_memory: bool) -> float:
    """Peak RSS (MiB) of one `hf-slr compress` process, read by a fresh parent so that no earlier
    child's peak counts."""
    command = [sys.executable, "-m", "hf_slr.cli", "compress", str(source), "--out", str(out), *args]
    command += ["--in-memory"] if in_memory else []
    code = f"import resource, subprocess, sys; subprocess.run({command!r}, check=True, capture_output=True); " \
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(result.stdout.split()[-1]) / 1024


def _checkpoint_mib(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors")) / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", action="store_true", help="also measure SmolLM2-135M (wanda, 32 x 512 calibration)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for layers in (4, 24):
            torch.manual_seed(0)
            config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=layers, num_attention_heads=8,
                                 num_key_value_heads=8, vocab_size=32000, max_position_embeddings=512)
            source = work / f"dense-{layers}"
            AutoModelForCausalLM.from_config(config).save_pretrained(source)
            method = ["--method", "magnitude_svd", "--sparsity", "0.5", "--rank", "16"]
            rows[layers] = {
                "checkpoint_mib": _checkpoint_mib(source),
                "streamed_peak_mib": _measure(source, work / f"s{layers}", method, in_memory=False),
                "in_memory_peak_mib": _measure(source, work / f"m{layers}", method, in_memory=True),
            }
            print(layers, "layers:", {k: round(v, 1) for k, v in rows[layers].items()}, flush=True)
        model_growth = rows[24]["checkpoint_mib"] - rows[4]["checkpoint_mib"]
        for kind in ("streamed", "in_memory"):
            growth = rows[24][f"{kind}_peak_mib"] - rows[4][f"{kind}_peak_mib"]
            rows[f"{kind}_growth_ratio"] = growth / model_growth
            print(f"{kind}: peak RSS growth 4 -> 24 layers = {growth:.0f} MiB = {growth / model_growth:.2f}x the model's growth "
                  f"({model_growth:.0f} MiB)")
        if args.smollm2:
            from hf_slr.testing import demo_model_path

            source = Path(demo_model_path())
            calibration = ["--method", "wanda", "--sparsity", "2:4", "--n-samples", "32", "--seq-len", "512"]
            rows["smollm2"] = {
                "checkpoint_mib": _checkpoint_mib(source),
                "streamed_peak_mib": _measure(source, work / "smol-s", calibration, in_memory=False),
                "in_memory_peak_mib": _measure(source, work / "smol-m", calibration, in_memory=True),
            }
            print("SmolLM2-135M:", {k: round(v, 1) for k, v in rows["smollm2"].items()})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
