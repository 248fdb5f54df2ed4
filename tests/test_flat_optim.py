"""flat_optim: every update x backend against the reference, fused backwards, float64 gradcheck,
N-step trajectories against torch.optim, saved tensors, in-place forms and input validation."""

import contextlib
import inspect
import math

import numpy as np
import pytest
import torch
from _backends import backend_params, device_for
from _shapes import FLAT_SIZES
from _tolerances import elementwise

from sophon_fast import _backend
from sophon_fast.ops import _triton
from sophon_fast.ops import flat_optim as ops
from sophon_fast.reference import flat_optim as reference

# Comparisons with the reference twin: the reference itself is the oracle, never compared with
# itself (it was: ~250 cases that could not fail).
FUSED = [p for p in backend_params() if p.values[0] != "reference"]

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
UPDATES = ("momentum", "nesterov", "adam", "adamw", "rmsprop", "rmsprop_centered")
# Hyper-parameters away from the defaults so a dropped term shows: (lr, extra kwargs).
HYPER = {
    "momentum": {"lr": 0.1, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.05},
    "nesterov": {"lr": 0.1, "momentum": 0.8, "weight_decay": 0.05, "nesterov": True},
    "adam": {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.05},
    "adamw": {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.05},
    "rmsprop": {"lr": 0.01, "alpha": 0.9, "eps": 1e-3, "weight_decay": 0.05},
    "rmsprop_centered": {"lr": 0.01, "alpha": 0.9, "eps": 1e-3, "weight_decay": 0.05},
}


def _state_names(update):
    if update in ("momentum", "nesterov"):
        return ("momentum_buffer",)
    if update in ("adam", "adamw"):
        return ("exp_avg", "exp_avg_sq")
    return ("square_avg", "grad_avg") if update == "rmsprop_centered" else ("square_avg",)


