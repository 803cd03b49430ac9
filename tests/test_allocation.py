"""Allocation: projection (000 App. C.1), truncated Gaussian (App. C.2, D.3), policy gradient
(App. D.1-D.2), annealing (App. A.2), OWL, exact budgets, and owl / learned through the pipeline."""

import itertools
import dataclasses
import json
import math

import pytest
import torch
from test_compression import TEXTS, tiny_model, tokenizer  # noqa: F401  (tokenizer is a fixture)
from transformers import AutoModelForCausalLM

import hf_slr
from hf_slr import SLRConfig, SLRLinear, algorithms
from hf_slr.algorithms import Target
from hf_slr.allocation import ALLOCATIONS, check_kwargs
from hf_slr.allocation.bilevel import (
    annealed_gamma,
    draw_samples,
    gradient_estimate,
    policy_gradient,
    truncated_gaussian,
    truncated_gaussian_variance,
)
from hf_slr.allocation.budget import allocate, kept_total, project_sparsity
from hf_slr.allocation.owl import outlier_ratios, owl_sparsity
from hf_slr.calibration import calibration_ids
from hf_slr.cli import build_parser

# --- projection (000 App. C.1) ------------------------------------------------------------------


def _brute_force_projection(z, target, w):
    """argmin ||s - z|| over {w.s = target sum w, 0 <= s <= 1} by enumerating which coordinates
    sit at 0, at 1 or in between (the free ones solve the equality-constrained least squares)."""
    goal, best = target * w.sum(), None
    for pattern in itertools.product((0, 1, None), repeat=len(z)):
        s = torch.tensor([0.0 if p is None else float(p) for p in pattern], dtype=torch.float64)
        free = torch.tensor([p is None for p in pattern])
        if free.any():
            nu = ((w * z)[free].sum() - (goal - (w * s)[~free].sum())) / (w * w)[free].sum()
            s[free] = z[free] - nu * w[free]
        if (s < -1e-12).any() or (s > 1 + 1e-12).any() or abs(float((w * s).sum() - goal)) > 1e-9:
            continue
        if best is None or (s - z).pow(2).sum() < (best - z).pow(2).sum():
            best = s
    return best


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_projection_meets_the_budget_is_idempotent_and_matches_brute_force(seed, weighted):
    generator = torch.Generator().manual_seed(seed)
    z = torch.rand(6, generator=generator, dtype=torch.float64) * 2.0 - 0.5  # some outside [0, 1]
    w = torch.rand(6, generator=generator, dtype=torch.float64) + 0.5 if weighted else torch.ones(6, dtype=torch.float64)
    s = project_sparsity(z, 0.55, w)
    assert float((w * s).sum() / w.sum()) == pytest.approx(0.55, abs=1e-13)
    assert bool((s >= 0).all() and (s <= 1).all())
    torch.testing.assert_close(project_sparsity(s, 0.55, w), s, rtol=0, atol=1e-13)
    torch.testing.assert_close(s, _brute_force_projection(z, 0.55, w), rtol=0, atol=1e-10)


def test_projection_inside_the_box_is_the_mean_shift():
    z = torch.tensor([0.42, 0.55, 0.61, 0.47, 0.5], dtype=torch.float64)
    torch.testing.assert_close(project_sparsity(z, 0.6), z - z.mean() + 0.6, rtol=0, atol=1e-14)


# --- truncated Gaussian (000 App. C.2, D.3) -------------------------------------------------------


def _quadrature(f, low, high, n=200_001):
    grid = torch.linspace(low, high, n, dtype=torch.float64)
    return float(torch.trapezoid(f(grid), grid))


@pytest.mark.parametrize("sigma, gamma", [(math.sqrt(5e-2), 5e-2), (0.1, 0.15), (0.2, 0.3)])
def test_truncated_gaussian_samples_stay_in_the_window_with_the_analytic_variance(sigma, gamma):
    density = lambda z: torch.exp(-0.5 * (z / sigma) ** 2)  # noqa: E731
    numeric = _quadrature(lambda z: z**2 * density(z), -gamma, gamma) / _quadrature(density, -gamma, gamma)
    assert truncated_gaussian_variance(sigma, gamma) == pytest.approx(numeric, rel=1e-8)

    mu = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    n = 400_000
    x = truncated_gaussian(mu.expand(n, 3), sigma, gamma, torch.Generator().manual_seed(0))
    assert bool((x >= mu - gamma).all() and (x <= mu + gamma).all())
    variance = truncated_gaussian_variance(sigma, gamma)
    standard_error = x.var(0) * math.sqrt(2.0 / n)  # kurtosis <= 3 for the truncated Gaussian
    assert bool(((x.var(0) - variance).abs() < 5 * standard_error).all())
    assert bool(((x.mean(0) - mu).abs() < 5 * math.sqrt(variance / n)).all())


