"""Fused training-mode BatchNorm2d against torch.nn.BatchNorm2d: outputs, running statistics,
first and second derivatives, layouts; convert_batchnorm keeps every parameter and buffer."""

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from _backends import backend_params
from torch import nn

from sophon_fast import _backend
from sophon_fast.nn import FusedBatchNorm2d, convert_batchnorm
from sophon_fast.ops.batch_norm import batch_norm2d
from sophon_fast.reference import batch_norm as reference

# batch 2 with 1x1 spatial (2 values per channel), odd primes, and a batch of 1 with 3x1.
SHAPES = ((2, 3, 1, 1), (3, 5, 7, 2), (1, 4, 3, 1), (4, 2, 5, 5))
# Every backend: triton runs under the interpreter here (one program per channel, ~10 ms each).
FUSED = backend_params()
TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _inputs(shape, dtype, channels_last=False, affine=True):
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    weight = torch.randn(c, dtype=dtype) if affine else None
    bias = torch.randn(c, dtype=dtype) if affine else None
    return x, weight, bias


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("momentum", [0.1, 0.7])
def test_outputs_and_running_stats_match_torch(
    backend, device, dtype, shape, channels_last, momentum
):
    x, weight, bias = _inputs(shape, dtype, channels_last)
    rm, rv = torch.randn(shape[1], dtype=dtype), torch.rand(shape[1], dtype=dtype) + 0.5
    rm_ref, rv_ref = rm.clone(), rv.clone()
    with _backend.use_backend(backend):
        y = batch_norm2d(x, weight, bias, rm, rv, momentum, 1e-3)
    expected = F.batch_norm(x, rm_ref, rv_ref, weight, bias, True, momentum, 1e-3)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(y, expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(rm, rm_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(rv, rv_ref, rtol=rtol, atol=atol)
    if channels_last and shape[2] * shape[3] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_first_and_second_derivatives_match_torch(backend, device, shape, channels_last, affine):
    x, weight, bias = _inputs(shape, torch.float64, channels_last, affine)
    leaves = [t.requires_grad_(True) for t in (x, weight, bias) if t is not None]
    grad_y = torch.randn(shape, dtype=torch.float64)

    def derivatives(fn):
        y = fn(x, weight, bias, None, None, 0.1, 1e-5)
        first = torch.autograd.grad(y, leaves, grad_y, create_graph=True)
        norm = sum(g.square().sum() for g in first)
        return first, torch.autograd.grad(norm, leaves, allow_unused=True, materialize_grads=True)

    with _backend.use_backend(backend):
        first, second = derivatives(batch_norm2d)
    first_ref, second_ref = derivatives(reference.batch_norm2d)
    for got, want in zip(first + second, first_ref + second_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (2, 2, 1, 3)], ids=str)
def test_gradcheck_and_gradgradcheck_float64(backend, device, shape):
    x, weight, bias = _inputs(shape, torch.float64)
    inputs = tuple(t.requires_grad_(True) for t in (x, weight, bias))

    def bn(x, w, b):
        with _backend.use_backend(backend):
            return batch_norm2d(x, w, b, None, None, 0.1, 1e-5)

    assert torch.autograd.gradcheck(bn, inputs)
    assert torch.autograd.gradgradcheck(bn, inputs)


def test_closed_forms_match_autograd():
    x, weight, _ = _inputs((3, 4, 2, 5), torch.float64)
    x.requires_grad_(True)
    weight.requires_grad_(True)
    grad_y = torch.randn_like(x, requires_grad=True)
    y = F.batch_norm(x, None, None, weight, None, True, 0.1, 1e-5)
    dx, dw = torch.autograd.grad(y, (x, weight), grad_y, create_graph=True)
    mean = x.detach().mean((0, 2, 3))
    invstd = (x.detach().var((0, 2, 3), unbiased=False) + 1e-5).rsqrt()
    closed = reference.batch_norm2d_backward(
        x.detach(), weight.detach(), grad_y.detach(), mean, invstd
    )
    torch.testing.assert_close(closed[0], dx.detach())
    torch.testing.assert_close(closed[1], dw.detach())
    ggx, ggw = torch.randn_like(x), torch.randn_like(weight)
    want = torch.autograd.grad((dx, dw), (x, weight, grad_y), (ggx, ggw))
    got = reference.batch_norm2d_double_backward(
        x.detach(), weight.detach(), grad_y.detach(), mean, invstd, ggx, ggw, None
    )
    for g, w in zip(got, (want[0], want[1], want[2])):
        torch.testing.assert_close(g, w)


def _model():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 3, 1),
        nn.BatchNorm2d(3, momentum=None),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 2),
    ).double()


