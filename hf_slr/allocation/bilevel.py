"""Learned allocation: the outer loop of the bilevel method of 000 (supplement) / 003.

The outer variables mu = (mu_s per decoder layer, mu_kappa per matrix) parameterise independent
truncated Gaussians N_gamma(mu, sigma^2) on [mu - gamma, mu + gamma] (000 App. C.2). Each step
draws ``pairs`` sample pairs x = (s, kappa), x' = (s', kappa'), solves the inner problem for each
(every matrix by QR-RPCA, 000 App. C.3, ``inner_iterations`` steps on W D, warm-started from the
solution at mu, all matrices of one shape in one batch: :mod:`.inner`), and measures the LM loss
L_B of the whole model with those W_hat = S + U V on one calibration batch B (by default the same
B every step: common random numbers). The policy gradient with the two-sample baseline (000 App.
D.1-D.2, Lemma 1-2)

    g = (L_B(x) - L_B(x')) grad_mu log p(x | mu) = (L_B(x) - L_B(x')) (x - mu) / sigma^2

needs no backpropagation through the model. Within the same family (a baseline independent of x
keeps it unbiased, App. D.2): the mean over the pairs; antithetic pairs x' = 2 mu - x with
g = (L_B(x) - L_B(x')) (x - mu) / (2 sigma^2) (the window is symmetric about mu, so E[g] is the
same); or independent samples with a moving-average baseline b, g = mean_i (L_B(x_i) - b)(x_i - mu)
/ sigma^2 (:func:`gradient_estimate`). AdamW takes the step, then mu_s is projected onto
{mean sparsity = rho, 0 <= s <= 1} (000 App. C.1) and mu_kappa clipped to [0, 1]; gamma follows the
cubic annealing of 000 App. A.2. The final mu is returned as it is (000 App. A.2, "Final Return").

On Lemma 1: with the window moving with mu, (x - mu) / sigma^2 is the score of the Gaussian whose
truncation window is held fixed at the current mu (where the normaliser's derivative vanishes by
symmetry), so g is unbiased for the gradient of that fixed-window expectation. For the
moving-window expectation E_z[L(mu + z)] it omits the boundary terms; its mean is then
beta(gamma / sigma) grad E[L] for a quadratic L (App. D.3's beta < 1), a rescaling that Adam undoes.

Pure tensor math (torch and tqdm): the model enters only through ``loss``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..algorithms.hyperparameters import ConstraintError, hyperparameter
from .budget import allocate, layer_sizes, project_sparsity
from .inner import InnerSolver
from .owl import owl_sparsity

__all__ = [
    "annealed_gamma",
    "truncated_gaussian",
    "truncated_gaussian_variance",
    "policy_gradient",
    "draw_samples",
    "gradient_estimate",
    "sample_losses",
    "learn_allocation",
    "LearnedAllocation",
]

Loss = Callable[[dict[str, torch.Tensor], torch.Tensor, "int | None"], float]
"""L_B: the LM loss of the model whose target matrices are the given W_hat, on calibration rows B
(``loss(W_hat, rows, tokens)``: the first ``tokens`` tokens of each row, None: all)."""


def annealed_gamma(
    step: int, steps: int, gamma0: float, gamma_target: float, xi_warmup: float = 0.1, xi_anneal: float = 0.8
) -> float:
    """gamma_t of 000 App. A.2: gamma0 up to T_warmup = xi_warmup T, then the cubic
    gamma_target + (gamma0 - gamma_target)(1 - (t - T_warmup) / (T_anneal - T_warmup))^3 up to
    T_anneal = xi_anneal T, then gamma_target."""
    warmup, anneal = xi_warmup * steps, xi_anneal * steps
    if step <= warmup:
        return gamma0
    if step > anneal:
        return gamma_target
    return gamma_target + (gamma0 - gamma_target) * (1.0 - (step - warmup) / (anneal - warmup)) ** 3


def truncated_gaussian(mu: torch.Tensor, sigma: float, gamma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Samples of N(mu, sigma^2) truncated to [mu - gamma, mu + gamma] by inverse-CDF (000 App. C.2):
    x = mu + sigma Phi^-1(u [Phi(gamma / sigma) - Phi(-gamma / sigma)] + Phi(-gamma / sigma)), float64."""
    mu = mu.detach().double()
    a = torch.tensor(gamma / sigma, dtype=torch.float64)
    low, high = torch.special.ndtr(-a), torch.special.ndtr(a)
    u = torch.rand(mu.shape, generator=generator, dtype=torch.float64)
    x = mu + sigma * torch.special.ndtri(u * (high - low) + low)
    return torch.minimum(torch.maximum(x, mu - gamma), mu + gamma)  # round-off of ndtri at u = 0, 1


