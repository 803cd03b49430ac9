"""Offline loaders for the ``slr_*`` lm-eval tasks (their ``custom_dataset``).

Each loader reads the local copy under :func:`hf_slr.texts.data_dir` and returns it in the Hub
schema of the built-in lm-eval task, so the YAML prompts are the built-in ones unchanged. lm-eval
calls them with the task metadata as keyword arguments, which they ignore.
"""

from __future__ import annotations

import bz2
import csv
import json
import re

from datasets import Dataset, DatasetDict
from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs

from hf_slr.texts import data_file

# HellaSwag items end with ``ctx_b`` (ActivityNet: a sentence start) or a full sentence (WikiHow).
_SENTENCE_END = re.compile(r"[.!?] ")


def _jsonl(relative: str) -> list[dict]:
    with data_file(relative).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def piqa(**metadata) -> DatasetDict:
    """PIQA validation as ``baber/piqa``: goal, sol1, sol2, label (from ``valid-labels.lst``)."""
    docs = _jsonl("piqa/valid.jsonl")
    labels = data_file("piqa/valid-labels.lst").read_text(encoding="utf-8").split()
    if len(labels) != len(docs):
        raise ValueError(f"PIQA: {len(docs)} questions but {len(labels)} labels")
    return DatasetDict(validation=Dataset.from_list([{**d, "label": int(y)} for d, y in zip(docs, labels)]))


def arc_easy(**metadata) -> DatasetDict:
    """ARC-Easy test, already in the ``allenai/ai2_arc`` schema."""
    with data_file("arc/arc_easy_test.hf.json").open(encoding="utf-8") as f:
        return DatasetDict(test=Dataset.from_list(json.load(f)))


def arc_challenge(**metadata) -> DatasetDict:
    """ARC-Challenge test, AI2 jsonl turned into the ``allenai/ai2_arc`` schema (labels kept as is)."""
    rows = [
        {
            "id": doc["id"],
            "question": doc["question"]["stem"],
            "choices": {
                "text": [c["text"] for c in doc["question"]["choices"]],
                "label": [c["label"] for c in doc["question"]["choices"]],
            },
            "answerKey": doc["answerKey"],
        }
        for doc in _jsonl("arc/ARC-Challenge-Test.jsonl")
    ]
    return DatasetDict(test=Dataset.from_list(rows))


def _split_context(ctx: str) -> tuple[str, str]:
    """(ctx_a, ctx_b) of a context: the unfinished last sentence is ``ctx_b`` (empty if finished)."""
    if ctx.endswith((".", "!", "?")):
        return ctx, ""
    ends = list(_SENTENCE_END.finditer(ctx))
    cut = ends[-1].end() if ends else 0
    return ctx[:cut].rstrip(), ctx[cut:]


def hellaswag(**metadata) -> DatasetDict:
    """HellaSwag validation from llama.cpp's text form, through lm-eval's own ``process_docs``.

    llama.cpp writes ``activity_label: ctx`` with ``ctx = ctx_a + " " + ctx_b``, so ``ctx_b`` (which
    lm-eval capitalizes) is recovered as the unfinished last sentence to rebuild the
    ``Rowan/hellaswag`` schema. llama.cpp's bracket clean-up removes less than lm-eval's, which the
    second pass (in ``process_docs``) completes. Processing here rather than in the YAML runs it once.
    """
    with bz2.open(data_file("hellaswag/hellaswag_val_full.txt.bz2"), "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    if len(lines) % 6:
        raise ValueError(f"HellaSwag: expected 6 lines per item, got {len(lines)} lines")
    rows = []
    for i in range(0, len(lines), 6):
        activity_label, ctx = lines[i].split(": ", 1)
        ctx_a, ctx_b = _split_context(ctx)
        rows.append(
            {
                "ind": i // 6,
                "activity_label": activity_label,
                "ctx_a": ctx_a,
                "ctx_b": ctx_b,
                "ctx": ctx,
                "endings": lines[i + 2 : i + 6],
                "label": lines[i + 1],
            }
        )
    return DatasetDict(validation=hellaswag_process_docs(Dataset.from_list(rows)))


def boolq(**metadata) -> DatasetDict:
    """BoolQ dev as SuperGLUE ``boolq`` validation: question, passage, idx, label (1 = true)."""
    rows = [
        {"question": d["question"], "passage": d["passage"], "idx": i, "label": int(d["answer"])}
        for i, d in enumerate(_jsonl("boolq/dev.jsonl"))
    ]
    return DatasetDict(validation=Dataset.from_list(rows))


def rte(**metadata) -> DatasetDict:
    """GLUE RTE validation: sentence1, sentence2, label (0 = entailment), idx."""
    with data_file("rte/rte_validation_hf_glue.tsv").open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = [{**r, "label": int(r["label"]), "idx": int(r["idx"])} for r in reader]
    return DatasetDict(validation=Dataset.from_list(rows))
