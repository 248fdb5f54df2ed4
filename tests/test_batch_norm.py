"""Fused training-mode BatchNorm2d against torch.nn.BatchNorm2d: outputs, running statistics,
first and second derivatives, layouts; convert_batchnorm keeps every parameter and buffer."""

import contextlib
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from _backends import backend_params
from torch import nn

from sophon_fast import _backend
from sophon_fast.nn import FusedBatchNorm2d, convert_batchnorm
from sophon_fast.ops import _triton, channel_stats_triton
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


def _inputs(shape, dtype, channels_last=False, affine=True, device="cpu"):
    """x, weight, bias on `device` (drawn on the CPU: the same values on every device)."""
    x = (torch.randn(shape, dtype=dtype) * 2 + 0.5).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    weight = torch.randn(c, dtype=dtype).to(device) if affine else None
    bias = torch.randn(c, dtype=dtype).to(device) if affine else None
    return x, weight, bias


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("momentum", [0.1, 0.7])
def test_outputs_and_running_stats_match_torch(
    backend, device, dtype, shape, channels_last, momentum
):
    x, weight, bias = _inputs(shape, dtype, channels_last, device=device)
    rm = torch.randn(shape[1], dtype=dtype).to(device)
    rv = (torch.rand(shape[1], dtype=dtype) + 0.5).to(device)
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
    x, weight, bias = _inputs(shape, torch.float64, channels_last, affine, device)
    leaves = [t.requires_grad_(True) for t in (x, weight, bias) if t is not None]
    grad_y = torch.randn(shape, dtype=torch.float64).to(device)

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
    x, weight, bias = _inputs(shape, torch.float64, device=device)
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


# Odd channel sizes for the chunked Triton kernels with 16-value tiles, and the minimum chunk:
# 231 = 3 x 77 values (5 column tiles a row, 15 tiles) in 4 chunks of 4 tiles, the last of 3;
# 221 = 13 x 17 (one image, 14 column tiles) in 4 chunks, the last of 2; 18 = 6 x 3 (tiles of
# 4 x 4) in 2 chunks of one tile, the second with 2 of its 4 rows.
CHUNKED = (((3, 2, 7, 11), 40), ((1, 3, 13, 17), 40), ((6, 2, 3, 1), 1))
# fp32 / fp64 in both layouts, fp16 and bf16 in one each (as the tests above).
CHUNKED_DTYPES = (
    (torch.float64, False),
    (torch.float64, True),
    (torch.float32, False),
    (torch.float32, True),
    (torch.float16, False),
    (torch.bfloat16, True),
)
TRITON = [p for p in FUSED if p.values[0] == "triton"]


def _small_chunks(monkeypatch, min_chunk):
    """Triton tiles of 16 values and chunks of >= min_chunk values: several chunks a channel on
    the CHUNKED shapes (the defaults give one chunk a channel under the interpreter)."""
    monkeypatch.setattr(channel_stats_triton, "BLOCK_SIZE", 16)
    monkeypatch.setattr(channel_stats_triton, "MIN_CHUNK_VALUES", min_chunk)


def _chunked_derivatives(fn, x, weight, bias, grad_y, running):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
    y = fn(*leaves, *running, 0.1, 1e-5)
    first = torch.autograd.grad(y, leaves, grad_y, create_graph=True)
    norm = sum(g.float().square().sum() for g in first)
    return (
        y,
        *first,
        *torch.autograd.grad(norm, leaves, allow_unused=True, materialize_grads=True),
    )


