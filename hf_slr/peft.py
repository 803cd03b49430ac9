"""PEFT LoRA on SLRLinear layers: the low-rank factors U, V are the adapter.

``mode="factors"`` (001 §4.3 eq. 9; 002 §3): LoRA's A, B start from the layer's V, U and replace its
own low-rank path, so the layer computes S x + scaling B A x with S frozen on its fixed support:
fine-tuning trains U, V and adds no parameters. ``mode="extra"``: plain LoRA beside S + U V (new A,
B, PEFT's usual init, U, V frozen), the baseline of 001 Table 2. Either way merging writes into
U, V (never into a dense weight), so ``merge_and_unload()`` returns a compressed model that
``hf_slr.save_pretrained`` / ``from_pretrained`` round-trip.

The mode travels in the adapter config as ``init_lora_weights``: ``"slr_factors"`` for factors,
PEFT's ``True`` for extra. PEFT does not serialize custom-module registrations: reload adapters
with :func:`load_slr_peft_model`.
"""

from __future__ import annotations

from collections import Counter

import datasets
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import layer as lora
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from .algorithms.lowrank import balance_factors
from .calibration import calibration_ids
from .integration import compressed_layers, matches
from .modules import SLRLinear
from .texts import data_file

MODES = ("factors", "extra")
SLR_FACTORS = "slr_factors"
"""``init_lora_weights`` of a factors-mode adapter."""
SUPPORTED_INITS = (True, False, "gaussian", SLR_FACTORS)
DEFAULT_LEARNING_RATE = 1e-3
"""AdamW learning rate of :func:`recovery_training_arguments` (measured: docs/peft.md, "Defaults")."""
ALPACA_FILE = "alpaca/alpaca_data.first335.json"
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{context}. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n"
)


