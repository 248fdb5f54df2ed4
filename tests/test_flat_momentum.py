"""flat_momentum (momentum SGD, heavy ball and Nesterov): every backend against the reference,
fused backward, float64 gradcheck, trajectories against torch.optim.SGD, in-place forms, input
validation (shared bodies: tests/_flat_optim_cases.py)."""

import _flat_optim_cases as cases
import pytest
import torch
from _backends import backend_params
from _flat_optim_cases import (
    DTYPES,
    FUSED,
    _call,
    _inputs,
    _step,
)
from _shapes import FLAT_SIZES
from _tolerances import elementwise

from sophon_fast import _backend
from sophon_fast.ops import _triton
from sophon_fast.ops import flat_optim as ops
from sophon_fast.reference import flat_optim as reference

UPDATES = ("momentum", "nesterov")


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", FLAT_SIZES)
@pytest.mark.parametrize("update", UPDATES)
def test_forward_matches_reference(backend, device, dtype, n, update):
    cases.check_forward_matches_reference(backend, device, dtype, n, update)


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("n", (7, 1023))
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
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("in_place", (False, True), ids=("out_of_place", "in_place"))
def test_trajectory_matches_torch_optim(backend, device, dtype, update, in_place):
    cases.check_trajectory_matches_torch_optim(backend, device, dtype, update, in_place)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("update", UPDATES)
def test_out_buffers(backend, device, update):
    cases.check_out_buffers(backend, device, update)


@pytest.mark.parametrize("update", ("momentum",))
def test_step_on_another_device_than_params_is_refused(update):
    cases.check_step_on_another_device_than_params_is_refused(update)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("update", UPDATES)
def test_gradgradcheck_float64(backend, device, update):
    cases.check_gradgradcheck_float64(backend, device, update)


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
@pytest.mark.parametrize("update", ("momentum",))
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


@pytest.mark.parametrize("form", ("momentum",))
def test_in_place_forms_move_a_host_step_to_the_params_device_once(form):
    cases.check_in_place_forms_move_a_host_step_to_the_params_device_once(form)


@pytest.mark.ext
@pytest.mark.skipif(_backend.extension() is None, reason="compiled extension unavailable")
@pytest.mark.parametrize(
    ("update", "weight_decay", "expected"),
    [
        ("momentum", 0.05, 1),  # step only: the update is linear
    ],
)
def test_saves_only_what_the_backward_recomputes_from(update, weight_decay, expected):
    cases.check_saves_only_what_the_backward_recomputes_from(update, weight_decay, expected)


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
    ],
)  # fmt: skip
def test_bad_inputs_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
