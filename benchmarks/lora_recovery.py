"""LoRA recovery after sparse plus low-rank compression, measured as the papers do.

"1+1>2: A Synergistic Sparse and Low-Rank Compression Method for LLMs" (SSLC) Table 2 and
"3BASiL: An Algorithmic Framework for Sparse plus Low-Rank Compression of LLMs" §4.2 fine-tune the
compressed model with LoRA and report perplexity and zero-shot accuracy before and after. Three
ways to spend the same number of trainable parameters (``--modes``):

- ``factors``: LoRA on the fitted low-rank factors (the papers' method; same deployed size);
- ``extra``: a new LoRA beside the frozen S + U V (rank 2 x 16 after merging);
- ``sequential``: the papers' baseline (002 §1, 001 Table 2's starred rows): the method compresses
  to the 2:4 backbone alone (rank 0), then a new rank-16 LoRA (same deployed size as factors).

Every method compresses SmolLM2-135M (``hf_slr.testing.demo_model_path()``) at 2:4 + rank 16 (and
rank 0 for ``sequential``) once (small calibration, capped iterations unless ``--uncapped``;
checkpoints under ``--checkpoints``), then each (method, mode) fine-tunes with ``hf_slr.peft``'s
defaults (``get_slr_peft_model`` and ``recovery_training_arguments``) on the local Alpaca sample
(001) or, with ``--train-data c4``, on C4 training text (002 §4.2), and WikiText-2 perplexity plus
PIQA / ARC-Easy accuracy are measured before and after merging. Every run writes
``OUT/<run>.json`` and finished runs are skipped, so an interrupted table resumes.

    python benchmarks/lora_recovery.py                      # compress, evaluate, fine-tune, evaluate
    python benchmarks/lora_recovery.py --table --plot docs/figures/lora-recovery-2of4-r16.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_slr
from hf_slr.eval import evaluate_zeroshot, perplexity
from hf_slr.peft import MODES, get_slr_peft_model, recovery_trainer, text_dataset
from hf_slr.testing import demo_model_path

# Capped so that each compression takes minutes on 2 shared CPU cores (see docs/results.md);
# ``--uncapped`` compresses with each method's own defaults instead.
METHODS = {
    "magnitude_svd": {},
    "hassle_free": {"iterations": 10},
    "threebasil": {"max_iterations": 100},
    "sslc": {},
}
TASKS = ("piqa", "arc_easy")
SEQUENTIAL = "sequential"
"""The papers' baseline (002 §1, after Guo et al. / Li et al. 2024; 001 Table 2's starred rows): compress
to the sparse backbone alone, then fine-tune a new LoRA of the same rank (Noise & Zero adapter); the
same trainable and deployed parameters as factors mode. ``extra`` keeps the fitted U V as well (rank
32 after merging)."""
BUDGET = {"sparsity": "2:4", "rank": 16}
SMOOTHING = 10  # steps of the running mean drawn over the per-step losses (batches of 4 vary a lot)


def compressed_checkpoint(method: str, args, rank: int = BUDGET["rank"]) -> Path:
    """The method's 2:4 + r``rank`` checkpoint, compressed once (calibration ``--n-samples`` x ``--calib-len``)."""
    folder = Path(args.checkpoints) / f"{method}-2of4-r{rank}{'-uncapped' if args.uncapped else ''}"
    if (folder / "config.json").exists():
        return folder
    config = hf_slr.SLRConfig(
        method=method,
        **(BUDGET | {"rank": rank}),
        n_samples=args.n_samples,
        seq_len=args.calib_len,
        method_kwargs={} if args.uncapped else METHODS[method],
    )
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(demo_model_path(), quantization_config=config, dtype=torch.float32)
    seconds = time.perf_counter() - start
    hf_slr.save_pretrained(model, folder, tokenizer=AutoTokenizer.from_pretrained(demo_model_path()))
    (folder / "compression_seconds.json").write_text(json.dumps({"seconds": seconds}))
    print(f"{method}: compressed in {seconds:.0f} s -> {folder}", flush=True)
    return folder


