"""Shared inputs, helpers and test bodies of the flat optimizer tests (tests/test_flat_momentum.py,
tests/test_flat_adam.py, tests/test_flat_rmsprop.py, tests/test_flat_adagrad.py,
tests/test_flat_adadelta.py, tests/test_flat_optim.py).

Each ``check_*`` function is the body of one test that runs for every update; each optimizer's test
file parametrizes it over its own updates (and the backends), so a test id names the optimizer's
file and every optimizer keeps every check.
"""

import inspect

import numpy as np
import pytest
import torch
from _backends import backend_params
from _tolerances import elementwise

from sophon_fast import _backend
from sophon_fast.ops import (
    flat_accumulate,
    flat_adadelta,
    flat_adagrad,
    flat_adam,
    flat_momentum,
    flat_rmsprop,
)
from sophon_fast.ops import flat_optim as ops
from sophon_fast.reference import flat_optim as reference

# The modules holding the flat optimizer Triton kernels (compiled_float_typing wraps them there).
KERNEL_MODULES = (
    flat_momentum,
    flat_adam,
    flat_rmsprop,
    flat_adagrad,
    flat_adadelta,
    flat_accumulate,
)

# Comparisons with the reference twin: the reference itself is the oracle, never compared with
# itself (it was: ~250 cases that could not fail).
FUSED = [p for p in backend_params() if p.values[0] != "reference"]

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
UPDATES = (
    "momentum", "nesterov", "adam", "adamw", "rmsprop", "rmsprop_centered", "adagrad", "adadelta",
)  # fmt: skip
# Hyper-parameters away from the defaults so a dropped term shows: (lr, extra kwargs).
HYPER = {
    "momentum": {"lr": 0.1, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.05},
    "nesterov": {"lr": 0.1, "momentum": 0.8, "weight_decay": 0.05, "nesterov": True},
    "adam": {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.05},
    "adamw": {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.05},
    "rmsprop": {"lr": 0.01, "alpha": 0.9, "eps": 1e-3, "weight_decay": 0.05},
    "rmsprop_centered": {"lr": 0.01, "alpha": 0.9, "eps": 1e-3, "weight_decay": 0.05},
    "adagrad": {"lr": 0.1, "lr_decay": 0.05, "weight_decay": 0.05, "eps": 1e-3},
    "adadelta": {"lr": 0.5, "rho": 0.8, "eps": 1e-3, "weight_decay": 0.05},
}


def _state_names(update):
    if update in ("momentum", "nesterov"):
        return ("momentum_buffer",)
    if update in ("adam", "adamw"):
        return ("exp_avg", "exp_avg_sq")
    if update == "adagrad":
        return ("state_sum",)
    if update == "adadelta":
        return ("square_avg", "acc_delta")
    return ("square_avg", "grad_avg") if update == "rmsprop_centered" else ("square_avg",)