def truncated_gaussian_variance(sigma: float, gamma: float) -> float:
    """Var(x) = sigma^2 beta(gamma / sigma), beta(a) = 1 - a phi(a) / (Phi(a) - 1/2) (000 App. D.3)."""
    a = gamma / sigma
    phi = math.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
    return sigma**2 * (1.0 - a * phi / (0.5 * math.erf(a / math.sqrt(2.0))))


def policy_gradient(loss: float, baseline_loss: float, x: torch.Tensor, mu: torch.Tensor, sigma2: float) -> torch.Tensor:
    """g = (L_B(x) - L_B(x')) (x - mu) / sigma^2 (000 App. D.1-D.2, with Lemma 1's score)."""
    return (loss - baseline_loss) * (x.double() - mu.detach().double()) / sigma2


def draw_samples(
    mu: torch.Tensor, sigma: float, gamma: float, pairs: int, antithetic: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[2 pairs, D]: x_1..x_pairs then x'_1..x'_pairs, truncated Gaussians around mu; x'_k = 2 mu - x_k
    (the mirror, inside the same symmetric window) when ``antithetic``, independent draws otherwise."""
    mu = mu.detach().double()
    first = truncated_gaussian(mu.expand(pairs, -1), sigma, gamma, generator)
    second = 2.0 * mu - first if antithetic else truncated_gaussian(mu.expand(pairs, -1), sigma, gamma, generator)
    return torch.cat([first, second])


def gradient_estimate(
    losses: torch.Tensor,
    samples: torch.Tensor,
    mu: torch.Tensor,
    sigma2: float,
    *,
    antithetic: bool = False,
    baseline: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """The policy gradient of one step from ``losses`` [..., 2K] of ``samples`` [..., 2K, D] (the
    order of :func:`draw_samples`), leading dimensions batched:

    - ``antithetic``: mean_k (L(x_k) - L(x'_k)) (x_k - mu) / (2 sigma^2) (any baseline cancels);
    - ``baseline`` None: the paper's mean_k (L(x_k) - L(x'_k)) (x_k - mu) / sigma^2 (000 App. D.2);
    - ``baseline`` b (independent of the samples, broadcast to [..., 2K]): mean_i (L(x_i) - b_i)
      (x_i - mu) / sigma^2 over all 2K samples.
    """
    losses, z = losses.double(), samples.double() - mu.detach().double()
    k = losses.shape[-1] // 2
    if antithetic or baseline is None:
        pair = (losses[..., :k] - losses[..., k:])[..., None] * z[..., :k, :]
        return pair.mean(-2) / (2.0 * sigma2 if antithetic else sigma2)
    return ((losses - baseline)[..., None] * z).mean(-2) / sigma2


def sample_losses(
    solver: InnerSolver,
    shapes,
    groups,
    samples: torch.Tensor,
    loss: Loss,
    rows,
    tokens,
    iterations: int,
    seed: int,
    center: torch.Tensor | None = None,
    center_iterations: int = 0,
) -> torch.Tensor:
    """[2K]: L_B of every sample, each solved by ``iterations`` QR-RPCA steps from the solver's
    centre (which moves to ``center``, a mu, by ``center_iterations`` steps on the way)."""
    n_layers = len(groups)
    targets = [allocate(shapes, groups, x[:n_layers], x[n_layers:]) for x in samples]
    middle = None if center is None or center_iterations == 0 else allocate(shapes, groups, center[:n_layers], center[n_layers:])
    values = []
    for approximations in solver.step(middle, center_iterations, targets, iterations, seed):
        values.append(float(loss(approximations, rows, tokens)))
    return torch.tensor(values, dtype=torch.float64)


@dataclass
class LearnedAllocation:
    """The final mu: sparsity per layer [L], rank ratio per matrix [N] (``groups`` order), float64,
    the mean of the sample losses per outer step, and ``reference_losses``: L_B of the uniform, OWL
    and final learned allocations on the same batch, each solved from the final centre."""

    layer_sparsity: torch.Tensor
    rank_ratio: torch.Tensor
    loss_curve: list[float] = field(default_factory=list)
    reference_losses: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LearnedHyperparameters:
    """``allocation_kwargs`` of ``allocation="learned"`` (000 Tables 6-7, ``steps`` and ``batch_size``
    scaled down for 2 CPU cores; the step's cost and the estimator's variance: docs/allocation.md)."""

    steps: int = hyperparameter(200, low=1, doc="outer AdamW steps (200: ~30-45 min for SmolLM2 on one CPU core)")
    batch_size: int = hyperparameter(4, low=1, doc="calibration rows of the batch B of one step")
    batch_tokens: int | None = hyperparameter(64, low=2, doc="tokens of each row of B (its first ones; None: the whole row)")
    fixed_batch: bool = hyperparameter(True, doc="the same B every step (common random numbers) or a new one per step")
    lr: float = hyperparameter(2e-3, low=0.0, low_open=True, doc="AdamW learning rate on mu")
    sigma2: float = hyperparameter(5e-2, low=0.0, low_open=True, doc="sigma^2 of the sampling Gaussian")
    gamma0: float = hyperparameter(5e-2, low=0.0, high=1.0, low_open=True, doc="initial truncation half-width")
    gamma_target: float = hyperparameter(5e-3, low=0.0, high=1.0, low_open=True, doc="final truncation half-width")
    xi_warmup: float = hyperparameter(0.1, low=0.0, high=1.0, doc="share of the steps at gamma0")
    xi_anneal: float = hyperparameter(0.8, low=0.0, high=1.0, doc="share of the steps after which gamma is gamma_target")
    pairs: int = hyperparameter(1, low=1, doc="sample pairs per step (the gradient is their mean)")
    antithetic: bool = hyperparameter(False, doc="x' = 2 mu - x (mirrored) instead of an independent draw")
    baseline: str = hyperparameter(
        "moving_average", choices=("pair", "moving_average"), doc="without antithetic: the pair's other sample or a moving average of past losses"
    )
    baseline_decay: float = hyperparameter(0.9, low=0.0, high=1.0, high_open=True, doc="decay of the moving-average baseline")
    inner_iterations: int = hyperparameter(1, low=1, doc="QR-RPCA iterations per sample, from the solution at mu")
    center_iterations: int = hyperparameter(1, low=0, doc="QR-RPCA iterations per step moving the solution at mu")
    initial_iterations: int = hyperparameter(20, low=1, doc="QR-RPCA iterations of the first (cold) solution at mu")
    init: str = hyperparameter("uniform", choices=("uniform", "owl"), doc="mu_s starts at rho or at OWL's sparsities")
    seed: int | None = hyperparameter(None, doc="sampling seed (None: the config's `seed`)")

    def __post_init__(self):
        if self.xi_anneal < self.xi_warmup:
            raise ConstraintError("xi_anneal", f">= xi_warmup={self.xi_warmup}", self.xi_anneal)


def learn_allocation(
    weights: dict[str, torch.Tensor],
    norms: dict[str, torch.Tensor],
    groups: list[list[str]],
    compression_ratio: float,
    rank_ratio: float,
    loss: Loss,
    n_rows: int,
    *,
    steps: int = 200,
    batch_size: int = 4,
    batch_tokens: int | None = 64,
    fixed_batch: bool = True,
    lr: float = 2e-3,
    sigma2: float = 5e-2,
    gamma0: float = 5e-2,
    gamma_target: float = 5e-3,
    xi_warmup: float = 0.1,
    xi_anneal: float = 0.8,
    pairs: int = 1,
    antithetic: bool = False,
    baseline: str = "moving_average",
    baseline_decay: float = 0.9,
    inner_iterations: int = 1,
    center_iterations: int = 1,
    initial_iterations: int = 20,
    init: str = "uniform",
    seed: int = 0,
) -> LearnedAllocation:
    """The outer loop of 000 for ``steps`` AdamW steps (:class:`LearnedHyperparameters`).

    ``weights``: dense W [out, in] per matrix; ``norms``: ||X_j||_2 of its inputs [in]; ``groups``:
    the matrix names of every decoder layer; ``rank_ratio``: mu_kappa's initial value; ``loss(W_hat,
    rows, tokens)``: L_B on calibration rows ``rows`` (a LongTensor of indices < ``n_rows``), the
    same B for every sample of a step. mu_s starts at rho (``init="uniform"``) or at OWL's
    sparsities. The solution at mu is solved cold once (``initial_iterations``), then moved with mu
    (``center_iterations`` per step); every sample of a step starts from it with the same seed.
    """
    if init not in ("uniform", "owl"):
        raise ValueError(f"init must be 'uniform' or 'owl', got {init!r}")
    names = [name for group in groups for name in group]
    shapes = {name: tuple(weights[name].shape) for name in names}
    sizes = layer_sizes(shapes, groups)
    solver = InnerSolver(weights, norms, names)
    if init == "owl":
        start = owl_sparsity(weights, norms, groups, compression_ratio)
    else:
        start = torch.full((len(groups),), float(compression_ratio), dtype=torch.float64)
    n_layers = len(groups)
    mu = torch.nn.Parameter(torch.cat([start, torch.full((len(names),), float(rank_ratio), dtype=torch.float64)]))
    optimizer = torch.optim.AdamW([mu], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    sigma = math.sqrt(sigma2)
    fixed_rows = torch.randperm(n_rows, generator=generator)[:batch_size] if fixed_batch else None
    average, curve = None, []
    progress = tqdm(range(steps), desc="Learning allocation")
    for step in progress:
        gamma = annealed_gamma(step, steps, gamma0, gamma_target, xi_warmup, xi_anneal)
        rows = fixed_rows if fixed_batch else torch.randperm(n_rows, generator=generator)[:batch_size]
        if step == 0:
            solver.refresh(allocate(shapes, groups, mu[:n_layers], mu[n_layers:]), initial_iterations, seed)
        samples = draw_samples(mu, sigma, gamma, pairs, antithetic, generator)
        losses = sample_losses(
            solver, shapes, groups, samples, loss, rows, batch_tokens, inner_iterations, seed + step,
            center=mu.detach() if step > 0 else None, center_iterations=center_iterations,
        )
        reference = None
        if not antithetic and baseline == "moving_average":
            # b independent of this step's samples: past steps' mean losses (the first step: leave-one-out)
            reference = (losses.sum() - losses) / (len(losses) - 1) if average is None else average
            mean = float(losses.mean())
            average = mean if average is None else baseline_decay * average + (1.0 - baseline_decay) * mean
        mu.grad = gradient_estimate(losses, samples, mu, sigma2, antithetic=antithetic, baseline=reference)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            mu[:n_layers] = project_sparsity(mu[:n_layers], compression_ratio, sizes)
            mu[n_layers:].clamp_(0.0, 1.0)
        curve.append(float(losses.mean()))
        progress.set_postfix(loss=f"{curve[-1]:.4f}", gamma=f"{gamma:.4f}")
    final = mu.detach().clone()
    kappa = torch.full((len(names),), float(rank_ratio), dtype=torch.float64)
    references = {
        "uniform": (torch.full((n_layers,), float(compression_ratio), dtype=torch.float64), kappa),
        "owl": (owl_sparsity(weights, norms, groups, compression_ratio), kappa),
        "learned": (final[:n_layers], final[n_layers:]),
    }
    reference_losses = {}
    for label, (sparsity, ratios) in references.items():  # the horizontal lines of the allocation plot
        approximations = solver.approximations(allocate(shapes, groups, sparsity, ratios), initial_iterations, seed)
        reference_losses[label] = float(loss(approximations, rows, batch_tokens))
    return LearnedAllocation(final[:n_layers], final[n_layers:], curve, reference_losses)
