"""The compiled extension's cache of large CPU output buffers.

The flat updates (:func:`~sophon_fast.flat_momentum_step` and the others, in their out-of-place,
differentiable form) return fresh parameter and state buffers every inner step, of the same size
each time. glibc maps every allocation above 32 MiB afresh and unmaps it on free, so on the CPU
each such buffer came back as new pages the kernel zeroes on first touch: about 2.4 ms per 45 MB
buffer (ResNet-18 size, float32) on a 2-core machine, half of a whole Adam forward. The cache keeps
freed buffers of 4 MiB and more mapped and hands them out again, as PyTorch's CUDA caching
allocator does for device memory.

Cached plus live bytes stay within the most bytes ever live at once (a request that sets a new high
first unmaps the cache), so the cache keeps at most that peak mapped; other allocations made while
it holds freed buffers come on top of it (measured: a ResNet-18 second-order protect() outer step
peaked 11 MiB higher, of 1.86 GiB; first-order simulations update in place and do not use it). To
return the memory, call :func:`empty`; to cap or turn it off, :func:`set_limit` or the environment
variable ``SOPHON_FAST_CPU_CACHE_MB`` (read once, at the first cached allocation; ``0`` turns it
off). Linux only; elsewhere, and without the compiled extension, every function here is a no-op
and :func:`stats` reports zeros.
"""

from __future__ import annotations

from . import _backend

__all__ = ["empty", "set_limit", "stats"]

_FIELDS = ("live_bytes", "cached_bytes", "peak_bytes", "hits", "misses", "limit_bytes")


def stats() -> dict[str, int]:
    """Counters: ``live_bytes`` (handed out), ``cached_bytes`` (freed, kept mapped), ``peak_bytes``
    (most live at once since the last :func:`empty`), ``hits``, ``misses`` and ``limit_bytes``
    (-1: uncapped)."""
    ext = _backend.extension()
    if ext is None:
        return dict.fromkeys(_FIELDS, 0)
    return ext.cpu_cache_stats()


def empty() -> None:
    """Unmap every cached buffer (buffers still in use are untouched)."""
    ext = _backend.extension()
    if ext is not None:
        ext.cpu_cache_release()


def set_limit(mib: int | None) -> None:
    """Cap the cached memory at ``mib`` MiB (``0`` caches nothing, ``None`` removes the cap) and
    unmap what exceeds it now."""
    if mib is not None and (isinstance(mib, bool) or not isinstance(mib, int) or mib < 0):
        raise ValueError(f"set_limit: mib must be a whole number of MiB >= 0 or None, got {mib!r}")
    ext = _backend.extension()
    if ext is not None:
        ext.cpu_cache_set_limit(-1 if mib is None else mib << 20)
