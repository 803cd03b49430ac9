"""``hf-slr``: compress, evaluate and inspect models from the command line.

    hf-slr compress MODEL_OR_DIR --method oats --sparsity 0.5 --rank 16 --out DIR    # streamed, resumable
    hf-slr compress MODEL_OR_DIR --method qr_rpca --compression-ratio 0.5 --rank-ratio 0.25 \
        --allocation learned --allocation-kwargs '{"steps": 20}' --out DIR
    hf-slr compress MODEL_OR_DIR --method wanda --sparsity 0.6 --allocation owl --out DIR
    hf-slr eval DIR --ppl wikitext2,c4 --tasks piqa,arc_easy --limit 100 --json FILE
    hf-slr eval DIR    # a quick check: WikiText-2 perplexity on the first 20 windows
    hf-slr info DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load(model_dir: str, dtype: str, **kwargs):
    import hf_slr  # noqa: F401  (registers quant_method "slr")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype], **kwargs)


def _download(repo_id: str) -> str:
    """A local snapshot of a Hub model's config, safetensors and tokenizer files."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])


def compress(args) -> dict:
    import hf_slr
    from transformers import AutoTokenizer

    try:  # a data-free run needs none; a data-aware one reports a missing tokenizer by name
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError):
        tokenizer = None
    sparsity = None if args.sparsity is None else (args.sparsity if ":" in args.sparsity else float(args.sparsity))
    config = hf_slr.SLRConfig(
        method=args.method,
        sparsity=sparsity,
        rank=args.rank,
        compression_ratio=args.compression_ratio,
        rank_ratio=args.rank_ratio,
        dataset=args.calib,
        n_samples=args.n_samples,
        seq_len=args.seq_len,
        seed=args.seed,
        tokenizer=tokenizer,
        method_kwargs=json.loads(args.method_kwargs) if args.method_kwargs else None,
        transformer_matching=args.tm,
        tm_kwargs=json.loads(args.tm_kwargs) if args.tm_kwargs else None,
        allocation=args.allocation,
        allocation_kwargs=json.loads(args.allocation_kwargs) if args.allocation_kwargs else None,
    )
    start = time.perf_counter()
    if config.allocation == "uniform" and not args.in_memory:
        source = args.model if Path(args.model).is_dir() else _download(args.model)
        folder = hf_slr.compress_checkpoint(source, args.out, config, tokenizer=tokenizer, dtype=DTYPES[args.dtype])
    else:
        model = _load(args.model, args.dtype, quantization_config=config)
        folder = hf_slr.save_pretrained(model, args.out, tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    return {"checkpoint": str(folder), "method": args.method, "compression_seconds": round(seconds, 1)}


QUICK_PPL_WINDOWS = 20
"""Windows of the perplexity ``hf-slr eval`` runs when asked for neither ``--ppl`` nor ``--tasks``."""


def evaluate(args) -> dict:
    from transformers import AutoTokenizer

    from .eval import evaluate_zeroshot, perplexity

    ppl, max_windows = args.ppl, args.max_windows
    if ppl is None and not args.tasks:  # nothing asked: a short check, said so
        ppl, max_windows = "wikitext2", QUICK_PPL_WINDOWS if max_windows is None else max_windows
        print(
            f"hf-slr eval: neither --ppl nor --tasks given: WikiText-2 perplexity on the first {max_windows} windows "
            f"of {args.seq_len} tokens (--ppl wikitext2 scores all of them)",
            file=sys.stderr,
        )
    model = _load(args.model, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    result = {"model": args.model}
    for dataset in filter(None, (ppl or "").split(",")):
        result[f"ppl_{dataset}"] = perplexity(model, tokenizer, dataset, seq_len=args.seq_len, max_windows=max_windows)
    if args.tasks:
        result["zeroshot"] = evaluate_zeroshot(
            model, tokenizer, tasks=tuple(args.tasks.split(",")), limit=args.limit, batch_size=args.batch_size
        )
    return result


def info(args) -> dict:
    from .integration import compressed_layers, information_bound_bytes, kept_fraction
    from .serialization import checkpoint_bytes

    model = _load(args.model, "float32")
    config = getattr(model.config, "quantization_config", None)
    layers = compressed_layers(model)
    result = {
        "model": args.model,
        "compressed": bool(layers),
        "parameters": sum(p.numel() for p in model.parameters()),
        "bytes_on_disk": checkpoint_bytes(args.model),
        "bytes_information_bound": information_bound_bytes(model),
    }
    if layers:
        result.update(
            method=config.method,
            base_model=config.base_model,
            sparsity=config.sparsity,
            projection_parameters_kept=round(kept_fraction(model), 6),
            modules={
                name: {"rank": m.rank, "nnz": m.nnz, "sparsity": round(1 - m.nnz / (m.in_features * m.out_features), 4)}
                for name, m in layers.items()
            },
        )
    return result


def build_parser() -> argparse.ArgumentParser:
    from . import algorithms
    from .allocation import ALLOCATIONS

    parser = argparse.ArgumentParser(prog="hf-slr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("compress", help="compress a dense model and save the SLR checkpoint")
    p.add_argument("model", help="dense HF folder or Hub id")
    p.add_argument("--method", required=True, choices=algorithms.available())
    p.add_argument("--sparsity", default=None, help="fraction of zeros of S, or N:M (default 0.5)")
    p.add_argument("--rank", type=int, default=None, help="rank of U V (default 64)")
    p.add_argument("--compression-ratio", type=float, default=None, help="rho of 004 §5 / App. A.3")
    p.add_argument("--rank-ratio", type=float, default=None, help="kappa of OATS (unstructured only)")
    p.add_argument("--calib", default="c4", help="'c4' (local sample), a path, or a Hub dataset name")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method-kwargs", default=None, help='JSON, e.g. \'{"iterations": 40}\'')
    p.add_argument("--tm", action="store_true", help="transformer matching after each block (3BASiL-TM §3)")
    p.add_argument("--tm-kwargs", default=None, help='JSON schedule of --tm, e.g. \'{"epochs": 20, "lr": 2e-5}\'')
    p.add_argument(
        "--allocation",
        default="uniform",
        choices=list(ALLOCATIONS),
        help="budget per layer / matrix: uniform, owl (outlier-weighted) or learned (bilevel, 000); "
        "owl and learned need --compression-ratio (and --rank-ratio, or the method's own split); a pruning method "
        "(wanda, sparsegpt, magnitude) also takes --sparsity, e.g. --sparsity 0.6 --allocation owl",
    )
    p.add_argument("--allocation-kwargs", default=None, help='JSON, e.g. \'{"steps": 20, "init": "owl"}\'')
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--out", required=True, help="output folder (written atomically; resumes an interrupted run)")
    p.add_argument(
        "--in-memory", action="store_true",
        help="load the whole dense model instead of streaming it block by block (non-uniform allocations always do)",
    )
    p.set_defaults(run=compress)

    p = commands.add_parser(
        "eval",
        help="perplexity and zero-shot accuracy of a (compressed) model",
        description="Perplexity (--ppl) and zero-shot accuracy (--tasks) of a model; each runs only when asked. "
        f"Without either: WikiText-2 perplexity on the first {QUICK_PPL_WINDOWS} windows of --seq-len tokens "
        "(a quick check; --ppl wikitext2 scores the whole text: 148 windows of 2048 tokens for SmolLM2).",
    )
    p.add_argument("model", help="HF folder or Hub id")
    p.add_argument(
        "--ppl",
        default=None,
        help="comma-separated perplexity datasets: wikitext2, c4, or paths; computed only when given, except "
        f"that with neither --ppl nor --tasks eval runs WikiText-2 on the first {QUICK_PPL_WINDOWS} windows",
    )
    p.add_argument("--seq-len", type=int, default=2048, help="perplexity window length in tokens")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first windows (default: all)")
    p.add_argument("--tasks", default="", help="comma-separated: piqa,arc_easy,arc_challenge,hellaswag,boolq,rte")
    p.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.set_defaults(run=evaluate)

    p = commands.add_parser("info", help="method, per-layer sparsity/rank, bytes on disk vs bound")
    p.add_argument("model", help="HF folder")
    p.add_argument("--json", default=None)
    p.set_defaults(run=info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = args.run(args)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if getattr(args, "json", None):
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