def _inputs(update, n, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    state = ops.state_dtype(dtype)
    params = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    grad = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    states = []
    for name in _state_names(update):
        values = torch.randn(n, generator=gen, dtype=torch.float64)
        if name in ("exp_avg_sq", "square_avg", "state_sum"):
            values = values.square() + 1.0  # a second moment above grad_avg^2 keeps roots real
        elif name == "acc_delta":
            values = values.square()
        elif name == "grad_avg":
            values = 0.1 * values
        states.append(values.to(dtype=state, device=device))
    return params, grad, states


def _call(module, update, params, grad, states, step, **overrides):
    """(new_params, *new_states) of ``update`` through ``module`` (ops or reference)."""
    hp = {**HYPER[update], **overrides}
    if update in ("momentum", "nesterov"):
        return module.flat_momentum_step(params, grad, states[0], step, **hp)
    if update == "adam":
        return module.flat_adam_step(params, grad, *states, step, **hp)
    if update == "adamw":
        return module.flat_adamw_step(params, grad, *states, step, **hp)
    if update == "adagrad":
        return module.flat_adagrad_step(params, grad, states[0], step, **hp)
    if update == "adadelta":
        return module.flat_adadelta_step(params, grad, *states, **hp)
    grad_avg = states[1] if update == "rmsprop_centered" else None
    return module.flat_rmsprop_step(params, grad, states[0], **hp, grad_avg=grad_avg)


def _step(value, dtype, device="cpu"):
    return torch.tensor(float(value), dtype=ops.state_dtype(dtype), device=device)


def _backward_reference(update, grad_outputs, params, grad, states, step, **overrides):
    hp = {**HYPER[update], **overrides}
    if update in ("momentum", "nesterov"):
        return reference.flat_momentum_step_backward(
            *grad_outputs, params, grad, *states, step, **hp
        )
    if update in ("adam", "adamw"):
        return reference.flat_adam_step_backward(
            *grad_outputs, params, grad, *states, step, **hp, decoupled=update == "adamw"
        )
    if update == "adagrad":
        return reference.flat_adagrad_step_backward(
            *grad_outputs, params, grad, *states, step, **hp
        )
    if update == "adadelta":
        return reference.flat_adadelta_step_backward(*grad_outputs, params, grad, *states, **hp)
    grad_avg = states[1] if update == "rmsprop_centered" else None
    return reference.flat_rmsprop_step_backward(
        grad_outputs, params, grad, states[0], **hp, grad_avg=grad_avg
    )


def _denormal_inputs(update, dtype, device):
    """Inputs whose second moment holds denormals (every 4th entry) and zeros (the next), with a
    zero gradient there, so v' = beta * v stays denormal or 0."""
    params, grad, states = _inputs(update, 64, dtype, device)
    denormal = torch.finfo(ops.state_dtype(dtype)).smallest_normal / 8
    v = states[1] if update in ("adam", "adamw") else states[0]
    v[::4], v[1::4] = denormal, 0.0
    grad[::4], grad[1::4] = 0.0, 0.0
    if update == "rmsprop_centered":
        states[1][::4], states[1][1::4] = 0.0, 0.0
    return params, grad, states


def _denormal_backward(backend, update, params, grad, states, step):
    inputs = [t.detach().clone().requires_grad_(True) for t in (params, grad, *states)]
    gen = torch.Generator().manual_seed(5)
    with _backend.use_backend(backend):
        outputs = _call(ops, update, *inputs[:2], inputs[2:], step, weight_decay=0.0)
        grad_outputs = [
            torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in outputs
        ]
        got = torch.autograd.grad(outputs, inputs, grad_outputs)
    expected = _backward_reference(
        update, grad_outputs, params, grad, states, step, weight_decay=0.0
    )
    return got, expected


def _flush_to_zero_sqrt(x):
    # sqrt.approx.ftz.f32, what compiled Triton makes of a float32 tl.sqrt (PTX of the kernels
    # for sm_80/sm_90): a denormal input is read as 0.
    if x.dtype == np.float32:
        x = np.where(np.abs(x) < np.finfo(np.float32).tiny, np.float32(0), x)
    return np.sqrt(x)


def _saved_tensors(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def _torch_optimizer(update, param):
    hp = dict(HYPER[update])
    lr = hp.pop("lr")
    if update in ("momentum", "nesterov"):
        return torch.optim.SGD([param], lr=lr, **hp)
    if update == "adam":
        return torch.optim.Adam([param], lr=lr, **hp)
    if update == "adamw":
        return torch.optim.AdamW([param], lr=lr, **hp)
    if update == "adagrad":
        return torch.optim.Adagrad([param], lr=lr, **hp)
    if update == "adadelta":
        return torch.optim.Adadelta([param], lr=lr, **hp)
    return torch.optim.RMSprop([param], lr=lr, centered=update == "rmsprop_centered", **hp)


def _zero_state(update, params):
    state = ops.state_dtype(params.dtype)
    return [
        torch.zeros(params.shape, dtype=state, device=params.device) for _ in _state_names(update)
    ]


def _meta(n=4):
    return torch.zeros(n, device="meta")


def _isa_outputs(update, params, grad, states, step, out, monkeypatch, portable):
    if portable:
        monkeypatch.setenv("SOPHON_FAST_NO_AVX2", "1")
    else:
        monkeypatch.delenv("SOPHON_FAST_NO_AVX2", raising=False)
    with _backend.use_backend("cpu"):
        if out is None:
            return _call(ops, update, params, grad, states, step)
        _call(ops, update, params, grad, states, step, out=out)
        return tuple(o.clone() for o in out)


class CompiledFloatTyping:
    """A Triton kernel whose launches pass each float argument as compiled Triton types it.

    Under the interpreter a Python float reaches the kernel as a double. Compiled, the launcher
    converts it to the parameter's declared type (``lr: tl.float64``) or, undeclared, to what
    Triton's ``mangle_type`` gives a Python float: fp32. Rounding the arguments the same way
    here shows on the CPU what a GPU computes. ``launched`` collects (kernel, argument, type).
    """

    def __init__(self, kernel, launched):
        from triton.runtime.jit import KernelParam, mangle_type

        self.kernel, self.launched, self.mangle_type = kernel, launched, mangle_type
        self.signature = inspect.signature(kernel.fn)
        self.declared = {
            param.name: KernelParam(i, param, False, False).annotation_type
            for i, param in enumerate(self.signature.parameters.values())
            if not KernelParam(i, param, False, False).is_constexpr
        }

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
            bound = self.signature.bind(*args, **kwargs)
            for name, value in bound.arguments.items():
                if name in self.declared and isinstance(value, float):
                    ty = self.declared[name] or self.mangle_type(value)
                    self.launched.append((self.kernel.fn.__name__, name, ty))
                    if ty == "fp32":
                        bound.arguments[name] = float(torch.tensor(value, dtype=torch.float32))
            return self.kernel[grid](*bound.args, **bound.kwargs, **options)

        return launch


def compiled_float_typing(monkeypatch, *modules):
    """Launch every Triton kernel of ``modules`` through CompiledFloatTyping; returns the list
    of (kernel, argument, type) it fills."""
    launched = []
    for module in modules:
        for name, kernel in list(vars(module).items()):
            if name.endswith("_kernel") and hasattr(kernel, "fn"):
                monkeypatch.setattr(module, name, CompiledFloatTyping(kernel, launched))
    return launched


def check_forward_matches_reference(backend, device, dtype, n, update):
    params, grad, states = _inputs(update, n, dtype, device)
    step = _step(3, dtype, device)
    with _backend.use_backend(backend):
        got = _call(ops, update, params, grad, states, step)
    expected = _call(reference, update, params, grad, states, step)
    assert len(got) == len(expected) == 1 + len(states)
    assert got[0].dtype == dtype and got[0].shape == (n,)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype
        # each output at its own dtype's tolerance: fp16/bf16 parameters keep fp32 states, which
        # must match to fp32 rounding (0.1x the fp32 row measured), not to the storage dtype's
        torch.testing.assert_close(g, e, **elementwise(g.dtype))


def check_fused_backward_matches_reference(backend, device, dtype, n, update):
    params, grad, states = _inputs(update, n, dtype, device)
    inputs = [t.requires_grad_(True) for t in (params, grad, *states)]
    step = _step(2, dtype, device)
    gen = torch.Generator().manual_seed(1)
    with _backend.use_backend(backend):
        outputs = _call(ops, update, *inputs[:2], inputs[2:], step)
        grad_outputs = [
            torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outputs
        ]
        got = torch.autograd.grad(outputs, inputs, grad_outputs)
    expected = _backward_reference(update, grad_outputs, params, grad, states, step)
    for g, e, x in zip(got, expected, inputs):
        assert g.dtype == x.dtype
        rtol, atol = elementwise(x.dtype).values()
        # The VJP chains ~10 roundings of the compute dtype (1 / denom^2, products of moments):
        # measured at most 0.93x the table (Triton, bf16 gradients: one bf16 rounding apart),
        # 0.17x for fp32, 2e-4x for fp64; 2x leaves room for another compiler's contractions.
        torch.testing.assert_close(g, e, rtol=2 * rtol, atol=2 * atol)


def check_gradcheck_float64(backend, device, update, first, weight_decay):
    params, grad, states = _inputs(update, 5, torch.float64, device)
    inputs = tuple(t.requires_grad_(True) for t in (params, grad, *states))
    step = _step(0 if first else 2, torch.float64, device)

    def fn(p, g, *s):
        with _backend.use_backend(backend):
            return _call(ops, update, p, g, list(s), step, weight_decay=weight_decay)

    assert torch.autograd.gradcheck(fn, inputs)


def check_denormal_second_moments_give_the_reference_gradients(backend, device, dtype, update):
    # The zero-safe root at denormal and zero radicands: every backend gives the reference's
    # finite VJP (1 / (2 sqrt(v)) is large but finite at a denormal v, 0 at v = 0).
    params, grad, states = _denormal_inputs(update, dtype, device)
    got, expected = _denormal_backward(
        backend, update, params, grad, states, _step(2, dtype, device)
    )
    rtol, atol = elementwise(dtype).values()
    for g, e in zip(got, expected):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, e, rtol=8 * rtol, atol=8 * atol)


def check_triton_backward_does_not_depend_on_a_flushing_sqrt(update, monkeypatch):
    # Compiled, a float32 tl.sqrt flushes a denormal radicand to a 0 root while v > 0 still
    # holds: the backward divided by it (inf). With the interpreter's tl.sqrt flushing as the
    # GPU does, the kernels still give the reference's finite gradients.
    from triton.runtime import interpreter

    monkeypatch.setattr(
        interpreter.InterpreterBuilder,
        "create_sqrt",
        lambda self, arg: self.unary_op(arg, _flush_to_zero_sqrt),
    )
    params, grad, states = _denormal_inputs(update, torch.float32, "cpu")
    got, expected = _denormal_backward(
        "triton", update, params, grad, states, _step(2, torch.float32)
    )
    for g, e in zip(got, expected):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, e, rtol=8e-6, atol=8e-6)