@pytest.mark.parametrize(("backend", "device"), TRITON)
@pytest.mark.parametrize(("dtype", "channels_last"), CHUNKED_DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "min_chunk"), CHUNKED, ids=str)
def test_chunked_statistics_match_torch(
    backend, device, dtype, channels_last, shape, min_chunk, monkeypatch
):
    """Several chunks a channel, the last one partial: outputs, running statistics, first and
    second derivatives as torch. float16/bfloat16: error against float64 <= 2x torch's own."""
    _small_chunks(monkeypatch, min_chunk)
    n, c, h, w = shape
    plan = channel_stats_triton.chunk_plan(n, h * w, c)
    assert plan.n_chunks > 1 and (n * h * w) % (plan.tiles * plan.block_r * plan.block_s) != 0
    assert plan.n_chunks * plan.tiles >= plan.n_tiles > (plan.n_chunks - 1) * plan.tiles
    x, weight, bias = _inputs(shape, torch.float64, channels_last, device=device)
    grad_y = torch.randn(shape, dtype=torch.float64).to(device)
    running = (
        torch.linspace(-1, 1, c, dtype=torch.float64).to(device),
        torch.linspace(0.5, 2, c, dtype=torch.float64).to(device),
    )

    def run(fn, dt, backend_name):
        state = [r.to(dt) for r in running]
        with _backend.use_backend(backend_name):
            out = _chunked_derivatives(fn, *(t.to(dt) for t in (x, weight, bias, grad_y)), state)
        return [t.double().cpu() for t in (*out, *state)]

    ours = run(batch_norm2d, dtype, backend)
    theirs = run(reference.batch_norm2d, dtype, "reference")
    if dtype in TOLERANCE:
        rtol, atol = TOLERANCE[dtype]
        for got, want in zip(ours, theirs):
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        return
    exact = run(reference.batch_norm2d, torch.float64, "reference")
    unit = torch.finfo(dtype).eps
    for k, (got, torch_, want) in enumerate(zip(ours, theirs, exact)):
        scale = want.abs().max()
        bound = 2 * (torch_ - want).abs().max() + unit * max(scale, 1.0)
        assert (got - want).abs().max() <= bound, k


def test_chunk_plan_fills_an_h100_at_resnet18_sizes():
    """ResNet-18 BN layers at batch 128, 32x32 inputs, with the compiled sizes: every layer
    launches >= 2 programs per SM of a 132-SM H100 (one block per channel gave 64-512), chunks
    cover every tile once and hold >= the minimum chunk."""
    for c, side in ((64, 32), (128, 16), (256, 8), (512, 4)):
        plan = channel_stats_triton.chunk_plan(
            128, side * side, c, block=1024, min_chunk=4096, target_programs=4 * 132
        )
        assert c * plan.n_chunks >= 2 * 132, (c, plan)
        assert plan.n_chunks * plan.tiles >= plan.n_tiles > (plan.n_chunks - 1) * plan.tiles
        values = 128 * side * side / plan.n_chunks
        assert values >= 4096 or plan.n_chunks == 1, (c, plan)


@pytest.mark.parametrize(("backend", "device"), TRITON)
def test_every_triton_launch_enters_the_tensors_device(backend, device, monkeypatch):
    """Compiled Triton launches on the current CUDA device, not the tensor's (the wrong GPU on a
    multi-GPU machine): forward, backward and double backward each launch inside
    _triton.launch_device(x)."""
    devices = []

    def recording(t):
        devices.append(t.device)
        return contextlib.nullcontext()

    monkeypatch.setattr(_triton, "launch_device", recording)
    x, weight, bias = _inputs((3, 2, 5, 4), torch.float64, device=device)
    running = (
        torch.zeros(2, dtype=torch.float64, device=device),
        torch.ones(2, dtype=torch.float64, device=device),
    )
    with _backend.use_backend(backend):
        _chunked_derivatives(batch_norm2d, x, weight, bias, torch.randn_like(x), running)
    assert len(devices) == 3 and set(devices) == {x.device}, devices


@pytest.mark.parametrize(("backend", "device"), FUSED)
def test_table_entries_match_the_reference_entries(backend, device):
    """Each backend's three entries in the implementation table (forward with its batch
    statistics, backward, double backward) give the reference entries' outputs, running
    statistics included: one signature for every backend (sophon_fast._backend.register_op)."""
    x, weight, bias = _inputs((3, 4, 5, 2), torch.float64, device=device)
    grad_y, grad_dx = (torch.randn(x.shape, dtype=torch.float64).to(device) for _ in range(2))
    grad_dweight, grad_dbias = (torch.randn(4, dtype=torch.float64).to(device) for _ in range(2))
    outputs = {}
    for name in (backend, "reference"):
        running = [torch.zeros(4, dtype=torch.float64, device=device), torch.ones(4).to(x)]
        y, mean, invstd = _backend.implementation("batch_norm", name)(
            x, weight, bias, *running, 0.1, 1e-5
        )
        backward = _backend.implementation("batch_norm.backward", name)(
            x, weight, grad_y, mean, invstd
        )
        double = _backend.implementation("batch_norm.double_backward", name)(
            x, weight, grad_y, mean, invstd, grad_dx, grad_dweight, grad_dbias
        )
        outputs[name] = [y, mean, invstd, *running, *backward, *double]
    rtol, atol = TOLERANCE[torch.float64]
    for k, (got, want) in enumerate(zip(outputs[backend], outputs["reference"])):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=f"output {k}")
