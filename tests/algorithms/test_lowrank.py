"""Low-rank solvers against independent references (Eckart-Young, Cholesky whitening, eq. 7 as written)."""

import pytest
import torch

from hf_slr.algorithms.lowrank import (
    NORM_RELATIVE_FLOOR,
    bilateral_random_projection,
    damp_hessian,
    hessian_sqrt,
    input_norms,
    randomized_svd,
    reduced_rank_regression,
    truncated_svd,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _low_rank_matrix(rows, cols, rank, seed=0):
    g = _gen(seed)
    left = torch.randn(rows, rank, generator=g, dtype=torch.float64)
    return left @ torch.randn(rank, cols, generator=g, dtype=torch.float64)


def _weighted_error(residual, low_rank, hessian):
    error = residual - low_rank
    return float(((error @ hessian) * error).sum())


def test_truncated_svd_is_eckart_young():
    matrix = torch.randn(12, 20, generator=_gen(), dtype=torch.float64)
    u, v = truncated_svd(matrix, 4)
    assert u.shape == (12, 4) and v.shape == (4, 20)
    tail = torch.linalg.svdvals(matrix)[4:].pow(2).sum()
    assert torch.isclose((matrix - u @ v).pow(2).sum(), tail)


def test_truncated_svd_pads_and_handles_rank_zero():
    matrix = torch.randn(3, 5, generator=_gen())
    u, v = truncated_svd(matrix, 6)
    assert u.shape == (3, 6) and v.shape == (6, 5)
    torch.testing.assert_close(u @ v, matrix, atol=1e-5, rtol=1e-5)
    u, v = truncated_svd(matrix, 0)
    assert u.shape == (3, 0) and v.shape == (0, 5)


def test_randomized_svd_exact_on_low_rank_and_near_optimal_otherwise():
    exact = _low_rank_matrix(30, 40, 5)
    u, v = randomized_svd(exact, 5, generator=_gen(1))
    torch.testing.assert_close(u @ v, exact)
    matrix = torch.randn(30, 40, generator=_gen(2), dtype=torch.float64)
    u, v = randomized_svd(matrix, 5, power_iterations=4, generator=_gen(3))
    optimum = torch.linalg.svdvals(matrix)[5:].pow(2).sum()
    assert (matrix - u @ v).pow(2).sum() <= 1.05 * optimum


def test_brp_matches_eq7_formula_and_is_exact_on_low_rank():
    matrix = torch.randn(15, 25, generator=_gen(4), dtype=torch.float64)
    a1 = torch.randn(25, 4, generator=_gen(5), dtype=torch.float64)
    u, v = bilateral_random_projection(matrix, 4, test_matrix=a1)
    y1 = matrix @ a1
    a2 = y1  # GoDec's choice of the second projection
    y2 = matrix.T @ a2
    eq7 = y1 @ torch.linalg.inv(a2.T @ y1) @ y2.T
    torch.testing.assert_close(u @ v, eq7)
    exact = _low_rank_matrix(15, 25, 3)
    u, v = bilateral_random_projection(exact, 3, generator=_gen(6))
    torch.testing.assert_close(u @ v, exact)


def test_hessian_sqrt_with_dead_channel():
    x = torch.randn(40, 8, generator=_gen(7), dtype=torch.float64)
    x[:, 2] = 0
    hessian = x.T @ x
    root, inv_root = hessian_sqrt(hessian)
    assert torch.isfinite(inv_root).all()
    torch.testing.assert_close(root @ root, hessian)
    projector = torch.eye(8, dtype=torch.float64)
    projector[2, 2] = 0
    torch.testing.assert_close(root @ inv_root, projector)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_reduced_rank_regression_matches_cholesky_whitening(rank):
    g = _gen(8)
    residual = torch.randn(6, 9, generator=g, dtype=torch.float64)
    x = torch.randn(30, 9, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, 9, dtype=torch.float64)
    hessian = x.T @ x
    # independent reference: H = C C^T, tr(E H E^T) = ||E C||_F^2, L = C_r(R C) C^-1
    chol = torch.linalg.cholesky(hessian)
    ref_u, ref_v = truncated_svd(residual @ chol, rank)
    reference = torch.linalg.solve_triangular(chol, ref_u @ ref_v, upper=False, left=False)
    u, v = reduced_rank_regression(residual, hessian, rank)
    assert u.shape == (6, rank) and v.shape == (rank, 9)
    reused = reduced_rank_regression(residual, hessian, rank, roots=hessian_sqrt(hessian))
    assert torch.equal(reused[0] @ reused[1], u @ v)
    assert torch.linalg.matrix_rank(u @ v) <= rank
    best = _weighted_error(residual, reference, hessian)
    assert _weighted_error(residual, u @ v, hessian) == pytest.approx(best, rel=1e-8, abs=1e-10)
    # no random or perturbed rank-r candidate does better
    for _ in range(20):
        candidate_u = u + 1e-2 * torch.randn(u.shape, generator=g, dtype=torch.float64)
        candidate_v = v + 1e-2 * torch.randn(v.shape, generator=g, dtype=torch.float64)
        assert _weighted_error(residual, candidate_u @ candidate_v, hessian) >= best - 1e-9


def test_reduced_rank_regression_dead_channel_is_finite_and_optimal():
    g = _gen(9)
    residual = torch.randn(5, 7, generator=g)
    x = torch.randn(20, 7, generator=g)
    x[:, 4] = 0
    hessian = x.T @ x
    u, v = reduced_rank_regression(residual, hessian, 2)
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    damped = hessian.double() + 1e-9 * torch.eye(7, dtype=torch.float64)
    chol = torch.linalg.cholesky(damped)
    ref_u, ref_v = truncated_svd(residual.double() @ chol, 2)
    reference = torch.linalg.solve_triangular(chol, ref_u @ ref_v, upper=False, left=False)
    ours = _weighted_error(residual.double(), (u @ v).double(), hessian.double())
    assert ours <= _weighted_error(residual.double(), reference, hessian.double()) * (1 + 1e-5) + 1e-6


def test_damp_hessian_and_input_norms():
    hessian = torch.diag(torch.tensor([4.0, 0.0, 16.0]))
    damped = damp_hessian(hessian, 0.01)
    torch.testing.assert_close(damped, hessian + 0.01 * (20 / 3) * torch.eye(3))
    norms = input_norms(hessian)
    assert norms[0] == 2 and norms[2] == 4 and norms[1] == pytest.approx(4 * NORM_RELATIVE_FLOOR)
    assert (input_norms(torch.zeros(3, 3)) == 1).all()


@pytest.mark.parametrize("method", ["oats", "activation_svd", "sslc", "qr_rpca", "hassle_free", "threebasil"])
def test_dead_input_channels_keep_values_bounded_and_a_zero_hessian_falls_back_to_frobenius(method):
    """A channel that never fires weighs nothing in the objective; undoing the D scaling must not
    blow its values up (they were ~1000 x max|W| with a 1e-10 floor). A Linear that never fires
    (H = 0) decomposes as data-free (H = I) instead of crashing."""
    from hf_slr.algorithms import Target, get

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 48, generator=generator)
    inputs = torch.randn(200, 48, generator=generator)
    inputs[:, :5] = 0
    algorithm = get(method)
    fast = {"threebasil": {"max_iterations": 5, "min_iterations": 1}}.get(method, {"iterations": 3} if method != "activation_svd" else {})
    target = Target(rank=4, sparsity=0.5)
    for hessian in (inputs.T @ inputs, torch.zeros(48, 48)):
        sparse, u, v = algorithm.run(weight, hessian, target, fast)
        assert float((sparse + u @ v).abs().max()) < 2 * float(weight.abs().max())
    zero = algorithm.run(weight, torch.zeros(48, 48), target, fast)
    identity = algorithm.run(weight, torch.eye(48), target, fast)
    assert torch.equal(zero.sparse, identity.sparse) and torch.equal(zero.u, identity.u)
