"""``python -m hf_slr.eval``: ``lm_eval`` with the ``hf-slr`` model and the ``slr_*`` tasks."""

from .zeroshot import main

main()
