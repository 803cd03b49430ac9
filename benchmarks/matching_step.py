"""Transformer matching speed: ``--epochs`` Adam steps on a SmolLM2-135M block, float32 vs bfloat16
autocast, measured side by side (best of ``--repeats``).

    python benchmarks/matching_step.py --threads 1

The block's projections are replaced by 50% magnitude-pruned S plus a rank-16 U V (the values do
not matter for the timing); the inputs are random hidden states of ``--rows`` x ``--seq-len``.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import AutoModelForCausalLM

from hf_slr.compression.capture import BlockCall
from hf_slr.compression.matching import MatchingHyperparameters, autocast_dtype, transformer_matching
from hf_slr.integration import block_linears, decoder_blocks, replace_module
from hf_slr.modules import SLRLinear
from hf_slr.testing import demo_model_path


def compressed_block(model, index: int):
    model = copy.deepcopy(model)
    layers = []
    for name, linear in block_linears(model)[index].items():
        weight = linear.weight.detach()
        sparse = weight * (weight.abs() >= weight.abs().median())
        layer = SLRLinear.from_dense(sparse, 0.01 * torch.randn(weight.shape[0], 16), 0.01 * torch.randn(16, weight.shape[1]))
        replace_module(model, name, layer)
        layers.append(layer)
    return decoder_blocks(model)[1][index], layers


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=4, help="Adam steps timed (one per epoch of --rows rows)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32)
    inputs = torch.randn(args.rows, args.seq_len, model.config.hidden_size)
    positions = torch.arange(args.seq_len)[None]
    call = BlockCall((), {"position_embeddings": model.model.rotary_emb(inputs, positions), "position_ids": positions})
    with torch.no_grad():
        targets = call(decoder_blocks(model)[1][10], inputs)
    print(f"autocast on this CPU for precision='auto': {autocast_dtype('auto', torch.device('cpu'))}")
    best = {}
    for precision in ("float32", "bfloat16"):
        schedule = MatchingHyperparameters(epochs=args.epochs, batch_size=args.rows, precision=precision)
        for _ in range(args.repeats):
            block, layers = compressed_block(model, 10)
            start = time.perf_counter()
            transformer_matching(block, call, inputs, targets, layers, schedule)  # float32 loss before/after + Adam steps
            best[precision] = min(best.get(precision, float("inf")), time.perf_counter() - start)
        print(f"{precision:>9}: {best[precision]:.2f} s for {args.epochs} Adam steps on {args.rows} x {args.seq_len} tokens "
              f"+ the float32 loss before and after (best of {args.repeats})")
    print(f"bfloat16 / float32 time: {best['bfloat16'] / best['float32']:.2f}")


if __name__ == "__main__":
    main()
