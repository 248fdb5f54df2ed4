"""Progress bars on long work, imported only when shown: the kernel layer (``import sophon_fast``
and the ops) must work where tqdm is not installed, e.g. a bare GPU machine without network."""

from __future__ import annotations

from collections.abc import Iterable


def progress(iterable: Iterable, *, desc: str, enabled: bool, leave: bool = False) -> Iterable:
    """``tqdm(iterable)`` when ``enabled``, else ``iterable`` itself."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=leave)
