"""Declared hyperparameter records and their one validator.

A method (or an allocation, or any other configurable step) declares its hyperparameters as a
frozen dataclass whose fields carry their type (the annotation: ``int``, ``float``, ``str`` or
``bool``, optionally ``| None``), their paper default and their allowed values::

    @dataclass(frozen=True)
    class OatsHyperparameters:
        iterations: int = hyperparameter(80, low=1, doc="alternations (T)")
        scope: str = hyperparameter("row", choices=("row", "matrix"), doc="support per row or matrix")

:func:`check_hyperparameters` turns a user dict (``method_kwargs``, ``allocation_kwargs``, ...)
into a record instance, or raises one ``ValueError`` that names the dict, the owner, the field,
the allowed values in words and the bad value::

    `method_kwargs['iterations']` of method 'oats' must be an int >= 1, got 0

Cross-field constraints go in the record's ``__post_init__``, raising :class:`ConstraintError`
(a ``ValueError``) with the field and the requirement; the validator adds the owner and label.

Standard library only.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = [
    "SEED_RANGE",
    "ConstraintError",
    "HyperparameterSpec",
    "check_hyperparameters",
    "describe_hyperparameters",
    "hyperparameter",
    "hyperparameter_spec",
    "hyperparameter_values",
]

_METADATA_KEY = "hf_slr.hyperparameter"

# Seeds: the range torch.Generator.manual_seed accepts: ``seed: int = hyperparameter(0, **SEED_RANGE)``.
SEED_RANGE = {"low": -(2**63), "high": 2**64 - 1}
_TYPE_NAMES = {int: "an int", float: "a float", str: "a string", bool: "a bool"}


@dataclass(frozen=True)
class HyperparameterSpec:
    """Allowed values of one field: a closed/open numeric range, or a set of choices; its doc."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None
    doc: str = ""

    def allows(self, value) -> bool:
        if self.choices is not None and value not in self.choices:
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def words(self) -> str:
        """The allowed values in words: ``>= 1``, ``> 0``, ``in [0, 1)``, ``one of ['row', 'matrix']``."""
        if self.choices is not None:
            return f"one of {list(self.choices)}"
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {high}"
        return ""


def _number(bound) -> str:
    """A bound in words; huge powers of two as such (seeds: -2**63, 2**64 - 1)."""
    if bound is None:
        return ""
    if not isinstance(bound, int):
        return f"{bound:g}"
    for value, text in ((bound + 1, "2**{} - 1"), (-bound, "-2**{}")):
        if value >= 2**32 and (value & (value - 1)) == 0:
            return text.format(value.bit_length() - 1)
    return str(bound)


def hyperparameter(
    default,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    choices: tuple | list | None = None,
    doc: str = "",
):
    """A dataclass field with a paper default and its allowed range (``low``/``high``, bounds
    included unless ``low_open``/``high_open``) or ``choices``, and a one-line ``doc``."""
    spec = HyperparameterSpec(low, high, low_open, high_open, None if choices is None else tuple(choices), doc)
    return dataclasses.field(default=default, metadata={_METADATA_KEY: spec})


class ConstraintError(ValueError):
    """A cross-field constraint of a record failed; raised by the record's ``__post_init__``."""

    def __init__(self, field: str, requirement: str, value):
        super().__init__(f"`{field}` must be {requirement}, got {value!r}")
        self.field, self.requirement, self.value = field, requirement, value


def hyperparameter_spec(field: dataclasses.Field) -> HyperparameterSpec:
    """The declared range / choices / doc of a record field (an unconstrained spec if undeclared)."""
    return field.metadata.get(_METADATA_KEY, HyperparameterSpec())


