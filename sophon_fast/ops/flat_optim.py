"""flat_optim: fused stateful optimizer updates on a flat parameter buffer.

One kernel per update and one per backward, on a (n_params,) parameter buffer (float32, float64,
float16 or bfloat16) with float32 state (float64 for float64 parameters); maths in the state
dtype. ``step`` is a 0-d tensor on the params' device holding the number of updates taken before
this one, read by the kernel (t = step + 1), so nothing synchronises with the host (a step on
another device is refused; the in-place ``*_`` forms move it there once). With
d = grad + wd * params:

    momentum   b' = d if step == 0 else mu b + (1 - dampening) d;  p' = p - lr (nesterov ? d + mu b' : b')
    adam       m' = b1 m + (1-b1) d,  v' = b2 v + (1-b2) d^2
               p' = p - lr / (1 - b1^t) * m' / (sqrt(v') / sqrt(1 - b2^t) + eps)
    adamw      d = grad, and p decayed first: p <- p (1 - lr wd)
    rmsprop    v' = a v + (1-a) d^2,  g' = a g + (1-a) d (centered);  p' = p - lr d / (sqrt(v' [- g'^2]) + eps)

Memory traffic per parameter at float32, forward | fused backward:

    momentum   20 B (read p, g, b; write p', b') | 20 B (read dp', db'; write dp, dg, db); 16 B
               without weight decay, where dp is dp' itself
    adam       28 B (read p, g, m, v; write p', m', v') | 40 B (read dp', dm', dv', g, m, v; write
               dp, dg, dm, dv), +4 B when L2 weight decay needs p
    rmsprop    20 B (read p, g, v; write p', v'), centered 28 B | 28 B (read dp', dv', g, v; write
               dp, dg, dv), centered 40 B, +4 B with weight decay

The eager per-tensor differentiable update moves 32 B (momentum: mul, add, add), 84 B (Adam,
8 ops) and 56 B (RMSprop, 5 ops), plus one launch per op per tensor.

What each backward saves, and why (everything else is recomputed in the backward kernel):
    momentum   only ``step``: the update is linear, its Jacobian holds only (lr, mu, dampening, wd)
               and whether this is the first step.
    adam/w     grad, exp_avg, exp_avg_sq (the inputs; m', v' and the denominators are recomputed)
               and params only when L2 weight decay puts params into d. Saving the inputs rather
               than the outputs keeps nothing alive that the caller's graph does not already hold.
    rmsprop    grad, square_avg (and grad_avg when centered), params only with weight decay.
A second-order meta-gradient passes through an inner update once (docs/DESIGN.md, section 1),
so the fused backward kernels are first-order. When the backward itself is differentiated (create_graph=True,
e.g. gradgradcheck or a third-order objective) the Functions switch to the reference twin's
autograd VJP on the same saved tensors: correct to any order, at eager speed. (Parameters that
were not saved enter that path as zeros: the VJPs do not depend on them.)

Also here: in-place non-differentiable variants (``*_``: first-order simulation and outer steps,
step += 1 on the device), :func:`flat_clip_adam_step_` (global L2-norm clip + Adam, one norm pass
and one update pass, no host synchronisation) and :func:`flat_accumulate_` (acc += w * g).
"""

from __future__ import annotations

import math

import torch

from .. import _backend
from ..reference import flat_optim as _reference
from . import _triton
from ._checks import check_flat_buffer, check_like, check_real

# Elements per program under the interpreter: each program is one Python iteration over numpy
# arrays, so large blocks keep the tests fast on the CPU.
INTERPRETER_BLOCK = 4096
# Compiled: 1024 elements over 8 warps (4 per thread). ptxas -v of all 69 kernel variants the
# launchers make (dtypes x flags), sm_80 and sm_90: no spills, at most 110 registers (float64
# Adam backward). 1024 over 4 warps: 187 registers there and a 4 B spill (bfloat16 Adam backward,
# sm_80); 2048 over 4 warps: 240-396 B spills; the interpreter's 4096: up to 16 KiB per thread.
GPU_BLOCK, GPU_WARPS = 1024, 8
# Partial sums of the clip norm: a fixed number of programs so the update kernel can reduce them
# itself (1024 floats per program, L2-resident) instead of the host reading the norm.
NORM_PARTIALS = 1024

tl = _triton.tl


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 parameters, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------- kernels
#
# Float hyper-parameters are declared ``tl.float64``: compiled Triton passes an undeclared Python
# float as float32, which puts a 1e-8 relative error into every float64 step (lr = 0.1 becomes
# 0.10000000149). _hp rounds each once to the compute dtype, as the C++/CUDA kernels do.


@_triton.jit
def _hp(value, ctype: tl.constexpr):
    # A Python float under the interpreter, a float64 scalar when compiled: either rounds once.
    return tl.full((), value, ctype)


@_triton.jit
def _safe_root(x, COMPUTE_F64: tl.constexpr):
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


