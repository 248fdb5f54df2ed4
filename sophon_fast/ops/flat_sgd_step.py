"""flat_sgd_step: one fused, out-of-place, differentiable SGD step on a flat parameter buffer.

Maths (maths in float32 for float32/float16/bfloat16 storage, float64 for float64):

    forward   params' = params - lr * (grad + weight_decay * params)
    backward  d_params = (1 - lr * weight_decay) * d_out,   d_grad = -lr * d_out

Memory traffic at float32: forward reads params and grad and writes params' (12 B/param); the fused
backward reads d_out once and writes both products (12 B/param), or only d_grad when
weight_decay == 0, where d_params is d_out itself (8 B/param). The eager per-tensor update that
MAML libraries run (``p - lr * g`` per tensor) costs 20 B/param plus one launch per tensor per op.

Nothing is saved for backward: the Jacobian is the constant pair (1 - lr*wd, -lr). The backward is
itself an autograd Function whose transpose is the forward op again, so the step is differentiable
to any order (second-order meta-learning differentiates through it under create_graph=True).
"""

import torch

from .. import _backend
from ..reference import flat_sgd_step as _reference
from . import _library, _triton
from ._checks import check_flat_buffer, check_like, check_real
from .flat_optim import geometry

OP_NAME = "flat_sgd_step"
# Launch geometry and device: flat_optim's (4096-element blocks under the interpreter; 1024 over 8
# warps compiled: ptxas -v, sm_80/sm_90, at most 30 registers here and no spills).

tl = _triton.tl


