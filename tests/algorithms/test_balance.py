"""Balanced factors (PiSSA's convention): every method's U, V leave ``Algorithm.run`` with
||U[:, c]|| = ||V[c, :]|| per component and the same product U V."""

import pytest
import torch

from hf_slr.algorithms import available, get
from hf_slr.algorithms.base import Target
from hf_slr.algorithms.lowrank import balance_factors

FAST = {
    "hassle_free": {"iterations": 3, "blocksize": 8},
    "oats": {"iterations": 3},
    "qr_rpca": {"iterations": 3},
    "sparsegpt": {"blocksize": 8},
    "sslc": {"iterations": 3},
    "threebasil": {"max_iterations": 20, "min_iterations": 10},
}
TARGETS = [Target(rank=3, sparsity=0.5), Target(rank=4, nm_pattern=(2, 4)), Target(rank=30, sparsity=0.9)]


def _layer(rows=12, cols=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    x = torch.randn(64, cols, generator=generator) * torch.logspace(-2, 2, cols)  # strongly anisotropic H
    return weight, x.T @ x


def _assert_balanced(u, v, rtol=1e-5):
    u_norm, v_norm = torch.linalg.vector_norm(u.double(), dim=0), torch.linalg.vector_norm(v.double(), dim=1)
    assert torch.allclose(u_norm, v_norm, rtol=rtol, atol=1e-30), (u_norm, v_norm)


def test_balance_keeps_the_product_and_equalizes_the_norms():
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(20, 5, generator=generator) * torch.tensor([1e4, 1.0, 1e-3, 37.0, 1e-6])
    v = torch.randn(5, 30, generator=generator) * torch.tensor([1e-4, 1.0, 1e3, 1e-4, 1e6])[:, None]
    balanced_u, balanced_v = balance_factors(u, v)
    assert balanced_u.dtype == u.dtype and balanced_v.dtype == v.dtype
    _assert_balanced(balanced_u, balanced_v)
    assert torch.allclose(balanced_u @ balanced_v, u @ v, rtol=1e-5, atol=1e-5 * (u @ v).abs().max())
    again_u, again_v = balance_factors(balanced_u, balanced_v)  # idempotent
    assert torch.allclose(again_u, balanced_u, rtol=1e-6) and torch.allclose(again_v, balanced_v, rtol=1e-6)


def test_balance_zero_components_and_extreme_scales():
    u = torch.tensor([[0.0, 1e-30, 2.0, 0.0], [0.0, 1e-30, 0.0, 0.0]])
    v = torch.tensor([[3.0, 4.0], [1e30, 1e30], [0.0, 0.0], [0.0, 0.0]])
    balanced_u, balanced_v = balance_factors(u, v)
    assert torch.isfinite(balanced_u).all() and torch.isfinite(balanced_v).all()
    # A component with a zero side is zero on both sides: U V is unchanged (zero), no NaN.
    assert not balanced_u[:, [0, 2, 3]].any() and not balanced_v[[0, 2, 3]].any()
    _assert_balanced(balanced_u, balanced_v)
    assert torch.allclose(balanced_u @ balanced_v, u @ v, rtol=1e-5)
    empty_u, empty_v = balance_factors(torch.zeros(3, 0), torch.zeros(0, 4))
    assert empty_u.shape == (3, 0) and empty_v.shape == (0, 4)


def test_balance_in_low_precision():
    generator = torch.Generator().manual_seed(1)
    u = (torch.randn(16, 4, generator=generator) * 50).bfloat16()
    v = (torch.randn(4, 24, generator=generator) * 1e-2).bfloat16()
    balanced_u, balanced_v = balance_factors(u, v)
    assert balanced_u.dtype == torch.bfloat16 and balanced_v.dtype == torch.bfloat16
    _assert_balanced(balanced_u, balanced_v, rtol=2e-2)
    assert torch.allclose((balanced_u @ balanced_v).float(), (u @ v).float(), rtol=3e-2, atol=1e-2)


@pytest.mark.parametrize("target", TARGETS, ids=str)
@pytest.mark.parametrize("name", available())
def test_every_method_returns_balanced_factors(name, target):
    """The invariant for every registered method, with U V equal to what its solver computed."""
    algorithm = get(name)
    weight, hessian = _layer()
    hessian = hessian if algorithm.needs_hessian else None
    record = algorithm.check(FAST.get(name, {}))
    sparse, u, v = algorithm.run(weight, hessian, target, record)
    raw_sparse, raw_u, raw_v = algorithm.decompose(weight, hessian, target, record, False)
    _assert_balanced(u, v)
    assert torch.equal(sparse, raw_sparse)
    product, raw_product = u.double() @ v.double(), raw_u.double() @ raw_v.double()
    assert torch.allclose(product, raw_product, rtol=1e-5, atol=1e-6 * raw_product.abs().max().clamp_min(1e-30))
