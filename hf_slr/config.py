"""SLRConfig: the request (what to compress, to which budget, with which method). Plain data,
validated when built against the registries of methods, allocations and transformer matching;
the library never writes into it (results go to the model and its saved copy of the config)."""

from __future__ import annotations

import copy
import hashlib
import inspect
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import datasets
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import algorithms
from .algorithms.hyperparameters import check_hyperparameters
from .allocation import ALLOCATIONS
from .allocation import check_kwargs as check_allocation_kwargs
from .compression.matching import MatchingHyperparameters

QUANT_METHOD = "slr"
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_sparsity(value: float | str | None, field: str = "sparsity") -> tuple[float | None, tuple[int, int] | None]:
    """``0.5`` -> (0.5, None); ``"2:4"`` -> (0.5, (2, 4)); errors name the field and the allowed values."""
    if value is None:
        return None, None
    if isinstance(value, str):
        match = _NM.match(value)
        if match is None:
            try:
                value = float(value)
            except ValueError:
                raise ValueError(
                    f"`{field}` must be a float in [0, 1) or an 'N:M' pattern string such as '2:4', got {value!r}"
                ) from None
        else:
            n, m = int(match.group(1)), int(match.group(2))
            if not 0 < n < m:
                raise ValueError(f"`{field}`: an N:M pattern needs 0 < N < M, got {value!r}")
            return 1.0 - n / m, (n, m)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"`{field}` must be a float in [0, 1) or an 'N:M' pattern string such as '2:4', got {value!r}")
    return float(value), None


def _plain_dict(value: Any) -> Any:
    """A copy of a mapping (None: empty); anything else as is, for the validation to name."""
    if value is None:
        return {}
    return dict(value) if isinstance(value, Mapping) else value


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(condition: bool, message: str):
    if not condition:
        raise ValueError(message)


LEGACY_MATCHING_FIELDS = {"tm_epochs": "epochs", "tm_batch_size": "batch_size", "tm_lr": "lr"}
"""Fields of format-1 configs (and of earlier releases) now inside ``tm_kwargs``."""


def describe_source(dataset: Any) -> Any:
    """What a saved config says of the calibration data: a name as is, a local path reduced to its
    file name, texts by their SHA-256 fingerprint, a ``datasets.Dataset`` by its fingerprint."""
    if isinstance(dataset, datasets.Dataset):
        return f"datasets.Dataset@{dataset._fingerprint}"
    if isinstance(dataset, (list, tuple)) and all(isinstance(text, str) for text in dataset):
        digest = hashlib.sha256()
        for text in dataset:
            digest.update(hashlib.sha256(text.encode("utf-8")).digest())
        return f"texts@sha256:{digest.hexdigest()[:16]} ({len(dataset)} documents)"
    return provenance_name(dataset) if isinstance(dataset, str) else dataset


def provenance_name(name: str | None) -> str | None:
    """A model name fit for shared files: a Hub id as is, a local path reduced to its folder name."""
    if isinstance(name, str) and name and (os.path.isabs(name) or os.path.exists(name)):
        return os.path.basename(os.path.normpath(name))
    return name


