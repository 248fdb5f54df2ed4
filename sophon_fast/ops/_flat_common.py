"""What the fused flat optimizer ops share: launch geometry, the Triton scalar and zero-safe-root
helpers, the input checks and the differentiable VJP of the double-backward path.

One module per optimizer uses these (:mod:`.flat_momentum`, :mod:`.flat_adam`,
:mod:`.flat_rmsprop`, :mod:`.flat_adagrad`, :mod:`.flat_adadelta`, :mod:`.flat_accumulate`);
:mod:`.flat_optim` re-exports the public ops.
Every buffer is a (n_params,) flat tensor (float32, float64, float16 or bfloat16) with float32
state (float64 for float64 parameters); maths in the state dtype. ``step`` is a 0-d tensor on the
params' device holding the number of updates taken before this one, read by the kernels
(t = step + 1), so nothing synchronises with the host.
"""

from __future__ import annotations

import torch

from ..reference.flat_common import state_dtype
from . import _triton
from ._checks import check_flat_buffer, check_like, check_real

__all__ = [
    "GPU_BLOCK",
    "GPU_WARPS",
    "INTERPRETER_BLOCK",
    "adopt_step",
    "check_fraction",
    "check_out",
    "check_state",
    "check_step",
    "differentiable_vjp",
    "empty_outputs",
    "geometry",
    "hp_scalar",
    "is_f64",
    "launch",
    "safe_root",
    "state_dtype",
]

# Elements per program under the interpreter: each program is one Python iteration over numpy
# arrays, so large blocks keep the tests fast on the CPU.
INTERPRETER_BLOCK = 4096
# Compiled: 1024 elements over 8 warps (4 per thread). ptxas -v of all 69 kernel variants the
# launchers make (dtypes x flags), sm_80 and sm_90: no spills, at most 110 registers (float64
# Adam backward). 1024 over 4 warps: 187 registers there and a 4 B spill (bfloat16 Adam backward,
# sm_80); 2048 over 4 warps: 240-396 B spills; the interpreter's 4096: up to 16 KiB per thread.
# The Adagrad and Adadelta kernels (make triton-check, 8 variants each per target): no spills,
# at most 122 registers (float64 Adadelta backward, two roots).
GPU_BLOCK, GPU_WARPS = 1024, 8

tl = _triton.tl

# ---------------------------------------------------------------------------------------- kernels
#
# Float hyper-parameters are declared ``tl.float64``: compiled Triton passes an undeclared Python
# float as float32, which puts a 1e-8 relative error into every float64 step (lr = 0.1 becomes
# 0.10000000149). hp_scalar rounds each once to the compute dtype, as the C++/CUDA kernels do.


@_triton.jit
def hp_scalar(value, ctype: tl.constexpr):
    # A Python float under the interpreter, a float64 scalar when compiled: either rounds once.
    return tl.full((), value, ctype)


@_triton.jit
def safe_root(x, COMPUTE_F64: tl.constexpr):
    """(root, positive, divisor): root = sqrt(max(x, 0)) rounded as IEEE sqrt; positive = root > 0;
    divisor = root where positive, else 1 (the zero-safe root of the reference and C++ kernels).

    float32 tl.sqrt compiles to sqrt.approx.ftz.f32, which flushes a denormal x to a 0 root while
    x > 0 still holds: 0.5 / root was inf in the backward. sqrt_rn (sqrt.rn.f32) keeps denormals
    (float64 tl.sqrt is sqrt.rn.f64 already), and the mask comes from the root itself, so a root
    that is 0 for any reason is masked, never divided by.
    """
    x = tl.where(x > 0, x, 0.0)
    if COMPUTE_F64:
        root = tl.sqrt(x)
    else:
        root = tl.sqrt_rn(x)
    positive = root > 0
    return root, positive, tl.where(positive, root, 1.0)


# ---------------------------------------------------------------------------------- launch shape


def geometry() -> tuple[int, int]:
    """(elements per program, num_warps) of the element-wise kernels in this Triton mode."""
    return (INTERPRETER_BLOCK, 4) if _triton.INTERPRETED else (GPU_BLOCK, GPU_WARPS)


