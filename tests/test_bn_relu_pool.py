"""Fused BatchNorm2d -> ReLU -> MaxPool2d(2, 2) against the eager modules: pooled outputs, running
statistics, input/weight/bias gradients (ties, negative and zero gammas, odd sizes, both layouts);
fuse_bn_relu_pool keeps every parameter and buffer and the model's outputs and gradients."""

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from _backends import backend_params
from _tolerances import elementwise
from torch import nn
from torch.func import functional_call

from sophon_fast import _backend
from sophon_fast.models.classifiers import SmallCNN
from sophon_fast.nn import FusedBatchNormReLUMaxPool2d, fuse_bn_relu_pool
from sophon_fast.ops import channel_stats_triton
from sophon_fast.ops.bn_relu_pool import batch_norm_relu_maxpool2d
from sophon_fast.reference import bn_relu_pool as reference

# Odd and even sides, batch 1 and 2, a 2x2 input (one window), primes.
SHAPES = ((2, 3, 5, 7), (1, 4, 4, 3), (2, 2, 2, 2), (1, 3, 7, 6))


def _params():
    """backend_params(), the compiled ones skipped when the extension predates this op."""
    params = []
    for p in backend_params():
        name = p.values[0]
        skipped = any(m.name == "skip" for m in p.marks)
        # On a CUDA machine a forced backend that cannot run fails (tests/_backends.py).
        if (
            name in ("cpu", "cuda")
            and not skipped
            and not torch.cuda.is_available()
            and not hasattr(_backend.extension(), "bn_relu_pool_forward")
        ):
            reason = "the compiled extension was built without bn_relu_pool"
            p = pytest.param(*p.values, id=p.id, marks=[pytest.mark.skip(reason=reason)])
        params.append(p)
    return params


FUSED = _params()
# Reductions over up to 84 values per channel in float32: a few roundings more than one
# element-wise op (the statistics' float64 sums against torch's float32 ones), so the float32
# row of the table scaled by 10; float64 stays at the table.
SCALE = {torch.float64: 1.0, torch.float32: 10.0}


def _tolerance(dtype):
    tol = elementwise(dtype)
    return {k: v * SCALE[dtype] for k, v in tol.items()}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _inputs(shape, dtype, channels_last=False, ties=False, device="cpu"):
    """x, weight, bias on `device` (drawn on the CPU: the same values on every device)."""
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    if ties:  # half-integers: many equal values inside windows
        x = torch.round(x)
        x[..., :2, :2] = 1.0  # one window of four equal values per plane
    x = x.to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    weight = torch.randn(c, dtype=dtype)
    weight[0] = -weight[0].abs() - 0.1  # the min branch: z decreasing in x
    if c > 2:
        weight[2] = 0.0  # z constant in a window: the first index gets the gradient
    bias = torch.randn(c, dtype=dtype).abs()
    return x, weight.to(device), bias.to(device)


def _eager(x, weight, bias, running_mean, running_var, momentum, eps):
    z = F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    return F.max_pool2d(F.relu(z), 2, 2)


def _run(fn, x, weight, bias, grad_seed, momentum=0.1):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
    c = x.shape[1]
    running = (
        torch.linspace(-1, 1, c, dtype=x.dtype, device=x.device),
        torch.linspace(0.5, 2, c, dtype=x.dtype, device=x.device),
    )
    y = fn(*leaves, *running, momentum, 1e-3)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed))
    grad_y = grad_y.to(x.device, x.dtype)
    grads = torch.autograd.grad(y, leaves, grad_y)
    return y, running, grads


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_matches_eager_modules(backend, device, dtype, shape, channels_last, ties):
    x, weight, bias = _inputs(shape, dtype, channels_last, ties, device)
    with _backend.use_backend(backend):
        y, running, grads = _run(batch_norm_relu_maxpool2d, x, weight, bias, grad_seed=1)
    y_ref, running_ref, grads_ref = _run(_eager, x, weight, bias, grad_seed=1)
    tol = _tolerance(dtype)
    torch.testing.assert_close(y, y_ref, **tol)
    for got, want in zip(running + grads, running_ref + grads_ref):
        torch.testing.assert_close(got, want, **tol)
    if channels_last and shape[2] // 2 > 1 and shape[3] // 2 > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert grads[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(("backend", "device"), FUSED)
def test_gradcheck_float64(backend, device):
    x = torch.randn(2, 2, 3, 2, dtype=torch.float64).to(device)  # ~60 interpreted evaluations
    weight = torch.tensor([-0.7, 1.3], dtype=torch.float64, device=device)
    bias = torch.tensor([0.3, 0.5], dtype=torch.float64, device=device)
    inputs = tuple(t.requires_grad_(True) for t in (x, weight, bias))

    def fused(x, w, b):
        with _backend.use_backend(backend):
            return batch_norm_relu_maxpool2d(x, w, b, None, None, 0.1, 1e-5)

    assert torch.autograd.gradcheck(fused, inputs)


