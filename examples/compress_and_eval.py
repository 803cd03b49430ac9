"""The main job: compress the real SmolLM2-135M to sparse plus low-rank and report its quality.

    python examples/compress_and_eval.py [--method sparsegpt|oats|sslc|...] [--sparsity 0.5|2:4] [--rank 16]

Loads the dense model (``hf_slr.testing.demo_model_path()`` unless ``--model``), compresses it on
load through ``from_pretrained(..., quantization_config=SLRConfig(...))``, saves it with
``hf_slr.save_pretrained``, reloads it, and prints WikiText-2 perplexity before and after plus
the checkpoint sizes (dense, compressed, information bound).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_slr
from hf_slr.eval import perplexity
from hf_slr.integration import information_bound_bytes
from hf_slr.serialization import checkpoint_bytes
from hf_slr.testing import demo_model_path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="dense HF folder or Hub id (default: SmolLM2-135M)")
    parser.add_argument("--method", default="sslc", choices=hf_slr.algorithms.available())
    parser.add_argument("--sparsity", default="0.5", help="fraction of zeros of S, or N:M")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--n-samples", type=int, default=32, help="calibration segments (papers: 128)")
    parser.add_argument("--seq-len", type=int, default=512, help="calibration segment length (papers: 2048)")
    parser.add_argument("--eval-seq-len", type=int, default=2048)
    parser.add_argument("--eval-windows", type=int, default=20, help="WikiText-2 windows scored (all: 0)")
    parser.add_argument("--out", default="outputs/smollm2-slr", help="where the compressed checkpoint goes")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model_dir = args.model or demo_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = args.eval_windows or None

    def wikitext2(model):
        return perplexity(model, tokenizer, "wikitext2", seq_len=args.eval_seq_len, max_windows=windows)["ppl"]

    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dense_ppl = wikitext2(dense)
    del dense

    sparsity = args.sparsity if ":" in args.sparsity else float(args.sparsity)
    config = hf_slr.SLRConfig(
        method=args.method,
        sparsity=sparsity,
        rank=args.rank,
        n_samples=args.n_samples,
        seq_len=args.seq_len,
        tokenizer=tokenizer,
    )
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, dtype=torch.float32)
    seconds = time.perf_counter() - start
    folder = hf_slr.save_pretrained(model, args.out, tokenizer=tokenizer)
    bound = information_bound_bytes(model)
    del model
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    slr_ppl = wikitext2(reloaded)

    result = {
        "model": model_dir,
        "method": args.method,
        "sparsity": args.sparsity,
        "rank": args.rank,
        "calibration": f"{args.n_samples} x {args.seq_len} tokens",
        "compression_seconds": round(seconds, 1),
        "wikitext2_ppl_dense": round(dense_ppl, 3),
        "wikitext2_ppl_compressed": round(slr_ppl, 3),
        "wikitext2_protocol": f"{windows or 'all'} windows of {args.eval_seq_len} tokens",
        "bytes_dense": checkpoint_bytes(model_dir),
        "bytes_compressed": checkpoint_bytes(folder),
        "bytes_information_bound": bound,
        "checkpoint": str(folder),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