def launch(kernel, n, args, **constexprs):
    """``kernel`` over n elements, one program per block, on args[0]'s device."""
    block, warps = geometry()
    with _triton.launch_device(args[0]):
        kernel[(-(-n // block),)](*args, **constexprs, BLOCK_SIZE=block, num_warps=warps)


def is_f64(t: torch.Tensor) -> bool:
    return t.dtype == torch.float64


def empty_outputs(params, *states):
    return (torch.empty_like(params), *(torch.empty_like(s) for s in states))


def differentiable_vjp(forward, inputs, grad_outputs):
    """VJPs of ``forward`` at ``inputs`` with a graph (create_graph=True) to differentiate them.

    The Functions' backward runs this on the reference twin when the backward itself is
    differentiated (create_graph=True: gradgradcheck, a third-order objective): a second-order
    meta-gradient passes through an inner update once (docs/DESIGN.md, section 1), so the fused
    backward kernels are first-order, and this path is correct to any order at eager speed.
    """
    inputs = [x if x.requires_grad else x.detach().requires_grad_(True) for x in inputs]
    outputs = forward(*inputs)
    grads = torch.autograd.grad(outputs, inputs, grad_outputs, create_graph=True, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads))


# ---------------------------------------------------------------------------------------- checks


def check_state(params, state, name, ref_name="params"):
    check_flat_buffer(state, name)
    expected = state_dtype(params.dtype)
    if state.numel() != params.numel():
        raise ValueError(
            f"{name} has {state.numel()} elements but {ref_name} has {params.numel()}; "
            "they must match"
        )
    if state.dtype != expected:
        raise TypeError(
            f"{name} must be {expected} for {params.dtype} {ref_name} (state is kept in float32, "
            f"float64 for float64 {ref_name}), got {state.dtype}"
        )
    if state.device != params.device:
        raise ValueError(
            f"{name} is on {state.device} but {ref_name} is on {params.device}; "
            "they must be on the same device"
        )


def check_step(params, step):
    if not isinstance(step, torch.Tensor):
        raise TypeError(
            f"step must be a 0-d torch.Tensor (the count of steps taken, kept on the device), "
            f"got {type(step).__name__}"
        )
    if step.numel() != 1 or step.dim() > 1:
        raise ValueError(f"step must be a 0-d tensor, got shape {tuple(step.shape)}")
    if not step.is_floating_point():
        raise TypeError(
            f"step must be a floating tensor (as torch.optim keeps it), got {step.dtype}"
        )
    if step.device != params.device:
        raise ValueError(
            f"step is on {step.device} but params is on {params.device}; keep the count on the "
            "params' device (the kernels read it there: a step elsewhere would be copied, with a "
            "host synchronisation, on every call, and could not be captured in a CUDA graph)"
        )


def adopt_step(params, step):
    """Move ``step`` to the params' device in place, once (the in-place ops own their state, as
    ``Module.to`` owns its parameters): torch.optim keeps the count on the CPU unless fused or
    capturable, and every later call then finds it on the device."""
    tensors = isinstance(step, torch.Tensor) and isinstance(params, torch.Tensor)
    if tensors and step.device != params.device:
        try:
            step.data = step.detach().to(params.device)
        except RuntimeError as error:  # e.g. meta: not a dense tensor a CPU one can become
            raise ValueError(
                f"step is on {step.device} but params is on {params.device}, and it cannot be "
                f"moved there in place ({error}); create it on {params.device}"
            ) from None


def check_fraction(value, name):
    value = check_real(value, name, minimum=0.0)
    if value >= 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def check_out(params, states, out, differentiable_inputs, names):
    if len(out) != 1 + len(states):
        raise ValueError(f"out must be a tuple of {1 + len(states)} buffers ({', '.join(names)})")
    check_like(params, "params", out[0], "out[0]")
    for i in range(len(states)):
        check_state(params, out[i + 1], f"out[{i + 1}]")
    if torch.is_grad_enabled() and any(t.requires_grad for t in differentiable_inputs):
        raise ValueError(
            "out= is not differentiable: an input requires grad; call without out= "
            "(or under torch.no_grad()) to get a differentiable step"
        )
