"""SLRConfig: what to compress, to which budget, with which method. Pure data plus validation."""

from __future__ import annotations

import copy
import inspect
import math
import re
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from . import algorithms
from .allocation import ALLOCATIONS
from .allocation import check_kwargs as check_allocation_kwargs

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


def _check(condition: bool, message: str):
    if not condition:
        raise ValueError(message)


def _is_hf_dataset(value: Any) -> bool:
    if isinstance(value, (str, list, tuple)) or value is None:
        return False
    import datasets

    return isinstance(value, datasets.Dataset)


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
        rank_ratio: kappa, the share of the kept parameters spent on U, V (unstructured only).
        modules_to_not_convert: module names (or name suffixes) left dense; ``lm_head`` and the
            embeddings always stay dense.
        dataset: calibration data: ``"c4"`` (the local C4 train sample), a path, a list of strings,
            a ``datasets.Dataset`` with a ``text`` column, or a Hub dataset name.
        n_samples, seq_len, seed: calibration segments (SparseGPT protocol: 128 x 2048, seed 0).
        tokenizer: name or path of the tokenizer for calibration (default: the model's own).
        method_kwargs: hyperparameters of ``method`` (names checked against its signature).
        storage_dtype: dtype of the stored S values and U, V (default: the model's dtype).
        transformer_matching, tm_epochs, tm_batch_size, tm_lr: block-output matching after each
            block is compressed (002 §3, App. B defaults: 20 epochs, batch 8, lr 2e-5 cosine).
        allocation: how the budget is spread over matrices: ``"uniform"``; ``"owl"`` (per-layer
            sparsity from outlier ratios, Yin et al. 2024); ``"learned"`` (per-layer sparsity and
            per-matrix rank ratio by the bilevel outer loop of 000). ``owl`` and ``learned`` need
            ``compression_ratio`` with unstructured sparsity (``rank_ratio`` is kappa, the initial one
            for ``learned``) and meet its total budget exactly. See docs/allocation.md.
        allocation_kwargs: hyperparameters of ``allocation`` (names and values checked against
            ``hf_slr.allocation.hyperparameters(allocation)``).
        compressed_modules: filled after compression: per module ``{"rank", "nnz", "sparsity"}``;
            a checkpoint reloads its exact shapes from it.
        base_model: name or path of the dense model that was compressed (filled after compression).
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
        tm_epochs: int = 20,
        tm_batch_size: int = 8,
        tm_lr: float = 2e-5,
        allocation: str = "uniform",
        allocation_kwargs: dict[str, Any] | None = None,
        compressed_modules: dict[str, dict[str, Any]] | None = None,
        base_model: str | None = None,
        **kwargs,
    ):
        kwargs.pop("quant_method", None)
        if kwargs:
            raise ValueError(f"SLRConfig got unknown fields {sorted(kwargs)}; allowed fields: {sorted(self._fields())}")
        self.quant_method = QUANT_METHOD
        self.method = method
        self.sparsity = sparsity
        self.rank = rank
        self.compression_ratio = compression_ratio
        self.rank_ratio = rank_ratio
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert is not None else None
        # Likewise a datasets.Dataset: kept for this session, described by its fingerprint when serialized.
        self._dataset_object = dataset if _is_hf_dataset(dataset) else None
        self.dataset = f"datasets.Dataset@{dataset._fingerprint}" if self._dataset_object is not None else dataset
        self.n_samples = n_samples
        self.seq_len = seq_len
        self.seed = seed
        # A tokenizer object is kept for this session only; its name is what gets serialized.
        self._tokenizer_object = None if tokenizer is None or isinstance(tokenizer, str) else tokenizer
        self.tokenizer = getattr(tokenizer, "name_or_path", None) if self._tokenizer_object is not None else tokenizer
        self.method_kwargs = dict(method_kwargs or {})
        self.storage_dtype = storage_dtype
        self.transformer_matching = transformer_matching
        self.tm_epochs = tm_epochs
        self.tm_batch_size = tm_batch_size
        self.tm_lr = tm_lr
        self.allocation = allocation
        self.allocation_kwargs = dict(allocation_kwargs or {})
        self.compressed_modules = compressed_modules
        self.base_model = base_model
        self.post_init()

    @classmethod
    def _fields(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")]

    def post_init(self):
        """Validate every field; errors name the field and its allowed values."""
        allowed_methods = algorithms.available()
        _check(
            isinstance(self.method, str) and self.method in allowed_methods,
            f"`method` must be one of {allowed_methods}, got {self.method!r}",
        )
        _, nm_pattern = parse_sparsity(self.sparsity)
        if self.rank is not None:
            _check(
                isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 0,
                f"`rank` must be an int >= 0, got {self.rank!r}",
            )
        if self.compression_ratio is not None:
            _check(
                isinstance(self.compression_ratio, (int, float)) and 0.0 < self.compression_ratio < 1.0,
                f"`compression_ratio` must be a float in (0, 1), got {self.compression_ratio!r}",
            )
            _check(self.rank is None, "`rank` and `compression_ratio` are exclusive: the ratio decides the rank")
            if nm_pattern is None:
                _check(
                    self.sparsity is None,
                    "`sparsity` and `compression_ratio` are exclusive for unstructured sparsity: "
                    "the ratio and `rank_ratio` decide nnz(S); give `sparsity='N:M'` only for N:M patterns",
                )
                _check(
                    self.rank_ratio is not None,
                    "`rank_ratio` (kappa in [0, 1]) is required with `compression_ratio` and unstructured sparsity",
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
                isinstance(self.rank_ratio, (int, float)) and 0.0 <= self.rank_ratio <= 1.0,
                f"`rank_ratio` must be a float in [0, 1], got {self.rank_ratio!r}",
            )
            _check(self.compression_ratio is not None, "`rank_ratio` needs `compression_ratio`")
        if self.modules_to_not_convert is not None:
            _check(
                all(isinstance(name, str) for name in self.modules_to_not_convert),
                "`modules_to_not_convert` must be a list of module names",
            )
        _check(
            isinstance(self.dataset, str) or (isinstance(self.dataset, list) and all(isinstance(t, str) for t in self.dataset)),
            "`dataset` must be 'c4', a path, a Hub dataset name, a list of strings or a datasets.Dataset, "
            f"got {type(self.dataset).__name__}",
        )
        for field in ("n_samples", "seq_len", "tm_epochs", "tm_batch_size"):
            value = getattr(self, field)
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                f"`{field}` must be an int > 0, got {value!r}",
            )
        _check(isinstance(self.seed, int) and not isinstance(self.seed, bool), f"`seed` must be an int, got {self.seed!r}")
        _check(
            self.tokenizer is None or isinstance(self.tokenizer, str),
            f"`tokenizer` must be a name, a path or a tokenizer object, got {type(self.tokenizer).__name__}",
        )
        _check(isinstance(self.method_kwargs, dict), "`method_kwargs` must be a dict")
        known = algorithms.hyperparameters(self.method)
        unknown = sorted(set(self.method_kwargs) - set(known) - {"history"})
        _check(
            not unknown,
            f"`method_kwargs` has {unknown}, which method {self.method!r} does not take; allowed: {sorted(set(known) - {'history'})}",
        )
        _check(
            self.storage_dtype is None or self.storage_dtype in STORAGE_DTYPES,
            f"`storage_dtype` must be one of {list(STORAGE_DTYPES)} or None, got {self.storage_dtype!r}",
        )
        _check(isinstance(self.transformer_matching, bool), "`transformer_matching` must be a bool")
        _check(
            isinstance(self.tm_lr, (int, float)) and self.tm_lr > 0,
            f"`tm_lr` must be a float > 0, got {self.tm_lr!r}",
        )
        _check(
            self.allocation in ALLOCATIONS,
            f"`allocation` must be one of {list(ALLOCATIONS)}, got {self.allocation!r}",
        )
        _check(isinstance(self.allocation_kwargs, dict), "`allocation_kwargs` must be a dict")
        if self.allocation != "uniform":
            _check(
                self.compression_ratio is not None and nm_pattern is None,
                f"`allocation`={self.allocation!r} spreads the budget of `compression_ratio` over layers with "
                "unstructured sparsity: it needs `compression_ratio` and `rank_ratio`, not a fixed `rank` / "
                "`sparsity` or an N:M pattern (use allocation='uniform' for those)",
            )
        check_allocation_kwargs(self.allocation, self.allocation_kwargs)
        if self.compressed_modules is not None:
            _check(isinstance(self.compressed_modules, dict), "`compressed_modules` must be a dict name -> layout")
            for name, layout in self.compressed_modules.items():
                _check(
                    isinstance(layout, dict)
                    and isinstance(layout.get("rank"), int)
                    and layout["rank"] >= 0
                    and isinstance(layout.get("nnz"), int)
                    and layout["nnz"] >= 0,
                    f"`compressed_modules[{name!r}]` must be a dict with int `rank` >= 0 and int `nnz` >= 0, got {layout!r}",
                )

    @property
    def nm_pattern(self) -> tuple[int, int] | None:
        """(N, M) when ``sparsity`` is an N:M pattern, else None."""
        return parse_sparsity(self.sparsity)[1]

    @property
    def is_compressed(self) -> bool:
        """True once the per-module layouts are known (a compressed checkpoint)."""
        return self.compressed_modules is not None

    def budget(self, out_features: int, in_features: int) -> tuple[int, float]:
        """(rank, sparsity) of one [out, in] matrix under the uniform budget rule of this config."""
        sparsity, nm_pattern = parse_sparsity(self.sparsity)
        numel, fan = out_features * in_features, out_features + in_features
        if self.compression_ratio is None:
            return (64 if self.rank is None else self.rank), (0.5 if sparsity is None else sparsity)
        kept = 1.0 - self.compression_ratio
        if nm_pattern is not None:
            n, m = nm_pattern
            return int(math.floor((kept - n / m) * numel / fan)), sparsity
        nnz = int(math.floor((1.0 - self.rank_ratio) * kept * numel))
        return int(math.floor(self.rank_ratio * kept * numel / fan)), (numel - nnz) / numel

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy({key: value for key, value in self.__dict__.items() if not key.startswith("_")})

    @property
    def tokenizer_object(self):
        """The tokenizer object passed at construction, if any (not serialized)."""
        return self._tokenizer_object

    @property
    def calibration_data(self):
        """What calibration reads: the ``datasets.Dataset`` passed at construction, else ``dataset``."""
        return self._dataset_object if self._dataset_object is not None else self.dataset

    def __deepcopy__(self, memo):
        clone = self.__class__.from_dict(self.to_dict())
        clone._tokenizer_object = self._tokenizer_object
        clone._dataset_object = self._dataset_object
        return clone

    def __eq__(self, other):
        return isinstance(other, SLRConfig) and self.to_dict() == other.to_dict()