def test_convert_batchnorm_keeps_state_and_matches_torch():
    model = _model()
    reference_model = copy.deepcopy(model)
    before = {name: t for name, t in model.state_dict(keep_vars=True).items()}
    assert convert_batchnorm(model) is model
    after = model.state_dict(keep_vars=True)
    assert list(before) == list(after)
    assert all(before[k] is after[k] for k in before)  # same tensor objects, not copies
    assert isinstance(model[1], FusedBatchNorm2d) and isinstance(model[4], FusedBatchNorm2d)
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    for _ in range(3):  # momentum=None: cumulative average over num_batches_tracked
        torch.testing.assert_close(model(x), reference_model(x))
    for k, v in reference_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)
    model.eval()
    reference_model.eval()
    torch.testing.assert_close(model(x), reference_model(x))


def test_convert_batchnorm_second_order_matches_torch():
    model, reference_model = _model(), None
    reference_model = copy.deepcopy(model)
    convert_batchnorm(model)
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)

    def hvp_norm(m):
        params = list(m.parameters())
        loss = m(x).square().mean()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), params)

    for got, want in zip(hvp_norm(model), hvp_norm(reference_model)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm2d(torch.zeros(1, 3, 1, 1), None, None, None, None)
    with pytest.raises(ValueError, match="height, width"):
        batch_norm2d(torch.zeros(2, 3), None, None, None, None)


def test_forced_backend_that_cannot_run_raises():
    with _backend.use_backend("cuda"), pytest.raises(_backend.BackendUnavailableError):
        batch_norm2d(torch.zeros(2, 3, 2, 2), None, None, None, None)


@pytest.mark.parametrize(("backend", "device"), FUSED)
def test_bad_eps_and_running_stats_raise(backend, device):
    if backend == "reference":
        pytest.skip("the reference is F.batch_norm itself")
    x = torch.randn(2, 3, 2, 2, device=device)
    with _backend.use_backend(backend), pytest.raises(ValueError, match="eps"):
        batch_norm2d(x, None, None, None, None, 0.1, 0.0)
    with _backend.use_backend(backend), pytest.raises(ValueError, match="channels"):
        batch_norm2d(x, torch.ones(4, device=device), None, None, None)


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_within_twice_torch_error(backend, device, dtype):
    """fp32 maths on fp16/bf16 storage: error vs float64 <= 2x torch's own same-dtype error."""
    x, weight, bias = _inputs((3, 4, 5, 3), torch.float64)
    grad_y = torch.randn_like(x)
    exact = reference.batch_norm2d(x, weight, bias, None, None)
    ours = torch_ = None
    for name in ("ours", "torch"):
        leaves = [t.to(device, dtype).requires_grad_(True) for t in (x, weight, bias)]
        fn = batch_norm2d if name == "ours" else reference.batch_norm2d
        with _backend.use_backend(backend if name == "ours" else "reference"):
            y = fn(*leaves, None, None)
        (dx,) = torch.autograd.grad(y, leaves[0], grad_y.to(device, dtype))
        result = (y.double().cpu(), dx.double().cpu())
        ours, torch_ = (result, torch_) if name == "ours" else (ours, result)
    (dx_exact,) = torch.autograd.grad(
        reference.batch_norm2d(x.requires_grad_(True), weight, bias, None, None), x, grad_y
    )
    unit = torch.finfo(dtype).eps
    for got, theirs, want in zip(ours, torch_, (exact.detach(), dx_exact)):
        bound = 2 * (theirs - want).abs().max() + unit
        assert (got - want).abs().max() <= bound


def test_signature_parity_with_reference():
    public = inspect.signature(batch_norm2d)
    twin = inspect.signature(reference.batch_norm2d)
    assert list(public.parameters) == list(twin.parameters)
    assert [p.default for p in public.parameters.values()] == [
        p.default for p in twin.parameters.values()
    ]
