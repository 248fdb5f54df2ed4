"""flat_accumulate: ``acc += weight * grad`` in one pass over a flat buffer (the order-1
meta-gradient accumulator of the fast engine).

Memory traffic per parameter at float32: 12 B (read acc, grad; write acc); a narrower grad is
converted in registers, not through a copy. ``acc`` is float32 (float64 for float64 ``grad``), the optimizers' state dtype; maths in it.

Backends (:mod:`sophon_fast._backend`): ``flat_accumulate_`` with its reference, C++, Triton and
CUDA implementations.
"""

from __future__ import annotations

import torch

from .. import _backend
from ..reference import flat_accumulate as _reference
from . import _triton
from ._checks import check_flat_buffer, check_real
from ._flat_common import check_state, hp_scalar, is_f64, launch

__all__ = ["flat_accumulate_"]

OP_NAME = "flat_accumulate_"

tl = _triton.tl


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
    tl.store(acc_ptr + offsets, acc + hp_scalar(weight, ctype) * g, mask=mask)


def _triton_accumulate_(acc, grad, weight):
    n = grad.numel()
    if n:
        launch(
            _accumulate_kernel, n, (acc, grad, n, weight),
            COMPUTE_F64=is_f64(acc),
        )  # fmt: skip
    return acc


_backend.register_op(
    OP_NAME,
    reference=_reference.flat_accumulate_,
    cpu="ext:flat_accumulate_",
    cuda="ext:flat_accumulate_",
    triton=_triton_accumulate_,
)


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
    check_state(grad, acc, "acc", "grad")
    weight = check_real(weight, "weight")
    return _backend.resolve(OP_NAME, grad.device)(acc, grad, weight)