def _inputs(update, n, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    state = ops.state_dtype(dtype)
    params = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    grad = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    states = []
    for name in _state_names(update):
        values = torch.randn(n, generator=gen, dtype=torch.float64)
        if name in ("exp_avg_sq", "square_avg"):
            values = values.square() + 1.0  # a second moment above grad_avg^2 keeps roots real
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
    grad_avg = states[1] if update == "rmsprop_centered" else None
    return module.flat_rmsprop_step(params, grad, states[0], **hp, grad_avg=grad_avg)


def _step(value, dtype, device="cpu"):
    return torch.tensor(float(value), dtype=ops.state_dtype(dtype), device=device)


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", FLAT_SIZES)
@pytest.mark.parametrize("update", UPDATES)
def test_forward_matches_reference(backend, device, dtype, n, update):
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


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("update", ("momentum", "nesterov"))
def test_momentum_first_step_takes_the_gradient_as_buffer(backend, device, update):
    params, grad, states = _inputs(update, 1023, torch.float32, device)
    step = _step(0, torch.float32, device)
    with _backend.use_backend(backend):
        got = _call(ops, update, params, grad, states, step)
    torch.testing.assert_close(got[1], grad + 0.05 * params, rtol=1e-6, atol=1e-6)
    for g, e in zip(got, _call(reference, update, params, grad, states, step)):
        torch.testing.assert_close(g, e, **elementwise(torch.float32))


def _backward_reference(update, grad_outputs, params, grad, states, step):
    hp = dict(HYPER[update])
    if update in ("momentum", "nesterov"):
        return reference.flat_momentum_step_backward(
            *grad_outputs, params, grad, *states, step, **hp
        )
    if update in ("adam", "adamw"):
        return reference.flat_adam_step_backward(
            *grad_outputs, params, grad, *states, step, **hp, decoupled=update == "adamw"
        )
    grad_avg = states[1] if update == "rmsprop_centered" else None
    return reference.flat_rmsprop_step_backward(
        grad_outputs, params, grad, states[0], **hp, grad_avg=grad_avg
    )


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("n", (7, 1023))
@pytest.mark.parametrize("update", UPDATES)
def test_fused_backward_matches_reference(backend, device, dtype, n, update):
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


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("first", (True, False), ids=("step0", "step2"))
@pytest.mark.parametrize("weight_decay", (0.0, 0.05))
def test_gradcheck_float64(backend, device, update, first, weight_decay):
    params, grad, states = _inputs(update, 5, torch.float64, device)
    inputs = tuple(t.requires_grad_(True) for t in (params, grad, *states))
    step = _step(0 if first else 2, torch.float64, device)

    def fn(p, g, *s):
        with _backend.use_backend(backend):
            return _call(ops, update, p, g, list(s), step, weight_decay=weight_decay)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_zero_second_moment_gives_finite_gradients(backend, device):
    # A gradient entry that is exactly 0 (a dead ReLU) leaves v' = 0: the zero-safe root must
    # give a 0 derivative there, not inf * 0 = NaN in the meta-gradient.
    zeros = torch.zeros(4, dtype=torch.float64, device=device)
    inputs = [zeros.clone().requires_grad_(True) for _ in range(4)]
    with _backend.use_backend(backend):
        out = ops.flat_adam_step(*inputs, _step(0, torch.float64, device), 0.1)
        grads = torch.autograd.grad(out[0].sum(), inputs)
    assert all(torch.isfinite(g).all() for g in grads)


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
    hp = {**HYPER[update], "weight_decay": 0.0}
    if update in ("adam", "adamw"):
        expected = reference.flat_adam_step_backward(
            *grad_outputs, params, grad, *states, step, **hp, decoupled=update == "adamw"
        )
    else:
        grad_avg = states[1] if update == "rmsprop_centered" else None
        expected = reference.flat_rmsprop_step_backward(
            grad_outputs, params, grad, states[0], **hp, grad_avg=grad_avg
        )
    return got, expected


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("update", ("adam", "adamw", "rmsprop", "rmsprop_centered"))
def test_denormal_second_moments_give_the_reference_gradients(backend, device, dtype, update):
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


def _flush_to_zero_sqrt(x):
    # sqrt.approx.ftz.f32, what compiled Triton makes of a float32 tl.sqrt (PTX of the kernels
    # for sm_80/sm_90): a denormal input is read as 0.
    if x.dtype == np.float32:
        x = np.where(np.abs(x) < np.finfo(np.float32).tiny, np.float32(0), x)
    return np.sqrt(x)


@pytest.mark.triton
@pytest.mark.skipif(
    _triton.mode() != "interpreted", reason="emulates a GPU instruction under the interpreter"
)
@pytest.mark.parametrize("update", ("adam", "adamw", "rmsprop", "rmsprop_centered"))
def test_triton_backward_does_not_depend_on_a_flushing_sqrt(update, monkeypatch):
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


def _saved_tensors(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


@pytest.mark.ext
@pytest.mark.skipif(_backend.extension() is None, reason="compiled extension unavailable")
@pytest.mark.parametrize(
    ("update", "weight_decay", "expected"),
    [
        ("momentum", 0.05, 1),  # step only: the update is linear
        ("adam", 0.0, 4),  # grad, exp_avg, exp_avg_sq, step
        ("adam", 0.05, 5),  # + params: L2 decay puts params into d
        ("adamw", 0.05, 4),  # decoupled decay: params not needed
        ("rmsprop", 0.0, 2),  # grad, square_avg
        ("rmsprop_centered", 0.05, 4),  # + grad_avg, params
    ],
)
def test_saves_only_what_the_backward_recomputes_from(update, weight_decay, expected):
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


def _torch_optimizer(update, param):
    hp = dict(HYPER[update])
    lr = hp.pop("lr")
    if update in ("momentum", "nesterov"):
        return torch.optim.SGD([param], lr=lr, **hp)
    if update == "adam":
        return torch.optim.Adam([param], lr=lr, **hp)
    if update == "adamw":
        return torch.optim.AdamW([param], lr=lr, **hp)
    return torch.optim.RMSprop([param], lr=lr, centered=update == "rmsprop_centered", **hp)


def _zero_state(update, params):
    state = ops.state_dtype(params.dtype)
    return [
        torch.zeros(params.shape, dtype=state, device=params.device) for _ in _state_names(update)
    ]


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("in_place", (False, True), ids=("out_of_place", "in_place"))
def test_trajectory_matches_torch_optim(backend, device, dtype, update, in_place):
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


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
@pytest.mark.parametrize("max_norm", (None, 0.5, 1e6))
def test_clip_adam_matches_clip_grad_norm_and_torch_adam(backend, device, dtype, max_norm):
    steps, n = 5, 9001  # 9001: three blocks of the Triton norm pass, one partial
    gen = torch.Generator().manual_seed(4)
    start = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    grads = [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for _ in range(steps)]
    torch_param = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([torch_param], lr=0.01, weight_decay=0.01)
    expected_norms = []
    for g in grads:
        torch_param.grad = g.clone()
        if max_norm is not None:
            expected_norms.append(torch.nn.utils.clip_grad_norm_([torch_param], max_norm))
        optimizer.step()
    params = start.to(device)
    (m, v), step = _zero_state("adam", params), _step(0, dtype, device)
    with _backend.use_backend(backend):
        norms = [
            ops.flat_clip_adam_step_(
                params, g.to(device), m, v, step, 0.01, weight_decay=0.01, max_norm=max_norm
            )
            for g in grads
        ]
    assert step.item() == steps
    rtol, atol = elementwise(dtype).values()
    torch.testing.assert_close(
        params.cpu() - start, torch_param.detach() - start, rtol=steps * rtol, atol=steps * atol
    )
    for got, expected in zip(norms, expected_norms):
        torch.testing.assert_close(got.to(dtype).cpu(), expected, rtol=10 * rtol, atol=0)


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


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("update", UPDATES)
def test_out_buffers(backend, device, update):
    params, grad, states = _inputs(update, 1023, torch.float32, device)
    step = _step(2, torch.float32, device)
    expected = _call(reference, update, params, grad, states, step)
    out = tuple(torch.empty_like(t) for t in expected)
    with _backend.use_backend(backend):
        got = _call(ops, update, params, grad, states, step, out=out)
    for g, o, e in zip(got, out, expected):
        assert g.data_ptr() == o.data_ptr()
        torch.testing.assert_close(o, e, **elementwise(torch.float32))


def test_out_refused_when_differentiating():
    params, grad, states = _inputs("adam", 4, torch.float32)
    params.requires_grad_(True)
    out = tuple(torch.empty(4) for _ in range(3))
    with pytest.raises(ValueError, match="out= is not differentiable"):
        _call(ops, "adam", params, grad, states, _step(0, torch.float32), out=out)


def test_in_place_step_is_not_read_on_the_host():
    # The in-place forms advance step with a tensor op: the count stays a tensor, as a CUDA
    # graph needs it.
    params, grad, (m, v) = _inputs("adam", 7, torch.float32)
    step = _step(0, torch.float32)
    ops.flat_adam_step_(params, grad, m, v, step, 0.1)
    ops.flat_clip_adam_step_(params, grad, m, v, step, 0.1, max_norm=1.0)
    assert isinstance(step, torch.Tensor) and step.item() == 2


def _meta(n=4):
    return torch.zeros(n, device="meta")


@pytest.mark.parametrize("update", ("momentum", "adam", "adamw"))
def test_step_on_another_device_than_params_is_refused(update):
    # A host step with device params would be copied, with a host synchronisation, on every
    # call (and cannot be captured in a CUDA graph). meta params stand in for a GPU here.
    params = _meta()
    states = [_meta() for _ in _state_names(update)]
    with pytest.raises(ValueError, match="step is on cpu but params is on meta; keep the count"):
        _call(ops, update, params, _meta(), states, torch.tensor(0.0))


@pytest.mark.parametrize("form", ("momentum", "adam", "clip_adam"))
def test_in_place_forms_move_a_host_step_to_the_params_device_once(form):
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
        (lambda: ops.flat_momentum_step(torch.zeros(4), torch.zeros(5), torch.zeros(4), torch.tensor(0.0), 0.1),
         ValueError, "grad has 5 elements but params has 4"),
        (lambda: ops.flat_momentum_step(torch.zeros(4), torch.zeros(4), torch.zeros(4, dtype=torch.float16), torch.tensor(0.0), 0.1),
         TypeError, "momentum_buffer must be torch.float32"),
        (lambda: ops.flat_momentum_step(torch.zeros(4), torch.zeros(4), torch.zeros(3), torch.tensor(0.0), 0.1),
         ValueError, "momentum_buffer has 3 elements"),
        (lambda: ops.flat_momentum_step(torch.zeros(4), torch.zeros(4), torch.zeros(4), 0, 0.1),
         TypeError, "step must be a 0-d torch.Tensor"),
        (lambda: ops.flat_momentum_step(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(2), 0.1),
         ValueError, "step must be a 0-d tensor"),
        (lambda: ops.flat_momentum_step(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.tensor(0), 0.1),
         TypeError, "step must be a floating tensor"),
        (lambda: ops.flat_momentum_step(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.tensor(0.0), 0.1, momentum=-1.0),
         ValueError, "momentum must be >= 0"),
        (lambda: ops.flat_adam_step(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.tensor(0.0), 0.1, betas=(0.9, 1.0)),
         ValueError, r"betas\[1\] must be in \[0, 1\)"),
        (lambda: ops.flat_adam_step(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.tensor(0.0), float("inf")),
         ValueError, "lr must be finite"),
        (lambda: ops.flat_adam_step(torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), torch.zeros(4), torch.zeros(4), torch.tensor(0.0), 0.1),
         TypeError, "exp_avg must be torch.float64"),
        (lambda: ops.flat_adamw_step(torch.zeros(8)[::2], torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.tensor(0.0), 0.1),
         ValueError, "params must be contiguous"),
        (lambda: ops.flat_rmsprop_step(torch.zeros(4), torch.zeros(4), torch.zeros(4), 0.1, alpha=1.5),
         ValueError, r"alpha must be in \[0, 1\)"),
        (lambda: ops.flat_rmsprop_step(torch.zeros(4), torch.zeros(4), torch.zeros(4), 0.1, grad_avg=torch.zeros(2, 2)),
         ValueError, "grad_avg must be a 1-D flat buffer"),
        (lambda: ops.flat_clip_adam_step_(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.tensor(0.0), 0.1, max_norm=-1.0),
         ValueError, "max_norm must be >= 0"),
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
    "flat_momentum_step_", "flat_adam_step_", "flat_rmsprop_step_", "flat_clip_adam_step_",
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
    ):
        doc = getattr(ext, binding).__doc__.splitlines()[0]
        names = [p for p in inspect.signature(getattr(ops, public)).parameters if p != "betas"]
        positions = [doc.find(f"{p}:") for p in names if f"{p}:" in doc]
        assert len(positions) >= len(names) - 2, (binding, doc)
        assert positions == sorted(positions) or binding == "flat_rmsprop_step_forward"


