"""Typed stub of the compiled extension sophon_fast._C (csrc/extension.cpp)."""

from torch import Tensor

with_cuda: bool

def flat_sgd_step_forward(
    params: Tensor, grad: Tensor, lr: float, weight_decay: float, out: Tensor | None = None
) -> Tensor: ...
def flat_sgd_step_backward(grad_out: Tensor, lr: float, weight_decay: float) -> tuple[Tensor, Tensor]: ...
