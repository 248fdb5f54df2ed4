"""The one place that decides which implementation of an op runs.

Backends:
    reference  pure PyTorch (:mod:`sophon_fast.reference`): always available, any device.
    cpu        C++ kernels in the compiled extension (CPU tensors).
    triton     Triton kernels: compiled on CUDA tensors; on a machine without a CUDA device they run
               under Triton's interpreter on CPU tensors (slow: for tests, never chosen by ``auto``).
    cuda       CUDA C++ kernels in the compiled extension (CUDA tensors; needs a CUDA build).

The compiled extension is two modules (setup.py): ``sophon_fast._C_cuda`` (CPU and CUDA dispatch,
built only with a CUDA torch and nvcc, optional) and ``sophon_fast._C`` (CPU only, always built).
:func:`extension` is the first of them that imports; both have the same functions, and
``with_cuda`` says which one it is. When the CUDA one failed to build, the reason is kept in
``sophon_fast/_C_cuda_build_error.txt`` and reported as the cuda backend's.

``auto`` (the default) picks per op and device from :data:`AUTO_ORDER`, first available wins.
Before ``auto`` first picks the cuda backend on a device it runs a tiny op there against the
reference (once per device): a kernel image that does not run (architecture mismatch, broken
build) gives one warning naming the device and the reason, and ``auto`` takes the next backend.
``SOPHON_FAST_BACKEND=<name>`` or :func:`use_backend` forces one backend for every op; a forced
backend that cannot run the op raises :class:`BackendUnavailableError` instead of falling back
(and a forced cuda backend is never probed: its kernels' own errors surface).
``SOPHON_FAST_NO_EXT=1`` at run time ignores a built extension (as if installed without it);
``SOPHON_FAST_NO_CUDA=1`` ignores only ``sophon_fast._C_cuda`` (CPU kernels from ``_C``).

Implementation table. Each op module registers its implementations once, at import:

    register_op("flat_sgd_step", reference=_reference.flat_sgd_step,
                cpu="ext:flat_sgd_step_forward", cuda="ext:flat_sgd_step_forward",
                triton=_triton_forward)

An implementation is a callable, or ``"ext:<name>"``: the function ``<name>`` of the compiled
extension, looked up when it is asked for (the extension may be absent, ``SOPHON_FAST_NO_EXT=1``,
or a build that predates the function). ``None`` (the default) means the op has no kernel for that
backend. Then:

    resolve_backend(op, device) -> str        the backend name (auto choice or forced one)
    implementation(op, backend) -> callable   that backend's function for op
    resolve(op, device) -> callable           implementation(op, resolve_backend(op, device))

A registered op's backend is available on a device when the backend is (:func:`why_unavailable`)
and the op has an implementation there (an ``ext:`` one only when the extension has the
function): ``auto`` skips the others, a forced backend raises :class:`BackendUnavailableError`
naming what is missing. An op with several entry points (forward, backward, double backward)
registers each under its own name (``"batch_norm"``, ``"batch_norm.backward"``, ...): the first
entry resolves the backend once and hands the name to the later ones (an autograd Function keeps
it in ``ctx``), so a backward always runs on its forward's backend, whatever is forced by then.
A name not registered (yet) resolves as before: :func:`resolve` then returns the backend name, a
transition for op modules that still pick their kernels themselves.

The cuda probe runs the op given to :func:`register_probe` (flat_sgd_step's module registers
itself) against its reference implementation: this module imports no op module.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
ENV_BACKEND = "SOPHON_FAST_BACKEND"
ENV_NO_EXT = "SOPHON_FAST_NO_EXT"
ENV_NO_CUDA = "SOPHON_FAST_NO_CUDA"
# Left by setup.py beside the modules when sophon_fast._C_cuda failed to build.
CUDA_BUILD_ERROR_FILE = "_C_cuda_build_error.txt"

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


def _cuda_module_missing(exc: ImportError) -> str:
    """Why sophon_fast._C_cuda did not import, in words."""
    note = Path(__file__).with_name(CUDA_BUILD_ERROR_FILE)
    if note.is_file():
        first = (note.read_text(errors="replace").strip().splitlines() or ["?"])[0]
        return (
            f"the CUDA part of the extension failed to build ({first}; see {note}); the CPU "
            "extension sophon_fast._C is in use"
        )
    if isinstance(exc, ModuleNotFoundError) and exc.name == f"{__package__}._C_cuda":
        return "the extension was built without CUDA (no CUDA torch or no nvcc at build time)"
    return f"the CUDA extension sophon_fast._C_cuda is not importable ({exc})"


@functools.cache
def _load_extension():
    """Import the extension once: ``sophon_fast._C_cuda`` if it imports, else ``sophon_fast._C``.

    Imported by name (the extension is optional, like a third-party package): a failed build
    leaves the pure-PyTorch package working.

    Returns:
        (module or None, why there is none, why the cuda backend has no kernels ('' if it has)).
    """
    if _flag(ENV_NO_EXT):
        return None, f"{ENV_NO_EXT}=1 is set", f"{ENV_NO_EXT}=1 is set"
    if _flag(ENV_NO_CUDA):
        cuda_reason = f"{ENV_NO_CUDA}=1 is set"
    elif torch.version.cuda is None:
        cuda_reason = "torch was built without CUDA"
    else:
        try:
            return importlib.import_module(f"{__package__}._C_cuda"), "", ""
        except ImportError as exc:
            cuda_reason = _cuda_module_missing(exc)
    try:
        module = importlib.import_module(f"{__package__}._C")
    except ImportError as exc:
        return None, f"the compiled extension sophon_fast._C is not importable ({exc})", cuda_reason
    return module, "", cuda_reason


def extension():
    """The compiled extension module (``_C_cuda`` or ``_C``), or None when there is none."""
    return _load_extension()[0]


# Whether Triton kernels run under the interpreter (CPU tensors) or compiled (CUDA tensors): fixed
# at import, as Triton reads TRITON_INTERPRET once. ops/_triton.py defines its kernels by it.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1" or not torch.cuda.is_available()


@functools.cache
def triton_mode() -> str | None:
    """'compiled' (CUDA device present), 'interpreted' (CPU via TRITON_INTERPRET), or None."""
    try:
        import triton  # noqa: F401, PLC0415  (optional: the other backends do not need it)
    except ImportError:
        return None
    return "interpreted" if TRITON_INTERPRET else "compiled"


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
        module, reason, _ = _load_extension()
        if module is None:
            return reason
        if backend == "cpu" and kind != "cpu":
            return f"the cpu backend runs on CPU tensors, got a tensor on {device}"
        if backend == "cuda":
            if kind != "cuda":
                return f"the cuda backend runs on CUDA tensors, got a tensor on {device}"
            if not module.with_cuda:
                return _load_extension()[2] or "the extension was built without CUDA"
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


# An op's implementation on one backend: a callable, or "ext:<name>" (a function of the extension).
Implementation = Callable | str
EXT_PREFIX = "ext:"

# op -> backend -> implementation; a backend missing from an op's entry has no kernel for it.
_TABLE: dict[str, dict[str, Implementation]] = {}
_NONE: dict[str, Implementation] = {}


def register_op(
    name: str,
    *,
    reference: Implementation,
    cpu: Implementation | None = None,
    triton: Implementation | None = None,
    cuda: Implementation | None = None,
) -> None:
    """Register (or replace) the implementations of op ``name``, one per backend.

    Args:
        name: the op's name, as passed to :func:`resolve` (``"flat_sgd_step"``); a later entry
            point of the same op gets its own name (``"flat_sgd_step.backward"``).
        reference: the pure-PyTorch implementation (every op has one: the fallback).
        cpu, triton, cuda: the backend's implementation, ``"ext:<name>"`` for a function of the
            compiled extension (looked up when asked for), or None where there is no kernel.

    Raises:
        TypeError: an implementation that is neither callable nor an ``"ext:<name>"`` string.
    """
    entry = {"reference": reference, "cpu": cpu, "triton": triton, "cuda": cuda}
    for backend, impl in entry.items():
        if impl is None and backend != "reference":
            continue
        if not (callable(impl) or (isinstance(impl, str) and impl.startswith(EXT_PREFIX))):
            raise TypeError(
                f"register_op({name!r}): the {backend} implementation must be a callable or an "
                f"'{EXT_PREFIX}<function>' string, got {impl!r}"
            )
    # An extension entry is kept as the bare function name: implementation() runs per kernel
    # call (0.2 us against a 12 us fused loss at (150, 10)), so it does no string slicing.
    _TABLE[name] = {
        backend: impl.removeprefix(EXT_PREFIX) if isinstance(impl, str) else impl
        for backend, impl in entry.items()
        if impl is not None
    }
    for key in [key for key in _auto_choice if key[0] == name]:
        del _auto_choice[key]


def registered_ops() -> tuple[str, ...]:
    """Names of every registered op (and op entry point), in registration order."""
    return tuple(_TABLE)


def _why_no_implementation(op: str, backend: str) -> str | None:
    """None if registered ``op`` has a usable ``backend`` implementation, else why not."""
    impl = _TABLE[op].get(backend)
    if impl is None:
        return f"{op} has no {backend} implementation"
    if isinstance(impl, str):
        module = extension()
        if module is None:
            return _load_extension()[1] or "there is no compiled extension"
        if not hasattr(module, impl):
            return (
                f"the compiled extension was built without {impl} (rebuild it: pip install "
                "--no-build-isolation -e .)"
            )
    return None


def implementation(op: str, backend: str) -> Callable:
    """The function that runs registered ``op`` on ``backend`` (an ``ext:`` one looked up now).

    Raises:
        KeyError: ``op`` is not registered.
        BackendUnavailableError: ``op`` has no usable implementation on ``backend``.
    """
    impl = _TABLE.get(op, _NONE).get(backend)
    if impl.__class__ is str:
        impl = getattr(extension(), impl, None)
    if impl is not None:
        return impl
    if op not in _TABLE:
        raise KeyError(
            f"op {op!r} is not registered; registered ops: {', '.join(_TABLE) or 'none'}"
        )
    raise BackendUnavailableError(
        f"cannot run {op} on {backend}: {_why_no_implementation(op, backend)}"
    )


def _why_op_unavailable(op: str, backend: str, device: torch.device) -> str | None:
    """:func:`why_unavailable`, then (for a registered op) whether the op has a kernel there."""
    reason = why_unavailable(backend, device)
    if reason is None and op in _TABLE:
        reason = _why_no_implementation(op, backend)
    return reason


# torch.compile calls this once while tracing and keeps the name as a constant of the graph (it
# reads the environment, thread-local state and the extension: nothing dynamo should trace), so
# a model runs the backend chosen when it was compiled; torch._dynamo.reset() chooses again.
# The mark is set after the definition (see below) rather than with the decorator, which imports
# torch._dynamo: seconds at `import sophon_fast`, and tqdm with it.
def resolve_backend(op: str, device: torch.device | str, *, fallback: str | None = None) -> str:
    """The backend that runs ``op`` on ``device`` now (forced one, or the first available).

    A forced backend that cannot run ``op`` there raises :class:`BackendUnavailableError`;
    with ``fallback`` named, a forced backend that runs on ``device`` but has no kernel for
    registered ``op`` gives ``fallback`` instead (an op documented to run its reference
    composition wherever it has no kernel).
    """
    if not isinstance(device, torch.device):
        device = torch.device(device)
    forced = _forced()
    if forced is not None:
        reason = why_unavailable(forced, device)
        if reason is None and op in _TABLE:
            reason = _why_no_implementation(op, forced)
            if reason is not None and fallback is not None:
                return fallback
        if reason is None:
            return forced
        raise BackendUnavailableError(
            f"backend {forced!r} was forced (via {ENV_BACKEND} or use_backend) but cannot run "
            f"{op} on {device}: {reason}"
        )
    return _resolve_auto(op, device)


# What torch.compiler.assume_constant_result(resolve_backend) sets (torch >= 2.4); tests/test_compile.py
# compiles with fullgraph=True, which fails if dynamo traces into this function instead.
resolve_backend._dynamo_marked_constant = True  # type: ignore[attr-defined]


def resolve(op: str, device: torch.device | str) -> Callable:
    """The function that runs registered ``op`` on ``device`` now: :func:`implementation` of
    :func:`resolve_backend`. For a name not registered, the backend name (see the module doc)."""
    backend = resolve_backend(op, device)
    if op not in _TABLE:
        return backend
    return implementation(op, backend)


# (op, device) -> backend, filled by _resolve_auto. Every input of the choice is fixed for the
# life of the process (the extension, triton's mode, the device, the cuda probe's verdict), and a
# loss at 150 x 10 calls costs only a few microseconds of look-ups in all.
_auto_choice: dict[tuple[str, torch.device], str] = {}


def _resolve_auto(op: str, device: torch.device) -> str:
    choice = _auto_choice.get((op, device))
    if choice is not None:
        return choice
    order = AUTO_ORDER_BY_OP.get(op, {}).get(device.type) or AUTO_ORDER.get(
        device.type, ("reference",)
    )
    final = True
    choice = "reference"
    for backend in order:
        if _why_op_unavailable(op, backend, device) is not None:
            continue
        if backend == "cuda":
            if _capturing():
                final = False  # a probe cannot run inside a CUDA graph capture: decide later
            elif _probe_on_device("cuda", _device_key(device)) is not None:
                continue
        choice = backend
        break
    if final:
        _auto_choice[(op, device)] = choice
    return choice


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _device_key(device: torch.device) -> torch.device:
    """``device`` with its index ("cuda" is the current CUDA device): one probe per device."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _probe_device(backend: str) -> torch.device:
    if backend == "cuda" or (backend == "triton" and triton_mode() == "compiled"):
        return torch.device("cuda")
    return torch.device("cpu")