def check_trajectory_matches_torch_optim(backend, device, dtype, update, in_place):
    steps = 8
    n = 1031
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    grads = [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for _ in range(steps)]
    torch_param = start.clone().requires_grad_(True)
    optimizer = _torch_optimizer(update, torch_param)
    for g in grads:
        torch_param.grad = g.clone()
        optimizer.step()
    # Inputs on the backend's device (the grads too: a forced GPU backend refuses CPU tensors).
    params = start.to(device)
    states, step = _zero_state(update, params), _step(0, dtype, device)
    hp = dict(HYPER[update])
    with _backend.use_backend(backend):
        for g in (g.to(device) for g in grads):
            if not in_place:
                params, *states = _call(ops, update, params, g, states, step)
                step = step + 1
            elif update in ("momentum", "nesterov"):
                ops.flat_momentum_step_(params, g, states[0], step, **hp)
            elif update in ("adam", "adamw"):
                ops.flat_adam_step_(params, g, *states, step, **hp, decoupled=update == "adamw")
            elif update == "adagrad":
                ops.flat_adagrad_step_(params, g, states[0], step, **hp)
            elif update == "adadelta":
                ops.flat_adadelta_step_(params, g, *states, **hp)
                step.add_(1)
            else:
                grad_avg = states[1] if update == "rmsprop_centered" else None
                ops.flat_rmsprop_step_(params, g, states[0], **hp, grad_avg=grad_avg)
                step.add_(1)
    assert step.item() == steps
    # Deltas from the start, tolerance scaled by the number of steps (docs/DESIGN.md, section 5).
    rtol, atol = elementwise(dtype).values()
    torch.testing.assert_close(
        params.cpu() - start, torch_param.detach() - start, rtol=steps * rtol, atol=steps * atol
    )


