"""Backend discovery: what available_backends() reports on this machine; auto dispatch probes
the cuda backend and falls back; the CPU extension works without the CUDA one."""

import os
import re
import subprocess
import sys
import textwrap
import warnings

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


@pytest.fixture
def fresh_dispatch():
    """Forget every cached auto choice and probe verdict before and after the test."""

    def clear():
        for name in ("_resolve_auto", "_probe_on_device", "_probe"):
            cache_clear = getattr(getattr(_backend, name, None), "cache_clear", None)
            if cache_clear is not None:
                cache_clear()
        getattr(_backend, "_auto_choice", {}).clear()

    clear()
    yield
    clear()


class _BrokenCudaExtension:
    """The extension as a CUDA build whose kernel image does not run on the device."""

    with_cuda = True

    def __init__(self, real):
        self._real = real
        self.calls = 0

    def flat_sgd_step_forward(self, *args, **kwargs):
        self.calls += 1
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_auto_probes_the_cuda_backend_once_per_device_and_falls_back(monkeypatch, fresh_dispatch):
    """A CUDA extension that imports but whose kernels do not run must not take every op down:
    auto probes it once per device, warns once naming the device, and takes the next backend;
    a forced cuda backend is not probed and raises the kernel's error. The CPU plays the CUDA
    device here (no GPU on CI): the cuda backend is made to look available on it."""
    broken = _BrokenCudaExtension(_backend.extension())
    real_why = _backend.why_unavailable

    def why(backend, device):
        return None if backend == "cuda" else real_why(backend, device)

    monkeypatch.setattr(_backend, "extension", lambda: broken)
    monkeypatch.setattr(_backend, "why_unavailable", why)
    monkeypatch.setitem(_backend.AUTO_ORDER, "cpu", ("cuda", "reference"))
    cpu = torch.device("cpu")
    with pytest.warns(RuntimeWarning, match=r"cuda backend does not run on cpu .*no kernel image"):
        assert _backend.resolve_backend("flat_sgd_step", cpu) == "reference"
    assert broken.calls == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per device: no second warning, no second probe
        assert _backend.resolve_backend("flat_adam_step", cpu) == "reference"
        got = sophon_fast.flat_sgd_step(torch.ones(4), torch.ones(4), lr=0.5, weight_decay=0.0)
    assert torch.equal(got, torch.full((4,), 0.5))
    assert broken.calls == 1
    with _backend.use_backend("cuda"):
        assert _backend.resolve_backend("flat_sgd_step", cpu) == "cuda"
        with pytest.raises(RuntimeError, match="no kernel image"):
            sophon_fast.flat_sgd_step(torch.ones(4), torch.ones(4), lr=0.5, weight_decay=0.0)


