"""Declared hyperparameter records: defaults run, every field rejects bad values by name, history comes back."""

import dataclasses
import math
import types
import typing

import numpy as np
import pytest
import torch

from hf_slr import algorithms
from hf_slr.algorithms import Algorithm, Decomposition, Target, available, get
from hf_slr.algorithms.base import relative_objective
from hf_slr.algorithms.hyperparameters import (
    ConstraintError,
    check_hyperparameters,
    describe_hyperparameters,
    hyperparameter,
    hyperparameter_spec,
)

METHODS = available()
ITERATIVE = ["oats", "sslc", "qr_rpca", "hassle_free", "threebasil"]
# Small but complete runs: the last history entry is the objective of the returned factors.
FAST = {
    "oats": {"iterations": 5},
    "sslc": {"iterations": 5},
    "qr_rpca": {"iterations": 7},
    "hassle_free": {"iterations": 4, "blocksize": 8},
    "threebasil": {"max_iterations": 60, "min_iterations": 20},
}
TARGETS = [Target(rank=3, sparsity=0.5), Target(rank=2, nm_pattern=(2, 4))]


def _layer(rows=10, cols=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g)
    x = torch.randn(64, cols, generator=g) * torch.logspace(-1, 1, cols)
    return weight, x.T @ x


def _fields(name):
    record_type = get(name).hyperparameters
    hints = typing.get_type_hints(record_type)
    return [(field, hints[field.name], hyperparameter_spec(field)) for field in dataclasses.fields(record_type)]


FIELDS = [(name, field.name) for name in METHODS for field, _, _ in _fields(name)]
NUMERIC = [(name, field.name) for name in METHODS for field, kind, _ in _fields(name) if kind in (int, float)]
FLOATS = [(name, field.name) for name in METHODS for field, kind, _ in _fields(name) if kind is float]


def _field(name, field_name):
    return next((f, kind, spec) for f, kind, spec in _fields(name) if f.name == field_name)


def _rejects(name, values, *fragments):
    """``check`` and ``run`` both raise a ValueError naming the method and every fragment."""
    with pytest.raises(ValueError) as raised:
        get(name).check(values)
    message = str(raised.value)
    assert f"method {name!r}" in message and "method_kwargs" in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    weight, hessian = _layer()
    with pytest.raises(ValueError):
        get(name).run(weight, hessian, Target(rank=2, sparsity=0.5), values)
    return message


# --- registry ---------------------------------------------------------------------------------------


def test_every_method_declares_itself():
    assert set(METHODS) == {"activation_svd", "hassle_free", "magnitude", "magnitude_svd", "oats", "qr_rpca",
                            "sparsegpt", "sslc", "svd", "threebasil", "wanda"}
    for name in METHODS:
        algorithm = get(name)
        assert isinstance(algorithm, Algorithm) and algorithm.name == name
        assert dataclasses.is_dataclass(algorithm.hyperparameters)
        assert algorithm.hyperparameters.__dataclass_params__.frozen
        assert len(algorithm.paper) > 20 and "(" in algorithm.paper  # a title plus authors / venue, year
    assert isinstance(algorithms.hyperparameters, types.ModuleType)  # the module, not the old signature sniffing
    with pytest.raises(ValueError, match="allowed values: .*'oats'"):
        get("oatz")


def test_every_field_is_documented_and_its_default_is_allowed():
    for name in METHODS:
        for field, kind, spec in _fields(name):
            assert spec.doc, (name, field.name)
            assert kind in (int, float, str, bool), (name, field.name)
            if kind in (int, float):
                assert spec.low is not None or spec.high is not None, (name, field.name)  # every number is bounded
            if kind is str:
                assert spec.choices, (name, field.name)
        defaults = get(name).defaults()
        assert get(name).check({}) == defaults
        assert get(name).check(dataclasses.asdict(defaults)) == defaults  # defaults pass their own checks
        assert [row["name"] for row in describe_hyperparameters(get(name).hyperparameters)] == [
            field.name for field in dataclasses.fields(defaults)
        ]


