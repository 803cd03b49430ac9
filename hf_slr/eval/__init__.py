"""Evaluation: perplexity (paper protocol) and zero-shot accuracy (lm-eval), offline."""

from .perplexity import perplexity
from .zeroshot import evaluate_zeroshot

__all__ = ["perplexity", "evaluate_zeroshot"]