def test_closed_form_backward_matches_autograd():
    x, weight, bias = _inputs((2, 3, 5, 4), torch.float64, ties=True)
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
    y = reference.batch_norm_relu_maxpool2d(*leaves, None, None)
    grad_y = torch.randn_like(y)
    want = torch.autograd.grad(y, leaves, grad_y)
    mean = x.mean((0, 2, 3))
    invstd = (x.var((0, 2, 3), unbiased=False) + 1e-5).rsqrt()
    got = reference.batch_norm_relu_maxpool2d_backward(x, weight, bias, grad_y, mean, invstd)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **elementwise(torch.float64))


@pytest.mark.parametrize(("backend", "device"), FUSED)
def test_no_affine_and_no_running_stats(backend, device):
    x, _, _ = _inputs((2, 3, 4, 5), torch.float64, device=device)
    x.requires_grad_(True)
    with _backend.use_backend(backend):
        y = batch_norm_relu_maxpool2d(x, None, None, None, None)
    y_ref = _eager(x, None, None, None, None, 0.1, 1e-5)
    torch.testing.assert_close(y, y_ref, **elementwise(torch.float64))
    g = torch.randn_like(y)
    torch.testing.assert_close(
        torch.autograd.grad(y, x, g)[0],
        torch.autograd.grad(y_ref, x, g)[0],
        **elementwise(torch.float64),
    )


@pytest.mark.parametrize(("backend", "device"), [p for p in FUSED if p.values[0] != "reference"])
def test_double_backward_raises_clearly(backend, device):
    x, weight, bias = _inputs((2, 3, 4, 4), torch.float64, device=device)
    x.requires_grad_(True)
    with _backend.use_backend(backend):
        y = batch_norm_relu_maxpool2d(x, weight, bias, None, None)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="once differentiable"):
            torch.autograd.grad(gx.sum(), x)


def _sequential(channels_last=False):
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 3, 1),
        nn.BatchNorm2d(3, momentum=None),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.BatchNorm2d(3),  # followed by a 3x3 pool: not fused
        nn.ReLU(),
        nn.MaxPool2d(3, 1),
        nn.Flatten(),
        nn.Linear(3, 2),
    ).double()
    return model.to(memory_format=torch.channels_last) if channels_last else model


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fuse_keeps_state_and_matches_eager(channels_last):
    torch.manual_seed(0)
    model = _sequential(channels_last)
    eager = copy.deepcopy(model)
    before = model.state_dict(keep_vars=True)
    assert fuse_bn_relu_pool(model) is model
    after = model.state_dict(keep_vars=True)
    assert list(before) == list(after)
    assert all(before[k] is after[k] for k in before)  # same tensor objects
    assert [type(m).__name__ for m in model][1:4] == [
        "FusedBatchNormReLUMaxPool2d",
        "Identity",
        "Identity",
    ]
    assert type(model[8]) is nn.BatchNorm2d and type(model[10]) is nn.MaxPool2d
    x = torch.randn(3, 2, 13, 14, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(3):  # momentum=None: cumulative averaging over num_batches_tracked
        out, out_ref = model(x), eager(x)
        torch.testing.assert_close(out, out_ref, **elementwise(torch.float64))
        grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
        grads_ref = torch.autograd.grad(out_ref.square().sum(), list(eager.parameters()))
        for g, w in zip(grads, grads_ref):
            torch.testing.assert_close(g, w, **elementwise(torch.float64))
    for k, v in eager.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, **elementwise(torch.float64))
    model.eval()
    eager.eval()
    torch.testing.assert_close(model(x), eager(x), **elementwise(torch.float64))


