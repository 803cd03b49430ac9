"""Compare layer-wise methods on one model at one budget: WikiText-2 perplexity and wall time.

    python examples/compare_methods.py --methods wanda sparsegpt oats threebasil --sparsity 0.5 --rank 16

Each method compresses a fresh copy of the dense model on load (``from_pretrained(...,
quantization_config=SLRConfig(method=...))``) with the same calibration data and the same targets;
the table gives the share of projection parameters kept (S values + U, V), the mean layer-wise
relative objective ||X (W - S - U V)||^2 / ||X W||^2 from ``model.slr_report``, the perplexity of
the in-memory compressed model and the compression time. For the full tables of
``docs/results.md`` (C4 too, several budgets, resumable), use ``benchmarks/end_to_end.py``.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_slr
from hf_slr.eval import perplexity
from hf_slr.integration import kept_fraction
from hf_slr.testing import demo_model_path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="dense HF folder or Hub id (default: SmolLM2-135M)")
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt", "oats", "threebasil"],
                        choices=hf_slr.algorithms.available())
    parser.add_argument("--sparsity", default="0.5", help="fraction of zeros of S, or N:M")
    parser.add_argument("--rank", type=int, default=16, help="rank of U V (pure pruning methods: use 0)")
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-seq-len", type=int, default=1024)
    parser.add_argument("--eval-windows", type=int, default=10, help="WikiText-2 windows scored (all: 0)")
    args = parser.parse_args()

    model_dir = args.model or demo_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sparsity = args.sparsity if ":" in args.sparsity else float(args.sparsity)
    windows = args.eval_windows or None
    rows = []
    for method in args.methods:
        config = hf_slr.SLRConfig(method=method, sparsity=sparsity, rank=args.rank, n_samples=args.n_samples,
                                  seq_len=args.seq_len, tokenizer=tokenizer)
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, dtype=torch.float32)
        seconds = time.perf_counter() - start
        objectives = [entry["relative_objective"] for entry in model.slr_report["modules"]]
        ppl = perplexity(model, tokenizer, "wikitext2", seq_len=args.eval_seq_len, max_windows=windows)["ppl"]
        rows.append((method, kept_fraction(model), sum(objectives) / len(objectives), ppl, seconds))
        del model

    print(f"\nsparsity {args.sparsity}, rank {args.rank}, calibration {args.n_samples} x {args.seq_len}, "
          f"WikiText-2 {windows or 'all'} windows of {args.eval_seq_len}")
    print("| method | params kept | mean layer objective | WikiText-2 ppl | seconds |\n|---|---|---|---|---|")
    for method, kept, objective, ppl, seconds in rows:
        print(f"| {method} | {100 * kept:.1f}% | {objective:.3e} | {ppl:.2f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