# --- policy gradient (000 App. D.1-D.2) -----------------------------------------------------------


# The toy quadratic L(x) = (x - c)^T A (x - c) at mu, sampled in the window [mu - gamma, mu + gamma].
TOY_SIGMA2, TOY_GAMMA = 0.01, 0.15
TOY_A = torch.tensor([[2.0, 0.6, 0.0], [0.6, 1.0, -0.3], [0.0, -0.3, 0.5]], dtype=torch.float64)
TOY_C = torch.tensor([0.3, 0.7, 0.2], dtype=torch.float64)
TOY_MU = torch.tensor([0.5, 0.45, 0.6], dtype=torch.float64)


def _toy_loss(x):
    d = x - TOY_C
    return ((d @ TOY_A) * d).sum(-1)


def _fixed_window_gradient():
    """The gradient of E[L] under N(mu, sigma^2) restricted to the window fixed at the current mu
    (finite differences of a quadrature), for which Lemma 1's score is exact."""
    sigma, gamma = math.sqrt(TOY_SIGMA2), TOY_GAMMA

    def window_moments(center, location):
        density = lambda t: torch.exp(-0.5 * ((t - location) / sigma) ** 2)  # noqa: E731
        mass = _quadrature(density, center - gamma, center + gamma)
        first = _quadrature(lambda t: t * density(t), center - gamma, center + gamma) / mass
        second = _quadrature(lambda t: t * t * density(t), center - gamma, center + gamma) / mass
        return first, second

    def fixed_window_objective(location):
        moments = [window_moments(float(TOY_MU[i]), float(location[i])) for i in range(3)]
        m = torch.tensor([first for first, _ in moments], dtype=torch.float64)
        second = torch.tensor([s for _, s in moments], dtype=torch.float64)
        d = m - TOY_C
        return float((d @ TOY_A) @ d + (TOY_A.diagonal() * (second - m * m)).sum())

    h, steps = 1e-4, torch.eye(3, dtype=torch.float64)
    differences = [fixed_window_objective(TOY_MU + h * e) - fixed_window_objective(TOY_MU - h * e) for e in steps]
    return torch.tensor(differences, dtype=torch.float64) / (2 * h)


def _toy_estimates(n, pairs=1, antithetic=False, baseline=None, seed=0):
    """[n, 3]: n independent one-step estimates of gradient_estimate on the toy (same seed, same draws)."""
    samples = draw_samples(TOY_MU, math.sqrt(TOY_SIGMA2), TOY_GAMMA, n * pairs, antithetic, torch.Generator().manual_seed(seed))
    samples = torch.cat([samples[: n * pairs].view(n, pairs, 3), samples[n * pairs :].view(n, pairs, 3)], dim=1)
    return gradient_estimate(_toy_loss(samples), samples, TOY_MU, TOY_SIGMA2, antithetic=antithetic, baseline=baseline)


def test_policy_gradient_is_unbiased_on_a_quadratic_loss():
    """The mean of many two-sample estimates against two independent references: the fixed-window
    gradient (:func:`_fixed_window_gradient`) and beta(gamma / sigma) times the closed-form
    gradient 2 A (mu - c) of the moving-window expectation."""
    sigma = math.sqrt(TOY_SIGMA2)
    n = 1_000_000
    generator = torch.Generator().manual_seed(0)
    x, x_prime = (truncated_gaussian(TOY_MU.expand(n, 3), sigma, TOY_GAMMA, generator) for _ in range(2))
    estimates = policy_gradient(_toy_loss(x)[:, None], _toy_loss(x_prime)[:, None], x, TOY_MU, TOY_SIGMA2)  # n at once
    mean, standard_error = estimates.mean(0), estimates.std(0) / math.sqrt(n)
    reference = _fixed_window_gradient()
    assert bool(((mean - reference).abs() < 5 * standard_error).all()), (mean, reference, standard_error)
    beta = truncated_gaussian_variance(sigma, TOY_GAMMA) / TOY_SIGMA2
    torch.testing.assert_close(reference, beta * 2 * TOY_A @ (TOY_MU - TOY_C), rtol=1e-5, atol=1e-7)
    # gradient_estimate's paper form is policy_gradient on the same draws
    torch.testing.assert_close(_toy_estimates(1000), policy_gradient(*_paper_pairs(1000), TOY_MU, TOY_SIGMA2))


