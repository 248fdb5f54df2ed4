"""Triton import and mode: compiled on a CUDA machine, interpreted on the CPU otherwise.

Kernels are defined with :func:`jit` instead of ``triton.jit`` so a machine without a CUDA device
runs them under Triton's interpreter on CPU tensors (the way tests check every kernel here), even
when ``TRITON_INTERPRET`` was not set before import. With a CUDA device they compile as usual.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: the reference and C++ backends do not need it.
    triton = None

    class _AbsentLanguage:
        """Stands in for triton.language so kernel annotations (``tl.constexpr``) still evaluate."""

        def __getattr__(self, name):
            return None

    tl = _AbsentLanguage()

INTERPRETED = os.environ.get("TRITON_INTERPRET", "") == "1" or not torch.cuda.is_available()


def mode() -> str | None:
    """'compiled', 'interpreted', or None when Triton is not installed."""
    if triton is None:
        return None
    return "interpreted" if INTERPRETED else "compiled"


def jit(fn):
    """``triton.jit``, or the interpreter's wrapper when no CUDA device exists; None without Triton."""
    if triton is None:
        return None
    if INTERPRETED:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    return triton.jit(fn)
