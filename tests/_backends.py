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


def unavailable_reason(name: str) -> str | None:
    """Why a test cannot force backend `name` here: None when it can, and None on a machine with
    a CUDA device whatever the reason (there a forced backend that cannot run is a failure, never
    a skip)."""
    if torch.cuda.is_available():
        return None
    if device_for(name) == "cuda":
        return "no CUDA device is visible"
    return _backend.why_unavailable(name, torch.device("cpu"))


def backend_params():
    """pytest params of (backend, device); without a CUDA device those that cannot run here skip
    with the reason. Tests build every input on `device`."""
    params = []
    for name in _backend.BACKENDS:
        device = device_for(name)
        reason = unavailable_reason(name)
        marks = [pytest.mark.skip(reason=f"{name} backend unavailable: {reason}")] if reason else []
        if name in ("cpu", "cuda"):
            marks.append(pytest.mark.ext)
        if name == "triton":
            marks.append(pytest.mark.triton)
        params.append(pytest.param(name, device, id=name, marks=marks))
    return params