def evaluate(model, tokenizer, args) -> dict:
    model.eval()
    start = time.perf_counter()
    ppl = perplexity(model, tokenizer, args.ppl_dataset, seq_len=args.eval_seq_len, max_windows=args.eval_windows)["ppl"]
    zeroshot = evaluate_zeroshot(model, tokenizer, tasks=TASKS, limit=args.zeroshot_limit) if args.zeroshot_limit else {}
    accuracy = {task: metrics["acc"] for task, metrics in zeroshot.items()}
    return {"ppl": ppl, "ppl_dataset": args.ppl_dataset, "acc": accuracy, "eval_seconds": time.perf_counter() - start}


def c4_segments(tokenizer, args):
    """One epoch of C4 training segments (002 §4.2's fine-tuning text), drawn apart from the calibration's."""
    return text_dataset(tokenizer, "c4", n_samples=args.steps * args.batch_size, seq_len=args.seq_len, seed=1 + args.seed)


def finetune(model, tokenizer, mode: str, args) -> tuple[torch.nn.Module, dict]:
    """LoRA with the library defaults; the merged model and the per-step log.

    ``sequential``: a new rank-16 LoRA on the method's 2:4 backbone compressed alone (rank 0).
    """
    rank = BUDGET["rank"] if mode == SEQUENTIAL else None
    peft_mode = "extra" if mode == SEQUENTIAL else mode
    peft_model = get_slr_peft_model(model, r=rank, lora_alpha=args.lora_alpha, mode=peft_mode, task_type="CAUSAL_LM")
    trainer = recovery_trainer(
        peft_model,
        tokenizer,
        Path(args.out) / "trainer",
        args.steps,
        seq_len=args.seq_len,
        per_device_train_batch_size=args.batch_size,
        logging_steps=1,
        seed=args.seed,
        train_dataset=None if args.train_data == "alpaca" else c4_segments(tokenizer, args),
        **({"learning_rate": args.lr} if args.lr else {}),
    )
    start = time.perf_counter()
    trainer.train()
    log = [entry for entry in trainer.state.log_history if "loss" in entry]
    record = {
        "trainable_params": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        "learning_rate": trainer.args.learning_rate,
        "train_data": args.train_data,
        "lora_alpha": peft_model.peft_config["default"].lora_alpha,
        "train_seconds": time.perf_counter() - start,
        "losses": [entry["loss"] for entry in log],
        "grad_norms": [entry.get("grad_norm") for entry in log],
    }
    return peft_model.merge_and_unload(), record


def run(name: str, args, work) -> None:
    path = Path(args.out) / f"{name}.json"
    if path.exists():
        return
    print(f"== {name}", flush=True)
    record = {"run": name, **work()}
    partial = path.with_suffix(".json.partial")  # a killed run leaves no half-written record to skip
    partial.write_text(json.dumps(record, indent=1))
    partial.replace(path)
    print(json.dumps({k: v for k, v in record.items() if k not in ("losses", "grad_norms")}), flush=True)


def load(method: str, args, rank: int = BUDGET["rank"]):
    folder = compressed_checkpoint(method, args, rank)
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def before(method: str, args, rank: int = BUDGET["rank"]) -> dict:
    model, tokenizer = load(method, args, rank)
    return evaluate(model, tokenizer, args)


def after(method: str, mode: str, args) -> dict:
    model, tokenizer = load(method, args, 0 if mode == SEQUENTIAL else BUDGET["rank"])
    merged, record = finetune(model, tokenizer, mode, args)
    return {**record, **evaluate(merged, tokenizer, args)}


def _row(runs: dict, name: str) -> str:
    record = runs.get(name)
    if record is None:
        return " - | - |"
    acc = " / ".join(f"{record['acc'].get(task, float('nan')):.3f}" for task in TASKS) if record["acc"] else "-"
    return f" {record['ppl']:.2f} | {acc} |"


