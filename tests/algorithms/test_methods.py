"""Layer-wise methods: exact constraint satisfaction, brute-force optima, monotone alternations."""

import itertools

import pytest
import torch

from hf_slr.algorithms import available, get
from hf_slr.algorithms.base import Target, relative_objective
from hf_slr.algorithms.lowrank import damp_hessian, input_norms, truncated_svd

# method -> (fast hyperparameters for tests, sparsity scope of its default)
METHODS = {
    "magnitude": ({}, "matrix"),
    "wanda": ({}, "row"),
    "sparsegpt": ({"blocksize": 8}, "matrix"),
    "svd": ({}, None),
    "activation_svd": ({}, None),
    "magnitude_svd": ({}, "matrix"),
    "oats": ({"iterations": 4}, "row"),
    "sslc": ({"iterations": 4}, "row"),
}
TARGETS = [
    Target(rank=0, sparsity=0.5),
    Target(rank=3, sparsity=0.6),
    Target(rank=3, nm_pattern=(2, 4)),
    Target(rank=2, nm_pattern=(1, 4)),
    Target(rank=30, sparsity=0.9),
]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _layer(rows=12, cols=26, seed=0, dead=()):
    g = _gen(seed)
    weight = torch.randn(rows, cols, generator=g)
    x = torch.randn(64, cols, generator=g) * torch.logspace(-1, 1, cols)
    x[:, list(dead)] = 0
    return weight, x.T @ x


def test_all_methods_registered():
    assert set(METHODS) <= set(available())
    assert not get("svd").needs_hessian and not get("magnitude_svd").needs_hessian
    assert not get("magnitude").needs_hessian and get("oats").needs_hessian


@pytest.mark.parametrize("target", TARGETS, ids=str)
@pytest.mark.parametrize("name", METHODS)
def test_constraints_exact(name, target, check_target):
    hyper, scope = METHODS[name]
    weight, hessian = _layer()
    sparse, u, v = get(name).run(weight, hessian, target, hyper)
    check_target(sparse, u, v, target, scope)
    if scope is not None and target.nm_pattern is None:  # generic data: the whole budget is used
        expected = target.kept_per_row(26) * 12 if scope == "row" else target.kept_total(12, 26)
        assert (sparse != 0).sum() == expected


@pytest.mark.parametrize("name", METHODS)
def test_dead_and_ill_conditioned_channels(name, check_target):
    hyper, scope = METHODS[name]
    weight, hessian = _layer(dead=(0, 5, 6))
    hessian[3] = hessian[4] * (1 + 1e-7)  # nearly collinear inputs
    hessian[:, 3] = hessian[3]
    for target in (Target(rank=3, sparsity=0.5), Target(rank=3, nm_pattern=(2, 4))):
        result = get(name).run(weight, hessian, target, hyper)
        check_target(*result, target, scope)
        assert all(torch.isfinite(torch.tensor(h)) for h in result.history)


def _best_support(row, kept, cost):
    """Exhaustive: the support of size ``kept`` minimising ``cost(support)``."""
    return min(itertools.combinations(range(row.numel()), kept), key=cost)


def test_wanda_is_the_enumerated_optimum_of_its_metric():
    weight, hessian = _layer(rows=3, cols=8, seed=1)
    metric = weight.abs() * hessian.diagonal().sqrt()
    sparse, _, _ = get("wanda").run(weight, hessian, Target(sparsity=0.5))
    for row, metric_row, result in zip(weight, metric, sparse):
        support = _best_support(row, 4, lambda s: -float(metric_row[list(s)].sum()))
        expected = torch.zeros_like(row)
        expected[list(support)] = row[list(support)]
        torch.testing.assert_close(result, expected)
    sparse, _, _ = get("wanda").run(weight, hessian, Target(nm_pattern=(2, 4)))
    for i, j in itertools.product(range(3), (0, 4)):
        group = metric[i, j : j + 4]
        support = _best_support(group, 2, lambda s: -float(group[list(s)].sum()))
        assert set((sparse[i, j : j + 4] != 0).nonzero().flatten().tolist()) == set(support)


def _refit_error(weight_row, support, hessian):
    """min over s supported on ``support`` of (w - s) H (w - s)^T: least-squares refit of the kept weights."""
    pruned = [j for j in range(weight_row.numel()) if j not in support]
    keep = list(support)
    error = torch.zeros_like(weight_row)
    error[pruned] = weight_row[pruned]
    if keep:
        error[keep] = -torch.linalg.solve(hessian[keep][:, keep], hessian[keep][:, pruned] @ weight_row[pruned])
    return float(error @ hessian @ error), weight_row - error