def _paper_pairs(n):
    x, x_prime = draw_samples(TOY_MU, math.sqrt(TOY_SIGMA2), TOY_GAMMA, n, False, torch.Generator().manual_seed(0)).view(2, n, 3)
    return _toy_loss(x)[:, None], _toy_loss(x_prime)[:, None], x


@pytest.mark.parametrize(
    "pairs, antithetic, baseline",
    [(1, True, None), (3, True, None), (2, False, 0.05), (1, False, None)],
    ids=["antithetic", "3-antithetic-pairs", "constant-baseline", "paper-pairs"],
)
def test_variance_reduced_estimators_stay_unbiased(pairs, antithetic, baseline):
    """Antithetic pairs (the window is symmetric about mu), several pairs, and a baseline independent
    of the samples (a moving average of past losses) keep E[g] the fixed-window gradient: the mean
    of n estimates is within 5 standard errors of it."""
    n = 1_000_000 // pairs
    estimates = _toy_estimates(n, pairs, antithetic, baseline)
    mean, standard_error = estimates.mean(0), estimates.std(0) / math.sqrt(n)
    reference = _fixed_window_gradient()
    assert bool(((mean - reference).abs() < 5 * standard_error).all()), (mean, reference, standard_error)


def test_variance_reduced_estimators_have_lower_variance_on_the_toy():
    """tr Cov(g) of the same 200k draws: the antithetic pair removes the curvature terms and the
    independent second sample's noise; K pairs divide by K; a baseline near E[L] beats the pair."""
    n = 200_000

    def variance(**kwargs):
        return float(_toy_estimates(n, **kwargs).var(0).sum())

    paper = variance()
    expected_loss = float(_toy_loss(TOY_MU)) + TOY_A.diagonal().sum() * truncated_gaussian_variance(math.sqrt(TOY_SIGMA2), TOY_GAMMA)
    assert variance(antithetic=True) < 0.6 * paper
    assert variance(antithetic=True, pairs=4) == pytest.approx(variance(antithetic=True) / 4, rel=0.05)
    assert variance(pairs=1, baseline=float(expected_loss)) < 0.6 * paper


def test_cubic_annealing_endpoints():
    steps, g0, g1 = 100, 5e-2, 5e-3
    values = [annealed_gamma(t, steps, g0, g1, 0.1, 0.8) for t in range(steps)]
    assert values[0] == values[10] == g0  # warm-up: t <= 0.1 T
    assert values[80] == pytest.approx(g1, abs=1e-15) and values[81] == values[-1] == g1
    assert values[45] == pytest.approx(g1 + (g0 - g1) * 0.5**3)  # halfway through the annealing
    assert all(later <= earlier for earlier, later in zip(values, values[1:]))


# --- OWL and exact budgets ------------------------------------------------------------------------