def test_auto_keeps_a_cuda_backend_that_passes_its_probe(monkeypatch, fresh_dispatch):
    """The probe compares against the reference: the real CPU kernels standing in for CUDA ones
    pass it, and auto keeps the backend without a warning."""
    if _backend.extension() is None:
        pytest.skip("compiled extension unavailable")
    real_why = _backend.why_unavailable
    monkeypatch.setattr(
        _backend, "why_unavailable", lambda b, d: None if b == "cuda" else real_why(b, d)
    )
    monkeypatch.setitem(_backend.AUTO_ORDER, "cpu", ("cuda", "reference"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.resolve_backend("flat_sgd_step", torch.device("cpu")) == "cuda"


def test_cpu_extension_works_without_the_cuda_module():
    """sophon_fast._C (CPU only) is used when sophon_fast._C_cuda is absent or broken: run in a
    fresh interpreter where importing _C_cuda fails."""
    if os.environ.get("SOPHON_FAST_NO_EXT") == "1":
        pytest.skip("SOPHON_FAST_NO_EXT=1: no compiled extension")
    code = textwrap.dedent(
        """
        import sys
        sys.modules["sophon_fast._C_cuda"] = None  # any import of it fails
        import torch
        import sophon_fast
        from sophon_fast import _backend
        ext = _backend.extension()
        assert ext is not None and ext.__name__ == "sophon_fast._C", ext
        assert ext.with_cuda is False
        assert _backend.resolve_backend("flat_sgd_step", "cpu") == "cpu"
        got = sophon_fast.flat_sgd_step(torch.ones(5), torch.ones(5), lr=0.5, weight_decay=0.0)
        assert torch.equal(got, torch.full((5,), 0.5)), got
        reason = _backend.why_unavailable("cuda", torch.device("cuda"))
        assert reason, reason
        print("ok:", reason)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=os.environ
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok:" in done.stdout


@pytest.fixture
def scratch_table(monkeypatch, fresh_dispatch):
    """A copy of the implementation table and probe, restored after the test."""
    monkeypatch.setattr(_backend, "_TABLE", dict(_backend._TABLE))
    monkeypatch.setattr(_backend, "_probe_spec", list(_backend._probe_spec))


def _twice(t):
    return 2 * t


def test_resolve_returns_the_implementation_of_the_chosen_backend(scratch_table):
    _backend.register_op("scratch_op", reference=_twice, triton=lambda t: 3 * t)
    cpu = torch.device("cpu")
    with _backend.use_backend("reference"):
        assert _backend.resolve_backend("scratch_op", cpu) == "reference"
        assert _backend.resolve("scratch_op", cpu) is _twice
    assert _backend.implementation("scratch_op", "reference") is _twice
    # auto on the CPU tries cpu first: scratch_op has no cpu kernel, so auto takes the reference
    assert _backend.resolve_backend("scratch_op", cpu) == "reference"
    # forced cpu: no kernel for scratch_op (or, in a pure-Python install, no cpu backend at all)
    cpu_missing = _backend.why_unavailable("cpu", cpu)
    expected = (
        "scratch_op has no cpu implementation" if cpu_missing is None else re.escape(cpu_missing)
    )
    with (
        _backend.use_backend("cpu"),
        pytest.raises(_backend.BackendUnavailableError, match=expected),
    ):
        _backend.resolve_backend("scratch_op", cpu)
    with _backend.use_backend("cpu"):
        if cpu_missing is None:  # the fallback covers a missing kernel, never a missing backend
            assert _backend.resolve_backend("scratch_op", cpu, fallback="reference") == "reference"
        else:
            with pytest.raises(_backend.BackendUnavailableError, match=re.escape(cpu_missing)):
                _backend.resolve_backend("scratch_op", cpu, fallback="reference")
    with pytest.raises(_backend.BackendUnavailableError, match="no cuda implementation"):
        _backend.implementation("scratch_op", "cuda")
    with pytest.raises(KeyError, match="not registered"):
        _backend.implementation("no_such_op", "reference")


def test_extension_entries_are_looked_up_when_asked_for(scratch_table):
    """'ext:<name>' names a function of the compiled extension, fetched at call time: one the
    extension lacks (an older build) makes the backend unavailable for that op, with a reason."""
    if _backend.extension() is None:
        pytest.skip("compiled extension unavailable")
    _backend.register_op(
        "scratch_step", reference=_twice, cpu="ext:flat_sgd_step_forward", cuda="ext:missing_fn"
    )
    cpu = torch.device("cpu")
    assert _backend.resolve("scratch_step", cpu) is _backend.extension().flat_sgd_step_forward
    _backend.register_op("scratch_old", reference=_twice, cpu="ext:missing_fn")
    assert _backend.resolve_backend("scratch_old", cpu) == "reference"
    with (
        _backend.use_backend("cpu"),
        pytest.raises(_backend.BackendUnavailableError, match="built without missing_fn"),
    ):
        _backend.resolve_backend("scratch_old", cpu)


def test_register_op_rejects_what_is_not_an_implementation(scratch_table):
    with pytest.raises(TypeError, match="callable or an 'ext:<function>' string"):
        _backend.register_op("scratch_bad", reference=_twice, cpu="flat_sgd_step_forward")
    with pytest.raises(TypeError, match="reference implementation"):
        _backend.register_op("scratch_bad", reference=None)


def test_every_fused_op_is_registered_with_a_reference():
    for name in ("flat_sgd_step", "batch_norm", "bn_relu_pool", "relu_maxpool2d"):
        assert name in _backend.registered_ops()
    for name in _backend.registered_ops():
        assert callable(_backend.implementation(name, "reference")), name


def test_the_probe_runs_the_registered_probe_op(scratch_table, monkeypatch):
    """The cuda probe compares the registered probe op with its reference: a wrong result is
    reported, and without a registered probe op the backend is not trusted."""
    _backend.register_op("scratch_probe", reference=_twice, cuda=lambda t: 3 * t)
    _backend.register_probe("scratch_probe", lambda device: (torch.ones(3, device=device),))
    assert "wrong result" in _backend._probe_op("cuda", torch.device("cpu"))
    monkeypatch.setattr(_backend, "_probe_spec", [])
    assert "no probe op" in _backend._probe_op("cuda", torch.device("cpu"))
