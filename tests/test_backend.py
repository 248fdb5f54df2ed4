"""Backend discovery: what available_backends() reports on this machine."""

import os

import pytest
import torch

import sophon_fast
from sophon_fast import _backend


def test_reference_always_available():
    assert "reference" in sophon_fast.available_backends()


def test_cpu_extension_reported_unless_disabled():
    backends = sophon_fast.available_backends()
    if os.environ.get("SOPHON_FAST_NO_EXT") == "1":
        assert "cpu" not in backends
        assert "SOPHON_FAST_NO_EXT" in _backend.unavailable_backends()["cpu"]
    else:
        assert "cpu" in backends, _backend.unavailable_backends().get("cpu")


def test_triton_runs_interpreted_without_gpu():
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: Triton compiles instead")
    assert "triton" in sophon_fast.available_backends()
    assert "interpreted" in sophon_fast.available_backends()["triton"]


def test_unavailable_backends_give_reasons():
    for name, reason in _backend.unavailable_backends().items():
        assert name in _backend.BACKENDS and reason


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown backend"):
        with _backend.use_backend("metal"):
            pass
