"""flat_optim: what the flat optimizer ops share (accumulate, signature parity, dispatch, Triton
launches of every update); each optimizer's own tests are in tests/test_flat_momentum.py,
tests/test_flat_adam.py, tests/test_flat_rmsprop.py, tests/test_flat_adagrad.py and
tests/test_flat_adadelta.py, over tests/_flat_optim_cases.py (whose helpers are importable from
here too)."""

import contextlib
import inspect

import pytest
import torch
from _backends import backend_params, device_for
from _flat_optim_cases import (  # noqa: F401 - re-exported for tests/test_cpu_cache.py, test_flat_sgd_step.py
    DTYPES,
    HYPER,
    KERNEL_MODULES,
    UPDATES,
    CompiledFloatTyping,
    _call,
    _inputs,
    _meta,
    _state_names,
    _step,
    compiled_float_typing,
)
from _tolerances import elementwise

from sophon_fast import _backend
from sophon_fast.ops import _triton
from sophon_fast.ops import flat_optim as ops
from sophon_fast.reference import flat_optim as reference


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accumulate(backend, device, dtype):
    grad = torch.randn(65537, dtype=torch.float64).to(dtype=dtype, device=device)
    acc = torch.randn(65537, dtype=ops.state_dtype(dtype), device=device)
    expected = acc + 0.37 * grad.to(acc.dtype)
    with _backend.use_backend(backend):
        got = ops.flat_accumulate_(acc, grad, 0.37)
    assert got.data_ptr() == acc.data_ptr()
    torch.testing.assert_close(acc, expected, **elementwise(acc.dtype))


@pytest.mark.ext
@pytest.mark.skipif(_backend.extension() is None, reason="compiled extension unavailable")
def test_extension_refuses_a_step_on_another_device():
    ext, z = _backend.extension(), _meta()
    with pytest.raises(ValueError, match="step is on cpu but params is on meta"):
        ext.flat_adam_step_forward(z, z, z, z, torch.tensor(0.0), 0.1, 0.9, 0.999, 1e-8, 0.0, False)
    with pytest.raises(ValueError, match="step is on cpu but params is on meta"):
        ext.flat_momentum_step_forward(z, z, z, torch.tensor(0.0), 0.1, 0.9, 0.0, 0.0, False)


F32 = torch.float32


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: ops.flat_accumulate_(torch.zeros(4, dtype=torch.float16), torch.zeros(4, dtype=torch.float16), 1.0),
         TypeError, "acc must be torch.float32 for torch.float16 grad"),
        (lambda: ops.flat_accumulate_(torch.zeros(4), torch.zeros(4), torch.tensor(1.0)),
         TypeError, "weight must be a real number"),
    ],
)  # fmt: skip
def test_bad_inputs_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.ext
@pytest.mark.skipif(_backend.extension() is None, reason="compiled extension unavailable")
def test_extension_checks_inputs_itself():
    ext = _backend.extension()
    z, s = torch.zeros(4), torch.tensor(0.0)
    with pytest.raises(ValueError, match="grad has 5 elements but params has 4"):
        ext.flat_momentum_step_forward(z, torch.zeros(5), z, s, 0.1, 0.9, 0.0, 0.0, False)
    with pytest.raises(TypeError, match="exp_avg must be Double for Double params"):
        ext.flat_adam_step_forward(
            z.double(), z.double(), z, z, s, 0.1, 0.9, 0.999, 1e-8, 0.0, False
        )
    with pytest.raises(ValueError, match="step must be a 0-d tensor"):
        ext.flat_clip_adam_step_(z, z, z, z, torch.zeros(3), 0.1, 0.9, 0.999, 1e-8, 0.0, 1.0)
    with pytest.raises(ValueError, match="needs params"):
        ext.flat_adam_step_backward(z, z, z, None, z, z, z, s, 0.1, 0.9, 0.999, 1e-8, 0.1, False)
    with pytest.raises(ValueError, match="out must hold 3 buffers"):
        ext.flat_adam_step_forward(z, z, z, z, s, 0.1, 0.9, 0.999, 1e-8, 0.0, False, out=[z])


PUBLIC = (
    "flat_momentum_step", "flat_adam_step", "flat_adamw_step", "flat_rmsprop_step",
    "flat_adagrad_step", "flat_adadelta_step", "flat_momentum_step_", "flat_adam_step_",
    "flat_rmsprop_step_", "flat_adagrad_step_", "flat_adadelta_step_", "flat_clip_adam_step_",
    "flat_accumulate_",
)  # fmt: skip


@pytest.mark.parametrize("name", PUBLIC)
def test_signature_parity_with_reference(name):
    public = inspect.signature(getattr(ops, name))
    twin = inspect.signature(getattr(reference, name))
    assert list(public.parameters) == list(twin.parameters)
    assert [p.default for p in public.parameters.values()] == [
        p.default for p in twin.parameters.values()
    ]
    assert [p.kind for p in public.parameters.values()] == [
        p.kind for p in twin.parameters.values()
    ]


