"""Learned allocation: the outer loop of the bilevel method of 000 (supplement) / 003.

The outer variables mu = (mu_s per decoder layer, mu_kappa per matrix) parameterise independent
truncated Gaussians N_gamma(mu, sigma^2) on [mu - gamma, mu + gamma] (000 App. C.2). Each step
draws two independent samples x = (s, kappa) and x' = (s', kappa'), solves the inner problem for
each (every matrix by QR-RPCA, 000 App. C.3, ``inner_iterations`` steps on W D, warm-started), and
measures the LM loss L_B of the whole model with those W_hat = S + U V on one calibration batch B.
The policy gradient with the two-sample baseline (000 App. D.1-D.2, Lemma 1-2)

    g = (L_B(x) - L_B(x')) grad_mu log p(x | mu) = (L_B(x) - L_B(x')) (x - mu) / sigma^2

needs no backpropagation through the model. AdamW takes the step, then mu_s is projected onto
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

from ..algorithms import qr_rpca
from ..algorithms.hyperparameters import ConstraintError, hyperparameter
from ..algorithms.lowrank import floored_norms
from .budget import allocate, layer_sizes, project_sparsity
from .owl import owl_sparsity

__all__ = [
    "annealed_gamma",
    "truncated_gaussian",
    "truncated_gaussian_variance",
    "policy_gradient",
    "learn_allocation",
    "LearnedAllocation",
]

Loss = Callable[[dict[str, torch.Tensor], torch.Tensor], float]
"""L_B: the LM loss of the model whose target matrices are the given W_hat, on calibration rows B."""


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


@dataclass
class LearnedAllocation:
    """The final mu: sparsity per layer [L], rank ratio per matrix [N] (``groups`` order), float64,
    and the mean of the two sample losses per outer step."""

    layer_sparsity: torch.Tensor
    rank_ratio: torch.Tensor
    loss_curve: list[float] = field(default_factory=list)


def _solve(scaled, scales, targets, state, iterations, seed):
    """QR-RPCA on every W D warm-started from ``state``: (W_hat = (S + U V) D^-1, new state)."""
    approximations, solved = {}, {}
    for name, target in targets.items():
        s, u, v = qr_rpca.decompose(
            scaled[name], None, target, qr_rpca.ALGORITHM.check({"iterations": iterations, "scaling": "none", "seed": seed}),
            record_history=False, init=state.get(name),
        )
        solved[name] = (s, u, v)
        approximations[name] = (s + u @ v) / scales[name]
    return approximations, solved


@dataclass(frozen=True)
class LearnedHyperparameters:
    """``allocation_kwargs`` of ``allocation="learned"`` (000 Tables 6-7, ``steps`` and ``batch_size``
    scaled down for 2 CPU cores, see docs/allocation.md)."""

    steps: int = hyperparameter(8, low=1, doc="outer AdamW steps")
    batch_size: int = hyperparameter(4, low=1, doc="calibration rows of the batch B of one step")
    lr: float = hyperparameter(2e-3, low=0.0, low_open=True, doc="AdamW learning rate on mu")
    sigma2: float = hyperparameter(5e-2, low=0.0, low_open=True, doc="sigma^2 of the sampling Gaussian")
    gamma0: float = hyperparameter(5e-2, low=0.0, high=1.0, low_open=True, doc="initial truncation half-width")
    gamma_target: float = hyperparameter(5e-3, low=0.0, high=1.0, low_open=True, doc="final truncation half-width")
    xi_warmup: float = hyperparameter(0.1, low=0.0, high=1.0, doc="share of the steps at gamma0")
    xi_anneal: float = hyperparameter(0.8, low=0.0, high=1.0, doc="share of the steps after which gamma is gamma_target")
    inner_iterations: int = hyperparameter(20, low=1, doc="QR-RPCA iterations per sample")
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
    steps: int = 8,
    batch_size: int = 4,
    lr: float = 2e-3,
    sigma2: float = 5e-2,
    gamma0: float = 5e-2,
    gamma_target: float = 5e-3,
    xi_warmup: float = 0.1,
    xi_anneal: float = 0.8,
    inner_iterations: int = 20,
    init: str = "uniform",
    seed: int = 0,
) -> LearnedAllocation:
    """The outer loop of 000 for ``steps`` AdamW steps (000 Tables 6-7 defaults; ``steps`` and
    ``batch_size`` scaled down for 2 CPU cores, see docs/allocation.md).

    ``weights``: dense W [out, in] per matrix; ``norms``: ||X_j||_2 of its inputs [in]; ``groups``:
    the matrix names of every decoder layer; ``rank_ratio``: mu_kappa's initial value; ``loss(W_hat,
    rows)``: L_B on calibration rows ``rows`` (a LongTensor of indices < ``n_rows``), the same B
    for both samples of a step. mu_s starts at rho (``init="uniform"``) or at OWL's sparsities.
    Both samples of a step warm-start QR-RPCA from the same solutions (those of the previous
    step's first sample), so neither is favoured.
    """
    if init not in ("uniform", "owl"):
        raise ValueError(f"init must be 'uniform' or 'owl', got {init!r}")
    names = [name for group in groups for name in group]
    shapes = {name: tuple(weights[name].shape) for name in names}
    sizes = layer_sizes(shapes, groups)
    scales = {name: floored_norms(norms[name]) for name in names}
    scaled = {name: weights[name].float() * scales[name] for name in names}
    if init == "owl":
        start = owl_sparsity(weights, norms, groups, compression_ratio)
    else:
        start = torch.full((len(groups),), float(compression_ratio), dtype=torch.float64)
    n_layers = len(groups)
    mu = torch.nn.Parameter(torch.cat([start, torch.full((len(names),), float(rank_ratio), dtype=torch.float64)]))
    optimizer = torch.optim.AdamW([mu], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    sigma = math.sqrt(sigma2)
    state, curve = {}, []
    progress = tqdm(range(steps), desc="Learning allocation")
    for step in progress:
        gamma = annealed_gamma(step, steps, gamma0, gamma_target, xi_warmup, xi_anneal)
        rows = torch.randperm(n_rows, generator=generator)[:batch_size]
        samples = [truncated_gaussian(mu, sigma, gamma, generator) for _ in range(2)]
        losses, first = [], None
        for x in samples:
            targets = allocate(shapes, groups, x[:n_layers], x[n_layers:])
            approximations, solved = _solve(scaled, scales, targets, state, inner_iterations, seed + step)
            losses.append(float(loss(approximations, rows)))
            first = solved if first is None else first
            del approximations, solved
        state = first
        mu.grad = policy_gradient(losses[0], losses[1], samples[0], mu, sigma2)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            mu[:n_layers] = project_sparsity(mu[:n_layers], compression_ratio, sizes)
            mu[n_layers:].clamp_(0.0, 1.0)
        curve.append(0.5 * (losses[0] + losses[1]))
        progress.set_postfix(loss=f"{curve[-1]:.4f}", gamma=f"{gamma:.4f}")
    final = mu.detach().clone()
    return LearnedAllocation(final[:n_layers], final[n_layers:], curve)
