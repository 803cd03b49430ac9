"""HASSLE-free, 3BASiL and QR-RPCA: exact targets, objectives vs. OATS, ADMM and RPCA convergence."""

import dataclasses

import pytest
import torch

from hf_slr.algorithms import available, get
from hf_slr.algorithms import qr_rpca as qr_rpca_module
from hf_slr.algorithms.base import Target, relative_objective
from hf_slr.algorithms.lowrank import WhitenedLowRank, damp_hessian, reduced_rank_regression
from hf_slr.algorithms.projections import SupportProjector, sparsity_mask
from hf_slr.algorithms.threebasil import _next_rho, masked_conjugate_gradient

# name -> (keyword overrides, sparsity scope of the default)
RUNS = {
    "threebasil": ("threebasil", {}, "matrix"),
    "hassle_free": ("hassle_free", {"iterations": 15, "blocksize": 8}, "matrix"),
    "hassle_free_gd": ("hassle_free", {"iterations": 15, "blocksize": 8, "lowrank_step": "gd"}, "matrix"),
    "qr_rpca": ("qr_rpca", {"iterations": 30}, "matrix"),
}
TARGETS = [Target(rank=3, nm_pattern=(2, 4)), Target(rank=3, sparsity=0.5), Target(rank=0, sparsity=0.7)]