@pytest.mark.ext
@pytest.mark.skipif(_backend.extension() is None, reason="compiled extension unavailable")
def test_signature_parity_with_extension():
    # The binding's named arguments follow the public op's, in order (pybind writes them into
    # the docstring), so the backends cannot drift apart.
    ext = _backend.extension()
    for binding, public in (
        ("flat_momentum_step_forward", "flat_momentum_step"),
        ("flat_adam_step_forward", "flat_adam_step"),
        ("flat_rmsprop_step_forward", "flat_rmsprop_step"),
        ("flat_adagrad_step_forward", "flat_adagrad_step"),
        ("flat_adadelta_step_forward", "flat_adadelta_step"),
    ):
        doc = getattr(ext, binding).__doc__.splitlines()[0]
        names = [p for p in inspect.signature(getattr(ops, public)).parameters if p != "betas"]
        positions = [doc.find(f"{p}:") for p in names if f"{p}:" in doc]
        assert len(positions) >= len(names) - 2, (binding, doc)
        assert positions == sorted(positions) or binding == "flat_rmsprop_step_forward"


def test_auto_prefers_compiled_kernels_on_cpu():
    expected = "cpu" if _backend.extension() is not None else "reference"
    for op in (
        "flat_momentum_step", "flat_adam_step", "flat_rmsprop_step", "flat_adagrad_step",
        "flat_adadelta_step", "flat_accumulate_",
    ):  # fmt: skip
        assert _backend.resolve_backend(op, "cpu") == expected


@pytest.mark.triton
@pytest.mark.skipif(
    _triton.mode() != "interpreted",
    reason="emulates compiled argument typing under the interpreter",
)
def test_float64_clip_adam_and_accumulate_keep_float64_arguments_when_compiled(monkeypatch):
    launched = compiled_float_typing(monkeypatch, *KERNEL_MODULES)
    params, grad, (m, v) = _inputs("adam", 9001, torch.float64)
    expected = [t.clone() for t in (params, m, v)]
    step, expected_step = _step(2, torch.float64), _step(2, torch.float64)
    hp = {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.05, "max_norm": 0.3}
    with _backend.use_backend("triton"):
        norm = ops.flat_clip_adam_step_(params, grad, m, v, step, **hp)
        acc = ops.flat_accumulate_(torch.ones_like(grad), grad, 0.37)
    expected_norm = reference.flat_clip_adam_step_(
        *expected[:1], grad, *expected[1:], expected_step, **hp
    )
    rtol, atol = elementwise(torch.float64).values()
    for g, e in zip((params, m, v, norm), (*expected, expected_norm)):
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol)
    torch.testing.assert_close(acc, 1.0 + 0.37 * grad, rtol=rtol, atol=atol)
    assert {k for k, _, _ in launched} == {"_adam_forward_kernel", "_accumulate_kernel"}
    assert all(ty == "fp64" for _, _, ty in launched), sorted(set(launched))


def test_triton_launch_context_is_the_tensors_device():
    # Compiled Triton launches on the current CUDA device, not the tensor's: the wrong GPU on a
    # multi-GPU machine. Every launcher enters _triton.launch_device(t): torch.cuda.device of a
    # CUDA tensor, nothing for a CPU tensor (the interpreter).
    class OnSecondGpu:
        device = torch.device("cuda", 1)

    context = _triton.launch_device(OnSecondGpu())
    assert isinstance(context, torch.cuda.device) and context.idx == 1
    assert isinstance(_triton.launch_device(torch.zeros(1)), contextlib.nullcontext)


@pytest.mark.triton
@pytest.mark.skipif(_triton.mode() is None, reason="triton is not installed")
def test_every_triton_launch_goes_through_launch_device(monkeypatch):
    from sophon_fast.ops import flat_sgd_step as sgd_ops

    devices = []

    def recording(t):
        devices.append(t.device)
        return contextlib.nullcontext()

    monkeypatch.setattr(_triton, "launch_device", recording)
    launched = compiled_float_typing(monkeypatch, *KERNEL_MODULES, sgd_ops)
    device = device_for("triton")
    with _backend.use_backend("triton"):
        for update in UPDATES:
            params, grad, states = _inputs(update, 33, torch.float32, device)
            inputs = [t.requires_grad_(True) for t in (params, grad, *states)]
            outputs = _call(ops, update, *inputs[:2], inputs[2:], _step(2, torch.float32, device))
            torch.autograd.grad(outputs, inputs, [torch.ones_like(o) for o in outputs])
        p, g, (m, v) = _inputs("adam", 33, torch.float32, device)
        ops.flat_clip_adam_step_(p, g, m, v, _step(0, torch.float32, device), 0.1, max_norm=1.0)
        ops.flat_accumulate_(torch.zeros_like(g), g, 0.5)
        p.requires_grad_(True)
        out = sgd_ops.flat_sgd_step(p, g, 0.1, 0.1)
        torch.autograd.grad(out, p, torch.ones_like(out))
    # 21 launches: 8 updates x (forward, backward), norm pass + Adam, accumulate, SGD x 2; the
    # float-typing wrapper saw the 13 kernels with float arguments (the norm pass has none).
    assert len({kernel for kernel, _, _ in launched}) == 13
    assert len(devices) == 21 and set(devices) == {torch.device(device)}
