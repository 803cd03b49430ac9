"""The one contract every layer-wise algorithm follows.

Every method module declares ``ALGORITHM = Algorithm(name, needs_hessian, hyperparameters,
decompose, paper)``; :meth:`Algorithm.run` is the public entry:

    result = algorithms.get("oats").run(weight, hessian, target, {"iterations": 40})
    sparse, u, v = result            # result.history: the objective after every iteration

- ``weight``: the dense matrix W, float32 (or float64), shape [out, in];
- ``hessian``: H = X^T X accumulated over the calibration tokens, float32, shape [in, in]
  (``None`` for data-free methods; such methods set ``needs_hessian = False``);
- ``target``: the :class:`Target` the result must satisfy exactly;
- ``hyperparameters``: ``None`` (paper defaults), a dict (validated by
  :func:`hyperparameters.check_hyperparameters`) or the method's record instance;
- returns a :class:`Decomposition`: S [out, in] (zeros outside its support), U [out, r], V [r, in],
  and the per-iteration ``history`` of :func:`relative_objective` (empty for one-shot methods).
  U and V leave :meth:`Algorithm.run` balanced per component (``||U[:, c]|| = ||V[c, :]||``,
  :func:`lowrank.balance_factors`, PiSSA's convention), whatever the method's solver returned.

A module's ``decompose(weight, hessian, target, hyperparameters, record_history)`` receives the
validated record. This package is pure tensor math: it imports torch and the standard library only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, is_dataclass, replace
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

from .hyperparameters import check_hyperparameters, hyperparameter_values
from .lowrank import balance_factors
from .splits import LOW_RANK_ONLY, PRUNING, RankRatio, ScaledRank


@dataclass(frozen=True)
class Target:
    """What a decomposition must satisfy: S in the sparsity set, rank(U V) <= rank.

    ``sparsity`` is the fraction of zeros of S (unstructured); when ``nm_pattern = (N, M)`` is set,
    S keeps N of every M consecutive weights along the input dimension instead.
    """

    rank: int = 0
    sparsity: float = 0.0
    nm_pattern: tuple[int, int] | None = None

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"Target.rank must be >= 0, got {self.rank}")
        if self.nm_pattern is None:
            if not 0.0 <= self.sparsity <= 1.0:
                raise ValueError(f"Target.sparsity must be in [0, 1], got {self.sparsity}")
        else:
            n, m = self.nm_pattern
            if not 0 < n <= m:
                raise ValueError(f"Target.nm_pattern must satisfy 0 < N <= M, got {self.nm_pattern}")

    def kept_per_row(self, in_features: int) -> int:
        """Nonzeros per row of S under a per-row budget (unstructured) or the N:M pattern."""
        if self.nm_pattern is not None:
            n, m = self.nm_pattern
            return in_features // m * n
        return in_features - int(math.floor(self.sparsity * in_features + 1e-6))

    def kept_total(self, out_features: int, in_features: int) -> int:
        """Nonzeros of S under a per-matrix budget (unstructured) or the N:M pattern."""
        if self.nm_pattern is not None:
            return out_features * self.kept_per_row(in_features)
        numel = out_features * in_features
        return numel - int(math.floor(self.sparsity * numel + 1e-6))


@dataclass(frozen=True, eq=False)
class Decomposition:
    """The result of a method: W ~ S + U V, plus what the method recorded on the way.

    ``history`` holds :func:`relative_objective` after every iteration of an iterative method
    (the undamped H it was given; empty for one-shot methods or with ``record_history=False``).
    ``diagnostics`` holds method-specific per-iteration series (3BASiL: ``"primal_residual"``).
    Iterating yields ``(sparse, u, v)``, so ``S, U, V = result`` works.
    """

    sparse: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    history: tuple[float, ...] = ()
    diagnostics: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "history", tuple(float(h) for h in self.history))
        series = {key: tuple(float(x) for x in values) for key, values in self.diagnostics.items()}
        object.__setattr__(self, "diagnostics", MappingProxyType(series))

    def __iter__(self):
        return iter((self.sparse, self.u, self.v))


# decompose(weight, hessian, target, hyperparameters record, record_history) -> Decomposition
Decompose = Callable[[torch.Tensor, "torch.Tensor | None", Target, Any, bool], Decomposition]


@dataclass(frozen=True)
class Algorithm:
    """A registered method: its name, whether it needs calibration statistics, its hyperparameter
    record type (a frozen dataclass of ``hyperparameters.hyperparameter`` fields), its
    ``decompose`` function, the paper it implements (title, authors, year), and which parts of
    S + U V it computes (``sparse``: S, ``low_rank``: U V; pruning methods compute no U V, pure
    low-rank methods no S), and ``split``: how its paper shares a matrix's kept parameters between
    S and U V when only a compression ratio is given (:mod:`.splits`; default: all to S for a
    pruning method, all to U V for a pure low-rank one)."""

    name: str
    needs_hessian: bool
    hyperparameters: type
    decompose: Decompose
    paper: str
    sparse: bool = True
    low_rank: bool = True
    split: RankRatio | ScaledRank | None = None

    def __post_init__(self):
        if not (isinstance(self.hyperparameters, type) and is_dataclass(self.hyperparameters)):
            raise TypeError(f"Algorithm {self.name!r}: hyperparameters must be a dataclass type")
        if self.split is None:
            if self.sparse and self.low_rank:
                raise TypeError(f"Algorithm {self.name!r}: an S + LR method must declare its paper's `split`")
            object.__setattr__(self, "split", LOW_RANK_ONLY if self.low_rank else PRUNING)

    def defaults(self):
        """The record of paper defaults."""
        return self.hyperparameters()

    def check(self, kwargs: Mapping[str, Any] | None):
        """The validated record of ``kwargs`` (a dict, or a record of this method, re-checked);
        ``ValueError`` naming this method, the field, its allowed values and the bad value."""
        if isinstance(kwargs, self.hyperparameters):
            kwargs = hyperparameter_values(kwargs)
        elif is_dataclass(kwargs) and not isinstance(kwargs, type):
            raise ValueError(
                f"method {self.name!r} takes a dict or a {self.hyperparameters.__name__}, got a {type(kwargs).__name__}"
            )
        return check_hyperparameters(f"method {self.name!r}", self.hyperparameters, kwargs, field_label="method_kwargs")

    def run(
        self,
        weight: torch.Tensor,
        hessian: torch.Tensor | None,
        target: Target,
        hyperparameters=None,
        *,
        record_history: bool = True,
    ) -> Decomposition:
        """Decompose ``weight`` for ``target`` with ``hyperparameters`` (None: the paper defaults;
        a dict or a record: validated by :meth:`check`). ``record_history=False`` skips computing
        the per-iteration objective (one extra [out, in] x [in, in] product per iteration).

        The returned U, V are balanced per component (:func:`lowrank.balance_factors`): U V is
        unchanged up to float rounding, and LoRA fine-tuning of the factors starts well conditioned
        (PiSSA's convention; the factors mode of 001 §4.3 and 002 §3 trains them directly)."""
        record = self.check(hyperparameters)
        if not isinstance(target, Target):
            raise ValueError(f"method {self.name!r}: target must be a Target, got {type(target).__name__}")
        if weight.ndim != 2:
            raise ValueError(f"method {self.name!r}: weight must be a matrix [out, in], got {tuple(weight.shape)}")
        if hessian is not None and tuple(hessian.shape) != (weight.shape[1],) * 2:
            raise ValueError(
                f"method {self.name!r}: hessian must be [in, in] = {(weight.shape[1],) * 2}, got {tuple(hessian.shape)}"
            )
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(f"method {self.name!r}: the weight holds NaN or inf values")
        if hessian is not None:
            if not bool(torch.isfinite(hessian).all()):
                raise ValueError(f"method {self.name!r}: the Hessian X^T X holds NaN or inf values (overflowing activations?)")
            if not bool((hessian.diagonal() > 0).any()):
                # The layer never saw a nonzero input: every (S, U, V) has the same (zero) layer-wise
                # error, so the data-free objective (H = I, preserve W in Frobenius norm) decides.
                hessian = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
        result = self.decompose(weight, hessian, target, record, record_history)
        u, v = balance_factors(result.u, result.v)
        return replace(result, u=u, v=v)


def relative_objective(
    weight: torch.Tensor, sparse: torch.Tensor, u: torch.Tensor, v: torch.Tensor, hessian: torch.Tensor | None
) -> float:
    """tr(E H E^T) / tr(W H W^T) with E = W - S - U V (002 eq. 1; H = I when ``hessian`` is None)."""
    error = weight - sparse - u @ v
    if hessian is None:
        return float(error.pow(2).sum() / weight.pow(2).sum().clamp_min(1e-30))
    num = ((error @ hessian) * error).sum()
    den = ((weight @ hessian) * weight).sum().clamp_min(1e-30)
    return float(num / den)
