"""Compressing a loaded model: the checks and the plan (:mod:`.plan`), the block-by-block driver
(:mod:`.driver`), block input capture (:mod:`.capture`), device placement (:mod:`.devices`),
transformer matching (:mod:`.matching`) and the statistics of non-uniform allocations
(:mod:`.statistics`). The public entry is :func:`hf_slr.compress`.

This package imports nothing from ``hf_slr.config``: the request travels as a read-only object.
"""
