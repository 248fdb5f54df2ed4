"""Test set-up shared by every test file.

TRITON_INTERPRET=1 must be set before anything defines a Triton kernel, so that on a machine
without a CUDA device every Triton kernel runs (slowly) under the interpreter on CPU tensors.
"""

import os

# Passive OpenMP waits, set before torch loads its OpenMP runtime: spinning workers made tiny-tensor
# tests ~100x slower whenever another process shared the two cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_report_header(config):
    from sophon_fast import _backend

    lines = [f"sophon_fast backends: {', '.join(_backend.available_backends())}"]
    for name, reason in _backend.unavailable_backends().items():
        lines.append(f"  unavailable {name}: {reason}")
    return lines


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
