"""The inner problem of the learned allocation, for every sample at once: QR-RPCA (000 App. C.3) on
the stacks of W D of each matrix shape, warm-started from the solution at the current mu.

The matrices of one shape (the 30 q_proj and o_proj of SmolLM2, ...) run as one batch of
:func:`hf_slr.algorithms.qr_rpca.solve` (one batched QR and matmul per iteration). The solution at
mu (the "centre") is kept across outer steps and refreshed by ``center_iterations`` per step as mu
moves; every sample of a step starts from it, with the same seed (common random numbers), so 1-5
iterations suffice. The top-k of |W D - U V| is found by a threshold search (around the centre's
previous threshold, or a sample's quantile: :class:`~hf_slr.algorithms.projections.SupportProjector`),
not by a sort.
Pure tensor math (torch only).
"""

from __future__ import annotations

import torch

from ..algorithms import Target, qr_rpca
from ..algorithms.lowrank import floored_norms
from ..algorithms.projections import SupportProjector

__all__ = ["InnerSolver"]


class InnerSolver:
    """Stacks of W D per shape and the centre solution; :meth:`approximations` gives W_hat of a sample."""

    def __init__(self, weights: dict[str, torch.Tensor], norms: dict[str, torch.Tensor], names: list[str]):
        self.stacks: dict[tuple[int, int], list[str]] = {}
        for name in names:
            self.stacks.setdefault(tuple(weights[name].shape), []).append(name)
        self.scales = {shape: torch.stack([floored_norms(norms[n]) for n in group])[:, None] for shape, group in self.stacks.items()}
        self.scaled = {
            shape: torch.stack([weights[n].detach().float() for n in group]) * self.scales[shape]
            for shape, group in self.stacks.items()
        }
        self.center: dict[tuple[int, int], tuple] = {}  # shape -> (S, V rows per matrix, projectors)

    def _targets(self, shape, targets: dict[str, Target], hints: bool):
        group, (m, n) = self.stacks[shape], shape
        ranks = [min(targets[name].rank, m, n) for name in group]
        projectors = [SupportProjector(targets[name], "matrix") for name in group]
        for projector, previous in zip(projectors, self.center[shape][2] if hints and shape in self.center else ()):
            projector.threshold = previous.threshold  # the centre's budget moves little: search near its threshold
        return ranks, projectors

    def refresh(self, targets: dict[str, Target], iterations: int, seed: int) -> None:
        """Move the centre to ``targets`` (the exact-budget targets of mu) by ``iterations`` steps
        from the previous centre (a cold start the first time)."""
        self.step(targets, iterations, [], 1, seed)

    def step(
        self, center: dict[str, Target] | None, center_iterations: int, samples: list[dict[str, Target]], iterations: int, seed: int
    ) -> list[dict[str, torch.Tensor]]:
        """W_hat = (S + U V) D^-1 of every matrix for each of the ``samples`` targets, ``iterations``
        steps from the centre; with ``center``, the centre moves to it by ``center_iterations`` steps
        too. All start from the same centre and seed, and share the first iteration's QR
        (:func:`~hf_slr.algorithms.qr_rpca.solve_many`)."""
        result = [{} for _ in samples]
        sets = ([(center, center_iterations, True)] if center is not None else []) + [(t, iterations, False) for t in samples]
        for shape, group in self.stacks.items():
            ranks, projectors = zip(*(self._targets(shape, targets, hints) for targets, _, hints in sets))
            sparse, init_v, _ = self.center.get(shape, (None, None, None))
            solved = qr_rpca.solve_many(
                self.scaled[shape], list(ranks), list(projectors), [count for _, count, _ in sets], sparse=sparse, init_v=init_v,
                seed=seed, approximate=[not hints for _, _, hints in sets],  # the samples' S + U V, the centre's S
            )
            if center is not None:
                new_sparse, _, v = solved.pop(0)
                self.center[shape] = (new_sparse, [v[b, :rank] for b, rank in enumerate(ranks[0])], projectors[0])
            for approximations, (scaled_approximation, _, _) in zip(result, solved):
                approximations.update(zip(group, scaled_approximation.div_(self.scales[shape]).unbind(0)))
        return result

    def approximations(self, targets: dict[str, Target], iterations: int, seed: int) -> dict[str, torch.Tensor]:
        """W_hat = (S + U V) D^-1 of every matrix for ``targets``, ``iterations`` steps from the centre."""
        return self.step(None, 0, [targets], iterations, seed)[0]
