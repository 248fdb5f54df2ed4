"""flat_adagrad: every backend against the reference, fused backward, float64 gradcheck and
gradgradcheck, zero-safe roots, trajectories against torch.optim.Adagrad (lr_decay, weight decay,
a nonzero starting sum), in-place forms, input validation (shared bodies:
tests/_flat_optim_cases.py)."""

import math

import _flat_optim_cases as cases
import pytest
import torch
from _backends import backend_params
from _flat_optim_cases import DTYPES, FUSED, _step
from _shapes import FLAT_SIZES
from _tolerances import elementwise

from sophon_fast import _backend
from sophon_fast.ops import _triton
from sophon_fast.ops import flat_optim as ops
from sophon_fast.reference import flat_optim as reference

UPDATES = ("adagrad",)


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
def test_denormal_sums_give_the_reference_gradients(backend, device, dtype, update):
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
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_nonzero_starting_sum_matches_torch_optim(backend, device, dtype):
    # torch.optim.Adagrad's initial_accumulator_value is the starting state_sum of the flat op.
    steps, n, initial = 6, 37, 0.3
    gen = torch.Generator().manual_seed(8)
    start = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    grads = [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for _ in range(steps)]
    grads[1][:3] = 0.0
    torch_param = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adagrad([torch_param], lr=0.1, lr_decay=0.2, eps=1e-10,
                                    initial_accumulator_value=initial)  # fmt: skip
    for g in grads:
        torch_param.grad = g.clone()
        optimizer.step()
    params = start.to(device)
    state_sum = torch.full((n,), initial, dtype=ops.state_dtype(dtype), device=device)
    step = _step(0, dtype, device)
    with _backend.use_backend(backend):
        for g in grads:
            ops.flat_adagrad_step_(params, g.to(device), state_sum, step, 0.1, lr_decay=0.2)
    assert step.item() == steps
    rtol, atol = elementwise(dtype).values()
    torch.testing.assert_close(
        params.cpu() - start, torch_param.detach() - start, rtol=steps * rtol, atol=steps * atol
    )
    torch.testing.assert_close(
        state_sum.cpu(), optimizer.state[torch_param]["sum"].to(state_sum.dtype), rtol=rtol,
        atol=atol,
    )  # fmt: skip


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("update", UPDATES)
def test_out_buffers(backend, device, update):
    cases.check_out_buffers(backend, device, update)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("size", (1, 37, 1000))
def test_in_place_equals_out_of_place(backend, device, size):
    params, grad, (state_sum,) = cases._inputs("adagrad", size, torch.float32, device)
    step = _step(3, torch.float32, device)
    hp = cases.HYPER["adagrad"]
    with _backend.use_backend(backend):
        new, new_sum = ops.flat_adagrad_step(params, grad, state_sum, step, **hp)
        ops.flat_adagrad_step_(params, grad, state_sum, step, **hp)
    assert torch.equal(params, new) and torch.equal(state_sum, new_sum)
    assert step.item() == 4


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_zero_sum_gives_finite_gradients(backend, device):
    # A gradient entry that is exactly 0 (a dead ReLU) at a zero sum leaves s' = 0: the
    # zero-safe root gives a 0 derivative there, not inf * 0 = NaN.
    zeros = torch.zeros(4, dtype=torch.float64, device=device)
    inputs = [zeros.clone().requires_grad_(True) for _ in range(3)]
    with _backend.use_backend(backend):
        out = ops.flat_adagrad_step(*inputs, _step(0, torch.float64, device), 0.1)
        grads = torch.autograd.grad(out[0].sum() + out[1].sum(), inputs)
    assert all(torch.isfinite(g).all() for g in grads)


def test_decayed_learning_rate_is_computed_in_float64():
    # lr / (1 + step * lr_decay) rounded once, as torch.optim computes it on the host.
    clr = reference.adagrad_learning_rate(torch.tensor(3.0), 0.1, 0.07, torch.float32, "cpu")
    assert clr.dtype == torch.float32
    assert clr.item() == float(torch.tensor(0.1 / (1 + 3 * 0.07), dtype=torch.float32))
    assert math.isclose(clr.item(), 0.1 / 1.21, rel_tol=1e-7)


@pytest.mark.parametrize("update", UPDATES)
def test_step_on_another_device_than_params_is_refused(update):
    cases.check_step_on_another_device_than_params_is_refused(update)


def test_in_place_forms_move_a_host_step_to_the_params_device_once():
    cases.check_in_place_forms_move_a_host_step_to_the_params_device_once("adagrad")


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
        ("adagrad", 0.0, 3),  # grad, state_sum, step
        ("adagrad", 0.05, 4),  # + params: L2 decay puts params into d
    ],
)
def test_saves_only_what_the_backward_recomputes_from(update, weight_decay, expected):
    cases.check_saves_only_what_the_backward_recomputes_from(update, weight_decay, expected)


@pytest.mark.ext
@pytest.mark.skipif(_backend.extension() is None, reason="compiled extension unavailable")
def test_extension_checks_inputs_itself():
    ext, z, s = _backend.extension(), torch.zeros(4), torch.tensor(0.0)
    with pytest.raises(ValueError, match="needs params"):
        ext.flat_adagrad_step_backward(z, z, None, z, z, s, 0.1, 0.0, 0.1, 1e-10)
    with pytest.raises(ValueError, match="step must be a 0-d tensor"):
        ext.flat_adagrad_step_forward(z, z, z, torch.zeros(3), 0.1, 0.0, 0.0, 1e-10)
    with pytest.raises(ValueError, match="out must hold 2 buffers"):
        ext.flat_adagrad_step_forward(z, z, z, s, 0.1, 0.0, 0.0, 1e-10, out=[z])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: ops.flat_adagrad_step(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.tensor(0.0), 0.1, lr_decay=-0.1),
         ValueError, "lr_decay must be >= 0"),
        (lambda: ops.flat_adagrad_step(torch.zeros(4), torch.zeros(4), torch.zeros(4, dtype=torch.float64), torch.tensor(0.0), 0.1),
         TypeError, "state_sum must be torch.float32"),
        (lambda: ops.flat_adagrad_step(torch.zeros(4), torch.zeros(4), torch.zeros(4), 0.0, 0.1),
         TypeError, "step must be a 0-d torch.Tensor"),
        (lambda: ops.flat_adagrad_step(torch.zeros(4), torch.zeros(4), torch.zeros(5), torch.tensor(0.0), 0.1),
         ValueError, "state_sum has 5 elements but params has 4"),
    ],
)  # fmt: skip
def test_bad_inputs_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
