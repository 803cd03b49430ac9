"""Checkpoint size of SLR-compressed SmolLM2-135M versus the dense checkpoint and the information bound.

    python benchmarks/checkpoint_size.py [--model DIR] [--rank 32] [--sparsity 0.5 2:4]

Compresses with the data-free ``magnitude_svd`` (the size does not depend on the method), saves
with ``hf_slr.save_pretrained`` and prints bytes on disk, the bound of
``hf_slr.integration.information_bound_bytes`` and the ratios.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import AutoModelForCausalLM

import hf_slr
from hf_slr.integration import information_bound_bytes
from hf_slr.serialization import checkpoint_bytes
from hf_slr.testing import demo_model_path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="dense HF folder (default: SmolLM2-135M demo model)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--sparsity", nargs="+", default=["0.5", "2:4"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    model_dir = args.model or demo_model_path()
    dense = checkpoint_bytes(model_dir)
    print(f"dense checkpoint: {dense:,} bytes ({model_dir})")
    print(f"| sparsity | rank | dtype | bytes on disk | information bound | disk / bound | disk / dense |")
    print(f"|---|---|---|---|---|---|---|")
    for sparsity in args.sparsity:
        config = hf_slr.SLRConfig(method="magnitude_svd", sparsity=sparsity if ":" in sparsity else float(sparsity), rank=args.rank)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, dtype=getattr(torch, args.dtype))
        bound = information_bound_bytes(model)
        with tempfile.TemporaryDirectory() as tmp:
            disk = checkpoint_bytes(hf_slr.save_pretrained(model, f"{tmp}/slr"))
        print(f"| {sparsity} | {args.rank} | {args.dtype} | {disk:,} | {bound:,} | {disk / bound:.4f} | {disk / dense:.4f} |")


if __name__ == "__main__":
    main()