def table(args) -> str:
    """Markdown table of the finished runs: quality before / after, trainable parameters, training curve."""
    runs = {path.stem: json.loads(path.read_text()) for path in Path(args.out).glob("*.json")}
    lines = [
        f"| method | stage | {args.ppl_dataset} ppl | PIQA / ARC-e acc | trainable params | first-step grad norm "
        "| max grad norm | first / last 10-step mean loss | train s | eval s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in args.methods:
        record = runs.get(f"{method}-before", {})
        seconds = f"{record['eval_seconds']:.0f}" if record else "-"
        lines.append(f"| {method} | compressed |{_row(runs, f'{method}-before')} - | - | - | - | - | {seconds} |")
        if SEQUENTIAL in args.modes:
            lines.append(f"| {method} | backbone alone (rank 0) |{_row(runs, f'{method}-backbone-before')} - | - | - | - | - | - |")
        for mode in args.modes:
            record = runs.get(f"{method}-{mode}", {})
            losses, norms = record.get("losses", []), [n for n in record.get("grad_norms", []) if n is not None]
            curve = f"{sum(losses[:10]) / 10:.3f} / {sum(losses[-10:]) / 10:.3f}" if len(losses) >= 10 else "-"
            first, peak = (f"{norms[0]:.2f}", f"{max(norms):.1f}") if norms else ("-", "-")
            params = f"{record['trainable_params'] / 1e6:.2f} M" if record else "-"
            seconds = " | ".join(f"{record[key]:.0f}" if record else "-" for key in ("train_seconds", "eval_seconds"))
            lines.append(
                f"| {method} | + LoRA {mode} |{_row(runs, f'{method}-{mode}')} {params} | {first} | {peak} | {curve} "
                f"| {seconds} |"
            )
    return "\n".join(lines)


def plot(args, target: Path) -> None:
    figure = Figure(figsize=(4 * len(args.methods), 3.2))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(args.methods), sharey=True, squeeze=False)[0]
    for axis, method in zip(axes, args.methods):
        for mode in args.modes:
            path = Path(args.out) / f"{method}-{mode}.json"
            if path.exists():
                losses = torch.tensor(json.loads(path.read_text())["losses"])
                steps = torch.arange(1, len(losses) + 1)
                line = axis.plot(steps, losses, linewidth=0.5, alpha=0.35)[0]
                window = min(SMOOTHING, len(losses))
                mean = losses.unfold(0, window, 1).mean(1)  # trailing mean over `window` steps
                axis.plot(steps[window - 1 :], mean, color=line.get_color(), linewidth=1.8, label=f"{mode} ({window}-step mean)")
        axis.set_title(f"{method} 2:4 + r16")
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(f"training loss ({'C4' if args.train_data == 'c4' else 'Alpaca'})")
    axes[0].legend()
    figure.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=120)
    print(f"wrote {target}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--modes", nargs="+", choices=(*MODES, SEQUENTIAL), default=list(MODES))
    parser.add_argument("--checkpoints", default="/tmp/hf_slr_lora_recovery", help="compressed checkpoints")
    parser.add_argument("--out", default="outputs/lora_recovery")
    parser.add_argument(
        "--uncapped", action="store_true", help="compress with each method's own iteration defaults (slower)"
    )
    parser.add_argument("--n-samples", type=int, default=16, help="calibration segments")
    parser.add_argument("--calib-len", type=int, default=256, help="calibration segment length")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, help="default: hf_slr.peft.DEFAULT_LEARNING_RATE")
    parser.add_argument("--lora-alpha", type=float, help="default: get_slr_peft_model's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--train-data", choices=("alpaca", "c4"), default="alpaca", help="c4: plain-text segments (002 §4.2)"
    )
    parser.add_argument("--ppl-dataset", choices=("wikitext2", "c4"), default="wikitext2", help="c4: the validation sample")
    parser.add_argument("--eval-windows", type=int, default=20)
    parser.add_argument("--eval-seq-len", type=int, default=1024)
    parser.add_argument("--zeroshot-limit", type=int, default=200, help="documents per task (0: skip)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compress-only", action="store_true")
    parser.add_argument("--table", action="store_true", help="print the markdown table of finished runs")
    parser.add_argument("--plot", help="write the training-loss curves to this PNG")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.table or args.plot:
        if args.table:
            print(table(args))
        if args.plot:
            plot(args, Path(args.plot))
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for method in args.methods:
        compressed_checkpoint(method, args)
        if SEQUENTIAL in args.modes:
            compressed_checkpoint(method, args, rank=0)
    if args.compress_only:
        return
    for method in args.methods:
        run(f"{method}-before", args, lambda: before(method, args))
        if SEQUENTIAL in args.modes:
            run(f"{method}-backbone-before", args, lambda: before(method, args, rank=0))
        for mode in args.modes:
            run(f"{method}-{mode}", args, lambda: after(method, mode, args))


if __name__ == "__main__":
    main()