def test_auto_prefers_compiled_kernels_on_cpu():
    expected = "cpu" if _backend.extension() is not None else "reference"
    for op in ("flat_momentum_step", "flat_adam_step", "flat_rmsprop_step", "flat_accumulate_"):
        assert _backend.resolve(op, "cpu") == expected


def test_bias_correction_is_exact_in_float32():
    # 1 - 0.999^t rounded in float32 would lose 1e-5 of its value; the reference (and every
    # kernel) computes it in float64 like torch.optim.
    step_size, root = reference.adam_bias_corrections(
        torch.tensor(0.0), 1.0, (0.9, 0.999), torch.float32, "cpu"
    )
    assert math.isclose(step_size.item(), 10.0, rel_tol=1e-7)
    assert math.isclose(root.item(), math.sqrt(1e-3), rel_tol=1e-7)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("update", UPDATES)
def test_gradgradcheck_float64(backend, device, update):
    # Differentiating the backward (create_graph) switches to the reference VJP on the same
    # saved tensors: still exact to second order.
    params, grad, states = _inputs(update, 4, torch.float64, device)
    inputs = tuple(t.requires_grad_(True) for t in (params, grad, *states))
    step = _step(2, torch.float64, device)

    def fn(p, g, *s):
        with _backend.use_backend(backend):
            return _call(ops, update, p, g, list(s), step)

    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.ext
