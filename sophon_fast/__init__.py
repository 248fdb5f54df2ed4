"""sophon_fast: SOPHON non-fine-tunable learning with fused Triton, C++ and CUDA kernels.

Most users need :func:`protect` (run the algorithm), :class:`ProtectConfig` and
:class:`ProtectResult`; :func:`evaluate` fine-tunes the protected model, the unprotected one and a
fresh one with one attack grid (:class:`Report`); :func:`simulate` inspects a single fine-tuning
simulation; the fused ops (:func:`flat_sgd_step`, the losses :func:`cross_entropy`,
:func:`inverse_cross_entropy`, :func:`inverse_cross_entropy_paper`, :func:`kl_uniform`,
:func:`mse_ascent`, :func:`dos`, :func:`batch_norm2d` with :func:`convert_batchnorm`, and
:func:`batch_norm_relu_maxpool2d` with :func:`fuse_bn_relu_pool`, :func:`relu_maxpool2d` with
:func:`fuse_relu_pool`) and
:func:`available_backends` are the kernel layer; :mod:`sophon_fast.cpu_cache` controls the cache
of large CPU output buffers those ops draw on.
"""

from ._backend import BackendUnavailableError, available_backends, use_backend
from .api import ProtectConfig, ProtectResult, SimulationResult, protect, simulate
from .attacks import Report, evaluate
from .engine.optimizers import Adversary
from .nn import (
    FusedBatchNorm2d,
    FusedBatchNormReLUMaxPool2d,
    FusedReLUMaxPool2d,
    convert_batchnorm,
    fuse_bn_relu_pool,
    fuse_relu_pool,
)
from .ops.batch_norm import batch_norm2d
from .ops.bn_relu_pool import batch_norm_relu_maxpool2d
from .ops.flat_optim import (
    flat_accumulate_,
    flat_adadelta_step,
    flat_adadelta_step_,
    flat_adagrad_step,
    flat_adagrad_step_,
    flat_adam_step,
    flat_adam_step_,
    flat_adamw_step,
    flat_clip_adam_step_,
    flat_momentum_step,
    flat_momentum_step_,
    flat_rmsprop_step,
    flat_rmsprop_step_,
)
from .ops.flat_sgd_step import flat_sgd_step
from .ops.losses import (
    cross_entropy,
    dos,
    inverse_cross_entropy,
    inverse_cross_entropy_paper,
    kl_uniform,
    mse_ascent,
)
from .ops.relu_pool import relu_maxpool2d

__version__ = "0.1.0"

__all__ = [
    "Adversary",
    "BackendUnavailableError",
    "FusedBatchNorm2d",
    "FusedBatchNormReLUMaxPool2d",
    "FusedReLUMaxPool2d",
    "ProtectConfig",
    "ProtectResult",
    "Report",
    "SimulationResult",
    "available_backends",
    "batch_norm2d",
    "batch_norm_relu_maxpool2d",
    "convert_batchnorm",
    "cross_entropy",
    "dos",
    "evaluate",
    "flat_accumulate_",
    "flat_adam_step",
    "flat_adam_step_",
    "flat_adamw_step",
    "flat_clip_adam_step_",
    "flat_momentum_step",
    "flat_momentum_step_",
    "flat_rmsprop_step",
    "flat_rmsprop_step_",
    "flat_adagrad_step",
    "flat_adagrad_step_",
    "flat_adadelta_step",
    "flat_adadelta_step_",
    "flat_sgd_step",
    "fuse_bn_relu_pool",
    "fuse_relu_pool",
    "inverse_cross_entropy",
    "inverse_cross_entropy_paper",
    "kl_uniform",
    "mse_ascent",
    "protect",
    "relu_maxpool2d",
    "simulate",
    "use_backend",
]
