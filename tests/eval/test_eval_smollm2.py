"""Real-model checks on SmolLM2-135M (``pytest -m slow``; minutes on CPU)."""

from __future__ import annotations

import pytest
import torch

from hf_slr.eval import evaluate_zeroshot, perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_slr.testing import demo_model_path

    path = demo_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def test_wikitext2_reference(smollm2):
    """Dense fp32 perplexity on the first 20 non-overlapping 1024-token windows, measured as 23.48."""
    out = perplexity(*smollm2, "wikitext2", seq_len=1024, max_windows=20, progress=False)
    assert (out["n_windows"], out["n_tokens"], out["bos"]) == (20, 20 * 1023, False)  # SmolLM2 adds no BOS
    assert out["ppl"] == pytest.approx(23.48, abs=0.01)


def test_zeroshot_above_chance(smollm2):
    results = evaluate_zeroshot(*smollm2, tasks=("piqa", "arc_easy"), limit=50)
    assert results["piqa"]["acc"] > 0.5 and results["arc_easy"]["acc"] > 0.25
