"""Zero-shot accuracy with lm-eval on the offline data, and the ``hf-slr`` lm-eval model.

The tasks ``slr_piqa``, ``slr_arc_easy``, ``slr_arc_challenge``, ``slr_hellaswag``, ``slr_boolq``
and ``slr_rte`` (tag ``slr_zeroshot``) in :data:`TASKS_DIR` are lm-eval's built-in tasks of the same
name without the prefix (same prompts, choices, targets, metrics and splits: validation, test for
ARC) reading the local files under :func:`hf_slr.texts.data_dir`. No training splits are
available offline, so with ``num_fewshot > 0`` lm-eval draws the shots from the evaluated split
(never the document itself): such numbers are not comparable to the papers'.

lm-eval 0.4 discovers models only through its own registry (no entry-point group), so ``hf-slr``
exists once this module is imported. From the shell use ``python -m hf_slr.eval``, which takes
``lm_eval``'s arguments and adds ``--include_path`` for the ``slr_*`` tasks::

    python -m hf_slr.eval --model hf-slr --model_args pretrained=DIR --tasks slr_zeroshot
"""

from __future__ import annotations

import sys
from pathlib import Path

import lm_eval
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

import hf_slr  # noqa: F401  (registers the SLR checkpoint format before `pretrained=DIR` loads)

__all__ = ["TASKS", "TASKS_DIR", "SLRLM", "evaluate_zeroshot", "main"]

TASKS_DIR = Path(__file__).parent / "tasks"
TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "boolq", "rte")
"""Built-in lm-eval task names with an offline ``slr_`` counterpart."""


@register_model("hf-slr")
class SLRLM(HFLM):
    """lm-eval's :class:`HFLM` for SLR checkpoints (``--model hf-slr --model_args pretrained=DIR``).

    Defined here so that ``hf_slr`` is imported before the checkpoint loads; it loads like ``hf``.
    """


def _local_task(name: str) -> str:
    local = name if name.startswith("slr_") else f"slr_{name}"
    if local.removeprefix("slr_") not in TASKS:
        raise ValueError(f"Unknown task {name!r}; allowed values: {', '.join(TASKS)} (or with the slr_ prefix)")
    return local


def evaluate_zeroshot(
    model,
    tokenizer,
    tasks=TASKS,
    limit: int | float | None = None,
    batch_size: int | str = 8,
    num_fewshot: int = 0,
) -> dict[str, dict[str, float]]:
    """Accuracy of the in-memory ``model`` on offline copies of lm-eval tasks.

    ``tasks`` are names from :data:`TASKS` (optionally ``slr_``-prefixed); ``limit`` caps the
    documents per task (a fraction if < 1, for smoke tests only). Returns ``{task: metrics}``
    keyed by the built-in task name, with ``acc`` (and ``acc_norm`` where lm-eval reports it),
    their ``*_stderr`` and ``n_samples``.
    """
    local = {_local_task(name): name.removeprefix("slr_") for name in tasks}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(local),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
        log_samples=False,
        # Leave the caller's global RNGs alone: scoring is deterministic (few-shot draws keep their seed).
        random_seed=None,
        numpy_random_seed=None,
        torch_random_seed=None,
    )
    results = {}
    for task, name in local.items():
        # lm-eval keys metrics as "metric,filter" (filter "none" here).
        metrics = {key.split(",")[0]: value for key, value in out["results"][task].items() if "," in key}
        results[name] = {**metrics, "n_samples": out["n-samples"][task]["effective"]}
    return results


def main() -> None:
    """``lm_eval``'s command line with ``hf-slr`` registered and the ``slr_*`` tasks included.

    The tasks folder is added as ``--include_path`` unless one is given.
    """
    given = any(arg.split("=")[0] == "--include_path" for arg in sys.argv[1:])
    if len(sys.argv) > 1 and not given:
        sys.argv += ["--include_path", str(TASKS_DIR)]
    cli_evaluate()
