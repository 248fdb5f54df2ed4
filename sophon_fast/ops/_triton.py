"""Triton import and mode: compiled on a CUDA machine, interpreted on the CPU otherwise.

Kernels are defined with :func:`jit` instead of ``triton.jit`` so a machine without a CUDA device
runs them under Triton's interpreter on CPU tensors (the way tests check every kernel here), even
when ``TRITON_INTERPRET`` was not set before import. With a CUDA device they compile as usual.

Every function :func:`jit` wraps is listed in :data:`KERNELS`, and under the interpreter every
launch ``kernel[grid](*args, **kwargs)`` is passed to the hooks of :func:`launch_hook` before it
runs: ``tools/triton_check.py`` records the launches the real launchers make on CPU tensors and
compiles each one ahead of time for sm_80 and sm_90 with Triton's own specialisation rules.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Callable, Iterator

import torch

from .. import _backend

# Whether kernels run under the interpreter (CPU tensors) or compiled (CUDA tensors): one verdict
# for the package (sophon_fast._backend decides the triton backend's devices by it).
_INTERPRET = _backend.TRITON_INTERPRET

try:
    import triton
    import triton.language as tl

    if _INTERPRET:
        from triton.runtime import interpreter as _interpreter
        from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except ImportError:  # Triton is optional: the reference and C++ backends do not need it.
    triton = None

    class _AbsentLanguage:
        """Stands in for triton.language so kernel annotations (``tl.constexpr``) still evaluate."""

        def __getattr__(self, name):
            return None

    tl = _AbsentLanguage()

# Whether launchers plan for the interpreter: it pays per program and per lane, so they take large
# blocks there and GPU-sized ones (registers) when compiled. SOPHON_FAST_TRITON_PLAN=gpu plans
# for a GPU while still interpreting: tools/triton_check.py records the launches a GPU would
# compile, on CPU tensors.
PLAN_ENV = "SOPHON_FAST_TRITON_PLAN"
INTERPRETED = _INTERPRET and os.environ.get(PLAN_ENV, "") != "gpu"


def mode() -> str | None:
    """'compiled', 'interpreted' (kernels run on CPU tensors), or None without Triton."""
    return None if triton is None else _backend.triton_mode()


# Every object jit() returned, in definition order (interpreted or compiled; ``.fn`` is the source).
KERNELS: list = []
_launch_hooks: list[Callable] = []


@contextlib.contextmanager
def launch_hook(hook: Callable) -> Iterator[None]:
    """Call ``hook(kernel, grid, args, kwargs)`` before each interpreted launch inside the block.

    ``kernel`` is the object :func:`jit` returned; the launch then runs as usual, so the op
    completes and later launches see real data, unless a hook returns False: the launch is then
    skipped and its outputs stay unwritten (for a recorder that needs only the arguments of a
    launch too slow to interpret).
    """
    _launch_hooks.append(hook)
    try:
        yield
    finally:
        _launch_hooks.remove(hook)


def _fix_interpreter_loop_bounds(interpreter) -> None:
    """Let triton 3.6's interpreter loop to a runtime bound (``range(0, n, BLOCK)``).

    It converts a scalar argument with ``int()`` of its 1-element array, which numpy 2 refuses
    ("only 0-dimensional arrays can be converted"); triton 3.8 squeezes the array first. Same
    conversion here, installed once, only where the installed interpreter lacks it.
    """
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or "squeeze" in inspect.getsource(original):
        return  # a version without this hook, or one that converts correctly already

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor


@functools.cache
def _interpreted_kernel_class():
    _fix_interpreter_loop_bounds(_interpreter)

    class InterpretedKernel(_InterpretedFunction):
        """The interpreter's wrapper, reporting each launch to the :func:`launch_hook` hooks."""

        def run(self, *args, grid, warmup, **kwargs):
            run = True
            for hook in tuple(_launch_hooks):
                run = hook(self, grid, args, kwargs) is not False and run
            return super().run(*args, grid=grid, warmup=warmup, **kwargs) if run else None

    return InterpretedKernel


def launch_device(t: torch.Tensor):
    """The context every launch on ``t`` runs in: compiled Triton launches on the *current* CUDA
    device, not the tensor's, so on a multi-GPU machine a launch on ``cuda:1`` must enter that
    device; CPU tensors (the interpreter) need nothing."""
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def jit(fn):
    """``triton.jit``, or the interpreter's wrapper when no CUDA device exists; None without Triton."""
    if triton is None:
        return None
    kernel = _interpreted_kernel_class()(fn) if _INTERPRET else triton.jit(fn)
    KERNELS.append(kernel)
    return kernel
