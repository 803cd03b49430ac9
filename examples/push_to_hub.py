"""Compress a model and share it on the Hub with its SLR model card.

    python examples/push_to_hub.py USER/REPO [--model DIR] [--method magnitude_svd] [--sparsity 2:4] [--rank 16]

Needs a Hub token (`huggingface-cli login` or HF_TOKEN). Uploads exactly what
``hf_slr.save_pretrained`` writes: config.json, safetensors, tokenizer, README.md, slr_report.json.
"""

from __future__ import annotations

import argparse

from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_slr
from hf_slr.testing import demo_model_path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo_id")
    parser.add_argument("--model", default=None, help="dense HF folder or Hub id (default: SmolLM2-135M)")
    parser.add_argument("--method", default="magnitude_svd", choices=hf_slr.algorithms.available())
    parser.add_argument("--sparsity", default="2:4")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args()

    model_dir = args.model or demo_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sparsity = args.sparsity if ":" in args.sparsity else float(args.sparsity)
    config = hf_slr.SLRConfig(method=args.method, sparsity=sparsity, rank=args.rank, tokenizer=tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config)
    commit = hf_slr.push_to_hub(model, args.repo_id, tokenizer=tokenizer, private=args.private or None)
    print(commit)


if __name__ == "__main__":
    main()
