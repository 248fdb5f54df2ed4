"""Which (backend, device) pairs tests can run here, as pytest parameters with skip reasons.

cpu and reference run on CPU tensors; cuda on CUDA tensors; triton on CUDA tensors when a GPU is
present and under the interpreter on CPU tensors otherwise. On a GPU machine the same tests thus
check the CUDA and compiled Triton kernels.
"""

import pytest
import torch

from sophon_fast import _backend


def device_for(backend: str) -> str:
    if backend == "cuda" or (backend == "triton" and _backend.triton_mode() == "compiled"):
        return "cuda"
    return "cpu"


def backend_params():
    """pytest params of (backend, device); those that cannot run here skip with the reason."""
    params = []
    for name in _backend.BACKENDS:
        device = device_for(name)
        if device == "cuda" and not torch.cuda.is_available():
            reason = "no CUDA device is visible"
        else:
            reason = _backend.why_unavailable(name, torch.device(device))
        marks = [pytest.mark.skip(reason=f"{name} backend unavailable: {reason}")] if reason else []
        if name in ("cpu", "cuda"):
            marks.append(pytest.mark.ext)
        if name == "triton":
            marks.append(pytest.mark.triton)
        params.append(pytest.param(name, device, id=name, marks=marks))
    return params
