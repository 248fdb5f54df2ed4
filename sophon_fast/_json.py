"""Standard JSON for the files users read: NaN and infinities become ``null``.

``json.dumps`` writes ``NaN`` / ``Infinity`` by default, which is not JSON (RFC 8259): jq, JavaScript
and most other readers reject the whole file. A diverged step's loss is recorded as ``null``.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["finite_or_null", "strict_json"]


def finite_or_null(value: Any) -> Any:
    """``value`` with every non-finite float, at any depth of dicts, lists and tuples, as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def strict_json(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`finite_or_null` (``value``); anything else non-standard raises."""
    return json.dumps(finite_or_null(value), allow_nan=False, **kwargs)
