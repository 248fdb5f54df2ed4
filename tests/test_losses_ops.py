"""Fused losses (sophon_fast.ops.losses) on every backend against the pure-torch twin."""

import contextlib
import inspect
import math

import pytest
import torch
from _backends import backend_params

from sophon_fast import _backend
from sophon_fast.ops import losses as ops
from sophon_fast.reference import losses as reference

# Comparisons with the reference twin: the reference itself is the oracle, never compared with
# itself (it was: ~250 cases that could not fail).
FUSED = [p for p in backend_params() if p.values[0] != "reference"]

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# (batch, classes): one class, two, odd primes, and a wide row past one SIMD block.
SHAPES = ((3, 1), (4, 2), (7, 13), (2, 1000))
FUNCTIONS = {
    "ce": (ops.cross_entropy, reference.cross_entropy),
    "ice": (ops.inverse_cross_entropy, reference.inverse_cross_entropy),
    "ice_paper": (ops.inverse_cross_entropy_paper, reference.inverse_cross_entropy_paper),
    "klu": (ops.kl_uniform, reference.kl_uniform),
}
# Loss and gradient vs the float64 reference: fp32 maths throughout, so the error is one storage
# rounding of the gradient plus float32 accumulation over <= 1000 classes.
TOLERANCE = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2**-9, 2**-12),
    torch.bfloat16: (2**-6, 2**-9),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: OpenMP hand-off costs more than the work
    yield
    torch.set_num_threads(previous)