# --- defaults run and satisfy the target ------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS, ids=str)
@pytest.mark.parametrize("name", METHODS)
def test_defaults_run_to_the_target(name, target, check_target):
    weight, hessian = _layer()
    algorithm = get(name)
    result = algorithm.run(weight, hessian if algorithm.needs_hessian else None, target)  # the paper defaults
    assert isinstance(result, Decomposition)
    sparse, u, v = result
    assert sparse.shape == weight.shape and u.shape == (10, target.rank) and v.shape == (target.rank, 16)
    scope = getattr(algorithm.defaults(), "scope", "matrix")
    check_target(sparse, u, v, target, scope)
    if target.nm_pattern is None and name not in ("svd", "activation_svd"):
        assert (sparse != 0).sum() <= target.kept_total(10, 16)


def test_run_accepts_none_dict_or_record_and_rejects_another_record():
    weight, hessian = _layer()
    target = Target(rank=2, sparsity=0.5)
    oats = get("oats")
    by_dict = oats.run(weight, hessian, target, {"iterations": 3})
    by_record = oats.run(weight, hessian, target, oats.hyperparameters(iterations=3))
    assert all(torch.equal(a, b) for a, b in zip(by_dict, by_record)) and by_dict.history == by_record.history
    assert len(oats.run(weight, hessian, target).history) == 80  # None: the paper defaults
    with pytest.raises(ValueError, match="method 'oats' takes a dict or a OatsHyperparameters"):
        oats.run(weight, hessian, target, get("sslc").defaults())
    with pytest.raises(ValueError, match=r"`method_kwargs\['iterations'\]` of method 'oats' must be an int >= 1"):
        oats.run(weight, hessian, target, oats.hyperparameters(iterations=0))  # records are re-checked
    with pytest.raises(ValueError, match="hessian must be"):
        oats.run(weight, hessian[:5, :5], target)


# --- every field rejects bad values -----------------------------------------------------------------


def _out_of_range(kind, spec):
    values = []
    if spec.choices is not None:
        values.append("not-a-choice")
    if spec.low is not None:
        values.append(spec.low if spec.low_open else (spec.low - 1 if kind is int else spec.low - 0.5))
    if spec.high is not None:
        values.append(spec.high if spec.high_open else (spec.high + 1 if kind is int else spec.high + 0.5))
    return values


@pytest.mark.parametrize("name, field_name", FIELDS)
def test_field_rejects_out_of_range(name, field_name):
    _, kind, spec = _field(name, field_name)
    values = _out_of_range(kind, spec)
    assert values, (name, field_name)
    for value in values:
        _rejects(name, {field_name: value}, f"`method_kwargs[{field_name!r}]`", spec.words(), f"got {value!r}")


@pytest.mark.parametrize("name, field_name", NUMERIC)
def test_numeric_field_rejects_bool_string_and_numpy(name, field_name):
    field, kind, _ = _field(name, field_name)
    default = field.default
    _rejects(name, {field_name: True}, f"[{field_name!r}]", "got True")
    _rejects(name, {field_name: str(default)}, f"[{field_name!r}]", f"got {str(default)!r}")
    numpy_value = np.int64(default) if kind is int else np.float64(default)
    _rejects(name, {field_name: numpy_value}, f"[{field_name!r}]", "numpy", f"pass a Python {kind.__name__}")
    if kind is int:
        _rejects(name, {field_name: float(default)}, f"[{field_name!r}]", "must be an int")
    else:  # an int where a float is expected is accepted and converted
        value = getattr(get(name).check({field_name: int(default) if default >= 1 else 1}), field_name)
        assert type(value) is float


@pytest.mark.parametrize("name, field_name", FLOATS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=str)
def test_float_field_rejects_non_finite(name, field_name, value):
    _rejects(name, {field_name: value}, f"[{field_name!r}]", "must be a finite float")


