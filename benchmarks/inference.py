"""Inference speed and memory of SLR layers and models against dense ones, measured side by side in
one run (docs/runtime.md, docs/results.md "Inference runtime").

Per layer: one SLRLinear (auto runtime form) against an nn.Linear of the same shape, dtype and
thread count, on random weights; dense and SLR are timed in alternating rounds and each keeps its
best round (the machine is shared and noisy). Ratio = dense time / SLR time (> 1: SLR is faster).

End to end: SmolLM2-135M (``hf_slr.testing.demo_model_path()``, fp32) against its magnitude_svd
compressions (2:4 + r16 and 50% + r16), saved and reloaded as they are; each measurement runs in
a fresh process: resident memory added by loading (RSS after the load and a first forward, which
prepares the runtime forms, minus RSS before), greedy ``generate`` tokens/s (128 new tokens,
batch 1 and 8) and prefill tokens/s (512 tokens).

    .venv/bin/python benchmarks/inference.py                   # default subset (a few minutes)
    .venv/bin/python benchmarks/inference.py --full            # every shape, T, pattern, rank, dtype
    .venv/bin/python benchmarks/inference.py --no-e2e --shapes llama --tokens 1 --ranks 64
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hf_slr  # noqa: E402
from hf_slr import SLRConfig, SLRLinear  # noqa: E402

SHAPES = {
    "smollm2": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
    "llama": [(4096, 4096), (14336, 4096), (4096, 14336)],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_GRID = [  # (shapes, tokens, patterns, ranks, dtypes): the default subset
    ("smollm2", (1, 8, 128, 2048), ("0.5", "2:4"), (16,), ("fp32", "bf16")),
    ("llama", (1, 8), ("0.5", "2:4"), (64,), ("fp32",)),
]
E2E_MODELS = {"dense": None, "2:4+r16": ("2:4", 16), "50%+r16": (0.5, 16)}


def _pattern(name: str):
    return tuple(int(v) for v in name.split(":")) if ":" in name else None


def random_layer(out: int, inp: int, pattern: str, rank: int, dtype, seed: int = 0) -> SLRLinear:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inp, generator=generator)
    nm = _pattern(pattern)
    if nm is None:
        support = torch.rand(out, inp, generator=generator) >= float(pattern)
    else:
        n, m = nm
        order = torch.rand(out, inp // m, m, generator=generator).argsort(-1)[..., :n]
        support = torch.zeros(out, inp // m, m, dtype=torch.bool).scatter_(-1, order, True).reshape(out, inp)
    u, v = torch.randn(out, rank, generator=generator) / 8, torch.randn(rank, inp, generator=generator) / 8
    layer = SLRLinear.from_dense(weight * support, u, v, nm_pattern=nm, support=support, dtype=dtype)
    return layer.eval().requires_grad_(False)


def _time_round(fn, min_seconds: float) -> float:
    """Mean seconds per call over at least ``min_seconds`` (at least 2 calls)."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if calls >= 2 and elapsed >= min_seconds:
            return elapsed / calls