def _layers(n_layers=4, outlier_layer=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weights, norms, groups = {}, {}, []
    for layer in range(n_layers):
        group = []
        for kind, shape in (("q", (16, 24)), ("down", (24, 40))):
            name = f"layers.{layer}.{kind}"
            weights[name] = torch.randn(shape, generator=generator)
            norms[name] = torch.rand(shape[1], generator=generator) + 0.5
            if layer == outlier_layer:
                weights[name][torch.rand(shape, generator=generator) < 0.05] *= 30.0
            group.append(name)
        groups.append(group)
    return weights, norms, groups


def test_owl_keeps_the_mean_and_prunes_outlier_heavy_layers_least():
    weights, norms, groups = _layers()
    ratios = outlier_ratios(weights, norms, groups)
    for layer, group in enumerate(groups):  # brute force: count entries above 5 x the layer mean
        scores = [float(v) for name in group for v in (weights[name].abs() * norms[name]).flatten()]
        mean = sum(scores) / len(scores)
        assert float(ratios[layer]) == pytest.approx(sum(score > 5 * mean for score in scores) / len(scores))
    sparsity = owl_sparsity(weights, norms, groups, 0.5, lam=0.08)
    assert float(sparsity.mean()) == pytest.approx(0.5, abs=1e-13)
    assert float(sparsity.max() - sparsity.min()) == pytest.approx(0.16, abs=1e-12)
    assert int(sparsity.argmin()) == 2 == int(ratios.argmax())


@pytest.mark.parametrize("seed", [0, 1])
def test_allocated_budget_is_exact_and_targets_keep_their_nnz(seed):
    generator = torch.Generator().manual_seed(seed)
    groups = [[f"l{layer}.{kind}" for kind in "abc"] for layer in range(5)]
    shapes = {name: tuple(int(v) for v in torch.randint(8, 300, (2,), generator=generator)) for group in groups for name in group}
    sizes = torch.tensor([float(sum(shapes[n][0] * shapes[n][1] for n in g)) for g in groups], dtype=torch.float64)
    sparsity = project_sparsity(0.6 + 0.2 * torch.randn(5, generator=generator, dtype=torch.float64), 0.6, sizes)
    kappa = torch.rand(15, generator=generator, dtype=torch.float64)
    targets = allocate(shapes, groups, sparsity, kappa, total=kept_total(shapes, 0.6))
    total = 0
    for layer, group in enumerate(groups):
        for index, name in enumerate(group):
            m, n = shapes[name]
            nnz = targets[name].kept_total(m, n)
            kept = (1 - float(sparsity[layer])) * m * n
            ratio = float(kappa[3 * layer + index])
            assert targets[name].rank == min(math.floor(ratio * kept / (m + n)), m, n)
            assert abs(nnz + targets[name].rank * (m + n) - kept) < 2  # the remainder moves one unit at most
            total += nnz + targets[name].rank * (m + n)
    assert total == sum(math.floor(0.4 * m * n) for m, n in shapes.values())


# --- config and CLI -------------------------------------------------------------------------------

RATIO = {"compression_ratio": 0.5, "rank_ratio": 0.2}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(allocation="owl", sparsity="2:4", rank=4), "needs `compression_ratio`"),
        (dict(allocation="learned", rank=8), "needs `compression_ratio`"),
        (dict(allocation="learned", compression_ratio=0.4, sparsity="2:4"), "unstructured"),
        (dict(RATIO, allocation="owl", allocation_kwargs={"steps": 3}), "allowed: \\['lam'"),
        (dict(RATIO, allocation="learned", allocation_kwargs={"init": "random"}), "one of \\['uniform', 'owl'\\]"),
        (dict(RATIO, allocation="learned", allocation_kwargs={"lr": float("nan")}), "`allocation_kwargs\\['lr'\\]` of allocation 'learned'"),
        (dict(RATIO, allocation="owl", allocation_kwargs={"lam": True}), "`allocation_kwargs\\['lam'\\]` of allocation 'owl'"),
        (dict(RATIO, allocation="learned", allocation_kwargs={"steps": 0}), "`allocation_kwargs\\['steps'\\]`"),
        (dict(RATIO, allocation="learned", allocation_kwargs={"xi_warmup": 0.9}), "xi_anneal"),
        (dict(allocation_kwargs={"lam": 0.1}), "allocation 'uniform' must be empty"),
    ],
)
def test_invalid_allocation_configs_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SLRConfig(**kwargs)


def test_a_pruning_method_spreads_its_sparsity_with_owl():
    """``--sparsity 0.6 --allocation owl`` for a pruning method means compression ratio 0.6, rank 0;
    the config keeps what was asked (the ratio is derived)."""
    config = SLRConfig(method="wanda", sparsity=0.6, allocation="owl")
    assert config.effective_compression_ratio == 0.6
    assert config.to_dict()["sparsity"] == 0.6 and config.to_dict()["compression_ratio"] is None
    assert SLRConfig(method="wanda", compression_ratio=0.6, allocation="owl").effective_compression_ratio == 0.6
    assert SLRConfig(method="wanda", sparsity=0.6).effective_compression_ratio == 0.6
    for kwargs in (dict(method="oats", sparsity=0.6), dict(method="wanda", sparsity="2:4"), dict(method="wanda")):
        assert SLRConfig(**kwargs).effective_compression_ratio is None
        with pytest.raises(ValueError, match="needs `compression_ratio`"):
            SLRConfig(allocation="owl", **kwargs)


