"""sophon_fast: SOPHON non-fine-tunable learning with fused Triton, C++ and CUDA kernels.

Most users need :func:`protect` (run the algorithm), :class:`ProtectConfig` and
:class:`ProtectResult`; :func:`simulate` inspects a single fine-tuning simulation; the fused ops
(:func:`flat_sgd_step`) and :func:`available_backends` are the kernel layer.
"""

from ._backend import BackendUnavailableError, available_backends, use_backend
from .api import ProtectConfig, ProtectResult, SimulationResult, protect, simulate
from .engine.optimizers import Adversary
from .ops.flat_sgd_step import flat_sgd_step

__version__ = "0.1.0"

__all__ = [
    "Adversary",
    "BackendUnavailableError",
    "ProtectConfig",
    "ProtectResult",
    "SimulationResult",
    "available_backends",
    "flat_sgd_step",
    "protect",
    "simulate",
    "use_backend",
]