def test_fuse_small_cnn_and_functional_call():
    torch.manual_seed(0)
    model = SmallCNN(image_size=11, widths=(3, 5)).double()
    eager = copy.deepcopy(model)
    fuse_bn_relu_pool(model)
    fused = [m for m in model.modules() if isinstance(m, FusedBatchNormReLUMaxPool2d)]
    assert len(fused) == 2
    assert model.state_dict().keys() == eager.state_dict().keys()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in eager.named_parameters()}
    buffers = {k: v.clone() for k, v in eager.named_buffers()}
    buffers_ref = {k: v.clone() for k, v in eager.named_buffers()}
    x = torch.randn(2, 1, 11, 11, dtype=torch.float64)
    out = functional_call(model, {**params, **buffers}, (x,))
    out_ref = functional_call(eager, {**params, **buffers_ref}, (x,))
    torch.testing.assert_close(out, out_ref, **elementwise(torch.float64))
    for k in buffers:  # running statistics updated in the passed buffers
        torch.testing.assert_close(buffers[k], buffers_ref[k], **elementwise(torch.float64))
    grads = torch.autograd.grad(out.sum(), list(params.values()))
    params_ref = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    out_ref = functional_call(eager, {**params_ref, **buffers_ref}, (x,))
    grads_ref = torch.autograd.grad(out_ref.sum(), list(params_ref.values()))
    for g, w in zip(grads, grads_ref):
        torch.testing.assert_close(g, w, **elementwise(torch.float64))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="height and width >= 2"):
        batch_norm_relu_maxpool2d(torch.zeros(2, 3, 1, 4), None, None, None, None)
    with pytest.raises(ValueError, match="height, width"):
        batch_norm_relu_maxpool2d(torch.zeros(2, 3), None, None, None, None)


@pytest.mark.parametrize(("backend", "device"), [p for p in FUSED if p.values[0] != "reference"])
def test_bad_eps_and_channels_raise(backend, device):
    x = torch.randn(2, 3, 2, 2, device=device)
    with _backend.use_backend(backend), pytest.raises(ValueError, match="eps"):
        batch_norm_relu_maxpool2d(x, None, None, None, None, 0.1, 0.0)
    with _backend.use_backend(backend), pytest.raises(ValueError, match="channels"):
        batch_norm_relu_maxpool2d(x, torch.ones(4, device=device), None, None, None)


def test_signature_parity_with_reference():
    public = inspect.signature(batch_norm_relu_maxpool2d)
    twin = inspect.signature(reference.batch_norm_relu_maxpool2d)
    assert list(public.parameters) == list(twin.parameters)
    for name, p in public.parameters.items():
        assert p.default == twin.parameters[name].default, name