class SLRLoraLinear(lora.Linear):
    """LoRA layer around an :class:`SLRLinear` (registered with ``LoraConfig._register_custom_module``).

    With ``init_lora_weights="slr_factors"`` the adapter replaces the layer's U V (001 §4.3 eq. 9):
    A = V, B = U / scaling with U, V first balanced per component (||U[:, c]|| = ||V[c, :]||, the
    convention of PiSSA, Meng et al. 2024; a no-op on checkpoints whose method ran through
    ``Algorithm.run``, which balances), so the output at initialisation is unchanged and the two
    factors start on one scale. A LoRA rank r above the layer's rank k pads A with PEFT's default
    init and B with zeros, and so are the zero components of U V (the extra directions start at
    zero and can learn, where zero rows of A and columns of B would get no gradient); r < k is
    refused, since truncating U V would change the model. The base
    layer keeps its U, V untouched: they are what ``disable_adapter()``, ``unmerge()`` and
    ``unload()`` return to.

    Merging rewrites the base factors: a factors adapter gives U = scaling B, V = A; an extra
    adapter is appended, U = [U, scaling B], V = [V; A] (rank k + r). The layer's rank is the
    shape of U, so the merged checkpoint describes itself and reloads.
    """

    other_param_names = lora.Linear.other_param_names + ("slr_factors",)

    def __init__(self, base_layer: SLRLinear, adapter_name: str, config: LoraConfig, **kwargs):
        self.slr_factors: dict[str, bool] = {}
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    @property
    def lora_variants(self):
        # DoRA and the other variants need a dense base weight.
        return {(): None}

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs) -> None:
        init, rank = config.init_lora_weights, self.get_base_layer().rank
        where = kwargs.get("target_name") or "SLRLinear"
        if init not in SUPPORTED_INITS:
            raise ValueError(
                f"{where}: init_lora_weights={init!r} is not supported on SLRLinear (it has no dense weight); "
                f"allowed: {SUPPORTED_INITS}"
            )
        if config.fan_in_fan_out or config.lora_bias:
            raise ValueError(f"{where}: `fan_in_fan_out` and `lora_bias` do not apply to SLRLinear")
        if init == SLR_FACTORS:
            _check_factors_rank(where, r, rank)
        self.slr_factors[adapter_name] = init == SLR_FACTORS
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights) -> None:
        if init_lora_weights != SLR_FACTORS:
            return super().reset_lora_parameters(adapter_name, init_lora_weights)
        super().reset_lora_parameters(adapter_name, True)  # kaiming A, zero B: padding and zero components
        base = self.get_base_layer()
        u, v = balance_factors(base.U, base.V)  # checkpoints written before Algorithm.run balanced them
        live = torch.linalg.vector_norm(u.float(), dim=0) > 0
        with torch.no_grad():
            a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
            a[: base.rank][live] = v[live].to(a.dtype)
            b[:, : base.rank][:, live] = (u[:, live] / self.scaling[adapter_name]).to(b.dtype)

    def _get_in_out_features(self, module: SLRLinear) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer):
        return base_layer.U.device, base_layer.U.dtype

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if kwargs.get("adapter_names") is not None and any(self.slr_factors.values()):
            raise ValueError("`adapter_names` (mixed-batch inference) is not supported with mode='factors' adapters")
        replaced = any(self.slr_factors.get(name) for name in self.active_adapters)
        if self.disable_adapters or self.merged or not replaced:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        # S only (in x's dtype, like SLRLinear.forward): the adapters stand in for U V.
        bias = None if base.bias is None else base.bias.to(x.dtype)
        result = F.linear(x, base.sparse_weight().to(x.dtype), bias)
        for name in (name for name in self.active_adapters if name in self.lora_A):
            x = self._cast_input_dtype(x, self.lora_A[name].weight.dtype)
            delta = self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x))) * self.scaling[name]
            result = result + delta.to(result.dtype)
        return result

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """Dense change of the layer's weight made by ``adapter``: scaling B A, minus U V in factors mode."""
        delta = super().get_delta_weight(adapter)
        if not self.slr_factors[adapter]:
            return delta
        u, v = self._unmerged_factors if self.merged else (self.get_base_layer().U, self.get_base_layer().V)
        return delta - (u @ v).to(delta.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write the adapters into the base layer's U, V (see the class docstring)."""
        names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.lora_A]
        if not names:
            return
        base = self.get_base_layer()
        if not self.merged:
            self._unmerged_factors = (base.U, base.V)
        merged = self.merged_adapters + names
        u0, v0 = self._unmerged_factors
        replaced = any(self.slr_factors[name] for name in merged)  # factors adapters stand in for U V
        with torch.no_grad():
            us = ([] if replaced else [u0]) + [self.lora_B[name].weight * self.scaling[name] for name in merged]
            vs = ([] if replaced else [v0]) + [self.lora_A[name].weight for name in merged]
            u, v = torch.cat([t.to(u0.dtype) for t in us], 1), torch.cat([t.to(v0.dtype) for t in vs], 0)
        if safe_merge and not (torch.isfinite(u).all() and torch.isfinite(v).all()):
            raise ValueError(f"NaNs detected in the merged factors. The adapters {names} seem to be broken")
        self._set_factors(u, v)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Restore the base layer's own U, V."""
        if not self.merged:
            return super().unmerge()  # PEFT's "Already unmerged" warning
        self._set_factors(*self._unmerged_factors)
        del self._unmerged_factors
        self.merged_adapters.clear()

    def _set_factors(self, u: torch.Tensor, v: torch.Tensor):
        base = self.get_base_layer()
        base.U = u if isinstance(u, nn.Parameter) else nn.Parameter(u, requires_grad=False)
        base.V = v if isinstance(v, nn.Parameter) else nn.Parameter(v, requires_grad=False)


def _check_factors_rank(where: str, r: int, rank: int):
    if r < rank:
        raise ValueError(
            f"{where}: mode='factors' needs a LoRA rank >= the layer's rank {rank}, got r={r} (truncating "
            "U V would change the model); use r=None (the layer's rank), a larger r, or mode='extra'"
        )