# (op, make_args): the op the probe runs, and its positional arguments on a device.
_probe_spec: list[tuple[str, Callable[[torch.device], tuple]]] = []


def register_probe(op: str, make_args: Callable[[torch.device], tuple]) -> None:
    """Make registered ``op`` the probe: ``make_args(device)`` gives a tiny call's positional
    arguments, and a backend passes when its result matches the reference implementation's
    (rtol = atol = 1e-6). The last registration wins."""
    _probe_spec[:] = [(op, make_args)]


def _probe_op(backend: str, device: torch.device) -> str | None:
    """Run the probe op with ``backend`` on ``device``; None if it matches the reference."""
    if not _probe_spec:
        return "no probe op is registered (sophon_fast.ops.flat_sgd_step registers one)"
    op, make_args = _probe_spec[0]
    try:
        with torch.no_grad():
            args = make_args(device)
            got = implementation(op, backend)(*args)
            close = torch.allclose(
                got, implementation(op, "reference")(*args), rtol=1e-6, atol=1e-6
            )
    except Exception as exc:  # a probe reports any failure instead of raising it
        return f"running a probe op failed: {type(exc).__name__}: {exc}"
    return None if close else "the probe op ran but gave a wrong result"


@functools.cache
def _probe_on_device(backend: str, device: torch.device) -> str | None:
    """:func:`_probe_op` once per (backend, device); a failure warns once, naming both."""
    reason = _probe_op(backend, device)
    if reason is not None:
        warnings.warn(
            f"sophon_fast: the {backend} backend does not run on {device} ({reason}); ops on "
            f"{device} use the next backend of the auto order instead (forcing {backend!r} "
            "with SOPHON_FAST_BACKEND or use_backend still runs it)",
            RuntimeWarning,
            stacklevel=2,
        )
    return reason


@functools.cache
def _probe(backend: str) -> str | None:
    """Run a tiny op on ``backend``; None on success, else why it failed."""
    device = _probe_device(backend)
    # The extension's reason first: a failed CUDA build is worth saying on a machine without GPU.
    reason = why_unavailable(backend, device)
    if reason is not None:
        return reason
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is visible"
    if backend == "cuda":
        return _probe_on_device(backend, _device_key(device))
    return _probe_op(backend, device)


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