@pytest.mark.parametrize("name", METHODS)
def test_unknown_name_is_rejected_with_the_allowed_ones(name):
    allowed = sorted(field.name for field in dataclasses.fields(get(name).hyperparameters))
    message = _rejects(name, {"no_such_option": 1}, "unknown name(s) ['no_such_option']", f"allowed: {allowed}")
    assert "history" not in allowed and "residuals" not in allowed and "init" not in allowed
    assert message
    with pytest.raises(ValueError, match="must be a dict"):
        get(name).check([("scope", "row")])


def _boundary_values(kind, spec):
    """The extreme allowed values: closed bounds themselves, just inside open ones."""
    values = []
    if spec.low is not None:
        values.append(spec.low if not spec.low_open else (spec.low + 1 if kind is int else spec.low + 1e-6))
    if spec.high is not None:
        values.append(spec.high if not spec.high_open else (spec.high - 1 if kind is int else spec.high - 1e-6))
    return values


@pytest.mark.parametrize("name, field_name", NUMERIC)
def test_extreme_allowed_values_run_to_the_target(name, field_name, check_target):
    """Whatever the range lets through runs, even on a layer with a dead channel, and meets the target."""
    _, kind, spec = _field(name, field_name)
    weight, hessian = _layer()
    hessian[:, 2] = hessian[2] = 0  # a dead input channel: H is singular
    target = Target(rank=2, nm_pattern=(2, 4))
    for value in _boundary_values(kind, spec):
        hyper = {**FAST.get(name, {}), field_name: value}
        if name == "threebasil" and field_name == "max_iterations":
            hyper["min_iterations"] = 0
        if name == "hassle_free" and field_name in ("lowrank_iterations", "learning_rate"):
            hyper["lowrank_step"] = "gd"
        result = get(name).run(weight, hessian, target, hyper)
        scope = getattr(get(name).check(hyper), "scope", "matrix")
        check_target(*result, target, scope)


# --- the regressions of the bug report --------------------------------------------------------------


@pytest.mark.parametrize("name", ["oats", "hassle_free", "qr_rpca", "sslc"])
def test_zero_iterations_rejected(name):
    message = _rejects(name, {"iterations": 0})
    assert message == f"`method_kwargs['iterations']` of method {name!r} must be an int >= 1, got 0"


def test_sparsegpt_zero_blocksize_and_percdamp_rejected():
    assert _rejects("sparsegpt", {"blocksize": 0}) == (
        "`method_kwargs['blocksize']` of method 'sparsegpt' must be an int >= 1, got 0"
    )
    _rejects("sparsegpt", {"percdamp": 0.0}, "must be a finite float > 0, got 0.0")
    _rejects("sparsegpt", {"percdamp": -0.01}, "> 0")


def test_threebasil_rho_and_iteration_bounds():
    message = _rejects("threebasil", {"rho": 0})
    assert message == "`method_kwargs['rho']` of method 'threebasil' must be a finite float > 0, got 0"
    _rejects("threebasil", {"rho": -1.0}, "> 0")
    _rejects("threebasil", {"rho": math.inf}, "finite")
    _rejects("threebasil", {"rho_update_every": 0}, "['rho_update_every']", ">= 1")
    message = _rejects("threebasil", {"min_iterations": 50, "max_iterations": 40})
    assert message == "`method_kwargs['min_iterations']` of method 'threebasil' must be <= max_iterations (40), got 50"
    assert get("threebasil").check({"min_iterations": 40, "max_iterations": 40}).max_iterations == 40


def test_choices_are_the_allowed_strings():
    assert get("hassle_free").check({"lowrank_step": "gd"}).lowrank_step == "gd"
    _rejects("hassle_free", {"lowrank_step": "adam"}, "one of ['gd', 'closed_form'], got 'adam'")
    _rejects("qr_rpca", {"scaling": "diagonal"}, "one of ['activation', 'none']")
    for name in ("magnitude", "wanda", "sparsegpt", "magnitude_svd", "oats", "sslc", "qr_rpca", "hassle_free",
                 "threebasil"):
        _rejects(name, {"scope": "column"}, "one of ['row', 'matrix'], got 'column'")