@_triton.jit
def _flat_sgd_step_forward_kernel(
    params_ptr,
    grad_ptr,
    out_ptr,
    n_elements,
    lr: tl.float64,
    weight_decay: tl.float64,
    COMPUTE_F64: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    # float64 stays float64; every narrower dtype computes in float32. lr and weight_decay are
    # declared float64 (compiled Triton passes an undeclared Python float as float32: 1e-8 off in
    # a float64 step) and rounded once to the compute dtype.
    ctype = tl.float64 if COMPUTE_F64 else tl.float32
    lr, weight_decay = tl.full((), lr, ctype), tl.full((), weight_decay, ctype)
    p = tl.load(params_ptr + offsets, mask=mask).to(ctype)
    g = tl.load(grad_ptr + offsets, mask=mask).to(ctype)
    out = p - lr * (g + weight_decay * p)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@_triton.jit
def _flat_sgd_step_backward_kernel(
    grad_out_ptr,
    grad_params_ptr,
    grad_grad_ptr,
    n_elements,
    lr: tl.float64,
    weight_decay: tl.float64,
    WRITE_PARAMS: tl.constexpr,
    COMPUTE_F64: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    ctype = tl.float64 if COMPUTE_F64 else tl.float32
    lr, weight_decay = tl.full((), lr, ctype), tl.full((), weight_decay, ctype)
    d = tl.load(grad_out_ptr + offsets, mask=mask).to(ctype)
    if WRITE_PARAMS:
        grad_params = (1.0 - lr * weight_decay) * d
        tl.store(
            grad_params_ptr + offsets, grad_params.to(grad_params_ptr.dtype.element_ty), mask=mask
        )
    grad_grad = -lr * d
    tl.store(grad_grad_ptr + offsets, grad_grad.to(grad_grad_ptr.dtype.element_ty), mask=mask)


def _triton_forward(params, grad, lr, weight_decay, out=None):
    out = torch.empty_like(params) if out is None else out
    n = params.numel()
    if n:
        f64 = params.dtype == torch.float64
        block, warps = geometry()
        with _triton.launch_device(params):
            _flat_sgd_step_forward_kernel[(-(-n // block),)](
                params,
                grad,
                out,
                n,
                lr,
                weight_decay,
                COMPUTE_F64=f64,
                BLOCK_SIZE=block,
                num_warps=warps,
            )
    return out


def _triton_backward(grad_out, lr, weight_decay):
    write_params = weight_decay != 0.0
    grad_params = torch.empty_like(grad_out) if write_params else grad_out
    grad_grad = torch.empty_like(grad_out)
    n = grad_out.numel()
    if n:
        f64 = grad_out.dtype == torch.float64
        block, warps = geometry()
        with _triton.launch_device(grad_out):
            _flat_sgd_step_backward_kernel[(-(-n // block),)](
                grad_out,
                grad_params,
                grad_grad,
                n,
                lr,
                weight_decay,
                WRITE_PARAMS=write_params,
                COMPUTE_F64=f64,
                BLOCK_SIZE=block,
                num_warps=warps,
            )
    return grad_params, grad_grad


BACKWARD_OP = OP_NAME + ".backward"
_backend.register_op(
    OP_NAME,
    reference=_reference.flat_sgd_step,
    cpu="ext:flat_sgd_step_forward",
    cuda="ext:flat_sgd_step_forward",
    triton=_triton_forward,
)
_backend.register_op(
    BACKWARD_OP,
    reference=_reference.flat_sgd_step_backward,
    cpu="ext:flat_sgd_step_backward",
    cuda="ext:flat_sgd_step_backward",
    triton=_triton_backward,
)

_library.define(
    OP_NAME,
    "(Tensor params, Tensor grad, float lr, float weight_decay) -> Tensor",
    lambda params, grad, lr, weight_decay: torch.empty_like(params),
)
_library.define(
    BACKWARD_OP,
    "(Tensor grad_out, float lr, float weight_decay) -> (Tensor, Tensor)",
    lambda grad_out, lr, weight_decay: (torch.empty_like(grad_out), torch.empty_like(grad_out)),
)


def _probe_args(device: torch.device) -> tuple:
    """The auto dispatch's probe (sophon_fast._backend): a 7-element step with weight decay."""
    params = torch.linspace(-1.0, 1.0, 7, device=device)
    grad = torch.linspace(0.5, -0.5, 7, device=device)
    return params, grad, 0.25, 0.5


_backend.register_probe(OP_NAME, _probe_args)


class FlatSgdStepFunction(torch.autograd.Function):
    """params' = params - lr * (grad + weight_decay * params), fused forward and backward."""

    @staticmethod
    def forward(ctx, params, grad, lr, weight_decay, backend):
        ctx.lr, ctx.weight_decay, ctx.backend = lr, weight_decay, backend
        return _library.call(OP_NAME, backend, params, grad, lr, weight_decay)

    @staticmethod
    def backward(ctx, grad_out):
        grad_params, grad_grad = FlatSgdStepBackwardFunction.apply(
            grad_out.contiguous(), ctx.lr, ctx.weight_decay, ctx.backend
        )
        return grad_params, grad_grad, None, None, None


class FlatSgdStepBackwardFunction(torch.autograd.Function):
    """(d_params, d_grad) = ((1 - lr*wd) * d_out, -lr * d_out), one fused pass over d_out.

    Its own backward is (1 - lr*wd) * a - lr * b for incoming (a, b): exactly the forward op with
    params=a and grad=b, so every derivative order reuses the two fused kernels.
    """

    @staticmethod
    def forward(ctx, grad_out, lr, weight_decay, backend):
        ctx.lr, ctx.weight_decay, ctx.backend = lr, weight_decay, backend
        return _library.call(BACKWARD_OP, backend, grad_out, lr, weight_decay)

    @staticmethod
    def backward(ctx, grad_grad_params, grad_grad_grad):
        grad_grad_out = FlatSgdStepFunction.apply(
            grad_grad_params.contiguous(),
            grad_grad_grad.contiguous(),
            ctx.lr,
            ctx.weight_decay,
            ctx.backend,
        )
        return grad_grad_out, None, None, None


def flat_sgd_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    lr: float,
    weight_decay: float = 0.0,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One out-of-place SGD step on a flat parameter buffer, fused and differentiable.

    ``params' = params - lr * (grad + weight_decay * params)``, computed in float32 (float64 for
    float64 buffers) and returned in ``params.dtype``. Gradients flow to both ``params`` and
    ``grad`` (through any number of derivative orders), so the step can sit inside a second-order
    meta-learning graph.

    Args:
        params: (n_params,) contiguous float32, float64, float16 or bfloat16 buffer.
        grad: (n_params,) gradient: same dtype, size and device as ``params``, contiguous.
        lr: learning rate, a finite Python number.
        weight_decay: L2 coefficient >= 0 added to the gradient. Default 0.
        out: optional (n_params,) buffer (same dtype and device) to write the result into; it
            may be ``params`` itself (an in-place step). Not differentiable: refused while
            ``params`` or ``grad`` require grad under grad mode. Reusing a buffer avoids the
            page faults of a fresh allocation (on the CPU they cost more than the step).

    Returns:
        (n_params,) new parameter buffer (``out`` when given; otherwise ``params`` is not
        modified).

    Raises:
        TypeError: a tensor of the wrong dtype (or mismatched dtypes), or a non-number lr.
        ValueError: wrong shape, mismatched sizes or devices, non-contiguous input, non-finite
            lr, negative weight_decay.
        BackendUnavailableError: a forced backend cannot run on ``params.device``.
    """
    check_flat_buffer(params, "params")
    check_like(params, "params", grad, "grad")
    lr = check_real(lr, "lr")
    weight_decay = check_real(weight_decay, "weight_decay", minimum=0.0)
    backend = _backend.resolve_backend(OP_NAME, params.device)
    if out is not None:
        check_like(params, "params", out, "out")
        if torch.is_grad_enabled() and (params.requires_grad or grad.requires_grad):
            raise ValueError(
                "out= is not differentiable: params or grad requires grad; call without out= "
                "(or under torch.no_grad()) to get a differentiable step"
            )
        return _backend.implementation(OP_NAME, backend)(params, grad, lr, weight_decay, out=out)
    if backend == "reference":
        return _reference.flat_sgd_step(params, grad, lr, weight_decay)
    return FlatSgdStepFunction.apply(params, grad, lr, weight_decay, backend)