def _layer(rows=24, cols=32, seed=0, dead=()):
    """Gaussian W; activations = 6 shared factors + noise with spread channel scales, so H is far
    from diagonal, as in LLM layers (where full-Hessian methods beat OATS' diagonal approximation)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g)
    x = torch.randn(256, 6, generator=g) @ torch.randn(6, cols, generator=g) + 0.3 * torch.randn(256, cols, generator=g)
    x = x * torch.logspace(-0.5, 0.5, cols)
    x[:, list(dead)] = 0
    return weight, x.T @ x


def test_registered_with_paper_defaults():
    assert {"threebasil", "hassle_free", "qr_rpca"} <= set(available())
    assert get("hassle_free").defaults().iterations == 80
    assert get("hassle_free").defaults().lowrank_iterations == 50
    assert get("threebasil").defaults().rho == 0.1
    assert get("qr_rpca").defaults().iterations == 80
    assert "init" not in {field.name for field in dataclasses.fields(get("qr_rpca").hyperparameters)}


@pytest.mark.parametrize("target", TARGETS, ids=str)
@pytest.mark.parametrize("run", RUNS)
def test_constraints_exact(run, target, check_target):
    name, hyper, scope = RUNS[run]
    weight, hessian = _layer()
    sparse, u, v = get(name).run(weight, hessian, target, hyper)
    check_target(sparse, u, v, target, scope)


@pytest.mark.parametrize("run", RUNS)
def test_dead_and_ill_conditioned_channels(run, check_target):
    name, hyper, scope = RUNS[run]
    weight, hessian = _layer(dead=(0, 5))
    hessian[7] *= 1e6  # a channel six orders of magnitude louder: H badly conditioned
    hessian[:, 7] *= 1e6
    target = Target(rank=3, nm_pattern=(2, 4))
    sparse, u, v = get(name).run(weight, hessian, target, hyper)
    check_target(sparse, u, v, target, scope)
    assert relative_objective(weight, sparse, u, v, hessian) < 0.5


@pytest.mark.parametrize("target", TARGETS[:2], ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_full_hessian_methods_reach_oats(seed, target):
    weight, hessian = _layer(seed=seed)
    oats = relative_objective(weight, *get("oats").run(weight, hessian, target), hessian)
    for run in ("threebasil", "hassle_free"):
        name, hyper, _ = RUNS[run]
        objective = relative_objective(weight, *get(name).run(weight, hessian, target, hyper), hessian)
        assert objective <= oats, (run, objective, oats)


def test_hassle_free_closed_form_beats_gd_and_its_first_step():
    weight, hessian = _layer()
    target = Target(rank=3, nm_pattern=(2, 4))
    history = {}
    for run in ("hassle_free", "hassle_free_gd"):
        name, hyper, _ = RUNS[run]
        history[run] = get(name).run(weight, hessian, target, hyper).history
        assert len(history[run]) == hyper["iterations"]
    assert history["hassle_free"][-1] <= history["hassle_free_gd"][-1]
    assert history["hassle_free"][-1] <= history["hassle_free"][0]  # the first step is EoRA


@pytest.mark.parametrize(
    "change, increased, expected",
    [(200, False, (1.1, True, "continue")), (10, True, (1.05, True, "continue")),
     (1, True, (1.02, True, "continue")), (1, False, (0.2, False, "restart")),
     (0, True, (1.0, True, "stop")), (0, False, (0.2, False, "continue"))],
)
def test_rho_schedule_is_eq_36(change, increased, expected):
    rho, now_increased, action = _next_rho(1.0, change, 1000, increased)
    assert (rho, now_increased, action) == pytest.approx(expected)


@pytest.mark.parametrize("rank", [1, 4])
def test_whitened_low_rank_is_the_reduced_rank_regression(rank):
    weight, hessian = _layer(rows=20, cols=28)
    damped = damp_hessian(hessian.double(), 0.01)
    eigenvalues, eigenvectors = torch.linalg.eigh(damped)
    step = WhitenedLowRank(eigenvectors.float(), eigenvalues.sqrt().float(), 20, rank, rank + 8,
                           torch.Generator().manual_seed(0))
    step.fit(weight, power_iterations=6)
    u, v = reduced_rank_regression(weight, damped.float(), rank)

    def cost(low_rank):
        error = (weight - low_rank).double()
        return float(((error @ damped) * error).sum())

    assert cost(step.u @ step.v()) == pytest.approx(cost(u @ v), rel=1e-4)
    tail = torch.linalg.svdvals(weight.double() @ torch.linalg.cholesky(damped))[rank:].pow(2).sum()
    assert cost(u @ v) == pytest.approx(float(tail), rel=1e-4)  # Eckart-Young in the whitened space


def test_admm_primal_residual_vanishes_and_refit_descends():
    weight, hessian = _layer()
    target = Target(rank=3, nm_pattern=(2, 4))
    result = get("threebasil").run(weight, hessian, target)
    history, residuals = result.history, result.diagnostics["primal_residual"]
    assert len(residuals) == len(history) - 1 >= 50  # one objective per iteration, plus the refit
    assert residuals[-1] < 1e-2 * max(residuals[:10])
    assert sum(residuals[-10:]) < sum(residuals[-30:-20])
    assert history[-1] <= history[-2] * (1 + 1e-6)


def test_masked_conjugate_gradient_solves_the_support_system():
    weight, hessian = _layer(rows=6, cols=16)
    mask = sparsity_mask(weight.abs(), Target(sparsity=0.5), "row")
    solution = masked_conjugate_gradient(torch.zeros_like(weight), weight @ hessian, hessian, mask, 40)
    assert not solution[~mask].any()
    for row in range(6):
        support = mask[row]
        exact = torch.linalg.solve(hessian[support][:, support].double(), (weight @ hessian)[row, support].double())
        torch.testing.assert_close(solution[row, support].double(), exact, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("target", [Target(sparsity=0.5), Target(sparsity=0.83), Target(nm_pattern=(2, 4)),
                                    Target(nm_pattern=(3, 8)), Target(sparsity=0.0), Target(sparsity=1.0)], ids=str)
@pytest.mark.parametrize("scope", ["row", "matrix"])
def test_support_projector_matches_sparsity_mask(target, scope):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(16, 40, generator=g)
    projector = SupportProjector(target, scope)
    for step in range(3):  # the second and third calls start from the previous threshold
        moved = scores * (1 + 0.01 * step)
        assert torch.equal(projector(moved), sparsity_mask(moved, target, scope))
    ties = torch.randint(0, 3, (16, 40), generator=g).float()
    mask, reference = projector(ties), sparsity_mask(ties, target, scope)
    assert mask.sum() == reference.sum() and ties[mask].sum() == ties[reference].sum()
    if scope == "row" or target.nm_pattern is not None:
        assert torch.equal(mask.sum(1), reference.sum(1))


@pytest.mark.parametrize("target", TARGETS[:2], ids=str)
@pytest.mark.parametrize("scaling", ["activation", "none"])
def test_qr_rpca_objective_never_increases(scaling, target):
    weight, hessian = _layer()
    # with a diagonal H the layer objective is the one QR-RPCA minimises, ||(W - S - UV) D||_F
    diagonal = torch.diag(hessian.diagonal()) if scaling == "activation" else None
    history = get("qr_rpca").run(weight, diagonal, target, {"scaling": scaling, "iterations": 25}).history
    assert all(b <= a * (1 + 1e-5) for a, b in zip(history, history[1:]))
    assert history[-1] < history[0]


def test_qr_rpca_warm_start_grows_and_shrinks_rank(check_target):
    weight, hessian = _layer()
    algorithm = get("qr_rpca")

    def qr_rpca(weight, hessian, target, init=None, **hyper):  # the warm start is a direct-call argument
        return qr_rpca_module.decompose(weight, hessian, target, algorithm.check(hyper), init=init)

    target = Target(rank=3, sparsity=0.5)
    first = qr_rpca(weight, hessian, target, iterations=20)
    for rank in (5, 2):
        sparse, u, v = qr_rpca(weight, hessian, Target(rank=rank, sparsity=0.5), init=first, iterations=5)
        check_target(sparse, u, v, Target(rank=rank, sparsity=0.5), "matrix")
    diagonal = torch.diag(hessian.diagonal())
    cold = qr_rpca(weight, diagonal, target, iterations=20)
    warm_history = qr_rpca(weight, diagonal, target, init=cold, iterations=3).history
    assert warm_history[0] <= relative_objective(weight, *cold, diagonal) * (1 + 1e-5)