def check_out_buffers(backend, device, update):
    params, grad, states = _inputs(update, 1023, torch.float32, device)
    step = _step(2, torch.float32, device)
    expected = _call(reference, update, params, grad, states, step)
    out = tuple(torch.empty_like(t) for t in expected)
    with _backend.use_backend(backend):
        got = _call(ops, update, params, grad, states, step, out=out)
    for g, o, e in zip(got, out, expected):
        assert g.data_ptr() == o.data_ptr()
        torch.testing.assert_close(o, e, **elementwise(torch.float32))


def check_step_on_another_device_than_params_is_refused(update):
    # A host step with device params would be copied, with a host synchronisation, on every
    # call (and cannot be captured in a CUDA graph). meta params stand in for a GPU here.
    params = _meta()
    states = [_meta() for _ in _state_names(update)]
    with pytest.raises(ValueError, match="step is on cpu but params is on meta; keep the count"):
        _call(ops, update, params, _meta(), states, torch.tensor(0.0))


def check_gradgradcheck_float64(backend, device, update):
    # Differentiating the backward (create_graph) switches to the reference VJP on the same
    # saved tensors: still exact to second order.
    params, grad, states = _inputs(update, 4, torch.float64, device)
    inputs = tuple(t.requires_grad_(True) for t in (params, grad, *states))
    step = _step(2, torch.float64, device)

    def fn(p, g, *s):
        with _backend.use_backend(backend):
            return _call(ops, update, p, g, list(s), step)

    assert torch.autograd.gradgradcheck(fn, inputs)


