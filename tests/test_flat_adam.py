"""flat_adam (Adam, AdamW, clip + Adam): every backend against the reference, fused backward,
float64 gradcheck, zero-safe roots, trajectories against torch.optim, in-place forms, input
validation (shared bodies: tests/_flat_optim_cases.py)."""

import math

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
    _zero_state,
)
from _shapes import FLAT_SIZES
from _tolerances import elementwise

from sophon_fast import _backend
from sophon_fast.ops import _triton
from sophon_fast.ops import flat_optim as ops
from sophon_fast.reference import flat_optim as reference

UPDATES = ("adam", "adamw")


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


@pytest.mark.parametrize(("backend", "device"), FUSED)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("update", UPDATES)
def test_denormal_second_moments_give_the_reference_gradients(backend, device, dtype, update):
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


@pytest.mark.parametrize("update", UPDATES)
def test_step_on_another_device_than_params_is_refused(update):
    cases.check_step_on_another_device_than_params_is_refused(update)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("update", UPDATES)
def test_gradgradcheck_float64(backend, device, update):
    cases.check_gradgradcheck_float64(backend, device, update)


@pytest.mark.ext
@pytest.mark.skipif(_backend.extension() is None, reason="compiled extension unavailable")
@pytest.mark.parametrize("update", ("adamw",))
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
@pytest.mark.parametrize("update", ("adam",))
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
def test_zero_second_moment_gives_finite_gradients(backend, device):
    # A gradient entry that is exactly 0 (a dead ReLU) leaves v' = 0: the zero-safe root must
    # give a 0 derivative there, not inf * 0 = NaN in the meta-gradient.
    zeros = torch.zeros(4, dtype=torch.float64, device=device)
    inputs = [zeros.clone().requires_grad_(True) for _ in range(4)]
    with _backend.use_backend(backend):
        out = ops.flat_adam_step(*inputs, _step(0, torch.float64, device), 0.1)
        grads = torch.autograd.grad(out[0].sum(), inputs)
    assert all(torch.isfinite(g).all() for g in grads)


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


def test_bias_correction_is_exact_in_float32():
    # 1 - 0.999^t rounded in float32 would lose 1e-5 of its value; the reference (and every
    # kernel) computes it in float64 like torch.optim.
    step_size, root = reference.adam_bias_corrections(
        torch.tensor(0.0), 1.0, (0.9, 0.999), torch.float32, "cpu"
    )
    assert math.isclose(step_size.item(), 10.0, rel_tol=1e-7)
    assert math.isclose(root.item(), math.sqrt(1e-3), rel_tol=1e-7)


@pytest.mark.parametrize("form", ("adam", "clip_adam"))
def test_in_place_forms_move_a_host_step_to_the_params_device_once(form):
    cases.check_in_place_forms_move_a_host_step_to_the_params_device_once(form)


@pytest.mark.ext
@pytest.mark.skipif(_backend.extension() is None, reason="compiled extension unavailable")
@pytest.mark.parametrize(
    ("update", "weight_decay", "expected"),
    [
        ("adam", 0.0, 4),  # grad, exp_avg, exp_avg_sq, step
        ("adam", 0.05, 5),  # + params: L2 decay puts params into d
        ("adamw", 0.05, 4),  # decoupled decay: params not needed
    ],
)
def test_saves_only_what_the_backward_recomputes_from(update, weight_decay, expected):
    cases.check_saves_only_what_the_backward_recomputes_from(update, weight_decay, expected)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: ops.flat_adam_step(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.tensor(0.0), 0.1, betas=(0.9, 1.0)),
         ValueError, r"betas\[1\] must be in \[0, 1\)"),
        (lambda: ops.flat_adam_step(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.tensor(0.0), float("inf")),
         ValueError, "lr must be finite"),
        (lambda: ops.flat_adam_step(torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), torch.zeros(4), torch.zeros(4), torch.tensor(0.0), 0.1),
         TypeError, "exp_avg must be torch.float64"),
        (lambda: ops.flat_adamw_step(torch.zeros(8)[::2], torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.tensor(0.0), 0.1),
         ValueError, "params must be contiguous"),
        (lambda: ops.flat_clip_adam_step_(torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.tensor(0.0), 0.1, max_norm=-1.0),
         ValueError, "max_norm must be >= 0"),
    ],
)  # fmt: skip
def test_bad_inputs_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
