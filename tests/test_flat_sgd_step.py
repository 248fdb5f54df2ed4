"""flat_sgd_step: every backend against the reference, gradients, and input validation."""

import inspect

import pytest
import torch
from _backends import backend_params
from _shapes import FLAT_SIZES, SMALL_FLAT_SIZES
from _tolerances import elementwise
from test_flat_optim import compiled_float_typing

from sophon_fast import _backend
from sophon_fast.ops import _triton
from sophon_fast.ops import flat_sgd_step as ops
from sophon_fast.ops.flat_sgd_step import flat_sgd_step
from sophon_fast.reference import flat_sgd_step as reference

# Comparisons with the reference twin: the reference itself is the oracle, never compared with
# itself (it was: ~250 cases that could not fail).
FUSED = [p for p in backend_params() if p.values[0] != "reference"]

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
HYPER = ((0.1, 0.0), (0.37, 0.05), (-0.02, 1.5))  # (lr, weight_decay), negative lr = ascent


def _inputs(n, dtype, device):
    params = torch.randn(n, dtype=torch.float64).to(dtype=dtype, device=device)
    grad = torch.randn(n, dtype=torch.float64).to(dtype=dtype, device=device)
    return params, grad


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", FLAT_SIZES)
@pytest.mark.parametrize(("lr", "weight_decay"), HYPER)
def test_forward_matches_reference(backend, device, dtype, n, lr, weight_decay):
    params, grad = _inputs(n, dtype, device)
    with _backend.use_backend(backend):
        got = flat_sgd_step(params, grad, lr, weight_decay)
    expected = reference.flat_sgd_step(params, grad, lr, weight_decay)
    assert got.dtype == dtype and got.shape == (n,) and got.device == params.device
    torch.testing.assert_close(got, expected, **elementwise(dtype))


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", FLAT_SIZES)
def test_backward_matches_reference(backend, device, dtype, n):
    lr, weight_decay = 0.37, 0.05
    params, grad = _inputs(n, dtype, device)
    params.requires_grad_(True)
    grad.requires_grad_(True)
    grad_out = torch.randn(n, dtype=torch.float64).to(dtype=dtype, device=device)
    with _backend.use_backend(backend):
        got = torch.autograd.grad(
            flat_sgd_step(params, grad, lr, weight_decay), (params, grad), grad_out
        )
    expected = reference.flat_sgd_step_backward(grad_out, lr, weight_decay)
    for g, e in zip(got, expected):
        assert g.dtype == dtype
        torch.testing.assert_close(g, e, **elementwise(dtype))


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("n", SMALL_FLAT_SIZES)
def test_gradcheck_and_gradgradcheck_float64(backend, device, n):
    n = min(n, 13)  # finite differences cost 2 evaluations per element
    params, grad = _inputs(n, torch.float64, device)
    inputs = (params.requires_grad_(True), grad.requires_grad_(True))

    def step(p, g):
        with _backend.use_backend(backend):
            return flat_sgd_step(p, g, 0.3, 0.1)

    assert torch.autograd.gradcheck(step, inputs)
    assert torch.autograd.gradgradcheck(step, inputs)


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_third_order_through_backward_function(backend, device):
    # The backward Function's own backward is the forward op: check d/dv of <J^T v, w> is J w.
    params, grad = _inputs(11, torch.float64, device)
    params.requires_grad_(True)
    grad.requires_grad_(True)
    v = torch.randn(11, dtype=torch.float64, device=device, requires_grad=True)
    with _backend.use_backend(backend):
        gp, gg = torch.autograd.grad(
            flat_sgd_step(params, grad, 0.3, 0.1), (params, grad), v, create_graph=True
        )
        w_p, w_g = torch.randn_like(gp), torch.randn_like(gg)
        (dv,) = torch.autograd.grad((gp * w_p).sum() + (gg * w_g).sum(), v)
    torch.testing.assert_close(dv, (1 - 0.3 * 0.1) * w_p - 0.3 * w_g)