def _field_types(record_type: type) -> dict[str, tuple[type, bool]]:
    """{name: (base type, None allowed)} from the (possibly string) annotations."""
    hints = typing.get_type_hints(record_type)
    result = {}
    for field in dataclasses.fields(record_type):
        hint = hints[field.name]
        optional = False
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            members = [m for m in typing.get_args(hint) if m is not type(None)]
            optional = len(members) < len(typing.get_args(hint))
            if len(members) != 1:
                raise TypeError(f"{record_type.__name__}.{field.name}: unsupported annotation {hint!r}")
            hint = members[0]
        if hint not in _TYPE_NAMES:
            raise TypeError(f"{record_type.__name__}.{field.name}: unsupported annotation {hint!r}")
        result[field.name] = (hint, optional)
    return result


def _describe_value(value, expected: type) -> str:
    kind = type(value)
    if kind.__module__ == "numpy":
        python = expected.__name__
        return f"{value!r} (a numpy {kind.__name__}; pass a Python {python}, e.g. {python}(value))"
    if kind in (int, float, str, type(None)):
        return repr(value)
    return f"{value!r} ({kind.__name__})"


def _requirement(kind: type, optional: bool, spec: HyperparameterSpec) -> str:
    noun = "a finite float" if kind is float else _TYPE_NAMES[kind]
    text = spec.words() if spec.choices is not None else f"{noun} {spec.words()}".rstrip()
    return text + " or None" if optional else text


def _convert(kind: type, value):
    """``value`` as ``kind`` if its type is acceptable, else raise ``TypeError``."""
    if kind is float and type(value) in (int, float):  # exact types: no bool, no numpy float64 subclass
        if not math.isfinite(value):
            raise TypeError
        return float(value)
    if type(value) is kind:
        return value
    raise TypeError


def check_hyperparameters(
    owner: str, record_type: type, values: Mapping[str, Any] | None, *, field_label: str = "hyperparameters"
):
    """``record_type(**values)`` after checking every name, type and range; ``ValueError`` otherwise.

    ``owner`` names whose hyperparameters these are ("method 'oats'"); ``field_label`` names the
    dict the user wrote them in ("method_kwargs"). Types are strict: a bool is not an int, an int
    is accepted (and converted) where a float is expected, numpy scalars, strings and non-finite
    floats are rejected for numeric fields. Missing names take their defaults.
    """
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ValueError(f"`{field_label}` of {owner} must be a dict, got {type(values).__name__}")
    types_ = _field_types(record_type)
    unknown = sorted(str(name) for name in values if name not in types_)
    if unknown:
        raise ValueError(
            f"`{field_label}` of {owner} has unknown name(s) {unknown}; allowed: {sorted(types_)}"
        )
    checked = {}
    for field in dataclasses.fields(record_type):
        if field.name not in values:
            continue
        value, (kind, optional), spec = values[field.name], types_[field.name], hyperparameter_spec(field)
        if value is None and optional:
            checked[field.name] = None
            continue
        try:
            converted = _convert(kind, value)
            if not spec.allows(converted):
                raise TypeError
        except TypeError:
            raise ValueError(
                f"`{field_label}[{field.name!r}]` of {owner} must be {_requirement(kind, optional, spec)}, "
                f"got {_describe_value(value, kind)}"
            ) from None
        checked[field.name] = converted
    try:
        return record_type(**checked)
    except ConstraintError as error:
        raise ValueError(
            f"`{field_label}[{error.field!r}]` of {owner} must be {error.requirement}, got {error.value!r}"
        ) from None


def hyperparameter_values(record) -> dict[str, Any]:
    """The fields of a record instance as a plain (JSON-friendly) dict."""
    return {field.name: getattr(record, field.name) for field in dataclasses.fields(record)}


def describe_hyperparameters(record_type: type) -> list[dict[str, Any]]:
    """One row per field: name, type name, default, allowed values in words, doc (for docs / CLI help)."""
    rows = []
    for field in dataclasses.fields(record_type):
        kind, optional = _field_types(record_type)[field.name]
        spec = hyperparameter_spec(field)
        rows.append({
            "name": field.name,
            "type": kind.__name__ + (" | None" if optional else ""),
            "default": field.default,
            "allowed": _requirement(kind, optional, spec),
            "doc": spec.doc,
        })
    return rows