class SLRConfig(QuantizationConfigMixin):
    """Configuration of sparse plus low-rank compression, W ~ S + U V.

    Args:
        method: the layer-wise algorithm (see ``hf_slr.algorithms.available()``).
        sparsity: fraction of zeros of S (float in [0, 1)) or an ``"N:M"`` pattern string (N kept in
            every M consecutive input weights). Defaults to 0.5 unless ``compression_ratio`` decides it.
        rank: rank of U V for every compressed matrix (64 in 002/004 for 4096-wide layers).
        compression_ratio: rho, the fraction of each matrix's parameters removed; with it the budget
            follows the papers' formulas instead of ``rank``: for N:M, r = floor((1 - rho - N/M) m n /
            (m + n)) (004 §5); for unstructured S, with ``rank_ratio`` kappa, r = floor(kappa (1 - rho) m n /
            (m + n)) and nnz(S) = floor((1 - kappa)(1 - rho) m n) (004 App. A.3, OATS).
        rank_ratio: kappa, the share of the kept parameters spent on U, V (unstructured only). Unset,
            the method's own paper split decides (``hf_slr.algorithms.get(method).split``: SSLC rank
            128 at width 4096 scaled to the layer, 3BASiL 64 at 4096, OATS / HASSLE-free kappa 0.3).
        modules_to_not_convert: module names (or name suffixes) left dense; ``lm_head`` and the
            embeddings always stay dense.
        dataset: calibration data: ``"c4"`` (the local C4 train sample), a path, a list of strings,
            a ``datasets.Dataset`` with a ``text`` column, or a Hub dataset name.
        n_samples, seq_len, seed: calibration segments (SparseGPT protocol: 128 x 2048, seed 0).
        tokenizer: name or path of the tokenizer for calibration (default: the model's own).
        method_kwargs: hyperparameters of ``method``, validated (names, types, ranges) against the
            method's declared record (``hf_slr.algorithms.get(method).hyperparameters``).
        storage_dtype: dtype of the stored S values and U, V (default: the model's dtype).
        transformer_matching: block-output matching after each block is compressed (3BASiL-TM §3).
        tm_kwargs: its schedule, ``epochs``, ``batch_size``, ``lr`` (App. B defaults: 20, 8, 2e-5
            cosine) and ``precision`` ("auto": bfloat16 autocast where native, float32 parameters);
            ``tm_epochs``, ``tm_batch_size``, ``tm_lr`` are accepted as aliases.
        allocation: how the budget is spread over matrices: ``"uniform"``; ``"owl"`` (per-layer
            sparsity from outlier ratios, Yin et al. 2024); ``"learned"`` (per-layer sparsity and
            per-matrix rank ratio by the bilevel outer loop of 000). ``owl`` and ``learned`` need
            ``compression_ratio`` with unstructured sparsity (``rank_ratio`` is kappa, the initial one
            for ``learned``) and meet its total budget exactly; for a pruning method ``sparsity=0.6``
            means ``compression_ratio=0.6`` (:attr:`effective_compression_ratio`). See docs/allocation.md.
        allocation_kwargs: hyperparameters of ``allocation`` (validated against
            ``hf_slr.allocation.ALLOCATIONS[allocation]``).
        base_model: name of the dense model that was compressed: set on the compressed model's own
            copy of the config (a local path is reduced to its folder name), never on the caller's.

    The layer shapes of a compressed checkpoint are not in the config: they are read from the
    checkpoint's tensors (see docs/format.md).
    """

    def __init__(
        self,
        method: str = "magnitude_svd",
        sparsity: float | str | None = None,
        rank: int | None = None,
        compression_ratio: float | None = None,
        rank_ratio: float | None = None,
        modules_to_not_convert: list[str] | None = None,
        dataset: Any = "c4",
        n_samples: int = 128,
        seq_len: int = 2048,
        seed: int = 0,
        tokenizer: Any = None,
        method_kwargs: dict[str, Any] | None = None,
        storage_dtype: str | None = None,
        transformer_matching: bool = False,
        tm_kwargs: dict[str, Any] | None = None,
        allocation: str = "uniform",
        allocation_kwargs: dict[str, Any] | None = None,
        base_model: str | None = None,
        **kwargs,
    ):
        quant_method = kwargs.pop("quant_method", QUANT_METHOD)
        if quant_method != QUANT_METHOD:
            raise ValueError(f"`quant_method` of an SLRConfig must be {QUANT_METHOD!r}, got {quant_method!r}")
        kwargs.pop("compressed_modules", None)  # format 1 listed the layer shapes here; they come from the tensors
        tm_kwargs = _plain_dict(tm_kwargs)
        for legacy, name in LEGACY_MATCHING_FIELDS.items():
            if legacy in kwargs:
                tm_kwargs.setdefault(name, kwargs.pop(legacy))
        if kwargs:
            raise ValueError(f"SLRConfig got unknown fields {sorted(kwargs)}; allowed fields: {sorted(self._fields())}")
        self.quant_method = QUANT_METHOD
        self.method = method
        self.sparsity = sparsity
        self.rank = rank
        self.compression_ratio = compression_ratio
        self.rank_ratio = rank_ratio
        if isinstance(modules_to_not_convert, str):
            raise ValueError(
                f"`modules_to_not_convert` must be a list of module names, got the string {modules_to_not_convert!r} "
                f"(write [{modules_to_not_convert!r}])"
            )
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert is not None else None
        # Likewise a datasets.Dataset: kept for this session, described by its fingerprint when serialized.
        # What the user passed is kept for this session; `dataset` / `tokenizer` are what may be shared:
        # no text, no local path, no live object (see `describe_source`).
        self._dataset_source = dataset
        self.dataset = describe_source(dataset)
        self.n_samples = n_samples
        self.seq_len = seq_len
        self.seed = seed
        # A tokenizer object is kept for this session only; its name is what gets serialized.
        self._tokenizer_source = tokenizer
        self.tokenizer = provenance_name(tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "name_or_path", None))
        self.method_kwargs = _plain_dict(method_kwargs)
        self.storage_dtype = storage_dtype
        self.transformer_matching = transformer_matching
        self.tm_kwargs = tm_kwargs
        self.allocation = allocation
        self.allocation_kwargs = _plain_dict(allocation_kwargs)
        self.base_model = provenance_name(base_model)
        self.post_init()

    @classmethod
    def _fields(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")] + list(
            LEGACY_MATCHING_FIELDS
        )

    def post_init(self):
        """Validate every field; errors name the field and its allowed values."""
        allowed_methods = algorithms.available()
        _check(
            isinstance(self.method, str) and self.method in allowed_methods,
            f"`method` must be one of {allowed_methods}, got {self.method!r}",
        )
        _, nm_pattern = parse_sparsity(self.sparsity)
        if not algorithms.get(self.method).low_rank:
            _check(
                not self.rank and not self.rank_ratio,
                f"method {self.method!r} prunes only (it computes no U V): `rank` and `rank_ratio` must be 0 or unset, "
                f"got rank={self.rank!r}, rank_ratio={self.rank_ratio!r}",
            )
            if nm_pattern is not None and self.compression_ratio is not None:
                n, m = nm_pattern
                _check(
                    _real(self.compression_ratio) and abs(self.compression_ratio - (1 - n / m)) < 1e-9,
                    f"method {self.method!r} prunes only: with `sparsity`={self.sparsity!r}, `compression_ratio` must be "
                    f"{1 - n / m} (the pattern's own ratio) or unset, got {self.compression_ratio!r}",
                )
        if self.rank is not None:
            _check(
                isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 0,
                f"`rank` must be an int >= 0, got {self.rank!r}",
            )
        if self.compression_ratio is not None:
            _check(
                _real(self.compression_ratio) and 0.0 < self.compression_ratio < 1.0,
                f"`compression_ratio` must be a float in (0, 1), got {self.compression_ratio!r}",
            )
            _check(self.rank is None, "`rank` and `compression_ratio` are exclusive: the ratio decides the rank")
            if nm_pattern is None:
                _check(
                    self.sparsity is None,
                    "`sparsity` and `compression_ratio` are exclusive for unstructured sparsity: "
                    "the ratio and `rank_ratio` decide nnz(S); give `sparsity='N:M'` only for N:M patterns",
                )
            else:
                n, m = nm_pattern
                _check(
                    1.0 - self.compression_ratio - n / m >= 0.0,
                    f"`compression_ratio`={self.compression_ratio} keeps fewer parameters than the {n}:{m} pattern "
                    f"alone (needs compression_ratio <= {1 - n / m})",
                )
                _check(self.rank_ratio is None, "`rank_ratio` applies to unstructured sparsity only, not to N:M")
        if self.rank_ratio is not None:
            _check(
                _real(self.rank_ratio) and 0.0 <= self.rank_ratio <= 1.0,
                f"`rank_ratio` must be a float in [0, 1], got {self.rank_ratio!r}",
            )
            _check(self.compression_ratio is not None, "`rank_ratio` needs `compression_ratio`")
        _check(
            self.modules_to_not_convert is None or all(isinstance(name, str) and name for name in self.modules_to_not_convert),
            f"`modules_to_not_convert` must be a list of module names, got {self.modules_to_not_convert!r}",
        )
        source = self._dataset_source
        _check(
            isinstance(source, (str, datasets.Dataset))
            or (isinstance(source, (list, tuple)) and bool(source) and all(isinstance(t, str) for t in source)),
            "`dataset` must be 'c4', a path, a Hub dataset name, a non-empty list of strings or a datasets.Dataset, "
            f"got {type(source).__name__}",
        )
        for field in ("n_samples", "seq_len"):
            value = getattr(self, field)
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                f"`{field}` must be an int > 0, got {value!r}",
            )
        _check(isinstance(self.seed, int) and not isinstance(self.seed, bool), f"`seed` must be an int, got {self.seed!r}")
        _check(
            self._tokenizer_source is None or isinstance(self._tokenizer_source, str) or callable(self._tokenizer_source),
            f"`tokenizer` must be a name, a path or a tokenizer object, got {type(self._tokenizer_source).__name__}",
        )
        algorithms.get(self.method).check(self.method_kwargs)
        _check(
            self.storage_dtype is None or self.storage_dtype in STORAGE_DTYPES,
            f"`storage_dtype` must be one of {list(STORAGE_DTYPES)} or None, got {self.storage_dtype!r}",
        )
        _check(isinstance(self.transformer_matching, bool), "`transformer_matching` must be a bool")
        self.matching_hyperparameters  # validates tm_kwargs
        _check(
            isinstance(self.allocation, str) and self.allocation in ALLOCATIONS,
            f"`allocation` must be one of {list(ALLOCATIONS)}, got {self.allocation!r}",
        )
        if self.allocation != "uniform":
            _check(
                self.effective_compression_ratio is not None and nm_pattern is None,
                f"`allocation`={self.allocation!r} spreads the budget of `compression_ratio` over layers with "
                "unstructured sparsity: it needs `compression_ratio` and `rank_ratio` (a pruning method: "
                "`compression_ratio` or `sparsity`), not a fixed `rank` / `sparsity` or an N:M pattern "
                "(use allocation='uniform' for those)",
            )
        check_allocation_kwargs(self.allocation, self.allocation_kwargs)
        _check(
            self.base_model is None or isinstance(self.base_model, str),
            f"`base_model` must be a model name or None, got {type(self.base_model).__name__}",
        )

    @property
    def nm_pattern(self) -> tuple[int, int] | None:
        """(N, M) when ``sparsity`` is an N:M pattern, else None."""
        return parse_sparsity(self.sparsity)[1]

    @property
    def sparsity_fraction(self) -> float | None:
        """``sparsity`` as a fraction of zeros (``"2:4"`` -> 0.5), None when unset."""
        return parse_sparsity(self.sparsity)[0]

    @property
    def effective_compression_ratio(self) -> float | None:
        """rho, the fraction of parameters removed that the budget rules spread: ``compression_ratio``;
        unset, for a pruning method (no U V) with unstructured ``sparsity``, that sparsity (a pruned
        matrix keeps 1 - sparsity of its parameters, rank 0: ``SLRConfig(method="wanda",
        sparsity=0.6, allocation="owl")`` is ``compression_ratio=0.6``); else None. Derived, never
        written into the config."""
        if self.compression_ratio is not None:
            return self.compression_ratio
        if not algorithms.get(self.method).low_rank and self.sparsity is not None and self.nm_pattern is None:
            return self.sparsity_fraction
        return None

    @property
    def method_hyperparameters(self):
        """The validated hyperparameter record of ``method`` (its paper defaults where unset)."""
        return algorithms.get(self.method).check(self.method_kwargs)

    @property
    def matching_hyperparameters(self) -> MatchingHyperparameters:
        """The validated schedule of transformer matching."""
        return check_hyperparameters("transformer matching", MatchingHyperparameters, self.tm_kwargs, field_label="tm_kwargs")

    @property
    def allocation_hyperparameters(self):
        """The validated hyperparameter record of ``allocation`` (None for uniform)."""
        return check_allocation_kwargs(self.allocation, self.allocation_kwargs)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy({key: value for key, value in self.__dict__.items() if not key.startswith("_")})

    @property
    def tokenizer_source(self):
        """The tokenizer as passed (an object, a name or a path; not serialized), else ``tokenizer``."""
        return self._tokenizer_source if self._tokenizer_source is not None else self.tokenizer

    @property
    def calibration_data(self):
        """What calibration reads: the ``dataset`` as passed (texts, a path, a ``datasets.Dataset``)."""
        return self._dataset_source

    def __deepcopy__(self, memo):
        clone = self.__class__.from_dict(self.to_dict())
        clone._tokenizer_source = self._tokenizer_source
        clone._dataset_source = self._dataset_source
        return clone

    def __eq__(self, other):
        return isinstance(other, SLRConfig) and self.to_dict() == other.to_dict()
