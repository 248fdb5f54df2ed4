"""The one place that decides which implementation of an op runs.

Backends:
    reference  pure PyTorch (:mod:`sophon_fast.reference`): always available, any device.
    cpu        C++ kernels in the compiled extension ``sophon_fast._C`` (CPU tensors).
    triton     Triton kernels: compiled on CUDA tensors; on a machine without a CUDA device they run
               under Triton's interpreter on CPU tensors (slow: for tests, never chosen by ``auto``).
    cuda       CUDA C++ kernels in ``sophon_fast._C`` (CUDA tensors; needs a CUDA build).

``auto`` (the default) picks per op and device from :data:`AUTO_ORDER`, first available wins.
``SOPHON_FAST_BACKEND=<name>`` or :func:`use_backend` forces one backend for every op; a forced
backend that cannot run the op raises :class:`BackendUnavailableError` instead of falling back.
``SOPHON_FAST_NO_EXT=1`` at run time ignores a built extension (as if installed without it).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
ENV_BACKEND = "SOPHON_FAST_BACKEND"
ENV_NO_EXT = "SOPHON_FAST_NO_EXT"

# Preference per device type when nothing is forced; an op may override it in AUTO_ORDER_BY_OP
# once measurements say another order is faster for it.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}
AUTO_ORDER_BY_OP: dict[str, dict[str, tuple[str, ...]]] = {}


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the requested op on the requested device."""


_local = threading.local()


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def _load_extension():
    """Import ``sophon_fast._C`` once; returns (module or None, reason it is missing)."""
    if _flag(ENV_NO_EXT):
        return None, f"{ENV_NO_EXT}=1 is set"
    try:
        from . import _C  # noqa: PLC0415
    except ImportError as exc:
        return None, f"the compiled extension sophon_fast._C is not importable ({exc})"
    return _C, ""


def extension():
    """The compiled extension module, or None when it is not available."""
    return _load_extension()[0]


def triton_mode() -> str | None:
    """'compiled' (CUDA device present), 'interpreted' (CPU via TRITON_INTERPRET), or None."""
    from .ops import _triton  # noqa: PLC0415

    return _triton.mode()


def _forced() -> str | None:
    name = getattr(_local, "backend", None) or os.environ.get(ENV_BACKEND, "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in BACKENDS:
        raise ValueError(
            f"{ENV_BACKEND}={name!r} is not a backend; expected one of {', '.join(BACKENDS)} or 'auto'"
        )
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``name`` for every op inside the block (this thread only); 'auto' restores choice."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(
            f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)} or 'auto'"
        )
    previous = getattr(_local, "backend", None)
    _local.backend = name
    try:
        yield
    finally:
        _local.backend = previous


def why_unavailable(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run ops on ``device``, else the reason in words."""
    kind = device.type
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        module, reason = _load_extension()
        if module is None:
            return reason
        if backend == "cpu" and kind != "cpu":
            return f"the cpu backend runs on CPU tensors, got a tensor on {device}"
        if backend == "cuda":
            if kind != "cuda":
                return f"the cuda backend runs on CUDA tensors, got a tensor on {device}"
            if not module.with_cuda:
                return (
                    "the extension was built without CUDA (no CUDA torch or no nvcc at build time)"
                )
        return None
    if backend == "triton":
        mode = triton_mode()
        if mode is None:
            return "triton is not installed (pip install triton)"
        if mode == "compiled" and kind != "cuda":
            return f"compiled Triton kernels run on CUDA tensors, got a tensor on {device}"
        if mode == "interpreted" and kind != "cpu":
            return f"the Triton interpreter runs on CPU tensors, got a tensor on {device}"
        return None
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def resolve(op: str, device: torch.device | str) -> str:
    """The backend that runs ``op`` on ``device`` now (forced one, or the first available)."""
    if not isinstance(device, torch.device):
        device = torch.device(device)
    forced = _forced()
    if forced is not None:
        reason = why_unavailable(forced, device)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {forced!r} was forced (via {ENV_BACKEND} or use_backend) but cannot run "
                f"{op} on {device}: {reason}"
            )
        return forced
    return _resolve_auto(op, device)


@functools.lru_cache(maxsize=256)
def _resolve_auto(op: str, device: torch.device) -> str:
    # Cached: every input of the choice (the extension, triton's mode, the device) is fixed for
    # the life of the process, and a loss at 150 x 10 costs only a few microseconds in all.
    order = AUTO_ORDER_BY_OP.get(op, {}).get(device.type) or AUTO_ORDER.get(
        device.type, ("reference",)
    )
    for backend in order:
        if why_unavailable(backend, device) is None:
            return backend
    return "reference"


def _probe_device(backend: str) -> torch.device:
    if backend == "cuda" or (backend == "triton" and triton_mode() == "compiled"):
        return torch.device("cuda")
    return torch.device("cpu")


@functools.cache
def _probe(backend: str) -> str | None:
    """Run a tiny op on ``backend``; None on success, else why it failed."""
    device = _probe_device(backend)
    if backend in ("cuda",) or device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
    reason = why_unavailable(backend, device)
    if reason is not None:
        return reason
    from .ops.flat_sgd_step import flat_sgd_step  # noqa: PLC0415
    from .reference.flat_sgd_step import flat_sgd_step as reference_step  # noqa: PLC0415

    params = torch.linspace(-1.0, 1.0, 7, device=device)
    grad = torch.linspace(0.5, -0.5, 7, device=device)
    try:
        with use_backend(backend):
            got = flat_sgd_step(params, grad, lr=0.25, weight_decay=0.5)
    except Exception as exc:  # a probe reports any failure instead of raising it
        return f"running a probe op failed: {type(exc).__name__}: {exc}"
    if not torch.allclose(got, reference_step(params, grad, 0.25, 0.5), rtol=1e-6, atol=1e-6):
        return "the probe op ran but gave a wrong result"
    return None


def _describe(backend: str) -> str:
    if backend == "reference":
        return "pure PyTorch"
    if backend == "cpu":
        return f"C++ extension (at::parallel_for, {torch.get_num_threads()} threads)"
    if backend == "cuda":
        return f"CUDA C++ extension on {torch.cuda.get_device_name()}"
    if triton_mode() == "interpreted":
        return "interpreted (Triton interpreter on the CPU; for tests, slow)"
    return f"compiled Triton on {torch.cuda.get_device_name()}"


def available_backends() -> dict[str, str]:
    """Backends that work here, probed by running a tiny op, with a short description each.

    Returns:
        dict name -> description, in the order of :data:`BACKENDS` (``"cpu" in ...`` works).
    """
    return {name: _describe(name) for name in BACKENDS if _probe(name) is None}


def unavailable_backends() -> dict[str, str]:
    """Backends that do not work here, with the reason each failed its probe."""
    return {name: reason for name in BACKENDS if (reason := _probe(name)) is not None}