@pytest.mark.parametrize("target", [Target(sparsity=0.5), Target(sparsity=2 / 3), Target(nm_pattern=(2, 4))], ids=str)
def test_sparsegpt_diagonal_hessian_is_the_exhaustive_optimum(target):
    g = _gen(2)
    weight = torch.randn(2, 6, generator=g).double()
    hessian = torch.diag(torch.rand(6, generator=g).double() * 5 + 0.1)
    sparse, _, _ = get("sparsegpt").run(weight.float(), hessian.float(), target, {"scope": "row"})
    damped = damp_hessian(hessian, 0.01)
    for row, result in zip(weight, sparse):
        if target.nm_pattern is None:
            supports = itertools.combinations(range(6), target.kept_per_row(6))
        else:  # 2 of the first 4 columns; the trailing partial group is pruned
            supports = itertools.combinations(range(4), 2)
        best = min(supports, key=lambda s: _refit_error(row, s, damped)[0])
        torch.testing.assert_close(result.double(), _refit_error(row, best, damped)[1], rtol=1e-5, atol=1e-6)


def test_sparsegpt_one_pruned_column_is_the_exact_refit():
    """Pruning only the first column, the OBS update is the exact least-squares refit (full H)."""
    g = _gen(3)
    weight = torch.randn(1, 5, generator=g).double()
    weight[0, 0] = 1e-4  # lowest saliency: the one weight pruned
    x = torch.randn(20, 5, generator=g).double()
    x[:, 1] += x[:, 0]  # correlated inputs: the refit moves the kept weights
    hessian = x.T @ x
    sparse, _, _ = get("sparsegpt").run(weight.float(), hessian.float(), Target(sparsity=0.2))
    assert sparse[0, 0] == 0 and (sparse[0, 1:] != 0).all()
    _, refit = _refit_error(weight[0], (1, 2, 3, 4), damp_hessian(hessian, 0.01))
    torch.testing.assert_close(sparse[0].double(), refit, rtol=1e-4, atol=1e-6)


def _reference_obs_nm(weight, hessian, n, m):
    """Unblocked sequential OBS written out with explicit inverses of the remaining columns' Hessian."""
    weight = weight.clone()
    cols = weight.shape[1]
    keep = torch.zeros_like(weight, dtype=torch.bool)
    for j in range(cols):
        inverse = torch.linalg.inv(hessian[j:, j:])
        if j % m == 0:
            saliency = torch.stack(
                [weight[:, k] ** 2 / torch.linalg.inv(hessian[k:, k:])[0, 0] for k in range(j, j + m)], dim=1
            )
            keep.scatter_(1, j + saliency.argsort(dim=1, descending=True)[:, :n], True)
        pruned = ~keep[:, j]
        weight[pruned, j:] -= (weight[pruned, j] / inverse[0, 0])[:, None] * inverse[0][None, :]
    return weight * keep


@pytest.mark.parametrize("blocksize", [4, 8, 128])
def test_sparsegpt_blocked_nm_matches_unblocked_obs(blocksize):
    """Lazy block updates + Cholesky rows reproduce plain sequential OBS (SparseGPT Alg. 1)."""
    weight, hessian = _layer(rows=3, cols=12, seed=9)
    sparse, _, _ = get("sparsegpt").run(weight, hessian, Target(nm_pattern=(2, 4)), {"blocksize": blocksize})
    reference = _reference_obs_nm(weight.double(), damp_hessian(hessian.double(), 0.01), 2, 4)
    torch.testing.assert_close(sparse.double(), reference, rtol=1e-4, atol=1e-4)


def _scaled_objective(weight, hessian, sparse, u, v):
    return float(((weight - sparse - u @ v) * input_norms(hessian)).double().pow(2).sum())


@pytest.mark.parametrize("target", [Target(rank=3, sparsity=0.6), Target(rank=3, nm_pattern=(2, 4))], ids=str)
@pytest.mark.parametrize("name", ["oats", "sslc"])
def test_scaled_objective_never_increases(name, target):
    """001 App. A eq. 12-14 / 004 Cor. 4.2: each exact alternation lowers ||(W - S - L) D||_F."""
    weight, hessian = _layer(rows=16, cols=24, seed=4)
    objectives = [
        _scaled_objective(weight, hessian, *get(name).run(weight, hessian, target, {"iterations": t}))
        for t in range(1, 9)
    ]
    assert all(b <= a * (1 + 1e-5) for a, b in zip(objectives, objectives[1:]))
    assert objectives[-1] < objectives[0]


def _reference_oats(weight, hessian, target, iterations):
    """OATS written out (authors' altern_ls): SVD of the scaled residual, per-row hard threshold."""
    scale = hessian.diagonal().sqrt()
    scaled = weight * scale
    sparse = torch.zeros_like(scaled)
    kept = target.kept_per_row(weight.shape[1])
    for _ in range(iterations):
        left, singular, right = torch.linalg.svd(scaled - sparse, full_matrices=False)
        low_rank = left[:, : target.rank] @ torch.diag(singular[: target.rank]) @ right[: target.rank]
        sparse = scaled - low_rank
        order = sparse.abs().argsort(dim=1, descending=True)
        sparse = sparse * torch.zeros_like(sparse).scatter(1, order[:, :kept], 1.0)
    return (sparse + low_rank) / scale


