"""``hf-slr eval``: perplexity and zero-shot tasks run only when asked; without either, a short,
announced WikiText-2 check (issue 16 item 5)."""

import json

import pytest
import transformers

import hf_slr.eval
from hf_slr import cli


@pytest.fixture
def calls(monkeypatch):
    """What ``hf-slr eval`` ran, with the model loading and the evaluations stubbed out."""
    made = []
    monkeypatch.setattr(cli, "_load", lambda model, dtype, **kwargs: "model")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda name, **kwargs: "tokenizer")

    def perplexity(model, tokenizer, dataset, seq_len, max_windows):
        made.append(("ppl", dataset, seq_len, max_windows))
        return {"ppl": 1.0}

    def evaluate_zeroshot(model, tokenizer, tasks, limit, batch_size):
        made.append(("tasks", tasks, limit))
        return {}

    monkeypatch.setattr(hf_slr.eval, "perplexity", perplexity)
    monkeypatch.setattr(hf_slr.eval, "evaluate_zeroshot", evaluate_zeroshot)
    return made


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--tasks", "piqa"], [("tasks", ("piqa",), None)]),
        (["--tasks", "piqa", "--limit", "5", "--max-windows", "3"], [("tasks", ("piqa",), 5)]),
        (["--ppl", "wikitext2"], [("ppl", "wikitext2", 2048, None)]),
        (["--ppl", "wikitext2,c4", "--seq-len", "512", "--tasks", "piqa"],
         [("ppl", "wikitext2", 512, None), ("ppl", "c4", 512, None), ("tasks", ("piqa",), None)]),
        ([], [("ppl", "wikitext2", 2048, cli.QUICK_PPL_WINDOWS)]),
        (["--max-windows", "4", "--seq-len", "256"], [("ppl", "wikitext2", 256, 4)]),
        (["--ppl", ""], []),
    ],
)
def test_eval_runs_only_what_is_asked(calls, capsys, argv, expected):
    cli.main(["eval", "DIR", *argv])
    assert calls == expected
    out, err = capsys.readouterr()
    assert set(json.loads(out)) == {"model"} | {f"ppl_{c[1]}" for c in expected if c[0] == "ppl"} | (
        {"zeroshot"} if any(c[0] == "tasks" for c in expected) else set()
    )
    said = "neither --ppl nor --tasks given: WikiText-2 perplexity on the first"
    assert (said in err) == (argv in ([], ["--max-windows", "4", "--seq-len", "256"]))


def test_eval_help_says_when_perplexity_runs():
    help_text = " ".join(cli.build_parser()._subparsers._group_actions[0].choices["eval"].format_help().split())
    assert "each runs only when asked" in help_text
    assert f"Without either: WikiText-2 perplexity on the first {cli.QUICK_PPL_WINDOWS} windows" in help_text