def _data(batch, classes, dtype, scale=3.0):
    logits = (torch.randn(batch, classes, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, classes, (batch,))
    return logits, labels


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ops.KINDS)
def test_value_and_gradient_match_reference(backend, device, dtype, shape, kind):
    if kind == "ice_paper" and shape[1] == 1:
        pytest.skip("ice_paper is undefined for one class (tested to raise)")
    fused, twin = FUNCTIONS[kind]
    logits, labels = _data(*shape, dtype)
    logits, labels = logits.to(device), labels.to(device)
    z = logits.clone().requires_grad_(True)
    with _backend.use_backend(backend):
        value = fused(z, labels)
        (grad,) = torch.autograd.grad(value, z)
    exact = logits.double().cpu().requires_grad_(True)
    expected = twin(exact, labels.cpu())
    (expected_grad,) = torch.autograd.grad(expected, exact)
    rtol, atol = TOLERANCE[dtype]
    assert value.dtype == dtype and grad.dtype == dtype and grad.shape == shape
    torch.testing.assert_close(value.double().cpu(), expected.detach(), rtol=rtol, atol=atol * 10)
    torch.testing.assert_close(grad.double().cpu(), expected_grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("kind", ops.KINDS)
def test_gradcheck_and_gradgradcheck_float64(backend, device, kind):
    logits, labels = _data(4, 5, torch.float64, scale=2.0)
    logits, labels = logits.to(device).requires_grad_(True), labels.to(device)

    def loss(z):
        with _backend.use_backend(backend):
            return ops.classification_loss(z, labels, kind)

    assert torch.autograd.gradcheck(loss, (logits,))
    assert torch.autograd.gradgradcheck(loss, (logits,))


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("name", ["mse_ascent", "dos"])
def test_generation_losses(backend, device, name):
    prediction = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    target = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    fused, twin = getattr(ops, name), getattr(reference, name)
    inputs = (prediction, target) if name == "mse_ascent" else (prediction,)

    def loss(*args):
        with _backend.use_backend(backend):
            return fused(*args)

    torch.testing.assert_close(loss(*inputs), twin(*inputs), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(loss, inputs)
    assert torch.autograd.gradgradcheck(loss, inputs)
    low = prediction.detach().float()
    with _backend.use_backend(backend):
        got = fused(low, target.detach().float()) if name == "mse_ascent" else fused(low)
    want = twin(*(t.detach() for t in inputs))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


# One row and one class (two for ice_paper), one-element generation losses: on a GPU each size
# of 1 reaches the Triton kernels as a compile-time constant (a Python int), where
# ``n_cols.to(tl.float32)`` failed to compile; tools/triton_check.py compiles these
# specialisations for sm_80/sm_90 (tests/test_triton_check.py), this checks their values.
@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ops.KINDS)
def test_one_row_one_class_match_reference(backend, device, dtype, kind):
    for shape in ((1, 2),) if kind == "ice_paper" else ((1, 1), (1, 2), (3, 1)):
        logits, labels = _data(*shape, dtype)
        z = logits.to(device).requires_grad_(True)
        with _backend.use_backend(backend):
            value = ops.classification_loss(z, labels.to(device), kind)
            (grad,) = torch.autograd.grad(value, z)
        exact = logits.double().requires_grad_(True)
        expected = FUNCTIONS[kind][1](exact, labels)
        (expected_grad,) = torch.autograd.grad(expected, exact)
        rtol, atol = TOLERANCE[dtype]
        torch.testing.assert_close(value.double().cpu(), expected.detach(), rtol=rtol, atol=atol)
        torch.testing.assert_close(grad.double().cpu(), expected_grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("name", ["mse_ascent", "dos"])
def test_one_element_generation_losses(backend, device, name):
    prediction = torch.tensor([[[[0.75]]]], dtype=torch.float64, device=device)
    target = torch.tensor([[[[-0.5]]]], dtype=torch.float64, device=device)
    inputs = (prediction, target) if name == "mse_ascent" else (prediction,)
    leaf = prediction.clone().requires_grad_(True)
    with _backend.use_backend(backend):
        value = getattr(ops, name)(leaf, *inputs[1:])
        (grad,) = torch.autograd.grad(value, leaf)
    # mse_ascent: -(1.25)^2 and -2 * 1.25; dos: 0.75^2 and 2 * 0.75 (N = 1).
    want_value, want_grad = (-1.5625, -2.5) if name == "mse_ascent" else (0.5625, 1.5)
    assert float(value.detach()) == want_value and float(grad) == want_grad


# Rows longer than one chunk of the Triton kernel (MAX_CLASS_BLOCK = 1024 classes): 1025 leaves
# one class alone in the last chunk; with the label there, ice_paper's logsumexp over j != y has
# no lane in that chunk at all (-inf everywhere, which must not become NaN).
@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("classes", [1025, 2500])
@pytest.mark.parametrize("kind", ops.KINDS)
def test_rows_longer_than_one_kernel_chunk(backend, device, classes, kind):
    logits, _ = _data(3, classes, torch.float64, scale=4.0)
    logits[2, classes - 1] = 40.0  # a gap: the row maximum sits in the lone last chunk
    labels = torch.tensor([0, classes // 2, classes - 1])
    z = logits.to(device).requires_grad_(True)
    with _backend.use_backend(backend):
        value = ops.classification_loss(z, labels.to(device), kind)
        (grad,) = torch.autograd.grad(value, z)
    exact = logits.clone().requires_grad_(True)
    expected = FUNCTIONS[kind][1](exact, labels)
    (expected_grad,) = torch.autograd.grad(expected, exact)
    rtol, atol = TOLERANCE[torch.float64]
    torch.testing.assert_close(value.cpu(), expected.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(grad.cpu(), expected_grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("classes", [2, 5, 1000])
def test_ice_paper_finite_at_gap_100_in_float32(backend, device, classes):
    logits = torch.zeros(3, classes, device=device)
    labels = torch.tensor([0, 1, classes - 1], device=device)
    logits[torch.arange(3), labels] = 100.0
    z = logits.clone().requires_grad_(True)
    with _backend.use_backend(backend):
        value = ops.inverse_cross_entropy_paper(z, labels)
        (grad,) = torch.autograd.grad(value, z)
    expected = 100.0 - math.log(classes - 1)
    assert abs(float(value) - expected) <= 1e-5 * expected
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ops.KINDS)
def test_finite_at_logits_of_1e4(backend, device, dtype, kind):
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0], [0.0, 0.0, 1e4]], dtype=dtype)
    labels = torch.tensor([0, 0, 2])
    z = logits.to(device).requires_grad_(True)
    with _backend.use_backend(backend):
        value = ops.classification_loss(z, labels.to(device), kind)
        (grad,) = torch.autograd.grad(value, z)
    assert torch.isfinite(value) and torch.isfinite(grad).all()


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_ce_twice_differentiable_as_an_inner_loss(backend, device):
    # Second order: d/dw of |d ce(x w)/dw|^2 through the fused backward equals the reference.
    x = torch.randn(6, 4, dtype=torch.float64, device=device)
    labels = torch.randint(0, 3, (6,), device=device)
    w = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)

    def meta(loss):
        (g,) = torch.autograd.grad(loss(x @ w, labels), w, create_graph=True)
        return torch.autograd.grad(g.square().sum(), w)[0]

    with _backend.use_backend(backend):
        got = meta(ops.cross_entropy)
    torch.testing.assert_close(got, meta(reference.cross_entropy), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("backend", "device"), FUSED)
def test_non_contiguous_rows_and_grad_scaling(backend, device):
    wide = torch.randn(5, 16, dtype=torch.float64, device=device).requires_grad_(True)
    # a view with row stride 16 and unit column stride: the kernels read it in place through
    # their row-stride argument (a .clone() here made it contiguous and skipped that path)
    logits = wide[:, 3:12]
    assert logits.stride() == (16, 1)
    strided = wide.detach()[:, ::2]  # column stride 2: copied once, then fused
    labels = torch.randint(0, 8, (5,), device=device)
    with _backend.use_backend(backend):
        got = ops.inverse_cross_entropy(strided, labels)
        value = ops.cross_entropy(logits, labels[:5].clamp(max=8)) * 3.0
        (grad,) = torch.autograd.grad(value, logits)
    torch.testing.assert_close(got, reference.inverse_cross_entropy(strided, labels))
    exact = logits.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(reference.cross_entropy(exact, labels.clamp(max=8)) * 3.0, exact)
    torch.testing.assert_close(grad, want)


@pytest.mark.ext
@pytest.mark.skipif(_backend.extension() is None, reason="compiled extension unavailable")
def test_out_of_range_label_raises_on_cpu():
    with _backend.use_backend("cpu"), pytest.raises(ValueError, match=r"labels\[1\] = 7"):
        ops.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 7]))
    with _backend.use_backend("cpu"), pytest.raises(ValueError, match="outside"):
        ops.inverse_cross_entropy(torch.zeros(2, 3), torch.tensor([-1, 0]))