def test_owl_pruning_by_sparsity_equals_owl_pruning_by_compression_ratio(tokenizer):
    """The same layers either way, meeting the budget exactly (per matrix: row-wise top-k rounds per row)."""
    common = dict(method="wanda", method_kwargs={"scope": "matrix"}, allocation="owl", dataset=TEXTS, n_samples=4, seq_len=16)
    models = [
        hf_slr.compress(tiny_model("llama", layers=3), SLRConfig(**common, **spelling), tokenizer)
        for spelling in (dict(sparsity=0.6), dict(compression_ratio=0.6))
    ]
    layers = [{name: m for name, m in model.named_modules() if isinstance(m, SLRLinear)} for model in models]
    assert layers[0].keys() == layers[1].keys()
    for name, layer in layers[0].items():
        assert layer.rank == 0 and torch.equal(layer.to_dense(), layers[1][name].to_dense())
    assert models[0].slr_report["allocation"]["layer_sparsity"] == models[1].slr_report["allocation"]["layer_sparsity"]
    assert len({round(s, 6) for s in models[0].slr_report["allocation"]["layer_sparsity"]}) > 1  # not uniform
    kept = sum(layer.nnz for layer in layers[0].values())
    assert kept == sum(math.floor(0.4 * layer.in_features * layer.out_features) for layer in layers[0].values())


def test_every_hyperparameter_is_validated_and_the_cli_passes_them():
    for allocation in ("owl", "learned"):
        defaults = check_kwargs(allocation, {})
        assert isinstance(defaults, ALLOCATIONS[allocation])
        assert check_kwargs(allocation, dataclasses.asdict(defaults)) == defaults  # the defaults pass their own checks
    args = build_parser().parse_args(
        ["compress", "m", "--method", "qr_rpca", "--out", "o", "--allocation", "learned", "--allocation-kwargs", '{"steps": 3}']
    )
    assert args.allocation == "learned" and json.loads(args.allocation_kwargs) == {"steps": 3}


# --- through the pipeline -------------------------------------------------------------------------

FAST_LEARNED = {"steps": 3, "batch_size": 2, "inner_iterations": 2}


def _compress(method, allocation, tokenizer, method_kwargs=None, device="cpu", **kwargs):
    model = tiny_model("llama", layers=3).to(device)
    config = SLRConfig(
        method=method,
        compression_ratio=0.5,
        rank_ratio=0.25,
        allocation=allocation,
        dataset=TEXTS,
        n_samples=6,
        seq_len=16,
        method_kwargs=method_kwargs,
        **kwargs,
    )
    return hf_slr.compress(model, config, tokenizer)


def _kept(model):
    layers = [m for m in model.modules() if isinstance(m, SLRLinear)]
    kept = sum(layer.nnz + layer.rank * (layer.in_features + layer.out_features) for layer in layers)
    return kept, sum(math.floor(0.5 * layer.in_features * layer.out_features) for layer in layers)


