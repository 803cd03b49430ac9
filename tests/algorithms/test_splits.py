"""Each S + LR method's own paper split when only ``compression_ratio`` is given."""

from __future__ import annotations

import math

import pytest

from hf_slr import SLRConfig, algorithms
from hf_slr.algorithms.splits import RankRatio, ScaledRank
from hf_slr.allocation import uniform_target

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096), (4096, 11008)]


@pytest.mark.parametrize("method", algorithms.available())
@pytest.mark.parametrize("ratio", [0.5, 0.6])
def test_compression_ratio_alone_keeps_exactly_the_budget_with_the_papers_split(method, ratio):
    algorithm = algorithms.get(method)
    config = SLRConfig(method=method, compression_ratio=ratio)
    for m, n in SHAPES:
        target = uniform_target(m, n, config)
        kept = target.kept_total(m, n) + target.rank * (m + n)
        budget = math.floor((1 - ratio) * m * n)
        # The split spends the whole budget (up to whole rows of S, or < m + n for a pure low-rank method),
        # under both sparse scopes: per row, S keeps kept_per_row in every one of the m rows.
        assert budget - (m + n) < kept <= budget, (method, m, n, target)
        if algorithm.low_rank and algorithm.sparse:
            assert m * target.kept_per_row(n) == target.kept_total(m, n)
        split = algorithm.split
        if not algorithm.low_rank:
            assert target.rank == 0
        elif not algorithm.sparse:
            assert target.kept_total(m, n) == 0
        elif isinstance(split, ScaledRank):  # the paper's rank at its width, scaled to min(m, n)
            assert target.rank == max(1, round(split.rank * min(m, n) / split.width))
        else:
            assert isinstance(split, RankRatio)
            assert target.rank == math.floor(split.kappa * (1 - ratio) * m * n / (m + n) + 1e-9)


def test_papers_splits_on_their_own_layers():
    """SSLC: r = 128 on LLaMA-2-7B's 4096 x 4096 at 50% (001 App. E.1); 18 on SmolLM2's 576-wide layers;
    3BASiL: the U V of 002 Table 3's 3:8 + LR at p = 0.5, 1/8 of the matrix; OATS / HASSLE-free
    kappa 0.3 (004 App. A.3)."""
    def rank(method, m, n):
        return uniform_target(m, n, SLRConfig(method=method, compression_ratio=0.5)).rank

    assert rank("sslc", 4096, 4096) == 128 and rank("sslc", 4096, 11008) == 128
    assert rank("sslc", 576, 576) == 18 and rank("sslc", 192, 576) == 6
    lr_of_3_8 = (0.5 - 3 / 8) * 4096 * 4096 / (4096 + 4096)  # r (m + n) = (p - 3/8) m n
    assert rank("threebasil", 4096, 4096) == lr_of_3_8 == 256 and rank("threebasil", 576, 576) == 36
    assert rank("hassle_free", 4096, 4096) == math.floor(0.3 * 0.5 * 4096 * 4096 / 8192) == 307
    assert rank("oats", 4096, 4096) == 307


def test_rank_ratio_still_overrides_the_papers_split():
    config = SLRConfig(method="sslc", compression_ratio=0.5, rank_ratio=0.25)
    target = uniform_target(576, 576, config)
    assert target.rank == math.floor(0.25 * 0.5 * 576 * 576 / 1152) == 36


def test_an_s_plus_lr_method_must_declare_its_split():
    with pytest.raises(TypeError, match="must declare its paper's `split`"):
        algorithms.Algorithm("x", True, algorithms.get("oats").hyperparameters, lambda *a: None, "paper")