@_triton.jit
def _momentum_forward_kernel(
    params_ptr, grad_ptr, buf_ptr, step_ptr, out_params_ptr, out_buf_ptr, n_elements,
    lr: tl.float64, momentum: tl.float64, dampening: tl.float64, weight_decay: tl.float64,
    NESTEROV: tl.constexpr, COMPUTE_F64: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    ctype = tl.float64 if COMPUTE_F64 else tl.float32
    lr, momentum = _hp(lr, ctype), _hp(momentum, ctype)
    dampening, weight_decay = _hp(dampening, ctype), _hp(weight_decay, ctype)
    p = tl.load(params_ptr + offsets, mask=mask).to(ctype)
    d = tl.load(grad_ptr + offsets, mask=mask).to(ctype) + weight_decay * p
    b = tl.load(buf_ptr + offsets, mask=mask).to(ctype)
    first = tl.load(step_ptr) == 0
    new_b = tl.where(first, d, momentum * b + (1.0 - dampening) * d)
    if NESTEROV:
        direction = d + momentum * new_b
    else:
        direction = new_b
    tl.store(
        out_params_ptr + offsets,
        (p - lr * direction).to(out_params_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(out_buf_ptr + offsets, new_b, mask=mask)


@_triton.jit
def _momentum_backward_kernel(
    grad_new_params_ptr, grad_new_buf_ptr, step_ptr, grad_params_ptr, grad_grad_ptr,
    grad_buf_ptr, n_elements, lr: tl.float64, momentum: tl.float64, dampening: tl.float64,
    weight_decay: tl.float64,
    NESTEROV: tl.constexpr, WRITE_PARAMS: tl.constexpr, COMPUTE_F64: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    ctype = tl.float64 if COMPUTE_F64 else tl.float32
    lr, momentum = _hp(lr, ctype), _hp(momentum, ctype)
    dampening, weight_decay = _hp(dampening, ctype), _hp(weight_decay, ctype)
    a = tl.load(grad_new_params_ptr + offsets, mask=mask).to(ctype)
    c = tl.load(grad_new_buf_ptr + offsets, mask=mask).to(ctype)
    first = tl.load(step_ptr) == 0
    if NESTEROV:
        g_new_b = c - lr * momentum * a
    else:
        g_new_b = c - lr * a
    g_d = tl.where(first, g_new_b, (1.0 - dampening) * g_new_b)
    if NESTEROV:
        g_d = g_d - lr * a
    g_b = tl.where(first, 0.0, momentum * g_new_b)
    if WRITE_PARAMS:
        tl.store(
            grad_params_ptr + offsets,
            (a + weight_decay * g_d).to(grad_params_ptr.dtype.element_ty),
            mask=mask,
        )
    tl.store(grad_grad_ptr + offsets, g_d.to(grad_grad_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_buf_ptr + offsets, g_b, mask=mask)


@_triton.jit
def _adam_corrections(step_ptr, lr, log_beta1, log_beta2, ctype: tl.constexpr):
    # (lr / (1 - b1^t), sqrt(1 - b2^t)) in float64, rounded once (as torch.optim on the host).
    t = tl.load(step_ptr).to(tl.float64) + 1.0
    lr64 = _hp(lr, tl.float64)
    step_size = (lr64 / (1.0 - tl.exp(t * _hp(log_beta1, tl.float64)))).to(ctype)
    sqrt_bc2 = tl.sqrt(1.0 - tl.exp(t * _hp(log_beta2, tl.float64))).to(ctype)
    return step_size, sqrt_bc2


@_triton.jit
def _adam_forward_kernel(
    params_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, step_ptr, partials_ptr,
    out_params_ptr, out_exp_avg_ptr, out_exp_avg_sq_ptr, n_elements,
    lr: tl.float64, beta1: tl.float64, beta2: tl.float64, log_beta1: tl.float64,
    log_beta2: tl.float64, eps: tl.float64, weight_decay: tl.float64, max_norm: tl.float64,
    DECOUPLED: tl.constexpr, CLIP: tl.constexpr, N_PARTIALS: tl.constexpr,
    COMPUTE_F64: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    ctype = tl.float64 if COMPUTE_F64 else tl.float32
    step_size, sqrt_bc2 = _adam_corrections(step_ptr, lr, log_beta1, log_beta2, ctype)
    lr, beta1, beta2 = _hp(lr, ctype), _hp(beta1, ctype), _hp(beta2, ctype)
    eps, weight_decay = _hp(eps, ctype), _hp(weight_decay, ctype)
    p = tl.load(params_ptr + offsets, mask=mask).to(ctype)
    g = tl.load(grad_ptr + offsets, mask=mask).to(ctype)
    if CLIP:
        partials = tl.load(partials_ptr + tl.arange(0, N_PARTIALS))
        total_norm, _, _ = _safe_root(tl.sum(partials, axis=0), COMPUTE_F64)
        g = g * tl.minimum(_hp(max_norm, ctype) / (total_norm + 1e-6), 1.0)
    if DECOUPLED:
        p = p * (1.0 - lr * weight_decay)
        d = g
    else:
        d = g + weight_decay * p
    m = beta1 * tl.load(exp_avg_ptr + offsets, mask=mask).to(ctype) + (1.0 - beta1) * d
    v = beta2 * tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(ctype) + (1.0 - beta2) * d * d
    root, positive, divisor = _safe_root(v, COMPUTE_F64)
    denom = root / sqrt_bc2 + eps
    new_p = p - step_size * m / denom
    tl.store(out_params_ptr + offsets, new_p.to(out_params_ptr.dtype.element_ty), mask=mask)
    tl.store(out_exp_avg_ptr + offsets, m, mask=mask)
    tl.store(out_exp_avg_sq_ptr + offsets, v, mask=mask)


@_triton.jit
def _adam_backward_kernel(
    grad_new_params_ptr, grad_new_exp_avg_ptr, grad_new_exp_avg_sq_ptr, params_ptr, grad_ptr,
    exp_avg_ptr, exp_avg_sq_ptr, step_ptr, grad_params_ptr, grad_grad_ptr, grad_exp_avg_ptr,
    grad_exp_avg_sq_ptr, n_elements, lr: tl.float64, beta1: tl.float64, beta2: tl.float64,
    log_beta1: tl.float64, log_beta2: tl.float64, eps: tl.float64, weight_decay: tl.float64,
    DECOUPLED: tl.constexpr, NEEDS_PARAMS: tl.constexpr, COMPUTE_F64: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    ctype = tl.float64 if COMPUTE_F64 else tl.float32
    step_size, sqrt_bc2 = _adam_corrections(step_ptr, lr, log_beta1, log_beta2, ctype)
    lr, beta1, beta2 = _hp(lr, ctype), _hp(beta1, ctype), _hp(beta2, ctype)
    eps, weight_decay = _hp(eps, ctype), _hp(weight_decay, ctype)
    a = tl.load(grad_new_params_ptr + offsets, mask=mask).to(ctype)
    c_m = tl.load(grad_new_exp_avg_ptr + offsets, mask=mask).to(ctype)
    c_v = tl.load(grad_new_exp_avg_sq_ptr + offsets, mask=mask).to(ctype)
    d = tl.load(grad_ptr + offsets, mask=mask).to(ctype)
    if NEEDS_PARAMS:
        d = d + weight_decay * tl.load(params_ptr + offsets, mask=mask).to(ctype)
    m = beta1 * tl.load(exp_avg_ptr + offsets, mask=mask).to(ctype) + (1.0 - beta1) * d
    v = beta2 * tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(ctype) + (1.0 - beta2) * d * d
    root, positive, divisor = _safe_root(v, COMPUTE_F64)
    denom = root / sqrt_bc2 + eps
    g_m = c_m - a * step_size / denom
    # d root / d v = 1 / (2 root) for v > 0 and 0 at v = 0 (the zero-safe square root).
    through_root = a * step_size * m / (denom * denom) / sqrt_bc2 * 0.5 / divisor
    g_v = c_v + tl.where(positive, through_root, 0.0)
    g_d = (1.0 - beta1) * g_m + (1.0 - beta2) * 2.0 * d * g_v
    if DECOUPLED:
        g_p = a * (1.0 - lr * weight_decay)
    else:
        g_p = a + weight_decay * g_d
    tl.store(grad_params_ptr + offsets, g_p.to(grad_params_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_grad_ptr + offsets, g_d.to(grad_grad_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_exp_avg_ptr + offsets, beta1 * g_m, mask=mask)
    tl.store(grad_exp_avg_sq_ptr + offsets, beta2 * g_v, mask=mask)


@_triton.jit
def _rmsprop_forward_kernel(
    params_ptr, grad_ptr, square_avg_ptr, grad_avg_ptr, out_params_ptr, out_square_avg_ptr,
    out_grad_avg_ptr, n_elements, lr: tl.float64, alpha: tl.float64, eps: tl.float64,
    weight_decay: tl.float64,
    CENTERED: tl.constexpr, COMPUTE_F64: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    ctype = tl.float64 if COMPUTE_F64 else tl.float32
    lr, alpha = _hp(lr, ctype), _hp(alpha, ctype)
    eps, weight_decay = _hp(eps, ctype), _hp(weight_decay, ctype)
    p = tl.load(params_ptr + offsets, mask=mask).to(ctype)
    d = tl.load(grad_ptr + offsets, mask=mask).to(ctype) + weight_decay * p
    v = alpha * tl.load(square_avg_ptr + offsets, mask=mask).to(ctype) + (1.0 - alpha) * d * d
    q = v
    if CENTERED:
        ga = alpha * tl.load(grad_avg_ptr + offsets, mask=mask).to(ctype) + (1.0 - alpha) * d
        q = v - ga * ga
        tl.store(out_grad_avg_ptr + offsets, ga, mask=mask)
    root, positive, divisor = _safe_root(q, COMPUTE_F64)
    new_p = p - lr * d / (root + eps)
    tl.store(out_params_ptr + offsets, new_p.to(out_params_ptr.dtype.element_ty), mask=mask)
    tl.store(out_square_avg_ptr + offsets, v, mask=mask)


@_triton.jit
def _rmsprop_backward_kernel(
    grad_new_params_ptr, grad_new_square_avg_ptr, grad_new_grad_avg_ptr, params_ptr, grad_ptr,
    square_avg_ptr, grad_avg_ptr, grad_params_ptr, grad_grad_ptr, grad_square_avg_ptr,
    grad_grad_avg_ptr, n_elements, lr: tl.float64, alpha: tl.float64, eps: tl.float64,
    weight_decay: tl.float64,
    CENTERED: tl.constexpr, NEEDS_PARAMS: tl.constexpr, COMPUTE_F64: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    ctype = tl.float64 if COMPUTE_F64 else tl.float32
    lr, alpha = _hp(lr, ctype), _hp(alpha, ctype)
    eps, weight_decay = _hp(eps, ctype), _hp(weight_decay, ctype)
    a = tl.load(grad_new_params_ptr + offsets, mask=mask).to(ctype)
    c_v = tl.load(grad_new_square_avg_ptr + offsets, mask=mask).to(ctype)
    d = tl.load(grad_ptr + offsets, mask=mask).to(ctype)
    if NEEDS_PARAMS:
        d = d + weight_decay * tl.load(params_ptr + offsets, mask=mask).to(ctype)
    v = alpha * tl.load(square_avg_ptr + offsets, mask=mask).to(ctype) + (1.0 - alpha) * d * d
    q = v
    if CENTERED:
        ga = alpha * tl.load(grad_avg_ptr + offsets, mask=mask).to(ctype) + (1.0 - alpha) * d
        q = v - ga * ga
    root, positive, divisor = _safe_root(q, COMPUTE_F64)
    denom = root + eps
    g_q = tl.where(positive, a * lr * d / (denom * denom) * 0.5 / divisor, 0.0)
    g_v = c_v + g_q
    g_d = -lr * a / denom + (1.0 - alpha) * 2.0 * d * g_v
    if CENTERED:
        g_ga = tl.load(grad_new_grad_avg_ptr + offsets, mask=mask).to(ctype) - 2.0 * ga * g_q
        g_d = g_d + (1.0 - alpha) * g_ga
        tl.store(grad_grad_avg_ptr + offsets, alpha * g_ga, mask=mask)
    g_p = a + weight_decay * g_d
    tl.store(grad_params_ptr + offsets, g_p.to(grad_params_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_grad_ptr + offsets, g_d.to(grad_grad_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_square_avg_ptr + offsets, alpha * g_v, mask=mask)


@_triton.jit
def _sum_of_squares_kernel(
    x_ptr, partials_ptr, n_elements, COMPUTE_F64: tl.constexpr, BLOCK_SIZE: tl.constexpr
):
    # Program i sums blocks i, i + N, i + 2N, ...: a fixed grid of N partials for any size.
    # A while loop: range() with tensor bounds fails under triton 3.6's interpreter ("only
    # 0-dimensional arrays can be converted to Python scalars"). 64-bit offsets past 2^31.
    pid = tl.program_id(0).to(tl.int64)
    stride = tl.num_programs(0).to(tl.int64) * BLOCK_SIZE
    ctype = tl.float64 if COMPUTE_F64 else tl.float32
    acc = tl.zeros((BLOCK_SIZE,), dtype=ctype)
    start = pid * BLOCK_SIZE
    while start < n_elements:
        offsets = start + tl.arange(0, BLOCK_SIZE)
        x = tl.load(x_ptr + offsets, mask=offsets < n_elements, other=0.0).to(ctype)
        acc += x * x
        start += stride
    tl.store(partials_ptr + pid, tl.sum(acc, axis=0))


@_triton.jit
def _accumulate_kernel(
    acc_ptr, grad_ptr, n_elements, weight: tl.float64, COMPUTE_F64: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offsets = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    ctype = tl.float64 if COMPUTE_F64 else tl.float32
    acc = tl.load(acc_ptr + offsets, mask=mask).to(ctype)
    g = tl.load(grad_ptr + offsets, mask=mask).to(ctype)
    tl.store(acc_ptr + offsets, acc + _hp(weight, ctype) * g, mask=mask)


# -------------------------------------------------------------------------------------- launchers


def geometry() -> tuple[int, int]:
    """(elements per program, num_warps) of the element-wise kernels in this Triton mode."""
    return (INTERPRETER_BLOCK, 4) if _triton.INTERPRETED else (GPU_BLOCK, GPU_WARPS)


def _launch(kernel, n, args, **constexprs):
    """``kernel`` over n elements, one program per block, on args[0]'s device."""
    block, warps = geometry()
    with _triton.launch_device(args[0]):
        kernel[(-(-n // block),)](*args, **constexprs, BLOCK_SIZE=block, num_warps=warps)


def _f64(t: torch.Tensor) -> bool:
    return t.dtype == torch.float64


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0.0 else -math.inf


def _empty_outputs(params, *states):
    return (torch.empty_like(params), *(torch.empty_like(s) for s in states))


def _triton_momentum_forward(
    params, grad, buf, step, lr, momentum, dampening, weight_decay, nesterov, out=None
):
    out = _empty_outputs(params, buf) if out is None else out
    n = params.numel()
    if n:
        _launch(
            _momentum_forward_kernel, n,
            (params, grad, buf, step, out[0], out[1], n,
             lr, momentum, 0.0 if nesterov else dampening, weight_decay),
            NESTEROV=nesterov, COMPUTE_F64=_f64(params),
        )  # fmt: skip
    return out


def _triton_momentum_backward(
    grad_new_params, grad_new_buf, step, lr, momentum, dampening, weight_decay, nesterov
):
    write_params = weight_decay != 0.0
    grad_params = torch.empty_like(grad_new_params) if write_params else grad_new_params
    grad_grad = torch.empty_like(grad_new_params)
    grad_buf = torch.empty_like(grad_new_buf)
    n = grad_new_params.numel()
    if n:
        _launch(
            _momentum_backward_kernel, n,
            (grad_new_params, grad_new_buf, step, grad_params, grad_grad, grad_buf, n, lr,
             momentum, 0.0 if nesterov else dampening, weight_decay),
            NESTEROV=nesterov, WRITE_PARAMS=write_params, COMPUTE_F64=_f64(grad_new_params),
        )  # fmt: skip
    return grad_params, grad_grad, grad_buf


def _triton_adam_forward(
    params, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, decoupled,
    out=None, max_norm=None,
):  # fmt: skip
    out = _empty_outputs(params, exp_avg, exp_avg_sq) if out is None else out
    n = params.numel()
    partials = None
    if max_norm is not None:
        partials = torch.empty(NORM_PARTIALS, dtype=state_dtype(params.dtype), device=params.device)
        block, warps = geometry()
        with _triton.launch_device(grad):
            _sum_of_squares_kernel[(NORM_PARTIALS,)](
                grad, partials, n, COMPUTE_F64=_f64(params), BLOCK_SIZE=block, num_warps=warps
            )
    if n:
        _launch(
            _adam_forward_kernel, n,
            (params, grad, exp_avg, exp_avg_sq, step,
             partials if partials is not None else exp_avg, out[0], out[1], out[2], n,
             lr, beta1, beta2, _log(beta1), _log(beta2), eps, weight_decay,
             0.0 if max_norm is None else max_norm),
            DECOUPLED=decoupled, CLIP=max_norm is not None, N_PARTIALS=NORM_PARTIALS,
            COMPUTE_F64=_f64(params),
        )  # fmt: skip
    return out, partials


def _triton_adam_backward(
    grad_new_params, grad_new_exp_avg, grad_new_exp_avg_sq, params, grad, exp_avg, exp_avg_sq,
    step, lr, beta1, beta2, eps, weight_decay, decoupled,
):  # fmt: skip
    grad_params, grad_grad = torch.empty_like(grad), torch.empty_like(grad)
    grad_exp_avg, grad_exp_avg_sq = torch.empty_like(exp_avg), torch.empty_like(exp_avg_sq)
    n = grad.numel()
    needs_params = params is not None
    if n:
        _launch(
            _adam_backward_kernel, n,
            (grad_new_params, grad_new_exp_avg, grad_new_exp_avg_sq,
             params if needs_params else grad, grad, exp_avg, exp_avg_sq, step, grad_params,
             grad_grad, grad_exp_avg, grad_exp_avg_sq, n, lr, beta1, beta2, _log(beta1),
             _log(beta2), eps, weight_decay),
            DECOUPLED=decoupled, NEEDS_PARAMS=needs_params, COMPUTE_F64=_f64(grad),
        )  # fmt: skip
    return grad_params, grad_grad, grad_exp_avg, grad_exp_avg_sq


def _triton_rmsprop_forward(
    params, grad, square_avg, grad_avg, lr, alpha, eps, weight_decay, out=None
):
    centered = grad_avg is not None
    if out is None:
        out = _empty_outputs(params, square_avg, *((grad_avg,) if centered else ()))
    n = params.numel()
    if n:
        _launch(
            _rmsprop_forward_kernel, n,
            (params, grad, square_avg, grad_avg if centered else square_avg, out[0], out[1],
             out[2] if centered else out[1], n, lr, alpha, eps, weight_decay),
            CENTERED=centered, COMPUTE_F64=_f64(params),
        )  # fmt: skip
    return tuple(out)


def _triton_rmsprop_backward(
    grad_outputs, params, grad, square_avg, grad_avg, lr, alpha, eps, weight_decay
):
    centered = grad_avg is not None
    grad_params, grad_grad = torch.empty_like(grad), torch.empty_like(grad)
    grad_square_avg = torch.empty_like(square_avg)
    grad_grad_avg = torch.empty_like(grad_avg) if centered else grad_square_avg
    needs_params = params is not None
    n = grad.numel()
    if n:
        _launch(
            _rmsprop_backward_kernel, n,
            (grad_outputs[0], grad_outputs[1], grad_outputs[2] if centered else grad_outputs[1],
             params if needs_params else grad, grad, square_avg,
             grad_avg if centered else square_avg, grad_params, grad_grad, grad_square_avg,
             grad_grad_avg, n, lr, alpha, eps, weight_decay),
            CENTERED=centered, NEEDS_PARAMS=needs_params, COMPUTE_F64=_f64(grad),
        )  # fmt: skip
    result = (grad_params, grad_grad, grad_square_avg)
    return result + ((grad_grad_avg,) if centered else ())


def _triton_clip_adam_step_(
    params, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, max_norm
):
    _, partials = _triton_adam_forward(
        params, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, False,
        out=(params, exp_avg, exp_avg_sq), max_norm=max_norm,
    )  # fmt: skip
    step.add_(1)
    if partials is None:
        return torch.linalg.vector_norm(grad.to(state_dtype(grad.dtype)))
    return partials.sum().sqrt()


def _triton_accumulate_(acc, grad, weight):
    n = grad.numel()
    if n:
        _launch(
            _accumulate_kernel, n, (acc, grad, n, weight),
            COMPUTE_F64=_f64(acc),
        )  # fmt: skip
    return acc


# ------------------------------------------------------------------------- implementation choice


def _ext():
    return _backend.extension()


def _momentum_forward(backend):
    if backend == "triton":
        return _triton_momentum_forward
    return _ext().flat_momentum_step_forward


def _momentum_backward(backend):
    if backend == "triton":
        return _triton_momentum_backward
    return _ext().flat_momentum_step_backward


def _adam_forward(backend):
    if backend == "triton":
        return lambda *args, out=None: _triton_adam_forward(*args, out=out)[0]
    return _ext().flat_adam_step_forward


def _adam_backward(backend):
    if backend == "triton":
        return _triton_adam_backward
    return _ext().flat_adam_step_backward


def _rmsprop_forward(backend):
    if backend == "triton":
        return _triton_rmsprop_forward
    ext = _ext()
    return lambda *args, out=None: tuple(
        t for t in ext.flat_rmsprop_step_forward(*args, out=out) if t is not None
    )


def _rmsprop_backward(backend):
    if backend == "triton":
        return _triton_rmsprop_backward
    ext = _ext()
    return lambda grad_outputs, *args: tuple(
        t
        for t in ext.flat_rmsprop_step_backward(
            grad_outputs[0],
            grad_outputs[1],
            grad_outputs[2] if len(grad_outputs) > 2 else None,
            *args,
        )
        if t is not None
    )


# ------------------------------------------------------------------------------ autograd Functions


def _differentiable_vjp(forward, inputs, grad_outputs):
    """VJPs of ``forward`` at ``inputs`` with a graph (create_graph=True) to differentiate them."""
    inputs = [x if x.requires_grad else x.detach().requires_grad_(True) for x in inputs]
    outputs = forward(*inputs)
    grads = torch.autograd.grad(outputs, inputs, grad_outputs, create_graph=True, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads))


class FlatMomentumStepFunction(torch.autograd.Function):
    """(params', buf') of momentum SGD; backward = one fused kernel, saves only ``step``."""

    @staticmethod
    def forward(ctx, params, grad, buf, step, hp, backend):
        ctx.save_for_backward(step)
        ctx.hp, ctx.backend = hp, backend
        return tuple(_momentum_forward(backend)(params, grad, buf, step, *hp))

    @staticmethod
    def backward(ctx, grad_new_params, grad_new_buf):
        (step,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a differentiable VJP (linear, value-free)
            zeros = torch.zeros_like(grad_new_params)
            grads = _differentiable_vjp(
                lambda p, g, b: _reference.flat_momentum_step(p, g, b, step, *ctx.hp),
                (zeros, zeros, torch.zeros_like(grad_new_buf)),
                (grad_new_params, grad_new_buf),
            )
            return (*grads, None, None, None)
        grads = _momentum_backward(ctx.backend)(
            grad_new_params.contiguous(), grad_new_buf.contiguous(), step, *ctx.hp
        )
        return (*grads, None, None, None)


class FlatAdamStepFunction(torch.autograd.Function):
    """(params', exp_avg', exp_avg_sq') of Adam/AdamW; backward = one fused kernel.

    Saves grad, exp_avg, exp_avg_sq and step; params only for L2 weight decay (it enters d).
    """

    @staticmethod
    def forward(ctx, params, grad, exp_avg, exp_avg_sq, step, hp, backend):
        lr, beta1, beta2, eps, weight_decay, decoupled = hp
        needs_params = weight_decay != 0.0 and not decoupled
        ctx.needs_params = needs_params
        ctx.save_for_backward(params if needs_params else None, grad, exp_avg, exp_avg_sq, step)
        ctx.hp, ctx.backend = hp, backend
        return tuple(_adam_forward(backend)(params, grad, exp_avg, exp_avg_sq, step, *hp))

    @staticmethod
    def backward(ctx, grad_new_params, grad_new_exp_avg, grad_new_exp_avg_sq):
        params, grad, exp_avg, exp_avg_sq, step = ctx.saved_tensors
        if torch.is_grad_enabled():
            lr, beta1, beta2, eps, weight_decay, decoupled = ctx.hp
            grads = _differentiable_vjp(
                lambda p, g, m, v: _reference._adam(
                    p, g, m, v, step, lr, (beta1, beta2), eps, weight_decay, decoupled
                ),
                (params if ctx.needs_params else torch.zeros_like(grad), grad, exp_avg, exp_avg_sq),
                (grad_new_params, grad_new_exp_avg, grad_new_exp_avg_sq),
            )
            return (*grads, None, None, None)
        grads = _adam_backward(ctx.backend)(
            grad_new_params.contiguous(), grad_new_exp_avg.contiguous(),
            grad_new_exp_avg_sq.contiguous(), params if ctx.needs_params else None, grad,
            exp_avg, exp_avg_sq, step, *ctx.hp,
        )  # fmt: skip
        return (*grads, None, None, None)


class FlatRmspropStepFunction(torch.autograd.Function):
    """(params', square_avg'[, grad_avg']) of RMSprop; backward = one fused kernel.

    Saves grad and square_avg (and grad_avg when centered); params only with weight decay.
    """

    @staticmethod
    def forward(ctx, params, grad, square_avg, grad_avg, hp, backend):
        needs_params = hp[3] != 0.0
        ctx.needs_params, ctx.centered = needs_params, grad_avg is not None
        ctx.save_for_backward(params if needs_params else None, grad, square_avg, grad_avg)
        ctx.hp, ctx.backend = hp, backend
        return _rmsprop_forward(backend)(params, grad, square_avg, grad_avg, *hp)

    @staticmethod
    def backward(ctx, *grad_outputs):
        params, grad, square_avg, grad_avg = ctx.saved_tensors
        if torch.is_grad_enabled():
            p = params if ctx.needs_params else torch.zeros_like(grad)
            states = (square_avg, grad_avg) if ctx.centered else (square_avg,)
            grads = _differentiable_vjp(
                lambda p, g, v, *ga: _reference.flat_rmsprop_step(
                    p, g, v, *ctx.hp, grad_avg=ga[0] if ga else None
                ),
                (p, grad, *states),
                grad_outputs,
            )
            return (*grads[:3], grads[3] if ctx.centered else None, None, None)
        grads = _rmsprop_backward(ctx.backend)(
            tuple(g.contiguous() for g in grad_outputs),
            params if ctx.needs_params else None,
            grad,
            square_avg,
            grad_avg if ctx.centered else None,
            *ctx.hp,
        )
        return (*grads[:3], grads[3] if ctx.centered else None, None, None)


# ------------------------------------------------------------------------------- public functions


def _check_state(params, state, name, ref_name="params"):
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


def _check_step(params, step):
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


def _adopt_step(params, step):
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


def _check_fraction(value, name):
    value = check_real(value, name, minimum=0.0)
    if value >= 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


def _check_out(params, states, out, differentiable_inputs, names):
    if len(out) != 1 + len(states):
        raise ValueError(f"out must be a tuple of {1 + len(states)} buffers ({', '.join(names)})")
    check_like(params, "params", out[0], "out[0]")
    for i in range(len(states)):
        _check_state(params, out[i + 1], f"out[{i + 1}]")
    if torch.is_grad_enabled() and any(t.requires_grad for t in differentiable_inputs):
        raise ValueError(
            "out= is not differentiable: an input requires grad; call without out= "
            "(or under torch.no_grad()) to get a differentiable step"
        )


def flat_momentum_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor,
    step: torch.Tensor,
    lr: float,
    momentum: float = 0.9,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One out-of-place momentum-SGD step on a flat buffer, fused and differentiable.

    torch.optim.SGD semantics: d = grad + weight_decay * params; the buffer becomes d on the first
    step (``step == 0``) and ``momentum * b + (1 - dampening) * d`` after; ``params' = params -
    lr * b'`` (Nesterov: ``params - lr * (d + momentum * b')``, dampening ignored). Gradients flow
    to params, grad and momentum_buffer through one fused backward kernel (first order).

    Args:
        params: (n_params,) contiguous float32, float64, float16 or bfloat16 buffer.
        grad: (n_params,) same dtype, size and device as ``params``.
        momentum_buffer: (n_params,) float32 state (float64 for float64 params).
        step: 0-d floating tensor on ``params.device``, the number of steps taken before this
            one (read by the kernel: no host copy; the caller increments it).
        lr: learning rate (finite). momentum: mu in [0, 1]. dampening: in [0, 1].
        weight_decay: L2 coefficient >= 0. nesterov: Nesterov momentum. Defaults 0.9, 0, 0, False.
        out: optional (params_out, buffer_out) to write into (may be the inputs: in place). Not
            differentiable: refused while an input requires grad under grad mode.

    Returns:
        (new_params (n_params,) in params.dtype, new_momentum_buffer (n_params,) state dtype).

    Raises:
        TypeError: wrong dtypes (state not float32/float64 as above), non-number hyper-parameters.
        ValueError: wrong shapes, sizes or devices, non-contiguous buffers, out-of-range values.
        BackendUnavailableError: a forced backend cannot run on ``params.device``.
    """
    check_flat_buffer(params, "params")
    check_like(params, "params", grad, "grad")
    _check_state(params, momentum_buffer, "momentum_buffer")
    _check_step(params, step)
    hp = (
        check_real(lr, "lr"),
        check_real(momentum, "momentum", minimum=0.0),
        check_real(dampening, "dampening", minimum=0.0),
        check_real(weight_decay, "weight_decay", minimum=0.0),
        bool(nesterov),
    )
    backend = _backend.resolve("flat_momentum_step", params.device)
    inputs = (params, grad, momentum_buffer)
    if out is not None:
        _check_out(params, (momentum_buffer,), out, inputs, ("params", "momentum_buffer"))
        if backend == "reference":
            return _reference.flat_momentum_step(*inputs, step, *hp, out=tuple(out))
        return tuple(_momentum_forward(backend)(*inputs, step, *hp, out=tuple(out)))
    if backend == "reference":
        return _reference.flat_momentum_step(*inputs, step, *hp)
    return FlatMomentumStepFunction.apply(*inputs, step, hp, backend)


def _adam_public(params, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay,
                 decoupled, out, op):  # fmt: skip
    check_flat_buffer(params, "params")
    check_like(params, "params", grad, "grad")
    _check_state(params, exp_avg, "exp_avg")
    _check_state(params, exp_avg_sq, "exp_avg_sq")
    _check_step(params, step)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    hp = (
        check_real(lr, "lr"),
        _check_fraction(betas[0], "betas[0]"),
        _check_fraction(betas[1], "betas[1]"),
        check_real(eps, "eps", minimum=0.0),
        check_real(weight_decay, "weight_decay", minimum=0.0),
        decoupled,
    )
    backend = _backend.resolve(op, params.device)
    inputs = (params, grad, exp_avg, exp_avg_sq)
    reference = _reference.flat_adamw_step if decoupled else _reference.flat_adam_step
    ref_args = (*inputs, step, hp[0], hp[1:3], hp[3], hp[4])
    if out is not None:
        _check_out(params, (exp_avg, exp_avg_sq), out, inputs, ("params", "exp_avg", "exp_avg_sq"))
        if backend == "reference":
            return reference(*ref_args, out=tuple(out))
        return tuple(_adam_forward(backend)(*inputs, step, *hp, out=tuple(out)))
    if backend == "reference":
        return reference(*ref_args)
    return FlatAdamStepFunction.apply(*inputs, step, hp, backend)


def flat_adam_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One out-of-place Adam step on a flat buffer, fused and differentiable.

    torch.optim.Adam semantics (L2 weight decay added to the gradient, bias correction with
    t = step + 1 computed on the device). Gradients flow to params, grad, exp_avg and exp_avg_sq
    through one fused backward kernel (first order).

    Args:
        params: (n_params,) contiguous float32, float64, float16 or bfloat16 buffer.
        grad: (n_params,) same dtype, size and device as ``params``.
        exp_avg, exp_avg_sq: (n_params,) float32 moments (float64 for float64 params).
        step: 0-d floating tensor on ``params.device``, steps taken before this one (the
            caller increments it).
        lr: learning rate. betas: (beta1, beta2), each in [0, 1). eps: > 0 added to the
            bias-corrected root. weight_decay: L2 coefficient >= 0. Defaults (0.9, 0.999), 1e-8, 0.
        out: optional (params_out, exp_avg_out, exp_avg_sq_out), possibly the inputs (in place).
            Not differentiable.

    Returns:
        (new_params in params.dtype, new_exp_avg, new_exp_avg_sq), each (n_params,).

    Raises:
        TypeError / ValueError / BackendUnavailableError: as :func:`flat_momentum_step`.
    """
    return _adam_public(params, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay,
                        False, out, "flat_adam_step")  # fmt: skip


def flat_adamw_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    *,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One out-of-place AdamW step (decoupled decay: p <- p * (1 - lr * weight_decay) first).

    Same arguments, returns and errors as :func:`flat_adam_step`; weight_decay defaults to 1e-2
    as in torch.optim.AdamW.
    """
    return _adam_public(params, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay,
                        True, out, "flat_adamw_step")  # fmt: skip


def flat_rmsprop_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    square_avg: torch.Tensor,
    lr: float,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    grad_avg: torch.Tensor | None = None,
    out: tuple[torch.Tensor, ...] | None = None,
) -> tuple[torch.Tensor, ...]:
    """One out-of-place RMSprop step on a flat buffer, fused and differentiable.

    torch.optim.RMSprop semantics without momentum; centered when ``grad_avg`` is given
    (the root is taken of ``square_avg' - grad_avg'^2``).

    Args:
        params: (n_params,) contiguous float32, float64, float16 or bfloat16 buffer.
        grad: (n_params,) same dtype, size and device as ``params``.
        square_avg: (n_params,) float32 state (float64 for float64 params).
        lr: learning rate. alpha: smoothing in [0, 1). eps: > 0. weight_decay: L2 >= 0.
            Defaults 0.99, 1e-8, 0.
        grad_avg: (n_params,) state of the centered variant, or None (not centered).
        out: optional output buffers (params, square_avg[, grad_avg]); not differentiable.

    Returns:
        (new_params, new_square_avg) or, centered, (new_params, new_square_avg, new_grad_avg).

    Raises:
        TypeError / ValueError / BackendUnavailableError: as :func:`flat_momentum_step`.
    """
    check_flat_buffer(params, "params")
    check_like(params, "params", grad, "grad")
    _check_state(params, square_avg, "square_avg")
    states = (square_avg,)
    if grad_avg is not None:
        _check_state(params, grad_avg, "grad_avg")
        states = (square_avg, grad_avg)
    hp = (
        check_real(lr, "lr"),
        _check_fraction(alpha, "alpha"),
        check_real(eps, "eps", minimum=0.0),
        check_real(weight_decay, "weight_decay", minimum=0.0),
    )
    backend = _backend.resolve("flat_rmsprop_step", params.device)
    if out is not None:
        names = ("params", "square_avg") + (("grad_avg",) if grad_avg is not None else ())
        _check_out(params, states, out, (params, grad, *states), names)
        if backend == "reference":
            return _reference.flat_rmsprop_step(
                params, grad, square_avg, *hp, grad_avg=grad_avg, out=tuple(out)
            )
        return _rmsprop_forward(backend)(params, grad, square_avg, grad_avg, *hp, out=tuple(out))
    if backend == "reference":
        return _reference.flat_rmsprop_step(params, grad, square_avg, *hp, grad_avg=grad_avg)
    return FlatRmspropStepFunction.apply(params, grad, square_avg, grad_avg, hp, backend)


@torch.no_grad()
def flat_momentum_step_(
    params: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor,
    step: torch.Tensor,
    lr: float,
    momentum: float = 0.9,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> torch.Tensor:
    """In-place, non-differentiable :func:`flat_momentum_step`; then ``step += 1`` on its device.

    A ``step`` on another device than ``params`` is moved there in place, once.

    Returns:
        ``params`` (updated; momentum_buffer updated too).
    """
    _adopt_step(params, step)
    flat_momentum_step(params, grad, momentum_buffer, step, lr, momentum, dampening,
                       weight_decay, nesterov, out=(params, momentum_buffer))  # fmt: skip
    step.add_(1)
    return params


@torch.no_grad()
def flat_adam_step_(
    params: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = False,
) -> torch.Tensor:
    """In-place, non-differentiable Adam (AdamW when ``decoupled``); then ``step += 1``.

    A ``step`` on another device than ``params`` is moved there in place, once.

    Returns:
        ``params`` (updated; exp_avg and exp_avg_sq updated too).
    """
    out = (params, exp_avg, exp_avg_sq)
    fn = flat_adamw_step if decoupled else flat_adam_step
    _adopt_step(params, step)
    fn(params, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay, out=out)
    step.add_(1)
    return params


@torch.no_grad()
def flat_rmsprop_step_(
    params: torch.Tensor,
    grad: torch.Tensor,
    square_avg: torch.Tensor,
    lr: float,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    grad_avg: torch.Tensor | None = None,
) -> torch.Tensor:
    """In-place, non-differentiable :func:`flat_rmsprop_step`. Returns ``params``."""
    out = (params, square_avg) + (() if grad_avg is None else (grad_avg,))
    flat_rmsprop_step(
        params, grad, square_avg, lr, alpha, eps, weight_decay, grad_avg=grad_avg, out=out
    )
    return params


@torch.no_grad()
def flat_clip_adam_step_(
    params: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    max_norm: float | None = None,
) -> torch.Tensor:
    """Clip ``grad`` to global L2 norm ``max_norm``, then one in-place Adam step; ``step += 1``.

    The meta update of SOPHON in two passes (sum of squares, then update), with no host
    synchronisation: the clip coefficient min(1, max_norm / (norm + 1e-6)) (that of
    torch.nn.utils.clip_grad_norm_) is computed on the device, so the step can be captured in a
    CUDA graph. ``grad`` itself is not modified.

    Args:
        params: (n_params,) parameters, updated in place (float32/float64/float16/bfloat16).
        grad: (n_params,) gradient, same dtype as ``params``.
        exp_avg, exp_avg_sq: (n_params,) state-dtype moments, updated in place.
        step: 0-d floating tensor, incremented in place; moved to ``params.device`` in place
            the first time it is elsewhere (torch.optim.Adam keeps it on the CPU).
        lr, betas, eps, weight_decay: as :func:`flat_adam_step`.
        max_norm: clip threshold > 0, or None for no clipping.

    Returns:
        0-d total L2 norm of ``grad`` before clipping, in the state dtype (a device tensor).

    Raises:
        TypeError / ValueError / BackendUnavailableError: as :func:`flat_momentum_step`.
    """
    check_flat_buffer(params, "params")
    check_like(params, "params", grad, "grad")
    _check_state(params, exp_avg, "exp_avg")
    _check_state(params, exp_avg_sq, "exp_avg_sq")
    _adopt_step(params, step)
    _check_step(params, step)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    lr = check_real(lr, "lr")
    beta1, beta2 = _check_fraction(betas[0], "betas[0]"), _check_fraction(betas[1], "betas[1]")
    eps = check_real(eps, "eps", minimum=0.0)
    weight_decay = check_real(weight_decay, "weight_decay", minimum=0.0)
    if max_norm is not None:
        max_norm = check_real(max_norm, "max_norm", minimum=0.0)
    backend = _backend.resolve("flat_clip_adam_step_", params.device)
    args = (params, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, max_norm)
    if backend == "triton":
        return _triton_clip_adam_step_(*args)
    if backend in ("cpu", "cuda"):
        return _ext().flat_clip_adam_step_(*args)
    return _reference.flat_clip_adam_step_(*args[:6], (beta1, beta2), eps, weight_decay, max_norm)


@torch.no_grad()
def flat_accumulate_(acc: torch.Tensor, grad: torch.Tensor, weight: float) -> torch.Tensor:
    """``acc += weight * grad`` in one pass (the order-1 meta-gradient accumulator).

    Args:
        acc: (n_params,) float32 accumulator (float64 for float64 ``grad``), updated in place.
        grad: (n_params,) float32, float64, float16 or bfloat16 gradient.
        weight: finite Python number.

    Returns:
        ``acc``.

    Raises:
        TypeError / ValueError / BackendUnavailableError: as :func:`flat_momentum_step`.
    """
    check_flat_buffer(grad, "grad")
    _check_state(grad, acc, "acc", "grad")
    weight = check_real(weight, "weight")
    backend = _backend.resolve("flat_accumulate_", grad.device)
    if backend == "triton":
        return _triton_accumulate_(acc, grad, weight)
    if backend in ("cpu", "cuda"):
        return _ext().flat_accumulate_(acc, grad, weight)
    return _reference.flat_accumulate_(acc, grad, weight)
