"""Masks of the sparsity set: exact counts and optimality (kept scores dominate pruned ones)."""

import pytest
import torch

from hf_slr.algorithms.base import Target
from hf_slr.algorithms.projections import mask_nm, mask_topk_matrix, mask_topk_per_row, sparsity_mask


@pytest.fixture
def scores():
    return torch.rand(7, 26, generator=torch.Generator().manual_seed(0))


def test_topk_per_row_exact_and_dominant(scores):
    mask = mask_topk_per_row(scores, 9)
    assert (mask.sum(1) == 9).all()
    for row, keep in zip(scores, mask):
        assert row[keep].min() >= row[~keep].max()


def test_topk_matrix_exact_and_dominant(scores):
    mask = mask_topk_matrix(scores, 50)
    assert mask.sum() == 50
    assert scores[mask].min() >= scores[~mask].max()


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (3, 3)])
def test_nm_per_group(scores, n, m):
    mask = mask_nm(scores, n, m)
    full = scores.shape[1] // m * m
    groups = mask[:, :full].reshape(scores.shape[0], -1, m)
    assert (groups.sum(-1) == n).all()
    assert not mask[:, full:].any()  # a partial trailing group is pruned (Target.kept_per_row)
    group_scores = scores[:, :full].reshape(scores.shape[0], -1, m)
    kept_min = group_scores.masked_fill(~groups, torch.inf).amin(-1)
    pruned_max = group_scores.masked_fill(groups, -torch.inf).amax(-1)
    assert (kept_min >= pruned_max).all()


@pytest.mark.parametrize(
    "target", [Target(sparsity=0.5), Target(sparsity=0.0), Target(sparsity=1.0), Target(nm_pattern=(2, 4))]
)
def test_sparsity_mask_matches_target_budget(scores, target):
    rows, cols = scores.shape
    assert (sparsity_mask(scores, target, "row").sum(1) == target.kept_per_row(cols)).all()
    assert sparsity_mask(scores, target, "matrix").sum() == target.kept_total(rows, cols)


def test_sparsity_mask_rejects_unknown_scope(scores):
    with pytest.raises(ValueError, match="scope"):
        sparsity_mask(scores, Target(sparsity=0.5), "column")
