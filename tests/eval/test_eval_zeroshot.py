from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
from datasets import Dataset, DatasetDict
from lm_eval.api.registry import get_model
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml
from lm_eval.tasks.hellaswag.utils import process_docs

from hf_slr.eval import evaluate_zeroshot
from hf_slr.eval.zeroshot import SLRLM, TASKS, TASKS_DIR

BUILTIN_DIR = Path(lm_eval.__file__).parent / "tasks"
BUILTIN_YAML = {
    "piqa": "piqa/piqa.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "rte": "glue/rte/default.yaml",
}
SIZES = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "boolq": 3270, "rte": 277}
SPLITS = ("training_split", "validation_split", "test_split")

# The first HellaSwag validation items as published (rowanz/hellaswag data/hellaswag_val.jsonl).
HELLASWAG_RAW = {
    0: ("Roof shingle removal", "A man is sitting on a roof.", "he"),
    2: (
        "Canoeing",
        "Two women in a child are shown in a canoe while a man pulls the canoe while standing in the "
        "water, with other individuals visible in the background.",
        "the child and a different man",
    ),
    8: ("Sharpening knives", "A man is holding a pocket knife while sitting on some rocks in the wilderness.", "then he"),
}


@pytest.fixture(scope="module")
def local_tasks():
    names = [f"slr_{name}" for name in TASKS]
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False).load(names)["tasks"]


@pytest.mark.parametrize("name", TASKS)
def test_same_requests_as_builtin_task(local_tasks, name):
    """The built-in task config on our docs (in the Hub schema) gives our task's requests."""
    ours = local_tasks[f"slr_{name}"]
    docs = ours.eval_docs
    assert len(docs) == SIZES[name]
    sample = [0, 1, 2, 3, 4, len(docs) - 2, len(docs) - 1]
    config = load_yaml(BUILTIN_DIR / BUILTIN_YAML[name], resolve_func=True)
    config["custom_dataset"] = lambda **_: DatasetDict({k: v.select(sample) for k, v in ours.dataset.items()})
    for split in SPLITS:  # keep the splits the offline copy has, the evaluated one included
        if config.get(split) not in ours.dataset:
            config[split] = None
    builtin = ConfigurableTask(config=config)

    for key in ("output_type", "metric_list", "target_delimiter", "fewshot_delimiter", *SPLITS):
        assert getattr(ours.config, key) == getattr(builtin.config, key), key
    assert ours.config.metadata["version"] == builtin.config.metadata["version"]
    for i, builtin_doc in zip(sample, builtin.eval_docs, strict=True):
        choices = ours.doc_to_choice(docs[i])
        assert ours.doc_to_text(docs[i]) == builtin.doc_to_text(builtin_doc)
        assert choices == builtin.doc_to_choice(builtin_doc)
        assert ours.doc_to_target(docs[i]) == builtin.doc_to_target(builtin_doc)
        assert 0 <= ours.doc_to_target(docs[i]) < len(choices)


def test_docs_follow_the_source_files(local_tasks):
    first = {name: local_tasks[f"slr_{name}"].eval_docs[0] for name in TASKS}
    assert first["piqa"]["label"] == 0  # first line of valid-labels.lst
    assert local_tasks["slr_arc_challenge"].doc_to_target(first["arc_challenge"]) == 2  # answerKey "C"
    assert local_tasks["slr_boolq"].doc_to_choice(first["boolq"])[first["boolq"]["label"]] == "no"
    assert first["rte"]["label"] == 1 and first["rte"]["idx"] == 0

    arc = local_tasks["slr_arc_challenge"]
    numeric = [d for d in arc.eval_docs if d["choices"]["label"][0] == "1"]
    assert numeric and all(arc.doc_to_choice(d)[arc.doc_to_target(d)] for d in numeric)
    assert {len(d["choices"]["text"]) for d in arc.eval_docs} == {3, 4, 5}


def test_hellaswag_matches_lm_eval_processing_of_the_original(local_tasks):
    raw = [
        {"activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b, "endings": [], "label": "0"}
        for label, ctx_a, ctx_b in HELLASWAG_RAW.values()
    ]
    expected = process_docs(Dataset.from_list(raw))["query"]
    docs = local_tasks["slr_hellaswag"].eval_docs
    assert [docs[i]["query"] for i in HELLASWAG_RAW] == expected
    assert docs[0]["query"] == "Roof shingle removal: A man is sitting on a roof. He"


def test_evaluate_zeroshot_end_to_end(tiny_model, tokenizer):
    results = evaluate_zeroshot(tiny_model, tokenizer, tasks=("piqa", "slr_rte"), limit=4, batch_size=4)
    assert set(results) == {"piqa", "rte"}
    assert set(results["piqa"]) >= {"acc", "acc_norm", "acc_stderr", "n_samples"}
    assert results["rte"]["n_samples"] == 4 and 0.0 <= results["rte"]["acc"] <= 1.0


def test_unknown_task():
    with pytest.raises(ValueError, match="Unknown task 'winogrande'; allowed values: piqa, arc_easy"):
        evaluate_zeroshot(None, None, tasks=("winogrande",))


def test_hf_slr_model_loads_a_checkpoint(tiny_model, tokenizer, tmp_path):
    assert get_model("hf-slr") is SLRLM
    tiny_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    out = lm_eval.simple_evaluate(
        model="hf-slr",
        model_args=f"pretrained={tmp_path}",
        tasks=["slr_rte"],
        limit=2,
        device="cpu",
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
        log_samples=False,
    )
    assert out["n-samples"]["slr_rte"]["effective"] == 2


@pytest.mark.slow
def test_command_line(tiny_model, tokenizer, tmp_path):
    """``python -m hf_slr.eval`` is ``lm_eval`` with ``hf-slr`` and the slr_* tasks (~40 s: indexes all tasks)."""
    tiny_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    command = [sys.executable, "-m", "hf_slr.eval", "--model", "hf-slr", "--model_args", f"pretrained={tmp_path}"]
    command += ["--tasks", "slr_rte", "--limit", "2", "--device", "cpu"]
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "|rte" in run.stdout and "acc" in run.stdout
