"""Fine-tune a sparse plus low-rank model on Alpaca with LoRA, then merge and save it compressed.

``--mode factors``: the layers' own U, V are the LoRA adapter, S frozen (001 §4.3 eq. 9; 002 §3);
``--mode extra``: a new LoRA beside the frozen S + U V (the baseline of 001 Table 2), by default at
the same rank per layer, hence the same number of trainable parameters.

Without ``--compressed``, SmolLM2-135M (``hf_slr.testing.demo_model_path()``) is compressed
data-free with ``magnitude_svd`` at ``--compression-ratio`` (0.5: half of every projection's
parameters kept, counting S values and U, V). WikiText-2 perplexity is measured before and after
(first ``--eval-windows`` windows of ``--eval-seq-len`` tokens); the report gives wall times, the
training's CPU time (less distorted than wall time on a busy shared machine) and the peak RSS.

    python examples/finetune_lora.py --mode factors --max-steps 100 --output-dir outputs/ft_factors
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_slr
from hf_slr.eval import perplexity
from hf_slr.peft import MODES, get_slr_peft_model, recovery_trainer
from hf_slr.testing import demo_model_path


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_model(args):
    if args.compressed:
        return AutoModelForCausalLM.from_pretrained(args.compressed), args.compressed
    nm = args.sparsity is not None
    config = hf_slr.SLRConfig(
        method="magnitude_svd",
        compression_ratio=args.compression_ratio,
        sparsity=args.sparsity,
        rank_ratio=None if nm else args.rank_ratio,
    )
    path = demo_model_path()
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32), path


def evaluate(model, tokenizer, args) -> dict:
    model.eval()
    result = perplexity(model, tokenizer, "wikitext2", seq_len=args.eval_seq_len, max_windows=args.eval_windows)
    return {key: result[key] for key in ("ppl", "n_windows", "seq_len", "seconds")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compressed", help="an hf_slr checkpoint folder (default: compress the demo SmolLM2)")
    parser.add_argument("--compression-ratio", type=float, default=0.5)
    parser.add_argument("--rank-ratio", type=float, default=0.25, help="share of the kept parameters in U, V")
    parser.add_argument("--sparsity", help="an N:M pattern such as '2:4' instead of unstructured S")
    parser.add_argument("--mode", choices=MODES, default="factors")
    parser.add_argument("--r", type=int, help="LoRA rank (default: each layer's own rank)")
    parser.add_argument("--lora-alpha", type=float, help="default: get_slr_peft_model's (docs/peft.md)")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, help="default: hf_slr.peft.DEFAULT_LEARNING_RATE")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--eval-windows", type=int, default=20)
    parser.add_argument("--eval-seq-len", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="outputs/finetune_lora")
    args = parser.parse_args(argv)
    if args.max_steps > 1000:
        parser.error("--max-steps: this example is meant for short runs (at most 1000 steps)")
    output_dir = Path(args.output_dir)
    report = {"args": vars(args)}

    start = time.perf_counter()
    model, source = load_model(args)
    tokenizer = AutoTokenizer.from_pretrained(source)
    report["load_seconds"] = time.perf_counter() - start
    report["before"] = evaluate(model, tokenizer, args)
    print("before:", report["before"])

    peft_model = get_slr_peft_model(model, r=args.r, lora_alpha=args.lora_alpha, mode=args.mode, task_type="CAUSAL_LM")
    report["trainable_params"] = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    trainer = recovery_trainer(
        peft_model,
        tokenizer,
        output_dir / "trainer",
        args.max_steps,
        seq_len=args.seq_len,
        per_device_train_batch_size=args.batch_size,
        logging_steps=max(1, args.max_steps // 10),
        activation_checkpointing=args.gradient_checkpointing,
        seed=args.seed,
        **({"learning_rate": args.lr} if args.lr else {}),
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    report["train_seconds"] = time.perf_counter() - start
    report["train_cpu_seconds"] = time.process_time() - cpu_start  # robust to a shared CPU
    report["train_losses"] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    report["peak_rss_mib_after_training"] = peak_rss_mib()
    peft_model.save_pretrained(output_dir / "adapter")

    merged = peft_model.merge_and_unload()
    report["after"] = evaluate(merged, tokenizer, args)
    print("after:", report["after"])
    hf_slr.save_pretrained(merged, output_dir / "merged", tokenizer=tokenizer)
    report["peak_rss_mib"] = peak_rss_mib()
    (output_dir / "finetune_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "args"}, indent=2))


if __name__ == "__main__":
    main()
