"""flat_optim: every update x backend against the reference, fused backwards, float64 gradcheck,
N-step trajectories against torch.optim, saved tensors, in-place forms and input validation."""

import inspect
import math

import pytest
import torch
from _backends import backend_params
from _shapes import FLAT_SIZES
from _tolerances import elementwise

from sophon_fast import _backend
from sophon_fast.ops import flat_optim as ops
from sophon_fast.reference import flat_optim as reference

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


@pytest.mark.parametrize(("backend", "device"), backend_params())
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
        torch.testing.assert_close(g, e, **elementwise(g.dtype if g is got[0] else dtype))


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


@pytest.mark.parametrize(("backend", "device"), backend_params())
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
        # The VJP chains ~10 roundings of the compute dtype (1 / denom^2, products of moments).
        torch.testing.assert_close(g, e, rtol=8 * rtol, atol=8 * atol)


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
    return [torch.zeros(params.shape, dtype=state) for _ in _state_names(update)]


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
    params, states = start.clone(), _zero_state(update, start)
    step = _step(0, dtype)
    hp = dict(HYPER[update])
    with _backend.use_backend(backend):
        for g in grads:
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
    # Deltas from the start, tolerance scaled by the number of steps (DESIGN.md).
    rtol, atol = elementwise(dtype).values()
    torch.testing.assert_close(
        params - start, torch_param.detach() - start, rtol=steps * rtol, atol=steps * atol
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
    params, (m, v), step = start.clone(), _zero_state("adam", start), _step(0, dtype)
    with _backend.use_backend(backend):
        norms = [
            ops.flat_clip_adam_step_(
                params, g, m, v, step, 0.01, weight_decay=0.01, max_norm=max_norm
            )
            for g in grads
        ]
    assert step.item() == steps
    rtol, atol = elementwise(dtype).values()
    torch.testing.assert_close(
        params - start, torch_param.detach() - start, rtol=steps * rtol, atol=steps * atol
    )
    for got, expected in zip(norms, expected_norms):
        torch.testing.assert_close(got.to(dtype), expected, rtol=10 * rtol, atol=0)


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