def _register(config: LoraConfig) -> LoraConfig:
    config._register_custom_module({SLRLinear: SLRLoraLinear})
    return config


def _slr_layers(model: nn.Module) -> dict[str, SLRLinear]:
    layers = compressed_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no SLRLinear layers: compress it first, e.g. "
            "AutoModelForCausalLM.from_pretrained(dense, quantization_config=hf_slr.SLRConfig(...))"
        )
    return layers


def _selected(names: list[str], target_modules: list[str] | str | None) -> list[str]:
    if target_modules is None:
        return names
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    chosen = [name for name in names if matches(name, targets)]
    if not chosen:
        raise ValueError(f"target_modules={targets} matches no SLRLinear layer; they are e.g. {names[:3]}")
    return chosen


def _pattern(values: dict[str, int]) -> tuple[int, dict[str, int]]:
    """The most common value and the exceptions, as LoraConfig's ``r`` / ``rank_pattern``."""
    common = Counter(values.values()).most_common(1)[0][0]
    return common, {name: value for name, value in values.items() if value != common}


def get_slr_peft_model(
    model: nn.Module,
    r: int | None = None,
    lora_alpha: float | None = None,
    target_modules: list[str] | str | None = None,
    lora_dropout: float = 0.0,
    mode: str = "factors",
    adapter_name: str = "default",
    **lora_kwargs,
) -> PeftModel:
    """Wrap a compressed model for LoRA fine-tuning of its SLRLinear layers (001 §4.3 eq. 9; 002 §3).

    The LoraConfig lists the SLRLinear layers in ``target_modules`` (PEFT's ``"all-linear"`` does not
    match them) with a ``rank_pattern`` / ``alpha_pattern`` for the layers off the common rank.

    Args:
        model: a model with SLRLinear layers (e.g. loaded with ``quantization_config=SLRConfig(...)``).
        r: LoRA rank of every targeted layer; None: each layer's own rank (then both modes train the
            same number of parameters, sum of r (in + out)).
        lora_alpha: LoRA alpha; None: alpha = rank per layer (scaling 1, so B = U and A = V exactly).
        target_modules: SLRLinear names or name suffixes to adapt (default: all of them).
        lora_dropout: dropout on the adapter input (in factors mode, on the input of U V).
        mode: ``"factors"``: U, V are the adapter (S frozen, no extra parameters);
            ``"extra"``: new LoRA A, B beside the frozen S + U V.
        lora_kwargs: other :class:`peft.LoraConfig` fields (e.g. ``use_rslora``, ``task_type``).
    """
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r <= 0):
        raise ValueError(f"`r` must be an int > 0 or None (each layer's own rank), got {r!r}")
    if "init_lora_weights" in lora_kwargs:
        raise ValueError("`init_lora_weights` is set by `mode` ('factors' -> 'slr_factors', 'extra' -> True)")
    layers = _slr_layers(model)
    names = _selected(list(layers), target_modules)
    ranks = {name: r or layers[name].rank for name in names}
    if mode == "factors":
        for name in names:  # before PEFT starts replacing layers
            _check_factors_rank(name, ranks[name], layers[name].rank)
    zero = [name for name, rank in ranks.items() if rank == 0]
    if zero:
        raise ValueError(f"{zero[:3]} have rank 0: pass an explicit r > 0")
    rank, rank_pattern = _pattern(ranks)
    alpha, alpha_pattern = (lora_alpha, {}) if lora_alpha is not None else (rank, rank_pattern)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=names,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        lora_dropout=lora_dropout,
        init_lora_weights=SLR_FACTORS if mode == "factors" else True,
        **lora_kwargs,
    )
    return get_peft_model(model, _register(config), adapter_name=adapter_name)


