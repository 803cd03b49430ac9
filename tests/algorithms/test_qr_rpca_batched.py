"""QR-RPCA on a stack of matrices (:func:`qr_rpca.solve`, the learned allocation's inner solver)
against the per-matrix :func:`qr_rpca.decompose` (a batch of one), same seed, cold and warm."""

import pytest
import torch

from hf_slr.algorithms import Target, qr_rpca
from hf_slr.algorithms.projections import SupportProjector

TARGETS = [Target(rank=5, sparsity=0.6), Target(rank=0, sparsity=0.7), Target(rank=2, sparsity=0.4), Target(rank=8, sparsity=0.55)]


def _per_matrix(weights, targets, iterations, init=None, seed=3):
    record = qr_rpca.ALGORITHM.check({"iterations": iterations, "scaling": "none", "seed": seed})
    return [
        qr_rpca.decompose(w, None, t, record, record_history=False, init=None if init is None else init[b])
        for b, (w, t) in enumerate(zip(weights, targets))
    ]


def _batched(weights, targets, iterations, init=None, seed=3):
    ranks = [t.rank for t in targets]
    sparse, u, v = qr_rpca.solve(
        weights,
        ranks,
        [SupportProjector(t, "matrix") for t in targets],
        iterations,
        sparse=None if init is None else torch.stack([d.sparse for d in init]),
        init_v=None if init is None else [d.v for d in init],
        seed=seed,
    )
    return [(sparse[b], u[b, :, :r], v[b, :r]) for b, r in enumerate(ranks)]


@pytest.mark.parametrize("warm", [False, True])
def test_batched_solver_gives_the_per_matrix_result(warm):
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(4, 48, 40, generator=generator) * torch.rand(1, 1, 40, generator=generator).add(0.1)
    init = None
    if warm:  # warm start from solutions of other ranks: V truncated (8 -> 2) and extended (2 -> 5, 0 -> ...)
        previous = [Target(rank=2, sparsity=0.5), Target(rank=3, sparsity=0.7), Target(rank=6, sparsity=0.5), Target(rank=8, sparsity=0.5)]
        init = _per_matrix(weights, previous, 10, seed=1)
    singles = _per_matrix(weights, TARGETS, 6, init)
    batched = _batched(weights, TARGETS, 6, init)
    for single, (sparse, u, v), target, w in zip(singles, batched, TARGETS, weights):
        assert u.shape == (48, target.rank) and v.shape == (target.rank, 40)
        assert int((sparse != 0).sum()) == int((single.sparse != 0).sum()) == target.kept_total(48, 40)
        assert float(((sparse != 0) != (single.sparse != 0)).float().mean()) < 1e-3  # ties by round-off at most
        torch.testing.assert_close(sparse + u @ v, single.sparse + single.u @ single.v, rtol=0, atol=1e-4 * float(w.abs().max()))
    # a batch of one is the per-matrix call, bit for bit
    (sparse, u, v), single = _batched(weights[:1], TARGETS[:1], 6, None if init is None else init[:1])[0], singles[0]
    assert torch.equal(sparse, single.sparse) and torch.equal(u, single.u) and torch.equal(v, single.v)


def test_targets_from_one_start_share_the_first_qr_and_match_separate_solves():
    """solve_many (the learned allocation's centre and samples) equals one solve per target set."""
    generator = torch.Generator().manual_seed(1)
    weights = torch.randn(3, 48, 32, generator=generator)
    start = _batched(weights, TARGETS[:3], 8)
    sparse, init_v = torch.stack([s for s, _, _ in start]), [v for _, _, v in start]
    sets = [TARGETS[:3], [Target(rank=7, sparsity=0.5), Target(rank=1, sparsity=0.8), Target(rank=0, sparsity=0.3)]]
    counts = [1, 3, 1]
    sets.append(sets[1])
    approximate = [False, False, True]  # the last: S + U V returned in place of S
    shared = qr_rpca.solve_many(
        weights, [[t.rank for t in s] for s in sets], [[SupportProjector(t, "matrix") for t in s] for s in sets], counts,
        sparse=sparse, init_v=init_v, seed=5, approximate=approximate,
    )
    approximation, _, _ = shared.pop()
    s_one, u_one, v_one = qr_rpca.solve(weights, [t.rank for t in sets[1]], [SupportProjector(t, "matrix") for t in sets[1]], 1,
                                        sparse=sparse, init_v=init_v, seed=5)
    torch.testing.assert_close(approximation, s_one + u_one @ v_one, rtol=0, atol=1e-4)
    for targets, count, (s_many, u_many, v_many) in zip(sets, counts, shared):
        s_one, u_one, v_one = qr_rpca.solve(
            weights, [t.rank for t in targets], [SupportProjector(t, "matrix") for t in targets], count,
            sparse=sparse, init_v=init_v, seed=5,
        )
        for b, target in enumerate(targets):
            assert int((s_many[b] != 0).sum()) == target.kept_total(48, 32)
            assert float(((s_many[b] != 0) != (s_one[b] != 0)).float().mean()) < 1e-3
            low_rank = u_many[b, :, : target.rank] @ v_many[b, : target.rank]
            torch.testing.assert_close(s_many[b] + low_rank, s_one[b] + u_one[b] @ v_one[b], rtol=0, atol=1e-4)
            assert torch.linalg.matrix_rank(low_rank) <= target.rank


@pytest.mark.parametrize("ties", [False, True])
def test_projector_apply_keeps_the_values_of_the_mask(ties):
    """apply (float passes when no tie is at the threshold) equals values * the keep-mask, on the
    first call (sampled quantile) and on the next (the previous threshold), with and without ties."""
    generator = torch.Generator().manual_seed(0)
    target = Target(sparsity=0.6)
    projector, out = SupportProjector(target, "matrix"), torch.empty(400, 300)
    for shift in (0.0, 0.01):
        values = torch.randint(-5, 6, (400, 300), generator=generator).float() if ties else torch.randn(400, 300, generator=generator) + shift
        projector.apply(values, out)
        assert projector.strict != ties
        assert torch.equal(out, values * SupportProjector(target, "matrix")(values.abs()))
        assert int((out != 0).sum()) <= target.kept_total(400, 300)
