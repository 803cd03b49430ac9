"""The main job: compress the real SmolLM2-135M to sparse plus low-rank and report its quality.

    python examples/compress_and_eval.py                       # SSLC at 50% of the parameters (6.5 min on 2 idle cores, set-up included)
    python examples/compress_and_eval.py --baseline wanda      # + Wanda pruning at the same budget, measured side by side
    python examples/compress_and_eval.py --method threebasil --compression-ratio 0.5

Loads the dense model (``hf_slr.testing.demo_model_path()`` unless ``--model``), compresses it on
load through ``from_pretrained(..., quantization_config=SLRConfig(...))`` with the method's own
split of the budget between S and U V, saves it with ``hf_slr.save_pretrained``, reloads it, and
prints WikiText-2 perplexity (dense, compressed and, with ``--baseline``, a pruning method keeping
the same number of parameters), the parameters kept, the bytes on disk and the time taken.
Perplexity follows docs/results.md: the first 20 windows of 1024 tokens of WikiText-2 test.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_slr
from hf_slr.eval import perplexity
from hf_slr.integration import information_bound_bytes, kept_fraction
from hf_slr.serialization import checkpoint_bytes
from hf_slr.testing import demo_model_path


def main():
    start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="dense HF folder or Hub id (default: SmolLM2-135M)")
    parser.add_argument("--method", default="sslc", choices=hf_slr.algorithms.available())
    parser.add_argument("--compression-ratio", type=float, default=0.5, help="fraction of projection parameters removed")
    parser.add_argument("--rank-ratio", type=float, default=None, help="share of the kept parameters in U V (default: the method's paper split)")
    parser.add_argument("--baseline", default=None, choices=["wanda", "sparsegpt", "magnitude"], help="also prune at the same budget and compare")
    parser.add_argument("--n-samples", type=int, default=32, help="calibration segments (papers: 128)")
    parser.add_argument("--seq-len", type=int, default=512, help="calibration segment length (papers: 2048)")
    parser.add_argument("--eval-seq-len", type=int, default=1024)
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

    def compress(method, **budget):
        config = hf_slr.SLRConfig(
            method=method, n_samples=args.n_samples, seq_len=args.seq_len, tokenizer=tokenizer, **budget
        )
        began = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, dtype=torch.float32)
        return model, time.perf_counter() - began

    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = [("dense", 1.0, wikitext2(dense), None)]
    del dense

    budget = {"compression_ratio": args.compression_ratio, "rank_ratio": args.rank_ratio}
    model, seconds = compress(args.method, **budget)
    folder = hf_slr.save_pretrained(model, args.out, tokenizer=tokenizer)
    kept, bound = kept_fraction(model), information_bound_bytes(model)
    del model
    reloaded = AutoModelForCausalLM.from_pretrained(folder)  # what a user downloads: the saved checkpoint
    rows.append((f"{args.method} (S + U V)", kept, wikitext2(reloaded), seconds))
    del reloaded
    if args.baseline:
        pruned, pruned_seconds = compress(args.baseline, sparsity=args.compression_ratio)
        rows.append((f"{args.baseline} (pruning)", kept_fraction(pruned), wikitext2(pruned), pruned_seconds))
        del pruned

    print(f"\nSmolLM2-135M, WikiText-2 perplexity ({windows or 'all'} windows of {args.eval_seq_len} tokens), "
          f"calibration {args.n_samples} x {args.seq_len} tokens of C4")
    print(f"{'model':<28}{'params kept':>12}{'perplexity':>12}{'compress s':>12}")
    for name, fraction, ppl, secs in rows:
        print(f"{name:<28}{100 * fraction:>11.1f}%{ppl:>12.2f}{'-' if secs is None else f'{secs:.0f}':>12}")
    result = {
        "model": model_dir if args.model else "SmolLM2-135M (hf_slr.testing.demo_model_path())",
        "method": args.method,
        "compression_ratio": args.compression_ratio,
        "rank_ratio": args.rank_ratio if args.rank_ratio is not None else "the method's paper split",
        "calibration": f"{args.n_samples} x {args.seq_len} tokens",
        "wikitext2_protocol": f"first {windows or 'all'} windows of {args.eval_seq_len} tokens",
        "rows": [{"model": name, "params_kept": fraction, "wikitext2_ppl": round(ppl, 3),
                  "compression_seconds": None if secs is None else round(secs, 1)} for name, fraction, ppl, secs in rows],
        "bytes_dense": checkpoint_bytes(model_dir),
        "bytes_compressed": checkpoint_bytes(folder),
        "bytes_information_bound": bound,
        "checkpoint": str(folder),
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