# --- history ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS, ids=str)
@pytest.mark.parametrize("name", ITERATIVE)
def test_history_comes_back_and_ends_at_the_result(name, target):
    weight, hessian = _layer(seed=3)
    result = get(name).run(weight, hessian, target, FAST[name])
    assert isinstance(result.history, tuple) and len(result.history) > 0
    assert all(isinstance(h, float) and math.isfinite(h) for h in result.history)
    if "iterations" in FAST[name]:
        assert len(result.history) == FAST[name]["iterations"]
    assert result.history[-1] == pytest.approx(relative_objective(weight, *result, hessian), rel=1e-4)
    quiet = get(name).run(weight, hessian, target, FAST[name], record_history=False)
    assert quiet.history == () and all(torch.equal(a, b) for a, b in zip(result, quiet))


@pytest.mark.parametrize("name", [n for n in METHODS if n not in ITERATIVE])
def test_one_shot_methods_have_no_history(name):
    weight, hessian = _layer()
    hessian = hessian if get(name).needs_hessian else None
    assert get(name).run(weight, hessian, Target(rank=2, sparsity=0.5)).history == ()


def test_threebasil_primal_residuals_are_diagnostics():
    weight, hessian = _layer()
    result = get("threebasil").run(weight, hessian, Target(rank=2, sparsity=0.5), FAST["threebasil"])
    residuals = result.diagnostics["primal_residual"]
    assert len(residuals) == len(result.history) - 1  # one per ADMM iteration; the history adds the polish
    with pytest.raises(TypeError):
        result.diagnostics["primal_residual"] = ()  # read-only


def test_decomposition_is_a_frozen_triple():
    s, u, v = torch.zeros(2, 3), torch.zeros(2, 1), torch.zeros(1, 3)
    result = Decomposition(s, u, v, [0.5, 0.25])
    assert result.history == (0.5, 0.25)
    first, second, third = result
    assert first is s and second is u and third is v
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.history = ()


# --- the generic validator (also used for allocation_kwargs and transformer-matching kwargs) -------


@dataclasses.dataclass(frozen=True)
class _Example:
    steps: int = hyperparameter(8, low=1, doc="steps")
    share: float = hyperparameter(0.5, low=0.0, high=1.0, high_open=True, doc="a fraction in [0, 1)")
    seed: int | None = hyperparameter(None, doc="None: the config's seed")
    warm: bool = hyperparameter(False, doc="a flag")

    def __post_init__(self):
        if self.seed is not None and self.seed > 10 * self.steps:
            raise ConstraintError("seed", f"<= 10 * steps ({10 * self.steps})", self.seed)


def test_generic_validator_labels_owner_and_field():
    check = check_hyperparameters
    assert check("allocation 'learned'", _Example, None) == _Example()
    record = check("allocation 'learned'", _Example, {"steps": 2, "share": 0, "seed": 3, "warm": True},
                   field_label="allocation_kwargs")
    assert record == _Example(2, 0.0, 3, True) and type(record.share) is float
    with pytest.raises(ValueError) as raised:
        check("allocation 'learned'", _Example, {"share": 1.0}, field_label="allocation_kwargs")
    assert str(raised.value) == (
        "`allocation_kwargs['share']` of allocation 'learned' must be a finite float in [0, 1), got 1.0"
    )
    with pytest.raises(
        ValueError, match=r"`tm_kwargs\['seed'\]` of transformer matching must be an int or None, got 1.5$"
    ):
        check("transformer matching", _Example, {"seed": 1.5}, field_label="tm_kwargs")
    with pytest.raises(ValueError, match=r"\['warm'\].* must be a bool, got 1"):
        check("x", _Example, {"warm": 1})
    with pytest.raises(ValueError, match=r"\['seed'\]` of x must be <= 10 \* steps \(20\), got 30"):
        check("x", _Example, {"steps": 2, "seed": 30})
    with pytest.raises(ValueError, match=r"`hyperparameters` of x has unknown name\(s\) \['step'\]; allowed: "
                                         r"\['seed', 'share', 'steps', 'warm'\]"):
        check("x", _Example, {"step": 2})
