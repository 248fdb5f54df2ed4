"""flat_adadelta: every backend against the reference, fused backward, float64 gradcheck and
gradgradcheck, trajectories against torch.optim.Adadelta, in-place forms, input validation
(shared bodies: tests/_flat_optim_cases.py)."""

import _flat_optim_cases as cases
import pytest
import torch
from _backends import backend_params
from _flat_optim_cases import DTYPES, FUSED
from _shapes import FLAT_SIZES

from sophon_fast import _backend
from sophon_fast.ops import _triton
from sophon_fast.ops import flat_optim as ops

UPDATES = ("adadelta",)


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", FLAT_SIZES)
@pytest.mark.parametrize("update", UPDATES)
def test_forward_matches_reference(backend, device, dtype, n, update):
    cases.check_forward_matches_reference(backend, device, dtype, n, update)


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("n", (1, 7, 37, 1023))
@pytest.mark.parametrize("update", UPDATES)
def test_fused_backward_matches_reference(backend, device, dtype, n, update):
    cases.check_fused_backward_matches_reference(backend, device, dtype, n, update)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("first", (True, False), ids=("step0", "step2"))
@pytest.mark.parametrize("weight_decay", (0.0, 0.05))
def test_gradcheck_float64(backend, device, update, first, weight_decay):
    cases.check_gradcheck_float64(backend, device, update, first, weight_decay)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("update", UPDATES)
def test_gradgradcheck_float64(backend, device, update):
    cases.check_gradgradcheck_float64(backend, device, update)


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("update", UPDATES)
def test_denormal_square_averages_give_the_reference_gradients(backend, device, dtype, update):
    cases.check_denormal_second_moments_give_the_reference_gradients(backend, device, dtype, update)


@pytest.mark.triton
@pytest.mark.skipif(
    _triton.mode() != "interpreted", reason="emulates a GPU instruction under the interpreter"
)
@pytest.mark.parametrize("update", UPDATES)
def test_triton_backward_does_not_depend_on_a_flushing_sqrt(update, monkeypatch):
    cases.check_triton_backward_does_not_depend_on_a_flushing_sqrt(update, monkeypatch)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("in_place", (False, True), ids=("out_of_place", "in_place"))
def test_trajectory_matches_torch_optim(backend, device, dtype, update, in_place):
    cases.check_trajectory_matches_torch_optim(backend, device, dtype, update, in_place)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("update", UPDATES)
def test_out_buffers(backend, device, update):
    cases.check_out_buffers(backend, device, update)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("size", (1, 37, 1000))
def test_in_place_equals_out_of_place(backend, device, size):
    params, grad, (square_avg, acc_delta) = cases._inputs("adadelta", size, torch.float32, device)
    hp = cases.HYPER["adadelta"]
    with _backend.use_backend(backend):
        expected = ops.flat_adadelta_step(params, grad, square_avg, acc_delta, **hp)
        got = ops.flat_adadelta_step_(params, grad, square_avg, acc_delta, **hp)
    assert got is params
    for g, e in zip((params, square_avg, acc_delta), expected):
        assert torch.equal(g, e)


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_zero_eps_and_zero_state_give_finite_gradients_where_torch_is_finite(backend, device):
    # eps = 0 with a zero accumulated update: delta = 0 / sqrt(v') * d = 0 and the zero-safe root
    # of acc_delta gives a 0 derivative there (the plain root's inf would make the VJP NaN).
    p, g, v = (torch.full((4,), x, dtype=torch.float64, device=device) for x in (0.5, 1.0, 1.0))
    inputs = [t.clone().requires_grad_(True) for t in (p, g, v, torch.zeros_like(p))]
    with _backend.use_backend(backend):
        out = ops.flat_adadelta_step(*inputs, 1.0, 0.9, 0.0)
        grads = torch.autograd.grad(out[0].sum() + out[2].sum(), inputs)
    assert torch.equal(out[0].detach(), p)
    assert all(torch.isfinite(x).all() for x in grads)


