"""losses: fused suppression and training losses, value and gradient in one pass.

Classification (``logits`` z: (batch, classes), ``labels`` y: (batch,) int64, batch mean; formulas
and their stability in :mod:`sophon_fast.reference.losses`, the pure-torch twin):

    ce         lse(z) - z_y                  grad (p - onehot) / B
    ice        z_y + lse(-z)                 grad (onehot - softmax(-z)) / B
    ice_paper  lse(z) - lse_{j != y}(z)      grad (p - r) / B,  r = softmax over j != y
    klu        lse(z) - mean(z) - log C      grad (p - 1/C) / B

Each row is one logsumexp problem (two for ice_paper, with separate maxima so a gap of 100 stays
finite). The forward writes the per-row loss and the gradient: 8 B per logit at fp32 against 5-23
kernels and ~24-40 B per logit for the eager formulas (the Triton kernel walks a row in chunks of
at most 1024 classes, an online logsumexp then the gradient, so it reads the row twice: the
second time from cache for rows that fit in it). The backward is
``grad * grad_out`` (or the saved gradient itself when grad_out is 1 on the CPU: no pass at all).

Generation (``prediction``, ``target``: (batch, channels, height, width), mean over all elements):
``mse_ascent`` = -mean((prediction - target)^2), grad -2 (prediction - target) / N;
``dos`` = mean(prediction^2), grad 2 prediction / N. One pass: 12 B/element (8 for dos).

Double differentiability: the backward is itself an autograd Function (ClassificationLossBackward,
MeanSquareBackward) whose backward is the exact Hessian-vector product, so ``ce`` can be the inner
adaptation loss under ``create_graph=True`` (second-order simulation). For the softmax losses the
Hessian of a row is a sum of J(s) = diag(s) - s s^T and J(s) v = s * (v - <s, v>): computed from
the logits in a few row-wise torch ops (the double backward is not a hot spot: one per inner step).

Every backend computes in float32 for float32/float16/bfloat16 inputs (float64 for float64) and
returns the loss and gradient in the input dtype. Labels outside [0, classes) raise on the CPU
backends and give a NaN loss (never a silent value) on the GPU ones, where a check would sync.
"""

from __future__ import annotations

import functools

import torch

from .. import _backend
from ..reference import losses as _reference
from . import _library, _triton

OP_NAME = "losses"
# The table's entries (sophon_fast._backend.register_op): one kernel each, value and gradient.
CLASSIFICATION_OP = "classification_loss"
MEAN_SQUARE_OP = "mean_square_loss"
KINDS = ("ce", "ice", "ice_paper", "klu")
KIND_CODES = {name: code for code, name in enumerate(KINDS)}
GENERATION_KINDS = ("mse_ascent", "dos")
# Classes per step of a row's program: it walks the row in chunks (an online logsumexp, then a
# gradient pass) of at most 8 classes a thread, so any class count fits in registers: ptxas -v
# (tools/triton_check.py, sm_80/sm_90) 14-51 registers, no spills. A whole 65,536-class row in one
# block at 4 warps (512 values a thread) spilled 12-14 KB a thread at fp32, 87-92 KB at fp64.
MAX_CLASS_BLOCK = 1024
# Elements per program of the generation reduction, at MSE_WARPS warps: 8 per thread (18-57
# registers; 4096 over 4 warps took up to 238 on sm_90).
MSE_BLOCK_SIZE = 2048
MSE_WARPS = 8

tl = _triton.tl


@_triton.jit
def _online_logsumexp(m, s, w):
    """Per-lane running (max, sum of exp(w - max)) after one more chunk w; -inf = absent lane.

    A lane with nothing yet (max -inf) keeps sum 0 instead of exp(-inf - -inf) = NaN.
    """
    m_new = tl.maximum(m, w)
    safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, s * tl.exp(m - safe) + tl.exp(w - safe)


@_triton.jit
def _lanes_logsumexp(m, s):
    """logsumexp of a row from its per-lane (max, sum) pairs."""
    row_max = tl.max(m, axis=0)
    safe = tl.where(row_max == float("-inf"), 0.0, row_max)
    return row_max + tl.log(tl.sum(s * tl.exp(m - safe), axis=0))


