"""sophon_fast: SOPHON non-fine-tunable learning with fused Triton, C++ and CUDA kernels."""

from ._backend import BackendUnavailableError, available_backends, use_backend
from .ops.flat_sgd_step import flat_sgd_step

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "flat_sgd_step",
    "use_backend",
]
