"""Recover a compressed model with LoRA and ``transformers.Trainer``: copy this file, change the paths.

The defaults of ``hf_slr.peft`` work after every method (measured in docs/peft.md, "Defaults"):
``get_slr_peft_model(model)`` trains the layers' own U, V as the adapter ("factors" mode, 001 §4.3
eq. 9; 002 §3) starting from balanced factors, and ``recovery_training_arguments`` sets AdamW's
learning rate, warmup and clipping. The adapter is merged back into U, V, so the result is again a
compressed checkpoint that ``from_pretrained`` loads.

    python examples/trainer_lora.py --compressed outputs/smollm2-slr --max-steps 100 --output-dir outputs/recovered

Without ``--compressed`` it first compresses SmolLM2-135M (``hf_slr.testing.demo_model_path()``)
data-free with ``magnitude_svd`` at 2:4 + rank 16 (about 30 s on a CPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer

import hf_slr
from hf_slr.peft import alpaca_dataset, get_slr_peft_model, recovery_training_arguments
from hf_slr.testing import demo_model_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compressed", help="an hf_slr checkpoint folder (default: compress the demo SmolLM2)")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--output-dir", default="outputs/trainer_lora")
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)

    if args.compressed:
        model = AutoModelForCausalLM.from_pretrained(args.compressed)
        tokenizer = AutoTokenizer.from_pretrained(args.compressed)
    else:
        config = hf_slr.SLRConfig(method="magnitude_svd", sparsity="2:4", rank=16)
        model = AutoModelForCausalLM.from_pretrained(demo_model_path(), quantization_config=config, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(demo_model_path())

    peft_model = get_slr_peft_model(model, task_type="CAUSAL_LM")  # factors mode, alpha = rank (scaling 1)
    peft_model.print_trainable_parameters()
    trainer = Trainer(
        model=peft_model,
        args=recovery_training_arguments(
            output_dir / "trainer", max_steps=args.max_steps, per_device_train_batch_size=args.batch_size
        ),
        train_dataset=alpaca_dataset(tokenizer, seq_len=args.seq_len),  # your instruction data here
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
    )
    trainer.train()

    peft_model.save_pretrained(output_dir / "adapter")  # reload with hf_slr.peft.load_slr_peft_model
    merged = peft_model.merge_and_unload()  # SLRLinear layers again, U, V updated
    hf_slr.save_pretrained(merged, output_dir / "merged", tokenizer=tokenizer)
    print(f"merged compressed model: {output_dir / 'merged'}")


if __name__ == "__main__":
    main()
