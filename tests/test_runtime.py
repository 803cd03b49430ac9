"""The inference runtime (hf_slr.runtime): every form equals the reference x (S + U V)^T + b, caches
follow parameter changes, nothing leaks into the state dict, and a reloaded model generates the
reference path's tokens. Speed is measured by benchmarks/inference.py, not here."""

import copy
import pickle
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_slr
from hf_slr import SLRConfig, SLRLinear
from hf_slr.runtime import RUNTIME_ENV, LayerStorage, kernels
from hf_slr.runtime.cuda import semi_structured_supported
from hf_slr.runtime.dispatch import resolve
from hf_slr.runtime.forms import DenseWeight, MaskedRows, SparseCSR
from hf_slr.runtime.storage import dense_sparse, support_words

LAYOUTS = [None, (2, 4), (2, 8), (1, 4)]
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


@pytest.fixture(scope="session")
def extension():
    """The C++ kernels, built once per machine (about 30 s the first time, cached after)."""
    module = kernels.extension()
    assert module is not None, "the hf_slr CPU kernels did not build on this machine"
    return module


def _layer(nm_pattern, out=37, inp=24, rank=3, bias=True, density=0.4, seed=0) -> SLRLinear:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inp, generator=generator)
    if nm_pattern is None:
        sparse = weight * (torch.rand(out, inp, generator=generator) < density)
    else:
        n, m = nm_pattern
        groups = weight.reshape(out, inp // m, m)
        keep = groups.abs().topk(n, dim=-1).indices
        sparse = torch.zeros_like(groups).scatter(-1, keep, groups.gather(-1, keep)).reshape(out, inp)
    u = torch.randn(out, rank, generator=generator) / 2
    v = torch.randn(rank, inp, generator=generator) / 2
    b = torch.randn(out, generator=generator) if bias else None
    return SLRLinear.from_dense(sparse, u, v, b, nm_pattern=nm_pattern).eval()


def _close(actual, expected, dtype):
    scale = expected.float().abs().max().clamp_min(1.0)
    error = (actual.float() - expected.float()).abs().max() / scale
    assert error <= TOLERANCE[dtype], f"relative error {error:.2e}"


def _in_features(nm_pattern):
    return 40 if nm_pattern == (2, 8) else 24  # odd widths: not a multiple of 16 / 64


@pytest.mark.parametrize("nm_pattern", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_form_equals_the_reference(extension, nm_pattern, dtype):
    inp = _in_features(nm_pattern)
    for rank, bias in [(3, True), (0, False), (16, False)]:
        layer = _layer(nm_pattern, inp=inp, rank=rank, bias=bias).to(dtype)
        storage = layer.storage()
        forms = [MaskedRows(storage, "cpu", dtype, isa_level=level) for level in range(kernels.isa_level() + 1)]
        forms += [SparseCSR(storage, "cpu", dtype), DenseWeight(storage, "cpu", dtype)]
        for tokens in (1, 3, 8, 13, 40):  # token blocks 8 / 4 / 2 / 1, and the dense-temporary path
            x = torch.randn(tokens, inp).to(dtype)
            with torch.no_grad():
                expected = layer.reference_forward(x)
                for form in forms:
                    _close(form(x), expected, dtype)
        for form in forms[:-1]:  # the prefill path at every token count, S expanded 16 rows at a time
            form.prefill_tokens, form.block_bytes = 1, 16 * inp
            _close(form(x), expected, dtype)


def test_batch_and_sequence_dims_through_the_layer(extension):
    for nm_pattern in LAYOUTS:
        layer = _layer(nm_pattern, inp=_in_features(nm_pattern))
        x = torch.randn(2, 5, layer.in_features)
        with torch.no_grad():
            _close(layer(x), layer.reference_forward(x), torch.float32)
        assert layer.runtime.prepared_form == "kernel"
        assert layer(x).shape == (2, 5, 37)


def test_large_aligned_layer_reads_the_mask_in_place(extension):
    layer = _layer(None, out=64, inp=128, rank=4, density=0.5)
    words = support_words(layer.storage())
    assert words.data_ptr() == layer.sparse_mask.data_ptr()  # no copy of the 1-bit mask
    assert torch.equal(dense_sparse(layer.storage()), layer.sparse_weight())
    x = torch.randn(3, 128)
    with torch.no_grad():
        _close(layer(x), layer.reference_forward(x), torch.float32)


def test_mixed_dtypes_compute_in_the_input_dtype(extension):
    layer = _layer((2, 4)).to(torch.bfloat16)
    x = torch.randn(4, 24)
    with torch.no_grad():
        out = layer(x)
        assert out.dtype == torch.float32
        _close(out, layer.reference_forward(x), torch.float32)


def test_training_and_gradients_use_the_reference_path(extension):
    layer = _layer((2, 4)).train()
    x = torch.randn(4, 24)
    layer(x).sum().backward()
    assert layer.sparse_values.grad is not None and layer.U.grad is not None and layer.V.grad is not None
    assert layer.runtime.prepared_form is None
    layer.eval()
    layer(x)  # grad enabled, parameters require grad: still the reference
    assert layer.runtime.prepared_form is None
    layer.requires_grad_(False)
    x.requires_grad_(True)
    layer(x).sum().backward()  # gradient into the input
    assert x.grad is not None and layer.runtime.prepared_form is None
    with torch.no_grad():
        layer(x)
    assert layer.runtime.prepared_form == "kernel"


def test_cache_follows_in_place_changes(extension):
    layer = _layer(None, out=32, inp=64)
    x = torch.randn(2, 64)
    with torch.no_grad():
        layer(x)
        for tensor in (layer.sparse_values, layer.U, layer.V, layer.bias):
            tensor.mul_(1.5)
            _close(layer(x), layer.reference_forward(x), torch.float32)
        state = {key: value * 2 if value.is_floating_point() else value for key, value in layer.state_dict().items()}
        layer.load_state_dict(state)
        _close(layer(x), layer.reference_forward(x), torch.float32)
        layer.U = torch.nn.Parameter(torch.randn(32, 5), requires_grad=False)  # replaced (PEFT merge)
        layer.V = torch.nn.Parameter(torch.randn(5, 64), requires_grad=False)
        _close(layer(x), layer.reference_forward(x), torch.float32)
    optimizer = torch.optim.SGD([layer.sparse_values], lr=0.1)
    layer.train()
    layer(x).sum().backward()
    optimizer.step()
    layer.eval()
    with torch.no_grad():
        _close(layer(x), layer.reference_forward(x), torch.float32)


def test_preparation_leaves_the_state_dict_unchanged(extension):
    for form in ("kernel", "torch", "dense"):
        layer = _layer((2, 4))
        before = {key: value.clone() for key, value in layer.state_dict().items()}
        layer.runtime.form = form
        with torch.no_grad():
            layer(torch.randn(3, 24))
        after = layer.state_dict()
        assert list(after) == list(before)
        assert all(torch.equal(after[key], before[key]) for key in before)
        assert not any("runtime" in name for name, _ in layer.named_buffers())
        assert layer.runtime.prepared_form == form


def test_copies_and_moves_drop_the_prepared_form(extension):
    layer = _layer((2, 4))
    with torch.no_grad():
        layer(torch.randn(1, 24))
    assert copy.deepcopy(layer).runtime.prepared_form is None
    assert pickle.loads(pickle.dumps(layer)).runtime.prepared_form is None
    layer.to(torch.bfloat16)
    assert layer.runtime.prepared_form is None


def test_form_selection_and_overrides(extension, monkeypatch):
    cpu = torch.device("cpu")
    assert resolve("auto", cpu, torch.float32, (2, 4), (64, 64)) == "kernel"
    assert resolve("auto", cpu, torch.float64, None, (64, 64)) == "torch"
    assert resolve("auto", torch.device("meta"), torch.float32, None, (64, 64)) == "reference"
    with pytest.warns(RuntimeWarning, match="semi_structured"):
        assert resolve("semi_structured", cpu, torch.float16, (2, 4), (64, 64)) == "kernel"
    layer = _layer(None)
    monkeypatch.setenv(RUNTIME_ENV, "torch")
    with torch.no_grad():
        layer(torch.randn(2, 24))
    assert layer.runtime.prepared_form == "torch"
    monkeypatch.setenv(RUNTIME_ENV, "bogus")
    with pytest.raises(ValueError, match="Unknown SLR runtime form"), torch.no_grad():
        layer(torch.randn(2, 24))


def test_fallback_when_the_kernels_cannot_build(monkeypatch):
    monkeypatch.setitem(kernels._state, "module", None)
    layer = _layer((2, 4))
    x = torch.randn(3, 24)
    with torch.no_grad():
        _close(layer(x), layer.reference_forward(x), torch.float32)
    assert layer.runtime.prepared_form == "torch"


def test_failed_build_warns_once(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "_build", lambda: (_ for _ in ()).throw(OSError("no compiler")))
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert kernels.extension() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.extension() is None


def test_semi_structured_eligibility_logic():
    cuda = torch.device("cuda")
    assert semi_structured_supported(cuda, torch.float16, (2, 4), (64, 128), capability=(8, 0))
    assert semi_structured_supported(cuda, torch.bfloat16, (2, 4), (4096, 4096), capability=(9, 0))
    assert not semi_structured_supported(cuda, torch.float16, (2, 4), (64, 128), capability=(7, 5))
    assert not semi_structured_supported(cuda, torch.float32, (2, 4), (64, 128), capability=(8, 0))
    assert not semi_structured_supported(cuda, torch.float16, (2, 8), (64, 128), capability=(8, 0))
    assert not semi_structured_supported(cuda, torch.float16, (2, 4), (48, 128), capability=(8, 0))
    assert not semi_structured_supported(torch.device("cpu"), torch.float16, (2, 4), (64, 128), capability=(8, 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("nm_pattern", [(2, 4), None])
def test_cuda_forms_equal_the_reference(nm_pattern):
    layer = _layer(nm_pattern, out=128, inp=256, rank=8).to("cuda", torch.float16)
    x = torch.randn(2, 7, 256, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        expected = layer.reference_forward(x)
        for tokens in (x, torch.randn(64, 256, device="cuda", dtype=torch.float16)):
            out = layer(tokens)
            torch.testing.assert_close(out, layer.reference_forward(tokens), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(layer(x), expected, rtol=2e-2, atol=2e-2)
    capable = torch.cuda.get_device_capability() >= (8, 0)
    assert layer.runtime.prepared_form == ("semi_structured" if nm_pattern and capable else "torch")


@pytest.mark.parametrize("sparsity", ["2:4", 0.5])
def test_reloaded_model_generates_the_reference_tokens(extension, tiny_dense_dir, tmp_path, sparsity):
    config = SLRConfig(method="magnitude_svd", sparsity=sparsity, rank=4)
    model = AutoModelForCausalLM.from_pretrained(tiny_dense_dir("llama"), quantization_config=config)
    reloaded = AutoModelForCausalLM.from_pretrained(hf_slr.save_pretrained(model, tmp_path / "slr"))
    ids = torch.tensor([[1, 5, 9, 2], [7, 3, 3, 8]])
    settings = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    fast = reloaded.generate(ids, **settings)
    assert set(hf_slr.runtime_forms(reloaded).values()) == {"kernel"}
    hf_slr.set_runtime(reloaded, "reference")
    assert torch.equal(reloaded.generate(ids, **settings), fast)
    hf_slr.set_runtime(reloaded, "torch", modules="mlp")
    assert torch.equal(reloaded.generate(ids, **settings), fast)
    assert {form for name, form in hf_slr.runtime_forms(reloaded).items() if ".mlp." in name} == {"torch"}
    with pytest.raises(ValueError, match="names no SLRLinear"):
        hf_slr.set_runtime(reloaded, "kernel", modules="nothing_here")
    with pytest.raises(ValueError, match="Unknown SLR runtime form"):
        hf_slr.set_runtime(reloaded, "fast")


def test_storage_names_the_layer_tensors():
    layer = _layer(None)
    storage = layer.storage()
    assert isinstance(storage, LayerStorage)
    assert storage.support is layer.sparse_mask and storage.values is layer.sparse_values
    assert _layer((2, 4)).storage().support is not None