def compare(fns: dict, rounds: int, min_seconds: float) -> dict[str, float]:
    """Best-round seconds per call of each function, timed in alternating rounds."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], _time_round(fn, min_seconds))
    return best


def layer_rows(grid, args) -> list[dict]:
    rows = []
    for shape_set, tokens, patterns, ranks, dtypes in grid:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            for out, inp in SHAPES[shape_set]:
                dense = nn.Linear(inp, out, bias=False, dtype=dtype).requires_grad_(False)
                for pattern in patterns:
                    for rank in ranks:
                        layer = random_layer(out, inp, pattern, rank, dtype)
                        for count in tokens:
                            x = torch.randn(count, inp, dtype=dtype)
                            fns = {"dense": lambda: dense(x), "slr": lambda: layer(x)}
                            if args.reference and count == 1:
                                fns["reference"] = lambda: layer.reference_forward(x)
                            with torch.inference_mode():
                                best = compare(fns, args.rounds, args.min_time)
                            row = {
                                "shape": f"{out}x{inp}", "dtype": dtype_name, "pattern": pattern, "rank": rank, "tokens": count,
                                "form": layer.runtime.prepared_form, "dense_ms": best["dense"] * 1e3, "slr_ms": best["slr"] * 1e3,
                                "speedup": best["dense"] / best["slr"],
                            }
                            if "reference" in best:
                                row["reference_ms"] = best["reference"] * 1e3
                            rows.append(row)
                            print(json.dumps(row), file=sys.stderr, flush=True)
                        del layer
                        gc.collect()
    return rows


def print_layer_table(rows: list[dict]) -> None:
    reference = any("reference_ms" in row for row in rows)
    print("| shape (out x in) | dtype | S | rank | T | dense ms | SLR ms | speed vs dense |" + (" reference ms |" if reference else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if reference else ""))
    for row in rows:
        pattern = "50%" if row["pattern"] == "0.5" else row["pattern"]
        line = (
            f"| {row['shape']} | {row['dtype']} | {pattern} | {row['rank']} | {row['tokens']} | {row['dense_ms']:.3f} | "
            f"{row['slr_ms']:.3f} | **{row['speedup']:.2f}x** |"
        )
        if reference:
            line += f" {row['reference_ms']:.2f} |" if "reference_ms" in row else " |"
        print(line)


def plot(rows: list[dict], path: Path, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple, list] = {}
    for row in rows:
        if row["dtype"] == "fp32":
            series.setdefault((row["shape"], row["pattern"], row["rank"]), []).append((row["tokens"], row["speedup"]))
    shapes = sorted({key[0] for key in series}, key=lambda shape: [int(v) for v in shape.split("x")])
    colors = {shape: plt.get_cmap("tab10")(index) for index, shape in enumerate(shapes)}
    figure, axis = plt.subplots(figsize=(9, 5))
    for (shape, pattern, rank), points in sorted(series.items()):
        points.sort()
        if len(points) > 1:
            label = f"{shape} {'50%' if pattern == '0.5' else pattern} r{rank}"
            style = "-" if ":" in pattern else "--"
            axis.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", color=colors[shape], label=label)
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("tokens T in the call")
    axis.set_ylabel("speed vs nn.Linear (dense time / SLR time)")
    axis.set_title(f"SLRLinear runtime vs nn.Linear, fp32, {threads} CPU thread(s)")
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


# ---------------------------------------------------------------- end to end (one process per run)


def _rss() -> int:
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss


def e2e_worker(folder: str, what: str, prefill: int, new_tokens: int, batch: int) -> dict:
    from transformers import AutoModelForCausalLM

    before = _rss()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, 32), generator=torch.Generator().manual_seed(0))
    result = {}
    with torch.inference_mode():
        model(ids[:1, :8])  # prepares the runtime forms
        if what == "memory":
            return {"rss_delta_mb": (_rss() - before) / 2**20}
        if what == "prefill":
            long_ids = torch.randint(0, vocab, (1, prefill), generator=torch.Generator().manual_seed(1))
            seconds = min(_timed(lambda: model(long_ids, use_cache=False)) for _ in range(3))
            result["prefill_tok_s"] = prefill / seconds
        else:
            settings = {"do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "pad_token_id": 0}
            model.generate(ids, **{**settings, "max_new_tokens": 4, "min_new_tokens": 4})
            seconds = min(_timed(lambda: model.generate(ids, attention_mask=torch.ones_like(ids), **settings)) for _ in range(2))
            result[f"generate_b{batch}_tok_s"] = batch * new_tokens / seconds
    return result


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def e2e_folders(cache: Path) -> dict[str, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_slr.testing import demo_model_path

    dense = demo_model_path()
    folders = {"dense": dense}
    for name, spec in E2E_MODELS.items():
        if spec is None:
            continue
        folder = cache / f"smollm2-magnitude_svd-{name.replace(':', '').replace('%', 'pct').replace('+', '-')}"
        if not (folder / "config.json").exists():
            sparsity, rank = spec
            config = SLRConfig(method="magnitude_svd", sparsity=sparsity, rank=rank)
            model = AutoModelForCausalLM.from_pretrained(dense, quantization_config=config)
            hf_slr.save_pretrained(model, folder, tokenizer=AutoTokenizer.from_pretrained(dense))
        folders[name] = str(folder)
    return folders


def e2e_rows(args) -> list[dict]:
    cache = Path(os.environ.get("HF_SLR_CACHE", Path.home() / ".cache" / "hf_slr")) / "bench"
    folders = e2e_folders(cache)
    jobs = [("memory", 1)] + [("generate", batch) for batch in args.batches] + [("prefill", 1)]
    results = {name: {} for name in folders}
    for _ in range(args.e2e_repeats):  # alternate the models; keep each one's best
        for what, batch in jobs:
            for name, folder in folders.items():
                command = [sys.executable, __file__, "--e2e-worker", folder, what, str(args.prefill), str(args.new_tokens), str(batch)]
                env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
                output = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
                for key, value in json.loads(output.strip().splitlines()[-1]).items():
                    better = min if key.startswith("rss") else max
                    results[name][key] = better(results[name].get(key, value), value)
                print(name, what, batch, results[name], file=sys.stderr, flush=True)
    return [{"model": name, **values} for name, values in results.items()]


def print_e2e_table(rows: list[dict], batches) -> None:
    dense = rows[0]
    keys = [f"generate_b{b}_tok_s" for b in batches] + ["prefill_tok_s", "rss_delta_mb"]
    heads = [f"generate b{b} tok/s" for b in batches] + ["prefill 512 tok/s", "RSS added by loading (MB)"]
    print("| model | " + " | ".join(heads) + " |")
    print("|---|" + "---|" * len(keys))
    for row in rows:
        cells = [f"{row[k]:.1f}" + ("" if row is dense else f" (**{row[k] / dense[k]:.2f}x**)") for k in keys]
        print(f"| SmolLM2-135M {row['model']} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--e2e-worker", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--full", action="store_true", help="every shape, T in {1, 8, 128, 2048}, 50%% and 2:4, r16 and r64, fp32 and bf16")
    parser.add_argument("--shapes", help="comma list of shape sets (smollm2, llama): replaces the default subset")
    parser.add_argument("--tokens", default="1,8,128,2048", help="with --shapes: tokens per call")
    parser.add_argument("--patterns", default="0.5,2:4", help="with --shapes: sparsity patterns")
    parser.add_argument("--ranks", default="16,64", help="with --shapes: ranks")
    parser.add_argument("--dtypes", default="fp32,bf16", help="with --shapes: dtypes")
    parser.add_argument("--reference", action="store_true", help="also time the reference path (per-call unpacking) at T=1")
    parser.add_argument("--no-layers", action="store_true")
    parser.add_argument("--no-e2e", action="store_true")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.1, help="seconds per timing round")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--e2e-repeats", type=int, default=2)
    parser.add_argument("--plot", default=str(ROOT / "docs" / "figures" / "runtime-speed-vs-tokens.png"))
    parser.add_argument("--json", help="write every measurement here")
    parser.add_argument("--from-json", help="print the tables and draw the plot of a saved --json run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.e2e_worker:
        folder, what, prefill, new_tokens, batch = args.e2e_worker
        print(json.dumps(e2e_worker(folder, what, int(prefill), int(new_tokens), int(batch))))
        return
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        if "layers" in saved:
            print_layer_table(saved["layers"])
            plot(saved["layers"], Path(args.plot), saved.get("threads", torch.get_num_threads()))
            print()
        if "e2e" in saved:
            print_e2e_table(saved["e2e"], args.batches)
        return
    if args.full:
        grid = [(name, (1, 8, 128, 2048), ("0.5", "2:4"), (16, 64), ("fp32", "bf16")) for name in SHAPES]
    elif args.shapes:
        split = lambda text, kind: tuple(kind(v) for v in text.split(","))  # noqa: E731
        grid = [(name, split(args.tokens, int), split(args.patterns, str), split(args.ranks, int), split(args.dtypes, str))
                for name in args.shapes.split(",")]
    else:
        grid = DEFAULT_GRID
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU ISA level {hf_slr.runtime.kernels.isa_level()}\n")
    results = {"threads": torch.get_num_threads()}
    if not args.no_layers:
        results["layers"] = layer_rows(grid, args)
        print_layer_table(results["layers"])
        if args.plot:
            plot(results["layers"], Path(args.plot), torch.get_num_threads())
        print()
    if not args.no_e2e:
        results["e2e"] = e2e_rows(args)
        print_e2e_table(results["e2e"], args.batches)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