def test_input_is_not_modified():
    params, grad = _inputs(1023, torch.float32, "cpu")
    before = params.clone()
    flat_sgd_step(params, grad, 0.5)
    assert torch.equal(params, before)


@pytest.mark.parametrize(
    ("params", "grad", "kwargs", "error", "match"),
    [
        (torch.zeros(4), torch.zeros(5), {}, ValueError, "grad has 5 elements but params has 4"),
        (torch.zeros(4), torch.zeros(4, dtype=torch.float64), {}, TypeError, "grad has dtype"),
        (
            torch.zeros(4, dtype=torch.int32),
            torch.zeros(4, dtype=torch.int32),
            {},
            TypeError,
            "params must be float32",
        ),
        (torch.zeros(2, 2), torch.zeros(2, 2), {}, ValueError, r"params must be a 1-D flat buffer"),
        (torch.zeros(8)[::2], torch.zeros(4), {}, ValueError, "params must be contiguous"),
        (torch.zeros(4), torch.zeros(8)[::2], {}, ValueError, "grad must be contiguous"),
        (torch.zeros(4), [0.0] * 4, {}, TypeError, "grad must be a torch.Tensor"),
        (torch.zeros(4), torch.zeros(4), {"lr": float("nan")}, ValueError, "lr must be finite"),
        (
            torch.zeros(4),
            torch.zeros(4),
            {"lr": torch.tensor(0.1)},
            TypeError,
            "lr must be a real number",
        ),
        (
            torch.zeros(4),
            torch.zeros(4),
            {"weight_decay": -1.0},
            ValueError,
            "weight_decay must be >= 0",
        ),
    ],
)
def test_bad_inputs_raise_naming_the_argument(params, grad, kwargs, error, match):
    kwargs = {"lr": 0.1, **kwargs}
    with pytest.raises(error, match=match):
        flat_sgd_step(params, grad, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a second device")
def test_mismatched_devices_raise():
    with pytest.raises(ValueError, match="grad is on"):
        flat_sgd_step(torch.zeros(4), torch.zeros(4, device="cuda"), 0.1)


@pytest.mark.ext
@pytest.mark.skipif(_backend.extension() is None, reason="compiled extension unavailable")
def test_extension_checks_inputs_itself():
    # The binding validates too, so a caller that bypasses the Python wrapper gets the same words.
    ext = _backend.extension()
    with pytest.raises(ValueError, match="grad has 5 elements but params has 4"):
        ext.flat_sgd_step_forward(torch.zeros(4), torch.zeros(5), 0.1, 0.0)
    with pytest.raises(TypeError, match="grad has dtype"):
        ext.flat_sgd_step_forward(torch.zeros(4), torch.zeros(4, dtype=torch.float64), 0.1, 0.0)
    with pytest.raises(ValueError, match="contiguous"):
        ext.flat_sgd_step_backward(torch.zeros(8)[::2], 0.1, 0.0)


def test_signature_parity_across_backends():
    # The public op and its reference twin take the same arguments, so backends cannot drift.
    public = inspect.signature(flat_sgd_step)
    twin = inspect.signature(reference.flat_sgd_step)
    assert list(public.parameters) == list(twin.parameters)
    assert [p.default for p in public.parameters.values()] == [
        p.default for p in twin.parameters.values()
    ]
    ext = _backend.extension()
    if ext is not None:
        doc = ext.flat_sgd_step_forward.__doc__
        assert "params" in doc and "grad" in doc and "lr" in doc and "weight_decay" in doc
        assert "grad_out" in ext.flat_sgd_step_backward.__doc__


def test_forced_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv(_backend.ENV_BACKEND, "cuda")
    with pytest.raises(_backend.BackendUnavailableError, match="cannot run flat_sgd_step on cpu"):
        flat_sgd_step(torch.zeros(4), torch.zeros(4), 0.1)


def test_unknown_forced_backend_raises(monkeypatch):
    monkeypatch.setenv(_backend.ENV_BACKEND, "tpu")
    with pytest.raises(ValueError, match="not a backend"):
        flat_sgd_step(torch.zeros(4), torch.zeros(4), 0.1)


def test_auto_prefers_compiled_kernels_on_cpu():
    expected = "cpu" if _backend.extension() is not None else "reference"
    assert _backend.resolve_backend("flat_sgd_step", "cpu") == expected


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_out_buffer_and_in_place(backend, device, dtype):
    params, grad = _inputs(1023, dtype, device)
    expected = reference.flat_sgd_step(params, grad, 0.37, 0.05)
    out = torch.empty_like(params)
    with _backend.use_backend(backend):
        got = flat_sgd_step(params, grad, 0.37, 0.05, out=out)
        assert got.data_ptr() == out.data_ptr()
        torch.testing.assert_close(out, expected, **elementwise(dtype))
        in_place = flat_sgd_step(params, grad, 0.37, 0.05, out=params)
    assert in_place.data_ptr() == params.data_ptr()
    torch.testing.assert_close(params, expected, **elementwise(dtype))


def test_out_refused_when_differentiating():
    params = torch.zeros(4, requires_grad=True)
    with pytest.raises(ValueError, match="out= is not differentiable"):
        flat_sgd_step(params, torch.zeros(4), 0.1, out=torch.empty(4))
    with torch.no_grad():
        flat_sgd_step(params, torch.zeros(4), 0.1, out=torch.empty(4))


def test_out_checked_like_params():
    with pytest.raises(ValueError, match="out has 3 elements but params has 4"):
        flat_sgd_step(torch.zeros(4), torch.zeros(4), 0.1, out=torch.empty(3))


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_backward_without_weight_decay_passes_grad_out_through(backend, device):
    # weight_decay == 0: d_params is d_out itself, so the backward writes only d_grad.
    params, grad = _inputs(7, torch.float32, device)
    params.requires_grad_(True)
    grad.requires_grad_(True)
    grad_out = torch.randn(7, device=device)
    with _backend.use_backend(backend):
        d_params, d_grad = torch.autograd.grad(
            flat_sgd_step(params, grad, 0.5), (params, grad), grad_out
        )
    torch.testing.assert_close(d_params, grad_out, rtol=0, atol=0)
    torch.testing.assert_close(d_grad, -0.5 * grad_out, rtol=0, atol=0)


@pytest.mark.triton
@pytest.mark.skipif(
    _triton.mode() != "interpreted",
    reason="emulates compiled argument typing under the interpreter",
)
@pytest.mark.parametrize(("lr", "weight_decay"), HYPER)
def test_float64_hyper_parameters_reach_compiled_kernels_in_float64(lr, weight_decay, monkeypatch):
    # Compiled Triton passed lr and weight_decay as float32: lr = 0.1 became 0.10000000149, a
    # 1.5e-8 relative error in a float64 step (test_flat_optim.CompiledFloatTyping emulates it).
    launched = compiled_float_typing(monkeypatch, ops)
    params, grad = _inputs(1031, torch.float64, "cpu")
    params.requires_grad_(True)
    grad.requires_grad_(True)
    grad_out = torch.randn(1031, dtype=torch.float64)
    with _backend.use_backend("triton"):
        got = flat_sgd_step(params, grad, lr, weight_decay)
        grads = torch.autograd.grad(got, (params, grad), grad_out)
    tolerance = elementwise(torch.float64)
    torch.testing.assert_close(
        got.detach(), reference.flat_sgd_step(params, grad, lr, weight_decay).detach(), **tolerance
    )
    for g, e in zip(grads, reference.flat_sgd_step_backward(grad_out, lr, weight_decay)):
        torch.testing.assert_close(g, e, **tolerance)
    assert {kernel for kernel, _, _ in launched} == {
        "_flat_sgd_step_forward_kernel",
        "_flat_sgd_step_backward_kernel",
    }
    assert all(ty == "fp64" for _, _, ty in launched), sorted(set(launched))