def test_oats_matches_reference_and_history():
    weight, hessian = _layer(rows=10, cols=16, seed=5)
    target = Target(rank=2, sparsity=0.5)
    result = get("oats").run(weight.double(), hessian.double(), target, {"iterations": 6})
    sparse, u, v = result
    history = result.history
    reference = _reference_oats(weight.double(), hessian.double(), target, 6)
    torch.testing.assert_close((sparse + u @ v).double(), reference, rtol=1e-4, atol=1e-4)
    assert len(history) == 6
    assert history[-1] == pytest.approx(relative_objective(weight, sparse, u, v, hessian), rel=1e-4)


@pytest.mark.parametrize("scope", ["row", "matrix"])
@pytest.mark.parametrize("preserve", ["support", "values"])
def test_sslc_preserves_top_salient_weights(scope, preserve):
    """The preserved weights are in S's support and reproduced exactly by S + U V ("support"), or
    S holds them as they are ("values")."""
    weight, hessian = _layer(rows=20, cols=40, seed=6)
    target = Target(rank=4, sparsity=0.5)
    sparse, u, v = get("sslc").run(weight, hessian, target, {"iterations": 3, "scope": scope, "preserve": preserve})
    salience = (weight * hessian.diagonal().sqrt()).abs()
    if scope == "matrix":  # 1% of 800 weights: the 8 most salient of the matrix
        top = torch.zeros(weight.numel(), dtype=torch.bool)
        top[salience.flatten().argsort(descending=True)[:8]] = True
        top = top.view_as(weight)
    else:  # 1% of a 40-wide row keeps its most salient weight
        top = torch.zeros_like(weight, dtype=torch.bool).scatter_(1, salience.argmax(dim=1, keepdim=True), True)
    assert bool((sparse[top] != 0).all())
    if preserve == "support":
        torch.testing.assert_close((sparse + u @ v)[top], weight[top], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(sparse[top], weight[top])  # L is free there
    else:
        torch.testing.assert_close(sparse[top], weight[top])


def test_activation_svd_is_diagonal_weighted_optimum():
    """004 Thm 4.1: C_r(W D) D^-1 minimises tr(E diag(H) E^T); compare to the whitened SVD written out."""
    weight, hessian = _layer(seed=7)
    sparse, u, v = get("activation_svd").run(weight, hessian, Target(rank=4))
    assert not sparse.any()
    diagonal = torch.diag(hessian.diagonal())
    scale = hessian.diagonal().sqrt().double()
    optimum = torch.linalg.svdvals(weight.double() * scale)[4:].pow(2).sum()
    error = (weight - u @ v).double()
    assert float(((error @ diagonal.double()) * error).sum()) == pytest.approx(float(optimum), rel=1e-4)


def test_magnitude_svd_is_prune_then_best_rank():
    weight, _ = _layer(seed=8)
    target = Target(rank=3, sparsity=0.7)
    sparse, u, v = get("magnitude_svd").run(weight, None, target)
    magnitude, _, _ = get("magnitude").run(weight, None, target)
    torch.testing.assert_close(sparse, magnitude)
    optimum = torch.linalg.svdvals((weight - sparse).double())[3:].pow(2).sum()
    assert float((weight - sparse - u @ v).double().pow(2).sum()) == pytest.approx(float(optimum), rel=1e-4)
    assert magnitude.abs()[magnitude != 0].min() >= weight.abs()[magnitude == 0].max()


def _real_layer_hessians(layer_index=3, sequences=4, tokens=64):
    """q_proj / down_proj weights of SmolLM2-135M and H = X^T X from random-token forward passes."""
    from transformers import AutoModelForCausalLM

    from hf_slr.testing import demo_model_path

    model = AutoModelForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32).eval()
    layer = model.model.layers[layer_index]
    modules = {"q_proj": layer.self_attn.q_proj, "down_proj": layer.mlp.down_proj}
    hessians = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in modules.items()}

    def accumulate(name):
        def hook(_module, inputs, _output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            hessians[name] += x.T @ x
        return hook

    handles = [m.register_forward_hook(accumulate(name)) for name, m in modules.items()]
    ids = torch.randint(0, model.config.vocab_size, (sequences, tokens), generator=_gen(10))
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return {name: (modules[name].weight.detach().clone(), hessians[name].float()) for name in modules}


@pytest.mark.slow
def test_real_smollm2_alternations_are_monotone(check_target):
    for name, (weight, hessian) in _real_layer_hessians().items():
        for target in (Target(rank=get("sslc").split.rank_for(*weight.shape), sparsity=0.5), Target(rank=16, nm_pattern=(2, 4))):
            for method in ("oats", "sslc"):
                objectives = []
                for t in range(1, 6):
                    result = get(method).run(weight, hessian, target, {"iterations": t})
                    history = result.history
                    check_target(*result, target, METHODS[method][1])
                    assert all(0 <= h < 1 for h in history), (name, method, history)
                    objectives.append(_scaled_objective(weight, hessian, *result))
                assert all(b <= a * (1 + 1e-5) for a, b in zip(objectives, objectives[1:])), (name, method, objectives)
