"""JSON that is valid JSON: Python's ``json`` writes ``NaN`` and ``Infinity``, which no
JSON parser accepts, so non-finite numbers are written as ``null`` instead."""

from __future__ import annotations

import json
import math


def json_safe(x):
    """``x`` with every non-finite float (NaN, inf) replaced by ``None``."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x


def dumps(obj, **kwargs) -> str:
    """``json.dumps`` of :func:`json_safe` ``(obj)``; never emits NaN or Infinity."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)