def check_large_out_buffers_take_the_streaming_store_path(update):
    # From 1 M elements the C++ kernels write reused out= buffers with non-temporal stores.
    params, grad, states = _inputs(update, (1 << 20) + 3, torch.float32)
    step = _step(2, torch.float32)
    expected = _call(reference, update, params, grad, states, step)
    out = tuple(torch.empty_like(t) for t in expected)
    with _backend.use_backend("cpu"):
        _call(ops, update, params, grad, states, step, out=out)
    for o, e in zip(out, expected):
        torch.testing.assert_close(o, e, **elementwise(torch.float32))


def check_packed_forwards_give_the_same_bits_in_both_isa_builds(
    update, dtype, n, first, monkeypatch
):
    """The float/double forwards run the shared maths on SSE2 or AVX2 packs with scalar heads and
    tails; every lane must round as the scalar code does, so both builds agree bit for bit (and
    match the reference, checked by the tests above). Zero second moments exercise the roots at 0,
    NaN gradients the NaN-to-zero rule."""
    params, grad, states = _inputs(update, n, dtype)
    grad[::5] = float("nan")
    if update in ("adam", "adamw"):
        states[1][::3] = 0.0
        grad[1::3] = 0.0
    step = _step(0 if first else 4, dtype)
    wide = _isa_outputs(update, params, grad, states, step, None, monkeypatch, portable=False)
    narrow = _isa_outputs(update, params, grad, states, step, None, monkeypatch, portable=True)
    for w, s in zip(wide, narrow):
        assert torch.equal(w.view(torch.int8), s.view(torch.int8))


def check_streamed_out_buffers_at_odd_offsets(update, offsets, portable, monkeypatch):
    """From 1 M elements out= buffers are written with non-temporal stores once every output is
    vector-aligned: views that share an offset stream after a scalar head, views that cannot be
    aligned together take plain stores. Both give the reference's values."""
    n = (1 << 20) + 5
    params, grad, states = _inputs(update, n, torch.float32)
    step = _step(2, torch.float32)
    expected = _call(reference, update, params, grad, states, step)
    out = tuple(torch.empty(n + 8)[k : k + n] for k in offsets[: len(expected)])
    got = _isa_outputs(update, params, grad, states, step, out, monkeypatch, portable)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **elementwise(torch.float32))