@pytest.mark.triton
@pytest.mark.skipif(_backend.triton_mode() is None, reason="triton not installed")
def test_out_of_range_label_gives_nan_on_triton():
    device = "cuda" if _backend.triton_mode() == "compiled" else "cpu"
    with _backend.use_backend("triton"):
        value = ops.cross_entropy(
            torch.zeros(2, 3, device=device), torch.tensor([0, 7], device=device)
        )
    assert torch.isnan(value)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: ops.inverse_cross_entropy_paper(
                torch.zeros(2, 1), torch.zeros(2, dtype=torch.int64)
            ),
            ValueError,
            "1 class",
        ),
        (
            lambda: ops.cross_entropy(torch.zeros(3), torch.zeros(3, dtype=torch.int64)),
            ValueError,
            "logits must be",
        ),
        (
            lambda: ops.cross_entropy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64)),
            ValueError,
            "empty batch",
        ),
        (
            lambda: ops.cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int32)),
            TypeError,
            "int64",
        ),
        (
            lambda: ops.cross_entropy(
                torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, dtype=torch.int64)
            ),
            TypeError,
            "float32",
        ),
        (
            lambda: ops.classification_loss(
                torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), "nope"
            ),
            ValueError,
            "unknown",
        ),
        (lambda: ops.mse_ascent(torch.zeros(2, 3), torch.zeros(2, 3)), ValueError, "height, width"),
        (
            lambda: ops.mse_ascent(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3)),
            ValueError,
            "shape",
        ),
    ],
)
def test_bad_inputs_raise(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_signature_parity_with_reference():
    for name in (
        "cross_entropy",
        "inverse_cross_entropy",
        "inverse_cross_entropy_paper",
        "kl_uniform",
        "mse_ascent",
        "dos",
    ):
        public = inspect.signature(getattr(ops, name))
        twin = inspect.signature(getattr(reference, name))
        assert list(public.parameters) == list(twin.parameters), name
        assert [p.default for p in public.parameters.values()] == [
            p.default for p in twin.parameters.values()
        ], name


@pytest.mark.triton
@pytest.mark.skipif(_backend.triton_mode() is None, reason="triton is not installed")
def test_every_triton_launch_enters_the_tensors_device(monkeypatch):
    # Compiled Triton launches on the current CUDA device, not the tensor's (the wrong GPU on a
    # multi-GPU machine): both loss kernels launch inside _triton.launch_device(input).
    from sophon_fast.ops import _triton

    devices = []

    def recording(t):
        devices.append(t.device)
        return contextlib.nullcontext()

    monkeypatch.setattr(_triton, "launch_device", recording)
    device = "cuda" if _backend.triton_mode() == "compiled" else "cpu"
    logits = torch.randn(3, 5, device=device)
    with _backend.use_backend("triton"):
        ops.cross_entropy(logits, torch.tensor([0, 4, 2], device=device))
        ops.mse_ascent(logits[None, None], torch.zeros_like(logits)[None, None])
    assert devices == [torch.device(device)] * 2


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_table_entries_match_the_reference_entries(backend, device, dtype):
    """Each backend's loss entries in the implementation table (value and gradient in one call)
    give the reference entries' outputs: one signature for every backend."""
    rtol, atol = TOLERANCE[dtype]
    logits, labels = _data(7, 13, dtype)
    logits, labels = logits.to(device), labels.to(device)
    for code in range(len(ops.KINDS)):
        got = _backend.implementation(ops.CLASSIFICATION_OP, backend)(logits, labels, code)
        want = _backend.implementation(ops.CLASSIFICATION_OP, "reference")(logits, labels, code)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=ops.KINDS[code])
    prediction, target = (torch.randn(2, 3, 4, 5, dtype=dtype).to(device) for _ in range(2))
    for args in ((prediction, target, -1.0), (prediction, None, 1.0)):
        got = _backend.implementation(ops.MEAN_SQUARE_OP, backend)(*args)
        want = _backend.implementation(ops.MEAN_SQUARE_OP, "reference")(*args)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=rtol, atol=atol)
