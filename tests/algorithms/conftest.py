"""Shared checks of the layer-wise algorithm tests."""

import pytest
import torch


def _satisfies_target(sparse, u, v, target, scope):
    """(S, U, V) has the target's shapes, float32 finite values, its sparsity set and rank <= r."""
    rows, cols = sparse.shape
    assert u.shape == (rows, target.rank) and v.shape == (target.rank, cols)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in (sparse, u, v))
    nonzero = sparse != 0
    if target.nm_pattern is not None:
        n, m = target.nm_pattern
        full = cols // m * m
        assert (nonzero[:, :full].reshape(rows, -1, m).sum(-1) <= n).all()
        assert not nonzero[:, full:].any()
    elif scope == "row":
        assert (nonzero.sum(1) <= target.kept_per_row(cols)).all()
    else:
        assert nonzero.sum() <= target.kept_total(rows, cols)
    if target.rank:
        assert torch.linalg.matrix_rank(u.double() @ v.double()) <= target.rank


@pytest.fixture
def check_target():
    """``check_target(S, U, V, target, scope)`` asserts that (S, U, V) satisfies ``target`` exactly."""
    return _satisfies_target