@pytest.mark.skipif(_backend.extension() is None, reason="compiled extension unavailable")
@pytest.mark.parametrize("update", ("adamw", "rmsprop_centered"))
def test_large_out_buffers_take_the_streaming_store_path(update):
    # From 1 M elements the C++ kernels write reused out= buffers with non-temporal stores.
    params, grad, states = _inputs(update, (1 << 20) + 3, torch.float32)
    step = _step(2, torch.float32)
    expected = _call(reference, update, params, grad, states, step)
    out = tuple(torch.empty_like(t) for t in expected)
    with _backend.use_backend("cpu"):
        _call(ops, update, params, grad, states, step, out=out)
    for o, e in zip(out, expected):
        torch.testing.assert_close(o, e, **elementwise(torch.float32))


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


@pytest.mark.ext
@pytest.mark.skipif(_backend.extension() is None, reason="compiled extension unavailable")
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("n", (1, 7, 37, 1027))
@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("first", (False, True))
def test_packed_forwards_give_the_same_bits_in_both_isa_builds(
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


@pytest.mark.ext
@pytest.mark.skipif(_backend.extension() is None, reason="compiled extension unavailable")
@pytest.mark.parametrize("offsets", ((1, 1, 1), (3, 0, 5)), ids=("aligned-together", "misaligned"))
@pytest.mark.parametrize("update", ("momentum", "adam", "rmsprop_centered"))
@pytest.mark.parametrize("portable", (False, True), ids=("avx2", "baseline"))
def test_streamed_out_buffers_at_odd_offsets(update, offsets, portable, monkeypatch):
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


@pytest.mark.ext
@pytest.mark.skipif(_backend.extension() is None, reason="compiled extension unavailable")
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("n", (7, 37, 1027))
@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("weight_decay", (0.0, 0.05))
def test_packed_backwards_give_the_same_bits_in_both_isa_builds(
    update, dtype, n, weight_decay, monkeypatch
):
    """The fused Adam and RMSprop backwards run packed too (masks for the zero-safe root as 1/0
    lanes): both ISA builds give identical gradients, second moments at exactly 0 included."""
    params, grad, states = _inputs(update, n, dtype)
    if update in ("adam", "adamw", "rmsprop", "rmsprop_centered"):
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


@pytest.mark.triton
@pytest.mark.skipif(
    _triton.mode() != "interpreted",
    reason="emulates compiled argument typing under the interpreter",
)
@pytest.mark.parametrize("update", UPDATES)
def test_float64_hyper_parameters_reach_compiled_kernels_in_float64(update, monkeypatch):
    # Compiled Triton passed lr, betas, eps, ... as float32: lr = 0.1 became 0.10000000149, a
    # 1.5e-8 relative error in a float64 step, 1e4 times the float64 tolerance.
    launched = compiled_float_typing(monkeypatch, ops)
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


@pytest.mark.triton
@pytest.mark.skipif(
    _triton.mode() != "interpreted",
    reason="emulates compiled argument typing under the interpreter",
)
def test_float64_clip_adam_and_accumulate_keep_float64_arguments_when_compiled(monkeypatch):
    launched = compiled_float_typing(monkeypatch, ops)
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
    launched = compiled_float_typing(monkeypatch, ops, sgd_ops)
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
    # 17 launches: 6 updates x (forward, backward), norm pass + Adam, accumulate, SGD x 2; the
    # float-typing wrapper saw the 9 kernels with float arguments (the norm pass has none).
    assert len({kernel for kernel, _, _ in launched}) == 9
    assert len(devices) == 17 and set(devices) == {torch.device(device)}