@_triton.jit
def _classification_loss_forward_kernel(
    logits_ptr,
    labels_ptr,
    grad_ptr,
    row_loss_ptr,
    logits_stride_row,
    grad_stride_row,
    n_rows,
    n_cols,
    KIND: tl.constexpr,
    COMPUTE_F64: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    N_CHUNKS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    acc_ty = tl.float64 if COMPUTE_F64 else tl.float32
    # Sizes enter as integers (a float kernel argument is float32 when compiled, which would cost
    # float64 inputs 1e-8 of relative accuracy) and are converted with tl.cast: a size equal to 1
    # arrives as a compile-time constant, a Python int without .to().
    rows = tl.cast(n_rows, acc_ty)
    classes = tl.cast(n_cols, acc_ty)
    label = tl.load(labels_ptr + row)
    valid = (label >= 0) & (label < n_cols)
    logits_row = logits_ptr + row * logits_stride_row
    grad_row = grad_ptr + row * grad_stride_row
    neg_inf = float("-inf")
    lanes = tl.arange(0, BLOCK_SIZE)
    # Pass 1: per-lane online logsumexp of w (z, or -z for ice), of z over j != y (ice_paper),
    # the true logit and the sum of z (klu).
    m = tl.full([BLOCK_SIZE], neg_inf, acc_ty)
    s = tl.zeros([BLOCK_SIZE], acc_ty)
    m_other = tl.full([BLOCK_SIZE], neg_inf, acc_ty)
    s_other = tl.zeros([BLOCK_SIZE], acc_ty)
    true_logit = tl.zeros([BLOCK_SIZE], acc_ty)
    z_sum = tl.zeros([BLOCK_SIZE], acc_ty)
    for chunk in range(N_CHUNKS):
        cols = chunk * BLOCK_SIZE + lanes
        mask = cols < n_cols
        z = tl.load(logits_row + cols, mask=mask, other=0.0).to(acc_ty)
        if KIND == 1:  # ice: logsumexp over -z
            m, s = _online_logsumexp(m, s, tl.where(mask, -z, neg_inf))
        else:
            m, s = _online_logsumexp(m, s, tl.where(mask, z, neg_inf))
        true_logit += tl.where((cols == label) & mask, z, 0.0)
        if KIND == 2:  # ice_paper: a second logsumexp with its own max, over j != y
            other = tl.where(mask & (cols != label), z, neg_inf)
            m_other, s_other = _online_logsumexp(m_other, s_other, other)
        if KIND == 3:
            z_sum += tl.where(mask, z, 0.0)
    lse = _lanes_logsumexp(m, s)
    z_y = tl.sum(true_logit, axis=0)
    if KIND == 0:  # ce
        loss = lse - z_y
    elif KIND == 1:  # ice
        loss = z_y + lse
    elif KIND == 2:  # ice_paper
        lse_other = _lanes_logsumexp(m_other, s_other)
        loss = lse - lse_other
    else:  # klu
        loss = lse - tl.sum(z_sum, axis=0) / classes - tl.log(classes)
    if KIND != 3:
        loss = tl.where(valid, loss, float("nan"))
    tl.store(row_loss_ptr + row, loss)
    # Pass 2: the gradient, from the logits again (the row is cache-resident when it fits).
    for chunk in range(N_CHUNKS):
        cols = chunk * BLOCK_SIZE + lanes
        mask = cols < n_cols
        z = tl.load(logits_row + cols, mask=mask, other=0.0).to(acc_ty)
        one = tl.where(cols == label, 1.0, 0.0)
        # Absent lanes (and the label, for r) enter exp as -inf: 0, never an overflow.
        if KIND == 1:
            soft = tl.exp(tl.where(mask, -z, neg_inf) - lse)
        else:
            soft = tl.exp(tl.where(mask, z, neg_inf) - lse)
        if KIND == 0:
            grad = soft - one
        elif KIND == 1:
            grad = one - soft
        elif KIND == 2:
            grad = soft - tl.exp(tl.where(mask & (cols != label), z, neg_inf) - lse_other)
        else:
            grad = soft - 1.0 / classes
        tl.store(grad_row + cols, (grad / rows).to(grad_ptr.dtype.element_ty), mask=mask)


@_triton.jit
def _mean_square_forward_kernel(
    prediction_ptr,
    target_ptr,
    grad_ptr,
    partial_ptr,
    n_elements,
    sign,
    HAS_TARGET: tl.constexpr,
    COMPUTE_F64: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    acc_ty = tl.float64 if COMPUTE_F64 else tl.float32
    offsets = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    d = tl.load(prediction_ptr + offsets, mask=mask, other=0.0).to(acc_ty)
    if HAS_TARGET:
        d = d - tl.load(target_ptr + offsets, mask=mask, other=0.0).to(acc_ty)
    # tl.cast, not .to(): one element makes n_elements a compile-time constant (a Python int),
    # and dos's sign of 1 likewise.
    grad_scale = 2.0 * tl.cast(sign, acc_ty) / tl.cast(n_elements, acc_ty)
    tl.store(grad_ptr + offsets, (grad_scale * d).to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + pid, tl.sum(d * d, axis=0))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _triton_classification(logits, labels, kind_code):
    batch, classes = logits.shape
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    row_loss = torch.empty(batch, dtype=_compute_dtype(logits.dtype), device=logits.device)
    block = min(triton_block(classes), MAX_CLASS_BLOCK)
    with _triton.launch_device(logits):
        _classification_loss_forward_kernel[(batch,)](
            logits,
            labels,
            grad,
            row_loss,
            logits.stride(0),
            grad.stride(0),
            batch,
            classes,
            KIND=kind_code,
            COMPUTE_F64=logits.dtype == torch.float64,
            BLOCK_SIZE=block,
            # A constant trip count: one compilation per class count already (BLOCK_SIZE), and
            # triton 3.6's interpreter cannot loop to a runtime bound (int() of a 1-element array).
            N_CHUNKS=-(-classes // block),
            num_warps=class_block_warps(block),
        )
    return (row_loss.sum() / batch).to(logits.dtype), grad


def class_block_warps(block: int) -> int:
    """Warps of a classification program: block / 128 in [1, 8], so <= 8 classes per thread.

    One warp up to 256 classes: a (150, 10) batch would leave 3 of 4 default warps idle.
    """
    return min(8, max(1, block // 128))


def triton_block(n: int) -> int:
    """Next power of two >= n (Triton blocks are powers of two)."""
    return 1 << max(0, (n - 1).bit_length())


def _triton_mean_square(prediction, target, sign):
    prediction = prediction.contiguous()
    target = None if target is None else target.contiguous()
    n = prediction.numel()
    grad = torch.empty_like(prediction)
    programs = max(1, -(-n // MSE_BLOCK_SIZE))
    partial = torch.empty(
        programs, dtype=_compute_dtype(prediction.dtype), device=prediction.device
    )
    with _triton.launch_device(prediction):
        _mean_square_forward_kernel[(programs,)](
            prediction,
            prediction if target is None else target,
            grad,
            partial,
            n,
            int(sign),
            HAS_TARGET=target is not None,
            COMPUTE_F64=prediction.dtype == torch.float64,
            BLOCK_SIZE=MSE_BLOCK_SIZE,
            num_warps=MSE_WARPS,
        )
    return (partial.sum() * (sign / n)).to(prediction.dtype), grad


_backend.register_op(
    CLASSIFICATION_OP,
    reference=_reference.classification_loss_forward,
    cpu="ext:classification_loss_forward",
    cuda="ext:classification_loss_forward",
    triton=_triton_classification,
)
_backend.register_op(
    MEAN_SQUARE_OP,
    reference=_reference.mean_square_loss_forward,
    cpu="ext:mean_square_loss_forward",
    cuda="ext:mean_square_loss_forward",
    triton=_triton_mean_square,
)


def _fake_loss(x: torch.Tensor, *_) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (), gradient like x, contiguous): the shapes every loss kernel returns."""
    return x.new_empty(()), torch.empty_like(x, memory_format=torch.contiguous_format)


_library.define(
    CLASSIFICATION_OP,
    "(Tensor logits, Tensor labels, int kind_code) -> (Tensor, Tensor)",
    _fake_loss,
)
_library.define(
    MEAN_SQUARE_OP,
    "(Tensor prediction, Tensor? target, float sign) -> (Tensor, Tensor)",
    _fake_loss,
)


def _scale(grad: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    # A loss is almost always the root of backward (grad_out = 1): on the CPU, where reading the
    # scalar costs no sync, hand back the saved gradient instead of a 4-32 MB multiply.
    # (Not while torch.compile traces: reading a value there is a graph break.)
    if (
        grad_out.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and float(grad_out) == 1.0
    ):
        return grad
    return grad * grad_out.to(grad.dtype)


class ClassificationLossFunction(torch.autograd.Function):
    """Batch-mean classification loss ``kind`` with its gradient computed in the same pass."""

    @staticmethod
    def forward(ctx, logits, labels, kind, backend):
        loss, grad = _library.call(CLASSIFICATION_OP, backend, logits, labels, KIND_CODES[kind])
        ctx.kind = kind
        ctx.save_for_backward(logits, labels, grad)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels, grad = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: keep a differentiable backward
            grad_logits = ClassificationLossBackwardFunction.apply(
                logits, grad_out, labels, grad, ctx.kind
            )
        else:
            grad_logits = _scale(grad, grad_out)
        return grad_logits, None, None, None


class ClassificationLossBackwardFunction(torch.autograd.Function):
    """grad_logits = grad_out * G(logits) (G saved by the forward); backward = the exact HVP."""

    @staticmethod
    def forward(ctx, logits, grad_out, labels, grad, kind):
        ctx.kind = kind
        ctx.save_for_backward(logits, grad_out, labels, grad)
        return grad * grad_out.to(grad.dtype)

    @staticmethod
    def backward(ctx, vector):
        logits, grad_out, labels, grad = ctx.saved_tensors
        hvp = _reference.loss_hvp(logits, labels, ctx.kind, vector.to(logits.dtype))
        grad_logits = hvp * grad_out.to(hvp.dtype)
        grad_grad_out = (vector * grad).sum().to(grad_out.dtype)
        return grad_logits, grad_grad_out, None, None, None


class MeanSquareLossFunction(torch.autograd.Function):
    """sign * mean((prediction - target)^2) with its gradient computed in the same pass."""

    @staticmethod
    def forward(ctx, prediction, target, sign, backend):
        loss, grad = _library.call(MEAN_SQUARE_OP, backend, prediction, target, sign)
        ctx.sign = sign
        ctx.save_for_backward(prediction, target, grad)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        prediction, target, grad = ctx.saved_tensors
        if torch.is_grad_enabled():
            grad_prediction = MeanSquareBackwardFunction.apply(
                prediction, target, grad_out, grad, ctx.sign
            )
        else:
            grad_prediction = _scale(grad, grad_out)
        grad_target = -grad_prediction if target is not None and ctx.needs_input_grad[1] else None
        return grad_prediction, grad_target, None, None


class MeanSquareBackwardFunction(torch.autograd.Function):
    """grad_prediction = grad_out * 2 sign (prediction - target) / N, differentiable once more.

    The Jacobian is constant: d/d prediction = grad_out * 2 sign / N * I, d/d target its
    negative, d/d grad_out the saved gradient.
    """

    @staticmethod
    def forward(ctx, prediction, target, grad_out, grad, sign):
        ctx.sign, ctx.numel = sign, prediction.numel()
        ctx.has_target = target is not None
        ctx.save_for_backward(grad_out, grad)
        return grad * grad_out.to(grad.dtype)

    @staticmethod
    def backward(ctx, vector):
        grad_out, grad = ctx.saved_tensors
        grad_prediction = vector * (grad_out.to(vector.dtype) * (2.0 * ctx.sign / ctx.numel))
        grad_target = -grad_prediction if ctx.has_target else None
        grad_grad_out = (vector * grad).sum().to(grad_out.dtype)
        return grad_prediction, grad_target, grad_grad_out, None, None


def _check_logits(logits, labels, name: str, *, need_labels: bool = True) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name}: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(
            f"{name}: logits must be float32, float64, float16 or bfloat16, got {logits.dtype}"
        )
    _reference._check(logits, labels if need_labels else None, name)
    if need_labels:
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
            got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise TypeError(f"{name}: labels must be an int64 tensor, got {got}")
        if labels.device != logits.device:
            raise ValueError(
                f"{name}: labels are on {labels.device} but logits on {logits.device}; "
                "they must be on the same device"
            )


def classification_loss(logits: torch.Tensor, labels: torch.Tensor | None, kind: str):
    """Batch-mean classification loss ``kind`` (one of :data:`KINDS`), fused; see the functions."""
    if kind not in KIND_CODES:
        raise ValueError(f"unknown classification loss {kind!r}; expected one of {KINDS}")
    need_labels = kind != "klu"
    _check_logits(logits, labels, kind, need_labels=need_labels)
    if kind == "ice_paper" and logits.shape[1] < 2:
        raise ValueError(
            "ice_paper: -log(1 - p_y) is +inf for every input when there is 1 class; "
            "expected at least 2 classes"
        )
    backend = _backend.resolve_backend(CLASSIFICATION_OP, logits.device)
    if backend == "reference":
        return _REFERENCE[kind](logits, labels)
    if need_labels:
        labels = labels.contiguous()
    elif torch.compiler.is_compiling():  # a graph allocates its own (no cache to trace)
        labels = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
    else:
        labels = _unused_labels(logits.shape[0], logits.device)
    if logits.stride(1) != 1:  # kernels take any row stride, but unit column stride
        logits = logits.contiguous()
    return ClassificationLossFunction.apply(logits, labels, kind, backend)


@functools.lru_cache(maxsize=16)
def _unused_labels(batch: int, device: torch.device) -> torch.Tensor:
    """klu's (batch,) placeholder labels, allocated once per shape (the kernels never write it).

    Saves a 2 us allocation per call at (150, 10); made outside inference mode so a cached tensor
    can later be saved for backward.
    """
    with torch.inference_mode(False):
        return torch.zeros(batch, dtype=torch.int64, device=device)


_REFERENCE = {
    "ce": _reference.cross_entropy,
    "ice": _reference.inverse_cross_entropy,
    "ice_paper": _reference.inverse_cross_entropy_paper,
    "klu": _reference.kl_uniform,
}


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy ``ce``: mean_b [lse(z_b) - z_{b, y_b}], fused, twice differentiable.

    The adaptation and normal-training loss; under ``create_graph=True`` its backward is itself
    differentiable (exact Hessian-vector product), so it can be the inner loss of a second-order
    simulation.

    Args:
        logits: (batch, classes) float32, float64, float16 or bfloat16 (rows contiguous or not).
        labels: (batch,) int64 in [0, classes).

    Returns:
        () loss in ``logits.dtype`` (accumulated in float32, float64 for float64).

    Raises:
        TypeError: non-floating logits or non-int64 labels.
        ValueError: wrong shapes, empty batch, labels on another device, or (CPU backends) a
            label outside [0, classes).
        BackendUnavailableError: a forced backend cannot run here.
    """
    return classification_loss(logits, labels, "ce")


def inverse_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The official code's inverse cross-entropy ``ice``: mean_b [z_y + lse(-z)], fused.

    Args / Returns / Raises: as :func:`cross_entropy`.
    """
    return classification_loss(logits, labels, "ice")


def inverse_cross_entropy_paper(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Textbook inverse cross-entropy ``ice_paper``: mean_b [-log(1 - p_y)], fused and stable.

    Computed as lse(z) - lse_{j != y}(z) with two maxima: finite at any finite logit gap (about
    100 at a gap of 100, where the naive form is inf in float32). ``classes == 1`` raises
    ValueError (the loss is +inf for every input).

    Args / Returns / Raises: as :func:`cross_entropy`.
    """
    return classification_loss(logits, labels, "ice_paper")


def kl_uniform(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """KL from the uniform distribution ``klu``: mean_b KL(u || softmax(z_b)), u = 1/C, fused.

    Args:
        logits: (batch, classes).
        labels: ignored (one signature for every loss). Default None.

    Returns / Raises: as :func:`cross_entropy`.
    """
    return classification_loss(logits, labels, "klu")


def _mean_square(prediction, target, sign, name):
    if not isinstance(prediction, torch.Tensor) or prediction.dtype not in (
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
    ):
        raise TypeError(f"{name}: prediction must be a floating torch.Tensor")
    _reference._check_prediction(prediction, target, name)
    if target is not None and (
        target.dtype != prediction.dtype or target.device != prediction.device
    ):
        raise ValueError(
            f"{name}: target must have the prediction's dtype and device "
            f"({prediction.dtype}, {prediction.device}); got ({target.dtype}, {target.device})"
        )
    backend = _backend.resolve_backend(MEAN_SQUARE_OP, prediction.device)
    if backend == "reference":
        return (
            _reference.mse_ascent(prediction, target)
            if target is not None
            else (_reference.dos(prediction))
        )
    return MeanSquareLossFunction.apply(prediction, target, sign, backend)


def mse_ascent(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Gradient-ascent denoising loss ``mse_ascent``: -mean((prediction - target)^2), fused.

    Args:
        prediction: (batch, channels, height, width) predicted noise, floating.
        target: (batch, channels, height, width) true noise, same dtype and device.

    Returns:
        () loss in ``prediction.dtype``; gradients flow to prediction and target.

    Raises:
        TypeError / ValueError: non-floating input, wrong or mismatched shapes, empty input.
    """
    return _mean_square(prediction, target, -1.0, "mse_ascent")


def dos(prediction: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Denial-of-service loss ``dos``: mean(prediction^2), fused.

    Args:
        prediction: (batch, channels, height, width) predicted noise, floating.
        target: ignored (one signature for both generation losses). Default None.

    Returns / Raises: as :func:`mse_ascent`.
    """
    return _mean_square(prediction, None, 1.0, "dos")
