"""relu_maxpool2d: the fused ReLU + 2x2 max-pool against the eager pair, to every order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sophon_fast import _backend
from sophon_fast.nn import FusedReLUMaxPool2d, fuse_relu_pool
from sophon_fast.ops.relu_pool import relu_maxpool2d
from sophon_fast.reference import relu_pool as reference

# Skipped without the kernel only on a machine without a CUDA device: on a GPU machine a missing
# compiled backend is a failure, never a skip (tests/_backends.py).
needs_kernel = pytest.mark.skipif(
    (_backend.extension() is None or not hasattr(_backend.extension(), "relu_maxpool2d_forward"))
    and not torch.cuda.is_available(),
    reason="the compiled extension (cpu backend) is not available",
)
SHAPES = [(1, 1, 2, 2), (2, 3, 5, 7), (3, 2, 8, 9), (2, 4, 7, 4)]


def eager(x):
    return F.max_pool2d(F.relu(x), 2, 2)


def _input(shape, dtype, seed=0, ties=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if ties:  # exact ties (first maximum wins), zeros (ReLU's kink: no gradient) and negatives
        x.view(-1)[::5] = 0.5
        x.view(-1)[1::7] = 0.0
    return x


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_gradients_equal_the_eager_pair_exactly(shape, dtype):
    x = _input(shape, dtype)
    xf, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    yf, ye = relu_maxpool2d(xf), eager(xe)
    assert torch.equal(yf, ye)
    g = torch.randn_like(ye)
    (gf,) = torch.autograd.grad(yf, xf, g)
    (ge,) = torch.autograd.grad(ye, xe, g)
    assert torch.equal(gf, ge)  # same positions, same zeros (odd last row / column included)


@needs_kernel
def test_second_and_third_derivatives_equal_the_eager_pair():
    """A ReLU-pool inside a smooth function: grad-of-grad and one order more match eager."""
    x = _input((2, 3, 6, 5), torch.float64, seed=1, ties=False)
    w = torch.randn(2, 3, 3, 2, dtype=torch.float64)

    def derivatives(pool):
        xx = x.clone().requires_grad_()
        loss = (w * pool(xx * xx.sin())).pow(3).sum()
        (g1,) = torch.autograd.grad(loss, xx, create_graph=True)
        (g2,) = torch.autograd.grad(g1.pow(2).sum(), xx, create_graph=True)
        (g3,) = torch.autograd.grad(g2.sin().sum(), xx)
        return g1, g2, g3

    for fused, ref in zip(derivatives(relu_maxpool2d), derivatives(eager)):
        torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-14)


@needs_kernel
def test_gradcheck_and_gradgradcheck():
    # Away from ties and the ReLU kink the op is smooth (piecewise linear): finite differences
    # with eps 1e-6 stay inside one piece.
    x = torch.tensor([0.3, -0.2, 1.1, 0.7, -1.0, 0.05, 2.0, -0.4, 0.9, 0.1, -0.3, 0.6],
                     dtype=torch.float64).view(1, 1, 3, 4).requires_grad_()  # fmt: skip
    assert torch.autograd.gradcheck(relu_maxpool2d, (x,))
    assert torch.autograd.gradgradcheck(relu_maxpool2d, (x,))


@needs_kernel
def test_scatter_and_gather_are_transposes():
    ext = _backend.extension()
    x = _input((2, 3, 7, 6), torch.float64, seed=2)
    _, code = ext.relu_maxpool2d_forward(x)
    g = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    v = torch.randn_like(x)
    lhs = (ext.relu_maxpool2d_scatter(g, code, 7, 6) * v).sum()
    rhs = (g * ext.relu_maxpool2d_gather(v, code)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-13, atol=1e-13)


@needs_kernel
def test_nan_follows_max_pool_rules():
    x = torch.tensor([[[[1.0, float("nan"), 2.0, 3.0], [0.5, 0.1, -1.0, float("nan")]]]])
    xf, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    yf, ye = relu_maxpool2d(xf), eager(xe)
    torch.testing.assert_close(yf, ye, equal_nan=True)
    (gf,) = torch.autograd.grad(yf, xf, torch.ones_like(yf))
    (ge,) = torch.autograd.grad(ye, xe, torch.ones_like(ye))
    assert torch.equal(gf, ge)


def test_other_inputs_run_the_reference_composition():
    x = _input((2, 3, 6, 6), torch.float32).to(memory_format=torch.channels_last)
    assert torch.equal(relu_maxpool2d(x), eager(x))
    with _backend.use_backend("reference"):
        y = _input((2, 3, 5, 5), torch.float64)
        assert torch.equal(relu_maxpool2d(y), eager(y))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="floating"):
        relu_maxpool2d(torch.zeros(1, 1, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        relu_maxpool2d(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="H, W >= 2"):
        relu_maxpool2d(torch.zeros(1, 1, 1, 4))


def test_fuse_relu_pool_keeps_state_and_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3),  # other geometry: left alone
        nn.Flatten(),
    ).double()
    keys = list(model.state_dict())
    x = torch.randn(2, 1, 9, 9, dtype=torch.float64)
    before = model(x)
    fuse_relu_pool(model)
    assert isinstance(model[1], FusedReLUMaxPool2d) and isinstance(model[2], nn.Identity)
    assert type(model[4]) is nn.ReLU and type(model[5]) is nn.MaxPool2d
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_entries_equal_the_kernels(shape):
    """The implementation table's reference entries (reference/relu_pool.py) are the kernels'
    pure-torch forms: the same y, code, scatter and gather, exactly, NaN and ties included."""
    ext = _backend.extension()
    x = _input(shape, torch.float64, seed=3)
    x.view(-1)[3] = float("nan")
    y, code = ext.relu_maxpool2d_forward(x)
    ref_y, ref_code = reference.relu_maxpool2d_forward(x)
    assert torch.equal(code, ref_code)
    torch.testing.assert_close(ref_y, y, rtol=0, atol=0, equal_nan=True)
    g = torch.randn(y.shape, dtype=torch.float64)
    v = torch.randn(shape, dtype=torch.float64)
    assert torch.equal(
        reference.relu_maxpool2d_scatter(g, code, *shape[2:]),
        ext.relu_maxpool2d_scatter(g, code, *shape[2:]),
    )
    assert torch.equal(reference.relu_maxpool2d_gather(v, code), ext.relu_maxpool2d_gather(v, code))


def test_a_forced_backend_without_a_kernel_runs_the_reference_composition():
    """relu_maxpool2d has only a cpu kernel: forcing triton where it runs on CPU tensors (the
    interpreter) runs the reference composition (documented in ops/relu_pool.py) instead of
    raising; a forced backend that cannot run on the device at all still raises."""
    x = _input((2, 3, 6, 6), torch.float64)
    if _backend.why_unavailable("triton", x.device) is None:
        with _backend.use_backend("triton"):
            assert torch.equal(relu_maxpool2d(x), eager(x))
    with _backend.use_backend("cuda"), pytest.raises(_backend.BackendUnavailableError):
        relu_maxpool2d(x)