@pytest.mark.parametrize(("backend", "device"), [p for p in FUSED if p.values[0] != "reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_within_twice_torch_error(backend, device, dtype):
    """float32 maths on float16/bfloat16 storage: error vs float64 <= 2x torch's own error."""
    x, weight, bias = _inputs((3, 4, 6, 5), torch.float64, device=device)
    exact = _run(_eager, x, weight, bias, grad_seed=2)
    low = [t.to(dtype) for t in (x, weight, bias)]
    with _backend.use_backend(backend):
        fused = _run(batch_norm_relu_maxpool2d, *low, grad_seed=2)
    eager = _run(_eager, *low, grad_seed=2)

    def errors(result):
        y, running, grads = result
        flat = (y, *running, *grads)
        want = (exact[0], *exact[1], *exact[2])
        return [(g.double() - w).abs().max().item() for g, w in zip(flat, want)]

    for name, got, torch_error in zip(
        ("y", "running_mean", "running_var", "dx", "dweight", "dbias"),
        errors(fused),
        errors(eager),
    ):
        # one storage ulp of slack where torch happens to be exact
        assert got <= 2 * torch_error + elementwise(dtype)["atol"], (name, got, torch_error)


@pytest.mark.parametrize(("backend", "device"), [p for p in FUSED if p.values[0] == "cpu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("isa", ["native", "portable"])
def test_cpu_vector_loops_match_eager(backend, device, channels_last, isa, monkeypatch):
    """Shapes wide enough for the CPU loops' full vector bodies (9 windows a row, 19 channels),
    in the AVX2 build (where the CPU has it) and the baseline-ISA one (SOPHON_FAST_NO_AVX2=1)."""
    if isa == "portable":
        monkeypatch.setenv("SOPHON_FAST_NO_AVX2", "1")
    for dtype in (torch.float32, torch.float64):
        for shape, ties in (((1, 4, 18, 19), False), ((2, 19, 6, 5), True)):
            x, weight, bias = _inputs(shape, dtype, channels_last, ties)
            with _backend.use_backend(backend):
                y, running, grads = _run(batch_norm_relu_maxpool2d, x, weight, bias, grad_seed=3)
            y_ref, running_ref, grads_ref = _run(_eager, x, weight, bias, grad_seed=3)
            for got, want in zip((y, *running, *grads), (y_ref, *running_ref, *grads_ref)):
                torch.testing.assert_close(got, want, **_tolerance(dtype))


# Odd sizes for the chunked Triton kernels with 16-value tiles, and the minimum chunk: each of the
# statistics, window-sums and dx passes runs several chunks a channel, the last one short; odd
# heights and widths leave partial windows on the last row and column.
CHUNKED = (((3, 2, 9, 11), 100), ((1, 3, 13, 17), 40), ((2, 2, 6, 10), 1))
CHUNKED_DTYPES = (
    (torch.float64, False),
    (torch.float64, True),
    (torch.float32, False),
    (torch.float32, True),
    (torch.float16, False),
    (torch.bfloat16, True),
)


@pytest.mark.parametrize(("backend", "device"), [p for p in FUSED if p.values[0] == "triton"])
@pytest.mark.parametrize(("dtype", "channels_last"), CHUNKED_DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "min_chunk"), CHUNKED, ids=str)
def test_chunked_passes_match_eager(
    backend, device, dtype, channels_last, shape, min_chunk, monkeypatch
):
    """Several chunks a channel in every pass: pooled output, running statistics and gradients
    as the eager modules (ties included). float16/bfloat16: error vs float64 <= 2x torch's own."""
    monkeypatch.setattr(channel_stats_triton, "BLOCK_SIZE", 16)
    monkeypatch.setattr(channel_stats_triton, "MIN_CHUNK_VALUES", min_chunk)
    n, c, h, w = shape
    for rows, cols in ((n, h * w), (n * (h // 2), w // 2), (n * -(-h // 2), -(-w // 2))):
        plan = channel_stats_triton.chunk_plan(rows, cols, c, cell_values=1 if rows == n else 4)
        assert plan.n_chunks > 1, (rows, cols, plan)
        assert plan.n_chunks * plan.tiles >= plan.n_tiles > (plan.n_chunks - 1) * plan.tiles
    x, weight, bias = _inputs(shape, torch.float64, channels_last, ties=True, device=device)
    low = [t.to(dtype) for t in (x, weight, bias)]
    with _backend.use_backend(backend):
        y, running, grads = _run(batch_norm_relu_maxpool2d, *low, grad_seed=4)
    ours = (y, *running, *grads)
    if dtype in SCALE:
        y_ref, running_ref, grads_ref = _run(_eager, *low, grad_seed=4)
        for got, want in zip(ours, (y_ref, *running_ref, *grads_ref)):
            torch.testing.assert_close(got, want, **_tolerance(dtype))
        return
    exact_y, exact_running, exact_grads = _run(_eager, x, weight, bias, grad_seed=4)
    eager_y, eager_running, eager_grads = _run(_eager, *low, grad_seed=4)
    for k, (got, theirs, want) in enumerate(
        zip(ours, (eager_y, *eager_running, *eager_grads), (exact_y, *exact_running, *exact_grads))
    ):
        error, torch_error = ((t.double() - want).abs().max().item() for t in (got, theirs))
        # one storage ulp at the largest magnitude: one rounding of the float32 result
        ulp = torch.finfo(dtype).eps * max(want.abs().max().item(), 1.0)
        assert error <= 2 * torch_error + ulp, (k, error, torch_error)


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_nan_propagates_as_in_the_eager_ops(backend, device, channels_last):
    """A NaN input makes its channel's batch statistics NaN, so eager BN -> ReLU -> MaxPool gives a
    NaN channel; the fused kernels' relu once turned it into a finite 0 (max(NaN, 0) = 0), which
    hid a diverged model from the non-finite checks."""
    x = torch.randn(2, 3, 4, 6)
    x[1, 1, 2, 3] = float("nan")
    x = x.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.ones(3, device=device), torch.zeros(3, device=device)
    with _backend.use_backend(backend):
        got = batch_norm_relu_maxpool2d(x, weight, bias, None, None, 0.1, 1e-5)
    expected = F.max_pool2d(F.relu(F.batch_norm(x, None, None, weight, bias, True)), 2, 2)
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    assert torch.isnan(got[:, 1]).all() and not torch.isnan(got[:, [0, 2]]).any()


@pytest.mark.parametrize(("backend", "device"), FUSED)
def test_table_entries_match_the_reference_entries(backend, device):
    """Each backend's forward (with its batch statistics) and backward entries in the
    implementation table give the reference entries' outputs and running statistics: one
    signature for every backend (sophon_fast._backend.register_op)."""
    x, weight, bias = _inputs((2, 3, 5, 7), torch.float64, device=device)
    grad_y = torch.randn(2, 3, 2, 3, dtype=torch.float64).to(device)
    outputs = {}
    for name in (backend, "reference"):
        running = [torch.zeros(3, dtype=torch.float64, device=device), torch.ones(3).to(x)]
        y, mean, invstd = _backend.implementation("bn_relu_pool", name)(
            x, weight, bias, *running, 0.1, 1e-5
        )
        backward = _backend.implementation("bn_relu_pool.backward", name)(
            x, weight, bias, grad_y, mean, invstd
        )
        outputs[name] = [y, mean, invstd, *running, *backward]
    for k, (got, want) in enumerate(zip(outputs[backend], outputs["reference"])):
        torch.testing.assert_close(got, want, **_tolerance(torch.float64), msg=f"output {k}")