def check_packed_backwards_give_the_same_bits_in_both_isa_builds(
    update, dtype, n, weight_decay, monkeypatch
):
    """The fused Adam, RMSprop, Adagrad and Adadelta backwards run packed too (masks for the
    zero-safe root as 1/0 lanes): both ISA builds give identical gradients, second moments at
    exactly 0 included."""
    params, grad, states = _inputs(update, n, dtype)
    if update in ("adam", "adamw", "rmsprop", "rmsprop_centered", "adagrad", "adadelta"):
        states[-1 if update in ("adam", "adamw") else 0][::3] = 0.0
        grad[::3] = 0.0
    step = _step(2, dtype)
    gen = torch.Generator().manual_seed(3)
    grads = {}
    for portable in (False, True):
        if portable:
            monkeypatch.setenv("SOPHON_FAST_NO_AVX2", "1")
        else:
            monkeypatch.delenv("SOPHON_FAST_NO_AVX2", raising=False)
        inputs = [t.detach().clone().requires_grad_(True) for t in (params, grad, *states)]
        with _backend.use_backend("cpu"):
            outputs = _call(ops, update, *inputs[:2], inputs[2:], step, weight_decay=weight_decay)
            grad_outputs = [
                torch.randn(o.shape, generator=gen.manual_seed(3), dtype=dtype) for o in outputs
            ]
            grads[portable] = torch.autograd.grad(outputs, inputs, grad_outputs)
    for wide, narrow in zip(grads[False], grads[True]):
        assert torch.isfinite(wide).all()
        assert torch.equal(wide.view(torch.int8), narrow.view(torch.int8))


def check_float64_hyper_parameters_reach_compiled_kernels_in_float64(update, monkeypatch):
    # Compiled Triton passed lr, betas, eps, ... as float32: lr = 0.1 became 0.10000000149, a
    # 1.5e-8 relative error in a float64 step, 1e4 times the float64 tolerance.
    launched = compiled_float_typing(monkeypatch, *KERNEL_MODULES)
    params, grad, states = _inputs(update, 1031, torch.float64)
    inputs = [t.detach().clone().requires_grad_(True) for t in (params, grad, *states)]
    step = _step(2, torch.float64)
    gen = torch.Generator().manual_seed(6)
    with _backend.use_backend("triton"):
        outputs = _call(ops, update, *inputs[:2], inputs[2:], step)
        grad_outputs = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outputs]
        grads = torch.autograd.grad(outputs, inputs, grad_outputs)
    rtol, atol = elementwise(torch.float64).values()
    for g, e in zip(outputs, _call(reference, update, params, grad, states, step)):
        torch.testing.assert_close(g.detach(), e, rtol=rtol, atol=atol)
    expected = _backward_reference(update, grad_outputs, params, grad, states, step)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=8 * rtol, atol=8 * atol)
    kernels = {kernel for kernel, _, _ in launched}
    assert any(k.endswith("_forward_kernel") for k in kernels), kernels
    assert any(k.endswith("_backward_kernel") for k in kernels), kernels
    assert all(ty == "fp64" for _, _, ty in launched), sorted(set(launched))


def check_in_place_forms_move_a_host_step_to_the_params_device_once(form):
    # torch.optim keeps the count on the CPU unless fused/capturable: the in-place forms (which
    # own their state) move it to the params' device once, in place; later calls find it there.
    # Without a GPU, meta params: a CPU tensor cannot become a meta one in place, and the forms
    # say so instead of copying the step on every call.
    device = "cuda" if torch.cuda.is_available() else "meta"
    params, grad, m, v = (torch.zeros(4, device=device) for _ in range(4))
    step = torch.tensor(3.0)

    def call():
        if form == "momentum":
            ops.flat_momentum_step_(params, grad, m, step, 0.1)
        elif form == "adam":
            ops.flat_adam_step_(params, grad, m, v, step, 0.1)
        elif form == "adagrad":
            ops.flat_adagrad_step_(params, grad, v, step, 0.1)
        else:
            ops.flat_clip_adam_step_(params, grad, m, v, step, 0.1, max_norm=1.0)

    if device == "meta":
        with pytest.raises(ValueError, match="step is on cpu but params is on meta, and it cannot"):
            call()
        return
    for _ in range(2):
        call()
        assert step.device == params.device
    assert step.item() == 5


def check_saves_only_what_the_backward_recomputes_from(update, weight_decay, expected):
    params, grad, states = _inputs(update, 64, torch.float32)
    inputs = [t.requires_grad_(True) for t in (params, grad, *states)]
    step = _step(2, torch.float32)
    with _backend.use_backend("cpu"):
        saved = _saved_tensors(
            lambda: _call(
                ops, update, inputs[0], inputs[1], inputs[2:], step, weight_decay=weight_decay
            )
        )
    assert len(saved) == expected