@pytest.mark.ext
@pytest.mark.skipif(_backend.extension() is None, reason="compiled extension unavailable")
@pytest.mark.parametrize("update", UPDATES)
def test_large_out_buffers_take_the_streaming_store_path(update):
    cases.check_large_out_buffers_take_the_streaming_store_path(update)


@pytest.mark.ext
@pytest.mark.skipif(_backend.extension() is None, reason="compiled extension unavailable")
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("n", (1, 7, 37, 1027))
@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("first", (False, True))
def test_packed_forwards_give_the_same_bits_in_both_isa_builds(
    update, dtype, n, first, monkeypatch
):
    cases.check_packed_forwards_give_the_same_bits_in_both_isa_builds(
        update, dtype, n, first, monkeypatch
    )


@pytest.mark.ext
@pytest.mark.skipif(_backend.extension() is None, reason="compiled extension unavailable")
@pytest.mark.parametrize("offsets", ((1, 1, 1), (3, 0, 5)), ids=("aligned-together", "misaligned"))
@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("portable", (False, True), ids=("avx2", "baseline"))
def test_streamed_out_buffers_at_odd_offsets(update, offsets, portable, monkeypatch):
    cases.check_streamed_out_buffers_at_odd_offsets(update, offsets, portable, monkeypatch)


@pytest.mark.ext
@pytest.mark.skipif(_backend.extension() is None, reason="compiled extension unavailable")
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("n", (7, 37, 1027))
@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("weight_decay", (0.0, 0.05))
def test_packed_backwards_give_the_same_bits_in_both_isa_builds(
    update, dtype, n, weight_decay, monkeypatch
):
    cases.check_packed_backwards_give_the_same_bits_in_both_isa_builds(
        update, dtype, n, weight_decay, monkeypatch
    )


@pytest.mark.triton
@pytest.mark.skipif(
    _triton.mode() != "interpreted",
    reason="emulates compiled argument typing under the interpreter",
)
@pytest.mark.parametrize("update", UPDATES)
def test_float64_hyper_parameters_reach_compiled_kernels_in_float64(update, monkeypatch):
    cases.check_float64_hyper_parameters_reach_compiled_kernels_in_float64(update, monkeypatch)


@pytest.mark.ext
@pytest.mark.skipif(_backend.extension() is None, reason="compiled extension unavailable")
@pytest.mark.parametrize(
    ("update", "weight_decay", "expected"),
    [
        ("adadelta", 0.0, 3),  # grad, square_avg, acc_delta
        ("adadelta", 0.05, 4),  # + params: L2 decay puts params into d
    ],
)
def test_saves_only_what_the_backward_recomputes_from(update, weight_decay, expected):
    cases.check_saves_only_what_the_backward_recomputes_from(update, weight_decay, expected)


@pytest.mark.ext
@pytest.mark.skipif(_backend.extension() is None, reason="compiled extension unavailable")
def test_extension_checks_inputs_itself():
    ext, z = _backend.extension(), torch.zeros(4)
    with pytest.raises(ValueError, match="needs params"):
        ext.flat_adadelta_step_backward(z, z, z, None, z, z, z, 1.0, 0.9, 1e-6, 0.1)
    with pytest.raises(ValueError, match="acc_delta has 3 elements but params has 4"):
        ext.flat_adadelta_step_forward(z, z, z, torch.zeros(3), 1.0, 0.9, 1e-6, 0.0)
    with pytest.raises(ValueError, match="out must hold 3 buffers"):
        ext.flat_adadelta_step_forward(z, z, z, z, 1.0, 0.9, 1e-6, 0.0, out=[z])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: ops.flat_adadelta_step(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4), rho=1.0),
         ValueError, r"rho must be in \[0, 1\)"),
        (lambda: ops.flat_adadelta_step(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4), eps=-1.0),
         ValueError, "eps must be >= 0"),
        (lambda: ops.flat_adadelta_step(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(2, 2)),
         ValueError, "acc_delta must be a 1-D flat buffer"),
    ],
)  # fmt: skip
def test_bad_inputs_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
