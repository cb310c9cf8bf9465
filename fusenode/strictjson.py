"""JSON parsed strictly: what every reader of untrusted JSON here uses (manifests, metadata,
API request bodies).

Refused, with a message saying so: duplicate keys (parsers disagree on which one wins, an
ambiguity to exploit), NaN and Infinity (not JSON, though Python's parser accepts them), and
nesting deep enough to exhaust the stack. Raises ValueError; callers wrap it in their own
error class.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["loads"]


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed ({name} is not JSON)")


def loads(text: str | bytes) -> Any:
    """``json.loads`` without duplicate keys, NaN or Infinity (ValueError for those)."""
    try:
        return json.loads(text, object_pairs_hook=_unique_object, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None