def load_slr_peft_model(
    model: nn.Module, adapter_dir, adapter_name: str = "default", is_trainable: bool = False, **kwargs
) -> PeftModel:
    """Load an adapter saved from :func:`get_slr_peft_model` onto the compressed ``model``.

    Re-registers the SLRLinear LoRA layer (PEFT does not serialize it), then
    ``PeftModel.from_pretrained``; ``kwargs`` go to it.
    """
    _slr_layers(model)
    config = _register(LoraConfig.from_pretrained(adapter_dir))
    return PeftModel.from_pretrained(
        model, adapter_dir, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **kwargs
    )


def recovery_training_arguments(output_dir, max_steps: int, **overrides) -> TrainingArguments:
    """``TrainingArguments`` for LoRA recovery of a compressed model, with the measured defaults.

    AdamW at :data:`DEFAULT_LEARNING_RATE`, 10% linear warmup then linear decay, gradient norm
    clipped at 1, no checkpoints, no reporting, the CPU when no GPU is present. ``overrides`` replace
    any field (``per_device_train_batch_size``, ``learning_rate``, ``seed``, ...).
    """
    fields = dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        learning_rate=DEFAULT_LEARNING_RATE,
        warmup_steps=max(1, max_steps // 10),
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        logging_steps=max(1, max_steps // 20),
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
    )
    return TrainingArguments(**(fields | overrides))


def recovery_trainer(
    peft_model: PeftModel, tokenizer, output_dir, max_steps: int, *, seq_len: int = 256, train_dataset=None, **overrides
) -> Trainer:
    """A ``transformers.Trainer`` for LoRA recovery: :func:`recovery_training_arguments` (``overrides``
    replace its fields), ``train_dataset`` (default: :func:`alpaca_dataset` at ``seq_len``; or
    :func:`text_dataset` for plain text) and a collator that pads the labels with -100."""
    return Trainer(
        model=peft_model,
        args=recovery_training_arguments(output_dir, max_steps, **overrides),
        train_dataset=alpaca_dataset(tokenizer, seq_len) if train_dataset is None else train_dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
    )


def alpaca_prompt(example: dict) -> str:
    """The Stanford Alpaca prompt of one example, with or without its ``### Input:`` section."""
    if example["input"]:
        return ALPACA_PROMPT.format(
            context=", paired with an input that provides further context",
            instruction=example["instruction"],
            input=f"### Input:\n{example['input']}\n\n",
        )
    return ALPACA_PROMPT.format(context="", instruction=example["instruction"], input="")


def alpaca_dataset(tokenizer, seq_len: int = 256, path=None) -> datasets.Dataset:
    """Alpaca as the recovery data of 001 Table 2 / 002 §4.2: prompt + response + EOS, truncated to
    ``seq_len``, the loss on the response tokens only (``labels`` -100 on the prompt).

    ``path``: a JSON list of ``instruction`` / ``input`` / ``output`` rows (default: the local
    335-example sample, ``hf_slr.texts.data_file("alpaca/alpaca_data.first335.json")``).
    """

    def tokenize(example):
        prompt = tokenizer(alpaca_prompt(example), add_special_tokens=False).input_ids
        response = tokenizer(example["output"] + tokenizer.eos_token, add_special_tokens=False).input_ids
        input_ids = (prompt + response)[:seq_len]
        labels = ([-100] * len(prompt) + response)[:seq_len]
        return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}

    rows = datasets.load_dataset("json", data_files=str(path or data_file(ALPACA_FILE)), split="train")
    return rows.map(tokenize, remove_columns=rows.column_names)


def text_dataset(tokenizer, dataset="c4", n_samples: int = 1000, seq_len: int = 256, seed: int = 1) -> datasets.Dataset:
    """Plain-text recovery data, the language-modelling fine-tune of 002 §4.2 (C4 training text):
    ``n_samples`` segments of ``seq_len`` tokens drawn as :func:`hf_slr.calibration.calibration_ids`
    draws calibration segments (``dataset``: any source it takes), every token scored.

    ``seed`` picks the draws; the default differs from the calibration's 0, so the fine-tuning
    segments are not the calibration segments.
    """
    ids = calibration_ids(dataset, tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * seq_len] * n_samples, "labels": ids})