@pytest.mark.parametrize(
    "method, allocation, method_kwargs, allocation_kwargs",
    [
        ("qr_rpca", "owl", {"iterations": 3}, {}),
        ("qr_rpca", "learned", {"iterations": 3}, FAST_LEARNED),
        ("threebasil", "learned", {"max_iterations": 2, "min_iterations": 1}, FAST_LEARNED | {"init": "owl"}),
    ],
)
def test_allocation_meets_the_budget_exactly_saves_its_plot_and_reloads(
    method, allocation, method_kwargs, allocation_kwargs, tokenizer, tmp_path
):
    model = _compress(method, allocation, tokenizer, method_kwargs, allocation_kwargs=allocation_kwargs)
    kept, budget = _kept(model)
    assert kept == budget
    report = model.slr_report["allocation"]
    assert len(report["layer_sparsity"]) == 3
    assert sum(report["layer_sparsity"]) / 3 == pytest.approx(0.5, abs=1e-12)
    assert len(report["loss_curve"]) == (FAST_LEARNED["steps"] if allocation == "learned" else 0)
    layers = {name: module for name, module in model.named_modules() if isinstance(module, SLRLinear)}
    assert sorted(report["modules"]) == sorted(layers)
    assert len({layer.nnz for layer in layers.values()}) > 3  # not uniform

    folder = hf_slr.save_pretrained(model, tmp_path / "compressed", tokenizer=tokenizer)
    assert (folder / "allocation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = calibration_ids(TEXTS, tokenizer, 2, 16, seed=7)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_learned_allocation_runs_on_the_gpu_and_meets_the_budget(tokenizer):
    """The GPU path of the outer loop: the model on CUDA, every solve and L_B forward there."""
    model = _compress("qr_rpca", "learned", tokenizer, {"iterations": 3}, device="cuda", allocation_kwargs=FAST_LEARNED)
    kept, budget = _kept(model)
    assert kept == budget
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert len(model.slr_report["allocation"]["loss_curve"]) == FAST_LEARNED["steps"]


def test_learned_allocation_restores_the_dense_weights_before_compressing(tokenizer):
    """magnitude_svd depends on W and the target only: each layer must equal the decomposition of
    the dense weight with its allocated target, so the loss closure put every W back."""
    dense = tiny_model("llama", layers=3)
    model = _compress("magnitude_svd", "learned", tokenizer, allocation_kwargs=FAST_LEARNED)
    method = algorithms.get("magnitude_svd")
    for name in model.slr_report["allocation"]["modules"]:
        weight, layer = dense.get_submodule(name).weight.detach(), model.get_submodule(name)
        numel = weight.numel()
        target = Target(rank=layer.rank, sparsity=(numel - layer.nnz) / numel)
        sparse, u, v = method.run(weight, None, target)
        with torch.no_grad():
            torch.testing.assert_close(model.get_submodule(name).to_dense(), sparse + u @ v)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"antithetic": False, "baseline": "moving_average", "pairs": 2, "fixed_batch": False, "batch_tokens": None},
        {"antithetic": False, "center_iterations": 0, "inner_iterations": 2},
    ],
    ids=["defaults", "moving-average", "paper-pairs-frozen-centre"],
)
def test_learned_allocation_runs_every_estimator_on_a_synthetic_loss(kwargs):
    """The loop without a model: L_B = the mean squared error of W_hat (so it only checks the
    plumbing: every sample gets a loss on the given rows, mu stays feasible, the curve is filled)."""
    from hf_slr.allocation.bilevel import learn_allocation

    generator = torch.Generator().manual_seed(0)
    groups = [[f"l{layer}.{kind}" for kind in ("a", "b")] for layer in range(3)]
    weights = {name: torch.randn(24, 16, generator=generator) for group in groups for name in group}
    weights.update({f"l{layer}.b": torch.randn(8, 16, generator=generator) for layer in range(3)})
    norms = {name: torch.rand(16, generator=generator) + 0.1 for name in weights}
    seen = []

    def loss(approximations, rows, tokens):
        seen.append((rows.tolist(), tokens))
        return float(sum(((approximations[n] - weights[n]) * norms[n]).pow(2).mean() for n in approximations))

    learned = learn_allocation(weights, norms, groups, 0.5, 0.25, loss, 10, steps=4, **kwargs)
    assert len(learned.loss_curve) == 4
    assert float(learned.layer_sparsity.mean()) == pytest.approx(0.5, abs=1e-12)
    assert bool((learned.rank_ratio >= 0).all() and (learned.rank_ratio <= 1).all())
    pairs = kwargs.get("pairs", 1)
    assert len(seen) == 4 * 2 * pairs + 3  # + the uniform, OWL and learned reference losses
    assert set(learned.reference_losses) == {"uniform", "owl", "learned"}
    assert all(0 < value < float("inf") for value in learned.reference_losses.values())
    assert seen[-1] == seen[-4]  # the references are scored on the last step's batch
    if kwargs.get("fixed_batch", True):
        assert len({tuple(rows) for rows, _ in seen}) == 1 and seen[0][1] == 64
